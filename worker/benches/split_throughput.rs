//! Throughput of a pipelined 3-stage replica (text encoder, denoiser, VAE as executors joined
//! by in-process links, each stage working on a different job) against running the stages one
//! after another, on the same machine and the same jobs.
//!
//! ```text
//! cargo bench -p relayfarm-worker --bench split_throughput
//! RELAYFARM_BENCH_MODEL=/models/PixArt-Sigma-XL-2-512-MS RELAYFARM_BENCH_SIZE=512 \
//!   RELAYFARM_BENCH_STEPS=20 RELAYFARM_BENCH_JOBS=8 cargo bench -p relayfarm-worker --bench split_throughput
//! ```
//! Default model: the tiny random-weight PixArt-Σ fixture (its stages are small, so the
//! figures show the executors' overhead and overlap, not real-model timings).

use relayfarm_models::checkpoint::PipelineFolder;
use relayfarm_models::pipeline::{GenerateRequest, PipelineOptions, StepEvent};
use relayfarm_models::RunDtype;
use relayfarm_worker::stage::SplitPipeline;
use relayfarm_worker::PipelineRunner;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let model: PathBuf = std::env::var("RELAYFARM_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../tests/fixtures/pixart-sigma-tiny"
            ))
        });
    let size: u32 = env_or("RELAYFARM_BENCH_SIZE", 256);
    let steps: usize = env_or("RELAYFARM_BENCH_STEPS", 10);
    let jobs: usize = env_or("RELAYFARM_BENCH_JOBS", 8);
    let opts = PipelineOptions::cpu(RunDtype::F32);
    let requests: Vec<GenerateRequest> = (0..jobs)
        .map(|i| GenerateRequest {
            height: Some(size),
            width: Some(size),
            seed: i as u64,
            resolution_binning: false,
            ..GenerateRequest::new(format!("a lighthouse at dusk, number {i}"), steps, 4.5)
        })
        .collect();
    println!(
        "model {} · {size}×{size} · {steps} steps · {jobs} jobs · {} threads",
        model.display(),
        rayon::current_num_threads()
    );

    // Sequential: every stage of job k before any stage of job k+1, timed per stage.
    let runner = PipelineRunner::load(&model, "bench", &opts)?;
    let p = runner.pipeline();
    let mut go_on = |_: StepEvent| ControlFlow::Continue(());
    let warm = &requests[0];
    let plan = p.validate(warm)?;
    let noise = p.initial_noise(warm, &plan)?;
    let cond = p.encode_prompt(warm)?;
    let lat = p.denoise(&cond, &noise, warm, &plan, &mut go_on)?;
    p.decode(&lat, &plan)?;
    let (mut t_enc, mut t_den, mut t_vae) = (0.0, 0.0, 0.0);
    let seq_start = Instant::now();
    let mut seq_latents = Vec::new();
    for req in &requests {
        let plan = p.validate(req)?;
        let t = Instant::now();
        let noise = p.initial_noise(req, &plan)?;
        let cond = p.encode_prompt(req)?;
        t_enc += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let lat = p.denoise(&cond, &noise, req, &plan, &mut go_on)?;
        t_den += t.elapsed().as_secs_f64();
        let t = Instant::now();
        p.decode(&lat, &plan)?;
        t_vae += t.elapsed().as_secs_f64();
        seq_latents.push(lat);
    }
    let seq = seq_start.elapsed().as_secs_f64();
    drop(runner);

    // Pipelined: three executors, each loading only its stage.
    let folder = PipelineFolder::open(&model)?;
    let mut split = SplitPipeline::start(&folder, &opts, None)?;
    let mut done = 0;
    for (i, req) in requests.iter().take(1).enumerate() {
        split.submit(&format!("warm-{i}"), req.clone())?;
        split.recv()?;
    }
    let pipe_start = Instant::now();
    let mut max_diff = 0f32;
    let mut submitted = 0;
    while done < jobs {
        while submitted < jobs && submitted - done < 4 {
            split.submit(&submitted.to_string(), requests[submitted].clone())?;
            submitted += 1;
        }
        let Some(out) = split.recv()? else { break };
        let i: usize = out.id.parse()?;
        let g = out.result?;
        let d = (&g.latents - &seq_latents[i])?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        max_diff = max_diff.max(d);
        done += 1;
    }
    let pipe = pipe_start.elapsed().as_secs_f64();
    split.close();
    let n = jobs as f64;
    println!(
        "stage time per job: text encoder {:.1} ms · denoiser {:.1} ms · VAE {:.1} ms",
        t_enc / n * 1e3,
        t_den / n * 1e3,
        t_vae / n * 1e3
    );
    println!(
        "sequential: {seq:.3} s for {jobs} jobs = {:.2} jobs/s",
        n / seq
    );
    println!(
        "pipelined (3 executors): {pipe:.3} s = {:.2} jobs/s · speed-up {:.2}× · bound by the slowest stage: {:.2} jobs/s",
        n / pipe,
        seq / pipe,
        n / t_enc.max(t_den).max(t_vae)
    );
    println!("final latents, pipelined vs sequential: max abs diff {max_diff:e}");
    Ok(())
}
