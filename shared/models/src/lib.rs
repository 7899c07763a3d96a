//! The relayfarm model zoo on candle.
//!
//! Layers, from the bottom up:
//! - [`checkpoint`]: diffusers-format pipeline folders (`model_index.json`, component configs,
//!   single or sharded safetensors with variants), memory-mapped and converted to the run dtype.
//! - [`tokenizer`]: SentencePiece (`spiece.model`) and `tokenizer.json` tokenizers.
//! - [`nn`]: building blocks shared by several models (attention, embeddings).
//! - [`text_encoder`], [`denoiser`], [`vae`]: one model component per file.
//! - [`scheduler`]: diffusion schedulers, read from `scheduler_config.json`.
//! - [`pipeline`]: pipelines that tie the components together with the reference semantics,
//!   as stages (text encoder → denoiser → VAE) behind one trait.
//! - [`parallel`]: tensor-parallel collectives; [`link`]: the typed messages between stages
//!   and the links that carry them.
//!
//! Model code knows nothing of gRPC, queues or files beyond the checkpoint it loads.

pub mod checkpoint;
pub mod denoiser;
pub mod dtype;
pub mod error;
pub mod link;
pub mod nn;
pub mod parallel;
pub mod pipeline;
pub mod scheduler;
pub mod text_encoder;
pub mod tokenizer;
pub mod unet;
pub mod vae;

pub use dtype::RunDtype;
pub use error::{ModelError, Result};
