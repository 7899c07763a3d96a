//! [`Link`] over gRPC between the worker processes of a replica.
//!
//! The receiving end is a [`LinkServer`]: a `StageLink` gRPC server (on the process's tokio
//! runtime) whose `Push` calls each carry one [`StageMessage`] (its [`StageMessage::encode`]
//! bytes in chunks of at most 1 MiB). The server decodes the message and queues it in a
//! bounded channel that the stage thread reads through a [`GrpcLinkReceiver`]; it answers the
//! call only once the message is queued, so a slow stage slows its sender (backpressure).
//!
//! The sending end is a [`GrpcLinkSender`]: stage threads (not runtime threads) call
//! [`Link::send`], which blocks on the runtime until the peer has queued the message.
//!
//! A process keeps one server (its address is what it advertises to the coordinator) and opens
//! a new inbox for each stage it runs ([`LinkServer::open`]), tagged with the replica
//! formation's generation. Senders tag their pushes with theirs
//! ([`GrpcLinkSender::with_generation`]): a push of a newer generation than the running stage,
//! or while no stage runs, is refused with `UNAVAILABLE` (the sender retries until the peer has
//! caught up); a push of an older generation with `FAILED_PRECONDITION` (it belongs to a
//! replica that no longer exists). Generation 0 matches any.

use relayfarm_models::link::{Link, StageMessage};
use relayfarm_models::{ModelError, Result};
use relayfarm_proto::v1::stage_link_client::StageLinkClient;
use relayfarm_proto::v1::stage_link_server::{StageLink, StageLinkServer};
use relayfarm_proto::v1::{LinkFrame, PushAck};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

/// Largest chunk of a pushed message.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Largest message a link server accepts (bytes).
pub const MAX_MESSAGE_BYTES: usize = 1 << 31;

/// How long [`GrpcLinkSender::connect`] keeps retrying by default.
pub const CONNECT_RETRY: Duration = Duration::from_secs(5);

/// How long [`Link::send`] retries a push the peer refused as `UNAVAILABLE` (its stage is
/// starting, or the peer is restarting).
pub const SEND_RETRY: Duration = Duration::from_secs(30);

/// gRPC metadata key carrying the sender's replica generation.
pub const GENERATION_HEADER: &str = "x-relayfarm-generation";

fn link_error(msg: impl std::fmt::Display) -> ModelError {
    ModelError::invalid("link", msg.to_string())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The inbox of the stage currently running in this process, with its generation.
type Inbox = Arc<Mutex<Option<(u64, mpsc::Sender<StageMessage>)>>>;

/// The `StageLink` service: decodes pushed messages into the current inbox.
struct Service {
    inbox: Inbox,
    device: candle_core::Device,
    stop: CancellationToken,
}

impl Service {
    /// The inbox for a push of `generation`, or why the push is refused.
    fn check_generation(
        &self,
        generation: u64,
    ) -> std::result::Result<mpsc::Sender<StageMessage>, Status> {
        let Some((current, tx)) = lock(&self.inbox).clone() else {
            return Err(Status::unavailable(
                "no stage is running in this worker (replica re-forming)",
            ));
        };
        if generation == 0 || current == 0 || generation == current {
            Ok(tx)
        } else if generation > current {
            Err(Status::unavailable(format!(
                "no stage is running for generation {generation} yet (running {current})"
            )))
        } else {
            Err(Status::failed_precondition(format!(
                "stale message of generation {generation}: this worker runs generation {current}"
            )))
        }
    }
}

#[tonic::async_trait]
impl StageLink for Service {
    async fn push(
        &self,
        request: Request<Streaming<LinkFrame>>,
    ) -> std::result::Result<Response<PushAck>, Status> {
        let generation: u64 = request
            .metadata()
            .get(GENERATION_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        self.check_generation(generation)?;
        let mut frames = request.into_inner();
        let mut bytes = Vec::new();
        while let Some(frame) = frames.message().await? {
            if bytes.len() + frame.chunk.len() > MAX_MESSAGE_BYTES {
                return Err(Status::resource_exhausted(format!(
                    "stage message larger than {MAX_MESSAGE_BYTES} bytes"
                )));
            }
            bytes.extend_from_slice(&frame.chunk);
        }
        let device = self.device.clone();
        let msg = tokio::task::spawn_blocking(move || StageMessage::decode(&bytes, &device))
            .await
            .map_err(|e| Status::internal(format!("decoding a stage message: {e}")))?
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let tx = self.check_generation(generation)?;
        tokio::select! {
            sent = tx.send(msg) => sent.map_err(|_| {
                Status::unavailable("the stage of this worker has stopped")
            })?,
            _ = self.stop.cancelled() => {
                return Err(Status::unavailable("the link server is shutting down"));
            }
        }
        Ok(Response::new(PushAck {}))
    }
}

/// The receiving side of this process's links: a `StageLink` gRPC server.
pub struct LinkServer {
    local_addr: SocketAddr,
    inbox: Inbox,
    stop: CancellationToken,
}

impl LinkServer {
    /// Starts the server on `listen` (e.g. `127.0.0.1:0`) on the current tokio runtime, with an
    /// inbox holding at most `capacity` messages; received tensors are put on `device`.
    /// Returns the server and the inbox's receiving end.
    pub async fn start(
        listen: &str,
        capacity: usize,
        device: candle_core::Device,
    ) -> Result<(LinkServer, GrpcLinkReceiver)> {
        let addr = tokio::net::lookup_host(listen)
            .await
            .map_err(|e| link_error(format!("bad link listen address `{listen}`: {e}")))?
            .next()
            .ok_or_else(|| {
                link_error(format!(
                    "link listen address `{listen}` resolves to nothing"
                ))
            })?;
        let incoming = tonic::transport::server::TcpIncoming::bind(addr)
            .map_err(|e| link_error(format!("cannot listen on {addr} for stage links: {e}")))?
            .with_nodelay(Some(true));
        let local_addr = incoming
            .local_addr()
            .map_err(|e| link_error(format!("link server address: {e}")))?;
        let inbox: Inbox = Arc::new(Mutex::new(None));
        let stop = CancellationToken::new();
        let service = Service {
            inbox: inbox.clone(),
            device,
            stop: stop.clone(),
        };
        let token = stop.clone();
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(StageLinkServer::new(service))
                .serve_with_incoming_shutdown(incoming, token.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!(%local_addr, error = %e, "stage link server stopped");
            }
        });
        let server = LinkServer {
            local_addr,
            inbox,
            stop,
        };
        let rx = server.open(capacity, 0);
        Ok((server, rx))
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A fresh inbox for the next stage run here, accepting pushes of `generation` (0: any).
    /// The previous inbox's receiver sees the end of its stream once messages already accepted
    /// for it have been read.
    pub fn open(&self, capacity: usize, generation: u64) -> GrpcLinkReceiver {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        *lock(&self.inbox) = Some((generation, tx));
        GrpcLinkReceiver {
            rx,
            name: format!("grpc://{}", self.local_addr),
        }
    }

    /// Closes the current inbox: its receiver ends, and pushes are refused until
    /// [`LinkServer::open`].
    pub fn close(&self) {
        *lock(&self.inbox) = None;
    }

    /// Stops the server.
    pub fn shutdown(&self) {
        self.close();
        self.stop.cancel();
    }
}

impl Drop for LinkServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The receiving end of a [`LinkServer`]'s inbox (use it from a stage thread, not a runtime
/// thread).
pub struct GrpcLinkReceiver {
    rx: mpsc::Receiver<StageMessage>,
    name: String,
}

impl GrpcLinkReceiver {
    /// The next message, waiting at most `timeout`: `Ok(None)` on timeout, an error once the
    /// inbox is closed.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<StageMessage>> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.rx.try_recv() {
                Ok(m) => return Ok(Some(m)),
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    return Err(link_error(format!("{}: the inbox was closed", self.name)))
                }
                Err(mpsc::error::TryRecvError::Empty) => {
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }
}

impl Link for GrpcLinkReceiver {
    fn send(&mut self, _msg: StageMessage) -> Result<()> {
        Err(link_error(format!("{}: this end only receives", self.name)))
    }

    fn recv(&mut self) -> Result<Option<StageMessage>> {
        Ok(self.rx.blocking_recv())
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

/// The sending end of a gRPC link to a peer's [`LinkServer`].
pub struct GrpcLinkSender {
    addr: String,
    runtime: Handle,
    client: StageLinkClient<Channel>,
    generation: u64,
    retry: Duration,
    cancel: CancellationToken,
}

impl GrpcLinkSender {
    /// Connects to the link server at `addr` (`host:port`), retrying for `retry_for` (peers of
    /// a replica start at about the same time). `runtime` runs the gRPC calls; call this and
    /// [`Link::send`] from threads that are not runtime threads.
    pub fn connect(addr: &str, runtime: Handle, retry_for: Duration) -> Result<Self> {
        let url = format!("http://{addr}");
        let endpoint = Endpoint::from_shared(url)
            .map_err(|e| link_error(format!("bad link address `{addr}`: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true);
        let deadline = Instant::now() + retry_for;
        let channel = runtime.block_on(async {
            loop {
                match endpoint.connect().await {
                    Ok(ch) => return Ok(ch),
                    Err(e) if Instant::now() >= deadline => {
                        return Err(link_error(format!(
                            "cannot reach the stage link at {addr} (tried for {retry_for:?}): \
                             {e}; is the next stage's worker running?"
                        )))
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        })?;
        Ok(GrpcLinkSender {
            addr: addr.to_string(),
            runtime,
            client: StageLinkClient::new(channel)
                .max_decoding_message_size(CHUNK_BYTES * 2)
                .max_encoding_message_size(CHUNK_BYTES * 2),
            generation: 0,
            retry: SEND_RETRY,
            cancel: CancellationToken::new(),
        })
    }

    /// Tags every push with the replica generation `generation` (see the module docs).
    pub fn with_generation(mut self, generation: u64) -> Self {
        self.generation = generation;
        self
    }

    /// Sends in progress give up (with an error) once `cancel` is cancelled (e.g. the stage is
    /// being stopped).
    pub fn with_cancel(mut self, cancel: CancellationToken) -> Self {
        self.cancel = cancel;
        self
    }

    /// How long a push refused as `UNAVAILABLE` is retried (default [`SEND_RETRY`]).
    pub fn with_retry(mut self, retry: Duration) -> Self {
        self.retry = retry;
        self
    }

    /// The peer's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

impl Link for GrpcLinkSender {
    fn send(&mut self, msg: StageMessage) -> Result<()> {
        let bytes = msg.encode()?;
        let frames: Vec<LinkFrame> = if bytes.is_empty() {
            vec![LinkFrame { chunk: Vec::new() }]
        } else {
            bytes
                .chunks(CHUNK_BYTES)
                .map(|c| LinkFrame { chunk: c.to_vec() })
                .collect()
        };
        let client = self.client.clone();
        let addr = self.addr.clone();
        // A peer whose stage is (re)starting refuses pushes for a moment: retry those.
        let deadline = Instant::now() + self.retry;
        let generation = self.generation;
        let cancel = self.cancel.clone();
        self.runtime
            .block_on(async move {
                loop {
                    let mut c = client.clone();
                    let mut req = Request::new(tokio_stream::iter(frames.clone()));
                    if generation != 0 {
                        if let Ok(v) = generation.to_string().parse() {
                            req.metadata_mut().insert(GENERATION_HEADER, v);
                        }
                    }
                    let pushed = tokio::select! {
                        r = c.push(req) => r,
                        _ = cancel.cancelled() => {
                            return Err(Status::cancelled("the sending stage is stopping"))
                        }
                    };
                    match pushed {
                        Err(s)
                            if s.code() == tonic::Code::Unavailable
                                && Instant::now() < deadline
                                && !cancel.is_cancelled() =>
                        {
                            tokio::time::sleep(Duration::from_millis(50)).await
                        }
                        other => return other,
                    }
                }
            })
            .map(|_| ())
            .map_err(|s| {
                link_error(format!(
                    "sending {:?} of job `{}` to the stage at {addr}: {} ({:?})",
                    msg.kind(),
                    msg.header.job_id,
                    s.message(),
                    s.code()
                ))
            })
    }

    fn recv(&mut self) -> Result<Option<StageMessage>> {
        Err(link_error(format!(
            "grpc://{}: this end only sends",
            self.addr
        )))
    }

    fn describe(&self) -> String {
        format!("grpc://{}", self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use relayfarm_models::link::MessageKind;
    use relayfarm_models::pipeline::{GenerateRequest, SizePlan};

    fn request() -> GenerateRequest {
        GenerateRequest {
            prompt: "a cat".into(),
            negative_prompt: None,
            height: Some(32),
            width: Some(32),
            steps: 3,
            guidance: 4.5,
            seed: 7,
            latents: None,
            resolution_binning: true,
            size_check: true,
        }
    }

    #[test]
    fn messages_round_trip_between_two_links() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (server, mut rx) = rt
            .block_on(LinkServer::start("127.0.0.1:0", 1, Device::Cpu))
            .unwrap();
        let addr = server.local_addr().to_string();
        let handle = rt.handle().clone();
        let plan = SizePlan {
            height: 32,
            width: 32,
            gen_height: 32,
            gen_width: 32,
        };
        // Big enough to need several chunks.
        let latents = Tensor::arange(0f32, 700_000.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 7, 100, 1000))
            .unwrap();
        let sent = StageMessage::latents("job-1", &request(), &plan, latents.clone());
        let expected = sent.encode().unwrap();
        let sender = std::thread::spawn(move || {
            let mut tx = GrpcLinkSender::connect(&addr, handle, CONNECT_RETRY).unwrap();
            tx.send(sent).unwrap();
            tx.send(StageMessage::shutdown()).unwrap();
            assert!(tx.recv().is_err());
        });
        let got = rx.recv().unwrap().unwrap();
        assert_eq!(got.kind(), MessageKind::Latents);
        assert_eq!(got.encode().unwrap(), expected);
        let end = rx.recv().unwrap().unwrap();
        assert_eq!(end.kind(), MessageKind::Shutdown);
        sender.join().unwrap();
        // A closed inbox refuses pushes with a clear error.
        server.close();
        assert!(rx.recv().unwrap().is_none());
        let addr = server.local_addr().to_string();
        let handle = rt.handle().clone();
        let e = std::thread::spawn(move || {
            let mut tx = GrpcLinkSender::connect(&addr, handle, CONNECT_RETRY)
                .unwrap()
                .with_retry(Duration::from_millis(200));
            tx.send(StageMessage::shutdown()).unwrap_err().to_string()
        })
        .join()
        .unwrap();
        assert!(e.contains("no stage is running"), "{e}");
        // Generations: older pushes are refused at once, newer ones wait for the stage.
        let mut rx = server.open(1, 5);
        let (addr, handle) = (server.local_addr().to_string(), rt.handle().clone());
        let (stale, ok) = std::thread::spawn(move || {
            let mut old = GrpcLinkSender::connect(&addr, handle.clone(), CONNECT_RETRY)
                .unwrap()
                .with_generation(4);
            let stale = old.send(StageMessage::shutdown()).unwrap_err().to_string();
            let mut cur = GrpcLinkSender::connect(&addr, handle, CONNECT_RETRY)
                .unwrap()
                .with_generation(5);
            (stale, cur.send(StageMessage::shutdown()).is_ok())
        })
        .join()
        .unwrap();
        assert!(stale.contains("stale message of generation 4"), "{stale}");
        assert!(ok);
        assert!(rx.recv().unwrap().is_some());
        // A peer that is down is named in the error.
        drop(server);
        let handle = rt.handle().clone();
        let e = std::thread::spawn(move || {
            GrpcLinkSender::connect("127.0.0.1:1", handle, Duration::from_millis(300))
                .err()
                .unwrap()
                .to_string()
        })
        .join()
        .unwrap();
        assert!(e.contains("127.0.0.1:1"), "{e}");
    }
}
