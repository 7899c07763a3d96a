#!/usr/bin/env python3
"""CPU reference timings (PyTorch, f32, random weights, no download) for the PixArt-Sigma components.

    /work/venv/bin/python scripts/bench_reference.py [--runs 3] [--threads 2] [--only transformer|vae]

Cases:
  * pixart_transformer_512: one forward of the real-size PixArtTransformer2DModel (28 layers, 16x72 heads,
    patch 2, caption_channels 4096, in 4 / out 8, sample_size 64, interpolation_scale 1) on a 64x64 latent
    (512x512 px), batch 2 (CFG), 300 text tokens with an all-ones mask.
  * sdxl_vae_decode_512: SDXL VAE (block_out (128,256,512,512), 2 layers, 32 groups, scaling 0.13025)
    decode of a [1,4,64,64] latent.

Each case is warmed up once, then timed --runs times. One JSON line per case on stdout:
  {"name": ..., "median_s": ..., "runs": [...], ...}
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch


def timed(fn, runs):
    fn()  # warm-up
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_transformer(runs):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=16,
        attention_head_dim=72,
        in_channels=4,
        out_channels=8,
        num_layers=28,
        cross_attention_dim=1152,
        attention_bias=True,
        sample_size=64,
        patch_size=2,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        interpolation_scale=1,
        use_additional_conditions=False,
        caption_channels=4096,
    ).eval()
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, 4, 64, 64), generator=g)
    ehs = torch.randn((2, 300, 4096), generator=g)
    mask = torch.ones((2, 300), dtype=torch.int64)
    t = torch.tensor([999, 999], dtype=torch.int64)

    def run():
        with torch.inference_mode():
            model(
                x,
                encoder_hidden_states=ehs,
                timestep=t,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                encoder_attention_mask=mask,
                return_dict=False,
            )

    runs_s = timed(run, runs)
    del model
    gc.collect()
    return {
        "name": "pixart_transformer_512",
        "median_s": statistics.median(runs_s),
        "runs": runs_s,
        "params": n_params,
        "shape": "latent [2,4,64,64], text [2,300,4096]",
    }


def bench_vae(runs):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.13025,
        force_upcast=False,
    ).eval()
    n_params = sum(p.numel() for p in vae.parameters())
    z = torch.randn((1, 4, 64, 64), generator=torch.Generator().manual_seed(2))

    def run():
        with torch.inference_mode():
            vae.decode(z / 0.13025, return_dict=False)

    runs_s = timed(run, runs)
    del vae
    gc.collect()
    return {
        "name": "sdxl_vae_decode_512",
        "median_s": statistics.median(runs_s),
        "runs": runs_s,
        "params": n_params,
        "shape": "latent [1,4,64,64] -> image [1,3,512,512]",
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["transformer", "vae"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import diffusers

    diffusers.logging.set_verbosity_error()
    common = {"threads": args.threads, "torch": torch.__version__, "diffusers": diffusers.__version__, "dtype": "f32"}
    for name, fn in (("transformer", bench_transformer), ("vae", bench_vae)):
        if args.only and args.only != name:
            continue
        res = fn(args.runs)
        res.update(common)
        print(json.dumps(res), flush=True)
        print(f"{res['name']}: median {res['median_s']:.3f}s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
