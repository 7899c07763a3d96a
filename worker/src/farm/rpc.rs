//! The worker's side of `ClusterService`: a cheap-to-clone client with per-call deadlines, and
//! retries with backoff for the calls that must not be lost.

use relayfarm_proto::v1::cluster_service_client::ClusterServiceClient;
use relayfarm_proto::v1::{
    ClaimJobRequest, ClaimJobResponse, CompleteJobRequest, CompleteJobResponse, DeregisterRequest,
    FailJobRequest, HeartbeatRequest, HeartbeatResponse, ProgressAck, ProgressReport,
    RegisterRequest, RegisterResponse, ReleaseJobRequest,
};
use std::future::Future;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

/// Deadline of a unary call (other than the claim long-poll).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Extra time a claim may take beyond its long-poll wait.
pub const CLAIM_SLACK: Duration = Duration::from_secs(10);

/// A connection to the coordinator for one worker.
#[derive(Clone)]
pub struct Cluster {
    client: ClusterServiceClient<Channel>,
    worker_id: String,
    url: String,
}

/// Normalises a coordinator address: `host:port` gets `http://`.
pub fn coordinator_url(url: &str) -> String {
    let url = url.trim();
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

impl Cluster {
    /// A lazily connecting client: nothing is dialled until the first call, and a lost
    /// connection is re-dialled on the next call.
    pub fn connect_lazy(url: &str, worker_id: &str) -> anyhow::Result<Self> {
        let url = coordinator_url(url);
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| anyhow::anyhow!("--coordinator {url}: not a valid URL ({e})"))?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10));
        Ok(Cluster {
            client: ClusterServiceClient::new(endpoint.connect_lazy()),
            worker_id: worker_id.to_string(),
            url,
        })
    }

    /// The coordinator URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// This worker's id.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    fn req<T>(msg: T, timeout: Duration) -> Request<T> {
        let mut r = Request::new(msg);
        r.set_timeout(timeout);
        r
    }

    /// `Register`.
    pub async fn register(&self, req: RegisterRequest) -> Result<RegisterResponse, Status> {
        let mut c = self.client.clone();
        Ok(c.register(Self::req(req, CALL_TIMEOUT)).await?.into_inner())
    }

    /// `Heartbeat` with the running job ids.
    pub async fn heartbeat(&self, running: Vec<String>) -> Result<HeartbeatResponse, Status> {
        let mut c = self.client.clone();
        let msg = HeartbeatRequest {
            worker_id: self.worker_id.clone(),
            running_job_ids: running,
        };
        Ok(c.heartbeat(Self::req(msg, CALL_TIMEOUT))
            .await?
            .into_inner())
    }

    /// `ClaimJob` long-poll.
    pub async fn claim(&self, models: &[String], wait_ms: u32) -> Result<ClaimJobResponse, Status> {
        let mut c = self.client.clone();
        let msg = ClaimJobRequest {
            worker_id: self.worker_id.clone(),
            models: models.to_vec(),
            wait_ms,
        };
        let timeout = Duration::from_millis(wait_ms as u64) + CLAIM_SLACK;
        Ok(c.claim_job(Self::req(msg, timeout)).await?.into_inner())
    }

    /// `ReportProgress`.
    pub async fn report_progress(
        &self,
        job_id: &str,
        step: u32,
        total: u32,
    ) -> Result<ProgressAck, Status> {
        self.report_progress_as(&self.worker_id, job_id, step, total)
            .await
    }

    /// Reports step progress of a job that `owner` holds (a replica's denoiser reports for
    /// its text-encoder worker, which claimed the job).
    pub async fn report_progress_as(
        &self,
        owner: &str,
        job_id: &str,
        step: u32,
        total: u32,
    ) -> Result<ProgressAck, Status> {
        let mut c = self.client.clone();
        let msg = ProgressReport {
            worker_id: owner.to_string(),
            job_id: job_id.to_string(),
            step,
            total,
        };
        Ok(c.report_progress(Self::req(msg, CALL_TIMEOUT))
            .await?
            .into_inner())
    }

    /// `CompleteJob`.
    pub async fn complete(&self, msg: CompleteJobRequest) -> Result<CompleteJobResponse, Status> {
        let mut c = self.client.clone();
        Ok(c.complete_job(Self::req(msg, CALL_TIMEOUT))
            .await?
            .into_inner())
    }

    /// `FailJob`.
    pub async fn fail(&self, job_id: &str, reason: &str, retryable: bool) -> Result<(), Status> {
        let mut c = self.client.clone();
        let msg = FailJobRequest {
            worker_id: self.worker_id.clone(),
            job_id: job_id.to_string(),
            reason: reason.to_string(),
            retryable,
        };
        c.fail_job(Self::req(msg, CALL_TIMEOUT)).await?;
        Ok(())
    }

    /// `ReleaseJob`.
    pub async fn release(&self, job_id: &str) -> Result<(), Status> {
        let mut c = self.client.clone();
        let msg = ReleaseJobRequest {
            worker_id: self.worker_id.clone(),
            job_id: job_id.to_string(),
        };
        c.release_job(Self::req(msg, CALL_TIMEOUT)).await?;
        Ok(())
    }

    /// `Deregister`.
    pub async fn deregister(&self) -> Result<(), Status> {
        let mut c = self.client.clone();
        let msg = DeregisterRequest {
            worker_id: self.worker_id.clone(),
        };
        c.deregister(Self::req(msg, Duration::from_secs(3))).await?;
        Ok(())
    }
}

/// A status message with its cause chain (e.g. `tcp connect error: Connection refused`).
pub fn describe(status: &Status) -> String {
    let mut out = status.message().to_string();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        let text = e.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

/// Whether a failed call may succeed if sent again (the coordinator or its Redis is down or
/// restarting, a deadline passed, the connection broke).
pub fn is_transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Internal
    )
}

/// Exponential backoff: `initial`, doubling, capped at `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// A backoff starting at `initial` and capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff { next: initial, max }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
}

/// Rate-limits a repeated log line: the first occurrence, then at most one per `period`.
#[derive(Debug, Clone)]
pub struct LogEvery {
    period: Duration,
    last: Option<Instant>,
    suppressed: u32,
}

impl LogEvery {
    /// At most one line per `period`.
    pub fn new(period: Duration) -> Self {
        LogEvery {
            period,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(lines suppressed since the last one)` when a line is due now.
    pub fn due(&mut self, now: Instant) -> Option<u32> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.period => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }

    /// Starts over (the next line is logged at once).
    pub fn reset(&mut self) {
        self.last = None;
        self.suppressed = 0;
    }
}

/// Calls `f` until it succeeds, fails with a non-transient status, `window` has passed or
/// `abort` is cancelled (the last error is returned). Each transient failure is logged with
/// the delay before the next try.
pub async fn retry<T, F, Fut>(
    what: &str,
    window: Duration,
    abort: &CancellationToken,
    mut f: F,
) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let started = Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
    let mut log = LogEvery::new(Duration::from_secs(10));
    let mut tries = 0u32;
    loop {
        tries += 1;
        match f().await {
            Ok(v) => {
                if tries > 1 {
                    tracing::info!(what, tries, "succeeded after retrying");
                }
                return Ok(v);
            }
            Err(status) if is_transient(&status) && started.elapsed() < window => {
                let delay = backoff.next_delay();
                if log.due(Instant::now()).is_some() {
                    tracing::warn!(
                        what,
                        code = ?status.code(),
                        error = %describe(&status),
                        tries,
                        waited_ms = started.elapsed().as_millis() as u64,
                        window_s = window.as_secs(),
                        "coordinator call failed; retrying with backoff"
                    );
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = abort.cancelled() => return Err(status),
                }
            }
            Err(status) => return Err(status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let d: Vec<u64> = (0..5).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(d, vec![100, 200, 400, 500, 500]);
    }

    #[test]
    fn log_every_limits() {
        let mut l = LogEvery::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.due(t0), Some(0));
        assert_eq!(l.due(t0 + Duration::from_secs(1)), None);
        assert_eq!(l.due(t0 + Duration::from_secs(2)), None);
        assert_eq!(l.due(t0 + Duration::from_secs(10)), Some(2));
        l.reset();
        assert_eq!(l.due(t0 + Duration::from_secs(11)), Some(0));
    }

    #[test]
    fn urls_get_a_scheme() {
        assert_eq!(coordinator_url("127.0.0.1:50051"), "http://127.0.0.1:50051");
        assert_eq!(coordinator_url("https://c:1"), "https://c:1");
    }

    #[test]
    fn transient_codes() {
        assert!(is_transient(&Status::unavailable("x")));
        assert!(!is_transient(&Status::invalid_argument("x")));
        assert!(!is_transient(&Status::not_found("x")));
    }
}
