//! Text encoders, one per file.
//!
//! - [`t5`]: the T5 v1.1 encoder (`T5EncoderModel`) of PixArt-Σ, CogView3 and CogVideoX.
//! - [`chatglm`]: the ChatGLM3 encoder (`ChatGLMModel`) of Kolors.

pub mod chatglm;
pub mod t5;

pub use t5::{T5Encoder, T5EncoderConfig};
