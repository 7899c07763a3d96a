//! Group normalisation with an optional fused SiLU, the most frequent op of the VAE.
//!
//! On the CPU one kernel computes the statistics (two passes, f64 accumulators: exact enough
//! for groups of millions of elements, where a running f32 sum drifts) and writes
//! `silu((x − μ)·rstd·γ + β)` in a single output pass, so each call allocates one tensor. Other
//! devices use candle's `GroupNorm` followed by `silu`.

use super::simd::simd_dispatch;
use crate::Result;
use candle_core::{CpuStorage, DType, Module, Storage, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// Affine group norm over `[B, C, ...]`, optionally followed by SiLU.
#[derive(Debug, Clone)]
pub(crate) struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Vec<f32>,
    bias: Vec<f32>,
    groups: usize,
    channels: usize,
    eps: f64,
}

impl GroupNorm {
    /// `groups` groups over `channels` channels (keys `weight`, `bias`).
    pub(crate) fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let inner = candle_nn::group_norm(groups, channels, eps, vb.clone())?;
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        // Host copies for the CPU kernel (a few KiB).
        let weight = weight.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let bias = bias.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Ok(GroupNorm {
            inner,
            weight,
            bias,
            groups,
            channels,
            eps,
        })
    }

    /// Whether [`GroupNorm::cpu_affine`] applies to `x` (the CPU kernel's preconditions).
    pub(crate) fn cpu_kernel_applies(&self, x: &Tensor) -> bool {
        x.device().is_cpu()
            && x.dtype() == DType::F32
            && x.rank() >= 2
            && x.dims()[1] == self.channels
    }

    /// Normalises `x` and applies SiLU when `silu` is set; the result has `x`'s dtype.
    pub(crate) fn forward(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let half_on_cpu = x.device().is_cpu() && matches!(x.dtype(), DType::F16 | DType::BF16);
        if !(self.cpu_kernel_applies(x) || half_on_cpu) {
            let y = self.inner.forward(x)?;
            return Ok(if silu { y.silu()? } else { y });
        }
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?.contiguous()?;
        let (b, c) = (x.dims()[0], x.dims()[1]);
        let out = with_cpu_f32(&x32, |input| {
            let params = self.cpu_affine(input, b);
            let plane = input.len() / (b * c).max(1);
            let mut out = vec![0f32; input.len()];
            if plane > 0 {
                out.par_chunks_mut(plane)
                    .zip(input.par_chunks(plane))
                    .zip(params.par_iter())
                    .for_each(|((dst, src), &(scale, shift))| {
                        affine_act(dst, src, scale, shift, silu)
                    });
            }
            out
        })?;
        let y = Tensor::from_vec(out, x.shape(), x.device())?;
        Ok(y.to_dtype(dtype)?)
    }

    /// The per-(batch, channel) `(scale, shift)` such that the normalised value is
    /// `x·scale + shift`, from the contiguous f32 data of a `[batch, C, ...]` tensor.
    /// Statistics use two passes with f64 accumulators.
    pub(crate) fn cpu_affine(&self, input: &[f32], batch: usize) -> Vec<(f32, f32)> {
        let c = self.channels;
        let plane = input.len() / (batch * c).max(1);
        let per_group = c / self.groups;
        if plane == 0 {
            return vec![(1.0, 0.0); batch * c];
        }
        let n = (per_group * plane) as f64;
        let group_stat = |per_channel: &[f64]| -> Vec<f64> {
            per_channel
                .chunks(per_group)
                .map(|g| g.iter().sum::<f64>() / n)
                .collect()
        };
        let sums: Vec<f64> = input.par_chunks(plane).map(sum_f64).collect();
        let means = group_stat(&sums);
        let sq: Vec<f64> = input
            .par_chunks(plane)
            .enumerate()
            .map(|(i, ch)| centred_sq_f64(ch, means[i / per_group]))
            .collect();
        let vars = group_stat(&sq);
        (0..batch * c)
            .map(|i| {
                let ch = i % c;
                let g = i / per_group;
                let rstd = 1.0 / (vars[g] + self.eps).sqrt();
                let w = self.weight[ch] as f64;
                (
                    (rstd * w) as f32,
                    (self.bias[ch] as f64 - means[g] * rstd * w) as f32,
                )
            })
            .collect()
    }
}

/// Borrows the data of a contiguous f32 CPU tensor.
pub(crate) fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let data = match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => v,
        _ => {
            return Err(candle_core::Error::Msg("expected an f32 CPU tensor".into()).into());
        }
    };
    let start = layout.start_offset();
    Ok(f(&data[start..start + layout.shape().elem_count()]))
}

simd_dispatch! {
    /// `dst = act(src·scale + shift)` with `act` SiLU or the identity.
    pub(crate) fn affine_act(dst: &mut [f32], src: &[f32], scale: f32, shift: f32, silu: bool) {
        if silu {
            for (d, &s) in dst.iter_mut().zip(src) {
                let y = s * scale + shift;
                *d = y / (1.0 + exp_fast(-y));
            }
        } else {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = s * scale + shift;
            }
        }
    }
}

/// `eˣ` for f32 within a few ulp, branch-free so that loops over it vectorise: `x = n·ln2 + f`
/// (Cody–Waite split, `|f| ≤ ln2/2`), `eᶠ` by a degree-7 Taylor polynomial, `2ⁿ` from the
/// exponent bits. Inputs are clamped to `[−87.3, 88]` (results stay finite and normal).
#[inline(always)]
pub(crate) fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln2 = LN2_HI + LN2_LO, LN2_HI with few mantissa bits so that n·LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer (ties to even).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.0);
    // k = ROUND + n exactly, so its low mantissa bits hold n (two's complement).
    let k = x * LOG2E + ROUND;
    let n = k - ROUND;
    let f = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + f * (1.0
            + f * (0.5
                + f * (1.0 / 6.0
                    + f * (1.0 / 24.0
                        + f * (1.0 / 120.0 + f * (1.0 / 720.0 + f * (1.0 / 5040.0)))))));
    let n_bits = k.to_bits().wrapping_sub(ROUND.to_bits());
    p * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

simd_dispatch! {
    /// Sum in f64 with eight independent accumulators (vectorisable).
    fn sum_f64(x: &[f32]) -> f64 {
        let mut acc = [0f64; 8];
        let mut chunks = x.chunks_exact(8);
        for c in &mut chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += v as f64;
            }
        }
        let tail: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
        acc.iter().sum::<f64>() + tail
    }
}

simd_dispatch! {
    /// `Σ (x − mean)²` in f64 with eight independent accumulators.
    fn centred_sq_f64(x: &[f32], mean: f64) -> f64 {
        let mut acc = [0f64; 8];
        let mut chunks = x.chunks_exact(8);
        for c in &mut chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                let d = v as f64 - mean;
                *a += d * d;
            }
        }
        let tail: f64 = chunks
            .remainder()
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum();
        acc.iter().sum::<f64>() + tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    #[test]
    fn cpu_kernel_matches_candle_ops() {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        GroupNorm::new(4, 8, 1e-6, vb.pp("gn")).unwrap();
        // Non-trivial affine parameters, then a fresh layer that reads them.
        for var in varmap.data().lock().unwrap().values() {
            let n = var.elem_count();
            let vals: Vec<f32> = (0..n).map(|i| 0.5 + 0.1 * i as f32).collect();
            var.set(&Tensor::from_vec(vals, n, &dev).unwrap()).unwrap();
        }
        let gn = GroupNorm::new(4, 8, 1e-6, vb.pp("gn")).unwrap();
        let x = (Tensor::randn(0f32, 1.0, (2, 8, 5, 7), &dev).unwrap() + 3.0).unwrap();
        for silu in [false, true] {
            let got = gn.forward(&x, silu).unwrap();
            let mut want = gn.inner.forward(&x).unwrap();
            if silu {
                want = want.silu().unwrap();
            }
            let err = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(err < 1e-5, "silu={silu}: {err}");
        }
        let h = x.to_dtype(DType::F16).unwrap();
        assert_eq!(gn.forward(&h, true).unwrap().dtype(), DType::F16);
    }

    #[test]
    fn exp_fast_is_accurate() {
        let mut worst = 0f64;
        // Inside the clamp range [-87.3, 88].
        for i in -19750..=20000 {
            let x = i as f32 * 0.0044;
            let want = (x as f64).exp();
            let got = exp_fast(x) as f64;
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 5e-7, "relative error {worst:e}");
        assert!(exp_fast(200.0).is_finite() && exp_fast(-200.0) > 0.0);
        assert!(exp_fast(f32::INFINITY).is_finite());
    }
}
