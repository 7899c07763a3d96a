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

pub mod cogvideox_ddim;
pub mod dpm_solver;
pub mod euler_discrete;

use crate::checkpoint::ComponentFolder;
use crate::{ModelError, Result};

/// The scheduler classes [`from_config`] and [`from_folder`] build.
pub const SUPPORTED_CLASSES: &[&str] = &[
    dpm_solver::CLASS_NAME,
    euler_discrete::CLASS_NAME,
    cogvideox_ddim::CLASS_NAME,
];

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
        euler_discrete::CLASS_NAME => {
            let cfg = euler_discrete::EulerDiscreteConfig::from_value(config)?;
            Ok(Box::new(euler_discrete::EulerDiscreteScheduler::new(cfg)?))
        }
        cogvideox_ddim::CLASS_NAME => {
            let cfg = cogvideox_ddim::CogVideoXDdimConfig::from_value(config)?;
            Ok(Box::new(cogvideox_ddim::CogVideoXDdimScheduler::new(cfg)?))
        }
        _ => Err(ModelError::UnknownClass {
            what: "scheduler".to_string(),
            class,
            supported: SUPPORTED_CLASSES.join(", "),
        }),
    }
}

/// The scheduler names [`with_override`] accepts, with what each one selects.
pub const OVERRIDE_NAMES: &[(&str, &str)] = &[
    ("euler", "EulerDiscreteScheduler, use_karras_sigmas=false"),
    (
        "euler-karras",
        "EulerDiscreteScheduler, use_karras_sigmas=true",
    ),
    (
        "dpm++",
        "DPMSolverMultistepScheduler (DPM-Solver++ 2M), use_karras_sigmas=false",
    ),
    (
        "dpm++-karras",
        "DPMSolverMultistepScheduler (DPM-Solver++ 2M), use_karras_sigmas=true \
         (the Kolors docs' recipe: 25 steps, guidance 6.5)",
    ),
];

/// Turns a pipeline's scheduler config into the config of another scheduler, like diffusers'
/// `XScheduler.from_config(pipe.scheduler.config, **overrides)`.
///
/// `name` is one of [`OVERRIDE_NAMES`]: `euler`, `euler-karras`, `dpm++`, `dpm++-karras`.
/// As in diffusers' `extract_init_dict`, every key of `base` is carried over (the training
/// schedule: `num_train_timesteps`, `beta_*`, `trained_betas`, `prediction_type`,
/// `timestep_spacing`, `steps_offset`, `rescale_betas_zero_snr`, …); keys the target class
/// does not know are ignored when it is built (its config structs skip unknown fields), keys
/// listed in `_use_default_values` and other `_`-prefixed keys are dropped, `_class_name`
/// becomes the target class, and the overrides of `name` are set last. Settings the source
/// class has and the target lacks are lost, exactly as in diffusers (e.g. CogVideoXDDIM's
/// `snr_shift_scale` means nothing to Euler). The result is validated by building it.
pub fn with_override(base: serde_json::Value, name: &str) -> Result<serde_json::Value> {
    let (class, karras) = match name {
        "euler" => (euler_discrete::CLASS_NAME, false),
        "euler-karras" => (euler_discrete::CLASS_NAME, true),
        "dpm++" => (dpm_solver::CLASS_NAME, false),
        "dpm++-karras" => (dpm_solver::CLASS_NAME, true),
        other => {
            let names: Vec<String> = OVERRIDE_NAMES
                .iter()
                .map(|(n, what)| format!("`{n}` ({what})"))
                .collect();
            return Err(ModelError::invalid(
                "scheduler",
                format!("unknown scheduler `{other}`; known: {}", names.join(", ")),
            ));
        }
    };
    let serde_json::Value::Object(mut map) = base else {
        return Err(ModelError::corrupt(
            "scheduler_config.json",
            "the scheduler config is not a JSON object",
        ));
    };
    if let Some(serde_json::Value::Array(defaults)) = map.remove("_use_default_values") {
        for key in defaults.iter().filter_map(|k| k.as_str()) {
            map.remove(key);
        }
    }
    map.retain(|k, _| !k.starts_with('_'));
    map.insert("_class_name".into(), class.into());
    map.insert("use_karras_sigmas".into(), karras.into());
    if karras {
        // Karras excludes the other σ spacings (diffusers raises otherwise).
        map.remove("use_exponential_sigmas");
        map.remove("use_beta_sigmas");
    }
    let value = serde_json::Value::Object(map);
    from_config(value.clone())?;
    Ok(value)
}

/// Parses `scheduler_config.json` text into a scheduler's config (Python's bare
/// `Infinity`/`-Infinity`/`NaN` tokens are accepted).
pub(crate) fn config_from_json_str<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    let value = parse_python_json(text)
        .map_err(|e| ModelError::corrupt("scheduler_config.json", format!("invalid JSON: {e}")))?;
    config_from_value(value)
}

/// Deserialises a parsed `scheduler_config.json` into a scheduler's config.
pub(crate) fn config_from_value<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
) -> Result<T> {
    serde_json::from_value(value)
        .map_err(|e| ModelError::corrupt("scheduler_config.json", format!("bad field: {e}")))
}

/// A setting of scheduler `class` that relayfarm does not implement, with the values it does.
pub(crate) fn unsupported_setting(
    class: &str,
    field: &str,
    value: impl std::fmt::Display,
    supported: &str,
) -> ModelError {
    ModelError::UnsupportedConfig {
        component: class.to_string(),
        field: field.to_string(),
        value: value.to_string(),
        hint: format!("supported values: {supported}; change it in scheduler_config.json"),
    }
}

/// A config's `_class_name`, when present, must be the scheduler reading it.
pub(crate) fn check_class_name(class_name: Option<&str>, expected: &str) -> Result<()> {
    match class_name {
        Some(class) if class != expected => Err(ModelError::UnknownClass {
            what: "scheduler".into(),
            class: class.to_string(),
            supported: expected.into(),
        }),
        _ => Ok(()),
    }
}

/// Reads `scheduler_config.json` from a component folder and builds the scheduler it names.
pub fn from_folder(component: &ComponentFolder) -> Result<Box<dyn Scheduler>> {
    // `json_file` accepts Python's bare `Infinity`/`NaN` (see `checkpoint::read_json`).
    from_config(component.json_file::<serde_json::Value>("scheduler_config.json")?)
}

/// Parses JSON written by Python's `json` module, which writes the bare tokens `Infinity`,
/// `-Infinity` and `NaN` (diffusers stores `"lambda_min_clipped": -Infinity`). Outside strings
/// these tokens become the strings `"Infinity"`, `"-Infinity"` and `"NaN"`, which the
/// scheduler configs' number fields accept.
pub fn parse_python_json(text: &str) -> serde_json::Result<serde_json::Value> {
    serde_json::from_str(&crate::checkpoint::quote_non_finite_literals(text))
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
