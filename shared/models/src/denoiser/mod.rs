//! Denoisers (the networks a sampler calls once per step).
//!
//! - [`pixart`]: PixArt-Σ / PixArt-α DiT (diffusers `PixArtTransformer2DModel`), with optional
//!   [`kv_compress`] token compression of self-attention keys and values.
//!
//! The private `fused` module holds the CPU kernels the DiT blocks share (LayerNorm with
//! per-sample modulation, gated residual adds, linear layers with bias/GELU/residual folded
//! into the matrix product). Other devices take an equivalent path of candle ops.

pub mod cogview3_plus;
pub mod kv_compress;
pub mod pixart;

pub use kv_compress::{KvCompress, KvCompressConfig, KvSampling};
pub use pixart::{PixArtConfig, PixArtOptions, PixArtTextConditioning, PixArtTransformer};

/// Fused kernels for the DiT hot loop.
///
/// On the CPU with f32 tensors each function is one multithreaded pass (plus the GEMM for the
/// linear layers); elsewhere (CUDA, or f16/bf16) it falls back to the equivalent candle ops.
pub(crate) mod fused {
    use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
    use candle_nn::VarBuilder;
    use rayon::prelude::*;

    use crate::Result;

    /// Rows handed to one rayon task.
    const ROWS_PER_TASK: usize = 16;

    fn is_cpu_f32(t: &Tensor) -> bool {
        t.device().is_cpu() && t.dtype() == DType::F32
    }

    fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
        let data = match s {
            CpuStorage::F32(v) => v.as_slice(),
            _ => candle_core::bail!("{what}: expected f32 storage"),
        };
        match l.contiguous_offsets() {
            Some((a, b)) => Ok(&data[a..b]),
            None => candle_core::bail!("{what}: expected a contiguous tensor"),
        }
    }

    fn shape_err(msg: String) -> crate::ModelError {
        candle_core::Error::Msg(msg).into()
    }

    fn num_threads() -> usize {
        candle_core::utils::get_num_threads()
    }

    // ---------------------------------------------------------------- LayerNorm + modulation

    /// Sum of a row with eight independent accumulators (vectorises, and is more accurate than
    /// one running sum).
    #[inline(always)]
    fn sum8(x: &[f32]) -> f32 {
        let mut acc = [0f32; 8];
        let chunks = x.chunks_exact(8);
        let rem = chunks.remainder();
        for c in chunks {
            for i in 0..8 {
                acc[i] += c[i];
            }
        }
        let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for &v in rem {
            s += v;
        }
        s
    }

    #[inline(always)]
    fn centered_sumsq8(x: &[f32], mean: f32) -> f32 {
        let mut acc = [0f32; 8];
        let chunks = x.chunks_exact(8);
        let rem = chunks.remainder();
        for c in chunks {
            for i in 0..8 {
                let d = c[i] - mean;
                acc[i] += d * d;
            }
        }
        let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for &v in rem {
            s += (v - mean) * (v - mean);
        }
        s
    }

    /// `out = (x - mean)/sqrt(var + eps) · alpha + beta` for one row (two-pass statistics).
    #[inline(always)]
    fn ln_row(x: &[f32], alpha: &[f32], beta: &[f32], out: &mut [f32], eps: f32) {
        let n = x.len() as f32;
        let mean = sum8(x) / n;
        let var = centered_sumsq8(x, mean) / n;
        let inv = 1.0 / (var + eps).sqrt();
        for (((o, &v), &a), &b) in out.iter_mut().zip(x).zip(alpha).zip(beta) {
            *o = (v - mean) * inv * a + b;
        }
    }

    struct LnModulate {
        eps: f32,
        /// Rows (of the last dimension) per sample; 0 when alpha/beta are shared by all rows.
        rows_per_sample: usize,
    }

    impl CustomOp3 for LnModulate {
        fn name(&self) -> &'static str {
            "relayfarm-ln-modulate"
        }

        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            let x = f32_slice(s1, l1, "ln-modulate x")?;
            let alpha = f32_slice(s2, l2, "ln-modulate alpha")?;
            let beta = f32_slice(s3, l3, "ln-modulate beta")?;
            let d = l1.dims().last().copied().unwrap_or(1).max(1);
            let rps = self.rows_per_sample;
            let eps = self.eps;
            let mut out = vec![0f32; x.len()];
            out.par_chunks_mut(d * ROWS_PER_TASK)
                .zip(x.par_chunks(d * ROWS_PER_TASK))
                .enumerate()
                .for_each(|(task, (o, xs))| {
                    for (r, (orow, xrow)) in o.chunks_mut(d).zip(xs.chunks(d)).enumerate() {
                        let row = task * ROWS_PER_TASK + r;
                        let s = row.checked_div(rps).unwrap_or(0);
                        let (a, b) = (&alpha[s * d..(s + 1) * d], &beta[s * d..(s + 1) * d]);
                        ln_row(xrow, a, b, orow, eps);
                    }
                });
            Ok((CpuStorage::F32(out), l1.shape().clone()))
        }
    }

    /// LayerNorm over the last dimension (no affine of its own, two-pass statistics) followed
    /// by a per-sample affine map: `y[b, .., :] = norm(x[b, .., :]) · alpha[b] + beta[b]`.
    ///
    /// `x` is `[B, ..., D]`; `alpha` and `beta` are `[B, D]` (one row per sample) or `[D]`
    /// (shared, e.g. a LayerNorm's own weight and bias).
    pub(crate) fn layer_norm_modulate(
        x: &Tensor,
        alpha: &Tensor,
        beta: &Tensor,
        eps: f32,
    ) -> Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let b = x.dim(0)?;
        let shared = alpha.rank() == 1;
        if is_cpu_f32(x) && alpha.dtype() == DType::F32 && beta.dtype() == DType::F32 {
            let rows = x.elem_count() / d.max(1);
            let rows_per_sample = if shared { 0 } else { rows / b.max(1) };
            if !shared {
                let (ab, ad) = alpha.dims2()?;
                if ab != b || ad != d || beta.dims() != alpha.dims() {
                    return Err(shape_err(format!(
                        "layer_norm_modulate: x {:?} needs alpha/beta [{b}, {d}], got {:?}/{:?}",
                        x.dims(),
                        alpha.dims(),
                        beta.dims()
                    )));
                }
            }
            let op = LnModulate {
                eps,
                rows_per_sample,
            };
            let x = x.contiguous()?;
            return Ok(x.apply_op3_no_bwd(&alpha.contiguous()?, &beta.contiguous()?, &op)?);
        }
        // Fallback: candle's fused LayerNorm with unit affine, then the modulation.
        let ones = Tensor::ones(d, x.dtype(), x.device())?;
        let zeros = Tensor::zeros(d, x.dtype(), x.device())?;
        let normed = candle_nn::ops::layer_norm(&x.contiguous()?, &ones, &zeros, eps)?;
        let (alpha, beta) = if shared {
            (alpha.clone(), beta.clone())
        } else {
            // [B, D] -> [B, 1, .., 1, D]
            let mut shape = vec![1usize; x.rank()];
            shape[0] = b;
            shape[x.rank() - 1] = d;
            (alpha.reshape(shape.clone())?, beta.reshape(shape)?)
        };
        Ok(normed.broadcast_mul(&alpha)?.broadcast_add(&beta)?)
    }

    // ------------------------------------------------------------------------ gated residual

    struct GatedAdd {
        rows_per_sample: usize,
    }

    impl CustomOp3 for GatedAdd {
        fn name(&self) -> &'static str {
            "relayfarm-gated-add"
        }

        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            let x = f32_slice(s1, l1, "gated-add x")?;
            let y = f32_slice(s2, l2, "gated-add y")?;
            let g = f32_slice(s3, l3, "gated-add gate")?;
            let d = l1.dims().last().copied().unwrap_or(1).max(1);
            let rps = self.rows_per_sample.max(1);
            let mut out = vec![0f32; x.len()];
            out.par_chunks_mut(d * ROWS_PER_TASK)
                .zip(x.par_chunks(d * ROWS_PER_TASK))
                .zip(y.par_chunks(d * ROWS_PER_TASK))
                .enumerate()
                .for_each(|(task, ((o, xs), ys))| {
                    for (r, ((orow, xrow), yrow)) in o
                        .chunks_mut(d)
                        .zip(xs.chunks(d))
                        .zip(ys.chunks(d))
                        .enumerate()
                    {
                        let s = (task * ROWS_PER_TASK + r) / rps;
                        let gate = &g[s * d..(s + 1) * d];
                        for (((o, &xv), &yv), &gv) in orow.iter_mut().zip(xrow).zip(yrow).zip(gate)
                        {
                            *o = xv + gv * yv;
                        }
                    }
                });
            Ok((CpuStorage::F32(out), l1.shape().clone()))
        }
    }

    /// `x + gate[b] · y` with `x`, `y` `[B, ..., D]` and `gate` `[B, D]`.
    pub(crate) fn gated_add(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let b = x.dim(0)?;
        if x.dims() != y.dims() || gate.dims() != [b, d] {
            return Err(shape_err(format!(
                "gated_add: x {:?}, y {:?}, gate {:?} (want [{b}, {d}])",
                x.dims(),
                y.dims(),
                gate.dims()
            )));
        }
        if is_cpu_f32(x) && y.dtype() == DType::F32 && gate.dtype() == DType::F32 {
            let rows = x.elem_count() / d.max(1);
            let op = GatedAdd {
                rows_per_sample: rows / b.max(1),
            };
            return Ok(x.contiguous()?.apply_op3_no_bwd(
                &y.contiguous()?,
                &gate.contiguous()?,
                &op,
            )?);
        }
        let mut shape = vec![1usize; x.rank()];
        shape[0] = b;
        shape[x.rank() - 1] = d;
        Ok((x + y.broadcast_mul(&gate.reshape(shape)?)?)?)
    }

    // ------------------------------------------------------------------------------- GELU

    /// exp(x) for x clamped to [-87, 88]: Cody–Waite range reduction and a degree-7 Taylor
    /// polynomial (relative error ≈ 1e-7), written branch-free so that loops vectorise.
    #[inline(always)]
    fn exp_f32(x: f32) -> f32 {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_145_75;
        const LN2_LO: f32 = 1.428_606_8e-6;
        const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
        let x = x.clamp(-87.0, 88.0);
        let t = x * LOG2E + MAGIC;
        let n = t - MAGIC;
        let r = x - n * LN2_HI - n * LN2_LO;
        let p = 1.0
            + r * (1.0
                + r * (0.5
                    + r * (1.0 / 6.0
                        + r * (1.0 / 24.0
                            + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
        let ni = t.to_bits() as i32 - 0x4B40_0000;
        p * f32::from_bits(((ni + 127) << 23) as u32)
    }

    /// GELU with the tanh approximation, as `x · sigmoid(2u)` with
    /// `u = sqrt(2/π)(x + 0.044715 x³)` (equal to `0.5x(1 + tanh u)`).
    #[inline(always)]
    fn gelu_tanh(x: f32) -> f32 {
        const K0: f32 = 0.797_884_6; // sqrt(2/pi)
        const K1: f32 = 0.044_715;
        let u = K0 * (x + K1 * x * x * x);
        x / (1.0 + exp_f32(-2.0 * u))
    }

    #[inline(always)]
    fn gelu_slice_generic(v: &mut [f32]) {
        for x in v.iter_mut() {
            *x = gelu_tanh(*x);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn gelu_slice_avx2(v: &mut [f32]) {
        gelu_slice_generic(v)
    }

    fn gelu_slice(v: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU supports the features the function is compiled for.
                unsafe { gelu_slice_avx2(v) };
                return;
            }
        }
        gelu_slice_generic(v)
    }

    // ------------------------------------------------------------------------------ linear

    /// What a [`FusedLinear`] does after the matrix product.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Epilogue {
        None,
        Gelu,
    }

    struct LinearOp<'a> {
        bias: &'a [f32],
        epilogue: Epilogue,
    }

    impl LinearOp<'_> {
        /// `dst[m, :] = init[m, :] (+ bias)`, then `dst += x · wᵀ`, then the epilogue.
        fn run(
            &self,
            x: &[f32],
            x_l: &Layout,
            w: &[f32],
            w_l: &Layout,
            residual: Option<&[f32]>,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            let (n, k) = w_l.shape().dims2()?;
            let x_dims = x_l.dims();
            if x_dims.last() != Some(&k) {
                candle_core::bail!("fused linear: input {x_dims:?} does not end in {k}");
            }
            let m = x.len() / k.max(1);
            let mut dst = vec![0f32; m * n];
            let bias = self.bias;
            let chunk = n * ROWS_PER_TASK;
            match residual {
                Some(res) => dst
                    .par_chunks_mut(chunk)
                    .zip(res.par_chunks(chunk))
                    .for_each(|(d, r)| {
                        for (drow, rrow) in d.chunks_mut(n).zip(r.chunks(n)) {
                            for ((o, &rv), &bv) in drow.iter_mut().zip(rrow).zip(bias) {
                                *o = rv + bv;
                            }
                        }
                    }),
                None => dst.par_chunks_mut(chunk).for_each(|d| {
                    for drow in d.chunks_mut(n) {
                        drow.copy_from_slice(bias);
                    }
                }),
            }
            if m > 0 && n > 0 && k > 0 {
                let threads = num_threads();
                let par = if threads > 1 {
                    gemm::Parallelism::Rayon(threads)
                } else {
                    gemm::Parallelism::None
                };
                // SAFETY: dst is m×n row-major, x is m×k row-major and w is n×k row-major (so
                // wᵀ has row stride 1 and column stride k); all slices have those lengths.
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        dst.as_mut_ptr(),
                        1,
                        n as isize,
                        true,
                        x.as_ptr(),
                        1,
                        k as isize,
                        w.as_ptr(),
                        k as isize,
                        1,
                        1.0f32,
                        1.0f32,
                        false,
                        false,
                        false,
                        par,
                    )
                }
            }
            if self.epilogue == Epilogue::Gelu {
                dst.par_chunks_mut(chunk).for_each(gelu_slice);
            }
            let mut out_dims = x_dims.to_vec();
            if let Some(last) = out_dims.last_mut() {
                *last = n;
            }
            Ok((CpuStorage::F32(dst), Shape::from_dims(&out_dims)))
        }
    }

    impl CustomOp2 for LinearOp<'_> {
        fn name(&self) -> &'static str {
            "relayfarm-linear"
        }

        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            let x = f32_slice(s1, l1, "linear input")?;
            let w = f32_slice(s2, l2, "linear weight")?;
            self.run(x, l1, w, l2, None)
        }
    }

    impl CustomOp3 for LinearOp<'_> {
        fn name(&self) -> &'static str {
            "relayfarm-linear-residual"
        }

        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            let x = f32_slice(s1, l1, "linear input")?;
            let w = f32_slice(s2, l2, "linear weight")?;
            let r = f32_slice(s3, l3, "linear residual")?;
            self.run(x, l1, w, l2, Some(r))
        }
    }

    /// A linear layer `y = x·Wᵀ + b` whose bias, GELU or residual add are folded into the
    /// matrix product on the CPU (f32). Weights stay in the dtype they were loaded in.
    #[derive(Debug, Clone)]
    pub(crate) struct FusedLinear {
        weight: Tensor,
        bias: Option<Tensor>,
        /// Host copy of the bias (zeros when there is none) for the CPU f32 kernel.
        bias_host: Option<Vec<f32>>,
    }

    impl FusedLinear {
        /// Wraps a `[out, in]` weight and optional `[out]` bias.
        pub(crate) fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
            let bias_host = if is_cpu_f32(&weight) {
                let n = weight.dim(0)?;
                Some(match &bias {
                    Some(b) => b.to_dtype(DType::F32)?.to_vec1::<f32>()?,
                    None => vec![0f32; n],
                })
            } else {
                None
            };
            Ok(Self {
                weight: weight.contiguous()?,
                bias,
                bias_host,
            })
        }

        /// Loads `weight` `[out, in]` (and `bias` `[out]` when `bias`) under `vb`.
        pub(crate) fn load(
            in_dim: usize,
            out_dim: usize,
            bias: bool,
            vb: VarBuilder,
        ) -> Result<Self> {
            let w = vb.get((out_dim, in_dim), "weight")?;
            let b = if bias {
                Some(vb.get(out_dim, "bias")?)
            } else {
                None
            };
            Self::new(w, b)
        }

        /// Stacks several layers with the same input along the output dimension (e.g. Q, K, V
        /// into one QKV projection). Either all have biases or none.
        pub(crate) fn concat(parts: &[FusedLinear]) -> Result<Self> {
            let ws: Vec<&Tensor> = parts.iter().map(|p| &p.weight).collect();
            let weight = Tensor::cat(&ws, 0)?;
            let bias = if parts.iter().all(|p| p.bias.is_some()) {
                let bs: Vec<&Tensor> = parts.iter().filter_map(|p| p.bias.as_ref()).collect();
                Some(Tensor::cat(&bs, 0)?)
            } else if parts.iter().all(|p| p.bias.is_none()) {
                None
            } else {
                return Err(shape_err(
                    "FusedLinear::concat: mixed biased and unbiased layers".into(),
                ));
            };
            Self::new(weight, bias)
        }

        /// Output width.
        pub(crate) fn out_dim(&self) -> usize {
            self.weight.dims()[0]
        }

        /// Bytes of the weight and of the bias tensor (0 without one).
        pub(crate) fn byte_sizes(&self) -> (usize, usize) {
            let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
            (size(&self.weight), self.bias.as_ref().map_or(0, size))
        }

        fn cpu_op(&self, x: &Tensor) -> Option<LinearOp<'_>> {
            match &self.bias_host {
                Some(bias) if is_cpu_f32(x) => Some(LinearOp {
                    bias,
                    epilogue: Epilogue::None,
                }),
                _ => None,
            }
        }

        fn fallback(&self, x: &Tensor) -> Result<Tensor> {
            let dims = x.dims().to_vec();
            let k = dims[dims.len() - 1];
            let x2 = x.contiguous()?.reshape(((), k))?;
            let mut y = x2.matmul(&self.weight.t()?)?;
            if let Some(b) = &self.bias {
                y = y.broadcast_add(b)?;
            }
            let mut out_dims = dims;
            let last = out_dims.len() - 1;
            out_dims[last] = self.out_dim();
            Ok(y.reshape(out_dims)?)
        }

        /// `x·Wᵀ + b` for `x` `[..., in]`.
        pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
            match self.cpu_op(x) {
                Some(op) => Ok(x.contiguous()?.apply_op2_no_bwd(&self.weight, &op)?),
                None => self.fallback(x),
            }
        }

        /// `gelu_tanh(x·Wᵀ + b)`.
        pub(crate) fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
            match self.cpu_op(x) {
                Some(mut op) => {
                    op.epilogue = Epilogue::Gelu;
                    Ok(x.contiguous()?.apply_op2_no_bwd(&self.weight, &op)?)
                }
                None => Ok(self.fallback(x)?.gelu()?),
            }
        }

        /// `residual + x·Wᵀ + b` (`residual` shaped like the output).
        pub(crate) fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
            match self.cpu_op(x) {
                Some(op) if residual.dtype() == DType::F32 => {
                    let mut want = x.dims().to_vec();
                    let last = want.len() - 1;
                    want[last] = self.out_dim();
                    if residual.dims() != want.as_slice() {
                        return Err(shape_err(format!(
                            "fused linear: residual {:?} does not match output {want:?}",
                            residual.dims()
                        )));
                    }
                    Ok(x.contiguous()?.apply_op3_no_bwd(
                        &self.weight,
                        &residual.contiguous()?,
                        &op,
                    )?)
                }
                _ => Ok((self.fallback(x)? + residual)?),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use candle_core::Device;

        fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        }

        #[test]
        fn gelu_matches_tanh_formula() {
            let xs: Vec<f32> = (-4000..=4000).map(|i| i as f32 * 0.005).collect();
            let mut got = xs.clone();
            gelu_slice(&mut got);
            for (&x, &g) in xs.iter().zip(&got) {
                let xd = x as f64;
                let u = (2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd * xd * xd);
                let want = 0.5 * xd * (1.0 + u.tanh());
                assert!(
                    (g as f64 - want).abs() <= 2e-7 * (1.0 + want.abs()),
                    "x={x}: {g} vs {want}"
                );
            }
            let mut big = vec![-1e4f32, 1e4, -50.0, 50.0, 0.0];
            gelu_slice(&mut big);
            assert_eq!(big[1], 1e4);
            assert_eq!(big[3], 50.0);
            assert!(big[0].abs() < 1e-30 && big[2].abs() < 1e-30 && big[4] == 0.0);
        }

        #[test]
        fn ln_modulate_matches_reference() {
            // Deterministic inputs far from zero mean (the case a one-pass variance gets wrong),
            // against a reference computed in f64.
            let dev = Device::Cpu;
            let wave = |n: usize, f: f64, scale: f64, offset: f64| -> Vec<f32> {
                (0..n)
                    .map(|i| (offset + scale * ((i as f64) * f).sin()) as f32)
                    .collect()
            };
            let x = Tensor::from_vec(wave(2 * 5 * 19, 0.37, 1.3, 30.0), (2, 5, 19), &dev).unwrap();
            let alpha = Tensor::from_vec(wave(2 * 19, 0.11, 2.5, 0.2), (2, 19), &dev).unwrap();
            let beta = Tensor::from_vec(wave(2 * 19, 0.23, 1.0, 0.0), (2, 19), &dev).unwrap();
            let f64_of = |t: &Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
            let reference = |a_bc: Tensor, b_bc: Tensor| {
                let x = f64_of(&x);
                let mean = x.mean_keepdim(2).unwrap();
                let xc = x.broadcast_sub(&mean).unwrap();
                let var = xc.sqr().unwrap().mean_keepdim(2).unwrap();
                xc.broadcast_div(&(var + 1e-6).unwrap().sqrt().unwrap())
                    .unwrap()
                    .broadcast_mul(&a_bc)
                    .unwrap()
                    .broadcast_add(&b_bc)
                    .unwrap()
                    .to_dtype(candle_core::DType::F32)
                    .unwrap()
            };
            let got = layer_norm_modulate(&x, &alpha, &beta, 1e-6).unwrap();
            let want = reference(
                f64_of(&alpha.unsqueeze(1).unwrap()),
                f64_of(&beta.unsqueeze(1).unwrap()),
            );
            let e = max_abs_diff(&got, &want);
            assert!(e < 2e-5, "{e}");
            // Shared alpha/beta.
            let a1 = alpha.get(0).unwrap();
            let b1 = beta.get(1).unwrap();
            let got = layer_norm_modulate(&x, &a1, &b1, 1e-6).unwrap();
            let want = reference(f64_of(&a1), f64_of(&b1));
            let e = max_abs_diff(&got, &want);
            assert!(e < 2e-5, "{e}");
        }

        #[test]
        fn gated_add_and_linear_match_candle_ops() {
            let dev = Device::Cpu;
            let x = Tensor::randn(0f32, 1.0, (2, 7, 12), &dev).unwrap();
            let y = Tensor::randn(0f32, 1.0, (2, 7, 12), &dev).unwrap();
            let g = Tensor::randn(0f32, 1.0, (2, 12), &dev).unwrap();
            let got = gated_add(&x, &y, &g).unwrap();
            let want = (&x + y.broadcast_mul(&g.unsqueeze(1).unwrap()).unwrap()).unwrap();
            assert!(max_abs_diff(&got, &want) < 1e-6);

            let w = Tensor::randn(0f32, 1.0, (9, 12), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, 9, &dev).unwrap();
            let lin = FusedLinear::new(w.clone(), Some(b.clone())).unwrap();
            let want = x
                .reshape((14, 12))
                .unwrap()
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap()
                .reshape((2, 7, 9))
                .unwrap();
            assert!(max_abs_diff(&lin.forward(&x).unwrap(), &want) < 1e-5);
            let want_gelu = want.gelu().unwrap();
            assert!(max_abs_diff(&lin.forward_gelu(&x).unwrap(), &want_gelu) < 1e-5);
            let res = Tensor::randn(0f32, 1.0, (2, 7, 9), &dev).unwrap();
            let want_res = (&want + &res).unwrap();
            assert!(max_abs_diff(&lin.forward_residual(&x, &res).unwrap(), &want_res) < 1e-5);
            // No bias, and QKV-style concatenation.
            let nb = FusedLinear::new(w.clone(), None).unwrap();
            let cat = FusedLinear::concat(&[nb.clone(), nb]).unwrap();
            assert_eq!(cat.out_dim(), 18);
            let y2 = cat.forward(&x).unwrap();
            let want_nb = x.broadcast_matmul(&w.t().unwrap()).unwrap();
            assert!(max_abs_diff(&y2.narrow(2, 9, 9).unwrap(), &want_nb) < 1e-5);
        }
    }
}
