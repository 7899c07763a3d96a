//! The three stages as threads of this process, joined by in-process links.
//!
//! Each stage loads only its own weights (a [`DiffusionPipeline`] with one [`Stage`] in its
//! [`StageSet`]); jobs flow `submit → text encoder → denoiser → VAE → recv`. The stages work on
//! different jobs at the same time, each link holding at most one job in flight.

use super::executor::{image_of, run_denoiser, run_text_encoder, run_vae, StageJob};
use relayfarm_models::checkpoint::PipelineFolder;
use relayfarm_models::link::{InProcessLink, Link, MessageKind};
use relayfarm_models::pipeline::{
    load_pipeline, DiffusionPipeline, GenerateRequest, Generated, PipelineInfo, PipelineOptions,
    SizePlan, Stage, StageSet, StepEvent,
};
use relayfarm_models::{ModelError, Result};
use std::ops::ControlFlow;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Step progress callback of the denoiser stage: `(job id, event)`; `Break` cancels the job.
pub type SplitStepHook = Box<dyn FnMut(&str, StepEvent) -> ControlFlow<()> + Send>;

/// What comes out of the last stage for one job.
#[derive(Debug)]
pub struct SplitOutput {
    /// The job id given to [`SplitPipeline::submit`].
    pub id: String,
    /// The image and final latents, or why the job failed (in whichever stage).
    pub result: std::result::Result<Generated, ModelError>,
}

/// A pipeline split into three stage executors; see the module docs.
pub struct SplitPipeline {
    jobs: Option<SyncSender<StageJob>>,
    sink: InProcessLink,
    threads: Vec<(Stage, JoinHandle<Result<()>>)>,
    front: Arc<dyn DiffusionPipeline>,
}

impl SplitPipeline {
    /// Loads each stage of the pipeline in `folder` on its own (the denoiser with
    /// `opts.tensor_parallel` ranks) and starts the executors. `on_step` sees the denoiser's
    /// steps.
    pub fn start(
        folder: &PipelineFolder,
        opts: &PipelineOptions,
        on_step: Option<SplitStepHook>,
    ) -> Result<Self> {
        let load = |stage: Stage| -> Result<Arc<dyn DiffusionPipeline>> {
            let _span = tracing::info_span!("load_stage", stage = %stage).entered();
            let o = PipelineOptions {
                stages: StageSet::only(stage),
                tensor_parallel: if stage == Stage::Denoiser {
                    opts.tensor_parallel
                } else {
                    1
                },
                ..opts.clone()
            };
            Ok(Arc::from(load_pipeline(folder, &o)?))
        };
        let encoder = load(Stage::TextEncoder)?;
        let denoiser = load(Stage::Denoiser)?;
        let vae = load(Stage::Vae)?;
        Self::from_stages(encoder, denoiser, vae, on_step)
    }

    /// Starts the executors over three already-loaded stage pipelines.
    pub fn from_stages(
        encoder: Arc<dyn DiffusionPipeline>,
        denoiser: Arc<dyn DiffusionPipeline>,
        vae: Arc<dyn DiffusionPipeline>,
        on_step: Option<SplitStepHook>,
    ) -> Result<Self> {
        let (jobs_tx, jobs_rx) = sync_channel::<StageJob>(1);
        let (mut enc_out, mut den_in) = InProcessLink::pair("text-encoder→denoiser", 1);
        let (mut den_out, mut vae_in) = InProcessLink::pair("denoiser→vae", 1);
        let (mut vae_out, sink) = InProcessLink::pair("vae→sink", 4);
        let spawn = |stage: Stage, f: Box<dyn FnOnce() -> Result<()> + Send>| {
            std::thread::Builder::new()
                .name(format!("stage-{stage}"))
                .spawn(f)
                .map(|h| (stage, h))
                .map_err(|e| ModelError::invalid("stage", format!("cannot start a thread: {e}")))
        };
        let front = encoder.clone();
        let mut threads = Vec::new();
        threads.push(spawn(
            Stage::TextEncoder,
            Box::new(move || run_text_encoder(encoder.as_ref(), jobs_rx, &mut enc_out)),
        )?);
        let mut hook = on_step;
        threads.push(spawn(
            Stage::Denoiser,
            Box::new(move || {
                let mut step = |id: &str, e: StepEvent| match hook.as_mut() {
                    Some(h) => h(id, e),
                    None => ControlFlow::Continue(()),
                };
                run_denoiser(denoiser.as_ref(), &mut den_in, &mut den_out, &mut step)
            }),
        )?);
        threads.push(spawn(
            Stage::Vae,
            Box::new(move || run_vae(vae.as_ref(), &mut vae_in, &mut vae_out)),
        )?);
        Ok(SplitPipeline {
            jobs: Some(jobs_tx),
            sink,
            threads,
            front,
        })
    }

    /// The text-encoder stage's pipeline: it validates requests and describes the model.
    pub fn front(&self) -> Arc<dyn DiffusionPipeline> {
        self.front.clone()
    }

    /// The pipeline's info (class, defaults, size rules).
    pub fn info(&self) -> &PipelineInfo {
        self.front.info()
    }

    /// Checks a request without running it.
    pub fn validate(&self, req: &GenerateRequest) -> Result<SizePlan> {
        self.front.validate(req)
    }

    /// Queues a job (blocks while the text-encoder stage is busy and its queue is full).
    pub fn submit(&self, id: &str, request: GenerateRequest) -> Result<()> {
        let tx = self
            .jobs
            .as_ref()
            .ok_or_else(|| ModelError::invalid("split pipeline", "already closed"))?;
        tx.send(StageJob {
            id: id.to_string(),
            request,
        })
        .map_err(|_| ModelError::invalid("split pipeline", "the text-encoder stage has stopped"))
    }

    /// No more jobs: the stages finish what they hold and stop.
    pub fn close(&mut self) {
        self.jobs = None;
    }

    /// The next finished job, in submission order; `None` when every stage has stopped.
    pub fn recv(&mut self) -> Result<Option<SplitOutput>> {
        let Some(msg) = self.sink.recv()? else {
            return self.join().map(|_| None);
        };
        let id = msg.header.job_id.clone();
        let result = match msg.kind() {
            MessageKind::Image => {
                let (image, latents) = image_of(&msg)?;
                Ok(Generated {
                    latents: latents.clone(),
                    image: image.clone(),
                    size: msg.plan()?,
                    scheduler: self.front.info().scheduler.clone(),
                })
            }
            MessageKind::Failed if msg.header.cancelled => Err(ModelError::Cancelled {
                step: msg.header.steps_done,
            }),
            MessageKind::Failed => Err(ModelError::invalid(
                "job",
                msg.header
                    .error
                    .clone()
                    .unwrap_or_else(|| "failed in a stage".into()),
            )),
            MessageKind::Shutdown => return self.join().map(|_| None),
            other => Err(ModelError::invalid(
                "stage message",
                format!("the sink received a {other:?} message"),
            )),
        };
        Ok(Some(SplitOutput { id, result }))
    }

    /// Waits for the stage threads and reports the first stage error.
    fn join(&mut self) -> Result<()> {
        let mut first = Ok(());
        for (stage, h) in self.threads.drain(..) {
            let r = match h.join() {
                Ok(r) => r,
                Err(_) => Err(ModelError::invalid(
                    "stage",
                    format!("the {stage} stage panicked"),
                )),
            };
            if let Err(e) = r {
                tracing::error!(%stage, error = %e, "stage stopped with an error");
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}

impl Drop for SplitPipeline {
    fn drop(&mut self) {
        self.jobs = None;
        // Drain so that blocked stages can finish, then join them.
        while let Ok(Some(_)) = self.sink.recv() {}
        let _ = self.join();
    }
}
