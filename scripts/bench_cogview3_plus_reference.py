#!/usr/bin/env python3
"""CPU reference timing (PyTorch, f32, random weights, no download) of the CogView3-Plus-3B denoiser.

    /work/venv/bin/python scripts/bench_cogview3_plus_reference.py [--runs 1] [--threads 2]

Case cogview3_plus_3b_512_b2_forward: one forward of the real-size CogView3PlusTransformer2DModel (diffusers
defaults = THUDM/CogView3-Plus-3B: 30 layers, 64 heads x 40, text_embed_dim 4096, time_embed_dim 512,
condition_dim 256, patch 2, 16 channels) on a 64x64 latent (512x512 px), batch 2 (CFG), 224 text tokens.
About 2.85 B parameters (11.4 GB in f32), initialised in-process; --layers N keeps N blocks. Warmed up once, then timed --runs times.
Prints one JSON line on stdout, matching benches/cogview3_plus_forward.rs:
  {"name": ..., "median_s": ..., "runs": [...], ...}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=30, help="keep only the first N blocks (quick comparisons)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import diffusers
    from diffusers import CogView3PlusTransformer2DModel

    diffusers.logging.set_verbosity_error()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.no_grad():
        model = CogView3PlusTransformer2DModel(num_layers=args.layers).eval()
        # N(0, 0.02^2) like the Rust bench (the timing does not depend on the values).
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model built in {time.perf_counter() - t0:.1f}s ({n_params / 1e9:.3f} B params)", file=sys.stderr)

    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, 16, 64, 64), generator=g)
    ehs = torch.randn((2, 224, 4096), generator=g)
    t = torch.tensor([999, 999], dtype=torch.int64)
    size = torch.tensor([[512.0, 512.0], [512.0, 512.0]])
    crop = torch.zeros((2, 2))

    def run():
        with torch.inference_mode():
            out = model(
                hidden_states=x,
                encoder_hidden_states=ehs,
                timestep=t,
                original_size=size,
                target_size=size,
                crop_coords=crop,
                return_dict=False,
            )[0]
        assert tuple(out.shape) == (2, 16, 64, 64)

    t0 = time.perf_counter()
    run()
    print(f"warm-up forward {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    runs = []
    cpu0 = time.process_time()
    for _ in range(args.runs):
        t0 = time.perf_counter()
        run()
        runs.append(time.perf_counter() - t0)
    cpu = (time.process_time() - cpu0) / max(args.runs, 1)
    res = {
        "name": "cogview3_plus_3b_512_b2_forward",
        "median_s": statistics.median(runs),
        "runs": runs,
        "cpu_s_per_run": cpu,
        "params": n_params,
        "threads": args.threads,
        "num_layers": args.layers,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "dtype": "f32",
        "shape": "latent [2,16,64,64], text [2,224,4096]",
    }
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
