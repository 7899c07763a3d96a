//! `--model org/name`: download a diffusers repository from the Hugging Face Hub (when the
//! network allows) into the standard cache, and use its snapshot folder.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Whether `s` looks like a hub repository id (`org/name`) rather than a local path.
pub fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && *p != "."
                && *p != ".."
        })
}

/// Files a diffusers pipeline needs: configs, tokenizer files and safetensors weights (no
/// PyTorch pickles, ONNX or Flax copies).
fn wanted(file: &str) -> bool {
    let name = file.rsplit('/').next().unwrap_or(file);
    name.ends_with(".json")
        || name.ends_with(".safetensors")
        || name.ends_with(".model")
        || name.ends_with(".txt")
}

/// Downloads `repo_id` (all files a pipeline needs) and returns the local snapshot folder.
#[cfg(feature = "hub")]
pub fn download(repo_id: &str) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_progress(true)
        .build()
        .context("cannot start the Hugging Face Hub client")?;
    let repo = api.model(repo_id.to_string());
    let info = repo.info().with_context(|| {
        format!("cannot reach the Hugging Face Hub for `{repo_id}` (offline?); download the repository folder yourself and pass --model DIR")
    })?;
    let mut root: Option<PathBuf> = None;
    for s in info.siblings.iter().filter(|s| wanted(&s.rfilename)) {
        let path = repo
            .get(&s.rfilename)
            .with_context(|| format!("downloading {repo_id}/{}", s.rfilename))?;
        if s.rfilename == "model_index.json" {
            root = path.parent().map(Path::to_path_buf);
        }
    }
    match root {
        Some(r) => Ok(r),
        None => {
            bail!("`{repo_id}` has no model_index.json: it is not a diffusers pipeline repository")
        }
    }
}

/// Without the `hub` feature: a clear error.
#[cfg(not(feature = "hub"))]
pub fn download(repo_id: &str) -> Result<PathBuf> {
    bail!("`{repo_id}` looks like a hub id, but this build has no hub support (feature `hub`); download the repository and pass --model DIR")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_files() {
        assert!(looks_like_repo_id("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("../x"));
        assert!(wanted("text_encoder/model-00001-of-00002.safetensors"));
        assert!(wanted("tokenizer/spiece.model"));
        assert!(!wanted("transformer/diffusion_pytorch_model.bin"));
    }
}
