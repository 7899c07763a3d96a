//! Farm benchmark (no rendering): a `redis-server` on a free port and an in-process
//! coordinator; then
//!
//! 1. submit 100,000 prompts in one client-streaming `SubmitBatch` — seconds, and this
//!    process's RSS (coordinator + client) before/after/peak, plus redis-server's RSS;
//! 2. enqueue→claim latency on loopback: a claimer long-polls `ClaimJob` while single-prompt
//!    batches are submitted one after another (N = 1000) — p50/p99 of (claim received −
//!    submit started), and of the submit round trip alone.
//!
//! Prints JSON lines. `cargo bench -p relayfarm-coordinator --bench farm_submit`.
//! Sizes: `RELAYFARM_BENCH_PROMPTS` (default 100000), `RELAYFARM_BENCH_LATENCY_N` (1000).

use relayfarm_coordinator::testkit::{test_args, InProcessCoordinator, RedisServer};
use relayfarm_proto::v1::cluster_service_client::ClusterServiceClient;
use relayfarm_proto::v1::render_service_client::RenderServiceClient;
use relayfarm_proto::v1::{
    submit_batch_request::Item, BatchHeader, ClaimJobRequest, ModelInfo, PromptItem,
    RegisterRequest, SizeRules, SubmitBatchRequest,
};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

fn status_kb(path: &str, field: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn mb(kb: u64) -> f64 {
    (kb as f64 / 1024.0 * 10.0).round() / 10.0
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn model(name: &str) -> ModelInfo {
    ModelInfo {
        name: name.into(),
        family: "pixart-sigma".into(),
        pipeline_class: "PixArtSigmaPipeline".into(),
        size: Some(SizeRules {
            min_side: 1,
            max_side: 8192,
            multiple: 16,
            max_area: 0,
            default_height: 1024,
            default_width: 1024,
            resolution_binning: true,
        }),
        default_steps: 20,
        default_guidance: 4.5,
        max_steps: 1000,
        workers: 0,
        scheduler: "DPMSolverMultistepScheduler".into(),
    }
}

fn header(model: &str) -> SubmitBatchRequest {
    SubmitBatchRequest {
        item: Some(Item::Header(BatchHeader {
            model: model.into(),
            ..Default::default()
        })),
    }
}

fn prompt(i: usize) -> SubmitBatchRequest {
    SubmitBatchRequest {
        item: Some(Item::Prompt(PromptItem {
            prompt: format!("a watercolor painting of a lighthouse at dusk, variation {i}"),
            params: None,
            name: String::new(),
        })),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> anyhow::Result<()> {
    let prompts = env_usize("RELAYFARM_BENCH_PROMPTS", 100_000);
    let latency_n = env_usize("RELAYFARM_BENCH_LATENCY_N", 1000);
    let redis = RedisServer::start()?;
    let redis_status = format!("/proc/{}/status", redis.pid().unwrap_or(0));
    let results = std::env::temp_dir().join(format!("rf-bench-{}", std::process::id()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let coord =
            InProcessCoordinator::start(test_args(&redis.url(), results.clone(), 10_000, 3))
                .await?;
        // Wait for the background Redis connection.
        let ch = loop {
            if let Ok(ch) = Channel::from_shared(coord.url())?.connect().await {
                break ch;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut render = RenderServiceClient::new(ch.clone());
        let mut cluster = ClusterServiceClient::new(ch.clone());
        loop {
            let r = cluster
                .register(RegisterRequest {
                    worker_id: "bench-worker".into(),
                    hostname: "bench".into(),
                    devices: vec![],
                    models: vec![model("bench"), model("latency")],
                })
                .await;
            if r.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // 1. Submission of a large batch.
        let rss_before = status_kb("/proc/self/status", "VmRSS:");
        let redis_before = status_kb(&redis_status, "VmRSS:");
        let msgs = std::iter::once(header("bench")).chain((0..prompts).map(prompt));
        let t = Instant::now();
        let resp = render
            .submit_batch(tokio_stream::iter(msgs))
            .await?
            .into_inner();
        let secs = t.elapsed().as_secs_f64();
        let rss_after = status_kb("/proc/self/status", "VmRSS:");
        let rss_peak = status_kb("/proc/self/status", "VmHWM:");
        let redis_after = status_kb(&redis_status, "VmRSS:");
        println!(
            "{}",
            serde_json::json!({
                "bench": "submit",
                "prompts": resp.accepted,
                "seconds": (secs * 1000.0).round() / 1000.0,
                "prompts_per_s": (f64::from(resp.accepted) / secs).round(),
                "process_rss_mb_before": mb(rss_before),
                "process_rss_mb_after": mb(rss_after),
                "process_rss_mb_peak": mb(rss_peak),
                "redis_rss_mb_before": mb(redis_before),
                "redis_rss_mb_after": mb(redis_after),
                "note": "in-process coordinator + client; RSS from /proc/self/status",
            })
        );

        // 2. Enqueue→claim latency: a claimer long-polls a separate model's stream.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        let mut claimer = ClusterServiceClient::new(ch.clone());
        let claim_task = tokio::spawn(async move {
            let mut got = 0;
            while got < latency_n {
                let r = claimer
                    .claim_job(ClaimJobRequest {
                        worker_id: "bench-worker".into(),
                        models: vec!["latency".into()],
                        wait_ms: 5000,
                    })
                    .await;
                if let Ok(r) = r {
                    if r.into_inner().job.is_some() {
                        got += 1;
                        if tx.send(Instant::now()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        // Let the claimer block first.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut e2c = Vec::with_capacity(latency_n);
        let mut rtt = Vec::with_capacity(latency_n);
        for i in 0..latency_n {
            let t0 = Instant::now();
            render
                .submit_batch(tokio_stream::iter(vec![header("latency"), prompt(i)]))
                .await?;
            rtt.push(t0.elapsed().as_secs_f64() * 1000.0);
            let Some(t1) = rx.recv().await else { break };
            e2c.push(t1.duration_since(t0).as_secs_f64() * 1000.0);
        }
        claim_task.abort();
        e2c.sort_by(|a, b| a.total_cmp(b));
        rtt.sort_by(|a, b| a.total_cmp(b));
        let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
        println!(
            "{}",
            serde_json::json!({
                "bench": "enqueue_to_claim",
                "n": e2c.len(),
                "p50_ms": r3(percentile(&e2c, 0.50)),
                "p99_ms": r3(percentile(&e2c, 0.99)),
                "max_ms": r3(percentile(&e2c, 1.0)),
                "submit_rtt_p50_ms": r3(percentile(&rtt, 0.50)),
                "submit_rtt_p99_ms": r3(percentile(&rtt, 0.99)),
                "note": "claim received minus SubmitBatch start; claimer long-polling ClaimJob",
            })
        );
        coord.stop().await?;
        anyhow::Ok(())
    })?;
    let _ = std::fs::remove_dir_all(results);
    Ok(())
}
