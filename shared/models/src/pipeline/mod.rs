//! Pipelines: the reference semantics of each model family, stage by stage.
//!
//! A pipeline is split into stages that later run on different devices (encode-text →
//! denoise → decode); each stage is a method taking and returning plain tensors.

pub mod aspect_ratio_bins;
pub mod cogview3_plus;
pub mod diffusion;
pub mod kolors;
pub mod memory;
pub mod noise;
pub mod pixart_sigma;
pub mod resolution;
pub mod stage;
pub mod tensor_parallel;

pub use diffusion::{load_pipeline, DiffusionPipeline, PipelineInfo, SizeRules};
pub use pixart_sigma::PixArtSigmaPipeline;
pub use stage::{Conditioning, Stage, StageSet};

use crate::denoiser::pixart::PixArtOptions;
use crate::RunDtype;
use candle_core::{Device, Tensor};
use std::ops::ControlFlow;
use std::path::PathBuf;

/// How to load a pipeline.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// Run dtype for every component.
    pub dtype: RunDtype,
    /// Device to load onto.
    pub device: Device,
    /// Preferred weight variant (e.g. `fp16`); `None` takes plain files, or the only variant.
    pub variant: Option<String>,
    /// A transformer folder that replaces the pipeline's own (e.g. the transformer-only
    /// PixArt-Sigma-XL-2-2K-MS repository used with the 1024 pipeline's T5 and VAE).
    pub transformer_dir: Option<PathBuf>,
    /// PixArt denoiser options (KV token compression).
    pub transformer: PixArtOptions,
    /// Tensor-parallel ranks for the denoiser (1: off). On the CPU the ranks are threads of
    /// this process; on `cuda:K` rank `r` uses GPU `K + r` and NCCL (feature `cuda`). The
    /// attention heads must divide by it (16 for PixArt-Σ XL: 1, 2, 4, 8 or 16).
    pub tensor_parallel: usize,
    /// The stages whose weights this process loads (all by default). Configs of every
    /// component are always read, so requests can be validated anywhere.
    pub stages: StageSet,
    /// This process is one rank of a tensor-parallel denoiser that spans processes (ranks
    /// formed through the coordinator's rendezvous): the denoiser loads only this rank's
    /// slices. Rank 0 runs [`DiffusionPipeline::denoise`]; the others call
    /// [`DiffusionPipeline::follow_denoise`]. Overrides `tensor_parallel`.
    pub collective: Option<std::sync::Arc<dyn crate::parallel::Collective>>,
    /// A scheduler to use instead of the checkpoint's (e.g. `dpm++-karras`); see
    /// [`crate::scheduler::with_override`].
    pub scheduler: Option<String>,
}

impl PipelineOptions {
    /// Refuses a dtype the device cannot run (bf16 on the CPU), before anything is loaded.
    pub fn check_dtype_device(&self) -> crate::Result<()> {
        if self.dtype == RunDtype::Bf16 && self.device.is_cpu() {
            return Err(crate::ModelError::invalid(
                "dtype",
                "bf16 needs a CUDA device (candle's CPU matmul has no bf16 kernel); on the CPU use --dtype f32 or f16",
            ));
        }
        Ok(())
    }

    /// f32 on the CPU, no variant or overrides, every stage.
    pub fn cpu(dtype: RunDtype) -> Self {
        PipelineOptions {
            dtype,
            device: Device::Cpu,
            variant: None,
            transformer_dir: None,
            transformer: PixArtOptions::default(),
            tensor_parallel: 1,
            stages: StageSet::all(),
            collective: None,
            scheduler: None,
        }
    }
}

/// One image request, with the model's defaults already applied by the caller or left `None`
/// for the pipeline's own defaults.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt; `None` is the model's default (PixArt-Σ and Kolors encode `""`,
    /// CogView3-Plus uses all-zero unconditional embeddings).
    pub negative_prompt: Option<String>,
    /// Output height in pixels (`None`: the model's default size).
    pub height: Option<u32>,
    /// Output width in pixels (`None`: the model's default size).
    pub width: Option<u32>,
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale (CFG is off when ≤ 1).
    pub guidance: f64,
    /// Noise seed (ignored when `latents` is given).
    pub seed: u64,
    /// Raw standard-normal initial noise in the latent shape, instead of seeded noise.
    pub latents: Option<Tensor>,
    /// Generate at the closest aspect-ratio bin and resize/crop back (diffusers default: on;
    /// models without binning ignore it).
    pub resolution_binning: bool,
    /// Enforce the model's published size limits (on by default; `--no-size-check` turns the
    /// range and area limits off, never the multiple the architecture needs).
    pub size_check: bool,
}

impl GenerateRequest {
    /// A request for `prompt` with everything else at neutral values: no negative prompt,
    /// default size, `steps` and `guidance` as given, seed 0, binning and size checks on.
    pub fn new(prompt: impl Into<String>, steps: usize, guidance: f64) -> Self {
        GenerateRequest {
            prompt: prompt.into(),
            negative_prompt: None,
            height: None,
            width: None,
            steps,
            guidance,
            seed: 0,
            latents: None,
            resolution_binning: true,
            size_check: true,
        }
    }
}

/// The sizes a request resolves to, checked before any work is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizePlan {
    /// Requested (output) height.
    pub height: usize,
    /// Requested (output) width.
    pub width: usize,
    /// Height the model generates at (the bin when binning is on).
    pub gen_height: usize,
    /// Width the model generates at.
    pub gen_width: usize,
}

/// Progress of the denoising loop, reported after each step.
#[derive(Debug, Clone, Copy)]
pub struct StepEvent {
    /// Steps done (1-based).
    pub step: usize,
    /// Total steps.
    pub total: usize,
    /// The model timestep of the step just done.
    pub timestep: f64,
}

/// Receives step events; returning `ControlFlow::Break` cancels the job at this step boundary.
pub trait StepObserver {
    /// Called after every denoising step.
    fn on_step(&mut self, event: StepEvent) -> ControlFlow<()>;
}

impl<F: FnMut(StepEvent) -> ControlFlow<()>> StepObserver for F {
    fn on_step(&mut self, event: StepEvent) -> ControlFlow<()> {
        self(event)
    }
}

/// What a pipeline returns.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The final denoised latents (before VAE decoding), f32, `[1, C, h, w]`.
    pub latents: Tensor,
    /// The image, f32 in [0, 1], `[1, 3, H, W]` at the requested size.
    pub image: Tensor,
    /// The sizes used.
    pub size: SizePlan,
    /// The scheduler class that ran.
    pub scheduler: String,
}
