//! `relayfarm render`: one image (`--prompt`) or a resumable prompt set (`--prompts`), in
//! this process.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use relayfarm_coordinator::{EmbeddedQueue, JobState};
use relayfarm_core::write_atomic;
use relayfarm_core::{parse_prompt_set, JobId, JobSpec, RenderParams};
use relayfarm_models::checkpoint::PipelineFolder;
use relayfarm_models::pipeline::{PipelineOptions, StepEvent};
use relayfarm_models::RunDtype;
use relayfarm_worker::contact_sheet::contact_sheet;
use relayfarm_worker::runner::RenderJob;
use relayfarm_worker::stage::SplitPipeline;
use relayfarm_worker::{JobOutput, LocalResultStore, PipelineRunner};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The tiny random-weight PixArt-Σ folder that ships with the repository: it proves the whole
/// path (tokenizer → T5 → DiT → DPM-Solver → VAE → PNG), not the pictures.
pub const BUNDLED_MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/pixart-sigma-tiny"
);

/// Arguments of `relayfarm render`.
#[derive(Args, Debug)]
pub struct RenderArgs {
    /// Diffusers pipeline folder (the one with model_index.json), or a hub id (`org/name`,
    /// downloaded when the network allows). Default: the tiny
    /// random-weight PixArt-Σ folder bundled with relayfarm (proves the path, not the pictures).
    #[arg(long, env = "RELAYFARM_MODEL")]
    pub model: Option<PathBuf>,
    /// The prompt (one image).
    #[arg(long, conflicts_with = "prompts", required_unless_present = "prompts")]
    pub prompt: Option<String>,
    /// A prompt set: one prompt per line, or JSON Lines with per-line overrides
    /// (`{"prompt": "...", "seed": 3, "steps": 10, "height": 512, "width": 768, "negative_prompt": "...", "guidance": 4.5, "name": "file-stem"}`).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Negative prompt (default "").
    #[arg(long, env = "RELAYFARM_NEGATIVE_PROMPT")]
    pub negative_prompt: Option<String>,
    /// Output height in pixels (default: the model's size, 1024 for PixArt-Σ 1024-MS).
    #[arg(long)]
    pub height: Option<u32>,
    /// Output width in pixels (default: the model's size).
    #[arg(long)]
    pub width: Option<u32>,
    /// Denoising steps (default 20).
    #[arg(long, env = "RELAYFARM_STEPS")]
    pub steps: Option<u32>,
    /// Guidance scale (default 4.5; ≤ 1 turns classifier-free guidance off).
    #[arg(long, env = "RELAYFARM_GUIDANCE")]
    pub guidance: Option<f64>,
    /// Noise seed (default: random, printed and stored in the PNG). With --prompts, image i
    /// uses seed + i unless its line sets one.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Safetensors file whose tensor `latents` is the raw standard-normal initial noise in the
    /// latent shape [1, 4, H/8, W/8] (scaled by the scheduler's init sigma, like diffusers' `latents=`).
    #[arg(long, conflicts_with = "prompts")]
    pub latents: Option<PathBuf>,
    /// Write the final latents (before VAE decoding) as f32 tensor `latents` to this file.
    #[arg(long, conflicts_with = "prompts")]
    pub save_latents: Option<PathBuf>,
    /// Generate at exactly --height × --width instead of the closest aspect-ratio bin.
    #[arg(long)]
    pub no_resolution_binning: bool,
    /// Run dtype.
    #[arg(long, env = "RELAYFARM_DTYPE", default_value = "f32", value_parser = ["f32", "f16", "bf16"])]
    pub dtype: String,
    /// Output PNG for --prompt (default: relayfarm-<seed>.png).
    #[arg(long, conflicts_with = "prompts")]
    pub output: Option<PathBuf>,
    /// Output folder for --prompts; images already there are skipped (resumable).
    #[arg(long, default_value = "relayfarm-out")]
    pub out_dir: PathBuf,
    /// Use this transformer folder instead of the pipeline's (e.g. PixArt-Sigma-XL-2-2K-MS/transformer
    /// with the 1024-MS pipeline's T5 and VAE).
    #[arg(long)]
    pub transformer: Option<PathBuf>,
    /// Prefer this weight variant (e.g. fp16) when a folder has several.
    #[arg(long)]
    pub variant: Option<String>,
    /// Device: cpu, or cuda:N (needs a build with --features cuda).
    #[arg(long, env = "RELAYFARM_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Worker threads for the CPU backend (default: all cores).
    #[arg(long, env = "RELAYFARM_THREADS")]
    pub threads: Option<usize>,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Run the denoiser tensor-parallel over N ranks in this process: CPU threads with
    /// --device cpu, GPUs K..K+N-1 with NCCL for --device cuda:K (build with --features cuda).
    /// The attention heads must divide by N (PixArt-Σ XL has 16). Same latents as --tp 1.
    #[arg(long, env = "RELAYFARM_TP", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub tp: u16,
    /// Run the text encoder, the denoiser and the VAE as three executors (threads here, each
    /// loading only its own weights) joined by links, so that they work on different images at
    /// the same time. Same images and latents as without it.
    #[arg(long, env = "RELAYFARM_SPLIT")]
    pub split: bool,
    /// Skip the model's published size limits (e.g. CogView3-Plus' 512..=2048 px and 2^21
    /// pixels); the multiple the architecture needs is still enforced.
    #[arg(long)]
    pub no_size_check: bool,
    /// Use another scheduler than the checkpoint's: euler, dpm++, dpm++-karras (the Kolors
    /// recipe: 25 steps). Default: the one in scheduler/scheduler_config.json.
    #[arg(long, env = "RELAYFARM_SCHEDULER")]
    pub scheduler: Option<String>,
}

fn parse_device(s: &str) -> Result<Device> {
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    if let Some(n) = s
        .strip_prefix("cuda:")
        .or_else(|| (s == "cuda").then_some("0"))
    {
        let n: usize = n
            .parse()
            .map_err(|_| anyhow!("--device {s}: expected cpu or cuda:N"))?;
        return Device::new_cuda(n).map_err(|e| {
            anyhow!("--device {s}: CUDA is not available ({e}); this binary needs `--features cuda` and a GPU, or use --device cpu")
        });
    }
    bail!("--device {s}: expected cpu or cuda:N")
}

fn model_dir(args: &RenderArgs) -> Result<(PathBuf, String)> {
    match &args.model {
        Some(m) if !m.exists() && crate::hub::looks_like_repo_id(&m.to_string_lossy()) => {
            let id = m.to_string_lossy().into_owned();
            Ok((crate::hub::download(&id)?, id))
        }
        Some(m) => Ok((m.clone(), m.display().to_string())),
        None => {
            let p = PathBuf::from(BUNDLED_MODEL);
            if !p.is_dir() {
                bail!("no --model given and the bundled tiny model is not at {BUNDLED_MODEL}; pass --model DIR (a diffusers PixArt-Sigma folder)");
            }
            Ok((p, "pixart-sigma-tiny (bundled, random weights)".into()))
        }
    }
}

fn load_latents(path: &Path) -> Result<Tensor> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
        anyhow!("--latents {}: cannot read it as safetensors ({e}); write a safetensors file with an f32 tensor named `latents`", path.display())
    })?;
    let names: Vec<_> = tensors.keys().cloned().collect();
    tensors.get("latents").cloned().ok_or_else(|| {
        anyhow!(
            "--latents {}: no tensor named `latents` (found: {names:?})",
            path.display()
        )
    })
}

fn random_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    relayfarm_models::pipeline::noise::SplitMix64::new(t ^ (std::process::id() as u64) << 32)
        .next_u64()
        >> 11
}

/// Runs `relayfarm render`.
pub fn run(args: RenderArgs) -> Result<ExitCode> {
    if let Some(n) = args.threads {
        rayon_threads(n)?;
    }
    let dtype: RunDtype = args.dtype.parse().map_err(|e: String| anyhow!(e))?;
    let device = parse_device(&args.device)?;
    let latents = args.latents.as_deref().map(load_latents).transpose()?;
    // Read the prompt set before loading the model, so a bad file fails fast.
    let prompt_set = match &args.prompts {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("--prompts {}: cannot read the file", p.display()))?;
            Some(parse_prompt_set(&text).with_context(|| format!("--prompts {}", p.display()))?)
        }
        None => None,
    };
    let (dir, model_name) = model_dir(&args)?;
    let opts = PipelineOptions {
        variant: args.variant.clone(),
        transformer_dir: args.transformer.clone(),
        tensor_parallel: usize::from(args.tp),
        scheduler: args.scheduler.clone(),
        ..PipelineOptions::cpu(dtype)
    };
    let opts = PipelineOptions { device, ..opts };
    let started = std::time::Instant::now();
    let mut engine = Engine::load(&dir, &model_name, &opts, args.split)
        .with_context(|| format!("loading model {}", dir.display()))?;
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        split = args.split,
        "model loaded"
    );
    let base_seed = args.seed.unwrap_or_else(random_seed);
    match prompt_set {
        None => render_one(&args, &mut engine, latents, base_seed),
        Some(set) => render_set(&args, &mut engine, set, base_seed),
    }
}

/// How `render` runs the stages: one pipeline on this thread, or three stage executors.
enum Engine {
    /// Every stage on this thread.
    Whole(PipelineRunner),
    /// `--split`: three executors; the runner wraps the text-encoder stage's pipeline, which
    /// validates requests and writes the metadata.
    Split(PipelineRunner, SplitPipeline),
}

/// Jobs a split pipeline may hold at once (each link holds one, each stage works on one).
const SPLIT_WINDOW: usize = 4;

impl Engine {
    fn load(dir: &Path, model_name: &str, opts: &PipelineOptions, split: bool) -> Result<Self> {
        if !split {
            return Ok(Engine::Whole(PipelineRunner::load(dir, model_name, opts)?));
        }
        let folder = PipelineFolder::open(dir)?;
        let split = SplitPipeline::start(&folder, opts, None)?;
        let runner = PipelineRunner::from_pipeline(split.front(), model_name);
        Ok(Engine::Split(runner, split))
    }

    fn runner(&self) -> &PipelineRunner {
        match self {
            Engine::Whole(r) | Engine::Split(r, _) => r,
        }
    }

    /// Renders `jobs` in order, calling `done` with each result as it finishes; `on_step`
    /// sees denoiser steps (whole mode only: the split denoiser runs on its own thread).
    fn run_all(
        &mut self,
        jobs: Vec<(String, RenderJob)>,
        on_step: &mut dyn FnMut(&str, StepEvent),
        done: &mut dyn FnMut(&str, Result<JobOutput>),
    ) -> Result<()> {
        match self {
            Engine::Whole(runner) => {
                for (id, job) in jobs {
                    let span = tracing::info_span!("job", %id, seed = job.seed);
                    let mut observer = |e: StepEvent| {
                        on_step(&id, e);
                        ControlFlow::Continue(())
                    };
                    let out = span.in_scope(|| runner.run(&job, &mut observer));
                    done(&id, out.map_err(anyhow::Error::from));
                }
                Ok(())
            }
            Engine::Split(runner, split) => {
                let mut requests = std::collections::HashMap::new();
                let mut pending = jobs.into_iter();
                let mut in_flight = 0usize;
                loop {
                    while in_flight < SPLIT_WINDOW {
                        let Some((id, job)) = pending.next() else {
                            break;
                        };
                        let req = runner.request(&job);
                        split.submit(&id, req.clone())?;
                        requests.insert(id, req);
                        in_flight += 1;
                    }
                    if in_flight == 0 {
                        return Ok(());
                    }
                    let Some(out) = split.recv()? else {
                        bail!("the stage executors stopped with {in_flight} image(s) unfinished");
                    };
                    in_flight -= 1;
                    let result = match (out.result, requests.remove(&out.id)) {
                        (Ok(generated), Some(req)) => {
                            runner.finish(&req, generated).map_err(anyhow::Error::from)
                        }
                        (Ok(_), None) => Err(anyhow!("a stage returned an unknown job {}", out.id)),
                        (Err(e), _) => Err(e.into()),
                    };
                    done(&out.id, result);
                }
            }
        }
    }
}

fn rayon_threads(n: usize) -> Result<()> {
    // candle's CPU kernels use the global rayon pool (and honour RAYON_NUM_THREADS).
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    Ok(())
}

fn step_bar(quiet: bool, total: u64, prefix: String) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} steps {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(prefix);
    bar
}

fn job_from(args: &RenderArgs, prompt: &str, params: &RenderParams, seed: u64) -> RenderJob {
    RenderJob {
        prompt: prompt.to_string(),
        negative_prompt: params.negative_prompt.clone(),
        height: params.height,
        width: params.width,
        steps: params.steps,
        guidance: params.guidance,
        seed: params.seed.unwrap_or(seed),
        latents: None,
        resolution_binning: !args.no_resolution_binning,
        size_check: !args.no_size_check,
    }
}

fn defaults(args: &RenderArgs) -> RenderParams {
    RenderParams {
        negative_prompt: args.negative_prompt.clone(),
        height: args.height,
        width: args.width,
        steps: args.steps,
        guidance: args.guidance,
        seed: None,
    }
}

fn render_one(
    args: &RenderArgs,
    engine: &mut Engine,
    latents: Option<Tensor>,
    seed: u64,
) -> Result<ExitCode> {
    let prompt = args.prompt.as_deref().unwrap_or_default();
    let mut job = job_from(args, prompt, &defaults(args), seed);
    job.latents = latents;
    engine.runner().validate(&job)?;
    let steps = engine.runner().request(&job).steps as u64;
    let bar = step_bar(args.quiet, steps, "render".into());
    let mut on_step = |_: &str, e: StepEvent| {
        bar.set_position(e.step as u64);
        bar.set_message(format!("t={}", e.timestep));
    };
    let mut result = None;
    let seed = job.seed;
    engine.run_all(
        vec![(format!("seed-{seed}"), job)],
        &mut on_step,
        &mut |_, r| result = Some(r),
    )?;
    let out = result.ok_or_else(|| anyhow!("the image was not rendered"))??;
    bar.finish_and_clear();
    let job_seed = seed;
    let path = args
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("relayfarm-{job_seed}.png")));
    write_atomic(&path, &out.png).with_context(|| format!("writing {}", path.display()))?;
    if let Some(p) = &args.save_latents {
        let l = out.latents.to_dtype(candle_core::DType::F32)?;
        candle_core::safetensors::save(&[("latents", l)].into_iter().collect(), p)
            .with_context(|| format!("--save-latents {}", p.display()))?;
    }
    println!(
        "{} ({}x{}, seed {}, {} steps, guidance {})",
        path.display(),
        out.metadata.width,
        out.metadata.height,
        out.metadata.seed,
        out.metadata.steps,
        out.metadata.guidance
    );
    Ok(ExitCode::SUCCESS)
}

/// A file-name-safe slug of a prompt.
fn slug(prompt: &str) -> String {
    let mut s: String = prompt
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    while s.contains("--") {
        s = s.replace("--", "-");
    }
    let s = s.trim_matches('-');
    let s: String = s.chars().take(40).collect();
    if s.is_empty() {
        "image".into()
    } else {
        s.trim_end_matches('-').to_string()
    }
}

fn render_set(
    args: &RenderArgs,
    engine: &mut Engine,
    set: Vec<relayfarm_core::PromptLine>,
    base_seed: u64,
) -> Result<ExitCode> {
    let store = LocalResultStore::open(&args.out_dir)
        .with_context(|| format!("--out-dir {}: cannot create it", args.out_dir.display()))?;
    let batch_defaults = defaults(args);
    // Validate every line before rendering anything.
    let mut errors = Vec::new();
    let mut specs = Vec::new();
    for (i, line) in set.iter().enumerate() {
        let params = line.params.or(&batch_defaults);
        let job = job_from(
            args,
            &line.prompt,
            &params,
            base_seed.wrapping_add(i as u64),
        );
        if let Err(e) = engine.runner().validate(&job) {
            errors.push(format!("line {}: {e}", line.line));
        }
        let file = match &line.name {
            Some(n) => format!("{n}.png"),
            None => format!("{:05}-{}.png", i, slug(&line.prompt)),
        };
        specs.push((
            JobSpec {
                id: JobId(file.clone()),
                index: i,
                prompt: line.prompt.clone(),
                params: RenderParams {
                    seed: Some(job.seed),
                    ..params
                },
                name: line.name.clone(),
            },
            job,
        ));
    }
    if !errors.is_empty() {
        bail!(
            "the prompt set has {} invalid line(s); nothing was rendered:\n  {}",
            errors.len(),
            errors.join("\n  ")
        );
    }
    let mut queue = EmbeddedQueue::new();
    let mut jobs = std::collections::HashMap::new();
    for (spec, job) in specs {
        if store.contains(&spec.id.0) {
            queue.push_done(spec.clone(), store.path(&spec.id.0).display().to_string());
        } else if !queue.push(spec.clone()) {
            bail!(
                "two lines of the prompt set write the same file {}: give them different names",
                spec.id
            );
        }
        jobs.insert(spec.id.clone(), job);
    }
    let summary = queue.summary();
    let total = (summary.pending + summary.skipped) as u64;
    if summary.skipped > 0 {
        eprintln!(
            "resuming: {} of {} images already in {}",
            summary.skipped,
            total,
            store.dir().display()
        );
    }
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "[{elapsed_precise}] {bar:30} {pos}/{len} images (eta {eta}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(summary.skipped as u64);
    let mut claimed = Vec::new();
    while let Some(spec) = queue.claim() {
        if let Some(job) = jobs.remove(&spec.id) {
            claimed.push((spec.id.0.clone(), job));
        }
    }
    let mut on_step = |id: &str, e: StepEvent| {
        bar.set_message(format!("{id} step {}/{}", e.step, e.total));
    };
    let mut done = |id: &str, result: Result<JobOutput>| {
        let id = JobId(id.to_string());
        match result {
            Ok(out) => match store.put(&id.0, &out.png) {
                Ok(path) => {
                    queue.complete(&id, path.display().to_string());
                }
                Err(e) => queue.fail(&id, format!("cannot write the image: {e}")),
            },
            Err(e) => {
                tracing::error!(%id, error = %e, "job failed");
                queue.fail(&id, format!("{e:#}"));
            }
        }
        bar.inc(1);
    };
    engine.run_all(claimed, &mut on_step, &mut done)?;
    bar.finish_and_clear();
    let mut images = Vec::new();
    let mut failures = Vec::new();
    for (spec, state) in queue.jobs() {
        match state {
            JobState::Done(p) | JobState::Skipped(p) => images.push((spec.index, PathBuf::from(p))),
            JobState::Failed(r) => failures.push(format!("{}: {r}", spec.id)),
            JobState::Pending | JobState::Running => failures.push(format!("{}: not run", spec.id)),
        }
    }
    images.sort();
    let paths: Vec<&Path> = images.iter().map(|(_, p)| p.as_path()).collect();
    if !paths.is_empty() {
        let sheet = contact_sheet(&paths, 256, None);
        let sheet_path = store.path("contact-sheet.png");
        sheet
            .save(&sheet_path)
            .with_context(|| format!("writing {}", sheet_path.display()))?;
    }
    let s = queue.summary();
    println!(
        "{}: {} rendered, {} already there, {} failed; contact sheet {}",
        store.dir().display(),
        s.done,
        s.skipped,
        s.failed,
        store.path("contact-sheet.png").display()
    );
    if failures.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("failed jobs:\n  {}", failures.join("\n  "));
        Ok(ExitCode::from(1))
    }
}

#[cfg(test)]
mod tests {
    use super::slug;

    #[test]
    fn slugs() {
        assert_eq!(slug("A Red Cabin, at night!"), "a-red-cabin-at-night");
        assert_eq!(slug("一只猫"), "image");
    }
}
