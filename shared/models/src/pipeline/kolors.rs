//! diffusers' `KolorsPipeline` (text-to-image), stage by stage.
//!
//! Semantics (diffusers 0.42.1 `pipelines/kolors/pipeline_kolors.py`, models-spec §4):
//! - text: ChatGLM3 tokenizer with `max_length` 256 (left padding, truncation with a warning),
//!   `[gMASK] sop` prefix; the encoder's `hidden_states[-2]` are the prompt embeddings
//!   (`[1, 256, 4096]`) and the last block's pre-norm output at the last token is the pooled
//!   embedding (`[1, 4096]`). The negative prompt (default `""`: `force_zeros_for_empty_prompt`
//!   is false) is encoded the same way;
//! - CFG batch `[unconditional, conditional]`, `pred = u + g·(c − u)`; CFG is off when
//!   guidance ≤ 1;
//! - the UNet's `text_time` conditioning: the pooled embedding plus the time ids
//!   `(height, width, 0, 0, height, width)` (original size, crop top-left, target size);
//! - scheduler from `scheduler_config.json` (Kolors: EulerDiscreteScheduler, 1100 training
//!   steps, leading spacing) or the `PipelineOptions::scheduler` override
//!   ([`crate::scheduler::with_override`]); latents = noise · `init_noise_sigma`, the model
//!   input is `scale_model_input(latents)`;
//! - decode `latents / scaling_factor` with the SDXL VAE (in f32 when its config has
//!   `force_upcast` and the run dtype is f16, like diffusers), then `(x/2 + 0.5).clamp(0, 1)`.
//!
//! Defaults: 50 steps, guidance 5.0, size `unet.sample_size × 8` (1024 px); height and width
//! must be multiples of 8 (`check_inputs`).
//!
//! With [`PipelineOptions::tensor_parallel`] `N > 1` the UNet runs over `N` ranks
//! ([`crate::unet`]'s head-split attention): rank 0 broadcasts the prompt embeddings, the pooled
//! embeddings and the initial noise; every rank runs the same scheduler loop.
//!
//! ```text
//! relayfarm render --model Kolors-diffusers --prompt "一只可爱的小猫" --output cat.png
//! relayfarm render --model tests/fixtures/kolors-tiny --prompt "a red cabin" --output cabin.png
//! ```

use super::diffusion::{
    check_latents_shape, check_steps_and_guidance, DiffusionPipeline, PipelineInfo, SizeRules,
};
use super::stage::{Conditioning, Stage, StageSet};
use super::tensor_parallel::{
    agree_on_stop, share_from_rank0, DenoiserGroup, HelperJob, LoopSettings,
};
use super::{GenerateRequest, PipelineOptions, SizePlan, StepEvent, StepObserver};
use crate::checkpoint::PipelineFolder;
use crate::parallel::Collective;
use crate::scheduler;
use crate::text_encoder::chatglm::ChatGlmEncoder;
use crate::tokenizer::chatglm::{ChatGlmTokenizer, KOLORS_MAX_LENGTH};
use crate::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::vae::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use crate::{ModelError, Result, RunDtype};
use candle_core::{DType, Device, Tensor};
use std::ops::ControlFlow;
use std::sync::Arc;

/// The largest side relayfarm accepts, in pixels.
pub const MAX_SIDE: usize = 8192;

const EMBEDS: &str = "prompt_embeds";
const POOLED: &str = "pooled_prompt_embeds";

/// The Kolors pipeline: ChatGLM3 tokenizer and encoder, SDXL-topology UNet, SDXL VAE, Euler.
/// Each stage's weights are loaded only when [`PipelineOptions::stages`] includes it.
pub struct KolorsPipeline {
    info: PipelineInfo,
    stages: StageSet,
    text: Option<TextStage>,
    denoiser: Option<DenoiserGroup<UNet2DConditionModel>>,
    unet_config: UNet2DConditionConfig,
    vae: Option<AutoencoderKL>,
    vae_config: AutoencoderKLConfig,
    /// The scheduler config that runs (the checkpoint's, or the override's).
    scheduler_config: serde_json::Value,
    device: Device,
}

struct TextStage {
    tokenizer: ChatGlmTokenizer,
    encoder: ChatGlmEncoder,
}

/// Text embeddings for one prompt (and its negative when CFG is on).
#[derive(Debug, Clone)]
pub struct KolorsEmbeds {
    /// `[B, 256, 4096]`: `[uncond, cond]` with CFG, `[cond]` without.
    pub prompt_embeds: Tensor,
    /// `[B, 4096]` pooled embeddings, same order.
    pub pooled: Tensor,
    /// Whether the batch holds the unconditional half.
    pub cfg: bool,
}

impl KolorsEmbeds {
    /// As the stage message.
    pub fn to_conditioning(&self) -> Conditioning {
        Conditioning::new(self.cfg)
            .with(EMBEDS, self.prompt_embeds.clone())
            .with(POOLED, self.pooled.clone())
    }

    /// From the stage message.
    pub fn from_conditioning(c: &Conditioning) -> Result<Self> {
        Ok(KolorsEmbeds {
            prompt_embeds: c.get(EMBEDS)?.clone(),
            pooled: c.get(POOLED)?.clone(),
            cfg: c.cfg,
        })
    }
}

impl KolorsPipeline {
    /// The diffusers pipeline class this implements.
    pub const CLASS: &'static str = "KolorsPipeline";
    /// The model family name.
    pub const FAMILY: &'static str = "kolors";
    /// Default number of steps (diffusers, Kolors README).
    pub const DEFAULT_STEPS: usize = 50;
    /// Default guidance scale (diffusers, Kolors README).
    pub const DEFAULT_GUIDANCE: f64 = 5.0;

    /// Loads a Kolors-diffusers folder: every component's config, and the weights of the
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
        let variant = opts.variant.clone();

        let text = if stages.contains(Stage::TextEncoder) {
            let _span = tracing::info_span!("load", stage = "text-encoder").entered();
            let tok_dir = folder.component("tokenizer", &["ChatGLMTokenizer"])?;
            let te = folder.component("text_encoder", &["ChatGLMModel"])?;
            Some(TextStage {
                tokenizer: ChatGlmTokenizer::from_folder(tok_dir.dir())?,
                encoder: ChatGlmEncoder::load(&te, opts.dtype, device, variant.as_deref())?,
            })
        } else {
            None
        };

        let unet_dir = folder.component("unet", crate::unet::ACCEPTED_CLASSES)?;
        let unet_config: UNet2DConditionConfig = unet_dir.config()?;
        unet_config.validate()?;
        if !unet_config.uses_text_time() {
            return Err(ModelError::UnsupportedConfig {
                component: "unet".into(),
                field: "addition_embed_type".into(),
                value: format!("{:?}", unet_config.addition_embed_type),
                hint: "Kolors' UNet takes the pooled text embedding and time ids (\"text_time\")"
                    .into(),
            });
        }
        let denoiser = if stages.contains(Stage::Denoiser) {
            let _span = tracing::info_span!("load", stage = "denoiser").entered();
            let (comp, dtype, variant) = (unet_dir.clone(), opts.dtype, variant.clone());
            if let Some(c) = &opts.collective {
                let u = UNet2DConditionModel::load_sharded(
                    &comp,
                    dtype,
                    device,
                    variant.as_deref(),
                    c.clone(),
                )?;
                Some(DenoiserGroup::external(u, c.clone()))
            } else {
                Some(DenoiserGroup::load(
                    device,
                    opts.tensor_parallel,
                    move |dev, coll| match coll {
                        None => UNet2DConditionModel::load(&comp, dtype, dev, variant.as_deref()),
                        Some(c) => UNet2DConditionModel::load_sharded(
                            &comp,
                            dtype,
                            dev,
                            variant.as_deref(),
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
            Some(AutoencoderKL::load(
                &vae_dir,
                vae_dtype(opts.dtype, &vae_config),
                device,
            )?)
        } else {
            None
        };

        let sched_dir = folder.component("scheduler", &[])?;
        let mut scheduler_config: serde_json::Value =
            sched_dir.json_file("scheduler_config.json")?;
        if let Some(name) = &opts.scheduler {
            scheduler_config = scheduler::with_override(scheduler_config, name)?;
        }
        // Build one scheduler now so a bad config fails at load, not at the first job.
        let scheduler_name = scheduler::from_config(scheduler_config.clone())?
            .name()
            .to_string();

        let f = vae_config.downscale_factor();
        let sample_size = unet_config
            .sample_size
            .as_ref()
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(128) as usize;
        let default = sample_size * f;
        let multiple = lcm(8, f);
        let info = PipelineInfo {
            class: Self::CLASS,
            family: Self::FAMILY,
            default_steps: Self::DEFAULT_STEPS,
            default_guidance: Self::DEFAULT_GUIDANCE,
            size: SizeRules {
                min_side: multiple,
                max_side: MAX_SIDE,
                multiple,
                max_area: 0,
                default_height: default,
                default_width: default,
                resolution_binning: false,
            },
            max_sequence_length: KOLORS_MAX_LENGTH,
            scheduler: scheduler_name,
            dtype: opts.dtype,
        };
        Ok(KolorsPipeline {
            info,
            stages,
            text,
            denoiser,
            unet_config,
            vae,
            vae_config,
            scheduler_config,
            device: device.clone(),
        })
    }

    /// The scheduler config that runs (after any override).
    pub fn scheduler_config(&self) -> &serde_json::Value {
        &self.scheduler_config
    }

    /// The VAE's spatial downscale factor (8).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae_config.downscale_factor()
    }

    /// Latent channels the UNet takes.
    pub fn latent_channels(&self) -> usize {
        self.unet_config.in_channels
    }

    /// Most denoising steps: the scheduler's training timesteps.
    fn max_steps(&self) -> usize {
        self.scheduler_config
            .get("num_train_timesteps")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(1000) as usize
    }

    fn encode_one(&self, text: &str) -> Result<(Tensor, Tensor)> {
        self.stages.require(Stage::TextEncoder)?;
        let Some(stage) = &self.text else {
            return Err(ModelError::invalid("stage", "text encoder not loaded"));
        };
        let enc = stage.tokenizer.encode_padded(text, KOLORS_MAX_LENGTH)?;
        if enc.num_truncated > 0 {
            let all = stage.tokenizer.encode(text);
            let dropped = stage
                .tokenizer
                .decode(&all[all.len() - enc.num_truncated..]);
            tracing::warn!(
                dropped_tokens = enc.num_truncated,
                "prompt truncated: ChatGLM takes at most {KOLORS_MAX_LENGTH} tokens ([gMASK] sop included); dropped: {dropped:?}"
            );
        }
        let out =
            stage
                .encoder
                .forward(&[enc.input_ids], &[enc.attention_mask], &[enc.position_ids])?;
        Ok((out.prompt_embeds, out.pooled))
    }

    /// Stage 1 with Kolors' own types: encode the prompt (and the negative prompt when CFG is
    /// on).
    pub fn encode_prompt_embeds(
        &self,
        prompt: &str,
        negative_prompt: &str,
        guidance: f64,
    ) -> Result<KolorsEmbeds> {
        let _span = tracing::info_span!("encode_text").entered();
        let cfg = guidance > 1.0;
        let (cond, cond_pooled) = self.encode_one(prompt)?;
        if !cfg {
            return Ok(KolorsEmbeds {
                prompt_embeds: cond,
                pooled: cond_pooled,
                cfg,
            });
        }
        let (uncond, uncond_pooled) = self.encode_one(negative_prompt)?;
        Ok(KolorsEmbeds {
            prompt_embeds: Tensor::cat(&[&uncond, &cond], 0)?,
            pooled: Tensor::cat(&[&uncond_pooled, &cond_pooled], 0)?,
            cfg,
        })
    }

    /// Stage 2 with Kolors' own types: the denoising loop from raw standard-normal `noise` for
    /// an image of `height × width` pixels; returns the final latents (f32).
    pub fn denoise_embeds(
        &self,
        embeds: &KolorsEmbeds,
        noise: &Tensor,
        size: (usize, usize),
        steps: usize,
        guidance: f64,
        observer: &mut dyn StepObserver,
    ) -> Result<Tensor> {
        let _span = tracing::info_span!("denoise", steps).entered();
        let group = self.denoiser()?;
        let settings = LoopSettings::run(embeds.cfg, steps, guidance, size);
        let sched = self.scheduler_config.clone();
        let helper: HelperJob<UNet2DConditionModel> =
            Arc::new(move |u, coll| rank_denoise(u, Some(coll), &sched, None, None).map(|_| ()));
        group
            .run(helper, |u, coll| {
                rank_denoise(
                    u,
                    coll,
                    &self.scheduler_config,
                    Some((embeds, noise, settings)),
                    Some(observer),
                )
            })?
            .ok_or_else(|| ModelError::invalid("tensor parallel", "rank 0 returned no latents"))
    }

    fn denoiser(&self) -> Result<&DenoiserGroup<UNet2DConditionModel>> {
        self.stages.require(Stage::Denoiser)?;
        self.denoiser
            .as_ref()
            .ok_or_else(|| ModelError::invalid("stage", "denoiser not loaded"))
    }
}

/// The VAE dtype: f32 when the config asks for `force_upcast` and the run dtype is f16
/// (diffusers' `needs_upcasting`), else the run dtype.
fn vae_dtype(dtype: RunDtype, cfg: &AutoencoderKLConfig) -> RunDtype {
    if dtype == RunDtype::F16 && cfg.force_upcast {
        RunDtype::F32
    } else {
        dtype
    }
}

fn lcm(a: usize, b: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    if a == 0 || b == 0 {
        a.max(b)
    } else {
        a / gcd(a, b) * b
    }
}

impl DiffusionPipeline for KolorsPipeline {
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
        check_steps_and_guidance(req, &self.info, self.max_steps())?;
        let rules = self.info.size;
        let height = req.height.map_or(rules.default_height, |h| h as usize);
        let width = req.width.map_or(rules.default_width, |w| w as usize);
        let why = format!(
            "KolorsPipeline.check_inputs: height and width must be divisible by {} (VAE factor {})",
            rules.multiple,
            self.vae_scale_factor()
        );
        rules.check(height, width, &why)?;
        let plan = SizePlan {
            height,
            width,
            gen_height: height,
            gen_width: width,
        };
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
        plan: &SizePlan,
        observer: &mut dyn StepObserver,
    ) -> Result<Tensor> {
        let embeds = KolorsEmbeds::from_conditioning(cond)?;
        self.denoise_embeds(
            &embeds,
            noise,
            (plan.gen_height, plan.gen_width),
            req.steps,
            req.guidance,
            observer,
        )
    }

    fn follow_denoise(&self) -> Result<bool> {
        let sched = &self.scheduler_config;
        let out = self
            .denoiser()?
            .follow(|u, coll| rank_denoise(u, Some(coll), sched, None, None))?;
        Ok(out.is_some())
    }

    fn stop_followers(&self) -> Result<()> {
        self.denoiser()?.stop_followers(&self.device)
    }

    fn decode(&self, latents: &Tensor, _plan: &SizePlan) -> Result<Tensor> {
        let _span = tracing::info_span!("decode").entered();
        self.stages.require(Stage::Vae)?;
        let Some(vae) = &self.vae else {
            return Err(ModelError::invalid("stage", "VAE not loaded"));
        };
        let z = latents.to_device(&self.device)?.to_dtype(vae.dtype())?;
        let image = vae.decode_latents(&z)?.to_dtype(DType::F32)?;
        Ok(((image / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
    }
}

// ------------------------------------------------------------------ the loop

/// One rank's loop. Rank 0 passes the job's embeddings, noise and observer and shares them
/// with the other ranks, which pass `None`; without tensor parallelism (`coll == None`) this
/// is the plain loop.
fn rank_denoise(
    unet: &UNet2DConditionModel,
    coll: Option<&dyn Collective>,
    scheduler_config: &serde_json::Value,
    job: Option<(&KolorsEmbeds, &Tensor, LoopSettings)>,
    mut observer: Option<&mut dyn StepObserver>,
) -> Result<Option<Tensor>> {
    let dev = unet.device();
    let settings = LoopSettings::share(coll, job.map(|(_, _, s)| s), dev)?;
    if !settings.go {
        return Ok(None);
    }
    let embeds = KolorsEmbeds {
        prompt_embeds: share_from_rank0(coll, job.map(|(e, _, _)| &e.prompt_embeds), dev)?,
        pooled: share_from_rank0(coll, job.map(|(e, _, _)| &e.pooled), dev)?,
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
        unet,
        scheduler_config,
        &embeds,
        &noise,
        settings,
        &mut on_step,
    )
    .map(Some)
}

/// `KolorsPipeline.__call__`'s denoising loop: `noise` is raw standard-normal noise; returns
/// the final latents (f32).
fn denoise_loop(
    unet: &UNet2DConditionModel,
    scheduler_config: &serde_json::Value,
    embeds: &KolorsEmbeds,
    noise: &Tensor,
    s: LoopSettings,
    on_step: &mut dyn FnMut(StepEvent) -> Result<ControlFlow<()>>,
) -> Result<Tensor> {
    let mut sched = scheduler::from_config(scheduler_config.clone())?;
    sched.set_timesteps(s.steps)?;
    let timesteps = sched.timesteps().to_vec();
    let dt = unet.dtype();
    let device = unet.device();
    let batch = embeds.prompt_embeds.dim(0)?;
    let prompt_embeds = embeds.prompt_embeds.to_device(device)?.to_dtype(dt)?;
    let pooled = embeds.pooled.to_device(device)?;
    // add_time_ids = original_size + crops_coords_top_left + target_size, one row per batch.
    let (h, w) = (s.height as f32, s.width as f32);
    let ids = [h, w, 0.0, 0.0, h, w];
    let time_ids = Tensor::new(&ids, device)?
        .unsqueeze(0)?
        .repeat((batch, 1))?;
    let mut latents = noise
        .to_device(device)?
        .to_dtype(DType::F32)?
        .affine(sched.init_noise_sigma(), 0.0)?;
    let total = timesteps.len();
    for (i, &t) in timesteps.iter().enumerate() {
        let model_in = if s.cfg {
            Tensor::cat(&[&latents, &latents], 0)?
        } else {
            latents.clone()
        };
        let model_in = sched.scale_model_input(model_in, i)?;
        let t_tensor = Tensor::new(&[t as f32], device)?;
        let out = unet
            .forward(&model_in, &t_tensor, &prompt_embeds, &pooled, &time_ids)?
            .to_dtype(DType::F32)?;
        let eps = if s.cfg {
            let u = out.narrow(0, 0, 1)?;
            let c = out.narrow(0, 1, 1)?;
            (&u + ((c - &u)? * s.guidance)?)?
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_multiple_and_vae_upcast() {
        assert_eq!(lcm(8, 8), 8);
        assert_eq!(lcm(8, 16), 16);
        let mut cfg = AutoencoderKLConfig::sdxl();
        cfg.force_upcast = true;
        assert_eq!(vae_dtype(RunDtype::F16, &cfg), RunDtype::F32);
        assert_eq!(vae_dtype(RunDtype::Bf16, &cfg), RunDtype::Bf16);
        cfg.force_upcast = false;
        assert_eq!(vae_dtype(RunDtype::F16, &cfg), RunDtype::F16);
    }
}
