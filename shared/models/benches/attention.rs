//! Attention timings: the candle-op path vs the fused CPU kernel.
//!
//! `RAYON_NUM_THREADS=2 cargo bench -p relayfarm-models --bench attention`
//! prints one JSON line `{"name", "median_s"}` per case; compare with
//! `scripts/bench_attention_reference.py` (PyTorch, same shapes and names with a `torch_` prefix).

use std::time::Instant;

use candle_core::{Device, Result, Tensor};
use relayfarm_models::nn::attention::{fused_cpu_attention, naive_attention};

fn median_s(iters: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        let out = f()?;
        times.push(t0.elapsed().as_secs_f64());
        drop(out);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn report(name: &str, median: f64) {
    println!(
        "{}",
        serde_json::json!({ "name": name, "median_s": median })
    );
}

fn main() -> Result<()> {
    let iters: usize = std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let dev = Device::Cpu;
    let (b, h, lq, lk, dh) = (2, 16, 1024, 300, 72);
    let scale = 1.0 / (dh as f64).sqrt();
    let q = Tensor::randn(0f32, 1.0, (b, h, lq, dh), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (b, h, lq, dh), &dev)?;
    let v = Tensor::randn(0f32, 1.0, (b, h, lq, dh), &dev)?;
    let kc = Tensor::randn(0f32, 1.0, (b, h, lk, dh), &dev)?;
    let vc = Tensor::randn(0f32, 1.0, (b, h, lk, dh), &dev)?;
    // Batch 0 attends to every text token, batch 1 to the first 120 (CFG-style padding).
    let mut mask = vec![0f32; b * lk];
    for x in &mut mask[lk + 120..] {
        *x = -10000.0;
    }
    let mask = Tensor::from_vec(mask, (b, 1, 1, lk), &dev)?;

    let self_name = "self_2x16x1024x72";
    let cross_name = "cross_2x16x1024x300x72_mask";
    let skip_naive = std::env::var("BENCH_SKIP_NAIVE").is_ok();
    if !skip_naive {
        report(
            &format!("naive_{self_name}"),
            median_s(iters, || naive_attention(&q, &k, &v, None, scale))?,
        );
    }
    report(
        &format!("fused_{self_name}"),
        median_s(iters, || fused_cpu_attention(&q, &k, &v, None, scale))?,
    );
    if !skip_naive {
        report(
            &format!("naive_{cross_name}"),
            median_s(iters, || naive_attention(&q, &kc, &vc, Some(&mask), scale))?,
        );
    }
    report(
        &format!("fused_{cross_name}"),
        median_s(iters, || {
            fused_cpu_attention(&q, &kc, &vc, Some(&mask), scale)
        })?,
    );
    Ok(())
}
