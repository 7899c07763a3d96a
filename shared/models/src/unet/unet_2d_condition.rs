//! diffusers `UNet2DConditionModel` (SDXL topology), with the Kolors text projection and the
//! SDXL `text_time` micro-conditioning (models-spec §4.3).
//!
//! Reference: diffusers 0.42.1 `models/unets/unet_2d_condition.py` (`__init__`, `forward`,
//! `get_time_embed`, `get_aug_embed`, `process_encoder_hidden_states`).
//!
//! One forward pass:
//! 1. `emb = time_embedding(sincos_{C0}(t))` (`flip_sin_to_cos`, `freq_shift`);
//! 2. with `addition_embed_type = "text_time"`:
//!    `emb += add_embedding([text_embeds ‖ sincos_{A}(time_ids) flattened])` (pooled text first,
//!    then the 6 time ids — original size, crop top-left, target size — each coded with
//!    `addition_time_embed_dim = A` channels);
//! 3. text states `encoder_hid_proj` (`"text_proj"`: Kolors' 4096 → 2048 linear);
//! 4. `conv_in`, the down blocks (collecting skip connections), the mid block, the up blocks
//!    (consuming them; when the latent sides do not divide by `2^(blocks−1)` each upsampler
//!    resizes to its skip connection's size), `conv_out(silu(conv_norm_out(·)))`.
//!
//! Every resnet receives `silu(emb)`. The SDXL quirk: `attention_head_dim` holds the number of
//! heads of each block (`num_attention_heads` must be null); the head width is
//! `channels / heads`, and the up blocks take the per-block values in reverse.
//!
//! Kolors (`Kwai-Kolors/Kolors-diffusers`, `unet/config.json`): channels (320, 640, 1280),
//! `DownBlock2D, CrossAttnDownBlock2D×2` / `CrossAttnUpBlock2D×2, UpBlock2D`,
//! `attention_head_dim [5, 10, 20]` (64-wide heads), `transformer_layers_per_block [1, 2, 10]`,
//! `cross_attention_dim 2048`, `encoder_hid_dim 4096`, `addition_time_embed_dim 256`,
//! `projection_class_embeddings_input_dim 5632`, linear projections; weights in the `fp16`
//! variant only (`diffusion_pytorch_model.fp16.safetensors`).

use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, GroupNorm, VarBuilder};
use serde::{Deserialize, Serialize};

use super::blocks::{AttentionSpec, BlockSpec, DownBlock, MidBlock, UpBlock};
use super::resnet::{conv_bytes, conv_same, group_norm_bytes, ResnetSettings};
use super::WeightSource;
use crate::checkpoint::ComponentFolder;
use crate::denoiser::fused::FusedLinear;
use crate::nn::embeddings::{TimestepEmbedding, Timesteps};
use crate::parallel::{Collective, ShardSpec, ShardedWeights, WeightFootprint};
use crate::{ModelError, Result, RunDtype};

/// Component name used in error messages.
const COMPONENT: &str = "UNet2DConditionModel";

/// Classes accepted in `model_index.json` for this component.
pub const ACCEPTED_CLASSES: &[&str] = &["UNet2DConditionModel"];

/// A per-block setting: one value for every block, or one per block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// The same value for every block.
    One(T),
    /// One value per down block (up blocks take them reversed).
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The value of block `i`.
    pub fn get(&self, i: usize) -> Option<T> {
        match self {
            PerBlock::One(v) => Some(v.clone()),
            PerBlock::Each(v) => v.get(i).cloned(),
        }
    }

    /// The number of values given (`None` for a single value).
    pub fn len(&self) -> Option<usize> {
        match self {
            PerBlock::One(_) => None,
            PerBlock::Each(v) => Some(v.len()),
        }
    }

    /// Whether an empty list was given.
    pub fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }
}

/// `transformer_layers_per_block`: one count for every attention, one per block, or one list
/// of per-attention counts per block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayersPerTransformer {
    /// The same count for every `Transformer2DModel`.
    Same(usize),
    /// Per down block: a count for each of its attentions, or a list of counts.
    PerBlock(Vec<PerBlock<usize>>),
}

impl LayersPerTransformer {
    /// Block `i`'s setting.
    fn block(&self, i: usize) -> Option<PerBlock<usize>> {
        match self {
            LayersPerTransformer::Same(n) => Some(PerBlock::One(*n)),
            LayersPerTransformer::PerBlock(v) => v.get(i).cloned(),
        }
    }
}

/// `unet/config.json`. Absent fields take diffusers' defaults
/// (`UNet2DConditionModel.__init__`); settings this implementation does not support are
/// rejected by [`UNet2DConditionConfig::validate`], naming the field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNet2DConditionConfig {
    /// Training latent size (an int or `[h, w]`; informational).
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
    /// Latent channels in (4).
    #[serde(default = "defaults::four")]
    pub in_channels: usize,
    /// Channels out (4).
    #[serde(default = "defaults::four")]
    pub out_channels: usize,
    /// Maps the input `x` to `2x − 1` first.
    #[serde(default)]
    pub center_input_sample: bool,
    /// `[cos, sin]` order of the timestep code (true).
    #[serde(default = "defaults::yes")]
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the timestep code (0).
    #[serde(default)]
    pub freq_shift: f64,
    /// Down block classes.
    #[serde(default = "defaults::down_block_types")]
    pub down_block_types: Vec<String>,
    /// Mid block class (`null`: no mid block).
    #[serde(default = "defaults::mid_block_type")]
    pub mid_block_type: Option<String>,
    /// Up block classes.
    #[serde(default = "defaults::up_block_types")]
    pub up_block_types: Vec<String>,
    /// Self-attention replaced by cross-attention (must be false).
    #[serde(default = "defaults::no_per_block")]
    pub only_cross_attention: PerBlock<bool>,
    /// Output channels of each down block.
    #[serde(default = "defaults::block_out_channels")]
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    #[serde(default = "defaults::layers_per_block")]
    pub layers_per_block: PerBlock<usize>,
    /// Padding of the downsampling convolutions (1).
    #[serde(default = "defaults::one")]
    pub downsample_padding: usize,
    /// Output scale of the mid block's resnets (1).
    #[serde(default = "defaults::one_f64")]
    pub mid_block_scale_factor: f64,
    /// Dropout (training only; ignored).
    #[serde(default)]
    pub dropout: f64,
    /// Activation (`silu`).
    #[serde(default = "defaults::act_fn")]
    pub act_fn: String,
    /// Group-norm groups (32).
    #[serde(default = "defaults::norm_num_groups")]
    pub norm_num_groups: Option<usize>,
    /// Group-norm epsilon of the resnets and the output norm (1e-5).
    #[serde(default = "defaults::norm_eps")]
    pub norm_eps: f64,
    /// Width of the text states the cross-attentions read (1280; Kolors 2048).
    #[serde(default = "defaults::cross_attention_dim")]
    pub cross_attention_dim: PerBlock<usize>,
    /// Transformer layers per attention (1; Kolors `[1, 2, 10]`).
    #[serde(default = "defaults::transformer_layers_per_block")]
    pub transformer_layers_per_block: LayersPerTransformer,
    /// Per up block, per attention layer counts (asymmetric UNets).
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Vec<Vec<usize>>>,
    /// Width of the text encoder states before `encoder_hid_proj` (Kolors 4096).
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    /// `text_proj` (a linear `encoder_hid_dim → cross_attention_dim`) or null.
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    /// Heads per block (the SDXL naming quirk: not the head width).
    #[serde(default = "defaults::attention_head_dim")]
    pub attention_head_dim: PerBlock<usize>,
    /// Must be null (diffusers rejects it too).
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    /// Two text transformers per attention (unsupported).
    #[serde(default)]
    pub dual_cross_attention: bool,
    /// Linear `proj_in`/`proj_out` in the transformers (Kolors, SDXL) instead of 1×1 convs.
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Class embedding (unsupported unless null).
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// `text_time` (SDXL / Kolors micro-conditioning) or null.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Channels of each time id's sinusoidal code (256).
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Number of class embeddings (unsupported unless null).
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    /// Attention in f32 (no effect: attention runs in f32 or with f32 softmax here).
    #[serde(default)]
    pub upcast_attention: bool,
    /// `default` (time embedding added before `norm2`) or `scale_shift`.
    #[serde(default = "defaults::resnet_time_scale_shift")]
    pub resnet_time_scale_shift: String,
    /// Only used by block classes this implementation does not support.
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    /// Only used by block classes this implementation does not support.
    #[serde(default = "defaults::one_f64")]
    pub resnet_out_scale_factor: f64,
    /// `positional` (sinusoidal).
    #[serde(default = "defaults::time_embedding_type")]
    pub time_embedding_type: String,
    /// Time embedding width (default `4 × block_out_channels[0]`).
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    /// Activation after the summed embeddings (unsupported unless null).
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    /// Activation after the time MLP (unsupported unless null).
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    /// LCM-style timestep condition (unsupported unless null).
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    /// Kernel of `conv_in` (3).
    #[serde(default = "defaults::three")]
    pub conv_in_kernel: usize,
    /// Kernel of `conv_out` (3).
    #[serde(default = "defaults::three")]
    pub conv_out_kernel: usize,
    /// Input width of `add_embedding` (pooled text + 6 × `addition_time_embed_dim`).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// `default` (GLIGEN variants unsupported).
    #[serde(default = "defaults::attention_type")]
    pub attention_type: String,
    /// Concatenated class embedding (unsupported).
    #[serde(default)]
    pub class_embeddings_concat: bool,
    /// Mid-block cross-attention only (must be null or false).
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    /// Norm of the text states in the cross-attentions (unsupported unless null).
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
}

/// serde defaults (diffusers `UNet2DConditionModel.__init__`).
mod defaults {
    use super::{LayersPerTransformer, PerBlock};

    pub fn four() -> usize {
        4
    }
    pub fn three() -> usize {
        3
    }
    pub fn one() -> usize {
        1
    }
    pub fn one_f64() -> f64 {
        1.0
    }
    pub fn yes() -> bool {
        true
    }
    pub fn down_block_types() -> Vec<String> {
        [
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ]
        .map(String::from)
        .to_vec()
    }
    pub fn mid_block_type() -> Option<String> {
        Some("UNetMidBlock2DCrossAttn".into())
    }
    pub fn up_block_types() -> Vec<String> {
        [
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ]
        .map(String::from)
        .to_vec()
    }
    pub fn no_per_block() -> PerBlock<bool> {
        PerBlock::One(false)
    }
    pub fn block_out_channels() -> Vec<usize> {
        vec![320, 640, 1280, 1280]
    }
    pub fn layers_per_block() -> PerBlock<usize> {
        PerBlock::One(2)
    }
    pub fn act_fn() -> String {
        "silu".into()
    }
    pub fn norm_num_groups() -> Option<usize> {
        Some(32)
    }
    pub fn norm_eps() -> f64 {
        1e-5
    }
    pub fn cross_attention_dim() -> PerBlock<usize> {
        PerBlock::One(1280)
    }
    pub fn transformer_layers_per_block() -> LayersPerTransformer {
        LayersPerTransformer::Same(1)
    }
    pub fn attention_head_dim() -> PerBlock<usize> {
        PerBlock::One(8)
    }
    pub fn resnet_time_scale_shift() -> String {
        "default".into()
    }
    pub fn time_embedding_type() -> String {
        "positional".into()
    }
    pub fn attention_type() -> String {
        "default".into()
    }
}

impl UNet2DConditionConfig {
    fn unsupported(field: &str, value: impl std::fmt::Display, hint: &str) -> ModelError {
        ModelError::UnsupportedConfig {
            component: COMPONENT.into(),
            field: field.into(),
            value: value.to_string(),
            hint: hint.into(),
        }
    }

    /// Down blocks.
    pub fn num_blocks(&self) -> usize {
        self.down_block_types.len()
    }

    /// Width of the time embedding (`time_embedding_dim`, default `4 × block_out_channels[0]`).
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or(4 * self.block_out_channels.first().copied().unwrap_or(0))
    }

    /// The effective `encoder_hid_dim_type` (diffusers sets `text_proj` when only
    /// `encoder_hid_dim` is given).
    pub fn encoder_hid_dim_type(&self) -> Option<&str> {
        match (&self.encoder_hid_dim_type, self.encoder_hid_dim) {
            (Some(t), _) => Some(t.as_str()),
            (None, Some(_)) => Some("text_proj"),
            (None, None) => None,
        }
    }

    /// The single cross-attention width (every block must agree).
    pub fn cross_attention_width(&self) -> usize {
        self.cross_attention_dim.get(0).unwrap_or(0)
    }

    /// Width of the text states [`UNet2DConditionModel::forward`] expects (`encoder_hid_dim`
    /// with a text projection, else the cross-attention width).
    pub fn text_width(&self) -> usize {
        match self.encoder_hid_dim_type() {
            Some(_) => self.encoder_hid_dim.unwrap_or(0),
            None => self.cross_attention_width(),
        }
    }

    /// Whether the SDXL `text_time` conditioning (pooled text + time ids) is used.
    pub fn uses_text_time(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }

    /// Rejects settings this implementation does not support, naming the field.
    pub fn validate(&self) -> Result<()> {
        let n = self.num_blocks();
        if n == 0 {
            return Err(Self::unsupported(
                "down_block_types",
                "[]",
                "at least one block is needed",
            ));
        }
        for t in &self.down_block_types {
            if !matches!(t.as_str(), "DownBlock2D" | "CrossAttnDownBlock2D") {
                return Err(Self::unsupported(
                    "down_block_types",
                    t,
                    "only DownBlock2D and CrossAttnDownBlock2D are implemented",
                ));
            }
        }
        for t in &self.up_block_types {
            if !matches!(t.as_str(), "UpBlock2D" | "CrossAttnUpBlock2D") {
                return Err(Self::unsupported(
                    "up_block_types",
                    t,
                    "only UpBlock2D and CrossAttnUpBlock2D are implemented",
                ));
            }
        }
        if self.up_block_types.len() != n {
            return Err(Self::unsupported(
                "up_block_types",
                self.up_block_types.len(),
                &format!("must list as many blocks as down_block_types ({n})"),
            ));
        }
        if self.block_out_channels.len() != n {
            return Err(Self::unsupported(
                "block_out_channels",
                format!("{:?}", self.block_out_channels),
                &format!("must list one width per down block ({n})"),
            ));
        }
        if let Some(t) = &self.mid_block_type {
            if t != "UNetMidBlock2DCrossAttn" {
                return Err(Self::unsupported(
                    "mid_block_type",
                    t,
                    "only UNetMidBlock2DCrossAttn (or null) is implemented",
                ));
            }
        }
        let per_block_len = |field: &str, len: Option<usize>| -> Result<()> {
            match len {
                Some(l) if l != n => Err(Self::unsupported(
                    field,
                    format!("{l} values"),
                    &format!("must give one value or one per down block ({n})"),
                )),
                _ => Ok(()),
            }
        };
        per_block_len("only_cross_attention", self.only_cross_attention.len())?;
        per_block_len("layers_per_block", self.layers_per_block.len())?;
        per_block_len("cross_attention_dim", self.cross_attention_dim.len())?;
        per_block_len("attention_head_dim", self.attention_head_dim.len())?;
        if let LayersPerTransformer::PerBlock(v) = &self.transformer_layers_per_block {
            per_block_len("transformer_layers_per_block", Some(v.len()))?;
            if self.reverse_transformer_layers_per_block.is_none()
                && v.iter().any(|b| matches!(b, PerBlock::Each(_)))
            {
                return Err(Self::unsupported(
                    "reverse_transformer_layers_per_block",
                    "null",
                    "nested transformer_layers_per_block (an asymmetric UNet) needs it, as in diffusers",
                ));
            }
        }
        if let Some(r) = &self.reverse_transformer_layers_per_block {
            per_block_len("reverse_transformer_layers_per_block", Some(r.len()))?;
        }
        if (0..n).any(|i| self.only_cross_attention.get(i) == Some(true))
            || self.mid_block_only_cross_attention == Some(true)
        {
            return Err(Self::unsupported(
                "only_cross_attention",
                true,
                "cross-attention-only transformer blocks are not implemented",
            ));
        }
        if self.num_attention_heads.is_some() {
            return Err(Self::unsupported(
                "num_attention_heads",
                "set",
                "diffusers rejects it too: give the head counts in attention_head_dim",
            ));
        }
        if self.dual_cross_attention {
            return Err(Self::unsupported(
                "dual_cross_attention",
                true,
                "DualTransformer2DModel is not implemented",
            ));
        }
        if self.class_embed_type.is_some() || self.num_class_embeds.is_some() {
            return Err(Self::unsupported(
                "class_embed_type",
                self.class_embed_type
                    .as_deref()
                    .unwrap_or("num_class_embeds"),
                "class embeddings are not implemented",
            ));
        }
        if self.class_embeddings_concat {
            return Err(Self::unsupported(
                "class_embeddings_concat",
                true,
                "class embeddings are not implemented",
            ));
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time") => {
                if self.addition_time_embed_dim.is_none() {
                    return Err(Self::unsupported(
                        "addition_time_embed_dim",
                        "null",
                        "`text_time` needs it (256 for SDXL and Kolors)",
                    ));
                }
                if self.projection_class_embeddings_input_dim.is_none() {
                    return Err(Self::unsupported(
                        "projection_class_embeddings_input_dim",
                        "null",
                        "`text_time` needs it (pooled width + 6 × addition_time_embed_dim)",
                    ));
                }
            }
            Some(t) => {
                return Err(Self::unsupported(
                    "addition_embed_type",
                    t,
                    "only `text_time` (SDXL, Kolors) or null is implemented",
                ))
            }
        }
        match self.encoder_hid_dim_type() {
            None | Some("text_proj") => {}
            Some(t) => {
                return Err(Self::unsupported(
                    "encoder_hid_dim_type",
                    t,
                    "only `text_proj` (Kolors) or null is implemented; IP-Adapter image projections are not",
                ))
            }
        }
        if self.encoder_hid_dim_type().is_some() && self.encoder_hid_dim.is_none() {
            return Err(Self::unsupported(
                "encoder_hid_dim",
                "null",
                "`text_proj` needs the text encoder width",
            ));
        }
        let cross = self.cross_attention_width();
        if (0..n).any(|i| self.cross_attention_dim.get(i) != Some(cross)) || cross == 0 {
            return Err(Self::unsupported(
                "cross_attention_dim",
                format!("{:?}", self.cross_attention_dim),
                "every block must read the same positive text width",
            ));
        }
        if self.time_embedding_type != "positional" {
            return Err(Self::unsupported(
                "time_embedding_type",
                &self.time_embedding_type,
                "only `positional` is implemented",
            ));
        }
        for (field, v) in [
            ("time_embedding_act_fn", &self.time_embedding_act_fn),
            ("timestep_post_act", &self.timestep_post_act),
            ("cross_attention_norm", &self.cross_attention_norm),
        ] {
            if let Some(v) = v {
                return Err(Self::unsupported(field, v, "must be null"));
            }
        }
        if let Some(d) = self.time_cond_proj_dim {
            return Err(Self::unsupported(
                "time_cond_proj_dim",
                d,
                "timestep conditions (LCM) are not implemented",
            ));
        }
        if !matches!(self.act_fn.as_str(), "silu" | "swish") {
            return Err(Self::unsupported(
                "act_fn",
                &self.act_fn,
                "only `silu` is implemented",
            ));
        }
        if !matches!(
            self.resnet_time_scale_shift.as_str(),
            "default" | "scale_shift"
        ) {
            return Err(Self::unsupported(
                "resnet_time_scale_shift",
                &self.resnet_time_scale_shift,
                "use `default` or `scale_shift`",
            ));
        }
        if self.attention_type != "default" {
            return Err(Self::unsupported(
                "attention_type",
                &self.attention_type,
                "GLIGEN attention is not implemented",
            ));
        }
        let Some(groups) = self.norm_num_groups else {
            return Err(Self::unsupported(
                "norm_num_groups",
                "null",
                "the group norms need a group count",
            ));
        };
        for &c in &self.block_out_channels {
            if groups == 0 || !c.is_multiple_of(groups) {
                return Err(Self::unsupported(
                    "norm_num_groups",
                    groups,
                    &format!("must divide every block width ({c})"),
                ));
            }
        }
        for (field, k) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if k.is_multiple_of(2) {
                return Err(Self::unsupported(field, k, "must be odd"));
            }
        }
        for i in 0..n {
            let heads = self.attention_head_dim.get(i).unwrap_or(0);
            let c = self.block_out_channels[i];
            if heads == 0 || !c.is_multiple_of(heads) {
                return Err(Self::unsupported(
                    "attention_head_dim",
                    format!("{:?}", self.attention_head_dim),
                    &format!(
                        "holds the head count of each block (SDXL naming); block {i} has {c} channels, not a multiple of {heads}"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Per-attention layer counts of down block `i` (its `num_layers` attentions).
    fn down_transformer_layers(&self, i: usize, num_layers: usize) -> Result<Vec<usize>> {
        let per = self.transformer_layers_per_block.block(i).ok_or_else(|| {
            Self::unsupported(
                "transformer_layers_per_block",
                format!("{:?}", self.transformer_layers_per_block),
                "one value per block",
            )
        })?;
        expand_layers(&per, num_layers, "transformer_layers_per_block")
    }

    /// Per-attention layer counts of up block `i` (its `num_layers` attentions).
    fn up_transformer_layers(&self, i: usize, num_layers: usize) -> Result<Vec<usize>> {
        let n = self.num_blocks();
        let per = match &self.reverse_transformer_layers_per_block {
            Some(r) => PerBlock::Each(r.get(i).cloned().unwrap_or_default()),
            None => self
                .transformer_layers_per_block
                .block(n - 1 - i)
                .unwrap_or(PerBlock::One(1)),
        };
        expand_layers(&per, num_layers, "reverse_transformer_layers_per_block")
    }

    /// Down blocks' layouts (`resnet` settings without the output scale, which is 1).
    fn down_layouts(&self, resnet: ResnetSettings) -> Result<Vec<BlockSpec>> {
        let n = self.num_blocks();
        let mut out = Vec::with_capacity(n);
        let mut output = self.block_out_channels[0];
        for i in 0..n {
            let input = output;
            output = self.block_out_channels[i];
            let num_layers = self.layers_per_block.get(i).unwrap_or(0);
            let attention = if self.down_block_types[i] == "CrossAttnDownBlock2D" {
                Some(self.attention_spec(
                    self.attention_head_dim.get(i).unwrap_or(1),
                    self.down_transformer_layers(i, num_layers)?,
                ))
            } else {
                None
            };
            out.push(BlockSpec {
                num_layers,
                in_channels: input,
                out_channels: output,
                prev_output_channel: 0,
                resample: i + 1 < n,
                downsample_padding: self.downsample_padding,
                resnet,
                attention,
            });
        }
        Ok(out)
    }

    /// Up blocks' layouts.
    fn up_layouts(&self, resnet: ResnetSettings) -> Result<Vec<BlockSpec>> {
        let n = self.num_blocks();
        let rev = |v: &[usize], i: usize| v[n - 1 - i];
        let mut out = Vec::with_capacity(n);
        let mut output = rev(&self.block_out_channels, 0);
        for i in 0..n {
            let prev = output;
            output = rev(&self.block_out_channels, i);
            let input = rev(&self.block_out_channels, (i + 1).min(n - 1));
            let num_layers = self.layers_per_block.get(n - 1 - i).unwrap_or(0) + 1;
            let attention = if self.up_block_types[i] == "CrossAttnUpBlock2D" {
                Some(self.attention_spec(
                    self.attention_head_dim.get(n - 1 - i).unwrap_or(1),
                    self.up_transformer_layers(i, num_layers)?,
                ))
            } else {
                None
            };
            out.push(BlockSpec {
                num_layers,
                in_channels: input,
                out_channels: output,
                prev_output_channel: prev,
                resample: i + 1 < n,
                downsample_padding: self.downsample_padding,
                resnet,
                attention,
            });
        }
        Ok(out)
    }

    fn attention_spec(&self, heads: usize, layers: Vec<usize>) -> AttentionSpec {
        AttentionSpec {
            heads,
            layers,
            cross_attention_dim: self.cross_attention_width(),
            groups: self.norm_num_groups.unwrap_or(32),
            linear_projection: self.use_linear_projection,
        }
    }

    /// The mid block's attention (heads and layers of the last block).
    fn mid_attention(&self) -> Result<AttentionSpec> {
        let n = self.num_blocks();
        let layers = self.down_transformer_layers(n - 1, 1)?;
        Ok(self.attention_spec(
            self.attention_head_dim.get(n - 1).unwrap_or(1),
            layers[..1].to_vec(),
        ))
    }
}

/// A block's per-attention layer counts: one count repeated, or the list given.
fn expand_layers(per: &PerBlock<usize>, num_layers: usize, field: &str) -> Result<Vec<usize>> {
    match per {
        PerBlock::One(k) => Ok(vec![*k; num_layers]),
        PerBlock::Each(v) if v.len() >= num_layers => Ok(v[..num_layers].to_vec()),
        PerBlock::Each(v) => Err(UNet2DConditionConfig::unsupported(
            field,
            format!("{v:?}"),
            &format!("a block with {num_layers} attentions needs {num_layers} layer counts"),
        )),
    }
}

/// The `text_time` added embedding: `add_time_proj` and `add_embedding`.
#[derive(Debug, Clone)]
struct TextTime {
    time_proj: Timesteps,
    embedding: TimestepEmbedding,
    /// `projection_class_embeddings_input_dim`.
    in_dim: usize,
}

/// The Kolors / SDXL UNet. `forward` is `&self` and thread-safe.
///
/// A tensor-parallel rank ([`UNet2DConditionModel::load_sharded`]) is different: its forward
/// calls take part in collectives, so each rank must make the same calls in the same order,
/// one at a time, with the same inputs.
#[derive(Debug)]
pub struct UNet2DConditionModel {
    cfg: UNet2DConditionConfig,
    dtype: DType,
    device: Device,
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    text_time: Option<TextTime>,
    encoder_hid_proj: Option<FusedLinear>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    tp: Option<Arc<dyn Collective>>,
}

impl UNet2DConditionModel {
    /// Builds the model from `cfg` and the weights under `vb` (the component root).
    pub fn new(cfg: &UNet2DConditionConfig, vb: VarBuilder) -> Result<Self> {
        Self::build(cfg, WeightSource::Whole(vb), None)
    }

    /// Builds one rank of a tensor-parallel model: `weights` reads this rank's slices (its
    /// `ShardSpec` must match `collective`'s rank and world size). Every rank must run the same
    /// forward calls, in the same order, on the same inputs; each returns the full output.
    ///
    /// Errors when a block's heads do not divide by the number of ranks.
    pub fn new_sharded(
        cfg: &UNet2DConditionConfig,
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
        Self::build(cfg, WeightSource::Shard(weights), Some(collective))
    }

    /// Loads `unet/` (its `config.json` and weights, preferring the `variant` files, e.g.
    /// `fp16` as Kolors ships them) in `dtype` on `device`.
    pub fn load(
        component: &ComponentFolder,
        dtype: RunDtype,
        device: &Device,
        variant: Option<&str>,
    ) -> Result<Self> {
        Self::check_class(component)?;
        let cfg: UNet2DConditionConfig = component.config()?;
        // Tensor by tensor, releasing each one's mapped pages once converted: the 2.6B Kolors
        // UNet (one 5 GB fp16 file) never holds the file and the weights at the same time.
        let files = component.weight_files(variant)?;
        let vb = files.lean_var_builder(dtype, device, |name| Some(name.to_string()))?;
        Self::new(&cfg, vb)
    }

    /// Loads this rank's part of `unet/` for the tensor-parallel group of `collective` (see
    /// [`UNet2DConditionModel::new_sharded`]): the split weights' slices are kept, the
    /// replicated weights whole.
    pub fn load_sharded(
        component: &ComponentFolder,
        dtype: RunDtype,
        device: &Device,
        variant: Option<&str>,
        collective: Arc<dyn Collective>,
    ) -> Result<Self> {
        Self::check_class(component)?;
        let cfg: UNet2DConditionConfig = component.config()?;
        let shard = ShardSpec::new(collective.rank(), collective.world_size())?;
        let weights = ShardedWeights::from_component(component, dtype, device, variant, shard)?;
        Self::new_sharded(&cfg, weights, collective)
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

    fn check_tensor_parallel(
        cfg: &UNet2DConditionConfig,
        down: &[BlockSpec],
        up: &[BlockSpec],
        mid: Option<&AttentionSpec>,
        world: usize,
    ) -> Result<()> {
        if world <= 1 {
            return Ok(());
        }
        let heads = down
            .iter()
            .chain(up)
            .filter_map(|b| b.attention.as_ref())
            .chain(mid)
            .map(|a| a.heads);
        for h in heads {
            if !h.is_multiple_of(world) {
                return Err(UNet2DConditionConfig::unsupported(
                    "attention_head_dim",
                    format!("{:?}", cfg.attention_head_dim),
                    &format!(
                        "tensor parallelism over {world} ranks splits whole heads, and a block with attention has {h} heads; use a number of ranks that divides every block's head count"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn build(
        cfg: &UNet2DConditionConfig,
        src: WeightSource,
        tp: Option<Arc<dyn Collective>>,
    ) -> Result<Self> {
        cfg.validate()?;
        let world = tp.as_ref().map_or(1, |c| c.world_size());
        let dtype = src.dtype();
        let device = src.device().clone();
        let vb = src.vb();
        let c0 = cfg.block_out_channels[0];
        let temb_dim = cfg.time_embed_dim();
        let groups = cfg.norm_num_groups.unwrap_or(32);
        let resnet = ResnetSettings {
            temb_channels: Some(temb_dim),
            groups,
            eps: cfg.norm_eps,
            output_scale_factor: 1.0,
            scale_shift: cfg.resnet_time_scale_shift == "scale_shift",
        };
        let down_layouts = cfg.down_layouts(resnet)?;
        let up_layouts = cfg.up_layouts(resnet)?;
        let mid_attention = match cfg.mid_block_type {
            Some(_) => Some(cfg.mid_attention()?),
            None => None,
        };
        Self::check_tensor_parallel(
            cfg,
            &down_layouts,
            &up_layouts,
            mid_attention.as_ref(),
            world,
        )?;

        let conv_in = conv_same(cfg.in_channels, c0, cfg.conv_in_kernel, vb.pp("conv_in"))?;
        let time_proj = Timesteps::new(c0, cfg.flip_sin_to_cos, cfg.freq_shift, &device)?;
        let time_embedding = TimestepEmbedding::new(c0, temb_dim, vb.pp("time_embedding"))?;
        let text_time = match (
            cfg.uses_text_time(),
            cfg.addition_time_embed_dim,
            cfg.projection_class_embeddings_input_dim,
        ) {
            (true, Some(a), Some(in_dim)) => Some(TextTime {
                time_proj: Timesteps::new(a, cfg.flip_sin_to_cos, cfg.freq_shift, &device)?,
                embedding: TimestepEmbedding::new(in_dim, temb_dim, vb.pp("add_embedding"))?,
                in_dim,
            }),
            _ => None,
        };
        let encoder_hid_proj = match (cfg.encoder_hid_dim_type(), cfg.encoder_hid_dim) {
            (Some(_), Some(e)) => Some(src.pp("encoder_hid_proj").linear(
                e,
                cfg.cross_attention_width(),
                true,
            )?),
            _ => None,
        };

        let down_src = src.pp("down_blocks");
        let down_blocks = down_layouts
            .iter()
            .enumerate()
            .map(|(i, l)| DownBlock::new(l, &down_src.pp(i), &tp))
            .collect::<Result<Vec<_>>>()?;
        let mid_block = match &mid_attention {
            Some(att) => {
                let c = cfg.block_out_channels[cfg.num_blocks() - 1];
                let settings = ResnetSettings {
                    output_scale_factor: cfg.mid_block_scale_factor,
                    ..resnet
                };
                Some(MidBlock::new(c, settings, att, &src.pp("mid_block"), &tp)?)
            }
            None => None,
        };
        let up_src = src.pp("up_blocks");
        let up_blocks = up_layouts
            .iter()
            .enumerate()
            .map(|(i, l)| UpBlock::new(l, &up_src.pp(i), &tp))
            .collect::<Result<Vec<_>>>()?;
        let conv_norm_out =
            candle_nn::group_norm(groups, c0, cfg.norm_eps, vb.pp("conv_norm_out"))?;
        let conv_out = conv_same(c0, cfg.out_channels, cfg.conv_out_kernel, vb.pp("conv_out"))?;
        Ok(Self {
            cfg: cfg.clone(),
            dtype,
            device,
            conv_in,
            time_proj,
            time_embedding,
            text_time,
            encoder_hid_proj,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            tp,
        })
    }

    /// The checkpoint configuration.
    pub fn config(&self) -> &UNet2DConditionConfig {
        &self.cfg
    }

    /// The dtype the weights (and activations) are in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Latent channels in.
    pub fn in_channels(&self) -> usize {
        self.cfg.in_channels
    }

    /// Channels out.
    pub fn out_channels(&self) -> usize {
        self.cfg.out_channels
    }

    /// Width of the text states `forward` expects (Kolors: 4096).
    pub fn text_width(&self) -> usize {
        self.cfg.text_width()
    }

    /// This rank and the number of ranks (`(0, 1)` without tensor parallelism).
    pub fn tensor_parallel_rank(&self) -> (usize, usize) {
        self.tp
            .as_ref()
            .map_or((0, 1), |c| (c.rank(), c.world_size()))
    }

    /// Bytes of the weights this rank holds: `sharded` are the transformer blocks' split
    /// attention and feed-forward weights, `replicated` everything else.
    pub fn weight_footprint(&self) -> WeightFootprint {
        let mut f = WeightFootprint::default();
        let dsize = self.dtype.size_in_bytes();
        let c0 = self.cfg.block_out_channels[0];
        f.replicated += conv_bytes(&self.conv_in) + conv_bytes(&self.conv_out);
        f.replicated += group_norm_bytes(c0, dsize);
        let mlp = |i: usize, o: usize| (i * o + o + o * o + o) * dsize;
        let temb = self.cfg.time_embed_dim();
        f.replicated += mlp(c0, temb);
        if let Some(tt) = &self.text_time {
            f.replicated += mlp(tt.in_dim, temb);
        }
        if let Some(p) = &self.encoder_hid_proj {
            let (w, b) = p.byte_sizes();
            f.replicated += w + b;
        }
        for b in &self.down_blocks {
            b.footprint(&mut f);
        }
        if let Some(m) = &self.mid_block {
            m.footprint(&mut f);
        }
        for b in &self.up_blocks {
            b.footprint(&mut f);
        }
        f
    }

    /// The SDXL / Kolors `time_ids` `[batch, 6]` (f32): `(original_h, original_w, crop_top,
    /// crop_left, target_h, target_w)` in pixels, the same for every item (diffusers
    /// `KolorsPipeline._get_add_time_ids`; the pipeline default is original = target = the
    /// output size and crops `(0, 0)`).
    pub fn add_time_ids(
        batch: usize,
        original_size: (usize, usize),
        crop_top_left: (usize, usize),
        target_size: (usize, usize),
        device: &Device,
    ) -> Result<Tensor> {
        let row = [
            original_size.0,
            original_size.1,
            crop_top_left.0,
            crop_top_left.1,
            target_size.0,
            target_size.1,
        ]
        .map(|v| v as f32);
        let data: Vec<f32> = (0..batch).flat_map(|_| row).collect();
        Ok(Tensor::from_vec(data, (batch, 6), device)?)
    }

    /// Checks the inputs' shapes; returns the batch size.
    fn check_inputs(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<(&Tensor, &Tensor)>,
    ) -> Result<usize> {
        let (b, c, h, w) = sample.dims4().map_err(|_| {
            ModelError::invalid(
                "sample",
                format!("expected [B, C, H, W], got {:?}", sample.dims()),
            )
        })?;
        if c != self.cfg.in_channels || h == 0 || w == 0 {
            return Err(ModelError::invalid(
                "sample",
                format!(
                    "expected {} channels and a non-empty latent, got {:?}",
                    self.cfg.in_channels,
                    sample.dims()
                ),
            ));
        }
        let nt = timestep.elem_count();
        if !(nt == 1 || (timestep.rank() == 1 && nt == b)) {
            return Err(ModelError::invalid(
                "timestep",
                format!("expected one timestep or [{b}], got {:?}", timestep.dims()),
            ));
        }
        let width = self.text_width();
        match encoder_hidden_states.dims3() {
            Ok((eb, l, ew)) if eb == b && l > 0 && ew == width => {}
            _ => {
                return Err(ModelError::invalid(
                    "encoder_hidden_states",
                    format!(
                        "expected [{b}, L, {width}], got {:?}",
                        encoder_hidden_states.dims()
                    ),
                ))
            }
        }
        if let (Some(tt), Some((text_embeds, time_ids))) = (&self.text_time, added) {
            let a = tt.time_proj.dim();
            let (pb, pooled) = text_embeds.dims2().map_err(|_| {
                ModelError::invalid(
                    "text_embeds",
                    format!("expected [{b}, D], got {:?}", text_embeds.dims()),
                )
            })?;
            let (ib, ids) = time_ids.dims2().map_err(|_| {
                ModelError::invalid(
                    "time_ids",
                    format!("expected [{b}, 6], got {:?}", time_ids.dims()),
                )
            })?;
            if pb != b || ib != b || pooled + ids * a != tt.in_dim {
                return Err(ModelError::invalid(
                    "text_embeds/time_ids",
                    format!(
                        "pooled {:?} and time ids {:?}: need batch {b} and pooled width + ids × {a} = {} (projection_class_embeddings_input_dim)",
                        text_embeds.dims(),
                        time_ids.dims(),
                        tt.in_dim
                    ),
                ));
            }
        }
        Ok(b)
    }

    /// The time embedding `emb` (`[B, time_embed_dim]`, before the resnets' SiLU).
    fn embedding(
        &self,
        timestep: &Tensor,
        batch: usize,
        added: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let t = timestep
            .to_dtype(DType::F32)?
            .flatten_all()?
            .broadcast_as(batch)?
            .contiguous()?;
        let t_emb = self.time_proj.forward(&t)?.to_dtype(self.dtype)?;
        let mut emb = self.time_embedding.forward(&t_emb)?;
        if let Some(tt) = &self.text_time {
            let (text_embeds, time_ids) = added.ok_or_else(|| {
                ModelError::invalid(
                    "added conditions",
                    "this UNet uses `text_time`: pass the pooled text embedding and the time ids",
                )
            })?;
            let time_embeds = tt
                .time_proj
                .forward(&time_ids.flatten_all()?)?
                .reshape((batch, ()))?;
            let add = Tensor::cat(&[&text_embeds.to_dtype(DType::F32)?, &time_embeds], 1)?
                .to_dtype(self.dtype)?;
            emb = (emb + tt.embedding.forward(&add)?)?;
        }
        Ok(emb)
    }

    /// Denoiser output for `sample` `[B, C, h, w]` at `timestep` (`[B]` or one value) given
    /// the text encoder states `encoder_hidden_states` `[B, L, text_width]`, the pooled text
    /// embedding `text_embeds` `[B, D]` and `time_ids` `[B, 6]` (original height/width, crop
    /// top/left, target height/width). The last two are used when the model has
    /// `addition_embed_type = "text_time"` (Kolors, SDXL) and ignored otherwise. Returns
    /// `[B, out_channels, h, w]` in the model's dtype (ε for Kolors).
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        text_embeds: &Tensor,
        time_ids: &Tensor,
    ) -> Result<Tensor> {
        self.forward_with(
            sample,
            timestep,
            encoder_hidden_states,
            Some((text_embeds, time_ids)),
        )
    }

    /// [`UNet2DConditionModel::forward`] with the added conditions optional (required only by
    /// `text_time` models).
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let batch = self.check_inputs(sample, timestep, encoder_hidden_states, added)?;
        let sample = sample.to_dtype(self.dtype)?;
        let sample = if self.cfg.center_input_sample {
            sample.affine(2.0, -1.0)?
        } else {
            sample
        };
        let emb = self.embedding(timestep, batch, added)?;
        let temb = emb.silu()?;
        let temb = Some(&temb);
        let ehs = encoder_hidden_states.to_dtype(self.dtype)?;
        let text = match &self.encoder_hid_proj {
            Some(p) => p.forward(&ehs)?,
            None => ehs,
        };

        let up_factor = 1usize << self.up_blocks.len().saturating_sub(1);
        let (_, _, h, w) = sample.dims4()?;
        let forward_upsample_size = !h.is_multiple_of(up_factor) || !w.is_multiple_of(up_factor);

        let mut x = self.conv_in.forward(&sample)?;
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            let (y, res) = block.forward(&x, temb, &text)?;
            x = y;
            skips.extend(res);
        }
        if let Some(mid) = &self.mid_block {
            x = mid.forward(&x, temb, &text)?;
        }
        let n_up = self.up_blocks.len();
        for (i, block) in self.up_blocks.iter().enumerate() {
            let keep = skips.len().checked_sub(block.num_skips()).ok_or_else(|| {
                ModelError::invalid("UNet", "an up block ran out of skip connections")
            })?;
            let mut mine = skips.split_off(keep);
            let size = if i + 1 < n_up && forward_upsample_size {
                match skips.last() {
                    Some(s) => {
                        let (_, _, sh, sw) = s.dims4()?;
                        Some((sh, sw))
                    }
                    None => None,
                }
            } else {
                None
            };
            x = block.forward(&x, &mut mine, temb, &text, size)?;
        }
        let x = self.conv_norm_out.forward(&x)?.silu()?;
        Ok(self.conv_out.forward(&x)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> UNet2DConditionConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_follow_diffusers_and_kolors_parses() {
        let c = parse("{}");
        assert_eq!(c.block_out_channels, vec![320, 640, 1280, 1280]);
        assert_eq!(c.down_block_types[0], "CrossAttnDownBlock2D");
        assert_eq!(c.layers_per_block, PerBlock::One(2));
        assert_eq!(c.attention_head_dim, PerBlock::One(8));
        assert_eq!(c.norm_num_groups, Some(32));
        assert!(c.flip_sin_to_cos);
        c.validate().unwrap();
        let k = parse(
            r#"{"attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048,
                "encoder_hid_dim": 4096, "encoder_hid_dim_type": "text_proj",
                "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": 5632, "use_linear_projection": true,
                "num_attention_heads": null, "sample_size": 128, "unknown_field": 3}"#,
        );
        k.validate().unwrap();
        let resnet = ResnetSettings {
            temb_channels: Some(1280),
            groups: 32,
            eps: 1e-5,
            output_scale_factor: 1.0,
            scale_shift: false,
        };
        let up = k.up_layouts(resnet).unwrap();
        let att = up[0].attention.as_ref().unwrap();
        assert_eq!((att.heads, att.layers.clone()), (20, vec![10, 10, 10]));
        assert_eq!(up[0].num_layers, 3);
        assert_eq!((up[2].in_channels, up[2].prev_output_channel), (320, 640));
        assert!(up[2].attention.is_none());
        let down = k.down_layouts(resnet).unwrap();
        assert_eq!(down[1].attention.as_ref().unwrap().layers, vec![2, 2]);
        assert_eq!(k.mid_attention().unwrap().layers, vec![10]);
        assert_eq!(k.text_width(), 4096);
    }

    #[test]
    fn nested_layer_counts_need_the_reverse_list() {
        let base = r#""down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [32, 64], "norm_num_groups": 8, "attention_head_dim": [2, 4],
            "layers_per_block": 1, "sample_size": [32, 48]"#;
        let c = parse(&format!(
            r#"{{{base}, "transformer_layers_per_block": [[1], [3]]}}"#
        ));
        match c.validate() {
            Err(ModelError::UnsupportedConfig { field, .. }) => {
                assert_eq!(field, "reverse_transformer_layers_per_block")
            }
            other => panic!("{other:?}"),
        }
        let c = parse(&format!(
            r#"{{{base}, "transformer_layers_per_block": [[1], [3]],
                "reverse_transformer_layers_per_block": [[4, 5], [6, 7]]}}"#
        ));
        c.validate().unwrap();
        let resnet = ResnetSettings {
            temb_channels: Some(128),
            groups: 8,
            eps: 1e-5,
            output_scale_factor: 1.0,
            scale_shift: false,
        };
        let down = c.down_layouts(resnet).unwrap();
        assert_eq!(down[1].attention.as_ref().unwrap().layers, vec![3]);
        let up = c.up_layouts(resnet).unwrap();
        assert_eq!(up[0].attention.as_ref().unwrap().layers, vec![4, 5]);
        assert_eq!(up[1].attention.as_ref().unwrap().layers, vec![6, 7]);
        assert_eq!(c.mid_attention().unwrap().layers, vec![3]);
    }

    #[test]
    fn unsupported_settings_name_the_field() {
        let cases = [
            (r#"{"class_embed_type": "timestep"}"#, "class_embed_type"),
            (r#"{"addition_embed_type": "text"}"#, "addition_embed_type"),
            (
                r#"{"encoder_hid_dim": 8, "encoder_hid_dim_type": "image_proj"}"#,
                "encoder_hid_dim_type",
            ),
            (r#"{"num_attention_heads": 8}"#, "num_attention_heads"),
            (
                r#"{"down_block_types": ["AttnDownBlock2D"]}"#,
                "down_block_types",
            ),
            (
                r#"{"attention_head_dim": [3, 8, 8, 8]}"#,
                "attention_head_dim",
            ),
            (r#"{"time_cond_proj_dim": 256}"#, "time_cond_proj_dim"),
        ];
        for (json, field) in cases {
            match parse(json).validate() {
                Err(ModelError::UnsupportedConfig { field: f, .. }) => {
                    assert_eq!(f, field, "{json}")
                }
                other => panic!("{json}: {other:?}"),
            }
        }
    }
}
