//! relayfarm coordinator: queue semantics for render jobs.
//!
//! Today this holds the embedded queue that `relayfarm render --prompts` runs on (one
//! process, no Redis). The Redis Streams queue and the gRPC front door implement the same
//! contract: jobs are claimed, completed once (idempotently, by job id) or failed with a reason.

pub mod embedded_queue;

pub use embedded_queue::{EmbeddedQueue, JobState, QueueSummary};
