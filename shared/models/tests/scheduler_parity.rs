//! DPMSolverMultistepScheduler parity against diffusers 0.42.1.
//!
//! - Trajectories of tests/fixtures/expected/scheduler.safetensors (scripts/make_fixtures.py):
//!   PixArt-Σ's scheduler_config.json, N = 14, 15, 20, 25.
//! - Tables, timesteps and small trajectories of other settings, hard-coded from diffusers
//!   (values printed by Python with `repr(float(x))`).

use candle_core::{DType, Device, Tensor};
use relayfarm_models::checkpoint::PipelineFolder;
use relayfarm_models::scheduler::dpm_solver::{DpmSolverConfig, DpmSolverMultistepScheduler};
use relayfarm_models::scheduler::{self, Scheduler};
use relayfarm_models::ModelError;

const PIPE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/pixart-sigma-tiny"
);
const EXPECTED: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/expected/scheduler.safetensors"
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

fn fixture_scheduler() -> Box<dyn Scheduler> {
    let pipe = PipelineFolder::open(PIPE).expect("open fixture pipeline");
    let component = pipe
        .component("scheduler", &[])
        .expect("scheduler component");
    scheduler::from_folder(&component).expect("build scheduler")
}

#[test]
fn pixart_trajectories_match_diffusers() {
    let exp = candle_core::safetensors::load(EXPECTED, &Device::Cpu).expect("read fixture");
    let mut sched = fixture_scheduler();
    assert_eq!(sched.name(), "DPMSolverMultistepScheduler");
    assert_eq!(sched.init_noise_sigma(), 1.0);
    for n in [14usize, 15, 20, 25] {
        sched.set_timesteps(n).unwrap();
        let want_t = to_vec(&exp[&format!("timesteps_{n}")]);
        assert_eq!(sched.timesteps(), want_t.as_slice(), "timesteps N={n}");
        let eps = &exp[&format!("eps_{n}")];
        let samples = &exp[&format!("samples_{n}")];
        let mut x = exp["x_T"].clone();
        let mut worst = 0f64;
        for i in 0..n {
            let x_in = sched.scale_model_input(x.clone(), i).unwrap();
            assert_eq!(
                to_vec(&x_in),
                to_vec(&x),
                "scale_model_input is the identity"
            );
            x = sched.step(&eps.get(i).unwrap(), i, &x).unwrap();
            let want = to_vec(&samples.get(i + 1).unwrap());
            let err = max_abs_diff(&to_vec(&x), &want) / std(&want);
            worst = worst.max(err);
            assert!(err <= 1e-5, "N={n} step {i}: max_abs/std = {err:.3e}");
        }
        println!("N={n}: worst max_abs/std over the trajectory = {worst:.3e}");
    }
}

#[test]
fn pixart_sigmas_match_diffusers() {
    let exp = candle_core::safetensors::load(EXPECTED, &Device::Cpu).expect("read fixture");
    let text = std::fs::read_to_string(format!("{PIPE}/scheduler/scheduler_config.json")).unwrap();
    let cfg = DpmSolverConfig::from_json_str(&text).unwrap();
    assert_eq!(cfg.lambda_min_clipped, f64::NEG_INFINITY);
    let mut s = DpmSolverMultistepScheduler::new(cfg).unwrap();
    for n in [14usize, 15, 20, 25] {
        s.set_timesteps(n).unwrap();
        let want = to_vec(&exp[&format!("sigmas_{n}")]);
        assert_eq!(s.sigmas(), want.as_slice(), "sigmas N={n}");
    }
}

fn sched(json: &str) -> DpmSolverMultistepScheduler {
    DpmSolverMultistepScheduler::new(DpmSolverConfig::from_json_str(json).unwrap()).unwrap()
}

fn close_f32(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= 1e-6 * want.abs().max(1e-30),
        "{what}: got {got:e}, want {want:e}"
    );
}

#[test]
fn alphas_cumprod_tables_match_torch() {
    let idx = [0usize, 1, 10, 100, 500, 998, 999];
    let cases: [(&str, [f64; 7], [f64; 3]); 4] = [
        (
            "{}",
            [
                0.9998999834060669,
                0.9997800588607788,
                0.9978064894676208,
                0.8951413631439209,
                0.07779665291309357,
                4.118194192415103e-05,
                4.035830352222547e-05,
            ],
            [
                9.999999747378752e-05,
                0.010059959255158901,
                0.019999999552965164,
            ],
        ),
        (
            r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}"#,
            [
                0.9991499781608582,
                0.9982960224151611,
                0.9904313087463379,
                0.894223153591156,
                0.27633246779441833,
                0.004716695751994848,
                0.00466009508818388,
            ],
            [
                0.0008499999530613422,
                0.004814953543245792,
                0.011999999172985554,
            ],
        ),
        (
            r#"{"beta_schedule": "squaredcos_cap_v2"}"#,
            [
                0.9999586939811707,
                0.9999125599861145,
                0.9992788434028625,
                0.9715756177902222,
                0.4922850430011749,
                2.428766265438753e-06,
                2.4287349909002387e-09,
            ],
            [
                4.128422369831242e-05,
                0.003155691549181938,
                0.9990000128746033,
            ],
        ),
        (
            r#"{"rescale_betas_zero_snr": true, "beta_schedule": "scaled_linear",
                "beta_start": 0.00085, "beta_end": 0.012}"#,
            [
                0.9991499781608582,
                0.9982334971427917,
                0.9897937178611755,
                0.8867608904838562,
                0.24101854860782623,
                1.9679629303936963e-07,
                5.960464477539063e-08,
            ],
            [0.0008500218391418457, 0.005530834197998047, 1.0],
        ),
    ];
    for (json, ac, betas) in cases {
        let s = sched(json);
        for (k, &i) in idx.iter().enumerate() {
            close_f32(
                s.alphas_cumprod()[i] as f64,
                ac[k],
                &format!("{json} ac[{i}]"),
            );
        }
        for (k, &i) in [0usize, 500, 999].iter().enumerate() {
            close_f32(s.betas()[i] as f64, betas[k], &format!("{json} beta[{i}]"));
        }
    }
    // The linear and scaled-linear tables are bit-exact with torch.
    assert_eq!(
        sched("{}").alphas_cumprod()[500],
        0.07779665291309357f64 as f32
    );
    assert_eq!(sched("{}").betas()[500], 0.010059959255158901f64 as f32);
}

fn check_schedule(json: &str, n: usize, timesteps: &[f64], sigmas: &[f64]) {
    let mut s = sched(json);
    s.set_timesteps(n).unwrap();
    assert_eq!(s.timesteps(), timesteps, "{json} N={n} timesteps");
    assert_eq!(s.sigmas().len(), sigmas.len());
    for (k, (&g, &w)) in s.sigmas().iter().zip(sigmas).enumerate() {
        close_f32(g, w, &format!("{json} N={n} sigma[{k}]"));
    }
}

#[test]
fn timestep_spacings_match_diffusers() {
    check_schedule(
        r#"{"timestep_spacing": "leading", "steps_offset": 1}"#,
        10,
        &[901., 811., 721., 631., 541., 451., 361., 271., 181., 91.],
        &[
            61.37885665893555,
            28.15132713317871,
            13.995209693908691,
            7.518683433532715,
            4.335559368133545,
            2.64943790435791,
            1.6802018880844116,
            1.0696772336959839,
            0.6437671780586243,
            0.3115633428096771,
            0.0,
        ],
    );
    check_schedule(
        r#"{"timestep_spacing": "trailing"}"#,
        15,
        &[
            999., 932., 866., 799., 732., 666., 599., 532., 466., 399., 332., 266., 199., 132., 66.,
        ],
        &[
            157.4072723388672,
            81.8143081665039,
            44.89208984375,
            25.528484344482422,
            15.178593635559082,
            9.488921165466309,
            6.135210037231445,
            4.11756706237793,
            2.8667280673980713,
            2.0308516025543213,
            1.4551136493682861,
            1.0422687530517578,
            0.7192787528038025,
            0.4552265703678131,
            0.22820627689361572,
            0.0,
        ],
    );
    check_schedule(
        r#"{"timestep_spacing": "trailing"}"#,
        7,
        &[999., 856., 713., 570., 428., 285., 142.],
        &[
            157.4072723388672,
            41.14719772338867,
            13.202585220336914,
            5.140506744384766,
            2.352529764175415,
            1.149412989616394,
            0.4919813275337219,
            0.0,
        ],
    );
    // PixArt-Σ at 20 steps (models-spec §1.4).
    let mut s = sched("{}");
    s.set_timesteps(20).unwrap();
    let want: Vec<f64> = vec![
        999., 949., 899., 849., 799., 749., 699., 649., 599., 549., 500., 450., 400., 350., 300.,
        250., 200., 150., 100., 50.,
    ];
    assert_eq!(s.timesteps(), want.as_slice());
    // λ clipping on the cosine schedule.
    check_schedule(
        r#"{"lambda_min_clipped": -5.1, "beta_schedule": "squaredcos_cap_v2"}"#,
        10,
        &[995., 896., 796., 696., 597., 498., 398., 298., 199., 100.],
        &[
            160.41366577148438,
            6.176133155822754,
            3.0547263622283936,
            1.9578906297683716,
            1.3816450834274292,
            1.009238839149475,
            0.7354666590690613,
            0.518397867679596,
            0.33572447299957275,
            0.1710437536239624,
            0.0,
        ],
    );
}

#[test]
fn karras_sigmas_match_diffusers() {
    // Kolors-like: 1100 training steps, scaled_linear 0.00085 → 0.014, Karras σ.
    check_schedule(
        r#"{"use_karras_sigmas": true, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "beta_end": 0.014, "num_train_timesteps": 1100, "timestep_spacing": "leading",
            "steps_offset": 1}"#,
        25,
        &[
            1099., 1072., 1044., 1013., 980., 945., 906., 864., 817., 766., 708., 644., 572., 493.,
            408., 319., 234., 159., 98., 55., 28., 13., 5., 2., 0.,
        ],
        &[
            29.061241149902344,
            24.145193099975586,
            19.95989990234375,
            16.412504196166992,
            13.419835090637207,
            10.907633781433105,
            8.809819221496582,
            7.067788600921631,
            5.629766941070557,
            4.450190544128418,
            3.4891324043273926,
            2.7117600440979004,
            2.0878329277038574,
            1.5912315845489502,
            1.1995224952697754,
            0.8935521841049194,
            0.657073974609375,
            0.4764038920402527,
            0.3401043713092804,
            0.2386956512928009,
            0.16439281404018402,
            0.11086758971214294,
            0.07303345948457718,
            0.04685324430465698,
            0.029167532920837402,
            0.0,
        ],
    );
    let mut s = sched(
        r#"{"use_karras_sigmas": true, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "beta_end": 0.012}"#,
    );
    s.set_timesteps(20).unwrap();
    let want: Vec<f64> = vec![
        999., 962., 921., 876., 827., 772., 710., 640., 561., 474., 380., 285., 197., 123., 69.,
        35., 15., 6., 2., 0.,
    ];
    assert_eq!(s.timesteps(), want.as_slice());
    // Cosine schedule: not rounded, truncated by the int64 cast.
    let mut s = sched(
        r#"{"use_karras_sigmas": true, "beta_schedule": "squaredcos_cap_v2",
            "final_sigmas_type": "sigma_min"}"#,
    );
    s.set_timesteps(8).unwrap();
    assert_eq!(
        s.timesteps(),
        &[998., 998., 998., 998., 994., 965., 508., 0.]
    );
    close_f32(s.sigmas()[8], 0.006427108775824308, "sigma_min final");
}

/// Runs a 1×4 trajectory with deterministic "model outputs" as the Python reference did.
fn trajectory(json: &str, n: usize) -> Vec<f64> {
    let mut s = sched(json);
    s.set_timesteps(n).unwrap();
    let dev = Device::Cpu;
    let mut x = Tensor::new(&[[0.5f32, -1.25, 2.0, 0.1]], &dev).unwrap();
    for i in 0..n {
        let fi = i as f32;
        let eps = [(fi + 1.0).sin(), (2.0 * fi).cos(), 0.3 * fi - 1.0, -0.5];
        let eps = Tensor::new(&[eps], &dev).unwrap();
        x = s.step(&eps, i, &x).unwrap();
    }
    to_vec(&x)
}

#[test]
fn solver_variants_match_diffusers() {
    let cases: [(&str, usize, [f64; 4]); 7] = [
        (
            "{}",
            10,
            [
                -23.590560913085938,
                -248.0171356201172,
                428.44891357421875,
                94.44467163085938,
            ],
        ),
        (
            r#"{"solver_type": "heun", "prediction_type": "v_prediction"}"#,
            12,
            [
                1.0119731426239014,
                -1.197727918624878,
                -0.36919814348220825,
                0.8567650318145752,
            ],
        ),
        (
            r#"{"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}"#,
            9,
            [
                -30.389570236206055,
                -261.95245361328125,
                436.41754150390625,
                94.4349594116211,
            ],
        ),
        (
            r#"{"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min",
                "solver_type": "heun", "prediction_type": "sample"}"#,
            16,
            [
                -1.1750410795211792,
                2.0525333881378174,
                3.7412173748016357,
                -0.49894315004348755,
            ],
        ),
        (
            r#"{"use_karras_sigmas": true, "beta_schedule": "scaled_linear",
                "beta_start": 0.00085, "beta_end": 0.012, "euler_at_final": true,
                "final_sigmas_type": "sigma_min"}"#,
            20,
            [
                5.357259273529053,
                -18.42138671875,
                26.393497467041016,
                8.753898620605469,
            ],
        ),
        (
            r#"{"solver_order": 1, "timestep_spacing": "trailing",
                "rescale_betas_zero_snr": true, "prediction_type": "v_prediction"}"#,
            8,
            [
                0.08390891551971436,
                -1.1411629915237427,
                0.7910423278808594,
                0.7680836915969849,
            ],
        ),
        (
            r#"{"lower_order_final": false, "final_sigmas_type": "sigma_min"}"#,
            10,
            [
                -22.650047302246094,
                -248.5374298095703,
                427.9245910644531,
                94.4349365234375,
            ],
        ),
    ];
    for (json, n, want) in cases {
        let got = trajectory(json, n);
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let err = max_abs_diff(&got, &want) / scale;
        println!("{json} N={n}: max_abs/max|want| = {err:.3e}");
        assert!(err <= 1e-5, "{json} N={n}: got {got:?}, want {want:?}");
    }
}

#[test]
fn steps_must_follow_in_order() {
    let mut s = sched("{}");
    let x = Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        s.step(&x, 0, &x),
        Err(ModelError::InvalidInput { .. })
    ));
    s.set_timesteps(5).unwrap();
    s.step(&x, 0, &x).unwrap();
    assert!(matches!(
        s.step(&x, 2, &x),
        Err(ModelError::InvalidInput { .. })
    ));
    assert!(matches!(
        s.step(&x, 5, &x),
        Err(ModelError::InvalidInput { .. })
    ));
    // Step 0 starts a fresh run.
    s.step(&x, 0, &x).unwrap();
    s.step(&x, 1, &x).unwrap();
    assert!(s.set_timesteps(0).is_err());
    // Half-precision tensors come back in their dtype.
    let h = x.to_dtype(DType::F16).unwrap();
    assert_eq!(s.step(&h, 2, &h).unwrap().dtype(), DType::F16);
}

fn unsupported_field(json: &str) -> String {
    match DpmSolverMultistepScheduler::new(DpmSolverConfig::from_json_str(json).unwrap()) {
        Err(ModelError::UnsupportedConfig {
            field, value, hint, ..
        }) => {
            assert!(hint.contains("supported values"), "{hint}");
            assert!(!value.is_empty());
            field
        }
        other => panic!("{json}: expected UnsupportedConfig, got {other:?}"),
    }
}

#[test]
fn unsupported_settings_are_rejected() {
    let cases = [
        (r#"{"thresholding": true}"#, "thresholding"),
        (r#"{"algorithm_type": "sde-dpmsolver++"}"#, "algorithm_type"),
        (r#"{"solver_order": 3}"#, "solver_order"),
        (r#"{"solver_type": "bogus"}"#, "solver_type"),
        (
            r#"{"prediction_type": "flow_prediction"}"#,
            "prediction_type",
        ),
        (r#"{"beta_schedule": "sigmoid"}"#, "beta_schedule"),
        (r#"{"use_lu_lambdas": true}"#, "use_lu_lambdas"),
        (
            r#"{"use_exponential_sigmas": true}"#,
            "use_exponential_sigmas",
        ),
        (r#"{"use_beta_sigmas": true}"#, "use_beta_sigmas"),
        (r#"{"use_flow_sigmas": true}"#, "use_flow_sigmas"),
        (r#"{"variance_type": "learned_range"}"#, "variance_type"),
        (r#"{"final_sigmas_type": "one"}"#, "final_sigmas_type"),
        (r#"{"algorithm_type": "dpmsolver"}"#, "final_sigmas_type"),
        (r#"{"timestep_spacing": "karras"}"#, "timestep_spacing"),
        (r#"{"use_dynamic_shifting": true}"#, "use_dynamic_shifting"),
    ];
    for (json, field) in cases {
        assert_eq!(unsupported_field(json), field, "{json}");
    }
}

#[test]
fn config_parsing_and_class_dispatch() {
    // Unknown keys are ignored, null flags mean off, Python's -Infinity is read.
    let cfg = DpmSolverConfig::from_json_str(
        r#"{"_class_name": "DPMSolverMultistepScheduler", "future_knob": [1, 2],
            "use_karras_sigmas": null, "lambda_min_clipped": -Infinity, "flow_shift": null,
            "note": "-Infinity stays a string here"}"#,
    )
    .unwrap();
    assert_eq!(cfg.use_karras_sigmas, None);
    assert_eq!(cfg.lambda_min_clipped, f64::NEG_INFINITY);
    cfg.validate().unwrap();

    let wrong =
        DpmSolverConfig::from_json_str(r#"{"_class_name": "EulerDiscreteScheduler"}"#).unwrap();
    assert!(matches!(
        DpmSolverMultistepScheduler::new(wrong),
        Err(ModelError::UnknownClass { .. })
    ));

    let value = scheduler::parse_python_json(r#"{"_class_name": "LCMScheduler"}"#).unwrap();
    match scheduler::from_config(value) {
        Err(ModelError::UnknownClass {
            class, supported, ..
        }) => {
            assert_eq!(class, "LCMScheduler");
            assert!(supported.contains("DPMSolverMultistepScheduler"));
        }
        Err(e) => panic!("expected UnknownClass, got {e:?}"),
        Ok(_) => panic!("expected UnknownClass, got a scheduler"),
    }
    let value = scheduler::parse_python_json(r#"{"num_train_timesteps": 1000}"#).unwrap();
    assert!(scheduler::from_config(value).is_err());
}
