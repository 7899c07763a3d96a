//! Scaled dot-product attention.
//!
//! One entry point for every model (T5 with its relative-position bias, the DiTs with padding
//! masks, the VAE's single-head mid-block attention), so the fast path lives in one place.
//!
//! On the CPU, [`scaled_dot_product_attention`] runs a fused, blocked kernel
//! ([`fused_cpu_attention`]): for each (batch, head, block of query rows) it computes the scores
//! with a GEMM into a per-thread scratch buffer, adds the bias, takes a numerically stable
//! softmax in place (SIMD `exp` on AVX-512 / AVX2, `f32::exp` elsewhere; ≤ 1e-7 relative
//! error, flushed to 0 below e^−87), multiplies by `v` straight into the output and normalises
//! the rows. The full `[B, H, Lq, Lk]` score tensor is never materialised. Work is spread over
//! rayon's pool (`RAYON_NUM_THREADS`).
//!
//! With AVX-512 both GEMMs are this file's register-tiled kernels (`kᵀ` packed once per head,
//! strided `q`/`v` rows copied to contiguous scratch); without it they go through the `gemm`
//! crate ([`fused_cpu_attention_portable`]). On other devices (CUDA) the candle-op path
//! ([`naive_attention`]) runs.

use std::cell::RefCell;

use candle_core::{bail, DType, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// `softmax(q·kᵀ·scale + bias)·v`.
///
/// Shapes: `q` `[B, H, Lq, Dh]`, `k` and `v` `[B, H, Lk, Dh]`, `bias` broadcastable to
/// `[B, H, Lq, Lk]` (additive: `-inf`/large negative on masked keys). Returns `[B, H, Lq, Dh]`.
///
/// CPU tensors in f32/f16/bf16 take the fused kernel ([`fused_cpu_attention`]); anything else
/// (other devices, other dtypes, shapes it does not cover) takes [`naive_attention`].
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    if fused_dims(q, k, v, bias).is_ok() {
        return fused_cpu_attention(q, k, v, bias, scale);
    }
    naive_attention(q, k, v, bias, scale)
}

/// The reference path built from candle ops: `matmul → (+bias) → softmax_last_dim → matmul`.
///
/// Runs on any device (this is what CUDA uses) and materialises the `[B, H, Lq, Lk]` scores.
/// Same contract as [`scaled_dot_product_attention`].
pub fn naive_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let q = q.contiguous()?;
    let kt = k.transpose(2, 3)?.contiguous()?;
    let mut scores = (q.matmul(&kt)? * scale)?;
    if let Some(bias) = bias {
        scores = scores.broadcast_add(bias)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs.matmul(&v.contiguous()?)
}

/// The fused, blocked CPU kernel behind [`scaled_dot_product_attention`].
///
/// Requirements (an error otherwise): all tensors on the CPU; `q`, `k`, `v` of one dtype among
/// f32, f16 and bf16 (half inputs are computed in f32 and the result converted back); shapes
/// `q [B, H, Lq, Dh]`, `k [B, H, Lk, Dh]`, `v [B, H, Lk, Dv]` with `Lk ≥ 1`; `bias` of any float
/// dtype, rank ≤ 4 and broadcastable to `[B, H, Lq, Lk]` (e.g. `[B, 1, 1, Lk]`, `[1, H, Lq, Lk]`,
/// `[B, H, Lq, Lk]`). Inputs may be strided (e.g. a transposed `[B, L, H, Dh]` view).
///
/// A query row whose scores are all `-inf` yields zeros (the candle-op path yields NaN).
pub fn fused_cpu_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    fused_impl(q, k, v, bias, scale, false)
}

/// [`fused_cpu_attention`] without its AVX-512 GEMM: the GEMMs go through the `gemm` crate (as
/// candle's matmul does) and only the softmax uses SIMD (AVX-512, AVX2 or scalar). This is what
/// runs on CPUs without AVX-512; exposed for tests and benchmarks.
pub fn fused_cpu_attention_portable(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    fused_impl(q, k, v, bias, scale, true)
}

fn fused_impl(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
    force_generic: bool,
) -> Result<Tensor> {
    let dims = fused_dims(q, k, v, bias)?;
    let in_dtype = q.dtype();
    let q = q.to_dtype(DType::F32)?;
    let k = k.to_dtype(DType::F32)?;
    let mut v = v.to_dtype(DType::F32)?;
    if dims.dv > 1 && v.stride()[3] != 1 {
        v = v.contiguous()?;
    }
    let bias = match bias {
        None => None,
        Some(bias) => Some(prepare_bias(bias, &dims)?),
    };

    let out = {
        let (q_storage, q_layout) = q.storage_and_layout();
        let (k_storage, k_layout) = k.storage_and_layout();
        let (v_storage, v_layout) = v.storage_and_layout();
        let q_view = View::new(cpu_f32(&q_storage)?, q_layout);
        let k_view = View::new(cpu_f32(&k_storage)?, k_layout);
        let v_view = View::new(cpu_f32(&v_storage)?, v_layout);
        match &bias {
            None => run_fused(
                &dims,
                q_view,
                k_view,
                v_view,
                None,
                scale as f32,
                force_generic,
            )?,
            Some(bias) => {
                let (b_storage, b_layout) = bias.storage_and_layout();
                let b_view = View::new(cpu_f32(&b_storage)?, b_layout);
                run_fused(
                    &dims,
                    q_view,
                    k_view,
                    v_view,
                    Some(b_view),
                    scale as f32,
                    force_generic,
                )?
            }
        }
    };
    let out = Tensor::from_vec(out, (dims.b, dims.h, dims.lq, dims.dv), q.device())?;
    if in_dtype == DType::F32 {
        Ok(out)
    } else {
        out.to_dtype(in_dtype)
    }
}

/// Problem sizes of one attention call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    lq: usize,
    lk: usize,
    dh: usize,
    dv: usize,
}

/// Checks that the fused kernel covers these inputs and returns the sizes.
fn fused_dims(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Dims> {
    let on_cpu = q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu();
    if !on_cpu || bias.is_some_and(|b| !b.device().is_cpu()) {
        bail!("fused attention: all tensors must be on the CPU");
    }
    let dtype = q.dtype();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
        || k.dtype() != dtype
        || v.dtype() != dtype
    {
        bail!(
            "fused attention: q/k/v must share one dtype among f32/f16/bf16, got {:?}/{:?}/{:?}",
            q.dtype(),
            k.dtype(),
            v.dtype()
        );
    }
    let (b, h, lq, dh) = q.dims4()?;
    let (kb, kh, lk, kd) = k.dims4()?;
    let (vb, vh, vl, dv) = v.dims4()?;
    if (kb, kh, kd) != (b, h, dh) || (vb, vh, vl) != (b, h, lk) || lk == 0 {
        bail!(
            "fused attention: incompatible shapes q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if let Some(bias) = bias {
        if !matches!(
            bias.dtype(),
            DType::F32 | DType::F16 | DType::BF16 | DType::F64
        ) {
            bail!("fused attention: unsupported bias dtype {:?}", bias.dtype());
        }
        let bd = bias.dims();
        let full = [b, h, lq, lk];
        let ok = bd.len() <= 4
            && bd
                .iter()
                .rev()
                .zip(full.iter().rev())
                .all(|(&d, &f)| d == f || d == 1);
        if !ok {
            bail!("fused attention: bias {bd:?} does not broadcast to {full:?}");
        }
    }
    Ok(Dims {
        b,
        h,
        lq,
        lk,
        dh,
        dv,
    })
}

/// Converts the bias to f32 and broadcasts it to `[B, H, Lq, Lk]` (a strided view, with unit
/// stride along the keys).
fn prepare_bias(bias: &Tensor, d: &Dims) -> Result<Tensor> {
    let full = (d.b, d.h, d.lq, d.lk);
    let bias = bias.to_dtype(DType::F32)?;
    let view = bias.broadcast_as(full)?;
    if d.lk == 1 || view.stride()[3] == 1 {
        return Ok(view);
    }
    let view = bias.contiguous()?.broadcast_as(full)?;
    if view.stride()[3] == 1 {
        return Ok(view);
    }
    view.contiguous()
}

/// The f32 data of a CPU storage.
fn cpu_f32(storage: &Storage) -> Result<&[f32]> {
    match storage {
        Storage::Cpu(cpu) => cpu.as_slice::<f32>(),
        _ => bail!("fused attention: tensor is not on the CPU"),
    }
}

/// A strided rank-4 view into f32 storage.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    offset: usize,
    stride: [usize; 4],
}

impl<'a> View<'a> {
    fn new(data: &'a [f32], layout: &Layout) -> Self {
        let s = layout.stride();
        View {
            data,
            offset: layout.start_offset(),
            stride: [s[0], s[1], s[2], s[3]],
        }
    }

    /// Element offset of `[b, h, row, 0]`.
    fn at(&self, b: usize, h: usize, row: usize) -> usize {
        self.offset + b * self.stride[0] + h * self.stride[1] + row * self.stride[2]
    }
}

/// Query rows per work item: the score block (`rows × Lk` f32) stays around 256 KiB so it lives
/// in L2, while keeping enough items to feed every thread.
fn block_rows(d: &Dims) -> usize {
    const SCORE_BLOCK_ELEMS: usize = 64 * 1024;
    let mut rows = (SCORE_BLOCK_ELEMS / d.lk.max(1)).clamp(64, 256);
    let threads = rayon::current_num_threads().max(1);
    while rows > 8 && d.b * d.h * d.lq.div_ceil(rows) < 4 * threads {
        rows /= 2;
    }
    rows.min(d.lq).max(1)
}

thread_local! {
    /// Per-thread score block, reused across calls.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn run_fused(
    d: &Dims,
    q: View<'_>,
    k: View<'_>,
    v: View<'_>,
    bias: Option<View<'_>>,
    scale: f32,
    force_generic: bool,
) -> Result<Vec<f32>> {
    let mut out = vec![0f32; d.b * d.h * d.lq * d.dv];
    if out.is_empty() {
        return Ok(out);
    }
    let isa = Isa::detect();
    #[cfg(not(target_arch = "x86_64"))]
    let _ = force_generic;
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx512) && !force_generic {
        run_fused_avx512(d, q, k, v, bias, scale, &mut out)?;
        return Ok(out);
    }
    let rows_per_block = block_rows(d);
    out.par_chunks_mut(d.lq * d.dv)
        .enumerate()
        .try_for_each(|(bh, out_bh)| {
            let (b, h) = (bh / d.h, bh % d.h);
            out_bh
                .par_chunks_mut(rows_per_block * d.dv)
                .enumerate()
                .try_for_each(|(blk, out_blk)| {
                    let q0 = blk * rows_per_block;
                    let rows = out_blk.len() / d.dv;
                    SCRATCH.with(|scratch| {
                        let mut scratch = scratch.borrow_mut();
                        let need = rows * d.lk;
                        if scratch.len() < need {
                            scratch.resize(need, 0.0);
                        }
                        let bias_rows = bias.map(|bv| {
                            let start = bv.at(b, h, q0);
                            let row_stride = bv.stride[2];
                            let end = start + (rows - 1) * row_stride + d.lk;
                            (&bv.data[start..end], row_stride)
                        });
                        attend_block(
                            d,
                            &q,
                            &k,
                            &v,
                            (b, h, q0, rows),
                            bias_rows,
                            scale,
                            &mut scratch[..need],
                            out_blk,
                            isa,
                        )
                    })
                })
        })?;
    Ok(out)
}

/// Query rows per softmax block on the AVX-512 path.
#[cfg(target_arch = "x86_64")]
const AVX512_BLOCK_ROWS: usize = 96;

#[cfg(target_arch = "x86_64")]
/// Per-thread buffers of the AVX-512 path, reused across calls.
#[derive(Default)]
struct Avx512Scratch {
    /// `kᵀ` of the current head, in [`pack_kt`]'s strip layout.
    kt: Vec<f32>,
    /// `v` of the current head as contiguous `[Lk, Dv]` rows, when its rows are strided.
    v: Vec<f32>,
    /// The current block of `q` as contiguous `[rows, Dh]`, when its rows are strided.
    q: Vec<f32>,
    /// Scores / probabilities of the current block.
    scores: Vec<f32>,
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    static AVX512_SCRATCH: RefCell<Avx512Scratch> = RefCell::new(Avx512Scratch::default());
}

#[cfg(target_arch = "x86_64")]
/// Grows `buf` to at least `len` elements and returns its first `len`.
fn scratch(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

#[cfg(target_arch = "x86_64")]
/// A row-major matrix operand: element `(i, j)` at `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

#[cfg(target_arch = "x86_64")]
/// Copies `rows × cols` of a strided view, starting at element `start`, into contiguous rows.
fn gather_rows(
    src: &[f32],
    start: usize,
    (rs, cs): (usize, usize),
    rows: usize,
    cols: usize,
    dst: &mut [f32],
) {
    for (i, out) in dst.chunks_exact_mut(cols).take(rows).enumerate() {
        let row = start + i * rs;
        if cs == 1 {
            out.copy_from_slice(&src[row..row + cols]);
        } else {
            for (j, x) in out.iter_mut().enumerate() {
                *x = src[row + j * cs];
            }
        }
    }
}

/// The AVX-512 path: work items are (batch·head, range of query rows); each packs `kᵀ` for its
/// head once (column strips padded to 16 keys) and makes `v` contiguous if it is not, then
/// walks its rows in blocks through scores → softmax → `·v` with this file's register-tiled
/// GEMM. Strided `q` rows (e.g. views of a fused QKV projection) are copied per block, which
/// keeps the GEMMs clear of L1 set conflicts.
#[cfg(target_arch = "x86_64")]
fn run_fused_avx512(
    d: &Dims,
    q: View<'_>,
    k: View<'_>,
    v: View<'_>,
    bias: Option<View<'_>>,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    let n_bh = d.b * d.h;
    let block_rows = AVX512_BLOCK_ROWS;
    let threads = rayon::current_num_threads().max(1);
    // Enough items for load balance; a chunk never goes below one block.
    let chunks = (4 * threads).div_ceil(n_bh).min(d.lq.div_ceil(block_rows));
    let chunk_rows = d.lq.div_ceil(chunks.max(1));
    let lk_pad = d.lk.div_ceil(16) * 16;
    let s_rs = score_row_stride(lk_pad);
    let q_dense = q.stride[3] == 1 && (q.stride[2] == d.dh || d.lq == 1);
    let v_dense = (v.stride[3] == 1 || d.dv == 1) && (v.stride[2] == d.dv || d.lk == 1);
    out.par_chunks_mut(d.lq * d.dv)
        .enumerate()
        .try_for_each(|(bh, out_bh)| {
            let (b, h) = (bh / d.h, bh % d.h);
            out_bh
                .par_chunks_mut(chunk_rows * d.dv)
                .enumerate()
                .try_for_each(|(chunk, out_chunk)| {
                    AVX512_SCRATCH.with(|buffers| {
                        let mut buffers = buffers.borrow_mut();
                        let Avx512Scratch {
                            kt,
                            v: v_buf,
                            q: q_buf,
                            scores,
                        } = &mut *buffers;
                        let kt = scratch(kt, d.dh * lk_pad);
                        pack_kt(d, &k, b, h, lk_pad, kt)?;
                        let v_mat = if v_dense {
                            Mat {
                                data: &v.data[v.at(b, h, 0)..],
                                rs: d.dv,
                                cs: 1,
                            }
                        } else {
                            let buf = scratch(v_buf, d.lk * d.dv);
                            let vs = (v.stride[2], v.stride[3]);
                            gather_rows(v.data, v.at(b, h, 0), vs, d.lk, d.dv, buf);
                            Mat {
                                data: buf,
                                rs: d.dv,
                                cs: 1,
                            }
                        };
                        let scores = scratch(scores, block_rows * s_rs);
                        let q_begin = chunk * chunk_rows;
                        for (blk, out_blk) in out_chunk.chunks_mut(block_rows * d.dv).enumerate() {
                            let q0 = q_begin + blk * block_rows;
                            let rows = out_blk.len() / d.dv;
                            let q_mat = if q_dense {
                                Mat {
                                    data: &q.data[q.at(b, h, q0)..],
                                    rs: d.dh,
                                    cs: 1,
                                }
                            } else {
                                let buf = scratch(q_buf, rows * d.dh);
                                let qs = (q.stride[2], q.stride[3]);
                                gather_rows(q.data, q.at(b, h, q0), qs, rows, d.dh, buf);
                                Mat {
                                    data: buf,
                                    rs: d.dh,
                                    cs: 1,
                                }
                            };
                            let bias_rows = bias.map(|bv| {
                                let start = bv.at(b, h, q0);
                                let row_stride = bv.stride[2];
                                let end = start + (rows - 1) * row_stride + d.lk;
                                (&bv.data[start..end], row_stride)
                            });
                            attend_block_avx512(
                                d,
                                q_mat,
                                v_mat,
                                rows,
                                bias_rows,
                                scale,
                                (kt, lk_pad),
                                &mut scores[..rows * s_rs],
                                out_blk,
                            )?;
                        }
                        Ok(())
                    })
                })
        })
}

/// Column strips of `kᵀ` on the AVX-512 path: as wide as the score GEMM's register tile.
#[cfg(target_arch = "x86_64")]
const KT_STRIP: usize = 16 * S_TILE_VECTORS;
/// Register tile of the score GEMM: rows × 16-lane vectors.
#[cfg(target_arch = "x86_64")]
const S_TILE_ROWS: usize = 6;
#[cfg(target_arch = "x86_64")]
const S_TILE_VECTORS: usize = 4;

/// Packs `kᵀ` (`[Dh, Lk]`, zero-padded to `lk_pad` columns) as consecutive column strips of
/// [`KT_STRIP`] columns, each stored row-major (`Dh` rows of the strip's width), so that the
/// score GEMM walks each strip contiguously instead of striding `lk_pad` floats per row.
#[cfg(target_arch = "x86_64")]
fn pack_kt(
    d: &Dims,
    k: &View<'_>,
    b: usize,
    h: usize,
    lk_pad: usize,
    kt: &mut [f32],
) -> Result<()> {
    let base = k.at(b, h, 0);
    let (sj, sd) = (k.stride[2], k.stride[3]);
    let last = base + (d.lk - 1) * sj + d.dh.saturating_sub(1) * sd;
    if last >= k.data.len() || kt.len() < d.dh * lk_pad || !lk_pad.is_multiple_of(16) {
        bail!("fused attention: k view or kᵀ buffer out of range");
    }
    // Gathers take 32-bit element offsets.
    if 15 * sj + d.dh * sd < i32::MAX as usize {
        // SAFETY: AVX-512F was detected by the caller; the gathers read keys `< lk` only (masked)
        // at offsets within the view (checked above), the stores stay within `kt` (checked).
        unsafe { x86::pack_kt_avx512(&k.data[base..=last], (sj, sd), d.lk, d.dh, lk_pad, kt) };
        return Ok(());
    }
    for j0 in (0..lk_pad).step_by(KT_STRIP) {
        let cols = KT_STRIP.min(lk_pad - j0);
        let strip = &mut kt[j0 * d.dh..(j0 + cols) * d.dh];
        for jj in 0..cols {
            let j = j0 + jj;
            for dd in 0..d.dh {
                strip[dd * cols + jj] = if j < d.lk {
                    k.data[base + j * sj + dd * sd]
                } else {
                    0.0
                };
            }
        }
    }
    Ok(())
}

/// Row stride of the score block: a little more than `lk_pad`, so that rows a power of two
/// apart do not all land in the same L1 sets.
#[cfg(target_arch = "x86_64")]
fn score_row_stride(lk_pad: usize) -> usize {
    lk_pad + 16
}

/// Keys per reduction chunk of the `·v` GEMM (the chunk of `v` stays in L1).
#[cfg(target_arch = "x86_64")]
const O_K_CHUNK: usize = 128;
/// Head channels per reduction chunk of the score GEMM (wide heads only; Dh ≤ 128 is one chunk).
#[cfg(target_arch = "x86_64")]
const S_K_CHUNK: usize = 128;

/// One block of `rows` query rows on the AVX-512 path.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn attend_block_avx512(
    d: &Dims,
    q: Mat<'_>,
    v: Mat<'_>,
    rows: usize,
    bias_rows: Option<(&[f32], usize)>,
    scale: f32,
    (kt, lk_pad): (&[f32], usize),
    scores: &mut [f32],
    out: &mut [f32],
) -> Result<()> {
    let (lk, dh, dv) = (d.lk, d.dh, d.dv);
    let s_rs = score_row_stride(lk_pad);
    let q_last = (rows - 1) * q.rs + dh.saturating_sub(1) * q.cs;
    let v_last = (lk - 1) * v.rs + dv - 1;
    // Everything the raw-pointer GEMMs below touch, checked once per block.
    let in_range = q_last < q.data.len()
        && v_last < v.data.len()
        && (v.cs == 1 || dv == 1)
        && kt.len() >= dh * lk_pad
        && scores.len() == rows * s_rs
        && out.len() == rows * dv
        && rows <= AVX512_BLOCK_ROWS
        && bias_rows.is_none_or(|(data, stride)| (rows - 1) * stride + lk <= data.len());
    if !in_range {
        bail!("fused attention: block operands out of range");
    }
    let scales = [scale; AVX512_BLOCK_ROWS];
    // SAFETY: AVX-512F was detected by the caller; the ranges read and written were checked
    // above (A: rows × dh of q, B: dh rows of kt with lk_pad columns, C: scores).
    unsafe {
        x86::gemm_avx512::<S_TILE_ROWS, S_TILE_VECTORS>(
            (rows, lk_pad, dh),
            (q.data.as_ptr(), q.rs, q.cs),
            (kt.as_ptr(), x86::BLayout::Strips),
            (scores.as_mut_ptr(), s_rs),
            &scales,
            S_K_CHUNK,
        );
    }
    let mut inv_sums = [0f32; AVX512_BLOCK_ROWS];
    for (r, row) in scores.chunks_exact_mut(s_rs).enumerate() {
        let bias_row = bias_rows.map(|(data, stride)| &data[r * stride..r * stride + lk]);
        // SAFETY: AVX-512F was detected by the caller; `bias_row` has `lk` elements.
        let sum = unsafe { x86::softmax_row_avx512(&mut row[..lk], bias_row) };
        inv_sums[r] = if sum > 0.0 { 1.0 / sum } else { 0.0 };
    }
    // SAFETY: as above (A: rows × lk of scores, B: lk rows of v with dv columns, C: out).
    unsafe {
        x86::gemm_avx512::<4, 5>(
            (rows, dv, lk),
            (scores.as_ptr(), s_rs, 1),
            (v.data.as_ptr(), x86::BLayout::Rows(v.rs)),
            (out.as_mut_ptr(), dv),
            &inv_sums,
            O_K_CHUNK,
        );
    }
    Ok(())
}

/// One work item: `rows` query rows of one (batch, head) pair.
#[allow(clippy::too_many_arguments)]
fn attend_block(
    d: &Dims,
    q: &View<'_>,
    k: &View<'_>,
    v: &View<'_>,
    (b, h, q0, rows): (usize, usize, usize, usize),
    bias_rows: Option<(&[f32], usize)>,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
    isa: Isa,
) -> Result<()> {
    let (lk, dh, dv) = (d.lk, d.dh, d.dv);
    debug_assert_eq!(scores.len(), rows * lk);
    debug_assert_eq!(out.len(), rows * dv);
    let q_off = q.at(b, h, q0);
    let k_off = k.at(b, h, 0);
    let v_off = v.at(b, h, 0);
    // Bounds of what the GEMMs read, checked once so the raw-pointer calls stay in range.
    let q_last = q_off + (rows - 1) * q.stride[2] + dh.saturating_sub(1) * q.stride[3];
    let k_last = k_off + (lk - 1) * k.stride[2] + dh.saturating_sub(1) * k.stride[3];
    let v_last = v_off + (lk - 1) * v.stride[2] + dv.saturating_sub(1) * v.stride[3];
    if q_last >= q.data.len()
        || k_last >= k.data.len()
        || v_last >= v.data.len()
        || scores.len() != rows * lk
        || out.len() != rows * dv
        || rows > 256
    {
        bail!("fused attention: block operands out of range");
    }

    // scores[rows, lk] = scale · q_blk[rows, dh] · kᵀ[dh, lk]
    // SAFETY: every index read or written lies within the slices (checked above; `scores` and
    // `out` have exactly rows·lk and rows·dv elements, written with unit column stride).
    unsafe {
        gemm::gemm(
            rows,
            lk,
            dh,
            scores.as_mut_ptr(),
            1,
            lk as isize,
            false,
            q.data.as_ptr().add(q_off),
            q.stride[3] as isize,
            q.stride[2] as isize,
            k.data.as_ptr().add(k_off),
            k.stride[2] as isize,
            k.stride[3] as isize,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }

    let mut inv_sums = [0f32; 256];
    for (r, row) in scores.chunks_exact_mut(lk).enumerate() {
        let bias_row = bias_rows.map(|(data, stride)| &data[r * stride..r * stride + lk]);
        let sum = isa.softmax_row(row, bias_row);
        inv_sums[r] = if sum > 0.0 { 1.0 / sum } else { 0.0 };
    }

    // out[rows, dv] = exp_scores[rows, lk] · v[lk, dv]
    // SAFETY: as above.
    unsafe {
        gemm::gemm(
            rows,
            dv,
            lk,
            out.as_mut_ptr(),
            1,
            dv as isize,
            false,
            scores.as_ptr(),
            1,
            lk as isize,
            v.data.as_ptr().add(v_off),
            v.stride[3] as isize,
            v.stride[2] as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    for (row, inv) in out.chunks_exact_mut(dv).zip(inv_sums.iter()) {
        for x in row {
            *x *= inv;
        }
    }
    Ok(())
}

/// The SIMD level used for the softmax.
#[derive(Clone, Copy, Debug)]
enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    /// In place: `row ← exp(row + bias − max)`; returns the sum of the new row (0 when every
    /// entry is `-inf`, in which case the row is zeroed).
    fn softmax_row(self, row: &mut [f32], bias: Option<&[f32]>) -> f32 {
        match self {
            Isa::Scalar => softmax_row_scalar(row, bias),
            // SAFETY: the CPU features were detected at run time.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::softmax_row_avx2(row, bias) },
            // SAFETY: the CPU features were detected at run time.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { x86::softmax_row_avx512(row, bias) },
        }
    }
}

fn softmax_row_scalar(row: &mut [f32], bias: Option<&[f32]>) -> f32 {
    if let Some(bias) = bias {
        for (x, b) in row.iter_mut().zip(bias) {
            *x += b;
        }
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return 0.0;
    }
    let mut sum = 0.0;
    for x in row.iter_mut() {
        *x = exp_flushed(*x - max);
        sum += *x;
    }
    sum
}

/// `e^x`, flushed to 0 below e^−87 (as the SIMD versions do: no denormals).
#[inline]
fn exp_flushed(x: f32) -> f32 {
    if x >= -87.0 {
        x.exp()
    } else {
        0.0
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! AVX-512 and AVX2 softmax rows. `exp` is Cephes' `expf` (range reduction by `ln 2` in two
    //! parts, degree-5 polynomial), ≈ 1 ulp over the range a softmax feeds it.

    use std::arch::x86_64::*;

    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const P0: f32 = 1.987_569_1e-4;
    const P1: f32 = 1.398_2e-3;
    const P2: f32 = 8.333_452e-3;
    const P3: f32 = 4.166_579_6e-2;
    const P4: f32 = 1.666_666_5e-1;
    // Cephes' 5.0000001201e-1 rounds to 0.5 in f32.
    const P5: f32 = 0.5;

    /// `e^x` for the softmax (`x ≤ 0`): results below e^−87 (≈ 1.6e−38, the bottom of the
    /// normal range) and `−inf`/NaN inputs give 0. Denormals would cost microcode assists here
    /// and in the GEMM that consumes them.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp512(x: __m512) -> __m512 {
        let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(-87.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let one = _mm512_set1_ps(1.0);
        let mut p = _mm512_set1_ps(P0);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P1));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P2));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P4));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P5));
        p = _mm512_fmadd_ps(p, r, one);
        p = _mm512_fmadd_ps(p, r, one);
        // Lanes outside `keep` (including the NaNs that −inf produces above) become 0.
        _mm512_maskz_scalef_ps(keep, p, n)
    }

    /// Mask of the first `n` (< 16) lanes.
    #[inline]
    fn tail_mask(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    /// See `Isa::softmax_row`.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `bias`, when given, must be at least as long as `row`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax_row_avx512(row: &mut [f32], bias: Option<&[f32]>) -> f32 {
        let n = row.len();
        let p = row.as_mut_ptr();
        let full = n / 16 * 16;
        let rest = n - full;
        let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
        match bias {
            Some(bias) => {
                debug_assert!(bias.len() >= n);
                let bp = bias.as_ptr();
                let mut i = 0;
                while i < full {
                    let x = _mm512_add_ps(_mm512_loadu_ps(p.add(i)), _mm512_loadu_ps(bp.add(i)));
                    _mm512_storeu_ps(p.add(i), x);
                    vmax = _mm512_max_ps(vmax, x);
                    i += 16;
                }
                if rest > 0 {
                    let m = tail_mask(rest);
                    let x = _mm512_add_ps(
                        _mm512_maskz_loadu_ps(m, p.add(full)),
                        _mm512_maskz_loadu_ps(m, bp.add(full)),
                    );
                    _mm512_mask_storeu_ps(p.add(full), m, x);
                    vmax = _mm512_mask_max_ps(vmax, m, vmax, x);
                }
            }
            None => {
                let mut i = 0;
                while i < full {
                    vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(p.add(i)));
                    i += 16;
                }
                if rest > 0 {
                    let m = tail_mask(rest);
                    let x = _mm512_maskz_loadu_ps(m, p.add(full));
                    vmax = _mm512_mask_max_ps(vmax, m, vmax, x);
                }
            }
        }
        let max = _mm512_reduce_max_ps(vmax);
        if max == f32::NEG_INFINITY {
            row.fill(0.0);
            return 0.0;
        }
        let vm = _mm512_set1_ps(max);
        let mut s0 = _mm512_setzero_ps();
        let mut s1 = _mm512_setzero_ps();
        let mut i = 0;
        while i + 32 <= full {
            let e0 = exp512(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), vm));
            let e1 = exp512(_mm512_sub_ps(_mm512_loadu_ps(p.add(i + 16)), vm));
            _mm512_storeu_ps(p.add(i), e0);
            _mm512_storeu_ps(p.add(i + 16), e1);
            s0 = _mm512_add_ps(s0, e0);
            s1 = _mm512_add_ps(s1, e1);
            i += 32;
        }
        if i < full {
            let e = exp512(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), vm));
            _mm512_storeu_ps(p.add(i), e);
            s0 = _mm512_add_ps(s0, e);
        }
        if rest > 0 {
            let m = tail_mask(rest);
            let e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(full)), vm));
            _mm512_mask_storeu_ps(p.add(full), m, e);
            s1 = _mm512_mask_add_ps(s1, m, s1, e);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(s0, s1))
    }

    /// `kt` in [`super::pack_kt`]'s strip layout from `k` (`k[j·sj + d·sd]` for `j < lk`,
    /// `d < dh`), with 16-key gathers.
    ///
    /// # Safety
    /// AVX-512F; `15·sj + dh·sd < 2³¹`; `lk_pad` a multiple of 16 with `lk ≤ lk_pad`;
    /// `kt.len() ≥ dh·lk_pad`; `k` holds every `k[j·sj + d·sd]` for `j < lk`, `d < dh`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack_kt_avx512(
        k: &[f32],
        (sj, sd): (usize, usize),
        lk: usize,
        dh: usize,
        lk_pad: usize,
        kt: &mut [f32],
    ) {
        let lanes = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(sj as i32),
        );
        let out = kt.as_mut_ptr();
        let strip_width = 16 * super::S_TILE_VECTORS;
        let mut j0 = 0;
        while j0 < lk_pad {
            let cols = strip_width.min(lk_pad - j0);
            let strip = out.add(j0 * dh);
            let mut v = 0;
            while v < cols {
                let j = j0 + v;
                let valid = lk.saturating_sub(j);
                let mask = if valid >= 16 {
                    0xffff
                } else {
                    tail_mask(valid)
                };
                if mask != 0 {
                    let row = k.as_ptr().add(j * sj);
                    for dd in 0..dh {
                        let x = _mm512_mask_i32gather_ps::<4>(
                            _mm512_setzero_ps(),
                            mask,
                            lanes,
                            row.add(dd * sd),
                        );
                        _mm512_storeu_ps(strip.add(dd * cols + v), x);
                    }
                } else {
                    for dd in 0..dh {
                        _mm512_storeu_ps(strip.add(dd * cols + v), _mm512_setzero_ps());
                    }
                }
                v += 16;
            }
            j0 += cols;
        }
    }

    /// Arguments of one register tile of [`gemm_avx512`].
    struct Tile {
        k: usize,
        a: *const f32,
        a_rs: usize,
        a_cs: usize,
        b: *const f32,
        b_rs: usize,
        c: *mut f32,
        c_rs: usize,
        /// Lanes of the last 16-column vector that are in range.
        mask: __mmask16,
        /// One factor per row of the tile, applied when `last` is set.
        alpha: *const f32,
        /// Add to the partial sums already in C (a later chunk of the reduction).
        accumulate: bool,
        /// The final chunk of the reduction: scale by `alpha` on the way out.
        last: bool,
    }

    /// `C[MR × 16·NV] = diag(alpha) · A[MR × k] · B[k × 16·NV]`: A broadcast element by element
    /// (any strides), B rows loaded as vectors, the accumulators held in registers.
    ///
    /// # Safety
    /// AVX-512F; all of A's `MR × k` elements, B's `k` rows up to the mask and C's `MR` rows up to
    /// the mask must be in bounds.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const MR: usize, const NV: usize>(t: &Tile) {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        if t.accumulate {
            for (i, acc) in acc.iter_mut().enumerate() {
                let c = t.c.add(i * t.c_rs);
                for (v, acc) in acc.iter_mut().enumerate() {
                    *acc = if v + 1 == NV {
                        _mm512_maskz_loadu_ps(t.mask, c.add(16 * v))
                    } else {
                        _mm512_loadu_ps(c.add(16 * v))
                    };
                }
            }
        }
        let mut a = t.a;
        let mut b = t.b;
        for _ in 0..t.k {
            let mut bv = [_mm512_setzero_ps(); NV];
            for (v, bv) in bv.iter_mut().enumerate() {
                *bv = if v + 1 == NV {
                    _mm512_maskz_loadu_ps(t.mask, b.add(16 * v))
                } else {
                    _mm512_loadu_ps(b.add(16 * v))
                };
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.add(i * t.a_rs));
                for (acc, bv) in acc.iter_mut().zip(bv.iter()) {
                    *acc = _mm512_fmadd_ps(av, *bv, *acc);
                }
            }
            a = a.add(t.a_cs);
            b = b.add(t.b_rs);
        }
        for (i, acc) in acc.iter().enumerate() {
            let alpha = _mm512_set1_ps(if t.last { *t.alpha.add(i) } else { 1.0 });
            let c = t.c.add(i * t.c_rs);
            for (v, acc) in acc.iter().enumerate() {
                let x = _mm512_mul_ps(*acc, alpha);
                if v + 1 == NV {
                    _mm512_mask_storeu_ps(c.add(16 * v), t.mask, x);
                } else {
                    _mm512_storeu_ps(c.add(16 * v), x);
                }
            }
        }
    }

    type TileFn = unsafe fn(&Tile);

    /// Register tiles up to 6 rows × 5 vectors, indexed `[rows − 1][vectors − 1]`.
    const TILES: [[TileFn; 5]; 6] = {
        macro_rules! row {
            ($mr:literal) => {
                [
                    tile::<$mr, 1> as TileFn,
                    tile::<$mr, 2> as TileFn,
                    tile::<$mr, 3> as TileFn,
                    tile::<$mr, 4> as TileFn,
                    tile::<$mr, 5> as TileFn,
                ]
            };
        }
        [row!(1), row!(2), row!(3), row!(4), row!(5), row!(6)]
    };

    /// How [`gemm_avx512`] finds B's elements.
    #[derive(Clone, Copy)]
    pub(super) enum BLayout {
        /// Row-major with this row stride: `b[l·b_rs + j]`.
        Rows(usize),
        /// Packed in column strips of `16·NV` columns (the last one narrower): the strip that
        /// starts at column `j0` with width `w` holds element `(l, j)` at `b[j0·k + l·w + j − j0]`.
        Strips,
    }

    /// `C[m × n] = diag(alpha) · A[m × k] · B[k × n]` with `MR × NV` register tiles
    /// (`MR ≤ 6`, `NV ≤ 5`). A is addressed `a[i·a_rs + l·a_cs]`, B as `b_layout` says, C
    /// `c[i·c_rs + j]`; nothing outside those index ranges is read or written.
    ///
    /// # Safety
    /// AVX-512F; the index ranges above must be in bounds; `alpha.len() ≥ m`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gemm_avx512<const MR: usize, const NV: usize>(
        (m, n, k): (usize, usize, usize),
        (a, a_rs, a_cs): (*const f32, usize, usize),
        (b, b_layout): (*const f32, BLayout),
        (c, c_rs): (*mut f32, usize),
        alpha: &[f32],
        k_chunk: usize,
    ) {
        debug_assert!(MR <= 6 && NV <= 5 && alpha.len() >= m && k_chunk > 0);
        let strip = 16 * NV;
        // Chunks of the reduction keep the B rows of one chunk in L1 across all row tiles.
        let mut l0 = 0;
        while l0 < k {
            let kc = k_chunk.min(k - l0);
            let mut j0 = 0;
            while j0 < n {
                let cols = strip.min(n - j0);
                let nv = cols.div_ceil(16);
                let last = cols - 16 * (nv - 1);
                let mask = if last == 16 { 0xffff } else { tail_mask(last) };
                let (b, b_rs) = match b_layout {
                    BLayout::Rows(b_rs) => (b.add(l0 * b_rs + j0), b_rs),
                    BLayout::Strips => (b.add(j0 * k + l0 * cols), cols),
                };
                let mut i0 = 0;
                while i0 < m {
                    let mr = MR.min(m - i0);
                    let t = Tile {
                        k: kc,
                        a: a.add(i0 * a_rs + l0 * a_cs),
                        a_rs,
                        a_cs,
                        b,
                        b_rs,
                        c: c.add(i0 * c_rs + j0),
                        c_rs,
                        mask,
                        alpha: alpha.as_ptr().add(i0),
                        accumulate: l0 > 0,
                        last: l0 + kc == k,
                    };
                    TILES[mr - 1][nv - 1](&t);
                    i0 += mr;
                }
                j0 += cols;
            }
            l0 += kc;
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp256(x: __m256) -> __m256 {
        // As in `exp512`: below e^−87 the result is flushed to 0 (no denormals), and the clamp
        // keeps 2^n a normal number.
        let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(-87.0));
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
            _mm256_set1_ps(88.0),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(P0);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P1));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P2));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P4));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P5));
        let r2 = _mm256_mul_ps(r, r);
        let y = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), keep)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hmax256(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_shuffle_ps::<0b01>(m, m));
        _mm_cvtss_f32(m)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }

    /// See `Isa::softmax_row`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `bias`, when given, must be at least as long as `row`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax_row_avx2(row: &mut [f32], bias: Option<&[f32]>) -> f32 {
        let n = row.len();
        let p = row.as_mut_ptr();
        let full = n / 8 * 8;
        let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut max_tail = f32::NEG_INFINITY;
        match bias {
            Some(bias) => {
                debug_assert!(bias.len() >= n);
                let bp = bias.as_ptr();
                let mut i = 0;
                while i < full {
                    let x = _mm256_add_ps(_mm256_loadu_ps(p.add(i)), _mm256_loadu_ps(bp.add(i)));
                    _mm256_storeu_ps(p.add(i), x);
                    vmax = _mm256_max_ps(vmax, x);
                    i += 8;
                }
                for j in full..n {
                    row[j] += bias[j];
                    max_tail = max_tail.max(row[j]);
                }
            }
            None => {
                let mut i = 0;
                while i < full {
                    vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(p.add(i)));
                    i += 8;
                }
                for &x in &row[full..] {
                    max_tail = max_tail.max(x);
                }
            }
        }
        let max = hmax256(vmax).max(max_tail);
        if max == f32::NEG_INFINITY {
            row.fill(0.0);
            return 0.0;
        }
        let vm = _mm256_set1_ps(max);
        let mut s0 = _mm256_setzero_ps();
        let mut i = 0;
        while i < full {
            let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vm));
            _mm256_storeu_ps(p.add(i), e);
            s0 = _mm256_add_ps(s0, e);
            i += 8;
        }
        let mut sum = hsum256(s0);
        for x in &mut row[full..] {
            *x = super::exp_flushed(*x - max);
            sum += *x;
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        let max_abs = (&a - &b)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let n = b.elem_count() as f64;
        let v: Vec<f32> = b.to_vec1().unwrap();
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        max_abs / var.sqrt().max(1e-12) as f32
    }

    /// Deterministic normal samples (xorshift64* + Box–Muller), so error figures are stable.
    fn randn(shape: &[usize], std: f64) -> Tensor {
        use std::cell::Cell;
        thread_local! {
            // Per test thread, so each test sees the same inputs whatever runs beside it.
            static SEED: Cell<u64> = const { Cell::new(0x9e37_79b9_7f4a_7c15) };
        }
        let n: usize = shape.iter().product();
        let mut state = SEED.with(|s| {
            let v = s.get();
            s.set(v.wrapping_add(0x2545_f491_4f6c_dd1d));
            v | 1
        });
        let mut uniform = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            ((state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let data: Vec<f32> = (0..n)
            .map(|_| {
                let (u1, u2) = (uniform(), uniform());
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                (z * std) as f32
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// Additive masks: −10000 / −inf on some keys, but never a whole row.
    fn padding_mask(b: usize, lk: usize, neg: f32) -> Tensor {
        let mut data = vec![0f32; b * lk];
        for bi in 0..b {
            let keep = (lk * (bi + 2) / (b + 2)).max(1);
            for j in keep..lk {
                data[bi * lk + j] = neg;
            }
        }
        Tensor::from_vec(data, (b, 1, 1, lk), &Device::Cpu).unwrap()
    }

    fn check(b: usize, h: usize, lq: usize, lk: usize, dh: usize, bias: Option<&Tensor>) -> f32 {
        let q = randn(&[b, h, lq, dh], 1.0);
        let k = randn(&[b, h, lk, dh], 1.0);
        let v = randn(&[b, h, lk, dh], 1.0);
        let scale = 1.0 / (dh as f64).sqrt();
        let want = naive_attention(&q, &k, &v, bias, scale).unwrap();
        let got = fused_cpu_attention(&q, &k, &v, bias, scale).unwrap();
        assert_eq!(got.dims(), want.dims());
        let err = rel_err(&got, &want);
        // Both f32 paths against an f64 evaluation: the fused kernel must be no less accurate.
        let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let exact = naive_attention(&f(&q), &f(&k), &f(&v), bias.map(f).as_ref(), scale).unwrap();
        let (fused_err, naive_err) = (rel_err(&got, &exact), rel_err(&want, &exact));
        println!("  vs f64: fused {fused_err:.2e}, naive {naive_err:.2e}");
        // The f32 paths sum in different orders; with 1024 keys each can be ~1e-5 off the f64
        // result on its own (the output std shrinks as attention spreads over more keys).
        let tol = if lk <= 512 { 1e-5 } else { 2e-5 };
        assert!(fused_err <= tol && fused_err <= 2.0 * naive_err.max(1e-6));
        assert!(err <= tol, "fused vs naive {err:.2e} > {tol:.0e}");
        let dispatched = scaled_dot_product_attention(&q, &k, &v, bias, scale).unwrap();
        assert_eq!(rel_err(&dispatched, &got), 0.0);
        let portable = fused_cpu_attention_portable(&q, &k, &v, bias, scale).unwrap();
        let portable_err = rel_err(&portable, &exact);
        println!("  portable vs f64: {portable_err:.2e}");
        assert!(portable_err <= tol && portable_err <= 2.0 * naive_err.max(1e-6));
        err
    }

    #[test]
    fn fused_matches_naive_without_bias() {
        for &(b, h, lq, lk, dh) in &[
            (1, 1, 1, 1, 8),
            (1, 2, 17, 17, 8),
            (2, 3, 33, 65, 40),
            (1, 4, 100, 7, 64),
            (2, 2, 129, 300, 72),
            (2, 1, 300, 1024, 72),
            // Wide heads (SD-style 160, the VAE's single 512-channel head), one query row.
            (1, 2, 50, 77, 160),
            (1, 1, 33, 40, 512),
            (2, 3, 1, 19, 64),
        ] {
            let err = check(b, h, lq, lk, dh, None);
            println!("no bias {b}x{h}x{lq}x{lk}x{dh}: max abs / std = {err:.2e}");
        }
    }

    #[test]
    fn fused_matches_naive_with_padding_mask() {
        for &(b, h, lq, lk, dh, neg) in &[
            (1, 2, 31, 300, 72, -10000.0),
            (2, 4, 64, 300, 72, -10000.0),
            (2, 3, 19, 23, 40, f32::NEG_INFINITY),
            (2, 2, 77, 120, 64, f32::MIN),
        ] {
            let mask = padding_mask(b, lk, neg);
            let err = check(b, h, lq, lk, dh, Some(&mask));
            println!("mask [B,1,1,Lk] {b}x{h}x{lq}x{lk}x{dh}: max abs / std = {err:.2e}");
        }
    }

    #[test]
    fn fused_matches_naive_with_position_bias() {
        for &(b, h, lq, lk, dh) in &[(1, 2, 13, 13, 8), (2, 4, 57, 57, 64), (2, 3, 40, 9, 40)] {
            // T5: [1, H, Lq, Lk] position bias, plus a padding mask → [B, H, Lq, Lk].
            let pos = randn(&[1, h, lq, lk], 2.0);
            let err = check(b, h, lq, lk, dh, Some(&pos));
            println!("bias [1,H,Lq,Lk] {b}x{h}x{lq}x{lk}x{dh}: max abs / std = {err:.2e}");
            let full = pos.broadcast_add(&padding_mask(b, lk, f32::MIN)).unwrap();
            let err = check(b, h, lq, lk, dh, Some(&full));
            println!("bias [B,H,Lq,Lk] {b}x{h}x{lq}x{lk}x{dh}: max abs / std = {err:.2e}");
            // Lower-rank and odd broadcasts.
            for shape in [vec![lk], vec![lq, lk], vec![b, 1, lq, 1], vec![1, h, 1, lk]] {
                let bias = randn(&shape, 1.0);
                let err = check(b, h, lq, lk, dh, Some(&bias));
                println!("bias {shape:?} {b}x{h}x{lq}x{lk}x{dh}: max abs / std = {err:.2e}");
            }
        }
    }

    #[test]
    fn fused_handles_strided_inputs() {
        // [B, L, H, Dh] projections viewed as [B, H, L, Dh], as the models produce them.
        let (b, h, lq, lk, dh) = (2, 4, 45, 38, 40);
        let q = randn(&[b, lq, h, dh], 1.0).transpose(1, 2).unwrap();
        let k = randn(&[b, lk, h, dh], 1.0).transpose(1, 2).unwrap();
        let v = randn(&[b, lk, h, dh], 1.0).transpose(1, 2).unwrap();
        let mask = padding_mask(b, lk, -10000.0);
        let want = naive_attention(&q, &k, &v, Some(&mask), 0.3).unwrap();
        let got = fused_cpu_attention(&q, &k, &v, Some(&mask), 0.3).unwrap();
        let err = rel_err(&got, &want);
        println!("strided: max abs / std = {err:.2e}");
        assert!(err <= 1e-5, "{err}");
    }

    #[test]
    fn fused_handles_different_value_dim() {
        let (b, h, lq, lk) = (1, 2, 20, 30);
        let q = randn(&[b, h, lq, 16], 1.0);
        let k = randn(&[b, h, lk, 16], 1.0);
        let v = randn(&[b, h, lk, 24], 1.0);
        let want = naive_attention(&q, &k, &v, None, 0.25).unwrap();
        let got = fused_cpu_attention(&q, &k, &v, None, 0.25).unwrap();
        assert_eq!(got.dims(), &[b, h, lq, 24]);
        assert!(rel_err(&got, &want) <= 1e-5);
    }

    #[test]
    fn fused_half_inputs_match_f32_reference() {
        let (b, h, lq, lk, dh) = (2, 3, 70, 45, 64);
        let mask = padding_mask(b, lk, -10000.0);
        for dtype in [DType::F16, DType::BF16] {
            let q = randn(&[b, h, lq, dh], 1.0).to_dtype(dtype).unwrap();
            let k = randn(&[b, h, lk, dh], 1.0).to_dtype(dtype).unwrap();
            let v = randn(&[b, h, lk, dh], 1.0).to_dtype(dtype).unwrap();
            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let want = naive_attention(&f(&q), &f(&k), &f(&v), Some(&mask), 0.125).unwrap();
            let got = scaled_dot_product_attention(&q, &k, &v, Some(&mask), 0.125).unwrap();
            assert_eq!(got.dtype(), dtype);
            // Only the final rounding separates them: half an ulp of the largest output.
            let half_ulp = if dtype == DType::F16 {
                2f32.powi(-11)
            } else {
                2f32.powi(-8)
            };
            let got = got.to_dtype(DType::F32).unwrap();
            let max_abs_err = (&got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let max_out = want
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            println!(
                "{dtype:?}: max abs / std = {:.2e}, max abs / max|out| = {:.2e}",
                rel_err(&got, &want),
                max_abs_err / max_out
            );
            assert!(max_abs_err <= 1.01 * half_ulp * max_out, "{dtype:?}");
        }
    }

    #[test]
    fn fully_masked_rows_are_zero() {
        let q = randn(&[1, 1, 3, 8], 1.0);
        let k = randn(&[1, 1, 5, 8], 1.0);
        let v = randn(&[1, 1, 5, 8], 1.0);
        let mask = Tensor::full(f32::NEG_INFINITY, (1, 1, 1, 5), &Device::Cpu).unwrap();
        let out = fused_cpu_attention(&q, &k, &v, Some(&mask), 1.0).unwrap();
        let v: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn simd_exp_is_accurate() {
        // A row whose max is 0 comes back as e^x.
        let n = 200_003;
        let xs: Vec<f32> = (0..n).map(|i| -87.0 * i as f32 / (n - 1) as f32).collect();
        #[allow(unused_mut)] // Only x86-64 adds SIMD levels.
        let mut isas = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                isas.push(Isa::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                isas.push(Isa::Avx512);
            }
        }
        for isa in isas {
            let mut row = xs.clone();
            isa.softmax_row(&mut row, None);
            let worst = row
                .iter()
                .zip(&xs)
                .map(|(&y, &x)| {
                    let want = (x as f64).exp();
                    ((y as f64 - want) / want).abs()
                })
                .fold(0f64, f64::max);
            println!("{isa:?}: max relative error of e^x on [-87, 0] = {worst:.2e}");
            assert!(worst <= 2.5e-7, "{isa:?}: {worst:.2e}");
            // Below e^-87 and at -inf: exactly 0.
            let mut row = vec![0.0, -87.5, -100.0, -1e30, f32::NEG_INFINITY];
            isa.softmax_row(&mut row, None);
            assert_eq!(row, vec![1.0, 0.0, 0.0, 0.0, 0.0], "{isa:?}");
        }
    }

    #[test]
    fn softmax_rows_agree_across_isas() {
        let lk = 1000 + 13;
        let data: Vec<f32> = (0..lk)
            .map(|i| ((i * 7919) % 1013) as f32 * 0.05 - 25.0)
            .collect();
        let bias: Vec<f32> = (0..lk)
            .map(|i| if i % 5 == 0 { -10000.0 } else { (i % 3) as f32 })
            .collect();
        let mut want = data.clone();
        let want_sum = softmax_row_scalar(&mut want, Some(&bias));
        for isa in [Isa::detect(), Isa::Scalar] {
            let mut got = data.clone();
            let sum = isa.softmax_row(&mut got, Some(&bias));
            assert!((sum - want_sum).abs() <= 1e-5 * want_sum, "{isa:?}");
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 2e-7 * w.abs().max(1e-30),
                    "{isa:?}: {g} vs {w}"
                );
            }
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            let mut got = data.clone();
            let sum = Isa::Avx2.softmax_row(&mut got, Some(&bias));
            assert!((sum - want_sum).abs() <= 1e-5 * want_sum);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 2e-7 * w.abs().max(1e-30),
                    "avx2: {g} vs {w}"
                );
            }
        }
    }
}
