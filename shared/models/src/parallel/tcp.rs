//! [`Collective`] between processes over TCP (CPU tensors, loopback or LAN).
//!
//! Rank 0 is the hub: it listens ([`TcpCollective::listen`]), the other ranks connect to it
//! ([`TcpCollective::connect`]). Every operation is one round trip: each rank > 0 sends its
//! contribution (or an empty frame when it has none, e.g. a broadcast from another rank) to
//! rank 0, which combines the contributions in rank order and sends the result to every rank.
//! Reductions therefore add the ranks' tensors in rank order, exactly as
//! [`InProcessCollective`](super::InProcessCollective) does, so the results are the same bits.
//!
//! Tensors travel as a dtype code, the shape and the raw little-endian element bytes. A peer
//! that dies closes its socket, so the others fail at once with an error naming the rank; a rank
//! that calls [`Collective::abort`] sends the reason to its peers first, and rank 0 passes an
//! abort on to every rank, so no rank waits forever.

use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use super::collective::{collective_error, Collective};
use crate::Result;

/// Bytes that open the handshake of a connecting rank.
const HELLO: &[u8; 4] = b"RFTC";
/// Protocol version of the handshake.
const VERSION: u32 = 1;
/// Frame tag: an operation's contribution or result.
const TAG_DATA: u8 = 1;
/// Frame tag: the sender aborted the group; a reason string follows.
const TAG_ABORT: u8 = 2;
/// Longest abort reason sent on the wire.
const MAX_REASON: usize = 4096;
/// Most dimensions of a tensor on the wire.
const MAX_RANK: usize = 16;
/// How long a write may block before the peer is considered gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(120);

/// Dtypes that can travel, by wire code (the index).
const DTYPES: [DType; 7] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::F64,
    DType::U8,
    DType::U32,
    DType::I64,
];

/// What an operation is; all ranks of one operation must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    AllReduceSum,
    AllGather(u32),
    Broadcast(u32),
}

impl Op {
    fn code(self) -> (u8, u32) {
        match self {
            Op::AllReduceSum => (1, 0),
            Op::AllGather(d) => (2, d),
            Op::Broadcast(r) => (3, r),
        }
    }

    fn from_code(code: u8, arg: u32) -> Option<Op> {
        match code {
            1 => Some(Op::AllReduceSum),
            2 => Some(Op::AllGather(arg)),
            3 => Some(Op::Broadcast(arg)),
            _ => None,
        }
    }
}

/// A frame read from a peer.
enum Frame {
    Data {
        op: Op,
        seq: u64,
        tensor: Option<Tensor>,
    },
    Abort(String),
}

/// One connection to a peer: buffered reader and writer over clones of one socket.
#[derive(Debug)]
struct Peer {
    rank: usize,
    reader: Mutex<BufReader<TcpStream>>,
    writer: Mutex<BufWriter<TcpStream>>,
    /// A clone used only to shut the socket down (to wake a blocked reader).
    control: TcpStream,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Peer {
    fn new(rank: usize, stream: TcpStream) -> Result<Self> {
        let io = |e: std::io::Error| collective_error(format!("socket of rank {rank}: {e}"));
        stream.set_nodelay(true).map_err(io)?;
        stream.set_read_timeout(None).map_err(io)?;
        stream.set_write_timeout(Some(WRITE_TIMEOUT)).map_err(io)?;
        let reader = stream.try_clone().map_err(io)?;
        let control = stream.try_clone().map_err(io)?;
        Ok(Peer {
            rank,
            reader: Mutex::new(BufReader::with_capacity(1 << 16, reader)),
            writer: Mutex::new(BufWriter::with_capacity(1 << 16, stream)),
            control,
        })
    }

    fn send(&self, op: Op, seq: u64, tensor: Option<&Tensor>) -> Result<()> {
        let mut w = lock(&self.writer);
        let (code, arg) = op.code();
        let res = (|| -> std::io::Result<()> {
            w.write_all(&[TAG_DATA, code])?;
            w.write_all(&arg.to_le_bytes())?;
            w.write_all(&seq.to_le_bytes())?;
            match tensor {
                None => w.write_all(&[0])?,
                Some(t) => {
                    w.write_all(&[1])?;
                    write_tensor(&mut *w, t)?;
                }
            }
            w.flush()
        })();
        res.map_err(|e| self.io_error("send to", e))
    }

    fn send_abort(&self, reason: &str) {
        // Best effort: a writer busy with a large frame is left alone (the shutdown that
        // follows wakes the peer anyway).
        if let Ok(mut w) = self.writer.try_lock() {
            let bytes = reason.as_bytes();
            let bytes = &bytes[..bytes.len().min(MAX_REASON)];
            let _ = w
                .write_all(&[TAG_ABORT])
                .and_then(|_| w.write_all(&(bytes.len() as u32).to_le_bytes()))
                .and_then(|_| w.write_all(bytes))
                .and_then(|_| w.flush());
        }
    }

    fn recv(&self, device: &Device) -> Result<Frame> {
        let mut r = lock(&self.reader);
        let res = (|| -> std::io::Result<std::result::Result<Frame, String>> {
            let tag = read_u8(&mut *r)?;
            match tag {
                TAG_ABORT => {
                    let n = read_u32(&mut *r)? as usize;
                    if n > MAX_REASON {
                        return Ok(Err(format!("abort reason of {n} bytes")));
                    }
                    let mut buf = vec![0u8; n];
                    r.read_exact(&mut buf)?;
                    Ok(Ok(Frame::Abort(String::from_utf8_lossy(&buf).into_owned())))
                }
                TAG_DATA => {
                    let code = read_u8(&mut *r)?;
                    let arg = read_u32(&mut *r)?;
                    let seq = read_u64(&mut *r)?;
                    let Some(op) = Op::from_code(code, arg) else {
                        return Ok(Err(format!("unknown operation code {code}")));
                    };
                    let tensor = match read_u8(&mut *r)? {
                        0 => None,
                        _ => match read_tensor(&mut *r, device)? {
                            Ok(t) => Some(t),
                            Err(e) => return Ok(Err(e)),
                        },
                    };
                    Ok(Ok(Frame::Data { op, seq, tensor }))
                }
                other => Ok(Err(format!("unknown frame tag {other}"))),
            }
        })();
        match res {
            Ok(Ok(frame)) => Ok(frame),
            Ok(Err(msg)) => Err(collective_error(format!(
                "corrupt frame from rank {}: {msg}",
                self.rank
            ))),
            Err(e) => Err(self.io_error("receive from", e)),
        }
    }

    fn io_error(&self, what: &str, e: std::io::Error) -> crate::ModelError {
        let why = match e.kind() {
            ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
                "the connection closed (the process stopped or the group was aborted)".to_string()
            }
            ErrorKind::TimedOut | ErrorKind::WouldBlock => "timed out".to_string(),
            _ => e.to_string(),
        };
        collective_error(format!("cannot {what} rank {}: {why}", self.rank))
    }

    fn shutdown(&self) {
        let _ = self.control.shutdown(Shutdown::Both);
    }
}

fn read_u8(r: &mut impl Read) -> std::io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn invalid_data(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(ErrorKind::InvalidData, msg.into())
}

/// Writes dtype code, rank, dims (u64 each) and the little-endian element bytes.
fn write_tensor(w: &mut impl Write, t: &Tensor) -> std::io::Result<()> {
    let code = DTYPES
        .iter()
        .position(|d| *d == t.dtype())
        .ok_or_else(|| invalid_data(format!("cannot send a {:?} tensor", t.dtype())))?;
    let dims = t.dims();
    if dims.len() > MAX_RANK {
        return Err(invalid_data(format!(
            "cannot send a rank-{} tensor",
            dims.len()
        )));
    }
    w.write_all(&[code as u8, dims.len() as u8])?;
    for &d in dims {
        w.write_all(&(d as u64).to_le_bytes())?;
    }
    let flat = t
        .flatten_all()
        .and_then(|f| f.to_device(&Device::Cpu))
        .map_err(|e| invalid_data(e.to_string()))?;
    let cv = |e: candle_core::Error| invalid_data(e.to_string());
    macro_rules! put {
        ($ty:ty) => {{
            let v = flat.to_vec1::<$ty>().map_err(cv)?;
            let mut buf = Vec::with_capacity(v.len() * std::mem::size_of::<$ty>());
            for x in v {
                buf.extend_from_slice(&x.to_le_bytes());
            }
            w.write_all(&buf)
        }};
    }
    match t.dtype() {
        DType::F32 => put!(f32),
        DType::F16 => put!(half::f16),
        DType::BF16 => put!(half::bf16),
        DType::F64 => put!(f64),
        DType::U8 => put!(u8),
        DType::U32 => put!(u32),
        DType::I64 => put!(i64),
        other => Err(invalid_data(format!("cannot send a {other:?} tensor"))),
    }
}

/// Reads a tensor written by [`write_tensor`]; the outer error is I/O, the inner a corrupt
/// frame.
fn read_tensor(
    r: &mut impl Read,
    device: &Device,
) -> std::io::Result<std::result::Result<Tensor, String>> {
    let code = read_u8(r)? as usize;
    let rank = read_u8(r)? as usize;
    let Some(&dtype) = DTYPES.get(code) else {
        return Ok(Err(format!("unknown dtype code {code}")));
    };
    if rank > MAX_RANK {
        return Ok(Err(format!("tensor of rank {rank}")));
    }
    let mut dims = Vec::with_capacity(rank);
    for _ in 0..rank {
        dims.push(read_u64(r)? as usize);
    }
    let Some(n) = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) else {
        return Ok(Err(format!("tensor shape {dims:?} overflows")));
    };
    let size = dtype.size_in_bytes();
    let Some(nbytes) = n.checked_mul(size) else {
        return Ok(Err(format!("tensor shape {dims:?} overflows")));
    };
    let mut buf = vec![0u8; nbytes];
    r.read_exact(&mut buf)?;
    macro_rules! get {
        ($ty:ty, $n:expr) => {{
            let v: Vec<$ty> = buf
                .chunks_exact($n)
                .map(|c| {
                    let mut a = [0u8; $n];
                    a.copy_from_slice(c);
                    <$ty>::from_le_bytes(a)
                })
                .collect();
            Tensor::from_vec(v, dims.clone(), device)
        }};
    }
    let t = match dtype {
        DType::F32 => get!(f32, 4),
        DType::F16 => get!(half::f16, 2),
        DType::BF16 => get!(half::bf16, 2),
        DType::F64 => get!(f64, 8),
        DType::U8 => Tensor::from_vec(buf, dims.clone(), device),
        DType::U32 => get!(u32, 4),
        DType::I64 => get!(i64, 8),
        other => return Ok(Err(format!("unsupported dtype {other:?}"))),
    };
    Ok(t.map_err(|e| e.to_string()))
}

/// Rank 0 before the other ranks have connected; see [`TcpCollective::listen`].
#[derive(Debug)]
pub struct TcpRoot {
    listener: TcpListener,
    world: usize,
    local_addr: SocketAddr,
}

impl TcpRoot {
    /// The address the other ranks connect to (with the port chosen by the system when the
    /// listen address had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Waits until ranks `1..world` have connected (at most `timeout`) and returns rank 0.
    pub fn accept(self, timeout: Duration) -> Result<TcpCollective> {
        let deadline = Instant::now() + timeout;
        let mut peers: Vec<Option<Peer>> = (1..self.world).map(|_| None).collect();
        let io = |e: std::io::Error| collective_error(format!("accepting ranks: {e}"));
        self.listener.set_nonblocking(true).map_err(io)?;
        while peers.iter().any(Option::is_none) {
            match self.listener.accept() {
                Ok((stream, from)) => {
                    stream.set_nonblocking(false).map_err(io)?;
                    match handshake_accept(&stream, self.world, &peers, deadline) {
                        Ok(rank) => peers[rank - 1] = Some(Peer::new(rank, stream)?),
                        Err(e) => {
                            tracing::warn!(%from, error = %e, "rejected a tensor-parallel peer");
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> = peers
                            .iter()
                            .enumerate()
                            .filter(|(_, p)| p.is_none())
                            .map(|(i, _)| i + 1)
                            .collect();
                        return Err(collective_error(format!(
                            "rank 0 at {}: ranks {missing:?} did not connect within {timeout:?}",
                            self.local_addr
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(io(e)),
            }
        }
        Ok(TcpCollective {
            rank: 0,
            world: self.world,
            peers: peers.into_iter().flatten().collect(),
            seq: Mutex::new(0),
            aborted: Mutex::new(None),
        })
    }
}

/// Reads a connecting rank's hello; answers `1` (accepted) or `0` and returns its rank.
fn handshake_accept(
    stream: &TcpStream,
    world: usize,
    peers: &[Option<Peer>],
    deadline: Instant,
) -> std::result::Result<usize, String> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    let mut s = stream;
    s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
    let mut hello = [0u8; 4];
    s.read_exact(&mut hello).map_err(|e| e.to_string())?;
    if &hello != HELLO {
        return Err("not a relayfarm tensor-parallel peer".into());
    }
    let version = read_u32(&mut s).map_err(|e| e.to_string())?;
    let rank = read_u32(&mut s).map_err(|e| e.to_string())? as usize;
    let their_world = read_u32(&mut s).map_err(|e| e.to_string())? as usize;
    let verdict = if version != VERSION {
        Err(format!("protocol version {version}, expected {VERSION}"))
    } else if their_world != world {
        Err(format!("world size {their_world}, expected {world}"))
    } else if rank == 0 || rank >= world {
        Err(format!("rank {rank} out of 1..{world}"))
    } else if peers[rank - 1].is_some() {
        Err(format!("rank {rank} connected twice"))
    } else {
        Ok(rank)
    };
    s.write_all(&[u8::from(verdict.is_ok())])
        .map_err(|e| e.to_string())?;
    verdict
}

/// One rank of a tensor-parallel group whose ranks are processes; see the module docs.
#[derive(Debug)]
pub struct TcpCollective {
    rank: usize,
    world: usize,
    /// Rank 0: ranks `1..world` in order; other ranks: rank 0 only.
    peers: Vec<Peer>,
    /// Operations done by this rank (each frame carries it, to catch ranks out of step).
    seq: Mutex<u64>,
    aborted: Mutex<Option<String>>,
}

impl TcpCollective {
    /// Rank 0 of a group of `world` ranks: binds `addr` (e.g. `127.0.0.1:0`). Publish
    /// [`TcpRoot::local_addr`] to the other ranks, then call [`TcpRoot::accept`].
    pub fn listen(addr: impl ToSocketAddrs, world: usize) -> Result<TcpRoot> {
        if world == 0 {
            return Err(collective_error("a group needs at least one rank"));
        }
        let listener = TcpListener::bind(addr)
            .map_err(|e| collective_error(format!("rank 0 cannot listen: {e}")))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| collective_error(format!("rank 0 cannot listen: {e}")))?;
        Ok(TcpRoot {
            listener,
            world,
            local_addr,
        })
    }

    /// Rank `rank` (`1..world`) of a group whose rank 0 listens at `root`; retries the
    /// connection until `timeout` has passed.
    pub fn connect(
        root: impl ToSocketAddrs + std::fmt::Debug,
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> Result<Self> {
        if rank == 0 || rank >= world {
            return Err(collective_error(format!(
                "connect: rank {rank} out of 1..{world} (rank 0 listens)"
            )));
        }
        let addrs: Vec<SocketAddr> = root
            .to_socket_addrs()
            .map_err(|e| collective_error(format!("bad rank-0 address {root:?}: {e}")))?
            .collect();
        let deadline = Instant::now() + timeout;
        let mut last_err = String::from("no address");
        loop {
            for addr in &addrs {
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(100));
                match TcpStream::connect_timeout(addr, left) {
                    Ok(stream) => match handshake_connect(&stream, rank, world, left) {
                        Ok(()) => {
                            return Ok(TcpCollective {
                                rank,
                                world,
                                peers: vec![Peer::new(0, stream)?],
                                seq: Mutex::new(0),
                                aborted: Mutex::new(None),
                            })
                        }
                        Err(e) => last_err = e,
                    },
                    Err(e) => last_err = e.to_string(),
                }
            }
            if Instant::now() >= deadline {
                return Err(collective_error(format!(
                    "rank {rank} cannot join rank 0 at {root:?} within {timeout:?}: {last_err}"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn check_aborted(&self) -> Result<()> {
        match &*lock(&self.aborted) {
            Some(reason) => Err(collective_error(format!("the group was aborted: {reason}"))),
            None => Ok(()),
        }
    }

    /// Marks the group failed after an error of this rank's operation, telling the peers.
    fn fail(&self, e: crate::ModelError) -> crate::ModelError {
        self.abort_with(&e.to_string(), false);
        e
    }

    fn abort_with(&self, reason: &str, local: bool) {
        let mut a = lock(&self.aborted);
        if a.is_some() {
            return;
        }
        let reason = if local {
            format!("rank {}: {reason}", self.rank)
        } else {
            reason.to_string()
        };
        *a = Some(reason.clone());
        drop(a);
        for p in &self.peers {
            p.send_abort(&reason);
            p.shutdown();
        }
    }

    /// Runs one operation: contributions go to rank 0, which combines them with `combine`
    /// (given every rank's contribution in rank order) and sends the result back.
    fn round(
        &self,
        op: Op,
        mine: Option<&Tensor>,
        device: &Device,
        combine: impl FnOnce(Vec<Option<Tensor>>) -> Result<Tensor>,
    ) -> Result<Tensor> {
        self.check_aborted()?;
        let seq = {
            let mut s = lock(&self.seq);
            *s += 1;
            *s
        };
        if self.rank == 0 {
            let mut parts = Vec::with_capacity(self.world);
            parts.push(mine.cloned());
            for p in &self.peers {
                match p.recv(device).map_err(|e| self.fail(e))? {
                    Frame::Abort(reason) => {
                        self.abort_with(&reason, false);
                        return Err(collective_error(format!("the group was aborted: {reason}")));
                    }
                    Frame::Data {
                        op: their_op,
                        seq: their_seq,
                        tensor,
                    } => {
                        if their_op != op || their_seq != seq {
                            return Err(self.fail(collective_error(format!(
                                "rank {} called {their_op:?} (operation {their_seq}) while \
                                 rank 0 called {op:?} (operation {seq})",
                                p.rank
                            ))));
                        }
                        parts.push(tensor);
                    }
                }
            }
            let out = combine(parts).map_err(|e| self.fail(e))?;
            for p in &self.peers {
                p.send(op, seq, Some(&out)).map_err(|e| self.fail(e))?;
            }
            Ok(out)
        } else {
            let root = &self.peers[0];
            if let Err(e) = root.send(op, seq, mine) {
                // Rank 0 may have aborted the group and closed the connection: its reason, if
                // it got through, explains more than the broken pipe.
                if let Ok(Frame::Abort(reason)) = root.recv(device) {
                    self.abort_with(&reason, false);
                    return Err(collective_error(format!("the group was aborted: {reason}")));
                }
                return Err(self.fail(e));
            }
            match root.recv(device).map_err(|e| self.fail(e))? {
                Frame::Abort(reason) => {
                    self.abort_with(&reason, false);
                    Err(collective_error(format!("the group was aborted: {reason}")))
                }
                Frame::Data {
                    op: their_op,
                    seq: their_seq,
                    tensor,
                } => {
                    if their_op != op || their_seq != seq {
                        return Err(self.fail(collective_error(format!(
                            "rank 0 answered {their_op:?} (operation {their_seq}) to rank {}'s \
                             {op:?} (operation {seq})",
                            self.rank
                        ))));
                    }
                    tensor.ok_or_else(|| self.fail(collective_error("rank 0 sent no result")))
                }
            }
        }
    }
}

/// Sends a connecting rank's hello and waits for rank 0's verdict.
fn handshake_connect(
    stream: &TcpStream,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> std::result::Result<(), String> {
    let mut s = stream;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut hello = Vec::with_capacity(16);
    hello.extend_from_slice(HELLO);
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    hello.extend_from_slice(&(world as u32).to_le_bytes());
    s.write_all(&hello).map_err(|e| e.to_string())?;
    match read_u8(&mut s) {
        Ok(1) => Ok(()),
        Ok(_) => Err(
            "rank 0 rejected the connection (wrong world size, rank or version; \
                      see rank 0's log)"
                .into(),
        ),
        Err(e) => Err(e.to_string()),
    }
}

fn all_present(parts: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
    parts
        .into_iter()
        .enumerate()
        .map(|(r, t)| t.ok_or_else(|| collective_error(format!("rank {r} sent nothing"))))
        .collect()
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        if self.world == 1 {
            return Ok(x.clone());
        }
        let out = self.round(Op::AllReduceSum, Some(x), x.device(), |parts| {
            let parts = all_present(parts)?;
            let mut acc: Option<Tensor> = None;
            for (r, p) in parts.into_iter().enumerate() {
                if p.dims() != x.dims() || p.dtype() != x.dtype() {
                    return Err(collective_error(format!(
                        "all_reduce: rank {r} sent {:?} {:?}, rank 0 {:?} {:?}",
                        p.dims(),
                        p.dtype(),
                        x.dims(),
                        x.dtype()
                    )));
                }
                let p = p.to_device(x.device())?;
                acc = Some(match acc {
                    None => p,
                    Some(a) => (a + p)?,
                });
            }
            acc.ok_or_else(|| collective_error("all_reduce: empty group"))
        })?;
        if out.dims() != x.dims() || out.dtype() != x.dtype() {
            return Err(collective_error(format!(
                "all_reduce: rank 0 returned {:?} {:?}, rank {} sent {:?} {:?}",
                out.dims(),
                out.dtype(),
                self.rank,
                x.dims(),
                x.dtype()
            )));
        }
        Ok(out)
    }

    fn all_gather(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        if dim >= x.rank() {
            return Err(collective_error(format!(
                "all_gather along dim {dim} of a rank-{} tensor",
                x.rank()
            )));
        }
        if self.world == 1 {
            return Ok(x.clone());
        }
        self.round(Op::AllGather(dim as u32), Some(x), x.device(), |parts| {
            let parts = all_present(parts)?;
            Ok(Tensor::cat(&parts, dim)?)
        })
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.world {
            return Err(collective_error(format!(
                "broadcast from rank {root} in a group of {}",
                self.world
            )));
        }
        if self.world == 1 {
            return Ok(x.clone());
        }
        let mine = (self.rank == root).then_some(x);
        let out = self.round(Op::Broadcast(root as u32), mine, x.device(), |mut parts| {
            parts[root]
                .take()
                .ok_or_else(|| collective_error(format!("broadcast: root {root} sent nothing")))
        })?;
        if out.dims() != x.dims() || out.dtype() != x.dtype() {
            return Err(collective_error(format!(
                "broadcast: root sent {:?} {:?}, rank {} expected {:?} {:?}",
                out.dims(),
                out.dtype(),
                self.rank,
                x.dims(),
                x.dtype()
            )));
        }
        Ok(out)
    }

    fn abort(&self, reason: &str) {
        self.abort_with(reason, true);
    }
}

impl Drop for TcpCollective {
    fn drop(&mut self) {
        for p in &self.peers {
            p.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::{broadcast_from, InProcessCollective};

    const T: Duration = Duration::from_secs(10);

    /// Runs `f` on every rank of a TCP group of `world` ranks (threads of this process).
    fn run<R: Send>(world: usize, f: impl Fn(TcpCollective) -> R + Sync) -> Vec<R> {
        let root = TcpCollective::listen("127.0.0.1:0", world).unwrap();
        let addr = root.local_addr();
        std::thread::scope(|s| {
            let f = &f;
            let mut handles = Vec::new();
            for rank in 1..world {
                handles.push(
                    s.spawn(move || f(TcpCollective::connect(addr, rank, world, T).unwrap())),
                );
            }
            let r0 = f(root.accept(T).unwrap());
            let mut out = vec![r0];
            out.extend(handles.into_iter().map(|h| h.join().unwrap()));
            out
        })
    }

    #[test]
    fn reduce_gather_broadcast_match_in_process() {
        let compute = |c: &dyn Collective| {
            let r = c.rank() as f32;
            let dev = Device::Cpu;
            let mut results = Vec::new();
            for round in 0..20 {
                let x =
                    Tensor::new(&[0.1f32 * (r + 1.0) + round as f32, 1e-7 * r, 3.3], &dev).unwrap();
                let s = c.all_reduce_sum(&x).unwrap().to_vec1::<f32>().unwrap();
                let g = c
                    .all_gather(&x.unsqueeze(0).unwrap(), 0)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let b = c.broadcast(&x, 2).unwrap().to_vec1::<f32>().unwrap();
                results.push((s, g, b));
            }
            let y = (c.rank() == 1).then(|| {
                Tensor::arange(0f32, 6.0, &dev)
                    .unwrap()
                    .reshape((2, 3))
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap()
            });
            let from = broadcast_from(c, y.as_ref(), 1, &dev).unwrap();
            let from = from.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
            (results, from.to_vec1::<f32>().unwrap())
        };
        let tcp = run(3, |c| compute(&c));
        let group = InProcessCollective::group(3).unwrap();
        let local: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = group.iter().map(|c| s.spawn(move || compute(c))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(tcp, local);
        assert_eq!(tcp[0].1, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn dtypes_round_trip() {
        let out = run(2, |c| {
            let dev = Device::Cpu;
            let base = Tensor::new(&[1.5f32, -2.25, 7.0, 0.0], &dev).unwrap();
            let mut seen = Vec::new();
            for dt in DTYPES {
                let x = base.abs().unwrap().to_dtype(dt).unwrap();
                let b = c.broadcast(&x, 0).unwrap();
                assert_eq!(b.dtype(), dt);
                seen.push(b.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap());
            }
            seen
        });
        assert_eq!(out[0], out[1]);
    }

    #[test]
    fn a_dead_peer_is_an_error_not_a_hang() {
        let out = run(3, |c| {
            let x = Tensor::new(&[1f32], &Device::Cpu).unwrap();
            c.all_reduce_sum(&x).unwrap();
            if c.rank() == 2 {
                drop(c);
                return None;
            }
            Some(c.all_reduce_sum(&x).unwrap_err().to_string())
        });
        let root_err = out[0].clone().unwrap();
        assert!(root_err.contains("rank 2"), "{root_err}");
        let r1 = out[1].clone().unwrap();
        assert!(r1.contains("aborted") || r1.contains("rank 0"), "{r1}");
    }

    #[test]
    fn abort_reason_reaches_every_rank() {
        let out = run(3, |c| {
            let x = Tensor::new(&[1f32], &Device::Cpu).unwrap();
            if c.rank() == 1 {
                c.abort("out of memory");
                return String::new();
            }
            c.all_reduce_sum(&x).unwrap_err().to_string()
        });
        assert!(out[0].contains("out of memory"), "{}", out[0]);
        assert!(out[2].contains("out of memory"), "{}", out[2]);
    }

    #[test]
    fn mismatched_calls_and_bad_handshakes_are_reported() {
        let out = run(2, |c| {
            let x = Tensor::new(&[1f32], &Device::Cpu).unwrap();
            if c.rank() == 0 {
                c.all_reduce_sum(&x).unwrap_err().to_string()
            } else {
                c.broadcast(&x, 0).unwrap_err().to_string()
            }
        });
        assert!(out[0].contains("called"), "{}", out[0]);
        let root = TcpCollective::listen("127.0.0.1:0", 2).unwrap();
        let addr = root.local_addr();
        let e = std::thread::scope(|s| {
            let h = s.spawn(move || {
                TcpCollective::connect(addr, 1, 3, Duration::from_millis(300)).unwrap_err()
            });
            let _ = root.accept(Duration::from_millis(500));
            h.join().unwrap()
        });
        assert!(e.to_string().contains("cannot join"), "{e}");
    }
}
