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

use super::noise::randn;
use super::resolution::{bin_table_for_sample_size, classify_height_width_bin, resize_and_crop};
use super::{GenerateRequest, Generated, SizePlan, StepEvent, StepObserver};
use crate::checkpoint::{ComponentFolder, PipelineFolder};
use crate::denoiser::pixart::{PixArtOptions, PixArtTransformer};
use crate::parallel::{
    broadcast_from, Collective, InProcessCollective, RankAbort, RankJob, RankThreads,
};
use crate::scheduler;
use crate::text_encoder::t5::T5Encoder;
use crate::tokenizer::t5::T5Tokenizer;
use crate::vae::autoencoder_kl::AutoencoderKL;
use crate::{ModelError, Result, RunDtype};
use candle_core::{DType, Device, DeviceLocation, Tensor};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

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
    /// Tensor-parallel ranks for the denoiser (1: off). On the CPU the ranks are threads of
    /// this process; on `cuda:K` rank `r` uses GPU `K + r` and NCCL (feature `cuda`). The
    /// attention heads must divide by it (16 for PixArt-Σ XL: 1, 2, 4, 8 or 16).
    pub tensor_parallel: usize,
}

/// The PixArt-Σ pipeline: T5 tokenizer and encoder, PixArt transformer, SDXL VAE, DPM-Solver.
pub struct PixArtSigmaPipeline {
    tokenizer: T5Tokenizer,
    text_encoder: T5Encoder,
    /// The denoiser, or its rank-0 shard with tensor parallelism.
    transformer: PixArtTransformer,
    /// Ranks `1..N` of a tensor-parallel denoiser.
    tp: Option<TensorParallel>,
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
            tensor_parallel: 1,
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
        if opts.dtype == RunDtype::Bf16 && opts.device.is_cpu() {
            return Err(ModelError::invalid(
                "dtype",
                "bf16 needs a CUDA device (candle's CPU matmul has no bf16 kernel); on the CPU use --dtype f32 or f16",
            ));
        }
        let folder = &folder.clone().with_variant(opts.variant.clone());
        let device = &opts.device;
        let tok_dir = folder.component("tokenizer", &["T5Tokenizer", "T5TokenizerFast"])?;
        let tokenizer = T5Tokenizer::from_folder(tok_dir.dir())?;
        let te = folder.component("text_encoder", &["T5EncoderModel"])?;
        let text_encoder = T5Encoder::load(&te, opts.dtype, device)?;
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
        let (transformer, tp) = load_denoiser(&tr, opts)?;
        let vae_dir = folder.component("vae", &["AutoencoderKL"])?;
        let vae = AutoencoderKL::load(&vae_dir, opts.dtype, device)?;
        let sched_dir = folder.component("scheduler", &[])?;
        // Build one scheduler now so a bad scheduler config fails at load, not at the first job.
        let scheduler_name = scheduler::from_folder(&sched_dir)?.name().to_string();
        Ok(PixArtSigmaPipeline {
            tokenizer,
            text_encoder,
            transformer,
            tp,
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
        [
            1,
            self.latent_channels(),
            plan.gen_height / f,
            plan.gen_width / f,
        ]
    }

    /// Checks every parameter of a request; returns its size plan.
    pub fn validate(&self, req: &GenerateRequest) -> Result<SizePlan> {
        if req.steps == 0 {
            return Err(ModelError::invalid(
                "steps",
                "must be at least 1 (PixArt-Σ default: 20)",
            ));
        }
        if req.steps > 1000 {
            return Err(ModelError::invalid(
                "steps",
                format!("{} exceeds the 1000 training timesteps", req.steps),
            ));
        }
        if !req.guidance.is_finite() || req.guidance < 0.0 {
            return Err(ModelError::invalid(
                "guidance",
                format!("{} must be a finite number ≥ 0 (default 4.5)", req.guidance),
            ));
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
    pub fn encode_prompt(
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

    /// The initial noise for a request: `--latents` if given, else seeded noise.
    pub fn initial_noise(&self, req: &GenerateRequest, plan: &SizePlan) -> Result<Tensor> {
        let shape = self.latent_shape(plan);
        match &req.latents {
            Some(l) => Ok(l
                .to_dtype(DType::F32)?
                .reshape(&shape[..])?
                .to_device(&self.device)?),
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
        match &self.tp {
            None => denoise_loop(
                &self.transformer,
                &self.scheduler,
                embeds,
                noise,
                steps,
                guidance,
                &mut |e| Ok(observer.on_step(e)),
            ),
            Some(tp) => self.denoise_parallel(tp, embeds, noise, steps, guidance, observer),
        }
    }

    /// Tensor-parallel ranks of the denoiser (1 without tensor parallelism).
    pub fn tensor_parallel(&self) -> usize {
        self.transformer.tensor_parallel_rank().1
    }

    fn denoise_parallel(
        &self,
        tp: &TensorParallel,
        embeds: &PromptEmbeds,
        noise: &Tensor,
        steps: usize,
        guidance: f64,
        observer: &mut dyn StepObserver,
    ) -> Result<Tensor> {
        // The ranks run one loop at a time.
        let mut broken = tp.busy.lock().unwrap_or_else(|p| p.into_inner());
        if *broken {
            return Err(ModelError::invalid(
                "tensor parallel",
                "a denoiser rank failed in an earlier job and the group cannot be reused; load the pipeline again",
            ));
        }
        let sched = self.scheduler.clone();
        let cfg = embeds.cfg;
        let job: RankJob<DenoiserRank> = Arc::new(move |_rank, r: &DenoiserRank| {
            let result = rank_denoise(
                &r.transformer,
                r.collective.as_ref(),
                &sched,
                None,
                RankLoop {
                    cfg,
                    steps,
                    guidance,
                },
                None,
            );
            if let Err(e) = &result {
                if !matches!(e, ModelError::Cancelled { .. }) {
                    r.collective.abort(&e.to_string());
                }
            }
            result.map(|_| ())
        });
        let pending = tp.helpers.dispatch(job)?;
        let r0 = rank_denoise(
            &self.transformer,
            tp.rank0.as_ref(),
            &self.scheduler,
            Some((embeds, noise)),
            RankLoop {
                cfg,
                steps,
                guidance,
            },
            Some(observer),
        );
        if let Err(e) = &r0 {
            if !matches!(e, ModelError::Cancelled { .. }) {
                tp.rank0.abort(&e.to_string());
            }
        }
        let rest = pending.wait();
        let failed = |e: Option<&ModelError>| matches!(e, Some(e) if !matches!(e, ModelError::Cancelled { .. }));
        if failed(r0.as_ref().err()) || failed(rest.as_ref().err()) {
            match &tp.reset {
                // Every rank has returned: the in-process group can be cleared and reused.
                Some(group) => group.reset(),
                None => *broken = true,
            }
        }
        match (r0, rest) {
            (Ok(latents), Ok(())) => Ok(latents),
            (Err(e), _) | (Ok(_), Err(e)) => Err(e),
        }
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
    pub fn generate(
        &self,
        req: &GenerateRequest,
        observer: &mut dyn StepObserver,
    ) -> Result<Generated> {
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

/// The denoising loop of one rank (the whole model without tensor parallelism): `noise` is raw
/// standard-normal noise; returns the final latents (f32). `on_step` decides after each step
/// whether to go on.
fn denoise_loop(
    transformer: &PixArtTransformer,
    scheduler_dir: &ComponentFolder,
    embeds: &PromptEmbeds,
    noise: &Tensor,
    steps: usize,
    guidance: f64,
    on_step: &mut dyn FnMut(StepEvent) -> Result<ControlFlow<()>>,
) -> Result<Tensor> {
    let mut sched = scheduler::from_folder(scheduler_dir)?;
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

/// One helper rank of a tensor-parallel denoiser: its shard and its collective.
struct DenoiserRank {
    transformer: PixArtTransformer,
    collective: Arc<dyn Collective>,
}

/// Ranks `1..N` of a tensor-parallel denoiser; rank 0 is [`PixArtSigmaPipeline`]'s own
/// transformer, run on the caller's thread.
struct TensorParallel {
    helpers: RankThreads<DenoiserRank>,
    rank0: Arc<dyn Collective>,
    /// The in-process group, cleared after a failed job; `None` for NCCL, whose
    /// communicators cannot be reused after an abort.
    reset: Option<InProcessCollective>,
    /// Held while a loop runs; `true` once the group is unusable.
    busy: Mutex<bool>,
}

/// The scalar settings of a loop, the same on every rank.
#[derive(Debug, Clone, Copy)]
struct RankLoop {
    cfg: bool,
    steps: usize,
    guidance: f64,
}

/// One rank's part of a tensor-parallel loop. Rank 0 passes the job's embeddings and noise
/// and the observer, and broadcasts them; the other ranks pass `None` and receive them.
fn rank_denoise(
    transformer: &PixArtTransformer,
    coll: &dyn Collective,
    scheduler_dir: &ComponentFolder,
    job: Option<(&PromptEmbeds, &Tensor)>,
    settings: RankLoop,
    mut observer: Option<&mut dyn StepObserver>,
) -> Result<Tensor> {
    let dev = transformer.device();
    let embeds = broadcast_from(coll, job.map(|(e, _)| &e.embeds), 0, dev)?;
    let mask = broadcast_from(coll, job.map(|(e, _)| &e.mask), 0, dev)?;
    let noise = broadcast_from(coll, job.map(|(_, n)| n), 0, dev)?;
    let embeds = PromptEmbeds {
        embeds,
        mask,
        cfg: settings.cfg,
    };
    let mut on_step = |e: StepEvent| -> Result<ControlFlow<()>> {
        let stop = match observer.as_mut() {
            Some(o) => o.on_step(e).is_break(),
            None => false,
        };
        let flag = Tensor::new(&[u32::from(stop)], dev)?;
        let agreed = coll.broadcast(&flag, 0)?.to_vec1::<u32>()?;
        Ok(if agreed.first() == Some(&1) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        })
    };
    denoise_loop(
        transformer,
        scheduler_dir,
        &embeds,
        &noise,
        settings.steps,
        settings.guidance,
        &mut on_step,
    )
}

/// The devices of the ranks: all the CPU, or consecutive GPUs from `device`'s.
fn rank_devices(device: &Device, n: usize) -> Result<Vec<Device>> {
    match device.location() {
        DeviceLocation::Cpu => Ok(vec![Device::Cpu; n]),
        DeviceLocation::Cuda { gpu_id } => {
            let mut devices = vec![device.clone()];
            for r in 1..n {
                devices.push(Device::new_cuda(gpu_id + r).map_err(|e| {
                    ModelError::invalid(
                        "tensor parallel",
                        format!("rank {r} needs GPU {} ({e}); use fewer ranks", gpu_id + r),
                    )
                })?);
            }
            Ok(devices)
        }
        other => Err(ModelError::invalid(
            "tensor parallel",
            format!("not available on {other:?}: use the CPU or CUDA GPUs"),
        )),
    }
}

type Collectives = (Vec<Arc<dyn Collective>>, Option<InProcessCollective>);

/// One collective per rank: threads of this process on the CPU, NCCL on GPUs.
fn make_collectives(devices: &[Device]) -> Result<Collectives> {
    if devices.iter().all(|d| d.is_cpu()) {
        let group = InProcessCollective::group(devices.len())?;
        let reset = group.first().cloned();
        let group = group
            .into_iter()
            .map(|c| Arc::new(c) as Arc<dyn Collective>)
            .collect();
        return Ok((group, reset));
    }
    nccl_collectives(devices)
}

#[cfg(feature = "nccl")]
fn nccl_collectives(devices: &[Device]) -> Result<Collectives> {
    use crate::parallel::{NcclCollective, NcclId};
    let id = NcclId::new()?;
    let n = devices.len();
    let comms = devices
        .iter()
        .enumerate()
        .map(|(r, d)| NcclCollective::start(d, r, n, &id))
        .collect::<Result<Vec<_>>>()?;
    for c in &comms {
        c.wait_ready()?;
    }
    Ok((
        comms
            .into_iter()
            .map(|c| Arc::new(c) as Arc<dyn Collective>)
            .collect(),
        None,
    ))
}

#[cfg(not(feature = "nccl"))]
fn nccl_collectives(_devices: &[Device]) -> Result<Collectives> {
    Err(ModelError::invalid(
        "tensor parallel",
        "GPU ranks need NCCL: build relayfarm with `--features cuda`",
    ))
}

/// Loads the denoiser: whole, or rank 0's shard here and ranks `1..N` on their threads (all
/// loading at the same time, each reading only its slices).
fn load_denoiser(
    tr: &ComponentFolder,
    opts: &PipelineOptions,
) -> Result<(PixArtTransformer, Option<TensorParallel>)> {
    let n = opts.tensor_parallel.max(1);
    if n == 1 {
        let t = PixArtTransformer::load(tr, opts.dtype, &opts.device, &opts.transformer)?;
        return Ok((t, None));
    }
    let devices = rank_devices(&opts.device, n)?;
    let (collectives, reset) = make_collectives(&devices)?;
    let (comp, dtype, topts) = (tr.clone(), opts.dtype, opts.transformer.clone());
    let (helper_devices, helper_colls) = (devices.clone(), collectives.clone());
    let abort: RankAbort<DenoiserRank> = Arc::new(|r, why| r.collective.abort(why));
    let helpers = RankThreads::spawn(
        1..n,
        "denoiser",
        move |rank| {
            let collective = helper_colls[rank].clone();
            let transformer = PixArtTransformer::load_sharded(
                &comp,
                dtype,
                &helper_devices[rank],
                None,
                &topts,
                collective.clone(),
            )?;
            Ok(DenoiserRank {
                transformer,
                collective,
            })
        },
        abort,
    )?;
    let rank0 = collectives[0].clone();
    let t0 = PixArtTransformer::load_sharded(
        tr,
        opts.dtype,
        &devices[0],
        None,
        &opts.transformer,
        rank0.clone(),
    );
    let ready = helpers.wait_ready();
    let t0 = t0?;
    ready?;
    Ok((
        t0,
        Some(TensorParallel {
            helpers,
            rank0,
            reset,
            busy: Mutex::new(false),
        }),
    ))
}
