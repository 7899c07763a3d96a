//! Per-rank resident memory of the tensor-parallel PixArt-Σ-XL-2 denoiser weights.
//!
//! `cargo bench -p relayfarm-models --bench tp_memory`
//!
//! Writes a random-weight `transformer/` folder of the real PixArt-Sigma-XL-2-1024-MS shapes
//! (28 blocks, 16 heads × 72 = 1152, caption 4096, FF 4608; 611 M parameters) to a temporary
//! folder once — f32 by default (2.45 GB), `BENCH_DTYPE=f16` for half the disk (1.22 GB),
//! weights loaded in the same dtype — then loads, for TP 1 (the plain loader), 2 and 4, each
//! rank's shard in a fresh child process (so that every figure starts from a clean heap) and
//! prints one JSON line per rank:
//! - `tensor_bytes` (`sharded` + `replicated`): bytes of the tensors the rank holds;
//! - `rss_delta_bytes`, `rss_anon_delta_bytes`: growth of the process's resident set (all, and
//!   anonymous memory only) from before loading to after, with the file unmapped again;
//! - `peak_rss_delta_bytes`: growth of the peak resident set during loading, which also counts
//!   the pages of the memory-mapped file that the rank read (page cache, shared);
//! - `load_seconds`.
//!
//! A last line per TP size gives the largest rank's figures relative to TP 1. The folder is
//! deleted at the end unless `BENCH_KEEP=1` (`BENCH_DIR` chooses it).

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use relayfarm_models::checkpoint::ComponentFolder;
use relayfarm_models::denoiser::{PixArtConfig, PixArtOptions, PixArtTransformer};
use relayfarm_models::parallel::{Collective, InProcessCollective};
use relayfarm_models::RunDtype;

const CHILD_ENV: &str = "RELAYFARM_TP_MEMORY_CHILD";

/// Every tensor of `PixArtTransformer2DModel` for `cfg`, with its shape.
fn tensor_list(cfg: &PixArtConfig) -> Vec<(String, Vec<usize>)> {
    let d = cfg.inner_dim();
    let cap = cfg.caption_channels.unwrap_or(d);
    let p = cfg.patch_size;
    let mut t: Vec<(String, Vec<usize>)> = Vec::new();
    let mut lin = |name: &str, out: usize, inp: usize| {
        t.push((format!("{name}.weight"), vec![out, inp]));
        t.push((format!("{name}.bias"), vec![out]));
    };
    lin("caption_projection.linear_1", d, cap);
    lin("caption_projection.linear_2", d, d);
    lin("adaln_single.emb.timestep_embedder.linear_1", d, 256);
    lin("adaln_single.emb.timestep_embedder.linear_2", d, d);
    lin("adaln_single.linear", 6 * d, d);
    lin("proj_out", p * p * cfg.out_channels(), d);
    for i in 0..cfg.num_layers {
        let b = format!("transformer_blocks.{i}");
        for a in ["attn1", "attn2"] {
            for q in ["to_q", "to_k", "to_v"] {
                lin(&format!("{b}.{a}.{q}"), d, d);
            }
            lin(&format!("{b}.{a}.to_out.0"), d, d);
        }
        lin(&format!("{b}.ff.net.0.proj"), 4 * d, d);
        lin(&format!("{b}.ff.net.2"), d, 4 * d);
    }
    for i in 0..cfg.num_layers {
        t.push((
            format!("transformer_blocks.{i}.scale_shift_table"),
            vec![6, d],
        ));
    }
    t.push((
        "pos_embed.proj.weight".into(),
        vec![d, cfg.in_channels, p, p],
    ));
    t.push(("pos_embed.proj.bias".into(), vec![d]));
    t.push(("scale_shift_table".into(), vec![2, d]));
    t
}

/// Writes a safetensors file of `N(0, 0.02²)`-ish values (uniform, same spread) without
/// holding it in memory.
fn write_weights(path: &Path, tensors: &[(String, Vec<usize>)], f16: bool) -> std::io::Result<()> {
    let esize = if f16 { 2 } else { 4 };
    let dtype = if f16 { "F16" } else { "F32" };
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let n: usize = shape.iter().product::<usize>() * esize;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut h = serde_json::to_vec(&header)?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let tmp = path.with_extension("partial");
    let mut w = BufWriter::with_capacity(1 << 22, std::fs::File::create(&tmp)?);
    w.write_all(&(h.len() as u64).to_le_bytes())?;
    w.write_all(&h)?;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut buf = Vec::with_capacity(1 << 20);
    for (_, shape) in tensors {
        let mut left: usize = shape.iter().product();
        while left > 0 {
            let k = left.min(1 << 18);
            buf.clear();
            for _ in 0..k {
                // xorshift64*, uniform in [-0.035, 0.035) (std ≈ 0.02).
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                let r = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
                let v = (r as f32 / (1u64 << 24) as f32 - 0.5) * 0.07;
                if f16 {
                    buf.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
                } else {
                    buf.extend_from_slice(&v.to_le_bytes());
                }
            }
            w.write_all(&buf)?;
            left -= k;
        }
    }
    w.flush()?;
    drop(w);
    std::fs::rename(tmp, path)
}

/// `(VmRSS, RssAnon, RssFile, VmHWM)` in bytes.
fn status() -> [usize; 4] {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let get = |key: &str| -> usize {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0)
            * 1024
    };
    [
        get("VmRSS:"),
        get("RssAnon:"),
        get("RssFile:"),
        get("VmHWM:"),
    ]
}

/// In a child process: loads rank `rank` of `world` and prints its JSON line.
fn child(spec: &str) {
    let parts: Vec<&str> = spec.split(',').collect();
    let [dir, world, rank, dtype] = parts[..] else {
        eprintln!("bad {CHILD_ENV}={spec}");
        std::process::exit(2);
    };
    let world: usize = world.parse().unwrap_or(1);
    let rank: usize = rank.parse().unwrap_or(0);
    let run_dtype: RunDtype = dtype.parse().unwrap_or(RunDtype::F32);
    let comp = ComponentFolder::open(
        Path::new(dir).join("transformer"),
        "transformer",
        "PixArtTransformer2DModel".into(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let opts = PixArtOptions::default();
    let before = status();
    let t0 = Instant::now();
    let model = if world == 1 {
        PixArtTransformer::load(&comp, run_dtype, &Device::Cpu, &opts)
    } else {
        let group = InProcessCollective::group(world).unwrap_or_else(|e| panic!("{e}"));
        let coll: Arc<dyn Collective> = Arc::new(group[rank].clone());
        PixArtTransformer::load_sharded(&comp, run_dtype, &Device::Cpu, None, &opts, coll)
    }
    .unwrap_or_else(|e| panic!("{e}"));
    let load_s = t0.elapsed().as_secs_f64();
    let after = status();
    let f = model.weight_footprint();
    let delta = |i: usize| after[i] as i64 - before[i] as i64;
    println!(
        "{}",
        serde_json::json!({
            "bench": "tp_memory",
            "model": "pixart-sigma-xl-2 shapes (random weights)",
            "dtype": dtype,
            "tp": world,
            "rank": rank,
            "tensor_bytes": f.total(),
            "sharded_bytes": f.sharded,
            "replicated_bytes": f.replicated,
            "rss_delta_bytes": delta(0),
            "rss_anon_delta_bytes": delta(1),
            "rss_file_delta_bytes": delta(2),
            "peak_rss_delta_bytes": after[3] as i64 - before[0] as i64,
            "load_seconds": (load_s * 1000.0).round() / 1000.0,
        })
    );
    drop(model);
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child(&spec);
        return;
    }
    let dtype = std::env::var("BENCH_DTYPE").unwrap_or_else(|_| "f32".into());
    let f16 = match dtype.as_str() {
        "f32" => false,
        "f16" => true,
        other => {
            eprintln!("BENCH_DTYPE={other}: use f32 or f16");
            std::process::exit(2);
        }
    };
    let dir = std::env::var("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir().join(format!("relayfarm-tp-memory-xl-{dtype}")));
    let cfg = PixArtConfig::sigma_xl_2_1024_ms();
    let tensors = tensor_list(&cfg);
    let params: usize = tensors
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let tdir = dir.join("transformer");
    let file = tdir.join("diffusion_pytorch_model.safetensors");
    if !file.is_file() {
        std::fs::create_dir_all(&tdir).expect("create the bench folder");
        let mut config = serde_json::to_value(&cfg).expect("config");
        config["_class_name"] = "PixArtTransformer2DModel".into();
        std::fs::write(tdir.join("config.json"), config.to_string()).expect("write config");
        let t0 = Instant::now();
        write_weights(&file, &tensors, f16).expect("write the weights");
        eprintln!(
            "wrote {} ({params} parameters, {dtype}) in {:.1} s",
            file.display(),
            t0.elapsed().as_secs_f64()
        );
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut tp1_bytes = 0f64;
    let mut tp1_anon = 0f64;
    for world in [1usize, 2, 4] {
        let mut worst = (0f64, 0f64);
        for rank in 0..world {
            let spec = format!("{},{world},{rank},{dtype}", dir.display());
            let out = std::process::Command::new(&exe)
                .env(CHILD_ENV, spec)
                .output()
                .expect("run the child");
            let text = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() {
                eprintln!(
                    "TP {world} rank {rank} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                std::process::exit(1);
            }
            print!("{text}");
            let v: serde_json::Value = serde_json::from_str(text.trim()).expect("child JSON");
            let bytes = v["tensor_bytes"].as_f64().unwrap_or(0.0);
            let anon = v["rss_anon_delta_bytes"].as_f64().unwrap_or(0.0);
            worst = (worst.0.max(bytes), worst.1.max(anon));
        }
        if world == 1 {
            (tp1_bytes, tp1_anon) = worst;
        }
        println!(
            "{}",
            serde_json::json!({
                "bench": "tp_memory_summary",
                "dtype": dtype,
                "tp": world,
                "parameters": params,
                "max_rank_tensor_bytes": worst.0,
                "max_rank_rss_anon_delta_bytes": worst.1,
                "tensor_bytes_vs_tp1": (worst.0 / tp1_bytes * 1000.0).round() / 1000.0,
                "rss_anon_vs_tp1": (worst.1 / tp1_anon * 1000.0).round() / 1000.0,
                "ideal": (1000.0 / world as f64).round() / 1000.0,
            })
        );
    }
    if std::env::var("BENCH_KEEP").as_deref() != Ok("1") {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
