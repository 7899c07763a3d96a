"""PyTorch reference timings for the attention shapes in shared/models/benches/attention.rs.

Run: RAYON_NUM_THREADS=2 /work/venv/bin/python scripts/bench_attention_reference.py
Prints JSON lines {"name", "median_s", "cpu_s_per_run"} with the same case names as the Rust bench
(prefixed "torch_"); cpu_s_per_run (all threads) is the steadier figure when other processes load the
machine.
"""

import json
import os
import time

import torch
import torch.nn.functional as F


def measure(fn, warmup=1, iters=5):
    """Median wall time, and mean CPU time of the process (all threads) per run."""
    for _ in range(warmup):
        fn()
    times = []
    cpu0 = time.process_time()
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    cpu = (time.process_time() - cpu0) / iters
    times.sort()
    return times[len(times) // 2], cpu


def main():
    torch.set_num_threads(int(os.environ.get("RAYON_NUM_THREADS", "2")))
    torch.manual_seed(0)
    b, h, lq, lk, dh = 2, 16, 1024, 300, 72
    scale = dh**-0.5
    q = torch.randn(b, h, lq, dh)
    k = torch.randn(b, h, lq, dh)
    v = torch.randn(b, h, lq, dh)
    kc = torch.randn(b, h, lk, dh)
    vc = torch.randn(b, h, lk, dh)
    mask = torch.zeros(b, 1, 1, lk)
    mask[1, :, :, 120:] = -10000.0

    with torch.inference_mode():
        cases = {
            "self_2x16x1024x72": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale),
            "cross_2x16x1024x300x72_mask": lambda: F.scaled_dot_product_attention(
                q, kc, vc, attn_mask=mask, scale=scale
            ),
        }
        iters = int(os.environ.get("BENCH_ITERS", "5"))
        for name, fn in cases.items():
            median, cpu = measure(fn, iters=iters)
            row = {"name": f"torch_{name}", "median_s": median, "cpu_s_per_run": cpu}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
