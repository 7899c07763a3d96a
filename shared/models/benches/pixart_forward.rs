//! Real-size PixArt-Σ-XL-2 denoiser forward on the CPU, with random weights.
//!
//! `RAYON_NUM_THREADS=2 cargo bench -p relayfarm-models --bench pixart_forward`
//!
//! Model: 28 blocks, 16 heads × 72, patch 2, caption 4096 → 1152, in 4 / out 8, sample_size 64,
//! interpolation_scale 1 (the configuration of `scripts/bench_reference.py`). Input: a 64×64
//! latent (512×512 px) in a batch of 2 (CFG), 300 text tokens with an all-ones mask, f32.
//! One warm-up forward, then `BENCH_ITERS` (default 3) timed ones (`BENCH_FILTER=substring`
//! picks the lines to run). Prints JSON lines:
//! - `pixart_xl2_512_b2_forward`: median wall time and CPU time (all threads) per forward;
//! - `pixart_xl2_512_b2_attention_only`: the same model's 28 self- and 28 cross-attention calls
//!   alone (same shapes and strided layouts as inside the blocks), to split the forward into
//!   attention and the rest.
//!
//! Compare with `/work/venv/bin/python scripts/bench_reference.py --only transformer`.

use std::time::Instant;

use candle_core::{DType, Device, IndexOp, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use relayfarm_models::denoiser::{PixArtConfig, PixArtOptions, PixArtTransformer};
use relayfarm_models::nn::attention::scaled_dot_product_attention;

/// Hands out a fresh `N(0, 0.02²)` tensor for whatever the model asks for, and reports no
/// optional tensors (no micro-conditioning, no trained KV-compression weights).
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        _name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        Tensor::randn(0f32, 0.02, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("random weights: shape of {name} unknown")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}

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

/// One warm-up, then `iters` runs: (median wall, runs, mean CPU time per run).
fn measure(iters: usize, f: impl Fn() -> Result<()>) -> Result<(f64, Vec<f64>, f64)> {
    f()?;
    let mut runs = Vec::with_capacity(iters);
    let cpu0 = process_cpu_s();
    for _ in 0..iters {
        let t0 = Instant::now();
        f()?;
        runs.push(t0.elapsed().as_secs_f64());
    }
    let cpu = (process_cpu_s() - cpu0) / iters as f64;
    let mut sorted = runs.clone();
    sorted.sort_by(f64::total_cmp);
    Ok((sorted[sorted.len() / 2], runs, cpu))
}

fn report(name: &str, (median, runs, cpu): (f64, Vec<f64>, f64)) {
    println!(
        "{}",
        serde_json::json!({
            "name": name,
            "median_s": median,
            "runs": runs,
            "cpu_s_per_run": cpu,
            "threads": rayon::current_num_threads(),
        })
    );
}

fn main() -> anyhow::Result<()> {
    let iters: usize = std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let dev = Device::Cpu;
    let cfg = PixArtConfig {
        sample_size: 64,
        interpolation_scale: Some(1.0),
        ..PixArtConfig::sigma_xl_2_1024_ms()
    };
    let t0 = Instant::now();
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, dev.clone());
    let model = PixArtTransformer::new(&cfg, vb, &PixArtOptions::default())?;
    eprintln!("random weights built in {:.1}s", t0.elapsed().as_secs_f64());

    let (b, l) = (2, 300);
    let latents = Tensor::randn(0f32, 1.0, (b, 4, 64, 64), &dev)?;
    let timestep = Tensor::new(&[999f32, 999.0], &dev)?;
    let text = Tensor::randn(0f32, 1.0, (b, l, 4096), &dev)?;
    let mask = Tensor::ones((b, l), DType::F32, &dev)?;

    let forward = || -> Result<()> {
        let out = model
            .forward(&latents, &timestep, &text, Some(&mask))
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        assert_eq!(out.dims(), &[b, 8, 64, 64]);
        Ok(())
    };
    let only = std::env::var("BENCH_FILTER").unwrap_or_default();
    if "pixart_xl2_512_b2_forward".contains(&only) {
        report("pixart_xl2_512_b2_forward", measure(iters, forward)?);
    }
    if !"pixart_xl2_512_b2_attention_only".contains(&only) {
        return Ok(());
    }

    // The attention calls of one forward, laid out as the blocks lay them out: q/k/v are
    // strided views of the fused `[B, N, 3, H, Dh]` projection (self) and of `[B, L, 2, H, Dh]`
    // caption keys/values (cross), with the `[B, 1, 1, L]` mask bias.
    let (n, heads, dh) = (1024, cfg.num_attention_heads, cfg.attention_head_dim);
    let scale = 1.0 / (dh as f64).sqrt();
    let qkv = Tensor::randn(0f32, 1.0, (b, n, 3, heads, dh), &dev)?;
    let q = qkv.i((.., .., 0))?.transpose(1, 2)?;
    let k = qkv.i((.., .., 1))?.transpose(1, 2)?;
    let v = qkv.i((.., .., 2))?.transpose(1, 2)?;
    let q2 = Tensor::randn(0f32, 1.0, (b, n, heads, dh), &dev)?.transpose(1, 2)?;
    let kv2 = Tensor::randn(0f32, 1.0, (b, l, 2, heads, dh), &dev)?;
    let k2 = kv2.i((.., .., 0))?.transpose(1, 2)?;
    let v2 = kv2.i((.., .., 1))?.transpose(1, 2)?;
    let bias = Tensor::zeros((b, 1, 1, l), DType::F32, &dev)?;
    let attention = || -> Result<()> {
        for _ in 0..cfg.num_layers {
            let o = scaled_dot_product_attention(&q, &k, &v, None, scale)?;
            // The blocks go back to [B, N, D] right after.
            o.transpose(1, 2)?.reshape((b, n, heads * dh))?;
            let o = scaled_dot_product_attention(&q2, &k2, &v2, Some(&bias), scale)?;
            o.transpose(1, 2)?.reshape((b, n, heads * dh))?;
        }
        Ok(())
    };
    report(
        "pixart_xl2_512_b2_attention_only",
        measure(iters, attention)?,
    );
    Ok(())
}
