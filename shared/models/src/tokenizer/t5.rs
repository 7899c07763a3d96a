//! The T5 tokenizer (`T5Tokenizer` of transformers 5.x), built from `spiece.model` or
//! `tokenizer.json`.
//!
//! transformers 5 builds a T5 tokenizer the same way whichever file a checkpoint ships
//! (`tokenization_t5.py`, `convert_slow_tokenizer.py::T5Converter`,
//! `tokenization_utils_tokenizers.py::convert_to_native_format`):
//! - model: Unigram over the SentencePiece pieces and scores, followed by the sentinels
//!   `<extra_id_99>` … `<extra_id_0>` (so `<extra_id_N>` has id `pieces + 99 − N`), no byte
//!   fallback;
//! - normalizer: only the model's precompiled character map (`Precompiled`);
//! - pre-tokenizer: `WhitespaceSplit` then `Metaspace("▁", prepend always, split)`, so runs
//!   of whitespace collapse and every word gets its `▁` prefix;
//! - special tokens (matched in the raw text, never split): the model's control pieces
//!   (`<pad>`, `</s>`), `<unk>` and the sentinels; user-defined pieces are matched the same
//!   way but are not special;
//! - post-processor: `$A </s>`;
//! - truncation keeps `</s>` last; padding is on the right with `<pad>` (id 0).
//!
//! With `tokenizer.json` transformers takes only the Unigram vocabulary and the precompiled
//! character map from the file and rebuilds the rest as above; so does this module.

use super::sentencepiece_model::{ModelProto, PieceType, MODEL_TYPE_UNIGRAM};
use crate::{ModelError, Result};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::{NormalizerWrapper, Precompiled};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, Tokenizer};

/// The number of sentinel tokens (`<extra_id_N>`) T5 appends to its vocabulary by default.
pub const T5_EXTRA_IDS: usize = 100;

const EOS: &str = "</s>";
const PAD: &str = "<pad>";
const UNK: &str = "<unk>";
const METASPACE: char = '▁';

/// Token ids of one prompt padded (or truncated) to a fixed length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedText {
    /// `max_len` ids: the tokens, `</s>`, then `<pad>` (id 0).
    pub ids: Vec<u32>,
    /// `max_len` entries: 1 for real tokens (including `</s>`), 0 for padding.
    pub mask: Vec<u32>,
    /// How many tokens truncation dropped (the untruncated length minus `max_len`, or 0).
    pub num_truncated: usize,
}

/// The T5 tokenizer.
#[derive(Debug, Clone)]
pub struct T5Tokenizer {
    inner: Tokenizer,
    eos_id: u32,
    pad_id: u32,
    clean_up_tokenization_spaces: bool,
}

/// A token of `added_tokens_decoder` in `tokenizer_config.json` or `added_tokens` in
/// `tokenizer.json`.
#[derive(Debug, Clone, serde::Deserialize)]
struct AddedTokenSpec {
    content: String,
    #[serde(default)]
    single_word: bool,
    #[serde(default)]
    lstrip: bool,
    #[serde(default)]
    rstrip: bool,
    #[serde(default)]
    normalized: Option<bool>,
    #[serde(default)]
    special: bool,
}

impl AddedTokenSpec {
    fn to_added_token(&self) -> AddedToken {
        AddedToken::from(self.content.clone(), self.special)
            .single_word(self.single_word)
            .lstrip(self.lstrip)
            .rstrip(self.rstrip)
            .normalized(self.normalized.unwrap_or(!self.special))
    }
}

/// The fields of `tokenizer_config.json` that change how a T5 tokenizer is built.
#[derive(Debug, Clone, Default, serde::Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    extra_ids: Option<usize>,
    #[serde(default)]
    added_tokens_decoder: HashMap<String, AddedTokenSpec>,
    #[serde(default)]
    clean_up_tokenization_spaces: bool,
}

/// The Unigram vocabulary and normalizer extracted from `spiece.model` or `tokenizer.json`.
struct Parts {
    vocab: Vec<(String, f64)>,
    unk_id: usize,
    precompiled: Option<Precompiled>,
    /// Tokens to match whole in the raw text, in addition to the T5 specials.
    added: Vec<AddedToken>,
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(format!("{}: {e}", path.display()))
}

impl T5Tokenizer {
    /// Loads the tokenizer of a `tokenizer/` folder: `tokenizer.json` when present, otherwise
    /// `spiece.model` (what the PixArt-Σ, CogView3 and CogVideoX repositories ship).
    /// `tokenizer_config.json`, when present, supplies `extra_ids` and the flags of the
    /// added tokens.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config: TokenizerConfig = if config_path.is_file() {
            crate::checkpoint::read_json(&config_path)?
        } else {
            TokenizerConfig::default()
        };
        let json_path = dir.join("tokenizer.json");
        let spiece_path = dir.join("spiece.model");
        let (parts, source) = if json_path.is_file() {
            (parts_from_tokenizer_json(&json_path)?, json_path)
        } else if spiece_path.is_file() {
            (parts_from_spiece(&spiece_path)?, spiece_path)
        } else {
            return Err(ModelError::MissingFile {
                path: spiece_path,
                hint: format!(
                    "the T5 tokenizer folder {} has neither spiece.model nor tokenizer.json; download the whole repository",
                    dir.display()
                ),
            });
        };
        Self::build(parts, &config, &source)
    }

    /// Builds the tokenizer from a SentencePiece model file alone (100 sentinels).
    pub fn from_spiece(path: &Path) -> Result<Self> {
        Self::build(parts_from_spiece(path)?, &TokenizerConfig::default(), path)
    }

    fn build(mut parts: Parts, config: &TokenizerConfig, source: &Path) -> Result<Self> {
        // Sentinels, as `T5Converter.convert_from_spm` appends them (skipped when the vocabulary,
        // e.g. one read from tokenizer.json, already has them).
        let extra_ids = config.extra_ids.unwrap_or(T5_EXTRA_IDS);
        let has_sentinels = parts.vocab.iter().any(|(p, _)| p.starts_with("<extra_id_"));
        if !has_sentinels {
            for i in (0..extra_ids).rev() {
                parts.vocab.push((format!("<extra_id_{i}>"), 0.0));
            }
        }
        let sentinels: Vec<String> = parts
            .vocab
            .iter()
            .filter(|(p, _)| p.starts_with("<extra_id_") && p.ends_with('>'))
            .map(|(p, _)| p.clone())
            .collect();
        let vocab_index: HashMap<String, u32> = parts
            .vocab
            .iter()
            .enumerate()
            .map(|(i, (p, _))| (p.clone(), i as u32))
            .collect();
        let lookup = |token: &str| -> Result<u32> {
            vocab_index.get(token).copied().ok_or_else(|| {
                ModelError::corrupt(
                    source,
                    format!("the vocabulary has no `{token}` piece; this is not a T5 tokenizer"),
                )
            })
        };
        let eos_id = lookup(EOS)?;
        let pad_id = lookup(PAD)?;

        let model = Unigram::from(parts.vocab, Some(parts.unk_id), false)
            .map_err(|e| tok_err(source, e))?;
        let mut inner = Tokenizer::new(model);
        if let Some(precompiled) = parts.precompiled {
            inner
                .with_normalizer(Some(NormalizerWrapper::Precompiled(precompiled)))
                .map_err(|e| tok_err(source, e))?;
        }
        inner.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(
            PreTokenizerSequence::new(vec![
                PreTokenizerWrapper::WhitespaceSplit(WhitespaceSplit),
                PreTokenizerWrapper::Metaspace(Metaspace::new(
                    METASPACE,
                    PrependScheme::Always,
                    true,
                )),
            ]),
        )));
        inner.with_decoder(Some(DecoderWrapper::Metaspace(Metaspace::new(
            METASPACE,
            PrependScheme::Always,
            true,
        ))));
        let template = TemplateProcessing::builder()
            .try_single(format!("$A {EOS}"))
            .map_err(|e| tok_err(source, e))?
            .try_pair(format!("$A {EOS} $B {EOS}"))
            .map_err(|e| tok_err(source, e))?
            .special_tokens(vec![(EOS, eos_id)])
            .build()
            .map_err(|e| tok_err(source, e))?;
        inner.with_post_processor(Some(PostProcessorWrapper::Template(template)));

        // Added tokens: those of the source (control and user-defined pieces), the configured
        // ones, then T5's named specials and sentinels. All already have a vocabulary id.
        let mut added: Vec<AddedToken> = parts.added;
        let mut configured: Vec<(u32, &AddedTokenSpec)> = Vec::new();
        for (id, spec) in &config.added_tokens_decoder {
            if let Ok(id) = id.parse::<u32>() {
                configured.push((id, spec));
            }
        }
        configured.sort_by_key(|(id, _)| *id);
        for (id, spec) in configured {
            match vocab_index.get(&spec.content) {
                Some(&vid) if vid == id => added.push(spec.to_added_token()),
                _ => tracing::warn!(
                    token = spec.content.as_str(),
                    id,
                    "tokenizer_config.json declares an added token that is not in the T5 vocabulary at that id; ignored"
                ),
            }
        }
        for special in [PAD, EOS, UNK]
            .iter()
            .map(|s| s.to_string())
            .chain(sentinels)
        {
            if vocab_index.contains_key(&special) && !added.iter().any(|t| t.content == special) {
                added.push(AddedToken::from(special, true));
            }
        }
        let (special, normal): (Vec<AddedToken>, Vec<AddedToken>) =
            added.into_iter().partition(|t| t.special);
        inner
            .add_special_tokens(special)
            .map_err(|e| tok_err(source, e))?;
        inner.add_tokens(normal).map_err(|e| tok_err(source, e))?;

        Ok(T5Tokenizer {
            inner,
            eos_id,
            pad_id,
            clean_up_tokenization_spaces: config.clean_up_tokenization_spaces,
        })
    }

    /// The id of `</s>`.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The id of `<pad>`.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The vocabulary size, sentinels included (32100 for the T5 checkpoints).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Token ids of `text`, `</s>` last, without padding or truncation.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer(format!("cannot encode text: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of `text` padded to `max_len` with `<pad>`, or truncated to `max_len` keeping
    /// `</s>` last (transformers' `padding="max_length", truncation=True`).
    pub fn encode_padded(&self, text: &str, max_len: usize) -> Result<EncodedText> {
        if max_len == 0 {
            return Err(ModelError::invalid(
                "max_sequence_length",
                "must be at least 1 (room for </s>)",
            ));
        }
        let full = self.encode(text)?;
        let num_truncated = full.len().saturating_sub(max_len);
        let mut ids: Vec<u32> = if num_truncated > 0 {
            let mut ids = full[..max_len - 1].to_vec();
            ids.push(self.eos_id);
            ids
        } else {
            full
        };
        let real = ids.len();
        ids.resize(max_len, self.pad_id);
        let mut mask = vec![1u32; real];
        mask.resize(max_len, 0);
        Ok(EncodedText {
            ids,
            mask,
            num_truncated,
        })
    }

    /// The text that [`T5Tokenizer::encode_padded`] drops for `max_len`, decoded like diffusers'
    /// truncation warning (`untruncated_ids[max_len - 1 : -1]`); `None` when nothing is dropped.
    pub fn truncated_text(&self, text: &str, max_len: usize) -> Result<Option<String>> {
        let full = self.encode(text)?;
        if max_len == 0 || full.len() <= max_len {
            return Ok(None);
        }
        self.decode(&full[max_len - 1..full.len() - 1]).map(Some)
    }

    /// Text of `ids` (special tokens kept, `▁` turned back into spaces), with transformers'
    /// `clean_up_tokenization` when `tokenizer_config.json` asks for it.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let text = self
            .inner
            .decode(ids, false)
            .map_err(|e| ModelError::Tokenizer(format!("cannot decode ids: {e}")))?;
        Ok(if self.clean_up_tokenization_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }
}

/// transformers' `clean_up_tokenization`: drops the space before punctuation and English
/// contractions.
fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

/// Reads the Unigram vocabulary, unknown id and character map of `spiece.model`.
fn parts_from_spiece(path: &Path) -> Result<Parts> {
    let proto = ModelProto::read(path)?;
    let trainer = proto.trainer();
    if trainer.model_type() != MODEL_TYPE_UNIGRAM {
        return Err(ModelError::UnsupportedConfig {
            component: "tokenizer".into(),
            field: "spiece.model trainer_spec.model_type".into(),
            value: trainer.model_type().to_string(),
            hint: "T5 tokenizers are SentencePiece unigram models (model_type 1); this file is not one".into(),
        });
    }
    let mut vocab = Vec::with_capacity(proto.pieces.len() + T5_EXTRA_IDS);
    let mut added = Vec::new();
    for (i, p) in proto.pieces.iter().enumerate() {
        let piece = p.piece().to_string();
        if piece.is_empty() {
            return Err(ModelError::corrupt(
                path,
                format!("piece {i} is empty; download the file again"),
            ));
        }
        match p.piece_type() {
            PieceType::Control => added.push(AddedToken::from(piece.clone(), true)),
            PieceType::UserDefined => {
                added.push(AddedToken::from(piece.clone(), false).normalized(false))
            }
            _ => {}
        }
        vocab.push((piece, f64::from(p.score())));
    }
    let unk_id = usize::try_from(trainer.unk_id())
        .ok()
        .filter(|&u| u < vocab.len())
        .ok_or_else(|| {
            ModelError::corrupt(
                path,
                format!(
                    "unk_id {} is not a piece id (the model has {} pieces)",
                    trainer.unk_id(),
                    vocab.len()
                ),
            )
        })?;
    let charsmap = proto.normalizer().precompiled_charsmap().to_vec();
    let precompiled = if charsmap.is_empty() {
        None
    } else {
        Some(Precompiled::from(&charsmap).map_err(|e| {
            ModelError::corrupt(path, format!("invalid precompiled_charsmap: {e:?}"))
        })?)
    };
    Ok(Parts {
        vocab,
        unk_id,
        precompiled,
        added,
    })
}

/// Reads the Unigram vocabulary, unknown id, character map and added tokens of a
/// `tokenizer.json`, as transformers' `convert_to_native_format` does for a T5 tokenizer.
fn parts_from_tokenizer_json(path: &Path) -> Result<Parts> {
    let json: serde_json::Value = crate::checkpoint::read_json(path)?;
    let model = &json["model"];
    if model["type"].as_str().unwrap_or("Unigram") != "Unigram" {
        return Err(ModelError::UnsupportedConfig {
            component: "tokenizer".into(),
            field: "tokenizer.json model.type".into(),
            value: model["type"].to_string(),
            hint:
                "a T5 tokenizer is a Unigram model; remove the tokenizer.json to use spiece.model"
                    .into(),
        });
    }
    let bad = |what: &str| ModelError::corrupt(path, format!("invalid Unigram model: {what}"));
    let entries = model["vocab"]
        .as_array()
        .ok_or_else(|| bad("no vocab list"))?;
    let mut vocab = Vec::with_capacity(entries.len());
    for e in entries {
        let piece = e[0]
            .as_str()
            .ok_or_else(|| bad("a vocab entry is not [piece, score]"))?;
        let score = e[1]
            .as_f64()
            .ok_or_else(|| bad("a vocab entry is not [piece, score]"))?;
        vocab.push((piece.to_string(), score));
    }
    let unk_id = model["unk_id"]
        .as_u64()
        .map(|u| u as usize)
        .filter(|&u| u < vocab.len())
        .ok_or_else(|| bad("unk_id missing or out of range"))?;
    let precompiled = find_precompiled(&json["normalizer"])
        .map(|v| {
            // (from_str: the charsmap deserialiser borrows its base64 string)
            serde_json::from_str::<Precompiled>(&v.to_string()).map_err(|e| {
                let mut e = e.to_string();
                e.truncate(200);
                ModelError::corrupt(path, format!("invalid Precompiled normalizer: {e}"))
            })
        })
        .transpose()?;
    let mut added = Vec::new();
    if let Some(list) = json["added_tokens"].as_array() {
        for t in list {
            let spec: AddedTokenSpec = serde_json::from_value(t.clone())
                .map_err(|e| ModelError::corrupt(path, format!("invalid added token: {e}")))?;
            if vocab.iter().any(|(p, _)| *p == spec.content) {
                added.push(spec.to_added_token());
            }
        }
    }
    Ok(Parts {
        vocab,
        unk_id,
        precompiled,
        added,
    })
}

/// The `Precompiled` entry of a normalizer (alone or inside a `Sequence`).
fn find_precompiled(normalizer: &serde_json::Value) -> Option<&serde_json::Value> {
    match normalizer["type"].as_str() {
        Some("Precompiled") => Some(normalizer),
        Some("Sequence") => normalizer["normalizers"]
            .as_array()?
            .iter()
            .find_map(find_precompiled),
        _ => None,
    }
}
