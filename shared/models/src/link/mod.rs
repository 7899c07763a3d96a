//! Links between stage executors: how a [`StageMessage`] gets from one stage to the next.
//!
//! The stage code (see `relayfarm_worker::stage`) only sees the [`Link`] trait. Implementations:
//! - [`InProcessLink`]: bounded channels between threads of one process (`relayfarm render
//!   --split`, tests);
//! - a gRPC streaming link between CPU processes (in the worker crate, which owns transport);
//! - `nccl::NcclLink`: NCCL send/recv between GPUs (feature `nccl`), for activations that
//!   stay on the device.
//!
//! A link is one end of a connection between two stages: the upstream stage `send`s, the
//! downstream stage `recv`s. Bounded capacity gives backpressure: a fast encoder cannot run
//! more than `capacity` jobs ahead of the denoiser.

pub mod in_process;
pub mod message;
#[cfg(feature = "nccl")]
pub mod nccl;

pub use in_process::InProcessLink;
pub use message::{MessageHeader, MessageKind, RequestHeader, StageMessage};

use crate::Result;

/// One end of a connection between two stages.
pub trait Link: Send {
    /// Sends a message to the peer, blocking while the peer's queue is full. An error means
    /// the peer is gone (the message was not delivered).
    fn send(&mut self, msg: StageMessage) -> Result<()>;

    /// The next message from the peer, blocking until one arrives; `None` once the peer has
    /// hung up and every message has been received.
    fn recv(&mut self) -> Result<Option<StageMessage>>;

    /// A short description for logs (`in-process`, `grpc://10.0.0.3:7411`, ...).
    fn describe(&self) -> String;
}
