//! The T5 (v1.1) encoder: transformers' `T5EncoderModel` (`models/t5/modeling_t5.py`).
//!
//! Pre-norm blocks of self-attention and a (gated) feed-forward network with RMS norms, no
//! biases, unscaled attention (`scale = 1`) and a learned relative-position bias computed by
//! the first block and shared by all of them.
//!
//! Precision: the residual stream, the norms and the feed-forward output projection `wo` are
//! kept in f32 whatever the run dtype. transformers keeps `wo` in f32
//! (`_keep_in_fp32_modules = ["wo"]`), which promotes its residual stream to f32 after the first
//! block; T5 v1.1 activations overflow f16 otherwise. The gated product `act(wi_0 x) · wi_1 x`
//! is also formed in f32 here. The projections `q k v o wi` run in the run dtype.

use crate::checkpoint::ComponentFolder;
use crate::nn::attention::scaled_dot_product_attention;
use crate::{ModelError, Result, RunDtype};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{linear_no_bias, Linear, VarBuilder};

fn default_vocab_size() -> usize {
    32128
}
fn default_d_model() -> usize {
    512
}
fn default_d_kv() -> usize {
    64
}
fn default_d_ff() -> usize {
    2048
}
fn default_num_layers() -> usize {
    6
}
fn default_num_heads() -> usize {
    8
}
fn default_num_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff_proj() -> String {
    "relu".into()
}

/// `text_encoder/config.json` of a `T5EncoderModel` (transformers' `T5Config`; defaults as
/// there, other fields ignored).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct T5EncoderConfig {
    /// Vocabulary size (rows of `shared.weight`).
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    /// Hidden size.
    #[serde(default = "default_d_model")]
    pub d_model: usize,
    /// Size of one attention head.
    #[serde(default = "default_d_kv")]
    pub d_kv: usize,
    /// Feed-forward inner size.
    #[serde(default = "default_d_ff")]
    pub d_ff: usize,
    /// Number of encoder blocks.
    #[serde(default = "default_num_layers")]
    pub num_layers: usize,
    /// Number of attention heads.
    #[serde(default = "default_num_heads")]
    pub num_heads: usize,
    /// Number of relative-position buckets.
    #[serde(default = "default_num_buckets")]
    pub relative_attention_num_buckets: usize,
    /// Distance beyond which relative positions share a bucket.
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    /// RMS-norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// `"gated-gelu"` (T5 v1.1), `"relu"` (original T5), or `[gated-]{relu,gelu,gelu_new,silu}`.
    #[serde(default = "default_ff_proj")]
    pub feed_forward_proj: String,
}

/// The feed-forward activation (transformers' `ACT2FN[dense_act_fn]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum T5Activation {
    /// `relu`.
    Relu,
    /// `gelu`: exact (erf) GELU.
    GeluErf,
    /// `gelu_new` / `gelu_pytorch_tanh`: tanh-approximated GELU.
    GeluTanh,
    /// `silu` / `swish`.
    Silu,
}

impl T5Activation {
    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            T5Activation::Relu => x.relu(),
            T5Activation::GeluErf => x.gelu_erf(),
            T5Activation::GeluTanh => x.gelu(),
            T5Activation::Silu => x.silu(),
        }
    }
}

impl T5EncoderConfig {
    /// Whether the feed-forward is gated, and its activation, as transformers derives them from
    /// `feed_forward_proj` (`"gated-gelu"` means `gelu_new`).
    pub fn activation(&self) -> Result<(bool, T5Activation)> {
        let unsupported = || ModelError::UnsupportedConfig {
            component: "text_encoder (T5)".into(),
            field: "feed_forward_proj".into(),
            value: self.feed_forward_proj.clone(),
            hint: "supported: relu, gelu, gelu_new, silu, each optionally `gated-`".into(),
        };
        let proj = self.feed_forward_proj.as_str();
        let (gated, act) = match proj.split_once('-') {
            Some(("gated", act)) => (true, act),
            None => (false, proj),
            Some(_) => return Err(unsupported()),
        };
        let act = match (proj, act) {
            ("gated-gelu", _) => T5Activation::GeluTanh,
            (_, "relu") => T5Activation::Relu,
            (_, "gelu") => T5Activation::GeluErf,
            (_, "gelu_new" | "gelu_pytorch_tanh") => T5Activation::GeluTanh,
            (_, "silu" | "swish") => T5Activation::Silu,
            _ => return Err(unsupported()),
        };
        Ok((gated, act))
    }

    fn validate(&self) -> Result<()> {
        let nb = self.relative_attention_num_buckets;
        if nb < 4 || self.relative_attention_max_distance <= nb / 4 {
            return Err(ModelError::UnsupportedConfig {
                component: "text_encoder (T5)".into(),
                field: "relative_attention_num_buckets / relative_attention_max_distance".into(),
                value: format!("{nb} / {}", self.relative_attention_max_distance),
                hint: "need at least 4 buckets and max_distance > num_buckets / 4".into(),
            });
        }
        if self.num_heads == 0 || self.d_kv == 0 || self.num_layers == 0 {
            return Err(ModelError::invalid(
                "text_encoder config",
                "num_heads, d_kv and num_layers must be positive",
            ));
        }
        Ok(())
    }
}

/// transformers' `T5Attention._relative_position_bucket`: the bucket of
/// `relative_position = key_position − query_position`.
///
/// Half the buckets (per direction when `bidirectional`) are exact offsets, the rest grow
/// logarithmically up to `max_distance`. The logarithm is evaluated in f32 like the torch
/// reference, so bucket boundaries match it exactly.
pub fn relative_position_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut num_buckets = num_buckets;
    let mut bucket = 0;
    let distance = if bidirectional {
        num_buckets /= 2;
        if relative_position > 0 {
            bucket += num_buckets;
        }
        relative_position.unsigned_abs()
    } else {
        (-relative_position.min(0)) as u64
    };
    let max_exact = num_buckets / 2;
    if (distance as usize) < max_exact {
        return bucket + distance as usize;
    }
    let log_ratio = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
    let scaled =
        (distance as f32 / max_exact as f32).ln() / log_ratio * (num_buckets - max_exact) as f32;
    let large = max_exact + scaled as usize;
    bucket + large.min(num_buckets - 1)
}

/// T5's RMS norm (`T5LayerNorm`): `weight · x / sqrt(mean(x²) + eps)`, statistics in f32.
#[derive(Debug, Clone)]
struct T5LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl T5LayerNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(T5LayerNorm {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }

    /// `x` is the f32 residual stream; the result is in the weight's (run) dtype.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_mul(&(variance + self.eps)?.sqrt()?.recip()?)?;
        x.to_dtype(self.weight.dtype())?.broadcast_mul(&self.weight)
    }
}

/// `T5Attention` (self-attention, no biases, scale 1).
#[derive(Debug, Clone)]
struct T5Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    num_heads: usize,
    d_kv: usize,
}

impl T5Attention {
    fn new(cfg: &T5EncoderConfig, vb: VarBuilder) -> Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        Ok(T5Attention {
            q: linear_no_bias(cfg.d_model, inner, vb.pp("q"))?,
            k: linear_no_bias(cfg.d_model, inner, vb.pp("k"))?,
            v: linear_no_bias(cfg.d_model, inner, vb.pp("v"))?,
            o: linear_no_bias(inner, cfg.d_model, vb.pp("o"))?,
            num_heads: cfg.num_heads,
            d_kv: cfg.d_kv,
        })
    }

    fn forward(&self, x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let heads = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, l, self.num_heads, self.d_kv))?
                .transpose(1, 2)
        };
        let q = heads(self.q.forward(x)?)?;
        let k = heads(self.k.forward(x)?)?;
        let v = heads(self.v.forward(x)?)?;
        let out = scaled_dot_product_attention(&q, &k, &v, Some(bias), 1.0)?;
        let out = out
            .transpose(1, 2)?
            .reshape((b, l, self.num_heads * self.d_kv))?;
        self.o.forward(&out)
    }
}

/// `T5DenseGatedActDense` / `T5DenseActDense` (`DenseReluDense`).
#[derive(Debug, Clone)]
struct T5FeedForward {
    /// `wi_0` (gated) or `wi` (plain).
    wi_0: Linear,
    /// `wi_1`, the linear gate input (gated only).
    wi_1: Option<Linear>,
    /// Output projection, always f32.
    wo: Linear,
    act: T5Activation,
}

impl T5FeedForward {
    fn new(cfg: &T5EncoderConfig, vb: VarBuilder) -> Result<Self> {
        let (gated, act) = cfg.activation()?;
        let (wi_0, wi_1) = if gated {
            (
                linear_no_bias(cfg.d_model, cfg.d_ff, vb.pp("wi_0"))?,
                Some(linear_no_bias(cfg.d_model, cfg.d_ff, vb.pp("wi_1"))?),
            )
        } else {
            (linear_no_bias(cfg.d_model, cfg.d_ff, vb.pp("wi"))?, None)
        };
        let wo = linear_no_bias(cfg.d_ff, cfg.d_model, vb.pp("wo").to_dtype(DType::F32))?;
        Ok(T5FeedForward {
            wi_0,
            wi_1,
            wo,
            act,
        })
    }

    /// `x` in the run dtype; the result is f32.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.wi_0.forward(x)?.to_dtype(DType::F32)?;
        let mut h = self.act.apply(&h)?;
        if let Some(wi_1) = &self.wi_1 {
            h = h.mul(&wi_1.forward(x)?.to_dtype(DType::F32)?)?;
        }
        self.wo.forward(&h)
    }
}

/// One `T5Block` of the encoder: `layer.0` self-attention, `layer.1` feed-forward.
#[derive(Debug, Clone)]
struct T5Block {
    attn_norm: T5LayerNorm,
    attn: T5Attention,
    ff_norm: T5LayerNorm,
    ff: T5FeedForward,
}

impl T5Block {
    fn new(cfg: &T5EncoderConfig, vb: VarBuilder) -> Result<Self> {
        let l0 = vb.pp("layer").pp("0");
        let l1 = vb.pp("layer").pp("1");
        Ok(T5Block {
            attn_norm: T5LayerNorm::new(cfg.d_model, cfg.layer_norm_epsilon, l0.pp("layer_norm"))?,
            attn: T5Attention::new(cfg, l0.pp("SelfAttention"))?,
            ff_norm: T5LayerNorm::new(cfg.d_model, cfg.layer_norm_epsilon, l1.pp("layer_norm"))?,
            ff: T5FeedForward::new(cfg, l1.pp("DenseReluDense"))?,
        })
    }

    /// `h`: f32 residual stream; `bias`: position bias plus mask, in the run dtype.
    fn forward(&self, h: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let a = self.attn.forward(&self.attn_norm.forward(h)?, bias)?;
        let h = (h + a.to_dtype(DType::F32)?)?;
        let f = self.ff.forward(&self.ff_norm.forward(&h)?)?;
        h + f
    }
}

/// transformers' `T5EncoderModel`.
#[derive(Debug, Clone)]
pub struct T5Encoder {
    embed_tokens: Tensor,
    relative_attention_bias: Tensor,
    blocks: Vec<T5Block>,
    final_layer_norm: T5LayerNorm,
    cfg: T5EncoderConfig,
    dtype: DType,
}

impl T5Encoder {
    /// Builds the encoder from `T5EncoderModel` weights: `shared.weight` (or its tied copy
    /// `encoder.embed_tokens.weight`), `encoder.block.{i}.layer.{0,1}.…`,
    /// `encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight` and
    /// `encoder.final_layer_norm.weight`. The run dtype is `vb`'s.
    pub fn new(cfg: &T5EncoderConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        cfg.activation()?;
        let embed_name = if vb.contains_tensor("shared.weight") {
            "shared.weight"
        } else {
            "encoder.embed_tokens.weight"
        };
        let embed_tokens = vb.get((cfg.vocab_size, cfg.d_model), embed_name)?;
        let enc = vb.pp("encoder");
        let relative_attention_bias = enc
            .pp("block")
            .pp("0")
            .pp("layer")
            .pp("0")
            .pp("SelfAttention")
            .pp("relative_attention_bias")
            .get(
                (cfg.relative_attention_num_buckets, cfg.num_heads),
                "weight",
            )?;
        let blocks = (0..cfg.num_layers)
            .map(|i| T5Block::new(cfg, enc.pp("block").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = T5LayerNorm::new(
            cfg.d_model,
            cfg.layer_norm_epsilon,
            enc.pp("final_layer_norm"),
        )?;
        Ok(T5Encoder {
            embed_tokens,
            relative_attention_bias,
            blocks,
            final_layer_norm,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    /// Loads the `text_encoder/` component: `config.json` and its (single or sharded)
    /// safetensors, converted to `dtype` tensor by tensor (T5-XXL is 4.7 B parameters: the
    /// resident peak stays at the converted weights, not weights plus mapped files). Of the tied
    /// embedding only one copy is loaded.
    pub fn load(component: &ComponentFolder, dtype: RunDtype, device: &Device) -> Result<Self> {
        let cfg: T5EncoderConfig = component.config()?;
        let files = component.weight_files(None)?;
        for f in &files.files {
            crate::checkpoint::check_safetensors_header(f)?;
        }
        let has_shared = files.files.iter().any(|f| {
            crate::checkpoint::safetensors_names(f)
                .map(|n| n.iter().any(|n| n == "shared.weight"))
                .unwrap_or(false)
        });
        let vb = files.lean_var_builder(dtype, device, |name| {
            let unused = (has_shared && name == "encoder.embed_tokens.weight")
                || name.starts_with("decoder.")
                || name == "lm_head.weight";
            (!unused).then(|| name.to_string())
        })?;
        Self::new(&cfg, vb)
    }

    /// The configuration.
    pub fn config(&self) -> &T5EncoderConfig {
        &self.cfg
    }

    /// The run dtype (of the output).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// The relative-position bias `[1, H, L, L]` in the run dtype.
    fn position_bias(&self, len: usize) -> candle_core::Result<Tensor> {
        let mut buckets = Vec::with_capacity(len * len);
        for q in 0..len as i64 {
            for k in 0..len as i64 {
                buckets.push(relative_position_bucket(
                    k - q,
                    true,
                    self.cfg.relative_attention_num_buckets,
                    self.cfg.relative_attention_max_distance,
                ) as u32);
            }
        }
        let buckets = Tensor::from_vec(buckets, len * len, self.device())?;
        self.relative_attention_bias
            .index_select(&buckets, 0)?
            .reshape((len, len, self.cfg.num_heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)
    }

    /// Encodes `input_ids` (`[B, L]`, u32 or i64) into hidden states `[B, L, d_model]` in the
    /// run dtype. `attention_mask` (`[B, L]`, any dtype, non-zero = attend) hides padding keys
    /// as transformers does (the bias of masked keys is the dtype's minimum); without it every
    /// token, padding included, is attended.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        let ids = input_ids.to_dtype(DType::U32)?;
        let h = self
            .embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, l, self.cfg.d_model))?
            .to_dtype(DType::F32)?;
        let position_bias = self.position_bias(l)?;
        let bias = match attention_mask {
            None => position_bias,
            Some(mask) => {
                if mask.dims() != [b, l] {
                    return Err(ModelError::invalid(
                        "attention_mask",
                        format!(
                            "shape {:?} does not match input_ids [{b}, {l}]",
                            mask.dims()
                        ),
                    ));
                }
                let shape = (b, self.cfg.num_heads, l, l);
                let keep = mask
                    .to_dtype(DType::F32)?
                    .ne(0f32)?
                    .reshape((b, 1, 1, l))?
                    .broadcast_as(shape)?;
                let min = Tensor::new(dtype_min(self.dtype), self.device())?
                    .to_dtype(self.dtype)?
                    .broadcast_as(shape)?;
                keep.where_cond(&position_bias.broadcast_as(shape)?, &min)?
            }
        };
        let mut h = h;
        for block in &self.blocks {
            h = block.forward(&h, &bias)?;
        }
        Ok(self.final_layer_norm.forward(&h)?)
    }
}

/// `torch.finfo(dtype).min`, the bias transformers puts on masked keys.
fn dtype_min(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => half::f16::MIN.to_f32(),
        DType::BF16 => half::bf16::MIN.to_f32(),
        _ => f32::MIN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_transformers() {
        // torch: T5Attention._relative_position_bucket(rp, True, 32, 128) (transformers 5.24)
        let expected: [(i64, usize); 28] = [
            (-300, 15),
            (-128, 15),
            (-127, 15),
            (-64, 14),
            (-63, 13),
            (-32, 12),
            (-31, 11),
            (-16, 10),
            (-15, 9),
            (-9, 8),
            (-8, 8),
            (-7, 7),
            (-1, 1),
            (0, 0),
            (1, 17),
            (2, 18),
            (7, 23),
            (8, 24),
            (9, 24),
            (15, 25),
            (16, 26),
            (31, 27),
            (32, 28),
            (63, 29),
            (64, 30),
            (127, 31),
            (128, 31),
            (300, 31),
        ];
        for (rp, bucket) in expected {
            assert_eq!(
                relative_position_bucket(rp, true, 32, 128),
                bucket,
                "rp {rp}"
            );
        }
    }

    #[test]
    fn buckets_by_hand() {
        // 8 buckets, bidirectional: 4 per side, exact below 2, log buckets 2..3 up to 16.
        // rp = -5: log(5/2)/log(8)·2 = 0.88 → 2 + 0 = 2; rp = 5 → 4 + 2 = 6.
        assert_eq!(relative_position_bucket(-1, true, 8, 16), 1);
        assert_eq!(relative_position_bucket(1, true, 8, 16), 5);
        assert_eq!(relative_position_bucket(-5, true, 8, 16), 2);
        assert_eq!(relative_position_bucket(5, true, 8, 16), 6);
        // rp = -6: log(3)/log(8)·2 = 1.06 → 3.
        assert_eq!(relative_position_bucket(-6, true, 8, 16), 3);
        assert_eq!(relative_position_bucket(-1000, true, 8, 16), 3);
        // Unidirectional: positive offsets all fall in bucket 0.
        assert_eq!(relative_position_bucket(7, false, 8, 16), 0);
        assert_eq!(relative_position_bucket(-3, false, 8, 16), 3);
    }

    #[test]
    fn activation_from_feed_forward_proj() {
        let mut cfg: T5EncoderConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg.activation().unwrap(), (false, T5Activation::Relu));
        cfg.feed_forward_proj = "gated-gelu".into();
        assert_eq!(cfg.activation().unwrap(), (true, T5Activation::GeluTanh));
        cfg.feed_forward_proj = "gelu".into();
        assert_eq!(cfg.activation().unwrap(), (false, T5Activation::GeluErf));
        cfg.feed_forward_proj = "gated-silu".into();
        assert_eq!(cfg.activation().unwrap(), (true, T5Activation::Silu));
        cfg.feed_forward_proj = "gated-tanh".into();
        assert!(cfg.activation().is_err());
    }
}
