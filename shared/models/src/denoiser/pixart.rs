//! PixArt-Σ / PixArt-α denoiser: diffusers `PixArtTransformer2DModel` (models-spec §1.2).
//!
//! Reference: diffusers 0.42.1 `models/transformers/pixart_transformer_2d.py`,
//! `models/attention.py: BasicTransformerBlock` (`norm_type="ada_norm_single"`),
//! `models/embeddings.py: PatchEmbed, PixArtAlphaTextProjection,
//! PixArtAlphaCombinedTimestepSizeEmbeddings`, `models/normalization.py: AdaLayerNormSingle`.
//!
//! One forward pass:
//! 1. patchify (`pos_embed.proj`, a `p×p` stride-`p` convolution, run as one matrix product)
//!    and add the 2-D sin-cos table of the actual token grid (cached per grid size);
//! 2. `e = timestep_embedder(sincos256(t))`, `T6 = adaln_single.linear(SiLU(e))`;
//! 3. caption MLP `linear_1 → GELU(tanh) → linear_2`;
//! 4. per block: `(sh1, sc1, g1, sh2, sc2, g2) = scale_shift_table + T6`;
//!    `x += g1·attn1(LN(x)(1+sc1)+sh1)`; `x += attn2(x, text)` (no norm, no gate, padding
//!    mask as a −10000 bias); `x += g2·ff(LN(x)(1+sc2)+sh2)`;
//! 5. `(shift, scale) = scale_shift_table + e`, `proj_out(LN(x)(1+scale)+shift)`, unpatchify
//!    with per-patch layout `(p, q, c)`.
//!
//! Optional KV token compression of self-attention (original PixArt-Σ code only) is set with
//! [`PixArtOptions::kv_compress`]; see [`crate::denoiser::kv_compress`].
//!
//! Tensor parallelism ([`PixArtTransformer::new_sharded`], see [`crate::parallel`]): each of
//! `N` ranks holds `heads / N` attention heads of both attentions (`to_q/to_k/to_v`
//! column-parallel, `to_out.0` row-parallel) and `4D / N` feed-forward hidden columns
//! (`ff.net.0.proj` column-parallel, `ff.net.2` row-parallel); one all-reduce follows each
//! row-parallel projection (three per block), whose bias rank 0 adds. Patch and timestep
//! embeddings, adaLN, the caption projection, the modulation tables and `proj_out` are
//! replicated, so every rank holds the full activations and produces the full output.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, IndexOp, Shape, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::fused::{gated_add, layer_norm_modulate, FusedLinear};
use super::kv_compress::{KvCompress, KvCompressConfig};
use crate::checkpoint::ComponentFolder;
use crate::nn::attention::scaled_dot_product_attention;
use crate::nn::embeddings::{get_2d_sincos_pos_embed, TimestepEmbedding, Timesteps};
use crate::parallel::{Collective, ShardSpec, ShardedWeights, WeightFootprint};
use crate::{ModelError, Result, RunDtype};

/// Component name used in error messages.
const COMPONENT: &str = "PixArtTransformer2DModel";

/// Classes accepted in `model_index.json` for this component.
pub const ACCEPTED_CLASSES: &[&str] = &["PixArtTransformer2DModel", "Transformer2DModel"];

/// Width of the sinusoidal timestep code (`Timesteps(num_channels=256)`).
const TIME_PROJ_DIM: usize = 256;

/// `transformer/config.json` of a PixArt checkpoint. Absent fields take diffusers' defaults
/// (`PixArtTransformer2DModel.__init__`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PixArtConfig {
    /// Attention heads (16).
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    /// Channels per head (72); the model width is `heads × head_dim`.
    #[serde(default = "defaults::attention_head_dim")]
    pub attention_head_dim: usize,
    /// Latent channels in (4).
    #[serde(default = "defaults::in_channels")]
    pub in_channels: usize,
    /// Channels out (8: ε and the learned variance). diffusers' default when the key is absent
    /// is 8; an explicit `null` means `in_channels`.
    #[serde(default = "defaults::out_channels")]
    pub out_channels: Option<usize>,
    /// Transformer blocks (28).
    #[serde(default = "defaults::num_layers")]
    pub num_layers: usize,
    /// Patch side in latent pixels (2).
    #[serde(default = "defaults::patch_size")]
    pub patch_size: usize,
    /// Training latent side (128 for 1024-px models); sets the position table's base size.
    #[serde(default = "defaults::sample_size")]
    pub sample_size: usize,
    /// Position interpolation scale; diffusers uses `max(sample_size // 64, 1)` when absent.
    #[serde(default)]
    pub interpolation_scale: Option<f64>,
    /// Width of the cross-attention keys/values input (1152, the projected caption).
    #[serde(default = "defaults::cross_attention_dim")]
    pub cross_attention_dim: Option<usize>,
    /// Caption (T5) width (4096); `None` means no caption projection.
    #[serde(default)]
    pub caption_channels: Option<usize>,
    /// Whether `to_q`/`to_k`/`to_v` have biases (true).
    #[serde(default = "defaults::yes")]
    pub attention_bias: bool,
    /// Only `ada_norm_single` is supported.
    #[serde(default = "defaults::norm_type")]
    pub norm_type: String,
    /// Whether the block LayerNorms have weights and biases (false for PixArt).
    #[serde(default)]
    pub norm_elementwise_affine: bool,
    /// Block LayerNorm epsilon (1e-6).
    #[serde(default = "defaults::norm_eps")]
    pub norm_eps: f64,
    /// Feed-forward activation: `gelu-approximate` (PixArt) or `gelu`.
    #[serde(default = "defaults::activation_fn")]
    pub activation_fn: String,
    /// Required by `ada_norm_single` (1000); its value is not otherwise used.
    #[serde(default = "defaults::num_embeds_ada_norm")]
    pub num_embeds_ada_norm: Option<usize>,
    /// PixArt-α micro-conditioning (resolution / aspect-ratio embeddings). Absent means false
    /// here: PixArt-Σ has none, although diffusers would turn it on for `sample_size` 128.
    /// `true` is rejected (not implemented).
    #[serde(default)]
    pub use_additional_conditions: Option<bool>,
    /// Only `default` is supported.
    #[serde(default = "defaults::attention_type")]
    pub attention_type: Option<String>,
    /// Accepted and ignored (the attention kernel accumulates in f32 where it matters).
    #[serde(default)]
    pub upcast_attention: bool,
}

mod defaults {
    pub fn num_attention_heads() -> usize {
        16
    }
    pub fn attention_head_dim() -> usize {
        72
    }
    pub fn in_channels() -> usize {
        4
    }
    pub fn out_channels() -> Option<usize> {
        Some(8)
    }
    pub fn num_layers() -> usize {
        28
    }
    pub fn patch_size() -> usize {
        2
    }
    pub fn sample_size() -> usize {
        128
    }
    pub fn cross_attention_dim() -> Option<usize> {
        Some(1152)
    }
    pub fn yes() -> bool {
        true
    }
    pub fn norm_type() -> String {
        "ada_norm_single".into()
    }
    pub fn norm_eps() -> f64 {
        1e-6
    }
    pub fn activation_fn() -> String {
        "gelu-approximate".into()
    }
    pub fn num_embeds_ada_norm() -> Option<usize> {
        Some(1000)
    }
    pub fn attention_type() -> Option<String> {
        Some("default".into())
    }
}

impl PixArtConfig {
    /// `PixArt-alpha/PixArt-Sigma-XL-2-1024-MS` (`transformer/config.json`).
    pub fn sigma_xl_2_1024_ms() -> Self {
        Self {
            num_attention_heads: 16,
            attention_head_dim: 72,
            in_channels: 4,
            out_channels: Some(8),
            num_layers: 28,
            patch_size: 2,
            sample_size: 128,
            interpolation_scale: Some(2.0),
            cross_attention_dim: Some(1152),
            caption_channels: Some(4096),
            attention_bias: true,
            norm_type: "ada_norm_single".into(),
            norm_elementwise_affine: false,
            norm_eps: 1e-6,
            activation_fn: "gelu-approximate".into(),
            num_embeds_ada_norm: Some(1000),
            use_additional_conditions: Some(false),
            attention_type: Some("default".into()),
            upcast_attention: false,
        }
    }

    /// `PixArt-alpha/PixArt-Sigma-XL-2-2K-MS`: as 1024-MS with `sample_size` 256 and
    /// `interpolation_scale` 4.
    pub fn sigma_xl_2_2k_ms() -> Self {
        Self {
            sample_size: 256,
            interpolation_scale: Some(4.0),
            ..Self::sigma_xl_2_1024_ms()
        }
    }

    /// Model width `heads × head_dim`.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Output channels after resolving `null` to `in_channels`.
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Position interpolation scale after diffusers' default.
    pub fn interpolation_scale(&self) -> f64 {
        self.interpolation_scale
            .unwrap_or_else(|| (self.sample_size / 64).max(1) as f64)
    }

    /// Side of the default token grid (`sample_size / patch_size`), the position table's
    /// `base_size`.
    pub fn base_size(&self) -> usize {
        self.sample_size / self.patch_size.max(1)
    }

    fn unsupported(field: &str, value: impl std::fmt::Display, hint: &str) -> ModelError {
        ModelError::UnsupportedConfig {
            component: COMPONENT.into(),
            field: field.into(),
            value: value.to_string(),
            hint: hint.into(),
        }
    }

    /// Rejects settings this implementation does not support, naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.norm_type != "ada_norm_single" {
            return Err(Self::unsupported(
                "norm_type",
                &self.norm_type,
                "only `ada_norm_single` (PixArt) is implemented",
            ));
        }
        if self.num_embeds_ada_norm.is_none() {
            return Err(Self::unsupported(
                "num_embeds_ada_norm",
                "null",
                "`ada_norm_single` requires it (PixArt checkpoints set 1000)",
            ));
        }
        if self.use_additional_conditions == Some(true) {
            return Err(Self::unsupported(
                "use_additional_conditions",
                true,
                "PixArt-α micro-conditioning (resolution/aspect-ratio embeddings) is not implemented; \
                 PixArt-Σ checkpoints need `false`",
            ));
        }
        if !matches!(self.activation_fn.as_str(), "gelu-approximate" | "gelu") {
            return Err(Self::unsupported(
                "activation_fn",
                &self.activation_fn,
                "use `gelu-approximate` (PixArt) or `gelu`",
            ));
        }
        if let Some(t) = &self.attention_type {
            if t != "default" {
                return Err(Self::unsupported(
                    "attention_type",
                    t,
                    "only `default` attention is implemented",
                ));
            }
        }
        let inner = self.inner_dim();
        match self.cross_attention_dim {
            None => {
                return Err(Self::unsupported(
                    "cross_attention_dim",
                    "null",
                    "PixArt needs text cross-attention (1152 for the released models)",
                ))
            }
            Some(c) if self.caption_channels.is_some() && c != inner => {
                return Err(Self::unsupported(
                    "cross_attention_dim",
                    c,
                    &format!("with a caption projection it must equal heads × head_dim = {inner}"),
                ))
            }
            _ => {}
        }
        if self.patch_size == 0 || self.sample_size < self.patch_size {
            return Err(Self::unsupported(
                "patch_size",
                self.patch_size,
                "must be at least 1 and at most sample_size",
            ));
        }
        if inner == 0 || !inner.is_multiple_of(4) {
            return Err(Self::unsupported(
                "attention_head_dim",
                self.attention_head_dim,
                "heads × head_dim must be a positive multiple of 4 (2-D sin-cos positions)",
            ));
        }
        let interp = self.interpolation_scale();
        if !(interp.is_finite() && interp > 0.0) {
            return Err(Self::unsupported(
                "interpolation_scale",
                interp,
                "must be a positive number",
            ));
        }
        Ok(())
    }
}

/// Construction options that are not part of the checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PixArtOptions {
    /// Compress self-attention keys/values in some blocks (models-spec §1.3).
    pub kv_compress: Option<KvCompressConfig>,
}

/// The feed-forward activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    GeluTanh,
    GeluErf,
}

/// Block LayerNorm weights (only with `norm_elementwise_affine`).
#[derive(Debug, Clone)]
struct NormAffine {
    weight: Tensor,
    bias: Tensor,
}

/// Where the weights come from: the whole checkpoint, or one rank's slices of it.
#[derive(Clone)]
enum Source<'a> {
    Whole(VarBuilder<'a>),
    Shard(ShardedWeights),
}

impl<'a> Source<'a> {
    fn pp(&self, name: impl ToString) -> Self {
        match self {
            Source::Whole(vb) => Source::Whole(vb.pp(name)),
            Source::Shard(sw) => Source::Shard(sw.pp(name)),
        }
    }

    /// Whole tensors under this prefix, for replicated layers.
    fn vb(&self) -> VarBuilder<'a> {
        match self {
            Source::Whole(vb) => vb.clone(),
            Source::Shard(sw) => sw.var_builder(),
        }
    }

    fn dtype(&self) -> DType {
        match self {
            Source::Whole(vb) => vb.dtype(),
            Source::Shard(sw) => sw.dtype(),
        }
    }

    fn device(&self) -> &Device {
        match self {
            Source::Whole(vb) => vb.device(),
            Source::Shard(sw) => sw.device(),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match self {
            Source::Whole(vb) => vb.contains_tensor(name),
            Source::Shard(sw) => sw.contains_tensor(name),
        }
    }

    /// A replicated tensor.
    fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        match self {
            Source::Whole(vb) => Ok(vb.get(shape, name)?),
            Source::Shard(sw) => sw.get(shape, name),
        }
    }

    /// A replicated linear layer.
    fn linear(&self, in_dim: usize, out_dim: usize, bias: bool) -> Result<FusedLinear> {
        FusedLinear::load(in_dim, out_dim, bias, self.vb())
    }

    /// A column-parallel linear layer: this rank's output rows (and bias entries).
    fn column(&self, in_dim: usize, out_dim: usize, bias: bool) -> Result<FusedLinear> {
        match self {
            Source::Whole(vb) => FusedLinear::load(in_dim, out_dim, bias, vb.clone()),
            Source::Shard(sw) => {
                let b = if bias {
                    Some(sw.column_bias(out_dim, "bias")?)
                } else {
                    None
                };
                FusedLinear::new(sw.column_weight(out_dim, in_dim, "weight")?, b)
            }
        }
    }

    /// A row-parallel linear layer: this rank's input columns; the bias on rank 0 only.
    fn row(&self, in_dim: usize, out_dim: usize, bias: bool) -> Result<FusedLinear> {
        match self {
            Source::Whole(vb) => FusedLinear::load(in_dim, out_dim, bias, vb.clone()),
            Source::Shard(sw) => {
                let b = if bias {
                    sw.row_bias(out_dim, "bias")?
                } else {
                    None
                };
                FusedLinear::new(sw.row_weight(out_dim, in_dim, "weight")?, b)
            }
        }
    }
}

/// One `BasicTransformerBlock` with `ada_norm_single`.
#[derive(Debug, Clone)]
struct Block {
    scale_shift_table: Tensor,
    norm1: Option<NormAffine>,
    norm2: Option<NormAffine>,
    /// `attn1.to_q/to_k/to_v` stacked into one projection.
    qkv: FusedLinear,
    attn1_out: FusedLinear,
    kv_compress: Option<KvCompress>,
    attn2_q: FusedLinear,
    /// `attn2.to_k/to_v` stacked.
    attn2_kv: FusedLinear,
    attn2_out: FusedLinear,
    ff_in: FusedLinear,
    ff_out: FusedLinear,
}

/// Caption conditioning prepared once per prompt batch by
/// [`PixArtTransformer::encode_text`]: the cross-attention bias from the padding mask and every
/// block's cross-attention keys/values (`attn2.to_k/to_v` of the projected caption), which do
/// not change between denoising steps.
///
/// Memory: `num_layers × B × L × 2D` values in the run dtype (PixArt-Σ XL, B = 2, L = 300:
/// about 155 MB in f32, 77 MB in bf16).
#[derive(Debug, Clone)]
pub struct PixArtTextConditioning {
    /// Per block `[B, L, 2D]`: keys in the first `D` channels, values in the last `D`.
    kv: Vec<Tensor>,
    /// `[B, 1, 1, L]` additive bias (`(1 - mask)·-10000`), when a mask was given.
    bias: Option<Tensor>,
    batch: usize,
}

impl PixArtTextConditioning {
    /// Batch size the conditioning was prepared for.
    pub fn batch_size(&self) -> usize {
        self.batch
    }
}

/// Where a block finds its cross-attention keys/values.
enum TextKv<'a> {
    /// Prepared by [`PixArtTransformer::encode_text`], one entry per block.
    Prepared(&'a [Tensor]),
    /// The projected caption `[B, L, D]`; each block projects it when it runs (keeps one
    /// block's K/V alive at a time).
    Projected(&'a Tensor),
}

/// Per-forward state shared by all blocks.
struct StepContext<'a> {
    /// `[B, 6, D]`: `adaln_single.linear(SiLU(e))`.
    t6: &'a Tensor,
    text: TextKv<'a>,
    /// Cross-attention bias `[B, 1, 1, L]`.
    text_bias: Option<&'a Tensor>,
    grid: (usize, usize),
}

impl Block {
    /// Loads block weights; with a sharded source, this rank's heads and hidden columns
    /// (`local_dim = D / ranks` attention channels).
    fn new(
        cfg: &PixArtConfig,
        src: &Source,
        kv_compress: Option<&KvCompressConfig>,
        local_dim: usize,
    ) -> Result<Self> {
        let d = cfg.inner_dim();
        let cross = cfg.cross_attention_dim.unwrap_or(d);
        let bias = cfg.attention_bias;
        let a1 = src.pp("attn1");
        let qkv = FusedLinear::concat(&[
            a1.pp("to_q").column(d, d, bias)?,
            a1.pp("to_k").column(d, d, bias)?,
            a1.pp("to_v").column(d, d, bias)?,
        ])?;
        let attn1_out = a1.pp("to_out").pp("0").row(d, d, true)?;
        let kv_compress = match kv_compress {
            Some(kc) => Some(KvCompress::new(kc, local_dim, a1.vb())?),
            None => None,
        };
        let a2 = src.pp("attn2");
        let attn2_q = a2.pp("to_q").column(d, d, bias)?;
        let attn2_kv = FusedLinear::concat(&[
            a2.pp("to_k").column(cross, d, bias)?,
            a2.pp("to_v").column(cross, d, bias)?,
        ])?;
        let attn2_out = a2.pp("to_out").pp("0").row(d, d, true)?;
        let ff = src.pp("ff").pp("net");
        let ff_in = ff.pp("0").pp("proj").column(d, 4 * d, true)?;
        let ff_out = ff.pp("2").row(4 * d, d, true)?;
        let scale_shift_table = src.get((6, d), "scale_shift_table")?;
        let norm = |name: &str| -> Result<Option<NormAffine>> {
            if !cfg.norm_elementwise_affine {
                return Ok(None);
            }
            Ok(Some(NormAffine {
                weight: src.get(d, &format!("{name}.weight"))?,
                bias: src.get(d, &format!("{name}.bias"))?,
            }))
        };
        Ok(Self {
            scale_shift_table,
            norm1: norm("norm1")?,
            norm2: norm("norm2")?,
            qkv,
            attn1_out,
            kv_compress,
            attn2_q,
            attn2_kv,
            attn2_out,
            ff_in,
            ff_out,
        })
    }

    /// Bytes held, split as in [`WeightFootprint`] (KV-compression weights not counted).
    fn footprint(&self, f: &mut WeightFootprint) {
        for l in [&self.qkv, &self.attn2_q, &self.attn2_kv, &self.ff_in] {
            let (w, b) = l.byte_sizes();
            f.sharded += w + b;
        }
        for l in [&self.attn1_out, &self.attn2_out, &self.ff_out] {
            let (w, b) = l.byte_sizes();
            f.sharded += w;
            f.replicated += b;
        }
        f.replicated += WeightFootprint::bytes_of(&self.scale_shift_table);
        for n in [&self.norm1, &self.norm2].into_iter().flatten() {
            f.replicated +=
                WeightFootprint::bytes_of(&n.weight) + WeightFootprint::bytes_of(&n.bias);
        }
    }

    /// `(alpha, beta)` so that `LN_affine(x)(1+scale)+shift = norm(x)·alpha + beta`.
    fn modulation(
        norm: Option<&NormAffine>,
        shift: &Tensor,
        scale: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let one_plus = (scale + 1.0)?;
        Ok(match norm {
            None => (one_plus, shift.clone()),
            Some(n) => (
                one_plus.broadcast_mul(&n.weight)?,
                one_plus.broadcast_mul(&n.bias)?.add(shift)?,
            ),
        })
    }

    fn forward(
        &self,
        index: usize,
        x: &Tensor,
        ctx: &StepContext,
        model: &PixArtTransformer,
    ) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        // This rank's heads (all of them without tensor parallelism).
        let heads = model.heads;
        let dh = model.head_dim;
        let d = heads * dh;
        let eps = model.norm_eps;
        // (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), each [B, D].
        let m = self.scale_shift_table.unsqueeze(0)?.broadcast_add(ctx.t6)?;
        let chunk = |i: usize| -> Result<Tensor> { Ok(m.i((.., i))?.contiguous()?) };

        // 1. Self-attention.
        let (alpha, beta) = Self::modulation(self.norm1.as_ref(), &chunk(0)?, &chunk(1)?)?;
        let h = layer_norm_modulate(x, &alpha, &beta, eps)?;
        let qkv = self.qkv.forward(&h)?;
        let qkv5 = qkv.reshape((b, n, 3, heads, dh))?;
        let q = qkv5.i((.., .., 0))?.transpose(1, 2)?;
        let (k, v) = match &self.kv_compress {
            None => (
                qkv5.i((.., .., 1))?.transpose(1, 2)?,
                qkv5.i((.., .., 2))?.transpose(1, 2)?,
            ),
            Some(kvc) => {
                let (gh, gw) = ctx.grid;
                let k = kvc.forward(&qkv.narrow(2, d, d)?, gh, gw)?;
                let v = kvc.forward(&qkv.narrow(2, 2 * d, d)?, gh, gw)?;
                let nk = k.dim(1)?;
                (
                    k.reshape((b, nk, heads, dh))?.transpose(1, 2)?,
                    v.reshape((b, nk, heads, dh))?.transpose(1, 2)?,
                )
            }
        };
        let o = scaled_dot_product_attention(&q, &k, &v, None, model.attn_scale)?;
        let o = o.transpose(1, 2)?.reshape((b, n, d))?;
        let o = model.reduce(self.attn1_out.forward(&o)?)?;
        let x = gated_add(x, &o, &chunk(2)?)?;

        // 2. Cross-attention: no norm, no gate.
        let q = self
            .attn2_q
            .forward(&x)?
            .reshape((b, n, heads, dh))?
            .transpose(1, 2)?;
        let kv = match ctx.text {
            TextKv::Prepared(kv) => kv
                .get(index)
                .ok_or_else(|| ModelError::invalid("text conditioning", "too few blocks"))?
                .clone(),
            TextKv::Projected(text) => self.attn2_kv.forward(text)?,
        };
        let l = kv.dim(1)?;
        let kv = kv.reshape((b, l, 2, heads, dh))?;
        let k = kv.i((.., .., 0))?.transpose(1, 2)?;
        let v = kv.i((.., .., 1))?.transpose(1, 2)?;
        let o = scaled_dot_product_attention(&q, &k, &v, ctx.text_bias, model.attn_scale)?;
        let o = o.transpose(1, 2)?.reshape((b, n, d))?;
        let x = match &model.tp {
            None => self.attn2_out.forward_residual(&o, &x)?,
            Some(c) => (c.all_reduce_sum(&self.attn2_out.forward(&o)?)? + &x)?,
        };

        // 3. Feed-forward (the block's `norm2`).
        let (alpha, beta) = Self::modulation(self.norm2.as_ref(), &chunk(3)?, &chunk(4)?)?;
        let h = layer_norm_modulate(&x, &alpha, &beta, eps)?;
        let h = match model.activation {
            Activation::GeluTanh => self.ff_in.forward_gelu(&h)?,
            Activation::GeluErf => self.ff_in.forward(&h)?.gelu_erf()?,
        };
        let h = model.reduce(self.ff_out.forward(&h)?)?;
        gated_add(&x, &h, &chunk(5)?)
    }
}

/// The PixArt denoiser. `forward` is `&self` and thread-safe; the position-table cache is
/// behind a mutex.
///
/// A tensor-parallel rank ([`PixArtTransformer::new_sharded`]) is different: its forward
/// calls take part in collectives, so each rank must make the same calls in the same order,
/// one at a time.
#[derive(Debug)]
pub struct PixArtTransformer {
    cfg: PixArtConfig,
    dtype: DType,
    device: Device,
    heads: usize,
    head_dim: usize,
    inner_dim: usize,
    out_channels: usize,
    norm_eps: f32,
    attn_scale: f64,
    activation: Activation,
    /// `pos_embed.proj` as a `[D, C·p·p]` linear layer.
    patch_proj: FusedLinear,
    /// `caption_projection.linear_1` / `linear_2`.
    caption: Option<(FusedLinear, FusedLinear)>,
    time_proj: Timesteps,
    time_embed: TimestepEmbedding,
    /// `adaln_single.linear` (D → 6D).
    adaln_linear: FusedLinear,
    blocks: Vec<Block>,
    /// Output `scale_shift_table` `[2, D]`.
    scale_shift_table: Tensor,
    proj_out: FusedLinear,
    /// 2-D position tables (f32, `[1, N, D]`) by token grid `(gh, gw)`.
    pos_cache: Mutex<HashMap<(usize, usize), Tensor>>,
    /// The tensor-parallel group, when the blocks hold one rank's slices.
    tp: Option<Arc<dyn Collective>>,
}

impl PixArtTransformer {
    /// Builds the model from `cfg` and weights under `vb` (the component root).
    pub fn new(cfg: &PixArtConfig, vb: VarBuilder, opts: &PixArtOptions) -> Result<Self> {
        Self::build(cfg, Source::Whole(vb), opts, None)
    }

    /// Builds one rank of a tensor-parallel model: `weights` reads this rank's slices (its
    /// `ShardSpec` must match `collective`'s rank and world size), and every rank must run the
    /// same forward calls, in the same order, on the same inputs. The result of each forward is
    /// the full output on every rank.
    ///
    /// Errors when the heads (or the feed-forward width) do not divide by the number of ranks,
    /// and for `conv` KV compression (its LayerNorm spans all channels).
    pub fn new_sharded(
        cfg: &PixArtConfig,
        weights: ShardedWeights,
        opts: &PixArtOptions,
        collective: Arc<dyn Collective>,
    ) -> Result<Self> {
        let want = ShardSpec::new(collective.rank(), collective.world_size())?;
        if weights.shard() != want {
            return Err(ModelError::invalid(
                "tensor parallel",
                format!(
                    "weights sharded for {:?} but the collective is rank {} of {}",
                    weights.shard(),
                    want.rank,
                    want.world
                ),
            ));
        }
        Self::build(cfg, Source::Shard(weights), opts, Some(collective))
    }

    fn check_tensor_parallel(cfg: &PixArtConfig, opts: &PixArtOptions, world: usize) -> Result<()> {
        if world <= 1 {
            return Ok(());
        }
        let heads = cfg.num_attention_heads;
        if !heads.is_multiple_of(world) {
            let fits: Vec<String> = (1..=heads)
                .filter(|n| heads.is_multiple_of(*n))
                .map(|n| n.to_string())
                .collect();
            return Err(PixArtConfig::unsupported(
                "num_attention_heads",
                heads,
                &format!(
                    "tensor parallelism over {world} ranks splits whole heads, so the heads must divide by {world}; use {} ranks",
                    fits.join(", ")
                ),
            ));
        }
        let hidden = 4 * cfg.inner_dim();
        if !hidden.is_multiple_of(world) {
            return Err(PixArtConfig::unsupported(
                "feed-forward width",
                hidden,
                &format!("must divide by the {world} tensor-parallel ranks"),
            ));
        }
        if let Some(kc) = &opts.kv_compress {
            if kc.sampling == super::kv_compress::KvSampling::Conv {
                return Err(PixArtConfig::unsupported(
                    "kv_compress.sampling",
                    "conv",
                    "its LayerNorm spans all channels, which tensor parallelism splits; use uniform or ave sampling, or one rank",
                ));
            }
        }
        Ok(())
    }

    fn build(
        cfg: &PixArtConfig,
        vb: Source,
        opts: &PixArtOptions,
        tp: Option<Arc<dyn Collective>>,
    ) -> Result<Self> {
        cfg.validate()?;
        let world = tp.as_ref().map_or(1, |c| c.world_size());
        Self::check_tensor_parallel(cfg, opts, world)?;
        if cfg.use_additional_conditions.is_none()
            && vb.contains_tensor("adaln_single.emb.resolution_embedder.linear_1.weight")
        {
            return Err(PixArtConfig::unsupported(
                "use_additional_conditions",
                "absent (but the weights hold resolution embedders)",
                "this looks like a PixArt-α checkpoint with micro-conditioning, which is not implemented",
            ));
        }
        if let Some(kc) = &opts.kv_compress {
            kc.validate(cfg.num_layers)?;
        }
        let d = cfg.inner_dim();
        let p = cfg.patch_size;
        let c_in = cfg.in_channels;
        let out_channels = cfg.out_channels();
        let dtype = vb.dtype();
        let device = vb.device().clone();

        let pe = vb.pp("pos_embed").pp("proj");
        let patch_w = pe
            .get((d, c_in, p, p), "weight")?
            .reshape((d, c_in * p * p))?;
        let patch_b = pe.get(d, "bias")?;
        let patch_proj = FusedLinear::new(patch_w, Some(patch_b))?;

        let caption = match cfg.caption_channels {
            Some(cc) => {
                let cp = vb.pp("caption_projection");
                Some((
                    cp.pp("linear_1").linear(cc, d, true)?,
                    cp.pp("linear_2").linear(d, d, true)?,
                ))
            }
            None => None,
        };

        let time_proj = Timesteps::new(TIME_PROJ_DIM, true, 0.0, &device)?;
        let ada = vb.pp("adaln_single");
        let time_embed =
            TimestepEmbedding::new(TIME_PROJ_DIM, d, ada.pp("emb").pp("timestep_embedder").vb())?;
        let adaln_linear = ada.pp("linear").linear(d, 6 * d, true)?;

        let mut blocks = Vec::with_capacity(cfg.num_layers);
        let mut untrained_kv = Vec::new();
        let vbb = vb.pp("transformer_blocks");
        for i in 0..cfg.num_layers {
            let kc = opts
                .kv_compress
                .as_ref()
                .filter(|kc| kc.layers.contains(&i));
            let block = Block::new(cfg, &vbb.pp(i), kc, d / world)?;
            if let Some(kvc) = &block.kv_compress {
                if !kvc.has_trained_weights() {
                    untrained_kv.push(i);
                }
            }
            blocks.push(block);
        }
        if !untrained_kv.is_empty() {
            tracing::warn!(
                blocks = ?untrained_kv,
                "KV compression (conv) requested but the checkpoint has no trained `attn1.sr`/`attn1.norm` \
                 weights for these blocks; using the original's averaging initialisation"
            );
        }

        let scale_shift_table = vb.get((2, d), "scale_shift_table")?;
        let proj_out = vb.pp("proj_out").linear(d, p * p * out_channels, true)?;
        let activation = if cfg.activation_fn == "gelu" {
            Activation::GeluErf
        } else {
            Activation::GeluTanh
        };
        Ok(Self {
            cfg: cfg.clone(),
            dtype,
            device,
            heads: cfg.num_attention_heads / world,
            head_dim: cfg.attention_head_dim,
            inner_dim: d,
            out_channels,
            norm_eps: cfg.norm_eps as f32,
            attn_scale: 1.0 / (cfg.attention_head_dim as f64).sqrt(),
            activation,
            patch_proj,
            caption,
            time_proj,
            time_embed,
            adaln_linear,
            blocks,
            scale_shift_table,
            proj_out,
            pos_cache: Mutex::new(HashMap::new()),
            tp,
        })
    }

    /// Loads this rank's part of `transformer/` for the tensor-parallel group of
    /// `collective` (see [`PixArtTransformer::new_sharded`]): only the rank's slices of the
    /// split weights are read from the memory-mapped files.
    pub fn load_sharded(
        component: &ComponentFolder,
        dtype: RunDtype,
        device: &Device,
        variant: Option<&str>,
        opts: &PixArtOptions,
        collective: Arc<dyn Collective>,
    ) -> Result<Self> {
        Self::check_class(component)?;
        let cfg: PixArtConfig = component.config()?;
        let shard = ShardSpec::new(collective.rank(), collective.world_size())?;
        let weights = ShardedWeights::from_component(component, dtype, device, variant, shard)?;
        Self::new_sharded(&cfg, weights, opts, collective)
    }

    fn check_class(component: &ComponentFolder) -> Result<()> {
        if !ACCEPTED_CLASSES.contains(&component.class()) {
            return Err(ModelError::UnknownClass {
                what: format!("`{}` component", component.name()),
                class: component.class().to_string(),
                supported: ACCEPTED_CLASSES.join(", "),
            });
        }
        Ok(())
    }

    /// This rank and the number of ranks (`(0, 1)` without tensor parallelism).
    pub fn tensor_parallel_rank(&self) -> (usize, usize) {
        self.tp
            .as_ref()
            .map_or((0, 1), |c| (c.rank(), c.world_size()))
    }

    /// Bytes of the weights this rank holds, split into tensor-parallel slices and replicated
    /// tensors (KV-compression weights are not counted).
    pub fn weight_footprint(&self) -> WeightFootprint {
        let mut f = WeightFootprint::default();
        let mut add = |l: &FusedLinear| {
            let (w, b) = l.byte_sizes();
            f.replicated += w + b;
        };
        add(&self.patch_proj);
        if let Some((l1, l2)) = &self.caption {
            add(l1);
            add(l2);
        }
        add(&self.adaln_linear);
        add(&self.proj_out);
        // The timestep MLP (256 → D → D, with biases).
        let d = self.inner_dim;
        f.replicated += (TIME_PROJ_DIM * d + d + d * d + d) * self.dtype.size_in_bytes();
        f.replicated += WeightFootprint::bytes_of(&self.scale_shift_table);
        for b in &self.blocks {
            b.footprint(&mut f);
        }
        f
    }

    /// Sums a row-parallel projection's partial outputs over the ranks (identity on one rank).
    fn reduce(&self, partial: Tensor) -> Result<Tensor> {
        match &self.tp {
            Some(c) => c.all_reduce_sum(&partial),
            None => Ok(partial),
        }
    }

    /// Loads `transformer/` (its `config.json` and weights) in `dtype` on `device`.
    pub fn load(
        component: &ComponentFolder,
        dtype: RunDtype,
        device: &Device,
        opts: &PixArtOptions,
    ) -> Result<Self> {
        Self::load_variant(component, dtype, device, None, opts)
    }

    /// As [`PixArtTransformer::load`], preferring weight files of a `variant` (e.g. `fp16`).
    pub fn load_variant(
        component: &ComponentFolder,
        dtype: RunDtype,
        device: &Device,
        variant: Option<&str>,
        opts: &PixArtOptions,
    ) -> Result<Self> {
        Self::check_class(component)?;
        let cfg: PixArtConfig = component.config()?;
        let vb = component.var_builder(dtype, device, variant)?;
        Self::new(&cfg, vb, opts)
    }

    /// The checkpoint configuration.
    pub fn config(&self) -> &PixArtConfig {
        &self.cfg
    }

    /// Latent channels in.
    pub fn in_channels(&self) -> usize {
        self.cfg.in_channels
    }

    /// Channels out (the first `in_channels` are ε; the rest the learned variance).
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// Patch side in latent pixels; latent sides must be multiples of it.
    pub fn patch_size(&self) -> usize {
        self.cfg.patch_size
    }

    /// Training latent side (selects the resolution-binning table).
    pub fn sample_size(&self) -> usize {
        self.cfg.sample_size
    }

    /// Caption width expected by [`PixArtTransformer::forward`].
    pub fn caption_channels(&self) -> usize {
        self.cfg
            .caption_channels
            .unwrap_or_else(|| self.cfg.cross_attention_dim.unwrap_or(self.inner_dim))
    }

    /// The dtype the weights (and activations) are in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The f32 position table `[1, gh·gw, D]` for a token grid, computed once per grid size.
    fn pos_embed(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let mut cache = self
            .pos_cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(t) = cache.get(&(gh, gw)) {
            return Ok(t.clone());
        }
        let d = self.inner_dim;
        let table = get_2d_sincos_pos_embed(
            d,
            gh,
            gw,
            self.cfg.base_size(),
            self.cfg.interpolation_scale(),
        )?;
        let t = Tensor::from_vec(table, (1, gh * gw, d), &self.device)?;
        cache.insert((gh, gw), t.clone());
        Ok(t)
    }

    /// Patch embedding plus positions: `[B, C, h, w]` → `[B, N, D]`.
    fn embed_patches(&self, latents: &Tensor, gh: usize, gw: usize) -> Result<Tensor> {
        let (b, c, _, _) = latents.dims4()?;
        let p = self.cfg.patch_size;
        let patches = latents
            .to_dtype(self.dtype)?
            .contiguous()?
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, gh * gw, c * p * p))?;
        let x = self.patch_proj.forward(&patches)?;
        let pos = self.pos_embed(gh, gw)?;
        // diffusers adds the f32 table and casts the sum back to the run dtype.
        if self.dtype == DType::F32 {
            Ok(x.broadcast_add(&pos)?)
        } else {
            Ok(x.to_dtype(DType::F32)?
                .broadcast_add(&pos)?
                .to_dtype(self.dtype)?)
        }
    }

    /// Checks latents and timestep; returns `(B, gh, gw)`.
    fn check_latents(&self, latents: &Tensor, timestep: &Tensor) -> Result<(usize, usize, usize)> {
        let dims = latents.dims();
        let [b, c, h, w] = *dims else {
            return Err(ModelError::invalid(
                "latents",
                format!("expected [B, C, h, w], got {dims:?}"),
            ));
        };
        let p = self.cfg.patch_size;
        if c != self.cfg.in_channels {
            return Err(ModelError::invalid(
                "latents",
                format!("{c} channels, the model takes {}", self.cfg.in_channels),
            ));
        }
        if h == 0 || w == 0 || h % p != 0 || w % p != 0 {
            return Err(ModelError::invalid(
                "latents",
                format!("latent size {h}x{w} must be a non-zero multiple of the patch size {p}"),
            ));
        }
        let nt = timestep.elem_count();
        if nt != b && nt != 1 {
            return Err(ModelError::invalid(
                "timestep",
                format!("{nt} timesteps for a batch of {b}"),
            ));
        }
        Ok((b, h / p, w / p))
    }

    /// Checks the caption and mask; returns `(B, L)`.
    fn check_text(
        &self,
        encoder_hidden_states: &Tensor,
        encoder_attention_mask: Option<&Tensor>,
    ) -> Result<(usize, usize)> {
        let ehs = encoder_hidden_states.dims();
        let cc = self.caption_channels();
        if ehs.len() != 3 || ehs[2] != cc || ehs[0] == 0 || ehs[1] == 0 {
            return Err(ModelError::invalid(
                "encoder_hidden_states",
                format!("expected [B, L, {cc}], got {ehs:?}"),
            ));
        }
        if let Some(mask) = encoder_attention_mask {
            if mask.dims() != [ehs[0], ehs[1]] {
                return Err(ModelError::invalid(
                    "encoder_attention_mask",
                    format!("expected [{}, {}], got {:?}", ehs[0], ehs[1], mask.dims()),
                ));
            }
        }
        Ok((ehs[0], ehs[1]))
    }

    /// Caption projection `[B, L, C_cap]` → `[B, L, D]` and the mask bias `[B, 1, 1, L]`.
    fn project_text(
        &self,
        encoder_hidden_states: &Tensor,
        encoder_attention_mask: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, l) = self.check_text(encoder_hidden_states, encoder_attention_mask)?;
        let ehs = encoder_hidden_states.to_dtype(self.dtype)?;
        let text = match &self.caption {
            Some((l1, l2)) => l2.forward(&l1.forward_gelu(&ehs)?)?,
            None => ehs,
        };
        let bias = match encoder_attention_mask {
            // (1 - mask)·-10000 = mask·10000 - 10000, in the run dtype as in diffusers.
            Some(mask) => Some(
                mask.to_dtype(self.dtype)?
                    .affine(10000.0, -10000.0)?
                    .reshape((b, 1, 1, l))?,
            ),
            None => None,
        };
        Ok((text, bias))
    }

    /// Prepares the caption conditioning once for a whole denoising loop: caption projection,
    /// padding-mask bias and every block's cross-attention keys/values. Pass the result to
    /// [`PixArtTransformer::forward_with_text`] at each step; the output is identical to
    /// [`PixArtTransformer::forward`] with the same caption and mask.
    ///
    /// `encoder_hidden_states` `[B, L, caption_channels]`, `encoder_attention_mask` `[B, L]`
    /// (1 keep, 0 padding).
    pub fn encode_text(
        &self,
        encoder_hidden_states: &Tensor,
        encoder_attention_mask: Option<&Tensor>,
    ) -> Result<PixArtTextConditioning> {
        let (text, bias) = self.project_text(encoder_hidden_states, encoder_attention_mask)?;
        let kv = self
            .blocks
            .iter()
            .map(|blk| blk.attn2_kv.forward(&text))
            .collect::<Result<Vec<_>>>()?;
        Ok(PixArtTextConditioning {
            kv,
            bias,
            batch: text.dim(0)?,
        })
    }

    /// One denoiser evaluation.
    ///
    /// - `latents` `[B, C_in, h, w]` (h, w multiples of the patch size);
    /// - `timestep` `[B]` (or one value for the whole batch), any numeric dtype;
    /// - `encoder_hidden_states` `[B, L, caption_channels]` (T5 output);
    /// - `encoder_attention_mask` `[B, L]`, 1 = keep, 0 = padding (becomes a −10000 bias on
    ///   the cross-attention keys, as in diffusers).
    ///
    /// Returns `[B, C_out, h, w]` in the run dtype. In a denoising loop, prefer
    /// [`PixArtTransformer::encode_text`] once and [`PixArtTransformer::forward_with_text`] per
    /// step, which skips the caption work that does not change between steps.
    pub fn forward(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        encoder_attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (text, bias) = self.project_text(encoder_hidden_states, encoder_attention_mask)?;
        self.run(
            latents,
            timestep,
            TextKv::Projected(&text),
            bias.as_ref(),
            text.dim(0)?,
        )
    }

    /// One denoiser evaluation with caption conditioning from
    /// [`PixArtTransformer::encode_text`] (same batch size as `latents`).
    pub fn forward_with_text(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        text: &PixArtTextConditioning,
    ) -> Result<Tensor> {
        if text.kv.len() != self.blocks.len() {
            return Err(ModelError::invalid(
                "text conditioning",
                format!(
                    "prepared for {} blocks, the model has {}",
                    text.kv.len(),
                    self.blocks.len()
                ),
            ));
        }
        self.run(
            latents,
            timestep,
            TextKv::Prepared(&text.kv),
            text.bias.as_ref(),
            text.batch,
        )
    }

    fn run(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        text: TextKv,
        text_bias: Option<&Tensor>,
        text_batch: usize,
    ) -> Result<Tensor> {
        let (b, gh, gw) = self.check_latents(latents, timestep)?;
        if text_batch != b {
            return Err(ModelError::invalid(
                "encoder_hidden_states",
                format!("caption batch {text_batch} differs from the latent batch {b}"),
            ));
        }
        let d = self.inner_dim;
        let mut x = self.embed_patches(latents, gh, gw)?;

        // Timestep: e [B, D] and T6 [B, 6, D], once per forward.
        let mut t = timestep.flatten_all()?;
        if t.elem_count() != b {
            t = t.broadcast_as(b)?.contiguous()?;
        }
        let code = self.time_proj.forward(&t)?.to_dtype(self.dtype)?;
        let e = self.time_embed.forward(&code)?;
        let t6 = self.adaln_linear.forward(&e.silu()?)?.reshape((b, 6, d))?;

        let ctx = StepContext {
            t6: &t6,
            text,
            text_bias,
            grid: (gh, gw),
        };
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(i, &x, &ctx, self)?;
        }

        // Output: (shift, scale) = table + e (raw e, no SiLU).
        let ss = self
            .scale_shift_table
            .unsqueeze(0)?
            .broadcast_add(&e.unsqueeze(1)?)?;
        let shift = ss.i((.., 0))?.contiguous()?;
        let scale1 = (ss.i((.., 1))? + 1.0)?;
        let x = layer_norm_modulate(&x, &scale1, &shift, 1e-6)?;
        let y = self.proj_out.forward(&x)?;
        let p = self.cfg.patch_size;
        let co = self.out_channels;
        Ok(y.reshape((b, gh, gw, p, p, co))?
            .permute((0, 5, 1, 3, 2, 4))?
            .contiguous()?
            .reshape((b, co, gh * p, gw * p))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> PixArtConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn config_defaults_follow_diffusers() {
        let cfg = parse(r#"{"_class_name": "Transformer2DModel", "caption_channels": 4096}"#);
        assert_eq!(cfg.inner_dim(), 1152);
        assert_eq!(cfg.out_channels(), 8);
        assert_eq!(cfg.interpolation_scale(), 2.0);
        assert_eq!(cfg.base_size(), 64);
        assert_eq!(cfg.use_additional_conditions, None);
        cfg.validate().unwrap();
        // Explicit null out_channels means in_channels.
        let cfg = parse(r#"{"out_channels": null, "in_channels": 16, "sample_size": 32}"#);
        assert_eq!(cfg.out_channels(), 16);
        assert_eq!(cfg.interpolation_scale(), 1.0);
        let cfg = parse(r#"{"sample_size": 256, "interpolation_scale": 4}"#);
        assert_eq!(cfg.interpolation_scale(), 4.0);
        let mut sigma = PixArtConfig::sigma_xl_2_1024_ms();
        sigma.validate().unwrap();
        sigma.use_additional_conditions = None;
        sigma.validate().unwrap();
        assert_eq!(PixArtConfig::sigma_xl_2_2k_ms().base_size(), 128);
    }

    /// With `norm_elementwise_affine`, the LayerNorm affine is folded into the modulation:
    /// `(LN(x)·w + b)(1 + scale) + shift`.
    #[test]
    fn affine_norm_folds_into_modulation() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (2, 5, 12), &dev).unwrap();
        let norm = NormAffine {
            weight: Tensor::randn(1f32, 0.2, 12, &dev).unwrap(),
            bias: Tensor::randn(0f32, 0.2, 12, &dev).unwrap(),
        };
        let shift = Tensor::randn(0f32, 1.0, (2, 12), &dev).unwrap();
        let scale = Tensor::randn(0f32, 1.0, (2, 12), &dev).unwrap();
        let (alpha, beta) = Block::modulation(Some(&norm), &shift, &scale).unwrap();
        let got = layer_norm_modulate(&x, &alpha, &beta, 1e-6).unwrap();
        let ln = candle_nn::ops::layer_norm_slow(&x, &norm.weight, &norm.bias, 1e-6).unwrap();
        let want = ln
            .broadcast_mul(&(scale.unsqueeze(1).unwrap() + 1.0).unwrap())
            .unwrap()
            .broadcast_add(&shift.unsqueeze(1).unwrap())
            .unwrap();
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn unsupported_settings_name_the_field() {
        let field_of = |json: &str| match parse(json).validate() {
            Err(ModelError::UnsupportedConfig { field, .. }) => field,
            other => panic!("expected UnsupportedConfig, got {other:?}"),
        };
        assert_eq!(
            field_of(r#"{"use_additional_conditions": true}"#),
            "use_additional_conditions"
        );
        assert_eq!(field_of(r#"{"norm_type": "ada_norm_zero"}"#), "norm_type");
        assert_eq!(field_of(r#"{"activation_fn": "geglu"}"#), "activation_fn");
        assert_eq!(field_of(r#"{"attention_type": "gated"}"#), "attention_type");
        assert_eq!(
            field_of(r#"{"cross_attention_dim": 64, "caption_channels": 4096}"#),
            "cross_attention_dim"
        );
        assert_eq!(
            field_of(r#"{"num_embeds_ada_norm": null}"#),
            "num_embeds_ada_norm"
        );
    }
}
