//! EulerDiscreteScheduler, CogVideoXDDIMScheduler and DPM-Solver++ (Karras) parity against
//! diffusers 0.42.1, plus `scheduler::with_override` and config errors.
//!
//! Expected data: tests/fixtures/expected/schedulers/ (scripts/make_fixtures_schedulers.py):
//! the real Kolors Euler config, the real CogView3-Plus CogVideoXDDIM config, DPM++ (Karras and
//! not) and Euler-Karras derived from the Kolors config with `from_config`, and other settings;
//! N ∈ {1, 3, 25, 50} (extra settings {1, 3, 12}).

use candle_core::{DType, Device, Tensor};
use relayfarm_models::scheduler::cogvideox_ddim::{CogVideoXDdimConfig, CogVideoXDdimScheduler};
use relayfarm_models::scheduler::dpm_solver::DpmSolverConfig;
use relayfarm_models::scheduler::euler_discrete::{EulerDiscreteConfig, EulerDiscreteScheduler};
use relayfarm_models::scheduler::{self, Scheduler};
use relayfarm_models::ModelError;
use std::collections::HashMap;

const DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/expected/schedulers"
);

fn to_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn std(v: &[f64]) -> f64 {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n).sqrt()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Largest relative difference `|a−b| / max(|b|, 1)` (timesteps and σ may be 0).
fn max_rel_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ: {a:?} vs {b:?}");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f64::max)
}

fn cases() -> serde_json::Map<String, serde_json::Value> {
    let text = std::fs::read_to_string(format!("{DIR}/cases.json")).expect("read cases.json");
    match scheduler::parse_python_json(&text).expect("parse cases.json") {
        serde_json::Value::Object(m) => m,
        _ => panic!("cases.json is not an object"),
    }
}

/// The scheduler config relayfarm builds for a case: the file's, or `with_override` of it.
fn our_config(case: &serde_json::Value) -> serde_json::Value {
    let base = case["config"].clone();
    match case["override"].as_str() {
        Some(name) => scheduler::with_override(base, name).expect("with_override"),
        None => base,
    }
}

/// The settings diffusers resolved (`from_config`) and ours agree on every field that matters.
fn check_resolved(name: &str, ours: &serde_json::Value, case: &serde_json::Value) {
    let mut resolved = case["resolved_config"].clone();
    resolved["_class_name"] = case["class"].clone();
    match case["class"].as_str().unwrap() {
        "DPMSolverMultistepScheduler" => {
            let a = DpmSolverConfig::from_value(ours.clone()).unwrap();
            let b = DpmSolverConfig::from_value(resolved).unwrap();
            assert_eq!(a.num_train_timesteps, b.num_train_timesteps, "{name}");
            assert_eq!(
                (a.beta_start, a.beta_end, &a.beta_schedule),
                (b.beta_start, b.beta_end, &b.beta_schedule),
                "{name}"
            );
            assert_eq!(a.prediction_type, b.prediction_type, "{name}");
            assert_eq!(a.timestep_spacing, b.timestep_spacing, "{name}");
            assert_eq!(a.steps_offset, b.steps_offset, "{name}");
            assert_eq!(
                a.use_karras_sigmas.unwrap_or(false),
                b.use_karras_sigmas.unwrap_or(false),
                "{name}"
            );
            assert_eq!(a.final_sigmas_type, b.final_sigmas_type, "{name}");
            assert_eq!(
                (a.solver_order, &a.algorithm_type, &a.solver_type),
                (b.solver_order, &b.algorithm_type, &b.solver_type),
                "{name}"
            );
            assert_eq!(
                (a.lower_order_final, a.euler_at_final, a.thresholding),
                (b.lower_order_final, b.euler_at_final, b.thresholding),
                "{name}"
            );
        }
        "EulerDiscreteScheduler" => {
            // Every field (`null`/absent flags mean off, like diffusers' `false`).
            let norm = |v: serde_json::Value| {
                let mut c = EulerDiscreteConfig::from_value(v).unwrap();
                for f in [
                    &mut c.use_karras_sigmas,
                    &mut c.use_exponential_sigmas,
                    &mut c.use_beta_sigmas,
                ] {
                    *f = Some(f.unwrap_or(false));
                }
                c
            };
            assert_eq!(norm(ours.clone()), norm(resolved), "{name}");
        }
        "CogVideoXDDIMScheduler" => {
            let a = CogVideoXDdimConfig::from_value(ours.clone()).unwrap();
            let b = CogVideoXDdimConfig::from_value(resolved).unwrap();
            assert_eq!(a, b, "{name}");
        }
        other => panic!("unexpected class {other}"),
    }
}

#[test]
fn trajectories_match_diffusers() {
    let dev = Device::Cpu;
    let mut worst_t = 0f64;
    let mut worst_frac_t = 0f64;
    let mut worst_sigma = 0f64;
    for (name, case) in cases() {
        let exp: HashMap<String, Tensor> =
            candle_core::safetensors::load(format!("{DIR}/{name}.safetensors"), &dev)
                .expect("read case tensors");
        let cfg = our_config(&case);
        check_resolved(&name, &cfg, &case);
        let mut s = scheduler::from_config(cfg).expect("build scheduler");
        assert_eq!(s.name(), case["class"].as_str().unwrap(), "{name}");
        let steps = case["steps"].as_object().unwrap();
        let mut ns: Vec<usize> = steps.keys().map(|k| k.parse().unwrap()).collect();
        ns.sort();
        for n in ns {
            s.set_timesteps(n).unwrap();
            let want_t = to_vec(&exp[&format!("timesteps_{n}")]);
            let err_t = max_rel_diff(s.timesteps(), &want_t);
            // Integer timesteps are exact. Fractional ones (Euler with Karras / exponential σ,
            // "linspace") come from f32 log-σ tables: numpy's SIMD f32 `log` and torch's AVX-512
            // f32 `sqrt` are not correctly rounded, so they agree to f32 precision only.
            let fractional = want_t.iter().any(|t| t.fract() != 0.0);
            let tol_t = if fractional { 1e-6 } else { 1e-9 };
            if fractional {
                worst_frac_t = worst_frac_t.max(err_t);
            } else {
                worst_t = worst_t.max(err_t);
            }
            assert!(
                err_t <= tol_t,
                "{name} N={n} timesteps: got {:?}, want {want_t:?}",
                s.timesteps()
            );
            let want_init = to_vec(&exp[&format!("init_noise_sigma_{n}")])[0];
            let init = s.init_noise_sigma();
            assert!(
                (init - want_init).abs() <= 1e-6 * want_init.abs(),
                "{name} N={n} init_noise_sigma {init} vs {want_init}"
            );
            if let Some(want_s) = exp.get(&format!("sigmas_{n}")) {
                let want_s = to_vec(want_s);
                let got_s = sigmas_of(&case, n);
                let err = max_rel_diff(&got_s, &want_s);
                worst_sigma = worst_sigma.max(err);
                assert!(err <= 1e-6, "{name} N={n} sigmas: {got_s:?} vs {want_s:?}");
            }
            let outs = &exp[&format!("model_out_{n}")];
            let ins = &exp[&format!("model_in_{n}")];
            let samples = &exp[&format!("samples_{n}")];
            let mut x = (&exp["noise"] * init).unwrap();
            let x0 = to_vec(&samples.get(0).unwrap());
            let err0 = max_abs_diff(&to_vec(&x), &x0) / std(&x0);
            assert!(err0 <= 1e-6, "{name} N={n} initial latents {err0:e}");
            let (mut worst_in, mut worst_x) = (0f64, 0f64);
            for i in 0..n {
                let x_in = s.scale_model_input(x.clone(), i).unwrap();
                let want_in = to_vec(&ins.get(i).unwrap());
                let e_in = max_abs_diff(&to_vec(&x_in), &want_in) / std(&want_in);
                worst_in = worst_in.max(e_in);
                x = s.step(&outs.get(i).unwrap(), i, &x).unwrap();
                let want = to_vec(&samples.get(i + 1).unwrap());
                let e = max_abs_diff(&to_vec(&x), &want) / std(&want);
                worst_x = worst_x.max(e);
                assert!(e <= 1e-5, "{name} N={n} step {i}: max_abs/std = {e:.3e}");
            }
            assert!(worst_in <= 1e-5, "{name} N={n} model input {worst_in:.3e}");
            println!(
                "{name:<26} N={n:>2}: timesteps rel {err_t:.1e}; model_in max_abs/std {worst_in:.2e}; \
                 samples max_abs/std {worst_x:.2e}"
            );
        }
    }
    println!(
        "worst rel err: integer timesteps {worst_t:.2e}, fractional timesteps {worst_frac_t:.2e}, \
         sigmas {worst_sigma:.2e}"
    );
}

/// σ of a case's scheduler after `set_timesteps(n)` (built again with its concrete type).
fn sigmas_of(case: &serde_json::Value, n: usize) -> Vec<f64> {
    let cfg = our_config(case);
    match case["class"].as_str().unwrap() {
        "EulerDiscreteScheduler" => {
            let mut s =
                EulerDiscreteScheduler::new(EulerDiscreteConfig::from_value(cfg).unwrap()).unwrap();
            s.set_timesteps(n).unwrap();
            s.sigmas().to_vec()
        }
        "DPMSolverMultistepScheduler" => {
            let mut s = scheduler::dpm_solver::DpmSolverMultistepScheduler::new(
                DpmSolverConfig::from_value(cfg).unwrap(),
            )
            .unwrap();
            s.set_timesteps(n).unwrap();
            s.sigmas().to_vec()
        }
        other => panic!("no sigmas for {other}"),
    }
}

#[test]
fn cogvideox_alphas_cumprod_match_diffusers() {
    for name in [
        "cogview3_ddim",
        "ddim_eps_leading",
        "ddim_v_linspace_linear",
    ] {
        let exp = candle_core::safetensors::load(format!("{DIR}/{name}.safetensors"), &Device::Cpu)
            .unwrap();
        let want = to_vec(&exp["alphas_cumprod"]);
        let case = &cases()[name];
        let s = CogVideoXDdimScheduler::new(
            CogVideoXDdimConfig::from_value(case["config"].clone()).unwrap(),
        )
        .unwrap();
        let got = s.alphas_cumprod();
        let err = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs() / w.abs().max(1e-30))
            .fold(0f64, f64::max);
        println!("{name}: alphas_cumprod max rel err {err:.2e}");
        // Scaled-linear tables are f64 in the reference and match to rounding. The f32 tables
        // (linear) differ by a few ulp after the zero-SNR rescale: torch's AVX-512 f32 `sqrt` is
        // not always correctly rounded, and the rescale amplifies that near t = T.
        let tol = if case["config"]["beta_schedule"] == "linear" {
            1e-6
        } else {
            1e-12
        };
        assert!(err <= tol, "{name}: {err:e}");
        assert_eq!(*got.last().unwrap(), *want.last().unwrap(), "{name}: ᾱ_T");
    }
}

#[test]
fn kolors_euler_schedule_matches_the_spec() {
    // models-spec §4.4: 50 steps give t = 1079, 1057, …, 23, 1; init_noise_sigma ≈ 25.30.
    let case = &cases()["kolors_euler"];
    let mut s = scheduler::from_config(case["config"].clone()).unwrap();
    s.set_timesteps(50).unwrap();
    let t = s.timesteps();
    assert_eq!((t[0], t[1], t[48], t[49]), (1079.0, 1057.0, 23.0, 1.0));
    assert!((s.init_noise_sigma() - 25.30).abs() < 0.01);
    // CogView3-Plus: trailing 50 steps give 999, 979, …, 19 (§0.7).
    let case = &cases()["cogview3_ddim"];
    let mut s = scheduler::from_config(case["config"].clone()).unwrap();
    s.set_timesteps(50).unwrap();
    assert_eq!((s.timesteps()[0], s.timesteps()[1]), (999.0, 979.0));
    assert_eq!(s.timesteps()[49], 19.0);
    assert_eq!(s.init_noise_sigma(), 1.0);
}

fn unsupported_field(result: Result<Box<dyn Scheduler>, ModelError>) -> String {
    match result {
        Err(ModelError::UnsupportedConfig { field, hint, .. }) => {
            assert!(hint.contains("supported values"), "{hint}");
            field
        }
        Err(e) => panic!("expected UnsupportedConfig, got {e:?}"),
        Ok(_) => panic!("expected UnsupportedConfig, got a scheduler"),
    }
}

#[test]
fn unsupported_settings_are_rejected() {
    let cases = [
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "use_beta_sigmas": true}"#,
            "use_beta_sigmas",
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "interpolation_type": "cubic"}"#,
            "interpolation_type",
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "karras"}"#,
            "timestep_spacing",
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "prediction_type": "flow"}"#,
            "prediction_type",
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "final_sigmas_type": "one"}"#,
            "final_sigmas_type",
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": true,
                "use_exponential_sigmas": true}"#,
            "use_exponential_sigmas",
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "beta_schedule": "sigmoid"}"#,
            "beta_schedule",
        ),
        (
            r#"{"_class_name": "CogVideoXDDIMScheduler", "timestep_spacing": "karras"}"#,
            "timestep_spacing",
        ),
        (
            r#"{"_class_name": "CogVideoXDDIMScheduler", "prediction_type": "flow"}"#,
            "prediction_type",
        ),
        (
            r#"{"_class_name": "CogVideoXDDIMScheduler", "snr_shift_scale": 0}"#,
            "snr_shift_scale",
        ),
        (
            r#"{"_class_name": "CogVideoXDDIMScheduler", "trained_betas": [0.1, 0.2]}"#,
            "trained_betas",
        ),
    ];
    for (json, field) in cases {
        let value = scheduler::parse_python_json(json).unwrap();
        assert_eq!(
            unsupported_field(scheduler::from_config(value)),
            field,
            "{json}"
        );
    }
    // Clipping settings are accepted and (as in diffusers) have no effect.
    let value = scheduler::parse_python_json(
        r#"{"_class_name": "CogVideoXDDIMScheduler", "clip_sample": true, "clip_sample_range": 0.5}"#,
    )
    .unwrap();
    assert!(scheduler::from_config(value).is_ok());
}

#[test]
fn schedule_errors_are_clear() {
    let value =
        scheduler::parse_python_json(r#"{"_class_name": "CogVideoXDDIMScheduler"}"#).unwrap();
    let mut s = scheduler::from_config(value).unwrap();
    let x = Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(s.step(&x, 0, &x).is_err(), "step before set_timesteps");
    assert!(s.set_timesteps(0).is_err());
    assert!(s.set_timesteps(1001).is_err());
    // Leading spacing + steps_offset past the table.
    let value = scheduler::parse_python_json(
        r#"{"_class_name": "CogVideoXDDIMScheduler", "num_train_timesteps": 10, "steps_offset": 1}"#,
    )
    .unwrap();
    let mut s = scheduler::from_config(value).unwrap();
    match s.set_timesteps(10) {
        Err(ModelError::InvalidInput { message, .. }) => {
            assert!(message.contains("steps_offset"), "{message}")
        }
        other => panic!("expected InvalidInput, got {:?}", other.err()),
    }
    s.set_timesteps(5).unwrap();
    assert!(s.step(&x, 5, &x).is_err());
    // Trailing spacing: numpy's arange gives 62 values for N = 61 (diffusers would step at
    // t = −1); the error suggests the nearest valid step counts.
    let mut s = scheduler::from_config(cases()["cogview3_ddim"]["config"].clone()).unwrap();
    match s.set_timesteps(61) {
        Err(ModelError::InvalidInput { message, .. }) => {
            assert!(message.contains("use 60 or 62"), "{message}");
            println!("N=61: {message}");
        }
        other => panic!("expected InvalidInput, got {:?}", other.err()),
    }
    let value =
        scheduler::parse_python_json(r#"{"_class_name": "EulerDiscreteScheduler"}"#).unwrap();
    let mut s = scheduler::from_config(value).unwrap();
    assert!(s.step(&x, 0, &x).is_err(), "step before set_timesteps");
    s.set_timesteps(4).unwrap();
    assert!(s.step(&x, 4, &x).is_err());
    assert!(s.scale_model_input(x.clone(), 9).is_err());
    // Half-precision latents come back in the model output's dtype.
    let h = x.to_dtype(DType::F16).unwrap();
    assert_eq!(s.step(&h, 0, &h).unwrap().dtype(), DType::F16);
}

#[test]
fn with_override_names() {
    let base = cases()["kolors_euler"]["config"].clone();
    for name in ["euler", "euler-karras", "dpm++", "dpm++-karras"] {
        let cfg = scheduler::with_override(base.clone(), name).unwrap();
        let karras = name.ends_with("-karras");
        assert_eq!(cfg["use_karras_sigmas"], serde_json::Value::Bool(karras));
        assert_eq!(cfg["num_train_timesteps"], 1100);
        assert!(cfg.get("_diffusers_version").is_none());
        let s = scheduler::from_config(cfg).unwrap();
        let want = if name.starts_with("euler") {
            "EulerDiscreteScheduler"
        } else {
            "DPMSolverMultistepScheduler"
        };
        assert_eq!(s.name(), want, "{name}");
    }
    match scheduler::with_override(base.clone(), "lms") {
        Err(ModelError::InvalidInput { message, .. }) => {
            for n in ["euler", "euler-karras", "dpm++", "dpm++-karras"] {
                assert!(message.contains(&format!("`{n}`")), "{message}");
            }
            println!("unknown name: {message}");
        }
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    // Keys diffusers dropped as defaults are not carried over.
    let mut with_defaults = base.clone();
    with_defaults["_use_default_values"] = serde_json::json!(["timestep_spacing"]);
    let cfg = scheduler::with_override(with_defaults, "dpm++").unwrap();
    assert!(cfg.get("timestep_spacing").is_none());
    assert!(cfg.get("_use_default_values").is_none());
    // From the CogView3-Plus DDIM config: the training schedule is carried over
    // (v-prediction, zero-SNR, trailing); snr_shift_scale is not an Euler setting.
    let cfg =
        scheduler::with_override(cases()["cogview3_ddim"]["config"].clone(), "euler").unwrap();
    let e = EulerDiscreteConfig::from_value(cfg).unwrap();
    assert_eq!(e.prediction_type, "v_prediction");
    assert!(e.rescale_betas_zero_snr);
    assert_eq!(e.timestep_spacing, "trailing");
}

#[test]
fn new_classes_dispatch() {
    let mut names = scheduler::SUPPORTED_CLASSES.to_vec();
    names.sort();
    assert_eq!(
        names,
        [
            "CogVideoXDDIMScheduler",
            "DPMSolverMultistepScheduler",
            "EulerDiscreteScheduler"
        ]
    );
    let value = scheduler::parse_python_json(r#"{"_class_name": "DDIMScheduler"}"#).unwrap();
    match scheduler::from_config(value) {
        Err(ModelError::UnknownClass { supported, .. }) => {
            assert!(supported.contains("EulerDiscreteScheduler"));
            assert!(supported.contains("CogVideoXDDIMScheduler"));
        }
        Err(e) => panic!("expected UnknownClass, got {e:?}"),
        Ok(_) => panic!("expected UnknownClass"),
    }
}
