//! End-to-end parity of the PixArt-Σ pipeline with diffusers on the tiny fixture folder:
//! prompt embeddings, final latents (before VAE decoding) and the decoded image, for a
//! non-square size, a binned size with a negative prompt, and a prompt longer than 300 tokens.
//! Fixtures: `scripts/make_fixtures.py`.

use candle_core::{DType, Device, Tensor};
use relayfarm_models::checkpoint::PipelineFolder;
use relayfarm_models::pipeline::{
    DiffusionPipeline, GenerateRequest, PipelineOptions, PixArtSigmaPipeline, StepEvent,
};
use relayfarm_models::RunDtype;
use std::ops::ControlFlow;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
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
    max / var.sqrt()
}

fn pipeline() -> PixArtSigmaPipeline {
    let folder = PipelineFolder::open(fixtures().join("pixart-sigma-tiny")).unwrap();
    PixArtSigmaPipeline::load(&folder, &PipelineOptions::cpu(RunDtype::F32)).unwrap()
}

fn run_case(p: &PixArtSigmaPipeline, name: &str) {
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("expected/pipeline_cases.json")).unwrap(),
    )
    .unwrap();
    let case = cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap();
    let exp = candle_core::safetensors::load(
        fixtures().join(format!("expected/pipeline_{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let req = GenerateRequest {
        prompt: case["prompt"].as_str().unwrap().to_string(),
        negative_prompt: Some(case["negative_prompt"].as_str().unwrap().to_string()),
        height: Some(case["height"].as_u64().unwrap() as u32),
        width: Some(case["width"].as_u64().unwrap() as u32),
        steps: case["num_inference_steps"].as_u64().unwrap() as usize,
        guidance: case["guidance_scale"].as_f64().unwrap(),
        seed: 0,
        latents: Some(exp["noise"].clone()),
        resolution_binning: case["use_resolution_binning"].as_bool().unwrap(),
        size_check: true,
    };
    let plan = p.validate(&req).unwrap();
    assert_eq!(plan.gen_height as u64, case["gen_height"].as_u64().unwrap());
    assert_eq!(plan.gen_width as u64, case["gen_width"].as_u64().unwrap());

    let embeds = p
        .encode_prompt_embeds(
            &req.prompt,
            req.negative_prompt.as_deref().unwrap_or(""),
            req.guidance,
        )
        .unwrap();
    let e_cond = rel_err(
        &embeds.embeds.narrow(0, 1, 1).unwrap(),
        &exp["prompt_embeds"],
    );
    let e_uncond = rel_err(
        &embeds.embeds.narrow(0, 0, 1).unwrap(),
        &exp["negative_prompt_embeds"],
    );
    let mut steps_seen = 0;
    let mut obs = |e: StepEvent| {
        steps_seen = e.step;
        ControlFlow::Continue(())
    };
    let out = p.generate(&req, &mut obs).unwrap();
    assert_eq!(steps_seen, req.steps);
    let e_lat = rel_err(&out.latents, &exp["final_latents"]);
    let e_img = rel_err(&out.image, &exp["image"]);
    println!("{name}: prompt_embeds {e_cond:.2e}, negative {e_uncond:.2e}, final latents {e_lat:.2e}, image {e_img:.2e} (max abs / std)");
    assert!(
        e_cond <= 1e-4 && e_uncond <= 1e-4,
        "embeddings: {e_cond} {e_uncond}"
    );
    assert!(e_lat <= 1e-4, "final latents: {e_lat}");
    assert!(e_img <= 1e-4, "image: {e_img}");
}

#[test]
fn pixart_sigma_matches_diffusers() {
    let p = pipeline();
    for case in ["nonsquare", "binned", "long_prompt"] {
        run_case(&p, case);
    }
}

#[test]
fn cancellation_stops_at_a_step_boundary() {
    let p = pipeline();
    let req = GenerateRequest {
        prompt: "a cat".into(),
        negative_prompt: None,
        height: Some(32),
        width: Some(32),
        steps: 5,
        guidance: 4.5,
        seed: 1,
        latents: None,
        resolution_binning: false,
        size_check: true,
    };
    let mut obs = |e: StepEvent| {
        if e.step == 2 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let err = p.generate(&req, &mut obs).unwrap_err();
    assert!(err.to_string().contains("cancelled at step 2"), "{err}");
}

#[test]
fn bad_requests_are_named() {
    let p = pipeline();
    let base = GenerateRequest {
        prompt: "a cat".into(),
        negative_prompt: None,
        height: Some(48),
        width: Some(80),
        steps: 3,
        guidance: 4.5,
        seed: 1,
        latents: None,
        resolution_binning: false,
        size_check: true,
    };
    let err = |r: GenerateRequest| p.validate(&r).unwrap_err().to_string();
    let e = err(GenerateRequest {
        height: Some(50),
        ..base.clone()
    });
    assert!(e.contains("height") && e.contains("multiple of 16"), "{e}");
    let e = err(GenerateRequest {
        steps: 0,
        ..base.clone()
    });
    assert!(e.contains("steps"), "{e}");
    let e = err(GenerateRequest {
        guidance: f64::NAN,
        ..base.clone()
    });
    assert!(e.contains("guidance"), "{e}");
    let wrong = Tensor::zeros((1, 4, 5, 5), DType::F32, &Device::Cpu).unwrap();
    let e = err(GenerateRequest {
        latents: Some(wrong),
        ..base.clone()
    });
    assert!(e.contains("latents") && e.contains("[1, 4, 6, 10]"), "{e}");
    // Seeded noise is reproducible.
    let a = p.initial_noise(&base, &p.validate(&base).unwrap()).unwrap();
    let b = p.initial_noise(&base, &p.validate(&base).unwrap()).unwrap();
    assert_eq!(rel_err(&a, &b), 0.0);
}
