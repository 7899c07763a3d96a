//! `model_index.json`: which pipeline, and which class implements each component.

use super::{read_json, ComponentFolder};
use crate::{ModelError, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One component entry of `model_index.json`: `"vae": ["diffusers", "AutoencoderKL"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentEntry {
    /// The library that defines the class (`diffusers`, `transformers`, `kolors`, ...).
    pub library: String,
    /// The class name (`AutoencoderKL`, `T5EncoderModel`, ...).
    pub class: String,
}

/// Parsed `model_index.json`.
#[derive(Debug, Clone)]
pub struct ModelIndex {
    /// `_class_name`: the pipeline class, e.g. `PixArtSigmaPipeline`.
    pub pipeline_class: String,
    /// Component name → entry. Components set to `[null, null]` are omitted.
    pub components: BTreeMap<String, ComponentEntry>,
}

impl ModelIndex {
    /// Parses a `model_index.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: serde_json::Map<String, serde_json::Value> = read_json(path)?;
        let pipeline_class = raw
            .get("_class_name")
            .and_then(|v| v.as_str())
            .ok_or_else(|| ModelError::corrupt(path, "no `_class_name` (the pipeline class)"))?
            .to_string();
        let mut components = BTreeMap::new();
        for (name, value) in &raw {
            if name.starts_with('_') {
                continue;
            }
            let Some(pair) = value.as_array() else {
                continue;
            };
            match (
                pair.first().and_then(|v| v.as_str()),
                pair.get(1).and_then(|v| v.as_str()),
            ) {
                (Some(library), Some(class)) => {
                    components.insert(
                        name.clone(),
                        ComponentEntry {
                            library: library.to_string(),
                            class: class.to_string(),
                        },
                    );
                }
                _ => continue, // `[null, null]`: optional component left out.
            }
        }
        Ok(ModelIndex {
            pipeline_class,
            components,
        })
    }
}

/// A diffusers pipeline folder (the root of a downloaded repository).
#[derive(Debug, Clone)]
pub struct PipelineFolder {
    root: PathBuf,
    index: ModelIndex,
    variant: Option<String>,
}

impl PipelineFolder {
    /// Opens a pipeline folder by reading its `model_index.json`.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        if !root.is_dir() {
            return Err(ModelError::MissingFile {
                path: root,
                hint: "--model must be a diffusers pipeline folder (the one with model_index.json)"
                    .into(),
            });
        }
        let index_path = root.join("model_index.json");
        if !index_path.is_file() {
            return Err(ModelError::MissingFile {
                path: index_path,
                hint: "not a diffusers pipeline folder: point --model at the repository root that holds model_index.json".into(),
            });
        }
        let index = ModelIndex::from_file(&index_path)?;
        Ok(PipelineFolder {
            root,
            index,
            variant: None,
        })
    }

    /// The preferred weight variant, if any.
    pub fn variant(&self) -> Option<&str> {
        self.variant.as_deref()
    }

    /// Prefers the named weight variant (e.g. `fp16`) for every component.
    pub fn with_variant(mut self, variant: Option<String>) -> Self {
        self.variant = variant;
        self
    }

    /// The folder path.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The parsed `model_index.json`.
    pub fn index(&self) -> &ModelIndex {
        &self.index
    }

    /// The pipeline class name.
    pub fn pipeline_class(&self) -> &str {
        &self.index.pipeline_class
    }

    /// Opens the named component, checking that `model_index.json` lists it with one of
    /// `accepted` classes (pass an empty slice to accept any).
    pub fn component(&self, name: &str, accepted: &[&str]) -> Result<ComponentFolder> {
        let entry = self.index.components.get(name).ok_or_else(|| {
            ModelError::corrupt(
                self.root.join("model_index.json"),
                format!("the pipeline lists no `{name}` component"),
            )
        })?;
        if !accepted.is_empty() && !accepted.contains(&entry.class.as_str()) {
            return Err(ModelError::UnknownClass {
                what: name.to_string(),
                class: entry.class.clone(),
                supported: accepted.join(", "),
            });
        }
        Ok(
            ComponentFolder::open(self.root.join(name), name, entry.class.clone())?
                .with_variant(self.variant.clone()),
        )
    }
}
