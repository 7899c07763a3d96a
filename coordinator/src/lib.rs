//! relayfarm coordinator: queue semantics for render jobs.
//!
//! - [`server`]: the `relayfarm-coordinator` process — `RenderService` and `ClusterService`
//!   over gRPC (plus health and reflection), backed by
//! - [`redis_queue`]: the Redis Streams queue (one stream per model, consumer group `workers`,
//!   leases renewed by heartbeats, a reaper that redelivers or dead-letters, idempotent
//!   completion, cancellation, per-batch event streams); key layout in [`keys`], atomic state
//!   changes in [`scripts`], event encoding in [`events`];
//! - [`validation`]: submitted batches become fully resolved jobs, or INVALID_ARGUMENT naming
//!   the field; [`error`]: the one mapping of errors to gRPC statuses;
//! - [`replica`]: multi-process replicas (`--replica-layout`): workers grouped by stage, the
//!   planner that forms and dissolves them, and the rendezvous of tensor-parallel ranks;
//! - [`embedded_queue`]: the in-process twin that `relayfarm render --prompts` runs on (no
//!   Redis). Both implement the same contract: jobs are claimed, completed once (idempotently,
//!   by job id) or failed with a reason.

pub mod embedded_queue;
pub mod error;
pub mod events;
pub mod keys;
pub mod redis_queue;
pub mod replica;
pub mod scripts;
pub mod server;
pub mod testkit;
pub mod validation;

pub use embedded_queue::{EmbeddedQueue, JobState, QueueSummary};
