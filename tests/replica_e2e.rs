//! End-to-end tests of multi-process replicas: real `redis-server`, a coordinator with
//! `--replica-layout text-encoder=1,denoiser=2,vae=1`, and four `relayfarm-worker --replica`
//! processes (text encoder, two tensor-parallel denoiser ranks, VAE) joined by gRPC stage links
//! and a TCP collective, on 127.0.0.1.
//!
//! Needs `redis-server` on the PATH. Every process a test starts is stopped by PID when the
//! test ends.

use relayfarm_proto::v1::render_service_client::RenderServiceClient;
use relayfarm_proto::v1::{
    batch_event, submit_batch_request, BatchHeader, GetBatchRequest, JobInfo, PromptItem,
    RenderParams, SubmitBatchRequest, WatchBatchRequest,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const LAYOUT: &str = "text-encoder=1,denoiser=2,vae=1";

mod common;
use common::{free_port, tiny_model, wait_listening, Proc};

/// Redis, a coordinator with replicas on, replica workers; all on loopback, in a temp folder.
struct Farm {
    dir: PathBuf,
    redis_port: u16,
    coord_port: u16,
    _redis: Option<Proc>,
    _coordinator: Option<Proc>,
    workers: HashMap<String, Proc>,
}

impl Farm {
    fn new(name: &str) -> Farm {
        let dir =
            std::env::temp_dir().join(format!("relayfarm-replica-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("results")).unwrap();
        let mut farm = Farm {
            dir,
            redis_port: free_port(),
            coord_port: free_port(),
            _redis: None,
            _coordinator: None,
            workers: HashMap::new(),
        };
        farm.start_redis();
        farm.start_coordinator();
        farm
    }

    fn start_redis(&mut self) {
        for _ in 0..5 {
            let mut cmd = Command::new("redis-server");
            cmd.args([
                "--port",
                &self.redis_port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ]);
            let mut p = Proc::spawn("redis-server", &mut cmd, &self.dir.join("redis.log"));
            if wait_listening(&mut p, self.redis_port) {
                self._redis = Some(p);
                return;
            }
            self.redis_port = free_port();
        }
        panic!("redis-server did not start; see {}", self.dir.display());
    }

    fn start_coordinator(&mut self) {
        for _ in 0..5 {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_relayfarm-coordinator"));
            cmd.args([
                "--listen",
                &format!("127.0.0.1:{}", self.coord_port),
                "--redis",
                &format!("redis://127.0.0.1:{}", self.redis_port),
                "--results",
                self.dir.join("results").to_str().unwrap(),
                "--lease-ms",
                "2000",
                "--max-attempts",
                "5",
                "--replica-layout",
                LAYOUT,
            ]);
            let mut p = Proc::spawn("coordinator", &mut cmd, &self.dir.join("coordinator.log"));
            if wait_listening(&mut p, self.coord_port) {
                self._coordinator = Some(p);
                return;
            }
            self.coord_port = free_port();
        }
        panic!(
            "relayfarm-coordinator did not start; see {}",
            self.dir.display()
        );
    }

    /// Starts a replica worker `id` and waits until it has joined the replica pool (so that
    /// workers started one after the other take the stages in order).
    fn start_worker(&mut self, id: &str) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_relayfarm-worker"));
        cmd.args([
            "--coordinator",
            &format!("http://127.0.0.1:{}", self.coord_port),
            "--model",
            &format!("tiny={}", tiny_model().display()),
            "--results",
            self.dir.join("results").to_str().unwrap(),
            "--worker-id",
            id,
            "--replica",
            "--link-listen",
            "127.0.0.1:0",
        ]);
        cmd.env("RAYON_NUM_THREADS", "1");
        let p = Proc::spawn(
            &format!("worker-{id}"),
            &mut cmd,
            &self.dir.join(format!("worker-{id}.log")),
        );
        let t0 = Instant::now();
        while !p.log_text().contains("joined the replica pool") {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "worker {id} did not join; logs in {}",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.workers.insert(id.to_string(), p);
    }

    /// Waits until worker `id` runs `stage` (from its log).
    fn wait_stage(&self, id: &str, stage: &str, count: usize) {
        let t0 = Instant::now();
        let needle = format!("stage={stage}");
        loop {
            let log = self.workers[id].log_text();
            let n = log
                .lines()
                .filter(|l| l.contains("starting the stage") && l.contains(&needle))
                .count();
            if n >= count {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "worker {id} never started the {stage} stage; logs in {}",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.coord_port)
    }

    async fn client(&self) -> RenderServiceClient<Channel> {
        let t0 = Instant::now();
        loop {
            match RenderServiceClient::connect(self.url()).await {
                Ok(c) => return c,
                Err(e) if t0.elapsed() > Duration::from_secs(30) => {
                    panic!("coordinator unreachable: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    fn pngs(&self, batch: &str) -> usize {
        std::fs::read_dir(self.dir.join("results").join(batch))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".png"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Starts the four members in stage order and waits until the replica runs.
    fn start_replica(&mut self) {
        for id in ["te", "d0", "d1", "vae"] {
            self.start_worker(id);
        }
        self.wait_stage("te", "text-encoder", 1);
        self.wait_stage("d0", "denoiser", 1);
        self.wait_stage("d1", "denoiser", 1);
        self.wait_stage("vae", "vae", 1);
    }
}

/// A batch of `n` prompts: `size`², `steps` steps, seeds 500 + index, no binning.
fn batch(n: usize, size: u32, steps: u32) -> Vec<SubmitBatchRequest> {
    let mut v = vec![SubmitBatchRequest {
        item: Some(submit_batch_request::Item::Header(BatchHeader {
            model: "tiny".into(),
            defaults: Some(RenderParams {
                steps: Some(steps),
                height: Some(size),
                width: Some(size),
                seed: Some(500),
                ..Default::default()
            }),
            no_resolution_binning: true,
            ..Default::default()
        })),
    }];
    v.extend((0..n).map(|i| SubmitBatchRequest {
        item: Some(submit_batch_request::Item::Prompt(PromptItem {
            prompt: format!("replica prompt {i}: a lighthouse at dusk"),
            ..Default::default()
        })),
    }));
    v
}

/// Waits until the batch is finished; returns its jobs.
async fn wait_batch(farm: &Farm, batch: &str, n: usize) -> Vec<JobInfo> {
    let t0 = Instant::now();
    loop {
        let mut c = farm.client().await;
        if let Ok(b) = c
            .get_batch(GetBatchRequest {
                batch_id: batch.into(),
                include_jobs: true,
            })
            .await
        {
            let b = b.into_inner();
            if b.done + b.failed + b.cancelled == b.total && b.total > 0 {
                assert_eq!(
                    (b.done, b.failed, b.cancelled),
                    (n as u32, 0, 0),
                    "batch {:?}; logs in {}",
                    (b.total, b.done, b.failed),
                    farm.dir.display()
                );
                return b.jobs;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(240),
            "batch did not finish; logs in {}",
            farm.dir.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every job has exactly one ImageReady event and a PNG; returns the step-progress events
/// seen per job.
async fn check_exactly_once(farm: &Farm, batch: &str, n: usize) -> HashMap<String, usize> {
    let mut c = farm.client().await;
    let mut events = c
        .watch_batch(WatchBatchRequest {
            batch_id: batch.into(),
            after_event_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut images: HashMap<String, usize> = HashMap::new();
    let mut steps: HashMap<String, usize> = HashMap::new();
    let mut done = false;
    while let Ok(Ok(Some(ev))) =
        tokio::time::timeout(Duration::from_secs(20), events.message()).await
    {
        match ev.kind {
            Some(batch_event::Kind::Image(_)) => *images.entry(ev.job_id.clone()).or_default() += 1,
            Some(batch_event::Kind::Step(_)) => *steps.entry(ev.job_id.clone()).or_default() += 1,
            Some(batch_event::Kind::Done(_)) => {
                done = true;
                break;
            }
            _ => {}
        }
    }
    assert!(done, "no BatchDone event");
    assert_eq!(images.len(), n, "distinct jobs with an image");
    assert!(
        images.values().all(|&k| k == 1),
        "an image reported twice: {images:?}"
    );
    assert_eq!(farm.pngs(batch), n, "PNG files in the result store");
    steps
}

fn rgb(path: &Path) -> (u32, u32, Vec<u8>) {
    let img = image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8();
    (img.width(), img.height(), img.into_raw())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_renders_what_the_embedded_run_renders() {
    let mut farm = Farm::new("equal");
    farm.start_replica();
    let mut c = farm.client().await;
    let n = 6;
    let batch_id = c
        .submit_batch(tokio_stream::iter(batch(n, 32, 3)))
        .await
        .unwrap()
        .into_inner()
        .batch_id;
    let jobs = wait_batch(&farm, &batch_id, n).await;
    let steps = check_exactly_once(&farm, &batch_id, n).await;
    assert_eq!(jobs.len(), n);
    // The denoiser reports step progress for the head, at least the last step of each job.
    assert_eq!(steps.len(), n, "jobs with step progress: {steps:?}");
    let embedded = farm.dir.join("embedded");
    std::fs::create_dir_all(&embedded).unwrap();
    let mut worst = 0i32;
    let (mut differing, mut total) = (0usize, 0usize);
    for job in &jobs {
        let out = embedded.join(format!("{}.png", job.index));
        let seed = 500 + u64::from(job.index);
        let st = Command::new(env!("CARGO_BIN_EXE_relayfarm"))
            .args([
                "render",
                "--model",
                tiny_model().to_str().unwrap(),
                "--prompt",
                &job.prompt,
                "--seed",
                &seed.to_string(),
                "--height",
                "32",
                "--width",
                "32",
                "--steps",
                "3",
                "--no-resolution-binning",
                "--quiet",
                "--output",
                out.to_str().unwrap(),
            ])
            .env("RUST_LOG", "warn")
            .status()
            .unwrap();
        assert!(
            st.success(),
            "relayfarm render failed for job {}",
            job.index
        );
        let (w0, h0, want) = rgb(&out);
        let (w1, h1, got) = rgb(&farm.dir.join("results").join(&job.image_ref));
        assert_eq!((w0, h0), (w1, h1));
        assert_eq!((w1, h1), (32, 32));
        let diff = want
            .iter()
            .zip(&got)
            .map(|(a, b)| (i32::from(*a) - i32::from(*b)).abs())
            .max()
            .unwrap_or(0);
        worst = worst.max(diff);
        differing += want.iter().zip(&got).filter(|(a, b)| a != b).count();
        total += want.len();
    }
    eprintln!(
        "largest pixel difference replica vs embedded: {worst} ({differing} of {total} channel values differ)"
    );
    assert!(worst <= 1, "pixels differ by up to {worst} levels");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_vae_worker_mid_batch_loses_no_job() {
    let mut farm = Farm::new("kill-vae");
    farm.start_replica();
    let mut c = farm.client().await;
    let n = 24;
    let batch_id = c
        .submit_batch(tokio_stream::iter(batch(n, 64, 40)))
        .await
        .unwrap()
        .into_inner()
        .batch_id;
    let t0 = Instant::now();
    while farm.pngs(&batch_id) < 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no image; logs in {}",
            farm.dir.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(p) = farm.workers.get_mut("vae") {
        p.kill();
    }
    let at_kill = farm.pngs(&batch_id);
    eprintln!("killed the VAE worker after {at_kill} of {n} images");
    assert!(at_kill < n, "the batch finished before the kill");
    farm.start_worker("vae2");
    farm.wait_stage("vae2", "vae", 1);
    farm.wait_stage("te", "text-encoder", 2);
    wait_batch(&farm, &batch_id, n).await;
    check_exactly_once(&farm, &batch_id, n).await;
}

/// Cancelling a batch stops the replica's running jobs at a step boundary (the denoiser learns
/// of it from its progress reports) and drops the queued ones; nothing fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_stops_running_replica_jobs() {
    use relayfarm_proto::v1::CancelBatchRequest;
    let mut farm = Farm::new("cancel");
    farm.start_replica();
    let mut c = farm.client().await;
    let n = 6;
    // Long jobs: they cannot finish by themselves within the test's time.
    let batch_id = c
        .submit_batch(tokio_stream::iter(batch(n, 64, 1000)))
        .await
        .unwrap()
        .into_inner()
        .batch_id;
    let mut events = c
        .watch_batch(WatchBatchRequest {
            batch_id: batch_id.clone(),
            after_event_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let t0 = Instant::now();
    let running = loop {
        let ev = tokio::time::timeout(Duration::from_secs(60), events.message())
            .await
            .expect("no event")
            .unwrap()
            .expect("stream ended");
        if let Some(batch_event::Kind::Step(p)) = ev.kind {
            assert!(p.step < p.total);
            break ev.job_id;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "no step progress");
    };
    c.cancel_batch(CancelBatchRequest {
        batch_id: batch_id.clone(),
    })
    .await
    .unwrap();
    let cancelled_at = Instant::now();
    let mut cancelled = Vec::new();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(60), events.message())
            .await
            .expect("no event after the cancel")
            .unwrap()
            .expect("stream ended");
        match ev.kind {
            Some(batch_event::Kind::Cancelled(_)) => cancelled.push(ev.job_id),
            Some(batch_event::Kind::Failed(f)) => panic!("job {} failed: {}", ev.job_id, f.reason),
            Some(batch_event::Kind::Image(_)) => {
                panic!("job {} finished after the cancel", ev.job_id)
            }
            Some(batch_event::Kind::Done(d)) => {
                assert_eq!((d.done, d.failed, d.cancelled), (0, 0, n as u32));
                break;
            }
            _ => {}
        }
    }
    assert!(
        cancelled.contains(&running),
        "the running job {running} was not cancelled"
    );
    eprintln!(
        "batch cancelled {:.2} s after the request",
        cancelled_at.elapsed().as_secs_f64()
    );
}
