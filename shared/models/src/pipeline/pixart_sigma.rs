//! diffusers' `PixArtSigmaPipeline`, stage by stage.
//!
//! Semantics (diffusers 0.42.1 `pipelines/pixart_alpha/pipeline_pixart_sigma.py`):
//! - text: lower-case + strip, T5 with `max_length` padding to 300 tokens and the attention
//!   mask, truncation with a warning naming the dropped tokens; the negative prompt (default
//!   `""`) is encoded the same way;
//! - CFG batch `[unconditional, conditional]`, `pred = u + g·(c − u)` on all output channels,
//!   then the learned-variance channels are dropped; CFG is off when guidance ≤ 1;
//! - DPM-Solver++ (from `scheduler_config.json`), latents = noise · `init_noise_sigma`;
//! - decode `latents / scaling_factor`, resolution binning (resize + centre crop on the
//!   [−1, 1] image), then `(x/2 + 0.5).clamp(0, 1)`.
//!
//! ```text
//! relayfarm render --model tests/fixtures/pixart-sigma-tiny --prompt "a red cabin" --output cabin.png
//! ```

use super::noise::randn;
use super::resolution::{bin_table_for_sample_size, classify_height_width_bin, resize_and_crop};
use super::{GenerateRequest, Generated, SizePlan, StepEvent, StepObserver};
use crate::checkpoint::{ComponentFolder, PipelineFolder};
use crate::denoiser::pixart::{PixArtOptions, PixArtTransformer};
use crate::scheduler;
use crate::text_encoder::t5::T5Encoder;
use crate::tokenizer::t5::T5Tokenizer;
use crate::vae::autoencoder_kl::AutoencoderKL;
use crate::{ModelError, Result, RunDtype};
use candle_core::{DType, Device, Tensor};
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
    /// Denoiser options (KV token compression).
    pub transformer: PixArtOptions,
}

/// The PixArt-Σ pipeline: T5 tokenizer and encoder, PixArt transformer, SDXL VAE, DPM-Solver.
pub struct PixArtSigmaPipeline {
    tokenizer: T5Tokenizer,
    text_encoder: T5Encoder,
    transformer: PixArtTransformer,
    vae: AutoencoderKL,
    scheduler: ComponentFolder,
    scheduler_name: String,
    device: Device,
    dtype: RunDtype,
}

/// Text embeddings for one prompt (and its negative when CFG is on).
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// `[B, L, D]` embeddings: `[uncond, cond]` with CFG, `[cond]` without.
    pub embeds: Tensor,
    /// `[B, L]` attention mask (1 keep, 0 pad), matching `embeds`.
    pub mask: Tensor,
    /// Whether the batch holds the unconditional half.
    pub cfg: bool,
}

/// The longest prompt PixArt-Σ's T5 sees, in tokens (`max_sequence_length`).
pub const MAX_SEQUENCE_LENGTH: usize = 300;
/// The largest side relayfarm accepts, in pixels.
pub const MAX_SIDE: usize = 8192;

impl PipelineOptions {
    /// f32 on the CPU, no variant or overrides.
    pub fn cpu(dtype: RunDtype) -> Self {
        PipelineOptions {
            dtype,
            device: Device::Cpu,
            variant: None,
            transformer_dir: None,
            transformer: PixArtOptions::default(),
        }
    }
}

impl PixArtSigmaPipeline {
    /// The diffusers pipeline class this implements.
    pub const CLASS: &'static str = "PixArtSigmaPipeline";
    /// Default number of steps (diffusers).
    pub const DEFAULT_STEPS: usize = 20;
    /// Default guidance scale (diffusers).
    pub const DEFAULT_GUIDANCE: f64 = 4.5;

    /// Loads every component of a diffusers PixArt-Σ folder.
    pub fn load(folder: &PipelineFolder, opts: &PipelineOptions) -> Result<Self> {
        if folder.pipeline_class() != Self::CLASS {
            return Err(ModelError::UnknownClass {
                what: "pipeline".into(),
                class: folder.pipeline_class().to_string(),
                supported: Self::CLASS.into(),
            });
        }
        let folder = &folder.clone().with_variant(opts.variant.clone());
        let device = &opts.device;
        let tok_dir = folder.component("tokenizer", &["T5Tokenizer", "T5TokenizerFast"])?;
        let tokenizer = T5Tokenizer::from_folder(tok_dir.dir())?;
        let te = folder.component("text_encoder", &["T5EncoderModel"])?;
        let text_encoder = T5Encoder::load(&te, opts.dtype, device)?;
        let tr = match &opts.transformer_dir {
            Some(dir) => ComponentFolder::open(dir, "transformer", "PixArtTransformer2DModel".into())?
                .with_variant(opts.variant.clone()),
            None => folder.component("transformer", &["PixArtTransformer2DModel", "Transformer2DModel"])?,
        };
        let transformer = PixArtTransformer::load(&tr, opts.dtype, device, &opts.transformer)?;
        let vae_dir = folder.component("vae", &["AutoencoderKL"])?;
        let vae = AutoencoderKL::load(&vae_dir, opts.dtype, device)?;
        let sched_dir = folder.component("scheduler", &[])?;
        // Build one scheduler now so a bad scheduler config fails at load, not at the first job.
        let scheduler_name = scheduler::from_folder(&sched_dir)?.name().to_string();
        Ok(PixArtSigmaPipeline {
            tokenizer,
            text_encoder,
            transformer,
            vae,
            scheduler: sched_dir,
            scheduler_name,
            device: device.clone(),
            dtype: opts.dtype,
        })
    }

    /// The scheduler class.
    pub fn scheduler_name(&self) -> &str {
        &self.scheduler_name
    }

    /// The run dtype.
    pub fn dtype(&self) -> RunDtype {
        self.dtype
    }

    /// The VAE's spatial downscale factor (8 for the SDXL VAE).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.downscale_factor()
    }

    /// The size rule without binning: height and width must be multiples of this.
    pub fn size_multiple(&self) -> usize {
        self.vae_scale_factor() * self.transformer.config().patch_size
    }

    /// The default output size (transformer `sample_size` × VAE factor; 1024 for 1024-MS).
    pub fn default_size(&self) -> usize {
        self.transformer.config().sample_size * self.vae_scale_factor()
    }

    /// Latent channels the transformer takes.
    pub fn latent_channels(&self) -> usize {
        self.transformer.config().in_channels
    }

    /// Resolves and checks the sizes of a request before any work is done.
    pub fn plan_size(&self, height: Option<u32>, width: Option<u32>, binning: bool) -> Result<SizePlan> {
        let default = self.default_size();
        let height = height.map(|h| h as usize).unwrap_or(default);
        let width = width.map(|w| w as usize).unwrap_or(default);
        for (field, v) in [("height", height), ("width", width)] {
            if v == 0 || v > MAX_SIDE {
                return Err(ModelError::invalid(
                    field,
                    format!("{v} px is out of range: use 1..={MAX_SIDE}"),
                ));
            }
        }
        let (gen_height, gen_width) = if binning {
            let table = bin_table_for_sample_size(self.transformer.config().sample_size)?;
            let (h, w) = classify_height_width_bin(height as u32, width as u32, table);
            (h as usize, w as usize)
        } else {
            let m = self.size_multiple();
            for (field, v) in [("height", height), ("width", width)] {
                if v % m != 0 {
                    let lo = (v / m).max(1) * m;
                    return Err(ModelError::invalid(
                        field,
                        format!(
                            "{v} px is not a multiple of {m} (VAE factor {} × patch size {}); use {lo} or {}, or drop --no-resolution-binning",
                            self.vae_scale_factor(),
                            self.transformer.config().patch_size,
                            lo + m
                        ),
                    ));
                }
            }
            (height, width)
        };
        Ok(SizePlan {
            height,
            width,
            gen_height,
            gen_width,
        })
    }

    /// The latent shape `[1, C, h, w]` for a size plan.
    pub fn latent_shape(&self, plan: &SizePlan) -> [usize; 4] {
        let f = self.vae_scale_factor();
        [1, self.latent_channels(), plan.gen_height / f, plan.gen_width / f]
    }

    /// Checks every parameter of a request; returns its size plan.
    pub fn validate(&self, req: &GenerateRequest) -> Result<SizePlan> {
        if req.steps == 0 {
            return Err(ModelError::invalid("steps", "must be at least 1 (PixArt-Σ default: 20)"));
        }
        if req.steps > 1000 {
            return Err(ModelError::invalid("steps", format!("{} exceeds the 1000 training timesteps", req.steps)));
        }
        if !req.guidance.is_finite() || req.guidance < 0.0 {
            return Err(ModelError::invalid("guidance", format!("{} must be a finite number ≥ 0 (default 4.5)", req.guidance)));
        }
        let plan = self.plan_size(req.height, req.width, req.resolution_binning)?;
        if let Some(l) = &req.latents {
            let want = self.latent_shape(&plan);
            if l.dims() != want && l.dims() != &want[1..] {
                return Err(ModelError::invalid(
                    "latents",
                    format!(
                        "tensor `latents` has shape {:?} but this request needs {:?} (generation size {}×{}, latent = size/{})",
                        l.dims(),
                        want,
                        plan.gen_width,
                        plan.gen_height,
                        self.vae_scale_factor()
                    ),
                ));
            }
        }
        Ok(plan)
    }

    /// diffusers' `_text_preprocessing` with `clean_caption=False`: lower-case and strip.
    pub fn preprocess_text(text: &str) -> String {
        text.to_lowercase().trim().to_string()
    }

    fn encode_one(&self, text: &str) -> Result<(Tensor, Tensor)> {
        let text = Self::preprocess_text(text);
        let enc = self.tokenizer.encode_padded(&text, MAX_SEQUENCE_LENGTH)?;
        if enc.num_truncated > 0 {
            let dropped = self
                .tokenizer
                .truncated_text(&text, MAX_SEQUENCE_LENGTH)?
                .unwrap_or_default();
            tracing::warn!(
                dropped_tokens = enc.num_truncated,
                "prompt truncated: T5 takes at most {MAX_SEQUENCE_LENGTH} tokens; {} tokens dropped: {dropped:?}",
                enc.num_truncated
            );
        }
        let ids = Tensor::new(enc.ids.as_slice(), &self.device)?.unsqueeze(0)?;
        let mask = Tensor::new(enc.mask.as_slice(), &self.device)?.unsqueeze(0)?;
        let embeds = self.text_encoder.forward(&ids, Some(&mask))?;
        Ok((embeds, mask))
    }

    /// Stage 1: encode the prompt (and the negative prompt when CFG is on).
    pub fn encode_prompt(&self, prompt: &str, negative_prompt: &str, guidance: f64) -> Result<PromptEmbeds> {
        let _span = tracing::info_span!("encode_text").entered();
        let cfg = guidance > 1.0;
        let (cond, cond_mask) = self.encode_one(prompt)?;
        if !cfg {
            return Ok(PromptEmbeds {
                embeds: cond,
                mask: cond_mask,
                cfg,
            });
        }
        let (uncond, uncond_mask) = self.encode_one(negative_prompt)?;
        Ok(PromptEmbeds {
            embeds: Tensor::cat(&[&uncond, &cond], 0)?,
            mask: Tensor::cat(&[&uncond_mask, &cond_mask], 0)?,
            cfg,
        })
    }

    /// The initial noise for a request: `--latents` if given, else seeded noise.
    pub fn initial_noise(&self, req: &GenerateRequest, plan: &SizePlan) -> Result<Tensor> {
        let shape = self.latent_shape(plan);
        match &req.latents {
            Some(l) => Ok(l.to_dtype(DType::F32)?.reshape(&shape[..])?.to_device(&self.device)?),
            None => Ok(randn(req.seed, &shape, &self.device)?),
        }
    }

    /// Stage 2: the denoising loop. `noise` is raw standard-normal noise; returns the final
    /// latents (f32).
    pub fn denoise(
        &self,
        embeds: &PromptEmbeds,
        noise: &Tensor,
        steps: usize,
        guidance: f64,
        observer: &mut dyn StepObserver,
    ) -> Result<Tensor> {
        let _span = tracing::info_span!("denoise", steps).entered();
        let mut sched = scheduler::from_folder(&self.scheduler)?;
        sched.set_timesteps(steps)?;
        let timesteps = sched.timesteps().to_vec();
        let dt = self.dtype.dtype();
        let in_ch = self.latent_channels();
        let out_ch = self.transformer.out_channels();
        let enc = embeds.embeds.to_dtype(dt)?;
        let batch = enc.dim(0)?;
        // Caption projection, mask bias and every block's cross-attention K/V depend only on
        // the prompt: compute them once per job, not once per step.
        let text = self.transformer.encode_text(&enc, Some(&embeds.mask))?;
        let mut latents = noise.to_dtype(DType::F32)?.affine(sched.init_noise_sigma(), 0.0)?;
        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let model_in = if embeds.cfg {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let model_in = sched.scale_model_input(model_in, i)?.to_dtype(dt)?;
            let t_batch = Tensor::full(t as f32, batch, &self.device)?;
            let out = self
                .transformer
                .forward_with_text(&model_in, &t_batch, &text)?
                .to_dtype(DType::F32)?;
            let out = if embeds.cfg {
                let u = out.narrow(0, 0, 1)?;
                let c = out.narrow(0, 1, 1)?;
                (&u + ((c - &u)? * guidance)?)?
            } else {
                out
            };
            let eps = if out_ch == 2 * in_ch { out.narrow(1, 0, in_ch)? } else { out };
            latents = sched.step(&eps, i, &latents)?;
            let event = StepEvent {
                step: i + 1,
                total,
                timestep: t,
            };
            if let ControlFlow::Break(()) = observer.on_step(event) {
                return Err(ModelError::Cancelled { step: i + 1 });
            }
        }
        Ok(latents)
    }

    /// Stage 3: decode latents to an f32 image in [0, 1] at the requested size.
    pub fn decode(&self, latents: &Tensor, plan: &SizePlan) -> Result<Tensor> {
        let _span = tracing::info_span!("decode").entered();
        let z = latents.to_dtype(self.vae.dtype())?;
        let mut image = self.vae.decode_latents(&z)?.to_dtype(DType::F32)?;
        if (plan.gen_height, plan.gen_width) != (plan.height, plan.width) {
            image = resize_and_crop(&image, plan.height, plan.width)?;
        }
        Ok(((image / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
    }

    /// Runs the whole pipeline for one request.
    pub fn generate(&self, req: &GenerateRequest, observer: &mut dyn StepObserver) -> Result<Generated> {
        let plan = self.validate(req)?;
        let noise = self.initial_noise(req, &plan)?;
        let embeds = self.encode_prompt(&req.prompt, &req.negative_prompt, req.guidance)?;
        let latents = self.denoise(&embeds, &noise, req.steps, req.guidance, observer)?;
        let image = self.decode(&latents, &plan)?;
        Ok(Generated {
            latents,
            image,
            size: plan,
            scheduler: self.scheduler_name.clone(),
        })
    }
}

