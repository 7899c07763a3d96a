//! A loaded pipeline and the path from one job to one stored image.

use crate::png_output::{encode_png, tensor_to_rgb8, PngError};
use candle_core::Tensor;
use relayfarm_core::{GenerationMetadata, VERSION};
use relayfarm_models::checkpoint::PipelineFolder;
use relayfarm_models::pipeline::{
    load_pipeline, DiffusionPipeline, GenerateRequest, PipelineOptions, SizePlan, StepObserver,
};
use relayfarm_models::ModelError;
use std::path::Path;
use std::sync::Arc;

/// Errors from running a job.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The model rejected the job or failed while running it.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The image could not be encoded.
    #[error(transparent)]
    Png(#[from] PngError),
}

impl RunnerError {
    /// Whether the job was cancelled (not a failure).
    pub fn is_cancelled(&self) -> bool {
        matches!(self, RunnerError::Model(ModelError::Cancelled { .. }))
    }
}

/// One image to render, with defaults not yet applied (`None` → the model's default).
#[derive(Debug, Clone, Default)]
pub struct RenderJob {
    /// Prompt.
    pub prompt: String,
    /// Negative prompt (`None` → the model's default: `""` for PixArt-Σ and Kolors, zero
    /// embeddings for CogView3-Plus).
    pub negative_prompt: Option<String>,
    /// Output height.
    pub height: Option<u32>,
    /// Output width.
    pub width: Option<u32>,
    /// Steps.
    pub steps: Option<u32>,
    /// Guidance scale.
    pub guidance: Option<f64>,
    /// Noise seed.
    pub seed: u64,
    /// Raw initial noise (instead of seeded noise).
    pub latents: Option<Tensor>,
    /// Resolution binning (diffusers default on).
    pub resolution_binning: bool,
    /// Enforce the model's published size limits (`--no-size-check` turns this off).
    pub size_check: bool,
}

/// The result of one job.
#[derive(Debug, Clone)]
pub struct JobOutput {
    /// The PNG file, metadata included.
    pub png: Vec<u8>,
    /// The metadata written into it.
    pub metadata: GenerationMetadata,
    /// Final latents before VAE decoding (f32).
    pub latents: Tensor,
}

/// A pipeline loaded on one device, ready for jobs.
pub struct PipelineRunner {
    pipeline: Arc<dyn DiffusionPipeline>,
    model_name: String,
}

impl PipelineRunner {
    /// Loads the pipeline in `model_dir`; `model_name` is what metadata records.
    pub fn load(
        model_dir: &Path,
        model_name: &str,
        opts: &PipelineOptions,
    ) -> Result<Self, RunnerError> {
        let _span = tracing::info_span!("load_model", model = model_name).entered();
        let folder = PipelineFolder::open(model_dir)?;
        let pipeline = Arc::from(load_pipeline(&folder, opts)?);
        Ok(PipelineRunner {
            pipeline,
            model_name: model_name.to_string(),
        })
    }

    /// A runner over an already-loaded pipeline (e.g. the text-encoder stage of a split
    /// pipeline, which validates requests and whose info goes into the metadata).
    pub fn from_pipeline(pipeline: Arc<dyn DiffusionPipeline>, model_name: &str) -> Self {
        PipelineRunner {
            pipeline,
            model_name: model_name.to_string(),
        }
    }

    /// The pipeline.
    pub fn pipeline(&self) -> &dyn DiffusionPipeline {
        self.pipeline.as_ref()
    }

    /// The name metadata records.
    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    /// The request a job turns into, with the pipeline's defaults applied.
    pub fn request(&self, job: &RenderJob) -> GenerateRequest {
        let info = self.pipeline.info();
        GenerateRequest {
            prompt: job.prompt.clone(),
            negative_prompt: job.negative_prompt.clone(),
            height: job.height,
            width: job.width,
            steps: job.steps.map(|s| s as usize).unwrap_or(info.default_steps),
            guidance: job.guidance.unwrap_or(info.default_guidance),
            seed: job.seed,
            latents: job.latents.clone(),
            resolution_binning: job.resolution_binning,
            size_check: job.size_check,
        }
    }

    /// Checks a job without running it.
    pub fn validate(&self, job: &RenderJob) -> Result<SizePlan, RunnerError> {
        if job.prompt.trim().is_empty() {
            return Err(ModelError::invalid("prompt", "is empty: give the text to render").into());
        }
        Ok(self.pipeline.validate(&self.request(job))?)
    }

    /// Renders one job to a PNG with metadata.
    pub fn run(
        &self,
        job: &RenderJob,
        observer: &mut dyn StepObserver,
    ) -> Result<JobOutput, RunnerError> {
        self.validate(job)?;
        let req = self.request(job);
        let generated = self.pipeline.generate(&req, observer)?;
        self.finish(&req, generated)
    }

    /// Encodes a generated image as a PNG with the request's metadata (the last step of a
    /// job, wherever its stages ran).
    pub fn finish(
        &self,
        req: &GenerateRequest,
        generated: relayfarm_models::pipeline::Generated,
    ) -> Result<JobOutput, RunnerError> {
        let rgb = tensor_to_rgb8(&generated.image)?;
        let metadata = GenerationMetadata {
            prompt: req.prompt.clone(),
            negative_prompt: req.negative_prompt.clone().unwrap_or_default(),
            seed: req.seed,
            steps: req.steps as u32,
            guidance: req.guidance,
            width: generated.size.width as u32,
            height: generated.size.height as u32,
            model: self.model_name.clone(),
            scheduler: generated.scheduler.clone(),
            dtype: self.pipeline.info().dtype.to_string(),
            version: VERSION.to_string(),
        };
        let png = encode_png(&rgb, &metadata)?;
        Ok(JobOutput {
            png,
            metadata,
            latents: generated.latents,
        })
    }
}
