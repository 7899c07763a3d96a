#!/usr/bin/env python3
"""Generate the tiny Kolors UNet fixture and its reference outputs.

Run from the repository root:

    /work/venv/bin/python scripts/make_fixtures_kolors_unet.py

Writes (deterministically: fixed seeds, CPU, float32 reference):

* tests/fixtures/kolors-tiny/unet/           a tiny random-weight diffusers ``UNet2DConditionModel``
                                             in the Kwai-Kolors/Kolors-diffusers layout: config.json
                                             and ``diffusion_pytorch_model.fp16.safetensors`` (the
                                             ``fp16`` variant only, stored in float16).
* tests/fixtures/expected/kolors/unet.safetensors
                                             inputs and diffusers outputs (float32).

Only the ``unet/`` folder is written; the rest of ``kolors-tiny/`` (model_index.json, tokenizer,
text encoder, VAE, scheduler) comes from scripts/make_fixtures_kolors.py.

The model keeps every feature of the real Kolors UNet (models-spec §4.3): down blocks
DownBlock2D, CrossAttnDownBlock2D ×2; up blocks CrossAttnUpBlock2D ×2, UpBlock2D;
UNetMidBlock2DCrossAttn; ``transformer_layers_per_block`` varying per block; the SDXL quirk
``attention_head_dim`` = per-block head counts (so head widths differ between blocks, and the
up blocks take them reversed); linear projections in the transformers; ``encoder_hid_dim_type
"text_proj"`` (text width 64 → cross-attention width 24); ``addition_embed_type "text_time"``
(pooled 64 + 6 time ids × 8 = 112 inputs). The text width 64 equals the hidden size of the tiny
ChatGLM text encoder of the same pipeline fixture.

Weights are perturbed away from their initial constants (norm scales ≠ 1, biases ≠ 0), rounded
to float16 and stored in float16; the reference is the float32 model holding exactly those
rounded values.

Tensors of expected/kolors/unet.safetensors, for each case ``<c>`` in ``square`` (batch 2,
latent 8×8), ``nonsquare`` (batch 2, 8×12) and ``odd`` (batch 1, 7×10: sides not divisible by
4, so the up blocks upsample to the skip connection's size):

* ``<c>.sample``                 [B, 4, h, w]  noisy latents
* ``<c>.timestep``               [B]           one timestep per item
* ``<c>.encoder_hidden_states``  [B, 6, 64]    text encoder states (before ``encoder_hid_proj``)
* ``<c>.text_embeds``            [B, 64]       pooled text embedding
* ``<c>.time_ids``               [B, 6]        (orig_h, orig_w, crop_top, crop_left, tgt_h, tgt_w)
* ``<c>.output``                 [B, 4, h, w]  ``unet(...).sample``
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
UNET_DIR = FIX / "kolors-tiny" / "unet"
EXP_DIR = FIX / "expected" / "kolors"

# Hidden size of the tiny ChatGLM text encoder (tests/fixtures/kolors-tiny/text_encoder).
TEXT_DIM = 64
TIME_ID_DIM = 8
TEXT_LEN = 6

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=[12, 24, 24],
    layers_per_block=2,
    transformer_layers_per_block=[1, 1, 2],
    # The SDXL quirk: these are head counts (widths 24/2 = 12 and 24/4 = 6).
    attention_head_dim=[1, 2, 4],
    norm_num_groups=4,
    norm_eps=1e-5,
    cross_attention_dim=24,
    encoder_hid_dim=TEXT_DIM,
    encoder_hid_dim_type="text_proj",
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_ID_DIM,
    projection_class_embeddings_input_dim=TEXT_DIM + 6 * TIME_ID_DIM,
    use_linear_projection=True,
    upcast_attention=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
)

CASES = [
    # name, batch, h, w, timesteps, time ids
    ("square", 2, 8, 8, [999.0, 341.0], [[64, 64, 0, 0, 64, 64], [1024, 768, 16, 8, 1024, 1024]]),
    ("nonsquare", 2, 8, 12, [1.0, 620.0], [[64, 96, 0, 0, 64, 96], [768, 1152, 0, 32, 512, 768]]),
    ("odd", 1, 7, 10, [457.0], [[56, 80, 4, 2, 56, 80]]),
]


@torch.no_grad()
def perturb_unet(model, gen):
    """Moves every norm scale away from 1 and every bias away from its initial value."""
    norm_prefixes = set()
    for mname, m in model.named_modules():
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            norm_prefixes.add(mname)
    for name, p in model.named_parameters():
        mod = name.rsplit(".", 1)[0]
        if mod in norm_prefixes and name.endswith(".weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        elif name.endswith(".bias"):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        elif name.startswith("conv_out.") or ".proj_out." in name:
            # Non-zero whatever the initialiser (zero-init in some training recipes).
            p.add_(0.02 * torch.randn(p.shape, generator=gen))


def main():
    import diffusers
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    torch.set_num_threads(1)
    diffusers.logging.set_verbosity_error()

    unet = UNet2DConditionModel(**UNET_CONFIG).eval()
    gen = torch.Generator().manual_seed(1234)
    perturb_unet(unet, gen)
    # The checkpoint stores float16: the reference uses exactly the rounded weights.
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(p.half().float())
    for name, p in unet.named_parameters():
        assert p.abs().max() > 0, f"{name} is all zeros"

    if UNET_DIR.exists():
        shutil.rmtree(UNET_DIR)
    UNET_DIR.parent.mkdir(parents=True, exist_ok=True)
    half = UNet2DConditionModel(**UNET_CONFIG)
    half.load_state_dict(unet.state_dict())
    half.to(torch.float16).save_pretrained(str(UNET_DIR), variant="fp16")
    written = sorted(p.name for p in UNET_DIR.iterdir())
    assert written == ["config.json", "diffusion_pytorch_model.fp16.safetensors"], written

    # Reload as a real pipeline would (fp16 variant, upcast), and check it is the same model.
    reloaded = UNet2DConditionModel.from_pretrained(str(UNET_DIR), variant="fp16", torch_dtype=torch.float32)
    for (n1, p1), (n2, p2) in zip(unet.state_dict().items(), reloaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1

    EXP_DIR.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(99)
    out = {}
    for name, b, h, w, ts, ids in CASES:
        sample = torch.randn((b, 4, h, w), generator=gen)
        ehs = torch.randn((b, TEXT_LEN, TEXT_DIM), generator=gen)
        pooled = torch.randn((b, TEXT_DIM), generator=gen)
        timestep = torch.tensor(ts, dtype=torch.float32)
        time_ids = torch.tensor(ids, dtype=torch.float32)
        with torch.no_grad():
            y = reloaded(
                sample,
                timestep,
                encoder_hidden_states=ehs,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                return_dict=False,
            )[0]
        assert y.shape == sample.shape
        print(f"{name}: output std {y.std().item():.4f}, mean {y.mean().item():.4f}")
        out[f"{name}.sample"] = sample
        out[f"{name}.timestep"] = timestep
        out[f"{name}.encoder_hidden_states"] = ehs
        out[f"{name}.text_embeds"] = pooled
        out[f"{name}.time_ids"] = time_ids
        out[f"{name}.output"] = y.contiguous()
    save_file(out, str(EXP_DIR / "unet.safetensors"))
    (EXP_DIR / "unet.json").write_text(
        json.dumps(
            {
                "diffusers": diffusers.__version__,
                "torch": torch.__version__,
                "cases": [c[0] for c in CASES],
                "config": UNET_CONFIG,
            },
            indent=2,
        )
        + "\n"
    )
    size = sum(p.stat().st_size for p in UNET_DIR.iterdir())
    print(f"unet fixture: {size} bytes; parameters: {sum(p.numel() for p in unet.parameters())}")


if __name__ == "__main__":
    main()
