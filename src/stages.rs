//! `relayfarm stages`: a pipeline's stage graph with per-stage memory, for planning a
//! replica layout (which stage fits on which device, how many denoiser ranks).

use anyhow::{anyhow, Context, Result};
use clap::Args;
use relayfarm_models::checkpoint::PipelineFolder;
use relayfarm_models::pipeline::memory::{stage_estimates, suggest_tensor_parallel};
use relayfarm_models::pipeline::{load_pipeline, GenerateRequest, PipelineOptions, StageSet};
use relayfarm_models::RunDtype;
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `relayfarm stages`.
#[derive(Args, Debug)]
pub struct StagesArgs {
    /// Diffusers pipeline folder (default: the bundled tiny PixArt-Σ).
    #[arg(long, env = "RELAYFARM_MODEL")]
    pub model: Option<PathBuf>,
    /// Image height (default: the model's).
    #[arg(long)]
    pub height: Option<u32>,
    /// Image width (default: the model's).
    #[arg(long)]
    pub width: Option<u32>,
    /// Run dtype.
    #[arg(long, default_value = "f16", value_parser = ["f32", "f16", "bf16"])]
    pub dtype: String,
    /// Tensor-parallel ranks of the denoiser.
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Prefer this weight variant (e.g. fp16).
    #[arg(long)]
    pub variant: Option<String>,
    /// Memory of one device in GiB: also suggest a replica layout
    /// (`relayfarm-coordinator --replica-layout`) whose denoiser ranks fit in it.
    #[arg(long)]
    pub device_memory: Option<f64>,
}

/// Bytes in the largest binary unit that keeps the number ≥ 1.
fn human(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.2} {}", units[u])
}

/// Runs `relayfarm stages`.
pub fn run(args: StagesArgs) -> Result<ExitCode> {
    let dir = args
        .model
        .clone()
        .unwrap_or_else(|| PathBuf::from(crate::render::BUNDLED_MODEL));
    let dtype: RunDtype = args.dtype.parse().map_err(|e: String| anyhow!(e))?;
    let folder = PipelineFolder::open(&dir)
        .with_context(|| format!("--model {}", dir.display()))?
        .with_variant(args.variant.clone());
    // Configs only: no stage's weights are loaded.
    let opts = PipelineOptions {
        stages: StageSet::empty(),
        variant: args.variant.clone(),
        ..PipelineOptions::cpu(RunDtype::F32)
    };
    let pipeline = load_pipeline(&folder, &opts)?;
    let info = pipeline.info();
    let req = GenerateRequest {
        height: args.height,
        width: args.width,
        resolution_binning: false,
        ..GenerateRequest::new("plan", info.default_steps, info.default_guidance)
    };
    let plan = pipeline.validate(&req)?;
    let est = stage_estimates(&folder, dtype, &plan, info.max_sequence_length, args.tp)?;
    println!(
        "{} ({}) at {}×{}, {}, denoiser over {} rank(s):",
        info.class, info.family, plan.width, plan.height, args.dtype, args.tp
    );
    println!(
        "{:<13} {:<28} {:>14} {:>14} {:>14}",
        "stage", "components", "parameters", "weights", "activations"
    );
    for e in &est {
        println!(
            "{:<13} {:<28} {:>14} {:>14} {:>14}",
            e.stage.name(),
            e.components.join(","),
            e.parameters,
            human(e.weight_bytes),
            human(e.activation_bytes)
        );
    }
    println!("(weights per device; a tensor-parallel denoiser's per rank)");
    if let Some(gib) = args.device_memory {
        if !(gib.is_finite() && gib > 0.0) {
            anyhow::bail!("--device-memory {gib}: give the memory of one device in GiB, e.g. 80");
        }
        let bytes = (gib * (1u64 << 30) as f64) as u64;
        match suggest_tensor_parallel(&folder, dtype, &plan, info.max_sequence_length, bytes)? {
            Some((n, est)) => {
                println!("suggested replica layout for {gib} GiB devices: text-encoder=1,denoiser={n},vae=1");
                for e in est.iter().filter(|e| e.total_bytes() > bytes) {
                    println!(
                        "  warning: the {} stage needs {} and does not fit one device",
                        e.stage.name(),
                        human(e.total_bytes())
                    );
                }
            }
            None => println!(
                "no tensor-parallel degree up to 64 fits the denoiser in {gib} GiB per device at this size: use a smaller size or dtype"
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn human_sizes() {
        assert_eq!(super::human(512), "512.00 B");
        assert_eq!(super::human(3 << 29), "1.50 GiB");
    }
}
