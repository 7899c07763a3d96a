use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() {
    let dev = Device::Cpu;
    for (m, k, n) in [(512usize, 4608usize, 4096usize), (128, 128, 8192), (512, 512, 4096), (256,256,8192)] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (k, n), &dev).unwrap();
        let _ = a.matmul(&b).unwrap();
        let t = Instant::now();
        for _ in 0..3 { let _ = a.matmul(&b).unwrap(); }
        let dt = t.elapsed().as_secs_f64() / 3.0;
        println!("matmul {m}x{k}x{n}: {:.1} GFLOP/s", 2.0 * (m * k * n) as f64 / 1e9 / dt);
    }
}
