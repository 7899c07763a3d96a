//! Tensor-parallel PixArt-Σ equals the single-rank model.
//!
//! - Denoiser forward at TP 2 on the tiny fixture (2 heads: one per rank) and at TP 4 on the
//!   same weights read as 4 heads × 4 channels (a copy of the fixture with only
//!   `num_attention_heads`/`attention_head_dim` changed), against TP 1 and diffusers.
//! - Each rank holds `1/N` of the split weights, and the replicated rest.
//! - The whole pipeline (20 DPM-Solver steps, CFG) at TP 2 and TP 4 gives TP 1's final latents;
//!   cancellation stops every rank and leaves the group usable.
//!
//! Tolerance: max |TP N − TP 1| / std(TP 1) ≤ 1e-5 (the row-parallel sums add the same
//! products in a different order, so the results are close, not bit-equal).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use relayfarm_models::checkpoint::{ComponentFolder, PipelineFolder};
use relayfarm_models::denoiser::pixart::ACCEPTED_CLASSES;
use relayfarm_models::denoiser::{PixArtOptions, PixArtTransformer};
use relayfarm_models::parallel::{Collective, InProcessCollective, WeightFootprint};
use relayfarm_models::pipeline::{
    DiffusionPipeline, GenerateRequest, PipelineOptions, PixArtSigmaPipeline, Stage, StageSet,
    StepEvent,
};
use relayfarm_models::{ModelError, RunDtype};

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

fn tiny() -> PathBuf {
    fixtures().join("pixart-sigma-tiny")
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

/// A copy of the fixture pipeline whose transformer reads the same weights as 4 heads of 4
/// channels (inner width 16, as the fixture's 2 × 8), so that it splits over 4 ranks.
fn four_head_pipeline() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("relayfarm-tp4-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        copy_dir(&tiny(), &dir);
        let cfg_path = dir.join("transformer/config.json");
        let mut cfg: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        cfg.insert("num_attention_heads".into(), 4.into());
        cfg.insert("attention_head_dim".into(), 4.into());
        std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
        dir
    })
    .clone()
}

fn transformer_folder(pipe: &Path) -> ComponentFolder {
    PipelineFolder::open(pipe)
        .unwrap()
        .component("transformer", ACCEPTED_CLASSES)
        .unwrap()
}

/// Loads the `world` ranks of `pipe`'s transformer, each on its own thread, and runs `f` on
/// every rank (also on its own thread); returns the ranks' results in rank order.
fn on_ranks<T: Send>(
    pipe: &Path,
    world: usize,
    f: impl Fn(&PixArtTransformer) -> T + Sync,
) -> Vec<T> {
    let comp = transformer_folder(pipe);
    let group = InProcessCollective::group(world).unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = group
            .into_iter()
            .map(|c| {
                let (comp, f) = (&comp, &f);
                s.spawn(move || {
                    let model = PixArtTransformer::load_sharded(
                        comp,
                        RunDtype::F32,
                        &Device::Cpu,
                        None,
                        &PixArtOptions::default(),
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

fn single(pipe: &Path) -> PixArtTransformer {
    PixArtTransformer::load(
        &transformer_folder(pipe),
        RunDtype::F32,
        &Device::Cpu,
        &PixArtOptions::default(),
    )
    .unwrap()
}

struct Inputs {
    latents: Tensor,
    timestep: Tensor,
    ehs: Tensor,
    mask: Tensor,
    diffusers: Tensor,
}

/// diffusers' non-square case (6×10 latent, padded caption).
fn inputs() -> Inputs {
    let t = candle_core::safetensors::load(
        fixtures().join("expected/transformer.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    Inputs {
        latents: t["hidden_states"].clone(),
        timestep: t["timestep"].clone(),
        ehs: t["encoder_hidden_states"].clone(),
        mask: t["encoder_attention_mask"].clone(),
        diffusers: t["output"].clone(),
    }
}

/// Forward (and the prepared-caption forward) on every rank; checks that all ranks agree bit
/// for bit and returns rank 0's outputs.
fn tp_forward(pipe: &Path, world: usize, x: &Inputs) -> (Tensor, Tensor) {
    let outs = on_ranks(pipe, world, |m| {
        let a = m
            .forward(&x.latents, &x.timestep, &x.ehs, Some(&x.mask))
            .unwrap();
        let text = m.encode_text(&x.ehs, Some(&x.mask)).unwrap();
        let b = m.forward_with_text(&x.latents, &x.timestep, &text).unwrap();
        (a, b)
    });
    for (r, (a, b)) in outs.iter().enumerate().skip(1) {
        assert_eq!(rel_err(a, &outs[0].0), 0.0, "rank {r} differs from rank 0");
        assert_eq!(rel_err(b, &outs[0].1), 0.0, "rank {r} differs from rank 0");
    }
    outs.into_iter().next().unwrap()
}

#[test]
fn tp2_forward_equals_tp1_on_the_fixture() {
    let x = inputs();
    let full = single(&tiny())
        .forward(&x.latents, &x.timestep, &x.ehs, Some(&x.mask))
        .unwrap();
    let (a, b) = tp_forward(&tiny(), 2, &x);
    let (e, e_text, e_ref) = (
        rel_err(&a, &full),
        rel_err(&b, &full),
        rel_err(&a, &x.diffusers),
    );
    println!("forward TP 2 vs TP 1: {e:.2e} (prepared caption {e_text:.2e}); vs diffusers {e_ref:.2e} (max abs / std)");
    assert!(e <= 1e-5 && e_text <= 1e-5, "{e} {e_text}");
    assert!(e_ref <= 1e-4, "{e_ref}");
}

#[test]
fn tp4_forward_equals_tp1_on_four_heads() {
    let pipe = four_head_pipeline();
    let x = inputs();
    let full = single(&pipe)
        .forward(&x.latents, &x.timestep, &x.ehs, Some(&x.mask))
        .unwrap();
    for world in [2, 4] {
        let (a, b) = tp_forward(&pipe, world, &x);
        let (e, e_text) = (rel_err(&a, &full), rel_err(&b, &full));
        println!(
            "4-head model, forward TP {world} vs TP 1: {e:.2e} (prepared caption {e_text:.2e})"
        );
        assert!(e <= 1e-5 && e_text <= 1e-5, "TP {world}: {e} {e_text}");
    }
}

#[test]
fn each_rank_holds_one_nth_of_the_split_weights() {
    let pipe = four_head_pipeline();
    let full = single(&pipe).weight_footprint();
    println!("TP 1: {full:?}");
    // (In this tiny model the replicated embeddings weigh about as much as the blocks; at
    // PixArt-XL size the split weights are ~97% of the total: see benches/tp_memory.rs.)
    assert!(full.sharded > 0 && full.replicated > 0);
    for world in [2usize, 4] {
        let per_rank: Vec<WeightFootprint> = on_ranks(&pipe, world, |m| {
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
    let comp = transformer_folder(&tiny());
    let group = InProcessCollective::group(3).unwrap();
    let err = PixArtTransformer::load_sharded(
        &comp,
        RunDtype::F32,
        &Device::Cpu,
        None,
        &PixArtOptions::default(),
        Arc::new(group[0].clone()),
    )
    .unwrap_err();
    match &err {
        ModelError::UnsupportedConfig { field, hint, .. } => {
            assert_eq!(field, "num_attention_heads");
            assert!(hint.contains("use 1, 2 ranks"), "{hint}");
        }
        other => panic!("expected UnsupportedConfig, got {other}"),
    }
}

fn nonsquare_request() -> (GenerateRequest, Tensor) {
    let exp = candle_core::safetensors::load(
        fixtures().join("expected/pipeline_nonsquare.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let req = GenerateRequest {
        prompt: "A Small Red Cabin in the Snowy Woods, 4K".into(),
        negative_prompt: None,
        height: Some(48),
        width: Some(80),
        steps: 20,
        guidance: 4.5,
        seed: 0,
        latents: Some(exp["noise"].clone()),
        resolution_binning: false,
        size_check: true,
    };
    (req, exp["final_latents"].clone())
}

fn load_pipeline(pipe: &Path, tp: usize) -> PixArtSigmaPipeline {
    let folder = PipelineFolder::open(pipe).unwrap();
    let opts = PipelineOptions {
        tensor_parallel: tp,
        ..PipelineOptions::cpu(RunDtype::F32)
    };
    PixArtSigmaPipeline::load(&folder, &opts).unwrap()
}

fn final_latents(p: &PixArtSigmaPipeline, req: &GenerateRequest) -> Tensor {
    let mut go_on = |_: StepEvent| ControlFlow::Continue(());
    p.generate(req, &mut go_on).unwrap().latents
}

#[test]
fn pipeline_tp2_and_tp4_give_the_plain_final_latents() {
    let (req, diffusers) = nonsquare_request();
    let plain = final_latents(&load_pipeline(&tiny(), 1), &req);
    let tp2 = load_pipeline(&tiny(), 2);
    assert_eq!(tp2.tensor_parallel(), 2);
    let got = final_latents(&tp2, &req);
    let (e, e_ref) = (rel_err(&got, &plain), rel_err(&got, &diffusers));
    println!(
        "pipeline TP 2 vs TP 1 final latents: {e:.2e}; vs diffusers {e_ref:.2e} (max abs / std)"
    );
    assert!(e <= 1e-5, "{e}");
    assert!(e_ref <= 1e-4, "{e_ref}");

    // Cancellation reaches every rank at the same step; the group stays usable.
    let mut seen = 0;
    let mut stop_at_3 = |e: StepEvent| {
        seen = e.step;
        if e.step == 3 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    match tp2.generate(&req, &mut stop_at_3) {
        Err(ModelError::Cancelled { step: 3 }) => {}
        other => panic!(
            "expected a cancellation at step 3, got {:?}",
            other.map(|_| ())
        ),
    }
    assert_eq!(seen, 3);
    let again = final_latents(&tp2, &req);
    assert_eq!(rel_err(&again, &got), 0.0, "TP runs are deterministic");
    drop(tp2);

    let pipe4 = four_head_pipeline();
    let plain4 = final_latents(&load_pipeline(&pipe4, 1), &req);
    let got4 = final_latents(&load_pipeline(&pipe4, 4), &req);
    let e4 = rel_err(&got4, &plain4);
    println!("pipeline (4 heads) TP 4 vs TP 1 final latents: {e4:.2e} (max abs / std)");
    assert!(e4 <= 1e-5, "{e4}");
}

/// Ranks in separate "processes": each rank is its own pipeline holding only its denoiser
/// shard and one collective of a group (threads stand in for processes; the collective is the
/// only thing they share). Rank 0 leads; rank 1 follows until told to stop.
#[test]
fn ranks_in_separate_pipelines_follow_rank_0() {
    let (req, _) = nonsquare_request();
    let plain = final_latents(&load_pipeline(&tiny(), 1), &req);
    let group = InProcessCollective::group(2).unwrap();
    let folder = PipelineFolder::open(tiny()).unwrap();
    let opts = |c: &InProcessCollective, stages| PipelineOptions {
        collective: Some(Arc::new(c.clone()) as Arc<dyn Collective>),
        stages,
        ..PipelineOptions::cpu(RunDtype::F32)
    };
    let f1 = folder.clone();
    let o1 = opts(&group[1], StageSet::only(Stage::Denoiser));
    let follower = std::thread::spawn(move || {
        let p = PixArtSigmaPipeline::load(&f1, &o1).unwrap();
        let mut loops = 0;
        while p.follow_denoise().unwrap() {
            loops += 1;
        }
        loops
    });
    let lead = PixArtSigmaPipeline::load(&folder, &opts(&group[0], StageSet::all())).unwrap();
    assert_eq!(lead.tensor_parallel(), 2);
    let a = final_latents(&lead, &req);
    let b = final_latents(&lead, &req);
    lead.stop_followers().unwrap();
    assert_eq!(follower.join().unwrap(), 2);
    let e = rel_err(&a, &plain);
    println!("cross-pipeline TP 2 vs TP 1 final latents: {e:.2e} (max abs / std)");
    assert!(e <= 1e-5, "{e}");
    assert_eq!(rel_err(&b, &a), 0.0);
}
