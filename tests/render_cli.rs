//! End-to-end tests of `relayfarm render`: the real binary on the bundled tiny PixArt-Σ folder,
//! compared with diffusers' outputs (fixtures from `scripts/make_fixtures.py`), plus the
//! prompt-set path (resumable, contact sheet, PNG metadata) and bad input.

use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

fn tiny_model() -> PathBuf {
    fixtures().join("pixart-sigma-tiny")
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("relayfarm-cli-{name}-{}", std::process::id()));
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

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn rel_err(got: &Tensor, expected: &Tensor) -> f64 {
    let got = got.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let exp = expected
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap();
    assert_eq!(got.dims(), exp.dims());
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

fn case(name: &str) -> serde_json::Value {
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("expected/pipeline_cases.json")).unwrap(),
    )
    .unwrap();
    cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
        .clone()
}

fn expected(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join(format!("expected/pipeline_{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
}

fn png_pixels(path: &Path) -> (u32, u32, Vec<u8>) {
    let img = image::open(path).unwrap().to_rgb8();
    (img.width(), img.height(), img.into_raw())
}

fn png_text(path: &Path) -> Vec<(String, String)> {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let reader = dec.read_info().unwrap();
    let info = reader.info();
    let mut v: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for t in &info.utf8_text {
        v.push((t.keyword.clone(), t.get_text().unwrap()));
    }
    v
}

/// Renders a fixture case through the CLI with diffusers' noise and checks final latents and
/// the PNG against diffusers.
fn render_case(name: &str, model: &Path) {
    let c = case(name);
    let exp = expected(name);
    let dir = tmpdir(name);
    let noise = dir.join("noise.safetensors");
    candle_core::safetensors::save(
        &[("latents", exp["noise"].clone())].into_iter().collect(),
        &noise,
    )
    .unwrap();
    let out_png = dir.join("out.png");
    let out_lat = dir.join("latents.safetensors");
    let (h, w) = (c["height"].to_string(), c["width"].to_string());
    let (steps, g) = (
        c["num_inference_steps"].to_string(),
        c["guidance_scale"].to_string(),
    );
    let mut args = vec![
        "render",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        c["prompt"].as_str().unwrap(),
        "--negative-prompt",
        c["negative_prompt"].as_str().unwrap(),
        "--height",
        &h,
        "--width",
        &w,
        "--steps",
        &steps,
        "--guidance",
        &g,
        "--seed",
        "7",
        "--latents",
        noise.to_str().unwrap(),
        "--save-latents",
        out_lat.to_str().unwrap(),
        "--output",
        out_png.to_str().unwrap(),
        "--quiet",
    ];
    if !c["use_resolution_binning"].as_bool().unwrap() {
        args.push("--no-resolution-binning");
    }
    let o = relayfarm(&args);
    assert!(o.status.success(), "{name}: {}", stderr(&o));
    let got = candle_core::safetensors::load(&out_lat, &Device::Cpu).unwrap();
    let e = rel_err(&got["latents"], &exp["final_latents"]);
    println!("{name}: final latents max abs / std = {e:.2e}");
    assert!(e <= 1e-4, "{name}: final latents {e}");
    // The PNG equals diffusers' image rounded to 8 bits (±1 level where a value sits on a rounding edge).
    let (pw, ph, pixels) = png_pixels(&out_png);
    assert_eq!(
        (ph as u64, pw as u64),
        (c["height"].as_u64().unwrap(), c["width"].as_u64().unwrap())
    );
    let img = exp["image"]
        .squeeze(0)
        .unwrap()
        .permute((1, 2, 0))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let worst = pixels
        .iter()
        .zip(&img)
        .map(|(&p, &x)| (p as i32 - (x * 255.0).round() as i32).abs())
        .max()
        .unwrap();
    assert!(
        worst <= 1,
        "{name}: PNG differs from diffusers' image by {worst} levels"
    );
    let text = png_text(&out_png);
    let get = |k: &str| {
        text.iter()
            .find(|(kk, _)| kk == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(get("prompt"), c["prompt"].as_str().unwrap());
    assert_eq!(get("steps"), steps);
    assert_eq!(get("scheduler"), "DPMSolverMultistepScheduler");
    assert_eq!(get("dtype"), "f32");
    assert_eq!(get("size"), format!("{w}x{h}"));
    if name == "long_prompt" {
        assert!(
            stderr(&o).contains("13 tokens dropped"),
            "truncation warning: {}",
            stderr(&o)
        );
    }
}

#[test]
fn render_matches_diffusers_nonsquare() {
    render_case("nonsquare", &tiny_model());
}

#[test]
fn render_matches_diffusers_binned_with_negative_prompt() {
    render_case("binned", &tiny_model());
}

#[test]
fn render_matches_diffusers_long_prompt() {
    render_case("long_prompt", &tiny_model());
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

/// The original PixArt-Sigma-XL-2-1024-MS upload names the class `Transformer2DModel` and its
/// config has no `use_additional_conditions`: it must load and give the same result.
#[test]
fn original_upload_layout_loads() {
    let dir = tmpdir("orig-layout");
    let model = dir.join("model");
    copy_dir(&tiny_model(), &model);
    let mi = model.join("model_index.json");
    let text = std::fs::read_to_string(&mi)
        .unwrap()
        .replace("PixArtTransformer2DModel", "Transformer2DModel");
    std::fs::write(&mi, text).unwrap();
    let cfg_path = model.join("transformer/config.json");
    let mut cfg: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg.remove("use_additional_conditions");
    cfg.insert("_class_name".into(), "Transformer2DModel".into());
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    render_case("nonsquare", &model);
}

#[test]
fn prompt_set_is_resumable_with_contact_sheet() {
    let dir = tmpdir("set");
    let prompts = dir.join("prompts.txt");
    std::fs::write(
        &prompts,
        "a red cabin\n# a comment\n{\"prompt\": \"a blue lake\", \"seed\": 3, \"steps\": 2, \"height\": 32, \"width\": 64, \"name\": \"lake\"}\nan old tree\n",
    )
    .unwrap();
    let out = dir.join("out");
    let args = [
        "render",
        "--prompts",
        prompts.to_str().unwrap(),
        "--out-dir",
        out.to_str().unwrap(),
        "--steps",
        "3",
        "--height",
        "32",
        "--width",
        "32",
        "--no-resolution-binning",
        "--seed",
        "100",
        "--quiet",
    ];
    let o = relayfarm(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("3 rendered, 0 already there, 0 failed"),
        "{stdout}"
    );
    let first = out.join("00000-a-red-cabin.png");
    let lake = out.join("lake.png");
    let third = out.join("00002-an-old-tree.png");
    for p in [&first, &lake, &third] {
        assert!(p.is_file(), "{} missing", p.display());
    }
    assert!(out.join("contact-sheet.png").is_file());
    let (w, h, _) = png_pixels(&lake);
    assert_eq!((w, h), (64, 32));
    let text = png_text(&lake);
    let get = |k: &str| {
        text.iter()
            .find(|(kk, _)| kk == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(get("seed"), "3");
    assert_eq!(get("steps"), "2");
    let t2 = png_text(&third);
    assert!(
        t2.iter().any(|(k, v)| k == "seed" && v == "102"),
        "image 2 uses seed + 2"
    );
    // Re-running skips what is there and renders only what is missing.
    let before = std::fs::metadata(&first).unwrap().modified().unwrap();
    std::fs::remove_file(&third).unwrap();
    let o = relayfarm(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("1 rendered, 2 already there, 0 failed"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::metadata(&first).unwrap().modified().unwrap(),
        before
    );
    assert!(third.is_file());
}

fn expect_error(args: &[&str], needles: &[&str]) {
    let o = relayfarm(args);
    assert!(!o.status.success(), "expected failure for {args:?}");
    let e = stderr(&o);
    assert!(!e.contains("panicked"), "panic for {args:?}: {e}");
    for n in needles {
        assert!(e.contains(n), "{args:?}: expected {n:?} in: {e}");
    }
}

#[test]
fn bad_input_gets_clear_errors() {
    let model = tiny_model();
    let m = model.to_str().unwrap();
    let dir = tmpdir("bad");
    expect_error(
        &[
            "render",
            "--model",
            m,
            "--prompt",
            "x",
            "--height",
            "50",
            "--no-resolution-binning",
        ],
        &["height", "multiple of 16"],
    );
    expect_error(
        &["render", "--model", m, "--prompt", "x", "--steps", "0"],
        &["steps", "at least 1"],
    );
    expect_error(
        &["render", "--model", "/nonexistent/model", "--prompt", "x"],
        &["/nonexistent/model", "model_index.json"],
    );
    expect_error(
        &["render", "--model", m, "--prompt", "  "],
        &["prompt", "empty"],
    );
    expect_error(
        &["render", "--model", m, "--prompt", "x", "--dtype", "bf16"],
        &["bf16", "--dtype f32 or f16"],
    );
    // Empty prompt list.
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "\n# nothing\n").unwrap();
    expect_error(
        &["render", "--model", m, "--prompts", empty.to_str().unwrap()],
        &["prompt set is empty"],
    );
    // Unreadable and wrong-shape --latents.
    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    expect_error(
        &[
            "render",
            "--model",
            m,
            "--prompt",
            "x",
            "--latents",
            junk.to_str().unwrap(),
        ],
        &["--latents", "junk.safetensors"],
    );
    let wrong = dir.join("wrong.safetensors");
    let t = Tensor::zeros((1, 4, 5, 5), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&[("latents", t)].into_iter().collect(), &wrong).unwrap();
    expect_error(
        &[
            "render",
            "--model",
            m,
            "--prompt",
            "x",
            "--height",
            "48",
            "--width",
            "80",
            "--no-resolution-binning",
            "--latents",
            wrong.to_str().unwrap(),
        ],
        &["latents", "[1, 4, 6, 10]"],
    );
    // Corrupt checkpoint file, missing component file, unknown pipeline and scheduler classes.
    let broken = dir.join("broken");
    copy_dir(&model, &broken);
    let b = broken.to_str().unwrap().to_string();
    let weights = broken.join("transformer/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    expect_error(
        &["render", "--model", &b, "--prompt", "x"],
        &["diffusion_pytorch_model.safetensors", "download it again"],
    );
    std::fs::write(&weights, &bytes).unwrap();
    std::fs::remove_file(broken.join("tokenizer/spiece.model")).unwrap();
    expect_error(
        &["render", "--model", &b, "--prompt", "x"],
        &["spiece.model"],
    );
    copy_dir(&model.join("tokenizer"), &broken.join("tokenizer"));
    let mi = broken.join("model_index.json");
    let orig = std::fs::read_to_string(&mi).unwrap();
    std::fs::write(&mi, orig.replace("PixArtSigmaPipeline", "FluxPipeline")).unwrap();
    expect_error(
        &["render", "--model", &b, "--prompt", "x"],
        &["FluxPipeline", "PixArtSigmaPipeline"],
    );
    std::fs::write(&mi, &orig).unwrap();
    let sc = broken.join("scheduler/scheduler_config.json");
    let sorig = std::fs::read_to_string(&sc).unwrap();
    std::fs::write(
        &sc,
        sorig.replace("DPMSolverMultistepScheduler", "LCMScheduler"),
    )
    .unwrap();
    expect_error(
        &["render", "--model", &b, "--prompt", "x"],
        &["LCMScheduler", "DPMSolverMultistepScheduler"],
    );
    std::fs::write(&sc, sorig.replace("\"dpmsolver++\"", "\"sde-dpmsolver++\"")).unwrap();
    expect_error(
        &["render", "--model", &b, "--prompt", "x"],
        &["algorithm_type", "sde-dpmsolver++"],
    );
}

/// Renders the non-square fixture case with diffusers' noise and `extra` arguments; returns
/// the saved final latents.
fn render_latents(name: &str, dir: &Path, extra: &[&str]) -> Tensor {
    let c = case("nonsquare");
    let noise = dir.join("noise.safetensors");
    candle_core::safetensors::save(
        &[("latents", expected("nonsquare")["noise"].clone())]
            .into_iter()
            .collect(),
        &noise,
    )
    .unwrap();
    let lat = dir.join(format!("{name}.safetensors"));
    let png = dir.join(format!("{name}.png"));
    let (h, w) = (c["height"].to_string(), c["width"].to_string());
    let model = tiny_model();
    let mut args = vec![
        "render",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        c["prompt"].as_str().unwrap(),
        "--height",
        &h,
        "--width",
        &w,
        "--steps",
        "20",
        "--guidance",
        "4.5",
        "--no-resolution-binning",
        "--latents",
        noise.to_str().unwrap(),
        "--save-latents",
        lat.to_str().unwrap(),
        "--output",
        png.to_str().unwrap(),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let o = relayfarm(&args);
    assert!(o.status.success(), "{name}: {}", stderr(&o));
    candle_core::safetensors::load(&lat, &Device::Cpu).unwrap()["latents"].clone()
}

/// `--tp 2`: the denoiser split over two ranks (threads; one head each) gives the plain run's
/// final latents (and so diffusers'); a rank count that does not divide the heads is refused.
#[test]
fn render_tensor_parallel_matches_the_plain_run() {
    let dir = tmpdir("tp");
    let plain = render_latents("plain", &dir, &[]);
    let tp2 = render_latents("tp2", &dir, &["--tp", "2"]);
    let e = rel_err(&tp2, &plain);
    let e_ref = rel_err(&tp2, &expected("nonsquare")["final_latents"]);
    println!("--tp 2 vs plain: final latents max abs / std = {e:.2e}; vs diffusers {e_ref:.2e}");
    assert!(e <= 1e-5, "--tp 2: {e}");
    assert!(e_ref <= 1e-4, "--tp 2 vs diffusers: {e_ref}");
    let m = tiny_model();
    expect_error(
        &[
            "render",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            "x",
            "--tp",
            "3",
        ],
        &["num_attention_heads", "divide by 3"],
    );
}
