//! The VAE's stride-1 "same" convolutions (3×3 with padding 1, 1×1 without).
//!
//! On the CPU in f32 they run as `k²` shifted GEMMs over a zero-padded copy of the input: with
//! the input padded to `(H+2p)×(W+2p)`, output pixel `(y, x)` of kernel tap `(dy, dx)` reads
//! padded pixel `(y+dy, x+dx)`, so for a band of output rows every tap is one GEMM
//! `W_tap[Cout, Cin] · X_pad[Cin, rows·(W+2p)]` over a *shifted contiguous view* of the padded
//! planes: no im2col matrix. The `2p` extra columns per row are computed and dropped. Bands of
//! rows run in parallel (rayon), each GEMM single-threaded into a band-local buffer that starts
//! at the bias (plus an optional residual), so the residual add and the bias cost no extra
//! pass. The padded copy can also be filled with the nearest-neighbour ×2 upsampling of the
//! input (`Upsample2D`), so the upsampled tensor is never materialised.
//!
//! Other devices and dtypes take candle's `conv2d` (and `upsample_nearest2d`).

use super::group_norm::{affine_act, with_cpu_f32, GroupNorm};
use crate::Result;
use candle_core::{DType, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
use rayon::prelude::*;

thread_local! {
    /// Per-thread band accumulator, reused across calls (no page faults per band).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Target number of GEMM columns (padded pixels) per band.
const BAND_COLUMNS: usize = 4096;

/// A `k×k` convolution with bias, stride 1, padding `k/2` (`k` odd).
#[derive(Debug, Clone)]
pub(crate) struct ConvSame {
    inner: Conv2d,
    cin: usize,
    cout: usize,
    k: usize,
}

/// How the padded input planes are filled from the source planes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fill<'a> {
    /// As they are.
    Copy,
    /// Nearest-neighbour ×2.
    Upsample2x,
    /// Group norm + SiLU: `silu(x·scale + shift)` with one `(scale, shift)` per (batch, channel).
    NormSilu(&'a [(f32, f32)]),
}

impl Fill<'_> {
    fn upsamples(&self) -> bool {
        matches!(self, Fill::Upsample2x)
    }
}

impl ConvSame {
    /// Builds the convolution (`weight` `[cout, cin, k, k]`, `bias` `[cout]` under `vb`).
    pub(crate) fn new(cin: usize, cout: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: k / 2,
            ..Default::default()
        };
        let inner = candle_nn::conv2d(cin, cout, k, cfg, vb)?;
        Ok(ConvSame {
            inner,
            cin,
            cout,
            k,
        })
    }

    /// `conv(x)`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, Fill::Copy, None)
    }

    /// `conv(silu(norm(x))) + residual`, the norm and SiLU applied while the padded input is
    /// built (no normalised tensor is materialised).
    pub(crate) fn forward_normed(
        &self,
        x: &Tensor,
        norm: &GroupNorm,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        if !(self.use_cpu_kernel(x, residual) && norm.cpu_kernel_applies(x)) {
            let h = norm.forward(x, true)?;
            return self.run(&h, Fill::Copy, residual);
        }
        let x = x.contiguous()?;
        let params = with_cpu_f32(&x, |data| norm.cpu_affine(data, x.dims()[0]))?;
        self.run(&x, Fill::NormSilu(&params), residual)
    }

    /// `conv(upsample_nearest_2x(x))`.
    pub(crate) fn forward_upsampled(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, Fill::Upsample2x, None)
    }

    fn use_cpu_kernel(&self, x: &Tensor, residual: Option<&Tensor>) -> bool {
        x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.inner.weight().dtype() == DType::F32
            && residual.is_none_or(|r| r.dtype() == DType::F32)
            && self.k % 2 == 1
    }

    fn run(&self, x: &Tensor, fill: Fill, residual: Option<&Tensor>) -> Result<Tensor> {
        if !self.use_cpu_kernel(x, residual) {
            let x = match fill {
                Fill::Copy | Fill::NormSilu(_) => x.clone(),
                Fill::Upsample2x => {
                    let (_, _, h, w) = x.dims4()?;
                    x.upsample_nearest2d(2 * h, 2 * w)?
                }
            };
            let y = self.inner.forward(&x)?;
            return Ok(match residual {
                Some(r) => (y + r)?,
                None => y,
            });
        }
        let (b, cin, h_in, w_in) = x.dims4()?;
        if cin != self.cin {
            return Err(candle_core::Error::Msg(format!(
                "conv: expected {} input channels, got {cin}",
                self.cin
            ))
            .into());
        }
        let (h, w) = if fill.upsamples() {
            (2 * h_in, 2 * w_in)
        } else {
            (h_in, w_in)
        };
        let out_shape = (b, self.cout, h, w);
        if let Some(r) = residual {
            if r.dims() != [b, self.cout, h, w] {
                return Err(candle_core::Error::Msg(format!(
                    "conv: residual {:?} does not match the output {:?}",
                    r.dims(),
                    [b, self.cout, h, w]
                ))
                .into());
            }
        }
        let x = x.contiguous()?;
        let xpad = with_cpu_f32(&x, |src| self.pad_input(src, b, h_in, w_in, fill))?;
        drop(x);
        let bias: Vec<f32> = match self.inner.bias() {
            Some(bias) => bias.to_dtype(DType::F32)?.to_vec1()?,
            None => vec![0.0; self.cout],
        };
        let weight = self.inner.weight().contiguous()?;
        // Tap-major copy of the weights, [k², cout, cin], so each tap's matrix is contiguous.
        let weight = with_cpu_f32(&weight, |w| self.tap_major(w))?;
        let residual = residual.map(|r| r.contiguous()).transpose()?;
        let mut out = vec![0f32; b * self.cout * h * w];
        match &residual {
            Some(r) => with_cpu_f32(r, |rdata| {
                self.compute(&xpad, &weight, &bias, Some(rdata), &mut out, (b, h, w))
            })??,
            None => self.compute(&xpad, &weight, &bias, None, &mut out, (b, h, w))?,
        }
        Ok(Tensor::from_vec(
            out,
            out_shape,
            self.inner.weight().device(),
        )?)
    }

    /// `[cout, cin, k, k]` → `[k², cout, cin]`.
    fn tap_major(&self, w: &[f32]) -> Vec<f32> {
        let (cin, cout, taps) = (self.cin, self.cout, self.k * self.k);
        let mut out = vec![0f32; w.len()];
        for (tap, dst) in out.chunks_exact_mut(cout * cin).enumerate() {
            for (i, d) in dst.iter_mut().enumerate() {
                *d = w[i * taps + tap];
            }
        }
        out
    }

    /// The zero-padded (and possibly upsampled) input, `[b, cin, h+2p, w+2p]` plus `2p`
    /// trailing zeros that the shifted views of the last plane may touch (only in columns that
    /// are dropped).
    fn pad_input(&self, src: &[f32], b: usize, h_in: usize, w_in: usize, fill: Fill) -> Vec<f32> {
        let p = self.k / 2;
        let (h, w) = if fill.upsamples() {
            (2 * h_in, 2 * w_in)
        } else {
            (h_in, w_in)
        };
        let wp = w + 2 * p;
        let plane = (h + 2 * p) * wp;
        let mut xpad = vec![0f32; b * self.cin * plane + 2 * p];
        let src_plane = (h_in * w_in).max(1);
        xpad[..b * self.cin * plane]
            .par_chunks_mut(plane)
            .zip(src.par_chunks(src_plane))
            .enumerate()
            .for_each(|(i, (dst, src))| {
                for y in 0..h {
                    let row = &mut dst[(y + p) * wp + p..(y + p) * wp + p + w];
                    match fill {
                        Fill::Copy => row.copy_from_slice(&src[y * w_in..(y + 1) * w_in]),
                        Fill::NormSilu(params) => {
                            let (scale, shift) = params[i];
                            affine_act(row, &src[y * w_in..(y + 1) * w_in], scale, shift, true)
                        }
                        Fill::Upsample2x => {
                            let s = &src[(y / 2) * w_in..(y / 2 + 1) * w_in];
                            for (pair, &v) in row.chunks_exact_mut(2).zip(s) {
                                pair[0] = v;
                                pair[1] = v;
                            }
                        }
                    }
                }
            });
        xpad
    }

    /// Runs the banded shifted GEMMs into `out` (`[b, cout, h, w]`).
    fn compute(
        &self,
        xpad: &[f32],
        weight: &[f32],
        bias: &[f32],
        residual: Option<&[f32]>,
        out: &mut [f32],
        (b, h, w): (usize, usize, usize),
    ) -> Result<()> {
        let (cin, cout, k) = (self.cin, self.cout, self.k);
        let p = k / 2;
        let wp = w + 2 * p;
        let plane = (h + 2 * p) * wp;
        let taps = k * k;
        if out.is_empty() {
            return Ok(());
        }
        if weight.len() != cout * cin * taps || xpad.len() != b * cin * plane + 2 * p {
            return Err(candle_core::Error::Msg("conv: inconsistent buffer sizes".into()).into());
        }
        // Rows per band: about BAND_COLUMNS padded pixels, but at least ~4 bands per thread.
        let threads = rayon::current_num_threads().max(1);
        let mut rows = (BAND_COLUMNS / wp).clamp(1, h);
        while rows > 1 && b * h.div_ceil(rows) < 4 * threads {
            rows = rows.div_ceil(2);
        }
        let bands = h.div_ceil(rows);
        // Each task owns, for its (batch, band), the band's rows of every output channel.
        let mut tasks: Vec<Vec<&mut [f32]>> =
            (0..b * bands).map(|_| Vec::with_capacity(cout)).collect();
        for (pi, out_plane) in out.chunks_mut(h * w).enumerate() {
            let bi = pi / cout;
            for (j, band) in out_plane.chunks_mut(rows * w).enumerate() {
                tasks[bi * bands + j].push(band);
            }
        }
        tasks.into_par_iter().enumerate().for_each(|(t, dst)| {
            let (bi, j) = (t / bands, t % bands);
            let y0 = j * rows;
            let r = rows.min(h - y0);
            let n = r * wp;
            // Band buffer [cout, r·wp], starting at bias (+ residual) in the kept columns.
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                if scratch.len() < cout * n {
                    scratch.resize(cout * n, 0.0);
                }
                let acc = &mut scratch[..cout * n];
                for (co, acc_c) in acc.chunks_exact_mut(n).enumerate() {
                    for yy in 0..r {
                        let row = &mut acc_c[yy * wp..yy * wp + w];
                        match residual {
                            Some(res) => {
                                let off = ((bi * cout + co) * h + y0 + yy) * w;
                                for (a, &rv) in row.iter_mut().zip(&res[off..off + w]) {
                                    *a = rv + bias[co];
                                }
                            }
                            None => row.fill(bias[co]),
                        }
                    }
                }
                let base = bi * cin * plane + y0 * wp;
                // The furthest element any tap reads: channel cin−1, tap (k−1, k−1), column n−1.
                let last = base + (cin - 1) * plane + (k - 1) * wp + (k - 1) + n - 1;
                assert!(last < xpad.len() && acc.len() == cout * n);
                for tap in 0..taps {
                    let (dy, dx) = (tap / k, tap % k);
                    // SAFETY: dst is the cout×n row-major band buffer; lhs element (co, ci) is
                    // weight[(tap·cout + co)·cin + ci] < taps·cout·cin = weight.len(); rhs
                    // element (ci, col) is xpad[base + ci·plane + dy·wp + dx + col] ≤ `last` <
                    // xpad.len() (checked above).
                    unsafe {
                        gemm::gemm(
                            cout,
                            n,
                            cin,
                            acc.as_mut_ptr(),
                            1,
                            n as isize,
                            true,
                            weight.as_ptr().add(tap * cout * cin),
                            1,
                            cin as isize,
                            xpad.as_ptr().add(base + dy * wp + dx),
                            1,
                            plane as isize,
                            1.0f32,
                            1.0f32,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                }
                for (co, band) in dst.into_iter().enumerate() {
                    let acc_c = &acc[co * n..(co + 1) * n];
                    for (yy, out_row) in band.chunks_exact_mut(w).enumerate() {
                        out_row.copy_from_slice(&acc_c[yy * wp..yy * wp + w]);
                    }
                }
            });
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    fn max_err(a: &Tensor, b: &Tensor) -> f32 {
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
    fn shifted_gemm_conv_matches_candle() {
        let dev = Device::Cpu;
        for (cin, cout, k, h, w) in [
            (3, 8, 3, 7, 5),
            (16, 4, 3, 1, 9),
            (8, 8, 1, 4, 6),
            (5, 7, 3, 40, 33),
        ] {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
            let conv = ConvSame::new(cin, cout, k, vb).unwrap();
            let x = Tensor::randn(0f32, 1.0, (2, cin, h, w), &dev).unwrap();
            let want = conv.inner.forward(&x).unwrap();
            let got = conv.forward(&x).unwrap();
            assert!(
                max_err(&got, &want) < 1e-4,
                "plain {cin} {cout} {k} {h} {w}"
            );

            let res = Tensor::randn(0f32, 1.0, want.dims(), &dev).unwrap();
            let got = conv.run(&x, Fill::Copy, Some(&res)).unwrap();
            let want_r = (&want + &res).unwrap();
            assert!(max_err(&got, &want_r) < 1e-4, "residual");

            let up = x.upsample_nearest2d(2 * h, 2 * w).unwrap();
            let want_u = conv.inner.forward(&up).unwrap();
            let got = conv.forward_upsampled(&x).unwrap();
            assert!(max_err(&got, &want_u) < 1e-4, "upsampled");

            if cin % 4 == 0 {
                let norm = GroupNorm::new(
                    4,
                    cin,
                    1e-6,
                    VarBuilder::from_varmap(&varmap, DType::F32, &dev).pp("n"),
                )
                .unwrap();
                let normed = norm.forward(&x, true).unwrap();
                let want_n = (conv.inner.forward(&normed).unwrap() + &res).unwrap();
                let got = conv.forward_normed(&x, &norm, Some(&res)).unwrap();
                assert!(max_err(&got, &want_n) < 1e-4, "normed");
            }
        }
    }

    #[test]
    fn strided_inputs_and_other_dtypes() {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let conv = ConvSame::new(4, 6, 3, vb).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 4, 9, 7), &dev).unwrap();
        let xt = x.transpose(2, 3).unwrap();
        let want = conv.inner.forward(&xt.contiguous().unwrap()).unwrap();
        assert!(max_err(&conv.forward(&xt).unwrap(), &want) < 1e-4);
        // f16 input takes candle's path (and must then match dtypes with the weights).
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F16, &dev);
        let conv = ConvSame::new(4, 6, 3, vb).unwrap();
        let y = conv.forward(&x.to_dtype(DType::F16).unwrap()).unwrap();
        assert_eq!(y.dtype(), DType::F16);
    }
}
