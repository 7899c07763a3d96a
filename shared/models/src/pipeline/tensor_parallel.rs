//! A tensor-parallel denoiser group for any model family.
//!
//! [`DenoiserGroup`] holds `N` shards of one denoiser: rank 0 on the caller's thread and ranks
//! `1..N` on threads of their own ([`RankThreads`]), each with its [`Collective`]. On the CPU
//! the collectives are in-process; on `cuda:K` rank `r` uses GPU `K + r` and NCCL (feature
//! `nccl`). A pipeline calls [`DenoiserGroup::run`] with the per-rank loop: every rank runs the
//! same scheduler loop on the full latents, rank 0 broadcasting the job's inputs first.
//!
//! Failure handling: a rank that fails aborts the group so that the others stop waiting; an
//! in-process group is then cleared and reused, an NCCL group (whose communicators cannot be
//! reused after an abort) is marked broken and later jobs get an error asking to reload.

use crate::parallel::{Collective, InProcessCollective, RankAbort, RankJob, RankThreads};
use crate::{ModelError, Result};
use candle_core::{Device, DeviceLocation, Tensor};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

/// One helper rank: its shard and its collective.
struct Rank<M> {
    model: M,
    collective: Arc<dyn Collective>,
}

/// Ranks `1..N` and the group state.
struct Helpers<M: 'static> {
    threads: RankThreads<Rank<M>>,
    rank0: Arc<dyn Collective>,
    /// The in-process group, cleared after a failed job; `None` for NCCL.
    reset: Option<InProcessCollective>,
    /// Held while a loop runs; `true` once the group is unusable.
    busy: Mutex<bool>,
}

/// The job the helper ranks run: their shard and collective.
pub type HelperJob<M> = Arc<dyn Fn(&M, &dyn Collective) -> Result<()> + Send + Sync>;

/// `N` shards of a denoiser; see the module docs.
pub struct DenoiserGroup<M: Send + Sync + 'static> {
    rank0: M,
    helpers: Option<Helpers<M>>,
    /// Set when this process holds one rank of a group that spans processes.
    external: Option<Arc<dyn Collective>>,
}

impl<M: Send + Sync + 'static> DenoiserGroup<M> {
    /// Loads `ranks` shards. `load(device, collective)` builds one rank's shard; it is called
    /// with `None` when `ranks == 1` (load the whole model) and with the rank's collective
    /// otherwise (load only this rank's slices). All ranks load at the same time.
    pub fn load<F>(device: &Device, ranks: usize, load: F) -> Result<Self>
    where
        F: Fn(&Device, Option<Arc<dyn Collective>>) -> Result<M> + Send + Sync + 'static,
    {
        let n = ranks.max(1);
        if n == 1 {
            return Ok(DenoiserGroup {
                rank0: load(device, None)?,
                helpers: None,
                external: None,
            });
        }
        let devices = rank_devices(device, n)?;
        let (collectives, reset) = make_collectives(&devices)?;
        let load = Arc::new(load);
        let (helper_devices, helper_colls, helper_load) =
            (devices.clone(), collectives.clone(), load.clone());
        let abort: RankAbort<Rank<M>> = Arc::new(|r, why| r.collective.abort(why));
        let threads = RankThreads::spawn(
            1..n,
            "denoiser",
            move |rank| {
                let collective = helper_colls[rank].clone();
                let model = helper_load(&helper_devices[rank], Some(collective.clone()))?;
                Ok(Rank { model, collective })
            },
            abort,
        )?;
        let rank0 = collectives[0].clone();
        let m0 = load(&devices[0], Some(rank0.clone()));
        if m0.is_err() {
            rank0.abort("rank 0 failed to load its shard");
        }
        let ready = threads.wait_ready();
        let m0 = m0?;
        ready?;
        Ok(DenoiserGroup {
            rank0: m0,
            helpers: Some(Helpers {
                threads,
                rank0,
                reset,
                busy: Mutex::new(false),
            }),
            external: None,
        })
    }

    /// One rank of a group whose other ranks are other processes (e.g. a TCP or NCCL
    /// collective formed through the coordinator's rendezvous): `model` is this rank's shard.
    /// Rank 0 leads loops with [`DenoiserGroup::run`]; the other ranks join them with
    /// [`DenoiserGroup::follow`].
    pub fn external(model: M, collective: Arc<dyn Collective>) -> Self {
        DenoiserGroup {
            rank0: model,
            helpers: None,
            external: Some(collective),
        }
    }

    /// This process's rank in its group (0 unless the group spans processes).
    pub fn rank(&self) -> usize {
        self.external.as_ref().map_or(0, |c| c.rank())
    }

    /// On rank 0 of a group that spans processes: tells the other ranks that no loop follows
    /// (they return from their `follow` call). Nothing to do for in-process or one-rank groups.
    pub fn stop_followers(&self, device: &Device) -> Result<()> {
        match &self.external {
            Some(c) if c.rank() == 0 && c.world_size() > 1 => {
                LoopSettings::share(Some(c.as_ref()), Some(LoopSettings::stop()), device)
                    .map(|_| ())
            }
            _ => Ok(()),
        }
    }

    /// Runs `job` on this process's shard with the cross-process collective (ranks > 0 of an
    /// external group).
    pub fn follow<T>(&self, job: impl FnOnce(&M, &dyn Collective) -> Result<T>) -> Result<T> {
        match &self.external {
            Some(c) => job(&self.rank0, c.as_ref()),
            None => Err(ModelError::invalid(
                "tensor parallel",
                "this denoiser is not one rank of a cross-process group",
            )),
        }
    }

    /// Ranks in the group.
    pub fn ranks(&self) -> usize {
        if let Some(c) = &self.external {
            return c.world_size();
        }
        self.helpers
            .as_ref()
            .map(|h| h.threads.ranks().end)
            .unwrap_or(1)
    }

    /// Rank 0's shard (the whole model without tensor parallelism).
    pub fn rank0(&self) -> &M {
        &self.rank0
    }

    /// Runs one loop on every rank: `helper` on ranks `1..N` (on their threads) and `rank0`
    /// here, with rank 0's collective (`None` without tensor parallelism). Returns rank 0's
    /// result once every rank has finished. A failing rank aborts the others.
    pub fn run<T>(
        &self,
        helper: HelperJob<M>,
        rank0: impl FnOnce(&M, Option<&dyn Collective>) -> Result<T>,
    ) -> Result<T> {
        if let Some(c) = &self.external {
            if c.rank() != 0 {
                return Err(ModelError::invalid(
                    "tensor parallel",
                    format!("rank {} follows loops; only rank 0 starts them", c.rank()),
                ));
            }
            let r = rank0(&self.rank0, Some(c.as_ref()));
            if let Err(e) = &r {
                if !is_cancel(e) {
                    c.abort(&e.to_string());
                }
            }
            return r;
        }
        let Some(h) = &self.helpers else {
            return rank0(&self.rank0, None);
        };
        // The ranks run one loop at a time.
        let mut broken = h.busy.lock().unwrap_or_else(|p| p.into_inner());
        if *broken {
            return Err(ModelError::invalid(
                "tensor parallel",
                "a denoiser rank failed in an earlier job and the group cannot be reused; load the pipeline again",
            ));
        }
        let job: RankJob<Rank<M>> = Arc::new(move |_rank, r: &Rank<M>| {
            let result = helper(&r.model, r.collective.as_ref());
            if let Err(e) = &result {
                if !is_cancel(e) {
                    r.collective.abort(&e.to_string());
                }
            }
            result
        });
        let pending = h.threads.dispatch(job)?;
        let r0 = rank0(&self.rank0, Some(h.rank0.as_ref()));
        if let Err(e) = &r0 {
            if !is_cancel(e) {
                h.rank0.abort(&e.to_string());
            }
        }
        let rest = pending.wait();
        let failed = |e: Option<&ModelError>| matches!(e, Some(e) if !is_cancel(e));
        if failed(r0.as_ref().err()) || failed(rest.as_ref().err()) {
            match &h.reset {
                // Every rank has returned: the in-process group can be cleared and reused.
                Some(group) => group.reset(),
                None => *broken = true,
            }
        }
        match (r0, rest) {
            (Ok(v), Ok(())) => Ok(v),
            (Err(e), _) | (Ok(_), Err(e)) => Err(e),
        }
    }
}

fn is_cancel(e: &ModelError) -> bool {
    matches!(e, ModelError::Cancelled { .. })
}

/// Rank 0 decides whether to stop after a step and every rank learns the decision (a
/// broadcast of one flag); without a collective the decision is rank 0's.
pub fn agree_on_stop(
    coll: Option<&dyn Collective>,
    stop: bool,
    device: &Device,
) -> Result<ControlFlow<()>> {
    let stop = match coll {
        None => stop,
        Some(c) => {
            let flag = Tensor::new(&[u32::from(stop)], device)?;
            c.broadcast(&flag, 0)?.to_vec1::<u32>()?.first() == Some(&1)
        }
    };
    Ok(if stop {
        ControlFlow::Break(())
    } else {
        ControlFlow::Continue(())
    })
}

/// The scalar settings of one denoising loop, the same on every rank: rank 0 shares them at the
/// start of each loop (so ranks in other processes learn them too).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoopSettings {
    /// `false`: no loop follows; followers stop.
    pub go: bool,
    /// Whether the batch holds an unconditional half.
    pub cfg: bool,
    /// Denoising steps.
    pub steps: usize,
    /// Guidance scale.
    pub guidance: f64,
    /// Generation height in pixels (size conditioning; 0 when the model has none).
    pub height: usize,
    /// Generation width in pixels.
    pub width: usize,
}

impl LoopSettings {
    /// A loop with these settings.
    pub fn run(cfg: bool, steps: usize, guidance: f64, (height, width): (usize, usize)) -> Self {
        LoopSettings {
            go: true,
            cfg,
            steps,
            guidance,
            height,
            width,
        }
    }

    /// "No more loops".
    pub fn stop() -> Self {
        LoopSettings::default()
    }

    /// Rank 0's settings on every rank (`settings` is `Some` on rank 0, ignored elsewhere).
    pub fn share(
        coll: Option<&dyn Collective>,
        settings: Option<LoopSettings>,
        device: &Device,
    ) -> Result<LoopSettings> {
        let v = share_scalars(
            coll,
            settings.map(|s| {
                [
                    f64::from(u8::from(s.go)),
                    f64::from(u8::from(s.cfg)),
                    s.steps as f64,
                    s.guidance,
                    s.height as f64,
                    s.width as f64,
                ]
            }),
            device,
        )?;
        Ok(LoopSettings {
            go: v[0] != 0.0,
            cfg: v[1] != 0.0,
            steps: v[2] as usize,
            guidance: v[3],
            height: v[4] as usize,
            width: v[5] as usize,
        })
    }
}

/// Rank 0's loop scalars on every rank (one broadcast of `N` values); `values` is `Some` on
/// rank 0 (returned as is without a collective), ignored elsewhere.
pub fn share_scalars<const N: usize>(
    coll: Option<&dyn Collective>,
    values: Option<[f64; N]>,
    device: &Device,
) -> Result<[f64; N]> {
    let Some(c) = coll else {
        return values
            .ok_or_else(|| ModelError::invalid("tensor parallel", "rank 0 has no loop settings"));
    };
    let v = values.unwrap_or([0.0; N]);
    let got = c
        .broadcast(&Tensor::new(&v, device)?, 0)?
        .to_vec1::<f64>()?;
    let mut out = [0.0; N];
    for (o, g) in out.iter_mut().zip(got) {
        *o = g;
    }
    Ok(out)
}

/// Rank 0's tensor on every rank: `x` is `Some` on rank 0 (and returned as is without a
/// collective), ignored elsewhere.
pub fn share_from_rank0(
    coll: Option<&dyn Collective>,
    x: Option<&Tensor>,
    device: &Device,
) -> Result<Tensor> {
    match coll {
        Some(c) => crate::parallel::broadcast_from(c, x, 0, device),
        None => x
            .cloned()
            .ok_or_else(|| ModelError::invalid("tensor parallel", "rank 0 has no input to share")),
    }
}

/// The devices of the ranks: all the CPU, or consecutive GPUs from `device`'s.
fn rank_devices(device: &Device, n: usize) -> Result<Vec<Device>> {
    match device.location() {
        DeviceLocation::Cpu => Ok(vec![Device::Cpu; n]),
        DeviceLocation::Cuda { gpu_id } => {
            let mut devices = vec![device.clone()];
            for r in 1..n {
                devices.push(Device::new_cuda(gpu_id + r).map_err(|e| {
                    ModelError::invalid(
                        "tensor parallel",
                        format!("rank {r} needs GPU {} ({e}); use fewer ranks", gpu_id + r),
                    )
                })?);
            }
            Ok(devices)
        }
        other => Err(ModelError::invalid(
            "tensor parallel",
            format!("not available on {other:?}: use the CPU or CUDA GPUs"),
        )),
    }
}

type Collectives = (Vec<Arc<dyn Collective>>, Option<InProcessCollective>);

/// One collective per rank: threads of this process on the CPU, NCCL on GPUs.
fn make_collectives(devices: &[Device]) -> Result<Collectives> {
    if devices.iter().all(|d| d.is_cpu()) {
        let group = InProcessCollective::group(devices.len())?;
        let reset = group.first().cloned();
        let group = group
            .into_iter()
            .map(|c| Arc::new(c) as Arc<dyn Collective>)
            .collect();
        return Ok((group, reset));
    }
    nccl_collectives(devices)
}

#[cfg(feature = "nccl")]
fn nccl_collectives(devices: &[Device]) -> Result<Collectives> {
    use crate::parallel::{NcclCollective, NcclId};
    let id = NcclId::new()?;
    let n = devices.len();
    let comms = devices
        .iter()
        .enumerate()
        .map(|(r, d)| NcclCollective::start(d, r, n, &id))
        .collect::<Result<Vec<_>>>()?;
    for c in &comms {
        c.wait_ready()?;
    }
    Ok((
        comms
            .into_iter()
            .map(|c| Arc::new(c) as Arc<dyn Collective>)
            .collect(),
        None,
    ))
}

#[cfg(not(feature = "nccl"))]
fn nccl_collectives(_devices: &[Device]) -> Result<Collectives> {
    Err(ModelError::invalid(
        "tensor parallel",
        "GPU ranks need NCCL: build relayfarm with `--features cuda`",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn group_sums_over_ranks_and_recovers_from_a_failure() {
        let g = DenoiserGroup::load(&Device::Cpu, 3, |_d, c| {
            Ok(c.map(|c| c.rank()).unwrap_or(0) as f32 + 1.0)
        })
        .unwrap();
        assert_eq!(g.ranks(), 3);
        let sum = |g: &DenoiserGroup<f32>, fail: bool| {
            let helper: HelperJob<f32> = Arc::new(move |m, c| {
                if fail && c.rank() == 2 {
                    return Err(ModelError::invalid("test", "rank 2 fails"));
                }
                let x = Tensor::new(&[*m], &Device::Cpu)?;
                c.all_reduce_sum(&x)?;
                Ok(())
            });
            g.run(helper, |m, c| {
                let x = Tensor::new(&[*m], &Device::Cpu)?;
                Ok(c.unwrap().all_reduce_sum(&x)?.to_vec1::<f32>()?[0])
            })
        };
        assert_eq!(sum(&g, false).unwrap(), 6.0);
        assert!(sum(&g, true).is_err());
        assert_eq!(sum(&g, false).unwrap(), 6.0);
        // In-process ranks follow through `run`, never `follow`: nothing to stop (and no
        // broadcast that the helper threads would never answer).
        g.stop_followers(&Device::Cpu).unwrap();
        assert_eq!(sum(&g, false).unwrap(), 6.0);
        let one = DenoiserGroup::load(&Device::Cpu, 1, |_d, c| Ok(c.is_none())).unwrap();
        assert!(*one.rank0());
        let z = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            share_from_rank0(None, Some(&z), &Device::Cpu)
                .unwrap()
                .dims(),
            &[2]
        );
    }
}
