//! AutoencoderKL parity against diffusers 0.42.1 (tests/fixtures/expected/vae.safetensors,
//! written by scripts/make_fixtures.py from the tiny random-weight VAE of the fixture pipeline).

use candle_core::{DType, Device, Tensor};
use relayfarm_models::checkpoint::PipelineFolder;
use relayfarm_models::vae::{AutoencoderKL, AutoencoderKLConfig};
use relayfarm_models::{ModelError, RunDtype};
use std::collections::HashMap;

const PIPE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/pixart-sigma-tiny"
);
const EXPECTED: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/expected/vae.safetensors"
);

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(EXPECTED, &Device::Cpu).expect("read vae.safetensors")
}

fn load_vae(dtype: RunDtype) -> AutoencoderKL {
    let pipe = PipelineFolder::open(PIPE).expect("open fixture pipeline");
    let component = pipe
        .component("vae", &["AutoencoderKL"])
        .expect("vae component");
    AutoencoderKL::load(&component, dtype, &Device::Cpu).expect("load vae")
}

/// max |got − want| / std(want), both read as f32.
fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims(), "shape");
    let g = got.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let w = want.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let g: Vec<f32> = g.to_vec1().unwrap();
    let w: Vec<f32> = w.to_vec1().unwrap();
    let n = w.len() as f64;
    let mean = w.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = w.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let max_abs = g
        .iter()
        .zip(&w)
        .map(|(&a, &b)| (a as f64 - b as f64).abs())
        .fold(0.0, f64::max);
    max_abs / var.sqrt()
}

#[test]
fn decode_matches_diffusers() {
    let exp = expected();
    let vae = load_vae(RunDtype::F32);
    let decoded = vae.decode(&exp["latents"]).unwrap();
    let err = rel_err(&decoded, &exp["decoded"]);
    println!("vae decode: max_abs/std = {err:.3e}");
    assert!(err <= 1e-4, "decode error {err:.3e}");
}

#[test]
fn encode_matches_diffusers() {
    let exp = expected();
    let vae = load_vae(RunDtype::F32);
    let posterior = vae.encode(&exp["image"]).unwrap();
    let err_mean = rel_err(posterior.mean(), &exp["encoded_mean"]);
    let err_logvar = rel_err(posterior.logvar(), &exp["encoded_logvar"]);
    println!("vae encode: mean max_abs/std = {err_mean:.3e}, logvar {err_logvar:.3e}");
    assert!(err_mean <= 1e-4, "encoded mean error {err_mean:.3e}");
    assert!(err_logvar <= 1e-4, "encoded logvar error {err_logvar:.3e}");
}

#[test]
fn decode_latents_divides_by_scaling_factor() {
    let exp = expected();
    let vae = load_vae(RunDtype::F32);
    let sf = vae.config().scaling_factor;
    assert_eq!(sf, 0.13025);
    let scaled = (&exp["latents"] * sf).unwrap();
    let a = vae.decode_latents(&scaled).unwrap();
    let err = rel_err(&a, &exp["decoded"]);
    assert!(err <= 1e-4, "decode_latents error {err:.3e}");
    let back = vae.latents_from_sample(&exp["latents"]).unwrap();
    assert!(rel_err(&back, &scaled) < 1e-6);
}

#[test]
fn sample_uses_exp_half_logvar() {
    let exp = expected();
    let vae = load_vae(RunDtype::F32);
    let posterior = vae.encode(&exp["image"]).unwrap();
    let noise = Tensor::ones(posterior.mean().dims(), DType::F32, &Device::Cpu).unwrap();
    let s = posterior.sample(&noise).unwrap();
    let want =
        (&exp["encoded_mean"] + (&exp["encoded_logvar"] * 0.5).unwrap().exp().unwrap()).unwrap();
    assert!(rel_err(&s, &want) <= 1e-4);
}

#[test]
fn half_precision_runs_close_to_f32() {
    let exp = expected();
    let vae = load_vae(RunDtype::F16);
    let decoded = vae.decode(&exp["latents"]).unwrap();
    assert_eq!(decoded.dtype(), DType::F16);
    let err = rel_err(&decoded, &exp["decoded"]);
    println!("vae decode f16: max_abs/std = {err:.3e}");
    assert!(err <= 0.1, "f16 decode error {err:.3e}");
}

#[test]
fn shapes_and_downscale_factor() {
    let vae = load_vae(RunDtype::F32);
    assert_eq!(vae.downscale_factor(), 8);
    let z = Tensor::zeros((2, 4, 3, 5), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(vae.decode(&z).unwrap().dims(), &[2, 3, 24, 40]);
    let x = Tensor::zeros((1, 3, 40, 24), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(vae.encode(&x).unwrap().mean().dims(), &[1, 4, 5, 3]);
    let bad = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        vae.decode(&bad),
        Err(ModelError::InvalidInput { .. })
    ));
}

fn parse(json: &str) -> AutoencoderKLConfig {
    serde_json::from_str(json).expect("parse config")
}

#[test]
fn config_defaults_follow_diffusers() {
    let cfg = parse(r#"{"_class_name": "AutoencoderKL", "some_future_field": 1}"#);
    assert_eq!(cfg.block_out_channels, vec![64]);
    assert_eq!(cfg.layers_per_block, 1);
    assert_eq!(cfg.latent_channels, 4);
    assert_eq!(cfg.norm_num_groups, 32);
    assert_eq!(cfg.scaling_factor, 0.18215);
    assert_eq!(cfg.shift_factor, None);
    assert!(cfg.use_quant_conv && cfg.use_post_quant_conv && cfg.mid_block_add_attention);
    assert!(cfg.force_upcast);
    cfg.validate().unwrap();
    let cfg = parse(r#"{"sample_size": [512, 512], "shift_factor": 0.0609}"#);
    assert_eq!(cfg.sample_size, 512);
    assert_eq!(cfg.shift_factor, Some(0.0609));
    let sdxl = AutoencoderKLConfig::sdxl();
    sdxl.validate().unwrap();
    assert_eq!(sdxl.downscale_factor(), 8);
}

#[test]
fn config_errors_name_the_field() {
    let cases = [
        (
            r#"{"down_block_types": ["AttnDownEncoderBlock2D"]}"#,
            "down_block_types",
        ),
        (
            r#"{"up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"]}"#,
            "up_block_types",
        ),
        (r#"{"act_fn": "gelu"}"#, "act_fn"),
        (
            r#"{"block_out_channels": [48], "norm_num_groups": 32}"#,
            "block_out_channels",
        ),
    ];
    for (json, field) in cases {
        match parse(json).validate() {
            Err(ModelError::UnsupportedConfig { field: f, .. }) => assert_eq!(f, field, "{json}"),
            other => panic!("{json}: expected UnsupportedConfig, got {other:?}"),
        }
    }
    match parse(r#"{"_class_name": "AutoencoderKLCogVideoX"}"#).validate() {
        Err(ModelError::UnknownClass { class, .. }) => assert_eq!(class, "AutoencoderKLCogVideoX"),
        other => panic!("expected UnknownClass, got {other:?}"),
    }
}
