//! The dtype a model runs in, chosen once at load time.

use candle_core::DType;

/// The run dtype: weights are converted to it once, when they are loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RunDtype {
    /// 32-bit float (the parity reference).
    #[default]
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

impl RunDtype {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            RunDtype::F32 => DType::F32,
            RunDtype::F16 => DType::F16,
            RunDtype::Bf16 => DType::BF16,
        }
    }

    /// The name used on the command line and in PNG metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            RunDtype::F32 => "f32",
            RunDtype::F16 => "f16",
            RunDtype::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for RunDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(RunDtype::F32),
            "f16" | "fp16" | "float16" => Ok(RunDtype::F16),
            "bf16" | "bfloat16" => Ok(RunDtype::Bf16),
            other => Err(format!("unknown dtype `{other}`: use f32, f16 or bf16")),
        }
    }
}

impl std::fmt::Display for RunDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
