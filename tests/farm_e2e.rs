//! End-to-end tests of the farm: real `redis-server`, `relayfarm-coordinator` and
//! `relayfarm-worker` processes on 127.0.0.1, driven through the public gRPC API.
//!
//! Needs `redis-server` on the PATH (CI installs it). Every process a test starts is stopped by
//! PID when the test ends.

use relayfarm_proto::v1::render_service_client::RenderServiceClient;
use relayfarm_proto::v1::{
    batch_event, submit_batch_request, BatchHeader, GetBatchRequest, ListModelsRequest, PromptItem,
    RenderParams, SubmitBatchRequest, WatchBatchRequest,
};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

mod common;
use common::{free_port, tiny_model, wait_listening, Proc};

/// One farm: Redis, a coordinator, workers; all on loopback, in a temp folder.
struct Farm {
    dir: PathBuf,
    redis_port: u16,
    coord_port: u16,
    redis: Option<Proc>,
    coordinator: Option<Proc>,
    workers: Vec<Proc>,
    lease_ms: u64,
}

impl Farm {
    fn new(name: &str) -> Farm {
        let dir = std::env::temp_dir().join(format!("relayfarm-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("results")).unwrap();
        Farm {
            dir,
            redis_port: free_port(),
            coord_port: free_port(),
            redis: None,
            coordinator: None,
            workers: Vec::new(),
            lease_ms: 2000,
        }
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
                self.redis = Some(p);
                return;
            }
            if self.coordinator.is_some() {
                // The coordinator already knows this port: retry it.
                std::thread::sleep(Duration::from_millis(300));
            } else {
                self.redis_port = free_port();
            }
        }
        panic!("redis-server did not start; see {}", self.dir.display());
    }

    /// Starts a coordinator on `coord_port`. A first start may move to another port if that one
    /// was taken meanwhile; a restart keeps the port (the workers know it) and retries.
    fn start_coordinator(&mut self) {
        let restart = self.coordinator.is_some();
        for attempt in 0..5 {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_relayfarm-coordinator"));
            cmd.args([
                "--listen",
                &format!("127.0.0.1:{}", self.coord_port),
                "--redis",
                &format!("redis://127.0.0.1:{}", self.redis_port),
                "--results",
                self.dir.join("results").to_str().unwrap(),
                "--lease-ms",
                &self.lease_ms.to_string(),
                "--max-attempts",
                "3",
            ]);
            let n = std::fs::read_dir(&self.dir).map(|d| d.count()).unwrap_or(0);
            let mut p = Proc::spawn(
                "coordinator",
                &mut cmd,
                &self.dir.join(format!("coordinator-{n}.log")),
            );
            if wait_listening(&mut p, self.coord_port) {
                self.coordinator = Some(p);
                return;
            }
            if restart {
                std::thread::sleep(Duration::from_millis(200 * (attempt + 1)));
            } else {
                self.coord_port = free_port();
            }
        }
        panic!(
            "relayfarm-coordinator did not start; see {}",
            self.dir.display()
        );
    }

    fn start_worker(&mut self) {
        self.start_worker_with(&[("tiny", tiny_model())]);
    }

    /// Starts a worker serving `models` (name, folder).
    fn start_worker_with(&mut self, models: &[(&str, PathBuf)]) {
        let i = self.workers.len();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_relayfarm-worker"));
        for (name, dir) in models {
            cmd.args(["--model", &format!("{name}={}", dir.display())]);
        }
        cmd.args([
            "--coordinator",
            &format!("http://127.0.0.1:{}", self.coord_port),
            "--results",
            self.dir.join("results").to_str().unwrap(),
            "--worker-id",
            &format!("w{i}"),
        ]);
        cmd.env("RAYON_NUM_THREADS", "1");
        self.workers.push(Proc::spawn(
            &format!("worker-{i}"),
            &mut cmd,
            &self.dir.join(format!("worker-{i}.log")),
        ));
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

    /// Waits until `n` workers serve the tiny model.
    async fn wait_workers(&self, n: u32) {
        let t0 = Instant::now();
        loop {
            let mut c = self.client().await;
            if let Ok(r) = c.list_models(ListModelsRequest {}).await {
                if r.into_inner()
                    .models
                    .iter()
                    .any(|m| m.name == "tiny" && m.workers >= n)
                {
                    return;
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "workers did not register; logs in {}",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
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
}

fn header(steps: u32) -> SubmitBatchRequest {
    SubmitBatchRequest {
        item: Some(submit_batch_request::Item::Header(BatchHeader {
            model: "tiny".into(),
            defaults: Some(RenderParams {
                steps: Some(steps),
                height: Some(64),
                width: Some(64),
                seed: Some(1000),
                ..Default::default()
            }),
            no_resolution_binning: true,
            ..Default::default()
        })),
    }
}

fn prompt(text: &str) -> SubmitBatchRequest {
    SubmitBatchRequest {
        item: Some(submit_batch_request::Item::Prompt(PromptItem {
            prompt: text.into(),
            ..Default::default()
        })),
    }
}

async fn submit(
    c: &mut RenderServiceClient<Channel>,
    items: Vec<SubmitBatchRequest>,
) -> Result<String, tonic::Status> {
    let r = c.submit_batch(tokio_stream::iter(items)).await?;
    Ok(r.into_inner().batch_id)
}

/// Waits for the batch to finish, then replays its whole event history and checks that every
/// job produced exactly one image.
async fn check_exactly_once(farm: &Farm, batch: &str, n: usize) {
    let t0 = Instant::now();
    loop {
        let mut c = farm.client().await;
        if let Ok(b) = c
            .get_batch(GetBatchRequest {
                batch_id: batch.into(),
                include_jobs: false,
            })
            .await
        {
            let b = b.into_inner();
            if b.done + b.failed + b.cancelled == b.total && b.total > 0 {
                assert_eq!((b.done, b.failed), (n as u32, 0), "batch {b:?}");
                break;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(240),
            "batch did not finish; logs in {}",
            farm.dir.display()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
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
    let mut done = false;
    loop {
        let next = tokio::time::timeout(Duration::from_secs(20), events.message()).await;
        let ev = match next {
            Ok(Ok(Some(ev))) => ev,
            _ => break,
        };
        match ev.kind {
            Some(batch_event::Kind::Image(_)) => *images.entry(ev.job_id.clone()).or_default() += 1,
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
}

fn prompts(n: usize) -> Vec<SubmitBatchRequest> {
    let mut v = vec![header(40)];
    v.extend((0..n).map(|i| prompt(&format!("prompt number {i}: a cabin in the woods"))));
    v
}

async fn wait_images(farm: &Farm, batch: &str, at_least: usize) {
    let t0 = Instant::now();
    while farm.pngs(batch) < at_least {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no progress; logs in {}",
            farm.dir.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_a_worker_mid_batch_loses_nothing() {
    let mut farm = Farm::new("kill-worker");
    farm.start_redis();
    farm.start_coordinator();
    farm.start_worker();
    farm.start_worker();
    farm.wait_workers(2).await;
    let mut c = farm.client().await;
    let batch = submit(&mut c, prompts(50)).await.unwrap();
    wait_images(&farm, &batch, 8).await;
    farm.workers[0].kill();
    check_exactly_once(&farm, &batch, 50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_the_coordinator_mid_batch_loses_nothing() {
    let mut farm = Farm::new("restart-coord");
    farm.start_redis();
    farm.start_coordinator();
    farm.start_worker();
    farm.start_worker();
    farm.wait_workers(2).await;
    let mut c = farm.client().await;
    let batch = submit(&mut c, prompts(50)).await.unwrap();
    wait_images(&farm, &batch, 8).await;
    if let Some(p) = farm.coordinator.as_mut() {
        p.kill(); // stays Some(Proc) with no child: the next start is a restart on the same port
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    farm.start_coordinator();
    check_exactly_once(&farm, &batch, 50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unreachable_is_unavailable_and_retry_works() {
    let mut farm = Farm::new("no-redis");
    // Coordinator first, Redis not running yet.
    farm.start_coordinator();
    let mut c = farm.client().await;
    let err = submit(&mut c, prompts(3)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().to_lowercase().contains("redis"),
        "message names Redis: {}",
        err.message()
    );
    // The coordinator is still alive; once Redis is up the same submit goes through.
    farm.start_redis();
    farm.start_worker();
    farm.wait_workers(1).await;
    let batch = submit(&mut c, prompts(3)).await.unwrap();
    check_exactly_once(&farm, &batch, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_invalid_argument_naming_the_field() {
    let mut farm = Farm::new("malformed");
    farm.start_redis();
    farm.start_coordinator();
    farm.start_worker();
    farm.wait_workers(1).await;
    let mut c = farm.client().await;
    let with = |f: &dyn Fn(&mut BatchHeader, &mut PromptItem)| {
        let mut h = BatchHeader {
            model: "tiny".into(),
            no_resolution_binning: true,
            ..Default::default()
        };
        let mut p = PromptItem {
            prompt: "a cat".into(),
            ..Default::default()
        };
        f(&mut h, &mut p);
        vec![
            SubmitBatchRequest {
                item: Some(submit_batch_request::Item::Header(h)),
            },
            SubmitBatchRequest {
                item: Some(submit_batch_request::Item::Prompt(p)),
            },
        ]
    };
    let cases: Vec<(&str, Vec<SubmitBatchRequest>, &str)> = vec![
        ("empty model", with(&|h, _| h.model.clear()), "model"),
        (
            "unknown model",
            with(&|h, _| h.model = "flux".into()),
            "model",
        ),
        (
            "empty prompt",
            with(&|_, p| p.prompt = "   ".into()),
            "prompt",
        ),
        (
            "height not a multiple",
            with(&|_, p| {
                p.params = Some(RenderParams {
                    height: Some(50),
                    ..Default::default()
                })
            }),
            "height",
        ),
        (
            "zero width",
            with(&|_, p| {
                p.params = Some(RenderParams {
                    width: Some(0),
                    ..Default::default()
                })
            }),
            "width",
        ),
        (
            "huge height",
            with(&|_, p| {
                p.params = Some(RenderParams {
                    height: Some(1 << 20),
                    ..Default::default()
                })
            }),
            "height",
        ),
        (
            "zero steps",
            with(&|_, p| {
                p.params = Some(RenderParams {
                    steps: Some(0),
                    ..Default::default()
                })
            }),
            "steps",
        ),
        (
            "too many steps",
            with(&|_, p| {
                p.params = Some(RenderParams {
                    steps: Some(5000),
                    ..Default::default()
                })
            }),
            "steps",
        ),
        (
            "NaN guidance",
            with(&|_, p| {
                p.params = Some(RenderParams {
                    guidance: Some(f64::NAN),
                    ..Default::default()
                })
            }),
            "guidance",
        ),
        (
            "negative guidance",
            with(&|_, p| {
                p.params = Some(RenderParams {
                    guidance: Some(-1.0),
                    ..Default::default()
                })
            }),
            "guidance",
        ),
        (
            "bad default steps",
            with(&|h, _| {
                h.defaults = Some(RenderParams {
                    steps: Some(0),
                    ..Default::default()
                })
            }),
            "steps",
        ),
        ("no header", vec![prompt("a cat")], "header"),
        ("no prompts", vec![header(3)], "prompt"),
    ];
    for (what, items, field) in cases {
        let err = submit(&mut c, items).await.expect_err(what);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}: {err:?}");
        assert!(
            err.message().contains(field),
            "{what}: message should name `{field}`: {}",
            err.message()
        );
    }
}

#[test]
fn worker_stops_cleanly_on_sigterm() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut farm = Farm::new("sigterm");
    farm.start_redis();
    farm.start_coordinator();
    farm.start_worker();
    rt.block_on(farm.wait_workers(1));
    let status = farm.workers[0].terminate(Duration::from_secs(30));
    assert!(
        matches!(status, Some(s) if s.success()),
        "worker exit on SIGTERM: {status:?}"
    );
}

/// A worker serves every model family; each farm image equals the embedded `relayfarm render`
/// of the same prompt, seed, size and steps, pixel for pixel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_family_is_served_and_matches_the_embedded_render() {
    let fixtures = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"));
    let models = [
        ("pixart", fixtures.join("pixart-sigma-tiny"), "pixart-sigma"),
        (
            "cogview3",
            fixtures.join("cogview3-plus-tiny"),
            "cogview3-plus",
        ),
        ("kolors", fixtures.join("kolors-tiny"), "kolors"),
    ];
    let mut farm = Farm::new("families");
    farm.start_redis();
    farm.start_coordinator();
    let served: Vec<(&str, PathBuf)> = models.iter().map(|(n, d, _)| (*n, d.clone())).collect();
    farm.start_worker_with(&served);
    let t0 = Instant::now();
    loop {
        let mut c = farm.client().await;
        let listed = c
            .list_models(ListModelsRequest {})
            .await
            .map(|r| r.into_inner().models)
            .unwrap_or_default();
        let all = models.iter().all(|(name, _, family)| {
            listed
                .iter()
                .any(|m| m.name == *name && m.family == *family && m.workers >= 1)
        });
        if all {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "models not registered ({listed:?}); logs in {}",
            farm.dir.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (name, dir, _) in &models {
        let text = format!("a lighthouse at dusk, painted for {name}");
        let items = vec![
            SubmitBatchRequest {
                item: Some(submit_batch_request::Item::Header(BatchHeader {
                    model: name.to_string(),
                    defaults: Some(RenderParams {
                        steps: Some(2),
                        height: Some(64),
                        width: Some(64),
                        seed: Some(7),
                        ..Default::default()
                    }),
                    no_resolution_binning: true,
                    ..Default::default()
                })),
            },
            prompt(&text),
        ];
        let mut c = farm.client().await;
        let batch = submit(&mut c, items).await.unwrap();
        check_exactly_once(&farm, &batch, 1).await;
        let farm_png = std::fs::read_dir(farm.dir.join("results").join(&batch))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "png"))
            .unwrap();
        let local = farm.dir.join(format!("{name}-embedded.png"));
        let out = Command::new(env!("CARGO_BIN_EXE_relayfarm"))
            .args([
                "render",
                "--model",
                dir.to_str().unwrap(),
                "--prompt",
                &text,
                "--steps",
                "2",
                "--height",
                "64",
                "--width",
                "64",
                "--seed",
                "7",
                "--no-resolution-binning",
                "--quiet",
                "--output",
                local.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let a = image::open(&farm_png).unwrap().to_rgb8();
        let b = image::open(&local).unwrap().to_rgb8();
        assert_eq!(a.dimensions(), (64, 64));
        assert!(
            a == b,
            "{name}: the farm's image differs from the embedded render"
        );
    }
}

/// A `--replica` worker pointed at a coordinator that runs without `--replica-layout` is a
/// configuration error: it exits non-zero with a message naming the fix, instead of retrying.
#[test]
fn a_replica_worker_without_a_replica_coordinator_exits_with_the_fix() {
    let mut farm = Farm::new("no-layout");
    farm.start_redis();
    farm.start_coordinator();
    let log = farm.dir.join("replica-worker.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_relayfarm-worker"))
        .args([
            "--coordinator",
            &farm.url(),
            "--model",
            &format!("tiny={}", tiny_model().display()),
            "--results",
            farm.dir.join("results").to_str().unwrap(),
            "--replica",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the worker kept running; log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "exit status {status}; log: {text}");
    assert!(text.contains("--replica-layout"), "log: {text}");
}
