//! diffusers `Transformer2DModel` on continuous input, as the UNet's cross-attention blocks use
//! it, and its `BasicTransformerBlock`s (`norm_type = "layer_norm"`).
//!
//! Reference: diffusers `models/transformers/transformer_2d.py`
//! (`_init_continuous_input`, `_operate_on_continuous_inputs`,
//! `_get_output_for_continuous_inputs`), `models/attention.py: BasicTransformerBlock,
//! FeedForward`, `models/activations.py: GEGLU`, `models/attention_processor.py:
//! AttnProcessor2_0`.
//!
//! `Transformer2DModel`: `h = GroupNorm(x)` (eps 1e-6), `[B, C, H, W] → [B, HW, C]`, `proj_in`
//! (linear, or a 1×1 convolution before the reshape when `use_linear_projection` is off), the
//! blocks, `proj_out`, back to `[B, C, H, W]`, plus `x`.
//!
//! `BasicTransformerBlock`: `x += attn1(LN1(x))`; `x += attn2(LN2(x), text)`;
//! `x += ff(LN3(x))` with `ff = net.2(GEGLU(net.0.proj(·)))`, `GEGLU(h‖g) = h · gelu_erf(g)`.
//! Attention projections have no bias except `to_out.0`; the scale is `1/√head_dim`.
//!
//! Tensor parallelism: `to_q/to_k/to_v` and both halves of `ff.net.0.proj` column-parallel,
//! `to_out.0` and `ff.net.2` row-parallel with one all-reduce each; norms and
//! `proj_in`/`proj_out` replicated.

use std::sync::Arc;

use candle_core::{Module, Tensor, D};
use candle_nn::{Conv2d, GroupNorm};

use super::resnet::{conv_bytes, conv_same, group_norm_bytes};
use super::{bytes_of, WeightSource};
use crate::denoiser::fused::{layer_norm_modulate, FusedLinear};
use crate::nn::attention::scaled_dot_product_attention;
use crate::parallel::{Collective, WeightFootprint};
use crate::Result;

/// Epsilon of the `Transformer2DModel` input group norm (fixed in diffusers).
const TRANSFORMER_GROUP_NORM_EPS: f64 = 1e-6;

/// Epsilon of the blocks' layer norms (`norm_eps`, never set by the UNet).
const BLOCK_LAYER_NORM_EPS: f32 = 1e-5;

/// Shape of one `Transformer2DModel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transformer2DShape {
    /// Channels in and out (`in_channels`), equal to `heads × head_dim` in the UNet.
    pub channels: usize,
    /// Attention heads (all ranks together).
    pub heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Width of the text states the cross-attention reads.
    pub cross_attention_dim: usize,
    /// `BasicTransformerBlock`s.
    pub layers: usize,
    /// Groups of the input group norm.
    pub groups: usize,
    /// Linear `proj_in`/`proj_out` (otherwise 1×1 convolutions).
    pub linear_projection: bool,
}

impl Transformer2DShape {
    /// `heads × head_dim`.
    pub fn inner_dim(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// A layer norm's scale and shift (`[dim]`).
#[derive(Debug, Clone)]
struct LayerNormAffine {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNormAffine {
    fn load(src: &WeightSource, dim: usize) -> Result<Self> {
        Ok(Self {
            weight: src.get(dim, "weight")?,
            bias: src.get(dim, "bias")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm_modulate(x, &self.weight, &self.bias, BLOCK_LAYER_NORM_EPS)
    }

    fn bytes(&self) -> usize {
        bytes_of(&self.weight) + bytes_of(&self.bias)
    }
}

/// One `BasicTransformerBlock`; with tensor parallelism, this rank's heads and GEGLU columns.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNormAffine,
    /// `attn1.to_q/to_k/to_v` stacked (this rank's heads of each).
    attn1_qkv: FusedLinear,
    attn1_out: FusedLinear,
    norm2: LayerNormAffine,
    attn2_q: FusedLinear,
    /// `attn2.to_k/to_v` stacked.
    attn2_kv: FusedLinear,
    attn2_out: FusedLinear,
    norm3: LayerNormAffine,
    /// `ff.net.0.proj`: this rank's hidden columns, then the matching gate columns.
    ff_in: FusedLinear,
    ff_out: FusedLinear,
    /// Heads on this rank.
    heads: usize,
    head_dim: usize,
    tp: Option<Arc<dyn Collective>>,
}

impl BasicTransformerBlock {
    /// Loads the block of `shape` from `src` (its root); with a sharded source this rank's
    /// `heads / N` heads and `4·dim / N` GEGLU columns.
    pub(crate) fn new(
        shape: &Transformer2DShape,
        src: &WeightSource,
        tp: Option<Arc<dyn Collective>>,
    ) -> Result<Self> {
        let dim = shape.inner_dim();
        let cross = shape.cross_attention_dim;
        let world = src.world();
        let a1 = src.pp("attn1");
        let attn1_qkv = FusedLinear::concat(&[
            a1.pp("to_q").column(dim, dim, false)?,
            a1.pp("to_k").column(dim, dim, false)?,
            a1.pp("to_v").column(dim, dim, false)?,
        ])?;
        let attn1_out = a1.pp("to_out").pp("0").row(dim, dim, true)?;
        let a2 = src.pp("attn2");
        let attn2_q = a2.pp("to_q").column(dim, dim, false)?;
        let attn2_kv = FusedLinear::concat(&[
            a2.pp("to_k").column(cross, dim, false)?,
            a2.pp("to_v").column(cross, dim, false)?,
        ])?;
        let attn2_out = a2.pp("to_out").pp("0").row(dim, dim, true)?;
        let ff_inner = 4 * dim;
        let ff = src.pp("ff").pp("net");
        let ff_in = ff
            .pp("0")
            .pp("proj")
            .column_chunks(dim, 2 * ff_inner, true, 2)?;
        let ff_out = ff.pp("2").row(ff_inner, dim, true)?;
        Ok(Self {
            norm1: LayerNormAffine::load(&src.pp("norm1"), dim)?,
            attn1_qkv,
            attn1_out,
            norm2: LayerNormAffine::load(&src.pp("norm2"), dim)?,
            attn2_q,
            attn2_kv,
            attn2_out,
            norm3: LayerNormAffine::load(&src.pp("norm3"), dim)?,
            ff_in,
            ff_out,
            heads: shape.heads / world,
            head_dim: shape.head_dim,
            tp,
        })
    }

    /// Sums a row-parallel projection's partial outputs over the ranks, then adds `residual`.
    fn row_out(&self, layer: &FusedLinear, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match &self.tp {
            None => layer.forward_residual(x, residual),
            Some(c) => Ok((c.all_reduce_sum(&layer.forward(x)?)? + residual)?),
        }
    }

    /// `[B, L, heads·dh]` → `[B, heads, L, dh]`.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        Ok(x.reshape((b, l, self.heads, self.head_dim))?
            .transpose(1, 2)?)
    }

    /// Applies the block to `x` `[B, N, dim]` with text `[B, L, cross_attention_dim]`.
    pub fn forward(&self, x: &Tensor, text: &Tensor) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let local = self.heads * self.head_dim;
        let scale = 1.0 / (self.head_dim as f64).sqrt();

        // 1. Self-attention.
        let h = self.norm1.forward(x)?;
        let qkv = self.attn1_qkv.forward(&h)?;
        let q = self.split_heads(&qkv.narrow(2, 0, local)?)?;
        let k = self.split_heads(&qkv.narrow(2, local, local)?)?;
        let v = self.split_heads(&qkv.narrow(2, 2 * local, local)?)?;
        let o = scaled_dot_product_attention(&q, &k, &v, None, scale)?;
        let o = o.transpose(1, 2)?.reshape((b, n, local))?;
        let x = self.row_out(&self.attn1_out, &o, x)?;

        // 2. Cross-attention over the text.
        let h = self.norm2.forward(&x)?;
        let q = self.split_heads(&self.attn2_q.forward(&h)?)?;
        let kv = self.attn2_kv.forward(text)?;
        let k = self.split_heads(&kv.narrow(2, 0, local)?)?;
        let v = self.split_heads(&kv.narrow(2, local, local)?)?;
        let o = scaled_dot_product_attention(&q, &k, &v, None, scale)?;
        let o = o.transpose(1, 2)?.reshape((b, n, local))?;
        let x = self.row_out(&self.attn2_out, &o, &x)?;

        // 3. GEGLU feed-forward.
        let h = self.norm3.forward(&x)?;
        let hg = self.ff_in.forward(&h)?;
        let half = hg.dim(D::Minus1)? / 2;
        let gated =
            (hg.narrow(D::Minus1, 0, half)? * hg.narrow(D::Minus1, half, half)?.gelu_erf()?)?;
        self.row_out(&self.ff_out, &gated, &x)
    }

    /// Adds this rank's weight bytes to `f` (split slices in `sharded`; norms and the
    /// row-parallel biases, held whole by rank 0, in `replicated`).
    pub fn footprint(&self, f: &mut WeightFootprint) {
        for l in [&self.attn1_qkv, &self.attn2_q, &self.attn2_kv, &self.ff_in] {
            let (w, b) = l.byte_sizes();
            f.sharded += w + b;
        }
        for l in [&self.attn1_out, &self.attn2_out, &self.ff_out] {
            let (w, b) = l.byte_sizes();
            f.sharded += w;
            f.replicated += b;
        }
        f.replicated += self.norm1.bytes() + self.norm2.bytes() + self.norm3.bytes();
    }
}

/// `proj_in` / `proj_out`: linear over tokens, or a 1×1 convolution over the image.
#[derive(Debug, Clone)]
enum Projection {
    Linear(FusedLinear),
    Conv(Conv2d),
}

impl Projection {
    fn bytes(&self) -> usize {
        match self {
            Projection::Linear(l) => {
                let (w, b) = l.byte_sizes();
                w + b
            }
            Projection::Conv(c) => conv_bytes(c),
        }
    }
}

/// diffusers `Transformer2DModel` on continuous input (`[B, C, H, W]` in and out).
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
    shape: Transformer2DShape,
    /// Bytes per weight element.
    dtype_size: usize,
}

impl Transformer2DModel {
    /// Loads the model of `shape` from `src` (keys `norm`, `proj_in`,
    /// `transformer_blocks.{i}`, `proj_out`).
    pub(crate) fn new(
        shape: &Transformer2DShape,
        src: &WeightSource,
        tp: Option<Arc<dyn Collective>>,
    ) -> Result<Self> {
        let c = shape.channels;
        let inner = shape.inner_dim();
        let norm = candle_nn::group_norm(
            shape.groups,
            c,
            TRANSFORMER_GROUP_NORM_EPS,
            src.pp("norm").vb(),
        )?;
        let (proj_in, proj_out) = if shape.linear_projection {
            (
                Projection::Linear(src.pp("proj_in").linear(c, inner, true)?),
                Projection::Linear(src.pp("proj_out").linear(inner, c, true)?),
            )
        } else {
            (
                Projection::Conv(conv_same(c, inner, 1, src.pp("proj_in").vb())?),
                Projection::Conv(conv_same(inner, c, 1, src.pp("proj_out").vb())?),
            )
        };
        let tb = src.pp("transformer_blocks");
        let blocks = (0..shape.layers)
            .map(|i| BasicTransformerBlock::new(shape, &tb.pp(i), tp.clone()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm,
            proj_in,
            blocks,
            proj_out,
            shape: *shape,
            dtype_size: src.dtype().size_in_bytes(),
        })
    }

    /// The model's shape.
    pub fn shape(&self) -> &Transformer2DShape {
        &self.shape
    }

    /// Applies the model to `x` `[B, C, H, W]` with text `[B, L, cross_attention_dim]`.
    pub fn forward(&self, x: &Tensor, text: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let inner = self.shape.inner_dim();
        let normed = self.norm.forward(x)?;
        let mut tokens = match &self.proj_in {
            Projection::Linear(l) => {
                let t = normed
                    .reshape((b, c, h * w))?
                    .transpose(1, 2)?
                    .contiguous()?;
                l.forward(&t)?
            }
            Projection::Conv(conv) => conv
                .forward(&normed)?
                .reshape((b, inner, h * w))?
                .transpose(1, 2)?
                .contiguous()?,
        };
        drop(normed);
        for block in &self.blocks {
            tokens = block.forward(&tokens, text)?;
        }
        let out = match &self.proj_out {
            Projection::Linear(l) => l.forward(&tokens)?.transpose(1, 2)?.reshape((b, c, h, w))?,
            Projection::Conv(conv) => {
                let img = tokens.transpose(1, 2)?.reshape((b, inner, h, w))?;
                conv.forward(&img)?
            }
        };
        Ok((out + x)?)
    }

    /// Adds this rank's weight bytes to `f`.
    pub fn footprint(&self, f: &mut WeightFootprint) {
        f.replicated += group_norm_bytes(self.shape.channels, self.dtype_size);
        f.replicated += self.proj_in.bytes() + self.proj_out.bytes();
        for b in &self.blocks {
            b.footprint(f);
        }
    }
}
