use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use relayfarm_models::vae::{AutoencoderKL, AutoencoderKLConfig};
use std::time::Instant;
fn main() {
    let dev = Device::Cpu;
    let side: usize = std::env::var("SIDE").ok().and_then(|s| s.parse().ok()).unwrap_or(256);
    let ch: usize = std::env::var("CH").ok().and_then(|s| s.parse().ok()).unwrap_or(128);
    let mut cfg = AutoencoderKLConfig::sdxl();
    cfg.block_out_channels = vec![ch];
    cfg.down_block_types.truncate(1);
    cfg.up_block_types.truncate(1);
    cfg.layers_per_block = 1;
    cfg.mid_block_add_attention = false;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let vae = AutoencoderKL::new(&cfg, vb).unwrap();
    let z = Tensor::randn(0f32, 1.0, (1, 4, side, side), &dev).unwrap();
    let _ = vae.decode(&z).unwrap();
    let mut ts = vec![];
    for _ in 0..3 {
        let t = Instant::now();
        let _ = vae.decode(&z).unwrap();
        ts.push(t.elapsed().as_secs_f64());
    }
    ts.sort_by(f64::total_cmp);
    let gflop = 8.0 * 2.0 * (ch * ch * 9 * side * side) as f64 / 1e9;
    println!("ours ch={ch} side={side}: {:.3}s  ~{:.1} GFLOP/s (convs only)", ts[1], gflop / ts[1]);
}
