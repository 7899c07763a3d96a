//! `relayfarm-worker --replica`: one stage of a multi-process replica.
//!
//! The worker registers its model as usual, starts a stage-link server (`--link-listen`) and
//! joins the coordinator's replica pool (`ReplicaService.JoinReplica`). The coordinator, run
//! with `--replica-layout`, groups workers into replicas and tells each, in its heartbeat
//! answers, which stage it runs:
//!
//! - **text encoder (the head)**: claims jobs (`ClaimJob`, at most [`HEAD_WINDOW`] in flight),
//!   turns each into a request exactly as the whole-job path does, encodes the prompt and sends
//!   the conditioning to denoiser rank 0; receives the images back from the VAE, encodes the
//!   PNG with the same metadata, stores it under the same key and completes the job (or fails
//!   it). Its heartbeats carry the in-flight job ids (lease renewal).
//! - **denoiser**: rank 0 runs the denoising loop over links (conditioning in, latents out to
//!   the VAE); with `tp_size > 1` the ranks form a [`TcpCollective`] whose rank-0 address goes
//!   through the coordinator's rendezvous, and ranks > 0 follow rank 0's loops.
//! - **VAE**: decodes latents and sends the images to the head.
//!
//! When an assignment changes (a member died, the replica re-formed) the stage is stopped,
//! its links dropped, and the head releases its in-flight jobs (`ReleaseJob`), so they are
//! redelivered. Stage messages carry `"<generation>/<job id>"` as their id, so that a message
//! of an older formation is recognised and dropped by the head.

use crate::farm::device_thread::model_info;
use crate::farm::rpc::{self, Backoff, Cluster};
use crate::farm::{Shutdown, WorkerArgs};
use crate::runner::PipelineRunner;
use crate::stage::executor::{image_of, run_denoiser, run_text_encoder, run_vae, StageJob};
use crate::stage::grpc_link::{GrpcLinkReceiver, GrpcLinkSender, LinkServer};
use anyhow::{anyhow, bail, Context};
use relayfarm_models::checkpoint::PipelineFolder;
use relayfarm_models::link::{Link, MessageKind, StageMessage};
use relayfarm_models::parallel::{Collective, TcpCollective};
use relayfarm_models::pipeline::{
    load_pipeline, DiffusionPipeline, GenerateRequest, Generated, PipelineOptions, Stage, StageSet,
    StepEvent,
};
use relayfarm_models::RunDtype;
use relayfarm_proto::v1::replica_service_client::ReplicaServiceClient;
use relayfarm_proto::v1::{
    Assignment, ClaimedJob, CompleteJobRequest, DeviceInfo, JoinReplicaRequest, RegisterRequest,
    RendezvousRequest, ReplicaHeartbeatRequest,
};
use relayfarm_results::ResultStore;
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

/// Jobs the head keeps in flight (claimed, not yet finished).
pub const HEAD_WINDOW: usize = 2;
/// Messages a stage's inbox holds.
const INBOX_CAPACITY: usize = 2;
/// How long stage links keep trying to reach their peer.
const LINK_CONNECT: Duration = Duration::from_secs(15);
/// How long tensor-parallel ranks wait for each other.
const TP_RENDEZVOUS: Duration = Duration::from_secs(30);
/// Rendezvous key of the NCCL unique id of a GPU tensor-parallel group.
#[cfg_attr(not(feature = "nccl"), allow(dead_code))]
const NCCL_ID_KEY: &str = "nccl-id";

/// Rendezvous key of rank 0's collective address.
const TP_ROOT_KEY: &str = "tp-root";
/// How long a stopping stage may take before it is abandoned (its thread ends on its own).
const STOP_GRACE: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A [`Link`] that does not pass `Shutdown` messages on: the stages of a replica stop when
/// their assignment is withdrawn, not when an upstream process says so (a late `Shutdown` of an
/// older formation must not stop a newer one).
struct NoShutdown<L: Link>(L);

impl<L: Link> Link for NoShutdown<L> {
    fn send(&mut self, msg: StageMessage) -> relayfarm_models::Result<()> {
        if msg.kind() == MessageKind::Shutdown {
            return Ok(());
        }
        self.0.send(msg)
    }

    fn recv(&mut self) -> relayfarm_models::Result<Option<StageMessage>> {
        self.0.recv()
    }

    fn describe(&self) -> String {
        self.0.describe()
    }
}

/// What the process shares between its tasks.
struct Member {
    args: WorkerArgs,
    model_name: String,
    model_dir: PathBuf,
    opts: PipelineOptions,
    cluster: Cluster,
    replica: ReplicaServiceClient<Channel>,
    register: RegisterRequest,
    link_server: LinkServer,
    link_addr: String,
    store: ResultStore,
    runtime: Handle,
    /// The head's in-flight jobs (reported in heartbeats).
    running: Mutex<HashMap<String, InFlight>>,
    /// In-flight jobs the coordinator cancelled: their results are reported as cancelled.
    cancelled: Mutex<std::collections::HashSet<String>>,
    /// Loaded text-encoder / VAE pipelines, kept across re-formations.
    cache: Mutex<HashMap<Stage, Arc<dyn DiffusionPipeline>>>,
    /// Cancelled by a second signal: stop retrying reports.
    abort: CancellationToken,
}

/// A job the head has claimed and not finished.
struct InFlight {
    job: ClaimedJob,
    request: GenerateRequest,
    generation: u64,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// Runs the worker as a replica member until `shutdown`.
pub async fn serve(args: WorkerArgs, shutdown: Shutdown) -> anyhow::Result<()> {
    let [spec] = args.models.as_slice() else {
        bail!("--replica: give exactly one --model NAME=DIR (a replica serves one model)");
    };
    let model_dir = spec
        .dir
        .clone()
        .ok_or_else(|| anyhow!("--model {}: --replica needs NAME=DIR", spec.name))?;
    if args.noop {
        bail!("--replica does not support --noop");
    }
    let device = crate::farm::parse_device(&args.device)?;
    let dtype: RunDtype = args.dtype.parse().map_err(|e: String| anyhow!(e))?;
    let opts = PipelineOptions {
        device: device.clone(),
        variant: args.variant.clone(),
        ..PipelineOptions::cpu(dtype)
    };
    // Configs only: enough to describe and validate the model.
    let info = {
        let (dir, o, name) = (model_dir.clone(), opts.clone(), spec.name.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let folder = PipelineFolder::open(&dir)?;
            let p = load_pipeline(
                &folder,
                &PipelineOptions {
                    stages: StageSet::empty(),
                    ..o
                },
            )?;
            Ok(model_info(&name, p.as_ref()))
        })
        .await
        .map_err(|e| anyhow!("model loading stopped: {e}"))?
        .with_context(|| format!("--model {}={}", spec.name, model_dir.display()))?
    };
    let store = ResultStore::open(&args.results.to_string_lossy()).with_context(|| {
        format!(
            "--results {}: cannot open the result store",
            args.results.display()
        )
    })?;
    let (link_server, first_inbox) = LinkServer::start(&args.link_listen, 1, device.clone())
        .await
        .map_err(|e| anyhow!("--link-listen {}: {e}", args.link_listen))?;
    drop(first_inbox);
    link_server.close();
    let link_addr = match &args.link_advertise {
        Some(a) => a.clone(),
        None => link_server.local_addr().to_string(),
    };
    let worker_id = args
        .worker_id
        .clone()
        .unwrap_or_else(crate::farm::default_worker_id);
    let cluster = Cluster::connect_lazy(&args.coordinator, &worker_id)?;
    let url = rpc::coordinator_url(&args.coordinator);
    let channel = Endpoint::from_shared(url.clone())
        .map_err(|e| anyhow!("--coordinator {url}: not a valid URL ({e})"))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .connect_lazy();
    let register = RegisterRequest {
        worker_id: worker_id.clone(),
        hostname: crate::farm::hostname(),
        devices: vec![DeviceInfo {
            name: args.device.clone(),
            memory_bytes: 0,
        }],
        models: vec![info],
    };
    tracing::info!(
        worker_id = %worker_id,
        coordinator = %url,
        model = %spec.name,
        link = %link_addr,
        "replica worker ready"
    );
    let member = Arc::new(Member {
        model_name: spec.name.clone(),
        model_dir,
        opts,
        cluster,
        replica: ReplicaServiceClient::new(channel),
        register,
        link_server,
        link_addr,
        store,
        runtime: Handle::current(),
        running: Mutex::new(HashMap::new()),
        cancelled: Mutex::new(std::collections::HashSet::new()),
        cache: Mutex::new(HashMap::new()),
        abort: shutdown.now.clone(),
        args,
    });
    let Some(heartbeat_ms) = member.join_until_ok(&shutdown.graceful).await? else {
        return Ok(());
    };
    let (tx, mut rx) = watch::channel(Assignment::default());
    let hb_stop = CancellationToken::new();
    let hb = tokio::spawn(
        member
            .clone()
            .heartbeat_loop(heartbeat_ms, tx, hb_stop.clone()),
    );
    let mut current: Option<RunningStage> = None;
    // A formation whose stage failed here is not started again.
    let mut failed_key = None;
    loop {
        let next = rx.borrow_and_update().clone();
        let same = current.as_ref().is_some_and(|c| c.key == key_of(&next))
            || (current.is_none() && next.stage.is_empty())
            || (current.is_none() && failed_key.as_ref() == Some(&key_of(&next)));
        let mut start_failed = false;
        if !same {
            if let Some(stage) = current.take() {
                member.clone().stop_stage(stage).await;
            }
            if !next.stage.is_empty() {
                match member.clone().start_stage(&next, &rx).await {
                    Ok(s) => current = Some(s),
                    Err(e) => {
                        tracing::error!(stage = %next.stage, replica = %next.replica_id, error = %e, "cannot start the stage");
                        start_failed = true;
                    }
                }
            }
        }
        let failed = current
            .as_ref()
            .map(|c| c.failed.clone())
            .unwrap_or_default();
        if !start_failed {
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { break } else { continue },
                _ = failed.cancelled() => {}
                _ = shutdown.graceful.cancelled() => break,
            }
        }
        // The stage failed: leave the replica (the coordinator dissolves it and releases its
        // jobs) and join again, so that it is formed anew.
        failed_key = Some(key_of(&next));
        if let Some(stage) = current.take() {
            member.clone().stop_stage(stage).await;
        }
        tracing::warn!(replica = %next.replica_id, generation = next.generation, "the stage failed; leaving the replica and joining again");
        if let Err(s) = member.cluster.deregister().await {
            tracing::warn!(error = %rpc::describe(&s), "deregister failed");
        }
        match member.join_until_ok(&shutdown.graceful).await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                tracing::error!(error = %e, "leaving");
                break;
            }
        }
    }
    if let Some(stage) = current.take() {
        member.clone().stop_stage(stage).await;
    }
    hb_stop.cancel();
    let _ = hb.await;
    match member.cluster.deregister().await {
        Ok(()) => tracing::info!("deregistered"),
        Err(s) => tracing::warn!(error = %rpc::describe(&s), "deregister failed"),
    }
    Ok(())
}

/// Why joining the replica pool did not work.
#[derive(Debug)]
enum JoinError {
    /// Worth retrying (coordinator or Redis unreachable, ...).
    Retry(anyhow::Error),
    /// The coordinator will never accept it (no `--replica-layout`).
    Refused(String),
}

impl std::fmt::Display for JoinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JoinError::Retry(e) => write!(f, "{e:#}"),
            JoinError::Refused(why) => write!(f, "refused: {why}"),
        }
    }
}

/// What identifies one formation's stage for this worker.
fn key_of(a: &Assignment) -> (String, u64, String, u32) {
    (
        a.replica_id.clone(),
        a.generation,
        a.stage.clone(),
        a.tp_rank,
    )
}

/// A stage running in this process.
struct RunningStage {
    key: (String, u64, String, u32),
    stop: CancellationToken,
    /// Cancelled when a loop of the stage fails: the worker leaves the replica and joins
    /// again, so that the coordinator re-forms it.
    failed: CancellationToken,
    /// Tasks and threads to wait for (bounded by [`STOP_GRACE`]).
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The tensor-parallel group, aborted when the stage stops.
    collective: Option<Arc<dyn Collective>>,
    /// Closes the head's job queue (ends the encoder thread).
    jobs: Option<std::sync::mpsc::SyncSender<StageJob>>,
    head: bool,
}

impl Member {
    /// Registers and joins the replica pool, retrying while the coordinator is unreachable;
    /// the heartbeat interval, or `None` if stopped first. A coordinator that runs without
    /// replicas is a configuration error: it is returned, and the worker exits.
    async fn join_until_ok(&self, stop: &CancellationToken) -> anyhow::Result<Option<u64>> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        loop {
            match self.join_once().await {
                Ok(ms) => return Ok(Some(ms)),
                Err(JoinError::Refused(why)) => {
                    return Err(anyhow!(
                        "the coordinator refused to place this worker in a replica: {why}"
                    ));
                }
                Err(JoinError::Retry(e)) => {
                    tracing::warn!(error = %e, "cannot join the replica pool; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = stop.cancelled() => return Ok(None),
                    }
                }
            }
        }
    }

    async fn join_once(&self) -> Result<u64, JoinError> {
        self.cluster
            .register(self.register.clone())
            .await
            .map_err(|s| JoinError::Retry(anyhow!("Register: {}", rpc::describe(&s))))?;
        let mut c = self.replica.clone();
        let resp = c
            .join_replica(JoinReplicaRequest {
                worker_id: self.cluster.worker_id().to_string(),
                model: self.model_name.clone(),
                link_addr: self.link_addr.clone(),
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::FailedPrecondition => JoinError::Refused(s.message().to_string()),
                _ => JoinError::Retry(anyhow!("JoinReplica: {}", rpc::describe(&s))),
            })?
            .into_inner();
        tracing::info!(
            heartbeat_ms = resp.heartbeat_interval_ms,
            lease_ms = resp.lease_ms,
            link = %self.link_addr,
            "joined the replica pool"
        );
        Ok(resp.heartbeat_interval_ms.max(50))
    }

    fn running_ids(&self) -> Vec<String> {
        lock(&self.running).keys().cloned().collect()
    }

    async fn heartbeat_loop(
        self: Arc<Self>,
        interval_ms: u64,
        tx: watch::Sender<Assignment>,
        stop: CancellationToken,
    ) {
        let interval = Duration::from_millis(interval_ms);
        loop {
            let mut c = self.replica.clone();
            let req = ReplicaHeartbeatRequest {
                worker_id: self.cluster.worker_id().to_string(),
                running_job_ids: self.running_ids(),
            };
            match c.replica_heartbeat(req).await {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    if !resp.cancel_job_ids.is_empty() {
                        let running = lock(&self.running);
                        let mut cancelled = lock(&self.cancelled);
                        for id in resp.cancel_job_ids {
                            if running.contains_key(&id) && cancelled.insert(id.clone()) {
                                tracing::info!(job_id = %id, "coordinator cancelled the job; it is reported cancelled when it comes back");
                            }
                        }
                    }
                    if resp.rejoin {
                        tracing::info!(
                            "the coordinator does not know this replica member; joining again"
                        );
                        let _ = tx.send(Assignment::default());
                        if let Err(e) = self.join_once().await {
                            tracing::warn!(error = %e, "re-joining failed; will try again");
                        }
                    } else {
                        let a = resp.assignment.unwrap_or_default();
                        if key_of(&a) != key_of(&tx.borrow()) {
                            tracing::info!(
                                replica = %a.replica_id,
                                generation = a.generation,
                                stage = %a.stage,
                                tp_rank = a.tp_rank,
                                tp_size = a.tp_size,
                                downstream = %a.downstream_addr,
                                "assignment"
                            );
                            let _ = tx.send(a);
                        }
                    }
                }
                Err(s) => {
                    tracing::warn!(error = %rpc::describe(&s), "replica heartbeat failed");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// A pipeline with only `stage`'s weights (text encoder and VAE are cached).
    async fn stage_pipeline(
        &self,
        stage: Stage,
        collective: Option<Arc<dyn Collective>>,
    ) -> anyhow::Result<Arc<dyn DiffusionPipeline>> {
        if collective.is_none() {
            if let Some(p) = lock(&self.cache).get(&stage) {
                return Ok(p.clone());
            }
        }
        let dir = self.model_dir.clone();
        let opts = PipelineOptions {
            stages: StageSet::only(stage),
            collective: collective.clone(),
            ..self.opts.clone()
        };
        let p: Arc<dyn DiffusionPipeline> = tokio::task::spawn_blocking(move || {
            let _span = tracing::info_span!("load_stage", stage = %stage).entered();
            let folder = PipelineFolder::open(&dir)?;
            Ok::<_, relayfarm_models::ModelError>(Arc::from(load_pipeline(&folder, &opts)?))
        })
        .await
        .map_err(|e| anyhow!("loading the {stage} stage stopped: {e}"))??;
        if collective.is_none() && stage != Stage::Denoiser {
            lock(&self.cache).insert(stage, p.clone());
        }
        Ok(p)
    }

    /// A link to `addr` for replica generation `generation`, made on a blocking thread; its
    /// sends give up when `stop` is cancelled.
    async fn connect(
        &self,
        addr: &str,
        generation: u64,
        stop: &CancellationToken,
    ) -> anyhow::Result<GrpcLinkSender> {
        if addr.is_empty() {
            bail!("the assignment names no downstream address");
        }
        let (addr, rt) = (addr.to_string(), self.runtime.clone());
        Ok(
            tokio::task::spawn_blocking(move || GrpcLinkSender::connect(&addr, rt, LINK_CONNECT))
                .await
                .map_err(|e| anyhow!("link connect stopped: {e}"))??
                .with_generation(generation)
                .with_cancel(stop.clone()),
        )
    }

    async fn start_stage(
        self: Arc<Self>,
        a: &Assignment,
        rx: &watch::Receiver<Assignment>,
    ) -> anyhow::Result<RunningStage> {
        let stage: Stage = a
            .stage
            .parse()
            .map_err(|e| anyhow!("assignment stage `{}`: {e}", a.stage))?;
        tracing::info!(stage = %stage, replica = %a.replica_id, generation = a.generation, tp_rank = a.tp_rank, "starting the stage");
        let mut running = RunningStage {
            key: key_of(a),
            stop: CancellationToken::new(),
            failed: CancellationToken::new(),
            tasks: Vec::new(),
            collective: None,
            jobs: None,
            head: stage == Stage::TextEncoder,
        };
        match stage {
            Stage::TextEncoder => self.start_head(a, &mut running).await?,
            Stage::Denoiser => self.start_denoiser(a, rx, &mut running).await?,
            Stage::Vae => {
                let pipeline = self.stage_pipeline(Stage::Vae, None).await?;
                let inbox = self.link_server.open(INBOX_CAPACITY, a.generation);
                let out = self
                    .connect(&a.downstream_addr, a.generation, &running.stop)
                    .await?;
                running
                    .tasks
                    .push(spawn_stage("vae", running.failed.clone(), move || {
                        let mut inbox = inbox;
                        let mut out = NoShutdown(out);
                        run_vae(pipeline.as_ref(), &mut inbox, &mut out)
                    }));
            }
        }
        Ok(running)
    }

    async fn start_denoiser(
        self: &Arc<Self>,
        a: &Assignment,
        rx: &watch::Receiver<Assignment>,
        running: &mut RunningStage,
    ) -> anyhow::Result<()> {
        let world = a.tp_size.max(1) as usize;
        let rank = a.tp_rank as usize;
        let collective: Option<Arc<dyn Collective>> = if world > 1 {
            Some(if self.opts.device.is_cuda() {
                self.form_nccl_group(a, rank, world, rx).await?
            } else {
                self.form_group(a, rank, world, rx).await? as Arc<dyn Collective>
            })
        } else {
            None
        };
        running.collective = collective.clone();
        let pipeline = self.stage_pipeline(Stage::Denoiser, collective).await?;
        if rank > 0 {
            let stop = running.stop.clone();
            running.tasks.push(spawn_stage(
                "denoiser-follower",
                running.failed.clone(),
                move || {
                    while !stop.is_cancelled() {
                        if !pipeline.follow_denoise()? {
                            break;
                        }
                    }
                    Ok(())
                },
            ));
            return Ok(());
        }
        let inbox = self.link_server.open(INBOX_CAPACITY, a.generation);
        let out = self
            .connect(&a.downstream_addr, a.generation, &running.stop)
            .await?;
        let mut progress = DenoiserProgress {
            cluster: self.cluster.clone(),
            runtime: self.runtime.clone(),
            head: a.head_worker_id.clone(),
            last: None,
        };
        running
            .tasks
            .push(spawn_stage("denoiser", running.failed.clone(), move || {
                let mut inbox: GrpcLinkReceiver = inbox;
                let mut out = NoShutdown(out);
                let mut on_step = |id: &str, e: StepEvent| progress.on_step(id, e);
                let r = run_denoiser(pipeline.as_ref(), &mut inbox, &mut out, &mut on_step);
                let stopped = pipeline.stop_followers();
                r.and(stopped)
            }));
        Ok(())
    }

    /// Rank 0's bytes under `key` in this replica generation's rendezvous: rank 0 posts
    /// `value`; the other ranks wait for it (up to [`TP_RENDEZVOUS`]).
    async fn rendezvous_share(
        &self,
        a: &Assignment,
        key: &str,
        value: Option<Vec<u8>>,
        rx: &watch::Receiver<Assignment>,
    ) -> anyhow::Result<Vec<u8>> {
        let mut c = self.replica.clone();
        if let Some(value) = value {
            c.rendezvous(RendezvousRequest {
                replica_id: a.replica_id.clone(),
                generation: a.generation,
                key: key.into(),
                value: value.clone(),
                post: true,
                wait_ms: 0,
            })
            .await
            .map_err(|s| anyhow!("Rendezvous post: {}", rpc::describe(&s)))?;
            return Ok(value);
        }
        let deadline = tokio::time::Instant::now() + TP_RENDEZVOUS;
        loop {
            if key_of(&rx.borrow()) != key_of(a) {
                bail!("the assignment changed while waiting for tensor-parallel rank 0");
            }
            let resp = c
                .rendezvous(RendezvousRequest {
                    replica_id: a.replica_id.clone(),
                    generation: a.generation,
                    key: key.into(),
                    value: Vec::new(),
                    post: false,
                    wait_ms: 2000,
                })
                .await
                .map_err(|s| anyhow!("Rendezvous: {}", rpc::describe(&s)))?
                .into_inner();
            if resp.found {
                return Ok(resp.value);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("tensor-parallel rank 0 did not post `{key}` within {TP_RENDEZVOUS:?}");
            }
        }
    }

    /// Forms this process's rank of a tensor-parallel group on GPUs: rank 0 makes the NCCL
    /// unique id and posts it through the coordinator's rendezvous (never through files); the
    /// others fetch it; every rank then joins the communicator on this worker's GPU.
    #[cfg(feature = "nccl")]
    async fn form_nccl_group(
        self: &Arc<Self>,
        a: &Assignment,
        rank: usize,
        world: usize,
        rx: &watch::Receiver<Assignment>,
    ) -> anyhow::Result<Arc<dyn Collective>> {
        use relayfarm_models::parallel::{NcclCollective, NcclId};
        let mine = if rank == 0 {
            Some(NcclId::new()?.as_bytes().to_vec())
        } else {
            None
        };
        let bytes = self.rendezvous_share(a, NCCL_ID_KEY, mine, rx).await?;
        let id = NcclId::from_bytes(&bytes)?;
        let device = self.opts.device.clone();
        tracing::info!(rank, world, "joining the NCCL communicator");
        let comm = tokio::task::spawn_blocking(move || -> anyhow::Result<NcclCollective> {
            let c = NcclCollective::start(&device, rank, world, &id)?;
            c.wait_ready()?;
            Ok(c)
        })
        .await
        .map_err(|e| anyhow!("NCCL set-up stopped: {e}"))??;
        Ok(Arc::new(comm))
    }

    /// Without NCCL in the build, GPU ranks cannot form a group.
    #[cfg(not(feature = "nccl"))]
    async fn form_nccl_group(
        self: &Arc<Self>,
        _a: &Assignment,
        _rank: usize,
        _world: usize,
        _rx: &watch::Receiver<Assignment>,
    ) -> anyhow::Result<Arc<dyn Collective>> {
        bail!("tensor-parallel ranks on GPUs need NCCL: build relayfarm-worker with `--features cuda`")
    }

    /// Forms this process's rank of the tensor-parallel group: rank 0 listens and posts its
    /// address through the coordinator's rendezvous; the others wait for it and connect.
    async fn form_group(
        self: &Arc<Self>,
        a: &Assignment,
        rank: usize,
        world: usize,
        rx: &watch::Receiver<Assignment>,
    ) -> anyhow::Result<Arc<TcpCollective>> {
        if rank == 0 {
            let host = self
                .link_addr
                .rsplit_once(':')
                .map(|(h, _)| h.to_string())
                .unwrap_or_else(|| "127.0.0.1".into());
            let root = TcpCollective::listen(format!("{host}:0"), world)?;
            let addr = root.local_addr().to_string();
            self.rendezvous_share(a, TP_ROOT_KEY, Some(addr.clone().into_bytes()), rx)
                .await?;
            tracing::info!(%addr, world, "tensor-parallel rank 0 listening");
            let coll = tokio::task::spawn_blocking(move || root.accept(TP_RENDEZVOUS))
                .await
                .map_err(|e| anyhow!("rank 0 accept stopped: {e}"))??;
            return Ok(Arc::new(coll));
        }
        let bytes = self.rendezvous_share(a, TP_ROOT_KEY, None, rx).await?;
        let addr = String::from_utf8_lossy(&bytes).into_owned();
        tracing::info!(root = %addr, rank, world, "joining tensor-parallel rank 0");
        let coll = tokio::task::spawn_blocking(move || {
            TcpCollective::connect(addr.as_str(), rank, world, TP_RENDEZVOUS)
        })
        .await
        .map_err(|e| anyhow!("rank connect stopped: {e}"))??;
        Ok(Arc::new(coll))
    }

    async fn start_head(
        self: &Arc<Self>,
        a: &Assignment,
        running: &mut RunningStage,
    ) -> anyhow::Result<()> {
        let pipeline = self.stage_pipeline(Stage::TextEncoder, None).await?;
        let runner = Arc::new(PipelineRunner::from_pipeline(
            pipeline.clone(),
            &self.model_name,
        ));
        let inbox = self
            .link_server
            .open(INBOX_CAPACITY + HEAD_WINDOW, a.generation);
        let out = self
            .connect(&a.downstream_addr, a.generation, &running.stop)
            .await?;
        let (jobs_tx, jobs_rx) = std::sync::mpsc::sync_channel::<StageJob>(HEAD_WINDOW);
        running.jobs = Some(jobs_tx.clone());
        let generation = a.generation;
        // The encoder thread: jobs in, conditioning out to denoiser rank 0. Detached on stop
        // (it ends when the job queue closes).
        {
            let pipeline = pipeline.clone();
            let failed = running.failed.clone();
            std::thread::Builder::new()
                .name("stage-text-encoder".into())
                .spawn(move || {
                    let mut out = NoShutdown(out);
                    if let Err(e) = run_text_encoder(pipeline.as_ref(), jobs_rx, &mut out) {
                        tracing::warn!(error = %e, "the text-encoder stage stopped");
                        failed.cancel();
                    }
                })
                .context("cannot start the text-encoder thread")?;
        }
        // Results from the VAE.
        let (res_tx, mut res_rx) = tokio::sync::mpsc::unbounded_channel::<StageMessage>();
        running.tasks.push(tokio::task::spawn_blocking(move || {
            let mut inbox = inbox;
            while let Ok(Some(msg)) = inbox.recv() {
                if res_tx.send(msg).is_err() {
                    break;
                }
            }
        }));
        {
            let me = self.clone();
            let runner = runner.clone();
            running.tasks.push(tokio::spawn(async move {
                while let Some(msg) = res_rx.recv().await {
                    me.finish_job(&runner, generation, msg).await;
                }
            }));
        }
        // The claim loop.
        {
            let me = self.clone();
            let stop = running.stop.clone();
            let failed = running.failed.clone();
            let window = Arc::new(tokio::sync::Semaphore::new(HEAD_WINDOW));
            running.tasks.push(tokio::spawn(async move {
                me.claim_loop(runner, jobs_tx, window, generation, stop.clone())
                    .await;
                if !stop.is_cancelled() {
                    failed.cancel();
                }
            }));
        }
        Ok(())
    }

    async fn claim_loop(
        self: Arc<Self>,
        runner: Arc<PipelineRunner>,
        jobs: std::sync::mpsc::SyncSender<StageJob>,
        window: Arc<tokio::sync::Semaphore>,
        generation: u64,
        stop: CancellationToken,
    ) {
        let models = vec![self.model_name.clone()];
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            let permit = tokio::select! {
                p = window.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                _ = stop.cancelled() => return,
            };
            let claimed = tokio::select! {
                r = self.cluster.claim(&models, self.args.claim_wait_ms.min(1000)) => r,
                _ = stop.cancelled() => return,
            };
            let job = match claimed {
                Ok(resp) => match resp.job {
                    Some(j) => j,
                    None => continue,
                },
                Err(s) => {
                    tracing::warn!(error = %rpc::describe(&s), "claim failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = stop.cancelled() => return,
                    }
                    continue;
                }
            };
            if stop.is_cancelled() {
                self.release(&job.job_id).await;
                return;
            }
            tracing::info!(job_id = %job.job_id, batch_id = %job.batch_id, index = job.index, attempt = job.attempt, "job claimed");
            let render = crate::farm::render_job(&job);
            if let Err(e) = runner.validate(&render) {
                tracing::warn!(job_id = %job.job_id, error = %e, "job rejected");
                self.fail(&job.job_id, &e.to_string(), false).await;
                continue;
            }
            let request = runner.request(&render);
            let id = format!("{generation}/{}", job.job_id);
            lock(&self.running).insert(
                job.job_id.clone(),
                InFlight {
                    job: job.clone(),
                    request: request.clone(),
                    generation,
                    _permit: permit,
                },
            );
            let jobs = jobs.clone();
            let sent =
                tokio::task::spawn_blocking(move || jobs.send(StageJob { id, request }).is_ok())
                    .await;
            if !matches!(sent, Ok(true)) {
                tracing::warn!(job_id = %job.job_id, "the text-encoder stage has stopped; releasing the job");
                lock(&self.running).remove(&job.job_id);
                self.release(&job.job_id).await;
                return;
            }
        }
    }

    /// Handles a message that came back to the head: stores and completes (or fails) its job.
    async fn finish_job(&self, runner: &PipelineRunner, generation: u64, msg: StageMessage) {
        let Some((gen, job_id)) = msg.header.job_id.split_once('/') else {
            tracing::warn!(id = %msg.header.job_id, "a stage message without a generation; dropped");
            return;
        };
        if gen != generation.to_string() {
            tracing::info!(id = %msg.header.job_id, "a message of an older replica formation; dropped");
            return;
        }
        let Some(flight) = lock(&self.running).remove(job_id) else {
            tracing::info!(job_id, "a result for a job no longer in flight; dropped");
            return;
        };
        if flight.generation != generation {
            return;
        }
        let job = flight.job;
        if lock(&self.cancelled).remove(job_id) {
            self.fail(job_id, "cancelled", false).await;
            return;
        }
        match msg.kind() {
            MessageKind::Image => {
                let png = image_of(&msg).and_then(|(image, latents)| {
                    Ok(Generated {
                        latents: latents.clone(),
                        image: image.clone(),
                        size: msg.plan()?,
                        scheduler: runner.pipeline().info().scheduler.clone(),
                    })
                });
                let out = match png {
                    Ok(g) => runner.finish(&flight.request, g).map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match out {
                    Ok(out) => self.store_and_complete(&job, out).await,
                    Err(e) => {
                        tracing::warn!(job_id, error = %e, "cannot make the PNG");
                        self.fail(job_id, &e, true).await;
                    }
                }
            }
            MessageKind::Failed if msg.header.cancelled => {
                self.fail(job_id, "cancelled", false).await;
            }
            MessageKind::Failed => {
                let why = msg
                    .header
                    .error
                    .clone()
                    .unwrap_or_else(|| "failed in a stage".into());
                tracing::warn!(job_id, error = %why, "job failed in a stage");
                self.fail(job_id, &why, true).await;
            }
            other => {
                tracing::warn!(job_id, kind = ?other, "unexpected message at the head; releasing the job");
                self.release(job_id).await;
            }
        }
    }

    async fn store_and_complete(&self, job: &ClaimedJob, out: crate::runner::JobOutput) {
        let key = crate::farm::result_key(&job.batch_id, job.index, &job.name, &job.prompt);
        let bytes = out.png.len() as u64;
        if let Err(e) = self.store.put(&key, out.png).await {
            tracing::error!(key = %key, error = %e, "cannot write the image to the result store");
            self.fail(
                &job.job_id,
                &format!("worker cannot write {key} to the result store: {e}"),
                true,
            )
            .await;
            return;
        }
        let req = CompleteJobRequest {
            worker_id: self.cluster.worker_id().to_string(),
            job_id: job.job_id.clone(),
            image_ref: key.clone(),
            width: out.metadata.width,
            height: out.metadata.height,
            seed: out.metadata.seed,
            bytes,
        };
        let cluster = self.cluster.clone();
        let window = Duration::from_millis(self.args.report_retry_ms);
        let res = rpc::retry("CompleteJob", window, &self.abort, || {
            let (c, r) = (cluster.clone(), req.clone());
            async move { c.complete(r).await }
        })
        .await;
        match res {
            Ok(r) => {
                tracing::info!(job_id = %job.job_id, image_ref = %key, accepted = r.accepted, "job completed")
            }
            Err(s) => {
                tracing::error!(job_id = %job.job_id, error = %rpc::describe(&s), "cannot report the completion; the lease will redeliver the job")
            }
        }
    }

    async fn fail(&self, job_id: &str, reason: &str, retryable: bool) {
        let cluster = self.cluster.clone();
        let window = Duration::from_millis(self.args.report_retry_ms);
        let res = rpc::retry("FailJob", window, &self.abort, || {
            let c = cluster.clone();
            async move { c.fail(job_id, reason, retryable).await }
        })
        .await;
        if let Err(s) = res {
            tracing::error!(job_id, error = %rpc::describe(&s), "cannot report the failure");
        }
    }

    async fn release(&self, job_id: &str) {
        let cluster = self.cluster.clone();
        let res = rpc::retry("ReleaseJob", Duration::from_secs(10), &self.abort, || {
            let c = cluster.clone();
            async move { c.release(job_id).await }
        })
        .await;
        match res {
            Ok(()) => tracing::info!(job_id, "job released"),
            Err(s) => {
                tracing::warn!(job_id, error = %rpc::describe(&s), "cannot release the job; its lease will expire")
            }
        }
    }

    /// Stops a stage: no more claims, links closed, threads given [`STOP_GRACE`]; the head
    /// releases its in-flight jobs.
    async fn stop_stage(self: Arc<Self>, mut stage: RunningStage) {
        tracing::info!(replica = %stage.key.0, generation = stage.key.1, stage = %stage.key.2, "stopping the stage");
        stage.stop.cancel();
        stage.jobs = None;
        self.link_server.close();
        let tasks = std::mem::take(&mut stage.tasks);
        let coll = stage.collective.clone();
        if stage.key.3 > 0 {
            // A follower rank: rank 0 may be gone; do not wait for it to release us.
            if let Some(c) = &coll {
                c.abort("the replica member's assignment was withdrawn");
            }
        }
        let waited = tokio::time::timeout(STOP_GRACE, async {
            for t in tasks {
                let _ = t.await;
            }
        })
        .await;
        if waited.is_err() {
            tracing::warn!("the stage did not stop in time; abandoning its threads");
        }
        if let Some(c) = coll {
            c.abort("the replica member's assignment was withdrawn");
        }
        if stage.head {
            let ids: Vec<String> = lock(&self.running).drain().map(|(id, _)| id).collect();
            lock(&self.cancelled).clear();
            for id in ids {
                self.release(&id).await;
            }
        }
    }
}

/// Runs a stage loop on a blocking thread, logging how it ended; an error cancels `failed`.
/// Step progress of the denoiser stage, reported for the head (which holds the job) at most
/// every [`PROGRESS_EVERY`] and at the last step; a cancelled job stops at that step boundary.
struct DenoiserProgress {
    cluster: Cluster,
    runtime: Handle,
    head: String,
    last: Option<std::time::Instant>,
}

/// How often the denoiser reports step progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

impl DenoiserProgress {
    fn on_step(&mut self, message_id: &str, e: StepEvent) -> ControlFlow<()> {
        let due = e.step == e.total || self.last.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY);
        if !due || self.head.is_empty() {
            return ControlFlow::Continue(());
        }
        self.last = Some(std::time::Instant::now());
        // Message ids are `<generation>/<job id>`.
        let job = message_id.split_once('/').map_or(message_id, |(_, j)| j);
        let (step, total) = (e.step as u32, e.total as u32);
        let r = self.runtime.block_on(
            self.cluster
                .report_progress_as(&self.head, job, step, total),
        );
        match r {
            Ok(ack) if ack.cancelled => {
                tracing::info!(job, step, "job cancelled: stopping at this step");
                ControlFlow::Break(())
            }
            Ok(_) => ControlFlow::Continue(()),
            Err(s) => {
                tracing::debug!(job, error = %rpc::describe(&s), "progress report failed");
                ControlFlow::Continue(())
            }
        }
    }
}

fn spawn_stage(
    name: &'static str,
    failed: CancellationToken,
    f: impl FnOnce() -> relayfarm_models::Result<()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_blocking(move || match f() {
        Ok(()) => tracing::info!(stage = name, "stage loop ended"),
        Err(e) => {
            tracing::warn!(stage = name, error = %e, "stage loop stopped with an error");
            failed.cancel();
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use relayfarm_models::link::InProcessLink;

    #[test]
    fn shutdown_messages_stay_in_the_process() {
        let (tx, mut rx) = InProcessLink::pair("t", 4);
        let mut tx = NoShutdown(tx);
        tx.send(StageMessage::shutdown()).unwrap();
        drop(tx);
        assert!(rx.recv().unwrap().is_none());
        assert_eq!(
            key_of(&Assignment {
                replica_id: "m/r1".into(),
                generation: 1,
                stage: "vae".into(),
                ..Assignment::default()
            }),
            ("m/r1".to_string(), 1, "vae".to_string(), 0)
        );
    }
}
