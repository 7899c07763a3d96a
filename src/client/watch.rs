//! Following a batch's event stream (with resume after a dropped stream) and the
//! `relayfarm watch` command.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use relayfarm_proto::v1::{
    batch_event::Kind, BatchDone, BatchEvent, GetBatchRequest, WatchBatchRequest,
};
use tonic::Status;

use super::progress::BatchProgress;
use super::{connect, interrupted, is_retryable, status_error, Backoff, Client, CoordinatorArgs};

/// Receives the events of a followed batch.
#[allow(async_fn_in_trait)]
pub trait EventHandler {
    /// Called once per event, in order. An error stops following.
    async fn on_event(&mut self, event: &BatchEvent) -> anyhow::Result<()>;

    /// Called when the stream broke and a reconnect is about to be tried.
    fn on_reconnect(&mut self, _after_event_id: &str, _reason: &str) {}
}

/// How a batch is followed.
#[derive(Debug, Clone)]
pub struct FollowOptions {
    /// Give up when the stream cannot be re-established for this long.
    pub reconnect_for: Duration,
    /// First reconnect delay (doubles up to 2 s).
    pub initial_backoff: Duration,
}

impl Default for FollowOptions {
    fn default() -> Self {
        Self {
            reconnect_for: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(250),
        }
    }
}

/// Follows `batch_id` from after `after_event_id` ("" = the whole history) until its
/// `BatchDone` event, resuming with `after_event_id` = the last seen event id when the
/// stream breaks (coordinator restart) or ends early.
pub async fn follow<H: EventHandler>(
    client: &mut Client,
    url: &str,
    batch_id: &str,
    after_event_id: &str,
    opts: &FollowOptions,
    handler: &mut H,
) -> anyhow::Result<BatchDone> {
    let what = format!("watch batch {batch_id}");
    let mut last = after_event_id.to_string();
    let mut backoff = Backoff::new(opts.initial_backoff, Duration::from_secs(2));
    let mut broken_since: Option<Instant> = None;
    loop {
        let request = WatchBatchRequest {
            batch_id: batch_id.to_string(),
            after_event_id: last.clone(),
        };
        let failure: Status = match client.watch_batch(request).await {
            Err(status) => status,
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(event)) => {
                            broken_since = None;
                            backoff.reset();
                            handler.on_event(&event).await?;
                            if !event.event_id.is_empty() {
                                last = event.event_id.clone();
                            }
                            if let Some(Kind::Done(done)) = event.kind {
                                return Ok(done);
                            }
                        }
                        Ok(None) => {
                            break Status::unavailable(
                                "the event stream ended before the batch was done",
                            );
                        }
                        Err(status) => break status,
                    }
                }
            }
        };
        if !is_retryable(&failure) {
            return Err(status_error(url, &what, &failure));
        }
        let since = *broken_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= opts.reconnect_for {
            return Err(anyhow::anyhow!(
                "{}; gave up reconnecting after {} s (resume with `relayfarm watch {batch_id}`)",
                super::describe_status(url, &what, &failure),
                opts.reconnect_for.as_secs()
            ));
        }
        handler.on_reconnect(&last, failure.message());
        tracing::debug!(after_event_id = %last, reason = %failure.message(), "watch stream broke; reconnecting");
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// One human-readable line for an event.
pub fn event_line(event: &BatchEvent) -> String {
    let head = format!("{} #{} {}", event.event_id, event.index, event.job_id);
    match &event.kind {
        Some(Kind::Queued(_)) => format!("{head} queued"),
        Some(Kind::Started(s)) => format!(
            "{head} started worker={} attempt={}",
            s.worker_id, s.attempt
        ),
        Some(Kind::Step(s)) => format!("{head} step {}/{}", s.step, s.total),
        Some(Kind::Image(i)) => format!(
            "{head} image {} {}x{} seed={} bytes={}",
            i.image_ref, i.width, i.height, i.seed, i.bytes
        ),
        Some(Kind::Failed(f)) => {
            format!("{head} failed attempts={} reason: {}", f.attempts, f.reason)
        }
        Some(Kind::Cancelled(_)) => format!("{head} cancelled"),
        Some(Kind::Done(d)) => format!(
            "{} batch done: {} done, {} failed, {} cancelled",
            event.event_id, d.done, d.failed, d.cancelled
        ),
        None => format!("{head} (unknown event)"),
    }
}

/// `relayfarm watch`: follow a batch's events.
#[derive(clap::Args, Debug, Clone)]
pub struct WatchArgs {
    /// The batch id printed by `relayfarm submit`.
    #[arg(env = "RELAYFARM_BATCH_ID")]
    pub batch_id: String,
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
    /// Resume after this event id (default: replay the whole history).
    #[arg(long, env = "RELAYFARM_AFTER_EVENT_ID", default_value = "")]
    pub after_event_id: String,
    /// Show a progress bar instead of one line per event.
    #[arg(long, env = "RELAYFARM_BAR")]
    pub bar: bool,
    /// Omit step-progress lines.
    #[arg(long, env = "RELAYFARM_NO_STEPS")]
    pub no_steps: bool,
}

struct LinePrinter {
    no_steps: bool,
}

impl EventHandler for LinePrinter {
    async fn on_event(&mut self, event: &BatchEvent) -> anyhow::Result<()> {
        if self.no_steps && matches!(event.kind, Some(Kind::Step(_))) {
            return Ok(());
        }
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", event_line(event))?;
        out.flush()?;
        Ok(())
    }

    fn on_reconnect(&mut self, after: &str, reason: &str) {
        eprintln!("connection lost ({reason}); resuming after event {after:?}");
    }
}

struct BarHandler {
    bar: BatchProgress,
}

impl EventHandler for BarHandler {
    async fn on_event(&mut self, event: &BatchEvent) -> anyhow::Result<()> {
        match &event.kind {
            Some(Kind::Image(_)) => self.bar.image_done(),
            Some(Kind::Failed(f)) => {
                self.bar.job_failed();
                self.bar.println(&format!(
                    "job #{} {} failed: {}",
                    event.index, event.job_id, f.reason
                ));
            }
            Some(Kind::Cancelled(_)) => self.bar.job_cancelled(),
            _ => {}
        }
        Ok(())
    }

    fn on_reconnect(&mut self, after: &str, reason: &str) {
        self.bar.println(&format!(
            "connection lost ({reason}); resuming after event {after:?}"
        ));
    }
}

/// Runs `relayfarm watch`. Exit 0 when the batch is done with no failed or cancelled job.
pub fn run(args: WatchArgs) -> anyhow::Result<ExitCode> {
    super::block_on(async move {
        let url = args.coordinator.coordinator.clone();
        let mut client = connect(&url)?;
        let opts = FollowOptions::default();
        let done = if args.bar {
            let total = client
                .get_batch(GetBatchRequest {
                    batch_id: args.batch_id.clone(),
                    include_jobs: false,
                })
                .await
                .map_err(|s| status_error(&url, &format!("get batch {}", args.batch_id), &s))?
                .into_inner()
                .total;
            let mut handler = BarHandler {
                bar: BatchProgress::new(Some(u64::from(total)), true),
            };
            let result = tokio::select! {
                r = follow(&mut client, &url, &args.batch_id, &args.after_event_id, &opts, &mut handler) => Some(r),
                _ = interrupted() => None,
            };
            handler.bar.finish();
            match result {
                Some(r) => r?,
                None => return Ok(ExitCode::from(super::EXIT_INTERRUPTED)),
            }
        } else {
            let mut handler = LinePrinter {
                no_steps: args.no_steps,
            };
            tokio::select! {
                r = follow(&mut client, &url, &args.batch_id, &args.after_event_id, &opts, &mut handler) => r?,
                _ = interrupted() => return Ok(ExitCode::from(super::EXIT_INTERRUPTED)),
            }
        };
        eprintln!(
            "batch {}: {} done, {} failed, {} cancelled",
            args.batch_id, done.done, done.failed, done.cancelled
        );
        Ok(if done.failed == 0 && done.cancelled == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(super::EXIT_FAILED_JOBS)
        })
    })
}
