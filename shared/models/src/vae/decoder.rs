//! The VAE decoder: latents `[B, latent, h, w]` to the image `[B, C_out, h·f, w·f]`.
//!
//! Reference: diffusers `models/autoencoders/vae.py` (`Decoder`, `norm_type="group"`) and
//! `unets/unet_2d_blocks.py` (`UpDecoderBlock2D`).

use super::autoencoder_kl::AutoencoderKLConfig;
use super::conv::ConvSame;
use super::group_norm::GroupNorm;
use super::resnet::{MidBlock2D, ResnetBlock2D, Upsample2D, VAE_NORM_EPS};
use crate::Result;
use candle_core::Tensor;
use candle_nn::VarBuilder;

/// `UpDecoderBlock2D`: `layers_per_block + 1` resnets, then an upsampler except in the last block.
#[derive(Debug, Clone)]
struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

impl UpDecoderBlock2D {
    fn new(
        in_channels: usize,
        out_channels: usize,
        cfg: &AutoencoderKLConfig,
        add_upsample: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let resnets = (0..cfg.layers_per_block + 1)
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
        let upsampler = if add_upsample {
            Some(Upsample2D::new(out_channels, vb.pp("upsamplers.0"))?)
        } else {
            None
        };
        Ok(UpDecoderBlock2D { resnets, upsampler })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for resnet in &self.resnets {
            h = resnet.forward(&h)?;
        }
        if let Some(up) = &self.upsampler {
            h = up.forward(&h)?;
        }
        Ok(h)
    }
}

/// The decoder.
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: ConvSame,
    mid_block: MidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: ConvSame,
}

impl Decoder {
    /// Builds the decoder from a validated config; `vb` points at `decoder`.
    pub fn new(cfg: &AutoencoderKLConfig, vb: VarBuilder) -> Result<Self> {
        let reversed: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let groups = cfg.norm_num_groups;
        let top = reversed[0];
        let conv_in = ConvSame::new(cfg.latent_channels, top, 3, vb.pp("conv_in"))?;
        let mid_block =
            MidBlock2D::new(top, groups, cfg.mid_block_add_attention, vb.pp("mid_block"))?;
        let mut up_blocks = Vec::with_capacity(reversed.len());
        let mut out_ch = top;
        for (i, &ch) in reversed.iter().enumerate() {
            let prev = out_ch;
            out_ch = ch;
            let is_final = i + 1 == reversed.len();
            up_blocks.push(UpDecoderBlock2D::new(
                prev,
                out_ch,
                cfg,
                !is_final,
                vb.pp(format!("up_blocks.{i}")),
            )?);
        }
        let bottom = cfg.block_out_channels[0];
        let conv_norm_out = GroupNorm::new(groups, bottom, VAE_NORM_EPS, vb.pp("conv_norm_out"))?;
        let conv_out = ConvSame::new(bottom, cfg.out_channels, 3, vb.pp("conv_out"))?;
        Ok(Decoder {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
        })
    }

    /// Decodes `[B, latent_channels, h, w]` to `[B, out_channels, h·f, w·f]`.
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(z)?;
        h = self.mid_block.forward(&h)?;
        for block in &self.up_blocks {
            h = block.forward(&h)?;
        }
        self.conv_out.forward_normed(&h, &self.conv_norm_out, None)
    }
}
