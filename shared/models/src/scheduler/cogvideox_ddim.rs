//! `CogVideoXDDIMScheduler`: DDIM (η = 0) on an SNR-shifted, optionally zero-terminal-SNR
//! schedule, as in diffusers `schedulers/scheduling_ddim_cogvideox.py` (CogView3-Plus,
//! CogVideoX).
//!
//! - ᾱ is built like the reference: "scaled_linear" β in f64 (torch `linspace(float64)`),
//!   "linear" and "squaredcos_cap_v2" in f32; then `ᾱ ← ᾱ/(s + (1−s)·ᾱ)` with
//!   `s = snr_shift_scale`, then (with `rescale_betas_zero_snr`) the zero-terminal-SNR rescale of
//!   `√ᾱ`, so that `ᾱ_{T−1} = 0`.
//! - `step(t)`: `prev = t − T//N`, `ᾱ_prev = ᾱ[prev]` or, below 0, `1` (`set_alpha_to_one`)
//!   or `ᾱ[0]`; `x̂₀` from the prediction type; `x_prev = a·x + b·x̂₀` with
//!   `a = √((1−ᾱ_prev)/(1−ᾱ_t))`, `b = √ᾱ_prev − √ᾱ_t·a`. CogView3PlusPipeline passes `eta`
//!   (default 0) and a generator, which this scheduler's `step` ignores: no noise is ever added.
//! - `clip_sample`, `clip_sample_range` and `sample_max_value` are accepted and, as in the
//!   reference, have no effect (its `step` never clips).
//! - `init_noise_sigma = 1`; `scale_model_input` is the identity.
//!
//! ```text
//! cargo test -p relayfarm-models --test scheduler_family_parity
//! ```

use super::dpm_solver::{cosine_betas, cumprod_f32, np_arange, np_linspace, torch_linspace_f32};
use super::{lenient_f64, Scheduler};
use crate::{ModelError, Result};
use candle_core::{DType, Tensor};
use serde::Deserialize;

/// The class name in `scheduler_config.json`.
pub const CLASS_NAME: &str = "CogVideoXDDIMScheduler";

/// `scheduler_config.json` of a `CogVideoXDDIMScheduler`, with diffusers' defaults. Unknown
/// fields are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CogVideoXDdimConfig {
    /// `_class_name`; must be `CogVideoXDDIMScheduler` when present.
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// Training steps T (1000).
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    /// First β (0.00085).
    #[serde(default = "default_beta_start", deserialize_with = "lenient_f64")]
    pub beta_start: f64,
    /// Last β (0.012).
    #[serde(default = "default_beta_end", deserialize_with = "lenient_f64")]
    pub beta_end: f64,
    /// `linear`, `scaled_linear` (default) or `squaredcos_cap_v2`.
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: String,
    /// Explicit β table (overrides `beta_schedule`).
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    /// Accepted and ignored, as in the reference (its `step` never clips).
    #[serde(default = "default_true")]
    pub clip_sample: bool,
    /// `ᾱ_prev = 1` past the last step (else `ᾱ[0]`).
    #[serde(default = "default_true")]
    pub set_alpha_to_one: bool,
    /// Added to "leading" timesteps.
    #[serde(default)]
    pub steps_offset: usize,
    /// `epsilon` (default), `v_prediction` or `sample`.
    #[serde(default = "default_prediction_type")]
    pub prediction_type: String,
    /// Accepted and ignored (no clipping).
    #[serde(default = "default_one", deserialize_with = "lenient_f64")]
    pub clip_sample_range: f64,
    /// Accepted and ignored (no thresholding).
    #[serde(default = "default_one", deserialize_with = "lenient_f64")]
    pub sample_max_value: f64,
    /// `leading` (default), `trailing` or `linspace`.
    #[serde(default = "default_spacing")]
    pub timestep_spacing: String,
    /// Rescale `√ᾱ` to zero terminal SNR (after the SNR shift).
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// SNR divisor s of `ᾱ/(s + (1−s)ᾱ)` (3.0; CogView3-Plus uses 4.0).
    #[serde(default = "default_snr_shift", deserialize_with = "lenient_f64")]
    pub snr_shift_scale: f64,
}

fn default_train_steps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.00085
}
fn default_beta_end() -> f64 {
    0.012
}
fn default_beta_schedule() -> String {
    "scaled_linear".into()
}
fn default_true() -> bool {
    true
}
fn default_prediction_type() -> String {
    "epsilon".into()
}
fn default_one() -> f64 {
    1.0
}
fn default_spacing() -> String {
    "leading".into()
}
fn default_snr_shift() -> f64 {
    3.0
}

impl Default for CogVideoXDdimConfig {
    /// diffusers' constructor defaults.
    fn default() -> Self {
        CogVideoXDdimConfig {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: default_beta_start(),
            beta_end: default_beta_end(),
            beta_schedule: default_beta_schedule(),
            trained_betas: None,
            clip_sample: true,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: default_prediction_type(),
            clip_sample_range: 1.0,
            sample_max_value: 1.0,
            timestep_spacing: default_spacing(),
            rescale_betas_zero_snr: false,
            snr_shift_scale: default_snr_shift(),
        }
    }
}

fn unsupported(field: &str, value: impl std::fmt::Display, supported: &str) -> ModelError {
    super::unsupported_setting(CLASS_NAME, field, value, supported)
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prediction {
    Epsilon,
    Velocity,
    Sample,
}

/// The inference timestep spacing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

impl CogVideoXDdimConfig {
    /// Parses `scheduler_config.json` text (Python's `Infinity`/`NaN` tokens are accepted).
    pub fn from_json_str(text: &str) -> Result<Self> {
        super::config_from_json_str(text)
    }

    /// Deserialises a parsed JSON object.
    pub fn from_value(value: serde_json::Value) -> Result<Self> {
        super::config_from_value(value)
    }

    fn settings(&self) -> Result<(Prediction, Spacing)> {
        super::check_class_name(self.class_name.as_deref(), CLASS_NAME)?;
        if self.num_train_timesteps < 2 {
            return Err(unsupported(
                "num_train_timesteps",
                self.num_train_timesteps,
                "at least 2",
            ));
        }
        match self.beta_schedule.as_str() {
            "linear" | "scaled_linear" | "squaredcos_cap_v2" => {}
            other => {
                return Err(unsupported(
                    "beta_schedule",
                    format!("\"{other}\""),
                    "\"linear\", \"scaled_linear\", \"squaredcos_cap_v2\"",
                ))
            }
        }
        if let Some(betas) = &self.trained_betas {
            if betas.len() != self.num_train_timesteps {
                return Err(unsupported(
                    "trained_betas",
                    format!("a list of {}", betas.len()),
                    "a list of num_train_timesteps values",
                ));
            }
        }
        let prediction = match self.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::Velocity,
            "sample" => Prediction::Sample,
            other => {
                return Err(unsupported(
                    "prediction_type",
                    format!("\"{other}\""),
                    "\"epsilon\", \"v_prediction\", \"sample\"",
                ))
            }
        };
        let spacing = match self.timestep_spacing.as_str() {
            "linspace" => Spacing::Linspace,
            "leading" => Spacing::Leading,
            "trailing" => Spacing::Trailing,
            other => {
                return Err(unsupported(
                    "timestep_spacing",
                    format!("\"{other}\""),
                    "\"linspace\", \"leading\", \"trailing\"",
                ))
            }
        };
        if !self.snr_shift_scale.is_finite() || self.snr_shift_scale <= 0.0 {
            return Err(unsupported(
                "snr_shift_scale",
                self.snr_shift_scale,
                "a finite number > 0",
            ));
        }
        Ok((prediction, spacing))
    }

    /// Checks that every setting is implemented.
    pub fn validate(&self) -> Result<()> {
        self.settings().map(|_| ())
    }
}

/// `torch.linspace(start, end, n, dtype=float64)` bit for bit (fused multiply-add from the
/// start for the first half, from the end for the second).
fn torch_linspace_f64(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f64, start)
            } else {
                (-step).mul_add((n - i - 1) as f64, end)
            }
        })
        .collect()
}

/// Whether `ts` holds `n` timesteps within `0..t`.
fn valid_len(ts: &[f64], n: usize, t: usize) -> bool {
    ts.len() == n && ts.iter().all(|&v| v >= 0.0 && v < t as f64)
}

/// The CogVideoX DDIM scheduler (deterministic, η = 0).
#[derive(Debug, Clone)]
pub struct CogVideoXDdimScheduler {
    config: CogVideoXDdimConfig,
    prediction: Prediction,
    spacing: Spacing,
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    timesteps: Vec<f64>,
    num_inference_steps: usize,
}

impl CogVideoXDdimScheduler {
    /// Builds the scheduler (validating the config) and its training ᾱ table.
    pub fn new(config: CogVideoXDdimConfig) -> Result<Self> {
        let (prediction, spacing) = config.settings()?;
        let t = config.num_train_timesteps;
        // The reference keeps scaled-linear tables in f64 and the others in f32.
        let mut alphas_cumprod: Vec<f64> =
            match (&config.trained_betas, config.beta_schedule.as_str()) {
                (Some(b), _) => {
                    let alphas: Vec<f32> = b.iter().map(|&v| 1.0 - v as f32).collect();
                    cumprod_f32(&alphas).into_iter().map(f64::from).collect()
                }
                (None, "scaled_linear") => {
                    let mut acc = 1f64;
                    torch_linspace_f64(config.beta_start.sqrt(), config.beta_end.sqrt(), t)
                        .into_iter()
                        .map(|b| {
                            acc *= 1.0 - b * b;
                            acc
                        })
                        .collect()
                }
                (None, "linear") => {
                    let betas = torch_linspace_f32(config.beta_start, config.beta_end, t);
                    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
                    cumprod_f32(&alphas).into_iter().map(f64::from).collect()
                }
                (None, _) => {
                    let alphas: Vec<f32> = cosine_betas(t).iter().map(|b| 1.0 - b).collect();
                    cumprod_f32(&alphas).into_iter().map(f64::from).collect()
                }
            };
        let f32_table = config.trained_betas.is_some() || config.beta_schedule != "scaled_linear";
        let round = |v: f64| if f32_table { v as f32 as f64 } else { v };
        // SNR shift: ᾱ/(s + (1−s)ᾱ) (in the table's precision; `s` is a Python float).
        let s = config.snr_shift_scale;
        for a in alphas_cumprod.iter_mut() {
            *a = if f32_table {
                // Python scalars meet an f32 tensor as f32.
                let a32 = *a as f32;
                (a32 / (s as f32 + (1.0 - s) as f32 * a32)) as f64
            } else {
                *a / (s + (1.0 - s) * *a)
            };
        }
        if config.rescale_betas_zero_snr {
            let mut q: Vec<f64> = alphas_cumprod.iter().map(|a| round(a.sqrt())).collect();
            let (q0, qt) = match (q.first(), q.last()) {
                (Some(&f), Some(&l)) => (f, l),
                _ => (1.0, 0.0),
            };
            let scale = round(q0 / round(q0 - qt));
            for v in q.iter_mut() {
                *v = round(round(*v - qt) * scale);
            }
            alphas_cumprod = q.iter().map(|v| round(v * v)).collect();
        }
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod.first().copied().unwrap_or(1.0)
        };
        Ok(CogVideoXDdimScheduler {
            config,
            prediction,
            spacing,
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: Vec::new(),
            num_inference_steps: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &CogVideoXDdimConfig {
        &self.config
    }

    /// The training ᾱ table after the SNR shift and the zero-SNR rescale.
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// The inference timesteps of `n` steps (unchecked).
    fn spaced_timesteps(&self, n: usize) -> Vec<f64> {
        let t = self.config.num_train_timesteps;
        match self.spacing {
            Spacing::Linspace => np_linspace(0.0, (t - 1) as f64, n)
                .into_iter()
                .rev()
                .map(f64::round_ties_even)
                .collect(),
            Spacing::Leading => {
                let ratio = t / n;
                (0..n)
                    .rev()
                    .map(|i| (i * ratio + self.config.steps_offset) as f64)
                    .collect()
            }
            Spacing::Trailing => np_arange(t as f64, 0.0, -(t as f64 / n as f64))
                .into_iter()
                .map(|v| v.round_ties_even() - 1.0)
                .collect(),
        }
    }

    /// `ᾱ` at a (possibly negative) timestep: the table, or the final value below 0.
    fn alpha_at(&self, t: i64) -> Result<f64> {
        if t < 0 {
            return Ok(self.final_alpha_cumprod);
        }
        self.alphas_cumprod.get(t as usize).copied().ok_or_else(|| {
            ModelError::invalid(
                "timestep",
                format!(
                    "{t} is past the last training timestep {} (check steps_offset)",
                    self.alphas_cumprod.len() - 1
                ),
            )
        })
    }
}

impl Scheduler for CogVideoXDdimScheduler {
    fn name(&self) -> &str {
        CLASS_NAME
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let n = num_inference_steps;
        let t = self.config.num_train_timesteps;
        if n == 0 {
            return Err(ModelError::invalid(
                "num_inference_steps",
                "must be at least 1",
            ));
        }
        if n > t {
            return Err(ModelError::invalid(
                "num_inference_steps",
                format!("{n} is more than the {t} training timesteps of this scheduler"),
            ));
        }
        let timesteps = self.spaced_timesteps(n);
        if !valid_len(&timesteps, n, t) {
            // Trailing spacing: for some N numpy's `arange` yields N+1 values, the last one −1
            // (diffusers would then run an extra step at t = −1, reading ᾱ[−1]); leading
            // spacing with a large steps_offset can pass the last training timestep.
            let nearest: Vec<String> = [(1..n).rev().collect::<Vec<_>>(), (n + 1..=t).collect()]
                .iter()
                .filter_map(|range| {
                    range
                        .iter()
                        .copied()
                        .find(|&m| valid_len(&self.spaced_timesteps(m), m, t))
                })
                .map(|m| m.to_string())
                .collect();
            return Err(ModelError::invalid(
                "num_inference_steps",
                format!(
                    "{n} steps give the timesteps {:?}…, not {n} values within the training range 0..{t} \
                     (timestep_spacing {:?}, steps_offset {}); use {}",
                    &timesteps[timesteps.len().saturating_sub(3)..],
                    self.config.timestep_spacing,
                    self.config.steps_offset,
                    nearest.join(" or ")
                ),
            ));
        }
        self.timesteps = timesteps;
        self.num_inference_steps = n;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: Tensor, _step_index: usize) -> Result<Tensor> {
        Ok(sample)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let n = self.timesteps.len();
        if n == 0 {
            return Err(ModelError::invalid(
                "step",
                "call set_timesteps before stepping the scheduler",
            ));
        }
        let t = *self.timesteps.get(step_index).ok_or_else(|| {
            ModelError::invalid(
                "step_index",
                format!("{step_index} is past the last of {n} steps"),
            )
        })? as i64;
        let prev = t - (self.config.num_train_timesteps / self.num_inference_steps) as i64;
        let alpha_t = self.alpha_at(t)?;
        let alpha_prev = self.alpha_at(prev)?;
        let beta_t = 1.0 - alpha_t;
        let out_dtype = sample.dtype();
        let m = model_output.to_dtype(DType::F32)?;
        let x = sample.to_dtype(DType::F32)?;
        let x0 = match self.prediction {
            Prediction::Epsilon => ((&x - (&m * beta_t.sqrt())?)? / alpha_t.sqrt())?,
            Prediction::Sample => m,
            Prediction::Velocity => ((&x * alpha_t.sqrt())? - (&m * beta_t.sqrt())?)?,
        };
        let a = ((1.0 - alpha_prev) / beta_t).sqrt();
        let b = alpha_prev.sqrt() - alpha_t.sqrt() * a;
        let prev_sample = ((&x * a)? + (&x0 * b)?)?;
        Ok(prev_sample.to_dtype(out_dtype)?)
    }
}
