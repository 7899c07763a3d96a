//! Tensor parallelism (Megatron style) for the denoisers.
//!
//! - [`Collective`]: all-reduce, all-gather and broadcast between the ranks of a group, with
//!   an in-process implementation for ranks that are threads ([`InProcessCollective`]) and an
//!   NCCL one for GPUs (`NcclCollective`, feature `nccl`).
//! - [`ShardSpec`] and [`ShardedWeights`]: each rank reads only its own slice of every split
//!   weight from the memory-mapped safetensors (column-parallel: output rows; row-parallel:
//!   input columns), and replicated weights whole.
//! - [`RankThreads`]: threads that own one rank's model shard each and run jobs on it.
//!
//! A tensor-parallel layer pair: the first linear is column-parallel (each rank computes its
//! slice of the outputs — its attention heads, its feed-forward hidden columns), the second
//! row-parallel (each rank multiplies its slice of the inputs, giving a partial sum of the full
//! output), then one all-reduce adds the partial sums; the bias of the row-parallel layer is
//! added once. Norms, embeddings and the modulation stay replicated, so every rank holds the
//! full activations between blocks. See [`crate::denoiser::pixart`] for the PixArt DiT.

pub mod collective;
pub mod group;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod shard;
pub mod tcp;

pub use collective::{broadcast_from, Collective, InProcessCollective};
pub use group::{PendingRanks, RankAbort, RankJob, RankThreads};
#[cfg(feature = "nccl")]
pub use nccl::{NcclCollective, NcclId};
pub use shard::{ShardSpec, ShardedWeights, WeightFootprint};
pub use tcp::{TcpCollective, TcpRoot};
