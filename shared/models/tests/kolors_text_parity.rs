//! Parity of the ChatGLM3 tokenizer and text encoder of Kolors with diffusers 0.42.1 /
//! transformers 5.24 on the tiny Kolors fixture (`scripts/make_fixtures_kolors.py`).

use candle_core::{DType, Device, Tensor};
use relayfarm_models::checkpoint::PipelineFolder;
use relayfarm_models::text_encoder::chatglm::ChatGlmEncoder;
use relayfarm_models::tokenizer::chatglm::{ChatGlmTokenizer, KOLORS_MAX_LENGTH};
use relayfarm_models::RunDtype;
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).join(rel)
}

fn tokenizer() -> ChatGlmTokenizer {
    ChatGlmTokenizer::from_folder(&fixture("kolors-tiny/tokenizer")).expect("load tokenizer")
}

#[derive(serde::Deserialize)]
struct Corpus {
    max_length: usize,
    vocab_size: usize,
    special: std::collections::HashMap<String, u32>,
    cases: Vec<Case>,
    config_variants: Vec<ConfigVariant>,
    fuzz: Vec<FuzzCase>,
}

/// A random string and its unpadded ids (`[gMASK] sop` included).
#[derive(serde::Deserialize)]
struct FuzzCase {
    text: String,
    input_ids: Vec<u32>,
}

/// A `tokenizer_config.json` variant and the ids transformers gives a probe text with it.
#[derive(serde::Deserialize)]
struct ConfigVariant {
    config: serde_json::Value,
    text: String,
    input_ids: Vec<u32>,
}

#[derive(serde::Deserialize)]
struct Case {
    text: String,
    input_ids: Vec<u32>,
    attention_mask: Vec<u32>,
    position_ids: Vec<u32>,
    untruncated_len: usize,
}

#[test]
fn tokenizer_matches_diffusers() {
    let tok = tokenizer();
    let text =
        std::fs::read_to_string(fixture("expected/kolors/tokenizer_corpus.json")).expect("corpus");
    let corpus: Corpus = serde_json::from_str(&text).expect("corpus json");
    assert_eq!(corpus.max_length, KOLORS_MAX_LENGTH);
    assert_eq!(tok.vocab_size(), corpus.vocab_size);
    for (name, id) in &corpus.special {
        assert_eq!(tok.special_id(name), Some(*id), "special {name}");
    }
    let mut failures = Vec::new();
    for case in &corpus.cases {
        let enc = tok
            .encode_padded(&case.text, corpus.max_length)
            .expect("encode");
        let untruncated = tok.encode(&case.text).len() + 2;
        if enc.input_ids != case.input_ids
            || enc.attention_mask != case.attention_mask
            || enc.position_ids != case.position_ids
            || untruncated != case.untruncated_len
        {
            let n = case.attention_mask.iter().filter(|&&m| m == 1).count();
            let m = enc.attention_mask.iter().filter(|&&m| m == 1).count();
            failures.push(format!(
                "{:?}\n  expected {:?} (untruncated {})\n  got      {:?} (untruncated {})",
                case.text,
                &case.input_ids[case.input_ids.len() - n..],
                case.untruncated_len,
                &enc.input_ids[enc.input_ids.len() - m..],
                untruncated
            ));
        }
    }
    println!(
        "tokenizer: {}/{} cases equal",
        corpus.cases.len() - failures.len(),
        corpus.cases.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    let mut fuzz_failures = Vec::new();
    for f in &corpus.fuzz {
        let mut ids = vec![tok.gmask_id(), tok.sop_id()];
        ids.extend(tok.encode(&f.text));
        if ids != f.input_ids {
            fuzz_failures.push(format!(
                "{:?}\n  expected {:?}\n  got      {:?}",
                f.text, f.input_ids, ids
            ));
        }
    }
    println!(
        "tokenizer: {}/{} random strings equal",
        corpus.fuzz.len() - fuzz_failures.len(),
        corpus.fuzz.len()
    );
    assert!(fuzz_failures.is_empty(), "{}", fuzz_failures.join("\n"));

    // Added tokens derived from each tokenizer_config.json variant.
    let model = fixture("kolors-tiny/tokenizer/tokenizer.model");
    for (i, v) in corpus.config_variants.iter().enumerate() {
        let dir = std::env::temp_dir().join(format!("kolors_tok_cfg_{}_{i}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(&model, dir.join("tokenizer.model")).unwrap();
        std::fs::write(dir.join("tokenizer_config.json"), v.config.to_string()).unwrap();
        let tok = ChatGlmTokenizer::from_folder(&dir).expect("load variant");
        std::fs::remove_dir_all(&dir).ok();
        let mut ids = vec![tok.gmask_id(), tok.sop_id()];
        ids.extend(tok.encode(&v.text));
        assert_eq!(ids, v.input_ids, "config variant {}", v.config);
    }
    println!(
        "tokenizer: {} config variants equal",
        corpus.config_variants.len()
    );
}

fn load_expected() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixture("expected/kolors/text_encoder.safetensors"),
        &Device::Cpu,
    )
    .expect("expected tensors")
}

fn row(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

/// max |a − b| / std(b).
fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let got = got.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let want = want.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    assert_eq!(got.dims(), want.dims());
    let max = (&got - &want)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let v: Vec<f32> = want.to_vec1().unwrap();
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    max / std
}

fn encoder(dtype: RunDtype) -> ChatGlmEncoder {
    let folder = PipelineFolder::open(fixture("kolors-tiny")).expect("pipeline folder");
    let component = folder
        .component("text_encoder", &["ChatGLMModel"])
        .expect("text_encoder component");
    ChatGlmEncoder::load(&component, dtype, &Device::Cpu, Some("fp16")).expect("load encoder")
}

#[test]
fn text_encoder_matches_diffusers() {
    let tok = tokenizer();
    let enc = encoder(RunDtype::F32);
    let expected = load_expected();
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("expected/kolors/text_encoder.json")).unwrap(),
    )
    .unwrap();
    let prompts = meta["prompts"].as_array().unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let e = tok
            .encode_padded(p.as_str().unwrap(), KOLORS_MAX_LENGTH)
            .unwrap();
        assert_eq!(e.input_ids, row(&expected[&format!("input_ids_{i}")]));
        assert_eq!(
            e.attention_mask,
            row(&expected[&format!("attention_mask_{i}")])
        );
        assert_eq!(e.position_ids, row(&expected[&format!("position_ids_{i}")]));
        let out = enc
            .forward(&[e.input_ids], &[e.attention_mask], &[e.position_ids])
            .unwrap();
        let pe = rel_err(&out.prompt_embeds, &expected[&format!("prompt_embeds_{i}")]);
        let po = rel_err(&out.pooled, &expected[&format!("pooled_{i}")]);
        println!("prompt {i}: prompt_embeds max|err|/std = {pe:.3e}, pooled = {po:.3e}");
        assert!(pe <= 1e-4 && po <= 1e-4, "prompt {i}: {pe:e} {po:e}");
    }
}

#[test]
fn text_encoder_batch_equals_single_and_f16_is_close() {
    let tok = tokenizer();
    let enc = encoder(RunDtype::F32);
    let enc16 = encoder(RunDtype::F16);
    let expected = load_expected();
    let texts = ["a small red cabin in the snowy woods", "", "中文 English"];
    let encs: Vec<_> = texts
        .iter()
        .map(|t| tok.encode_padded(t, KOLORS_MAX_LENGTH).unwrap())
        .collect();
    let ids: Vec<Vec<u32>> = encs.iter().map(|e| e.input_ids.clone()).collect();
    let mask: Vec<Vec<u32>> = encs.iter().map(|e| e.attention_mask.clone()).collect();
    let pos: Vec<Vec<u32>> = encs.iter().map(|e| e.position_ids.clone()).collect();
    let batch = enc.forward(&ids, &mask, &pos).unwrap();
    for i in 0..texts.len() {
        let one = enc.forward(&ids[i..=i], &mask[i..=i], &pos[i..=i]).unwrap();
        let e = rel_err(
            &batch.prompt_embeds.narrow(0, i, 1).unwrap(),
            &one.prompt_embeds,
        );
        assert!(e < 1e-5, "batch row {i}: {e:e}");
    }
    let e = &encs[0];
    let out16 = enc16
        .forward(
            std::slice::from_ref(&e.input_ids),
            std::slice::from_ref(&e.attention_mask),
            std::slice::from_ref(&e.position_ids),
        )
        .unwrap();
    let pe = rel_err(&out16.prompt_embeds, &expected["prompt_embeds_0"]);
    let po = rel_err(&out16.pooled, &expected["pooled_0"]);
    println!("f16 run: prompt_embeds max|err|/std = {pe:.3e}, pooled = {po:.3e}");
    assert!(pe < 2e-2 && po < 2e-2);
}
