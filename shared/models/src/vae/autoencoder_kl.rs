//! `AutoencoderKL`: the 2-D KL-regularised VAE (SDXL VAE for PixArt-Σ and Kolors, the
//! 16-channel VAE of CogView3-Plus).
//!
//! Reference: diffusers `models/autoencoders/autoencoder_kl.py` (`AutoencoderKL`) and
//! `models/autoencoders/vae.py` (`Encoder`, `Decoder`, `DiagonalGaussianDistribution`).
//!
//! ```text
//! cargo test -p relayfarm-models --test vae_parity
//! ```

use super::decoder::Decoder;
use super::encoder::Encoder;
use crate::checkpoint::ComponentFolder;
use crate::{ModelError, Result, RunDtype};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, VarBuilder};
use serde::Deserialize;

const COMPONENT: &str = "AutoencoderKL";
const CLASS_NAME: &str = "AutoencoderKL";
const DOWN_BLOCK: &str = "DownEncoderBlock2D";
const UP_BLOCK: &str = "UpDecoderBlock2D";

/// `vae/config.json` of an `AutoencoderKL`, with diffusers' defaults for missing fields.
/// Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AutoencoderKLConfig {
    /// `_class_name`; must be `AutoencoderKL` when present.
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// Image channels in (3).
    #[serde(default = "default_three")]
    pub in_channels: usize,
    /// Image channels out (3).
    #[serde(default = "default_three")]
    pub out_channels: usize,
    /// Encoder block types; only `DownEncoderBlock2D` is implemented.
    #[serde(default = "default_down_blocks")]
    pub down_block_types: Vec<String>,
    /// Decoder block types; only `UpDecoderBlock2D` is implemented.
    #[serde(default = "default_up_blocks")]
    pub up_block_types: Vec<String>,
    /// Channels of each resolution level, from the image side.
    #[serde(default = "default_block_out")]
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (decoder blocks have one more).
    #[serde(default = "default_layers")]
    pub layers_per_block: usize,
    /// Activation; only `silu` (alias `swish`) is implemented.
    #[serde(default = "default_act")]
    pub act_fn: String,
    /// Latent channels (4 for SDXL, 16 for CogView3-Plus).
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    /// Groups of every group norm.
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    /// Tile size in pixels (a list in some configs; the first entry is kept).
    #[serde(default = "default_sample_size", deserialize_with = "de_sample_size")]
    pub sample_size: usize,
    /// Latents are `scaling_factor · (z − shift_factor)`.
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    /// Optional latent shift (none for SDXL).
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Per-channel latent means (some checkpoints; used by pipelines, not by the VAE).
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    /// Per-channel latent standard deviations (some checkpoints).
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// Whether the reference runs this VAE in f32 even in half-precision pipelines.
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    /// Whether the 1×1 `quant_conv` follows the encoder.
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    /// Whether the 1×1 `post_quant_conv` precedes the decoder.
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks hold a self-attention layer.
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

fn default_three() -> usize {
    3
}
fn default_down_blocks() -> Vec<String> {
    vec![DOWN_BLOCK.to_string()]
}
fn default_up_blocks() -> Vec<String> {
    vec![UP_BLOCK.to_string()]
}
fn default_block_out() -> Vec<usize> {
    vec![64]
}
fn default_layers() -> usize {
    1
}
fn default_act() -> String {
    "silu".to_string()
}
fn default_latent_channels() -> usize {
    4
}
fn default_groups() -> usize {
    32
}
fn default_sample_size() -> usize {
    32
}
fn default_scaling() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}

fn de_sample_size<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum SampleSize {
        One(usize),
        Many(Vec<usize>),
    }
    match SampleSize::deserialize(d)? {
        SampleSize::One(n) => Ok(n),
        SampleSize::Many(v) => v
            .first()
            .copied()
            .ok_or_else(|| serde::de::Error::custom("`sample_size` is an empty list")),
    }
}

impl Default for AutoencoderKLConfig {
    /// diffusers' constructor defaults.
    fn default() -> Self {
        AutoencoderKLConfig {
            class_name: None,
            in_channels: 3,
            out_channels: 3,
            down_block_types: default_down_blocks(),
            up_block_types: default_up_blocks(),
            block_out_channels: default_block_out(),
            layers_per_block: 1,
            act_fn: default_act(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: 32,
            scaling_factor: default_scaling(),
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

fn unsupported(field: &str, value: impl std::fmt::Display, hint: impl Into<String>) -> ModelError {
    ModelError::UnsupportedConfig {
        component: COMPONENT.to_string(),
        field: field.to_string(),
        value: value.to_string(),
        hint: hint.into(),
    }
}

impl AutoencoderKLConfig {
    /// The SDXL VAE (PixArt-Σ, Kolors): channels (128, 256, 512, 512), 2 layers, 4 latent
    /// channels, scaling factor 0.13025.
    pub fn sdxl() -> Self {
        AutoencoderKLConfig {
            down_block_types: vec![DOWN_BLOCK.to_string(); 4],
            up_block_types: vec![UP_BLOCK.to_string(); 4],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            sample_size: 1024,
            scaling_factor: 0.13025,
            force_upcast: false,
            ..Default::default()
        }
    }

    /// Checks every setting this implementation depends on.
    pub fn validate(&self) -> Result<()> {
        if let Some(class) = &self.class_name {
            if class != CLASS_NAME {
                return Err(ModelError::UnknownClass {
                    what: "VAE".to_string(),
                    class: class.clone(),
                    supported: CLASS_NAME.to_string(),
                });
            }
        }
        if !matches!(self.act_fn.as_str(), "silu" | "swish") {
            return Err(unsupported(
                "act_fn",
                &self.act_fn,
                "supported values: \"silu\" (alias \"swish\")",
            ));
        }
        let levels = self.block_out_channels.len();
        if levels == 0 {
            return Err(unsupported(
                "block_out_channels",
                "[]",
                "at least one level is needed",
            ));
        }
        for (field, types, want) in [
            ("down_block_types", &self.down_block_types, DOWN_BLOCK),
            ("up_block_types", &self.up_block_types, UP_BLOCK),
        ] {
            if types.len() != levels {
                return Err(unsupported(
                    field,
                    format!("{types:?}"),
                    format!("needs one entry per block_out_channels entry ({levels})"),
                ));
            }
            if let Some(bad) = types
                .iter()
                .find(|t| t.strip_prefix("UNetRes").unwrap_or(t) != want)
            {
                return Err(unsupported(
                    field,
                    bad,
                    format!("supported values: \"{want}\""),
                ));
            }
        }
        if self.norm_num_groups == 0 {
            return Err(unsupported("norm_num_groups", 0, "must be positive"));
        }
        if let Some(&c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c == 0 || c % self.norm_num_groups != 0)
        {
            return Err(unsupported(
                "block_out_channels",
                c,
                format!(
                    "every entry must be a positive multiple of norm_num_groups ({})",
                    self.norm_num_groups
                ),
            ));
        }
        for (field, v) in [
            ("layers_per_block", self.layers_per_block),
            ("latent_channels", self.latent_channels),
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
        ] {
            if v == 0 {
                return Err(unsupported(field, v, "must be positive"));
            }
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor != 0.0) {
            return Err(unsupported(
                "scaling_factor",
                self.scaling_factor,
                "must be finite and non-zero",
            ));
        }
        Ok(())
    }

    /// The spatial factor between image and latents: `2^(levels − 1)` (8 for SDXL).
    pub fn downscale_factor(&self) -> usize {
        1usize << self.block_out_channels.len().saturating_sub(1)
    }
}

/// The encoder's posterior: a diagonal Gaussian with `logvar` clamped to `[−30, 20]`.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    mean: Tensor,
    logvar: Tensor,
}

impl DiagonalGaussian {
    /// Splits `[B, 2·C, h, w]` moments into mean and (clamped) log-variance.
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let chunks = moments.chunk(2, 1)?;
        let (mean, logvar) = match chunks.as_slice() {
            [m, l] => (m.clone(), l.clamp(-30f32, 20f32)?),
            _ => {
                return Err(ModelError::invalid(
                    "moments",
                    format!(
                        "expected an even channel count, got shape {:?}",
                        moments.dims()
                    ),
                ))
            }
        };
        Ok(DiagonalGaussian { mean, logvar })
    }

    /// The mean (the mode; what pipelines use for deterministic encoding).
    pub fn mean(&self) -> &Tensor {
        &self.mean
    }

    /// The clamped log-variance.
    pub fn logvar(&self) -> &Tensor {
        &self.logvar
    }

    /// The standard deviation `exp(logvar / 2)`.
    pub fn std(&self) -> Result<Tensor> {
        Ok((&self.logvar * 0.5)?.exp()?)
    }

    /// A sample `mean + std · noise`, `noise` standard normal with the mean's shape.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        let noise = noise.to_dtype(self.mean.dtype())?;
        Ok((&self.mean + (self.std()? * noise)?)?)
    }
}

/// The 2-D AutoencoderKL (keys `encoder.*`, `decoder.*`, `quant_conv`, `post_quant_conv`).
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: AutoencoderKLConfig,
    dtype: DType,
}

impl AutoencoderKL {
    /// Builds the model from `cfg` (validated here) and the weights under `vb`.
    pub fn new(cfg: &AutoencoderKLConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let encoder = Encoder::new(cfg, vb.pp("encoder"))?;
        let decoder = Decoder::new(cfg, vb.pp("decoder"))?;
        let lc = cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(candle_nn::conv2d(
                2 * lc,
                2 * lc,
                1,
                Default::default(),
                vb.pp("quant_conv"),
            )?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(candle_nn::conv2d(
                lc,
                lc,
                1,
                Default::default(),
                vb.pp("post_quant_conv"),
            )?)
        } else {
            None
        };
        Ok(AutoencoderKL {
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
            config: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    /// Loads the component folder (`config.json` plus weights) in `dtype` on `device`.
    ///
    /// The dtype is used as given: when `config().force_upcast` is set, the reference
    /// pipelines run this VAE in f32 even in half precision, and so should the caller.
    pub fn load(component: &ComponentFolder, dtype: RunDtype, device: &Device) -> Result<Self> {
        let cfg: AutoencoderKLConfig = component.config()?;
        cfg.validate()?;
        let vb = component.var_builder(dtype, device, None)?;
        Self::new(&cfg, vb)
    }

    /// The configuration.
    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// The dtype the weights run in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The spatial factor between image and latents (8 for SDXL).
    pub fn downscale_factor(&self) -> usize {
        self.config.downscale_factor()
    }

    fn check_input(&self, x: &Tensor, field: &str, channels: usize) -> Result<()> {
        match x.dims() {
            [_, c, _, _] if *c == channels => Ok(()),
            dims => Err(ModelError::invalid(
                field,
                format!("expected shape [B, {channels}, H, W], got {dims:?}"),
            )),
        }
    }

    /// Encodes images `[B, in_channels, H, W]` (values in [−1, 1]) to the posterior over
    /// `[B, latent_channels, H/f, W/f]` (unscaled; see [`AutoencoderKL::latents_from_sample`]).
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        self.check_input(x, "image", self.config.in_channels)?;
        let x = x.to_dtype(self.dtype)?;
        let h = self.encoder.forward(&x);
        super::conv::release_scratch();
        let mut h = h?;
        if let Some(conv) = &self.quant_conv {
            h = conv.forward(&h)?;
        }
        DiagonalGaussian::from_moments(&h)
    }

    /// Decodes raw latents `z` `[B, latent_channels, h, w]` (already divided by the scaling
    /// factor) to images `[B, out_channels, h·f, w·f]` in about [−1, 1], in the run dtype.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.check_input(z, "latents", self.config.latent_channels)?;
        let mut z = z.to_dtype(self.dtype)?;
        if let Some(conv) = &self.post_quant_conv {
            z = conv.forward(&z)?;
        }
        let out = self.decoder.forward(&z);
        super::conv::release_scratch();
        out
    }

    /// Decodes diffusion latents: `decode(latents / scaling_factor + shift_factor)`.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let mut z = (latents / self.config.scaling_factor)?;
        if let Some(shift) = self.config.shift_factor {
            z = (z + shift)?;
        }
        self.decode(&z)
    }

    /// Turns an encoder sample (or mean) into diffusion latents:
    /// `(z − shift_factor) · scaling_factor`.
    pub fn latents_from_sample(&self, z: &Tensor) -> Result<Tensor> {
        let z = match self.config.shift_factor {
            Some(shift) => (z - shift)?,
            None => z.clone(),
        };
        Ok((z * self.config.scaling_factor)?)
    }
}
