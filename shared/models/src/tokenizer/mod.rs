//! Tokenizers: SentencePiece models (`spiece.model`) and `tokenizer.json`.
//!
//! - [`sentencepiece_model`]: the subset of SentencePiece's `ModelProto` needed to rebuild a
//!   tokenizer, decoded with `prost`.
//! - [`t5`]: the T5 tokenizer (PixArt-Σ, CogView3, CogVideoX).
//! - [`chatglm`]: the ChatGLM3 tokenizer (Kolors).

pub mod chatglm;
pub mod sentencepiece_model;
pub mod t5;

pub use t5::{EncodedText, T5Tokenizer};
