//! KV token compression for self-attention (PixArt-Σ, models-spec §1.3).
//!
//! From the original PixArt-Σ code (`diffusion/model/nets/PixArt_blocks.py:
//! AttentionKVCompress.downsample_2d`); diffusers has no equivalent and no compressed
//! checkpoint was released. In the listed blocks the self-attention keys and values (after
//! their projections) are laid back on the token grid `(B, gh, gw, C)` and downsampled by
//! `scale_factor` on each axis; queries keep every token, so the attention cost drops by
//! `scale_factor²`.
//!
//! Sampling modes:
//! - `conv`: depthwise `Conv2d(C, C, kernel = stride = s, groups = C)` with bias, then
//!   `LayerNorm(C)` (affine, eps 1e-5). Weights `sr.{weight,bias}` and `norm.{weight,bias}`
//!   under the block's `attn1` prefix when the checkpoint has them; otherwise the original's
//!   initialisation (weights `1/s²`, zero bias, LayerNorm weight 1 and bias 0), which makes the
//!   convolution an `s×s` average.
//! - `uniform`: every `s`-th token on each axis (`x[::s, ::s]`).
//! - `ave`: the original's `F.interpolate(scale_factor=1/s, mode='nearest')`, which picks the
//!   same tokens as `uniform` (the name notwithstanding, it does not average).
//!
//! Grids that are not multiples of `s` keep `floor(g/s)` rows/columns (the trailing partial
//! window is dropped), as the strided convolution and the nearest resize do.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::{ModelError, Result};

/// How keys and values are downsampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KvSampling {
    /// Depthwise strided convolution followed by a LayerNorm (the original's default).
    #[default]
    Conv,
    /// Strided subsampling: the top-left token of every `s×s` window.
    Uniform,
    /// Nearest-neighbour resize by `1/s` (selects the same tokens as [`KvSampling::Uniform`]).
    Ave,
}

impl std::str::FromStr for KvSampling {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "conv" => Ok(KvSampling::Conv),
            "uniform" => Ok(KvSampling::Uniform),
            "ave" => Ok(KvSampling::Ave),
            other => Err(format!(
                "unknown KV-compression sampling `{other}`: use conv, uniform or ave"
            )),
        }
    }
}

/// Which blocks compress their self-attention keys/values, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCompressConfig {
    /// Block indices (0-based) whose self-attention is compressed.
    pub layers: Vec<usize>,
    /// Downsampling factor per axis (the original uses 2).
    pub scale_factor: usize,
    /// The downsampling operator.
    pub sampling: KvSampling,
}

impl Default for KvCompressConfig {
    /// The original's `*kvcompress.py` configs: blocks 14–27, factor 2, `conv`.
    fn default() -> Self {
        Self {
            layers: (14..28).collect(),
            scale_factor: 2,
            sampling: KvSampling::Conv,
        }
    }
}

impl KvCompressConfig {
    /// Checks the settings against a model with `num_layers` blocks.
    pub fn validate(&self, num_layers: usize) -> Result<()> {
        if self.scale_factor < 2 {
            return Err(ModelError::invalid(
                "kv_compress.scale_factor",
                format!("must be at least 2, got {}", self.scale_factor),
            ));
        }
        if let Some(&bad) = self.layers.iter().find(|&&l| l >= num_layers) {
            return Err(ModelError::invalid(
                "kv_compress.layers",
                format!("block {bad} does not exist (the model has {num_layers} blocks)"),
            ));
        }
        Ok(())
    }
}

/// Weights of the `conv` mode.
#[derive(Debug, Clone)]
struct ConvDown {
    /// Depthwise kernel laid out `[1, 1, s, 1, s, C]` to broadcast over `(B, nh, s, nw, s, C)`.
    weight: Tensor,
    bias: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
}

/// The KV compressor of one self-attention block.
#[derive(Debug, Clone)]
pub struct KvCompress {
    scale: usize,
    sampling: KvSampling,
    conv: Option<ConvDown>,
    trained: bool,
}

/// LayerNorm epsilon of the original's `nn.LayerNorm(dim)`.
const NORM_EPS: f32 = 1e-5;

impl KvCompress {
    /// Builds the compressor for a block with `channels` attention channels; `vb` is the
    /// block's `attn1` prefix (`transformer_blocks.i.attn1`).
    pub fn new(cfg: &KvCompressConfig, channels: usize, vb: VarBuilder) -> Result<Self> {
        let s = cfg.scale_factor;
        if s < 2 {
            return Err(ModelError::invalid(
                "kv_compress.scale_factor",
                format!("must be at least 2, got {s}"),
            ));
        }
        let (conv, trained) = match cfg.sampling {
            KvSampling::Conv => {
                let trained = vb.contains_tensor("sr.weight");
                let (w, b, nw, nb) = if trained {
                    (
                        vb.get((channels, 1, s, s), "sr.weight")?
                            .reshape((channels, s, s))?,
                        vb.get(channels, "sr.bias")?,
                        vb.get(channels, "norm.weight")?,
                        vb.get(channels, "norm.bias")?,
                    )
                } else {
                    let (dt, dev) = (vb.dtype(), vb.device());
                    let avg = 1.0 / (s * s) as f64;
                    (
                        Tensor::full(avg as f32, (channels, s, s), dev)?.to_dtype(dt)?,
                        Tensor::zeros(channels, dt, dev)?,
                        Tensor::ones(channels, dt, dev)?,
                        Tensor::zeros(channels, dt, dev)?,
                    )
                };
                // [C, s(p), s(q)] -> [p, q, C] -> [1, 1, p, 1, q, C]
                let weight = w
                    .permute((1, 2, 0))?
                    .contiguous()?
                    .reshape((1, 1, s, 1, s, channels))?;
                let conv = ConvDown {
                    weight,
                    bias: b,
                    norm_weight: nw,
                    norm_bias: nb,
                };
                (Some(conv), trained)
            }
            KvSampling::Uniform | KvSampling::Ave => (None, true),
        };
        Ok(Self {
            scale: s,
            sampling: cfg.sampling,
            conv,
            trained,
        })
    }

    /// False when `conv` mode runs on the default (averaging) initialisation because the
    /// checkpoint has no trained `sr`/`norm` weights.
    pub fn has_trained_weights(&self) -> bool {
        self.trained
    }

    /// The compressed grid for a `gh × gw` token grid.
    pub fn output_grid(&self, gh: usize, gw: usize) -> Result<(usize, usize)> {
        let (nh, nw) = (gh / self.scale, gw / self.scale);
        if nh == 0 || nw == 0 {
            return Err(ModelError::invalid(
                "kv_compress",
                format!(
                    "token grid {gh}x{gw} is smaller than the compression factor {}",
                    self.scale
                ),
            ));
        }
        Ok((nh, nw))
    }

    /// Compresses `x` `[B, gh·gw, C]` (tokens in row-major grid order) to
    /// `[B, nh·nw, C]` with `(nh, nw) = (gh/s, gw/s)` (floored).
    pub fn forward(&self, x: &Tensor, gh: usize, gw: usize) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        if n != gh * gw {
            return Err(ModelError::invalid(
                "kv_compress",
                format!("{n} tokens do not form a {gh}x{gw} grid"),
            ));
        }
        let s = self.scale;
        let (nh, nw) = self.output_grid(gh, gw)?;
        let mut grid = x.contiguous()?.reshape((b, gh, gw, c))?;
        if nh * s != gh {
            grid = grid.narrow(1, 0, nh * s)?;
        }
        if nw * s != gw {
            grid = grid.narrow(2, 0, nw * s)?;
        }
        // (B, nh, p, nw, q, C): window (i, j) holds rows i·s+p and columns j·s+q.
        let windows = grid.reshape((b, nh, s, nw, s, c))?;
        let out = match (self.sampling, &self.conv) {
            (KvSampling::Conv, Some(conv)) => {
                let pooled = windows
                    .broadcast_mul(&conv.weight)?
                    .sum(4)?
                    .sum(2)?
                    .broadcast_add(&conv.bias)?
                    .reshape((b, nh * nw, c))?;
                super::fused::layer_norm_modulate(
                    &pooled,
                    &conv.norm_weight,
                    &conv.norm_bias,
                    NORM_EPS,
                )?
            }
            (KvSampling::Conv, None) => {
                return Err(ModelError::invalid(
                    "kv_compress",
                    "conv sampling without convolution weights",
                ))
            }
            (KvSampling::Uniform | KvSampling::Ave, _) => windows
                .narrow(4, 0, 1)?
                .narrow(2, 0, 1)?
                .contiguous()?
                .reshape((b, nh * nw, c))?,
        };
        Ok(out)
    }

    /// The dtype of the compressor's weights (for checks).
    pub fn dtype(&self) -> Option<DType> {
        self.conv.as_ref().map(|c| c.weight.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A builder with no tensors at all (`VarBuilder::zeros` claims to hold every name).
    fn empty_vb() -> VarBuilder<'static> {
        VarBuilder::from_tensors(std::collections::HashMap::new(), DType::F32, &Device::Cpu)
    }

    /// Tokens of a `gh × gw` grid with `c` channels: value `100·row + 10·col + channel`.
    fn grid_tokens(gh: usize, gw: usize, c: usize) -> Tensor {
        let mut v = Vec::new();
        for i in 0..gh {
            for j in 0..gw {
                for k in 0..c {
                    v.push((100 * i + 10 * j + k) as f32);
                }
            }
        }
        Tensor::from_vec(v, (1, gh * gw, c), &Device::Cpu).unwrap()
    }

    fn cfg(sampling: KvSampling) -> KvCompressConfig {
        KvCompressConfig {
            layers: vec![0],
            scale_factor: 2,
            sampling,
        }
    }

    #[test]
    fn uniform_and_ave_pick_top_left_of_each_window() {
        // 3x5 grid, s = 2 -> 1x2 grid: tokens (0,0) and (0,2).
        let x = grid_tokens(3, 5, 2);
        for sampling in [KvSampling::Uniform, KvSampling::Ave] {
            let kv = KvCompress::new(&cfg(sampling), 2, empty_vb()).unwrap();
            assert!(kv.has_trained_weights());
            let y = kv.forward(&x, 3, 5).unwrap();
            assert_eq!(y.dims(), &[1, 2, 2]);
            let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(y, vec![0.0, 1.0, 20.0, 21.0]);
        }
        // 4x4 grid -> 2x2: tokens (0,0), (0,2), (2,0), (2,2).
        let x = grid_tokens(4, 4, 1);
        let kv = KvCompress::new(&cfg(KvSampling::Uniform), 1, empty_vb()).unwrap();
        let y: Vec<f32> = kv
            .forward(&x, 4, 4)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(y, vec![0.0, 20.0, 200.0, 220.0]);
    }

    #[test]
    fn conv_default_init_averages_then_normalises() {
        // No `sr.weight` in the builder -> default averaging init.
        let (gh, gw, c) = (2, 4, 3);
        let x = grid_tokens(gh, gw, c);
        let kv = KvCompress::new(&cfg(KvSampling::Conv), c, empty_vb()).unwrap();
        assert!(!kv.has_trained_weights());
        let y = kv.forward(&x, gh, gw).unwrap();
        assert_eq!(y.dims(), &[1, 2, 3]);
        let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        // Window 0 averages rows {0,1} x cols {0,1}: 100·0.5 + 10·0.5 + k = 55 + k;
        // window 1 (cols {2,3}): 50 + 25 + k = 75 + k. LayerNorm over k ∈ {0,1,2}:
        // mean 1, var 2/3 -> (k-1)/sqrt(2/3 + 1e-5).
        let d = (2.0f64 / 3.0 + 1e-5).sqrt();
        let want: Vec<f32> = (0..2)
            .flat_map(|_| (0..3).map(move |k| ((k as f64 - 1.0) / d) as f32))
            .collect();
        for (g, w) in y.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "got {y:?}, want {want:?}");
        }
    }

    #[test]
    fn conv_uses_checkpoint_weights_when_present() {
        let dev = Device::Cpu;
        let c = 2;
        let mut map = std::collections::HashMap::new();
        // Channel 0 picks the bottom-right of each window, channel 1 sums the window.
        let w = Tensor::new(&[[[[0f32, 0.], [0., 1.]]], [[[1f32, 1.], [1., 1.]]]], &dev).unwrap();
        map.insert("sr.weight".to_string(), w);
        map.insert(
            "sr.bias".to_string(),
            Tensor::new(&[1f32, -1.], &dev).unwrap(),
        );
        map.insert(
            "norm.weight".to_string(),
            Tensor::new(&[2f32, 2.], &dev).unwrap(),
        );
        map.insert(
            "norm.bias".to_string(),
            Tensor::new(&[0.5f32, 0.5], &dev).unwrap(),
        );
        let vb = VarBuilder::from_tensors(map, DType::F32, &dev);
        let kv = KvCompress::new(&cfg(KvSampling::Conv), c, vb).unwrap();
        assert!(kv.has_trained_weights());
        let x = grid_tokens(2, 2, c);
        let y: Vec<f32> = kv
            .forward(&x, 2, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // ch0: token (1,1) ch0 = 110, +1 -> 111; ch1: (1+11+101+111) - 1 = 223.
        // LayerNorm of [111, 223]: mean 167, var 3136 -> ±56/sqrt(3136+1e-5)·2 + 0.5.
        let z = 56.0 / (3136.0f64 + 1e-5).sqrt();
        let want = [(-z * 2.0 + 0.5) as f32, (z * 2.0 + 0.5) as f32];
        assert!((y[0] - want[0]).abs() < 1e-5 && (y[1] - want[1]).abs() < 1e-5);
    }

    #[test]
    fn shapes_and_errors() {
        let kv = KvCompress::new(&cfg(KvSampling::Conv), 8, empty_vb()).unwrap();
        let x = Tensor::zeros((2, 6 * 10, 8), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(kv.forward(&x, 6, 10).unwrap().dims(), &[2, 15, 8]);
        assert_eq!(kv.output_grid(7, 9).unwrap(), (3, 4));
        assert!(kv.forward(&x, 5, 10).is_err());
        let tiny = Tensor::zeros((1, 3, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(kv.forward(&tiny, 1, 3).is_err());
        let bad = KvCompressConfig {
            layers: vec![30],
            ..KvCompressConfig::default()
        };
        assert!(bad.validate(28).is_err());
        assert!(KvCompressConfig::default().validate(28).is_ok());
        assert_eq!("AVE".parse::<KvSampling>().unwrap(), KvSampling::Ave);
    }
}
