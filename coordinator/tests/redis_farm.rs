//! The coordinator against a real `redis-server` (started here on a free port, killed by PID at
//! the end): submit → claim → progress → complete → watch → fetch, leases and the reaper, dead
//! letters, cancellation, idempotency, two coordinators, restart, Redis down.

use relayfarm_coordinator::testkit::{test_args, InProcessCoordinator, RedisServer};
use relayfarm_proto::v1::batch_event::Kind;
use relayfarm_proto::v1::cluster_service_client::ClusterServiceClient;
use relayfarm_proto::v1::render_service_client::RenderServiceClient;
use relayfarm_proto::v1::*;
use std::time::Duration;
use tonic::transport::Channel;

type Render = RenderServiceClient<Channel>;
type Cluster = ClusterServiceClient<Channel>;

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "rf-coord-{name}-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn clients(url: &str) -> (Render, Cluster) {
    let ch = Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    (
        RenderServiceClient::new(ch.clone()),
        ClusterServiceClient::new(ch),
    )
}

fn tiny() -> ModelInfo {
    ModelInfo {
        name: "tiny".into(),
        family: "pixart-sigma".into(),
        pipeline_class: "PixArtSigmaPipeline".into(),
        size: Some(SizeRules {
            min_side: 1,
            max_side: 8192,
            multiple: 16,
            max_area: 0,
            default_height: 32,
            default_width: 32,
            resolution_binning: true,
        }),
        default_steps: 20,
        default_guidance: 4.5,
        max_steps: 1000,
        workers: 0,
        scheduler: "DPMSolverMultistepScheduler".into(),
    }
}

async fn register(c: &mut Cluster, worker: &str) {
    c.register(RegisterRequest {
        worker_id: worker.into(),
        hostname: "test".into(),
        devices: vec![DeviceInfo {
            name: "cpu".into(),
            memory_bytes: 1,
        }],
        models: vec![tiny()],
    })
    .await
    .unwrap();
}

fn header(key: &str) -> SubmitBatchRequest {
    SubmitBatchRequest {
        item: Some(submit_batch_request::Item::Header(BatchHeader {
            model: "tiny".into(),
            defaults: Some(RenderParams {
                steps: Some(2),
                ..Default::default()
            }),
            idempotency_key: key.into(),
            label: "test".into(),
            no_resolution_binning: false,
        })),
    }
}

fn prompt(p: &str) -> SubmitBatchRequest {
    SubmitBatchRequest {
        item: Some(submit_batch_request::Item::Prompt(PromptItem {
            prompt: p.into(),
            params: None,
            name: String::new(),
        })),
    }
}

async fn submit(r: &mut Render, key: &str, n: usize) -> Result<SubmitBatchResponse, tonic::Status> {
    let mut msgs = vec![header(key)];
    msgs.extend((0..n).map(|i| prompt(&format!("prompt {i}"))));
    r.submit_batch(tokio_stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

async fn claim(c: &mut Cluster, worker: &str, wait_ms: u32) -> Option<ClaimedJob> {
    c.claim_job(ClaimJobRequest {
        worker_id: worker.into(),
        models: vec!["tiny".into()],
        wait_ms,
    })
    .await
    .unwrap()
    .into_inner()
    .job
}

async fn complete(c: &mut Cluster, worker: &str, job: &ClaimedJob) -> bool {
    c.complete_job(CompleteJobRequest {
        worker_id: worker.into(),
        job_id: job.job_id.clone(),
        image_ref: format!("{}/{:05}.png", job.batch_id, job.index),
        width: 32,
        height: 32,
        seed: job.params.as_ref().and_then(|p| p.seed).unwrap_or(0),
        bytes: 10,
    })
    .await
    .unwrap()
    .into_inner()
    .accepted
}

async fn watch_all(r: &mut Render, batch: &str, after: &str) -> Vec<BatchEvent> {
    let mut s = r
        .watch_batch(WatchBatchRequest {
            batch_id: batch.into(),
            after_event_id: after.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(20), s.message())
        .await
        .expect("watch stalled")
        .unwrap()
    {
        out.push(ev);
    }
    out
}

fn count(evs: &[BatchEvent], f: impl Fn(&Kind) -> bool) -> usize {
    evs.iter()
        .filter(|e| e.kind.as_ref().is_some_and(&f))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submit_claim_complete_watch_fetch() {
    let redis = RedisServer::start().unwrap();
    let results = tmpdir("basic");
    let coord = InProcessCoordinator::start(test_args(&redis.url(), results.clone(), 5000, 3))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut r, mut c) = clients(&coord.url()).await;

    // Before any worker registered: unknown model, served list empty.
    let e = submit(&mut r, "", 1).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message()
            .starts_with("header.model: unknown model `tiny`"),
        "{}",
        e.message()
    );

    register(&mut c, "w1").await;
    let models = r
        .list_models(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].workers, 1);

    // A malformed prompt rejects the whole batch.
    let mut msgs = vec![header(""), prompt("ok"), prompt("")];
    msgs.push(prompt("x"));
    let e = r.submit_batch(tokio_stream::iter(msgs)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(e.message(), "prompts[1].prompt: empty");

    let sub = submit(&mut r, "", 5).await.unwrap();
    assert_eq!(sub.accepted, 5);
    let batch = sub.batch_id;

    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..5 {
        let job = claim(&mut c, "w1", 1000).await.expect("a job");
        assert_eq!(job.batch_id, batch);
        assert_eq!(job.attempt, 1);
        let p = job.params.clone().unwrap();
        assert_eq!(p.steps, Some(2));
        assert_eq!((p.height, p.width), (Some(32), Some(32)));
        assert!(p.seed.is_some());
        let ack = c
            .report_progress(ProgressReport {
                worker_id: "w1".into(),
                job_id: job.job_id.clone(),
                step: 1,
                total: 2,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!ack.cancelled);
        assert!(complete(&mut c, "w1", &job).await);
        // A second completion of the same job loses.
        assert!(!complete(&mut c, "w2", &job).await);
        seen.insert(job.index);
    }
    assert_eq!(seen.len(), 5);
    assert!(claim(&mut c, "w1", 0).await.is_none());

    let evs = watch_all(&mut r, &batch, "").await;
    assert_eq!(count(&evs, |k| matches!(k, Kind::Queued(_))), 5);
    assert_eq!(count(&evs, |k| matches!(k, Kind::Started(_))), 5);
    assert_eq!(count(&evs, |k| matches!(k, Kind::Step(_))), 5);
    assert_eq!(count(&evs, |k| matches!(k, Kind::Image(_))), 5);
    assert!(matches!(
        evs.last().and_then(|e| e.kind.clone()),
        Some(Kind::Done(BatchDone {
            done: 5,
            failed: 0,
            cancelled: 0
        }))
    ));
    // Resume after an event id: only what follows.
    let mid = &evs[evs.len() - 3].event_id;
    assert_eq!(watch_all(&mut r, &batch, mid).await.len(), 2);

    let b = r
        .get_batch(GetBatchRequest {
            batch_id: batch.clone(),
            include_jobs: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.state, BatchState::Done as i32);
    assert_eq!((b.total, b.done, b.queued, b.running), (5, 5, 0, 0));
    assert_eq!(b.jobs.len(), 5);
    assert!(b
        .jobs
        .iter()
        .all(|j| j.state == JobState::Done as i32 && !j.image_ref.is_empty()));
    let listed = r
        .list_batches(ListBatchesRequest { limit: 10 })
        .await
        .unwrap()
        .into_inner()
        .batches;
    assert_eq!(listed.len(), 1);

    // FetchImage streams the stored bytes in chunks.
    let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::create_dir_all(results.join(&batch)).unwrap();
    std::fs::write(results.join(&batch).join("00000.png"), &data).unwrap();
    let mut s = r
        .fetch_image(FetchImageRequest {
            image_ref: format!("{batch}/00000.png"),
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    let mut chunks = 0;
    while let Some(ch) = s.message().await.unwrap() {
        assert_eq!(ch.offset as usize, got.len());
        assert_eq!(ch.total as usize, data.len());
        got.extend(ch.data);
        chunks += 1;
    }
    assert_eq!(got, data);
    assert_eq!(chunks, 3);
    let e = r
        .fetch_image(FetchImageRequest {
            image_ref: "../etc/passwd".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = r
        .fetch_image(FetchImageRequest {
            image_ref: "nope/1.png".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = r
        .get_batch(GetBatchRequest {
            batch_id: "nope".into(),
            include_jobs: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    coord.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(results);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_expiry_redelivers_then_dead_letters() {
    let redis = RedisServer::start().unwrap();
    let results = tmpdir("lease");
    let coord = InProcessCoordinator::start(test_args(&redis.url(), results.clone(), 300, 2))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut r, mut c) = clients(&coord.url()).await;
    register(&mut c, "w1").await;
    register(&mut c, "w2").await;
    let batch = submit(&mut r, "", 2).await.unwrap().batch_id;

    // w1 takes job A and keeps heartbeating: its lease holds.
    let a = claim(&mut c, "w1", 1000).await.unwrap();
    // w2 takes job B and dies (no heartbeat).
    let b = claim(&mut c, "w2", 1000).await.unwrap();
    assert_ne!(a.job_id, b.job_id);
    let mut redelivered = None;
    for _ in 0..30 {
        let hb = c
            .heartbeat(HeartbeatRequest {
                worker_id: "w1".into(),
                running_job_ids: vec![a.job_id.clone()],
            })
            .await
            .unwrap()
            .into_inner();
        assert!(hb.cancel_job_ids.is_empty());
        if let Some(j) = claim(&mut c, "w1", 60).await {
            redelivered = Some(j);
            break;
        }
    }
    let b2 = redelivered.expect("the dead worker's job comes back");
    assert_eq!(
        b2.job_id, b.job_id,
        "only the job without heartbeats is redelivered"
    );
    assert_eq!(b2.attempt, 2);
    assert_eq!(
        b2.params, b.params,
        "identical parameters (same seed) on redelivery"
    );
    assert!(complete(&mut c, "w1", &a).await);
    // b2 is abandoned as well: attempts are exhausted → dead-lettered.
    let evs = watch_all(&mut r, &batch, "").await;
    let failed: Vec<&BatchEvent> = evs
        .iter()
        .filter(|e| matches!(e.kind, Some(Kind::Failed(_))))
        .collect();
    assert_eq!(failed.len(), 1);
    match &failed[0].kind {
        Some(Kind::Failed(f)) => {
            assert!(
                f.reason
                    .starts_with("dead-lettered after 2 attempts: lease expired"),
                "{}",
                f.reason
            );
            assert_eq!(f.attempts, 2);
        }
        _ => unreachable!(),
    }
    assert!(matches!(
        evs.last().and_then(|e| e.kind.clone()),
        Some(Kind::Done(BatchDone {
            done: 1,
            failed: 1,
            cancelled: 0
        }))
    ));
    // The late worker's completion is refused: the job is already finished (failed).
    assert!(!complete(&mut c, "w2", &b).await);
    coord.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(results);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fail_release_and_cancel() {
    let redis = RedisServer::start().unwrap();
    let results = tmpdir("cancel");
    let coord = InProcessCoordinator::start(test_args(&redis.url(), results.clone(), 5000, 3))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut r, mut c) = clients(&coord.url()).await;
    register(&mut c, "w1").await;

    // Release: redelivered at once, attempt not counted. Retryable failure: attempt counted.
    let batch = submit(&mut r, "", 1).await.unwrap().batch_id;
    let j = claim(&mut c, "w1", 1000).await.unwrap();
    c.release_job(ReleaseJobRequest {
        worker_id: "w1".into(),
        job_id: j.job_id.clone(),
    })
    .await
    .unwrap();
    let j = claim(&mut c, "w1", 1000).await.unwrap();
    assert_eq!(j.attempt, 1);
    c.fail_job(FailJobRequest {
        worker_id: "w1".into(),
        job_id: j.job_id.clone(),
        reason: "oom".into(),
        retryable: true,
    })
    .await
    .unwrap();
    let j = claim(&mut c, "w1", 1000).await.unwrap();
    assert_eq!(j.attempt, 2);
    c.fail_job(FailJobRequest {
        worker_id: "w1".into(),
        job_id: j.job_id.clone(),
        reason: "bad input".into(),
        retryable: false,
    })
    .await
    .unwrap();
    let evs = watch_all(&mut r, &batch, "").await;
    assert!(evs
        .iter()
        .any(|e| matches!(&e.kind, Some(Kind::Failed(f)) if f.reason == "bad input")));
    assert!(claim(&mut c, "w1", 0).await.is_none());

    // Cancel: 1 running, 3 pending.
    let batch = submit(&mut r, "", 4).await.unwrap().batch_id;
    let running = claim(&mut c, "w1", 1000).await.unwrap();
    let out = r
        .cancel_batch(CancelBatchRequest {
            batch_id: batch.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((out.cancelled_pending, out.stopping_running), (3, 1));
    let hb = c
        .heartbeat(HeartbeatRequest {
            worker_id: "w1".into(),
            running_job_ids: vec![running.job_id.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hb.cancel_job_ids, vec![running.job_id.clone()]);
    let ack = c
        .report_progress(ProgressReport {
            worker_id: "w1".into(),
            job_id: running.job_id.clone(),
            step: 1,
            total: 2,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ack.cancelled);
    // Pending jobs are skipped at claim.
    assert!(claim(&mut c, "w1", 100).await.is_none());
    c.fail_job(FailJobRequest {
        worker_id: "w1".into(),
        job_id: running.job_id.clone(),
        reason: "cancelled".into(),
        retryable: true,
    })
    .await
    .unwrap();
    let evs = watch_all(&mut r, &batch, "").await;
    assert_eq!(count(&evs, |k| matches!(k, Kind::Cancelled(_))), 4);
    assert!(matches!(
        evs.last().and_then(|e| e.kind.clone()),
        Some(Kind::Done(BatchDone {
            done: 0,
            failed: 0,
            cancelled: 4
        }))
    ));
    let b = r
        .get_batch(GetBatchRequest {
            batch_id: batch,
            include_jobs: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.state, BatchState::Cancelled as i32);
    assert_eq!(b.cancelled, 4);
    coord.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(results);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_two_coordinators_and_restart() {
    let redis = RedisServer::start().unwrap();
    let results = tmpdir("multi");
    let args = test_args(&redis.url(), results.clone(), 5000, 3);
    let c1 = InProcessCoordinator::start(args.clone()).await.unwrap();
    let c2 = InProcessCoordinator::start(args.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut r1, mut k1) = clients(&c1.url()).await;
    let (mut r2, mut k2) = clients(&c2.url()).await;
    register(&mut k1, "w1").await;

    let a = submit(&mut r1, "key-1", 6).await.unwrap();
    let b = submit(&mut r2, "key-1", 6).await.unwrap();
    assert_eq!(a.batch_id, b.batch_id);
    assert!(!a.deduplicated && b.deduplicated);
    assert_eq!(b.accepted, 6);

    // Claims through both coordinators never hand out the same job twice.
    let mut ids = std::collections::BTreeSet::new();
    for i in 0..3 {
        let (k, w) = if i % 2 == 0 {
            (&mut k1, "w1")
        } else {
            (&mut k2, "w2")
        };
        let j = claim(k, w, 1000).await.unwrap();
        assert!(complete(k, w, &j).await);
        assert!(ids.insert(j.job_id));
    }
    // Restart: coordinator 1 goes away, a new one takes over from Redis.
    c1.stop().await.unwrap();
    let c3 = InProcessCoordinator::start(args).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut r3, mut k3) = clients(&c3.url()).await;
    for _ in 0..3 {
        let j = claim(&mut k3, "w1", 1000).await.unwrap();
        assert!(complete(&mut k3, "w1", &j).await);
        assert!(ids.insert(j.job_id));
    }
    assert_eq!(ids.len(), 6);
    let evs = watch_all(&mut r3, &a.batch_id, "").await;
    assert_eq!(count(&evs, |k| matches!(k, Kind::Image(_))), 6);
    assert_eq!(count(&evs, |k| matches!(k, Kind::Done(_))), 1);
    c2.stop().await.unwrap();
    c3.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(results);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_is_unavailable_then_recovers() {
    let port = relayfarm_coordinator::testkit::free_port().unwrap();
    let url = format!("redis://127.0.0.1:{port}");
    let results = tmpdir("down");
    let coord = InProcessCoordinator::start(test_args(&url, results.clone(), 5000, 3))
        .await
        .unwrap();
    let (mut r, mut c) = clients(&coord.url()).await;
    let e = submit(&mut r, "retry-key", 2).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert!(e.message().contains(&url), "{}", e.message());
    assert!(e.message().contains("retried"), "{}", e.message());
    let e = r.list_models(ListModelsRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);

    // Redis comes up: the coordinator connects in the background and the retry succeeds.
    let _redis = RedisServer::start_on(port).unwrap();
    let mut ok = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if c.register(RegisterRequest {
            worker_id: "w1".into(),
            hostname: "h".into(),
            devices: vec![],
            models: vec![tiny()],
        })
        .await
        .is_ok()
        {
            ok = true;
            break;
        }
    }
    assert!(ok, "coordinator never reached redis");
    let s = submit(&mut r, "retry-key", 2).await.unwrap();
    assert_eq!(s.accepted, 2);
    coord.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(results);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restart_mid_flight() {
    let mut redis = RedisServer::start().unwrap();
    let port = redis.port();
    let results = tmpdir("rrestart");
    let coord = InProcessCoordinator::start(test_args(&redis.url(), results.clone(), 5000, 3))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut r, mut c) = clients(&coord.url()).await;
    register(&mut c, "w1").await;
    redis.kill();
    let e = submit(&mut r, "", 1).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    let _redis = RedisServer::start_on(port).unwrap();
    let mut ok = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = c
            .register(RegisterRequest {
                worker_id: "w1".into(),
                hostname: "h".into(),
                devices: vec![],
                models: vec![tiny()],
            })
            .await;
        if submit(&mut r, "", 1).await.is_ok() {
            ok = true;
            break;
        }
    }
    assert!(ok);
    let j = claim(&mut c, "w1", 1000).await.unwrap();
    assert!(complete(&mut c, "w1", &j).await);
    coord.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(results);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn interrupted_submission_is_completed_by_a_retry() {
    let redis = RedisServer::start().unwrap();
    let results = tmpdir("resume");
    let coord = InProcessCoordinator::start(test_args(&redis.url(), results.clone(), 5000, 3))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut r, mut c) = clients(&coord.url()).await;
    register(&mut c, "w1").await;
    let first = submit(&mut r, "k-resume", 4).await.unwrap();
    let batch = first.batch_id.clone();

    // Simulate a submission cut off mid-write: unsealed, job 2 never written, job 3 written
    // but its stream entry lost.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut k = client.get_multiplexed_async_connection().await.unwrap();
    let stream = "rf:model:tiny:jobs".to_string();
    let entries: redis::Value = redis::cmd("XRANGE")
        .arg(&stream)
        .arg("-")
        .arg("+")
        .query_async(&mut k)
        .await
        .unwrap();
    let redis::Value::Array(entries) = entries else {
        panic!("{entries:?}")
    };
    let mut lost = None;
    for e in entries {
        let redis::Value::Array(parts) = e else {
            continue;
        };
        let id: String = redis::from_redis_value_ref(&parts[0]).unwrap();
        let fields: Vec<String> = redis::from_redis_value_ref(&parts[1]).unwrap();
        if fields[1].ends_with("-00002") || fields[1].ends_with("-00003") {
            let _: () = redis::cmd("XDEL")
                .arg(&stream)
                .arg(&id)
                .query_async(&mut k)
                .await
                .unwrap();
            if fields[1].ends_with("-00003") {
                lost = Some(id);
            }
        }
    }
    assert!(lost.is_some());
    let _: () = redis::cmd("DEL")
        .arg(format!("rf:job:{batch}-00002"))
        .query_async(&mut k)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(format!("rf:batch:{batch}"))
        .arg("sealed")
        .arg("0")
        .query_async(&mut k)
        .await
        .unwrap();

    // A different batch under the same key is refused.
    let e = submit(&mut r, "k-resume", 5).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().starts_with("header.idempotency_key: "),
        "{}",
        e.message()
    );

    let again = submit(&mut r, "k-resume", 4).await.unwrap();
    assert_eq!(again.batch_id, batch);
    assert!(again.deduplicated);
    let mut ids = std::collections::BTreeSet::new();
    while let Some(j) = claim(&mut c, "w1", 300).await {
        assert!(complete(&mut c, "w1", &j).await);
        assert!(ids.insert(j.job_id), "a job was delivered twice");
    }
    assert_eq!(ids.len(), 4);
    let evs = watch_all(&mut r, &batch, "").await;
    assert_eq!(count(&evs, |k| matches!(k, Kind::Image(_))), 4);
    assert!(matches!(
        evs.last().and_then(|e| e.kind.clone()),
        Some(Kind::Done(BatchDone { done: 4, .. }))
    ));
    coord.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(results);
}

/// Many claimers through two coordinators; some "die" holding a job (no heartbeat, no
/// completion) and some complete twice: every job ends with exactly one image, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn stress_abandoned_and_duplicate_completions() {
    let redis = RedisServer::start().unwrap();
    let results = tmpdir("stress");
    let args = test_args(&redis.url(), results.clone(), 300, 50);
    let c1 = InProcessCoordinator::start(args.clone()).await.unwrap();
    let c2 = InProcessCoordinator::start(args).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut r, mut k) = clients(&c1.url()).await;
    register(&mut k, "w0").await;
    let n = 200;
    let batch = submit(&mut r, "", n).await.unwrap().batch_id;
    let mut tasks = Vec::new();
    for t in 0..6u64 {
        let url = if t % 2 == 0 { c1.url() } else { c2.url() };
        tasks.push(tokio::spawn(async move {
            let (_, mut c) = clients(&url).await;
            let worker = format!("w{t}");
            let mut idle = 0;
            let mut i = 0u64;
            while idle < 10 {
                let Some(j) = claim(&mut c, &worker, 100).await else {
                    idle += 1;
                    continue;
                };
                idle = 0;
                i += 1;
                // Every 7th claim is abandoned (the worker "dies" holding it).
                if (i * (t + 3)).is_multiple_of(7) {
                    continue;
                }
                complete(&mut c, &worker, &j).await;
                if i.is_multiple_of(5) {
                    // A duplicate completion must lose.
                    assert!(!complete(&mut c, &worker, &j).await);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let evs = watch_all(&mut r, &batch, "").await;
    let mut images = std::collections::BTreeSet::new();
    for e in &evs {
        if matches!(e.kind, Some(Kind::Image(_))) {
            assert!(
                images.insert(e.job_id.clone()),
                "two images for {}",
                e.job_id
            );
        }
    }
    assert_eq!(images.len(), n);
    assert_eq!(count(&evs, |k| matches!(k, Kind::Done(_))), 1);
    assert!(matches!(
        evs.last().and_then(|e| e.kind.clone()),
        Some(Kind::Done(BatchDone {
            done: 200,
            failed: 0,
            cancelled: 0
        }))
    ));
    let b = r
        .get_batch(GetBatchRequest {
            batch_id: batch,
            include_jobs: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((b.done, b.running, b.queued), (200, 0, 0));
    c1.stop().await.unwrap();
    c2.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(results);
}
