//! `EulerDiscreteScheduler`: the deterministic Euler sampler on the k-diffusion σ schedule, as
//! in diffusers `schedulers/scheduling_euler_discrete.py` (Kolors ships it: 1100 training
//! steps, scaled-linear β 0.00085→0.014, "leading" spacing, `steps_offset` 1, ε-prediction).
//!
//! - Training tables in f32 like the reference: β (linear / scaled-linear / cosine, optional
//!   zero-terminal-SNR rescale with `ᾱ_{T−1} = 2⁻²⁴`), ᾱ, `σ = √((1−ᾱ)/ᾱ)`.
//! - `set_timesteps`: "linspace" / "leading" (+`steps_offset`) / "trailing" timesteps (f32,
//!   fractional for "linspace"); σ by linear interpolation of the table at the timesteps
//!   (`interpolation_type` "linear") or log-linear between the extremes ("log_linear", which,
//!   as in the reference, keeps N+1 σ before the final one); then optionally Karras or
//!   exponential σ between that schedule's first and last σ (or `sigma_max`/`sigma_min`),
//!   with fractional timesteps from log-σ interpolation; then the final σ (0 or σ_min).
//! - `init_noise_sigma`: the largest σ of the schedule for "linspace"/"trailing", `√(σ²+1)` of
//!   it for "leading" (computed in f32 like the reference).
//! - `scale_model_input`: `x/√(σ²+1)`. `step`: `x̂₀` from the prediction, `d = (x − x̂₀)/σ`,
//!   `x_next = x + d·(σ_next − σ)`, in f32. `s_churn` is 0 (the pipelines' default), so the step
//!   is deterministic and adds no noise.
//! - `use_beta_sigmas` (needs SciPy's β quantiles) is not implemented.
//!
//! ```text
//! cargo test -p relayfarm-models --test scheduler_family_parity
//! ```

use super::dpm_solver::{
    cosine_betas, cumprod_f32, np_arange, np_linspace, rescale_zero_terminal_snr, sigma_to_t,
    torch_linspace_f32,
};
use super::{lenient_f64, lenient_opt_f64, Scheduler};
use crate::{ModelError, Result};
use candle_core::{DType, Tensor};
use serde::Deserialize;

/// The class name in `scheduler_config.json`.
pub const CLASS_NAME: &str = "EulerDiscreteScheduler";

/// `scheduler_config.json` of an `EulerDiscreteScheduler`, with diffusers' defaults. Unknown
/// fields are ignored; `null` flags mean off.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EulerDiscreteConfig {
    /// `_class_name`; must be `EulerDiscreteScheduler` when present.
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// Training steps T (1000; Kolors 1100).
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    /// First β (1e-4).
    #[serde(default = "default_beta_start", deserialize_with = "lenient_f64")]
    pub beta_start: f64,
    /// Last β (0.02).
    #[serde(default = "default_beta_end", deserialize_with = "lenient_f64")]
    pub beta_end: f64,
    /// `linear` (default), `scaled_linear` or `squaredcos_cap_v2`.
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: String,
    /// Explicit β table (overrides `beta_schedule`).
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    /// `epsilon` (default), `v_prediction`, `sample` or `original_sample`.
    #[serde(default = "default_prediction_type")]
    pub prediction_type: String,
    /// `linear` (default) or `log_linear`.
    #[serde(default = "default_interpolation")]
    pub interpolation_type: String,
    /// Karras σ spacing.
    #[serde(default)]
    pub use_karras_sigmas: Option<bool>,
    /// Exponential σ spacing.
    #[serde(default)]
    pub use_exponential_sigmas: Option<bool>,
    /// Beta-distribution σ spacing; not implemented.
    #[serde(default)]
    pub use_beta_sigmas: Option<bool>,
    /// Lower σ of the Karras / exponential spacing (default: the schedule's last σ).
    #[serde(default, deserialize_with = "lenient_opt_f64")]
    pub sigma_min: Option<f64>,
    /// Upper σ of the Karras / exponential spacing (default: the schedule's first σ).
    #[serde(default, deserialize_with = "lenient_opt_f64")]
    pub sigma_max: Option<f64>,
    /// `linspace` (default), `leading` or `trailing`.
    #[serde(default = "default_spacing")]
    pub timestep_spacing: String,
    /// `discrete` (default) or `continuous` (with v-prediction: timesteps `¼·ln σ`).
    #[serde(default = "default_timestep_type")]
    pub timestep_type: String,
    /// Added to "leading" timesteps.
    #[serde(default)]
    pub steps_offset: usize,
    /// Rescale β to zero terminal SNR.
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// `zero` (default) or `sigma_min`.
    #[serde(default = "default_final_sigmas")]
    pub final_sigmas_type: String,
}

fn default_train_steps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    1e-4
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_beta_schedule() -> String {
    "linear".into()
}
fn default_prediction_type() -> String {
    "epsilon".into()
}
fn default_interpolation() -> String {
    "linear".into()
}
fn default_spacing() -> String {
    "linspace".into()
}
fn default_timestep_type() -> String {
    "discrete".into()
}
fn default_final_sigmas() -> String {
    "zero".into()
}

impl Default for EulerDiscreteConfig {
    /// diffusers' constructor defaults.
    fn default() -> Self {
        EulerDiscreteConfig {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
            beta_schedule: default_beta_schedule(),
            trained_betas: None,
            prediction_type: default_prediction_type(),
            interpolation_type: default_interpolation(),
            use_karras_sigmas: Some(false),
            use_exponential_sigmas: Some(false),
            use_beta_sigmas: Some(false),
            sigma_min: None,
            sigma_max: None,
            timestep_spacing: default_spacing(),
            timestep_type: default_timestep_type(),
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            final_sigmas_type: default_final_sigmas(),
        }
    }
}

fn unsupported(field: &str, value: impl std::fmt::Display, supported: &str) -> ModelError {
    super::unsupported_setting(CLASS_NAME, field, value, supported)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prediction {
    Epsilon,
    Velocity,
    Sample,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SigmaSpacing {
    Table,
    Karras,
    Exponential,
}

/// The validated settings.
#[derive(Debug, Clone, Copy)]
struct Settings {
    prediction: Prediction,
    spacing: Spacing,
    log_linear: bool,
    sigma_spacing: SigmaSpacing,
    continuous: bool,
    final_sigma_zero: bool,
}

impl EulerDiscreteConfig {
    /// Parses `scheduler_config.json` text (Python's `Infinity`/`NaN` tokens are accepted).
    pub fn from_json_str(text: &str) -> Result<Self> {
        super::config_from_json_str(text)
    }

    /// Deserialises a parsed JSON object.
    pub fn from_value(value: serde_json::Value) -> Result<Self> {
        super::config_from_value(value)
    }

    fn settings(&self) -> Result<Settings> {
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
            "sample" | "original_sample" => Prediction::Sample,
            other => {
                return Err(unsupported(
                    "prediction_type",
                    format!("\"{other}\""),
                    "\"epsilon\", \"v_prediction\", \"sample\"",
                ))
            }
        };
        let log_linear = match self.interpolation_type.as_str() {
            "linear" => false,
            "log_linear" => true,
            other => {
                return Err(unsupported(
                    "interpolation_type",
                    format!("\"{other}\""),
                    "\"linear\", \"log_linear\"",
                ))
            }
        };
        if self.use_beta_sigmas == Some(true) {
            return Err(unsupported("use_beta_sigmas", true, "false"));
        }
        let sigma_spacing = match (
            self.use_karras_sigmas == Some(true),
            self.use_exponential_sigmas == Some(true),
        ) {
            (false, false) => SigmaSpacing::Table,
            (true, false) => SigmaSpacing::Karras,
            (false, true) => SigmaSpacing::Exponential,
            (true, true) => {
                return Err(unsupported(
                    "use_exponential_sigmas",
                    "true together with use_karras_sigmas",
                    "at most one of use_karras_sigmas / use_exponential_sigmas",
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
        let continuous = match self.timestep_type.as_str() {
            "discrete" => false,
            "continuous" => prediction == Prediction::Velocity,
            other => {
                return Err(unsupported(
                    "timestep_type",
                    format!("\"{other}\""),
                    "\"discrete\", \"continuous\"",
                ))
            }
        };
        let final_sigma_zero = match self.final_sigmas_type.as_str() {
            "zero" => true,
            "sigma_min" => false,
            other => {
                return Err(unsupported(
                    "final_sigmas_type",
                    format!("\"{other}\""),
                    "\"zero\", \"sigma_min\"",
                ))
            }
        };
        for (field, v) in [("sigma_min", self.sigma_min), ("sigma_max", self.sigma_max)] {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    return Err(unsupported(field, v, "null or a finite number > 0"));
                }
            }
        }
        Ok(Settings {
            prediction,
            spacing,
            log_linear,
            sigma_spacing,
            continuous,
            final_sigma_zero,
        })
    }

    /// Checks that every setting is implemented.
    pub fn validate(&self) -> Result<()> {
        self.settings().map(|_| ())
    }
}

/// `np.interp(x, arange(len(fp)), fp)` (numpy's formula `slope·(x − j) + fp[j]`, clamped at
/// the ends).
fn interp_table(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j] as f64;
    }
    let slope = fp[j + 1] as f64 - fp[j] as f64;
    slope * (x - j as f64) + fp[j] as f64
}

/// The Euler discrete scheduler (deterministic: `s_churn = 0`).
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    config: EulerDiscreteConfig,
    settings: Settings,
    alphas_cumprod: Vec<f32>,
    /// Training σ, ascending with t.
    train_sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    /// Inference σ (f32 values), one per step plus the final one(s).
    sigmas: Vec<f64>,
}

impl EulerDiscreteScheduler {
    /// Builds the scheduler (validating the config) and its training tables.
    pub fn new(config: EulerDiscreteConfig) -> Result<Self> {
        let settings = config.settings()?;
        let t = config.num_train_timesteps;
        let mut betas: Vec<f32> = match &config.trained_betas {
            Some(b) => b.iter().map(|&v| v as f32).collect(),
            None => match config.beta_schedule.as_str() {
                "linear" => torch_linspace_f32(config.beta_start, config.beta_end, t),
                "scaled_linear" => {
                    torch_linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), t)
                        .into_iter()
                        .map(|b| b * b)
                        .collect()
                }
                _ => cosine_betas(t),
            },
        };
        if config.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let mut alphas_cumprod = cumprod_f32(&alphas);
        if config.rescale_betas_zero_snr {
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let train_sigmas = alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect();
        Ok(EulerDiscreteScheduler {
            config,
            settings,
            alphas_cumprod,
            train_sigmas,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &EulerDiscreteConfig {
        &self.config
    }

    /// The training ᾱ table (f32, as the reference).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// The inference σ of each step followed by the final σ (usually `timesteps().len() + 1`
    /// values; one more with `interpolation_type` "log_linear", as in the reference).
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    fn spaced_timesteps(&self, n: usize) -> Vec<f32> {
        let t = self.config.num_train_timesteps;
        match self.settings.spacing {
            // np.linspace(..., dtype=float32): computed in f64, stored in f32.
            Spacing::Linspace => np_linspace(0.0, (t - 1) as f64, n)
                .into_iter()
                .rev()
                .map(|v| v as f32)
                .collect(),
            Spacing::Leading => {
                let ratio = t / n;
                (0..n)
                    .rev()
                    .map(|i| (i * ratio) as f32 + self.config.steps_offset as f32)
                    .collect()
            }
            Spacing::Trailing => np_arange(t as f64, 0.0, -(t as f64 / n as f64))
                .into_iter()
                .map(|v| v.round_ties_even() as f32 - 1.0)
                .collect(),
        }
    }

    /// σ_min / σ_max of the Karras and exponential spacings: the config's, else the schedule's.
    fn sigma_range(&self, in_sigmas: &[f64]) -> (f64, f64) {
        let first = in_sigmas.first().copied().unwrap_or(0.0);
        let last = in_sigmas.last().copied().unwrap_or(0.0);
        (
            self.config.sigma_min.unwrap_or(last),
            self.config.sigma_max.unwrap_or(first),
        )
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn name(&self) -> &str {
        CLASS_NAME
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let n = num_inference_steps;
        if n == 0 {
            return Err(ModelError::invalid(
                "num_inference_steps",
                "must be at least 1",
            ));
        }
        let spaced = self.spaced_timesteps(n);
        if spaced.is_empty() {
            return Err(ModelError::invalid(
                "num_inference_steps",
                format!("{n} steps give an empty schedule for this scheduler config"),
            ));
        }
        let log_sigmas: Vec<f32> = self.train_sigmas.iter().map(|s| s.ln()).collect();
        let mut timesteps: Vec<f64> = spaced.iter().map(|&v| v as f64).collect();
        let mut sigmas: Vec<f64> = if self.settings.log_linear {
            let lo = self.train_sigmas.first().copied().unwrap_or(0.0).ln();
            let hi = self.train_sigmas.last().copied().unwrap_or(0.0).ln();
            torch_linspace_f32(hi as f64, lo as f64, n + 1)
                .into_iter()
                .map(|v| v.exp() as f64)
                .collect()
        } else {
            timesteps
                .iter()
                .map(|&x| interp_table(x, &self.train_sigmas))
                .collect()
        };
        match self.settings.sigma_spacing {
            SigmaSpacing::Table => {}
            SigmaSpacing::Karras => {
                let (sigma_min, sigma_max) = self.sigma_range(&sigmas);
                let rho = 7.0;
                let min_inv = sigma_min.powf(1.0 / rho);
                let max_inv = sigma_max.powf(1.0 / rho);
                sigmas = np_linspace(0.0, 1.0, n)
                    .into_iter()
                    .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
                    .collect();
                timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
            }
            SigmaSpacing::Exponential => {
                let (sigma_min, sigma_max) = self.sigma_range(&sigmas);
                sigmas = np_linspace(sigma_max.ln(), sigma_min.ln(), n)
                    .into_iter()
                    .map(f64::exp)
                    .collect();
                timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
            }
        }
        let sigma_last = if self.settings.final_sigma_zero {
            0.0
        } else {
            let a = self.alphas_cumprod[0];
            ((1.0 - a) / a).sqrt() as f64
        };
        sigmas.push(sigma_last);
        // The reference stores σ and the timesteps in f32.
        self.sigmas = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        self.timesteps = if self.settings.continuous {
            self.sigmas[..n]
                .iter()
                .map(|&s| (0.25 * (s as f32).ln()) as f64)
                .collect()
        } else {
            timesteps.into_iter().map(|t| t as f32 as f64).collect()
        };
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        // The reference takes max(σ) of the current schedule (the training σ before
        // set_timesteps) and computes in f32.
        let max = self
            .sigmas
            .iter()
            .map(|&s| s as f32)
            .chain(if self.sigmas.is_empty() {
                self.train_sigmas.last().copied()
            } else {
                None
            })
            .fold(0f32, f32::max);
        match self.settings.spacing {
            Spacing::Linspace | Spacing::Trailing => max as f64,
            Spacing::Leading => (max * max + 1.0).sqrt() as f64,
        }
    }

    fn scale_model_input(&self, sample: Tensor, step_index: usize) -> Result<Tensor> {
        let sigma = *self.sigmas.get(step_index).ok_or_else(|| {
            ModelError::invalid(
                "step_index",
                format!(
                    "{step_index} is past the schedule (call set_timesteps first; {} steps)",
                    self.timesteps.len()
                ),
            )
        })? as f32;
        let div = (sigma * sigma + 1.0).sqrt();
        let div = Tensor::new(div, sample.device())?.to_dtype(sample.dtype())?;
        Ok(sample.broadcast_div(&div)?)
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
        if step_index >= n {
            return Err(ModelError::invalid(
                "step_index",
                format!("{step_index} is past the last of {n} steps"),
            ));
        }
        let sigma = self.sigmas[step_index] as f32;
        let sigma_next = self.sigmas[step_index + 1] as f32;
        let out_dtype = model_output.dtype();
        let dev = sample.device();
        let x = sample.to_dtype(DType::F32)?;
        let m = model_output.to_dtype(DType::F32)?;
        let x0 = match self.settings.prediction {
            Prediction::Sample => m,
            Prediction::Epsilon => (&x - (&m * sigma as f64)?)?,
            Prediction::Velocity => {
                let s2 = sigma * sigma + 1.0;
                let c_out = -sigma / s2.sqrt();
                let c_in = Tensor::new(s2, dev)?;
                ((&m * c_out as f64)? + x.broadcast_div(&c_in)?)?
            }
        };
        let derivative = (&x - &x0)?.broadcast_div(&Tensor::new(sigma, dev)?)?;
        let dt = sigma_next - sigma;
        let prev = (&x + (&derivative * dt as f64)?)?;
        Ok(prev.to_dtype(out_dtype)?)
    }
}
