#!/usr/bin/env python3
"""Generate the tiny CogView3-Plus reference fixtures used by the Rust parity tests.

Run from the repository root:

    /work/venv/bin/python scripts/make_fixtures_cogview3_plus.py

Writes (deterministically: fixed seeds, CPU, float32), and touches nothing else under tests/fixtures:

* tests/fixtures/cogview3-plus-tiny/        a tiny random-weight diffusers ``CogView3PlusPipeline`` folder laid
                                            out like THUDM/CogView3-Plus-3B (models-spec §2.1): model_index.json,
                                            tokenizer/ (T5Tokenizer: spiece.model, special_tokens_map.json,
                                            tokenizer_config.json, added_tokens.json; no tokenizer.json),
                                            text_encoder/ (T5EncoderModel, 2 shards + index), transformer/
                                            (CogView3PlusTransformer2DModel, 2 shards + index), vae/ (16-channel
                                            AutoencoderKL without quant convs or mid attention), scheduler/
                                            (CogVideoXDDIMScheduler with the converter's fields).
* tests/fixtures/expected/cogview3-plus/   reference outputs (f32 safetensors, int64 for timesteps) + json:
    - transformer.safetensors / transformer.json: direct ``CogView3PlusTransformer2DModel.forward`` cases.
    - pipeline_cases.json + pipeline_<case>.safetensors: full ``CogView3PlusPipeline`` runs from the folder
      reloaded with ``from_pretrained`` (output_type="latent" and "pt"), fed explicit standard-normal latents.

Every json file lists the tensor names, shapes and dtypes of its safetensors file.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

# Reuse the tiny T5 tokenizer / text-encoder recipe and the perturbation helpers of the PixArt fixtures.
from make_fixtures import T5_CONFIG, perturb_t5, perturb_vae, train_spiece, write_tokenizer_folder  # noqa: E402

FIX = ROOT / "tests" / "fixtures"
PIPE_DIR = FIX / "cogview3-plus-tiny"
EXP = FIX / "expected" / "cogview3-plus"

# Exactly the fields diffusers' scripts/convert_cogview3_to_diffusers.py passes for THUDM/CogView3-Plus-3B
# (models-spec §2.1); save_pretrained then writes every __init__ field like the real scheduler_config.json.
SCHEDULER_FIELDS = {
    "snr_shift_scale": 4.0,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "set_alpha_to_one": True,
    "timestep_spacing": "trailing",
}

# Tiny but complete: every feature of the 3B model (patch 2, 16 channels, q/k LayerNorm, size conditioning,
# fixed pos table sliced to the grid). 4 heads so tensor parallelism over 1, 2 and 4 ranks is testable.
TRANSFORMER_CONFIG = dict(
    patch_size=2,
    in_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    out_channels=16,
    text_embed_dim=T5_CONFIG["d_model"],
    time_embed_dim=24,
    condition_dim=8,
    pos_embed_max_size=16,
    sample_size=8,
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=3,
    act_fn="silu",
    latent_channels=16,
    norm_num_groups=4,
    sample_size=128,
    scaling_factor=1.0,
    force_upcast=True,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=False,
)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


@torch.no_grad()
def perturb_cogview_transformer(model, gen):
    """Move every bias (adaLN, proj_out, embeddings, attention, FF) away from its init value."""
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        elif name.startswith("norm_out.") or ".norm1." in name:
            # make the modulation noticeably non-trivial
            p.mul_(1.5)


def describe(tensors: dict) -> dict:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()}


def save(tensors: dict, path: Path):
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path))
    return describe(tensors)


def write_added_tokens(tok_dir: Path, vocab_pieces: int, extra_ids: int = 100):
    # THUDM/CogView3-Plus-3B/tokenizer also holds added_tokens.json (models-spec §0.4).
    added = {f"<extra_id_{k}>": vocab_pieces + extra_ids - 1 - k for k in range(extra_ids)}
    (tok_dir / "added_tokens.json").write_text(json.dumps(added, indent=2) + "\n")


def main():
    import diffusers
    import sentencepiece as spm
    import transformers
    from diffusers import (
        AutoencoderKL,
        CogVideoXDDIMScheduler,
        CogView3PlusPipeline,
        CogView3PlusTransformer2DModel,
    )
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    diffusers.logging.set_verbosity_error()

    for d in (PIPE_DIR, EXP):
        if d.exists():
            shutil.rmtree(d)
    EXP.mkdir(parents=True)

    # ---- tokenizer (same tiny spiece as the PixArt fixtures) -----------------------------------
    spiece = train_spiece()
    sp = spm.SentencePieceProcessor(model_proto=spiece)
    n_pieces = sp.get_piece_size()
    tmp_tok = FIX / "_cv3_tok_tmp"
    write_tokenizer_folder(tmp_tok, spiece, n_pieces)
    tokenizer = T5Tokenizer.from_pretrained(str(tmp_tok))
    vocab_size = (len(tokenizer) + 7) // 8 * 8

    # ---- text encoder -------------------------------------------------------------------------
    torch.manual_seed(21)
    text_encoder = T5EncoderModel(T5Config(vocab_size=vocab_size, **T5_CONFIG)).eval()
    perturb_t5(text_encoder, torch.Generator().manual_seed(31))

    # ---- transformer --------------------------------------------------------------------------
    torch.manual_seed(22)
    transformer = CogView3PlusTransformer2DModel(**TRANSFORMER_CONFIG).eval()
    perturb_cogview_transformer(transformer, torch.Generator().manual_seed(32))

    # ---- vae ----------------------------------------------------------------------------------
    torch.manual_seed(23)
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    perturb_vae(vae, torch.Generator().manual_seed(33))

    # ---- scheduler ----------------------------------------------------------------------------
    scheduler = CogVideoXDDIMScheduler.from_config(SCHEDULER_FIELDS)

    pipe = CogView3PlusPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    pipe.save_pretrained(str(PIPE_DIR), safe_serialization=True)
    # text encoder and transformer as 2 shards each (the real checkpoint is sharded; exercises the index files)
    for name, model in (("text_encoder", text_encoder), ("transformer", transformer)):
        d = PIPE_DIR / name
        shutil.rmtree(d)
        n_bytes = sum(p.numel() * 4 for p in model.parameters())
        model.save_pretrained(str(d), safe_serialization=True, max_shard_size=int(n_bytes * 0.6))
        shards = sorted(x.name for x in d.glob("*.safetensors"))
        assert len(shards) >= 2, (name, shards)
        log(name, "files", sorted(x.name for x in d.iterdir()))
    write_tokenizer_folder(PIPE_DIR / "tokenizer", spiece, n_pieces)
    write_added_tokens(PIPE_DIR / "tokenizer", n_pieces)
    shutil.rmtree(tmp_tok)

    # ---- reload everything exactly as a user would -----------------------------------------------
    pipe = CogView3PlusPipeline.from_pretrained(str(PIPE_DIR), dtype=torch.float32)
    assert type(pipe.tokenizer).__name__ == "T5Tokenizer", type(pipe.tokenizer)
    assert type(pipe.scheduler).__name__ == "CogVideoXDDIMScheduler"
    assert float(pipe.scheduler.init_noise_sigma) == 1.0
    assert pipe.vae_scale_factor == 8
    transformer = pipe.transformer.eval()
    sched_cfg = json.loads((PIPE_DIR / "scheduler" / "scheduler_config.json").read_text())
    log("scheduler_config.json", sched_cfg)

    # ---- transformer cases ----------------------------------------------------------------------
    g = torch.Generator().manual_seed(100)
    tr = {}
    tr_cases = []
    dtext = TRANSFORMER_CONFIG["text_embed_dim"]

    def tr_case(prefix, h, w, ts, L, orig, target, crop):
        x = torch.randn((2, 16, h, w), generator=g)
        ehs = torch.randn((2, L, dtext), generator=g)
        t = torch.tensor(ts, dtype=torch.int64)
        o = torch.tensor(orig, dtype=torch.float32)
        ta = torch.tensor(target, dtype=torch.float32)
        c = torch.tensor(crop, dtype=torch.float32)
        with torch.no_grad():
            out = transformer(
                hidden_states=x,
                encoder_hidden_states=ehs,
                timestep=t,
                original_size=o,
                target_size=ta,
                crop_coords=c,
                return_dict=False,
            )[0]
        tr[prefix + "hidden_states"] = x
        tr[prefix + "encoder_hidden_states"] = ehs
        tr[prefix + "timestep"] = t
        tr[prefix + "original_size"] = o
        tr[prefix + "target_size"] = ta
        tr[prefix + "crop_coords"] = c
        tr[prefix + "output"] = out.float()
        tr_cases.append({"prefix": prefix, "latent_hw": [h, w], "text_len": L})
        log("transformer case", prefix, "out std", float(out.std()))

    # square: the whole 16x16 positional table (grid = pos_embed_max_size)
    tr_case("square_", 32, 32, [999, 0], 8, [[256, 256], [512, 384]], [[256, 256], [256, 256]], [[0, 0], [32, 16]])
    # non-square grid 3x5
    tr_case("nonsquare_", 6, 10, [500, 37], 8, [[48, 80], [96, 160]], [[48, 80], [48, 80]], [[0, 0], [8, 24]])
    tr_desc = save(tr, EXP / "transformer.safetensors")
    (EXP / "transformer.json").write_text(
        json.dumps(
            {
                "config": TRANSFORMER_CONFIG,
                "cases": tr_cases,
                "tensors": tr_desc,
                "notes": "per case prefix: hidden_states [B,16,H,W], encoder_hidden_states [B,L,Dtext], "
                "timestep i64 [B], original_size/target_size/crop_coords f32 [B,2], output [B,16,H,W]",
            },
            indent=1,
        )
        + "\n"
    )

    # ---- pipeline cases ---------------------------------------------------------------------------
    cases = [
        dict(name="prompt_only", prompt="a small red cabin in the snowy woods", negative_prompt=None,
             height=64, width=96, num_inference_steps=3, guidance_scale=5.0, seed=1000),
        dict(name="negative", prompt="A lighthouse at dusk, cinematic", negative_prompt="blurry, low quality",
             height=96, width=64, num_inference_steps=3, guidance_scale=5.0, seed=1001),
        dict(name="no_cfg", prompt="a robot portrait, watercolor", negative_prompt=None,
             height=64, width=64, num_inference_steps=3, guidance_scale=1.0, seed=1002),
    ]
    for c in cases:
        lshape = [1, 16, c["height"] // 8, c["width"] // 8]
        noise = torch.randn(lshape, generator=torch.Generator().manual_seed(c["seed"]))
        kw = dict(
            prompt=c["prompt"],
            negative_prompt=c["negative_prompt"],
            height=c["height"],
            width=c["width"],
            num_inference_steps=c["num_inference_steps"],
            guidance_scale=c["guidance_scale"],
        )
        steps = []

        def cb(p, i, t, kwargs):
            steps.append(kwargs["latents"].clone())
            return {}

        with torch.no_grad():
            do_cfg = c["guidance_scale"] > 1.0
            pe, ne = pipe.encode_prompt(c["prompt"], c["negative_prompt"], do_cfg)
            final_latents = pipe(**kw, latents=noise.clone(), output_type="latent", callback_on_step_end=cb).images
            image = pipe(**kw, latents=noise.clone(), output_type="pt").images
        assert tuple(final_latents.shape) == tuple(lshape), final_latents.shape
        assert tuple(image.shape) == (1, 3, c["height"], c["width"]), image.shape
        c["latent_shape"] = lshape
        c["max_sequence_length"] = 224
        c["timesteps"] = [int(t) for t in pipe.scheduler.timesteps]
        c["noise"] = f"torch.randn({lshape}, generator=torch.Generator().manual_seed({c['seed']}))"
        c["init_noise_sigma"] = float(pipe.scheduler.init_noise_sigma)
        c["original_size"] = [c["height"], c["width"]]
        c["target_size"] = [c["height"], c["width"]]
        c["crop_coords"] = [0, 0]
        tensors = {
            "latents": noise,
            "final_latents": final_latents.float(),
            "image": image.float(),
            "step_latents": torch.stack([noise] + steps).float(),
            "prompt_embeds": pe.float(),
        }
        if ne is not None:
            tensors["negative_prompt_embeds"] = ne.float()
        c["tensors"] = save(tensors, EXP / f"pipeline_{c['name']}.safetensors")
        c["file"] = f"pipeline_{c['name']}.safetensors"
        log(c["name"], "timesteps", c["timesteps"], "latents std", float(final_latents.std()),
            "image mean", float(image.mean()))
    (EXP / "pipeline_cases.json").write_text(
        json.dumps(
            {
                "pipeline_dir": "tests/fixtures/cogview3-plus-tiny",
                "notes": "latents: the raw N(0,1) noise passed as latents= (the pipeline multiplies it by "
                "init_noise_sigma = 1.0); final_latents: output_type='latent'; image: output_type='pt' in [0,1]; "
                "step_latents[0] = latents, step_latents[i+1] = latents after step i; prompt_embeds [1,224,D] "
                "(T5 without attention mask, padded to max_sequence_length 224); negative_prompt_embeds is all "
                "zeros when negative_prompt is null and CFG is on, absent when guidance_scale <= 1. Sizes are multiples of "
                "32 but below the 3B model's 512 px minimum: the tiny transformer's largest side is "
                "pos_embed_max_size * patch_size * 8 = 256 px (check sizes against the config, or skip the 512 px "
                "minimum for this fixture). original_size = target_size = (height, width), crop_coords = (0, 0), as "
                "the pipeline's defaults.",
                "cases": cases,
            },
            indent=1,
            ensure_ascii=False,
        )
        + "\n"
    )
    (EXP / "versions.json").write_text(
        json.dumps(
            {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
             "torch": torch.__version__, "sentencepiece": spm.__version__},
            indent=1,
        )
        + "\n"
    )

    total = 0
    for root in (PIPE_DIR, EXP):
        for f in sorted(root.rglob("*")):
            if f.is_file():
                total += f.stat().st_size
                log(f"{f.stat().st_size:>9}  {f.relative_to(FIX)}")
    log(f"cogview3-plus fixtures total {total / 1e6:.2f} MB")
    assert total < 2_000_000, total


if __name__ == "__main__":
    main()
