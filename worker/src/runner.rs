//! A loaded pipeline and the path from one job to one stored image.

use crate::png_output::{encode_png, tensor_to_rgb8, PngError};
use candle_core::Tensor;
use relayfarm_core::{GenerationMetadata, VERSION};
use relayfarm_models::checkpoint::PipelineFolder;
use relayfarm_models::pipeline::{
    GenerateRequest, PipelineOptions, PixArtSigmaPipeline, SizePlan, StepObserver,
};
use relayfarm_models::ModelError;
use std::path::Path;

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
    /// Negative prompt (`None` → the model's default, `""` for PixArt-Σ).
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
    pipeline: PixArtSigmaPipeline,
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
        let pipeline = match folder.pipeline_class() {
            PixArtSigmaPipeline::CLASS => PixArtSigmaPipeline::load(&folder, opts)?,
            other => {
                return Err(ModelError::UnknownClass {
                    what: "pipeline".into(),
                    class: other.to_string(),
                    supported: PixArtSigmaPipeline::CLASS.into(),
                }
                .into())
            }
        };
        Ok(PipelineRunner {
            pipeline,
            model_name: model_name.to_string(),
        })
    }

    /// The pipeline.
    pub fn pipeline(&self) -> &PixArtSigmaPipeline {
        &self.pipeline
    }

    /// The request a job turns into, with the pipeline's defaults applied.
    pub fn request(&self, job: &RenderJob) -> GenerateRequest {
        GenerateRequest {
            prompt: job.prompt.clone(),
            negative_prompt: job.negative_prompt.clone().unwrap_or_default(),
            height: job.height,
            width: job.width,
            steps: job
                .steps
                .map(|s| s as usize)
                .unwrap_or(PixArtSigmaPipeline::DEFAULT_STEPS),
            guidance: job
                .guidance
                .unwrap_or(PixArtSigmaPipeline::DEFAULT_GUIDANCE),
            seed: job.seed,
            latents: job.latents.clone(),
            resolution_binning: job.resolution_binning,
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
        let rgb = tensor_to_rgb8(&generated.image)?;
        let metadata = GenerationMetadata {
            prompt: req.prompt.clone(),
            negative_prompt: req.negative_prompt.clone(),
            seed: req.seed,
            steps: req.steps as u32,
            guidance: req.guidance,
            width: generated.size.width as u32,
            height: generated.size.height as u32,
            model: self.model_name.clone(),
            scheduler: generated.scheduler.clone(),
            dtype: self.pipeline.dtype().to_string(),
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
