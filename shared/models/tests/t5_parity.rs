//! Parity of the T5 tokenizer and T5 encoder with transformers 5.24 on the tiny PixArt-Σ
//! fixture (`scripts/make_fixtures.py`).

use candle_core::{DType, Device, Tensor};
use relayfarm_models::checkpoint::ComponentFolder;
use relayfarm_models::text_encoder::T5Encoder;
use relayfarm_models::tokenizer::T5Tokenizer;
use relayfarm_models::RunDtype;
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).join(rel)
}

fn tokenizer() -> T5Tokenizer {
    T5Tokenizer::from_folder(&fixture("pixart-sigma-tiny/tokenizer")).expect("load tokenizer")
}

#[derive(serde::Deserialize)]
struct Corpus {
    cases: Vec<Case>,
    padded: Vec<PaddedCase>,
    max_length: usize,
}

#[derive(serde::Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
}

#[derive(serde::Deserialize)]
struct PaddedCase {
    text: String,
    ids: Vec<u32>,
    mask: Vec<u32>,
    untruncated_len: usize,
}

fn corpus() -> Corpus {
    let text = std::fs::read_to_string(fixture("expected/tokenizer_corpus.json")).expect("corpus");
    serde_json::from_str(&text).expect("corpus json")
}

#[test]
fn tokenizer_matches_transformers() {
    let tok = tokenizer();
    let corpus = corpus();
    let mut failures = Vec::new();
    for case in &corpus.cases {
        let ids = tok.encode(&case.text).expect("encode");
        if ids != case.ids {
            failures.push(format!(
                "{:?}\n  expected {:?}\n  got      {:?}",
                case.text, case.ids, ids
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        corpus.cases.len(),
        failures.join("\n")
    );
}

#[test]
fn padded_encoding_matches_transformers() {
    let tok = tokenizer();
    let corpus = corpus();
    for case in &corpus.padded {
        let enc = tok
            .encode_padded(&case.text, corpus.max_length)
            .expect("encode");
        assert_eq!(enc.ids, case.ids, "ids of {:?}", case.text);
        assert_eq!(enc.mask, case.mask, "mask of {:?}", case.text);
        assert_eq!(
            enc.num_truncated,
            case.untruncated_len.saturating_sub(corpus.max_length),
            "num_truncated of {:?}",
            case.text
        );
        let dropped = tok
            .truncated_text(&case.text, corpus.max_length)
            .expect("decode");
        assert_eq!(dropped.is_some(), enc.num_truncated > 0);
        if enc.num_truncated > 0 {
            // transformers: batch_decode(untruncated_ids[:, max_length - 1 : -1])
            assert_eq!(dropped.as_deref(), Some("mother event decision 4K photo."));
        }
    }
}

#[test]
fn tokenizer_json_gives_the_same_ids() {
    // A folder with tokenizer.json (here: the spiece-built tokenizer serialised by `tokenizers`,
    // the format transformers 5 writes) must tokenize like the spiece.model folder.
    let tok = tokenizer();
    let tmp = std::env::temp_dir().join(format!("relayfarm-t5-json-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("tmp dir");
    let json = tok.inner().to_string(false).expect("serialise");
    std::fs::write(tmp.join("tokenizer.json"), json).expect("write");
    std::fs::copy(
        fixture("pixart-sigma-tiny/tokenizer/tokenizer_config.json"),
        tmp.join("tokenizer_config.json"),
    )
    .expect("copy config");
    let from_json = T5Tokenizer::from_folder(&tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    let from_json = from_json.expect("load tokenizer.json");
    assert_eq!(from_json.vocab_size(), tok.vocab_size());
    for case in &corpus().cases {
        assert_eq!(
            from_json.encode(&case.text).expect("encode"),
            case.ids,
            "{:?}",
            case.text
        );
    }
}

#[test]
fn tokenizer_specials_and_sentinels() {
    let tok = tokenizer();
    assert_eq!(tok.eos_id(), 1);
    assert_eq!(tok.pad_id(), 0);
    let pieces = tok.vocab_size() - 100;
    let inner = tok.inner();
    assert_eq!(inner.token_to_id("<extra_id_99>"), Some(pieces as u32));
    assert_eq!(inner.token_to_id("<extra_id_0>"), Some(pieces as u32 + 99));
    // Special tokens in the text are kept whole.
    // (expected ids and texts from transformers 5.24 on the same folder)
    let ids = tok.encode("a <extra_id_0> b</s>").expect("encode");
    assert_eq!(ids, [368, 699, 9, 1, 1]);
    let text = tok
        .decode(&tok.encode("a small red cabin").expect("encode"))
        .expect("decode");
    assert_eq!(text, "a small red cabin</s>");
    let text = tok
        .decode(&tok.encode("café naïve, ＡＢＣ  x").expect("encode"))
        .expect("decode");
    assert_eq!(text, "café naïve, ABC x</s>");
}

#[test]
fn missing_spiece_is_a_clear_error() {
    let dir = fixture("pixart-sigma-tiny/scheduler");
    let err = T5Tokenizer::from_folder(&dir).expect_err("no spiece.model there");
    assert!(err.to_string().contains("spiece.model"), "{err}");

    let tmp = std::env::temp_dir().join(format!("relayfarm-t5-corrupt-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("tmp dir");
    let spiece =
        std::fs::read(fixture("pixart-sigma-tiny/tokenizer/spiece.model")).expect("spiece");
    std::fs::write(tmp.join("spiece.model"), &spiece[..spiece.len() / 3]).expect("write");
    let err = T5Tokenizer::from_folder(&tmp).expect_err("truncated spiece.model");
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(err.to_string().contains("spiece.model"), "{err}");
}

/// Loads `expected/t5.safetensors` (f32 `hidden_states`, i64 `input_ids` / `attention_mask`).
fn expected_t5(device: &Device) -> (Tensor, Tensor, Tensor) {
    let path = fixture("expected/t5.safetensors");
    let tensors = candle_core::safetensors::load(&path, device).expect("t5.safetensors");
    let get = |name: &str| {
        tensors
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing"))
            .clone()
    };
    (
        get("input_ids"),
        get("attention_mask"),
        get("hidden_states"),
    )
}

fn encoder(dtype: RunDtype, device: &Device) -> T5Encoder {
    let component = ComponentFolder::open(
        fixture("pixart-sigma-tiny/text_encoder"),
        "text_encoder",
        "T5EncoderModel".into(),
    )
    .expect("component");
    T5Encoder::load(&component, dtype, device).expect("load T5")
}

/// (max |a − b|, std(b)).
fn error_figures(got: &Tensor, expected: &Tensor) -> (f32, f32) {
    let got = got
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let exp = expected.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(got.len(), exp.len());
    let max_abs = got
        .iter()
        .zip(&exp)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let mean = exp.iter().sum::<f32>() / exp.len() as f32;
    let var = exp.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / exp.len() as f32;
    (max_abs, var.sqrt())
}

#[test]
fn t5_encoder_matches_transformers() {
    let device = Device::Cpu;
    let (ids, mask, expected) = expected_t5(&device);
    // The tokenizer produces the same ids and mask as the fixture.
    let tok = tokenizer();
    let ids_vec = ids.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap();
    let mask_vec = mask.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap();
    for (row, text) in ["a small red cabin in the snowy woods", ""]
        .iter()
        .enumerate()
    {
        let enc = tok.encode_padded(text, ids_vec[row].len()).expect("encode");
        assert_eq!(enc.ids, ids_vec[row]);
        assert_eq!(enc.mask, mask_vec[row]);
    }

    let model = encoder(RunDtype::F32, &device);
    let hidden = model.forward(&ids, Some(&mask)).expect("forward");
    assert_eq!(hidden.dims(), expected.dims());
    let (max_abs, std) = error_figures(&hidden, &expected);
    let rel = max_abs / std;
    println!("T5 f32: max_abs {max_abs:.3e}, std {std:.3e}, max_abs/std {rel:.3e}");
    assert!(rel <= 1e-4, "max_abs/std {rel:.3e} > 1e-4");
}

#[test]
fn t5_encoder_half_precision_runs() {
    let device = Device::Cpu;
    let (ids, mask, expected) = expected_t5(&device);
    for dtype in [RunDtype::Bf16, RunDtype::F16] {
        let model = encoder(dtype, &device);
        let hidden = model.forward(&ids, Some(&mask)).expect("forward");
        assert_eq!(hidden.dtype(), dtype.dtype());
        let (max_abs, std) = error_figures(&hidden, &expected);
        let rel = max_abs / std;
        println!("T5 {dtype}: max_abs/std {rel:.3e}");
        assert!(rel < 0.1, "{dtype}: max_abs/std {rel:.3e}");
    }
}
