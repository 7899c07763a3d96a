//! `relayfarm submit`: stream a prompt set to the coordinator (`SubmitBatch`), print the
//! batch id and, with `--wait`, follow the batch and download each image as it completes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasher, Hash, Hasher};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use relayfarm_core::{parse_prompt_set, PromptLine};
use relayfarm_proto::v1::{
    self as pb, batch_event::Kind, submit_batch_request::Item, BatchEvent, BatchHeader,
    GetBatchRequest, JobState, PromptItem, SubmitBatchRequest, SubmitBatchResponse,
};
use tokio_stream::Stream;

use super::fetch::{download, DownloadError, Downloaded};
use super::progress::BatchProgress;
use super::watch::{follow, EventHandler, FollowOptions};
use super::{
    connect, describe_status, interrupted, is_retryable, status_error, Backoff, Client,
    CoordinatorArgs,
};

/// How many times one invocation tries `SubmitBatch` on a retryable error (same key).
pub const SUBMIT_ATTEMPTS: u32 = 5;

/// `relayfarm submit`.
#[derive(clap::Args, Debug, Clone)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
    /// Model name as served by the workers (see `relayfarm models`).
    #[arg(long, env = "RELAYFARM_MODEL")]
    pub model: String,
    /// Prompt-set file: one prompt per line, or JSON Lines with per-line overrides (the
    /// same format as `relayfarm render --prompts`).
    #[arg(long, env = "RELAYFARM_PROMPTS")]
    pub prompts: PathBuf,
    /// Denoising steps (default: the model's).
    #[arg(long, env = "RELAYFARM_STEPS")]
    pub steps: Option<u32>,
    /// Image height in pixels (default: the model's).
    #[arg(long, env = "RELAYFARM_HEIGHT")]
    pub height: Option<u32>,
    /// Image width in pixels (default: the model's).
    #[arg(long, env = "RELAYFARM_WIDTH")]
    pub width: Option<u32>,
    /// Classifier-free guidance scale (default: the model's).
    #[arg(long, env = "RELAYFARM_GUIDANCE")]
    pub guidance: Option<f64>,
    /// Base seed: prompt i gets seed + i unless its line sets one (default: random).
    #[arg(long, env = "RELAYFARM_SEED")]
    pub seed: Option<u64>,
    /// Negative prompt for every image (lines may override it).
    #[arg(long, env = "RELAYFARM_NEGATIVE_PROMPT")]
    pub negative_prompt: Option<String>,
    /// Generate at exactly height x width (no aspect-ratio binning; sides must then be
    /// multiples of the model's size multiple).
    #[arg(long, env = "RELAYFARM_NO_RESOLUTION_BINNING")]
    pub no_resolution_binning: bool,
    /// A human label for the batch.
    #[arg(long, env = "RELAYFARM_LABEL", default_value = "")]
    pub label: String,
    /// Idempotency key: submitting the same key again returns the same batch. Default: a
    /// fresh key per invocation (reused by this invocation's own retries).
    #[arg(long, env = "RELAYFARM_IDEMPOTENCY_KEY")]
    pub idempotency_key: Option<String>,
    /// Follow the batch until it is done (progress bar; exit non-zero if a job failed).
    #[arg(long, env = "RELAYFARM_WAIT")]
    pub wait: bool,
    /// With --wait: download each image into this folder as it completes (existing files
    /// are skipped).
    #[arg(long, env = "RELAYFARM_OUT", requires = "wait")]
    pub out: Option<PathBuf>,
    /// Do not draw the progress bar.
    #[arg(long, env = "RELAYFARM_NO_PROGRESS")]
    pub no_progress: bool,
}

/// Converts core render parameters to their wire form.
pub fn params_to_proto(p: &relayfarm_core::RenderParams) -> pb::RenderParams {
    pb::RenderParams {
        negative_prompt: p.negative_prompt.clone(),
        height: p.height,
        width: p.width,
        steps: p.steps,
        guidance: p.guidance,
        seed: p.seed,
    }
}

/// The batch header for `args` with the given idempotency key.
pub fn build_header(args: &SubmitArgs, idempotency_key: &str) -> BatchHeader {
    let defaults = relayfarm_core::RenderParams {
        negative_prompt: args.negative_prompt.clone(),
        height: args.height,
        width: args.width,
        steps: args.steps,
        guidance: args.guidance,
        seed: args.seed,
    };
    BatchHeader {
        model: args.model.clone(),
        defaults: Some(params_to_proto(&defaults)),
        idempotency_key: idempotency_key.to_string(),
        label: args.label.clone(),
        no_resolution_binning: args.no_resolution_binning,
    }
}

/// One prompt line as a `PromptItem`.
pub fn prompt_item(line: &PromptLine) -> PromptItem {
    PromptItem {
        prompt: line.prompt.clone(),
        params: Some(params_to_proto(&line.params)),
        name: line.name.clone().unwrap_or_default(),
    }
}

/// The `SubmitBatch` request stream: the header, then one item per line, generated lazily.
pub fn request_stream(
    header: BatchHeader,
    lines: Arc<Vec<PromptLine>>,
) -> impl Stream<Item = SubmitBatchRequest> + Send + 'static {
    let n = lines.len();
    tokio_stream::iter((0..=n).map(move |i| {
        let item = match i.checked_sub(1).and_then(|j| lines.get(j)) {
            None => Item::Header(header.clone()),
            Some(line) => Item::Prompt(prompt_item(line)),
        };
        SubmitBatchRequest { item: Some(item) }
    }))
}

/// A fresh idempotency key for this invocation: a hash of the model, the file, the flags and
/// a random per-process nonce.
pub fn derive_idempotency_key(args: &SubmitArgs, file_text: &str) -> String {
    let seed = std::collections::hash_map::RandomState::new();
    let mut h = seed.build_hasher();
    args.model.hash(&mut h);
    file_text.hash(&mut h);
    format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{}|{}",
        args.steps,
        args.height,
        args.width,
        args.guidance,
        args.seed,
        args.negative_prompt,
        args.no_resolution_binning,
        args.label
    )
    .hash(&mut h);
    std::process::id().hash(&mut h);
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        t.as_nanos().hash(&mut h);
    }
    let a = h.finish();
    let b = std::collections::hash_map::RandomState::new().hash_one(a);
    format!("cli-{a:016x}{b:016x}")
}

/// Adds "(line L of FILE)" to a coordinator message that names `prompts[i]`.
pub fn annotate_prompt_index(
    message: &str,
    lines: &[PromptLine],
    file: &std::path::Path,
) -> String {
    let Some(start) = message.find("prompts[") else {
        return message.to_string();
    };
    let rest = &message[start + "prompts[".len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    match digits.parse::<usize>().ok().and_then(|i| lines.get(i)) {
        Some(line) if rest[digits.len()..].starts_with(']') => {
            format!("{message} (line {} of {})", line.line, file.display())
        }
        _ => message.to_string(),
    }
}

/// The result of a submit (and, with `--wait`, of following the batch).
#[derive(Debug, Clone, Default)]
#[cfg_attr(not(test), allow(dead_code))]
pub struct SubmitOutcome {
    /// The batch id.
    pub batch_id: String,
    /// Prompts the coordinator accepted.
    pub accepted: u32,
    /// The key matched an existing batch.
    pub deduplicated: bool,
    /// Process exit status (0 = done with no failures, or not waiting).
    pub exit: u8,
    /// Images written to `--out`.
    pub downloaded: usize,
    /// Images already present in `--out`.
    pub already_present: usize,
    /// Distinct images reported ready.
    pub images: usize,
    /// Failed jobs: job id → (index, reason).
    pub failed: BTreeMap<String, (u32, String)>,
}

/// Sends the batch, retrying retryable errors with the same idempotency key.
async fn submit_with_retries(
    client: &mut Client,
    url: &str,
    header: BatchHeader,
    lines: Arc<Vec<PromptLine>>,
    prompts_file: &std::path::Path,
) -> anyhow::Result<SubmitBatchResponse> {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(4));
    let mut attempt = 1;
    loop {
        match client
            .submit_batch(request_stream(header.clone(), lines.clone()))
            .await
        {
            Ok(resp) => return Ok(resp.into_inner()),
            Err(status) if is_retryable(&status) && attempt < SUBMIT_ATTEMPTS => {
                let delay = backoff.next_delay();
                eprintln!(
                    "retrying in {} ms (attempt {}/{SUBMIT_ATTEMPTS}, same idempotency key) after: {}",
                    delay.as_millis(),
                    attempt + 1,
                    describe_status(url, "submit", &status),
                );
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                let msg = annotate_prompt_index(status.message(), &lines, prompts_file);
                return Err(status_error(
                    url,
                    "submit",
                    &tonic::Status::invalid_argument(msg),
                ));
            }
            Err(status) => return Err(status_error(url, "submit", &status)),
        }
    }
}

/// Follows the batch: counts images/failures, downloads images to `out`.
struct Collector {
    client: Client,
    url: String,
    out: Option<PathBuf>,
    bar: BatchProgress,
    images: HashMap<String, String>,
    failed: BTreeMap<String, (u32, String)>,
    cancelled: HashSet<String>,
    pending: Vec<String>,
    download_errors: BTreeMap<String, String>,
    downloaded: usize,
    already_present: usize,
}

impl Collector {
    /// Downloads one image; a retryable RPC failure leaves it pending for later.
    async fn fetch_one(&mut self, image_ref: &str) -> bool {
        let Some(dir) = self.out.clone() else {
            return true;
        };
        match download(&mut self.client, image_ref, &dir).await {
            Ok(Downloaded::Written(_)) => {
                self.downloaded += 1;
                true
            }
            Ok(Downloaded::AlreadyPresent(_)) => {
                self.already_present += 1;
                true
            }
            Err(DownloadError::Rpc(s)) if super::is_retryable(&s) => {
                tracing::debug!(image_ref, error = %s.message(), "download deferred");
                false
            }
            Err(e) => {
                let line = e.describe(&self.url, image_ref);
                self.bar.println(&line);
                self.download_errors.insert(image_ref.to_string(), line);
                true
            }
        }
    }

    /// Retries deferred downloads for up to `limit`.
    async fn flush_pending(&mut self, limit: Duration) {
        let started = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(2));
        while !self.pending.is_empty() {
            let refs = std::mem::take(&mut self.pending);
            for r in refs {
                if !self.fetch_one(&r).await {
                    self.pending.push(r);
                }
            }
            if self.pending.is_empty() {
                break;
            }
            if started.elapsed() >= limit {
                for r in std::mem::take(&mut self.pending) {
                    let msg = format!(
                        "fetch {r}: the coordinator at {} stayed unavailable",
                        self.url
                    );
                    self.download_errors.insert(r, msg);
                }
                break;
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
}

impl EventHandler for Collector {
    async fn on_event(&mut self, event: &BatchEvent) -> anyhow::Result<()> {
        match &event.kind {
            Some(Kind::Image(img)) if !self.images.contains_key(&event.job_id) => {
                self.images
                    .insert(event.job_id.clone(), img.image_ref.clone());
                self.bar.image_done();
                self.failed.remove(&event.job_id);
                // Earlier deferred downloads first, then this one.
                let mut refs = std::mem::take(&mut self.pending);
                refs.push(img.image_ref.clone());
                for r in refs {
                    if !self.fetch_one(&r).await {
                        self.pending.push(r);
                    }
                }
            }
            Some(Kind::Failed(f))
                if !self.images.contains_key(&event.job_id)
                    && !self.failed.contains_key(&event.job_id) =>
            {
                self.failed
                    .insert(event.job_id.clone(), (event.index, f.reason.clone()));
                self.bar.job_failed();
                self.bar.println(&format!(
                    "job #{} {} failed: {}",
                    event.index, event.job_id, f.reason
                ));
            }
            Some(Kind::Cancelled(_)) if !self.cancelled.contains(&event.job_id) => {
                self.cancelled.insert(event.job_id.clone());
                self.bar.job_cancelled();
            }
            _ => {}
        }
        Ok(())
    }

    fn on_reconnect(&mut self, after: &str, reason: &str) {
        self.bar.println(&format!(
            "lost the event stream ({reason}); reconnecting after event {after:?}"
        ));
    }
}

/// Runs a submit end to end; writes the batch id as the first line of `stdout`.
pub async fn execute(
    args: &SubmitArgs,
    stdout: &mut (dyn Write + Send),
) -> anyhow::Result<SubmitOutcome> {
    execute_with(args, stdout, &FollowOptions::default()).await
}

/// [`execute`] with explicit follow options (tests shorten the reconnect delays).
pub async fn execute_with(
    args: &SubmitArgs,
    stdout: &mut (dyn Write + Send),
    follow_opts: &FollowOptions,
) -> anyhow::Result<SubmitOutcome> {
    let url = super::normalize_url(&args.coordinator.coordinator);
    let text = tokio::fs::read_to_string(&args.prompts)
        .await
        .with_context(|| format!("--prompts {}: cannot read the file", args.prompts.display()))?;
    let lines =
        parse_prompt_set(&text).with_context(|| format!("--prompts {}", args.prompts.display()))?;
    let lines = Arc::new(lines);
    if let Some(out) = &args.out {
        tokio::fs::create_dir_all(out)
            .await
            .with_context(|| format!("--out {}: cannot create the folder", out.display()))?;
    }
    let key = match &args.idempotency_key {
        Some(k) if !k.is_empty() => k.clone(),
        _ => derive_idempotency_key(args, &text),
    };
    let header = build_header(args, &key);
    let mut client = connect(&url)?;
    let resp = submit_with_retries(&mut client, &url, header, lines.clone(), &args.prompts).await?;
    writeln!(stdout, "{}", resp.batch_id)?;
    stdout.flush()?;
    eprintln!(
        "batch {}: {} prompts accepted{}",
        resp.batch_id,
        resp.accepted,
        if resp.deduplicated {
            " (existing batch with the same idempotency key)"
        } else {
            ""
        }
    );
    let mut outcome = SubmitOutcome {
        batch_id: resp.batch_id.clone(),
        accepted: resp.accepted,
        deduplicated: resp.deduplicated,
        ..Default::default()
    };
    if !args.wait {
        return Ok(outcome);
    }

    let total = if resp.accepted > 0 {
        resp.accepted as usize
    } else {
        lines.len()
    };
    let mut collector = Collector {
        client: client.clone(),
        url: url.clone(),
        out: args.out.clone(),
        bar: BatchProgress::new(Some(total as u64), !args.no_progress),
        images: HashMap::new(),
        failed: BTreeMap::new(),
        cancelled: HashSet::new(),
        pending: Vec::new(),
        download_errors: BTreeMap::new(),
        downloaded: 0,
        already_present: 0,
    };
    let followed = tokio::select! {
        r = async {
            let done = follow(&mut client, &url, &resp.batch_id, "", follow_opts, &mut collector).await?;
            collector.flush_pending(follow_opts.reconnect_for).await;
            anyhow::Ok(done)
        } => Some(r),
        _ = interrupted() => None,
    };
    collector.bar.finish();
    let done = match followed {
        None => {
            eprintln!(
                "interrupted; batch {id} keeps running on the farm: `relayfarm watch {id}` to follow it, \
                 `relayfarm fetch --batch {id} --out DIR` to download its images",
                id = resp.batch_id
            );
            outcome.exit = super::EXIT_INTERRUPTED;
            return Ok(outcome);
        }
        Some(r) => r?,
    };

    // The coordinator's counts are authoritative; fill in reasons we did not see as events.
    if done.failed as usize > collector.failed.len()
        || done.cancelled as usize > collector.cancelled.len()
    {
        if let Ok(batch) = client
            .get_batch(GetBatchRequest {
                batch_id: resp.batch_id.clone(),
                include_jobs: true,
            })
            .await
        {
            for job in batch.into_inner().jobs {
                match job.state() {
                    JobState::Failed => {
                        collector
                            .failed
                            .entry(job.job_id.clone())
                            .or_insert((job.index, job.error.clone()));
                    }
                    JobState::Cancelled => {
                        collector.cancelled.insert(job.job_id.clone());
                    }
                    _ => {}
                }
            }
        }
    }

    outcome.downloaded = collector.downloaded;
    outcome.already_present = collector.already_present;
    outcome.images = collector.images.len();
    outcome.failed = collector.failed.clone();
    let ok = done.failed == 0 && done.cancelled == 0 && collector.download_errors.is_empty();
    let mut summary = format!(
        "batch {}: {} done, {} failed, {} cancelled",
        resp.batch_id, done.done, done.failed, done.cancelled
    );
    if args.out.is_some() {
        summary.push_str(&format!(
            "; {} downloaded, {} already present",
            collector.downloaded, collector.already_present
        ));
    }
    eprintln!("{summary}");
    if !ok {
        if !collector.failed.is_empty() {
            eprintln!("failed jobs:");
            let mut by_index: Vec<_> = collector.failed.iter().collect();
            by_index.sort_by_key(|(_, (i, _))| *i);
            for (job_id, (index, reason)) in by_index {
                eprintln!("  #{index} {job_id}: {reason}");
            }
        }
        if !collector.cancelled.is_empty() {
            eprintln!("{} jobs were cancelled", collector.cancelled.len());
        }
        if !collector.download_errors.is_empty() {
            eprintln!("downloads that failed:");
            for line in collector.download_errors.values() {
                eprintln!("  {line}");
            }
        }
        outcome.exit = super::EXIT_FAILED_JOBS;
    }
    Ok(outcome)
}

/// Runs `relayfarm submit`.
pub fn run(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    super::block_on(async move {
        let mut stdout = std::io::stdout();
        let outcome = execute(&args, &mut stdout).await?;
        Ok(ExitCode::from(outcome.exit))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SubmitArgs,
    }

    fn parse(extra: &[&str]) -> SubmitArgs {
        let mut argv = vec![
            "x",
            "--coordinator",
            "127.0.0.1:1",
            "--model",
            "tiny",
            "--prompts",
            "p.txt",
        ];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).unwrap().args
    }

    #[test]
    fn flags_become_the_header() {
        let a = parse(&[
            "--steps",
            "3",
            "--height",
            "32",
            "--width",
            "48",
            "--guidance",
            "2.5",
            "--seed",
            "9",
            "--negative-prompt",
            "blurry",
            "--no-resolution-binning",
            "--label",
            "L",
        ]);
        let h = build_header(&a, "k1");
        assert_eq!(h.model, "tiny");
        assert_eq!(h.idempotency_key, "k1");
        assert_eq!(h.label, "L");
        assert!(h.no_resolution_binning);
        let d = h.defaults.unwrap();
        assert_eq!(
            (d.steps, d.height, d.width, d.guidance, d.seed),
            (Some(3), Some(32), Some(48), Some(2.5), Some(9))
        );
        assert_eq!(d.negative_prompt.as_deref(), Some("blurry"));

        let a = parse(&[]);
        let h = build_header(&a, "k");
        assert!(!h.no_resolution_binning);
        assert_eq!(h.defaults.unwrap(), pb::RenderParams::default());
    }

    #[test]
    fn out_requires_wait() {
        let argv = [
            "x",
            "--coordinator",
            "c",
            "--model",
            "m",
            "--prompts",
            "p",
            "--out",
            "d",
        ];
        assert!(Cli::try_parse_from(argv).is_err());
        let a = parse(&["--wait", "--out", "d"]);
        assert!(a.wait && a.out.is_some());
    }

    #[test]
    fn lines_become_items_lazily() {
        let lines = parse_prompt_set(
            "a cat\n{\"prompt\": \"a dog\", \"steps\": 5, \"seed\": 7, \"name\": \"dog\"}\n",
        )
        .unwrap();
        let header = build_header(&parse(&[]), "k");
        let reqs: Vec<_> = futures_lite_collect(request_stream(header.clone(), Arc::new(lines)));
        assert_eq!(reqs.len(), 3);
        assert_eq!(reqs[0].item, Some(Item::Header(header)));
        match &reqs[2].item {
            Some(Item::Prompt(p)) => {
                assert_eq!(p.prompt, "a dog");
                assert_eq!(p.name, "dog");
                let params = p.params.clone().unwrap();
                assert_eq!(
                    (params.steps, params.seed, params.height),
                    (Some(5), Some(7), None)
                );
            }
            other => panic!("{other:?}"),
        }
        match &reqs[1].item {
            Some(Item::Prompt(p)) => {
                assert_eq!((p.prompt.as_str(), p.name.as_str()), ("a cat", ""))
            }
            other => panic!("{other:?}"),
        }
    }

    fn futures_lite_collect<S: Stream<Item = SubmitBatchRequest>>(s: S) -> Vec<SubmitBatchRequest> {
        use tokio_stream::StreamExt;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(s.collect::<Vec<_>>())
    }

    #[test]
    fn keys_differ_per_invocation() {
        let a = parse(&[]);
        let k1 = derive_idempotency_key(&a, "x");
        let k2 = derive_idempotency_key(&a, "x");
        assert!(k1.starts_with("cli-") && k1.len() == 36, "{k1}");
        assert_ne!(k1, k2);
    }

    #[test]
    fn invalid_argument_names_the_file_line() {
        let lines = parse_prompt_set("# c\na\n\nb\n").unwrap();
        let m = annotate_prompt_index(
            "prompts[1].height: 50 is not a multiple of 16",
            &lines,
            std::path::Path::new("p.txt"),
        );
        assert_eq!(
            m,
            "prompts[1].height: 50 is not a multiple of 16 (line 4 of p.txt)"
        );
        assert_eq!(
            annotate_prompt_index("header.model: unknown", &lines, std::path::Path::new("p")),
            "header.model: unknown"
        );
        assert_eq!(
            annotate_prompt_index("prompts[9].x", &lines, std::path::Path::new("p")),
            "prompts[9].x"
        );
    }
}
