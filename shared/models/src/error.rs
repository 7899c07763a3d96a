//! The model layer's error type: every variant names the problem and, where there is one, the fix.

use std::path::PathBuf;

/// Result alias for the model layer.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Errors from loading checkpoints and running models.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A tensor operation failed (shape mismatch, missing tensor in a checkpoint, ...).
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// A file that must be present is not.
    #[error("missing file {path}: {hint}")]
    MissingFile { path: PathBuf, hint: String },
    /// A file exists but cannot be read or parsed.
    #[error("cannot read {path}: {reason}")]
    CorruptFile { path: PathBuf, reason: String },
    /// A pipeline or component class that relayfarm does not implement.
    #[error("unknown {what} class `{class}`; supported: {supported}")]
    UnknownClass {
        what: String,
        class: String,
        supported: String,
    },
    /// A configuration value that is valid for the reference library but not supported here.
    #[error("unsupported {component} setting `{field}` = {value}: {hint}")]
    UnsupportedConfig {
        component: String,
        field: String,
        value: String,
        hint: String,
    },
    /// A request parameter that breaks a rule of the model (bad size, zero steps, ...).
    #[error("invalid {field}: {message}")]
    InvalidInput { field: String, message: String },
    /// Tokenizer construction or encoding failed.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// The job was cancelled at a step boundary.
    #[error("cancelled at step {step}")]
    Cancelled {
        /// The step at which the cancellation was noticed.
        step: usize,
    },
}

impl ModelError {
    /// A short stable label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            ModelError::Candle(_) => "tensor",
            ModelError::MissingFile { .. } => "missing_file",
            ModelError::CorruptFile { .. } => "corrupt_file",
            ModelError::UnknownClass { .. } => "unknown_class",
            ModelError::UnsupportedConfig { .. } => "unsupported_config",
            ModelError::InvalidInput { .. } => "invalid_input",
            ModelError::Tokenizer(_) => "tokenizer",
            ModelError::Cancelled { .. } => "cancelled",
        }
    }

    /// Shorthand for [`ModelError::InvalidInput`].
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ModelError::InvalidInput {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Shorthand for [`ModelError::CorruptFile`].
    pub fn corrupt(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        ModelError::CorruptFile {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}
