//! `relayfarm cancel`: cancel a batch (pending jobs are dropped, running ones stop at their
//! next step boundary).

use std::process::ExitCode;

use relayfarm_proto::v1::CancelBatchRequest;

use super::{connect, status_error, CoordinatorArgs};

/// `relayfarm cancel BATCH_ID`.
#[derive(clap::Args, Debug, Clone)]
pub struct CancelArgs {
    /// The batch to cancel.
    #[arg(env = "RELAYFARM_BATCH_ID")]
    pub batch_id: String,
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
}

/// Runs `relayfarm cancel`.
pub fn run(args: CancelArgs) -> anyhow::Result<ExitCode> {
    super::block_on(async move {
        let url = args.coordinator.coordinator.clone();
        let mut client = connect(&url)?;
        let resp = client
            .cancel_batch(CancelBatchRequest {
                batch_id: args.batch_id.clone(),
            })
            .await
            .map_err(|s| status_error(&url, &format!("cancel batch {}", args.batch_id), &s))?
            .into_inner();
        println!(
            "batch {}: {} pending jobs cancelled, {} running jobs stopping at their next step",
            args.batch_id, resp.cancelled_pending, resp.stopping_running
        );
        Ok(ExitCode::SUCCESS)
    })
}
