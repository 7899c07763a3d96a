//! `relayfarm-worker`: a farm worker. It loads its models once, registers with a coordinator,
//! heartbeats, claims jobs (long-poll), renders each on a dedicated device thread while
//! reporting step progress, stores the PNG in the result store and acknowledges it.
//!
//! Failure handling:
//! - the coordinator unreachable at start: registration is retried with backoff, logged;
//! - the coordinator restarting mid-job: `CompleteJob`/`FailJob` are retried with backoff for
//!   `--report-retry-ms` (the PNG is already stored; completion is idempotent);
//! - heartbeats answered `reregister` (or failing for longer than a lease): register again;
//! - SIGTERM / Ctrl-C: stop claiming, let the running job finish within `--shutdown-grace-ms`,
//!   else cancel it at the next step boundary and release it (redelivered at once); deregister;
//!   exit 0. A second signal cancels the running job at once.

pub mod device_thread;
pub mod progress;
pub mod rpc;

use anyhow::{anyhow, bail, Context};
use candle_core::Device;
use clap::Parser;
use device_thread::{DeviceThread, ModelSpec, RenderCommand, RenderError, Rendered};
use relayfarm_models::pipeline::PipelineOptions;
use relayfarm_models::RunDtype;
use relayfarm_proto::v1::{ClaimedJob, CompleteJobRequest, DeviceInfo, RegisterRequest};
use relayfarm_results::ResultStore;
use rpc::{Backoff, Cluster, LogEvery};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// `relayfarm-worker`: serves models to a relayfarm coordinator.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "relayfarm-worker",
    version,
    about = "relayfarm farm worker: registers with a coordinator, claims jobs for its models, renders them and stores the PNGs",
    long_about = None
)]
pub struct WorkerArgs {
    /// Coordinator gRPC address (`http://host:port` or `host:port`).
    #[arg(long, env = "RELAYFARM_COORDINATOR")]
    pub coordinator: String,
    /// A model to serve, `NAME=DIR` (a diffusers pipeline folder); repeatable. In the
    /// environment, separate several with commas.
    #[arg(
        long = "model",
        env = "RELAYFARM_MODEL",
        value_delimiter = ',',
        required = true
    )]
    pub models: Vec<ModelSpec>,
    /// Device: cpu, or cuda:N (needs a build with --features cuda).
    #[arg(long, env = "RELAYFARM_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Result store (shared with the coordinator, which serves FetchImage from it): a folder,
    /// or `s3://bucket/prefix` for S3-compatible object storage (credentials, region and
    /// endpoint from the standard `AWS_*` variables, e.g. `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`).
    #[arg(long, env = "RELAYFARM_RESULTS", default_value = "relayfarm-results")]
    pub results: PathBuf,
    /// Run dtype.
    #[arg(long, env = "RELAYFARM_DTYPE", default_value = "f32", value_parser = ["f32", "f16", "bf16"])]
    pub dtype: String,
    /// Worker id (default: hostname-pid-random; unique per process).
    #[arg(long, env = "RELAYFARM_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Log format on stderr (`RUST_LOG` filters; default level info).
    #[arg(long, env = "RELAYFARM_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// No-op render for benchmarks: writes a tiny PNG without running a model (progress is
    /// still reported). `--model NAME` without a folder is accepted.
    #[arg(long, env = "RELAYFARM_NOOP")]
    pub noop: bool,
    /// On SIGTERM, how long the running job may take to finish before it is cancelled and
    /// released to another worker.
    #[arg(long, env = "RELAYFARM_SHUTDOWN_GRACE_MS", default_value_t = 30_000)]
    pub shutdown_grace_ms: u64,
    /// Long-poll wait of one claim.
    #[arg(long, env = "RELAYFARM_CLAIM_WAIT_MS", default_value_t = 2_000)]
    pub claim_wait_ms: u32,
    /// How long to keep retrying CompleteJob/FailJob while the coordinator is unreachable.
    #[arg(long, env = "RELAYFARM_REPORT_RETRY_MS", default_value_t = 300_000)]
    pub report_retry_ms: u64,
    /// Minimum gap between two progress reports of a job.
    #[arg(long, env = "RELAYFARM_PROGRESS_INTERVAL_MS", default_value_t = 100)]
    pub progress_interval_ms: u64,
    /// Threads for the CPU backend (default: all cores).
    #[arg(long, env = "RELAYFARM_THREADS")]
    pub threads: Option<usize>,
    /// Prefer this weight variant (e.g. fp16) when a folder has several.
    #[arg(long, env = "RELAYFARM_VARIANT")]
    pub variant: Option<String>,
    /// Join multi-process replicas instead of rendering whole jobs: the coordinator (run with
    /// `--replica-layout`) assigns this worker one stage of its model (see
    /// [`crate::replica`]).
    #[arg(long, env = "RELAYFARM_REPLICA")]
    pub replica: bool,
    /// With `--replica`: where this worker's stage-link server listens.
    #[arg(long, env = "RELAYFARM_LINK_LISTEN", default_value = "127.0.0.1:0")]
    pub link_listen: String,
    /// With `--replica`: the stage-link address other workers dial (default: the listen
    /// address with the port the system chose).
    #[arg(long, env = "RELAYFARM_LINK_ADVERTISE")]
    pub link_advertise: Option<String>,
}

/// How a running worker is told to stop.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Graceful: stop claiming, finish (or after the grace period release) the job in hand.
    pub graceful: CancellationToken,
    /// Immediate: cancel the job in hand at the next step boundary and release it.
    pub now: CancellationToken,
}

impl Shutdown {
    /// Fresh tokens.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Runs the worker until SIGTERM / Ctrl-C: installs logging, builds the async runtime, loads the
/// models (an error if one cannot be loaded) and serves. Returns `Ok` after a graceful shutdown.
pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    init_logging(&args.log_format);
    if let Some(n) = args.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        // candle's CPU kernels use the global rayon pool, which honours RAYON_NUM_THREADS; set
        // before any thread exists.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("relayfarm-worker-rt")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let shutdown = Shutdown::new();
        let signals = tokio::spawn(watch_signals(shutdown.clone()));
        let result = serve(args, shutdown).await;
        signals.abort();
        result
    })
}

/// Installs the global tracing subscriber (stderr; `text` or `json`; `RUST_LOG` filters, default
/// `info`). Does nothing if one is already installed.
pub fn init_logging(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        // Colour codes only on a terminal, never in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

async fn watch_signals(shutdown: Shutdown) {
    let mut signals = Signals::new();
    let mut count = 0u32;
    loop {
        let which = signals.next().await;
        count += 1;
        if count == 1 {
            tracing::info!(signal = which, "shutting down: no new jobs; the job in hand may finish within the grace period (signal again to release it now)");
            shutdown.graceful.cancel();
        } else {
            tracing::warn!(
                signal = which,
                "second signal: cancelling the job in hand and releasing it"
            );
            shutdown.now.cancel();
            shutdown.graceful.cancel();
        }
    }
}

/// SIGTERM and SIGINT (Ctrl-C), listened to once for the life of the process.
struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let term = match signal(SignalKind::terminate()) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the worker gracefully");
                    None
                }
            };
            Signals { term }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        if let Some(term) = self.term.as_mut() {
            return tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = tokio::signal::ctrl_c() => "SIGINT",
            };
        }
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> anyhow::Result<Device> {
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    if let Some(n) = s
        .strip_prefix("cuda:")
        .or_else(|| (s == "cuda").then_some("0"))
    {
        let n: usize = n
            .parse()
            .map_err(|_| anyhow!("--device {s}: expected cpu or cuda:N"))?;
        return Device::new_cuda(n).map_err(|e| {
            anyhow!("--device {s}: CUDA is not available ({e}); this binary needs `--features cuda` and a GPU, or use --device cpu")
        });
    }
    bail!("--device {s}: expected cpu or cuda:N")
}

/// Loads the models and serves until `shutdown` (for embedding the worker, e.g. in tests; no
/// signal handling or logging setup).
pub async fn serve(args: WorkerArgs, shutdown: Shutdown) -> anyhow::Result<()> {
    if args.replica {
        return crate::replica::serve(args, shutdown).await;
    }
    let mut seen = std::collections::HashSet::new();
    for m in &args.models {
        if !seen.insert(m.name.as_str()) {
            bail!("--model {}: given twice", m.name);
        }
    }
    let device = parse_device(&args.device)?;
    let dtype: RunDtype = args.dtype.parse().map_err(|e: String| anyhow!(e))?;
    let opts = PipelineOptions {
        device,
        variant: args.variant.clone(),
        ..PipelineOptions::cpu(dtype)
    };
    let store = ResultStore::open(&args.results.to_string_lossy()).with_context(|| {
        format!(
            "--results {}: cannot open the result store",
            args.results.display()
        )
    })?;
    let specs = args.models.clone();
    let noop = args.noop;
    let device = tokio::task::spawn_blocking(move || DeviceThread::start(&specs, opts, noop))
        .await
        .map_err(|e| anyhow!("model loading stopped: {e}"))??;
    let worker_id = args.worker_id.clone().unwrap_or_else(default_worker_id);
    if worker_id.is_empty()
        || worker_id.len() > 128
        || worker_id
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == ':')
    {
        bail!("--worker-id {worker_id:?}: use 1 to 128 bytes without spaces, control characters or ':'");
    }
    let cluster = Cluster::connect_lazy(&args.coordinator, &worker_id)?;
    tracing::info!(
        worker_id = %worker_id,
        coordinator = cluster.url(),
        models = ?device.models().iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        device = %args.device,
        results = %store.description(),
        noop = args.noop,
        "worker ready"
    );
    let register = RegisterRequest {
        worker_id: worker_id.clone(),
        hostname: hostname(),
        devices: vec![DeviceInfo {
            name: args.device.clone(),
            memory_bytes: if args.device == "cpu" {
                total_memory()
            } else {
                0
            },
        }],
        models: device.models().to_vec(),
    };
    let worker = Arc::new(Worker {
        models: device.models().iter().map(|m| m.name.clone()).collect(),
        cluster,
        register,
        running: Mutex::new(HashMap::new()),
        heartbeat_ms: AtomicU64::new(1000),
        lease_ms: AtomicU64::new(10_000),
        reregistering: tokio::sync::Mutex::new(()),
        store,
        device,
        abort: shutdown.now.clone(),
        settings: Settings {
            grace: Duration::from_millis(args.shutdown_grace_ms),
            claim_wait_ms: args.claim_wait_ms,
            report_window: Duration::from_millis(args.report_retry_ms),
            progress_interval: Duration::from_millis(args.progress_interval_ms),
        },
    });
    worker.run(shutdown).await
}

/// Runtime settings of a worker.
#[derive(Debug, Clone)]
struct Settings {
    grace: Duration,
    claim_wait_ms: u32,
    report_window: Duration,
    progress_interval: Duration,
}

struct Worker {
    cluster: Cluster,
    register: RegisterRequest,
    models: Vec<String>,
    /// Running jobs and their cancel flags.
    running: Mutex<HashMap<String, Arc<AtomicBool>>>,
    heartbeat_ms: AtomicU64,
    lease_ms: AtomicU64,
    reregistering: tokio::sync::Mutex<()>,
    store: ResultStore,
    device: DeviceThread,
    settings: Settings,
    /// Cancelled by a second shutdown signal: stop retrying reports (leases redeliver).
    abort: CancellationToken,
}

/// What became of a claimed job.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Completed {
        accepted: bool,
    },
    Failed {
        retryable: bool,
    },
    Cancelled,
    Released,
    /// The coordinator could not be told (it stayed unreachable); the lease will expire and the
    /// job will be redelivered.
    Unreported,
    /// The device thread is gone: the job was released and the worker must stop.
    DeviceLost,
}

impl Worker {
    async fn run(self: Arc<Self>, shutdown: Shutdown) -> anyhow::Result<()> {
        if !self.register_until_ok(&shutdown.graceful).await {
            tracing::info!("stopped before registering");
            return Ok(());
        }
        let hb_stop = CancellationToken::new();
        let heartbeat = tokio::spawn(self.clone().heartbeat_loop(hb_stop.clone()));
        let claim_result = self.clone().claim_loop(&shutdown).await;
        hb_stop.cancel();
        let _ = heartbeat.await;
        match self.cluster.deregister().await {
            Ok(()) => tracing::info!("deregistered"),
            Err(s) => {
                tracing::warn!(code = ?s.code(), error = %rpc::describe(&s), "deregister failed (the coordinator will expire this worker)")
            }
        }
        claim_result
    }

    /// Registers, retrying with backoff while the coordinator is unreachable. `false` if
    /// stopped first.
    async fn register_until_ok(&self, stop: &CancellationToken) -> bool {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        let mut log = LogEvery::new(Duration::from_secs(10));
        let started = Instant::now();
        loop {
            match self.register_once().await {
                Ok(()) => return true,
                Err(status) => {
                    let delay = backoff.next_delay();
                    if log.due(Instant::now()).is_some() {
                        tracing::warn!(
                            coordinator = self.cluster.url(),
                            code = ?status.code(),
                            error = %rpc::describe(&status),
                            waited_s = started.elapsed().as_secs(),
                            "cannot register with the coordinator; retrying with backoff (up to every 2 s)"
                        );
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => return false,
                    }
                }
            }
        }
    }

    async fn register_once(&self) -> Result<(), tonic::Status> {
        let resp = self.cluster.register(self.register.clone()).await?;
        let hb = if resp.heartbeat_interval_ms == 0 {
            1000
        } else {
            resp.heartbeat_interval_ms
        };
        self.heartbeat_ms.store(hb.max(50), Ordering::Relaxed);
        if resp.lease_ms > 0 {
            self.lease_ms.store(resp.lease_ms, Ordering::Relaxed);
        }
        tracing::info!(
            worker_id = self.cluster.worker_id(),
            heartbeat_ms = hb,
            lease_ms = resp.lease_ms,
            "registered with the coordinator"
        );
        Ok(())
    }

    /// Registers again (once; serialised, so concurrent triggers do not stack up).
    async fn reregister(&self, why: &str) {
        let Ok(_guard) = self.reregistering.try_lock() else {
            return;
        };
        tracing::info!(why, "registering again");
        if let Err(s) = self.register_once().await {
            tracing::warn!(code = ?s.code(), error = %rpc::describe(&s), "re-registration failed; will try again");
        }
    }

    fn running_ids(&self) -> Vec<String> {
        match self.running.lock() {
            Ok(m) => m.keys().cloned().collect(),
            Err(p) => p.into_inner().keys().cloned().collect(),
        }
    }

    fn set_running(&self, job_id: &str, flag: Option<Arc<AtomicBool>>) {
        let mut m = match self.running.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        match flag {
            Some(f) => {
                m.insert(job_id.to_string(), f);
            }
            None => {
                m.remove(job_id);
            }
        }
    }

    fn cancel_running(&self, job_id: &str) -> bool {
        let m = match self.running.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        match m.get(job_id) {
            Some(flag) => !flag.swap(true, Ordering::Relaxed),
            None => false,
        }
    }

    async fn heartbeat_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut failing_since: Option<Instant> = None;
        loop {
            let interval = Duration::from_millis(self.heartbeat_ms.load(Ordering::Relaxed));
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.cancelled() => return,
            }
            let running = self.running_ids();
            match self.cluster.heartbeat(running).await {
                Ok(resp) => {
                    for id in &resp.cancel_job_ids {
                        if self.cancel_running(id) {
                            tracing::info!(job_id = %id, "coordinator cancelled the job; stopping at the next step boundary");
                        }
                    }
                    let outage = failing_since.take().map(|t| t.elapsed());
                    if let Some(outage) = outage {
                        tracing::info!(
                            outage_ms = outage.as_millis() as u64,
                            "coordinator reachable again"
                        );
                    }
                    let lease = Duration::from_millis(self.lease_ms.load(Ordering::Relaxed));
                    if resp.reregister {
                        self.reregister("the coordinator does not know this worker")
                            .await;
                    } else if outage.is_some_and(|o| o >= lease) {
                        self.reregister("heartbeats failed for longer than a lease")
                            .await;
                    }
                }
                Err(status) => {
                    if failing_since.is_none() {
                        failing_since = Some(Instant::now());
                        tracing::warn!(
                            coordinator = self.cluster.url(),
                            code = ?status.code(),
                            error = %rpc::describe(&status),
                            "heartbeat failed; the job in hand goes on and heartbeats keep trying"
                        );
                    }
                    if matches!(
                        status.code(),
                        tonic::Code::NotFound | tonic::Code::FailedPrecondition
                    ) {
                        self.reregister("heartbeat refused").await;
                    }
                }
            }
        }
    }

    async fn claim_loop(self: Arc<Self>, shutdown: &Shutdown) -> anyhow::Result<()> {
        let new_backoff = || Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut backoff = new_backoff();
        let mut log = LogEvery::new(Duration::from_secs(30));
        let mut failing_since: Option<Instant> = None;
        while !shutdown.graceful.is_cancelled() {
            // The long-poll is not interrupted by a shutdown: a job the coordinator hands out
            // meanwhile is released at once rather than left to a lease expiry.
            let claimed = self
                .cluster
                .claim(&self.models, self.settings.claim_wait_ms)
                .await;
            let job = match claimed {
                Ok(resp) => {
                    if let Some(since) = failing_since.take() {
                        tracing::info!(
                            outage_ms = since.elapsed().as_millis() as u64,
                            "claiming again"
                        );
                        backoff = new_backoff();
                        log.reset();
                    }
                    match resp.job {
                        Some(job) => job,
                        None => continue,
                    }
                }
                Err(status) => {
                    let delay = backoff.next_delay();
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if let Some(suppressed) = log.due(Instant::now()) {
                        tracing::warn!(
                            coordinator = self.cluster.url(),
                            code = ?status.code(),
                            error = %rpc::describe(&status),
                            failing_for_s = since.elapsed().as_secs(),
                            suppressed,
                            "claim failed; retrying with backoff (up to every 2 s)"
                        );
                    }
                    if matches!(
                        status.code(),
                        tonic::Code::NotFound | tonic::Code::FailedPrecondition
                    ) {
                        self.reregister("claim refused").await;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.graceful.cancelled() => {}
                    }
                    continue;
                }
            };
            if shutdown.graceful.is_cancelled() {
                tracing::info!(job_id = %job.job_id, "claimed while shutting down; releasing");
                self.release(&job.job_id).await;
                break;
            }
            let span = tracing::info_span!(
                "job",
                job_id = %job.job_id,
                batch_id = %job.batch_id,
                index = job.index,
                attempt = job.attempt,
                model = %job.model,
            );
            let outcome = self.clone().process(job, shutdown).instrument(span).await;
            tracing::debug!(?outcome, "job finished");
            if outcome == Outcome::DeviceLost {
                bail!("the device thread stopped; the worker cannot render any more");
            }
        }
        Ok(())
    }

    /// Renders, stores and reports one job.
    async fn process(self: Arc<Self>, job: ClaimedJob, shutdown: &Shutdown) -> Outcome {
        let started = Instant::now();
        tracing::info!(steps = ?job.params.as_ref().and_then(|p| p.steps), "job claimed");
        let cancel = Arc::new(AtomicBool::new(false));
        self.set_running(&job.job_id, Some(cancel.clone()));
        let outcome = self
            .render_and_report(&job, cancel, shutdown, started)
            .await;
        self.set_running(&job.job_id, None);
        outcome
    }

    async fn render_and_report(
        &self,
        job: &ClaimedJob,
        cancel: Arc<AtomicBool>,
        shutdown: &Shutdown,
        started: Instant,
    ) -> Outcome {
        let (ptx, prx) = tokio::sync::mpsc::unbounded_channel();
        let forwarder = tokio::spawn(progress::forward(
            self.cluster.clone(),
            job.job_id.clone(),
            prx,
            cancel.clone(),
            self.settings.progress_interval,
        ));
        let (reply_tx, mut reply_rx) = tokio::sync::oneshot::channel();
        let cmd = RenderCommand {
            model: job.model.clone(),
            job: render_job(job),
            span: tracing::info_span!("render"),
            progress: ptx,
            cancel: cancel.clone(),
            reply: reply_tx,
        };
        if self.device.submit(cmd).is_err() {
            forwarder.abort();
            tracing::error!("the device thread has stopped; releasing the job and stopping");
            self.release(&job.job_id).await;
            return Outcome::DeviceLost;
        }
        // Wait for the render; on shutdown give it the grace period, then cancel it.
        let mut released = false;
        let result = tokio::select! {
            r = &mut reply_rx => r,
            _ = shutdown.graceful.cancelled() => {
                let grace = self.settings.grace;
                tracing::info!(grace_ms = grace.as_millis() as u64, "shutting down: waiting for the job in hand");
                let finished = tokio::select! {
                    r = tokio::time::timeout(grace, &mut reply_rx) => r.ok(),
                    _ = shutdown.now.cancelled() => None,
                };
                match finished {
                    Some(r) => r,
                    None => {
                        tracing::info!("cancelling the job in hand to release it");
                        released = true;
                        cancel.store(true, Ordering::Relaxed);
                        (&mut reply_rx).await
                    }
                }
            }
        };
        // The device thread dropped the progress sender with the command; let the forwarder
        // send the final step before completion (bounded: progress is advisory, and a report
        // stuck on an unreachable coordinator must not hold the result back).
        let abort_forwarder = forwarder.abort_handle();
        if tokio::time::timeout(Duration::from_secs(2), forwarder)
            .await
            .is_err()
        {
            abort_forwarder.abort();
        }
        let Ok(result) = result else {
            tracing::error!("the device thread stopped during the job; releasing it and stopping");
            self.release(&job.job_id).await;
            return Outcome::DeviceLost;
        };
        match result {
            Ok(rendered) => self.store_and_complete(job, rendered, started).await,
            Err(RenderError::Cancelled) if released => self.release(&job.job_id).await,
            Err(RenderError::Cancelled) => {
                tracing::info!("job cancelled");
                match self.fail(&job.job_id, "cancelled", false).await {
                    Outcome::Failed { .. } => Outcome::Cancelled,
                    other => other,
                }
            }
            Err(e) => {
                let retryable = e.retryable();
                tracing::warn!(error = %e, retryable, "job failed");
                self.fail(&job.job_id, &e.to_string(), retryable).await
            }
        }
    }

    async fn store_and_complete(
        &self,
        job: &ClaimedJob,
        rendered: Rendered,
        started: Instant,
    ) -> Outcome {
        let key = result_key(&job.batch_id, job.index, &job.name, &job.prompt);
        let bytes = rendered.png.len() as u64;
        let render_ms = rendered.render_ms;
        let png = rendered.png;
        let put = self
            .store
            .put(&key, png)
            .instrument(tracing::info_span!("store", key = %key))
            .await;
        match put {
            Ok(()) => {}
            Err(e) => {
                tracing::error!(key = %key, error = %e, "cannot write the image to the result store");
                return self
                    .fail(
                        &job.job_id,
                        &format!("worker cannot write {key} to the result store: {e}"),
                        true,
                    )
                    .await;
            }
        }
        let req = CompleteJobRequest {
            worker_id: self.cluster.worker_id().to_string(),
            job_id: job.job_id.clone(),
            image_ref: key.clone(),
            width: rendered.width,
            height: rendered.height,
            seed: rendered.seed,
            bytes,
        };
        let cluster = self.cluster.clone();
        let res = rpc::retry(
            "CompleteJob",
            self.settings.report_window,
            &self.abort,
            || {
                let c = cluster.clone();
                let r = req.clone();
                async move { c.complete(r).await }
            },
        )
        .await;
        match res {
            Ok(resp) => {
                let ms = started.elapsed().as_millis() as u64;
                if resp.accepted {
                    tracing::info!(image_ref = %key, bytes, render_ms, ms, "job completed");
                } else {
                    tracing::info!(image_ref = %key, ms, "job was already completed by another attempt; this result is discarded");
                }
                Outcome::Completed {
                    accepted: resp.accepted,
                }
            }
            Err(s) => {
                tracing::error!(code = ?s.code(), error = %rpc::describe(&s), image_ref = %key, "cannot report the completion; the job's lease will expire and it will be redelivered");
                Outcome::Unreported
            }
        }
    }

    async fn fail(&self, job_id: &str, reason: &str, retryable: bool) -> Outcome {
        let cluster = self.cluster.clone();
        let res = rpc::retry("FailJob", self.settings.report_window, &self.abort, || {
            let c = cluster.clone();
            async move { c.fail(job_id, reason, retryable).await }
        })
        .await;
        match res {
            Ok(()) => Outcome::Failed { retryable },
            Err(s) => {
                tracing::error!(code = ?s.code(), error = %rpc::describe(&s), "cannot report the failure; the job's lease will expire and it will be redelivered");
                Outcome::Unreported
            }
        }
    }

    async fn release(&self, job_id: &str) -> Outcome {
        let cluster = self.cluster.clone();
        // Bounded: during a shutdown a lease expiry redelivers the job anyway.
        let window = self.settings.report_window.min(Duration::from_secs(10));
        let res = rpc::retry("ReleaseJob", window, &self.abort, || {
            let c = cluster.clone();
            async move { c.release(job_id).await }
        })
        .await;
        match res {
            Ok(()) => {
                tracing::info!(job_id, "job released");
                Outcome::Released
            }
            Err(s) => {
                tracing::warn!(job_id, code = ?s.code(), error = %rpc::describe(&s), "cannot release the job; it will be redelivered when its lease expires");
                Outcome::Unreported
            }
        }
    }
}

/// The render job for a claimed job (the coordinator has already resolved every parameter).
pub fn render_job(job: &ClaimedJob) -> crate::runner::RenderJob {
    let p = job.params.clone().unwrap_or_default();
    if p.seed.is_none() {
        tracing::warn!("the coordinator sent no seed; using 0");
    }
    crate::runner::RenderJob {
        prompt: job.prompt.clone(),
        // The queue stores "" for "no negative prompt": leave it to the model's default
        // (PixArt-Σ and Kolors encode "", CogView3-Plus uses zero embeddings).
        negative_prompt: p.negative_prompt.filter(|n| !n.is_empty()),
        height: p.height,
        width: p.width,
        steps: p.steps,
        guidance: p.guidance,
        seed: p.seed.unwrap_or(0),
        latents: None,
        resolution_binning: !job.no_resolution_binning,
        size_check: true,
    }
}

/// The result-store key of a job's image: `<batch_id>/<NNNNN>-<name or prompt slug>.png`
/// (`NNNNN` = the job's index in its batch, zero-padded). Both parts are reduced to
/// file-name-safe characters, so a key never leaves its batch folder.
pub fn result_key(batch_id: &str, index: u32, name: &str, prompt: &str) -> String {
    let batch = safe_component(batch_id).unwrap_or_else(|| "batch".to_string());
    let stem = {
        let n = name.trim();
        let n = n
            .strip_suffix(".png")
            .or_else(|| n.strip_suffix(".PNG"))
            .unwrap_or(n);
        safe_component(n).unwrap_or_else(|| slug(prompt))
    };
    format!("{batch}/{index:05}-{stem}.png")
}

/// A file-name-safe slug of a prompt (lower-case ASCII letters and digits joined by `-`, at
/// most 40 characters; `image` when nothing is left).
pub fn slug(prompt: &str) -> String {
    let mut out = String::new();
    let mut dash = false;
    for c in prompt.chars() {
        if c.is_ascii_alphanumeric() {
            if dash && !out.is_empty() {
                out.push('-');
            }
            dash = false;
            if out.len() >= 40 {
                break;
            }
            out.push(c.to_ascii_lowercase());
        } else {
            dash = true;
        }
    }
    let out = out.trim_end_matches('-');
    if out.is_empty() {
        "image".into()
    } else {
        out.to_string()
    }
}

/// Keeps ASCII letters, digits, `-`, `_` and `.`; other characters become `-`; no leading dots
/// or dashes; at most 100 characters. `None` when nothing is left.
fn safe_component(s: &str) -> Option<String> {
    let mapped: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(100)
        .collect();
    let trimmed = mapped
        .trim_start_matches(['.', '-'])
        .trim_end_matches(['.', '-']);
    (!trimmed.is_empty()).then(|| trimmed.to_string())
}

/// `hostname-pid-xxxx`, unique per process.
pub(crate) fn default_worker_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mix = nanos ^ (u64::from(std::process::id()) << 32);
    let mix = mix.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let host: String = hostname()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    format!(
        "{}-{}-{:06x}",
        host,
        std::process::id(),
        (mix >> 40) & 0xff_ffff
    )
}

pub(crate) fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "worker".to_string())
}

/// Total memory in bytes (Linux `/proc/meminfo`), 0 when unknown.
fn total_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/pixart-sigma-tiny"
    );

    #[test]
    fn keys() {
        assert_eq!(
            result_key("b1", 3, "", "A Red Cabin, at night!"),
            "b1/00003-a-red-cabin-at-night.png"
        );
        assert_eq!(result_key("b1", 12345, "cover", "x"), "b1/12345-cover.png");
        assert_eq!(result_key("b1", 0, "cover.png", "x"), "b1/00000-cover.png");
        assert_eq!(
            result_key("b1", 7, "../../etc/passwd", "x"),
            "b1/00007-etc-passwd.png"
        );
        assert_eq!(result_key("b1", 7, "...", "一只猫"), "b1/00007-image.png");
        assert_eq!(result_key("../x", 1, "", "cat"), "x/00001-cat.png");
        let long = "word ".repeat(30);
        let k = result_key("b", 1, "", &long);
        assert!(k.len() <= "b/00001-".len() + 40 + 4, "{k}");
        assert!(!k.contains("-.png"));
        // Every key is accepted by the result store.
        let store = relayfarm_core::LocalResultStore::open(std::env::temp_dir()).unwrap();
        for k in [result_key("../x", 1, "/abs", ""), result_key("", 0, "", "")] {
            store.checked_path(&k).unwrap();
            relayfarm_results::check_key(&k).unwrap();
        }
    }

    #[test]
    fn slugs_match_the_cli() {
        assert_eq!(slug("A Red Cabin, at night!"), "a-red-cabin-at-night");
        assert_eq!(slug("一只猫"), "image");
        assert_eq!(slug("  cat  "), "cat");
    }

    #[test]
    fn model_info_from_the_fixture() {
        let dev = DeviceThread::start(
            &[format!("tiny={FIXTURE}").parse().unwrap()],
            PipelineOptions::cpu(RunDtype::F32),
            false,
        )
        .unwrap();
        let info = &dev.models()[0];
        assert_eq!(info.name, "tiny");
        assert_eq!(info.family, "pixart-sigma");
        assert_eq!(info.pipeline_class, "PixArtSigmaPipeline");
        let size = info.size.as_ref().unwrap();
        assert_eq!(size.min_side, 1);
        assert_eq!(size.max_side, 8192);
        assert!(size.resolution_binning);
        assert!(size.multiple >= 1);
        assert!(size.default_height > 0 && size.default_height == size.default_width);
        assert_eq!(info.default_steps, 20);
        assert_eq!(info.default_guidance, 4.5);
        assert_eq!(info.max_steps, 1000);
        assert!(!info.scheduler.is_empty());
        eprintln!("{info:?}");
        dev.stop();
    }

    #[test]
    fn bad_model_folder_is_a_clear_error() {
        let err = DeviceThread::start(
            &["bad=/nonexistent/model".parse().unwrap()],
            PipelineOptions::cpu(RunDtype::F32),
            false,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("model `bad`") && err.contains("/nonexistent/model"),
            "{err}"
        );
    }

    #[test]
    fn args_parse_and_env() {
        let a = WorkerArgs::try_parse_from([
            "relayfarm-worker",
            "--coordinator",
            "127.0.0.1:1",
            "--model",
            "a=/x",
            "--model",
            "b=/y",
        ])
        .unwrap();
        assert_eq!(a.models.len(), 2);
        assert_eq!(a.shutdown_grace_ms, 30_000);
        assert_eq!(a.device, "cpu");
        assert!(WorkerArgs::try_parse_from(["relayfarm-worker", "--coordinator", "x"]).is_err());
    }

    #[test]
    fn claimed_job_to_render_job() {
        let job = ClaimedJob {
            prompt: "cat".into(),
            params: Some(relayfarm_proto::v1::RenderParams {
                height: Some(64),
                steps: Some(3),
                seed: Some(9),
                ..Default::default()
            }),
            no_resolution_binning: true,
            ..Default::default()
        };
        let r = render_job(&job);
        assert_eq!(
            (r.height, r.width, r.steps, r.seed),
            (Some(64), None, Some(3), 9)
        );
        assert!(!r.resolution_binning);
    }
}
