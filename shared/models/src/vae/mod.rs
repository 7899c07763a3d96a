//! Variational autoencoders between pixels and latents.
//!
//! - [`AutoencoderKL`]: the 2-D KL VAE (SDXL VAE for PixArt-Σ and Kolors; the 16-channel VAE
//!   of CogView3-Plus), read from a diffusers `vae/` folder.

pub mod autoencoder_kl;
mod conv;
mod decoder;
mod encoder;
mod group_norm;
mod resnet;
mod simd;

pub use autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian};
pub use decoder::Decoder;
pub use encoder::Encoder;
