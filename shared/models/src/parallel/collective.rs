//! Collective operations between the ranks of a tensor-parallel group.
//!
//! [`Collective`] is what model code calls; [`InProcessCollective`] implements it for ranks
//! that are threads of one process (CPU tensors), and `NcclCollective` (feature `nccl`) for
//! ranks on GPUs. Every rank must call the same operations in the same order.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor};

use crate::{ModelError, Result};

/// Collective operations of one rank in a group of [`Collective::world_size`] ranks.
///
/// Each call blocks until every rank of the group has made the same call. A rank that fails
/// between collectives calls [`Collective::abort`], so that the others return an error instead
/// of waiting for it forever.
pub trait Collective: Send + Sync + std::fmt::Debug {
    /// This rank, `0..world_size`.
    fn rank(&self) -> usize;

    /// Ranks in the group.
    fn world_size(&self) -> usize;

    /// The element-wise sum of `x` over all ranks (same shape and dtype on every rank); every
    /// rank receives the same result.
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor>;

    /// The ranks' tensors concatenated along `dim` in rank order.
    fn all_gather(&self, x: &Tensor, dim: usize) -> Result<Tensor>;

    /// The tensor of rank `root`. Every rank passes a tensor of the same shape and dtype (the
    /// contents of the others are ignored); see [`broadcast_from`] when only the root knows
    /// the shape.
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor>;

    /// Marks the group failed: collectives in progress or later return an error naming
    /// `reason`.
    fn abort(&self, reason: &str);
}

/// An error of a collective operation.
pub(crate) fn collective_error(msg: impl std::fmt::Display) -> ModelError {
    candle_core::Error::Msg(format!("tensor-parallel collective: {msg}")).into()
}

/// Dtypes that [`broadcast_from`] can describe in its header.
const HEADER_DTYPES: [DType; 7] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::F64,
    DType::U8,
    DType::U32,
    DType::I64,
];

/// Most dimensions a tensor sent by [`broadcast_from`] may have.
const HEADER_MAX_RANK: usize = 8;

/// Broadcasts a tensor that only `root` holds: `x` is `Some` on the root and ignored on the
/// other ranks, which receive a tensor of the root's shape and dtype on `device`. Sends a small
/// header (dtype and shape) first, then the data.
pub fn broadcast_from(
    coll: &dyn Collective,
    x: Option<&Tensor>,
    root: usize,
    device: &Device,
) -> Result<Tensor> {
    let is_root = coll.rank() == root;
    let mut header = vec![0u32; 2 + HEADER_MAX_RANK];
    if is_root {
        let x = x.ok_or_else(|| collective_error("broadcast_from: the root passed no tensor"))?;
        let code = HEADER_DTYPES
            .iter()
            .position(|d| *d == x.dtype())
            .ok_or_else(|| collective_error(format!("cannot broadcast {:?}", x.dtype())))?;
        let dims = x.dims();
        if dims.len() > HEADER_MAX_RANK {
            return Err(collective_error(format!(
                "cannot broadcast a tensor of rank {} (at most {HEADER_MAX_RANK})",
                dims.len()
            )));
        }
        header[0] = code as u32;
        header[1] = dims.len() as u32;
        for (h, &d) in header[2..].iter_mut().zip(dims) {
            *h = u32::try_from(d)
                .map_err(|_| collective_error(format!("dimension {d} too large")))?;
        }
    }
    let header = Tensor::from_vec(header, 2 + HEADER_MAX_RANK, device)?;
    let header = coll.broadcast(&header, root)?.to_vec1::<u32>()?;
    let dtype = *HEADER_DTYPES
        .get(header[0] as usize)
        .ok_or_else(|| collective_error("broadcast_from: corrupt header"))?;
    let rank = (header[1] as usize).min(HEADER_MAX_RANK);
    let dims: Vec<usize> = header[2..2 + rank].iter().map(|&d| d as usize).collect();
    let template = match (is_root, x) {
        (true, Some(x)) => x.clone(),
        _ => Tensor::zeros(dims, dtype, device)?,
    };
    coll.broadcast(&template, root)
}

// ------------------------------------------------------------------------- in-process

/// What a rank asked for; all ranks of one operation must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    AllReduceSum,
    AllGather(usize),
    Broadcast(usize),
}

#[derive(Debug)]
struct Slot {
    op: OpKind,
    tensor: Option<Tensor>,
}

#[derive(Debug)]
struct State {
    /// Two sets of slots, used by alternate operations: a rank that has finished operation `k`
    /// can deposit for `k + 1` while slower ranks still read `k`.
    slots: [Vec<Option<Slot>>; 2],
    /// Operations completed by each rank.
    seq: Vec<u64>,
    /// Ranks that have deposited for the current operation.
    arrived: usize,
    /// Completed operations of the group.
    generation: u64,
    aborted: Option<String>,
}

#[derive(Debug)]
struct Shared {
    world: usize,
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One rank of a group of threads in this process.
///
/// The ranks exchange tensors through shared memory (no copies for broadcast and gather
/// inputs). Reductions add the ranks' tensors in rank order on every rank, so every rank gets
/// the same bits, run after run.
#[derive(Debug, Clone)]
pub struct InProcessCollective {
    shared: Arc<Shared>,
    rank: usize,
}

impl InProcessCollective {
    /// A group of `world` ranks; hand element `r` to the thread of rank `r`.
    pub fn group(world: usize) -> Result<Vec<Self>> {
        if world == 0 {
            return Err(ModelError::invalid(
                "tensor parallel",
                "a group needs at least one rank",
            ));
        }
        let empty = || (0..world).map(|_| None).collect::<Vec<_>>();
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(State {
                slots: [empty(), empty()],
                seq: vec![0; world],
                arrived: 0,
                generation: 0,
                aborted: None,
            }),
            cv: Condvar::new(),
        });
        Ok((0..world)
            .map(|rank| InProcessCollective {
                shared: shared.clone(),
                rank,
            })
            .collect())
    }

    /// Clears an abort and all pending state of the whole group, so that it can be used again.
    /// Call it only while no rank is inside a collective (e.g. after every rank has returned
    /// from a failed job).
    pub fn reset(&self) {
        let mut st = self.shared.lock();
        st.aborted = None;
        st.arrived = 0;
        st.seq.iter_mut().for_each(|s| *s = 0);
        for set in st.slots.iter_mut() {
            set.iter_mut().for_each(|s| *s = None);
        }
    }

    /// Deposits this rank's contribution and waits for every rank's; returns all of them in
    /// rank order.
    fn exchange(&self, op: OpKind, x: Option<&Tensor>) -> Result<Vec<Option<Tensor>>> {
        let world = self.shared.world;
        let mut st = self.shared.lock();
        if let Some(reason) = &st.aborted {
            return Err(collective_error(format!("the group was aborted: {reason}")));
        }
        let parity = (st.seq[self.rank] % 2) as usize;
        st.seq[self.rank] += 1;
        st.slots[parity][self.rank] = Some(Slot {
            op,
            tensor: x.cloned(),
        });
        st.arrived += 1;
        if st.arrived == world {
            st.arrived = 0;
            st.generation += 1;
            self.shared.cv.notify_all();
        } else {
            let generation = st.generation;
            while st.generation == generation && st.aborted.is_none() {
                st = self
                    .shared
                    .cv
                    .wait(st)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            if st.generation == generation {
                let reason = st.aborted.clone().unwrap_or_default();
                return Err(collective_error(format!("the group was aborted: {reason}")));
            }
        }
        let mut out = Vec::with_capacity(world);
        for (r, slot) in st.slots[parity].iter().enumerate() {
            match slot {
                Some(s) if s.op == op => out.push(s.tensor.clone()),
                Some(s) => {
                    return Err(collective_error(format!(
                        "rank {} called {op:?} while rank {r} called {:?}",
                        self.rank, s.op
                    )))
                }
                None => return Err(collective_error(format!("rank {r} left no data"))),
            }
        }
        Ok(out)
    }

    fn all_present(parts: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
        parts
            .into_iter()
            .enumerate()
            .map(|(r, t)| t.ok_or_else(|| collective_error(format!("rank {r} sent nothing"))))
            .collect()
    }
}

impl Collective for InProcessCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        if self.shared.world == 1 {
            return Ok(x.clone());
        }
        let parts = Self::all_present(self.exchange(OpKind::AllReduceSum, Some(x))?)?;
        let mut acc: Option<Tensor> = None;
        for (r, p) in parts.iter().enumerate() {
            if p.dims() != x.dims() || p.dtype() != x.dtype() {
                return Err(collective_error(format!(
                    "all_reduce: rank {r} sent {:?} {:?}, rank {} {:?} {:?}",
                    p.dims(),
                    p.dtype(),
                    self.rank,
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
    }

    fn all_gather(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        if dim >= x.rank() {
            return Err(collective_error(format!(
                "all_gather along dim {dim} of a rank-{} tensor",
                x.rank()
            )));
        }
        if self.shared.world == 1 {
            return Ok(x.clone());
        }
        let parts = Self::all_present(self.exchange(OpKind::AllGather(dim), Some(x))?)?;
        let parts = parts
            .iter()
            .map(|p| p.to_device(x.device()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, dim)?)
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.shared.world {
            return Err(collective_error(format!(
                "broadcast from rank {root} in a group of {}",
                self.shared.world
            )));
        }
        if self.shared.world == 1 {
            return Ok(x.clone());
        }
        let mine = (self.rank == root).then_some(x);
        let mut parts = self.exchange(OpKind::Broadcast(root), mine)?;
        let t = parts[root]
            .take()
            .ok_or_else(|| collective_error(format!("broadcast: root {root} sent nothing")))?;
        if t.dims() != x.dims() || t.dtype() != x.dtype() {
            return Err(collective_error(format!(
                "broadcast: root sent {:?} {:?}, rank {} expected {:?} {:?}",
                t.dims(),
                t.dtype(),
                self.rank,
                x.dims(),
                x.dtype()
            )));
        }
        Ok(t.to_device(x.device())?)
    }

    fn abort(&self, reason: &str) {
        let mut st = self.shared.lock();
        if st.aborted.is_none() {
            st.aborted = Some(format!("rank {}: {reason}", self.rank));
        }
        self.shared.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<T: Send>(world: usize, f: impl Fn(InProcessCollective) -> T + Sync) -> Vec<T> {
        let group = InProcessCollective::group(world).unwrap();
        std::thread::scope(|s| {
            let handles: Vec<_> = group
                .into_iter()
                .map(|c| {
                    let f = &f;
                    s.spawn(move || f(c))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn reduce_gather_broadcast() {
        let out = run(3, |c| {
            let r = c.rank() as f32;
            let mut results = Vec::new();
            // Many rounds, to exercise slot reuse.
            for round in 0..50 {
                let x = Tensor::new(&[r + round as f32, 10.0 * r], &Device::Cpu).unwrap();
                let s = c.all_reduce_sum(&x).unwrap().to_vec1::<f32>().unwrap();
                let g = c.all_gather(&x.unsqueeze(0).unwrap(), 0).unwrap();
                let b = c.broadcast(&x, 2).unwrap().to_vec1::<f32>().unwrap();
                results.push((s, g.dims().to_vec(), b));
            }
            let y =
                (c.rank() == 1).then(|| Tensor::ones((2, 3), DType::F16, &Device::Cpu).unwrap());
            let from = broadcast_from(&c, y.as_ref(), 1, &Device::Cpu).unwrap();
            (results, from.dims().to_vec(), from.dtype())
        });
        for (results, dims, dtype) in out {
            for (round, (s, g, b)) in results.into_iter().enumerate() {
                let k = round as f32;
                assert_eq!(s, vec![3.0 + 3.0 * k, 30.0]);
                assert_eq!(g, vec![3, 2]);
                assert_eq!(b, vec![2.0 + k, 20.0]);
            }
            assert_eq!(dims, vec![2, 3]);
            assert_eq!(dtype, DType::F16);
        }
    }

    #[test]
    fn abort_wakes_the_others_and_reset_recovers() {
        let out = run(2, |c| {
            let x = Tensor::new(&[1f32], &Device::Cpu).unwrap();
            if c.rank() == 0 {
                c.abort("test failure");
                Err(())
            } else {
                c.all_reduce_sum(&x).map(|_| ()).map_err(|e| {
                    assert!(e.to_string().contains("test failure"), "{e}");
                })
            }
        });
        assert!(out.iter().all(|r| r.is_err()));
        let group = InProcessCollective::group(2).unwrap();
        group[0].abort("x");
        group[0].reset();
        let sums = std::thread::scope(|s| {
            let hs: Vec<_> = group
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        c.all_reduce_sum(&Tensor::new(&[2f32], &Device::Cpu).unwrap())
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap()
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        });
        assert_eq!(sums, vec![vec![4.0], vec![4.0]]);
    }

    #[test]
    fn mismatched_calls_are_reported() {
        let out = run(2, |c| {
            let x = Tensor::new(&[1f32], &Device::Cpu).unwrap();
            if c.rank() == 0 {
                c.all_reduce_sum(&x).err().map(|e| e.to_string())
            } else {
                c.broadcast(&x, 0).err().map(|e| e.to_string())
            }
        });
        for e in out {
            assert!(e.unwrap().contains("called"));
        }
    }
}
