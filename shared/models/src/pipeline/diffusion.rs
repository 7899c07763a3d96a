//! The interface every pipeline family implements, and the loader that picks the family from
//! a checkpoint's `model_index.json`.
//!
//! A pipeline is three stages (see [`super::stage`]): [`DiffusionPipeline::encode_prompt`]
//! (text encoder), [`DiffusionPipeline::denoise`] (denoiser + scheduler) and
//! [`DiffusionPipeline::decode`] (VAE). The CLI, the worker and the stage executors only talk to
//! this trait, so a new family is one new implementation plus one line in [`load_pipeline`].

use super::noise::randn;
use super::stage::{Conditioning, StageSet};
use super::{GenerateRequest, Generated, PipelineOptions, SizePlan, StepObserver};
use crate::checkpoint::PipelineFolder;
use crate::{ModelError, Result, RunDtype};
use candle_core::{DType, Device, Tensor};

/// The size rules of a model, checked before any work is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeRules {
    /// Smallest accepted side in pixels.
    pub min_side: usize,
    /// Largest accepted side in pixels.
    pub max_side: usize,
    /// Height and width must be multiples of this (without resolution binning).
    pub multiple: usize,
    /// Largest accepted `height × width` (0: no cap beyond the sides).
    pub max_area: usize,
    /// Default output height.
    pub default_height: usize,
    /// Default output width.
    pub default_width: usize,
    /// Whether the model supports aspect-ratio binning (then any size within the sides is
    /// accepted and generated at the nearest bin).
    pub resolution_binning: bool,
}

impl SizeRules {
    /// Checks a size against the rules (binning off), with errors that name the field, the
    /// rule and a valid value. `why` explains where the rules come from (e.g. the config
    /// fields they were derived from) and is appended to the message.
    pub fn check(&self, height: usize, width: usize, why: &str) -> Result<()> {
        let note = if why.is_empty() {
            String::new()
        } else {
            format!(" ({why})")
        };
        for (field, v) in [("height", height), ("width", width)] {
            if v < self.min_side || v > self.max_side {
                return Err(ModelError::invalid(
                    field,
                    format!(
                        "{v} px is out of range: this model takes {}..={} px{note}",
                        self.min_side, self.max_side
                    ),
                ));
            }
            if self.multiple > 1 && v % self.multiple != 0 {
                let lo = (v / self.multiple).max(1) * self.multiple;
                return Err(ModelError::invalid(
                    field,
                    format!(
                        "{v} px is not a multiple of {m}; use {lo} or {hi}{note}",
                        m = self.multiple,
                        hi = lo + self.multiple
                    ),
                ));
            }
        }
        if self.max_area > 0 && height * width > self.max_area {
            return Err(ModelError::invalid(
                "size",
                format!(
                    "{width}×{height} = {} pixels exceeds this model's cap of {} pixels (e.g. {}×{}); use a smaller size{note}",
                    height * width,
                    self.max_area,
                    self.max_side,
                    self.max_area / self.max_side
                ),
            ));
        }
        Ok(())
    }
}

/// What a loaded pipeline is and its defaults: what a worker registers and the CLI applies.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineInfo {
    /// The diffusers pipeline class (`PixArtSigmaPipeline`, ...).
    pub class: &'static str,
    /// The model family (`pixart-sigma`, `cogview3-plus`, `kolors`).
    pub family: &'static str,
    /// Default number of denoising steps.
    pub default_steps: usize,
    /// Default guidance scale.
    pub default_guidance: f64,
    /// Size rules and default size.
    pub size: SizeRules,
    /// The longest prompt the text encoder sees, in tokens.
    pub max_sequence_length: usize,
    /// The scheduler class that runs.
    pub scheduler: String,
    /// The run dtype.
    pub dtype: RunDtype,
}

/// A diffusion pipeline, stage by stage. Implementations follow the reference diffusers
/// pipeline exactly (see each family's module docs).
pub trait DiffusionPipeline: Send + Sync {
    /// The pipeline's class, family, defaults and size rules.
    fn info(&self) -> &PipelineInfo;

    /// The stages this instance loaded.
    fn stages(&self) -> StageSet;

    /// Tensor-parallel ranks of the denoiser (1 without tensor parallelism).
    fn tensor_parallel(&self) -> usize {
        1
    }

    /// The device the stages run on (rank 0's for a tensor-parallel denoiser).
    fn device(&self) -> &Device;

    /// Checks every parameter of a request (steps, guidance, size, latents shape, ...) and
    /// returns its size plan. Needs no stage loaded; does no work.
    fn validate(&self, req: &GenerateRequest) -> Result<SizePlan>;

    /// The latent shape `[1, C, h, w]` for a size plan.
    fn latent_shape(&self, plan: &SizePlan) -> [usize; 4];

    /// Stage 1 (text encoder): the conditioning for a request's prompt and negative prompt.
    fn encode_prompt(&self, req: &GenerateRequest) -> Result<Conditioning>;

    /// Stage 2 (denoiser): runs the scheduler loop from raw standard-normal `noise` and returns
    /// the final latents (f32, `[1, C, h, w]`). `observer` may cancel at a step boundary
    /// ([`ModelError::Cancelled`]).
    fn denoise(
        &self,
        cond: &Conditioning,
        noise: &Tensor,
        req: &GenerateRequest,
        plan: &SizePlan,
        observer: &mut dyn StepObserver,
    ) -> Result<Tensor>;

    /// On a rank > 0 of a denoiser that spans processes ([`PipelineOptions::collective`]):
    /// takes part in the next denoising loop that rank 0 leads. Returns `Ok(false)` when rank
    /// 0 has called [`DiffusionPipeline::stop_followers`].
    fn follow_denoise(&self) -> Result<bool> {
        Err(ModelError::invalid(
            "tensor parallel",
            format!(
                "{} does not support denoiser ranks in separate processes yet",
                self.info().class
            ),
        ))
    }

    /// On rank 0 of a denoiser that spans processes: tells the other ranks to stop following.
    fn stop_followers(&self) -> Result<()> {
        Ok(())
    }

    /// Stage 3 (VAE): decodes final latents to an f32 image in `[0, 1]`, `[1, 3, H, W]`, at
    /// the requested (output) size.
    fn decode(&self, latents: &Tensor, plan: &SizePlan) -> Result<Tensor>;

    /// The initial noise for a request: its `latents` if given, else seeded noise (the same
    /// on every device and process for one seed).
    fn initial_noise(&self, req: &GenerateRequest, plan: &SizePlan) -> Result<Tensor> {
        let shape = self.latent_shape(plan);
        match &req.latents {
            Some(l) => Ok(l
                .to_dtype(DType::F32)?
                .reshape(&shape[..])?
                .to_device(self.device())?),
            None => Ok(randn(req.seed, &shape, self.device())?),
        }
    }

    /// Runs every stage for one request.
    fn generate(
        &self,
        req: &GenerateRequest,
        observer: &mut dyn StepObserver,
    ) -> Result<Generated> {
        let plan = self.validate(req)?;
        let noise = self.initial_noise(req, &plan)?;
        let cond = self.encode_prompt(req)?;
        let latents = self.denoise(&cond, &noise, req, &plan, observer)?;
        let image = self.decode(&latents, &plan)?;
        Ok(Generated {
            latents,
            image,
            size: plan,
            scheduler: self.info().scheduler.clone(),
        })
    }
}

/// The pipeline classes relayfarm implements.
pub const SUPPORTED_PIPELINES: &[&str] = &[
    super::pixart_sigma::PixArtSigmaPipeline::CLASS,
    super::kolors::KolorsPipeline::CLASS,
    super::cogview3_plus::CogView3PlusPipeline::CLASS,
];

/// Loads the pipeline in `folder`, choosing the family from `model_index.json`'s class.
pub fn load_pipeline(
    folder: &PipelineFolder,
    opts: &PipelineOptions,
) -> Result<Box<dyn DiffusionPipeline>> {
    use super::pixart_sigma::PixArtSigmaPipeline;
    match folder.pipeline_class() {
        PixArtSigmaPipeline::CLASS => Ok(Box::new(PixArtSigmaPipeline::load(folder, opts)?)),
        super::kolors::KolorsPipeline::CLASS => {
            Ok(Box::new(super::kolors::KolorsPipeline::load(folder, opts)?))
        }
        super::cogview3_plus::CogView3PlusPipeline::CLASS => Ok(Box::new(
            super::cogview3_plus::CogView3PlusPipeline::load(folder, opts)?,
        )),
        other => Err(ModelError::UnknownClass {
            what: "pipeline".into(),
            class: other.to_string(),
            supported: SUPPORTED_PIPELINES.join(", "),
        }),
    }
}

/// Checks the scalar parameters every family shares: steps in `1..=max_steps` and a finite,
/// non-negative guidance. `defaults` names the model's defaults in the messages.
pub fn check_steps_and_guidance(
    req: &GenerateRequest,
    info: &PipelineInfo,
    max_steps: usize,
) -> Result<()> {
    if req.steps == 0 {
        return Err(ModelError::invalid(
            "steps",
            format!("must be at least 1 (default: {})", info.default_steps),
        ));
    }
    if req.steps > max_steps {
        return Err(ModelError::invalid(
            "steps",
            format!(
                "{} exceeds the {max_steps} training timesteps; use at most {max_steps} (default: {})",
                req.steps, info.default_steps
            ),
        ));
    }
    if !req.guidance.is_finite() || req.guidance < 0.0 {
        return Err(ModelError::invalid(
            "guidance",
            format!(
                "{} must be a finite number ≥ 0 (default {})",
                req.guidance, info.default_guidance
            ),
        ));
    }
    Ok(())
}

/// Checks that a request's `latents` tensor (if any) has the shape the plan needs.
pub fn check_latents_shape(req: &GenerateRequest, want: [usize; 4], plan: &SizePlan) -> Result<()> {
    if let Some(l) = &req.latents {
        if l.dims() != want && l.dims() != &want[1..] {
            return Err(ModelError::invalid(
                "latents",
                format!(
                    "tensor `latents` has shape {:?} but this request needs {:?} (generation size {}×{})",
                    l.dims(),
                    want,
                    plan.gen_width,
                    plan.gen_height,
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> SizeRules {
        SizeRules {
            min_side: 512,
            max_side: 2048,
            multiple: 32,
            max_area: 1 << 21,
            default_height: 1024,
            default_width: 1024,
            resolution_binning: false,
        }
    }

    #[test]
    fn size_rules_name_the_problem() {
        let r = rules();
        assert!(r.check(1024, 1024, "").is_ok());
        assert!(r.check(2048, 1024, "").is_ok());
        let e = r.check(500, 1024, "").unwrap_err().to_string();
        assert!(e.contains("height") && e.contains("512..=2048"), "{e}");
        let e = r.check(1024, 1000, "").unwrap_err().to_string();
        assert!(e.contains("width") && e.contains("992 or 1024"), "{e}");
        let e = r.check(2048, 2048, "cfg").unwrap_err().to_string();
        assert!(e.contains("2097152") && e.contains("(cfg)"), "{e}");
    }
}
