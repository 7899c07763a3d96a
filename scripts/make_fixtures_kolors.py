#!/usr/bin/env python3
"""Generate the tiny Kolors reference fixtures (text side + pipeline) for the Rust parity tests.

Run from the repository root:

    /work/venv/bin/python scripts/make_fixtures_kolors.py            # folder + tokenizer + text encoder
    /work/venv/bin/python scripts/make_fixtures_kolors.py --pipeline # + pipeline cases (needs unet/)

The pipeline part needs ``tests/fixtures/kolors-tiny/unet/`` (written by
scripts/make_fixtures_kolors_unet.py); without it the pipeline cases are skipped with a message.
This script never writes or deletes ``unet/``.

Writes (deterministically: fixed seeds, CPU):

* tests/fixtures/kolors-tiny/   a tiny random-weight KolorsPipeline folder in the layout of
  Kwai-Kolors/Kolors-diffusers (models-spec §4.1): model_index.json with the real class entries,
  scheduler/scheduler_config.json (EulerDiscreteScheduler, the Kolors fields of §4.4),
  tokenizer/{tokenizer.model, tokenizer_config.json} (a SentencePiece BPE model with byte fallback
  trained here on a small English + Chinese corpus), text_encoder/ (a 3-layer ChatGLMModel saved as
  the fp16 variant in 3 shards with model.safetensors.index.fp16.json), vae/ (a tiny SDXL-style
  AutoencoderKL, force_upcast true like the SDXL VAE).
* tests/fixtures/expected/kolors/  reference outputs (f32 safetensors + json):
  - tokenizer_corpus.json: diffusers' ChatGLMTokenizer called as KolorsPipeline.encode_prompt
    calls it (padding="max_length", max_length=256, truncation=True; left padding) for each case:
    {"text", "input_ids", "attention_mask", "position_ids", "untruncated_len"}.
  - text_encoder.safetensors / text_encoder.json: per prompt i (batch of one, as the pipeline runs):
    input_ids_i / attention_mask_i / position_ids_i (i64 [1,256]), prompt_embeds_i (f32 [1,256,H] =
    hidden_states[-2].permute(1,0,2)), pooled_i (f32 [1,H] = hidden_states[-1][-1]).
  - pipeline_cases.json + pipeline_<case>.safetensors: noise (raw N(0,1) latents given to the
    pipeline, which scales them by init_noise_sigma), latents (final latents = output_type="latent"),
    image (output_type="pt", f32 [1,3,H,W] in [0,1]).

The text encoder weights are stored fp16; every reference output is computed from those fp16 weights
upcast to f32 (models are loaded back from the saved folder).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
PIPE_DIR = FIX / "kolors-tiny"
EXP = FIX / "expected" / "kolors"

MAX_SEQ = 256

# The Kolors scheduler fields of models-spec §4.4 (Kwai-Kolors/Kolors-diffusers scheduler_config.json
# as copied by kijai/ComfyUI-KwaiKolorsWrapper); diffusers defaults fill the rest.
SCHEDULER_CONFIG = {
    "beta_end": 0.014,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1100,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}

# ChatGLM3-6B-Base config (models-spec §4.2) at tiny width: same flags, fewer/smaller layers.
CHATGLM_CONFIG = dict(
    num_layers=3,
    hidden_size=64,
    ffn_hidden_size=128,
    kv_channels=16,
    num_attention_heads=4,
    multi_query_attention=True,
    multi_query_group_num=2,
    add_bias_linear=False,
    add_qkv_bias=True,
    apply_query_key_layer_scaling=True,
    apply_residual_connection_post_layernorm=False,
    attention_dropout=0.0,
    attention_softmax_in_fp32=True,
    bias_dropout_fusion=True,
    fp32_residual_connection=False,
    hidden_dropout=0.0,
    layernorm_epsilon=1e-5,
    original_rope=True,
    post_layer_norm=True,
    rmsnorm=True,
    seq_length=32768,
    use_cache=True,
    eos_token_id=2,
    pad_token_id=0,
)

# A tiny SDXL-style VAE (4 latent channels, quant convs, mid attention, scaling 0.13025). The SDXL
# VAE config has force_upcast true, which makes the pipeline decode in f32 when running in f16.
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=4,
    sample_size=256,
    scaling_factor=0.13025,
    force_upcast=True,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
)

# model_index.json of Kwai-Kolors/Kolors-diffusers (models-spec §4.1).
MODEL_INDEX = {
    "_class_name": "KolorsPipeline",
    "_diffusers_version": "0.30.0.dev0",
    "feature_extractor": [None, None],
    "force_zeros_for_empty_prompt": False,
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["kolors", "ChatGLMModel"],
    "tokenizer": ["kolors", "ChatGLMTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

# tokenizer_config.json in the shape of the ChatGLM3 one shipped with Kolors.
TOKENIZER_CONFIG = {
    "added_tokens_decoder": {},
    "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
    "clean_up_tokenization_spaces": False,
    "do_lower_case": False,
    "eos_token": "</s>",
    "model_max_length": 1000000000000000019884624838656,
    "pad_token": "<unk>",
    "padding_side": "left",
    "remove_space": False,
    "tokenizer_class": "ChatGLMTokenizer",
    "unk_token": "<unk>",
}


# tokenizer_config.json variants whose added tokens the corpus records (the first one has no
# special tokens at all, like the older ChatGLM configs).
CONFIG_VARIANTS = [
    {"tokenizer_class": "ChatGLMTokenizer", "remove_space": False, "do_lower_case": False},
    {"unk_token": "<unk>"},
    {"unk_token": "<unk>", "eos_token": "</s>"},
    {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
    {"eos_token": "</s>", "mask_token": "[MASK]", "additional_special_tokens": ["▁a", "<pad>"]},
    {"eos_token": {"content": "</s>", "lstrip": True, "rstrip": True, "__type": "AddedToken"}},
    {"added_tokens_decoder": {"600": {"content": "<pad>", "special": True, "lstrip": False, "rstrip": False}},
     "unk_token": "<unk>"},
    {"added_tokens_decoder": {"600": {"content": "</s>", "special": True, "lstrip": True, "rstrip": True}}},
]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------

_EN = """a an the of in on at with and under over near through small large tiny huge red blue green
yellow purple orange black white golden silver cabin snowy woods mountain river ocean forest desert castle
dragon robot portrait painting watercolor sunset sunrise glowing cinematic detailed photograph realistic
colorful vibrant bright dark ancient modern futuristic cozy quiet beautiful cat dog horse bird fish flower
garden bridge tower village rain snow fog storm cloud sky moon sun galaxy lighthouse dusk girl boy woman man
city street night light shadow water tree house window door table book lamp high quality masterpiece""".split()
_ZH = """一只 可爱 的 小猫 坐在 窗台 上 阳光 明媚 高清 摄影 山水 画 中国 风格 古老 城堡 夜晚 城市 街道
灯光 雨 雪 雾 森林 河流 大海 日落 日出 金色 红色 蓝色 绿色 白色 黑色 美丽 女孩 男孩 老人 花园 花朵 桥 塔
村庄 云 天空 月亮 太阳 星空 龙 机器人 肖像 水彩 油画 电影 感 细节 丰富 真实 色彩 鲜艳 明亮 黑暗 现代 未来
温馨 安静 小 大 一个 穿着 汉服 的 少女 在 湖边 宫殿 竹林 熊猫 茶杯 书法 灯笼 春天 夏天 秋天 冬天 樱花 荷花""".split()
_PUNCT_EN = [",", ".", "!", "?", ":", "(", ")", "-", "'"]
_PUNCT_ZH = ["，", "。", "！", "？", "、", "：", "（", "）"]


def corpus_lines(n=800, seed=0):
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        kind = i % 3
        parts = []
        for _ in range(rng.randint(4, 16)):
            r = rng.random()
            if r < 0.06:
                parts.append(str(rng.randint(0, 2048)))
            elif r < 0.14:
                parts.append(rng.choice(_PUNCT_ZH if kind == 1 else _PUNCT_EN))
            elif kind == 0 or (kind == 2 and r < 0.55):
                w = rng.choice(_EN)
                if rng.random() < 0.1:
                    w = w.capitalize()
                parts.append(w)
            else:
                parts.append(rng.choice(_ZH))
        sep = "" if kind == 1 else " "
        lines.append(sep.join(parts))
    return lines


def train_tokenizer_model() -> bytes:
    """A LLaMA/ChatGLM-style SentencePiece BPE model: unk 0, <s> 1, </s> 2, byte fallback
    (<0x00>..<0xFF> at 3..258), identity normalisation, dummy prefix, whitespace kept."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()),
        model_writer=buf,
        vocab_size=700,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        num_threads=1,
        shuffle_input_sentence=False,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return buf.getvalue()


TOKENIZER_CASES = [
    "a small red cabin in the snowy woods",
    "A Small Red Cabin In The Snowy Woods",
    "一只可爱的小猫坐在窗台上，阳光明媚，高清摄影",
    "中文 English 混合 mixed prompt，带标点。",
    "穿着汉服的少女在湖边, watercolor, high quality",
    "",
    " ",
    "   leading spaces",
    "trailing spaces   ",
    "runs   of    spaces  inside",
    "tabs\tand\nnewlines\r\nmixed",
    "digits 0123456789 and 3.14159, 2024-11-25",
    "punctuation!?.,;:()[]{}<>-_/\\'\"@#$%^&*+=~`|",
    "café naïve Ångström résumé",
    "full-width ＡＢＣ　１２３！",
    "emoji 🐱🔥 and ❤️ 🐼",
    "日本語とかな、한국어",
    "literal </s> <s> <unk> in text",
    "[gMASK] sop [MASK] eop <|user|>",
    "\u200b zero width and \u00a0 nbsp",
    "龘 rare 䶮 characters 𠀀",
    "...!!!???。。。",
    "a lighthouse at dusk, blurry, low quality",
    "ALL CAPS SHOUTING 大写",
]


def fuzz_texts(n=300, seed=7):
    """Random mixed strings for the BPE merge loop: words, random code points (CJK, Latin-1,
    combining marks, emoji, symbols), whitespace runs."""
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0xA0, 0xFF), (0x300, 0x36F), (0x4E00, 0x9FFF), (0x3040, 0x30FF),
              (0x1F300, 0x1F64F), (0x2000, 0x206F), (0xAC00, 0xD7A3)]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            r = rng.random()
            if r < 0.35:
                parts.append(rng.choice(_EN))
            elif r < 0.6:
                parts.append(rng.choice(_ZH))
            elif r < 0.85:
                lo, hi = rng.choice(ranges)
                parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 4))))
            else:
                parts.append(rng.choice([" ", "  ", "\t", "\n", " \n ", "   "]))
        out.append(rng.choice(["", " "]).join(parts))
    return out


def long_prompt_text():
    rng = random.Random(1234)
    parts = []
    for i in range(300):
        parts.append(rng.choice(_EN if i % 2 else _ZH))
        if i % 13 == 12:
            parts.append("，")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def init_chatglm(model, gen):
    """ChatGLMModel uses skip_init (uninitialised memory): set every tensor explicitly."""
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        elif name.endswith(".bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        elif "word_embeddings" in name:
            p.copy_(torch.randn(p.shape, generator=gen))
        else:
            fan_in = p.shape[1]
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)


@torch.no_grad()
def perturb_vae(model, gen):
    norm_prefixes = {n for n, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    for name, p in model.named_parameters():
        mod = name.rsplit(".", 1)[0]
        if mod in norm_prefixes and name.endswith(".weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        elif name.endswith(".bias"):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


# --------------------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------------------


def write_folder():
    import sentencepiece as spm
    from diffusers import AutoencoderKL, EulerDiscreteScheduler
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel

    PIPE_DIR.mkdir(parents=True, exist_ok=True)
    for sub in ["scheduler", "tokenizer", "text_encoder", "vae"]:  # never unet/
        if (PIPE_DIR / sub).exists():
            shutil.rmtree(PIPE_DIR / sub)
    (PIPE_DIR / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")

    # scheduler
    (PIPE_DIR / "scheduler").mkdir()
    sched = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0"}
    sched.update(SCHEDULER_CONFIG)
    (PIPE_DIR / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
    EulerDiscreteScheduler.from_pretrained(str(PIPE_DIR / "scheduler"))  # must parse

    # tokenizer
    model_bytes = train_tokenizer_model()
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    n_pieces = sp.get_piece_size()
    tok_dir = PIPE_DIR / "tokenizer"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.model").write_bytes(model_bytes)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    log("tokenizer pieces", n_pieces, "bytes", len(model_bytes))

    # text encoder: fp16 variant, 3 shards + model.safetensors.index.fp16.json
    torch.manual_seed(1)
    padded_vocab = (n_pieces + 9 + 63) // 64 * 64
    cfg = ChatGLMConfig(padded_vocab_size=padded_vocab, **CHATGLM_CONFIG)
    cfg.architectures = ["ChatGLMModel"]
    model = ChatGLMModel(cfg).eval()
    init_chatglm(model, torch.Generator().manual_seed(11))
    model = model.half()
    te_dir = PIPE_DIR / "text_encoder"
    n_bytes = sum(p.numel() * 2 for p in model.parameters())
    model.save_pretrained(str(te_dir), safe_serialization=True, variant="fp16", max_shard_size=int(n_bytes * 0.4))
    files = sorted(x.name for x in te_dir.iterdir())
    log("text_encoder files", files)
    assert "model.safetensors.index.fp16.json" in files, files
    assert sum(f.endswith(".safetensors") for f in files) >= 2, files

    # vae
    torch.manual_seed(3)
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    perturb_vae(vae, torch.Generator().manual_seed(13))
    vae.save_pretrained(str(PIPE_DIR / "vae"), safe_serialization=True)


def load_text_side():
    from diffusers.pipelines.kolors.text_encoder import ChatGLMModel
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

    tokenizer = ChatGLMTokenizer.from_pretrained(str(PIPE_DIR / "tokenizer"))
    te = ChatGLMModel.from_pretrained(str(PIPE_DIR / "text_encoder"), variant="fp16", torch_dtype=torch.float16)
    te = te.float().eval()
    return tokenizer, te


def tokenize(tokenizer, text):
    return tokenizer(text, padding="max_length", max_length=MAX_SEQ, truncation=True, return_tensors="pt")


def write_text_expected():
    from safetensors.torch import save_file

    tokenizer, te = load_text_side()
    EXP.mkdir(parents=True, exist_ok=True)

    cases = []
    for t in TOKENIZER_CASES + [long_prompt_text()]:
        enc = tokenizer(t, padding="max_length", max_length=MAX_SEQ, truncation=True)
        untr = tokenizer(t)
        cases.append(
            {
                "text": t,
                "input_ids": enc["input_ids"],
                "attention_mask": enc["attention_mask"],
                "position_ids": enc["position_ids"],
                "untruncated_len": len(untr["input_ids"]),
            }
        )
    assert cases[-1]["untruncated_len"] > MAX_SEQ
    special = {k: tokenizer.get_command(k) for k in ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]}
    fuzz = [{"text": t, "input_ids": tokenizer(t)["input_ids"]} for t in fuzz_texts()]

    # transformers 5 turns the special tokens of tokenizer_config.json into added tokens (split
    # out of the raw text, new ids from len(get_vocab())): record what each config variant gives.
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

    probe = "x<unk>y </s> z<s>[MASK] <pad> ▁a <|user|>"
    variants = []
    for cfg in CONFIG_VARIANTS:
        tmp = FIX / "_kolors_tok_tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copy(PIPE_DIR / "tokenizer" / "tokenizer.model", tmp / "tokenizer.model")
        (tmp / "tokenizer_config.json").write_text(json.dumps(cfg))
        tk = ChatGLMTokenizer.from_pretrained(str(tmp))
        variants.append({"config": cfg, "added": dict(tk.added_tokens_encoder), "text": probe,
                         "input_ids": tk(probe)["input_ids"]})
        shutil.rmtree(tmp)
    (EXP / "tokenizer_corpus.json").write_text(
        json.dumps(
            {"max_length": MAX_SEQ, "vocab_size": tokenizer.vocab_size, "special": special, "cases": cases,
             "config_variants": variants, "fuzz": fuzz},
            ensure_ascii=False,
        )
        + "\n"
    )

    prompts = ["a small red cabin in the snowy woods", "一只可爱的小猫坐在窗台上，阳光明媚", long_prompt_text()]
    tensors = {}
    with torch.no_grad():
        for i, p in enumerate(prompts):
            enc = tokenize(tokenizer, p)
            out = te(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                position_ids=enc["position_ids"],
                output_hidden_states=True,
            )
            tensors[f"input_ids_{i}"] = enc["input_ids"].to(torch.int64).contiguous()
            tensors[f"attention_mask_{i}"] = enc["attention_mask"].to(torch.int64).contiguous()
            tensors[f"position_ids_{i}"] = enc["position_ids"].to(torch.int64).contiguous()
            tensors[f"prompt_embeds_{i}"] = out.hidden_states[-2].permute(1, 0, 2).float().contiguous()
            tensors[f"pooled_{i}"] = out.hidden_states[-1][-1, :, :].float().contiguous()
    assert bool(tensors["attention_mask_2"].all()), "the long prompt must fill all 256 positions"
    save_file(tensors, str(EXP / "text_encoder.safetensors"))
    (EXP / "text_encoder.json").write_text(json.dumps({"prompts": prompts}, ensure_ascii=False, indent=1) + "\n")
    log("text encoder expected written")


def write_pipeline_expected():
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        KolorsPipeline,
        UNet2DConditionModel,
    )
    from safetensors.torch import save_file

    unet_dir = PIPE_DIR / "unet"
    if not (unet_dir / "config.json").exists():
        log("no unet/ yet (scripts/make_fixtures_kolors_unet.py writes it): pipeline cases skipped")
        return False
    tokenizer, te = load_text_side()
    unet = UNet2DConditionModel.from_pretrained(str(unet_dir), variant="fp16", torch_dtype=torch.float16)
    unet = unet.float().eval()
    vae = AutoencoderKL.from_pretrained(str(PIPE_DIR / "vae")).eval()
    scheduler = EulerDiscreteScheduler.from_pretrained(str(PIPE_DIR / "scheduler"))
    pipe = KolorsPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    vsf = pipe.vae_scale_factor
    lat_c = unet.config.in_channels
    default = unet.config.sample_size * vsf

    cases = [
        {"name": "default", "prompt": "a small red cabin in the snowy woods", "negative_prompt": None,
         "height": None, "width": None, "steps": 3, "guidance": 5.0, "seed": 0},
        {"name": "negative", "prompt": "一只可爱的小猫坐在窗台上", "negative_prompt": "blurry, low quality, 模糊",
         "height": 64, "width": 64, "steps": 3, "guidance": 5.0, "seed": 1},
        {"name": "nonsquare", "prompt": "a lighthouse at dusk, 日落", "negative_prompt": None,
         "height": 64, "width": 96, "steps": 3, "guidance": 5.0, "seed": 2},
        # relayfarm's `--scheduler dpm++-karras`: the diffusers docs' recipe
        # DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True).
        {"name": "dpm_karras", "prompt": "穿着汉服的少女, watercolor", "negative_prompt": None,
         "height": 64, "width": 64, "steps": 4, "guidance": 6.5, "seed": 3, "scheduler": "dpm++-karras"},
    ]
    with torch.no_grad():
        for c in cases:
            h = c["height"] or default
            w = c["width"] or default
            lshape = (1, lat_c, h // vsf, w // vsf)
            c["noise"] = f"torch.randn({lshape}, generator=torch.Generator().manual_seed({c['seed']}))"
            noise = torch.randn(lshape, generator=torch.Generator().manual_seed(c["seed"]))
            kw = dict(
                prompt=c["prompt"],
                negative_prompt=c["negative_prompt"],
                height=c["height"],
                width=c["width"],
                num_inference_steps=c["steps"],
                guidance_scale=c["guidance"],
                latents=noise.clone(),
            )
            if c.get("scheduler") == "dpm++-karras":
                pipe.scheduler = DPMSolverMultistepScheduler.from_config(scheduler.config, use_karras_sigmas=True)
            else:
                pipe.scheduler = scheduler
            latents = pipe(**kw, output_type="latent").images
            image = pipe(**kw, output_type="pt").images
            c["image_size"] = [h, w]
            c["scheduler_class"] = type(pipe.scheduler).__name__
            c["init_noise_sigma"] = float(pipe.scheduler.init_noise_sigma)
            c["timesteps"] = [float(t) for t in pipe.scheduler.timesteps]
            save_file(
                {
                    "noise": noise.contiguous(),
                    "latents": latents.float().contiguous(),
                    "image": image.float().contiguous(),
                },
                str(EXP / f"pipeline_{c['name']}.safetensors"),
            )
            log("pipeline case", c["name"], tuple(latents.shape), tuple(image.shape))
    (EXP / "pipeline_cases.json").write_text(json.dumps({"cases": cases}, ensure_ascii=False, indent=1) + "\n")
    return True


def main():
    import diffusers
    import transformers

    ap = argparse.ArgumentParser()
    ap.add_argument("--pipeline", action="store_true", help="also write the pipeline cases (needs unet/)")
    ap.add_argument("--pipeline-only", action="store_true", help="only the pipeline cases (folder already written)")
    args = ap.parse_args()

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    diffusers.logging.set_verbosity_error()

    if not args.pipeline_only:
        write_folder()
        write_text_expected()
    if args.pipeline or args.pipeline_only:
        write_pipeline_expected()
    total = sum(f.stat().st_size for d in [PIPE_DIR, EXP] for f in d.rglob("*") if f.is_file())
    log(f"kolors fixtures: {total / 1e6:.2f} MB (unet included if present)")


if __name__ == "__main__":
    main()
