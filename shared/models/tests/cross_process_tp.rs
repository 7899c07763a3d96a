//! Denoiser ranks in separate processes, for every family: each rank is its own pipeline that
//! holds only its denoiser shard and one collective of a group (threads stand in for processes
//! here; the collective is all they share, as over TCP or NCCL between real processes). Rank 0
//! leads each loop; the other ranks follow until rank 0 stops them. The final latents must
//! equal the single-rank run.

use candle_core::{DType, Tensor};
use relayfarm_models::checkpoint::PipelineFolder;
use relayfarm_models::parallel::{Collective, InProcessCollective};
use relayfarm_models::pipeline::{
    load_pipeline, DiffusionPipeline, GenerateRequest, PipelineOptions, Stage, StageSet, StepEvent,
};
use relayfarm_models::RunDtype;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).join(name)
}

fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let got = got.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let want = want.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let max = (&got - &want)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let mean = want.mean_all().unwrap().to_scalar::<f64>().unwrap();
    let std = want
        .affine(1.0, -mean)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt();
    max / std
}

fn latents(p: &dyn DiffusionPipeline, req: &GenerateRequest) -> Tensor {
    let mut go_on = |_: StepEvent| ControlFlow::Continue(());
    p.generate(req, &mut go_on).unwrap().latents
}

fn check(model: &str, ranks: usize) {
    let folder = PipelineFolder::open(fixture(model)).unwrap();
    let req = GenerateRequest {
        height: Some(64),
        width: Some(96),
        resolution_binning: false,
        seed: 5,
        ..GenerateRequest::new("a lighthouse at dusk", 3, 4.5)
    };
    let plain = latents(
        load_pipeline(&folder, &PipelineOptions::cpu(RunDtype::F32))
            .unwrap()
            .as_ref(),
        &req,
    );
    let group = InProcessCollective::group(ranks).unwrap();
    let opts = |c: &InProcessCollective, stages| PipelineOptions {
        collective: Some(Arc::new(c.clone()) as Arc<dyn Collective>),
        stages,
        ..PipelineOptions::cpu(RunDtype::F32)
    };
    let followers: Vec<_> = group[1..]
        .iter()
        .map(|c| {
            let (f, o) = (folder.clone(), opts(c, StageSet::only(Stage::Denoiser)));
            std::thread::spawn(move || {
                let p = load_pipeline(&f, &o).unwrap();
                let mut loops = 0;
                while p.follow_denoise().unwrap() {
                    loops += 1;
                }
                loops
            })
        })
        .collect();
    let lead = load_pipeline(&folder, &opts(&group[0], StageSet::all())).unwrap();
    assert_eq!(lead.tensor_parallel(), ranks);
    let a = latents(lead.as_ref(), &req);
    let b = latents(lead.as_ref(), &req);
    lead.stop_followers().unwrap();
    for f in followers {
        assert_eq!(f.join().unwrap(), 2, "{model}: loops followed");
    }
    let e = rel_err(&a, &plain);
    println!("{model}: {ranks} ranks in separate pipelines vs one rank: {e:.2e} (max abs / std)");
    assert!(e <= 1e-5, "{model}: {e}");
    assert_eq!(rel_err(&b, &a), 0.0, "{model}: second job differs");
}

#[test]
fn pixart_sigma_ranks_follow_rank_0() {
    check("pixart-sigma-tiny", 2);
}

#[test]
fn cogview3_plus_ranks_follow_rank_0() {
    check("cogview3-plus-tiny", 2);
}

#[test]
fn kolors_ranks_follow_rank_0() {
    check("kolors-tiny", 2);
}
