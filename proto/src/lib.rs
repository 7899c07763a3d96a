//! The relayfarm gRPC API, generated from `proto/relayfarm/v1/*.proto`.
//!
//! - `RenderService` (public): submit prompt sets, watch progress, fetch images, cancel, list models.
//! - `ClusterService` (internal): worker registration, heartbeats/leases, job claims and results.
//! - `ReplicaService` (internal): workers grouped into multi-process replicas, one stage each,
//!   and the rendezvous of a replica's tensor-parallel ranks.
//! - `StageLink` (between workers): stage messages streamed from one stage's process to the next.

/// `relayfarm.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("relayfarm.v1");

    /// Encoded file descriptor set, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("relayfarm_descriptor");
}
