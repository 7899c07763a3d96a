//! One component folder of a pipeline (`transformer/`, `vae/`, `text_encoder/`, ...).

use super::{read_json, resolve_weight_files, WeightFiles};
use crate::{ModelError, Result, RunDtype};
use candle_core::Device;
use candle_nn::VarBuilder;
use std::path::{Path, PathBuf};

/// A component folder: its config files and weights.
#[derive(Debug, Clone)]
pub struct ComponentFolder {
    dir: PathBuf,
    name: String,
    class: String,
    variant: Option<String>,
}

impl ComponentFolder {
    /// Opens a component folder; `name` is the component's key in `model_index.json` and
    /// `class` the class it declares.
    pub fn open(dir: impl AsRef<Path>, name: &str, class: String) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(ModelError::MissingFile {
                path: dir,
                hint: format!(
                    "model_index.json lists the `{name}` component but its folder is missing; download the whole repository"
                ),
            });
        }
        Ok(ComponentFolder {
            dir,
            name: name.to_string(),
            class,
            variant: None,
        })
    }

    /// Prefers the named weight variant (e.g. `fp16`) whenever weights are loaded without an
    /// explicit variant.
    pub fn with_variant(mut self, variant: Option<String>) -> Self {
        self.variant = variant;
        self
    }

    /// The folder path.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The component's name in `model_index.json`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The class declared in `model_index.json`.
    pub fn class(&self) -> &str {
        &self.class
    }

    /// Parses `config.json`.
    pub fn config<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        self.json_file("config.json")
    }

    /// Parses a named JSON file of the folder (e.g. `scheduler_config.json`).
    pub fn json_file<T: serde::de::DeserializeOwned>(&self, file: &str) -> Result<T> {
        read_json(&self.dir.join(file))
    }

    /// Finds the weight files (single or sharded). `variant` (e.g. `fp16`) overrides the
    /// folder's preferred variant.
    pub fn weight_files(&self, variant: Option<&str>) -> Result<WeightFiles> {
        resolve_weight_files(&self.dir, variant.or(self.variant.as_deref()))
    }

    /// Memory-maps the weights; tensors are converted to `dtype` once, when a model takes them.
    pub fn var_builder(
        &self,
        dtype: RunDtype,
        device: &Device,
        variant: Option<&str>,
    ) -> Result<VarBuilder<'static>> {
        self.weight_files(variant)?.var_builder(dtype, device)
    }
}
