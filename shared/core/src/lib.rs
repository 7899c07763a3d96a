//! relayfarm core types shared by the CLI, the coordinator and the workers.
//!
//! No model code and no network code live here, so every layer can depend on this crate
//! without pulling in candle or tonic.

pub mod job;
pub mod metadata;
pub mod prompt_set;
pub mod result_store;

pub use job::{JobId, JobSpec, RenderParams};
pub use metadata::GenerationMetadata;
pub use prompt_set::{parse_prompt_set, PromptLine, PromptSetError};
pub use result_store::{write_atomic, LocalResultStore};

/// The relayfarm version, written into every image's metadata.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
