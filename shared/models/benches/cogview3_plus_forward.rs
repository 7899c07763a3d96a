//! Real-size CogView3-Plus-3B denoiser forward on the CPU, with random weights.
//!
//! `RAYON_NUM_THREADS=2 cargo bench -p relayfarm-models --bench cogview3_plus_forward`
//!
//! Model: the 3B configuration (30 blocks, 64 heads × 40 = 2560 wide, text 4096, time 512,
//! condition 256, patch 2, 16 channels in and out), weights `N(0, 0.02²)` generated in-process
//! (about 2.85 B parameters, 11.4 GB in f32). Input: a 64×64 latent (512×512 px) in a batch of
//! 2 (CFG), 224 text tokens, f32. One warm-up forward, then `BENCH_ITERS` (default 1) timed
//! ones. `BENCH_LAYERS=n` keeps only the first `n` blocks (quick, repeatable comparisons on a
//! busy machine; the blocks are ~99% of the time). Prints one JSON line `cogview3_plus_3b_512_b2_forward` with the median wall time and
//! the CPU time (all threads) per forward.
//!
//! Compare with `/work/venv/bin/python scripts/bench_cogview3_plus_reference.py` (run them one
//! after the other: each holds the 11.4 GB of weights).

use std::time::Instant;

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use relayfarm_models::denoiser::cogview3_plus::{CogView3PlusConfig, CogView3PlusTransformer};

/// Hands out a fresh `N(0, 0.02²)` tensor for whatever the model asks for.
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

fn main() -> anyhow::Result<()> {
    let iters: usize = std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1);
    let dev = Device::Cpu;
    let mut cfg = CogView3PlusConfig::cogview3_plus_3b();
    if let Some(n) = std::env::var("BENCH_LAYERS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        cfg.num_layers = n;
    }
    let t0 = Instant::now();
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, dev.clone());
    let model = CogView3PlusTransformer::new(&cfg, vb)?;
    let f = model.weight_footprint();
    eprintln!(
        "random weights built in {:.1}s ({:.2} GB)",
        t0.elapsed().as_secs_f64(),
        f.total() as f64 / 1e9
    );

    let (b, l) = (2, 224);
    let latents = Tensor::randn(0f32, 1.0, (b, 16, 64, 64), &dev)?;
    let text = Tensor::randn(0f32, 1.0, (b, l, 4096), &dev)?;
    let timestep = Tensor::new(&[999i64, 999], &dev)?;
    let size = Tensor::new(&[[512f32, 512.0], [512.0, 512.0]], &dev)?;
    let crop = Tensor::zeros((b, 2), DType::F32, &dev)?;
    let forward = || -> anyhow::Result<()> {
        let out = model.forward(&latents, &text, &timestep, &size, &size, &crop)?;
        anyhow::ensure!(out.dims() == [b, 16, 64, 64], "output {:?}", out.dims());
        Ok(())
    };

    let t0 = Instant::now();
    forward()?;
    eprintln!("warm-up forward {:.1}s", t0.elapsed().as_secs_f64());
    let mut runs = Vec::with_capacity(iters);
    let cpu0 = process_cpu_s();
    for _ in 0..iters {
        let t0 = Instant::now();
        forward()?;
        runs.push(t0.elapsed().as_secs_f64());
    }
    let cpu = (process_cpu_s() - cpu0) / iters as f64;
    let mut sorted = runs.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({
            "name": "cogview3_plus_3b_512_b2_forward",
            "median_s": sorted[sorted.len() / 2],
            "runs": runs,
            "cpu_s_per_run": cpu,
            "threads": rayon::current_num_threads(),
            "weight_bytes": f.total(),
            "num_layers": cfg.num_layers,
            "shape": "latent [2,16,64,64], text [2,224,4096]",
        })
    );
    Ok(())
}
