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
//!
//! With [`PipelineOptions::tensor_parallel`] `N > 1` the denoiser runs over `N` ranks
//! (see [`crate::parallel`]): rank 0 is the calling thread, which also runs the text encoder
//! and the VAE; ranks `1..N` are threads that each hold their shard of the denoiser. Per job,
//! rank 0 broadcasts the prompt embeddings, mask and initial noise; every rank then runs the
//! same scheduler loop on the full latents (identical on all ranks), and rank 0 returns the
//! final latents. Cancellation is agreed at each step boundary (rank 0 broadcasts it).
//!
//! ```text
//! relayfarm render --model tests/fixtures/pixart-sigma-tiny --prompt "a red cabin" --output cabin.png
//! relayfarm render --model tests/fixtures/pixart-sigma-tiny --prompt "a red cabin" --tp 2
//! ```

use super::diffusion::{
    check_latents_shape, check_steps_and_guidance, DiffusionPipeline, PipelineInfo, SizeRules,
};
use super::resolution::{bin_table_for_sample_size, classify_height_width_bin, resize_and_crop};
use super::stage::{Conditioning, Stage, StageSet};
use super::tensor_parallel::{
    agree_on_stop, share_from_rank0, DenoiserGroup, HelperJob, LoopSettings,
};
use super::{GenerateRequest, PipelineOptions, SizePlan, StepEvent, StepObserver};
use crate::checkpoint::{ComponentFolder, PipelineFolder};
use crate::denoiser::pixart::{PixArtConfig, PixArtTransformer};
use crate::parallel::Collective;
use crate::scheduler;
use crate::text_encoder::t5::T5Encoder;
use crate::tokenizer::t5::T5Tokenizer;
use crate::vae::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use crate::{ModelError, Result, RunDtype};
use candle_core::{DType, Device, Tensor};
use std::ops::ControlFlow;
use std::sync::Arc;

/// The PixArt-Σ pipeline: T5 tokenizer and encoder, PixArt transformer, SDXL VAE, DPM-Solver.
/// Each stage's weights are loaded only when [`PipelineOptions::stages`] includes it.
pub struct PixArtSigmaPipeline {
    info: PipelineInfo,
    stages: StageSet,
    text: Option<TextStage>,
    /// The denoiser: whole, or its tensor-parallel ranks.
    denoiser: Option<DenoiserGroup<PixArtTransformer>>,
    transformer_config: PixArtConfig,
    vae: Option<AutoencoderKL>,
    vae_config: AutoencoderKLConfig,
    /// The scheduler config that runs (the checkpoint's, or `--scheduler`'s override).
    scheduler: serde_json::Value,
    device: Device,
}

/// The text-encoder stage.
struct TextStage {
    tokenizer: T5Tokenizer,
    encoder: T5Encoder,
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

impl PromptEmbeds {
    /// As the stage message.
    pub fn to_conditioning(&self) -> Conditioning {
        Conditioning::new(self.cfg)
            .with(EMBEDS, self.embeds.clone())
            .with(MASK, self.mask.clone())
    }

    /// From the stage message.
    pub fn from_conditioning(c: &Conditioning) -> Result<Self> {
        Ok(PromptEmbeds {
            embeds: c.get(EMBEDS)?.clone(),
            mask: c.get(MASK)?.clone(),
            cfg: c.cfg,
        })
    }
}

const EMBEDS: &str = "prompt_embeds";
const MASK: &str = "prompt_attention_mask";

/// The longest prompt PixArt-Σ's T5 sees, in tokens (`max_sequence_length`).
pub const MAX_SEQUENCE_LENGTH: usize = 300;
/// The largest side relayfarm accepts, in pixels.
pub const MAX_SIDE: usize = 8192;
/// Most denoising steps (the training timesteps).
const MAX_STEPS: usize = 1000;

impl PixArtSigmaPipeline {
    /// The diffusers pipeline class this implements.
    pub const CLASS: &'static str = "PixArtSigmaPipeline";
    /// The model family name.
    pub const FAMILY: &'static str = "pixart-sigma";
    /// Default number of steps (diffusers).
    pub const DEFAULT_STEPS: usize = 20;
    /// Default guidance scale (diffusers).
    pub const DEFAULT_GUIDANCE: f64 = 4.5;

    /// Loads a diffusers PixArt-Σ folder: every component's config, and the weights of the
    /// stages in `opts.stages`.
    pub fn load(folder: &PipelineFolder, opts: &PipelineOptions) -> Result<Self> {
        if folder.pipeline_class() != Self::CLASS {
            return Err(ModelError::UnknownClass {
                what: "pipeline".into(),
                class: folder.pipeline_class().to_string(),
                supported: Self::CLASS.into(),
            });
        }
        opts.check_dtype_device()?;
        let folder = &folder.clone().with_variant(opts.variant.clone());
        let device = &opts.device;
        let stages = opts.stages;
        let text = if stages.contains(Stage::TextEncoder) {
            let _span = tracing::info_span!("load", stage = "text-encoder").entered();
            let tok_dir = folder.component("tokenizer", &["T5Tokenizer", "T5TokenizerFast"])?;
            let te = folder.component("text_encoder", &["T5EncoderModel"])?;
            Some(TextStage {
                tokenizer: T5Tokenizer::from_folder(tok_dir.dir())?,
                encoder: T5Encoder::load(&te, opts.dtype, device)?,
            })
        } else {
            None
        };
        let tr = match &opts.transformer_dir {
            Some(dir) => {
                ComponentFolder::open(dir, "transformer", "PixArtTransformer2DModel".into())?
                    .with_variant(opts.variant.clone())
            }
            None => folder.component(
                "transformer",
                &["PixArtTransformer2DModel", "Transformer2DModel"],
            )?,
        };
        let transformer_config: PixArtConfig = tr.config()?;
        transformer_config.validate()?;
        let denoiser = if stages.contains(Stage::Denoiser) {
            let _span = tracing::info_span!("load", stage = "denoiser").entered();
            let (comp, dtype, topts) = (tr.clone(), opts.dtype, opts.transformer.clone());
            let variant = opts.variant.clone();
            if let Some(c) = &opts.collective {
                let t = PixArtTransformer::load_sharded(
                    &tr,
                    opts.dtype,
                    device,
                    opts.variant.as_deref(),
                    &opts.transformer,
                    c.clone(),
                )?;
                Some(DenoiserGroup::external(t, c.clone()))
            } else {
                Some(DenoiserGroup::load(
                    device,
                    opts.tensor_parallel,
                    move |dev, coll| match coll {
                        None => PixArtTransformer::load_variant(
                            &comp,
                            dtype,
                            dev,
                            variant.as_deref(),
                            &topts,
                        ),
                        Some(c) => PixArtTransformer::load_sharded(
                            &comp,
                            dtype,
                            dev,
                            variant.as_deref(),
                            &topts,
                            c,
                        ),
                    },
                )?)
            }
        } else {
            None
        };
        let vae_dir = folder.component("vae", &["AutoencoderKL"])?;
        let vae_config: AutoencoderKLConfig = vae_dir.config()?;
        vae_config.validate()?;
        let vae = if stages.contains(Stage::Vae) {
            let _span = tracing::info_span!("load", stage = "vae").entered();
            Some(AutoencoderKL::load(&vae_dir, opts.dtype, device)?)
        } else {
            None
        };
        let sched_dir = folder.component("scheduler", &[])?;
        let mut sched_config: serde_json::Value = sched_dir.json_file("scheduler_config.json")?;
        if let Some(name) = &opts.scheduler {
            sched_config = scheduler::with_override(sched_config, name)?;
        }
        // Build one scheduler now so a bad scheduler config fails at load, not at the first job.
        let scheduler_name = scheduler::from_config(sched_config.clone())?
            .name()
            .to_string();
        let f = vae_config.downscale_factor();
        let default = transformer_config.sample_size * f;
        let info = PipelineInfo {
            class: Self::CLASS,
            family: Self::FAMILY,
            default_steps: Self::DEFAULT_STEPS,
            default_guidance: Self::DEFAULT_GUIDANCE,
            size: SizeRules {
                min_side: 1,
                max_side: MAX_SIDE,
                multiple: f * transformer_config.patch_size,
                max_area: 0,
                default_height: default,
                default_width: default,
                resolution_binning: true,
            },
            max_sequence_length: MAX_SEQUENCE_LENGTH,
            scheduler: scheduler_name,
            dtype: opts.dtype,
        };
        Ok(PixArtSigmaPipeline {
            info,
            stages,
            text,
            denoiser,
            transformer_config,
            vae,
            vae_config,
            scheduler: sched_config,
            device: device.clone(),
        })
    }

    /// The scheduler class.
    pub fn scheduler_name(&self) -> &str {
        &self.info.scheduler
    }

    /// The run dtype.
    pub fn dtype(&self) -> RunDtype {
        self.info.dtype
    }

    /// The VAE's spatial downscale factor (8 for the SDXL VAE).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae_config.downscale_factor()
    }

    /// The size rule without binning: height and width must be multiples of this.
    pub fn size_multiple(&self) -> usize {
        self.info.size.multiple
    }

    /// The default output size (transformer `sample_size` × VAE factor; 1024 for 1024-MS).
    pub fn default_size(&self) -> usize {
        self.info.size.default_height
    }

    /// Latent channels the transformer takes.
    pub fn latent_channels(&self) -> usize {
        self.transformer_config.in_channels
    }

    /// Resolves and checks the sizes of a request before any work is done.
    pub fn plan_size(
        &self,
        height: Option<u32>,
        width: Option<u32>,
        binning: bool,
    ) -> Result<SizePlan> {
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
            let table = bin_table_for_sample_size(self.transformer_config.sample_size)?;
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
                            self.transformer_config.patch_size,
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

    /// diffusers' `_text_preprocessing` with `clean_caption=False`: lower-case and strip.
    pub fn preprocess_text(text: &str) -> String {
        text.to_lowercase().trim().to_string()
    }

    fn encode_one(&self, text: &str) -> Result<(Tensor, Tensor)> {
        self.stages.require(Stage::TextEncoder)?;
        let Some(stage) = &self.text else {
            return Err(ModelError::invalid("stage", "text encoder not loaded"));
        };
        let text = Self::preprocess_text(text);
        let enc = stage.tokenizer.encode_padded(&text, MAX_SEQUENCE_LENGTH)?;
        if enc.num_truncated > 0 {
            let dropped = stage
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
        let embeds = stage.encoder.forward(&ids, Some(&mask))?;
        Ok((embeds, mask))
    }

    /// Stage 1 with PixArt's own types: encode the prompt (and the negative prompt when CFG
    /// is on).
    pub fn encode_prompt_embeds(
        &self,
        prompt: &str,
        negative_prompt: &str,
        guidance: f64,
    ) -> Result<PromptEmbeds> {
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

    /// Stage 2 with PixArt's own types: the denoising loop from raw standard-normal `noise`;
    /// returns the final latents (f32).
    pub fn denoise_embeds(
        &self,
        embeds: &PromptEmbeds,
        noise: &Tensor,
        steps: usize,
        guidance: f64,
        observer: &mut dyn StepObserver,
    ) -> Result<Tensor> {
        let _span = tracing::info_span!("denoise", steps).entered();
        let group = self.denoiser()?;
        let settings = LoopSettings::run(embeds.cfg, steps, guidance, (0, 0));
        let sched = self.scheduler.clone();
        let helper: HelperJob<PixArtTransformer> =
            Arc::new(move |t, coll| rank_denoise(t, Some(coll), &sched, None, None).map(|_| ()));
        group
            .run(helper, |t, coll| {
                rank_denoise(
                    t,
                    coll,
                    &self.scheduler,
                    Some((embeds, noise, settings)),
                    Some(observer),
                )
            })?
            .ok_or_else(|| ModelError::invalid("tensor parallel", "rank 0 returned no latents"))
    }

    fn denoiser(&self) -> Result<&DenoiserGroup<PixArtTransformer>> {
        self.stages.require(Stage::Denoiser)?;
        self.denoiser
            .as_ref()
            .ok_or_else(|| ModelError::invalid("stage", "denoiser not loaded"))
    }
}

impl DiffusionPipeline for PixArtSigmaPipeline {
    fn info(&self) -> &PipelineInfo {
        &self.info
    }

    fn stages(&self) -> StageSet {
        self.stages
    }

    fn tensor_parallel(&self) -> usize {
        self.denoiser.as_ref().map_or(1, |g| g.ranks())
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn validate(&self, req: &GenerateRequest) -> Result<SizePlan> {
        check_steps_and_guidance(req, &self.info, MAX_STEPS)?;
        let plan = self.plan_size(req.height, req.width, req.resolution_binning)?;
        check_latents_shape(req, self.latent_shape(&plan), &plan)?;
        Ok(plan)
    }

    fn latent_shape(&self, plan: &SizePlan) -> [usize; 4] {
        let f = self.vae_scale_factor();
        [
            1,
            self.latent_channels(),
            plan.gen_height / f,
            plan.gen_width / f,
        ]
    }

    fn encode_prompt(&self, req: &GenerateRequest) -> Result<Conditioning> {
        let negative = req.negative_prompt.as_deref().unwrap_or("");
        Ok(self
            .encode_prompt_embeds(&req.prompt, negative, req.guidance)?
            .to_conditioning())
    }

    fn denoise(
        &self,
        cond: &Conditioning,
        noise: &Tensor,
        req: &GenerateRequest,
        _plan: &SizePlan,
        observer: &mut dyn StepObserver,
    ) -> Result<Tensor> {
        let embeds = PromptEmbeds::from_conditioning(cond)?;
        self.denoise_embeds(&embeds, noise, req.steps, req.guidance, observer)
    }

    fn follow_denoise(&self) -> Result<bool> {
        let sched = &self.scheduler;
        let out = self
            .denoiser()?
            .follow(|t, coll| rank_denoise(t, Some(coll), sched, None, None))?;
        Ok(out.is_some())
    }

    fn stop_followers(&self) -> Result<()> {
        self.denoiser()?.stop_followers(&self.device)
    }

    fn decode(&self, latents: &Tensor, plan: &SizePlan) -> Result<Tensor> {
        let _span = tracing::info_span!("decode").entered();
        self.stages.require(Stage::Vae)?;
        let Some(vae) = &self.vae else {
            return Err(ModelError::invalid("stage", "VAE not loaded"));
        };
        let z = latents.to_device(&self.device)?.to_dtype(vae.dtype())?;
        let mut image = vae.decode_latents(&z)?.to_dtype(DType::F32)?;
        if (plan.gen_height, plan.gen_width) != (plan.height, plan.width) {
            image = resize_and_crop(&image, plan.height, plan.width)?;
        }
        Ok(((image / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
    }
}

/// The denoising loop of one rank (the whole model without tensor parallelism): `noise` is raw
/// standard-normal noise; returns the final latents (f32). `on_step` decides after each step
/// whether to go on.
fn denoise_loop(
    transformer: &PixArtTransformer,
    scheduler_config: &serde_json::Value,
    embeds: &PromptEmbeds,
    noise: &Tensor,
    steps: usize,
    guidance: f64,
    on_step: &mut dyn FnMut(StepEvent) -> Result<ControlFlow<()>>,
) -> Result<Tensor> {
    let mut sched = scheduler::from_config(scheduler_config.clone())?;
    sched.set_timesteps(steps)?;
    let timesteps = sched.timesteps().to_vec();
    let dt = transformer.dtype();
    let device = transformer.device();
    let in_ch = transformer.in_channels();
    let out_ch = transformer.out_channels();
    let enc = embeds.embeds.to_dtype(dt)?;
    let batch = enc.dim(0)?;
    // Caption projection, mask bias and every block's cross-attention K/V depend only on
    // the prompt: compute them once per job, not once per step.
    let text = transformer.encode_text(&enc, Some(&embeds.mask))?;
    let mut latents = noise
        .to_dtype(DType::F32)?
        .affine(sched.init_noise_sigma(), 0.0)?;
    let total = timesteps.len();
    for (i, &t) in timesteps.iter().enumerate() {
        let model_in = if embeds.cfg {
            Tensor::cat(&[&latents, &latents], 0)?
        } else {
            latents.clone()
        };
        let model_in = sched.scale_model_input(model_in, i)?.to_dtype(dt)?;
        let t_batch = Tensor::full(t as f32, batch, device)?;
        let out = transformer
            .forward_with_text(&model_in, &t_batch, &text)?
            .to_dtype(DType::F32)?;
        let out = if embeds.cfg {
            let u = out.narrow(0, 0, 1)?;
            let c = out.narrow(0, 1, 1)?;
            (&u + ((c - &u)? * guidance)?)?
        } else {
            out
        };
        let eps = if out_ch == 2 * in_ch {
            out.narrow(1, 0, in_ch)?
        } else {
            out
        };
        latents = sched.step(&eps, i, &latents)?;
        let event = StepEvent {
            step: i + 1,
            total,
            timestep: t,
        };
        if let ControlFlow::Break(()) = on_step(event)? {
            return Err(ModelError::Cancelled { step: i + 1 });
        }
    }
    Ok(latents)
}

// ------------------------------------------------------------------ tensor parallelism

/// One rank's loop. Rank 0 passes the job's embeddings, noise and settings and the observer,
/// and shares them with the other ranks, which pass `None`; without tensor parallelism
/// (`coll == None`) this is the plain loop. Returns `None` when rank 0 signalled that there is
/// no loop (followers stop).
fn rank_denoise(
    transformer: &PixArtTransformer,
    coll: Option<&dyn Collective>,
    scheduler_config: &serde_json::Value,
    job: Option<(&PromptEmbeds, &Tensor, LoopSettings)>,
    mut observer: Option<&mut dyn StepObserver>,
) -> Result<Option<Tensor>> {
    let dev = transformer.device();
    let settings = LoopSettings::share(coll, job.map(|(_, _, s)| s), dev)?;
    if !settings.go {
        return Ok(None);
    }
    let embeds = PromptEmbeds {
        embeds: share_from_rank0(coll, job.map(|(e, _, _)| &e.embeds), dev)?,
        mask: share_from_rank0(coll, job.map(|(e, _, _)| &e.mask), dev)?,
        cfg: settings.cfg,
    };
    let noise = share_from_rank0(coll, job.map(|(_, n, _)| n), dev)?;
    let mut on_step = |e: StepEvent| -> Result<ControlFlow<()>> {
        let stop = match observer.as_mut() {
            Some(o) => o.on_step(e).is_break(),
            None => false,
        };
        agree_on_stop(coll, stop, dev)
    };
    denoise_loop(
        transformer,
        scheduler_config,
        &embeds,
        &noise,
        settings.steps,
        settings.guidance,
        &mut on_step,
    )
    .map(Some)
}
