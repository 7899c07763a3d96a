//! Threads that each own one rank's state (a model shard and its collective) and run jobs on
//! it, for tensor parallelism inside one process.
//!
//! The state is built on its own thread and never leaves it, so it need not be `Send` (an
//! NCCL communicator is not). The caller usually runs rank 0 itself and these threads run the
//! other ranks.

use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use super::collective::collective_error;
use crate::Result;

/// Work for every rank: called with the rank and its state.
pub type RankJob<S> = Arc<dyn Fn(usize, &S) -> Result<()> + Send + Sync>;

/// Called on a rank's state when its job panics, so that the group's other ranks stop waiting
/// (usually [`super::Collective::abort`]).
pub type RankAbort<S> = Arc<dyn Fn(&S, &str) + Send + Sync>;

type Reply = (usize, Result<()>);

/// Threads for a range of ranks; see the module docs.
pub struct RankThreads<S: 'static> {
    ranks: Range<usize>,
    senders: Vec<mpsc::Sender<(RankJob<S>, mpsc::Sender<Reply>)>>,
    handles: Vec<JoinHandle<()>>,
    ready: Mutex<Option<mpsc::Receiver<Reply>>>,
}

impl<S: 'static> std::fmt::Debug for RankThreads<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RankThreads")
            .field("ranks", &self.ranks)
            .finish()
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl<S: 'static> RankThreads<S> {
    /// Starts one thread per rank in `ranks`; each builds its state with `init(rank)`. Returns
    /// at once: call [`RankThreads::wait_ready`] (after building the caller's own rank, when
    /// building needs every rank at the same time, as an NCCL communicator does).
    pub fn spawn<I>(ranks: Range<usize>, name: &str, init: I, abort: RankAbort<S>) -> Result<Self>
    where
        I: Fn(usize) -> Result<S> + Send + Sync + 'static,
    {
        let init = Arc::new(init);
        let (ready_tx, ready_rx) = mpsc::channel::<Reply>();
        let mut senders = Vec::new();
        let mut handles = Vec::new();
        for rank in ranks.clone() {
            let (tx, rx) = mpsc::channel::<(RankJob<S>, mpsc::Sender<Reply>)>();
            let init = init.clone();
            let ready = ready_tx.clone();
            let abort = abort.clone();
            let handle = std::thread::Builder::new()
                .name(format!("{name}-rank{rank}"))
                .spawn(move || {
                    let state = match catch_unwind(AssertUnwindSafe(|| init(rank))) {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            let _ = ready.send((rank, Err(e)));
                            return;
                        }
                        Err(p) => {
                            let msg = format!(
                                "rank {rank} panicked while loading: {}",
                                panic_message(&*p)
                            );
                            let _ = ready.send((rank, Err(collective_error(msg))));
                            return;
                        }
                    };
                    let _ = ready.send((rank, Ok(())));
                    drop(ready);
                    for (job, reply) in rx {
                        let result = match catch_unwind(AssertUnwindSafe(|| job(rank, &state))) {
                            Ok(r) => r,
                            Err(p) => {
                                let msg = format!("rank {rank} panicked: {}", panic_message(&*p));
                                abort(&state, &msg);
                                Err(collective_error(msg))
                            }
                        };
                        let _ = reply.send((rank, result));
                    }
                })
                .map_err(|e| {
                    collective_error(format!("cannot start the rank {rank} thread: {e}"))
                })?;
            senders.push(tx);
            handles.push(handle);
        }
        Ok(RankThreads {
            ranks,
            senders,
            handles,
            ready: Mutex::new(Some(ready_rx)),
        })
    }

    /// Waits until every rank has built its state; the first error (lowest rank) otherwise.
    pub fn wait_ready(&self) -> Result<()> {
        let rx = self
            .ready
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        let Some(rx) = rx else {
            return Ok(());
        };
        collect(rx, self.ranks.len())
    }

    /// The ranks these threads run.
    pub fn ranks(&self) -> Range<usize> {
        self.ranks.clone()
    }

    /// Sends `job` to every rank; wait for the ranks with [`PendingRanks::wait`].
    pub fn dispatch(&self, job: RankJob<S>) -> Result<PendingRanks> {
        let (tx, rx) = mpsc::channel();
        for (rank, s) in self.ranks.clone().zip(&self.senders) {
            s.send((job.clone(), tx.clone()))
                .map_err(|_| collective_error(format!("the rank {rank} thread has stopped")))?;
        }
        Ok(PendingRanks {
            rx,
            count: self.senders.len(),
        })
    }
}

impl<S: 'static> Drop for RankThreads<S> {
    fn drop(&mut self) {
        // Closing the channels ends each thread's loop once its current job is done.
        self.senders.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

fn collect(rx: mpsc::Receiver<Reply>, count: usize) -> Result<()> {
    let mut errors: Vec<(usize, crate::ModelError)> = Vec::new();
    for _ in 0..count {
        match rx.recv() {
            Ok((_, Ok(()))) => {}
            Ok((rank, Err(e))) => errors.push((rank, e)),
            Err(_) => return Err(collective_error("a rank thread stopped without answering")),
        }
    }
    errors.sort_by_key(|(r, _)| *r);
    match errors.into_iter().next() {
        Some((_, e)) => Err(e),
        None => Ok(()),
    }
}

/// The ranks' answers to one [`RankThreads::dispatch`].
#[derive(Debug)]
pub struct PendingRanks {
    rx: mpsc::Receiver<Reply>,
    count: usize,
}

impl PendingRanks {
    /// Waits for every rank; the error of the lowest failed rank, if any.
    pub fn wait(self) -> Result<()> {
        collect(self.rx, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::{Collective, InProcessCollective};
    use candle_core::{Device, Tensor};

    #[test]
    fn ranks_run_jobs_and_report_errors() {
        let group = InProcessCollective::group(3).unwrap();
        let others = group[1..].to_vec();
        let abort: RankAbort<InProcessCollective> = Arc::new(|c, why| c.abort(why));
        let threads =
            RankThreads::spawn(1..3, "test", move |r| Ok(others[r - 1].clone()), abort).unwrap();
        threads.wait_ready().unwrap();
        let job: RankJob<InProcessCollective> = Arc::new(|_, c| {
            c.all_reduce_sum(&Tensor::new(&[1f32], &Device::Cpu)?)?;
            Ok(())
        });
        let pending = threads.dispatch(job).unwrap();
        let s = group[0]
            .all_reduce_sum(&Tensor::new(&[1f32], &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(s.to_vec1::<f32>().unwrap(), vec![3.0]);
        pending.wait().unwrap();

        // A panicking rank aborts the group instead of leaving the others waiting.
        let job: RankJob<InProcessCollective> = Arc::new(|rank, c| {
            if rank == 2 {
                panic!("boom");
            }
            c.all_reduce_sum(&Tensor::new(&[1f32], &Device::Cpu)?)?;
            Ok(())
        });
        let pending = threads.dispatch(job).unwrap();
        let r0 = group[0].all_reduce_sum(&Tensor::new(&[1f32], &Device::Cpu).unwrap());
        assert!(r0.is_err());
        let e = pending.wait().unwrap_err().to_string();
        assert!(e.contains("boom") || e.contains("aborted"), "{e}");
    }
}
