//! Pipelines: the reference semantics of each model family, stage by stage.
//!
//! A pipeline is split into stages that later run on different devices (encode-text →
//! denoise → decode); each stage is a method taking and returning plain tensors.

pub mod aspect_ratio_bins;
pub mod noise;
pub mod pixart_sigma;
pub mod resolution;

pub use pixart_sigma::{PipelineOptions, PixArtSigmaPipeline};

use candle_core::Tensor;
use std::ops::ControlFlow;

/// One image request, with the model's defaults already applied by the caller or left `None`
/// for the pipeline's own defaults.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt (`""` is the PixArt default).
    pub negative_prompt: String,
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
    /// Generate at the closest aspect-ratio bin and resize/crop back (diffusers default: on).
    pub resolution_binning: bool,
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
