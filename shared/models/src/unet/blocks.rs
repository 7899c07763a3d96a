//! The UNet's down, mid and up blocks.
//!
//! Reference: diffusers `models/unets/unet_2d_blocks.py`:
//! - [`DownBlock`]: `DownBlock2D` (resnets only) and `CrossAttnDownBlock2D` (each resnet followed
//!   by a `Transformer2DModel`); every resnet (/attention) output is a skip connection, and so is
//!   the downsampler's output.
//! - [`MidBlock`]: `UNetMidBlock2DCrossAttn`: resnet, then (attention, resnet) pairs.
//! - [`UpBlock`]: `UpBlock2D` / `CrossAttnUpBlock2D`: each resnet reads the running state
//!   concatenated (channels) with the most recent unused skip connection; optional upsampler,
//!   to twice the size or to the size of the next skip connection.

use std::sync::Arc;

use candle_core::Tensor;

use super::resnet::{Downsample2D, ResnetBlock2D, ResnetSettings, Upsample2D};
use super::transformer_2d::{Transformer2DModel, Transformer2DShape};
use super::WeightSource;
use crate::parallel::{Collective, WeightFootprint};
use crate::{ModelError, Result};

/// The cross-attention part of a block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttentionSpec {
    /// Heads of each `Transformer2DModel` (the head width is `out_channels / heads`).
    pub heads: usize,
    /// `BasicTransformerBlock`s of each of the block's `Transformer2DModel`s.
    pub layers: Vec<usize>,
    /// Width of the text states.
    pub cross_attention_dim: usize,
    /// Group-norm groups.
    pub groups: usize,
    /// Linear `proj_in`/`proj_out`.
    pub linear_projection: bool,
}

impl AttentionSpec {
    /// The shape of the `index`-th `Transformer2DModel` of a block with `channels` channels.
    pub fn shape(&self, channels: usize, index: usize) -> Result<Transformer2DShape> {
        if self.heads == 0 || !channels.is_multiple_of(self.heads) {
            return Err(ModelError::invalid(
                "attention_head_dim",
                format!("{channels} channels do not split into {} heads", self.heads),
            ));
        }
        let layers = *self.layers.get(index).ok_or_else(|| {
            ModelError::invalid(
                "transformer_layers_per_block",
                format!("no layer count for attention {index} of a block"),
            )
        })?;
        Ok(Transformer2DShape {
            channels,
            heads: self.heads,
            head_dim: channels / self.heads,
            cross_attention_dim: self.cross_attention_dim,
            layers,
            groups: self.groups,
            linear_projection: self.linear_projection,
        })
    }
}

/// What one down or up block holds.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockSpec {
    /// Resnets (`layers_per_block`, plus one in up blocks).
    pub num_layers: usize,
    /// Channels in (down) or of the matching down block's input (up: `in_channels`).
    pub in_channels: usize,
    /// Channels out.
    pub out_channels: usize,
    /// Up blocks: channels of the running state entering the block.
    pub prev_output_channel: usize,
    /// Adds a downsampler (down blocks) or an upsampler (up blocks).
    pub resample: bool,
    /// `downsample_padding` (down blocks).
    pub downsample_padding: usize,
    /// Resnet settings.
    pub resnet: ResnetSettings,
    /// Cross-attention (`CrossAttn*` blocks), or `None`.
    pub attention: Option<AttentionSpec>,
}

fn load_attentions(
    spec: &Option<AttentionSpec>,
    channels: usize,
    count: usize,
    src: &WeightSource,
    tp: &Option<Arc<dyn Collective>>,
) -> Result<Vec<Transformer2DModel>> {
    let Some(att) = spec else {
        return Ok(Vec::new());
    };
    let a = src.pp("attentions");
    (0..count)
        .map(|i| Transformer2DModel::new(&att.shape(channels, i)?, &a.pp(i), tp.clone()))
        .collect()
}

fn footprint_of(
    resnets: &[ResnetBlock2D],
    attentions: &[Transformer2DModel],
    f: &mut WeightFootprint,
) {
    for r in resnets {
        f.replicated += r.weight_bytes();
    }
    for a in attentions {
        a.footprint(f);
    }
}

/// `DownBlock2D` (no attentions) or `CrossAttnDownBlock2D`.
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    /// Loads the block (keys `resnets.{i}`, `attentions.{i}`, `downsamplers.0`).
    pub(crate) fn new(
        spec: &BlockSpec,
        src: &WeightSource,
        tp: &Option<Arc<dyn Collective>>,
    ) -> Result<Self> {
        let vb = src.vb();
        let resnets = (0..spec.num_layers)
            .map(|i| {
                let cin = if i == 0 {
                    spec.in_channels
                } else {
                    spec.out_channels
                };
                ResnetBlock2D::new(cin, spec.out_channels, spec.resnet, vb.pp("resnets").pp(i))
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions =
            load_attentions(&spec.attention, spec.out_channels, spec.num_layers, src, tp)?;
        let downsampler = if spec.resample {
            Some(Downsample2D::new(
                spec.out_channels,
                spec.out_channels,
                spec.downsample_padding,
                vb.pp("downsamplers").pp(0),
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Applies the block; returns the output and the skip connections it adds, in order.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: Option<&Tensor>,
        text: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = x.clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, temb)?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, text)?;
            }
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h)?;
            skips.push(h.clone());
        }
        Ok((h, skips))
    }

    /// Adds this rank's weight bytes to `f`.
    pub fn footprint(&self, f: &mut WeightFootprint) {
        footprint_of(&self.resnets, &self.attentions, f);
        if let Some(d) = &self.downsampler {
            f.replicated += d.weight_bytes();
        }
    }
}

/// `UNetMidBlock2DCrossAttn` (one attention): resnet, attention, resnet.
#[derive(Debug, Clone)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    /// Loads the mid block of `channels` channels (keys `resnets.{0,1}`, `attentions.0`).
    pub(crate) fn new(
        channels: usize,
        resnet: ResnetSettings,
        attention: &AttentionSpec,
        src: &WeightSource,
        tp: &Option<Arc<dyn Collective>>,
    ) -> Result<Self> {
        let vb = src.vb();
        let resnets = (0..2)
            .map(|i| ResnetBlock2D::new(channels, channels, resnet, vb.pp("resnets").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let attentions = load_attentions(&Some(attention.clone()), channels, 1, src, tp)?;
        Ok(Self {
            resnets,
            attentions,
        })
    }

    /// Applies the block.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>, text: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, temb)?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = attn.forward(&h, text)?;
            h = resnet.forward(&h, temb)?;
        }
        Ok(h)
    }

    /// Adds this rank's weight bytes to `f`.
    pub fn footprint(&self, f: &mut WeightFootprint) {
        footprint_of(&self.resnets, &self.attentions, f);
    }
}

/// `UpBlock2D` (no attentions) or `CrossAttnUpBlock2D`.
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// Loads the block (keys `resnets.{i}`, `attentions.{i}`, `upsamplers.0`).
    pub(crate) fn new(
        spec: &BlockSpec,
        src: &WeightSource,
        tp: &Option<Arc<dyn Collective>>,
    ) -> Result<Self> {
        let vb = src.vb();
        let n = spec.num_layers;
        let resnets = (0..n)
            .map(|i| {
                let skip = if i == n - 1 {
                    spec.in_channels
                } else {
                    spec.out_channels
                };
                let cin = if i == 0 {
                    spec.prev_output_channel
                } else {
                    spec.out_channels
                };
                ResnetBlock2D::new(
                    cin + skip,
                    spec.out_channels,
                    spec.resnet,
                    vb.pp("resnets").pp(i),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = load_attentions(&spec.attention, spec.out_channels, n, src, tp)?;
        let upsampler = if spec.resample {
            Some(Upsample2D::new(
                spec.out_channels,
                spec.out_channels,
                vb.pp("upsamplers").pp(0),
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// Skip connections the block consumes (one per resnet).
    pub fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    /// Applies the block, taking its skip connections from the end of `skips` (the last one
    /// first); `upsample_size` overrides the upsampler's ×2.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: Option<&Tensor>,
        text: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| {
                ModelError::invalid("UNet", "an up block ran out of skip connections")
            })?;
            h = Tensor::cat(&[&h, &skip], 1)?;
            h = resnet.forward(&h, temb)?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, text)?;
            }
        }
        if let Some(up) = &self.upsampler {
            h = up.forward(&h, upsample_size)?;
        }
        Ok(h)
    }

    /// Adds this rank's weight bytes to `f`.
    pub fn footprint(&self, f: &mut WeightFootprint) {
        footprint_of(&self.resnets, &self.attentions, f);
        if let Some(u) = &self.upsampler {
            f.replicated += u.weight_bytes();
        }
    }
}
