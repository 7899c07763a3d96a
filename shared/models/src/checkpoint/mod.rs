//! Loading diffusers-format checkpoints exactly as users download them.
//!
//! A pipeline folder holds `model_index.json` (pipeline class and each component's class) and one
//! sub-folder per component with its `config.json` (or `scheduler_config.json`) and weights as a
//! single `*.safetensors` file or shards listed by `*.safetensors.index.json`, possibly with a
//! variant in the names (`model.fp16-00001-of-00003.safetensors`,
//! `diffusion_pytorch_model.fp16.safetensors`, `model.safetensors.index.fp16.json`).
//!
//! Weights are memory-mapped; each tensor is converted to the run dtype once, when the model
//! asks for it at construction time.

mod component;
mod model_index;
mod weights;

pub use component::ComponentFolder;
pub use model_index::{ComponentEntry, ModelIndex, PipelineFolder};
pub use weights::{check_safetensors_header, resolve_weight_files, safetensors_names, WeightFiles};

use crate::{ModelError, Result};
use std::path::Path;

/// Reads and parses a JSON file, naming the file in every error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ModelError::MissingFile {
                path: path.to_path_buf(),
                hint: "the checkpoint folder is incomplete; download it again (all files of the repository)".into(),
            }
        } else {
            ModelError::corrupt(path, e)
        }
    })?;
    let text = quote_non_finite_literals(&text);
    serde_json::from_str(&text).map_err(|e| ModelError::corrupt(path, format!("invalid JSON: {e}")))
}

/// Python's `json` writes `Infinity`, `-Infinity` and `NaN` (e.g. PixArt's
/// `"lambda_min_clipped": -Infinity`), which strict JSON parsers reject. This turns those bare
/// literals into strings (`"-Infinity"`), which [`lenient_f64`] reads back as numbers.
pub fn quote_non_finite_literals(text: &str) -> std::borrow::Cow<'_, str> {
    if !(text.contains("Infinity") || text.contains("NaN")) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        let mut matched = false;
        for lit in ["-Infinity", "Infinity", "NaN"] {
            if rest.starts_with(lit) {
                out.push('"');
                out.push_str(lit);
                out.push('"');
                rest = &rest[lit.len()..];
                matched = true;
                break;
            }
        }
        if !matched {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Serde helper for `f64` config fields that Python may have written as `Infinity`,
/// `-Infinity` or `NaN` (see [`quote_non_finite_literals`]). Use with
/// `#[serde(deserialize_with = "crate::checkpoint::lenient_f64")]`.
pub fn lenient_f64<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum NumOrStr {
        Num(f64),
        Str(String),
    }
    match <NumOrStr as serde::Deserialize>::deserialize(d)? {
        NumOrStr::Num(v) => Ok(v),
        NumOrStr::Str(s) => match s.as_str() {
            "Infinity" => Ok(f64::INFINITY),
            "-Infinity" => Ok(f64::NEG_INFINITY),
            "NaN" => Ok(f64::NAN),
            other => other
                .parse()
                .map_err(|_| serde::de::Error::custom(format!("expected a number, got {other:?}"))),
        },
    }
}

/// Like [`lenient_f64`] for optional fields (`null` → `None`).
pub fn lenient_opt_f64<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<f64>, D::Error> {
    #[derive(serde::Deserialize)]
    struct Wrap(#[serde(deserialize_with = "lenient_f64")] f64);
    Ok(<Option<Wrap> as serde::Deserialize>::deserialize(d)?.map(|w| w.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_non_finite_literals() {
        let t = r#"{"a": -Infinity, "b": "NaN in a string", "c": NaN, "d": Infinity}"#;
        let q = quote_non_finite_literals(t);
        assert_eq!(
            q,
            r#"{"a": "-Infinity", "b": "NaN in a string", "c": "NaN", "d": "Infinity"}"#
        );
        #[derive(serde::Deserialize)]
        struct S {
            #[serde(deserialize_with = "lenient_f64")]
            a: f64,
            #[serde(default, deserialize_with = "lenient_opt_f64")]
            d: Option<f64>,
        }
        let s: S = serde_json::from_str(&q).unwrap();
        assert_eq!(s.a, f64::NEG_INFINITY);
        assert_eq!(s.d, Some(f64::INFINITY));
    }
}
