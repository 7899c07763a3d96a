//! The Kolors UNet (`UNet2DConditionModel`) against diffusers 0.42.1, and its tensor-parallel
//! ranks against the single-rank model.
//!
//! Fixture: tests/fixtures/kolors-tiny/unet (fp16 variant, from
//! scripts/make_fixtures_kolors_unet.py) and tests/fixtures/expected/kolors/unet.safetensors
//! (cases `square` 2×4×8×8, `nonsquare` 2×4×8×12, `odd` 1×4×7×10 whose sides do not divide by
//! 4, so the upsamplers resize to the skip connections).
//!
//! Tolerances: max |ours − diffusers| / std(diffusers) ≤ 1e-4; max |TP 2 − TP 1| / std ≤ 1e-5.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use relayfarm_models::checkpoint::{ComponentFolder, PipelineFolder};
use relayfarm_models::parallel::{Collective, InProcessCollective};
use relayfarm_models::unet::{UNet2DConditionModel, ACCEPTED_CLASSES};
use relayfarm_models::{ModelError, RunDtype};

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

fn unet_folder() -> ComponentFolder {
    PipelineFolder::open(fixtures().join("kolors-tiny"))
        .unwrap()
        .component("unet", ACCEPTED_CLASSES)
        .unwrap()
}

fn load(dtype: RunDtype) -> UNet2DConditionModel {
    UNet2DConditionModel::load(&unet_folder(), dtype, &Device::Cpu, Some("fp16")).unwrap()
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

struct Case {
    name: &'static str,
    sample: Tensor,
    timestep: Tensor,
    ehs: Tensor,
    text_embeds: Tensor,
    time_ids: Tensor,
    output: Tensor,
}

impl Case {
    fn run(&self, m: &UNet2DConditionModel) -> Tensor {
        m.forward(
            &self.sample,
            &self.timestep,
            &self.ehs,
            &self.text_embeds,
            &self.time_ids,
        )
        .unwrap()
    }
}

fn cases() -> Vec<Case> {
    let t = candle_core::safetensors::load(
        fixtures().join("expected/kolors/unet.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    ["square", "nonsquare", "odd"]
        .into_iter()
        .map(|name| {
            let get = |k: &str| t[&format!("{name}.{k}")].clone();
            Case {
                name,
                sample: get("sample"),
                timestep: get("timestep"),
                ehs: get("encoder_hidden_states"),
                text_embeds: get("text_embeds"),
                time_ids: get("time_ids"),
                output: get("output"),
            }
        })
        .collect()
}

#[test]
fn forward_matches_diffusers() {
    let m = load(RunDtype::F32);
    for c in cases() {
        let got = c.run(&m);
        assert_eq!(got.dims(), c.output.dims(), "{}", c.name);
        let e = rel_err(&got, &c.output);
        println!(
            "unet {} {:?}: max abs / std = {e:.2e}",
            c.name,
            c.sample.dims()
        );
        assert!(e <= 1e-4, "{}: {e}", c.name);
    }
}

#[test]
fn half_precision_runs_close_to_f32() {
    let m = load(RunDtype::F16);
    let c = &cases()[1];
    let got = c.run(&m);
    assert_eq!(got.dtype(), DType::F16);
    let e = rel_err(&got, &c.output);
    println!("unet f16 {}: max abs / std = {e:.2e}", c.name);
    assert!(e <= 5e-2, "{e}");
}

/// A copy of the fixture UNet whose attention blocks read the same weights as 4 heads each
/// (`attention_head_dim [1, 4, 4]`: widths 24 / 4 = 6), so that they split over 4 ranks.
fn four_head_unet() -> ComponentFolder {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("relayfarm-unet-tp4-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let src = unet_folder().dir().to_path_buf();
        for e in std::fs::read_dir(&src).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        let cfg_path = dir.join("config.json");
        let mut cfg: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        cfg.insert("attention_head_dim".into(), serde_json::json!([1, 4, 4]));
        std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
        dir
    });
    ComponentFolder::open(dir, "unet", "UNet2DConditionModel".into()).unwrap()
}

/// Loads the `world` ranks, each on its own thread, runs `f` on each; results in rank order.
fn on_ranks<T: Send>(world: usize, f: impl Fn(&UNet2DConditionModel) -> T + Sync) -> Vec<T> {
    on_ranks_of(&unet_folder(), world, f)
}

/// [`on_ranks`] for the UNet in `comp`.
fn on_ranks_of<T: Send>(
    comp: &ComponentFolder,
    world: usize,
    f: impl Fn(&UNet2DConditionModel) -> T + Sync,
) -> Vec<T> {
    let group = InProcessCollective::group(world).unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = group
            .into_iter()
            .map(|c| {
                let f = &f;
                s.spawn(move || {
                    let m = UNet2DConditionModel::load_sharded(
                        comp,
                        RunDtype::F32,
                        &Device::Cpu,
                        Some("fp16"),
                        Arc::new(c) as Arc<dyn Collective>,
                    )
                    .unwrap();
                    f(&m)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn tp2_equals_tp1_and_splits_the_transformer_weights() {
    let full = load(RunDtype::F32);
    let cases = cases();
    let want: Vec<Tensor> = cases.iter().map(|c| c.run(&full)).collect();
    let full_fp = full.weight_footprint();
    let outs = on_ranks(2, |m| {
        let ys: Vec<Tensor> = cases.iter().map(|c| c.run(m)).collect();
        (ys, m.weight_footprint(), m.tensor_parallel_rank())
    });
    for (r, (ys, fp, rank)) in outs.iter().enumerate() {
        assert_eq!(*rank, (r, 2));
        for (k, ((y, w), c)) in ys.iter().zip(&want).zip(&cases).enumerate() {
            assert_eq!(
                rel_err(y, &outs[0].0[k]),
                0.0,
                "rank {r} differs from rank 0 on {}",
                c.name
            );
            let e = rel_err(y, w);
            let e_ref = rel_err(y, &c.output);
            if r == 0 {
                println!(
                    "unet TP 2 {}: vs TP 1 {e:.2e}, vs diffusers {e_ref:.2e} (max abs / std)",
                    c.name
                );
            }
            assert!(e <= 1e-5, "rank {r} {}: {e}", c.name);
            assert!(e_ref <= 1e-4, "rank {r} {}: {e_ref}", c.name);
        }
        let ratio = fp.sharded as f64 / full_fp.sharded as f64;
        println!(
            "rank {r}: transformer-block bytes {} of {} ({ratio:.3}), replicated {} (TP 1: {})",
            fp.sharded, full_fp.sharded, fp.replicated, full_fp.replicated
        );
        assert!((ratio - 0.5).abs() < 1e-9, "rank {r}: {ratio}");
        assert!(fp.replicated <= full_fp.replicated);
    }
}

#[test]
fn tp4_equals_tp1_with_four_heads() {
    let comp = four_head_unet();
    let full =
        UNet2DConditionModel::load(&comp, RunDtype::F32, &Device::Cpu, Some("fp16")).unwrap();
    let cases = cases();
    let want: Vec<Tensor> = cases.iter().map(|c| c.run(&full)).collect();
    let full_fp = full.weight_footprint();
    let outs = on_ranks_of(&comp, 4, |m| {
        let ys: Vec<Tensor> = cases.iter().map(|c| c.run(m)).collect();
        (ys, m.weight_footprint())
    });
    for (r, (ys, fp)) in outs.iter().enumerate() {
        for (k, (y, c)) in ys.iter().zip(&cases).enumerate() {
            assert_eq!(
                rel_err(y, &outs[0].0[k]),
                0.0,
                "rank {r} differs on {}",
                c.name
            );
            let e = rel_err(y, &want[k]);
            if r == 0 {
                println!(
                    "unet TP 4 (4 heads) {}: vs TP 1 {e:.2e} (max abs / std)",
                    c.name
                );
            }
            assert!(e <= 1e-5, "rank {r} {}: {e}", c.name);
        }
        let ratio = fp.sharded as f64 / full_fp.sharded as f64;
        assert!((ratio - 0.25).abs() < 1e-9, "rank {r}: {ratio}");
    }
}

#[test]
fn ranks_that_split_heads_unevenly_are_rejected() {
    let comp = unet_folder();
    let group = InProcessCollective::group(3).unwrap();
    let errs: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = group
            .into_iter()
            .map(|c| {
                let comp = &comp;
                s.spawn(move || {
                    match UNet2DConditionModel::load_sharded(
                        comp,
                        RunDtype::F32,
                        &Device::Cpu,
                        Some("fp16"),
                        Arc::new(c) as Arc<dyn Collective>,
                    ) {
                        Err(e @ ModelError::UnsupportedConfig { .. }) => e.to_string(),
                        other => panic!("expected an unsupported-config error, got {other:?}"),
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for e in errs {
        assert!(e.contains("attention_head_dim"), "{e}");
    }
}

#[test]
fn inputs_are_checked() {
    let m = load(RunDtype::F32);
    let c = &cases()[0];
    let bad_text = c.ehs.narrow(2, 0, 10).unwrap();
    let e = m
        .forward(
            &c.sample,
            &c.timestep,
            &bad_text,
            &c.text_embeds,
            &c.time_ids,
        )
        .unwrap_err();
    assert!(e.to_string().contains("encoder_hidden_states"), "{e}");
    let bad_ids = c.time_ids.narrow(1, 0, 5).unwrap();
    let e = m
        .forward(&c.sample, &c.timestep, &c.ehs, &c.text_embeds, &bad_ids)
        .unwrap_err();
    assert!(e.to_string().contains("time_ids"), "{e}");
    let e = m
        .forward_with(&c.sample, &c.timestep, &c.ehs, None)
        .unwrap_err();
    assert!(e.to_string().contains("text_time"), "{e}");
}
