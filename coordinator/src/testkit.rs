//! Helpers for tests and benchmarks: a throw-away `redis-server` and an in-process
//! coordinator on free loopback ports.

use crate::server::{serve, CoordinatorArgs};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> std::io::Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A `redis-server` child process (no persistence), killed by PID when dropped.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
}

impl RedisServer {
    /// Starts `redis-server` (from `$RELAYFARM_REDIS_SERVER` or `PATH`) on a free port and
    /// waits until it accepts connections.
    pub fn start() -> std::io::Result<Self> {
        Self::start_on(free_port()?)
    }

    /// Starts it on `port`.
    pub fn start_on(port: u16) -> std::io::Result<Self> {
        let bin = std::env::var("RELAYFARM_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let server = RedisServer {
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("redis-server did not start on port {port}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Its process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills it (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An in-process coordinator serving on a free loopback port.
#[derive(Debug)]
pub struct InProcessCoordinator {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Cancel to shut it down.
    pub shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcessCoordinator {
    /// Starts one (inside a tokio runtime) with `args` (its `listen` is ignored).
    pub async fn start(args: CoordinatorArgs) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(serve(args, listener, shutdown.clone()));
        Ok(InProcessCoordinator {
            addr,
            shutdown,
            handle,
        })
    }

    /// Its URL for gRPC clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Shuts it down and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.handle.await?
    }
}

/// Coordinator arguments for tests: `redis`, a results folder, a short lease.
pub fn test_args(
    redis: &str,
    results: PathBuf,
    lease_ms: u64,
    max_attempts: u32,
) -> CoordinatorArgs {
    CoordinatorArgs {
        redis: redis.to_string(),
        results,
        lease_ms,
        max_attempts,
        ..CoordinatorArgs::default()
    }
}
