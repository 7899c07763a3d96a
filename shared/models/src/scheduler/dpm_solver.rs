//! `DPMSolverMultistepScheduler`: the multistep DPM-Solver / DPM-Solver++ (orders 1 and 2,
//! "midpoint" and "heun" second-order variants), as in diffusers
//! `schedulers/scheduling_dpmsolver_multistep.py`.
//!
//! The training tables (β, ᾱ, σ) are computed the way torch computes them in f32, so that the
//! timesteps derived from them (Karras log-σ interpolation) round exactly as in the reference.
//! The step arithmetic runs in f32 on tensors with f64 coefficients.
//!
//! ```text
//! cargo test -p relayfarm-models --test scheduler_parity
//! ```

use super::{lenient_f64, lenient_opt_f64, Scheduler};
use crate::{ModelError, Result};
use candle_core::{DType, Tensor};
use serde::Deserialize;

/// The class name in `scheduler_config.json`.
pub const CLASS_NAME: &str = "DPMSolverMultistepScheduler";

/// `scheduler_config.json` of a `DPMSolverMultistepScheduler`: every field diffusers stores,
/// with diffusers' defaults. Unknown fields are ignored. `null` in an optional flag means
/// "off", as in diffusers.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DpmSolverConfig {
    /// `_class_name`; must be `DPMSolverMultistepScheduler` when present.
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// Training steps T (1000).
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    /// First β (1e-4).
    #[serde(default = "default_beta_start", deserialize_with = "lenient_f64")]
    pub beta_start: f64,
    /// Last β (0.02).
    #[serde(default = "default_beta_end", deserialize_with = "lenient_f64")]
    pub beta_end: f64,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: String,
    /// Explicit β table (overrides `beta_schedule`).
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    /// 1 or 2 (3 is not implemented).
    #[serde(default = "default_solver_order")]
    pub solver_order: usize,
    /// `epsilon`, `v_prediction` or `sample`.
    #[serde(default = "default_prediction_type")]
    pub prediction_type: String,
    /// Dynamic thresholding; only `false` is implemented.
    #[serde(default)]
    pub thresholding: bool,
    /// Thresholding percentile (unused: thresholding is off).
    #[serde(
        default = "default_thresholding_ratio",
        deserialize_with = "lenient_f64"
    )]
    pub dynamic_thresholding_ratio: f64,
    /// Thresholding bound (unused: thresholding is off).
    #[serde(default = "default_one", deserialize_with = "lenient_f64")]
    pub sample_max_value: f64,
    /// `dpmsolver++` or `dpmsolver` (`deis` is mapped to `dpmsolver++` as in diffusers).
    #[serde(default = "default_algorithm")]
    pub algorithm_type: String,
    /// `midpoint` or `heun` (`logrho`, `bh1`, `bh2` map to `midpoint` as in diffusers).
    #[serde(default = "default_solver_type")]
    pub solver_type: String,
    /// First-order final steps when there are fewer than 15 steps.
    #[serde(default = "default_true")]
    pub lower_order_final: bool,
    /// First-order (Euler) final step.
    #[serde(default)]
    pub euler_at_final: bool,
    /// Karras σ spacing (timesteps rounded from log-σ interpolation).
    #[serde(default)]
    pub use_karras_sigmas: Option<bool>,
    /// Exponential σ spacing; only off is implemented.
    #[serde(default)]
    pub use_exponential_sigmas: Option<bool>,
    /// Beta σ spacing; only off is implemented.
    #[serde(default)]
    pub use_beta_sigmas: Option<bool>,
    /// Uniform-λ spacing; only off is implemented.
    #[serde(default)]
    pub use_lu_lambdas: Option<bool>,
    /// Flow-matching σ; only off is implemented.
    #[serde(default)]
    pub use_flow_sigmas: Option<bool>,
    /// Flow shift (unused: flow σ is off).
    #[serde(default, deserialize_with = "lenient_opt_f64")]
    pub flow_shift: Option<f64>,
    /// `zero` or `sigma_min`.
    #[serde(default = "default_final_sigmas")]
    pub final_sigmas_type: Option<String>,
    /// λ clipping threshold (`-Infinity`: no clipping).
    #[serde(default = "default_lambda_min", deserialize_with = "lenient_f64")]
    pub lambda_min_clipped: f64,
    /// Learned variance; only `null` is implemented.
    #[serde(default)]
    pub variance_type: Option<String>,
    /// `linspace`, `leading` or `trailing`.
    #[serde(default = "default_spacing")]
    pub timestep_spacing: String,
    /// Added to "leading" timesteps.
    #[serde(default)]
    pub steps_offset: usize,
    /// Rescale β to zero terminal SNR.
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// Dynamic shifting (flow models); only `false` is implemented.
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    /// Time shift type (unused: dynamic shifting is off).
    #[serde(default)]
    pub time_shift_type: Option<String>,
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
fn default_solver_order() -> usize {
    2
}
fn default_prediction_type() -> String {
    "epsilon".into()
}
fn default_thresholding_ratio() -> f64 {
    0.995
}
fn default_one() -> f64 {
    1.0
}
fn default_algorithm() -> String {
    "dpmsolver++".into()
}
fn default_solver_type() -> String {
    "midpoint".into()
}
fn default_true() -> bool {
    true
}
fn default_final_sigmas() -> Option<String> {
    Some("zero".into())
}
fn default_lambda_min() -> f64 {
    f64::NEG_INFINITY
}
fn default_spacing() -> String {
    "linspace".into()
}

impl Default for DpmSolverConfig {
    /// diffusers' constructor defaults.
    fn default() -> Self {
        DpmSolverConfig {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
            beta_schedule: default_beta_schedule(),
            trained_betas: None,
            solver_order: 2,
            prediction_type: default_prediction_type(),
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            algorithm_type: default_algorithm(),
            solver_type: default_solver_type(),
            lower_order_final: true,
            euler_at_final: false,
            use_karras_sigmas: None,
            use_exponential_sigmas: None,
            use_beta_sigmas: None,
            use_lu_lambdas: None,
            use_flow_sigmas: None,
            flow_shift: None,
            final_sigmas_type: default_final_sigmas(),
            lambda_min_clipped: f64::NEG_INFINITY,
            variance_type: None,
            timestep_spacing: default_spacing(),
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            use_dynamic_shifting: false,
            time_shift_type: None,
        }
    }
}

fn unsupported(field: &str, value: impl std::fmt::Display, supported: &str) -> ModelError {
    super::unsupported_setting(CLASS_NAME, field, value, supported)
}

/// The β schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredCos,
}

/// DPM-Solver (noise prediction) or DPM-Solver++ (data prediction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    DpmSolver,
    DpmSolverPp,
}

/// The second-order update rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
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

/// The validated settings.
#[derive(Debug, Clone, Copy)]
struct Settings {
    beta_schedule: BetaSchedule,
    algorithm: Algorithm,
    solver_type: SolverType,
    prediction: Prediction,
    spacing: Spacing,
    final_sigma_zero: bool,
    karras: bool,
}

impl DpmSolverConfig {
    /// Parses `scheduler_config.json` text (Python's `-Infinity`/`NaN` tokens are accepted).
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
        let beta_schedule = match self.beta_schedule.as_str() {
            "linear" => BetaSchedule::Linear,
            "scaled_linear" => BetaSchedule::ScaledLinear,
            "squaredcos_cap_v2" => BetaSchedule::SquaredCos,
            other => {
                return Err(unsupported(
                    "beta_schedule",
                    format!("\"{other}\""),
                    "\"linear\", \"scaled_linear\", \"squaredcos_cap_v2\"",
                ))
            }
        };
        if let Some(betas) = &self.trained_betas {
            if betas.len() != self.num_train_timesteps {
                return Err(unsupported(
                    "trained_betas",
                    format!("a list of {}", betas.len()),
                    "a list of num_train_timesteps values",
                ));
            }
        }
        if !(1..=2).contains(&self.solver_order) {
            return Err(unsupported("solver_order", self.solver_order, "1, 2"));
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
        if self.thresholding {
            return Err(unsupported("thresholding", true, "false"));
        }
        let algorithm = match self.algorithm_type.as_str() {
            "dpmsolver++" | "deis" => Algorithm::DpmSolverPp,
            "dpmsolver" => Algorithm::DpmSolver,
            other => {
                return Err(unsupported(
                    "algorithm_type",
                    format!("\"{other}\""),
                    "\"dpmsolver++\", \"dpmsolver\"",
                ))
            }
        };
        let solver_type = match self.solver_type.as_str() {
            "midpoint" | "logrho" | "bh1" | "bh2" => SolverType::Midpoint,
            "heun" => SolverType::Heun,
            other => {
                return Err(unsupported(
                    "solver_type",
                    format!("\"{other}\""),
                    "\"midpoint\", \"heun\"",
                ))
            }
        };
        for (field, flag) in [
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("use_lu_lambdas", self.use_lu_lambdas),
            ("use_flow_sigmas", self.use_flow_sigmas),
        ] {
            if flag == Some(true) {
                return Err(unsupported(field, true, "false"));
            }
        }
        if self.use_dynamic_shifting {
            return Err(unsupported("use_dynamic_shifting", true, "false"));
        }
        let final_sigma_zero = match self.final_sigmas_type.as_deref() {
            Some("zero") => true,
            Some("sigma_min") => false,
            Some(other) => {
                return Err(unsupported(
                    "final_sigmas_type",
                    format!("\"{other}\""),
                    "\"zero\", \"sigma_min\"",
                ))
            }
            None => {
                return Err(unsupported(
                    "final_sigmas_type",
                    "null",
                    "\"zero\", \"sigma_min\"",
                ))
            }
        };
        if algorithm == Algorithm::DpmSolver && final_sigma_zero {
            return Err(unsupported(
                "final_sigmas_type",
                "\"zero\" with algorithm_type \"dpmsolver\"",
                "\"sigma_min\" for \"dpmsolver\" (as diffusers requires)",
            ));
        }
        if let Some(v) = &self.variance_type {
            return Err(unsupported("variance_type", format!("\"{v}\""), "null"));
        }
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
        if self.lambda_min_clipped.is_nan() {
            return Err(unsupported(
                "lambda_min_clipped",
                "NaN",
                "a number or -Infinity",
            ));
        }
        Ok(Settings {
            beta_schedule,
            algorithm,
            solver_type,
            prediction,
            spacing,
            final_sigma_zero,
            karras: self.use_karras_sigmas == Some(true),
        })
    }

    /// Checks that every setting is implemented.
    pub fn validate(&self) -> Result<()> {
        self.settings().map(|_| ())
    }
}

/// `torch.linspace(start, end, n, dtype=float32)` bit for bit: the step is computed in f32 and
/// each value with one fused multiply-add, from the start for the first half and from the end
/// for the second.
pub(super) fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if n == 1 {
        return vec![s];
    }
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, s)
            } else {
                (-step).mul_add((n - i - 1) as f32, e)
            }
        })
        .collect()
}

/// diffusers `betas_for_alpha_bar` with the cosine transform (computed in f64, stored in f32).
pub(super) fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `torch.cumprod` of an f32 vector on CPU (accumulated in f64, stored in f32).
pub(super) fn cumprod_f32(alphas: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    alphas
        .iter()
        .map(|&a| {
            acc *= a as f64;
            acc as f32
        })
        .collect()
}

/// diffusers `rescale_zero_terminal_snr`, in f32 like the reference.
pub(super) fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_ac: Vec<f32> = cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let (first, last) = match (sqrt_ac.first(), sqrt_ac.last()) {
        (Some(&f), Some(&l)) => (f, l),
        _ => return betas.to_vec(),
    };
    let scale = first / (first - last);
    for v in sqrt_ac.iter_mut() {
        *v = (*v - last) * scale;
    }
    let bar: Vec<f32> = sqrt_ac.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for w in bar.windows(2) {
        out.push(1.0 - w[1] / w[0]);
    }
    out
}

/// `np.linspace(start, stop, num)`: `i·step + start`, the last value exactly `stop`.
pub(super) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (stop - start) / (num - 1) as f64;
            let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
            v[num - 1] = stop;
            v
        }
    }
}

/// `np.arange(start, stop, step)` for float arguments: length `ceil((stop − start)/step)`,
/// values `start + i·d` with `d = (start + step) − start`, as numpy fills them.
pub(super) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    // NaN (a zero step) or a non-positive length: empty, as numpy.
    if len.is_nan() || len <= 0.0 {
        return vec![];
    }
    let len = len as usize;
    let d = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * d,
        })
        .collect()
}

/// diffusers `_sigma_to_t`: the fractional training timestep whose log-σ matches `sigma`
/// (linear interpolation in the f32 `log_sigmas` table).
pub(super) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let n = log_sigmas.len();
    let log_sigma = sigma.max(1e-10).ln();
    // argmax of the cumulative count of `log_sigma >= log_sigmas[j]`: the first index where
    // the count reaches its maximum.
    let mut count = 0usize;
    let mut best = 0usize;
    let mut best_idx = 0usize;
    for (j, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls as f64 >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            best_idx = j;
        }
    }
    let low_idx = best_idx.min(n.saturating_sub(2));
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    // numpy: f32 − f32 stays f32, f32 − f64 is f64.
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// `(α_t, σ_t)` of the VP process at noise level `σ`: `α = 1/√(σ²+1)`, `σ_t = σ·α`.
fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `λ = ln α − ln σ_t` (+∞ at σ = 0).
fn lambda(alpha: f64, sigma_t: f64) -> f64 {
    alpha.ln() - sigma_t.ln()
}

/// `a·x + b·y` on f32 tensors.
fn lin2(a: f64, x: &Tensor, b: f64, y: &Tensor) -> Result<Tensor> {
    Ok(((x * a)? + (y * b)?)?)
}

/// `a·x + b·y + c·z` on f32 tensors.
fn lin3(a: f64, x: &Tensor, b: f64, y: &Tensor, c: f64, z: &Tensor) -> Result<Tensor> {
    Ok((((x * a)? + (y * b)?)? + (z * c)?)?)
}

/// The multistep DPM-Solver scheduler.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistepScheduler {
    config: DpmSolverConfig,
    settings: Settings,
    betas: Vec<f32>,
    alphas_cumprod: Vec<f32>,
    train_sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    /// Converted model outputs of the previous steps, oldest first (f32).
    model_outputs: Vec<Tensor>,
    lower_order_nums: usize,
    last_step: Option<usize>,
}

impl DpmSolverMultistepScheduler {
    /// Builds the scheduler (validating the config) and its training tables.
    pub fn new(config: DpmSolverConfig) -> Result<Self> {
        let settings = config.settings()?;
        let t = config.num_train_timesteps;
        let mut betas = match &config.trained_betas {
            Some(b) => b.iter().map(|&v| v as f32).collect(),
            None => match settings.beta_schedule {
                BetaSchedule::Linear => torch_linspace_f32(config.beta_start, config.beta_end, t),
                BetaSchedule::ScaledLinear => {
                    torch_linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), t)
                        .into_iter()
                        .map(|b| b * b)
                        .collect()
                }
                BetaSchedule::SquaredCos => cosine_betas(t),
            },
        };
        if config.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let mut alphas_cumprod = cumprod_f32(&alphas);
        if config.rescale_betas_zero_snr {
            if let Some(last) = alphas_cumprod.last_mut() {
                // Close to zero without being zero, so that the first σ is finite.
                *last = 2f32.powi(-24);
            }
        }
        let train_sigmas = alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect();
        Ok(DpmSolverMultistepScheduler {
            config,
            settings,
            betas,
            alphas_cumprod,
            train_sigmas,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            model_outputs: Vec::new(),
            lower_order_nums: 0,
            last_step: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DpmSolverConfig {
        &self.config
    }

    /// The training β table (f32, as the reference).
    pub fn betas(&self) -> &[f32] {
        &self.betas
    }

    /// The training ᾱ table.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// The training σ table `√((1−ᾱ)/ᾱ)`.
    pub fn train_sigmas(&self) -> &[f32] {
        &self.train_sigmas
    }

    /// The inference σ of each step plus the final σ (length `timesteps().len() + 1`).
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// The last timestep λ-clipping allows (`T` without clipping).
    fn last_timestep(&self) -> usize {
        let t = self.config.num_train_timesteps;
        let clip = self.config.lambda_min_clipped;
        if clip == f64::NEG_INFINITY {
            return t;
        }
        // searchsorted(flip(λ_t), clip), left side: how many of the flipped (ascending) λ
        // are below `clip`.
        let below = self
            .alphas_cumprod
            .iter()
            .rev()
            .filter(|&&a| {
                let lam = (a.sqrt().ln() - (1.0 - a).sqrt().ln()) as f64;
                lam < clip
            })
            .count();
        t - below
    }

    fn spaced_timesteps(&self, n: usize) -> Vec<f64> {
        let last = self.last_timestep();
        match self.settings.spacing {
            Spacing::Linspace => {
                let mut v: Vec<f64> = np_linspace(0.0, last as f64 - 1.0, n + 1)
                    .into_iter()
                    .map(f64::round_ties_even)
                    .collect();
                v.reverse();
                v.pop();
                v
            }
            Spacing::Leading => {
                let ratio = last / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio + self.config.steps_offset) as f64)
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = self.config.num_train_timesteps as f64 / n as f64;
                np_arange(last as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|v| v.round_ties_even() - 1.0)
                    .collect()
            }
        }
    }

    fn karras_schedule(&self, n: usize) -> (Vec<f64>, Vec<f64>) {
        let log_sigmas: Vec<f32> = self.train_sigmas.iter().map(|s| s.ln()).collect();
        let sigma_min = self.train_sigmas.first().copied().unwrap_or(0.0) as f64;
        let sigma_max = self.train_sigmas.last().copied().unwrap_or(0.0) as f64;
        let rho = 7.0;
        let min_inv = sigma_min.powf(1.0 / rho);
        let max_inv = sigma_max.powf(1.0 / rho);
        let sigmas: Vec<f64> = np_linspace(0.0, 1.0, n)
            .into_iter()
            .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
            .collect();
        let round = self.settings.beta_schedule != BetaSchedule::SquaredCos;
        let timesteps = sigmas
            .iter()
            .map(|&s| {
                let t = sigma_to_t(s, &log_sigmas);
                // The reference rounds (except for the cosine schedule), then casts to int64,
                // which truncates whatever was not rounded.
                if round {
                    t.round_ties_even()
                } else {
                    t.trunc()
                }
            })
            .collect();
        (timesteps, sigmas)
    }

    /// The model output converted to what the solver integrates: the data prediction x̂₀ for
    /// DPM-Solver++, the noise prediction ε̂ for DPM-Solver.
    fn convert_model_output(&self, m: &Tensor, x: &Tensor, sigma: f64) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        let out = match (self.settings.algorithm, self.settings.prediction) {
            (Algorithm::DpmSolverPp, Prediction::Epsilon) => {
                lin2(1.0 / alpha_t, x, -sigma_t / alpha_t, m)?
            }
            (Algorithm::DpmSolverPp, Prediction::Sample) => m.clone(),
            (Algorithm::DpmSolverPp, Prediction::Velocity) => lin2(alpha_t, x, -sigma_t, m)?,
            (Algorithm::DpmSolver, Prediction::Epsilon) => m.clone(),
            (Algorithm::DpmSolver, Prediction::Sample) => {
                lin2(1.0 / sigma_t, x, -alpha_t / sigma_t, m)?
            }
            (Algorithm::DpmSolver, Prediction::Velocity) => lin2(alpha_t, m, sigma_t, x)?,
        };
        Ok(out)
    }

    fn first_order_update(&self, m0: &Tensor, x: &Tensor, i: usize) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        match self.settings.algorithm {
            Algorithm::DpmSolverPp => lin2(sigma_t / sigma_s, x, -alpha_t * ((-h).exp() - 1.0), m0),
            Algorithm::DpmSolver => lin2(alpha_t / alpha_s, x, -sigma_t * (h.exp() - 1.0), m0),
        }
    }

    fn second_order_update(
        &self,
        m0: &Tensor,
        m1: &Tensor,
        x: &Tensor,
        i: usize,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let h = lambda_t - lambda_s0;
        let h0 = lambda_s0 - lambda_s1;
        let r0 = h0 / h;
        // D0 = m0, D1 = (m0 − m1)/r0; the update is a·x + b·D0 + c·D1, expanded as
        // a·x + (b + c/r0)·m0 − (c/r0)·m1.
        let (a, b, c) = match (self.settings.algorithm, self.settings.solver_type) {
            (Algorithm::DpmSolverPp, SolverType::Midpoint) => {
                let e = (-h).exp() - 1.0;
                (sigma_t / sigma_s0, -alpha_t * e, -0.5 * alpha_t * e)
            }
            (Algorithm::DpmSolverPp, SolverType::Heun) => {
                let e = (-h).exp() - 1.0;
                (sigma_t / sigma_s0, -alpha_t * e, alpha_t * (e / h + 1.0))
            }
            (Algorithm::DpmSolver, SolverType::Midpoint) => {
                let e = h.exp() - 1.0;
                (alpha_t / alpha_s0, -sigma_t * e, -0.5 * sigma_t * e)
            }
            (Algorithm::DpmSolver, SolverType::Heun) => {
                let e = h.exp() - 1.0;
                (alpha_t / alpha_s0, -sigma_t * e, -sigma_t * (e / h - 1.0))
            }
        };
        let d1 = ((m0 - m1)? * (1.0 / r0))?;
        lin3(a, x, b, m0, c, &d1)
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn name(&self) -> &str {
        CLASS_NAME
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        if num_inference_steps == 0 {
            return Err(ModelError::invalid(
                "num_inference_steps",
                "must be at least 1",
            ));
        }
        let n = num_inference_steps;
        let (timesteps, mut sigmas) = if self.settings.karras {
            self.karras_schedule(n)
        } else {
            let timesteps = self.spaced_timesteps(n);
            let last = self.train_sigmas.len() - 1;
            // np.interp at integer points is a table look-up, clamped at the ends.
            let sigmas = timesteps
                .iter()
                .map(|&t| self.train_sigmas[(t.max(0.0) as usize).min(last)] as f64)
                .collect();
            (timesteps, sigmas)
        };
        if timesteps.is_empty() {
            return Err(ModelError::invalid(
                "num_inference_steps",
                format!("{n} steps give an empty schedule for this scheduler config"),
            ));
        }
        let sigma_last = if self.settings.final_sigma_zero {
            0.0
        } else {
            self.train_sigmas[0] as f64
        };
        sigmas.push(sigma_last);
        // The reference stores σ in f32.
        self.sigmas = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        self.timesteps = timesteps;
        self.model_outputs.clear();
        self.lower_order_nums = 0;
        self.last_step = None;
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
        if step_index >= n {
            return Err(ModelError::invalid(
                "step_index",
                format!("{step_index} is past the last of {n} steps"),
            ));
        }
        if step_index == 0 {
            self.model_outputs.clear();
            self.lower_order_nums = 0;
        } else if let Some(last) = self.last_step {
            if last + 1 != step_index {
                return Err(ModelError::invalid(
                    "step_index",
                    format!("steps must be taken in order: got {step_index} after {last}"),
                ));
            }
        }
        let cfg = &self.config;
        let lower_order_final = step_index == n - 1
            && (cfg.euler_at_final
                || (cfg.lower_order_final && n < 15)
                || self.settings.final_sigma_zero);
        let out_dtype = model_output.dtype();
        let m = model_output.to_dtype(DType::F32)?;
        let x = sample.to_dtype(DType::F32)?;
        let converted = self.convert_model_output(&m, &x, self.sigmas[step_index])?;
        drop(m);
        self.model_outputs.push(converted);
        while self.model_outputs.len() > cfg.solver_order {
            self.model_outputs.remove(0);
        }
        let first_order = cfg.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final;
        let prev = match self.model_outputs.as_slice() {
            [.., m1, m0] if !first_order => self.second_order_update(m0, m1, &x, step_index)?,
            [.., m0] => self.first_order_update(m0, &x, step_index)?,
            [] => {
                return Err(ModelError::invalid(
                    "step",
                    "internal: no model output recorded",
                ))
            }
        };
        if self.lower_order_nums < cfg.solver_order {
            self.lower_order_nums += 1;
        }
        self.last_step = Some(step_index);
        Ok(prev.to_dtype(out_dtype)?)
    }
}
