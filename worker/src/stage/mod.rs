//! Stage executors: one pipeline stage per executor, connected by [`Link`]s.
//!
//! - [`executor`]: the loop of each stage (text encoder, denoiser, VAE): receive a message,
//!   run the stage, send the result on; a job that fails in a stage becomes a `Failed` message
//!   that the later stages pass on, so the sink learns about every job;
//! - [`split`]: the three stages as threads of this process joined by in-process links
//!   (`relayfarm render --split`), with stage pipelining: while the denoiser works on job k the
//!   encoder prepares job k+1 and the VAE decodes job k−1.
//!
//! [`Link`]: relayfarm_models::link::Link

pub mod executor;
pub mod grpc_link;
pub mod split;

pub use executor::{run_denoiser, run_text_encoder, run_vae, StageJob};
pub use split::{SplitOutput, SplitPipeline};
