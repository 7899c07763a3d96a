//! Downloading images (`FetchImage` chunks) and the `relayfarm fetch` command.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use relayfarm_proto::v1::{FetchImageRequest, GetBatchRequest, JobState};
use tonic::Status;

use super::{connect, status_error, Client, CoordinatorArgs};

/// What a download did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Downloaded {
    /// Written to this path.
    Written(PathBuf),
    /// The file was already there; nothing fetched.
    AlreadyPresent(PathBuf),
}

/// Why a download failed.
#[derive(Debug)]
pub enum DownloadError {
    /// The coordinator call failed (maybe retryable; see [`super::is_retryable`]).
    Rpc(Status),
    /// Anything else (bad reference, short stream, disk error).
    Other(anyhow::Error),
}

impl DownloadError {
    /// A one-line description.
    pub fn describe(&self, url: &str, image_ref: &str) -> String {
        match self {
            DownloadError::Rpc(s) => super::describe_status(url, &format!("fetch {image_ref}"), s),
            DownloadError::Other(e) => format!("fetch {image_ref}: {e:#}"),
        }
    }
}

/// The local file name for an image reference: its last path component.
pub fn local_name(image_ref: &str) -> anyhow::Result<String> {
    let name = image_ref.rsplit(['/', '\\']).next().unwrap_or_default();
    if name.is_empty() || name == "." || name == ".." {
        anyhow::bail!("image reference {image_ref:?} has no file name");
    }
    Ok(name.to_string())
}

/// Downloads `image_ref` into `dir/<file name of the ref>` (atomic write). Skips the download
/// when the file already exists.
pub async fn download(
    client: &mut Client,
    image_ref: &str,
    dir: &Path,
) -> Result<Downloaded, DownloadError> {
    let name = local_name(image_ref).map_err(DownloadError::Other)?;
    let dest = dir.join(name);
    if dest.exists() {
        return Ok(Downloaded::AlreadyPresent(dest));
    }
    let mut stream = client
        .fetch_image(FetchImageRequest {
            image_ref: image_ref.to_string(),
        })
        .await
        .map_err(DownloadError::Rpc)?
        .into_inner();
    let mut bytes: Vec<u8> = Vec::new();
    let mut total: Option<u64> = None;
    while let Some(chunk) = stream.message().await.map_err(DownloadError::Rpc)? {
        if chunk.offset != bytes.len() as u64 {
            return Err(DownloadError::Other(anyhow::anyhow!(
                "chunk at offset {} but {} bytes received so far",
                chunk.offset,
                bytes.len()
            )));
        }
        if chunk.total > 0 {
            total = Some(chunk.total);
            if bytes.capacity() == 0 {
                bytes.reserve(usize::try_from(chunk.total).unwrap_or(0));
            }
        }
        bytes.extend_from_slice(&chunk.data);
    }
    if let Some(t) = total {
        if t != bytes.len() as u64 {
            return Err(DownloadError::Other(anyhow::anyhow!(
                "stream ended after {} of {t} bytes",
                bytes.len()
            )));
        }
    }
    let dest_for_write = dest.clone();
    tokio::task::spawn_blocking(move || relayfarm_core::write_atomic(&dest_for_write, &bytes))
        .await
        .map_err(|e| DownloadError::Other(anyhow::anyhow!("write task failed: {e}")))?
        .with_context(|| format!("cannot write {}", dest.display()))
        .map_err(DownloadError::Other)?;
    Ok(Downloaded::Written(dest))
}

/// `relayfarm fetch`: download one image, or every finished image of a batch.
#[derive(clap::Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["image_ref", "batch"])))]
pub struct FetchArgs {
    /// An image reference (as printed by `relayfarm watch`, e.g. BATCH/00001-cat.png).
    #[arg(env = "RELAYFARM_IMAGE_REF")]
    pub image_ref: Option<String>,
    /// Download every finished image of this batch instead.
    #[arg(long, env = "RELAYFARM_BATCH")]
    pub batch: Option<String>,
    /// Output folder (created if missing); existing files are skipped.
    #[arg(long, env = "RELAYFARM_OUT")]
    pub out: PathBuf,
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
}

/// Runs `relayfarm fetch`. Non-zero when a download failed.
pub fn run(args: FetchArgs) -> anyhow::Result<ExitCode> {
    super::block_on(async move {
        let url = args.coordinator.coordinator.clone();
        let mut client = connect(&url)?;
        std::fs::create_dir_all(&args.out)
            .with_context(|| format!("--out {}: cannot create the folder", args.out.display()))?;
        let refs: Vec<String> = match (&args.image_ref, &args.batch) {
            (Some(r), _) => vec![r.clone()],
            (None, Some(batch_id)) => {
                let batch = client
                    .get_batch(GetBatchRequest {
                        batch_id: batch_id.clone(),
                        include_jobs: true,
                    })
                    .await
                    .map_err(|s| status_error(&url, &format!("get batch {batch_id}"), &s))?
                    .into_inner();
                let mut refs = Vec::new();
                let mut unfinished = 0usize;
                for job in &batch.jobs {
                    if !job.image_ref.is_empty() {
                        refs.push(job.image_ref.clone());
                    } else if job.state() != JobState::Failed && job.state() != JobState::Cancelled
                    {
                        unfinished += 1;
                    }
                }
                eprintln!(
                    "batch {batch_id}: {} images available, {} jobs not finished yet, {} failed, {} cancelled",
                    refs.len(),
                    unfinished,
                    batch.failed,
                    batch.cancelled
                );
                refs
            }
            (None, None) => anyhow::bail!("give an IMAGE_REF or --batch ID"),
        };
        let (mut written, mut present, mut failed) = (0usize, 0usize, 0usize);
        for r in &refs {
            match download(&mut client, r, &args.out).await {
                Ok(Downloaded::Written(p)) => {
                    written += 1;
                    println!("{}", p.display());
                }
                Ok(Downloaded::AlreadyPresent(_)) => present += 1,
                Err(e) => {
                    failed += 1;
                    eprintln!("{}", e.describe(&url, r));
                }
            }
        }
        eprintln!("{written} downloaded, {present} already present, {failed} failed");
        Ok(if failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(super::EXIT_FAILED_JOBS)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_names() {
        assert_eq!(local_name("b1/00001-cat.png").unwrap(), "00001-cat.png");
        assert_eq!(local_name("x.png").unwrap(), "x.png");
        assert!(local_name("b1/").is_err());
        assert!(local_name("b1/..").is_err());
    }
}
