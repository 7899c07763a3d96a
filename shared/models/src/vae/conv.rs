//! The VAE's stride-1 "same" convolutions (3×3 with padding 1, 1×1 without).
//!
//! On the CPU in f32 they avoid candle's im2col path:
//! - 3×3: Winograd F(2×2, 3×3) (Lavin & Gray 2015). Each 4×4 tile of the zero-padded input
//!   becomes `V = Bᵀ d B`, each 3×3 kernel `U = G g Gᵀ`, and for each of the 16 positions ξ one
//!   GEMM `M_ξ[Cout, tiles] = U_ξ[Cout, Cin] · V_ξ[Cin, tiles]` replaces 9 multiply-adds per output
//!   pair by 4 (2.25× fewer flops); `Y = Aᵀ M A` gives each 2×2 output tile. The transforms only
//!   add, subtract and halve, so the results stay within a few ulp of the direct sum.
//! - other odd `k` (1×1 here): `k²` shifted GEMMs `W_tap[Cout, Cin] · X_pad[Cin, rows·(W+2p)]`
//!   over *shifted contiguous views* of the padded planes (output pixel `(y, x)` of tap
//!   `(dy, dx)` reads padded pixel `(y+dy, x+dx)`; the `2p` extra columns per row are dropped).
//!
//! Both work on bands of rows in parallel (rayon), single-threaded GEMMs into per-thread scratch.
//! The bias and an optional residual are added when the band is written out (no extra pass),
//! and the padded input is built straight from the source: copied, nearest-neighbour ×2
//! upsampled (`Upsample2D`), or group-normalised with SiLU (the resnet's `norm → silu → conv`),
//! so neither the upsampled nor the normalised tensor is materialised.
//!
//! Other devices and dtypes take candle's `conv2d` (and `upsample_nearest2d`).

use super::group_norm::{affine_act, with_cpu_f32, GroupNorm};
use super::simd::simd_dispatch;
use crate::Result;
use candle_core::{DType, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
use rayon::prelude::*;

thread_local! {
    /// Per-thread band buffers, reused across calls (no page faults per band).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

thread_local! {
    /// Large buffers (padded inputs, transformed weights) of the calling thread, reused from one
    /// convolution to the next so that each decode maps its memory once; emptied by
    /// [`release_scratch`].
    static BUFFERS: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// How many released buffers the calling thread keeps for reuse.
const KEPT_BUFFERS: usize = 2;

/// A buffer of `len` elements from the calling thread's pool (contents unspecified: callers
/// overwrite every element they read), or a new zeroed one.
fn take_buffer(len: usize) -> Vec<f32> {
    let reused = BUFFERS.with(|pool| {
        let mut pool = pool.borrow_mut();
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= len)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        best.map(|i| pool.swap_remove(i))
    });
    match reused {
        Some(mut v) => {
            if v.len() >= len {
                v.truncate(len);
            } else {
                v.resize(len, 0.0);
            }
            v
        }
        None => vec![0f32; len],
    }
}

/// Returns a buffer to the calling thread's pool (the largest few are kept).
fn give_buffer(v: Vec<f32>) {
    BUFFERS.with(|pool| {
        let mut pool = pool.borrow_mut();
        pool.push(v);
        if pool.len() > KEPT_BUFFERS {
            let smallest = pool
                .iter()
                .enumerate()
                .min_by_key(|(_, v)| v.capacity())
                .map(|(i, _)| i);
            if let Some(i) = smallest {
                pool.swap_remove(i);
            }
        }
    });
}

/// Frees the convolution scratch memory: the calling thread's buffer pool and every rayon
/// worker's band buffers. Called at the end of each VAE encode/decode.
pub(crate) fn release_scratch() {
    BUFFERS.with(|pool| pool.borrow_mut().clear());
    rayon::broadcast(|_| SCRATCH.with(|s| *s.borrow_mut() = Vec::new()));
}

/// Target number of GEMM columns (padded pixels) per band of the shifted-GEMM path.
const BAND_COLUMNS: usize = 4096;

/// Per-thread scratch budget (f32 elements) of the Winograd path's `V` and `M` band buffers.
const WINOGRAD_SCRATCH: usize = 4 << 20;

/// The algorithm of the CPU kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algo {
    /// `k²` shifted GEMMs over the padded input.
    Shifted,
    /// Winograd F(2×2, 3×3).
    Winograd,
}

/// Geometry of the padded input planes.
#[derive(Debug, Clone, Copy)]
struct Padded {
    /// Padding at the top and left.
    p: usize,
    /// Padded height and width.
    hp: usize,
    wp: usize,
    /// Zeros after the last plane (read only by dropped columns).
    slack: usize,
}

impl Padded {
    fn plane(&self) -> usize {
        self.hp * self.wp
    }
}

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
                Fill::Copy => x.clone(),
                Fill::NormSilu(_) => {
                    return Err(candle_core::Error::Msg(
                        "conv: normalised input requires the CPU f32 kernel".into(),
                    )
                    .into())
                }
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
        let algo = if self.k == 3 {
            Algo::Winograd
        } else {
            Algo::Shifted
        };
        self.run_cpu(x, fill, residual, algo, (b, h_in, w_in), (h, w))
    }

    fn run_cpu(
        &self,
        x: &Tensor,
        fill: Fill,
        residual: Option<&Tensor>,
        algo: Algo,
        (b, h_in, w_in): (usize, usize, usize),
        (h, w): (usize, usize),
    ) -> Result<Tensor> {
        let geo = match algo {
            // Whole 4×4 input tiles for ⌈h/2⌉×⌈w/2⌉ output tiles.
            Algo::Winograd => Padded {
                p: 1,
                hp: 2 * h.div_ceil(2) + 2,
                wp: 2 * w.div_ceil(2) + 2,
                slack: 0,
            },
            Algo::Shifted => {
                let p = self.k / 2;
                Padded {
                    p,
                    hp: h + 2 * p,
                    wp: w + 2 * p,
                    slack: 2 * p,
                }
            }
        };
        let x = x.contiguous()?;
        let xpad = with_cpu_f32(&x, |src| self.pad_input(src, b, (h_in, w_in), fill, geo))?;
        drop(x);
        let bias: Vec<f32> = match self.inner.bias() {
            Some(bias) => bias.to_dtype(DType::F32)?.to_vec1()?,
            None => vec![0.0; self.cout],
        };
        let weight = self.inner.weight().contiguous()?;
        let weight = with_cpu_f32(&weight, |w| match algo {
            Algo::Winograd => self.winograd_weights(w),
            Algo::Shifted => self.tap_major(w),
        })?;
        let residual = residual.map(|r| r.contiguous()).transpose()?;
        let mut out = vec![0f32; b * self.cout * h * w];
        let job = Job {
            xpad: &xpad,
            geo,
            weight: &weight,
            bias: &bias,
            residual: None,
            dims: (b, h, w),
        };
        match &residual {
            Some(r) => with_cpu_f32(r, |rdata| {
                self.compute(
                    algo,
                    Job {
                        residual: Some(rdata),
                        ..job
                    },
                    &mut out,
                )
            })??,
            None => self.compute(algo, job, &mut out)?,
        }
        give_buffer(xpad);
        give_buffer(weight);
        Ok(Tensor::from_vec(
            out,
            (b, self.cout, h, w),
            self.inner.weight().device(),
        )?)
    }

    fn compute(&self, algo: Algo, job: Job, out: &mut [f32]) -> Result<()> {
        let (b, h, w) = job.dims;
        let taps = match algo {
            Algo::Winograd => 16,
            Algo::Shifted => self.k * self.k,
        };
        if out.len() != b * self.cout * h * w
            || job.weight.len() != taps * self.cout * self.cin
            || job.xpad.len() != b * self.cin * job.geo.plane() + job.geo.slack
            || job.residual.is_some_and(|r| r.len() != out.len())
        {
            return Err(candle_core::Error::Msg("conv: inconsistent buffer sizes".into()).into());
        }
        if out.is_empty() {
            return Ok(());
        }
        match algo {
            Algo::Winograd => self.compute_winograd(&job, out),
            Algo::Shifted => self.compute_shifted(&job, out),
        }
        Ok(())
    }

    /// `U_ξ = G g Gᵀ` for every (cout, cin) kernel, laid out `[16, cout, cin]`.
    fn winograd_weights(&self, w: &[f32]) -> Vec<f32> {
        let n = self.cout * self.cin;
        let mut u = take_buffer(16 * n);
        // Plane ξ, kernel idx: u[ξ·n + idx]; each task fills a run of kernels in all planes.
        let planes: Vec<&mut [f32]> = u.chunks_mut(n).collect();
        let chunk = 1024;
        let mut per_chunk: Vec<Vec<&mut [f32]>> =
            (0..n.div_ceil(chunk)).map(|_| Vec::new()).collect();
        for plane in planes {
            for (j, part) in plane.chunks_mut(chunk).enumerate() {
                per_chunk[j].push(part);
            }
        }
        per_chunk
            .into_par_iter()
            .enumerate()
            .for_each(|(j, mut parts)| {
                for (q, g) in w[j * chunk * 9..]
                    .chunks_exact(9)
                    .take(parts[0].len())
                    .enumerate()
                {
                    // G g: 4×3.
                    let mut gg = [[0f32; 3]; 4];
                    for c in 0..3 {
                        let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
                        gg[0][c] = g0;
                        gg[1][c] = 0.5 * (g0 + g1 + g2);
                        gg[2][c] = 0.5 * (g0 - g1 + g2);
                        gg[3][c] = g2;
                    }
                    // (G g) Gᵀ: 4×4.
                    for (i, row) in gg.iter().enumerate() {
                        let (a0, a1, a2) = (row[0], row[1], row[2]);
                        parts[4 * i][q] = a0;
                        parts[4 * i + 1][q] = 0.5 * (a0 + a1 + a2);
                        parts[4 * i + 2][q] = 0.5 * (a0 - a1 + a2);
                        parts[4 * i + 3][q] = a2;
                    }
                }
            });
        u
    }

    /// `[cout, cin, k, k]` → `[k², cout, cin]`.
    fn tap_major(&self, w: &[f32]) -> Vec<f32> {
        let (cin, cout, taps) = (self.cin, self.cout, self.k * self.k);
        let mut out = take_buffer(w.len());
        for (tap, dst) in out.chunks_exact_mut(cout * cin).enumerate() {
            for (i, d) in dst.iter_mut().enumerate() {
                *d = w[i * taps + tap];
            }
        }
        out
    }

    /// The zero-padded (and possibly upsampled or normalised) input: `[b, cin, hp, wp]` with
    /// the `h×w` image at offset `(p, p)`, then `slack` zeros.
    fn pad_input(
        &self,
        src: &[f32],
        b: usize,
        (h_in, w_in): (usize, usize),
        fill: Fill,
        geo: Padded,
    ) -> Vec<f32> {
        let (h, w) = if fill.upsamples() {
            (2 * h_in, 2 * w_in)
        } else {
            (h_in, w_in)
        };
        let (p, wp, plane) = (geo.p, geo.wp, geo.plane());
        let mut xpad = take_buffer(b * self.cin * plane + geo.slack);
        let src_plane = (h_in * w_in).max(1);
        let (body, slack) = xpad.split_at_mut(b * self.cin * plane);
        slack.fill(0.0);
        body.par_chunks_mut(plane)
            .zip(src.par_chunks(src_plane))
            .enumerate()
            .for_each(|(i, (dst, src))| {
                // Zero border (the buffer may be reused): top rows, bottom rows, and the left and
                // right margins of the image rows.
                dst[..p * wp].fill(0.0);
                dst[(p + h) * wp..].fill(0.0);
                for y in 0..h {
                    let r = (y + p) * wp;
                    dst[r..r + p].fill(0.0);
                    dst[r + p + w..r + wp].fill(0.0);
                }
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

    /// The shifted-GEMM path into `out` (`[b, cout, h, w]`).
    fn compute_shifted(&self, job: &Job, out: &mut [f32]) {
        let (cin, cout, k) = (self.cin, self.cout, self.k);
        let (b, h, w) = job.dims;
        let (wp, plane) = (job.geo.wp, job.geo.plane());
        let taps = k * k;
        let (xpad, weight, bias, residual) = (job.xpad, job.weight, job.bias, job.residual);
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
    }

    /// The Winograd F(2×2, 3×3) path into `out` (`[b, cout, h, w]`).
    fn compute_winograd(&self, job: &Job, out: &mut [f32]) {
        let (cin, cout) = (self.cin, self.cout);
        let (b, h, w) = job.dims;
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        let (wp, plane) = (job.geo.wp, job.geo.plane());
        let (xpad, u, bias, residual) = (job.xpad, job.weight, job.bias, job.residual);
        // Tile rows per band: V and M of a band fit the scratch budget, and ~4 bands per thread.
        let threads = rayon::current_num_threads().max(1);
        let per_tile = 16 * (cin + cout);
        let mut tr = (WINOGRAD_SCRATCH / (per_tile * tw)).clamp(1, th);
        while tr > 1 && b * th.div_ceil(tr) < 4 * threads {
            tr = tr.div_ceil(2);
        }
        let bands = th.div_ceil(tr);
        // Each task owns, for its (batch, band), output rows [2·ty0, 2·(ty0+tr)) of every channel.
        let mut tasks: Vec<Vec<&mut [f32]>> =
            (0..b * bands).map(|_| Vec::with_capacity(cout)).collect();
        for (pi, out_plane) in out.chunks_mut(h * w).enumerate() {
            let bi = pi / cout;
            for (j, band) in out_plane.chunks_mut(2 * tr * w).enumerate() {
                tasks[bi * bands + j].push(band);
            }
        }
        tasks.into_par_iter().enumerate().for_each(|(t, dst)| {
            let (bi, j) = (t / bands, t % bands);
            let ty0 = j * tr;
            let r = tr.min(th - ty0);
            let tb = r * tw;
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let need = 16 * (cin + cout) * tb;
                if scratch.len() < need {
                    scratch.resize(need, 0.0);
                }
                let (v, m) = scratch[..need].split_at_mut(16 * cin * tb);
                // V_ξ[ci, tile] = (Bᵀ d B)_ξ, one tile row of one channel at a time.
                let mut rowbuf = vec![0f32; 8 * (tw + 1)];
                for ci in 0..cin {
                    let src = &xpad[(bi * cin + ci) * plane..(bi * cin + ci + 1) * plane];
                    for ty in 0..r {
                        let y = 2 * (ty0 + ty);
                        let rows: [&[f32]; 4] =
                            std::array::from_fn(|i| &src[(y + i) * wp..(y + i + 1) * wp]);
                        // V_ξ of tile (ty, tx) of channel ci is v[ξ·cin·tb + ci·tb + ty·tw + tx].
                        let base = ci * tb + ty * tw;
                        input_transform_row(rows, &mut rowbuf, tw, base, cin * tb, v);
                    }
                }
                for xi in 0..16 {
                    let (u_off, v_off, m_off) = (xi * cout * cin, xi * cin * tb, xi * cout * tb);
                    // SAFETY: dst is M_ξ, cout×tb row-major within m (m.len() = 16·cout·tb);
                    // lhs is U_ξ, cout×cin row-major within u (u.len() = 16·cout·cin, checked by
                    // `compute`); rhs is V_ξ, cin×tb row-major within v (v.len() = 16·cin·tb).
                    unsafe {
                        gemm::gemm(
                            cout,
                            tb,
                            cin,
                            m.as_mut_ptr().add(m_off),
                            1,
                            tb as isize,
                            false,
                            u.as_ptr().add(u_off),
                            1,
                            cin as isize,
                            v.as_ptr().add(v_off),
                            1,
                            tb as isize,
                            0.0f32,
                            1.0f32,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                }
                // Y = Aᵀ M A for each 2×2 output tile, plus bias (+ residual).
                let y0 = 2 * ty0;
                let mut ybuf = vec![0f32; 4 * tw];
                for (co, band) in dst.into_iter().enumerate() {
                    let rows_out = band.len() / w;
                    let res_band = residual.map(|res| {
                        let off = ((bi * cout + co) * h + y0) * w;
                        &res[off..off + rows_out * w]
                    });
                    for ty in 0..r {
                        let col0 = co * tb + ty * tw;
                        let mm: [&[f32]; 16] = std::array::from_fn(|xi| {
                            &m[xi * cout * tb + col0..xi * cout * tb + col0 + tw]
                        });
                        output_transform_row(&mm, &mut ybuf, tw);
                        for a in 0..2 {
                            let oy = 2 * ty + a;
                            if oy >= rows_out {
                                break;
                            }
                            let out_row = &mut band[oy * w..(oy + 1) * w];
                            let (ya, yb) = (
                                &ybuf[2 * a * tw..(2 * a + 1) * tw],
                                &ybuf[(2 * a + 1) * tw..(2 * a + 2) * tw],
                            );
                            write_tile_row(
                                out_row,
                                ya,
                                yb,
                                bias[co],
                                res_band.map(|rb| &rb[oy * w..(oy + 1) * w]),
                            );
                        }
                    }
                }
            });
        });
    }
}

simd_dispatch! {
/// One tile row of the Winograd input transform for one channel: `rows` are the four padded
/// input rows (`2·tw + 2` long) of the tiles; `V_ξ` of tile `tx` goes to `v[ξ·stride + base + tx]`.
///
/// `Bᵀ d` combines the rows element-wise; its rows are split into even (`E`) and odd (`O`)
/// columns so that `(Bᵀ d) B` of tile `tx` is `E[tx] − E[tx+1]`, `O[tx] + E[tx+1]`,
/// `E[tx+1] − O[tx]`, `O[tx] − O[tx+1]`: contiguous, vectorisable loops.
fn input_transform_row(
    rows: [&[f32]; 4],
    buf: &mut [f32],
    tw: usize,
    base: usize,
    stride: usize,
    v: &mut [f32],
) {
    let dst = |xi: usize| xi * stride + base..xi * stride + base + tw;
    let n2 = tw + 1;
    let (even, odd) = buf[..8 * n2].split_at_mut(4 * n2);
    let [r0, r1, r2, r3] = rows.map(|r| &r[..2 * n2]);
    {
        let (e0, rest) = even.split_at_mut(n2);
        let (e1, rest) = rest.split_at_mut(n2);
        let (e2, e3) = rest.split_at_mut(n2);
        let (o0, rest) = odd.split_at_mut(n2);
        let (o1, rest) = rest.split_at_mut(n2);
        let (o2, o3) = rest.split_at_mut(n2);
        for k in 0..n2 {
            let (a0, a1, a2, a3) = (r0[2 * k], r1[2 * k], r2[2 * k], r3[2 * k]);
            let (b0, b1, b2, b3) = (r0[2 * k + 1], r1[2 * k + 1], r2[2 * k + 1], r3[2 * k + 1]);
            e0[k] = a0 - a2;
            e1[k] = a1 + a2;
            e2[k] = a2 - a1;
            e3[k] = a1 - a3;
            o0[k] = b0 - b2;
            o1[k] = b1 + b2;
            o2[k] = b2 - b1;
            o3[k] = b1 - b3;
        }
    }
    for i in 0..4 {
        let e = &even[i * n2..(i + 1) * n2];
        let o = &odd[i * n2..(i + 1) * n2];
        let (e_lo, e_hi, o_lo, o_hi) = (&e[..tw], &e[1..], &o[..tw], &o[1..]);
        let d = &mut v[dst(4 * i)];
        for ((d, &el), &eh) in d.iter_mut().zip(e_lo).zip(e_hi) {
            *d = el - eh;
        }
        let d = &mut v[dst(4 * i + 1)];
        for ((d, &ol), &eh) in d.iter_mut().zip(o_lo).zip(e_hi) {
            *d = ol + eh;
        }
        let d = &mut v[dst(4 * i + 2)];
        for ((d, &ol), &eh) in d.iter_mut().zip(o_lo).zip(e_hi) {
            *d = eh - ol;
        }
        let d = &mut v[dst(4 * i + 3)];
        for ((d, &ol), &oh) in d.iter_mut().zip(o_lo).zip(o_hi) {
            *d = ol - oh;
        }
    }
}
}

simd_dispatch! {
/// One tile row of the Winograd output transform `Y = Aᵀ M A`: from the 16 `M_ξ` rows (`tw`
/// tiles each) to `y = [y00, y01, y10, y11]`, each `tw` long, in `ybuf`.
fn output_transform_row(mm: &[&[f32]; 16], ybuf: &mut [f32], tw: usize) {
    let (y00, rest) = ybuf[..4 * tw].split_at_mut(tw);
    let (y01, rest) = rest.split_at_mut(tw);
    let (y10, y11) = rest.split_at_mut(tw);
    let mm: [&[f32]; 16] = mm.map(|s| &s[..tw]);
    for t in 0..tw {
        // Aᵀ M: s0 = m0 + m1 + m2, s1 = m1 − m2 − m3 (rows of the 4×4 M).
        let s0: [f32; 4] = std::array::from_fn(|c| mm[c][t] + mm[4 + c][t] + mm[8 + c][t]);
        let s1: [f32; 4] = std::array::from_fn(|c| mm[4 + c][t] - mm[8 + c][t] - mm[12 + c][t]);
        // · A: [s0 + s1 + s2, s1 − s2 − s3].
        y00[t] = s0[0] + s0[1] + s0[2];
        y01[t] = s0[1] - s0[2] - s0[3];
        y10[t] = s1[0] + s1[1] + s1[2];
        y11[t] = s1[1] - s1[2] - s1[3];
    }
}
}

simd_dispatch! {
/// Writes one output row from the tile columns `ya` (even x) and `yb` (odd x), plus the bias
/// and the residual row.
fn write_tile_row(out: &mut [f32], ya: &[f32], yb: &[f32], bias: f32, res: Option<&[f32]>) {
    let w = out.len();
    let pairs = w / 2;
    match res {
        Some(res) => {
            let it = out
                .chunks_exact_mut(2)
                .zip(res.chunks_exact(2))
                .zip(&ya[..pairs])
                .zip(&yb[..pairs]);
            for (((o, r), &a), &b) in it {
                o[0] = a + bias + r[0];
                o[1] = b + bias + r[1];
            }
        }
        None => {
            for ((o, &a), &b) in out.chunks_exact_mut(2).zip(&ya[..pairs]).zip(&yb[..pairs]) {
                o[0] = a + bias;
                o[1] = b + bias;
            }
        }
    }
    if w % 2 == 1 {
        out[w - 1] = ya[pairs] + bias + res.map_or(0.0, |r| r[w - 1]);
    }
}
}

/// The inputs of one CPU convolution.
#[derive(Clone, Copy)]
struct Job<'a> {
    xpad: &'a [f32],
    geo: Padded,
    /// Tap-major (`[k², cout, cin]`) or Winograd (`[16, cout, cin]`) weights.
    weight: &'a [f32],
    bias: &'a [f32],
    residual: Option<&'a [f32]>,
    dims: (usize, usize, usize),
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
    fn cpu_conv_matches_candle() {
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

            // Both CPU algorithms, whatever `run` picks for this kernel size.
            for algo in [Algo::Shifted, Algo::Winograd] {
                if algo == Algo::Winograd && k != 3 {
                    continue;
                }
                let got = conv
                    .run_cpu(&x, Fill::Copy, None, algo, (2, h, w), (h, w))
                    .unwrap();
                assert!(
                    max_err(&got, &want) < 1e-4,
                    "{algo:?} {cin} {cout} {k} {h} {w}"
                );
            }

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
