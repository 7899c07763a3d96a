//! relayfarm worker: runs pipeline jobs on one device and stores the results.
//!
//! - [`png_output`]: PNG encoding with the generation metadata in text chunks;
//! - [`contact_sheet`]: a grid of thumbnails for a prompt set;
//! - [`runner`]: a loaded pipeline plus the job → image path;
//! - [`stage`]: stage executors joined by links (`--split`, replicas);
//! - [`replica`]: `relayfarm-worker --replica`, one stage of a multi-process replica.

pub mod contact_sheet;
pub mod farm;
pub mod png_output;
pub mod replica;
pub mod runner;
pub mod stage;

pub use relayfarm_core::LocalResultStore;
pub use runner::{JobOutput, PipelineRunner, RunnerError};
