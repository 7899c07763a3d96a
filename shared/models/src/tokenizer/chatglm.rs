//! The ChatGLM3 tokenizer of Kolors (`ChatGLMTokenizer`, diffusers
//! `pipelines/kolors/tokenizer.py`, run under transformers 5.x), built from `tokenizer.model`.
//!
//! - `tokenizer.model` is a SentencePiece **BPE** model with byte fallback. Text is encoded
//!   exactly as `SentencePieceProcessor.encode` does: the model's normaliser (character map,
//!   dummy `▁` prefix, whitespace handling), then SentencePiece's BPE merge loop (highest
//!   score first, leftmost on ties), then byte fallback (`<0xNN>`) for pieces not in the
//!   vocabulary.
//! - ChatGLM's own special tokens get the ids right after the SentencePiece vocabulary, in
//!   this order: `[MASK] [gMASK] [sMASK] sop eop <|system|> <|user|> <|assistant|>
//!   <|observation|>` (64789… for ChatGLM3). They are never produced from prompt text.
//! - Every prompt starts with `[gMASK] sop`; no end token is appended.
//! - transformers 5 registers the special tokens named in `tokenizer_config.json`
//!   (`eos_token`, `unk_token`, `pad_token`, …) and its `added_tokens_decoder` as added
//!   tokens: such a literal (e.g. `</s>`, `<unk>`) in the prompt is split out whole (the text
//!   around it is encoded piece by piece, each piece with its own dummy prefix). A new one gets
//!   the id `len(get_vocab())`, `+1`, …, where `get_vocab` maps the ids of `<unk>`, `<s>` and
//!   `</s>` all to `""` (so with the ChatGLM3 config, `</s>` and `<unk>` get ids that collide
//!   with `<|assistant|>` / `<|observation|>`). This reproduces diffusers 0.42.1 + transformers
//!   5.24 exactly; without `tokenizer_config.json` there are no added tokens.
//! - `padding="max_length"` pads on the **left** with the unknown id; truncation drops
//!   tokens from the right; `position_ids` are 0 for padding and 0..n−1 for the real tokens.

use super::sentencepiece_model::{ModelProto, PieceType};
use crate::{ModelError, Result};
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::path::Path;
use tokenizers::normalizers::Precompiled;
use tokenizers::{NormalizedString, Normalizer};

/// SentencePiece's `ModelType` value for a BPE model.
pub const MODEL_TYPE_BPE: i32 = 2;

/// ChatGLM's special tokens, in id order after the SentencePiece vocabulary.
pub const CHATGLM_SPECIAL_TOKENS: [&str; 9] = [
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "sop",
    "eop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
];

/// The maximum prompt length Kolors uses (`max_sequence_length=256`).
pub const KOLORS_MAX_LENGTH: usize = 256;

const SPACE_SYMBOL: char = '▁';

/// One prompt tokenised as `KolorsPipeline.encode_prompt` tokenises it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatGlmEncoded {
    /// `max_len` ids: padding (the unknown id) on the left, then `[gMASK] sop` and the tokens.
    pub input_ids: Vec<u32>,
    /// `max_len` entries: 0 for padding, 1 for the prefix and the tokens.
    pub attention_mask: Vec<u32>,
    /// `max_len` entries: 0 for padding, then 0, 1, … for the prefix and the tokens.
    pub position_ids: Vec<u32>,
    /// How many tokens truncation dropped.
    pub num_truncated: usize,
}

/// The ChatGLM3 tokenizer (SentencePiece BPE plus ChatGLM's special tokens).
#[derive(Debug, Clone)]
pub struct ChatGlmTokenizer {
    /// Normal, user-defined and unused pieces (those BPE may merge into): piece → (id, score).
    pieces: HashMap<String, (u32, f32)>,
    /// Control, unknown and byte pieces: piece → id (looked up first, like SentencePiece).
    reserved: HashMap<String, u32>,
    /// Piece text and type by id.
    id_to_piece: Vec<(String, PieceType)>,
    /// User-defined pieces, matched whole before BPE, longest first.
    user_defined: Vec<String>,
    /// `<0xNN>` piece ids when the model has byte fallback.
    byte_ids: Option<Vec<u32>>,
    unk_id: u32,
    eos_id: Option<u32>,
    precompiled: Option<Precompiled>,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
    /// `_convert_id_to_token(i)` for every id below `vocab_size` (the keys of `get_vocab()`).
    vocab_keys: Vec<String>,
    /// transformers' added tokens, matched whole in the raw text.
    added: Vec<AddedToken>,
}

/// An added token of transformers' Python tokenizer (`_added_tokens_decoder`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct AddedToken {
    content: String,
    id: u32,
    lstrip: bool,
    rstrip: bool,
}

/// A special token in `tokenizer_config.json`: a string or an `AddedToken` object.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
enum TokenSpec {
    Plain(String),
    Full {
        content: String,
        #[serde(default)]
        lstrip: bool,
        #[serde(default)]
        rstrip: bool,
    },
}

impl TokenSpec {
    fn parts(&self) -> (&str, bool, bool) {
        match self {
            TokenSpec::Plain(s) => (s, false, false),
            TokenSpec::Full {
                content,
                lstrip,
                rstrip,
            } => (content, *lstrip, *rstrip),
        }
    }
}

/// The fields of `tokenizer_config.json` that decide transformers' added tokens.
#[derive(Debug, Clone, Default, serde::Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    bos_token: Option<TokenSpec>,
    #[serde(default)]
    eos_token: Option<TokenSpec>,
    #[serde(default)]
    unk_token: Option<TokenSpec>,
    #[serde(default)]
    sep_token: Option<TokenSpec>,
    #[serde(default)]
    pad_token: Option<TokenSpec>,
    #[serde(default)]
    cls_token: Option<TokenSpec>,
    #[serde(default)]
    mask_token: Option<TokenSpec>,
    #[serde(default)]
    additional_special_tokens: Vec<TokenSpec>,
    #[serde(default)]
    extra_special_tokens: Option<serde_json::Value>,
    #[serde(default)]
    added_tokens_decoder: HashMap<String, TokenSpec>,
}

/// A candidate merge of two adjacent symbols (SentencePiece `SymbolPair`).
#[derive(Debug, Clone, Copy)]
struct SymbolPair {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl PartialEq for SymbolPair {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for SymbolPair {}
impl PartialOrd for SymbolPair {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for SymbolPair {
    /// Max-heap order: higher score first, then the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// A symbol of the BPE merge loop: a byte range of the normalised text.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    prev: Option<usize>,
    next: Option<usize>,
    start: usize,
    len: usize,
    freeze: bool,
}

impl ChatGlmTokenizer {
    /// Loads `tokenizer.model` from a Kolors `tokenizer/` folder.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.model");
        if !path.is_file() {
            return Err(ModelError::MissingFile {
                path,
                hint: format!(
                    "the ChatGLM tokenizer folder {} has no tokenizer.model; download the whole repository",
                    dir.display()
                ),
            });
        }
        let mut tok = Self::from_model_file(&path)?;
        let config_path = dir.join("tokenizer_config.json");
        if config_path.is_file() {
            let config: TokenizerConfig = crate::checkpoint::read_json(&config_path)?;
            tok.add_configured_tokens(&config);
        }
        Ok(tok)
    }

    /// Registers the added tokens transformers 5 derives from `tokenizer_config.json`:
    /// first `added_tokens_decoder` (with their ids), then the special tokens in attribute
    /// order (`bos eos unk sep pad cls mask`, then `additional_special_tokens` /
    /// `extra_special_tokens`). A special token that is already a key of `get_vocab()` keeps
    /// that id; new ones get `len(get_vocab())`, `+1`, … .
    fn add_configured_tokens(&mut self, config: &TokenizerConfig) {
        let mut decoder: Vec<(u32, &TokenSpec)> = config
            .added_tokens_decoder
            .iter()
            .filter_map(|(id, spec)| id.parse::<u32>().ok().map(|id| (id, spec)))
            .collect();
        decoder.sort_by_key(|(id, _)| *id);
        for (id, spec) in decoder {
            let (content, lstrip, rstrip) = spec.parts();
            if !content.is_empty() && !self.added.iter().any(|a| a.content == content) {
                self.added.push(AddedToken {
                    content: content.to_string(),
                    id,
                    lstrip,
                    rstrip,
                });
            }
        }
        let mut specials: Vec<&TokenSpec> = [
            &config.bos_token,
            &config.eos_token,
            &config.unk_token,
            &config.sep_token,
            &config.pad_token,
            &config.cls_token,
            &config.mask_token,
        ]
        .into_iter()
        .flatten()
        .collect();
        specials.extend(config.additional_special_tokens.iter());
        let extra: Vec<TokenSpec> = match &config.extra_special_tokens {
            Some(serde_json::Value::Array(v)) => v
                .iter()
                .filter_map(|x| serde_json::from_value(x.clone()).ok())
                .collect(),
            Some(serde_json::Value::Object(m)) => m
                .values()
                .filter_map(|x| serde_json::from_value(x.clone()).ok())
                .collect(),
            _ => Vec::new(),
        };
        specials.extend(extra.iter());
        let mut keys: std::collections::HashMap<&str, u32> = HashMap::new();
        for (i, k) in self.vocab_keys.iter().enumerate() {
            keys.insert(k.as_str(), i as u32);
        }
        let added_before = self.added.clone();
        for a in &added_before {
            keys.insert(a.content.as_str(), a.id);
        }
        let mut next = keys.len() as u32;
        let mut new_tokens = Vec::new();
        for spec in specials {
            let (content, _, _) = spec.parts();
            if content.is_empty()
                || self.added.iter().any(|a| a.content == content)
                || new_tokens.iter().any(|a: &AddedToken| a.content == content)
            {
                continue;
            }
            let id = match keys.get(content) {
                Some(&id) => id,
                None => {
                    next += 1;
                    next - 1
                }
            };
            // transformers 5 adds the special tokens without lstrip/rstrip, even when the
            // config spells them as AddedToken objects that set them.
            new_tokens.push(AddedToken {
                content: content.to_string(),
                id,
                lstrip: false,
                rstrip: false,
            });
        }
        self.added.extend(new_tokens);
    }

    /// Builds the tokenizer from a SentencePiece BPE model file alone (no
    /// `tokenizer_config.json`, hence no transformers added tokens).
    pub fn from_model_file(path: &Path) -> Result<Self> {
        let proto = ModelProto::read(path)?;
        let trainer = proto.trainer();
        if trainer.model_type() != MODEL_TYPE_BPE {
            return Err(ModelError::UnsupportedConfig {
                component: "tokenizer".into(),
                field: "tokenizer.model trainer_spec.model_type".into(),
                value: trainer.model_type().to_string(),
                hint: "the ChatGLM3 tokenizer is a SentencePiece BPE model (model_type 2); this file is not one".into(),
            });
        }
        let n = proto.pieces.len();
        let mut pieces = HashMap::with_capacity(n);
        let mut reserved = HashMap::new();
        let mut id_to_piece = Vec::with_capacity(n);
        let mut user_defined = Vec::new();
        for (i, p) in proto.pieces.iter().enumerate() {
            let piece = p.piece().to_string();
            if piece.is_empty() {
                return Err(ModelError::corrupt(
                    path,
                    format!("piece {i} is empty; download the file again"),
                ));
            }
            let ty = p.piece_type();
            let id = i as u32;
            match ty {
                PieceType::Normal | PieceType::UserDefined | PieceType::Unused => {
                    pieces.insert(piece.clone(), (id, p.score()));
                }
                PieceType::Control | PieceType::Unknown | PieceType::Byte => {
                    reserved.insert(piece.clone(), id);
                }
            }
            if ty == PieceType::UserDefined {
                user_defined.push(piece.clone());
            }
            id_to_piece.push((piece, ty));
        }
        user_defined.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let id_in_range = |v: i32| u32::try_from(v).ok().filter(|&u| (u as usize) < n);
        let unk_id = id_in_range(trainer.unk_id()).ok_or_else(|| {
            ModelError::corrupt(
                path,
                format!(
                    "unk_id {} is not a piece id (the model has {n} pieces)",
                    trainer.unk_id()
                ),
            )
        })?;
        let byte_ids = if trainer.byte_fallback() {
            let mut ids = Vec::with_capacity(256);
            for b in 0..=255u8 {
                let name = format!("<0x{b:02X}>");
                let id = reserved.get(&name).copied().ok_or_else(|| {
                    ModelError::corrupt(
                        path,
                        format!("byte_fallback is set but the piece {name} is missing"),
                    )
                })?;
                ids.push(id);
            }
            Some(ids)
        } else {
            None
        };
        let normalizer = proto.normalizer();
        let charsmap = normalizer.precompiled_charsmap().to_vec();
        let precompiled = if charsmap.is_empty() {
            None
        } else {
            Some(Precompiled::from(&charsmap).map_err(|e| {
                ModelError::corrupt(path, format!("invalid precompiled_charsmap: {e:?}"))
            })?)
        };
        let bos_id = id_in_range(trainer.bos_id());
        let eos_id = id_in_range(trainer.eos_id());

        let vocab_keys: Vec<String> = id_to_piece
            .iter()
            .enumerate()
            .map(|(i, (piece, _))| {
                let id = i as u32;
                if Some(id) == eos_id || Some(id) == bos_id || id == unk_id {
                    String::new()
                } else {
                    piece.clone()
                }
            })
            .chain(CHATGLM_SPECIAL_TOKENS.iter().map(|s| s.to_string()))
            .collect();

        Ok(ChatGlmTokenizer {
            pieces,
            reserved,
            id_to_piece,
            user_defined,
            byte_ids,
            unk_id,
            eos_id,
            precompiled,
            add_dummy_prefix: normalizer.add_dummy_prefix(),
            remove_extra_whitespaces: normalizer.remove_extra_whitespaces(),
            escape_whitespaces: normalizer.escape_whitespaces(),
            vocab_keys,
            added: Vec::new(),
        })
    }

    /// The number of SentencePiece pieces (the first ChatGLM special id).
    pub fn sp_vocab_size(&self) -> usize {
        self.id_to_piece.len()
    }

    /// The tokenizer's `vocab_size`: SentencePiece pieces plus ChatGLM's 9 special tokens.
    pub fn vocab_size(&self) -> usize {
        self.id_to_piece.len() + CHATGLM_SPECIAL_TOKENS.len()
    }

    /// The id of a ChatGLM special token (`[gMASK]`, `sop`, …), or `None` for other names.
    pub fn special_id(&self, name: &str) -> Option<u32> {
        CHATGLM_SPECIAL_TOKENS
            .iter()
            .position(|s| *s == name)
            .map(|p| (self.id_to_piece.len() + p) as u32)
    }

    /// The id of `[gMASK]`.
    pub fn gmask_id(&self) -> u32 {
        self.id_to_piece.len() as u32 + 1
    }

    /// The id of `sop`.
    pub fn sop_id(&self) -> u32 {
        self.id_to_piece.len() as u32 + 3
    }

    /// The padding id (the SentencePiece unknown id, 0 for ChatGLM3).
    pub fn pad_id(&self) -> u32 {
        self.unk_id
    }

    /// The SentencePiece end-of-sentence id, when the model has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Token ids of `text` without the `[gMASK] sop` prefix, padding or truncation
    /// (transformers' `tokenize` + `convert_tokens_to_ids`).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        // transformers' `tokenize`: split on added tokens (leftmost, longest on ties, like its
        // Trie), apply their lstrip/rstrip to the neighbouring text, encode the rest.
        enum Seg<'a> {
            Text(&'a str),
            Token(usize),
        }
        let mut segs: Vec<Seg> = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let hit = self
                .added
                .iter()
                .enumerate()
                .filter_map(|(k, a)| {
                    rest.find(a.content.as_str())
                        .map(|pos| (pos, a.content.len(), k))
                })
                .min_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            match hit {
                Some((pos, len, k)) => {
                    segs.push(Seg::Text(&rest[..pos]));
                    segs.push(Seg::Token(k));
                    rest = &rest[pos + len..];
                }
                None => {
                    segs.push(Seg::Text(rest));
                    rest = "";
                }
            }
        }
        for i in 0..segs.len() {
            if let Seg::Token(k) = segs[i] {
                let a = &self.added[k];
                if a.rstrip {
                    if let Some(Seg::Text(t)) = segs.get_mut(i + 1) {
                        *t = t.trim_start();
                    }
                }
                if a.lstrip && i > 0 {
                    if let Some(Seg::Text(t)) = segs.get_mut(i - 1) {
                        *t = t.trim_end();
                    }
                }
            }
        }
        let mut ids = Vec::new();
        for seg in segs {
            match seg {
                Seg::Text(t) => self.sp_encode(t, &mut ids),
                Seg::Token(k) => ids.push(self.added[k].id),
            }
        }
        ids
    }

    /// `[gMASK] sop` + the tokens of `text`, truncated to `max_len` and padded on the left to
    /// `max_len` (`padding="max_length", truncation=True`).
    pub fn encode_padded(&self, text: &str, max_len: usize) -> Result<ChatGlmEncoded> {
        if max_len < 2 {
            return Err(ModelError::invalid(
                "max_sequence_length",
                "must be at least 2 (room for the [gMASK] sop prefix)",
            ));
        }
        let tokens = self.encode(text);
        let keep = tokens.len().min(max_len - 2);
        let num_truncated = tokens.len() - keep;
        let real = keep + 2;
        let pad = max_len - real;
        let mut input_ids = vec![self.pad_id(); pad];
        input_ids.push(self.gmask_id());
        input_ids.push(self.sop_id());
        input_ids.extend_from_slice(&tokens[..keep]);
        let mut attention_mask = vec![0u32; pad];
        attention_mask.resize(max_len, 1);
        let mut position_ids = vec![0u32; pad];
        position_ids.extend(0..real as u32);
        Ok(ChatGlmEncoded {
            input_ids,
            attention_mask,
            position_ids,
            num_truncated,
        })
    }

    /// Text of `ids` (SentencePiece decoding; ChatGLM specials and added tokens by name).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut out = String::new();
        let mut bytes: Vec<u8> = Vec::new();
        let flush = |bytes: &mut Vec<u8>, out: &mut String| {
            if !bytes.is_empty() {
                out.push_str(&String::from_utf8_lossy(bytes));
                bytes.clear();
            }
        };
        for &id in ids {
            let idx = id as usize;
            if let Some((piece, ty)) = self.id_to_piece.get(idx) {
                match ty {
                    PieceType::Byte => {
                        let hex = piece.trim_start_matches("<0x").trim_end_matches('>');
                        if let Ok(b) = u8::from_str_radix(hex, 16) {
                            bytes.push(b);
                        }
                    }
                    PieceType::Control => {}
                    _ => {
                        flush(&mut bytes, &mut out);
                        out.push_str(&piece.replace(SPACE_SYMBOL, " "));
                    }
                }
            } else if let Some(name) = idx
                .checked_sub(self.id_to_piece.len())
                .and_then(|k| CHATGLM_SPECIAL_TOKENS.get(k))
            {
                flush(&mut bytes, &mut out);
                out.push_str(name);
            } else if let Some(a) = self.added.iter().find(|a| a.id == id) {
                flush(&mut bytes, &mut out);
                out.push_str(&a.content);
            }
        }
        flush(&mut bytes, &mut out);
        if self.add_dummy_prefix {
            if let Some(s) = out.strip_prefix(' ') {
                return s.to_string();
            }
        }
        out
    }

    /// SentencePiece normalisation (`normalizer.cc`): character map, leading/trailing/repeated
    /// space removal, dummy prefix, spaces as `▁`.
    fn normalize(&self, text: &str) -> String {
        if text.is_empty() {
            return String::new();
        }
        let mapped: String = match &self.precompiled {
            Some(p) => {
                let mut ns = NormalizedString::from(text);
                match p.normalize(&mut ns) {
                    Ok(()) => ns.get().to_string(),
                    Err(_) => text.to_string(),
                }
            }
            None => text.to_string(),
        };
        let mut input: &str = &mapped;
        if self.remove_extra_whitespaces {
            input = input.trim_start_matches(' ');
        }
        if input.is_empty() {
            return String::new();
        }
        let space = if self.escape_whitespaces {
            SPACE_SYMBOL
        } else {
            ' '
        };
        let mut out = String::with_capacity(input.len() + 3);
        if self.add_dummy_prefix {
            out.push(space);
        }
        let mut prev_space = self.add_dummy_prefix;
        for c in input.chars() {
            if c == ' ' {
                if self.remove_extra_whitespaces && prev_space {
                    continue;
                }
                out.push(space);
                prev_space = true;
            } else {
                out.push(c);
                prev_space = false;
            }
        }
        if self.remove_extra_whitespaces {
            while out.ends_with(space) {
                out.pop();
            }
        }
        out
    }

    /// `SentencePieceProcessor.encode` of one text chunk, appended to `ids`.
    fn sp_encode(&self, text: &str, ids: &mut Vec<u32>) {
        let norm = self.normalize(text);
        if norm.is_empty() {
            return;
        }
        // Initial symbols: user-defined pieces (frozen) or single characters.
        let mut symbols: Vec<Symbol> = Vec::with_capacity(norm.len());
        let mut pos = 0;
        while pos < norm.len() {
            let rest = &norm[pos..];
            let (len, freeze) = match self
                .user_defined
                .iter()
                .find(|u| rest.starts_with(u.as_str()))
            {
                Some(u) => (u.len(), true),
                None => (rest.chars().next().map_or(1, char::len_utf8), false),
            };
            let i = symbols.len();
            symbols.push(Symbol {
                prev: i.checked_sub(1),
                next: None,
                start: pos,
                len,
                freeze,
            });
            if i > 0 {
                symbols[i - 1].next = Some(i);
            }
            pos += len;
        }

        let mut agenda = BinaryHeap::new();
        let mut unused_splits: HashMap<String, (String, String)> = HashMap::new();
        let mut maybe_add = |symbols: &[Symbol],
                             agenda: &mut BinaryHeap<SymbolPair>,
                             left: Option<usize>,
                             right: Option<usize>| {
            let (Some(l), Some(r)) = (left, right) else {
                return;
            };
            let (sl, sr) = (symbols[l], symbols[r]);
            if sl.freeze || sr.freeze {
                return;
            }
            let piece = &norm[sl.start..sl.start + sl.len + sr.len];
            if let Some(&(id, score)) = self.pieces.get(piece) {
                agenda.push(SymbolPair {
                    left: l,
                    right: r,
                    score,
                    size: sl.len + sr.len,
                });
                if self.id_to_piece[id as usize].1 == PieceType::Unused {
                    unused_splits.insert(
                        piece.to_string(),
                        (
                            norm[sl.start..sl.start + sl.len].to_string(),
                            norm[sr.start..sr.start + sr.len].to_string(),
                        ),
                    );
                }
            }
        };
        for i in 1..symbols.len() {
            maybe_add(&symbols, &mut agenda, Some(i - 1), Some(i));
        }
        while let Some(top) = agenda.pop() {
            let (l, r) = (top.left, top.right);
            if symbols[l].len == 0
                || symbols[r].len == 0
                || symbols[l].len + symbols[r].len != top.size
            {
                continue; // stale pair
            }
            symbols[l].len += symbols[r].len;
            symbols[l].next = symbols[r].next;
            if let Some(n) = symbols[r].next {
                symbols[n].prev = Some(l);
            }
            symbols[r].len = 0;
            let prev = symbols[l].prev;
            let next = symbols[l].next;
            maybe_add(&symbols, &mut agenda, prev, Some(l));
            maybe_add(&symbols, &mut agenda, Some(l), next);
        }

        let mut cur = if symbols.is_empty() { None } else { Some(0) };
        while let Some(i) = cur {
            let s = symbols[i];
            let piece = &norm[s.start..s.start + s.len];
            self.resegment(piece, &unused_splits, ids);
            cur = s.next;
        }
    }

    /// Appends the id(s) of a final BPE symbol: unused pieces are split back into the pair
    /// they were merged from; unknown pieces fall back to bytes when the model allows it.
    fn resegment(
        &self,
        piece: &str,
        unused: &HashMap<String, (String, String)>,
        ids: &mut Vec<u32>,
    ) {
        let id = self
            .reserved
            .get(piece)
            .copied()
            .or_else(|| self.pieces.get(piece).map(|&(id, _)| id));
        if let Some(id) = id {
            if self.id_to_piece[id as usize].1 == PieceType::Unused {
                if let Some((a, b)) = unused.get(piece) {
                    self.resegment(a, unused, ids);
                    self.resegment(b, unused, ids);
                    return;
                }
            }
            if id != self.unk_id {
                ids.push(id);
                return;
            }
        }
        match &self.byte_ids {
            Some(bytes) => ids.extend(piece.bytes().map(|b| bytes[b as usize])),
            None => ids.push(self.unk_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::sentencepiece_model::{NormalizerSpec, SentencePiece, TrainerSpec};
    use prost::Message;

    fn piece(p: &str, score: f32, ty: i32) -> SentencePiece {
        SentencePiece {
            piece: Some(p.into()),
            score: Some(score),
            r#type: Some(ty),
        }
    }

    #[test]
    fn bpe_merges_by_score_and_pads_left() {
        let mut pieces = vec![
            piece("<unk>", 0.0, 2),
            piece("<s>", 0.0, 3),
            piece("</s>", 0.0, 3),
        ];
        for b in 0..=255u8 {
            pieces.push(piece(&format!("<0x{b:02X}>"), 0.0, 6));
        }
        for (i, p) in ["▁a", "b", "▁", "a", "ab", "▁ab"].iter().enumerate() {
            pieces.push(piece(p, -(i as f32), 1));
        }
        let proto = ModelProto {
            pieces,
            trainer_spec: Some(TrainerSpec {
                model_type: Some(2),
                byte_fallback: Some(true),
                unk_id: Some(0),
                bos_id: Some(1),
                eos_id: Some(2),
                ..Default::default()
            }),
            normalizer_spec: Some(NormalizerSpec {
                remove_extra_whitespaces: Some(false),
                ..Default::default()
            }),
        };
        let dir = std::env::temp_dir().join(format!("chatglm_tok_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tokenizer.model"), proto.encode_to_vec()).unwrap();
        let tok = ChatGlmTokenizer::from_folder(&dir).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        let base = 259u32;
        // "▁a" (score 0) merges before "ab" (score -4); then "▁ab" (score -5).
        assert_eq!(tok.encode("ab"), vec![base + 5]);
        // Unknown "é" falls back to its UTF-8 bytes.
        assert_eq!(tok.encode("é"), vec![base + 2, 3 + 0xC3, 3 + 0xA9]);
        assert_eq!(tok.gmask_id(), base + 6 + 1);
        let enc = tok.encode_padded("ab", 5).unwrap();
        assert_eq!(enc.input_ids, vec![0, 0, base + 7, base + 9, base + 5]);
        assert_eq!(enc.attention_mask, vec![0, 0, 1, 1, 1]);
        assert_eq!(enc.position_ids, vec![0, 0, 0, 1, 2]);
        assert_eq!(tok.decode(&tok.encode("ab b")), "ab b");
    }
}
