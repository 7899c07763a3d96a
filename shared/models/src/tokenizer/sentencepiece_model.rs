//! The part of SentencePiece's `ModelProto` (`sentencepiece_model.proto`, proto2) that a
//! tokenizer needs: the pieces with their scores and types, the trainer's special ids, and the
//! normalizer's precompiled character map.
//!
//! Field numbers and defaults follow `sentencepiece_model.proto`; every other field of the file
//! is skipped when decoding. The messages are declared by hand with `prost`'s derive, so no
//! `protoc` is needed at build time.

use crate::{ModelError, Result};
use prost::Message;
use std::path::Path;

/// `ModelProto`: a serialised SentencePiece model (`spiece.model`, `tokenizer.model`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelProto {
    /// The vocabulary; a piece's id is its index.
    #[prost(message, repeated, tag = "1")]
    pub pieces: Vec<SentencePiece>,
    /// How the model was trained (model type, special ids).
    #[prost(message, optional, tag = "2")]
    pub trainer_spec: Option<TrainerSpec>,
    /// How input text is normalised before it is split into pieces.
    #[prost(message, optional, tag = "3")]
    pub normalizer_spec: Option<NormalizerSpec>,
}

/// `ModelProto.SentencePiece`: one vocabulary entry.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SentencePiece {
    /// The piece text (`▁` stands for a space).
    #[prost(string, optional, tag = "1")]
    pub piece: Option<String>,
    /// The piece's log-probability (unigram) or merge rank (BPE).
    #[prost(float, optional, tag = "2")]
    pub score: Option<f32>,
    /// The piece type; see [`PieceType`].
    #[prost(int32, optional, tag = "3", default = "1")]
    pub r#type: Option<i32>,
}

/// `ModelProto.SentencePiece.Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    /// An ordinary piece.
    Normal,
    /// The unknown piece.
    Unknown,
    /// A control symbol such as `<pad>`, `</s>`; never produced from text by the model.
    Control,
    /// A user-defined symbol, always kept whole.
    UserDefined,
    /// A placeholder piece never produced.
    Unused,
    /// A byte-fallback piece `<0xNN>`.
    Byte,
}

impl PieceType {
    /// Maps the proto enum value; unknown values read as [`PieceType::Normal`] (proto2 rule
    /// for an unrecognised enum value is to keep the default).
    pub fn from_proto(value: i32) -> Self {
        match value {
            2 => PieceType::Unknown,
            3 => PieceType::Control,
            4 => PieceType::UserDefined,
            5 => PieceType::Unused,
            6 => PieceType::Byte,
            _ => PieceType::Normal,
        }
    }
}

impl SentencePiece {
    /// The piece type.
    pub fn piece_type(&self) -> PieceType {
        PieceType::from_proto(self.r#type())
    }
}

/// `TrainerSpec`: only the fields a tokenizer needs.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TrainerSpec {
    /// 1 = UNIGRAM, 2 = BPE, 3 = WORD, 4 = CHAR.
    #[prost(int32, optional, tag = "3", default = "1")]
    pub model_type: Option<i32>,
    /// The vocabulary size the model was trained for.
    #[prost(int32, optional, tag = "4", default = "8000")]
    pub vocab_size: Option<i32>,
    /// Whether unknown characters fall back to byte pieces.
    #[prost(bool, optional, tag = "35", default = "false")]
    pub byte_fallback: Option<bool>,
    /// Id of the unknown piece.
    #[prost(int32, optional, tag = "40", default = "0")]
    pub unk_id: Option<i32>,
    /// Id of the beginning-of-sentence piece (-1: none).
    #[prost(int32, optional, tag = "41", default = "1")]
    pub bos_id: Option<i32>,
    /// Id of the end-of-sentence piece (-1: none).
    #[prost(int32, optional, tag = "42", default = "2")]
    pub eos_id: Option<i32>,
    /// Id of the padding piece (-1: none).
    #[prost(int32, optional, tag = "43", default = "-1")]
    pub pad_id: Option<i32>,
}

/// `NormalizerSpec`: the normalisation rules.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NormalizerSpec {
    /// Rule name (`nmt_nfkc`, `identity`, ...).
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    /// The compiled normalisation map (a double-array trie plus replacement strings).
    #[prost(bytes = "vec", optional, tag = "2")]
    pub precompiled_charsmap: Option<Vec<u8>>,
    /// Whether a `▁` is prepended to the input.
    #[prost(bool, optional, tag = "3", default = "true")]
    pub add_dummy_prefix: Option<bool>,
    /// Whether leading, trailing and repeated whitespace is removed.
    #[prost(bool, optional, tag = "4", default = "true")]
    pub remove_extra_whitespaces: Option<bool>,
    /// Whether spaces are replaced by `▁`.
    #[prost(bool, optional, tag = "5", default = "true")]
    pub escape_whitespaces: Option<bool>,
}

/// SentencePiece's `ModelType` value for a unigram model.
pub const MODEL_TYPE_UNIGRAM: i32 = 1;

impl ModelProto {
    /// Decodes a serialised model.
    pub fn decode_bytes(bytes: &[u8]) -> std::result::Result<Self, prost::DecodeError> {
        ModelProto::decode(bytes)
    }

    /// Reads and decodes a model file, naming the file in every error.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ModelError::MissingFile {
                    path: path.to_path_buf(),
                    hint: "the tokenizer folder is incomplete; download the whole repository again"
                        .into(),
                }
            } else {
                ModelError::corrupt(path, e)
            }
        })?;
        let proto = ModelProto::decode_bytes(&bytes).map_err(|e| {
            ModelError::corrupt(
                path,
                format!("not a SentencePiece model ({e}); the download is probably truncated or corrupt: download it again"),
            )
        })?;
        if proto.pieces.is_empty() {
            return Err(ModelError::corrupt(
                path,
                "the SentencePiece model has no pieces; download it again",
            ));
        }
        Ok(proto)
    }

    /// The trainer spec, or the proto defaults when absent.
    pub fn trainer(&self) -> TrainerSpec {
        self.trainer_spec.clone().unwrap_or_default()
    }

    /// The normalizer spec, or the proto defaults when absent.
    pub fn normalizer(&self) -> NormalizerSpec {
        self.normalizer_spec.clone().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_defaults() {
        let proto = ModelProto {
            pieces: vec![
                SentencePiece {
                    piece: Some("<pad>".into()),
                    score: Some(0.0),
                    r#type: Some(3),
                },
                SentencePiece {
                    piece: Some("▁a".into()),
                    score: Some(-1.5),
                    r#type: None,
                },
            ],
            trainer_spec: Some(TrainerSpec {
                unk_id: Some(2),
                ..Default::default()
            }),
            normalizer_spec: None,
        };
        let bytes = proto.encode_to_vec();
        let back = ModelProto::decode_bytes(&bytes).unwrap();
        assert_eq!(back, proto);
        assert_eq!(back.pieces[0].piece_type(), PieceType::Control);
        assert_eq!(back.pieces[1].piece_type(), PieceType::Normal);
        let t = back.trainer();
        assert_eq!(t.unk_id(), 2);
        assert_eq!(t.eos_id(), 2);
        assert_eq!(t.pad_id(), -1);
        assert_eq!(t.model_type(), MODEL_TYPE_UNIGRAM);
        assert!(back.normalizer().add_dummy_prefix());
    }
}
