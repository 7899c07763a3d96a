//! Denoisers (the networks a sampler calls once per step).
//!
//! - [`pixart`]: PixArt-Σ / PixArt-α DiT (diffusers `PixArtTransformer2DModel`), with optional
//!   [`kv_compress`] token compression of self-attention keys and values.

pub mod kv_compress;

pub use kv_compress::{KvCompress, KvCompressConfig, KvSampling};
