//! `relayfarm status [BATCH_ID]`: one batch's counts, or the recent batches.

use std::process::ExitCode;

use relayfarm_proto::v1::{Batch, BatchState, GetBatchRequest, JobState, ListBatchesRequest};

use super::models::table;
use super::{connect, status_error, CoordinatorArgs};

/// `relayfarm status`.
#[derive(clap::Args, Debug, Clone)]
pub struct StatusArgs {
    /// A batch id; without it, the most recent batches are listed.
    #[arg(env = "RELAYFARM_BATCH_ID")]
    pub batch_id: Option<String>,
    /// With BATCH_ID: also list the failed jobs with their reasons.
    #[arg(long, env = "RELAYFARM_JOBS")]
    pub jobs: bool,
    /// How many batches to list.
    #[arg(long, env = "RELAYFARM_LIMIT", default_value_t = 20)]
    pub limit: u32,
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
}

/// A batch state as a word.
pub fn state_word(state: BatchState) -> &'static str {
    match state {
        BatchState::Unspecified => "?",
        BatchState::Active => "active",
        BatchState::Done => "done",
        BatchState::Cancelled => "cancelled",
    }
}

/// The table row of a batch.
pub fn batch_row(b: &Batch) -> Vec<String> {
    vec![
        b.batch_id.clone(),
        b.model.clone(),
        state_word(b.state()).to_string(),
        b.total.to_string(),
        b.queued.to_string(),
        b.running.to_string(),
        b.done.to_string(),
        b.failed.to_string(),
        b.cancelled.to_string(),
        b.label.clone(),
    ]
}

const HEADER: [&str; 10] = [
    "BATCH",
    "MODEL",
    "STATE",
    "TOTAL",
    "QUEUED",
    "RUNNING",
    "DONE",
    "FAILED",
    "CANCELLED",
    "LABEL",
];

/// Runs `relayfarm status`.
pub fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    super::block_on(async move {
        let url = args.coordinator.coordinator.clone();
        let mut client = connect(&url)?;
        match &args.batch_id {
            Some(id) => {
                let b = client
                    .get_batch(GetBatchRequest {
                        batch_id: id.clone(),
                        include_jobs: args.jobs,
                    })
                    .await
                    .map_err(|s| status_error(&url, &format!("get batch {id}"), &s))?
                    .into_inner();
                print!("{}", table(&HEADER, &[batch_row(&b)]));
                let mut cancelled = 0usize;
                for job in &b.jobs {
                    match job.state() {
                        JobState::Failed => println!(
                            "  #{} {} failed after {} attempts: {}",
                            job.index, job.job_id, job.attempts, job.error
                        ),
                        JobState::Cancelled => cancelled += 1,
                        _ => {}
                    }
                }
                if cancelled > 0 {
                    println!("  {cancelled} jobs cancelled");
                }
            }
            None => {
                let batches = client
                    .list_batches(ListBatchesRequest { limit: args.limit })
                    .await
                    .map_err(|s| status_error(&url, "list batches", &s))?
                    .into_inner()
                    .batches;
                if batches.is_empty() {
                    eprintln!("no batches");
                } else {
                    let rows: Vec<Vec<String>> = batches.iter().map(batch_row).collect();
                    print!("{}", table(&HEADER, &rows));
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
