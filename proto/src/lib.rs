//! The relayfarm gRPC API, generated from `proto/relayfarm/v1/*.proto`.
//!
//! - `RenderService` (public): submit prompt sets, watch progress, fetch images, cancel, list models.
//! - `ClusterService` (internal): worker registration, heartbeats/leases, job claims and results.

/// `relayfarm.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("relayfarm.v1");

    /// Encoded file descriptor set, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("relayfarm_descriptor");
}
