//! Building blocks of the 2-D VAE: group norm (+SiLU), the resnet block, the down- and
//! upsamplers, the single-head mid-block attention and the mid block itself.
//!
//! Reference: diffusers `models/resnet.py` (`ResnetBlock2D`), `downsampling.py` (`Downsample2D`),
//! `upsampling.py` (`Upsample2D`), `attention_processor.py` (`Attention` with `group_norm`,
//! `AttnProcessor2_0`) and `unets/unet_2d_blocks.py` (`UNetMidBlock2D`).

use super::conv::ConvSame;
use super::group_norm::GroupNorm;
use crate::nn::attention::scaled_dot_product_attention;
use crate::Result;
use candle_core::{DType, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder};

/// The epsilon of every group norm in the VAE (`resnet_eps` in diffusers).
pub(crate) const VAE_NORM_EPS: f64 = 1e-6;

/// Upper bound on the elements of one attention score block (`chunk × L`), so that the
/// mid-block attention at 1024² and above never materialises the full `L × L` matrix.
const MAX_SCORE_ELEMENTS: usize = 1 << 26;

/// `ResnetBlock2D` without time embedding: `x + conv2(silu(gn2(conv1(silu(gn1(x))))))`, with a
/// 1×1 `conv_shortcut` on `x` when the channel count changes.
#[derive(Debug, Clone)]
pub(crate) struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: ConvSame,
    norm2: GroupNorm,
    conv2: ConvSame,
    conv_shortcut: Option<ConvSame>,
}

impl ResnetBlock2D {
    /// Builds the block; keys `norm1`, `conv1`, `norm2`, `conv2` and (if the channel count
    /// changes) `conv_shortcut`.
    pub(crate) fn new(
        in_channels: usize,
        out_channels: usize,
        groups: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let norm1 = GroupNorm::new(groups, in_channels, VAE_NORM_EPS, vb.pp("norm1"))?;
        let conv1 = ConvSame::new(in_channels, out_channels, 3, vb.pp("conv1"))?;
        let norm2 = GroupNorm::new(groups, out_channels, VAE_NORM_EPS, vb.pp("norm2"))?;
        let conv2 = ConvSame::new(out_channels, out_channels, 3, vb.pp("conv2"))?;
        let conv_shortcut = if in_channels != out_channels {
            Some(ConvSame::new(
                in_channels,
                out_channels,
                1,
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(ResnetBlock2D {
            norm1,
            conv1,
            norm2,
            conv2,
            conv_shortcut,
        })
    }

    /// Applies the block to `[B, C_in, H, W]`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Re-assigning one binding lets each intermediate go as soon as the next exists.
        // Each group norm + SiLU happens while the next convolution builds its padded input,
        // and the residual add inside conv2 (its accumulator starts at bias + residual).
        let h = self.conv1.forward_normed(x, &self.norm1, None)?;
        match &self.conv_shortcut {
            Some(conv) => {
                let shortcut = conv.forward(x)?;
                self.conv2.forward_normed(&h, &self.norm2, Some(&shortcut))
            }
            None => self.conv2.forward_normed(&h, &self.norm2, Some(x)),
        }
    }
}

/// `Downsample2D(use_conv=True, padding=0)`: zero-pad right and bottom by one, then a 3×3
/// stride-2 convolution without padding (key `conv`).
#[derive(Debug, Clone)]
pub(crate) struct Downsample2D {
    conv: Conv2d,
}

impl Downsample2D {
    /// Builds the downsampler (`channels` in and out).
    pub(crate) fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 0,
            stride: 2,
            ..Default::default()
        };
        let conv = candle_nn::conv2d(channels, channels, 3, cfg, vb.pp("conv"))?;
        Ok(Downsample2D { conv })
    }

    /// Halves the spatial size (rounding as diffusers does).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let padded = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
        Ok(self.conv.forward(&padded)?)
    }
}

/// `Upsample2D(use_conv=True)`: nearest-neighbour ×2, then a 3×3 convolution (key `conv`).
#[derive(Debug, Clone)]
pub(crate) struct Upsample2D {
    conv: ConvSame,
}

impl Upsample2D {
    /// Builds the upsampler (`channels` in and out).
    pub(crate) fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        let conv = ConvSame::new(channels, channels, 3, vb.pp("conv"))?;
        Ok(Upsample2D { conv })
    }

    /// Doubles the spatial size (the upsampled input is only ever built padded, inside the
    /// convolution).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward_upsampled(x)
    }
}

/// The mid-block self-attention over the `H·W` positions: group norm, `to_q`/`to_k`/`to_v`,
/// one head per `channels` (diffusers sets `attention_head_dim = channels`), `to_out.0`, plus
/// the residual. Checkpoints with the deprecated names (`query`, `key`, `value`, `proj_attn`)
/// are read too, as diffusers converts them on load.
#[derive(Debug, Clone)]
pub(crate) struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    channels: usize,
}

impl VaeAttention {
    /// Builds the attention block for `channels` channels.
    pub(crate) fn new(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let group_norm = GroupNorm::new(groups, channels, VAE_NORM_EPS, vb.pp("group_norm"))?;
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let names = if legacy {
            ["query", "key", "value", "proj_attn"]
        } else {
            ["to_q", "to_k", "to_v", "to_out.0"]
        };
        let to_q = candle_nn::linear(channels, channels, vb.pp(names[0]))?;
        let to_k = candle_nn::linear(channels, channels, vb.pp(names[1]))?;
        let to_v = candle_nn::linear(channels, channels, vb.pp(names[2]))?;
        let to_out = candle_nn::linear(channels, channels, vb.pp(names[3]))?;
        Ok(VaeAttention {
            group_norm,
            to_q,
            to_k,
            to_v,
            to_out,
            channels,
        })
    }

    /// Applies attention plus residual to `[B, C, H, W]`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let len = h * w;
        // [B, C, H, W] -> [B, L, C]
        let normed = self
            .group_norm
            .forward(x, false)?
            .reshape((b, c, len))?
            .transpose(1, 2)?
            .contiguous()?;
        // The softmax runs in f32 whatever the run dtype (diffusers' `upcast_softmax`).
        let dtype = x.dtype();
        let q = self
            .to_q
            .forward(&normed)?
            .to_dtype(DType::F32)?
            .unsqueeze(1)?;
        let k = self
            .to_k
            .forward(&normed)?
            .to_dtype(DType::F32)?
            .unsqueeze(1)?;
        let v = self
            .to_v
            .forward(&normed)?
            .to_dtype(DType::F32)?
            .unsqueeze(1)?;
        drop(normed);
        let scale = 1.0 / (self.channels as f64).sqrt();
        let chunk = (MAX_SCORE_ELEMENTS / len.max(1)).clamp(1, len.max(1));
        let attn = if chunk >= len {
            scaled_dot_product_attention(&q, &k, &v, None, scale)?
        } else {
            let mut parts = Vec::with_capacity(len.div_ceil(chunk));
            let mut start = 0;
            while start < len {
                let n = chunk.min(len - start);
                let qc = q.narrow(2, start, n)?;
                parts.push(scaled_dot_product_attention(&qc, &k, &v, None, scale)?);
                start += n;
            }
            Tensor::cat(&parts, 2)?
        };
        drop((q, k, v));
        // [B, 1, L, C] -> [B, L, C] -> to_out -> [B, C, H, W]
        let out = self
            .to_out
            .forward(&attn.squeeze(1)?.to_dtype(dtype)?)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        Ok((out + x)?)
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, optional attention, resnet.
#[derive(Debug, Clone)]
pub(crate) struct MidBlock2D {
    resnet0: ResnetBlock2D,
    attention: Option<VaeAttention>,
    resnet1: ResnetBlock2D,
}

impl MidBlock2D {
    /// Builds the mid block (`resnets.0`, `attentions.0`, `resnets.1`).
    pub(crate) fn new(
        channels: usize,
        groups: usize,
        add_attention: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let resnet0 = ResnetBlock2D::new(channels, channels, groups, vb.pp("resnets.0"))?;
        let attention = if add_attention {
            Some(VaeAttention::new(channels, groups, vb.pp("attentions.0"))?)
        } else {
            None
        };
        let resnet1 = ResnetBlock2D::new(channels, channels, groups, vb.pp("resnets.1"))?;
        Ok(MidBlock2D {
            resnet0,
            attention,
            resnet1,
        })
    }

    /// Applies the block.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet0.forward(x)?;
        if let Some(attention) = &self.attention {
            h = attention.forward(&h)?;
        }
        self.resnet1.forward(&h)
    }
}
