//! The worker loop end to end against an in-process fake `ClusterService` (no Redis, no
//! coordinator binary): register, heartbeat, claim, render on the tiny fixture, progress,
//! store, complete; invalid jobs failed as non-retryable; cancellation; graceful shutdown
//! releasing the job in hand; a coordinator that is down at start or while reporting.

use relayfarm_proto::v1::cluster_service_server::{ClusterService, ClusterServiceServer};
use relayfarm_proto::v1::*;
use relayfarm_worker::farm::{serve, Shutdown, WorkerArgs};
use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/pixart-sigma-tiny"
);

#[derive(Default)]
struct State {
    queue: VecDeque<ClaimedJob>,
    registers: Vec<RegisterRequest>,
    heartbeats: Vec<HeartbeatRequest>,
    progress: Vec<ProgressReport>,
    completed: Vec<CompleteJobRequest>,
    failed: Vec<FailJobRequest>,
    released: Vec<String>,
    deregistered: Vec<String>,
    /// Jobs whose progress acks say "cancelled".
    cancel_by_ack: HashSet<String>,
    /// Jobs listed in heartbeat responses' cancel_job_ids.
    cancel_by_heartbeat: HashSet<String>,
    /// Answer this many CompleteJob calls with UNAVAILABLE first.
    complete_unavailable: u32,
    /// Answer the next heartbeat with reregister=true.
    ask_reregister: bool,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<State>>);

impl Fake {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.0.lock().unwrap())
    }

    async fn wait_until(&self, what: &str, timeout: Duration, cond: impl Fn(&State) -> bool) {
        let start = Instant::now();
        while !self.with(|s| cond(s)) {
            assert!(start.elapsed() < timeout, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tonic::async_trait]
impl ClusterService for Fake {
    async fn register(
        &self,
        r: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        self.with(|s| s.registers.push(r.into_inner()));
        Ok(Response::new(RegisterResponse {
            heartbeat_interval_ms: 50,
            lease_ms: 1000,
        }))
    }
    async fn heartbeat(
        &self,
        r: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let r = r.into_inner();
        let resp = self.with(|s| {
            let cancel = r
                .running_job_ids
                .iter()
                .filter(|id| s.cancel_by_heartbeat.contains(*id))
                .cloned()
                .collect();
            s.heartbeats.push(r);
            HeartbeatResponse {
                cancel_job_ids: cancel,
                reregister: std::mem::take(&mut s.ask_reregister),
            }
        });
        Ok(Response::new(resp))
    }
    async fn claim_job(
        &self,
        r: Request<ClaimJobRequest>,
    ) -> Result<Response<ClaimJobResponse>, Status> {
        let wait = Duration::from_millis(r.get_ref().wait_ms.min(100) as u64);
        let start = Instant::now();
        loop {
            if let Some(job) = self.with(|s| s.queue.pop_front()) {
                return Ok(Response::new(ClaimJobResponse { job: Some(job) }));
            }
            if start.elapsed() >= wait {
                return Ok(Response::new(ClaimJobResponse { job: None }));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    async fn report_progress(
        &self,
        r: Request<ProgressReport>,
    ) -> Result<Response<ProgressAck>, Status> {
        let r = r.into_inner();
        let cancelled = self.with(|s| {
            let c = s.cancel_by_ack.contains(&r.job_id);
            s.progress.push(r);
            c
        });
        Ok(Response::new(ProgressAck { cancelled }))
    }
    async fn complete_job(
        &self,
        r: Request<CompleteJobRequest>,
    ) -> Result<Response<CompleteJobResponse>, Status> {
        let r = r.into_inner();
        self.with(|s| {
            if s.complete_unavailable > 0 {
                s.complete_unavailable -= 1;
                return Err(Status::unavailable("redis down (test)"));
            }
            let accepted = !s.completed.iter().any(|c| c.job_id == r.job_id);
            s.completed.push(r);
            Ok(Response::new(CompleteJobResponse { accepted }))
        })
    }
    async fn fail_job(
        &self,
        r: Request<FailJobRequest>,
    ) -> Result<Response<FailJobResponse>, Status> {
        self.with(|s| s.failed.push(r.into_inner()));
        Ok(Response::new(FailJobResponse {}))
    }
    async fn release_job(
        &self,
        r: Request<ReleaseJobRequest>,
    ) -> Result<Response<ReleaseJobResponse>, Status> {
        self.with(|s| s.released.push(r.into_inner().job_id));
        Ok(Response::new(ReleaseJobResponse {}))
    }
    async fn deregister(
        &self,
        r: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        self.with(|s| s.deregistered.push(r.into_inner().worker_id));
        Ok(Response::new(DeregisterResponse {}))
    }
}

async fn start_fake_on(
    fake: Fake,
    listener: tokio::net::TcpListener,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(ClusterServiceServer::new(fake))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    })
}

async fn start_fake(fake: Fake) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    start_fake_on(fake, listener).await;
    addr
}

fn job(id: &str, index: u32, prompt: &str, params: RenderParams) -> ClaimedJob {
    ClaimedJob {
        job_id: id.into(),
        batch_id: "batch1".into(),
        index,
        model: "tiny".into(),
        prompt: prompt.into(),
        params: Some(params),
        name: String::new(),
        attempt: 1,
        no_resolution_binning: false,
    }
}

fn small(steps: u32, seed: u64) -> RenderParams {
    RenderParams {
        height: Some(32),
        width: Some(32),
        steps: Some(steps),
        seed: Some(seed),
        ..Default::default()
    }
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("relayfarm-worker-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn args(addr: &str, results: &std::path::Path, extra: &[&str]) -> WorkerArgs {
    use clap::Parser;
    let mut v: Vec<String> = [
        "relayfarm-worker",
        "--coordinator",
        addr,
        "--results",
        results.to_str().unwrap(),
        "--worker-id",
        "w-test",
        "--claim-wait-ms",
        "100",
        "--progress-interval-ms",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    WorkerArgs::try_parse_from(v).unwrap()
}

fn fixture_model() -> String {
    format!("tiny={FIXTURE}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renders_completes_and_fails_invalid_jobs() {
    let fake = Fake::default();
    let mut named = job("j3", 2, "a named one", small(2, 3));
    named.name = "cover".into();
    let mut invalid = job("j2", 1, "a cat", small(2, 2));
    invalid.no_resolution_binning = true;
    invalid.params.as_mut().unwrap().height = Some(50);
    fake.with(|s| {
        s.queue
            .push_back(job("j1", 0, "A red cabin, at night", small(2, 1)));
        s.queue.push_back(invalid);
        s.queue.push_back(named);
    });
    let addr = start_fake(fake.clone()).await;
    let results = temp_dir("complete");
    let model = fixture_model();
    let shutdown = Shutdown::new();
    let worker = tokio::spawn(serve(
        args(&addr.to_string(), &results, &["--model", &model]),
        shutdown.clone(),
    ));
    fake.wait_until(
        "2 completions and 1 failure",
        Duration::from_secs(60),
        |s| s.completed.len() == 2 && s.failed.len() == 1,
    )
    .await;
    // Heartbeats flow.
    fake.wait_until("heartbeats", Duration::from_secs(10), |s| {
        s.heartbeats.len() >= 2
    })
    .await;
    shutdown.graceful.cancel();
    worker.await.unwrap().unwrap();

    fake.with(|s| {
        let reg = &s.registers[0];
        assert_eq!(reg.worker_id, "w-test");
        assert_eq!(reg.models.len(), 1);
        assert_eq!(reg.models[0].name, "tiny");
        assert_eq!(reg.models[0].family, "pixart-sigma");
        assert_eq!(reg.devices[0].name, "cpu");

        let c1 = s.completed.iter().find(|c| c.job_id == "j1").unwrap();
        assert_eq!(c1.image_ref, "batch1/00000-a-red-cabin-at-night.png");
        assert_eq!((c1.width, c1.height, c1.seed), (32, 32, 1));
        let png = std::fs::read(results.join(&c1.image_ref)).unwrap();
        assert_eq!(png.len() as u64, c1.bytes);
        let text = relayfarm_worker::png_output::read_png_text(&png).unwrap();
        assert!(
            text.iter()
                .any(|(k, v)| k == "prompt" && v == "A red cabin, at night"),
            "{text:?}"
        );
        let c3 = s.completed.iter().find(|c| c.job_id == "j3").unwrap();
        assert_eq!(c3.image_ref, "batch1/00002-cover.png");
        assert!(results.join(&c3.image_ref).is_file());

        let f = &s.failed[0];
        assert_eq!(f.job_id, "j2");
        assert!(!f.retryable, "invalid input must not be retried");
        assert!(f.reason.contains("height"), "{}", f.reason);

        // Progress: the last step of each completed job was reported.
        for id in ["j1", "j3"] {
            let last = s.progress.iter().rfind(|p| p.job_id == id).unwrap();
            assert_eq!((last.step, last.total), (2, 2));
        }
        assert_eq!(s.deregistered, vec!["w-test".to_string()]);
        assert!(s.released.is_empty());
    });
    let _ = std::fs::remove_dir_all(results);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_by_ack_and_by_heartbeat() {
    let fake = Fake::default();
    fake.with(|s| {
        s.queue.push_back(job("ack", 0, "cat", small(1000, 1)));
        s.queue.push_back(job("hb", 1, "dog", small(1000, 2)));
        s.cancel_by_ack.insert("ack".into());
        s.cancel_by_heartbeat.insert("hb".into());
    });
    let addr = start_fake(fake.clone()).await;
    let results = temp_dir("cancel");
    let model = fixture_model();
    let shutdown = Shutdown::new();
    let started = Instant::now();
    let worker = tokio::spawn(serve(
        args(&addr.to_string(), &results, &["--model", &model]),
        shutdown.clone(),
    ));
    fake.wait_until("two cancelled failures", Duration::from_secs(60), |s| {
        s.failed.len() == 2
    })
    .await;
    let elapsed = started.elapsed();
    shutdown.graceful.cancel();
    worker.await.unwrap().unwrap();
    fake.with(|s| {
        for f in &s.failed {
            assert_eq!(f.reason, "cancelled");
            assert!(!f.retryable);
        }
        assert!(s.completed.is_empty());
        // Stopped well before 1000 steps.
        let max_step = s.progress.iter().map(|p| p.step).max().unwrap_or(0);
        assert!(max_step < 1000, "ran {max_step} steps");
    });
    eprintln!("both cancelled after {elapsed:?}");
    let _ = std::fs::remove_dir_all(results);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_releases_a_long_job() {
    let fake = Fake::default();
    fake.with(|s| s.queue.push_back(job("long", 0, "cat", small(1000, 1))));
    let addr = start_fake(fake.clone()).await;
    let results = temp_dir("release");
    let model = fixture_model();
    let shutdown = Shutdown::new();
    let worker = tokio::spawn(serve(
        args(
            &addr.to_string(),
            &results,
            &["--model", &model, "--shutdown-grace-ms", "200"],
        ),
        shutdown.clone(),
    ));
    fake.wait_until("progress", Duration::from_secs(30), |s| {
        !s.progress.is_empty()
    })
    .await;
    shutdown.graceful.cancel();
    tokio::time::timeout(Duration::from_secs(30), worker)
        .await
        .expect("worker stops after the grace period")
        .unwrap()
        .unwrap();
    fake.with(|s| {
        assert_eq!(s.released, vec!["long".to_string()]);
        assert!(s.completed.is_empty() && s.failed.is_empty());
        assert_eq!(s.deregistered, vec!["w-test".to_string()]);
    });
    let _ = std::fs::remove_dir_all(results);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_a_short_job_finish() {
    let fake = Fake::default();
    fake.with(|s| s.queue.push_back(job("short", 0, "cat", small(1000, 1))));
    let addr = start_fake(fake.clone()).await;
    let results = temp_dir("finish");
    let model = fixture_model();
    let shutdown = Shutdown::new();
    let worker = tokio::spawn(serve(
        args(
            &addr.to_string(),
            &results,
            &["--model", &model, "--shutdown-grace-ms", "120000"],
        ),
        shutdown.clone(),
    ));
    fake.wait_until("progress", Duration::from_secs(30), |s| {
        !s.progress.is_empty()
    })
    .await;
    shutdown.graceful.cancel();
    worker.await.unwrap().unwrap();
    fake.with(|s| {
        assert_eq!(s.completed.len(), 1, "the job in hand finished");
        assert!(s.released.is_empty());
    });
    let _ = std::fs::remove_dir_all(results);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_down_at_start_and_while_completing() {
    // Reserve a port, free it, start the worker against it, then bring the coordinator up.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let fake = Fake::default();
    fake.with(|s| {
        s.queue.push_back(job("n1", 0, "cat", small(3, 1)));
        s.complete_unavailable = 3;
        s.ask_reregister = true;
    });
    let results = temp_dir("down");
    let shutdown = Shutdown::new();
    let worker = tokio::spawn(serve(
        args(&addr, &results, &["--noop", "--model", "tiny"]),
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!worker.is_finished());
    let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
    start_fake_on(fake.clone(), listener).await;
    fake.wait_until("completion", Duration::from_secs(30), |s| {
        s.completed.len() == 1
    })
    .await;
    // reregister=true in a heartbeat answer → a second Register.
    fake.wait_until("re-registration", Duration::from_secs(10), |s| {
        s.registers.len() >= 2
    })
    .await;
    shutdown.graceful.cancel();
    worker.await.unwrap().unwrap();
    fake.with(|s| {
        let c = &s.completed[0];
        assert_eq!(c.image_ref, "batch1/00000-cat.png");
        assert!(results.join(&c.image_ref).is_file());
        assert_eq!(s.complete_unavailable, 0, "CompleteJob was retried");
        assert_eq!(s.registers[0].models[0].name, "tiny");
        let last = s.progress.last().unwrap();
        assert_eq!((last.step, last.total), (3, 3));
    });
    let _ = std::fs::remove_dir_all(results);
}
