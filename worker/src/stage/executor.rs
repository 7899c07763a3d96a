//! The loop of each stage executor.
//!
//! Every loop ends when its input ends (`Shutdown` message or a closed link) and forwards the
//! `Shutdown` downstream. A job that fails in a stage is reported downstream as a `Failed`
//! message (never dropped); later stages pass such messages on untouched.

use relayfarm_models::link::message::{IMAGE, LATENTS, NOISE};
use relayfarm_models::link::{Link, MessageKind, RequestHeader, StageMessage};
use relayfarm_models::pipeline::{DiffusionPipeline, GenerateRequest, StepEvent};
use relayfarm_models::{ModelError, Result};
use std::ops::ControlFlow;
use std::sync::mpsc::Receiver;

/// A job entering the text-encoder stage.
#[derive(Debug, Clone)]
pub struct StageJob {
    /// The job's id (carried by every message of the job).
    pub id: String,
    /// The request.
    pub request: GenerateRequest,
}

/// Per-step progress of the denoiser stage: `(job id, event)`; `Break` cancels the job.
pub type StepHook<'a> = dyn FnMut(&str, StepEvent) -> ControlFlow<()> + 'a;

/// The text-encoder stage: validates each job, makes its initial noise and encodes its prompt,
/// and sends the conditioning downstream. Returns when `jobs` closes (after forwarding a
/// `Shutdown`) or when the downstream stage is gone.
pub fn run_text_encoder(
    pipeline: &dyn DiffusionPipeline,
    jobs: Receiver<StageJob>,
    out: &mut dyn Link,
) -> Result<()> {
    for job in jobs.iter() {
        let span = tracing::info_span!("stage", stage = "text-encoder", job = %job.id);
        let _enter = span.enter();
        let msg = match encode_job(pipeline, &job) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "job failed in the text-encoder stage");
                StageMessage::failed(&job.id, Some(RequestHeader::of(&job.request)), &e)
            }
        };
        out.send(msg)?;
    }
    out.send(StageMessage::shutdown())
}

fn encode_job(pipeline: &dyn DiffusionPipeline, job: &StageJob) -> Result<StageMessage> {
    let plan = pipeline.validate(&job.request)?;
    let noise = pipeline.initial_noise(&job.request, &plan)?;
    let cond = pipeline.encode_prompt(&job.request)?;
    Ok(StageMessage::conditioning(
        &job.id,
        &job.request,
        &plan,
        cond,
        noise,
    ))
}

/// The denoiser stage: runs the scheduler loop for each `Conditioning` message and sends the
/// final latents downstream. `on_step` sees every step of every job.
pub fn run_denoiser(
    pipeline: &dyn DiffusionPipeline,
    input: &mut dyn Link,
    out: &mut dyn Link,
    on_step: &mut StepHook<'_>,
) -> Result<()> {
    while let Some(msg) = input.recv()? {
        match msg.kind() {
            MessageKind::Shutdown => break,
            MessageKind::Conditioning => {
                let id = msg.header.job_id.clone();
                let span = tracing::info_span!("stage", stage = "denoiser", job = %id);
                let _enter = span.enter();
                let reply = match denoise_message(pipeline, &msg, on_step) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, "job failed in the denoiser stage");
                        StageMessage::failed(&id, msg.header.request.clone(), &e)
                    }
                };
                out.send(reply)?;
            }
            _ => out.send(pass_on(msg, "denoiser"))?,
        }
    }
    out.send(StageMessage::shutdown())
}

fn denoise_message(
    pipeline: &dyn DiffusionPipeline,
    msg: &StageMessage,
    on_step: &mut StepHook<'_>,
) -> Result<StageMessage> {
    let req = msg.request()?;
    let plan = msg.plan()?;
    let noise = msg.tensor(NOISE)?;
    let cond = msg.to_conditioning().to_device(pipeline.device())?;
    let id = msg.header.job_id.as_str();
    let mut observer = |e: StepEvent| on_step(id, e);
    let latents = pipeline.denoise(&cond, noise, &req, &plan, &mut observer)?;
    Ok(StageMessage::latents(id, &req, &plan, latents))
}

/// The VAE stage: decodes each `Latents` message and sends the image (and the latents)
/// downstream.
pub fn run_vae(
    pipeline: &dyn DiffusionPipeline,
    input: &mut dyn Link,
    out: &mut dyn Link,
) -> Result<()> {
    while let Some(msg) = input.recv()? {
        match msg.kind() {
            MessageKind::Shutdown => break,
            MessageKind::Latents => {
                let id = msg.header.job_id.clone();
                let span = tracing::info_span!("stage", stage = "vae", job = %id);
                let _enter = span.enter();
                let reply = match decode_message(pipeline, &msg) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, "job failed in the VAE stage");
                        StageMessage::failed(&id, msg.header.request.clone(), &e)
                    }
                };
                out.send(reply)?;
            }
            _ => out.send(pass_on(msg, "vae"))?,
        }
    }
    out.send(StageMessage::shutdown())
}

fn decode_message(pipeline: &dyn DiffusionPipeline, msg: &StageMessage) -> Result<StageMessage> {
    let req = msg.request()?;
    let plan = msg.plan()?;
    let latents = msg.tensor(LATENTS)?;
    let image = pipeline.decode(latents, &plan)?;
    Ok(StageMessage::image(
        &msg.header.job_id,
        &req,
        &plan,
        image,
        latents.clone(),
    ))
}

/// A message a stage does not process: `Failed` notices go on as they are; anything else is
/// out of place and becomes a `Failed` notice naming the stage.
fn pass_on(msg: StageMessage, stage: &str) -> StageMessage {
    if msg.kind() == MessageKind::Failed {
        return msg;
    }
    let e = ModelError::invalid(
        "stage message",
        format!(
            "the {stage} stage received a {:?} message; check the replica's stage order",
            msg.kind()
        ),
    );
    StageMessage::failed(&msg.header.job_id, msg.header.request.clone(), &e)
}

/// The image of an `Image` message.
pub fn image_of(msg: &StageMessage) -> Result<(&candle_core::Tensor, &candle_core::Tensor)> {
    Ok((msg.tensor(IMAGE)?, msg.tensor(LATENTS)?))
}
