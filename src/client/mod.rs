//! The farm client: `relayfarm submit | watch | fetch | cancel | models | status`.
//!
//! Every command talks gRPC (`relayfarm.v1.RenderService`) to a coordinator. Errors from
//! the coordinator are turned into one-line messages in one place ([`status_error`]).

pub mod cancel;
pub mod fetch;
pub mod models;
pub mod progress;
pub mod status;
pub mod submit;
pub mod watch;

#[cfg(test)]
mod fake;

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use relayfarm_proto::v1::render_service_client::RenderServiceClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// The gRPC client type used by every command.
pub type Client = RenderServiceClient<Channel>;

/// Where the coordinator is (shared by every client command).
#[derive(clap::Args, Debug, Clone)]
pub struct CoordinatorArgs {
    /// Coordinator gRPC address, e.g. http://127.0.0.1:50051 (`http://` is assumed when no
    /// scheme is given).
    #[arg(long, env = "RELAYFARM_COORDINATOR")]
    pub coordinator: String,
}

/// Exit status of a command whose batch finished with failed or cancelled jobs.
pub const EXIT_FAILED_JOBS: u8 = 1;
/// Exit status after Ctrl-C / SIGTERM while waiting.
pub const EXIT_INTERRUPTED: u8 = 130;

/// Normalises a coordinator address: adds `http://` when no scheme is given.
pub fn normalize_url(url: &str) -> String {
    let url = url.trim();
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

/// A client for the coordinator at `url`. The channel connects lazily, so an unreachable
/// coordinator surfaces as UNAVAILABLE on the first call (mapped by [`status_error`]).
pub fn connect(url: &str) -> anyhow::Result<Client> {
    let url = normalize_url(url);
    let endpoint = Endpoint::from_shared(url.clone())
        .with_context(|| format!("--coordinator {url}: not a valid URL"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    Ok(RenderServiceClient::new(endpoint.connect_lazy())
        .max_decoding_message_size(64 * 1024 * 1024))
}

/// Runs `fut` on a fresh multi-threaded tokio runtime.
pub fn block_on<F: Future<Output = anyhow::Result<ExitCode>>>(fut: F) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(fut)
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM.
pub async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Whether a failed call may succeed when simply repeated (coordinator restarting,
/// connection dropped, Redis briefly away).
pub fn is_retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Aborted | Code::Cancelled
    ) || (status.code() == Code::Internal && looks_like_transport(status))
}

fn looks_like_transport(status: &Status) -> bool {
    let text = full_message(status).to_ascii_lowercase();
    [
        "transport",
        "connection",
        "broken pipe",
        "h2 protocol",
        "stream no longer needed",
    ]
    .iter()
    .any(|needle| text.contains(needle))
}

/// The status message followed by its source chain (transport errors hide the useful part,
/// e.g. "Connection refused", in the sources).
fn full_message(status: &Status) -> String {
    let mut text = status.message().to_string();
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        let part = err.to_string();
        if !part.is_empty() && !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
        source = err.source();
    }
    text
}

/// The one-line, user-facing description of a failed call to the coordinator at `url`.
/// `what` names the operation ("submit", "watch batch X", ...).
pub fn describe_status(url: &str, what: &str, status: &Status) -> String {
    let url = normalize_url(url);
    let msg = full_message(status);
    match status.code() {
        Code::Unavailable => {
            let lower = msg.to_ascii_lowercase();
            if lower.contains("connect") || lower.contains("refused") || lower.contains("dns") {
                format!("{what}: cannot reach the coordinator at {url} ({msg}); is it running and is the address right?")
            } else {
                format!("{what}: the coordinator at {url} is unavailable: {msg} (the request can be retried)")
            }
        }
        Code::InvalidArgument => format!("{what}: rejected by the coordinator: {msg}"),
        Code::NotFound => format!("{what}: not found: {msg}"),
        Code::AlreadyExists => format!("{what}: already exists: {msg}"),
        Code::FailedPrecondition => format!("{what}: not possible now: {msg}"),
        Code::OutOfRange => format!("{what}: out of range: {msg}"),
        Code::DeadlineExceeded => {
            format!("{what}: the coordinator at {url} did not answer in time ({msg})")
        }
        Code::Unimplemented => format!(
            "{what}: the coordinator at {url} does not implement this call ({msg}); are client and coordinator the same version?"
        ),
        Code::Unauthenticated | Code::PermissionDenied => {
            format!("{what}: the coordinator at {url} refused access: {msg}")
        }
        Code::ResourceExhausted => format!("{what}: the coordinator at {url} is out of resources: {msg}"),
        Code::Cancelled => format!("{what}: the call was cancelled ({msg})"),
        Code::Aborted => format!("{what}: aborted by the coordinator ({msg}); retry"),
        Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => {
            format!("{what}: the coordinator at {url} failed: {msg}")
        }
    }
}

/// [`describe_status`] as an error.
pub fn status_error(url: &str, what: &str, status: &Status) -> anyhow::Error {
    anyhow::anyhow!(describe_status(url, what, status))
}

/// Exponential backoff: `initial`, doubled after every [`Backoff::next`], capped at `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    current: Duration,
    max: Duration,
}

impl Backoff {
    /// A backoff starting at `initial`, capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            current: initial,
            max,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        d
    }

    /// Back to the initial delay (after a success).
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_get_a_scheme() {
        assert_eq!(normalize_url("127.0.0.1:1"), "http://127.0.0.1:1");
        assert_eq!(normalize_url(" https://x:2 "), "https://x:2");
    }

    #[test]
    fn statuses_map_to_one_line_messages() {
        let u = "http://c:1";
        let m = describe_status(
            u,
            "submit",
            &Status::invalid_argument("prompts[3].height: 50 is not a multiple of 16"),
        );
        assert_eq!(
            m,
            "submit: rejected by the coordinator: prompts[3].height: 50 is not a multiple of 16"
        );
        let m = describe_status(
            u,
            "submit",
            &Status::unavailable("tcp connect error: Connection refused"),
        );
        assert!(
            m.contains("cannot reach the coordinator at http://c:1"),
            "{m}"
        );
        let m = describe_status(
            u,
            "submit",
            &Status::unavailable("redis at redis://r:6379 is unreachable"),
        );
        assert!(
            m.contains("redis://r:6379") && m.contains("can be retried"),
            "{m}"
        );
        let m = describe_status("c:1", "watch", &Status::not_found("batch `b` not found"));
        assert_eq!(m, "watch: not found: batch `b` not found");
        let m = describe_status(u, "models", &Status::unimplemented(""));
        assert!(m.contains("does not implement"), "{m}");
        for s in [
            Status::new(Code::Internal, "boom"),
            Status::deadline_exceeded("t"),
            Status::permission_denied("p"),
        ] {
            let m = describe_status(u, "x", &s);
            assert!(!m.contains('\n') && m.contains("http://c:1"), "{m}");
        }
    }

    #[test]
    fn retryable_codes() {
        assert!(is_retryable(&Status::unavailable("x")));
        assert!(is_retryable(&Status::unknown("h2 protocol error")));
        assert!(!is_retryable(&Status::invalid_argument("x")));
        assert!(!is_retryable(&Status::not_found("x")));
        assert!(!is_retryable(&Status::internal("bug")));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(300));
        assert_eq!(b.next_delay(), Duration::from_millis(100));
        assert_eq!(b.next_delay(), Duration::from_millis(200));
        assert_eq!(b.next_delay(), Duration::from_millis(300));
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }
}
