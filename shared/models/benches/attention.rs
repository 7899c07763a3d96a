//! Attention timings: the candle-op path vs the fused CPU kernel.
//!
//! `RAYON_NUM_THREADS=2 cargo bench -p relayfarm-models --bench attention`
//! prints one JSON line `{"name", "median_s", "cpu_s_per_run"}` per case (`BENCH_FILTER=substring`
//! picks cases, `BENCH_ITERS` sets the runs); compare with
//! `scripts/bench_attention_reference.py` (PyTorch, same shapes and names with a `torch_` prefix).

use std::time::Instant;

use candle_core::{Device, IndexOp, Result, Tensor};
use relayfarm_models::nn::attention::{
    fused_cpu_attention, fused_cpu_attention_portable, naive_attention,
};

/// CPU time of every thread of this process so far (Linux `schedstat`; 0 elsewhere).
fn process_cpu_s() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let ns: u64 = tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 * 1e-9
}

/// Median wall time of `iters` runs after one warm-up, and the mean CPU time (all threads) per
/// run, which is less sensitive to other processes competing for the cores.
fn measure(iters: usize, f: impl Fn() -> Result<Tensor>) -> Result<(f64, f64)> {
    f()?;
    let mut times = Vec::with_capacity(iters);
    let cpu0 = process_cpu_s();
    for _ in 0..iters {
        let t0 = Instant::now();
        let out = f()?;
        times.push(t0.elapsed().as_secs_f64());
        drop(out);
    }
    let cpu = (process_cpu_s() - cpu0) / iters as f64;
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], cpu))
}

fn selected(name: &str) -> bool {
    std::env::var("BENCH_FILTER").map_or(true, |f| name.contains(&f))
}

fn report(name: &str, (median, cpu): (f64, f64)) {
    println!(
        "{}",
        serde_json::json!({ "name": name, "median_s": median, "cpu_s_per_run": cpu })
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
    // The DiT's layout: q/k/v as strided views of one `[B, N, 3, H, Dh]` projection.
    let qkv = Tensor::randn(0f32, 1.0, (b, lq, 3, h, dh), &dev)?;
    let qs = qkv.i((.., .., 0))?.transpose(1, 2)?;
    let ks = qkv.i((.., .., 1))?.transpose(1, 2)?;
    let vs = qkv.i((.., .., 2))?.transpose(1, 2)?;

    // The VAE mid-block: one 512-channel head over a 64×64 latent.
    let qv = Tensor::randn(0f32, 1.0, (1, 1, 4096, 512), &dev)?;
    let kv = Tensor::randn(0f32, 1.0, (1, 1, 4096, 512), &dev)?;
    let vv = Tensor::randn(0f32, 1.0, (1, 1, 4096, 512), &dev)?;
    let vae_scale = 1.0 / (512f64).sqrt();
    type Case<'a> = (String, Box<dyn Fn() -> Result<Tensor> + 'a>);
    let self_name = "self_2x16x1024x72";
    let cross_name = "cross_2x16x1024x300x72_mask";
    let cases: Vec<Case> = vec![
        (
            format!("naive_{self_name}"),
            Box::new(|| naive_attention(&q, &k, &v, None, scale)),
        ),
        (
            format!("fused_{self_name}"),
            Box::new(|| fused_cpu_attention(&q, &k, &v, None, scale)),
        ),
        (
            format!("fused_portable_{self_name}"),
            Box::new(|| fused_cpu_attention_portable(&q, &k, &v, None, scale)),
        ),
        (
            format!("fused_{self_name}_qkv_strided"),
            Box::new(|| fused_cpu_attention(&qs, &ks, &vs, None, scale)),
        ),
        (
            format!("naive_{cross_name}"),
            Box::new(|| naive_attention(&q, &kc, &vc, Some(&mask), scale)),
        ),
        (
            format!("fused_{cross_name}"),
            Box::new(|| fused_cpu_attention(&q, &kc, &vc, Some(&mask), scale)),
        ),
        (
            format!("fused_portable_{cross_name}"),
            Box::new(|| fused_cpu_attention_portable(&q, &kc, &vc, Some(&mask), scale)),
        ),
        (
            "naive_vae_1x1x4096x512".into(),
            Box::new(|| naive_attention(&qv, &kv, &vv, None, vae_scale)),
        ),
        (
            "fused_vae_1x1x4096x512".into(),
            Box::new(|| fused_cpu_attention(&qv, &kv, &vv, None, vae_scale)),
        ),
        (
            "fused_portable_vae_1x1x4096x512".into(),
            Box::new(|| fused_cpu_attention_portable(&qv, &kv, &vv, None, vae_scale)),
        ),
    ];
    for (name, f) in &cases {
        if selected(name) {
            report(name, measure(iters, f)?);
        }
    }
    Ok(())
}
