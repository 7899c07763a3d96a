//! Pipeline stages and the typed messages that flow between them.
//!
//! Every pipeline is the same graph: `encode-text → denoise → decode`. A process may load any
//! subset of the stages ([`StageSet`]); the messages between stages are plain named tensors
//! plus a few scalars, so they cross a thread, a process or a GPU boundary unchanged (see
//! [`crate::link`]).

use crate::{ModelError, Result};
use candle_core::{Device, Tensor};
use std::fmt;
use std::str::FromStr;

/// One stage of a pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// Tokenizer and text encoder: prompt → [`Conditioning`].
    TextEncoder,
    /// The denoiser and scheduler loop: conditioning + noise → final latents.
    Denoiser,
    /// The VAE decoder: latents → image.
    Vae,
}

impl Stage {
    /// Every stage, in pipeline order.
    pub const ALL: [Stage; 3] = [Stage::TextEncoder, Stage::Denoiser, Stage::Vae];

    /// The stage's name as the CLI and the replica layout spell it.
    pub fn name(self) -> &'static str {
        match self {
            Stage::TextEncoder => "text-encoder",
            Stage::Denoiser => "denoiser",
            Stage::Vae => "vae",
        }
    }

    /// The stage's position in the pipeline (0, 1, 2).
    pub fn index(self) -> usize {
        match self {
            Stage::TextEncoder => 0,
            Stage::Denoiser => 1,
            Stage::Vae => 2,
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Stage {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "text-encoder" | "text_encoder" | "encoder" => Ok(Stage::TextEncoder),
            "denoiser" | "transformer" | "unet" => Ok(Stage::Denoiser),
            "vae" | "decoder" => Ok(Stage::Vae),
            other => Err(ModelError::invalid(
                "stage",
                format!("unknown stage `{other}`: use text-encoder, denoiser or vae"),
            )),
        }
    }
}

/// A set of stages: what one process loads and runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StageSet(u8);

impl StageSet {
    /// Every stage (the embedded, single-process default).
    pub const fn all() -> Self {
        StageSet(0b111)
    }

    /// No stage.
    pub const fn empty() -> Self {
        StageSet(0)
    }

    /// Only `stage`.
    pub const fn only(stage: Stage) -> Self {
        StageSet(1 << stage as u8)
    }

    /// This set plus `stage`.
    pub const fn with(self, stage: Stage) -> Self {
        StageSet(self.0 | (1 << stage as u8))
    }

    /// Whether `stage` is in the set.
    pub const fn contains(self, stage: Stage) -> bool {
        self.0 & (1 << stage as u8) != 0
    }

    /// The stages in the set, in pipeline order.
    pub fn iter(self) -> impl Iterator<Item = Stage> {
        Stage::ALL.into_iter().filter(move |s| self.contains(*s))
    }

    /// An error for running `stage` in a process that did not load it.
    pub fn require(self, stage: Stage) -> Result<()> {
        if self.contains(stage) {
            Ok(())
        } else {
            Err(ModelError::invalid(
                "stage",
                format!(
                    "the {stage} stage is not loaded in this process (loaded: {self}); send the work to the {stage} worker"
                ),
            ))
        }
    }
}

impl Default for StageSet {
    fn default() -> Self {
        StageSet::all()
    }
}

impl fmt::Display for StageSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.iter().map(Stage::name).collect();
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join(","))
        }
    }
}

/// The message from the text-encoder stage to the denoiser: named tensors (e.g. PixArt's
/// `prompt_embeds` and `prompt_mask`, Kolors' `pooled`) and whether the batch holds an
/// unconditional half for classifier-free guidance (`[uncond, cond]` order).
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// Whether the tensors hold `[uncond, cond]` along dim 0.
    pub cfg: bool,
    /// The tensors, by name, in a stable order.
    pub tensors: Vec<(String, Tensor)>,
}

impl Conditioning {
    /// Empty conditioning.
    pub fn new(cfg: bool) -> Self {
        Conditioning {
            cfg,
            tensors: Vec::new(),
        }
    }

    /// Adds (or replaces) a named tensor.
    pub fn with(mut self, name: &str, tensor: Tensor) -> Self {
        self.tensors.retain(|(n, _)| n != name);
        self.tensors.push((name.to_string(), tensor));
        self
    }

    /// The tensor called `name`, or an error naming what is missing.
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| {
                let have: Vec<&str> = self.tensors.iter().map(|(n, _)| n.as_str()).collect();
                ModelError::invalid(
                    "conditioning",
                    format!("tensor `{name}` is missing (have {have:?}): was it made by the same model's text encoder?"),
                )
            })
    }

    /// The same conditioning with every tensor moved to `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let tensors = self
            .tensors
            .iter()
            .map(|(n, t)| Ok((n.clone(), t.to_device(device)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Conditioning {
            cfg: self.cfg,
            tensors,
        })
    }

    /// Bytes held by the tensors.
    pub fn nbytes(&self) -> usize {
        self.tensors
            .iter()
            .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_sets() {
        let s = StageSet::only(Stage::Denoiser).with(Stage::Vae);
        assert!(!s.contains(Stage::TextEncoder));
        assert!(s.contains(Stage::Denoiser) && s.contains(Stage::Vae));
        assert_eq!(s.to_string(), "denoiser,vae");
        assert!(s.require(Stage::TextEncoder).is_err());
        assert_eq!(StageSet::all().iter().count(), 3);
        assert_eq!("vae".parse::<Stage>().unwrap(), Stage::Vae);
        assert!("gpu".parse::<Stage>().is_err());
    }

    #[test]
    fn conditioning_lookup_names_missing_tensor() {
        let t = Tensor::zeros((1, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let c = Conditioning::new(false).with("prompt_embeds", t);
        assert!(c.get("prompt_embeds").is_ok());
        let e = c.get("pooled").unwrap_err().to_string();
        assert!(e.contains("pooled") && e.contains("prompt_embeds"), "{e}");
        assert_eq!(c.nbytes(), 8);
    }
}
