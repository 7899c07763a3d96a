//! Generation metadata written into every PNG as text chunks.

use serde::{Deserialize, Serialize};

/// What produced an image: enough to reproduce it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationMetadata {
    /// The prompt as given (before the pipeline's own preprocessing).
    pub prompt: String,
    /// The negative prompt as given.
    pub negative_prompt: String,
    /// Noise seed.
    pub seed: u64,
    /// Denoising steps.
    pub steps: u32,
    /// Guidance scale.
    pub guidance: f64,
    /// Output width in pixels.
    pub width: u32,
    /// Output height in pixels.
    pub height: u32,
    /// Model name or path.
    pub model: String,
    /// Scheduler class.
    pub scheduler: String,
    /// Run dtype (f32, f16, bf16).
    pub dtype: String,
    /// relayfarm version.
    pub version: String,
}

impl GenerationMetadata {
    /// Key/value pairs for PNG `tEXt`/`iTXt` chunks. Keys are stable; `parameters` holds the
    /// whole record as JSON for tools that want one field.
    pub fn text_chunks(&self) -> Vec<(String, String)> {
        let mut v = vec![
            ("prompt".to_string(), self.prompt.clone()),
            ("negative_prompt".to_string(), self.negative_prompt.clone()),
            ("seed".to_string(), self.seed.to_string()),
            ("steps".to_string(), self.steps.to_string()),
            ("guidance".to_string(), self.guidance.to_string()),
            ("width".to_string(), self.width.to_string()),
            ("height".to_string(), self.height.to_string()),
            (
                "size".to_string(),
                format!("{}x{}", self.width, self.height),
            ),
            ("model".to_string(), self.model.clone()),
            ("scheduler".to_string(), self.scheduler.clone()),
            ("dtype".to_string(), self.dtype.clone()),
            (
                "software".to_string(),
                format!("relayfarm {}", self.version),
            ),
            ("version".to_string(), self.version.clone()),
        ];
        if let Ok(json) = serde_json::to_string(self) {
            v.push(("parameters".to_string(), json));
        }
        v
    }
}
