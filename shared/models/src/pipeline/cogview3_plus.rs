//! diffusers' `CogView3PlusPipeline` (CogView3-Plus-3B), stage by stage.
//!
//! Semantics (diffusers 0.42.1 `pipelines/cogview3/pipeline_cogview3plus.py`, models-spec §2.3):
//! - text: the prompt as is (no lower-casing), T5 tokenizer with `max_length` padding to 224
//!   tokens and truncation (a warning names the dropped text); the T5 encoder runs **without**
//!   an attention mask (the padding tokens are encoded too);
//! - the unconditional branch: with `negative_prompt` `None` it is all-zero embeddings of the
//!   prompt's shape; with `Some(text)` (even `""`) it is T5 of that text; CFG batch
//!   `[unconditional, conditional]`, `pred = u + g·(c − u)` on the f32 prediction; CFG is off
//!   when guidance ≤ 1;
//! - defaults: guidance 5.0, 50 steps, size `sample_size × vae_scale_factor` (1024²);
//! - size conditioning: `original_size = target_size = (H, W)`, crop coordinates `(0, 0)`;
//! - scheduler from `scheduler_config.json` (`CogVideoXDDIMScheduler`: v-prediction,
//!   zero-terminal SNR, SNR shift 4, trailing spacing; η = 0 so no noise is added), latents =
//!   noise · `init_noise_sigma`, integer timesteps fed to the transformer; the loop keeps the
//!   latents in f32 (diffusers keeps them in the run dtype);
//! - decode `latents / scaling_factor` with the 16-channel AutoencoderKL (no quant convs, no
//!   mid-block attention), image `(x/2 + 0.5).clamp(0, 1)`.
//!
//! Size rules, derived from the checkpoint's configs so that CogView3-Plus-3B gets exactly the
//! published limits (512 ≤ H, W ≤ 2048, H·W ≤ 2²¹, multiples of 32; SAT `sample_dit.py`):
//! largest side `pos_embed_max_size × patch_size × vae_scale_factor` (the positional table's
//! reach), smallest side `sample_size × vae_scale_factor / 2`, largest area = largest side² / 2,
//! multiple `patch_size × vae_scale_factor × 2`. [`GenerateRequest::size_check`] `false`
//! (`--no-size-check`) lifts the smallest side, the area and the ×2 of the multiple; the
//! multiple of `patch_size × vae_scale_factor` and the largest side stay (the model cannot run
//! without them). Resolution binning is not a CogView3 feature and is ignored.
//!
//! Tensor parallelism ([`PipelineOptions::tensor_parallel`]) runs the transformer over `N` ranks
//! (see [`super::tensor_parallel::DenoiserGroup`]); rank 0 broadcasts the embeddings and the
//! noise, every rank runs the same scheduler loop and rank 0 returns the latents.
//!
//! ```text
//! relayfarm render --model THUDM/CogView3-Plus-3B --prompt "a lighthouse at dusk" --output x.png
//! relayfarm render --model tests/fixtures/cogview3-plus-tiny --prompt "a red cabin" --output cabin.png --tp 2
//! ```

use super::diffusion::{
    check_latents_shape, check_steps_and_guidance, DiffusionPipeline, PipelineInfo, SizeRules,
};
use super::stage::{Conditioning, Stage, StageSet};
use super::tensor_parallel::{
    agree_on_stop, share_from_rank0, DenoiserGroup, HelperJob, LoopSettings,
};
use super::{GenerateRequest, PipelineOptions, SizePlan, StepEvent, StepObserver};
use crate::checkpoint::{ComponentFolder, PipelineFolder};
use crate::denoiser::cogview3_plus::{
    CogView3PlusConfig, CogView3PlusTransformer, ACCEPTED_CLASSES,
};
use crate::parallel::Collective;
use crate::scheduler;
use crate::text_encoder::t5::T5Encoder;
use crate::tokenizer::t5::T5Tokenizer;
use crate::vae::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use crate::{ModelError, Result};
use candle_core::{DType, Device, Tensor};
use std::ops::ControlFlow;
use std::sync::Arc;

/// The T5 sequence length CogView3-Plus uses (`max_sequence_length`).
pub const MAX_SEQUENCE_LENGTH: usize = 224;
/// The name of the text embeddings in the [`Conditioning`] (`[B, 224, D]`, `[uncond, cond]`
/// with CFG).
pub const EMBEDS: &str = "prompt_embeds";

/// The CogView3-Plus pipeline: T5 tokenizer and encoder, CogView3-Plus transformer, 16-channel
/// AutoencoderKL, CogVideoX DDIM. Each stage's weights are loaded only when
/// [`PipelineOptions::stages`] includes it; every config is always read.
pub struct CogView3PlusPipeline {
    info: PipelineInfo,
    stages: StageSet,
    text: Option<TextStage>,
    /// The denoiser: whole, or its tensor-parallel ranks.
    denoiser: Option<DenoiserGroup<CogView3PlusTransformer>>,
    transformer_config: CogView3PlusConfig,
    vae: Option<AutoencoderKL>,
    vae_config: AutoencoderKLConfig,
    /// The scheduler config that runs (the checkpoint's, or its override).
    scheduler_config: serde_json::Value,
    /// Most denoising steps (the scheduler's training timesteps).
    max_steps: usize,
    /// Where the size rules come from (for error messages).
    size_why: String,
    /// The multiple of `patch_size × vae_scale_factor` the model needs to run.
    run_multiple: usize,
    device: Device,
}

/// The text-encoder stage.
struct TextStage {
    tokenizer: T5Tokenizer,
    encoder: T5Encoder,
}

impl CogView3PlusPipeline {
    /// The diffusers pipeline class this implements.
    pub const CLASS: &'static str = "CogView3PlusPipeline";
    /// The model family name.
    pub const FAMILY: &'static str = "cogview3-plus";
    /// Default number of steps (diffusers).
    pub const DEFAULT_STEPS: usize = 50;
    /// Default guidance scale (diffusers).
    pub const DEFAULT_GUIDANCE: f64 = 5.0;

    /// Loads a diffusers CogView3-Plus folder: every component's config, and the weights of
    /// the stages in `opts.stages`. `opts.scheduler` replaces the scheduler (see
    /// [`scheduler::with_override`]).
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

        // Configs first (cheap), so a bad checkpoint fails before any weights are read.
        let tr = match &opts.transformer_dir {
            Some(dir) => ComponentFolder::open(dir, "transformer", ACCEPTED_CLASSES[0].into())?
                .with_variant(opts.variant.clone()),
            None => folder.component("transformer", ACCEPTED_CLASSES)?,
        };
        let transformer_config: CogView3PlusConfig = tr.config()?;
        transformer_config.validate()?;
        let vae_dir = folder.component("vae", &["AutoencoderKL"])?;
        let vae_config: AutoencoderKLConfig = vae_dir.config()?;
        vae_config.validate()?;
        if vae_config.latent_channels != transformer_config.in_channels {
            return Err(ModelError::invalid(
                "vae",
                format!(
                    "vae/config.json latent_channels {} differs from transformer/config.json in_channels {}",
                    vae_config.latent_channels, transformer_config.in_channels
                ),
            ));
        }
        let sched_dir = folder.component("scheduler", &[])?;
        let mut scheduler_config =
            sched_dir.json_file::<serde_json::Value>("scheduler_config.json")?;
        if let Some(name) = &opts.scheduler {
            scheduler_config = scheduler::with_override(scheduler_config, name)?;
        }
        // Build one scheduler now so a bad config fails at load, not at the first job.
        let scheduler_name = scheduler::from_config(scheduler_config.clone())?
            .name()
            .to_string();
        let max_steps = scheduler_config
            .get("num_train_timesteps")
            .and_then(|v| v.as_u64())
            .map_or(1000, |v| v as usize);

        let text = if stages.contains(Stage::TextEncoder) {
            let _span = tracing::info_span!("load", stage = "text-encoder").entered();
            let tok_dir = folder.component("tokenizer", &["T5Tokenizer", "T5TokenizerFast"])?;
            let te = folder.component("text_encoder", &["T5EncoderModel"])?;
            let encoder = T5Encoder::load(&te, opts.dtype, device)?;
            let d = encoder.config().d_model;
            if d != transformer_config.text_embed_dim {
                return Err(ModelError::invalid(
                    "text_encoder",
                    format!(
                        "T5 d_model {d} differs from transformer/config.json text_embed_dim {}",
                        transformer_config.text_embed_dim
                    ),
                ));
            }
            Some(TextStage {
                tokenizer: T5Tokenizer::from_folder(tok_dir.dir())?,
                encoder,
            })
        } else {
            None
        };
        let denoiser = if stages.contains(Stage::Denoiser) {
            let _span = tracing::info_span!("load", stage = "denoiser").entered();
            let (comp, dtype, variant) = (tr.clone(), opts.dtype, opts.variant.clone());
            if let Some(c) = &opts.collective {
                let t = CogView3PlusTransformer::load_sharded_variant(
                    &comp,
                    dtype,
                    device,
                    variant.as_deref(),
                    c.clone(),
                )?;
                Some(DenoiserGroup::external(t, c.clone()))
            } else {
                Some(DenoiserGroup::load(
                    device,
                    opts.tensor_parallel,
                    move |dev, coll| match coll {
                        None => CogView3PlusTransformer::load_variant(
                            &comp,
                            dtype,
                            dev,
                            variant.as_deref(),
                        ),
                        Some(c) => CogView3PlusTransformer::load_sharded_variant(
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
        let vae = if stages.contains(Stage::Vae) {
            let _span = tracing::info_span!("load", stage = "vae").entered();
            Some(AutoencoderKL::load(&vae_dir, opts.dtype, device)?)
        } else {
            None
        };

        let (size, size_why, run_multiple) = size_rules(&transformer_config, &vae_config);
        let info = PipelineInfo {
            class: Self::CLASS,
            family: Self::FAMILY,
            default_steps: Self::DEFAULT_STEPS,
            default_guidance: Self::DEFAULT_GUIDANCE,
            size,
            max_sequence_length: MAX_SEQUENCE_LENGTH,
            scheduler: scheduler_name,
            dtype: opts.dtype,
        };
        Ok(CogView3PlusPipeline {
            info,
            stages,
            text,
            denoiser,
            transformer_config,
            vae,
            vae_config,
            scheduler_config,
            max_steps,
            size_why,
            run_multiple,
            device: device.clone(),
        })
    }

    /// The scheduler class that runs.
    pub fn scheduler_name(&self) -> &str {
        &self.info.scheduler
    }

    /// The scheduler config that runs (the checkpoint's, or its override).
    pub fn scheduler_config(&self) -> &serde_json::Value {
        &self.scheduler_config
    }

    /// The VAE's spatial downscale factor (8).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae_config.downscale_factor()
    }

    /// The transformer's configuration.
    pub fn transformer_config(&self) -> &CogView3PlusConfig {
        &self.transformer_config
    }

    /// Resolves and checks the size of a request (see the module docs for the rules).
    pub fn plan_size(
        &self,
        height: Option<u32>,
        width: Option<u32>,
        size_check: bool,
    ) -> Result<SizePlan> {
        let rules = &self.info.size;
        let height = height.map_or(rules.default_height, |h| h as usize);
        let width = width.map_or(rules.default_width, |w| w as usize);
        if size_check {
            rules.check(height, width, &self.size_why)?;
        } else {
            // Only what the model needs to run: whole patches within the positional table.
            let relaxed = SizeRules {
                min_side: self.run_multiple,
                max_side: rules.max_side,
                multiple: self.run_multiple,
                max_area: 0,
                ..*rules
            };
            relaxed.check(
                height,
                width,
                &format!(
                    "{}; --no-size-check keeps only the multiple of patch_size × VAE factor and the positional table's largest side",
                    self.size_why
                ),
            )?;
        }
        Ok(SizePlan {
            height,
            width,
            gen_height: height,
            gen_width: width,
        })
    }

    /// T5 embeddings of one text `[1, 224, D]` (no attention mask, as diffusers).
    fn encode_one(&self, text: &str) -> Result<Tensor> {
        self.stages.require(Stage::TextEncoder)?;
        let Some(stage) = &self.text else {
            return Err(ModelError::invalid("stage", "text encoder not loaded"));
        };
        let enc = stage.tokenizer.encode_padded(text, MAX_SEQUENCE_LENGTH)?;
        if enc.num_truncated > 0 {
            let dropped = stage
                .tokenizer
                .truncated_text(text, MAX_SEQUENCE_LENGTH)?
                .unwrap_or_default();
            tracing::warn!(
                dropped_tokens = enc.num_truncated,
                "prompt truncated: T5 takes at most {MAX_SEQUENCE_LENGTH} tokens; {} tokens dropped: {dropped:?}",
                enc.num_truncated
            );
        }
        let ids = Tensor::new(enc.ids.as_slice(), &self.device)?.unsqueeze(0)?;
        stage.encoder.forward(&ids, None)
    }

    /// Stage 1 with plain tensors: `[uncond, cond]` embeddings with CFG (`guidance > 1`),
    /// `[cond]` without. `negative_prompt` `None` gives all-zero unconditional embeddings.
    pub fn encode_prompt_embeds(
        &self,
        prompt: &str,
        negative_prompt: Option<&str>,
        guidance: f64,
    ) -> Result<Conditioning> {
        let _span = tracing::info_span!("encode_text").entered();
        self.stages.require(Stage::TextEncoder)?;
        let cfg = guidance > 1.0;
        let cond = self.encode_one(prompt)?;
        if !cfg {
            return Ok(Conditioning::new(false).with(EMBEDS, cond));
        }
        let uncond = match negative_prompt {
            None => cond.zeros_like()?,
            Some(text) => self.encode_one(text)?,
        };
        Ok(Conditioning::new(true).with(EMBEDS, Tensor::cat(&[&uncond, &cond], 0)?))
    }

    /// Stage 2 with plain arguments: the denoising loop from raw standard-normal `noise` at
    /// generation size `height × width`; returns the final latents (f32).
    pub fn denoise_embeds(
        &self,
        cond: &Conditioning,
        noise: &Tensor,
        steps: usize,
        guidance: f64,
        (height, width): (usize, usize),
        observer: &mut dyn StepObserver,
    ) -> Result<Tensor> {
        let _span = tracing::info_span!("denoise", steps).entered();
        let group = self.denoiser()?;
        let embeds = cond.get(EMBEDS)?;
        let rows = if cond.cfg { 2 } else { 1 };
        if embeds.rank() != 3 || embeds.dim(0)? != rows {
            return Err(ModelError::invalid(
                "conditioning",
                format!(
                    "`{EMBEDS}` has shape {:?}; expected [{rows}, L, D] (cfg = {})",
                    embeds.dims(),
                    cond.cfg
                ),
            ));
        }
        let settings = LoopSettings::run(cond.cfg, steps, guidance, (height, width));
        let sched = self.scheduler_config.clone();
        let helper: HelperJob<CogView3PlusTransformer> =
            Arc::new(move |t, coll| rank_denoise(t, Some(coll), &sched, None, None).map(|_| ()));
        group
            .run(helper, |t, coll| {
                rank_denoise(
                    t,
                    coll,
                    &self.scheduler_config,
                    Some((embeds, noise, settings)),
                    Some(observer),
                )
            })?
            .ok_or_else(|| ModelError::invalid("tensor parallel", "rank 0 returned no latents"))
    }

    fn denoiser(&self) -> Result<&DenoiserGroup<CogView3PlusTransformer>> {
        self.stages.require(Stage::Denoiser)?;
        self.denoiser
            .as_ref()
            .ok_or_else(|| ModelError::invalid("stage", "denoiser not loaded"))
    }
}

/// The size rules of a checkpoint, where they come from, and the multiple the model needs.
fn size_rules(t: &CogView3PlusConfig, vae: &AutoencoderKLConfig) -> (SizeRules, String, usize) {
    let f = vae.downscale_factor();
    let p = t.patch_size;
    let max_side = t.pos_embed_max_size * p * f;
    let min_side = t.sample_size * f / 2;
    let multiple = p * f * 2;
    let default = t.sample_size * f;
    let rules = SizeRules {
        min_side,
        max_side,
        multiple,
        max_area: max_side * max_side / 2,
        default_height: default,
        default_width: default,
        resolution_binning: false,
    };
    let why = format!(
        "CogView3-Plus limits from the configs: largest side = pos_embed_max_size {} × patch_size {p} × VAE factor {f}, \
         smallest side = sample_size {} × {f} / 2, largest area = largest side² / 2, multiple = patch_size × VAE factor × 2; \
         --no-size-check lifts the range and area limits",
        t.pos_embed_max_size, t.sample_size
    );
    (rules, why, p * f)
}

impl DiffusionPipeline for CogView3PlusPipeline {
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
        check_steps_and_guidance(req, &self.info, self.max_steps)?;
        // Some step counts give no valid schedule (see the scheduler's error): fail here, not
        // after the text encoder ran. Building the tables is cheap.
        scheduler::from_config(self.scheduler_config.clone())?
            .set_timesteps(req.steps)
            .map_err(|e| match e {
                ModelError::InvalidInput { message, .. } => ModelError::invalid("steps", message),
                other => other,
            })?;
        let plan = self.plan_size(req.height, req.width, req.size_check)?;
        check_latents_shape(req, self.latent_shape(&plan), &plan)?;
        Ok(plan)
    }

    fn latent_shape(&self, plan: &SizePlan) -> [usize; 4] {
        let f = self.vae_scale_factor();
        [
            1,
            self.transformer_config.in_channels,
            plan.gen_height / f,
            plan.gen_width / f,
        ]
    }

    fn encode_prompt(&self, req: &GenerateRequest) -> Result<Conditioning> {
        self.encode_prompt_embeds(&req.prompt, req.negative_prompt.as_deref(), req.guidance)
    }

    fn denoise(
        &self,
        cond: &Conditioning,
        noise: &Tensor,
        req: &GenerateRequest,
        plan: &SizePlan,
        observer: &mut dyn StepObserver,
    ) -> Result<Tensor> {
        self.denoise_embeds(
            cond,
            noise,
            req.steps,
            req.guidance,
            (plan.gen_height, plan.gen_width),
            observer,
        )
    }

    fn follow_denoise(&self) -> Result<bool> {
        let sched = &self.scheduler_config;
        let out = self
            .denoiser()?
            .follow(|t, coll| rank_denoise(t, Some(coll), sched, None, None))?;
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

// ------------------------------------------------------------------ the loop, per rank

/// One rank's loop. Rank 0 passes the job's embeddings and noise and the observer and shares
/// them with the other ranks, which pass `None`; without tensor parallelism (`coll == None`)
/// this is the plain loop.
fn rank_denoise(
    transformer: &CogView3PlusTransformer,
    coll: Option<&dyn Collective>,
    scheduler_config: &serde_json::Value,
    job: Option<(&Tensor, &Tensor, LoopSettings)>,
    mut observer: Option<&mut dyn StepObserver>,
) -> Result<Option<Tensor>> {
    let dev = transformer.device();
    let settings = LoopSettings::share(coll, job.map(|(_, _, s)| s), dev)?;
    if !settings.go {
        return Ok(None);
    }
    let embeds = share_from_rank0(coll, job.map(|(e, _, _)| e), dev)?;
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
        settings,
        &mut on_step,
    )
    .map(Some)
}

/// The denoising loop (diffusers `CogView3PlusPipeline.__call__`): `noise` is raw
/// standard-normal noise; returns the final latents (f32).
fn denoise_loop(
    transformer: &CogView3PlusTransformer,
    scheduler_config: &serde_json::Value,
    embeds: &Tensor,
    noise: &Tensor,
    settings: LoopSettings,
    on_step: &mut dyn FnMut(StepEvent) -> Result<ControlFlow<()>>,
) -> Result<Tensor> {
    let mut sched = scheduler::from_config(scheduler_config.clone())?;
    sched.set_timesteps(settings.steps)?;
    let timesteps = sched.timesteps().to_vec();
    let dt = transformer.dtype();
    let device = transformer.device();
    let batch = embeds.dim(0)?;
    // The text projection depends only on the prompt: once per job.
    let text = transformer.encode_text(&embeds.to_dtype(dt)?)?;
    let (h, w) = (settings.height as f32, settings.width as f32);
    let size = Tensor::new(&[[h, w]], device)?.repeat((batch, 1))?;
    let crop = Tensor::zeros((batch, 2), DType::F32, device)?;
    let mut latents = noise
        .to_device(device)?
        .to_dtype(DType::F32)?
        .affine(sched.init_noise_sigma(), 0.0)?;
    let total = timesteps.len();
    for (i, &t) in timesteps.iter().enumerate() {
        let model_in = if settings.cfg {
            Tensor::cat(&[&latents, &latents], 0)?
        } else {
            latents.clone()
        };
        let model_in = sched.scale_model_input(model_in, i)?.to_dtype(dt)?;
        let t_batch = Tensor::full(t as f32, batch, device)?;
        let out = transformer
            .forward_with_text(&model_in, &text, &t_batch, &size, &size, &crop)?
            .to_dtype(DType::F32)?;
        let pred = if settings.cfg {
            let u = out.narrow(0, 0, 1)?;
            let c = out.narrow(0, 1, 1)?;
            (&u + ((c - &u)? * settings.guidance)?)?
        } else {
            out
        };
        latents = sched.step(&pred, i, &latents)?;
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
