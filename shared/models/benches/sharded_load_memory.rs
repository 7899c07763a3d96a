//! Peak resident memory of loading Kolors' big components: the sharded fp16 ChatGLM3 text
//! encoder (default) and, with `BENCH_MODEL=unet`, the real-size 2.58 B-parameter UNet (one
//! 5.16 GB fp16 file, as Kwai-Kolors/Kolors-diffusers ships it; its tensor list is
//! `benches/data/kolors_unet.json`, made by `scripts/kolors_unet_shapes.py` from the real config).
//!
//! `cargo bench -p relayfarm-models --bench sharded_load_memory`
//! `BENCH_MODEL=unet cargo bench -p relayfarm-models --bench sharded_load_memory`
//!
//! Writes a synthetic `text_encoder/` folder laid out like Kwai-Kolors/Kolors-diffusers
//! (`model.fp16-0000{1,2,3}-of-00003.safetensors` + `model.safetensors.index.fp16.json` +
//! `config.json`) with the real ChatGLM3-6B widths (hidden 4096, 32 heads × 128, 2 KV groups,
//! FFN 13696, vocabulary 65024) but only `BENCH_LAYERS` of the 28 blocks (default 7, a quarter,
//! ≈ 3.9 GB on disk instead of 12.5 GB; the embedding and `output_layer` are full size). The
//! file is written streaming, so writing it does not inflate the figures. Then, each in a
//! fresh child process, it loads the encoder in f16 on the CPU:
//! - `lean`: [`ChatGlmEncoder::load`] (shard by shard, each tensor's mapped pages released once
//!   converted; `output_layer` and `final_layernorm` skipped);
//! - `mmap_all`: every shard memory-mapped at once through `ComponentFolder::var_builder`
//!   (candle's `from_mmaped_safetensors`), then [`ChatGlmEncoder::new`].
//!
//! and prints one JSON line each: `peak_rss_bytes` (`VmHWM`, reset right before loading via
//! `/proc/self/clear_refs`), the resident set after loading (all / anonymous / file-backed),
//! the bytes of the tensors the encoder holds, the checkpoint's file bytes, and the ratio of
//! peak to held tensor bytes. The folder is deleted at the end unless `BENCH_KEEP=1`
//! (`BENCH_DIR` chooses it).

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use relayfarm_models::checkpoint::ComponentFolder;
use relayfarm_models::text_encoder::chatglm::{ChatGlmConfig, ChatGlmEncoder};
use relayfarm_models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use relayfarm_models::RunDtype;

const CHILD_ENV: &str = "RELAYFARM_SHARDED_LOAD_CHILD";
const HIDDEN: usize = 4096;
const FFN: usize = 13696;
const HEADS: usize = 32;
const KV: usize = 128;
const GROUPS: usize = 2;
const VOCAB: usize = 65024;
const REAL_LAYERS: usize = 28;

/// Every tensor of `ChatGLMModel` with `layers` blocks, with its shape.
fn tensor_list(layers: usize) -> Vec<(String, Vec<usize>)> {
    let qkv = HEADS * KV + 2 * GROUPS * KV;
    let mut t = vec![(
        "embedding.word_embeddings.weight".to_string(),
        vec![VOCAB, HIDDEN],
    )];
    for i in 0..layers {
        let p = format!("encoder.layers.{i}");
        t.push((format!("{p}.input_layernorm.weight"), vec![HIDDEN]));
        t.push((
            format!("{p}.self_attention.query_key_value.weight"),
            vec![qkv, HIDDEN],
        ));
        t.push((
            format!("{p}.self_attention.query_key_value.bias"),
            vec![qkv],
        ));
        t.push((
            format!("{p}.self_attention.dense.weight"),
            vec![HIDDEN, HEADS * KV],
        ));
        t.push((format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN]));
        t.push((
            format!("{p}.mlp.dense_h_to_4h.weight"),
            vec![2 * FFN, HIDDEN],
        ));
        t.push((format!("{p}.mlp.dense_4h_to_h.weight"), vec![HIDDEN, FFN]));
    }
    t.push(("encoder.final_layernorm.weight".to_string(), vec![HIDDEN]));
    t.push(("output_layer.weight".to_string(), vec![VOCAB, HIDDEN]));
    t.push(("rotary_pos_emb.inv_freq".to_string(), vec![KV / 4]));
    t
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Writes one fp16 safetensors shard, streaming the data in 16 MiB chunks of a fixed
/// pseudo-random pattern (small values).
fn write_shard(path: &Path, tensors: &[(String, Vec<usize>)]) -> std::io::Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let n = numel(shape) * 2;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut chunk = vec![0u8; 16 << 20];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for pair in chunk.chunks_exact_mut(2) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let v = half::f16::from_f32(((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02);
        pair.copy_from_slice(&v.to_le_bytes());
    }
    let mut w = BufWriter::new(std::fs::File::create(path)?);
    w.write_all(&(h.len() as u64).to_le_bytes())?;
    w.write_all(&h)?;
    let mut left = offset;
    while left > 0 {
        let k = left.min(chunk.len());
        w.write_all(&chunk[..k])?;
        left -= k;
    }
    w.flush()
}

/// Writes the `text_encoder/` folder: 3 shards of about equal size, the index and config.
fn write_folder(dir: &Path, layers: usize) -> std::io::Result<u64> {
    std::fs::create_dir_all(dir)?;
    let tensors = tensor_list(layers);
    let total: usize = tensors.iter().map(|(_, s)| numel(s) * 2).sum();
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new(); 3];
    let mut acc = 0usize;
    for t in tensors {
        let k = (acc * 3 / total.max(1)).min(2);
        acc += numel(&t.1) * 2;
        shards[k].push(t);
    }
    let mut weight_map = serde_json::Map::new();
    for (i, s) in shards.iter().enumerate() {
        let name = format!("model.fp16-{:05}-of-00003.safetensors", i + 1);
        write_shard(&dir.join(&name), s)?;
        for (t, _) in s {
            weight_map.insert(t.clone(), name.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.fp16.json"),
        index.to_string(),
    )?;
    let config = serde_json::json!({
        "architectures": ["ChatGLMModel"], "model_type": "chatglm",
        "num_layers": layers, "padded_vocab_size": VOCAB, "hidden_size": HIDDEN,
        "ffn_hidden_size": FFN, "kv_channels": KV, "num_attention_heads": HEADS,
        "multi_query_attention": true, "multi_query_group_num": GROUPS,
        "add_qkv_bias": true, "add_bias_linear": false, "rmsnorm": true,
        "post_layer_norm": true, "original_rope": true, "seq_length": 32768,
        "layernorm_epsilon": 1e-5, "torch_dtype": "float16",
    });
    std::fs::write(dir.join("config.json"), config.to_string())?;
    let mut bytes = 0u64;
    for e in std::fs::read_dir(dir)?.flatten() {
        bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
    }
    Ok(bytes)
}

/// The real Kolors UNet: its config and `(name, shape)` of every weight.
fn kolors_unet() -> (serde_json::Value, Vec<(String, Vec<usize>)>) {
    let text = include_str!("data/kolors_unet.json");
    let v: serde_json::Value = serde_json::from_str(text).expect("kolors_unet.json");
    let tensors = v["tensors"]
        .as_array()
        .expect("tensors")
        .iter()
        .map(|t| {
            let name = t[0].as_str().expect("name").to_string();
            let shape = t[1]
                .as_array()
                .expect("shape")
                .iter()
                .map(|d| d.as_u64().expect("dim") as usize)
                .collect();
            (name, shape)
        })
        .collect();
    (v["config"].clone(), tensors)
}

/// Writes the `unet/` folder: `config.json` and one fp16 file, as the real repository has.
fn write_unet_folder(dir: &Path) -> std::io::Result<u64> {
    std::fs::create_dir_all(dir)?;
    let (config, tensors) = kolors_unet();
    let file = dir.join("diffusion_pytorch_model.fp16.safetensors");
    write_shard(&file, &tensors)?;
    std::fs::write(dir.join("config.json"), config.to_string())?;
    Ok(std::fs::metadata(&file)?.len())
}

/// `(VmRSS, RssAnon, RssFile, VmHWM)` in bytes.
fn status() -> [u64; 4] {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let get = |key: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
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

/// In a child process: loads the UNet one way and prints its JSON line.
fn child_unet(mode: &str, dir: &str) {
    let comp = ComponentFolder::open(dir, "unet", "UNet2DConditionModel".into())
        .unwrap_or_else(|e| panic!("{e}"));
    let (_, tensors) = kolors_unet();
    let held: u64 = tensors.iter().map(|(_, s)| numel(s) as u64 * 2).sum();
    let file_bytes =
        std::fs::metadata(Path::new(dir).join("diffusion_pytorch_model.fp16.safetensors"))
            .map(|m| m.len())
            .unwrap_or(0);
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let before = status();
    let t0 = Instant::now();
    let unet = match mode {
        "lean" => UNet2DConditionModel::load(&comp, RunDtype::F16, &Device::Cpu, Some("fp16")),
        _ => comp.config::<UNet2DConditionConfig>().and_then(|cfg| {
            let vb = comp.var_builder(RunDtype::F16, &Device::Cpu, Some("fp16"))?;
            UNet2DConditionModel::new(&cfg, vb)
        }),
    }
    .unwrap_or_else(|e| panic!("{e}"));
    let load_s = t0.elapsed().as_secs_f64();
    let after = status();
    let gib = |b: u64| (b as f64 / (1u64 << 30) as f64 * 1000.0).round() / 1000.0;
    println!(
        "{}",
        serde_json::json!({
            "bench": "sharded_load_memory",
            "model": "kolors-unet",
            "mode": mode,
            "parameters": held / 2,
            "dtype": "f16",
            "file_bytes": file_bytes,
            "held_tensor_bytes": held,
            "rss_before_bytes": before[0],
            "peak_rss_bytes": after[3],
            "peak_reset": reset,
            "rss_after_bytes": after[0],
            "peak_gib": gib(after[3]),
            "file_gib": gib(file_bytes),
            "held_gib": gib(held),
            "peak_over_held": ((after[3].saturating_sub(before[0])) as f64 / held as f64 * 1000.0).round() / 1000.0,
            "load_seconds": (load_s * 1000.0).round() / 1000.0,
        })
    );
    drop(unet);
}

/// In a child process: loads the encoder one way and prints its JSON line.
fn child(spec: &str) {
    let Some((mode, dir)) = spec.split_once(',') else {
        eprintln!("bad {CHILD_ENV}={spec}");
        std::process::exit(2);
    };
    if let Some(dir) = dir.strip_prefix("unet:") {
        child_unet(mode, dir);
        return;
    }
    let comp = ComponentFolder::open(dir, "text_encoder", "ChatGLMModel".into())
        .unwrap_or_else(|e| panic!("{e}"));
    let file_bytes: u64 = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
                .sum()
        })
        .unwrap_or(0);
    // Reset the peak resident set so that it covers the load only.
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let before = status();
    let t0 = Instant::now();
    let enc = match mode {
        "lean" => ChatGlmEncoder::load(&comp, RunDtype::F16, &Device::Cpu, Some("fp16")),
        _ => comp.config::<ChatGlmConfig>().and_then(|cfg| {
            let vb = comp.var_builder(RunDtype::F16, &Device::Cpu, Some("fp16"))?;
            ChatGlmEncoder::new(&cfg, vb)
        }),
    }
    .unwrap_or_else(|e| panic!("{e}"));
    let load_s = t0.elapsed().as_secs_f64();
    let after = status();
    let cfg = enc.config();
    let per_layer = (HEADS * KV + 2 * GROUPS * KV) * (HIDDEN + 1)
        + HIDDEN * HEADS * KV
        + 2 * FFN * HIDDEN
        + FFN * HIDDEN
        + 2 * HIDDEN;
    let held = ((VOCAB * HIDDEN + cfg.num_layers * per_layer) * 2) as u64;
    let gib = |b: u64| (b as f64 / (1u64 << 30) as f64 * 1000.0).round() / 1000.0;
    println!(
        "{}",
        serde_json::json!({
            "bench": "sharded_load_memory",
            "mode": mode,
            "layers": cfg.num_layers,
            "of_real_layers": REAL_LAYERS,
            "dtype": "f16",
            "file_bytes": file_bytes,
            "held_tensor_bytes": held,
            "rss_before_bytes": before[0],
            "peak_rss_bytes": after[3],
            "peak_reset": reset,
            "rss_after_bytes": after[0],
            "rss_anon_after_bytes": after[1],
            "rss_file_after_bytes": after[2],
            "peak_gib": gib(after[3]),
            "file_gib": gib(file_bytes),
            "held_gib": gib(held),
            "peak_over_held": ((after[3].saturating_sub(before[0])) as f64 / held as f64 * 1000.0).round() / 1000.0,
            "load_seconds": (load_s * 1000.0).round() / 1000.0,
        })
    );
    drop(enc);
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child(&spec);
        return;
    }
    let unet = std::env::var("BENCH_MODEL").as_deref() == Ok("unet");
    let layers: usize = std::env::var("BENCH_LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(REAL_LAYERS / 4);
    let dir = std::env::var("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            if unet {
                std::env::temp_dir().join("relayfarm-kolors-unet/unet")
            } else {
                std::env::temp_dir().join(format!("relayfarm-chatglm-{layers}l/text_encoder"))
            }
        });
    let t0 = Instant::now();
    if unet {
        let bytes = write_unet_folder(&dir).expect("write the bench checkpoint");
        eprintln!(
            "wrote {} (the real-size Kolors UNet, {:.2} GB) in {:.1} s",
            dir.display(),
            bytes as f64 / 1e9,
            t0.elapsed().as_secs_f64()
        );
    } else {
        let bytes = write_folder(&dir, layers).expect("write the bench checkpoint");
        eprintln!(
            "wrote {} ({layers} of {REAL_LAYERS} ChatGLM3 blocks, {:.2} GB) in {:.1} s",
            dir.display(),
            bytes as f64 / 1e9,
            t0.elapsed().as_secs_f64()
        );
    }
    let target = if unet {
        format!("unet:{}", dir.display())
    } else {
        dir.display().to_string()
    };
    let exe = std::env::current_exe().expect("current exe");
    let mut ok = true;
    for mode in ["lean", "mmap_all"] {
        let out = std::process::Command::new(&exe)
            .env(CHILD_ENV, format!("{mode},{target}"))
            .output()
            .expect("run the child");
        if out.status.success() {
            print!("{}", String::from_utf8_lossy(&out.stdout));
        } else {
            ok = false;
            eprintln!("{mode} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    if std::env::var("BENCH_KEEP").as_deref() != Ok("1") {
        let root = dir.parent().unwrap_or(&dir);
        let _ = std::fs::remove_dir_all(if std::env::var("BENCH_DIR").is_ok() {
            &dir
        } else {
            root
        });
    }
    if !ok {
        std::process::exit(1);
    }
}
