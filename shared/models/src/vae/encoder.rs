//! The VAE encoder: image `[B, C_in, H, W]` to the moments `[B, 2·latent, H/f, W/f]`.
//!
//! Reference: diffusers `models/autoencoders/vae.py` (`Encoder`) and
//! `unets/unet_2d_blocks.py` (`DownEncoderBlock2D`).

use super::autoencoder_kl::AutoencoderKLConfig;
use super::conv::ConvSame;
use super::group_norm::GroupNorm;
use super::resnet::{Downsample2D, MidBlock2D, ResnetBlock2D, VAE_NORM_EPS};
use crate::Result;
use candle_core::Tensor;
use candle_nn::VarBuilder;

/// `DownEncoderBlock2D`: `layers_per_block` resnets, then a downsampler except in the last block.
#[derive(Debug, Clone)]
struct DownEncoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

impl DownEncoderBlock2D {
    fn new(
        in_channels: usize,
        out_channels: usize,
        cfg: &AutoencoderKLConfig,
        add_downsample: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let resnets = (0..cfg.layers_per_block)
            .map(|j| {
                let cin = if j == 0 { in_channels } else { out_channels };
                ResnetBlock2D::new(
                    cin,
                    out_channels,
                    cfg.norm_num_groups,
                    vb.pp(format!("resnets.{j}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let downsampler = if add_downsample {
            Some(Downsample2D::new(out_channels, vb.pp("downsamplers.0"))?)
        } else {
            None
        };
        Ok(DownEncoderBlock2D {
            resnets,
            downsampler,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for resnet in &self.resnets {
            h = resnet.forward(&h)?;
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h)?;
        }
        Ok(h)
    }
}

/// The encoder (`double_z`: it outputs mean and log-variance stacked on the channel axis).
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: ConvSame,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: MidBlock2D,
    conv_norm_out: GroupNorm,
    conv_out: ConvSame,
}

impl Encoder {
    /// Builds the encoder from a validated config; `vb` points at `encoder`.
    pub fn new(cfg: &AutoencoderKLConfig, vb: VarBuilder) -> Result<Self> {
        let channels = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let conv_in = ConvSame::new(cfg.in_channels, channels[0], 3, vb.pp("conv_in"))?;
        let mut down_blocks = Vec::with_capacity(channels.len());
        let mut out_ch = channels[0];
        for (i, &ch) in channels.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = ch;
            let is_final = i + 1 == channels.len();
            down_blocks.push(DownEncoderBlock2D::new(
                in_ch,
                out_ch,
                cfg,
                !is_final,
                vb.pp(format!("down_blocks.{i}")),
            )?);
        }
        let last = out_ch;
        let mid_block = MidBlock2D::new(
            last,
            groups,
            cfg.mid_block_add_attention,
            vb.pp("mid_block"),
        )?;
        let conv_norm_out = GroupNorm::new(groups, last, VAE_NORM_EPS, vb.pp("conv_norm_out"))?;
        let conv_out = ConvSame::new(last, 2 * cfg.latent_channels, 3, vb.pp("conv_out"))?;
        Ok(Encoder {
            conv_in,
            down_blocks,
            mid_block,
            conv_norm_out,
            conv_out,
        })
    }

    /// Encodes `[B, C_in, H, W]` to `[B, 2·latent_channels, H/f, W/f]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for block in &self.down_blocks {
            h = block.forward(&h)?;
        }
        h = self.mid_block.forward(&h)?;
        self.conv_out.forward_normed(&h, &self.conv_norm_out, None)
    }
}
