//! The coordinator process: `RenderService` + `ClusterService` over gRPC (with health and
//! reflection), backed by the Redis queue, until SIGTERM or Ctrl-C.

use crate::error::{CoordError, Result as CoordResult};
use crate::events;
use crate::keys::Keys;
use crate::redis_queue::{now_ms, QueueConfig, RedisQueue};
use crate::replica::{Dissolved, ReplicaLayout, ReplicaPlanner};
use crate::validation::{self, validate_batch};
use relayfarm_proto::v1::cluster_service_server::{ClusterService, ClusterServiceServer};
use relayfarm_proto::v1::render_service_server::{RenderService, RenderServiceServer};
use relayfarm_proto::v1::replica_service_server::{ReplicaService, ReplicaServiceServer};
use relayfarm_proto::v1::{
    submit_batch_request, Batch, BatchEvent, CancelBatchRequest, CancelBatchResponse,
    ClaimJobRequest, ClaimJobResponse, CompleteJobRequest, CompleteJobResponse, DeregisterRequest,
    DeregisterResponse, FailJobRequest, FailJobResponse, FetchImageRequest, GetBatchRequest,
    HeartbeatRequest, HeartbeatResponse, ImageChunk, ListBatchesRequest, ListBatchesResponse,
    ListModelsRequest, ListModelsResponse, ProgressAck, ProgressReport, RegisterRequest,
    RegisterResponse, ReleaseJobRequest, ReleaseJobResponse, SubmitBatchRequest,
    SubmitBatchResponse, WatchBatchRequest, FILE_DESCRIPTOR_SET,
};
use relayfarm_proto::v1::{
    JoinReplicaRequest, JoinReplicaResponse, RendezvousRequest, RendezvousResponse,
    ReplicaHeartbeatRequest, ReplicaHeartbeatResponse,
};
use relayfarm_results::{ResultStore, ResultStoreError};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// Bytes per `FetchImage` chunk.
pub const IMAGE_CHUNK_BYTES: usize = 256 * 1024;
/// Longest accepted `ClaimJob` long-poll.
pub const MAX_CLAIM_WAIT_MS: u32 = 60_000;
/// How long a `WatchBatch` blocks on Redis per read (it re-checks the client in between).
const WATCH_BLOCK: Duration = Duration::from_secs(5);

/// `relayfarm-coordinator` flags (each also from an environment variable).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "relayfarm-coordinator",
    version,
    about = "relayfarm coordinator: gRPC front door of the render farm, queue in Redis Streams"
)]
pub struct CoordinatorArgs {
    /// Address to serve gRPC on.
    #[arg(long, env = "RELAYFARM_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Redis URL (the queue and all state live there).
    #[arg(
        long,
        env = "RELAYFARM_REDIS",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis: String,
    /// Result store (FetchImage serves images from it; workers write into it): a folder, or
    /// `s3://bucket/prefix` for S3-compatible object storage (credentials, region and endpoint
    /// from the standard `AWS_*` variables, e.g. `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`).
    #[arg(long, env = "RELAYFARM_RESULTS", default_value = "./relayfarm-results")]
    pub results: PathBuf,
    /// A claimed job whose worker has not heartbeated for this long is redelivered.
    #[arg(long, env = "RELAYFARM_LEASE_MS", default_value_t = 10_000)]
    pub lease_ms: u64,
    /// Deliveries of a job before it is dead-lettered (reported failed).
    #[arg(long, env = "RELAYFARM_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// Log format on stderr.
    #[arg(long, env = "RELAYFARM_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Prefix of every Redis key (several farms can share one Redis).
    #[arg(long, env = "RELAYFARM_KEY_PREFIX", default_value = "rf")]
    pub key_prefix: String,
    /// Group workers started with `relayfarm-worker --replica` into multi-process replicas
    /// with this many workers per stage, e.g. `text-encoder=1,denoiser=2,vae=1` (the
    /// denoiser's count is its tensor-parallel size). Without it, replica workers are refused.
    #[arg(long, env = "RELAYFARM_REPLICA_LAYOUT")]
    pub replica_layout: Option<String>,
}

impl Default for CoordinatorArgs {
    fn default() -> Self {
        CoordinatorArgs {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            redis: "redis://127.0.0.1:6379".into(),
            results: PathBuf::from("./relayfarm-results"),
            lease_ms: 10_000,
            max_attempts: 3,
            log_format: "text".into(),
            key_prefix: "rf".into(),
            replica_layout: None,
        }
    }
}

/// Sets up `tracing` on stderr (`text` or `json`; `RUST_LOG` filters, default `info`).
pub fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Runs the coordinator until SIGTERM or Ctrl-C (builds its own tokio runtime).
pub fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    init_logging(&args.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(args.listen)
            .await
            .map_err(|e| anyhow::anyhow!("--listen {}: {e}", args.listen))?;
        let shutdown = CancellationToken::new();
        spawn_signal_handler(shutdown.clone());
        serve(args, listener, shutdown).await
    })
}

/// Cancels `token` on SIGTERM or Ctrl-C.
pub fn spawn_signal_handler(token: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                        _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C: shutting down"),
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM; Ctrl-C only");
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        token.cancel();
    });
}

/// Serves on `listener` until `shutdown` is cancelled (for the binary and for in-process use).
pub async fn serve(
    args: CoordinatorArgs,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let coordinator = Coordinator::new(&args, shutdown.clone())?;
    coordinator.queue.spawn_connector(shutdown.clone());
    coordinator.queue.spawn_reaper(shutdown.clone());
    coordinator.spawn_replica_expiry(shutdown.clone());

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<RenderServiceServer<Coordinator>>()
        .await;
    health
        .set_serving::<ClusterServiceServer<Coordinator>>()
        .await;
    health
        .set_serving::<ReplicaServiceServer<Coordinator>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    tracing::info!(
        %addr,
        redis = %coordinator.queue.url(),
        results = %args.results.display(),
        lease_ms = args.lease_ms,
        max_attempts = args.max_attempts,
        replica_layout = ?args.replica_layout,
        "relayfarm-coordinator listening"
    );
    let stop = shutdown.clone();
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(RenderServiceServer::new(coordinator.clone()))
        .add_service(ClusterServiceServer::new(coordinator.clone()))
        .add_service(ReplicaServiceServer::new(coordinator))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(Duration::from_secs(30))),
            async move { stop.cancelled().await },
        );
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r?,
        _ = async {
            shutdown.cancelled().await;
            // In-flight calls observe the token; give them a moment to finish.
            tokio::time::sleep(Duration::from_secs(10)).await;
        } => tracing::warn!("graceful shutdown timed out; closing"),
    }
    tracing::info!("relayfarm-coordinator stopped");
    Ok(())
}

/// The gRPC services (cheap to clone).
#[derive(Debug, Clone)]
pub struct Coordinator {
    queue: Arc<RedisQueue>,
    results: ResultStore,
    shutdown: CancellationToken,
    /// The replica planner (`--replica-layout`), or `None`.
    replicas: Option<Arc<Replicas>>,
}

/// The replica planner and the wake-up of rendezvous waiters.
#[derive(Debug)]
struct Replicas {
    planner: Mutex<ReplicaPlanner>,
    posted: tokio::sync::Notify,
}

impl Replicas {
    fn lock(&self) -> MutexGuard<'_, ReplicaPlanner> {
        self.planner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Coordinator {
    /// A coordinator for `args` (Redis is connected in the background by [`serve`]).
    pub fn new(args: &CoordinatorArgs, shutdown: CancellationToken) -> anyhow::Result<Self> {
        if args.max_attempts == 0 {
            anyhow::bail!("--max-attempts must be at least 1");
        }
        if args.lease_ms < 100 {
            anyhow::bail!("--lease-ms must be at least 100");
        }
        let queue = RedisQueue::new(
            &args.redis,
            Keys::new(args.key_prefix.clone()),
            QueueConfig {
                lease_ms: args.lease_ms,
                max_attempts: args.max_attempts,
            },
        )?;
        let results = ResultStore::open(&args.results.to_string_lossy()).map_err(|e| {
            anyhow::anyhow!(
                "--results {}: cannot open the result store: {e}",
                args.results.display()
            )
        })?;
        let replicas = match &args.replica_layout {
            Some(l) => {
                let layout = ReplicaLayout::parse(l).map_err(|e| anyhow::anyhow!("--{e}"))?;
                Some(Arc::new(Replicas {
                    planner: Mutex::new(ReplicaPlanner::new(layout, args.lease_ms)),
                    posted: tokio::sync::Notify::new(),
                }))
            }
            None => None,
        };
        Ok(Coordinator {
            queue,
            results,
            shutdown,
            replicas,
        })
    }

    /// The queue.
    pub fn queue(&self) -> &Arc<RedisQueue> {
        &self.queue
    }
}

/// Logs a failed call and turns it into a status.
fn fail(rpc: &'static str, e: CoordError) -> Status {
    match &e {
        CoordError::Invalid(_) | CoordError::NotFound(_) => {
            tracing::debug!(rpc, kind = e.label(), error = %e, "rejected")
        }
        _ => tracing::warn!(rpc, kind = e.label(), error = %e, "failed"),
    }
    e.into()
}

fn require(field: &str, v: &str) -> CoordResult<()> {
    if v.is_empty() {
        Err(CoordError::Invalid(format!("{field}: empty")))
    } else {
        Ok(())
    }
}

/// `after_event_id` must look like a Redis stream id.
fn check_event_id(v: &str) -> CoordResult<()> {
    let ok = v.is_empty()
        || v.split_once('-').is_some_and(|(a, b)| {
            !a.is_empty()
                && !b.is_empty()
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.bytes().all(|c| c.is_ascii_digit())
        });
    if ok {
        Ok(())
    } else {
        Err(CoordError::Invalid(format!(
            "after_event_id: {v:?} is not an event id (like \"1700000000000-0\")"
        )))
    }
}

fn random_u64() -> u64 {
    let b = *uuid::Uuid::new_v4().as_bytes();
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

impl Coordinator {
    async fn submit(
        &self,
        mut stream: Streaming<SubmitBatchRequest>,
    ) -> CoordResult<SubmitBatchResponse> {
        let started = Instant::now();
        let header = match stream.message().await {
            Ok(Some(SubmitBatchRequest {
                item: Some(submit_batch_request::Item::Header(h)),
            })) => h,
            Ok(_) => {
                return Err(CoordError::Invalid(
                    "header: the first message of SubmitBatch must be a BatchHeader".into(),
                ))
            }
            Err(s) => {
                return Err(CoordError::Invalid(format!(
                    "request stream: {}",
                    s.message()
                )))
            }
        };
        let mut items = Vec::new();
        loop {
            match stream.message().await {
                Ok(Some(SubmitBatchRequest { item })) => match item {
                    Some(submit_batch_request::Item::Prompt(p)) => {
                        if items.len() >= validation::MAX_PROMPTS {
                            return Err(CoordError::Invalid(format!(
                                "prompts: more than {} prompts in one batch",
                                validation::MAX_PROMPTS
                            )));
                        }
                        items.push(p);
                    }
                    Some(submit_batch_request::Item::Header(_)) => {
                        return Err(CoordError::Invalid(format!(
                            "prompts[{}]: a second BatchHeader; send one header, then prompts",
                            items.len()
                        )))
                    }
                    None => {
                        return Err(CoordError::Invalid(format!(
                            "prompts[{}]: empty message",
                            items.len()
                        )))
                    }
                },
                Ok(None) => break,
                Err(s) => {
                    return Err(CoordError::Invalid(format!(
                        "request stream: {}",
                        s.message()
                    )))
                }
            }
        }
        let received = started.elapsed();
        let models = self.queue.models().await?;
        let batch = validate_batch(&header, &items, &models, random_u64())?;
        drop(items);
        let out = self.queue.submit(&batch).await?;
        tracing::info!(
            batch = %out.batch_id,
            model = %batch.model,
            jobs = out.accepted,
            deduplicated = out.deduplicated,
            receive_ms = received.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "batch submitted"
        );
        Ok(SubmitBatchResponse {
            batch_id: out.batch_id,
            accepted: out.accepted,
            deduplicated: out.deduplicated,
        })
    }

    fn watch(&self, req: WatchBatchRequest) -> mpsc::Receiver<Result<BatchEvent, Status>> {
        let (tx, rx) = mpsc::channel(256);
        let queue = Arc::clone(&self.queue);
        let shutdown = self.shutdown.clone();
        let span = tracing::info_span!("watch", batch = %req.batch_id);
        let task = async move {
            let batch = req.batch_id;
            let mut after = req.after_event_id;
            loop {
                let read = tokio::select! {
                    _ = tx.closed() => return,
                    r = queue.read_events(&batch, &after, WATCH_BLOCK, &shutdown) => r,
                };
                match read {
                    Ok(evs) => {
                        for ev in evs {
                            after = ev.event_id.clone();
                            let last = events::is_batch_done(&ev);
                            if tx.send(Ok(ev)).await.is_err() || last {
                                return;
                            }
                        }
                    }
                    Err(CoordError::ShuttingDown) => {
                        let _ = tx
                            .send(Err(Status::unavailable(format!(
                                "coordinator is shutting down; resume with after_event_id = {after:?}"
                            ))))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(fail("WatchBatch", e))).await;
                        return;
                    }
                }
            }
        };
        tokio::spawn(tracing::Instrument::instrument(task, span));
        rx
    }

    async fn fetch(
        &self,
        image_ref: &str,
    ) -> CoordResult<mpsc::Receiver<Result<ImageChunk, Status>>> {
        require("image_ref", image_ref)?;
        let store = self.results.clone();
        let total = match store.size(image_ref).await {
            Ok(n) => n,
            Err(ResultStoreError::NotFound(_)) => {
                return Err(CoordError::NotFound(format!(
                    "image_ref: no image `{image_ref}` in the result store"
                )))
            }
            Err(e @ ResultStoreError::InvalidKey(_)) => {
                return Err(CoordError::Invalid(format!("image_ref: {e}")))
            }
            Err(e) => return Err(CoordError::Store(e.to_string())),
        };
        let key = image_ref.to_string();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut offset = 0u64;
            loop {
                let end = (offset + IMAGE_CHUNK_BYTES as u64).min(total);
                let data = if end > offset {
                    match store.get_range(&key, offset..end).await {
                        Ok(d) => d,
                        Err(e) => {
                            let _ = tx
                                .send(Err(Status::internal(format!("result store: {e}"))))
                                .await;
                            return;
                        }
                    }
                } else {
                    Vec::new()
                };
                let n = data.len() as u64;
                let chunk = ImageChunk {
                    data,
                    offset,
                    total,
                };
                offset += n;
                if tx.send(Ok(chunk)).await.is_err() || n == 0 || offset >= total {
                    return;
                }
            }
        });
        Ok(rx)
    }

    async fn claim(&self, req: ClaimJobRequest) -> CoordResult<ClaimJobResponse> {
        require("worker_id", &req.worker_id)?;
        let models = if req.models.is_empty() {
            self.queue.worker_models(&req.worker_id).await?
        } else {
            req.models
        };
        if models.is_empty() {
            return Err(CoordError::Invalid(
                "models: empty, and the worker has no registered models (Register first)".into(),
            ));
        }
        let wait = Duration::from_millis(u64::from(req.wait_ms.min(MAX_CLAIM_WAIT_MS)));
        let job = self
            .queue
            .claim(&req.worker_id, &models, wait, &self.shutdown)
            .await?;
        if let Some(j) = &job {
            tracing::info!(worker = %req.worker_id, job = %j.job_id, attempt = j.attempt, "job claimed");
        }
        Ok(ClaimJobResponse { job })
    }
}

#[tonic::async_trait]
impl RenderService for Coordinator {
    async fn submit_batch(
        &self,
        request: Request<Streaming<SubmitBatchRequest>>,
    ) -> Result<Response<SubmitBatchResponse>, Status> {
        self.submit(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| fail("SubmitBatch", e))
    }

    type WatchBatchStream = ReceiverStream<Result<BatchEvent, Status>>;

    async fn watch_batch(
        &self,
        request: Request<WatchBatchRequest>,
    ) -> Result<Response<Self::WatchBatchStream>, Status> {
        let req = request.into_inner();
        let check = async {
            require("batch_id", &req.batch_id)?;
            check_event_id(&req.after_event_id)?;
            if !self.queue.batch_exists(&req.batch_id).await? {
                return Err(CoordError::NotFound(format!(
                    "batch_id: no batch `{}`",
                    req.batch_id
                )));
            }
            Ok(())
        };
        check.await.map_err(|e| fail("WatchBatch", e))?;
        Ok(Response::new(ReceiverStream::new(self.watch(req))))
    }

    async fn get_batch(
        &self,
        request: Request<GetBatchRequest>,
    ) -> Result<Response<Batch>, Status> {
        let req = request.into_inner();
        let r = async {
            require("batch_id", &req.batch_id)?;
            self.queue.get_batch(&req.batch_id, req.include_jobs).await
        };
        r.await.map(Response::new).map_err(|e| fail("GetBatch", e))
    }

    async fn list_batches(
        &self,
        request: Request<ListBatchesRequest>,
    ) -> Result<Response<ListBatchesResponse>, Status> {
        self.queue
            .list_batches(request.into_inner().limit)
            .await
            .map(|batches| Response::new(ListBatchesResponse { batches }))
            .map_err(|e| fail("ListBatches", e))
    }

    async fn cancel_batch(
        &self,
        request: Request<CancelBatchRequest>,
    ) -> Result<Response<CancelBatchResponse>, Status> {
        let req = request.into_inner();
        let r = async {
            require("batch_id", &req.batch_id)?;
            self.queue.cancel_batch(&req.batch_id).await
        };
        let (cancelled_pending, stopping_running) = r.await.map_err(|e| fail("CancelBatch", e))?;
        tracing::info!(batch = %req.batch_id, cancelled_pending, stopping_running, "batch cancelled");
        Ok(Response::new(CancelBatchResponse {
            cancelled_pending,
            stopping_running,
        }))
    }

    type FetchImageStream = ReceiverStream<Result<ImageChunk, Status>>;

    async fn fetch_image(
        &self,
        request: Request<FetchImageRequest>,
    ) -> Result<Response<Self::FetchImageStream>, Status> {
        let req = request.into_inner();
        self.fetch(&req.image_ref)
            .await
            .map(|rx| Response::new(ReceiverStream::new(rx)))
            .map_err(|e| fail("FetchImage", e))
    }

    async fn list_models(
        &self,
        _request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        self.queue
            .models_with_workers()
            .await
            .map(|models| Response::new(ListModelsResponse { models }))
            .map_err(|e| fail("ListModels", e))
    }
}

#[tonic::async_trait]
impl ClusterService for Coordinator {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let req = request.into_inner();
        self.queue
            .register(&req)
            .await
            .map_err(|e| fail("Register", e))?;
        let names: Vec<&str> = req.models.iter().map(|m| m.name.as_str()).collect();
        tracing::info!(worker = %req.worker_id, host = %req.hostname, models = ?names, "worker registered");
        let cfg = self.queue.config();
        Ok(Response::new(RegisterResponse {
            heartbeat_interval_ms: cfg.heartbeat_interval_ms(),
            lease_ms: cfg.lease_ms,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let req = request.into_inner();
        let out = self
            .queue
            .heartbeat(&req.worker_id, &req.running_job_ids)
            .await
            .map_err(|e| fail("Heartbeat", e))?;
        Ok(Response::new(HeartbeatResponse {
            cancel_job_ids: out.cancel_job_ids,
            reregister: out.reregister,
        }))
    }

    async fn claim_job(
        &self,
        request: Request<ClaimJobRequest>,
    ) -> Result<Response<ClaimJobResponse>, Status> {
        self.claim(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| fail("ClaimJob", e))
    }

    async fn report_progress(
        &self,
        request: Request<ProgressReport>,
    ) -> Result<Response<ProgressAck>, Status> {
        let r = request.into_inner();
        let check = async {
            require("job_id", &r.job_id)?;
            self.queue
                .progress(&r.worker_id, &r.job_id, r.step, r.total)
                .await
        };
        let cancelled = check.await.map_err(|e| fail("ReportProgress", e))?;
        Ok(Response::new(ProgressAck { cancelled }))
    }

    async fn complete_job(
        &self,
        request: Request<CompleteJobRequest>,
    ) -> Result<Response<CompleteJobResponse>, Status> {
        let r = request.into_inner();
        let check = async {
            require("job_id", &r.job_id)?;
            self.queue.complete(&r).await
        };
        let accepted = check.await.map_err(|e| fail("CompleteJob", e))?;
        tracing::info!(worker = %r.worker_id, job = %r.job_id, image = %r.image_ref, accepted, "job completed");
        Ok(Response::new(CompleteJobResponse { accepted }))
    }

    async fn fail_job(
        &self,
        request: Request<FailJobRequest>,
    ) -> Result<Response<FailJobResponse>, Status> {
        let r = request.into_inner();
        let check = async {
            require("job_id", &r.job_id)?;
            self.queue
                .fail(&r.worker_id, &r.job_id, &r.reason, r.retryable)
                .await
        };
        let out = check.await.map_err(|e| fail("FailJob", e))?;
        tracing::info!(worker = %r.worker_id, job = %r.job_id, reason = %r.reason, retryable = r.retryable, outcome = ?out, "job failed");
        Ok(Response::new(FailJobResponse {}))
    }

    async fn release_job(
        &self,
        request: Request<ReleaseJobRequest>,
    ) -> Result<Response<ReleaseJobResponse>, Status> {
        let r = request.into_inner();
        let check = async {
            require("job_id", &r.job_id)?;
            self.queue.release(&r.worker_id, &r.job_id).await
        };
        let out = check.await.map_err(|e| fail("ReleaseJob", e))?;
        tracing::info!(worker = %r.worker_id, job = %r.job_id, outcome = ?out, "job released");
        Ok(Response::new(ReleaseJobResponse {}))
    }

    async fn deregister(
        &self,
        request: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        let r = request.into_inner();
        if let Some(rep) = &self.replicas {
            let dissolved = rep.lock().leave(&r.worker_id);
            self.release_dissolved(dissolved).await;
        }
        self.queue
            .deregister(&r.worker_id)
            .await
            .map_err(|e| fail("Deregister", e))?;
        tracing::info!(worker = %r.worker_id, "worker deregistered");
        Ok(Response::new(DeregisterResponse {}))
    }
}

/// Longest accepted rendezvous wait.
const MAX_RENDEZVOUS_WAIT_MS: u32 = 60_000;

impl Coordinator {
    /// The replica planner, or FAILED_PRECONDITION when replicas are off.
    fn replicas(&self) -> Result<&Arc<Replicas>, Status> {
        self.replicas.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this coordinator runs without --replica-layout: start it with e.g. \
                 `--replica-layout text-encoder=1,denoiser=2,vae=1`, or run the worker \
                 without --replica",
            )
        })
    }

    /// Releases the in-flight jobs of dissolved replicas whose head is gone (a live head
    /// releases its own when it sees its assignment withdrawn).
    async fn release_dissolved(&self, dissolved: Vec<Dissolved>) {
        for d in dissolved {
            tracing::warn!(replica = %d.replica_id, head = %d.head, reason = %d.reason, jobs = d.head_running.len(), "replica dissolved");
            if !d.head_gone {
                continue;
            }
            for job in &d.head_running {
                match self.queue.release(&d.head, job).await {
                    Ok(out) => {
                        tracing::info!(job = %job, worker = %d.head, outcome = ?out, "released the job of a dissolved replica")
                    }
                    Err(e) => {
                        tracing::warn!(job = %job, error = %e, "cannot release the job of a dissolved replica; the reaper will redeliver it")
                    }
                }
            }
        }
    }

    /// Drops replica members whose lease expired, every quarter lease, until `shutdown`.
    fn spawn_replica_expiry(&self, shutdown: CancellationToken) {
        let Some(rep) = self.replicas.clone() else {
            return;
        };
        let me = self.clone();
        let period = Duration::from_millis((self.queue.config().lease_ms / 4).max(50));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(period) => {}
                }
                let dissolved = rep.lock().expire(now_ms());
                if !dissolved.is_empty() {
                    me.release_dissolved(dissolved).await;
                }
            }
        });
    }
}

#[tonic::async_trait]
impl ReplicaService for Coordinator {
    async fn join_replica(
        &self,
        request: Request<JoinReplicaRequest>,
    ) -> Result<Response<JoinReplicaResponse>, Status> {
        let r = request.into_inner();
        let rep = self.replicas()?.clone();
        let check = async {
            require("worker_id", &r.worker_id)?;
            require("model", &r.model)?;
            require("link_addr", &r.link_addr)?;
            let models = self.queue.worker_models(&r.worker_id).await?;
            if !models.contains(&r.model) {
                return Err(CoordError::Invalid(format!(
                    "model: worker `{}` has not registered model `{}` (registered: {models:?}); \
                     call Register first",
                    r.worker_id, r.model
                )));
            }
            Ok(())
        };
        check.await.map_err(|e| fail("JoinReplica", e))?;
        let dissolved = rep
            .lock()
            .join(&r.worker_id, &r.model, &r.link_addr, now_ms());
        self.release_dissolved(dissolved).await;
        tracing::info!(worker = %r.worker_id, model = %r.model, link = %r.link_addr, "replica member joined");
        let cfg = self.queue.config();
        Ok(Response::new(JoinReplicaResponse {
            heartbeat_interval_ms: cfg.heartbeat_interval_ms(),
            lease_ms: cfg.lease_ms,
        }))
    }

    async fn replica_heartbeat(
        &self,
        request: Request<ReplicaHeartbeatRequest>,
    ) -> Result<Response<ReplicaHeartbeatResponse>, Status> {
        let r = request.into_inner();
        let rep = self.replicas()?.clone();
        let out = self
            .queue
            .heartbeat(&r.worker_id, &r.running_job_ids)
            .await
            .map_err(|e| fail("ReplicaHeartbeat", e))?;
        let assignment = if out.reregister {
            None
        } else {
            rep.lock()
                .heartbeat(&r.worker_id, &r.running_job_ids, now_ms())
        };
        Ok(Response::new(ReplicaHeartbeatResponse {
            rejoin: assignment.is_none(),
            assignment,
            cancel_job_ids: out.cancel_job_ids,
        }))
    }

    async fn rendezvous(
        &self,
        request: Request<RendezvousRequest>,
    ) -> Result<Response<RendezvousResponse>, Status> {
        let r = request.into_inner();
        let rep = self.replicas()?.clone();
        if r.replica_id.is_empty() || r.key.is_empty() {
            return Err(Status::invalid_argument(
                "replica_id and key: both must be set",
            ));
        }
        if r.post {
            if !rep
                .lock()
                .post(&r.replica_id, r.generation, &r.key, r.value.clone())
            {
                return Err(Status::failed_precondition(format!(
                    "replica_id: `{}` generation {} is not a current replica (it was dissolved)",
                    r.replica_id, r.generation
                )));
            }
            rep.posted.notify_waiters();
            return Ok(Response::new(RendezvousResponse {
                value: r.value,
                found: true,
            }));
        }
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(u64::from(r.wait_ms.min(MAX_RENDEZVOUS_WAIT_MS)));
        loop {
            let posted = rep.posted.notified();
            tokio::pin!(posted);
            posted.as_mut().enable();
            let (value, current) = {
                let p = rep.lock();
                (
                    p.lookup(&r.replica_id, r.generation, &r.key),
                    p.is_current(&r.replica_id, r.generation),
                )
            };
            if let Some(value) = value {
                return Ok(Response::new(RendezvousResponse { value, found: true }));
            }
            if !current {
                return Err(Status::failed_precondition(format!(
                    "replica_id: `{}` generation {} is not a current replica (it was dissolved)",
                    r.replica_id, r.generation
                )));
            }
            tokio::select! {
                _ = posted => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Ok(Response::new(RendezvousResponse { value: Vec::new(), found: false }));
                }
                _ = self.shutdown.cancelled() => {
                    return Err(Status::unavailable("coordinator is shutting down"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn event_ids() {
        assert!(check_event_id("").is_ok());
        assert!(check_event_id("1700000000000-0").is_ok());
        assert!(check_event_id("abc").is_err());
        assert!(check_event_id("1-").is_err());
    }

    #[test]
    fn args_defaults() {
        let a = CoordinatorArgs::try_parse_from(["relayfarm-coordinator"]).unwrap();
        assert_eq!(a.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(a.lease_ms, 10_000);
        assert_eq!(a.max_attempts, 3);
        let a = CoordinatorArgs::try_parse_from([
            "relayfarm-coordinator",
            "--listen",
            "127.0.0.1:0",
            "--redis",
            "redis://127.0.0.1:1",
            "--lease-ms",
            "1000",
        ])
        .unwrap();
        assert_eq!(a.lease_ms, 1000);
        assert_eq!(a.redis, "redis://127.0.0.1:1");
    }
}
