//! Per-stage memory estimates: what the planner needs to place a pipeline's stages on devices.
//!
//! Weight bytes are exact: the parameter counts come from the safetensors headers of each
//! component (no tensor data is read), times the run dtype's size; a tensor-parallel denoiser
//! divides its weights over the ranks (the replicated norms and embeddings are small and
//! counted once per rank on top). Activation bytes are estimates of the peak working set of
//! one job of the given size with classifier-free guidance (batch 2), from the components'
//! configs:
//! - text encoder: `2 × L × d × 12` values (hidden states, Q/K/V, feed-forward);
//! - denoiser: `2 × N × D × 14` values, `N` image tokens (latent grid / patch), `D` the width,
//!   plus the text tokens; attention is fused (no `N²` score matrix);
//! - VAE decode: `3 × H × W × C₀` values at full resolution (`C₀` the first block's channels),
//!   plus the mid-block attention scores at latent resolution when the VAE has one.

use super::stage::Stage;
use super::SizePlan;
use crate::checkpoint::{resolve_weight_files, PipelineFolder};
use crate::{ModelError, Result, RunDtype};
use serde_json::Value;
use std::io::Read;
use std::path::Path;

/// The memory one stage needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageEstimate {
    /// The stage.
    pub stage: Stage,
    /// The pipeline components it holds (`text_encoder`, `transformer`, `vae`, ...).
    pub components: Vec<String>,
    /// Parameters of those components.
    pub parameters: u64,
    /// Weight bytes per device in the run dtype (per rank for a tensor-parallel denoiser).
    pub weight_bytes: u64,
    /// Estimated peak activation bytes for one job.
    pub activation_bytes: u64,
}

impl StageEstimate {
    /// Weights plus activations.
    pub fn total_bytes(&self) -> u64 {
        self.weight_bytes + self.activation_bytes
    }
}

/// The stage a pipeline component belongs to (`None` for weightless ones: tokenizer, scheduler).
pub fn stage_of_component(name: &str) -> Option<Stage> {
    match name {
        n if n.starts_with("text_encoder") => Some(Stage::TextEncoder),
        "transformer" | "unet" | "prior" => Some(Stage::Denoiser),
        "vae" => Some(Stage::Vae),
        _ => None,
    }
}

/// Parameters in a component's safetensors files (headers only).
pub fn component_parameters(dir: &Path, variant: Option<&str>) -> Result<u64> {
    let files = resolve_weight_files(dir, variant)?;
    let mut total = 0u64;
    for f in &files.files {
        total += file_parameters(f)?;
    }
    Ok(total)
}

fn file_parameters(path: &Path) -> Result<u64> {
    let corrupt = |why: String| ModelError::corrupt(path, why);
    let mut file = std::fs::File::open(path).map_err(|e| corrupt(e.to_string()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| corrupt(format!("no safetensors header ({e})")))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return Err(corrupt(format!(
            "safetensors header of {n} bytes is implausible"
        )));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)
        .map_err(|e| corrupt(format!("truncated safetensors header ({e})")))?;
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&header).map_err(|e| corrupt(format!("header: {e}")))?;
    Ok(header
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .filter_map(|(_, v)| v.get("shape")?.as_array().cloned())
        .map(|shape| shape.iter().filter_map(Value::as_u64).product::<u64>())
        .sum())
}

fn config(dir: &Path) -> Value {
    crate::checkpoint::read_json::<Value>(&dir.join("config.json")).unwrap_or(Value::Null)
}

fn num(cfg: &Value, keys: &[&str]) -> Option<u64> {
    keys.iter()
        .find_map(|k| cfg.get(*k).and_then(Value::as_u64))
}

/// Estimates every stage of the pipeline in `folder` for one job of `plan`'s size, with
/// `seq_len` text tokens, in `dtype`, the denoiser over `tensor_parallel` ranks.
pub fn stage_estimates(
    folder: &PipelineFolder,
    dtype: RunDtype,
    plan: &SizePlan,
    seq_len: usize,
    tensor_parallel: usize,
) -> Result<Vec<StageEstimate>> {
    let bytes = dtype.dtype().size_in_bytes() as u64;
    let tp = tensor_parallel.max(1) as u64;
    let (gh, gw) = (plan.gen_height as u64, plan.gen_width as u64);
    let variant = folder.variant();
    let mut out: Vec<StageEstimate> = Vec::new();
    for stage in Stage::ALL {
        let mut est = StageEstimate {
            stage,
            components: Vec::new(),
            parameters: 0,
            weight_bytes: 0,
            activation_bytes: 0,
        };
        for name in folder.index().components.keys() {
            if stage_of_component(name) != Some(stage) {
                continue;
            }
            let dir = folder.root().join(name);
            let params = component_parameters(&dir, variant)?;
            let cfg = config(&dir);
            est.components.push(name.clone());
            est.parameters += params;
            let split = if stage == Stage::Denoiser { tp } else { 1 };
            est.weight_bytes += params * bytes / split;
            est.activation_bytes += match stage {
                Stage::TextEncoder => {
                    let d = num(&cfg, &["d_model", "hidden_size"]).unwrap_or(4096);
                    2 * seq_len as u64 * d * 12 * bytes
                }
                Stage::Denoiser => {
                    let patch = num(&cfg, &["patch_size"]).unwrap_or(1);
                    let width = match (
                        num(&cfg, &["num_attention_heads"]),
                        num(&cfg, &["attention_head_dim"]),
                    ) {
                        (Some(h), Some(d)) => h * d,
                        _ => cfg
                            .get("block_out_channels")
                            .and_then(Value::as_array)
                            .and_then(|a| a.iter().filter_map(Value::as_u64).max())
                            .unwrap_or(1280),
                    };
                    let tokens = (gh / 8 / patch) * (gw / 8 / patch) + seq_len as u64;
                    2 * tokens * width * 14 * bytes / tp
                }
                Stage::Vae => {
                    let c0 = cfg
                        .get("block_out_channels")
                        .and_then(Value::as_array)
                        .and_then(|a| a.first())
                        .and_then(Value::as_u64)
                        .unwrap_or(128);
                    let mid_attention = cfg
                        .get("mid_block_add_attention")
                        .and_then(Value::as_bool)
                        .unwrap_or(true);
                    let latent_tokens = (gh / 8) * (gw / 8);
                    let scores = if mid_attention {
                        latent_tokens * latent_tokens * 4
                    } else {
                        0
                    };
                    3 * gh * gw * c0 * bytes + scores
                }
            };
        }
        out.push(est);
    }
    Ok(out)
}

/// The attention head counts of the denoiser's blocks (tensor parallelism splits heads, so a
/// rank count must divide each): `num_attention_heads` of a DiT, or the per-block head counts of
/// a UNet (SDXL configs store them in `attention_head_dim`). Empty when the config says nothing.
pub fn denoiser_head_counts(folder: &PipelineFolder) -> Vec<u64> {
    for name in folder.index().components.keys() {
        if stage_of_component(name) != Some(Stage::Denoiser) {
            continue;
        }
        let cfg = config(&folder.root().join(name));
        let list = |v: &Value| -> Vec<u64> {
            match v {
                Value::Array(a) => a.iter().filter_map(Value::as_u64).collect(),
                other => other.as_u64().into_iter().collect(),
            }
        };
        let heads = list(cfg.get("num_attention_heads").unwrap_or(&Value::Null));
        if !heads.is_empty() {
            return heads;
        }
        let per_block = list(cfg.get("attention_head_dim").unwrap_or(&Value::Null));
        // A UNet lists one entry per down block, attention or not: only blocks with
        // attention split heads.
        let Some(Value::Array(types)) = cfg.get("down_block_types") else {
            return per_block;
        };
        if per_block.len() != types.len() {
            return per_block;
        }
        return per_block
            .into_iter()
            .zip(types)
            .filter(|(_, t)| t.as_str().is_some_and(|t| t.contains("Attn")))
            .map(|(h, _)| h)
            .collect();
    }
    Vec::new()
}

/// The fewest denoiser ranks (a count that divides every block's heads, up to 64) whose
/// per-rank weights and activations fit in `device_bytes`, with the estimates at that count;
/// `None` when even 64 ranks do not fit.
pub fn suggest_tensor_parallel(
    folder: &PipelineFolder,
    dtype: RunDtype,
    plan: &SizePlan,
    seq_len: usize,
    device_bytes: u64,
) -> Result<Option<(usize, Vec<StageEstimate>)>> {
    let heads = denoiser_head_counts(folder);
    for n in 1..=64usize {
        if !heads.iter().all(|h| *h % n as u64 == 0) {
            continue;
        }
        let est = stage_estimates(folder, dtype, plan, seq_len, n)?;
        let fits = est
            .iter()
            .find(|e| e.stage == Stage::Denoiser)
            .is_some_and(|e| e.total_bytes() <= device_bytes);
        if fits {
            return Ok(Some((n, est)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_pixart_stages_add_up_to_its_files() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/pixart-sigma-tiny"
        );
        let folder = PipelineFolder::open(dir).unwrap();
        let plan = SizePlan {
            height: 64,
            width: 64,
            gen_height: 64,
            gen_width: 64,
        };
        let est = stage_estimates(&folder, RunDtype::F32, &plan, 300, 1).unwrap();
        assert_eq!(est.len(), 3);
        assert_eq!(est[0].components, ["text_encoder"]);
        assert_eq!(est[1].components, ["transformer"]);
        assert_eq!(est[2].components, ["vae"]);
        for e in &est {
            assert!(e.parameters > 0 && e.activation_bytes > 0, "{e:?}");
            assert_eq!(e.weight_bytes, e.parameters * 4);
        }
        assert_eq!(denoiser_head_counts(&folder), [2]);
        // A UNet: only the blocks with attention count (Kolors: DownBlock2D has none).
        let kolors = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/kolors-tiny"
        );
        assert_eq!(
            denoiser_head_counts(&PipelineFolder::open(kolors).unwrap()),
            [2, 4]
        );
        let denoiser = est[1].total_bytes();
        let (n, _) = suggest_tensor_parallel(&folder, RunDtype::F32, &plan, 300, denoiser)
            .unwrap()
            .unwrap();
        assert_eq!(n, 1);
        let (n, _) = suggest_tensor_parallel(&folder, RunDtype::F32, &plan, 300, denoiser - 1)
            .unwrap()
            .unwrap();
        assert_eq!(n, 2);
        assert!(
            suggest_tensor_parallel(&folder, RunDtype::F32, &plan, 300, 1)
                .unwrap()
                .is_none()
        );
        let tp2 = stage_estimates(&folder, RunDtype::F32, &plan, 300, 2).unwrap();
        assert_eq!(tp2[1].weight_bytes, est[1].weight_bytes / 2);
        assert_eq!(tp2[0], est[0]);
    }
}
