//! Diffusion schedulers, built from a component's `scheduler_config.json`.
//!
//! Each scheduler implements [`Scheduler`]; settings a scheduler does not implement are
//! rejected with a clear error rather than silently ignored.

/// The interface the pipelines drive: set up once per job, then one `step` per model call.
pub trait Scheduler: Send {
    /// The class name, as in `scheduler_config.json` (for metadata and logs).
    fn name(&self) -> &str;
    /// Prepares the inference schedule for `num_inference_steps` steps.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> crate::Result<()>;
    /// The model timesteps of the schedule set by [`Scheduler::set_timesteps`], in order.
    fn timesteps(&self) -> &[f64];
    /// The factor the raw standard-normal noise is multiplied by to make the first latents.
    fn init_noise_sigma(&self) -> f64;
    /// Scales the latents before they enter the model at `step_index` (identity for most).
    fn scale_model_input(
        &self,
        sample: candle_core::Tensor,
        step_index: usize,
    ) -> crate::Result<candle_core::Tensor>;
    /// One denoising step: returns the latents for the next step.
    fn step(
        &mut self,
        model_output: &candle_core::Tensor,
        step_index: usize,
        sample: &candle_core::Tensor,
    ) -> crate::Result<candle_core::Tensor>;
}

pub mod dpm_solver;

use crate::checkpoint::ComponentFolder;
use crate::{ModelError, Result};

/// The scheduler classes [`from_config`] and [`from_folder`] build.
pub const SUPPORTED_CLASSES: &[&str] = &[dpm_solver::CLASS_NAME];

/// Builds the scheduler a parsed `scheduler_config.json` names in `_class_name`.
pub fn from_config(config: serde_json::Value) -> Result<Box<dyn Scheduler>> {
    let class = config
        .get("_class_name")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| {
            ModelError::corrupt(
                "scheduler_config.json",
                "no `_class_name` (the scheduler class)",
            )
        })?;
    match class.as_str() {
        dpm_solver::CLASS_NAME => {
            let cfg = dpm_solver::DpmSolverConfig::from_value(config)?;
            Ok(Box::new(dpm_solver::DpmSolverMultistepScheduler::new(cfg)?))
        }
        _ => Err(ModelError::UnknownClass {
            what: "scheduler".to_string(),
            class,
            supported: SUPPORTED_CLASSES.join(", "),
        }),
    }
}

/// Reads `scheduler_config.json` from a component folder and builds the scheduler it names.
pub fn from_folder(component: &ComponentFolder) -> Result<Box<dyn Scheduler>> {
    let path = component.dir().join("scheduler_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ModelError::MissingFile {
                path: path.clone(),
                hint: "the scheduler folder is incomplete; download the whole repository".into(),
            }
        } else {
            ModelError::corrupt(&path, e)
        }
    })?;
    let value = parse_python_json(&text)
        .map_err(|e| ModelError::corrupt(&path, format!("invalid JSON: {e}")))?;
    from_config(value)
}

/// Parses JSON written by Python's `json` module, which writes the bare tokens `Infinity`,
/// `-Infinity` and `NaN` (diffusers stores `"lambda_min_clipped": -Infinity`). Outside strings
/// these tokens become the strings `"Infinity"`, `"-Infinity"` and `"NaN"`, which the
/// scheduler configs' number fields accept.
pub fn parse_python_json(text: &str) -> serde_json::Result<serde_json::Value> {
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
            out.push(c);
            rest = &rest[1..];
            continue;
        }
        if let Some(token) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t))
        {
            out.push('"');
            out.push_str(token);
            out.push('"');
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    serde_json::from_str(&out)
}

/// A JSON number, or one of the strings `"Infinity"`, `"-Infinity"`, `"NaN"`.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum LenientNumber {
    Number(f64),
    Text(String),
}

impl LenientNumber {
    fn value<E: serde::de::Error>(self) -> std::result::Result<f64, E> {
        match self {
            LenientNumber::Number(v) => Ok(v),
            LenientNumber::Text(s) => match s.as_str() {
                "Infinity" => Ok(f64::INFINITY),
                "-Infinity" => Ok(f64::NEG_INFINITY),
                "NaN" => Ok(f64::NAN),
                other => Err(E::custom(format!("expected a number, got \"{other}\""))),
            },
        }
    }
}

/// Deserialises an `f64` that may be written as Python's `Infinity`/`-Infinity`/`NaN`.
pub(crate) fn lenient_f64<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<f64, D::Error> {
    <LenientNumber as serde::Deserialize>::deserialize(d)?.value()
}

/// Like [`lenient_f64`], `null` allowed.
pub(crate) fn lenient_opt_f64<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<f64>, D::Error> {
    match <Option<LenientNumber> as serde::Deserialize>::deserialize(d)? {
        Some(n) => n.value().map(Some),
        None => Ok(None),
    }
}
