//! The device thread: one OS thread owns the device and the loaded pipelines (TEI-style backend
//! thread). The async runtime sends it commands (payload + tracing span + oneshot reply) and
//! never blocks on a denoising step; step progress flows back through an unbounded channel and
//! cancellation flows in through an atomic flag checked at every step boundary.

use crate::png_output::{encode_png, Rgb8};
use crate::runner::{PipelineRunner, RenderJob};
use relayfarm_core::{GenerationMetadata, VERSION};
use relayfarm_models::pipeline::{
    DiffusionPipeline, PipelineOptions, PixArtSigmaPipeline, StepEvent,
};
use relayfarm_models::ModelError;
use relayfarm_proto::v1::{ModelInfo, SizeRules};
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use tokio::sync::oneshot;

/// The family name workers register for PixArt-Σ pipelines.
pub const PIXART_SIGMA_FAMILY: &str = "pixart-sigma";
/// The most denoising steps a job may ask for.
pub const MAX_STEPS: u32 = 1000;
/// The side of the PNG a no-op render writes.
pub const NOOP_SIDE: u32 = 8;

/// One model to serve: the name clients use and the pipeline folder (absent only in no-op mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// The model name jobs carry.
    pub name: String,
    /// Diffusers pipeline folder.
    pub dir: Option<PathBuf>,
}

impl std::str::FromStr for ModelSpec {
    type Err = String;

    /// Parses `NAME=DIR` (or a bare `NAME`, accepted for no-op workers).
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, dir) = match s.split_once('=') {
            Some((n, d)) => (n.trim(), Some(d.trim())),
            None => (s.trim(), None),
        };
        if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "--model {s:?}: expected NAME=DIR with a non-empty NAME without spaces (e.g. pixart-sigma=/models/PixArt-Sigma-XL-2-1024-MS)"
            ));
        }
        let dir = match dir {
            Some("") => return Err(format!("--model {s:?}: the folder after `=` is empty")),
            Some(d) => Some(PathBuf::from(d)),
            None => None,
        };
        Ok(ModelSpec {
            name: name.to_string(),
            dir,
        })
    }
}

/// The [`ModelInfo`] a worker registers for a loaded pipeline: its family, size rules
/// (PixArt-Σ: any size in 1..=8192 with resolution binning, multiples of the VAE factor × patch
/// size without; CogView3-Plus: the limits derived from its config), default size, steps,
/// guidance and scheduler.
pub fn model_info(name: &str, pipeline: &dyn DiffusionPipeline) -> ModelInfo {
    let info = pipeline.info();
    let s = &info.size;
    ModelInfo {
        name: name.to_string(),
        family: info.family.to_string(),
        pipeline_class: info.class.to_string(),
        size: Some(SizeRules {
            min_side: s.min_side as u32,
            max_side: s.max_side as u32,
            multiple: s.multiple as u32,
            max_area: s.max_area as u64,
            default_height: s.default_height as u32,
            default_width: s.default_width as u32,
            resolution_binning: s.resolution_binning,
        }),
        default_steps: info.default_steps as u32,
        default_guidance: info.default_guidance,
        max_steps: MAX_STEPS,
        workers: 0,
        scheduler: info.scheduler.clone(),
    }
}

/// The [`ModelInfo`] of a no-op model that has no folder: PixArt-Σ 1024-MS rules.
pub fn noop_model_info(name: &str) -> ModelInfo {
    ModelInfo {
        name: name.to_string(),
        family: PIXART_SIGMA_FAMILY.to_string(),
        pipeline_class: PixArtSigmaPipeline::CLASS.to_string(),
        size: Some(SizeRules {
            min_side: 1,
            max_side: relayfarm_models::pipeline::pixart_sigma::MAX_SIDE as u32,
            multiple: 16,
            max_area: 0,
            default_height: 1024,
            default_width: 1024,
            resolution_binning: true,
        }),
        default_steps: PixArtSigmaPipeline::DEFAULT_STEPS as u32,
        default_guidance: PixArtSigmaPipeline::DEFAULT_GUIDANCE,
        max_steps: MAX_STEPS,
        workers: 0,
        scheduler: "DPMSolverMultistepScheduler".to_string(),
    }
}

/// A finished render.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// The PNG file, generation metadata included.
    pub png: Vec<u8>,
    /// Output width in pixels.
    pub width: u32,
    /// Output height in pixels.
    pub height: u32,
    /// The seed used.
    pub seed: u64,
    /// Time spent rendering on the device thread, in milliseconds.
    pub render_ms: u64,
}

/// Why a render did not produce an image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// Stopped at a step boundary because the job was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The job itself is invalid (bad size, empty prompt, ...): retrying cannot help.
    #[error("{0}")]
    Invalid(String),
    /// Anything else (out of memory, device error, a panic in the model code): may succeed on
    /// another attempt.
    #[error("{0}")]
    Failed(String),
}

impl RenderError {
    /// Whether another attempt could succeed.
    pub fn retryable(&self) -> bool {
        matches!(self, RenderError::Failed(_))
    }
}

/// One step of progress: `(step, total)`, 1-based.
pub type Progress = (u32, u32);

/// A render command for the device thread.
pub struct RenderCommand {
    /// Which loaded model renders it.
    pub model: String,
    /// The job.
    pub job: RenderJob,
    /// The job's span, entered on the device thread.
    pub span: tracing::Span,
    /// Where step progress goes (never blocks the device thread).
    pub progress: tokio::sync::mpsc::UnboundedSender<Progress>,
    /// Set to stop at the next step boundary.
    pub cancel: Arc<AtomicBool>,
    /// The answer.
    pub reply: oneshot::Sender<Result<Rendered, RenderError>>,
}

enum Backend {
    Pipelines(HashMap<String, PipelineRunner>),
    Noop,
}

/// A handle on the device thread. Dropping it stops the thread after the command in hand.
pub struct DeviceThread {
    tx: Option<mpsc::Sender<RenderCommand>>,
    thread: Option<JoinHandle<()>>,
    models: Vec<ModelInfo>,
}

impl DeviceThread {
    /// Starts the thread and loads every model on it (blocking until all are loaded). A model
    /// folder that cannot be loaded is an error naming the model and its folder. With `noop`,
    /// models with a folder are still loaded (for their size rules) but never run.
    pub fn start(specs: &[ModelSpec], opts: PipelineOptions, noop: bool) -> anyhow::Result<Self> {
        let specs = specs.to_vec();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<Vec<ModelInfo>, String>>(1);
        let (tx, rx) = mpsc::channel::<RenderCommand>();
        let thread = std::thread::Builder::new()
            .name("relayfarm-device".into())
            .spawn(move || {
                let backend = match load_all(&specs, &opts, noop) {
                    Ok((backend, infos)) => {
                        let _ = ready_tx.send(Ok(infos));
                        backend
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                device_loop(backend, rx);
            })?;
        let models = match ready_rx.recv() {
            Ok(Ok(models)) => models,
            Ok(Err(e)) => {
                let _ = thread.join();
                anyhow::bail!(e)
            }
            Err(_) => {
                let _ = thread.join();
                anyhow::bail!("the device thread stopped while loading the models")
            }
        };
        Ok(DeviceThread {
            tx: Some(tx),
            thread: Some(thread),
            models,
        })
    }

    /// The [`ModelInfo`] of every loaded model, in `--model` order.
    pub fn models(&self) -> &[ModelInfo] {
        &self.models
    }

    /// Queues a command. Fails (giving the command back) when the thread has stopped.
    pub fn submit(&self, cmd: RenderCommand) -> Result<(), Box<RenderCommand>> {
        match &self.tx {
            Some(tx) => tx.send(cmd).map_err(|e| Box::new(e.0)),
            None => Err(Box::new(cmd)),
        }
    }

    /// Stops the thread after the command in hand and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for DeviceThread {
    fn drop(&mut self) {
        self.tx = None;
        // Do not join in drop: the thread finishes its command and exits on its own.
        self.thread = None;
    }
}

fn load_all(
    specs: &[ModelSpec],
    opts: &PipelineOptions,
    noop: bool,
) -> Result<(Backend, Vec<ModelInfo>), String> {
    let mut runners = HashMap::new();
    let mut infos = Vec::new();
    for spec in specs {
        match &spec.dir {
            Some(dir) => {
                let started = std::time::Instant::now();
                let runner = PipelineRunner::load(dir, &spec.name, opts).map_err(|e| {
                    format!(
                        "model `{}`: cannot load the pipeline folder {}: {e}",
                        spec.name,
                        dir.display()
                    )
                })?;
                tracing::info!(
                    model = %spec.name,
                    dir = %dir.display(),
                    ms = started.elapsed().as_millis() as u64,
                    "model loaded"
                );
                infos.push(model_info(&spec.name, runner.pipeline()));
                runners.insert(spec.name.clone(), runner);
            }
            None if noop => infos.push(noop_model_info(&spec.name)),
            None => {
                return Err(format!(
                    "model `{}`: no folder given; use --model {}=DIR (a bare name is only accepted with --noop)",
                    spec.name, spec.name
                ))
            }
        }
    }
    let backend = if noop {
        Backend::Noop
    } else {
        Backend::Pipelines(runners)
    };
    Ok((backend, infos))
}

fn device_loop(backend: Backend, rx: mpsc::Receiver<RenderCommand>) {
    while let Ok(cmd) = rx.recv() {
        let RenderCommand {
            model,
            job,
            span,
            progress,
            cancel,
            reply,
        } = cmd;
        let _entered = span.enter();
        let started = std::time::Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            render(&backend, &model, &job, &progress, &cancel)
        }))
        .map(|r| {
            r.map(|mut out| {
                out.render_ms = started.elapsed().as_millis() as u64;
                out
            })
        })
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!(%what, "the model code panicked");
            Err(RenderError::Failed(format!(
                "the model code panicked: {what}"
            )))
        });
        let _ = reply.send(result);
    }
}

fn render(
    backend: &Backend,
    model: &str,
    job: &RenderJob,
    progress: &tokio::sync::mpsc::UnboundedSender<Progress>,
    cancel: &AtomicBool,
) -> Result<Rendered, RenderError> {
    if cancel.load(Ordering::Relaxed) {
        return Err(RenderError::Cancelled);
    }
    let mut observer = |ev: StepEvent| {
        let _ = progress.send((ev.step as u32, ev.total as u32));
        if cancel.load(Ordering::Relaxed) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    match backend {
        Backend::Noop => noop_render(model, job, &mut observer),
        Backend::Pipelines(runners) => {
            let runner = runners.get(model).ok_or_else(|| {
                RenderError::Failed(format!(
                    "this worker does not serve model `{model}`; it serves: {:?}",
                    runners.keys().collect::<Vec<_>>()
                ))
            })?;
            match runner.run(job, &mut observer) {
                Ok(out) => Ok(Rendered {
                    width: out.metadata.width,
                    height: out.metadata.height,
                    seed: out.metadata.seed,
                    png: out.png,
                    render_ms: 0,
                }),
                Err(e) if e.is_cancelled() => Err(RenderError::Cancelled),
                Err(crate::runner::RunnerError::Model(
                    e @ (ModelError::InvalidInput { .. } | ModelError::Tokenizer(_)),
                )) => Err(RenderError::Invalid(e.to_string())),
                Err(e) => Err(RenderError::Failed(e.to_string())),
            }
        }
    }
}

/// A no-op render for benchmarks: reports every step, then writes a tiny grey PNG whose shade
/// depends on the seed, with the job's metadata.
fn noop_render(
    model: &str,
    job: &RenderJob,
    observer: &mut dyn FnMut(StepEvent) -> ControlFlow<()>,
) -> Result<Rendered, RenderError> {
    if job.prompt.trim().is_empty() {
        return Err(RenderError::Invalid(
            "invalid prompt: is empty: give the text to render".into(),
        ));
    }
    let steps = job
        .steps
        .unwrap_or(PixArtSigmaPipeline::DEFAULT_STEPS as u32);
    for step in 1..=steps {
        let ev = StepEvent {
            step: step as usize,
            total: steps as usize,
            timestep: 0.0,
        };
        if observer(ev).is_break() {
            return Err(RenderError::Cancelled);
        }
    }
    let shade = (job.seed % 256) as u8;
    let image = Rgb8 {
        width: NOOP_SIDE,
        height: NOOP_SIDE,
        pixels: vec![shade; (NOOP_SIDE * NOOP_SIDE * 3) as usize],
    };
    let metadata = GenerationMetadata {
        prompt: job.prompt.clone(),
        negative_prompt: job.negative_prompt.clone().unwrap_or_default(),
        seed: job.seed,
        steps,
        guidance: job
            .guidance
            .unwrap_or(PixArtSigmaPipeline::DEFAULT_GUIDANCE),
        width: NOOP_SIDE,
        height: NOOP_SIDE,
        model: model.to_string(),
        scheduler: "noop".into(),
        dtype: "none".into(),
        version: VERSION.to_string(),
    };
    let png = encode_png(&image, &metadata).map_err(|e| RenderError::Failed(e.to_string()))?;
    Ok(Rendered {
        png,
        width: NOOP_SIDE,
        height: NOOP_SIDE,
        seed: job.seed,
        render_ms: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_spec_parsing() {
        let m: ModelSpec = "tiny=/models/x".parse().unwrap();
        assert_eq!(m.name, "tiny");
        assert_eq!(m.dir.as_deref(), Some(std::path::Path::new("/models/x")));
        let bare: ModelSpec = "tiny".parse().unwrap();
        assert_eq!(bare.dir, None);
        assert!("=/x".parse::<ModelSpec>().is_err());
        assert!("a b=/x".parse::<ModelSpec>().is_err());
        assert!("a=".parse::<ModelSpec>().is_err());
    }

    #[test]
    fn noop_render_reports_steps_and_cancels() {
        let job = RenderJob {
            prompt: "a cat".into(),
            steps: Some(5),
            seed: 7,
            ..Default::default()
        };
        let mut seen = Vec::new();
        let out = noop_render("m", &job, &mut |ev: StepEvent| {
            seen.push(ev.step);
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(seen, vec![1, 2, 3, 4, 5]);
        assert_eq!(out.width, NOOP_SIDE);
        assert!(out.png.starts_with(b"\x89PNG"));
        let err = noop_render("m", &job, &mut |ev: StepEvent| {
            if ev.step == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap_err();
        assert_eq!(err, RenderError::Cancelled);
    }
}
