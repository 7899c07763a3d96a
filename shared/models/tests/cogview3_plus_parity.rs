//! Parity of the CogView3-Plus denoiser with diffusers 0.42.1 `CogView3PlusTransformer2DModel`
//! on the tiny random-weight fixture (`scripts/make_fixtures_cogview3_plus.py`): a square grid
//! covering the whole 16×16 position table and a non-square 3×5 grid, batch 2, 8 text tokens,
//! different timesteps and size conditioning per sample.
//!
//! Also: tensor parallelism over 2 and 4 ranks (threads with `InProcessCollective`) equals the
//! single-rank model, and each rank holds `1/N` of the split weights.
//!
//! Tolerances: max |got − diffusers| / std(diffusers) ≤ 1e-4; max |TP N − TP 1| / std ≤ 1e-5.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use relayfarm_models::checkpoint::{ComponentFolder, PipelineFolder};
use relayfarm_models::denoiser::cogview3_plus::{CogView3PlusTransformer, ACCEPTED_CLASSES};
use relayfarm_models::parallel::{Collective, InProcessCollective, WeightFootprint};
use relayfarm_models::{ModelError, RunDtype};

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

fn transformer_folder() -> ComponentFolder {
    PipelineFolder::open(fixtures().join("cogview3-plus-tiny"))
        .unwrap()
        .component("transformer", ACCEPTED_CLASSES)
        .unwrap()
}

fn single(dtype: RunDtype) -> CogView3PlusTransformer {
    CogView3PlusTransformer::load(&transformer_folder(), dtype, &Device::Cpu).unwrap()
}

/// (max |got − want|, std(want)), in f64.
fn error_figures(got: &Tensor, want: &Tensor) -> (f64, f64) {
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
    (max, var.sqrt())
}

fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let (max, std) = error_figures(got, want);
    max / std
}

struct Case {
    hidden_states: Tensor,
    encoder_hidden_states: Tensor,
    timestep: Tensor,
    original_size: Tensor,
    target_size: Tensor,
    crop_coords: Tensor,
    output: Tensor,
}

fn case(prefix: &str) -> Case {
    let t = candle_core::safetensors::load(
        fixtures().join("expected/cogview3-plus/transformer.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let get = |name: &str| {
        t.get(&format!("{prefix}{name}"))
            .unwrap_or_else(|| panic!("fixture lacks {prefix}{name}"))
            .clone()
    };
    Case {
        hidden_states: get("hidden_states"),
        encoder_hidden_states: get("encoder_hidden_states"),
        timestep: get("timestep"),
        original_size: get("original_size"),
        target_size: get("target_size"),
        crop_coords: get("crop_coords"),
        output: get("output"),
    }
}

fn forward(m: &CogView3PlusTransformer, c: &Case) -> Tensor {
    m.forward(
        &c.hidden_states,
        &c.encoder_hidden_states,
        &c.timestep,
        &c.original_size,
        &c.target_size,
        &c.crop_coords,
    )
    .unwrap()
}

fn check(prefix: &str) {
    let model = single(RunDtype::F32);
    let c = case(prefix);
    let out = forward(&model, &c);
    assert_eq!(out.dims(), c.output.dims(), "{prefix}: output shape");
    let (max_abs, std) = error_figures(&out, &c.output);
    let rel = max_abs / std;
    println!("cogview3-plus {prefix}: max_abs {max_abs:.3e}, std {std:.3e}, max_abs/std {rel:.3e}");
    assert!(rel <= 1e-4, "{prefix}: {rel}");

    // The prepared-text path gives the same bits.
    let text = model.encode_text(&c.encoder_hidden_states).unwrap();
    assert_eq!(text.batch_size(), 2);
    let out2 = model
        .forward_with_text(
            &c.hidden_states,
            &text,
            &c.timestep,
            &c.original_size,
            &c.target_size,
            &c.crop_coords,
        )
        .unwrap();
    assert_eq!(rel_err(&out2, &out), 0.0, "{prefix}: forward_with_text");
}

#[test]
fn square_full_table_grid_matches_diffusers() {
    check("square_");
}

#[test]
fn nonsquare_grid_matches_diffusers() {
    check("nonsquare_");
}

#[test]
fn bf16_and_f16_stay_close_to_diffusers() {
    let c = case("nonsquare_");
    for (dtype, tol) in [(RunDtype::Bf16, 0.1), (RunDtype::F16, 0.02)] {
        let model = single(dtype);
        let out = forward(&model, &c);
        let rel = rel_err(&out, &c.output);
        println!("cogview3-plus {dtype:?} nonsquare: max_abs/std {rel:.3e}");
        assert!(rel <= tol, "{dtype:?}: {rel}");
    }
}

#[test]
fn inputs_are_checked() {
    let model = single(RunDtype::F32);
    let c = case("nonsquare_");
    // Latent grid beyond the 16×16 position table (34 / 2 = 17 patches).
    let big = Tensor::zeros((2, 16, 34, 8), DType::F32, &Device::Cpu).unwrap();
    let err = model
        .forward(
            &big,
            &c.encoder_hidden_states,
            &c.timestep,
            &c.original_size,
            &c.target_size,
            &c.crop_coords,
        )
        .unwrap_err();
    assert!(matches!(err, ModelError::InvalidInput { .. }), "{err}");
    // Wrong text width.
    let bad_text = Tensor::zeros((2, 8, 7), DType::F32, &Device::Cpu).unwrap();
    assert!(model.encode_text(&bad_text).is_err());
    // Size conditioning of the wrong batch.
    let bad_size = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(model
        .forward(
            &c.hidden_states,
            &c.encoder_hidden_states,
            &c.timestep,
            &bad_size,
            &c.target_size,
            &c.crop_coords,
        )
        .is_err());
}

/// Loads `world` ranks of the fixture transformer, each on its own thread, and runs `f` on
/// every rank; returns the results in rank order.
fn on_ranks<T: Send>(world: usize, f: impl Fn(&CogView3PlusTransformer) -> T + Sync) -> Vec<T> {
    let comp = transformer_folder();
    let group = InProcessCollective::group(world).unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = group
            .into_iter()
            .map(|c| {
                let (comp, f) = (&comp, &f);
                s.spawn(move || {
                    let model = CogView3PlusTransformer::load_sharded(
                        comp,
                        RunDtype::F32,
                        &Device::Cpu,
                        Arc::new(c) as Arc<dyn Collective>,
                    )
                    .unwrap();
                    f(&model)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn tensor_parallel_2_and_4_equal_one_rank() {
    let full = single(RunDtype::F32);
    for prefix in ["square_", "nonsquare_"] {
        let c = case(prefix);
        let want = forward(&full, &c);
        for world in [2usize, 4] {
            let outs = on_ranks(world, |m| forward(m, &c));
            for (r, o) in outs.iter().enumerate().skip(1) {
                assert_eq!(rel_err(o, &outs[0]), 0.0, "rank {r} of {world} differs");
            }
            let e = rel_err(&outs[0], &want);
            let e_ref = rel_err(&outs[0], &c.output);
            println!(
                "cogview3-plus {prefix} TP {world} vs TP 1: {e:.2e}; vs diffusers {e_ref:.2e} (max abs / std)"
            );
            assert!(e <= 1e-5, "{prefix} TP {world}: {e}");
            assert!(e_ref <= 1e-4, "{prefix} TP {world}: {e_ref}");
        }
    }
}

#[test]
fn each_rank_holds_one_nth_of_the_split_weights() {
    let full = single(RunDtype::F32).weight_footprint();
    println!("TP 1: {full:?}");
    assert!(full.sharded > 0 && full.replicated > 0);
    for world in [2usize, 4] {
        let per_rank: Vec<WeightFootprint> = on_ranks(world, |m| {
            assert_eq!(m.tensor_parallel_rank().1, world);
            m.weight_footprint()
        });
        for (r, f) in per_rank.iter().enumerate() {
            println!(
                "TP {world} rank {r}: {f:?}, {:.3} of TP 1's bytes",
                f.total() as f64 / full.total() as f64
            );
            assert_eq!(f.sharded * world, full.sharded, "rank {r} of {world}");
            if r == 0 {
                // Rank 0 also adds the row-parallel biases.
                assert_eq!(f.replicated, full.replicated);
            } else {
                assert!(f.replicated < full.replicated);
            }
        }
    }
}

#[test]
fn indivisible_heads_are_refused() {
    let comp = transformer_folder();
    let group = InProcessCollective::group(3).unwrap();
    let err = CogView3PlusTransformer::load_sharded(
        &comp,
        RunDtype::F32,
        &Device::Cpu,
        Arc::new(group[0].clone()),
    )
    .unwrap_err();
    match &err {
        ModelError::UnsupportedConfig { field, hint, .. } => {
            assert_eq!(field, "num_attention_heads");
            assert!(hint.contains("use 1, 2, 4 ranks"), "{hint}");
        }
        other => panic!("expected UnsupportedConfig, got {other}"),
    }
}
