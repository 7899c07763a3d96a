//! The SDXL-topology convolutional UNet (diffusers `UNet2DConditionModel`), as Kolors uses it
//! (models-spec §4.3).
//!
//! Reference: diffusers 0.42.1 `models/unets/unet_2d_condition.py` (the model),
//! `models/unets/unet_2d_blocks.py` (`DownBlock2D`, `CrossAttnDownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D`, `UpBlock2D`), `models/resnet.py`
//! (`ResnetBlock2D`), `models/downsampling.py` / `upsampling.py` (`Downsample2D`, `Upsample2D`),
//! `models/transformers/transformer_2d.py` (`Transformer2DModel`, continuous input),
//! `models/attention.py` (`BasicTransformerBlock`, `FeedForward` with `GEGLU`) and
//! `models/embeddings.py` (`Timesteps`, `TimestepEmbedding`).
//!
//! - [`unet_2d_condition`]: the configuration ([`UNet2DConditionConfig`], read from
//!   `unet/config.json`) and the model ([`UNet2DConditionModel`]).
//! - [`blocks`]: the down, mid and up blocks.
//! - [`resnet`]: `ResnetBlock2D` with its time-embedding projection, `Downsample2D`,
//!   `Upsample2D`.
//! - [`transformer_2d`]: `Transformer2DModel` (group norm, linear or 1×1 projections) and its
//!   `BasicTransformerBlock`s (self-attention, cross-attention, GEGLU feed-forward).
//!
//! Tensor parallelism ([`UNet2DConditionModel::load_sharded`]): each of `N` ranks holds
//! `heads / N` heads of every attention (`to_q/to_k/to_v` column-parallel, `to_out.0`
//! row-parallel) and `4·dim / N` GEGLU columns (`ff.net.0.proj` column-parallel in both of its
//! halves, `ff.net.2` row-parallel); one all-reduce follows each row-parallel projection (three
//! per transformer block), whose bias rank 0 adds. Convolutions, resnets, group and layer
//! norms, the transformers' `proj_in`/`proj_out` and the embeddings are replicated, so every
//! rank holds the full activations and produces the full output.
//!
//! Usage (CLI): `relayfarm render --model Kolors-diffusers --prompt "..." --output x.png`.

pub mod blocks;
pub mod resnet;
pub mod transformer_2d;
pub mod unet_2d_condition;

pub use unet_2d_condition::{
    LayersPerTransformer, PerBlock, UNet2DConditionConfig, UNet2DConditionModel, ACCEPTED_CLASSES,
};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::denoiser::fused::FusedLinear;
use crate::parallel::ShardedWeights;
use crate::Result;

/// Where the weights come from: the whole checkpoint, or one tensor-parallel rank's slices.
#[derive(Clone)]
pub(crate) enum WeightSource<'a> {
    /// Every tensor whole.
    Whole(VarBuilder<'a>),
    /// This rank's slices of the split weights; replicated ones whole.
    Shard(ShardedWeights),
}

impl<'a> WeightSource<'a> {
    /// The source under `name` (`pp("down_blocks").pp(1)` → `down_blocks.1.`).
    pub(crate) fn pp(&self, name: impl ToString) -> Self {
        match self {
            WeightSource::Whole(vb) => WeightSource::Whole(vb.pp(name)),
            WeightSource::Shard(sw) => WeightSource::Shard(sw.pp(name)),
        }
    }

    /// Whole tensors under this prefix, for replicated layers.
    pub(crate) fn vb(&self) -> VarBuilder<'a> {
        match self {
            WeightSource::Whole(vb) => vb.clone(),
            WeightSource::Shard(sw) => sw.var_builder(),
        }
    }

    /// The dtype tensors are converted to.
    pub(crate) fn dtype(&self) -> DType {
        match self {
            WeightSource::Whole(vb) => vb.dtype(),
            WeightSource::Shard(sw) => sw.dtype(),
        }
    }

    /// The device tensors are placed on.
    pub(crate) fn device(&self) -> &Device {
        match self {
            WeightSource::Whole(vb) => vb.device(),
            WeightSource::Shard(sw) => sw.device(),
        }
    }

    /// Ranks sharing the split weights (1 for a whole checkpoint).
    pub(crate) fn world(&self) -> usize {
        match self {
            WeightSource::Whole(_) => 1,
            WeightSource::Shard(sw) => sw.shard().world,
        }
    }

    /// A replicated tensor.
    pub(crate) fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        match self {
            WeightSource::Whole(vb) => Ok(vb.get(shape, name)?),
            WeightSource::Shard(sw) => sw.get(shape, name),
        }
    }

    /// A replicated linear layer (`weight` `[out, in]`, optional `bias`).
    pub(crate) fn linear(&self, in_dim: usize, out_dim: usize, bias: bool) -> Result<FusedLinear> {
        FusedLinear::load(in_dim, out_dim, bias, self.vb())
    }

    /// A column-parallel linear layer: this rank's output rows (and bias entries).
    pub(crate) fn column(&self, in_dim: usize, out_dim: usize, bias: bool) -> Result<FusedLinear> {
        match self {
            WeightSource::Whole(vb) => FusedLinear::load(in_dim, out_dim, bias, vb.clone()),
            WeightSource::Shard(sw) => {
                let b = if bias {
                    Some(sw.column_bias(out_dim, "bias")?)
                } else {
                    None
                };
                FusedLinear::new(sw.column_weight(out_dim, in_dim, "weight")?, b)
            }
        }
    }

    /// A column-parallel linear layer whose `out_dim` outputs are `chunks` equal blocks (GEGLU's
    /// `[hidden; gate]`): this rank's part of each block, the blocks kept in order, so that
    /// output `j` of block 0 and output `j` of block 1 stay paired.
    ///
    /// The safetensors slicing API reads one contiguous range per leading index, so the whole
    /// tensor is read here and narrowed (a transient copy; only the slices are kept).
    pub(crate) fn column_chunks(
        &self,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        chunks: usize,
    ) -> Result<FusedLinear> {
        let sw = match self {
            WeightSource::Whole(vb) => {
                return FusedLinear::load(in_dim, out_dim, bias, vb.clone());
            }
            WeightSource::Shard(sw) => sw,
        };
        // Only this rank's rows of each block are read from the checkpoint.
        let w = sw.get_split_chunks((out_dim, in_dim), "weight", Some(0), chunks)?;
        let b = if bias {
            Some(sw.get_split_chunks(out_dim, "bias", Some(0), chunks)?)
        } else {
            None
        };
        FusedLinear::new(w, b)
    }

    /// A row-parallel linear layer: this rank's input columns; the bias on rank 0 only.
    pub(crate) fn row(&self, in_dim: usize, out_dim: usize, bias: bool) -> Result<FusedLinear> {
        match self {
            WeightSource::Whole(vb) => FusedLinear::load(in_dim, out_dim, bias, vb.clone()),
            WeightSource::Shard(sw) => {
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

/// Bytes of a tensor's elements.
pub(crate) fn bytes_of(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}
