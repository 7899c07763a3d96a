//! Jobs: one image to render, with every parameter resolved.

use serde::{Deserialize, Serialize};

/// Per-image overrides of the batch defaults. `None` means "use the default".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenderParams {
    /// Negative prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    /// Output height in pixels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    /// Output width in pixels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    /// Number of denoising steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f64>,
    /// Noise seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl RenderParams {
    /// `self`, with every unset field taken from `defaults`.
    pub fn or(&self, defaults: &RenderParams) -> RenderParams {
        RenderParams {
            negative_prompt: self
                .negative_prompt
                .clone()
                .or_else(|| defaults.negative_prompt.clone()),
            height: self.height.or(defaults.height),
            width: self.width.or(defaults.width),
            steps: self.steps.or(defaults.steps),
            guidance: self.guidance.or(defaults.guidance),
            seed: self.seed.or(defaults.seed),
        }
    }
}

/// A stable job identifier: unique within its batch, stable across re-runs of the same batch
/// (so a resumed batch recognises work already done).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobId(pub String);

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One image to render: the prompt and its parameters (model defaults not yet applied).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Job id.
    pub id: JobId,
    /// Position in the batch (0-based).
    pub index: usize,
    /// The prompt.
    pub prompt: String,
    /// Parameters (overrides already merged with the batch defaults).
    pub params: RenderParams,
    /// Output file name stem (without extension), when the prompt set names one.
    pub name: Option<String>,
}
