//! End-to-end parity of the CogView3-Plus pipeline with diffusers on the tiny fixture folder
//! (tests/fixtures/cogview3-plus-tiny, scripts/make_fixtures_cogview3_plus.py): prompt
//! embeddings, every step's latents, final latents and the decoded image, with zero
//! unconditional embeddings (no negative prompt), with a negative prompt, and without CFG;
//! tensor parallelism; the size rules derived from the configs; stage errors.

use candle_core::{DType, Device, Tensor};
use relayfarm_models::checkpoint::PipelineFolder;
use relayfarm_models::pipeline::cogview3_plus::{CogView3PlusPipeline, EMBEDS};
use relayfarm_models::pipeline::{
    load_pipeline, DiffusionPipeline, GenerateRequest, PipelineOptions, Stage, StageSet, StepEvent,
};
use relayfarm_models::{ModelError, RunDtype};
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

fn folder() -> PipelineFolder {
    PipelineFolder::open(fixtures().join("cogview3-plus-tiny")).unwrap()
}

/// max |a − b| / std(expected).
fn rel_err(got: &Tensor, expected: &Tensor) -> f64 {
    let got = got.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let exp = expected
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap();
    assert_eq!(got.dims(), exp.dims(), "shape");
    let max = (&got - &exp)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let mean = exp.mean_all().unwrap().to_scalar::<f64>().unwrap();
    let var = exp
        .affine(1.0, -mean)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    max / var.sqrt().max(1e-30)
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn pipeline(opts: &PipelineOptions) -> CogView3PlusPipeline {
    CogView3PlusPipeline::load(&folder(), opts).unwrap()
}

fn cases() -> Vec<serde_json::Value> {
    let text =
        std::fs::read_to_string(fixtures().join("expected/cogview3-plus/pipeline_cases.json"))
            .unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn expected(case: &serde_json::Value) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join(format!(
            "expected/cogview3-plus/{}",
            case["file"].as_str().unwrap()
        )),
        &Device::Cpu,
    )
    .unwrap()
}

fn request(case: &serde_json::Value, exp: &HashMap<String, Tensor>) -> GenerateRequest {
    GenerateRequest {
        prompt: case["prompt"].as_str().unwrap().to_string(),
        negative_prompt: case["negative_prompt"].as_str().map(str::to_string),
        height: Some(case["height"].as_u64().unwrap() as u32),
        width: Some(case["width"].as_u64().unwrap() as u32),
        steps: case["num_inference_steps"].as_u64().unwrap() as usize,
        guidance: case["guidance_scale"].as_f64().unwrap(),
        seed: 0,
        latents: Some(exp["latents"].clone()),
        resolution_binning: true,
        size_check: true,
    }
}

/// Runs a case stage by stage, recording every step's latents; returns (final, image, steps).
fn run(p: &CogView3PlusPipeline, req: &GenerateRequest) -> (Tensor, Tensor, Vec<f64>) {
    let plan = p.validate(req).unwrap();
    let noise = p.initial_noise(req, &plan).unwrap();
    let cond = p.encode_prompt(req).unwrap();
    let mut seen = Vec::new();
    let mut obs = |e: StepEvent| {
        seen.push(e.timestep);
        ControlFlow::Continue(())
    };
    let latents = p.denoise(&cond, &noise, req, &plan, &mut obs).unwrap();
    let image = p.decode(&latents, &plan).unwrap();
    (latents, image, seen)
}

#[test]
fn pipeline_matches_diffusers() {
    let p = pipeline(&PipelineOptions::cpu(RunDtype::F32));
    assert_eq!(p.info().class, "CogView3PlusPipeline");
    assert_eq!(p.info().family, "cogview3-plus");
    assert_eq!(p.info().scheduler, "CogVideoXDDIMScheduler");
    assert_eq!(
        (p.info().default_steps, p.info().default_guidance),
        (50, 5.0)
    );
    assert_eq!(p.info().max_sequence_length, 224);
    for case in cases() {
        let name = case["name"].as_str().unwrap().to_string();
        let exp = expected(&case);
        let req = request(&case, &exp);

        // Stage 1: embeddings ([uncond, cond] with CFG; zeros without a negative prompt).
        let cond = p.encode_prompt(&req).unwrap();
        let embeds = cond.get(EMBEDS).unwrap();
        let want_cond = &exp["prompt_embeds"];
        let rows = embeds.dim(0).unwrap();
        let got_cond = embeds.narrow(0, rows - 1, 1).unwrap();
        let e_cond = rel_err(&got_cond, want_cond);
        assert!(e_cond <= 1e-4, "{name}: prompt_embeds {e_cond:e}");
        let e_neg = match exp.get("negative_prompt_embeds") {
            Some(want) => {
                assert!(cond.cfg, "{name}: CFG expected");
                let got = embeds.narrow(0, 0, 1).unwrap();
                if case["negative_prompt"].is_null() {
                    assert_eq!(max_abs(&got, want), 0.0, "{name}: zero uncond");
                    0.0
                } else {
                    rel_err(&got, want)
                }
            }
            None => {
                assert!(!cond.cfg && rows == 1, "{name}: no CFG expected");
                0.0
            }
        };
        assert!(e_neg <= 1e-4, "{name}: negative_prompt_embeds {e_neg:e}");

        // Stages 2 and 3.
        let (latents, image, timesteps) = run(&p, &req);
        let want_t: Vec<f64> = case["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(timesteps, want_t, "{name}: timesteps");
        let e_lat = rel_err(&latents, &exp["final_latents"]);
        let e_img = rel_err(&image, &exp["image"]);
        println!(
            "{name}: prompt_embeds {e_cond:.2e}, negative {e_neg:.2e}, final latents {e_lat:.2e}, image {e_img:.2e} (max_abs/std)"
        );
        assert!(e_lat <= 1e-4, "{name}: final latents {e_lat:e}");
        assert!(e_img <= 1e-4, "{name}: image {e_img:e}");
        assert_eq!(image.dims(), exp["image"].dims());
    }
}

#[test]
fn cancellation_and_last_step_latents() {
    // The observer cancels at a step boundary; an uncancelled run ends at diffusers'
    // `step_latents[N]`.
    let p = pipeline(&PipelineOptions::cpu(RunDtype::F32));
    let case = &cases()[0];
    let exp = expected(case);
    let req = request(case, &exp);
    let plan = p.validate(&req).unwrap();
    let noise = p.initial_noise(&req, &plan).unwrap();
    let cond = p.encode_prompt(&req).unwrap();
    let steps = exp["step_latents"].clone();
    let n = req.steps;
    let mut stop_after_first = |e: StepEvent| {
        if e.step == 1 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    match p.denoise(&cond, &noise, &req, &plan, &mut stop_after_first) {
        Err(ModelError::Cancelled { step }) => assert_eq!(step, 1),
        other => panic!(
            "expected a cancellation, got {:?}",
            other.map(|t| t.dims().to_vec())
        ),
    }
    let mut go = |_e: StepEvent| ControlFlow::Continue(());
    let last = p.denoise(&cond, &noise, &req, &plan, &mut go).unwrap();
    let e = rel_err(&last, &steps.get(n).unwrap());
    println!("step_latents[{n}]: {e:.2e}");
    assert!(e <= 1e-4);
}

#[test]
fn tensor_parallel_matches_single_rank() {
    let case = &cases()[1];
    let exp = expected(case);
    let req = request(case, &exp);
    let one = pipeline(&PipelineOptions::cpu(RunDtype::F32));
    let mut opts = PipelineOptions::cpu(RunDtype::F32);
    opts.tensor_parallel = 2;
    let two = pipeline(&opts);
    assert_eq!(two.tensor_parallel(), 2);
    let (l1, _, _) = run(&one, &req);
    let (l2, i2, _) = run(&two, &req);
    let e = rel_err(&l2, &l1);
    println!("TP 2 vs TP 1: final latents {e:.2e} (max_abs/std)");
    assert!(e <= 1e-5, "TP2 vs TP1 {e:e}");
    let e_img = rel_err(&i2, &exp["image"]);
    println!("TP 2 image vs diffusers {e_img:.2e}");
    assert!(e_img <= 1e-4);
    // The group is reusable: a second job on the same ranks.
    let (l3, _, _) = run(&two, &req);
    assert_eq!(max_abs(&l2, &l3), 0.0);
}

fn size_error(p: &CogView3PlusPipeline, h: u32, w: u32, size_check: bool) -> String {
    let mut req = GenerateRequest::new("x", 2, 5.0);
    req.height = Some(h);
    req.width = Some(w);
    req.size_check = size_check;
    match p.validate(&req) {
        Err(e @ ModelError::InvalidInput { .. }) => e.to_string(),
        Err(e) => panic!("{h}x{w}: expected InvalidInput, got {e:?}"),
        Ok(plan) => panic!("{h}x{w}: expected an error, got {plan:?}"),
    }
}

#[test]
fn size_rules_come_from_the_configs() {
    let mut opts = PipelineOptions::cpu(RunDtype::F32);
    opts.stages = StageSet::empty();
    let p = pipeline(&opts);
    // Tiny model: pos_embed_max_size 16 × patch 2 × VAE 8 = 256, sample_size 8 × 8 / 2 = 32,
    // area 256²/2, multiple 2 × 8 × 2 = 32, default 8 × 8 = 64.
    let r = p.info().size;
    assert_eq!(
        (r.min_side, r.max_side, r.multiple, r.max_area),
        (32, 256, 32, 256 * 256 / 2)
    );
    assert_eq!((r.default_height, r.default_width), (64, 64));
    assert!(!r.resolution_binning);
    let plan = p.validate(&GenerateRequest::new("x", 2, 5.0)).unwrap();
    assert_eq!((plan.height, plan.width), (64, 64));
    assert_eq!(p.latent_shape(&plan), [1, 16, 8, 8]);
    // Binning is not a CogView3 feature: the request's flag changes nothing.
    let mut req = GenerateRequest::new("x", 2, 5.0);
    req.height = Some(96);
    req.width = Some(224);
    req.resolution_binning = true;
    let plan = p.validate(&req).unwrap();
    assert_eq!((plan.gen_height, plan.gen_width), (96, 224));

    let e = size_error(&p, 48, 64, true);
    assert!(e.contains("height") && e.contains("multiple of 32"), "{e}");
    assert!(
        e.contains("patch_size"),
        "names where the rule comes from: {e}"
    );
    let e = size_error(&p, 64, 16, true);
    assert!(e.contains("width") && e.contains("32..=256"), "{e}");
    let e = size_error(&p, 288, 64, true);
    assert!(e.contains("height") && e.contains("32..=256"), "{e}");
    let e = size_error(&p, 256, 256, true);
    assert!(
        e.contains("32768") && e.contains("pos_embed_max_size"),
        "{e}"
    );
    println!("area error: {e}");

    // --no-size-check: range and area lifted, the multiple of patch × VAE (16) and the table's
    // largest side kept.
    for (h, w) in [(48, 64), (16, 16), (256, 256), (16, 256)] {
        let mut req = GenerateRequest::new("x", 2, 5.0);
        req.height = Some(h);
        req.width = Some(w);
        req.size_check = false;
        let plan = p.validate(&req).unwrap();
        assert_eq!((plan.height, plan.width), (h as usize, w as usize));
    }
    let e = size_error(&p, 40, 64, false);
    assert!(e.contains("multiple of 16"), "{e}");
    let e = size_error(&p, 272, 64, false);
    assert!(e.contains("16..=256"), "{e}");

    // Steps, guidance and latents are checked too.
    let mut req = GenerateRequest::new("x", 0, 5.0);
    assert!(p.validate(&req).is_err());
    req.steps = 1001;
    assert!(p.validate(&req).is_err());
    req.steps = 61;
    let e = p.validate(&req).unwrap_err().to_string();
    assert!(e.contains("steps") && e.contains("use 60 or 62"), "{e}");
    req.steps = 2;
    req.guidance = f64::NAN;
    assert!(p.validate(&req).is_err());
    req.guidance = 5.0;
    req.latents = Some(Tensor::zeros((1, 16, 4, 4), DType::F32, &Device::Cpu).unwrap());
    let e = p.validate(&req).unwrap_err().to_string();
    assert!(e.contains("latents"), "{e}");
}

#[test]
fn stages_not_loaded_give_clear_errors() {
    let mut opts = PipelineOptions::cpu(RunDtype::F32);
    opts.stages = StageSet::only(Stage::Denoiser);
    let p = pipeline(&opts);
    assert_eq!(p.stages(), StageSet::only(Stage::Denoiser));
    let req = GenerateRequest::new("a cabin", 2, 5.0);
    let e = p.encode_prompt(&req).unwrap_err().to_string();
    assert!(
        e.contains("text-encoder") && e.contains("not loaded"),
        "{e}"
    );
    let plan = p.validate(&req).unwrap();
    let z = Tensor::zeros(&p.latent_shape(&plan)[..], DType::F32, &Device::Cpu).unwrap();
    let e = p.decode(&z, &plan).unwrap_err().to_string();
    assert!(e.contains("vae"), "{e}");

    // A text-encoder-only process hands its conditioning to a denoiser-only one.
    let mut opts = PipelineOptions::cpu(RunDtype::F32);
    opts.stages = StageSet::only(Stage::TextEncoder).with(Stage::Vae);
    let enc = pipeline(&opts);
    let mut go = |_e: StepEvent| ControlFlow::Continue(());
    let cond = enc.encode_prompt(&req).unwrap();
    let noise = enc.initial_noise(&req, &plan).unwrap();
    let e = enc
        .denoise(&cond, &noise, &req, &plan, &mut go)
        .unwrap_err()
        .to_string();
    assert!(e.contains("denoiser"), "{e}");
    let latents = p.denoise(&cond, &noise, &req, &plan, &mut go).unwrap();
    let image = enc.decode(&latents, &plan).unwrap();
    assert_eq!(image.dims(), &[1, 3, 64, 64]);
}

#[test]
fn load_pipeline_dispatches_and_scheduler_override() {
    let p = load_pipeline(&folder(), &PipelineOptions::cpu(RunDtype::F32)).unwrap();
    assert_eq!(p.info().class, "CogView3PlusPipeline");
    let mut opts = PipelineOptions::cpu(RunDtype::F32);
    opts.stages = StageSet::empty();
    opts.scheduler = Some("euler".into());
    let p = pipeline(&opts);
    assert_eq!(p.scheduler_name(), "EulerDiscreteScheduler");
    assert_eq!(p.scheduler_config()["prediction_type"], "v_prediction");
    opts.scheduler = Some("bogus".into());
    let e = CogView3PlusPipeline::load(&folder(), &opts)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("dpm++-karras"), "{e}");
    // The full generate() path with seeded noise runs and is deterministic.
    let p = pipeline(&PipelineOptions::cpu(RunDtype::F32));
    let mut req = GenerateRequest::new("a cabin", 2, 5.0);
    req.seed = 7;
    let mut go = |_e: StepEvent| ControlFlow::Continue(());
    let a = p.generate(&req, &mut go).unwrap();
    let b = p.generate(&req, &mut go).unwrap();
    assert_eq!(max_abs(&a.image, &b.image), 0.0);
    assert_eq!(a.scheduler, "CogVideoXDDIMScheduler");
    assert_eq!(a.image.dims(), &[1, 3, 64, 64]);
}
