//! An in-process fake coordinator (tonic server on 127.0.0.1:0, no Redis) for client tests:
//! `submit --wait --out` end to end, a refused first submit (retried with the same key) and
//! a watch stream that breaks mid-batch and must be resumed with `after_event_id`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use relayfarm_proto::v1::render_service_server::{RenderService, RenderServiceServer};
use relayfarm_proto::v1::*;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::submit::{execute_with, SubmitArgs};
use super::watch::FollowOptions;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Default)]
struct State {
    /// Idempotency keys of every SubmitBatch call, in order.
    submit_keys: Vec<String>,
    /// SubmitBatch calls still to refuse with UNAVAILABLE.
    refuse_submits: u32,
    /// `after_event_id` of every WatchBatch call, in order.
    watch_after: Vec<String>,
    /// The batch's events, once submitted.
    events: Vec<BatchEvent>,
    /// Break the first watch stream after this many events.
    break_after: usize,
    images: HashMap<String, Vec<u8>>,
    /// Jobs (by index) that fail.
    failing: Vec<u32>,
    fetches: usize,
}

#[derive(Clone, Default)]
struct Fake {
    state: Arc<Mutex<State>>,
}

fn event(seq: usize, job: u32, kind: batch_event::Kind) -> BatchEvent {
    BatchEvent {
        event_id: format!("{}-0", 1000 + seq),
        batch_id: "b1".into(),
        job_id: format!("b1:{job:05}"),
        index: job,
        kind: Some(kind),
    }
}

fn image_bytes(i: u32) -> Vec<u8> {
    // Job 0 is large enough to need several 256 KiB chunks.
    let len = if i == 0 { 600_000 } else { 1000 + i as usize };
    (0..len)
        .map(|k| (k as u32).wrapping_mul(31).wrapping_add(i) as u8)
        .collect()
}

#[tonic::async_trait]
impl RenderService for Fake {
    async fn submit_batch(
        &self,
        request: Request<Streaming<SubmitBatchRequest>>,
    ) -> Result<Response<SubmitBatchResponse>, Status> {
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(SubmitBatchRequest {
                item: Some(submit_batch_request::Item::Header(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "header: the first message must be a BatchHeader",
                ))
            }
        };
        let mut prompts = Vec::new();
        while let Some(m) = stream.message().await? {
            match m.item {
                Some(submit_batch_request::Item::Prompt(p)) => prompts.push(p),
                _ => return Err(Status::invalid_argument("prompts: a second header")),
            }
        }
        let mut st = self
            .state
            .lock()
            .map_err(|_| Status::internal("poisoned"))?;
        st.submit_keys.push(header.idempotency_key.clone());
        if st.refuse_submits > 0 {
            st.refuse_submits -= 1;
            return Err(Status::unavailable(
                "redis at redis://127.0.0.1:1 is unreachable; the request can be retried",
            ));
        }
        if header.model != "tiny" {
            return Err(Status::invalid_argument(format!(
                "header.model: unknown model `{}`; served: [tiny]",
                header.model
            )));
        }
        if let Some(i) = prompts
            .iter()
            .position(|p| p.params.as_ref().and_then(|q| q.height) == Some(50))
        {
            return Err(Status::invalid_argument(format!(
                "prompts[{i}].height: 50 is not a multiple of 16"
            )));
        }
        let n = prompts.len() as u32;
        let mut events = Vec::new();
        for i in 0..n {
            events.push(event(
                events.len(),
                i,
                batch_event::Kind::Queued(JobQueued {}),
            ));
        }
        let (mut done, mut failed) = (0, 0);
        for (i, p) in prompts.iter().enumerate() {
            let i = i as u32;
            events.push(event(
                events.len(),
                i,
                batch_event::Kind::Started(JobStarted {
                    worker_id: "w1".into(),
                    attempt: 1,
                }),
            ));
            events.push(event(
                events.len(),
                i,
                batch_event::Kind::Step(StepProgress { step: 1, total: 2 }),
            ));
            if st.failing.contains(&i) {
                failed += 1;
                events.push(event(
                    events.len(),
                    i,
                    batch_event::Kind::Failed(JobFailed {
                        reason: "dead-lettered after 3 attempts: out of memory".into(),
                        attempts: 3,
                    }),
                ));
            } else {
                done += 1;
                let name = if p.name.is_empty() {
                    "img".to_string()
                } else {
                    p.name.clone()
                };
                let image_ref = format!("b1/{i:05}-{name}.png");
                let bytes = image_bytes(i);
                events.push(event(
                    events.len(),
                    i,
                    batch_event::Kind::Image(ImageReady {
                        image_ref: image_ref.clone(),
                        width: 32,
                        height: 32,
                        seed: u64::from(i),
                        bytes: bytes.len() as u64,
                    }),
                ));
                st.images.insert(image_ref, bytes);
            }
        }
        events.push(BatchEvent {
            event_id: format!("{}-0", 1000 + events.len()),
            batch_id: "b1".into(),
            kind: Some(batch_event::Kind::Done(BatchDone {
                done,
                failed,
                cancelled: 0,
            })),
            ..Default::default()
        });
        st.events = events;
        Ok(Response::new(SubmitBatchResponse {
            batch_id: "b1".into(),
            accepted: n,
            deduplicated: false,
        }))
    }

    type WatchBatchStream = BoxStream<BatchEvent>;

    async fn watch_batch(
        &self,
        request: Request<WatchBatchRequest>,
    ) -> Result<Response<Self::WatchBatchStream>, Status> {
        let req = request.into_inner();
        let mut st = self
            .state
            .lock()
            .map_err(|_| Status::internal("poisoned"))?;
        if req.batch_id != "b1" {
            return Err(Status::not_found(format!(
                "batch `{}` not found",
                req.batch_id
            )));
        }
        let first_call = st.watch_after.is_empty();
        st.watch_after.push(req.after_event_id.clone());
        let start = if req.after_event_id.is_empty() {
            0
        } else {
            match st
                .events
                .iter()
                .position(|e| e.event_id == req.after_event_id)
            {
                Some(p) => p + 1,
                None => return Err(Status::invalid_argument("after_event_id: unknown event")),
            }
        };
        let mut items: Vec<Result<BatchEvent, Status>> =
            st.events[start..].iter().cloned().map(Ok).collect();
        if first_call && st.break_after > 0 && st.break_after < items.len() {
            items.truncate(st.break_after);
            items.push(Err(Status::unavailable("coordinator shutting down")));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }

    async fn get_batch(
        &self,
        _request: Request<GetBatchRequest>,
    ) -> Result<Response<Batch>, Status> {
        Err(Status::unimplemented("get_batch"))
    }

    async fn list_batches(
        &self,
        _request: Request<ListBatchesRequest>,
    ) -> Result<Response<ListBatchesResponse>, Status> {
        Err(Status::unimplemented("list_batches"))
    }

    async fn cancel_batch(
        &self,
        _request: Request<CancelBatchRequest>,
    ) -> Result<Response<CancelBatchResponse>, Status> {
        Err(Status::unimplemented("cancel_batch"))
    }

    type FetchImageStream = BoxStream<ImageChunk>;

    async fn fetch_image(
        &self,
        request: Request<FetchImageRequest>,
    ) -> Result<Response<Self::FetchImageStream>, Status> {
        let r = request.into_inner().image_ref;
        let mut st = self
            .state
            .lock()
            .map_err(|_| Status::internal("poisoned"))?;
        st.fetches += 1;
        let bytes = st
            .images
            .get(&r)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("image_ref: `{r}` not found")))?;
        let total = bytes.len() as u64;
        let chunks: Vec<Result<ImageChunk, Status>> = bytes
            .chunks(256 * 1024)
            .enumerate()
            .map(|(k, c)| {
                Ok(ImageChunk {
                    data: c.to_vec(),
                    offset: (k * 256 * 1024) as u64,
                    total,
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn list_models(
        &self,
        _request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        Err(Status::unimplemented("list_models"))
    }
}

async fn start(state: State) -> (String, Fake) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = Fake {
        state: Arc::new(Mutex::new(state)),
    };
    let svc = RenderServiceServer::new(fake.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (format!("127.0.0.1:{}", addr.port()), fake)
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: SubmitArgs,
}

fn args(url: &str, prompts: &std::path::Path, extra: &[&str]) -> SubmitArgs {
    let p = prompts.to_string_lossy().to_string();
    let mut argv = vec![
        "x",
        "--coordinator",
        url,
        "--prompts",
        p.as_str(),
        "--no-progress",
    ];
    argv.extend_from_slice(extra);
    Cli::try_parse_from(argv).unwrap().args
}

fn fast() -> FollowOptions {
    FollowOptions {
        reconnect_for: Duration::from_secs(10),
        initial_backoff: Duration::from_millis(10),
    }
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("relayfarm-client-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn prompt_file(dir: &std::path::Path, n: usize) -> std::path::PathBuf {
    let mut text = String::from("# test prompts\n");
    for i in 0..n {
        if i % 5 == 0 {
            text.push_str(&format!(
                "{{\"prompt\": \"thing {i}\", \"name\": \"n{i}\", \"seed\": {i}}}\n"
            ));
        } else {
            text.push_str(&format!("a picture of thing {i}\n"));
        }
    }
    let p = dir.join("prompts.txt");
    std::fs::write(&p, text).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_out_end_to_end_with_a_dropped_watch_stream() {
    let dir = temp_dir("e2e");
    let prompts = prompt_file(&dir, 50);
    let out = dir.join("out");
    let (url, fake) = start(State {
        refuse_submits: 1,
        break_after: 120,
        ..Default::default()
    })
    .await;
    let a = args(
        &url,
        &prompts,
        &[
            "--model",
            "tiny",
            "--steps",
            "2",
            "--wait",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let mut stdout: Vec<u8> = Vec::new();
    let outcome = execute_with(&a, &mut stdout, &fast()).await.unwrap();
    let stdout = String::from_utf8(stdout).unwrap();
    assert_eq!(
        stdout.lines().next(),
        Some("b1"),
        "first stdout line is the batch id"
    );
    assert_eq!(outcome.exit, 0);
    assert_eq!(
        (
            outcome.batch_id.as_str(),
            outcome.accepted,
            outcome.deduplicated
        ),
        ("b1", 50, false)
    );
    assert_eq!(
        (outcome.images, outcome.downloaded, outcome.already_present),
        (50, 50, 0)
    );
    assert!(outcome.failed.is_empty());

    {
        let st = fake.state.lock().unwrap();
        // The refused submit was retried with the same idempotency key.
        assert_eq!(st.submit_keys.len(), 2);
        assert_eq!(st.submit_keys[0], st.submit_keys[1]);
        assert!(st.submit_keys[0].starts_with("cli-"));
        // The broken stream was resumed right after the last event seen.
        assert_eq!(st.watch_after.len(), 2, "{:?}", st.watch_after);
        assert_eq!(st.watch_after[0], "");
        assert_eq!(st.watch_after[1], st.events[119].event_id);
        // Every image arrived once, byte for byte, under its ref's file name.
        let mut files: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        files.sort();
        assert_eq!(files.len(), 50);
        for (r, bytes) in &st.images {
            let name = r.rsplit('/').next().unwrap();
            assert_eq!(&std::fs::read(out.join(name)).unwrap(), bytes, "{r}");
        }
        assert!(out.join("00005-n5.png").exists());
        assert_eq!(st.fetches, 50);
    }

    // Again with the same key and folder: everything is already there.
    let key = fake.state.lock().unwrap().submit_keys[0].clone();
    let a = args(
        &url,
        &prompts,
        &[
            "--model",
            "tiny",
            "--wait",
            "--out",
            out.to_str().unwrap(),
            "--idempotency-key",
            &key,
        ],
    );
    let outcome = execute_with(&a, &mut Vec::new(), &fast()).await.unwrap();
    assert_eq!(
        (outcome.exit, outcome.downloaded, outcome.already_present),
        (0, 0, 50)
    );
    assert_eq!(fake.state.lock().unwrap().submit_keys.last(), Some(&key));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_jobs_give_a_non_zero_exit_with_reasons() {
    let dir = temp_dir("fail");
    let prompts = prompt_file(&dir, 6);
    let (url, _fake) = start(State {
        failing: vec![2, 4],
        ..Default::default()
    })
    .await;
    let a = args(&url, &prompts, &["--model", "tiny", "--wait"]);
    let outcome = execute_with(&a, &mut Vec::new(), &fast()).await.unwrap();
    assert_eq!(outcome.exit, super::EXIT_FAILED_JOBS);
    assert_eq!(outcome.images, 4);
    let reasons: Vec<_> = outcome.failed.values().cloned().collect();
    assert_eq!(reasons.len(), 2);
    assert_eq!(reasons[0].0, 2);
    assert!(reasons[0].1.contains("dead-lettered"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_argument_names_the_field_and_the_line() {
    let dir = temp_dir("invalid");
    let prompts = prompt_file(&dir, 3);
    let (url, fake) = start(State::default()).await;
    let e = execute_with(
        &args(&url, &prompts, &["--model", "nope"]),
        &mut Vec::new(),
        &fast(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("header.model: unknown model `nope`; served: [tiny]"),
        "{e}"
    );
    assert!(!e.contains('\n'), "{e}");

    let bad = dir.join("bad.txt");
    std::fs::write(&bad, "ok\n\n{\"prompt\": \"x\", \"height\": 50}\n").unwrap();
    let e = execute_with(
        &args(&url, &bad, &["--model", "tiny"]),
        &mut Vec::new(),
        &fast(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("prompts[1].height: 50 is not a multiple of 16 (line 3 of"),
        "{e}"
    );
    // INVALID_ARGUMENT is not retried.
    assert_eq!(fake.state.lock().unwrap().submit_keys.len(), 2);

    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "# nothing\n\n").unwrap();
    let e = format!(
        "{:#}",
        execute_with(
            &args(&url, &empty, &["--model", "tiny"]),
            &mut Vec::new(),
            &fast()
        )
        .await
        .unwrap_err()
    );
    assert!(
        e.contains("empty.txt") && e.contains("the prompt set is empty"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_coordinator_is_named() {
    let dir = temp_dir("unreachable");
    let prompts = prompt_file(&dir, 1);
    // A port that was free a moment ago: nothing listens there.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("127.0.0.1:{port}");
    let e = execute_with(
        &args(&url, &prompts, &["--model", "tiny"]),
        &mut Vec::new(),
        &fast(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(&format!(
            "cannot reach the coordinator at http://127.0.0.1:{port}"
        )),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
