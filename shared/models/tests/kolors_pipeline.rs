//! End-to-end parity of `KolorsPipeline` with diffusers 0.42.1 on the tiny Kolors fixture
//! (`scripts/make_fixtures_kolors.py --pipeline`): final latents and decoded images for each
//! case, and tensor parallelism (2 ranks) equal to one rank.

use candle_core::{DType, Device, Tensor};
use relayfarm_models::checkpoint::PipelineFolder;
use relayfarm_models::pipeline::{
    load_pipeline, DiffusionPipeline, GenerateRequest, PipelineOptions, StepEvent,
};
use relayfarm_models::RunDtype;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).join(rel)
}

#[derive(serde::Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    prompt: String,
    negative_prompt: Option<String>,
    height: Option<u32>,
    width: Option<u32>,
    steps: usize,
    guidance: f64,
    timesteps: Vec<f64>,
    /// A `--scheduler` override (`None`: the checkpoint's Euler scheduler).
    #[serde(default)]
    scheduler: Option<String>,
    scheduler_class: String,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixture("expected/kolors/pipeline_cases.json"))
        .expect("pipeline_cases.json");
    serde_json::from_str::<Cases>(&text)
        .expect("cases json")
        .cases
}

fn pipeline(tp: usize) -> Box<dyn DiffusionPipeline> {
    pipeline_with(tp, None)
}

fn pipeline_with(tp: usize, scheduler: Option<String>) -> Box<dyn DiffusionPipeline> {
    let folder = PipelineFolder::open(fixture("kolors-tiny")).expect("folder");
    let mut opts = PipelineOptions::cpu(RunDtype::F32);
    opts.tensor_parallel = tp;
    opts.scheduler = scheduler;
    load_pipeline(&folder, &opts).expect("load KolorsPipeline")
}

/// max |a − b| / std(b).
fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let got = got.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let want = want.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    assert_eq!(got.dims(), want.dims());
    let max = (&got - &want)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let v: Vec<f32> = want.to_vec1().unwrap();
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    max / std
}

fn run_case(pipe: &dyn DiffusionPipeline, case: &Case) -> (Tensor, Tensor, Vec<f64>) {
    let expected = candle_core::safetensors::load(
        fixture(&format!(
            "expected/kolors/pipeline_{}.safetensors",
            case.name
        )),
        &Device::Cpu,
    )
    .expect("expected tensors");
    let mut req = GenerateRequest::new(case.prompt.clone(), case.steps, case.guidance);
    req.negative_prompt = case.negative_prompt.clone();
    req.height = case.height;
    req.width = case.width;
    req.latents = Some(expected["noise"].clone());
    let mut seen = Vec::new();
    let mut obs = |e: StepEvent| {
        seen.push(e.timestep);
        ControlFlow::Continue(())
    };
    let out = pipe.generate(&req, &mut obs).expect("generate");
    let le = rel_err(&out.latents, &expected["latents"]);
    let ie = rel_err(&out.image, &expected["image"]);
    println!(
        "case {}: latents max|err|/std = {le:.3e}, image = {ie:.3e} ({}×{})",
        case.name, out.size.width, out.size.height
    );
    assert!(le <= 1e-4, "case {}: latents {le:e}", case.name);
    assert!(ie <= 1e-4, "case {}: image {ie:e}", case.name);
    (out.latents, out.image, seen)
}

#[test]
fn pipeline_matches_diffusers() {
    let pipe = pipeline(1);
    assert_eq!(pipe.info().class, "KolorsPipeline");
    assert_eq!(pipe.info().default_steps, 50);
    assert_eq!(pipe.info().default_guidance, 5.0);
    assert_eq!(pipe.info().scheduler, "EulerDiscreteScheduler");
    for case in cases() {
        let overridden;
        let p = match &case.scheduler {
            None => pipe.as_ref(),
            Some(name) => {
                overridden = pipeline_with(1, Some(name.clone()));
                overridden.as_ref()
            }
        };
        assert_eq!(
            p.info().scheduler,
            case.scheduler_class,
            "case {}",
            case.name
        );
        let (_, _, seen) = run_case(p, &case);
        assert_eq!(seen, case.timesteps, "case {} timesteps", case.name);
    }
}

#[test]
fn tensor_parallel_two_ranks_equals_one() {
    let one = pipeline(1);
    let two = pipeline(2);
    assert_eq!(two.tensor_parallel(), 2);
    let cases = cases();
    let case = cases.iter().find(|c| c.name == "nonsquare").expect("case");
    let (l1, i1, _) = run_case(one.as_ref(), case);
    let (l2, i2, _) = run_case(two.as_ref(), case);
    let le = rel_err(&l2, &l1);
    let ie = rel_err(&i2, &i1);
    println!("tp2 vs tp1: latents {le:.3e}, image {ie:.3e}");
    assert!(le <= 1e-5 && ie <= 1e-5);
}

#[test]
fn size_rules_follow_check_inputs() {
    let pipe = pipeline(1);
    let mut req = GenerateRequest::new("x", 3, 5.0);
    req.height = Some(100);
    req.width = Some(64);
    let e = pipe.validate(&req).unwrap_err().to_string();
    assert!(e.contains("height") && e.contains("multiple of 8"), "{e}");
    req.height = None;
    req.width = None;
    let plan = pipe.validate(&req).unwrap();
    assert_eq!((plan.height, plan.width), (128, 128));
    assert_eq!(pipe.latent_shape(&plan), [1, 4, 16, 16]);
}

#[test]
fn f16_run_is_close_and_decodes_in_f32() {
    let folder = PipelineFolder::open(fixture("kolors-tiny")).expect("folder");
    let pipe = load_pipeline(&folder, &PipelineOptions::cpu(RunDtype::F16)).expect("load f16");
    let cases = cases();
    let case = cases.iter().find(|c| c.name == "negative").expect("case");
    let expected = candle_core::safetensors::load(
        fixture(&format!(
            "expected/kolors/pipeline_{}.safetensors",
            case.name
        )),
        &Device::Cpu,
    )
    .expect("expected tensors");
    let mut req = GenerateRequest::new(case.prompt.clone(), case.steps, case.guidance);
    req.negative_prompt = case.negative_prompt.clone();
    req.height = case.height;
    req.width = case.width;
    req.latents = Some(expected["noise"].clone());
    let out = pipe
        .generate(&req, &mut |_: StepEvent| ControlFlow::Continue(()))
        .expect("generate f16");
    let le = rel_err(&out.latents, &expected["latents"]);
    let ie = rel_err(&out.image, &expected["image"]);
    println!("f16 run: latents max|err|/std = {le:.3e}, image = {ie:.3e}");
    assert!(le < 5e-2 && ie < 5e-2, "f16: {le:e} {ie:e}");
}

#[test]
fn stages_in_separate_instances_equal_generate() {
    use relayfarm_models::pipeline::{Stage, StageSet};
    let folder = PipelineFolder::open(fixture("kolors-tiny")).expect("folder");
    let load = |stage: Stage| {
        let mut opts = PipelineOptions::cpu(RunDtype::F32);
        opts.stages = StageSet::only(stage);
        load_pipeline(&folder, &opts).expect("load one stage")
    };
    let (text, denoiser, vae) = (
        load(Stage::TextEncoder),
        load(Stage::Denoiser),
        load(Stage::Vae),
    );
    let cases = cases();
    let case = cases.iter().find(|c| c.name == "negative").expect("case");
    let expected = candle_core::safetensors::load(
        fixture(&format!(
            "expected/kolors/pipeline_{}.safetensors",
            case.name
        )),
        &Device::Cpu,
    )
    .expect("expected tensors");
    let mut req = GenerateRequest::new(case.prompt.clone(), case.steps, case.guidance);
    req.negative_prompt = case.negative_prompt.clone();
    req.height = case.height;
    req.width = case.width;
    req.latents = Some(expected["noise"].clone());
    // Every instance validates (configs only), but runs only its own stage.
    let plan = vae.validate(&req).expect("validate");
    assert!(text.decode(&expected["latents"], &plan).is_err());
    assert!(vae.encode_prompt(&req).is_err());
    let cond = text.encode_prompt(&req).expect("encode");
    let noise = denoiser.initial_noise(&req, &plan).expect("noise");
    let latents = denoiser
        .denoise(&cond, &noise, &req, &plan, &mut |_: StepEvent| {
            ControlFlow::Continue(())
        })
        .expect("denoise");
    let image = vae.decode(&latents, &plan).expect("decode");
    let le = rel_err(&latents, &expected["latents"]);
    let ie = rel_err(&image, &expected["image"]);
    println!("staged: latents {le:.3e}, image {ie:.3e}");
    assert!(le <= 1e-4 && ie <= 1e-4);
}
