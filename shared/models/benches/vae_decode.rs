//! SDXL VAE decode timing: the real-size decoder (channels 128/256/512/512, 2 layers per block,
//! 32 groups, mid attention) with random weights, decoding a `[1, 4, 64, 64]` latent (a 512²
//! image) in f32 on the CPU.
//!
//! `RAYON_NUM_THREADS=16 cargo bench -p relayfarm-models --bench vae_decode`
//! prints one JSON line `{"name":"sdxl_vae_decode_64","median_s":...}` (median of 3 runs after
//! one warm-up; `BENCH_ITERS` changes the count, `BENCH_LATENT` the latent side).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use relayfarm_models::vae::{AutoencoderKL, AutoencoderKLConfig};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() -> relayfarm_models::Result<()> {
    let iters = env_usize("BENCH_ITERS", 3).max(1);
    let side = env_usize("BENCH_LATENT", 64);
    let dev = Device::Cpu;
    let cfg = AutoencoderKLConfig::sdxl();
    // A VarMap-backed builder creates every weight with candle's default random init
    // (Kaiming-normal convolutions and linears; group norms at weight 1, bias 0).
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let vae = AutoencoderKL::new(&cfg, vb)?;
    let z = Tensor::randn(0f32, 1.0, (1, cfg.latent_channels, side, side), &dev)?;

    let warm = vae.decode(&z)?;
    let dims = warm.dims().to_vec();
    drop(warm);
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        let out = vae.decode(&z)?;
        // Make sure the work is done before the clock stops (lazy devices).
        out.device().synchronize()?;
        times.push(t0.elapsed().as_secs_f64());
        drop(out);
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let name = if side == 64 {
        "sdxl_vae_decode_64".to_string()
    } else {
        format!("sdxl_vae_decode_{side}")
    };
    eprintln!(
        "decoded {dims:?} with {} threads; runs {times:?}",
        candle_core::utils::get_num_threads()
    );
    println!(
        "{}",
        serde_json::json!({ "name": name, "median_s": median })
    );
    Ok(())
}
