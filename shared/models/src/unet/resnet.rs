//! The UNet's convolutional pieces: `ResnetBlock2D` (with the time-embedding projection),
//! `Downsample2D` and `Upsample2D`. All are replicated on every tensor-parallel rank.
//!
//! Reference: diffusers `models/resnet.py: ResnetBlock2D` (`pre_norm`, no up/down inside the
//! block), `models/downsampling.py: Downsample2D(use_conv=True)`,
//! `models/upsampling.py: Upsample2D(use_conv=True)`.

use candle_core::{Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, VarBuilder};

use super::bytes_of;
use crate::denoiser::fused::FusedLinear;
use crate::Result;

/// Settings shared by the resnets of one block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResnetSettings {
    /// Width of the time embedding fed to `time_emb_proj` (`None`: no time embedding).
    pub temb_channels: Option<usize>,
    /// Groups of both group norms.
    pub groups: usize,
    /// Epsilon of both group norms.
    pub eps: f64,
    /// The output is `(shortcut + h) / output_scale_factor`.
    pub output_scale_factor: f64,
    /// `resnet_time_scale_shift = "scale_shift"`: the time embedding gives a scale and a shift
    /// applied after `norm2` (otherwise it is added before `norm2`).
    pub scale_shift: bool,
}

/// Bytes of a convolution's weight and bias.
pub(crate) fn conv_bytes(conv: &Conv2d) -> usize {
    bytes_of(conv.weight()) + conv.bias().map_or(0, bytes_of)
}

/// Bytes of a group norm's scale and shift.
pub(crate) fn group_norm_bytes(channels: usize, dtype_size: usize) -> usize {
    2 * channels * dtype_size
}

/// A `k×k` stride-1 convolution with padding `k/2` (keys `weight`, `bias`).
pub(crate) fn conv_same(cin: usize, cout: usize, k: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: k / 2,
        ..Default::default()
    };
    Ok(candle_nn::conv2d(cin, cout, k, cfg, vb)?)
}

/// diffusers `ResnetBlock2D`: `h = conv1(silu(norm1(x)))`, plus the projected time embedding,
/// `h = conv2(silu(norm2(h)))`, output `(shortcut(x) + h) / output_scale_factor`; `shortcut` is a
/// 1×1 convolution when the channel count changes.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<FusedLinear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    settings: ResnetSettings,
    channels: (usize, usize),
}

impl ResnetBlock2D {
    /// Loads the block (keys `norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2` and, when the
    /// channel count changes, `conv_shortcut`).
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        settings: ResnetSettings,
        vb: VarBuilder,
    ) -> Result<Self> {
        let norm1 =
            candle_nn::group_norm(settings.groups, in_channels, settings.eps, vb.pp("norm1"))?;
        let conv1 = conv_same(in_channels, out_channels, 3, vb.pp("conv1"))?;
        let time_emb_proj = match settings.temb_channels {
            Some(t) => {
                let width = if settings.scale_shift {
                    2 * out_channels
                } else {
                    out_channels
                };
                Some(FusedLinear::load(t, width, true, vb.pp("time_emb_proj"))?)
            }
            None => None,
        };
        let norm2 =
            candle_nn::group_norm(settings.groups, out_channels, settings.eps, vb.pp("norm2"))?;
        let conv2 = conv_same(out_channels, out_channels, 3, vb.pp("conv2"))?;
        let conv_shortcut = if in_channels != out_channels {
            Some(conv_same(
                in_channels,
                out_channels,
                1,
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            settings,
            channels: (in_channels, out_channels),
        })
    }

    /// Applies the block to `x` `[B, C_in, H, W]`; `temb` is the time embedding after its SiLU
    /// (`[B, temb_channels]`), shared by every resnet of the model.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.norm1.forward(x)?.silu()?;
        let mut h = self.conv1.forward(&h)?;
        let t = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => Some(proj.forward(temb)?.unsqueeze(2)?.unsqueeze(3)?),
            _ => None,
        };
        if self.settings.scale_shift {
            h = self.norm2.forward(&h)?;
            if let Some(t) = t {
                let c = self.channels.1;
                let scale = t.narrow(1, 0, c)?;
                let shift = t.narrow(1, c, c)?;
                h = h.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(&shift)?;
            }
        } else {
            if let Some(t) = t {
                h = h.broadcast_add(&t)?;
            }
            h = self.norm2.forward(&h)?;
        }
        let h = self.conv2.forward(&h.silu()?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let out = (shortcut + h)?;
        if self.settings.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            Ok((out / self.settings.output_scale_factor)?)
        }
    }

    /// Bytes of the weights.
    pub fn weight_bytes(&self) -> usize {
        let dsize = self.conv1.weight().dtype().size_in_bytes();
        let mut n = conv_bytes(&self.conv1) + conv_bytes(&self.conv2);
        n += group_norm_bytes(self.channels.0, dsize) + group_norm_bytes(self.channels.1, dsize);
        if let Some(c) = &self.conv_shortcut {
            n += conv_bytes(c);
        }
        if let Some(p) = &self.time_emb_proj {
            let (w, b) = p.byte_sizes();
            n += w + b;
        }
        n
    }
}

/// diffusers `Downsample2D(use_conv=True)`: a 3×3 stride-2 convolution (key `conv`) with
/// `padding` on every side, or, with `padding = 0`, after zero-padding the right and bottom by
/// one.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample2D {
    /// Loads the downsampler (`channels` → `out_channels`).
    pub fn new(
        channels: usize,
        out_channels: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding,
            stride: 2,
            ..Default::default()
        };
        let conv = candle_nn::conv2d(channels, out_channels, 3, cfg, vb.pp("conv"))?;
        Ok(Self {
            conv,
            pad_right_bottom: padding == 0,
        })
    }

    /// Halves the spatial size (`⌈h/2⌉` with the usual padding 1).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_right_bottom {
            let padded = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            return Ok(self.conv.forward(&padded)?);
        }
        Ok(self.conv.forward(x)?)
    }

    /// Bytes of the weights.
    pub fn weight_bytes(&self) -> usize {
        conv_bytes(&self.conv)
    }
}

/// diffusers `Upsample2D(use_conv=True)`: nearest-neighbour upsampling ×2 (or to an explicit
/// size), then a 3×3 convolution (key `conv`).
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    /// Loads the upsampler (`channels` → `out_channels`).
    pub fn new(channels: usize, out_channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv_same(channels, out_channels, 3, vb.pp("conv"))?,
        })
    }

    /// Upsamples `[B, C, H, W]` to `size` (`(2H, 2W)` when `None`), then convolves.
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        let up = x.upsample_nearest2d(th, tw)?;
        Ok(self.conv.forward(&up)?)
    }

    /// Bytes of the weights.
    pub fn weight_bytes(&self) -> usize {
        conv_bytes(&self.conv)
    }
}
