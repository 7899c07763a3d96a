#!/usr/bin/env python3
"""Generate the tiny PixArt-Sigma reference fixtures used by the Rust parity tests.

Run from the repository root:

    /work/venv/bin/python scripts/make_fixtures.py

Writes (deterministically: fixed seeds, CPU, float32):

* tests/fixtures/pixart-sigma-tiny/   a tiny random-weight diffusers PixArtSigmaPipeline folder laid out
                                      like PixArt-alpha/PixArt-Sigma-XL-2-1024-MS (spiece.model tokenizer
                                      without tokenizer.json, a 2-shard T5 text encoder, ...).
* tests/fixtures/expected/            reference outputs from diffusers / transformers (f32 safetensors,
                                      index-like tensors as int64, plus json files).

Tensor names are documented next to each ``save_file`` call below.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
PIPE_DIR = FIX / "pixart-sigma-tiny"
EXP = FIX / "expected"

MAX_SEQ = 300

# Exactly the fields of PixArt-alpha/PixArt-Sigma-XL-2-1024-MS/scheduler/scheduler_config.json
# (models-spec §1.4); diffusers adds its own bookkeeping fields on save.
SCHEDULER_CONFIG = {
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "lambda_min_clipped": float("-inf"),
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_karras_sigmas": False,
    "use_lu_lambdas": False,
    "variance_type": None,
}

T5_CONFIG = dict(
    d_model=32,
    d_kv=8,
    num_heads=4,
    d_ff=48,
    num_layers=2,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6,
    dropout_rate=0.0,
    is_encoder_decoder=True,
    tie_word_embeddings=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)

TRANSFORMER_CONFIG = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    dropout=0.0,
    norm_num_groups=32,
    cross_attention_dim=16,
    attention_bias=True,
    sample_size=32,
    patch_size=2,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    upcast_attention=False,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    interpolation_scale=0.5,
    use_additional_conditions=False,
    caption_channels=32,
)

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
    force_upcast=False,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# 1a. tokenizer
# --------------------------------------------------------------------------------------------------

_WORDS = """time year people way day man thing woman life child world school state family student group
country problem hand part place case week company system program question work government number night
point home water room mother area money story fact month lot right study book eye job word business issue
side kind head house service friend father power hour game line end member law car city community name
president team minute idea kid body information back parent face others level office door health person
art war history party result change morning reason research girl guy moment air teacher force education
foot boy age policy music market sense nation plan college interest death experience effect class control
care field development role effort rate heart drug show leader light voice wife police mind price report
decision son view relationship town road arm difference value building action model season society tax
director position player record paper space ground form event official matter center couple site project
activity star table need court oil situation cost industry figure street image phone data picture practice
piece land product doctor wall patient worker news test movie north love support technology step baby
computer type attention film tree source organization hair window evidence population dusk lighthouse
cabin snowy woods mountain river ocean forest desert castle dragon robot portrait painting watercolor
sunset sunrise golden glowing cinematic detailed photograph realistic colorful vibrant bright dark ancient
modern futuristic cozy quiet small large tiny huge beautiful blurry quality low high red blue green yellow
purple orange black white silver cat dog horse bird fish flower garden bridge tower village rain snow fog
storm cloud sky moon sun galaxy nebula a an the of in on at with and or under over near through""".split()
_ACCENTED = "café naïve Ångström résumé façade jalapeño crème brûlée über São Zürich".split()
_PUNCT = [",", ".", "!", "?", ";", ":", "(", ")", "-", "'", '"', "%", "&", "/"]


def corpus_lines(n=600, seed=0):
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        ws = []
        for _ in range(rng.randint(4, 18)):
            r = rng.random()
            if r < 0.07:
                ws.append(str(rng.randint(0, 3000)))
            elif r < 0.12:
                ws.append(rng.choice(_ACCENTED))
            elif r < 0.2:
                ws.append(rng.choice(_PUNCT))
            else:
                w = rng.choice(_WORDS)
                if rng.random() < 0.1:
                    w = w.capitalize()
                if rng.random() < 0.1:
                    w += rng.choice(["s", "ed", "ing", "ly"])
                ws.append(w)
        lines.append(" ".join(ws))
    return lines


def train_spiece() -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()),
        model_writer=buf,
        vocab_size=600,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        normalization_rule_name="nmt_nfkc",
        byte_fallback=False,
        character_coverage=1.0,
        num_threads=1,
        shuffle_input_sentence=False,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return buf.getvalue()


def write_tokenizer_folder(tok_dir: Path, spiece: bytes, vocab_pieces: int, extra_ids: int = 100):
    """Write spiece.model + special_tokens_map.json + tokenizer_config.json like the real PixArt repo
    (transformers-4.x style T5Tokenizer folder, no tokenizer.json)."""
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    tok_dir.mkdir(parents=True)
    (tok_dir / "spiece.model").write_bytes(spiece)
    extra = [f"<extra_id_{i}>" for i in range(extra_ids)]
    special = {
        "additional_special_tokens": extra,
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
    }
    (tok_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")

    def added(content):
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }

    decoder = {"0": added("<pad>"), "1": added("</s>"), "2": added("<unk>")}
    for i in range(extra_ids):
        # T5 sentinels are appended in reverse: <extra_id_99> first.
        decoder[str(vocab_pieces + i)] = added(f"<extra_id_{extra_ids - 1 - i}>")
    cfg = {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": extra,
        "clean_up_tokenization_spaces": True,
        "eos_token": "</s>",
        "extra_ids": extra_ids,
        "legacy": True,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
    }
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# perturbation helpers
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def perturb_t5(model, gen):
    for name, p in model.named_parameters():
        if "layer_norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))


@torch.no_grad()
def perturb_transformer(model, gen):
    for name, p in model.named_parameters():
        if name.endswith("scale_shift_table"):
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        elif name.endswith(".bias"):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


@torch.no_grad()
def perturb_vae(model, gen):
    norm_prefixes = set()
    for mname, m in model.named_modules():
        if isinstance(m, torch.nn.GroupNorm):
            norm_prefixes.add(mname)
    for name, p in model.named_parameters():
        mod = name.rsplit(".", 1)[0]
        if mod in norm_prefixes and name.endswith(".weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        elif name.endswith(".bias"):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


# --------------------------------------------------------------------------------------------------
# tokenizer corpus
# --------------------------------------------------------------------------------------------------

TOKENIZER_CASES = [
    "a small red cabin in the snowy woods",
    "A Small Red Cabin In The Snowy Woods",
    "",
    " ",
    "   leading spaces",
    "trailing spaces   ",
    "runs   of    spaces  inside",
    "tabs\tand\nnewlines\r\nmixed",
    "ALL CAPS SHOUTING",
    "digits 0123456789 and 3.14159, 2024-11-25",
    "punctuation!?.,;:()[]{}<>-_/\\'\"@#$%^&*+=~`|",
    "café naïve Ångström résumé façade",
    "Cafe\u0301 with a combining accent",
    "full-width ＡＢＣ　１２３！",
    "ligature ﬁne and ½ and ⅷ and ㎏",
    "中文 日本語 한국어",
    "emoji 🐱🔥 and ❤️",
    "<extra_id_0> sentinel",
    "x<extra_id_5>y<extra_id_99>",
    "literal </s> eos in text",
    "</s>",
    "<pad> <unk> literal specials",
    "...!!!???",
    "a lighthouse at dusk, blurry, low quality",
    "don't stop: it's 100% o'clock",
    "ümlaut ÜBER straße",
]


def long_prompt_text():
    rng = random.Random(1234)
    words = [w for w in _WORDS if len(w) > 2]
    parts = []
    for i in range(260):
        parts.append(rng.choice(words))
        if i % 17 == 16:
            parts.append(",")
    return "A " + " ".join(parts) + " 4K photo."


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def main():
    import diffusers
    import transformers
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )
    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(0)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    diffusers.logging.set_verbosity_error()

    # Only this script's outputs: the PixArt folder and the files directly in expected/
    # (the other models' generators own their own folders beside them).
    if PIPE_DIR.exists():
        shutil.rmtree(PIPE_DIR)
    if EXP.exists():
        for f in EXP.iterdir():
            if f.is_file():
                f.unlink()
    EXP.mkdir(parents=True, exist_ok=True)

    # ---- (a) tokenizer -----------------------------------------------------------------------
    spiece = train_spiece()
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=spiece)
    n_pieces = sp.get_piece_size()
    tmp_tok = FIX / "_tok_tmp"
    write_tokenizer_folder(tmp_tok, spiece, n_pieces)
    tokenizer = T5Tokenizer.from_pretrained(str(tmp_tok))
    log("tokenizer", type(tokenizer).__name__, "len", len(tokenizer), "pieces", n_pieces)
    vocab_size = (len(tokenizer) + 7) // 8 * 8

    # ---- (b) text encoder --------------------------------------------------------------------
    torch.manual_seed(1)
    t5cfg = T5Config(vocab_size=vocab_size, **T5_CONFIG)
    text_encoder = T5EncoderModel(t5cfg).eval()
    perturb_t5(text_encoder, torch.Generator().manual_seed(11))

    # ---- (c) transformer ---------------------------------------------------------------------
    torch.manual_seed(2)
    transformer = PixArtTransformer2DModel(**TRANSFORMER_CONFIG).eval()
    perturb_transformer(transformer, torch.Generator().manual_seed(12))

    # ---- (d) VAE -----------------------------------------------------------------------------
    torch.manual_seed(3)
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    perturb_vae(vae, torch.Generator().manual_seed(13))

    # ---- (e) scheduler -----------------------------------------------------------------------
    scheduler = DPMSolverMultistepScheduler(**SCHEDULER_CONFIG)

    # ---- (f) pipeline folder -----------------------------------------------------------------
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
    )
    pipe.save_pretrained(str(PIPE_DIR), safe_serialization=True)
    # text encoder as 2 shards (exercises model.safetensors.index.json)
    te_dir = PIPE_DIR / "text_encoder"
    shutil.rmtree(te_dir)
    n_bytes = sum(p.numel() * 4 for p in text_encoder.parameters())
    text_encoder.save_pretrained(str(te_dir), safe_serialization=True, max_shard_size=int(n_bytes * 0.6))
    shards = sorted(x.name for x in te_dir.glob("*.safetensors"))
    log("text_encoder files", sorted(x.name for x in te_dir.iterdir()))
    assert len(shards) >= 2, shards
    # tokenizer folder exactly like the real repo
    write_tokenizer_folder(PIPE_DIR / "tokenizer", spiece, n_pieces)
    shutil.rmtree(tmp_tok)
    assert (PIPE_DIR / "model_index.json").exists()
    # scheduler_config.json byte-for-byte in the shape of the real file (fields of diffusers 0.22, including
    # the Python-json literal -Infinity; newer fields such as final_sigmas_type are absent -> defaults).
    real_sched = {"_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.22.0.dev0"}
    real_sched.update(SCHEDULER_CONFIG)
    (PIPE_DIR / "scheduler" / "scheduler_config.json").write_text(json.dumps(real_sched, indent=2) + "\n")

    # Reload the tokenizer from the final folder: that is the reference tokenizer.
    tokenizer = T5Tokenizer.from_pretrained(str(PIPE_DIR / "tokenizer"))
    pipe.tokenizer = tokenizer

    versions = {
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "sentencepiece": spm.__version__,
        "tokenizer_class": type(tokenizer).__name__,
        "tokenizer_len": len(tokenizer),
        "spiece_pieces": n_pieces,
    }
    (EXP / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")

    # ---- tokenizer corpus --------------------------------------------------------------------
    corpus = [{"text": t, "ids": tokenizer(t).input_ids} for t in TOKENIZER_CASES]
    padded = []
    for t in ["a small red cabin in the snowy woods", "", long_prompt_text()]:
        enc = tokenizer(t, padding="max_length", max_length=MAX_SEQ, truncation=True, add_special_tokens=True)
        untr = tokenizer(t, padding="longest").input_ids
        padded.append({"text": t, "ids": enc.input_ids, "mask": enc.attention_mask, "untruncated_len": len(untr)})
    assert padded[2]["untruncated_len"] > MAX_SEQ, padded[2]["untruncated_len"]
    (EXP / "tokenizer_corpus.json").write_text(
        json.dumps({"cases": corpus, "padded": padded, "max_length": MAX_SEQ}, indent=1, ensure_ascii=False) + "\n"
    )

    with torch.no_grad():
        # ---- t5 ------------------------------------------------------------------------------
        t5_texts = ["a small red cabin in the snowy woods", ""]
        pre = pipe._text_preprocessing(t5_texts, clean_caption=False)
        enc = tokenizer(
            pre, padding="max_length", max_length=MAX_SEQ, truncation=True, add_special_tokens=True, return_tensors="pt"
        )
        hs = text_encoder(enc.input_ids, attention_mask=enc.attention_mask)[0]
        # names: input_ids i64 [2,300], attention_mask i64 [2,300], hidden_states f32 [2,300,32]
        save_file(
            {
                "input_ids": enc.input_ids.to(torch.int64).contiguous(),
                "attention_mask": enc.attention_mask.to(torch.int64).contiguous(),
                "hidden_states": hs.float().contiguous(),
            },
            str(EXP / "t5.safetensors"),
        )
        (EXP / "t5.json").write_text(
            json.dumps({"texts": t5_texts, "preprocessed": pre, "max_length": MAX_SEQ}, indent=1) + "\n"
        )

        # ---- transformer ---------------------------------------------------------------------
        g = torch.Generator().manual_seed(100)
        tr = {}

        def tr_case(prefix, h, w, ts, L, mask_tail):
            x = torch.randn((2, 4, h, w), generator=g)
            t = torch.tensor(ts, dtype=torch.int64)
            ehs = torch.randn((2, L, 32), generator=g)
            m = torch.ones((2, L), dtype=torch.int64)
            m[1, L - mask_tail :] = 0
            out = transformer(
                x,
                encoder_hidden_states=ehs,
                timestep=t,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                encoder_attention_mask=m,
                return_dict=False,
            )[0]
            tr[prefix + "hidden_states"] = x
            tr[prefix + "timestep"] = t
            tr[prefix + "encoder_hidden_states"] = ehs
            tr[prefix + "encoder_attention_mask"] = m
            tr[prefix + "output"] = out.float().contiguous()

        tr_case("", 6, 10, [999, 421], 12, 5)
        tr_case("default_", 32, 32, [0, 500], 12, 3)
        save_file(tr, str(EXP / "transformer.safetensors"))

        # ---- scheduler -----------------------------------------------------------------------
        g = torch.Generator().manual_seed(200)
        sch = {}
        x_T = torch.randn((1, 4, 4, 4), generator=g)
        sch["x_T"] = x_T
        for N in (14, 15, 20, 25):
            s = DPMSolverMultistepScheduler.from_config(scheduler.config)
            s.set_timesteps(N)
            eps = torch.randn((N, 1, 4, 4, 4), generator=g)
            samples = [x_T]
            x = x_T
            for i, t in enumerate(s.timesteps):
                x = s.step(eps[i], t, x, return_dict=False)[0]
                samples.append(x)
            sch[f"timesteps_{N}"] = s.timesteps.to(torch.int64).clone()
            sch[f"sigmas_{N}"] = s.sigmas.float().clone()
            sch[f"eps_{N}"] = eps
            sch[f"samples_{N}"] = torch.stack(samples).float()
        save_file(sch, str(EXP / "scheduler.safetensors"))

        # ---- vae -----------------------------------------------------------------------------
        g = torch.Generator().manual_seed(300)
        lat = torch.randn((1, 4, 6, 10), generator=g)
        dec = vae.decode(lat, return_dict=False)[0]
        # smooth-ish image in [-1, 1]
        img = torch.tanh(
            torch.nn.functional.interpolate(
                torch.randn((1, 3, 12, 20), generator=g) * 1.5, size=(48, 80), mode="bilinear", align_corners=False
            )
        )
        post = vae.encode(img).latent_dist
        save_file(
            {
                "latents": lat,
                "decoded": dec.float().contiguous(),
                "image": img.contiguous(),
                "encoded_mean": post.mean.float().contiguous(),
                "encoded_logvar": post.logvar.float().contiguous(),
            },
            str(EXP / "vae.safetensors"),
        )

    # ---- pipeline cases ----------------------------------------------------------------------
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_256_BIN

    cases = [
        dict(
            name="nonsquare",
            prompt="A Small Red Cabin in the Snowy Woods, 4K",
            negative_prompt="",
            height=48,
            width=80,
            use_resolution_binning=False,
            num_inference_steps=20,
            guidance_scale=4.5,
            clean_caption=False,
            seed=1000,
        ),
        dict(
            name="binned",
            prompt="a lighthouse at dusk",
            negative_prompt="blurry, low quality",
            height=200,
            width=300,
            use_resolution_binning=True,
            num_inference_steps=10,
            guidance_scale=3.0,
            clean_caption=False,
            seed=1001,
        ),
        dict(
            name="long_prompt",
            prompt=long_prompt_text(),
            negative_prompt="",
            height=64,
            width=64,
            use_resolution_binning=False,
            num_inference_steps=8,
            guidance_scale=4.5,
            clean_caption=False,
            seed=1002,
        ),
    ]
    for c in cases:
        if c["use_resolution_binning"]:
            gh, gw = pipe.image_processor.classify_height_width_bin(c["height"], c["width"], ratios=ASPECT_RATIO_256_BIN)
        else:
            gh, gw = c["height"], c["width"]
        c["gen_height"], c["gen_width"] = gh, gw
        lshape = [1, 4, gh // 8, gw // 8]
        c["latent_shape"] = lshape
        c["max_sequence_length"] = MAX_SEQ
        c["noise"] = f"torch.randn({lshape}, generator=torch.Generator().manual_seed({c['seed']}))"
        noise = torch.randn(lshape, generator=torch.Generator().manual_seed(c["seed"]))
        kw = dict(
            prompt=c["prompt"],
            negative_prompt=c["negative_prompt"],
            height=c["height"],
            width=c["width"],
            use_resolution_binning=c["use_resolution_binning"],
            num_inference_steps=c["num_inference_steps"],
            guidance_scale=c["guidance_scale"],
            clean_caption=c["clean_caption"],
            max_sequence_length=MAX_SEQ,
        )
        with torch.no_grad():
            pe, pm, ne, nm = pipe.encode_prompt(
                c["prompt"],
                True,
                negative_prompt=c["negative_prompt"],
                clean_caption=c["clean_caption"],
                max_sequence_length=MAX_SEQ,
            )
        steps = []
        final_latents = pipe(
            **kw,
            latents=noise.clone(),
            output_type="latent",
            callback=lambda i, t, lat: steps.append(lat.clone()),
            callback_steps=1,
        ).images
        image = pipe(**kw, latents=noise.clone(), output_type="pt").images
        assert final_latents.shape == tuple(lshape), final_latents.shape
        assert tuple(image.shape) == (1, 3, c["height"], c["width"]), image.shape
        step_latents = torch.stack([noise] + steps)
        c["timesteps"] = [int(t) for t in pipe.scheduler.timesteps]
        c["image_clamped_fraction"] = float(((image <= 0) | (image >= 1)).float().mean())
        log(c["name"], "latents std", float(final_latents.std()), "image mean", float(image.mean()),
            "clamped", c["image_clamped_fraction"])
        # names: noise [1,4,h,w], final_latents [1,4,h,w], image [1,3,H,W] in [0,1],
        # step_latents [N+1,1,4,h,w] (step_latents[0] = noise, step_latents[N] = final_latents),
        # prompt_embeds [1,300,32], prompt_attention_mask i64 [1,300],
        # negative_prompt_embeds [1,300,32], negative_prompt_attention_mask i64 [1,300]
        save_file(
            {
                "noise": noise.contiguous(),
                "final_latents": final_latents.float().contiguous(),
                "image": image.float().contiguous(),
                "step_latents": step_latents.float().contiguous(),
                "prompt_embeds": pe.float().contiguous(),
                "prompt_attention_mask": pm.to(torch.int64).contiguous(),
                "negative_prompt_embeds": ne.float().contiguous(),
                "negative_prompt_attention_mask": nm.to(torch.int64).contiguous(),
            },
            str(EXP / f"pipeline_{c['name']}.safetensors"),
        )
    (EXP / "pipeline_cases.json").write_text(json.dumps({"cases": cases}, indent=1, ensure_ascii=False) + "\n")

    verify_reload(cases)
    total = sum(f.stat().st_size for f in FIX.rglob("*") if f.is_file())
    log(f"fixtures total {total / 1e6:.2f} MB")


def verify_reload(cases):
    """Reload the folder with PixArtSigmaPipeline.from_pretrained and check it reproduces the stored outputs."""
    from diffusers import PixArtSigmaPipeline
    from safetensors.torch import load_file

    pipe = PixArtSigmaPipeline.from_pretrained(str(PIPE_DIR), dtype=torch.float32)
    assert type(pipe.tokenizer).__name__ == "T5Tokenizer"
    assert pipe.scheduler.config.final_sigmas_type == "zero"
    for c in cases:
        ref = load_file(str(EXP / f"pipeline_{c['name']}.safetensors"))
        kw = {k: c[k] for k in ("prompt", "negative_prompt", "height", "width", "use_resolution_binning",
                                "num_inference_steps", "guidance_scale", "clean_caption", "max_sequence_length")}
        lat = pipe(**kw, latents=ref["noise"].clone(), output_type="latent").images
        err = float((lat - ref["final_latents"]).abs().max() / ref["final_latents"].std())
        log(f"reload check {c['name']}: max|diff|/std = {err:.3e}")
        assert err < 1e-5, err


if __name__ == "__main__":
    main()
