//! `relayfarm render` on every model family's tiny fixture: CogView3-Plus
//! (`scripts/make_fixtures_cogview3_plus.py`) and Kolors (`scripts/make_fixtures_kolors.py` +
//! `make_fixtures_kolors_unet.py`), through the real binary exactly as a user runs it, against
//! diffusers' final latents; `--split` and `--tp 2` against the plain run; size rules and
//! `--no-size-check`; `--scheduler`.

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("relayfarm-fam-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn relayfarm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_relayfarm"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run relayfarm")
}

/// max |got − want| / std(want).
fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let got = got.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let want = want.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    assert_eq!(got.dims(), want.dims(), "shape");
    let max = (&got - &want)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let mean = want.mean_all().unwrap().to_scalar::<f64>().unwrap();
    let var = want
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

/// One fixture case, read from a family's `pipeline_cases.json`.
struct Case {
    name: String,
    prompt: String,
    negative: Option<String>,
    size: Option<(u64, u64)>,
    steps: u64,
    guidance: f64,
    scheduler: Option<String>,
    noise: Tensor,
    final_latents: Tensor,
}

fn cases(family: &str, noise_key: &str, final_key: &str) -> Vec<Case> {
    let dir = fixtures().join("expected").join(family);
    let j: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("pipeline_cases.json")).unwrap())
            .unwrap();
    j["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let name = c["name"].as_str().unwrap().to_string();
            let t: HashMap<String, Tensor> = candle_core::safetensors::load(
                dir.join(format!("pipeline_{name}.safetensors")),
                &Device::Cpu,
            )
            .unwrap();
            let num = |a: &str, b: &str| c.get(a).or_else(|| c.get(b)).cloned().unwrap();
            Case {
                prompt: c["prompt"].as_str().unwrap().to_string(),
                negative: c["negative_prompt"].as_str().map(str::to_string),
                size: c["height"].as_u64().zip(c["width"].as_u64()),
                steps: num("num_inference_steps", "steps").as_u64().unwrap(),
                guidance: num("guidance_scale", "guidance").as_f64().unwrap(),
                scheduler: c["scheduler"].as_str().map(str::to_string),
                noise: t[noise_key].clone(),
                final_latents: t[final_key].clone(),
                name,
            }
        })
        .collect()
}

/// Renders a case with diffusers' noise; returns the saved final latents.
fn render(model: &Path, case: &Case, dir: &Path, tag: &str, extra: &[&str]) -> Tensor {
    let noise = dir.join(format!("{}-noise.safetensors", case.name));
    candle_core::safetensors::save(
        &[("latents", case.noise.clone())].into_iter().collect(),
        &noise,
    )
    .unwrap();
    let lat = dir.join(format!("{}-{tag}.safetensors", case.name));
    let png = dir.join(format!("{}-{tag}.png", case.name));
    let (steps, guidance) = (case.steps.to_string(), case.guidance.to_string());
    let mut args: Vec<String> = [
        "render",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        &case.prompt,
        "--steps",
        &steps,
        "--guidance",
        &guidance,
        "--latents",
        noise.to_str().unwrap(),
        "--save-latents",
        lat.to_str().unwrap(),
        "--output",
        png.to_str().unwrap(),
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some((h, w)) = case.size {
        args.extend([
            "--height".into(),
            h.to_string(),
            "--width".into(),
            w.to_string(),
        ]);
    }
    if let Some(n) = &case.negative {
        args.extend(["--negative-prompt".into(), n.clone()]);
    }
    if let Some(s) = &case.scheduler {
        args.extend(["--scheduler".into(), s.clone()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = relayfarm(&args);
    assert!(
        o.status.success(),
        "{} {tag}: {}",
        case.name,
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(png.exists());
    candle_core::safetensors::load(&lat, &Device::Cpu).unwrap()["latents"].clone()
}

/// Every case against diffusers; the first one also with `--split` and `--tp 2`, which must
/// give the plain run's latents.
fn family_matches_diffusers(family: &str, model: &str, noise_key: &str, final_key: &str) {
    let dir = tmpdir(family);
    let model = fixtures().join(model);
    for (i, case) in cases(family, noise_key, final_key).iter().enumerate() {
        let plain = render(&model, case, &dir, "plain", &[]);
        let e = rel_err(&plain, &case.final_latents);
        println!(
            "{family} {}: final latents vs diffusers {e:.2e} (max abs / std)",
            case.name
        );
        assert!(e <= 1e-4, "{family} {}: {e}", case.name);
        if i == 0 {
            let split = render(&model, case, &dir, "split", &["--split"]);
            let tp2 = render(&model, case, &dir, "tp2", &["--tp", "2"]);
            let (es, et) = (rel_err(&split, &plain), rel_err(&tp2, &plain));
            println!(
                "{family} {}: --split vs plain {es:.2e}, --tp 2 vs plain {et:.2e}",
                case.name
            );
            assert!(es <= 1e-6, "--split: {es}");
            assert!(et <= 1e-5, "--tp 2: {et}");
        }
    }
}

#[test]
fn cogview3_plus_render_matches_diffusers() {
    family_matches_diffusers(
        "cogview3-plus",
        "cogview3-plus-tiny",
        "latents",
        "final_latents",
    );
}

#[test]
fn kolors_render_matches_diffusers() {
    family_matches_diffusers("kolors", "kolors-tiny", "noise", "latents");
}

/// CogView3-Plus size rules come from the checkpoint's config (the tiny model: 32..=256 px,
/// at most 32768 pixels, multiples of 32) and are checked before any work; `--no-size-check`
/// lifts the range and area rules but not the multiple the architecture needs.
#[test]
fn cogview3_plus_size_rules_and_override() {
    let model = fixtures().join("cogview3-plus-tiny");
    let m = model.to_str().unwrap();
    let dir = tmpdir("cv3-size");
    let out = dir.join("x.png");
    let o = out.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut a = vec!["render", "--model", m, "--prompt", "a cat", "--steps", "1"];
        a.extend_from_slice(&["--output", o, "--quiet"]);
        a.extend_from_slice(extra);
        relayfarm(&a)
    };
    let too_big = run(&["--height", "256", "--width", "256"]);
    assert!(!too_big.status.success());
    let err = String::from_utf8_lossy(&too_big.stderr);
    assert!(err.contains("32768") && err.contains("256"), "{err}");
    let odd = run(&["--height", "80", "--width", "64"]);
    assert!(!odd.status.success());
    let err = String::from_utf8_lossy(&odd.stderr);
    assert!(
        err.contains("height") && err.contains("multiple of 32"),
        "{err}"
    );
    let forced = run(&["--height", "256", "--width", "256", "--no-size-check"]);
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
    let still_odd = run(&["--height", "72", "--width", "64", "--no-size-check"]);
    assert!(!still_odd.status.success());
}
