//! Seeded standard-normal noise that is identical on every machine and device.
//!
//! The initial latents are drawn on the host from a portable generator (SplitMix64 driving a
//! Box–Muller transform) and then moved to the device, so the same seed gives the same image at
//! any tensor-parallel degree, on CPU or GPU. (It does not reproduce torch's generator: to
//! reproduce a diffusers image exactly, pass its noise with `--latents`.)

use candle_core::{Device, Result, Tensor};

/// SplitMix64: a tiny, fast, well-mixed 64-bit generator.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform sample in the open interval (0, 1).
    pub fn next_open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
}

/// `n` standard-normal samples from `seed`.
pub fn standard_normal(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1 = rng.next_open01();
        let u2 = rng.next_open01();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        out.push((r * theta.cos()) as f32);
        out.push((r * theta.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// A standard-normal f32 tensor of `shape` from `seed`, on `device`.
pub fn randn(seed: u64, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n = shape.iter().product();
    Tensor::from_vec(standard_normal(seed, n), shape, &Device::Cpu)?.to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_standard() {
        let a = standard_normal(42, 100_001);
        let b = standard_normal(42, 100_001);
        assert_eq!(a, b);
        assert_ne!(a[..10], standard_normal(43, 10)[..]);
        let mean: f64 = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var: f64 = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
    }
}
