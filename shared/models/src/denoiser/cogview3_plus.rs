//! CogView3-Plus-3B denoiser: diffusers `CogView3PlusTransformer2DModel` (models-spec §2.2).
//!
//! Reference: diffusers 0.42.1 `models/transformers/transformer_cogview3plus.py`,
//! `models/embeddings.py: CogView3PlusPatchEmbed, CogView3CombinedTimestepSizeEmbeddings`,
//! `models/normalization.py: CogView3PlusAdaLayerNormZeroTextImage, AdaLayerNormContinuous`,
//! `models/attention_processor.py: CogVideoXAttnProcessor2_0`.
//!
//! One forward pass:
//! 1. patchify `[B, C, H, W]` → `[B, H/p·W/p, C·p·p]` (per-patch order `(c, p, q)`),
//!    `patch_embed.proj`, plus the fixed integer-position 2-D sin-cos table
//!    (`pos_embed_max_size`², sliced to the token grid); the text goes through
//!    `patch_embed.text_proj` with a zero position;
//! 2. `emb = timestep_embedder(sincos_D(t)) + condition_embedder([sincos_c(original_size),
//!    sincos_c(crop_coords), sincos_c(target_size)])` (`D` = model width, `c` = condition_dim);
//! 3. per block: `norm1.linear(SiLU(emb))` gives 12 chunks (shift, scale, gate for attention and
//!    for the MLP, image then text); image and text are normalised separately (LayerNorm, no
//!    affine, eps 1e-5) and modulated; one joint attention over `[text ‖ image]` with a per-head
//!    LayerNorm on q and k (eps 1e-6, no affine), no mask; gated residuals; `norm2` /
//!    `norm2_context` + modulation; one shared feed-forward (GELU tanh) over `[text ‖ image]`;
//!    gated residuals (f16 runs clamp to ±65504 as diffusers does);
//! 4. `norm_out`: `(scale, shift) = norm_out.linear(SiLU(emb))`, LayerNorm (eps 1e-6) of the
//!    image tokens, modulation, `proj_out`, unpatchify with per-patch layout `(c, p, q)`.
//!
//! Tensor parallelism ([`CogView3PlusTransformer::new_sharded`], see [`crate::parallel`]): each
//! of `N` ranks holds `heads / N` attention heads (`to_q/to_k/to_v` column-parallel — the
//! per-head q/k LayerNorm stays local to a head — and `to_out.0` row-parallel), `4D / N`
//! feed-forward hidden columns (`ff.net.0.proj` column-parallel, `ff.net.2` row-parallel) and
//! `12D / N` of each block's modulation outputs (`norm1.linear`, column-parallel: every block's
//! modulation depends only on `emb`, so all of them are gathered with one all-gather per
//! forward). Two all-reduces per block follow the row-parallel projections, whose biases rank 0
//! adds. The patch, text, timestep and size embeddings, `norm_out` and `proj_out` are
//! replicated; every rank holds the full activations and produces the full output.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::fused::{gated_add, layer_norm_modulate, FusedLinear};
use crate::checkpoint::ComponentFolder;
use crate::nn::attention::scaled_dot_product_attention;
use crate::nn::embeddings::{TimestepEmbedding, Timesteps};
use crate::parallel::{Collective, ShardSpec, ShardedWeights, WeightFootprint};
use crate::{ModelError, Result, RunDtype};

/// Component name used in error messages.
const COMPONENT: &str = "CogView3PlusTransformer2DModel";

/// Classes accepted in `model_index.json` for this component.
pub const ACCEPTED_CLASSES: &[&str] = &["CogView3PlusTransformer2DModel"];

/// Block LayerNorm epsilon (`norm1`'s `norm_x`/`norm_c`, `norm2`, `norm2_context`).
const BLOCK_NORM_EPS: f32 = 1e-5;
/// Epsilon of the per-head q/k LayerNorm and of `norm_out`.
const QK_AND_OUT_NORM_EPS: f32 = 1e-6;
/// Modulation chunks per block.
const CHUNKS: usize = 12;

/// `transformer/config.json` of a CogView3-Plus checkpoint. Absent fields take diffusers'
/// defaults (`CogView3PlusTransformer2DModel.__init__`, which are the 3B model's values).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CogView3PlusConfig {
    /// Patch side in latent pixels (2).
    #[serde(default = "defaults::patch_size")]
    pub patch_size: usize,
    /// Latent channels in (16).
    #[serde(default = "defaults::in_channels")]
    pub in_channels: usize,
    /// Transformer blocks (30).
    #[serde(default = "defaults::num_layers")]
    pub num_layers: usize,
    /// Channels per head (40).
    #[serde(default = "defaults::attention_head_dim")]
    pub attention_head_dim: usize,
    /// Attention heads (64); the model width is `heads × head_dim` (2560).
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    /// Channels out (16).
    #[serde(default = "defaults::out_channels")]
    pub out_channels: usize,
    /// Text-encoder width (4096, T5-XXL).
    #[serde(default = "defaults::text_embed_dim")]
    pub text_embed_dim: usize,
    /// Width of the conditioning vector `emb` (512).
    #[serde(default = "defaults::time_embed_dim")]
    pub time_embed_dim: usize,
    /// Width of each size-conditioning scalar's sinusoidal code (256).
    #[serde(default = "defaults::condition_dim")]
    pub condition_dim: usize,
    /// Side of the fixed position table in tokens (128): latent grids up to this many patches
    /// per side (2048 px for the 3B model).
    #[serde(default = "defaults::pos_embed_max_size")]
    pub pos_embed_max_size: usize,
    /// Default latent side (128, i.e. 1024 px).
    #[serde(default = "defaults::sample_size")]
    pub sample_size: usize,
}

mod defaults {
    pub fn patch_size() -> usize {
        2
    }
    pub fn in_channels() -> usize {
        16
    }
    pub fn num_layers() -> usize {
        30
    }
    pub fn attention_head_dim() -> usize {
        40
    }
    pub fn num_attention_heads() -> usize {
        64
    }
    pub fn out_channels() -> usize {
        16
    }
    pub fn text_embed_dim() -> usize {
        4096
    }
    pub fn time_embed_dim() -> usize {
        512
    }
    pub fn condition_dim() -> usize {
        256
    }
    pub fn pos_embed_max_size() -> usize {
        128
    }
    pub fn sample_size() -> usize {
        128
    }
}

impl Default for CogView3PlusConfig {
    fn default() -> Self {
        Self::cogview3_plus_3b()
    }
}

impl CogView3PlusConfig {
    /// `THUDM/CogView3-Plus-3B` (`transformer/config.json`; diffusers' defaults).
    pub fn cogview3_plus_3b() -> Self {
        Self {
            patch_size: defaults::patch_size(),
            in_channels: defaults::in_channels(),
            num_layers: defaults::num_layers(),
            attention_head_dim: defaults::attention_head_dim(),
            num_attention_heads: defaults::num_attention_heads(),
            out_channels: defaults::out_channels(),
            text_embed_dim: defaults::text_embed_dim(),
            time_embed_dim: defaults::time_embed_dim(),
            condition_dim: defaults::condition_dim(),
            pos_embed_max_size: defaults::pos_embed_max_size(),
            sample_size: defaults::sample_size(),
        }
    }

    /// Model width `heads × head_dim`.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Width of the concatenated size codes, `3 · 2 · condition_dim` (1536).
    pub fn pooled_projection_dim(&self) -> usize {
        6 * self.condition_dim
    }

    fn unsupported(field: &str, value: impl std::fmt::Display, hint: &str) -> ModelError {
        ModelError::UnsupportedConfig {
            component: COMPONENT.into(),
            field: field.into(),
            value: value.to_string(),
            hint: hint.into(),
        }
    }

    /// Rejects settings this implementation cannot run, naming the field.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("num_layers", self.num_layers),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("out_channels", self.out_channels),
            ("text_embed_dim", self.text_embed_dim),
            ("time_embed_dim", self.time_embed_dim),
            ("condition_dim", self.condition_dim),
            ("pos_embed_max_size", self.pos_embed_max_size),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(Self::unsupported(field, v, "must be at least 1"));
            }
        }
        if !self.inner_dim().is_multiple_of(4) {
            return Err(Self::unsupported(
                "attention_head_dim",
                self.attention_head_dim,
                "heads × head_dim must be a multiple of 4 (2-D sin-cos positions)",
            ));
        }
        Ok(())
    }
}

/// Where the weights come from: the whole checkpoint, or one rank's slices of it.
#[derive(Clone)]
enum Weights<'a> {
    Whole(VarBuilder<'a>),
    Shard(ShardedWeights),
}

impl<'a> Weights<'a> {
    fn pp(&self, name: impl ToString) -> Self {
        match self {
            Weights::Whole(vb) => Weights::Whole(vb.pp(name)),
            Weights::Shard(sw) => Weights::Shard(sw.pp(name)),
        }
    }

    /// Whole tensors under this prefix (replicated layers).
    fn vb(&self) -> VarBuilder<'a> {
        match self {
            Weights::Whole(vb) => vb.clone(),
            Weights::Shard(sw) => sw.var_builder(),
        }
    }

    fn dtype(&self) -> DType {
        match self {
            Weights::Whole(vb) => vb.dtype(),
            Weights::Shard(sw) => sw.dtype(),
        }
    }

    fn device(&self) -> &Device {
        match self {
            Weights::Whole(vb) => vb.device(),
            Weights::Shard(sw) => sw.device(),
        }
    }

    /// A replicated linear layer with bias.
    fn linear(&self, in_dim: usize, out_dim: usize) -> Result<FusedLinear> {
        FusedLinear::load(in_dim, out_dim, true, self.vb())
    }

    /// A column-parallel linear layer with bias: this rank's output rows and bias entries.
    fn column(&self, in_dim: usize, out_dim: usize) -> Result<FusedLinear> {
        match self {
            Weights::Whole(vb) => FusedLinear::load(in_dim, out_dim, true, vb.clone()),
            Weights::Shard(sw) => FusedLinear::new(
                sw.column_weight(out_dim, in_dim, "weight")?,
                Some(sw.column_bias(out_dim, "bias")?),
            ),
        }
    }

    /// A row-parallel linear layer with bias: this rank's input columns; the bias on rank 0.
    fn row(&self, in_dim: usize, out_dim: usize) -> Result<FusedLinear> {
        match self {
            Weights::Whole(vb) => FusedLinear::load(in_dim, out_dim, true, vb.clone()),
            Weights::Shard(sw) => FusedLinear::new(
                sw.row_weight(out_dim, in_dim, "weight")?,
                sw.row_bias(out_dim, "bias")?,
            ),
        }
    }
}

/// One `CogView3PlusTransformerBlock` (this rank's part of it).
#[derive(Debug, Clone)]
struct Block {
    /// `norm1.linear` (time_embed_dim → 12D; this rank's `12D / N` outputs).
    ada: FusedLinear,
    /// `attn1.to_q/to_k/to_v` stacked (this rank's heads of each).
    qkv: FusedLinear,
    attn_out: FusedLinear,
    ff_in: FusedLinear,
    ff_out: FusedLinear,
}

/// The 12 modulation vectors of one block, each `[B, D]`, with the scales already `1 + scale`.
struct Modulation {
    img_msa: (Tensor, Tensor, Tensor),
    img_mlp: (Tensor, Tensor, Tensor),
    txt_msa: (Tensor, Tensor, Tensor),
    txt_mlp: (Tensor, Tensor, Tensor),
}

impl Modulation {
    /// From `[B, 12, D]` in diffusers' chunk order: shift, scale, gate for the image attention,
    /// then the image MLP, then the same six for the text.
    fn new(m: &Tensor) -> Result<Self> {
        let chunk = |i: usize| -> Result<Tensor> { Ok(m.i((.., i))?.contiguous()?) };
        let triple = |i: usize| -> Result<(Tensor, Tensor, Tensor)> {
            Ok((chunk(i)?, (chunk(i + 1)? + 1.0)?, chunk(i + 2)?))
        };
        Ok(Self {
            img_msa: triple(0)?,
            img_mlp: triple(3)?,
            txt_msa: triple(6)?,
            txt_mlp: triple(9)?,
        })
    }
}

impl Block {
    fn new(cfg: &CogView3PlusConfig, w: &Weights) -> Result<Self> {
        let d = cfg.inner_dim();
        let ada = w
            .pp("norm1")
            .pp("linear")
            .column(cfg.time_embed_dim, CHUNKS * d)?;
        let a = w.pp("attn1");
        let qkv = FusedLinear::concat(&[
            a.pp("to_q").column(d, d)?,
            a.pp("to_k").column(d, d)?,
            a.pp("to_v").column(d, d)?,
        ])?;
        let attn_out = a.pp("to_out").pp("0").row(d, d)?;
        let ff = w.pp("ff").pp("net");
        let ff_in = ff.pp("0").pp("proj").column(d, 4 * d)?;
        let ff_out = ff.pp("2").row(4 * d, d)?;
        Ok(Self {
            ada,
            qkv,
            attn_out,
            ff_in,
            ff_out,
        })
    }

    fn footprint(&self, f: &mut WeightFootprint) {
        for l in [&self.ada, &self.qkv, &self.ff_in] {
            let (w, b) = l.byte_sizes();
            f.sharded += w + b;
        }
        for l in [&self.attn_out, &self.ff_out] {
            let (w, b) = l.byte_sizes();
            f.sharded += w;
            f.replicated += b;
        }
    }

    /// One block on `txt` `[B, L, D]` and `img` `[B, N, D]`; returns the new `(txt, img)`.
    fn forward(
        &self,
        txt: &Tensor,
        img: &Tensor,
        m: &Modulation,
        model: &CogView3PlusTransformer,
    ) -> Result<(Tensor, Tensor)> {
        let (b, l, _) = txt.dims3()?;
        let n = img.dim(1)?;
        let s = l + n;
        let heads = model.local_heads;
        let dh = model.head_dim;
        let dl = heads * dh;

        // 1. Norm + modulation, joint attention with per-head q/k LayerNorm.
        let h_txt = layer_norm_modulate(txt, &m.txt_msa.1, &m.txt_msa.0, BLOCK_NORM_EPS)?;
        let h_img = layer_norm_modulate(img, &m.img_msa.1, &m.img_msa.0, BLOCK_NORM_EPS)?;
        let h = Tensor::cat(&[&h_txt, &h_img], 1)?;
        let qkv = self.qkv.forward(&h)?.reshape((b, s, 3, heads, dh))?;
        let qk = layer_norm_modulate(
            &qkv.narrow(2, 0, 2)?,
            &model.head_ones,
            &model.head_zeros,
            QK_AND_OUT_NORM_EPS,
        )?;
        let q = qk.i((.., .., 0))?.transpose(1, 2)?;
        let k = qk.i((.., .., 1))?.transpose(1, 2)?;
        let v = qkv.i((.., .., 2))?.transpose(1, 2)?;
        let o = scaled_dot_product_attention(&q, &k, &v, None, model.attn_scale)?;
        let o = o.transpose(1, 2)?.reshape((b, s, dl))?;
        let o = model.reduce(self.attn_out.forward(&o)?)?;
        let txt = gated_add(txt, &o.narrow(1, 0, l)?.contiguous()?, &m.txt_msa.2)?;
        let img = gated_add(img, &o.narrow(1, l, n)?.contiguous()?, &m.img_msa.2)?;

        // 2. Norm + modulation, one feed-forward over [text ‖ image].
        let h_txt = layer_norm_modulate(&txt, &m.txt_mlp.1, &m.txt_mlp.0, BLOCK_NORM_EPS)?;
        let h_img = layer_norm_modulate(&img, &m.img_mlp.1, &m.img_mlp.0, BLOCK_NORM_EPS)?;
        let h = Tensor::cat(&[&h_txt, &h_img], 1)?;
        let f = model.reduce(self.ff_out.forward(&self.ff_in.forward_gelu(&h)?)?)?;
        let mut txt = gated_add(&txt, &f.narrow(1, 0, l)?.contiguous()?, &m.txt_mlp.2)?;
        let mut img = gated_add(&img, &f.narrow(1, l, n)?.contiguous()?, &m.img_mlp.2)?;
        if txt.dtype() == DType::F16 {
            txt = txt.clamp(-65504f32, 65504f32)?;
            img = img.clamp(-65504f32, 65504f32)?;
        }
        Ok((txt, img))
    }
}

/// Text conditioning prepared once per prompt batch by
/// [`CogView3PlusTransformer::encode_text`]: the projected text tokens
/// (`patch_embed.text_proj` of the T5 output), which do not change between denoising steps.
#[derive(Debug, Clone)]
pub struct CogView3PlusTextConditioning {
    /// `[B, L, D]` in the run dtype.
    text: Tensor,
}

impl CogView3PlusTextConditioning {
    /// Batch size the conditioning was prepared for.
    pub fn batch_size(&self) -> usize {
        self.text.dims().first().copied().unwrap_or(0)
    }

    /// Text tokens `L`.
    pub fn text_len(&self) -> usize {
        self.text.dims().get(1).copied().unwrap_or(0)
    }
}

/// The CogView3-Plus denoiser. `forward` is `&self` and thread-safe; the position-table cache
/// is behind a mutex.
///
/// A tensor-parallel rank ([`CogView3PlusTransformer::new_sharded`]) takes part in
/// collectives in every forward, so all ranks must make the same calls in the same order, one
/// at a time, on the same inputs.
#[derive(Debug)]
pub struct CogView3PlusTransformer {
    cfg: CogView3PlusConfig,
    dtype: DType,
    device: Device,
    /// Heads held by this rank.
    local_heads: usize,
    head_dim: usize,
    inner_dim: usize,
    attn_scale: f64,
    /// `patch_embed.proj` (`C·p·p → D`).
    patch_proj: FusedLinear,
    /// `patch_embed.text_proj` (`text_embed_dim → D`).
    text_proj: FusedLinear,
    /// `time_condition_embed.time_proj` (`D`-wide code).
    time_proj: Timesteps,
    /// `time_condition_embed.condition_proj` (`condition_dim`-wide code per scalar).
    condition_proj: Timesteps,
    time_embed: TimestepEmbedding,
    condition_embed: TimestepEmbedding,
    blocks: Vec<Block>,
    /// `norm_out.linear` (time_embed_dim → 2D, split as scale, shift).
    norm_out: FusedLinear,
    proj_out: FusedLinear,
    /// Unit weight and zero bias `[head_dim]` for the q/k LayerNorm.
    head_ones: Tensor,
    head_zeros: Tensor,
    /// Position tables (f32, `[1, gh·gw, D]`) by token grid.
    pos_cache: Mutex<HashMap<(usize, usize), Tensor>>,
    /// The tensor-parallel group, when the blocks hold one rank's slices.
    tp: Option<Arc<dyn Collective>>,
}

impl CogView3PlusTransformer {
    /// Builds the model from `cfg` and the weights under `vb` (the component root).
    pub fn new(cfg: &CogView3PlusConfig, vb: VarBuilder) -> Result<Self> {
        Self::build(cfg, Weights::Whole(vb), None)
    }

    /// Builds one rank of a tensor-parallel model: `weights` reads this rank's slices (its
    /// `ShardSpec` must match `collective`'s rank and world size). Every rank must run the
    /// same forward calls in the same order on the same inputs; each returns the full output.
    ///
    /// Errors when the heads do not divide by the number of ranks.
    pub fn new_sharded(
        cfg: &CogView3PlusConfig,
        weights: ShardedWeights,
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
        Self::build(cfg, Weights::Shard(weights), Some(collective))
    }

    fn build(
        cfg: &CogView3PlusConfig,
        w: Weights,
        tp: Option<Arc<dyn Collective>>,
    ) -> Result<Self> {
        cfg.validate()?;
        let world = tp.as_ref().map_or(1, |c| c.world_size());
        let heads = cfg.num_attention_heads;
        if !heads.is_multiple_of(world) {
            let fits: Vec<String> = (1..=heads)
                .filter(|n| heads.is_multiple_of(*n))
                .map(|n| n.to_string())
                .collect();
            return Err(CogView3PlusConfig::unsupported(
                "num_attention_heads",
                heads,
                &format!(
                    "tensor parallelism over {world} ranks splits whole heads, so the heads must divide by {world}; use {} ranks",
                    fits.join(", ")
                ),
            ));
        }
        let d = cfg.inner_dim();
        let p = cfg.patch_size;
        let dtype = w.dtype();
        let device = w.device().clone();

        let pe = w.pp("patch_embed");
        let patch_proj = pe.pp("proj").linear(cfg.in_channels * p * p, d)?;
        let text_proj = pe.pp("text_proj").linear(cfg.text_embed_dim, d)?;

        let tce = w.pp("time_condition_embed");
        let time_proj = Timesteps::new(d, true, 0.0, &device)?;
        let condition_proj = Timesteps::new(cfg.condition_dim, true, 0.0, &device)?;
        let time_embed =
            TimestepEmbedding::new(d, cfg.time_embed_dim, tce.pp("timestep_embedder").vb())?;
        // PixArtAlphaTextProjection(act_fn="silu"): linear_1 → SiLU → linear_2, the same layout.
        let condition_embed = TimestepEmbedding::new(
            cfg.pooled_projection_dim(),
            cfg.time_embed_dim,
            tce.pp("condition_embedder").vb(),
        )?;

        let wb = w.pp("transformer_blocks");
        let blocks = (0..cfg.num_layers)
            .map(|i| Block::new(cfg, &wb.pp(i)))
            .collect::<Result<Vec<_>>>()?;

        let norm_out = w
            .pp("norm_out")
            .pp("linear")
            .linear(cfg.time_embed_dim, 2 * d)?;
        let proj_out = w.pp("proj_out").linear(d, p * p * cfg.out_channels)?;
        let dh = cfg.attention_head_dim;
        Ok(Self {
            cfg: cfg.clone(),
            dtype,
            local_heads: heads / world,
            head_dim: dh,
            inner_dim: d,
            attn_scale: 1.0 / (dh as f64).sqrt(),
            patch_proj,
            text_proj,
            time_proj,
            condition_proj,
            time_embed,
            condition_embed,
            blocks,
            norm_out,
            proj_out,
            head_ones: Tensor::ones(dh, dtype, &device)?,
            head_zeros: Tensor::zeros(dh, dtype, &device)?,
            pos_cache: Mutex::new(HashMap::new()),
            device,
            tp,
        })
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

    /// Loads `transformer/` (its `config.json` and weights) in `dtype` on `device`.
    pub fn load(component: &ComponentFolder, dtype: RunDtype, device: &Device) -> Result<Self> {
        Self::load_variant(component, dtype, device, None)
    }

    /// As [`CogView3PlusTransformer::load`], preferring weight files of a `variant`.
    pub fn load_variant(
        component: &ComponentFolder,
        dtype: RunDtype,
        device: &Device,
        variant: Option<&str>,
    ) -> Result<Self> {
        Self::check_class(component)?;
        let cfg: CogView3PlusConfig = component.config()?;
        let vb = component.var_builder(dtype, device, variant)?;
        Self::new(&cfg, vb)
    }

    /// Loads this rank's part of `transformer/` for the tensor-parallel group of `collective`
    /// (see [`CogView3PlusTransformer::new_sharded`]): only the rank's slices of the split
    /// weights are read from the memory-mapped files.
    pub fn load_sharded(
        component: &ComponentFolder,
        dtype: RunDtype,
        device: &Device,
        collective: Arc<dyn Collective>,
    ) -> Result<Self> {
        Self::load_sharded_variant(component, dtype, device, None, collective)
    }

    /// As [`CogView3PlusTransformer::load_sharded`], preferring weight files of a `variant`.
    pub fn load_sharded_variant(
        component: &ComponentFolder,
        dtype: RunDtype,
        device: &Device,
        variant: Option<&str>,
        collective: Arc<dyn Collective>,
    ) -> Result<Self> {
        Self::check_class(component)?;
        let cfg: CogView3PlusConfig = component.config()?;
        let shard = ShardSpec::new(collective.rank(), collective.world_size())?;
        let weights = ShardedWeights::from_component(component, dtype, device, variant, shard)?;
        Self::new_sharded(&cfg, weights, collective)
    }

    /// The checkpoint configuration.
    pub fn config(&self) -> &CogView3PlusConfig {
        &self.cfg
    }

    /// Latent channels in.
    pub fn in_channels(&self) -> usize {
        self.cfg.in_channels
    }

    /// Channels out.
    pub fn out_channels(&self) -> usize {
        self.cfg.out_channels
    }

    /// Patch side in latent pixels; latent sides must be multiples of it.
    pub fn patch_size(&self) -> usize {
        self.cfg.patch_size
    }

    /// Default latent side (`sample_size`; the pipeline's default image side is this × 8).
    pub fn sample_size(&self) -> usize {
        self.cfg.sample_size
    }

    /// Largest token grid side (`pos_embed_max_size`); latent sides may be at most this ×
    /// `patch_size`.
    pub fn pos_embed_max_size(&self) -> usize {
        self.cfg.pos_embed_max_size
    }

    /// Text width expected by [`CogView3PlusTransformer::forward`] (`text_embed_dim`).
    pub fn text_embed_dim(&self) -> usize {
        self.cfg.text_embed_dim
    }

    /// The dtype the weights (and activations) are in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// This rank and the number of ranks (`(0, 1)` without tensor parallelism).
    pub fn tensor_parallel_rank(&self) -> (usize, usize) {
        self.tp
            .as_ref()
            .map_or((0, 1), |c| (c.rank(), c.world_size()))
    }

    /// Bytes of the weights this rank holds, split into tensor-parallel slices and replicated
    /// tensors.
    pub fn weight_footprint(&self) -> WeightFootprint {
        let mut f = WeightFootprint::default();
        for l in [
            &self.patch_proj,
            &self.text_proj,
            &self.norm_out,
            &self.proj_out,
        ] {
            let (w, b) = l.byte_sizes();
            f.replicated += w + b;
        }
        // The two embedding MLPs (in → E → E, with biases).
        let e = self.cfg.time_embed_dim;
        let mlp = |i: usize| i * e + e + e * e + e;
        f.replicated += (mlp(self.inner_dim) + mlp(self.cfg.pooled_projection_dim()))
            * self.dtype.size_in_bytes();
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

    /// The f32 position table `[1, gh·gw, D]`: rows `0..gh` and columns `0..gw` of the fixed
    /// `pos_embed_max_size`² table with integer positions (models-spec §0.2: column code in
    /// the first `D/2` channels, row code in the last), computed once per grid.
    fn pos_embed(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let mut cache = self
            .pos_cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(t) = cache.get(&(gh, gw)) {
            return Ok(t.clone());
        }
        let d = self.inner_dim;
        let half = d / 2;
        let quarter = half / 2;
        // diffusers: omega in f64, positions exact integers, sin/cos in f64, rounded to f32.
        let omega: Vec<f64> = (0..quarter)
            .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
            .collect();
        let code = |pos: usize| -> Vec<f32> {
            let p = pos as f64;
            let mut v: Vec<f32> = omega.iter().map(|&w| (p * w).sin() as f32).collect();
            v.extend(omega.iter().map(|&w| (p * w).cos() as f32));
            v
        };
        let cols: Vec<Vec<f32>> = (0..gw).map(code).collect();
        let mut table = Vec::with_capacity(gh * gw * d);
        for i in 0..gh {
            let row = code(i);
            for col in &cols {
                table.extend_from_slice(col);
                table.extend_from_slice(&row);
            }
        }
        let t = Tensor::from_vec(table, (1, gh * gw, d), &self.device)?;
        cache.insert((gh, gw), t.clone());
        Ok(t)
    }

    /// Checks the latents; returns `(B, gh, gw)`.
    fn check_latents(&self, latents: &Tensor) -> Result<(usize, usize, usize)> {
        let dims = latents.dims();
        let [b, c, h, w] = *dims else {
            return Err(ModelError::invalid(
                "hidden_states",
                format!("expected latents [B, C, H, W], got {dims:?}"),
            ));
        };
        let p = self.cfg.patch_size;
        if c != self.cfg.in_channels {
            return Err(ModelError::invalid(
                "hidden_states",
                format!("{c} channels, the model takes {}", self.cfg.in_channels),
            ));
        }
        if b == 0 || h == 0 || w == 0 || h % p != 0 || w % p != 0 {
            return Err(ModelError::invalid(
                "hidden_states",
                format!("latent size {h}x{w} must be a non-zero multiple of the patch size {p}"),
            ));
        }
        let max = self.cfg.pos_embed_max_size;
        if h / p > max || w / p > max {
            return Err(ModelError::invalid(
                "hidden_states",
                format!(
                    "latent size {h}x{w} exceeds the position table: at most {} per side ({} px)",
                    max * p,
                    max * p * 8
                ),
            ));
        }
        Ok((b, h / p, w / p))
    }

    /// Projects the T5 output `[B, L, text_embed_dim]` once (`patch_embed.text_proj`); pass
    /// the result to [`CogView3PlusTransformer::forward_with_text`] at every step. The output
    /// is identical to [`CogView3PlusTransformer::forward`] with the same text.
    pub fn encode_text(
        &self,
        encoder_hidden_states: &Tensor,
    ) -> Result<CogView3PlusTextConditioning> {
        let dims = encoder_hidden_states.dims();
        let de = self.cfg.text_embed_dim;
        if dims.len() != 3 || dims[2] != de || dims[0] == 0 || dims[1] == 0 {
            return Err(ModelError::invalid(
                "encoder_hidden_states",
                format!("expected [B, L, {de}], got {dims:?}"),
            ));
        }
        let text = self
            .text_proj
            .forward(&encoder_hidden_states.to_dtype(self.dtype)?)?;
        Ok(CogView3PlusTextConditioning { text })
    }

    /// One denoiser evaluation (diffusers `CogView3PlusTransformer2DModel.forward`).
    ///
    /// - `hidden_states`: latents `[B, in_channels, H, W]` (H, W multiples of the patch size, at
    ///   most `pos_embed_max_size × patch_size`);
    /// - `encoder_hidden_states`: T5 output `[B, L, text_embed_dim]` (all-zero rows for the
    ///   unconditional branch when there is no negative prompt; no mask);
    /// - `timestep`: `[B]` (or one value for the batch), any numeric dtype (integer steps);
    /// - `original_size`, `target_size`, `crop_coords`: `[B, 2]` (or `[1, 2]`/`[2]` for the
    ///   whole batch), `(height, width)` in pixels and `(top, left)`; any numeric dtype.
    ///
    /// Returns `[B, out_channels, H, W]` (v-prediction for the 3B model) in the run dtype. In
    /// a denoising loop, [`CogView3PlusTransformer::encode_text`] once plus
    /// [`CogView3PlusTransformer::forward_with_text`] per step skips the text projection.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: &Tensor,
        timestep: &Tensor,
        original_size: &Tensor,
        target_size: &Tensor,
        crop_coords: &Tensor,
    ) -> Result<Tensor> {
        let text = self.encode_text(encoder_hidden_states)?;
        self.forward_with_text(
            hidden_states,
            &text,
            timestep,
            original_size,
            target_size,
            crop_coords,
        )
    }

    /// Broadcasts a per-sample input to `[B, k]` f32.
    fn per_sample(x: &Tensor, b: usize, k: usize, name: &str) -> Result<Tensor> {
        let n = x.elem_count();
        let x = x.to_dtype(DType::F32)?.flatten_all()?;
        if n == b * k {
            Ok(x.reshape((b, k))?)
        } else if n == k {
            Ok(x.reshape((1, k))?.broadcast_as((b, k))?.contiguous()?)
        } else {
            let want = if k == 1 {
                format!("{b}")
            } else {
                format!("[{b}, {k}]")
            };
            Err(ModelError::invalid(
                name,
                format!("{n} values for a batch of {b} (expected {want})"),
            ))
        }
    }

    /// The conditioning vector `emb` `[B, time_embed_dim]`.
    fn condition(
        &self,
        b: usize,
        timestep: &Tensor,
        original_size: &Tensor,
        target_size: &Tensor,
        crop_coords: &Tensor,
    ) -> Result<Tensor> {
        let t = Self::per_sample(timestep, b, 1, "timestep")?.flatten_all()?;
        let t_code = self.time_proj.forward(&t)?.to_dtype(self.dtype)?;
        let c = self.cfg.condition_dim;
        let size_code = |x: &Tensor, name: &str| -> Result<Tensor> {
            let v = Self::per_sample(x, b, 2, name)?.flatten_all()?;
            Ok(self.condition_proj.forward(&v)?.reshape((b, 2 * c))?)
        };
        let cond = Tensor::cat(
            &[
                size_code(original_size, "original_size")?,
                size_code(crop_coords, "crop_coords")?,
                size_code(target_size, "target_size")?,
            ],
            1,
        )?
        .to_dtype(self.dtype)?;
        let emb = (self.time_embed.forward(&t_code)? + self.condition_embed.forward(&cond)?)?;
        Ok(emb)
    }

    /// Every block's modulation `[B, layers, 12, D]` (gathered over the ranks).
    fn modulations(&self, emb_silu: &Tensor) -> Result<Vec<Modulation>> {
        let b = emb_silu.dim(0)?;
        let d = self.inner_dim;
        let local: Vec<Tensor> = self
            .blocks
            .iter()
            .map(|blk| blk.ada.forward(emb_silu))
            .collect::<Result<_>>()?;
        // [B, layers, 12D / N] → [B, layers, 12D] in output order.
        let local = Tensor::stack(&local, 1)?;
        let full = match &self.tp {
            Some(c) => c.all_gather(&local, 2)?,
            None => local,
        };
        let full = full.reshape((b, self.blocks.len(), CHUNKS, d))?;
        (0..self.blocks.len())
            .map(|i| Modulation::new(&full.i((.., i))?))
            .collect()
    }

    /// One denoiser evaluation with text from [`CogView3PlusTransformer::encode_text`] (same
    /// batch size as `hidden_states`); other arguments as in
    /// [`CogView3PlusTransformer::forward`].
    pub fn forward_with_text(
        &self,
        hidden_states: &Tensor,
        text: &CogView3PlusTextConditioning,
        timestep: &Tensor,
        original_size: &Tensor,
        target_size: &Tensor,
        crop_coords: &Tensor,
    ) -> Result<Tensor> {
        let (b, gh, gw) = self.check_latents(hidden_states)?;
        if text.batch_size() != b {
            return Err(ModelError::invalid(
                "encoder_hidden_states",
                format!(
                    "text batch {} differs from the latent batch {b}",
                    text.batch_size()
                ),
            ));
        }
        let p = self.cfg.patch_size;
        let c = self.cfg.in_channels;
        let d = self.inner_dim;

        // Patch embedding plus positions (diffusers adds the f32 table, then casts back).
        let patches = hidden_states
            .to_dtype(self.dtype)?
            .contiguous()?
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, gh * gw, c * p * p))?;
        let img = self.patch_proj.forward(&patches)?;
        let pos = self.pos_embed(gh, gw)?;
        let mut img = if self.dtype == DType::F32 {
            img.broadcast_add(&pos)?
        } else {
            img.to_dtype(DType::F32)?
                .broadcast_add(&pos)?
                .to_dtype(self.dtype)?
        };
        let mut txt = text.text.clone();

        let emb = self.condition(b, timestep, original_size, target_size, crop_coords)?;
        let emb_silu = emb.silu()?;
        let mods = self.modulations(&emb_silu)?;
        for (block, m) in self.blocks.iter().zip(&mods) {
            (txt, img) = block.forward(&txt, &img, m, self)?;
        }
        drop(txt);

        // norm_out: (scale, shift), LayerNorm eps 1e-6, then proj_out.
        let ss = self.norm_out.forward(&emb_silu)?;
        let scale1 = (ss.narrow(1, 0, d)? + 1.0)?;
        let shift = ss.narrow(1, d, d)?.contiguous()?;
        let x = layer_norm_modulate(&img, &scale1, &shift, QK_AND_OUT_NORM_EPS)?;
        let y = self.proj_out.forward(&x)?;
        let co = self.cfg.out_channels;
        // (B, gh, gw, c, p, q) → (B, c, gh, p, gw, q).
        Ok(y.reshape((b, gh, gw, co, p, p))?
            .permute((0, 3, 1, 4, 2, 5))?
            .contiguous()?
            .reshape((b, co, gh * p, gw * p))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_are_the_3b_model() {
        let cfg: CogView3PlusConfig =
            serde_json::from_str(r#"{"_class_name": "CogView3PlusTransformer2DModel"}"#).unwrap();
        assert_eq!(cfg, CogView3PlusConfig::cogview3_plus_3b());
        assert_eq!(cfg.inner_dim(), 2560);
        assert_eq!(cfg.pooled_projection_dim(), 1536);
        cfg.validate().unwrap();
    }

    #[test]
    fn zero_sizes_are_refused() {
        let cfg: CogView3PlusConfig = serde_json::from_str(r#"{"condition_dim": 0}"#).unwrap();
        match cfg.validate() {
            Err(ModelError::UnsupportedConfig { field, .. }) => assert_eq!(field, "condition_dim"),
            other => panic!("expected UnsupportedConfig, got {other:?}"),
        }
    }
}
