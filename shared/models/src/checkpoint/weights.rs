//! Locating and memory-mapping safetensors weights: single files, shards, variants.

use super::read_json;
use crate::{ModelError, Result, RunDtype};
use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::BTreeSet;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The safetensors files that make up one component's weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightFiles {
    /// The files, in shard order.
    pub files: Vec<PathBuf>,
    /// The index file, when the weights are sharded.
    pub index: Option<PathBuf>,
}

impl WeightFiles {
    /// Checks each file's safetensors header, then memory-maps them all.
    pub fn var_builder(&self, dtype: RunDtype, device: &Device) -> Result<VarBuilder<'static>> {
        for f in &self.files {
            check_safetensors_header(f)?;
        }
        // SAFETY: the files are memory-mapped read-only; relayfarm never writes checkpoint
        // files, and users are told not to modify a checkpoint while it is being served.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&self.files, dtype.dtype(), device) }
            .map_err(|e| ModelError::corrupt(&self.files[0], e))?;
        Ok(vb)
    }

    /// Loads the tensors of a (sharded) safetensors checkpoint that `select` keeps (it returns the
    /// key to store them under, or `None` to skip), converted to `dtype` on `device`, and returns
    /// a [`VarBuilder`] over them.
    ///
    /// Shards are memory-mapped one at a time; each tensor is converted into its own buffer and
    /// its pages of the map are then released (`MADV_DONTNEED`), and the map is dropped before the
    /// next shard. The resident peak is therefore the converted weights plus about one tensor.
    pub fn lean_var_builder(
        &self,
        dtype: RunDtype,
        device: &Device,
        select: impl Fn(&str) -> Option<String>,
    ) -> Result<VarBuilder<'static>> {
        use candle_core::safetensors::Load;
        let target = dtype.dtype();
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for path in &self.files {
            let file = std::fs::File::open(path).map_err(|e| ModelError::corrupt(path, e))?;
            // SAFETY: read-only map of a checkpoint file that relayfarm never writes.
            let mmap =
                unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::corrupt(path, e))?;
            let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| {
                ModelError::corrupt(
                    path,
                    format!("not a valid safetensors file ({e}); the download is probably truncated or corrupt: download it again"),
                )
            })?;
            let mut names: Vec<(String, String)> = st
                .names()
                .into_iter()
                .filter_map(|n| select(n).map(|k| (n.to_string(), k)))
                .collect();
            names.sort();
            for (name, key) in names {
                let view = st.tensor(&name).map_err(|e| ModelError::corrupt(path, e))?;
                let t = view
                    .load(&Device::Cpu)
                    .map_err(|e| ModelError::corrupt(path, format!("tensor {name}: {e}")))?
                    .to_dtype(target)?
                    .to_device(device)?;
                #[cfg(unix)]
                {
                    let data = view.data();
                    let offset = data.as_ptr() as usize - mmap.as_ptr() as usize;
                    // SAFETY: a read-only, file-backed private map: dropped pages are read back
                    // from the unchanged file if touched again.
                    let _ = unsafe {
                        mmap.unchecked_advise_range(
                            memmap2::UncheckedAdvice::DontNeed,
                            offset,
                            data.len(),
                        )
                    };
                }
                tensors.insert(key, t);
            }
        }
        Ok(VarBuilder::from_backend(
            Box::new(TakeOnce {
                tensors: std::sync::Mutex::new(tensors),
            }),
            target,
            device.clone(),
        ))
    }
}

/// A [`candle_nn::var_builder::SimpleBackend`] that hands each tensor out once and forgets it,
/// so that a model which builds fused weights from loaded ones (e.g. Q, K and V concatenated)
/// does not keep the originals alive until loading ends: the resident peak stays at the
/// model's own weights. A tensor asked for twice is an error naming it.
struct TakeOnce {
    tensors: std::sync::Mutex<HashMap<String, Tensor>>,
}

impl TakeOnce {
    fn take(&self, name: &str) -> candle_core::Result<Tensor> {
        let mut map = self.tensors.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "tensor {name} is not in the checkpoint (or was already taken by the model)"
            ))
        })
    }
}

impl candle_nn::var_builder::SimpleBackend for TakeOnce {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: candle_core::DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.take(name)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            });
        }
        t.to_device(dev)?.to_dtype(dtype)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: candle_core::DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.take(name)?.to_device(dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(name)
    }
}

/// The tensor names in a safetensors file (its header only).
pub fn safetensors_names(path: &Path) -> Result<Vec<String>> {
    let file = std::fs::File::open(path).map_err(|e| ModelError::corrupt(path, e))?;
    // SAFETY: read-only map of a file we do not modify.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::corrupt(path, e))?;
    let st =
        safetensors::SafeTensors::deserialize(&mmap).map_err(|e| ModelError::corrupt(path, e))?;
    Ok(st.names().into_iter().map(str::to_string).collect())
}

/// Validates the header of a safetensors file so a truncated or corrupt download is reported
/// with its path, rather than as a failure deep inside a model.
pub fn check_safetensors_header(path: &Path) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| ModelError::corrupt(path, e))?;
    // SAFETY: read-only map of a file we do not modify.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::corrupt(path, e))?;
    safetensors::SafeTensors::deserialize(&mmap).map_err(|e| {
        ModelError::corrupt(
            path,
            format!("not a valid safetensors file ({e}); the download is probably truncated or corrupt: download it again"),
        )
    })?;
    Ok(())
}

const STEMS: [&str; 2] = ["diffusion_pytorch_model", "model"];

/// Resolves a component folder's weights.
///
/// Order of preference: a sharded index (`<stem>.safetensors.index[.<variant>].json`), then a
/// single file (`<stem>[.<variant>].safetensors`). Without an explicit `variant`, plain names
/// are preferred and a variant is used when it is the only one present (e.g. Kolors ships only
/// fp16 files).
pub fn resolve_weight_files(dir: &Path, variant: Option<&str>) -> Result<WeightFiles> {
    let names: BTreeSet<String> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::corrupt(dir, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();

    let variants: Vec<Option<String>> = match variant {
        Some(v) => vec![Some(v.to_string())],
        None => {
            let mut vs = vec![None];
            for n in &names {
                if let Some(v) = variant_of(n) {
                    if !vs.contains(&Some(v.clone())) {
                        vs.push(Some(v));
                    }
                }
            }
            vs
        }
    };

    for v in &variants {
        for stem in STEMS {
            // Sharded: diffusers writes `x.safetensors.index.fp16.json`; some repos write
            // `x.fp16.safetensors.index.json`. Accept both.
            let index_names = match v {
                None => vec![format!("{stem}.safetensors.index.json")],
                Some(v) => vec![
                    format!("{stem}.safetensors.index.{v}.json"),
                    format!("{stem}.{v}.safetensors.index.json"),
                ],
            };
            for index_name in index_names {
                if names.contains(&index_name) {
                    return sharded(dir, &dir.join(index_name));
                }
            }
            let single = match v {
                None => format!("{stem}.safetensors"),
                Some(v) => format!("{stem}.{v}.safetensors"),
            };
            if names.contains(&single) {
                return Ok(WeightFiles {
                    files: vec![dir.join(single)],
                    index: None,
                });
            }
        }
    }

    let has_bin = names
        .iter()
        .any(|n| n.ends_with(".bin") || n.ends_with(".pt"));
    let hint = if has_bin {
        "only PyTorch pickle weights (.bin/.pt) are present; relayfarm reads safetensors only: download the safetensors files of the repository (or convert with `safetensors`' convert script)".to_string()
    } else if let Some(v) = variant {
        format!("no `{v}` variant weights here (looked for *.{v}.safetensors and its sharded index); drop --variant or download that variant")
    } else {
        "no *.safetensors weights here (looked for diffusion_pytorch_model / model, single or sharded); the download is incomplete".to_string()
    };
    Err(ModelError::MissingFile {
        path: dir.to_path_buf(),
        hint,
    })
}

/// `model.fp16-00001-of-00003.safetensors` / `x.fp16.safetensors` / `x.safetensors.index.fp16.json` → `fp16`.
fn variant_of(name: &str) -> Option<String> {
    for stem in STEMS {
        let Some(rest) = name.strip_prefix(stem).and_then(|r| r.strip_prefix('.')) else {
            continue;
        };
        if let Some(v) = rest.strip_suffix(".safetensors") {
            let v = v.split('-').next().unwrap_or(v);
            if !v.is_empty() && !v.chars().all(|c| c.is_ascii_digit()) {
                return Some(v.to_string());
            }
        }
        if let Some(v) = rest
            .strip_prefix("safetensors.index.")
            .and_then(|r| r.strip_suffix(".json"))
        {
            return Some(v.to_string());
        }
    }
    None
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

fn sharded(dir: &Path, index_path: &Path) -> Result<WeightFiles> {
    let index: ShardIndex = read_json(index_path)?;
    let mut files: Vec<PathBuf> = Vec::new();
    let unique: BTreeSet<&String> = index.weight_map.values().collect();
    for shard in unique {
        let path = dir.join(shard);
        if !path.is_file() {
            return Err(ModelError::MissingFile {
                path,
                hint: format!(
                    "{} lists this shard but it is not in the folder; the download is incomplete",
                    index_path.display()
                ),
            });
        }
        files.push(path);
    }
    if files.is_empty() {
        return Err(ModelError::corrupt(
            index_path,
            "the shard index lists no files",
        ));
    }
    Ok(WeightFiles {
        files,
        index: Some(index_path.to_path_buf()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(dir: &Path, names: &[&str]) {
        for n in names {
            std::fs::write(dir.join(n), b"x").unwrap();
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("relayfarm-weights-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn variant_names() {
        assert_eq!(
            variant_of("model.fp16-00001-of-00003.safetensors").as_deref(),
            Some("fp16")
        );
        assert_eq!(
            variant_of("diffusion_pytorch_model.fp16.safetensors").as_deref(),
            Some("fp16")
        );
        assert_eq!(
            variant_of("model.safetensors.index.fp16.json").as_deref(),
            Some("fp16")
        );
        assert_eq!(variant_of("model-00001-of-00002.safetensors"), None);
        assert_eq!(variant_of("model.safetensors"), None);
    }

    #[test]
    fn prefers_plain_single_file() {
        let d = tmp("plain");
        touch(
            &d,
            &[
                "diffusion_pytorch_model.safetensors",
                "diffusion_pytorch_model.fp16.safetensors",
            ],
        );
        let w = resolve_weight_files(&d, None).unwrap();
        assert_eq!(w.files, vec![d.join("diffusion_pytorch_model.safetensors")]);
        let w = resolve_weight_files(&d, Some("fp16")).unwrap();
        assert_eq!(
            w.files,
            vec![d.join("diffusion_pytorch_model.fp16.safetensors")]
        );
    }

    #[test]
    fn sharded_variant_only() {
        let d = tmp("kolors");
        touch(
            &d,
            &[
                "model.fp16-00001-of-00002.safetensors",
                "model.fp16-00002-of-00002.safetensors",
            ],
        );
        std::fs::write(
            d.join("model.safetensors.index.fp16.json"),
            r#"{"metadata":{},"weight_map":{"a":"model.fp16-00001-of-00002.safetensors","b":"model.fp16-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let w = resolve_weight_files(&d, None).unwrap();
        assert_eq!(w.files.len(), 2);
        assert!(w.index.is_some());
    }

    #[test]
    fn missing_shard_is_named() {
        let d = tmp("missing");
        std::fs::write(
            d.join("model.safetensors.index.json"),
            r#"{"weight_map":{"a":"model-00001-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let e = resolve_weight_files(&d, None).unwrap_err().to_string();
        assert!(e.contains("model-00001-of-00002.safetensors"), "{e}");
    }

    #[test]
    fn bin_only_says_so() {
        let d = tmp("bin");
        touch(&d, &["pytorch_model.bin"]);
        let e = resolve_weight_files(&d, None).unwrap_err().to_string();
        assert!(e.contains("safetensors"), "{e}");
    }
}
