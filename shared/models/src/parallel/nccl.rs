//! NCCL implementation of [`Collective`] (feature `nccl`).
//!
//! Each communicator is owned by one thread: cudarc's `Comm` is not `Send`, and NCCL forbids
//! using a communicator from two threads at once. Rank code sends that thread a request and
//! waits for the answer. The unique id arrives as bytes ([`NcclId`]), handed out by whoever
//! forms the group (the caller for in-process ranks, the coordinator's rendezvous for ranks
//! in different processes) — never through files.
//!
//! - CUDA tensors (feature `cuda`): the communicator runs on the tensor's candle stream and
//!   reads and writes device memory directly.
//! - Other tensors are staged through host memory (useful for checking a setup; slow).
//!
//! The library is loaded when the first communicator is made; with no CUDA driver or no
//! `libnccl.so` that fails with an error naming the missing library, not a crash.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use candle_core::{DType, Device, DeviceLocation, Tensor};
use cudarc::driver::{CudaContext, CudaStream, DeviceRepr, DriverError, ValidAsZeroBits};
use cudarc::nccl::{result::NcclError, Comm, Id, NcclType, ReduceOp};

use super::collective::{collective_error, Collective};
use crate::{ModelError, Result};

fn nccl_err(what: &str, e: NcclError) -> ModelError {
    collective_error(format!("NCCL {what} failed: {:?}", e.0))
}

fn driver_err(what: &str, e: DriverError) -> ModelError {
    collective_error(format!("CUDA {what} failed: {e}"))
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// An NCCL unique id (128 bytes), shared by every rank of one communicator.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId([u8; NcclId::LEN]);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NcclId({:02x}{:02x}{:02x}{:02x}…)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

impl NcclId {
    /// Length of the id in bytes.
    pub const LEN: usize = 128;

    /// A fresh id (`ncclGetUniqueId`); needs `libnccl.so` (not a GPU).
    pub fn new() -> Result<Self> {
        let id = catch_unwind(Id::new).map_err(|p| {
            collective_error(format!(
                "cannot load NCCL ({}); install libnccl2 (and its libnccl.so link) or put it on LD_LIBRARY_PATH",
                panic_text(&*p)
            ))
        })?;
        let id = id.map_err(|e| nccl_err("ncclGetUniqueId", e))?;
        let mut bytes = [0u8; Self::LEN];
        for (b, &c) in bytes.iter_mut().zip(id.internal()) {
            *b = c as u8;
        }
        Ok(NcclId(bytes))
    }

    /// An id received from elsewhere (exactly [`NcclId::LEN`] bytes).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let arr: [u8; Self::LEN] = bytes.try_into().map_err(|_| {
            collective_error(format!(
                "an NCCL id has {} bytes, got {}",
                Self::LEN,
                bytes.len()
            ))
        })?;
        Ok(NcclId(arr))
    }

    /// The id's bytes, to hand to the other ranks.
    pub fn as_bytes(&self) -> &[u8; Self::LEN] {
        &self.0
    }

    fn to_cudarc(self) -> Id {
        Id::uninit(self.0.map(|b| b as core::ffi::c_char))
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    AllReduceSum,
    AllGather,
    Broadcast(usize),
    /// Point-to-point: send the tensor to this rank (the result is the input).
    Send(usize),
    /// Point-to-point: receive a tensor of the input's shape and dtype from this rank.
    Recv(usize),
}

/// Host copies of a tensor's elements, in a type NCCL reduces natively.
enum HostData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    U8(Vec<u8>),
    U32(Vec<u32>),
    I64(Vec<i64>),
}

enum Request {
    Host {
        op: Op,
        data: HostData,
        reply: mpsc::Sender<Result<HostData>>,
    },
    #[cfg(feature = "cuda")]
    Device {
        op: Op,
        x: Tensor,
        reply: mpsc::Sender<Result<Tensor>>,
    },
    Abort,
}

/// Where the communicator's stream comes from.
enum StreamSource {
    /// A new context's default stream on this GPU (host-staged tensors).
    Gpu(usize),
    /// The candle device's own stream, so that NCCL calls are ordered with its kernels.
    #[cfg(feature = "cuda")]
    Candle(Arc<CudaStream>),
}

/// One rank's NCCL communicator; see the module docs.
#[derive(Debug)]
pub struct NcclCollective {
    rank: usize,
    world: usize,
    tx: Mutex<mpsc::Sender<Request>>,
    ready: Mutex<Option<mpsc::Receiver<Result<()>>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Set once the communicator is known to be up (its thread can then be joined on drop).
    up: AtomicBool,
    aborted: Mutex<Option<String>>,
}

impl NcclCollective {
    /// Starts rank `rank` of a `world`-rank communicator with id `id`, for tensors on
    /// `device`: a CUDA device (feature `cuda`) communicates on that device's stream; for CPU
    /// tensors GPU `rank` stages them. Returns at once, since NCCL's set-up blocks until every
    /// rank has joined: start all ranks, then [`NcclCollective::wait_ready`] on each.
    pub fn start(device: &Device, rank: usize, world: usize, id: &NcclId) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(collective_error(format!("rank {rank} of {world} ranks")));
        }
        let source = match device.location() {
            DeviceLocation::Cpu => StreamSource::Gpu(rank),
            DeviceLocation::Cuda { .. } => Self::candle_stream(device)?,
            other => {
                return Err(collective_error(format!(
                    "NCCL needs CUDA or CPU tensors, not {other:?}"
                )))
            }
        };
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let id = *id;
        let thread = std::thread::Builder::new()
            .name(format!("nccl-rank{rank}"))
            .spawn(move || serve(source, rank, world, id, rx, ready_tx))
            .map_err(|e| collective_error(format!("cannot start the NCCL thread: {e}")))?;
        Ok(NcclCollective {
            rank,
            world,
            tx: Mutex::new(tx),
            ready: Mutex::new(Some(ready_rx)),
            thread: Mutex::new(Some(thread)),
            up: AtomicBool::new(false),
            aborted: Mutex::new(None),
        })
    }

    #[cfg(feature = "cuda")]
    fn candle_stream(device: &Device) -> Result<StreamSource> {
        Ok(StreamSource::Candle(device.as_cuda_device()?.cuda_stream()))
    }

    #[cfg(not(feature = "cuda"))]
    fn candle_stream(_device: &Device) -> Result<StreamSource> {
        Err(collective_error(
            "CUDA tensors need a build with `--features cuda`",
        ))
    }

    /// Waits until the communicator is set up (every rank has joined).
    pub fn wait_ready(&self) -> Result<()> {
        let rx = self.ready.lock().unwrap_or_else(|p| p.into_inner()).take();
        match rx {
            None if self.up.load(Ordering::Acquire) => Ok(()),
            None => Err(collective_error("the NCCL communicator failed to set up")),
            Some(rx) => {
                rx.recv()
                    .map_err(|_| collective_error("the NCCL thread stopped while setting up"))??;
                self.up.store(true, Ordering::Release);
                Ok(())
            }
        }
    }

    fn send(&self, req: Request) -> Result<()> {
        self.tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(req)
            .map_err(|_| collective_error("the NCCL thread has stopped"))
    }

    fn check_alive(&self) -> Result<()> {
        self.wait_ready()?;
        match &*self.aborted.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(r) => Err(collective_error(format!(
                "the communicator was aborted: {r}"
            ))),
            None => Ok(()),
        }
    }

    /// Runs `op` on `x`; returns the flat result (`world ×` longer for a gather).
    fn call(&self, op: Op, x: &Tensor) -> Result<Tensor> {
        self.check_alive()?;
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let (reply, answer) = mpsc::channel();
            self.send(Request::Device {
                op,
                x: x.contiguous()?,
                reply,
            })?;
            return answer
                .recv()
                .map_err(|_| collective_error("the NCCL thread stopped"))?;
        }
        let dtype = x.dtype();
        let flat = x.flatten_all()?;
        let data = match dtype {
            DType::F32 => HostData::F32(flat.to_vec1()?),
            DType::F16 | DType::BF16 => HostData::F32(flat.to_dtype(DType::F32)?.to_vec1()?),
            DType::F64 => HostData::F64(flat.to_vec1()?),
            DType::U8 => HostData::U8(flat.to_vec1()?),
            DType::U32 => HostData::U32(flat.to_vec1()?),
            DType::I64 => HostData::I64(flat.to_vec1()?),
            other => {
                return Err(collective_error(format!(
                    "NCCL: unsupported dtype {other:?}"
                )))
            }
        };
        let (reply, answer) = mpsc::channel();
        self.send(Request::Host { op, data, reply })?;
        let out = answer
            .recv()
            .map_err(|_| collective_error("the NCCL thread stopped"))??;
        let dev = x.device();
        let t = match out {
            HostData::F32(v) => {
                let n = v.len();
                Tensor::from_vec(v, n, dev)?
            }
            HostData::F64(v) => {
                let n = v.len();
                Tensor::from_vec(v, n, dev)?
            }
            HostData::U8(v) => {
                let n = v.len();
                Tensor::from_vec(v, n, dev)?
            }
            HostData::U32(v) => {
                let n = v.len();
                Tensor::from_vec(v, n, dev)?
            }
            HostData::I64(v) => {
                let n = v.len();
                Tensor::from_vec(v, n, dev)?
            }
        };
        Ok(t.to_dtype(dtype)?)
    }
}

impl NcclCollective {
    /// This rank.
    pub fn rank_id(&self) -> usize {
        self.rank
    }

    /// Sends `x` to rank `peer`, which must call [`NcclCollective::recv`] with a tensor of
    /// the same shape and dtype (point-to-point, for stage links between GPUs).
    pub fn send_to(&self, x: &Tensor, peer: usize) -> Result<()> {
        self.call(Op::Send(peer), x).map(|_| ())
    }

    /// Receives from rank `peer` a tensor shaped and typed like `like` (its contents are
    /// ignored), on `like`'s device.
    pub fn recv_from(&self, like: &Tensor, peer: usize) -> Result<Tensor> {
        Ok(self.call(Op::Recv(peer), like)?.reshape(like.dims())?)
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.call(Op::AllReduceSum, x)?.reshape(x.dims())?)
    }

    fn all_gather(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        if dim >= x.rank() {
            return Err(collective_error(format!(
                "all_gather along dim {dim} of a rank-{} tensor",
                x.rank()
            )));
        }
        let mut dims = vec![self.world];
        dims.extend_from_slice(x.dims());
        let g = self.call(Op::AllGather, x)?.reshape(dims)?;
        let parts = (0..self.world)
            .map(|r| g.get(r))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, dim)?)
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.world {
            return Err(collective_error(format!(
                "broadcast from rank {root} in a group of {}",
                self.world
            )));
        }
        Ok(self.call(Op::Broadcast(root), x)?.reshape(x.dims())?)
    }

    fn abort(&self, reason: &str) {
        let mut a = self.aborted.lock().unwrap_or_else(|p| p.into_inner());
        if a.is_none() {
            *a = Some(format!("rank {}: {reason}", self.rank));
            let _ = self.send(Request::Abort);
        }
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        // Closing the channel ends the thread, which drops (and so aborts) the communicator.
        // A thread still waiting in NCCL's set-up for ranks that never came is left detached.
        let (dead, _) = mpsc::channel();
        *self.tx.lock().unwrap_or_else(|p| p.into_inner()) = dead;
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            if self.up.load(Ordering::Acquire) {
                let _ = t.join();
            }
        }
    }
}

/// The communicator's thread: sets it up, then serves requests until the channel closes or an
/// abort arrives.
fn serve(
    source: StreamSource,
    rank: usize,
    world: usize,
    id: NcclId,
    rx: mpsc::Receiver<Request>,
    ready: mpsc::Sender<Result<()>>,
) {
    let setup = catch_unwind(AssertUnwindSafe(|| -> Result<(Arc<CudaStream>, Comm)> {
        let stream = match source {
            StreamSource::Gpu(ordinal) => CudaContext::new(ordinal)
                .map_err(|e| driver_err("context creation", e))?
                .default_stream(),
            #[cfg(feature = "cuda")]
            StreamSource::Candle(s) => s,
        };
        let comm = Comm::from_rank(stream.clone(), rank, world, id.to_cudarc())
            .map_err(|e| nccl_err("ncclCommInitRank", e))?;
        Ok((stream, comm))
    }));
    let (stream, comm) = match setup {
        Ok(Ok(sc)) => sc,
        Ok(Err(e)) => {
            let _ = ready.send(Err(e));
            return;
        }
        Err(p) => {
            let _ = ready.send(Err(collective_error(format!(
                "cannot load CUDA/NCCL ({}): this needs an NVIDIA driver and libnccl.so",
                panic_text(&*p)
            ))));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    for req in rx {
        match req {
            Request::Host { op, data, reply } => {
                let r = catch_unwind(AssertUnwindSafe(|| {
                    host_op(&comm, &stream, world, op, data)
                }))
                .unwrap_or_else(|p| {
                    Err(collective_error(format!(
                        "NCCL call panicked: {}",
                        panic_text(&*p)
                    )))
                });
                let _ = reply.send(r);
            }
            #[cfg(feature = "cuda")]
            Request::Device { op, x, reply } => {
                let r = catch_unwind(AssertUnwindSafe(|| device::run(&comm, world, op, &x)))
                    .unwrap_or_else(|p| {
                        Err(collective_error(format!(
                            "NCCL call panicked: {}",
                            panic_text(&*p)
                        )))
                    });
                let _ = reply.send(r);
            }
            Request::Abort => break,
        }
    }
}

fn host_op(
    comm: &Comm,
    stream: &Arc<CudaStream>,
    world: usize,
    op: Op,
    data: HostData,
) -> Result<HostData> {
    Ok(match data {
        HostData::F32(v) => HostData::F32(host_typed(comm, stream, world, op, &v)?),
        HostData::F64(v) => HostData::F64(host_typed(comm, stream, world, op, &v)?),
        HostData::U8(v) => HostData::U8(host_typed(comm, stream, world, op, &v)?),
        HostData::U32(v) => HostData::U32(host_typed(comm, stream, world, op, &v)?),
        HostData::I64(v) => HostData::I64(host_typed(comm, stream, world, op, &v)?),
    })
}

fn host_typed<T: NcclType + DeviceRepr + ValidAsZeroBits>(
    comm: &Comm,
    stream: &Arc<CudaStream>,
    world: usize,
    op: Op,
    v: &[T],
) -> Result<Vec<T>> {
    let send = stream
        .clone_htod(v)
        .map_err(|e| driver_err("copy to device", e))?;
    let n = match op {
        Op::AllGather => v.len() * world,
        _ => v.len(),
    };
    let mut recv = stream
        .alloc_zeros::<T>(n)
        .map_err(|e| driver_err("allocation", e))?;
    match op {
        Op::AllReduceSum => comm
            .all_reduce(&send, &mut recv, &ReduceOp::Sum)
            .map(|_| ()),
        Op::AllGather => comm.all_gather(&send, &mut recv).map(|_| ()),
        Op::Broadcast(root) => comm
            .broadcast(Some(&send), &mut recv, root as i32)
            .map(|_| ()),
        // The result of a send is not used (the caller keeps its tensor).
        Op::Send(peer) => comm.send(&send, peer as i32),
        Op::Recv(peer) => comm.recv(&mut recv, peer as i32).map(|_| ()),
    }
    .map_err(|e| nccl_err("collective", e))?;
    let out = stream
        .clone_dtoh(&recv)
        .map_err(|e| driver_err("copy to host", e))?;
    stream
        .synchronize()
        .map_err(|e| driver_err("synchronize", e))?;
    Ok(out)
}

/// Zero-copy collectives on candle CUDA tensors (feature `cuda`).
#[cfg(feature = "cuda")]
mod device {
    use super::{collective_error, nccl_err, Op};
    use crate::Result;
    use candle_core::op::BackpropOp;
    use candle_core::{CudaStorage, DType, Storage, Tensor};
    use cudarc::driver::{CudaSlice, CudaView, DeviceRepr, ValidAsZeroBits};
    use cudarc::nccl::{Comm, NcclType, ReduceOp};

    fn typed<T: NcclType + DeviceRepr + ValidAsZeroBits>(
        comm: &Comm,
        op: Op,
        src: &CudaView<'_, T>,
        n_out: usize,
    ) -> Result<CudaSlice<T>> {
        let stream = comm.stream();
        let mut recv = stream
            .alloc_zeros::<T>(n_out)
            .map_err(|e| super::driver_err("allocation", e))?;
        match op {
            Op::AllReduceSum => comm.all_reduce(src, &mut recv, &ReduceOp::Sum).map(|_| ()),
            Op::AllGather => comm.all_gather(src, &mut recv).map(|_| ()),
            Op::Broadcast(root) => comm
                .broadcast(Some(src), &mut recv, root as i32)
                .map(|_| ()),
            Op::Send(peer) => comm.send(src, peer as i32),
            Op::Recv(peer) => comm.recv(&mut recv, peer as i32).map(|_| ()),
        }
        .map_err(|e| nccl_err("collective", e))?;
        Ok(recv)
    }

    /// Runs `op` on a contiguous CUDA tensor on the communicator's (the tensor's) stream;
    /// returns the flat result.
    pub(super) fn run(comm: &Comm, world: usize, op: Op, x: &Tensor) -> Result<Tensor> {
        let n = x.elem_count();
        let n_out = match op {
            Op::AllGather => n * world,
            _ => n,
        };
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            return Err(collective_error("expected a CUDA tensor"));
        };
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| collective_error("expected a contiguous tensor"))?;
        let dev = cs.device.clone();
        let out = match x.dtype() {
            DType::F32 => CudaStorage::wrap_cuda_slice(
                typed(
                    comm,
                    op,
                    &cs.as_cuda_slice::<f32>()?.slice(start..end),
                    n_out,
                )?,
                dev,
            ),
            DType::F16 => CudaStorage::wrap_cuda_slice(
                typed(
                    comm,
                    op,
                    &cs.as_cuda_slice::<half::f16>()?.slice(start..end),
                    n_out,
                )?,
                dev,
            ),
            DType::BF16 => CudaStorage::wrap_cuda_slice(
                typed(
                    comm,
                    op,
                    &cs.as_cuda_slice::<half::bf16>()?.slice(start..end),
                    n_out,
                )?,
                dev,
            ),
            DType::U32 => CudaStorage::wrap_cuda_slice(
                typed(
                    comm,
                    op,
                    &cs.as_cuda_slice::<u32>()?.slice(start..end),
                    n_out,
                )?,
                dev,
            ),
            other => {
                return Err(collective_error(format!(
                    "NCCL: unsupported dtype {other:?}"
                )))
            }
        };
        drop(storage);
        Ok(Tensor::from_storage(
            Storage::Cuda(out),
            n_out,
            BackpropOp::none(),
            false,
        ))
    }
}
