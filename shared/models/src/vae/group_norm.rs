//! Group normalisation with an optional fused SiLU, the most frequent op of the VAE.
//!
//! On the CPU one kernel computes the statistics (two passes, f64 accumulators: exact enough
//! for groups of millions of elements, where a running f32 sum drifts) and writes
//! `silu((x − μ)·rstd·γ + β)` in a single output pass, so each call allocates one tensor. Other
//! devices use candle's `GroupNorm` followed by `silu`.

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

    /// Normalises `x` and applies SiLU when `silu` is set; the result has `x`'s dtype.
    pub(crate) fn forward(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let cpu_kernel = std::env::var("TMP_GN_CANDLE").is_err()
            && x.device().is_cpu()
            && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
            && x.rank() >= 2
            && x.dim(1)? == self.channels;
        if !cpu_kernel {
            let y = self.inner.forward(x)?;
            return Ok(if silu { y.silu()? } else { y });
        }
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?.contiguous()?;
        let out = {
            let (storage, layout) = x32.storage_and_layout();
            let data = match &*storage {
                Storage::Cpu(CpuStorage::F32(v)) => v,
                _ => {
                    return Err(candle_core::Error::Msg(
                        "group norm: expected f32 CPU storage".into(),
                    )
                    .into())
                }
            };
            let start = layout.start_offset();
            let input = &data[start..start + layout.shape().elem_count()];
            self.cpu_forward(input, x.dim(0)?, silu)
        };
        let y = Tensor::from_vec(out, x.shape(), x.device())?;
        Ok(y.to_dtype(dtype)?)
    }

    fn cpu_forward(&self, input: &[f32], batch: usize, silu: bool) -> Vec<f32> {
        let c = self.channels;
        let plane = input.len() / (batch * c).max(1);
        let per_group = c / self.groups;
        let n = (per_group * plane) as f64;
        if plane == 0 {
            return Vec::new();
        }
        // Pass 1: per-(batch, channel) sums, then group means.
        let sums: Vec<f64> = input.par_chunks(plane).map(sum_f64).collect();
        let group_stat = |per_channel: &[f64]| -> Vec<f64> {
            per_channel
                .chunks(per_group)
                .map(|g| g.iter().sum::<f64>() / n)
                .collect()
        };
        let means = group_stat(&sums);
        // Pass 2: centred sums of squares (stable whatever the mean).
        let sq: Vec<f64> = input
            .par_chunks(plane)
            .enumerate()
            .map(|(i, ch)| centred_sq_f64(ch, means[i / per_group]))
            .collect();
        let vars = group_stat(&sq);
        // Pass 3: one fused write per element.
        let mut out = vec![0f32; input.len()];
        out.par_chunks_mut(plane)
            .zip(input.par_chunks(plane))
            .enumerate()
            .for_each(|(i, (dst, src))| {
                let ch = i % c;
                let g = i / per_group;
                let rstd = 1.0 / (vars[g] + self.eps).sqrt();
                let scale = (rstd * self.weight[ch] as f64) as f32;
                let shift =
                    (self.bias[ch] as f64 - means[g] * rstd * self.weight[ch] as f64) as f32;
                if silu {
                    for (d, &s) in dst.iter_mut().zip(src) {
                        let y = s * scale + shift;
                        *d = y / (1.0 + (-y).exp());
                    }
                } else {
                    for (d, &s) in dst.iter_mut().zip(src) {
                        *d = s * scale + shift;
                    }
                }
            });
        out
    }
}

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
}
