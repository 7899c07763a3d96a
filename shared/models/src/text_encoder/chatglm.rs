//! The ChatGLM3 encoder of Kolors: diffusers' `ChatGLMModel`
//! (`pipelines/kolors/text_encoder.py`, a copy of THUDM's `modeling_chatglm.py`).
//!
//! Pre-norm GLM blocks over the token embeddings (no positional embedding added):
//! 1. `h = x + dense(attention(RMSNorm_in(x)))`,
//! 2. `out = h + dense_4h_to_h(SiLU(a) · b)` with `[a ‖ b] = dense_h_to_4h(RMSNorm_post(h))`
//!    (with `apply_residual_connection_post_layernorm` the residuals are the normed inputs).
//!
//! Attention: one `query_key_value` projection (bias when `add_qkv_bias`) into `H` query heads
//! and `G` key/value groups (`multi_query_group_num`; query head `h` reads group
//! `h / (H / G)`); rotary embedding on the **first half** of each head's `kv_channels` dims as
//! interleaved pairs `(x₂ⱼ, x₂ⱼ₊₁)` with `θⱼ = 10000^(−2j / (kv_channels / 2))`, indexed by the
//! tokenizer's `position_ids`; scale `1/√kv_channels`. The mask is causal and, when the batch
//! has padding, also hides padding keys, while padding query rows attend everywhere
//! (`ChatGLMPreTrainedModel.get_masks`); without padding it is plain causal attention.
//!
//! What Kolors takes (`KolorsPipeline.encode_prompt`), returned by [`ChatGlmEncoder::forward`]:
//! `prompt_embeds = hidden_states[-2]` (the input of the last block) and
//! `pooled = hidden_states[-1][-1]` (the last block's output at the last position, **before**
//! `final_layernorm`). `final_layernorm` and `output_layer` are never used, so they are not
//! loaded.
//!
//! Precision: the residual stream, the norms, the rotary embedding and the SwiGLU product are
//! kept in f32; the projections and attention run in the run dtype.
//!
//! Loading ([`ChatGlmEncoder::load`]) goes shard by shard through memory-mapped safetensors
//! and hands each tensor's pages back to the kernel once it is converted, so the peak
//! resident memory is the converted weights plus one tensor, never two copies of the model.
//! Keys may carry the `transformer.` prefix of THUDM's `ChatGLMForConditionalGeneration`
//! checkpoints.

use crate::checkpoint::ComponentFolder;
use crate::nn::attention::scaled_dot_product_attention;
use crate::{ModelError, Result, RunDtype};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Linear, VarBuilder};

fn d_num_layers() -> usize {
    28
}
fn d_vocab() -> usize {
    65024
}
fn d_hidden() -> usize {
    4096
}
fn d_ffn() -> usize {
    13696
}
fn d_kv_channels() -> Option<usize> {
    Some(128)
}
fn d_heads() -> usize {
    32
}
fn d_seq_length() -> usize {
    2048
}
fn d_eps() -> f64 {
    1e-5
}
fn d_true() -> bool {
    true
}
fn d_groups() -> usize {
    1
}

/// `text_encoder/config.json` of Kolors' `ChatGLMModel` (`ChatGLMConfig`; defaults as there,
/// other fields ignored).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ChatGlmConfig {
    /// Number of GLM blocks (28 for ChatGLM3-6B).
    #[serde(default = "d_num_layers")]
    pub num_layers: usize,
    /// Rows of `embedding.word_embeddings` (65024).
    #[serde(default = "d_vocab")]
    pub padded_vocab_size: usize,
    /// Hidden size (4096).
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    /// SwiGLU inner size (13696; `dense_h_to_4h` has twice as many outputs).
    #[serde(default = "d_ffn")]
    pub ffn_hidden_size: usize,
    /// Size of one attention head (128); `None` means `hidden_size / num_attention_heads`.
    #[serde(default = "d_kv_channels")]
    pub kv_channels: Option<usize>,
    /// Number of query heads (32).
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// Length of the rotary table (positions must stay below it).
    #[serde(default = "d_seq_length")]
    pub seq_length: usize,
    /// Norm epsilon (1e-5).
    #[serde(default = "d_eps")]
    pub layernorm_epsilon: f64,
    /// RMS norms (true for ChatGLM2/3; LayerNorm is not supported).
    #[serde(default = "d_true")]
    pub rmsnorm: bool,
    /// Residuals taken after the norms instead of before (false for ChatGLM3).
    #[serde(default)]
    pub apply_residual_connection_post_layernorm: bool,
    /// Whether the checkpoint has `encoder.final_layernorm` (unused by Kolors).
    #[serde(default = "d_true")]
    pub post_layer_norm: bool,
    /// Bias on every linear (false for ChatGLM3).
    #[serde(default)]
    pub add_bias_linear: bool,
    /// Bias on `query_key_value` (true for ChatGLM3).
    #[serde(default)]
    pub add_qkv_bias: bool,
    /// Grouped key/value heads (true for ChatGLM3).
    #[serde(default)]
    pub multi_query_attention: bool,
    /// Number of key/value groups when `multi_query_attention` (2 for ChatGLM3).
    #[serde(default = "d_groups")]
    pub multi_query_group_num: usize,
    /// P-tuning prefix length (not supported).
    #[serde(default)]
    pub pre_seq_len: Option<usize>,
    /// Quantised checkpoints (not supported; must be 0).
    #[serde(default)]
    pub quantization_bit: usize,
    /// Rotary base scaling of the 32k models (diffusers' copy ignores it; must be 1 if set).
    #[serde(default)]
    pub rope_ratio: Option<f64>,
}

impl ChatGlmConfig {
    /// The size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.kv_channels
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The number of key/value groups.
    pub fn kv_groups(&self) -> usize {
        if self.multi_query_attention {
            self.multi_query_group_num
        } else {
            self.num_attention_heads
        }
    }

    fn unsupported(field: &str, value: String, hint: &str) -> ModelError {
        ModelError::UnsupportedConfig {
            component: "text_encoder (ChatGLM)".into(),
            field: field.into(),
            value,
            hint: hint.into(),
        }
    }

    /// Rejects settings this implementation does not cover.
    pub fn validate(&self) -> Result<()> {
        if !self.rmsnorm {
            return Err(Self::unsupported(
                "rmsnorm",
                "false".into(),
                "only RMS-norm ChatGLM (ChatGLM2/3) checkpoints are supported",
            ));
        }
        if let Some(p) = self.pre_seq_len {
            return Err(Self::unsupported(
                "pre_seq_len",
                p.to_string(),
                "P-tuning prefixes are not supported; use a checkpoint without pre_seq_len",
            ));
        }
        if self.quantization_bit != 0 {
            return Err(Self::unsupported(
                "quantization_bit",
                self.quantization_bit.to_string(),
                "quantised ChatGLM checkpoints are not supported; use the fp16 text encoder",
            ));
        }
        if let Some(r) = self.rope_ratio {
            if r != 1.0 {
                return Err(Self::unsupported(
                    "rope_ratio",
                    r.to_string(),
                    "Kolors' ChatGLM has no rotary scaling; remove rope_ratio or set it to 1",
                ));
            }
        }
        let (h, g, d) = (self.num_attention_heads, self.kv_groups(), self.head_dim());
        if self.num_layers == 0 || h == 0 || g == 0 || h % g != 0 || d % 4 != 0 {
            return Err(ModelError::invalid(
                "text_encoder config",
                format!(
                    "need num_layers > 0, num_attention_heads ({h}) divisible by the key/value groups ({g}) and kv_channels ({d}) divisible by 4"
                ),
            ));
        }
        Ok(())
    }
}

/// What Kolors takes from the encoder for a batch of prompts.
#[derive(Debug, Clone)]
pub struct ChatGlmOutput {
    /// `hidden_states[-2]` as `[B, L, hidden]`: the input of the last block (run dtype).
    pub prompt_embeds: Tensor,
    /// `hidden_states[-1][-1]` as `[B, hidden]`: the last block's output at the last position,
    /// before `final_layernorm` (run dtype).
    pub pooled: Tensor,
}

/// ChatGLM's RMS norm: `weight · x / sqrt(mean(x²) + eps)` in f32.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(RmsNorm {
            weight: vb.get(size, "weight")?.to_dtype(DType::F32)?,
            eps,
        })
    }

    /// `x`: f32; result f32.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_mul(&(variance + self.eps)?.sqrt()?.recip()?)?
            .broadcast_mul(&self.weight)
    }
}

fn linear(inp: usize, out: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get((out, inp), "weight")?;
    let b = if bias {
        Some(vb.get(out, "bias")?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

/// `SelfAttention`: fused QKV projection, rotary embedding, grouped-query attention, `dense`.
#[derive(Debug, Clone)]
struct SelfAttention {
    query_key_value: Linear,
    dense: Linear,
    heads: usize,
    groups: usize,
    head_dim: usize,
}

impl SelfAttention {
    fn new(cfg: &ChatGlmConfig, vb: VarBuilder) -> Result<Self> {
        let (heads, groups, head_dim) = (cfg.num_attention_heads, cfg.kv_groups(), cfg.head_dim());
        let qkv = heads * head_dim + 2 * groups * head_dim;
        Ok(SelfAttention {
            query_key_value: linear(
                cfg.hidden_size,
                qkv,
                cfg.add_bias_linear || cfg.add_qkv_bias,
                vb.pp("query_key_value"),
            )?,
            dense: linear(
                heads * head_dim,
                cfg.hidden_size,
                cfg.add_bias_linear,
                vb.pp("dense"),
            )?,
            heads,
            groups,
            head_dim,
        })
    }

    /// `x`: `[B, L, hidden]` in the run dtype; `rope`: (cos, sin) `[B, L, 1, rot/2]` f32;
    /// `bias`: `[B, 1, L, L]` additive mask. Returns `[B, L, hidden]` in the run dtype.
    fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        bias: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let (h, g, d) = (self.heads, self.groups, self.head_dim);
        let dtype = x.dtype();
        let qkv = self.query_key_value.forward(x)?;
        let q = qkv.narrow(D::Minus1, 0, h * d)?.reshape((b, l, h, d))?;
        let k = qkv.narrow(D::Minus1, h * d, g * d)?.reshape((b, l, g, d))?;
        let v = qkv
            .narrow(D::Minus1, (h + g) * d, g * d)?
            .reshape((b, l, g, d))?;
        let q = apply_rotary(&q, rope)?.to_dtype(dtype)?.transpose(1, 2)?;
        let k = apply_rotary(&k, rope)?.to_dtype(dtype)?;
        // [B, L, G, D] → [B, H, L, D], query head h reading group h / (H / G).
        let expand = |t: Tensor| -> candle_core::Result<Tensor> {
            t.transpose(1, 2)?
                .unsqueeze(2)?
                .broadcast_as((b, g, h / g, l, d))?
                .reshape((b, h, l, d))
        };
        let k = expand(k)?;
        let v = expand(v)?;
        let out = scaled_dot_product_attention(&q, &k, &v, Some(bias), 1.0 / (d as f64).sqrt())?;
        let out = out.transpose(1, 2)?.reshape((b, l, h * d))?;
        self.dense.forward(&out)
    }
}

/// `apply_rotary_pos_emb`: rotates interleaved pairs of the first `rot` dims (`rot = 2 ×` the
/// cos/sin width) and passes the rest through. `x`: `[B, L, N, D]`; result f32.
fn apply_rotary(x: &Tensor, (cos, sin): &(Tensor, Tensor)) -> candle_core::Result<Tensor> {
    let (b, l, n, d) = x.dims4()?;
    let half = cos.dim(D::Minus1)?;
    let rot = 2 * half;
    let x = x.to_dtype(DType::F32)?;
    let xr = x.narrow(D::Minus1, 0, rot)?.reshape((b, l, n, half, 2))?;
    let x0 = xr.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
    let x1 = xr.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
    let o0 = (x0.broadcast_mul(cos)? - x1.broadcast_mul(sin)?)?;
    let o1 = (x1.broadcast_mul(cos)? + x0.broadcast_mul(sin)?)?;
    let rotated = Tensor::stack(&[o0, o1], D::Minus1)?.reshape((b, l, n, rot))?;
    if rot == d {
        Ok(rotated)
    } else {
        Tensor::cat(&[rotated, x.narrow(D::Minus1, rot, d - rot)?], D::Minus1)
    }
}

/// The SwiGLU `MLP`.
#[derive(Debug, Clone)]
struct Mlp {
    dense_h_to_4h: Linear,
    dense_4h_to_h: Linear,
    ffn: usize,
}

impl Mlp {
    fn new(cfg: &ChatGlmConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Mlp {
            dense_h_to_4h: linear(
                cfg.hidden_size,
                2 * cfg.ffn_hidden_size,
                cfg.add_bias_linear,
                vb.pp("dense_h_to_4h"),
            )?,
            dense_4h_to_h: linear(
                cfg.ffn_hidden_size,
                cfg.hidden_size,
                cfg.add_bias_linear,
                vb.pp("dense_4h_to_h"),
            )?,
            ffn: cfg.ffn_hidden_size,
        })
    }

    /// `x` in the run dtype; result in the run dtype.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let h = self.dense_h_to_4h.forward(x)?.to_dtype(DType::F32)?;
        let a = h.narrow(D::Minus1, 0, self.ffn)?;
        let g = h.narrow(D::Minus1, self.ffn, self.ffn)?;
        let h = a.silu()?.mul(&g)?.to_dtype(dtype)?;
        self.dense_4h_to_h.forward(&h)
    }
}

/// One `GLMBlock`.
#[derive(Debug, Clone)]
struct GlmBlock {
    input_layernorm: RmsNorm,
    self_attention: SelfAttention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    post_ln_residual: bool,
}

impl GlmBlock {
    fn new(cfg: &ChatGlmConfig, vb: VarBuilder) -> Result<Self> {
        let eps = cfg.layernorm_epsilon;
        Ok(GlmBlock {
            input_layernorm: RmsNorm::new(cfg.hidden_size, eps, vb.pp("input_layernorm"))?,
            self_attention: SelfAttention::new(cfg, vb.pp("self_attention"))?,
            post_attention_layernorm: RmsNorm::new(
                cfg.hidden_size,
                eps,
                vb.pp("post_attention_layernorm"),
            )?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
            post_ln_residual: cfg.apply_residual_connection_post_layernorm,
        })
    }

    /// `x`: f32 residual stream `[B, L, hidden]`; result f32.
    fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        bias: &Tensor,
        dtype: DType,
    ) -> candle_core::Result<Tensor> {
        let ln = self.input_layernorm.forward(x)?;
        let attn = self
            .self_attention
            .forward(&ln.to_dtype(dtype)?, rope, bias)?
            .to_dtype(DType::F32)?;
        let h = if self.post_ln_residual {
            (ln + attn)?
        } else {
            (x + attn)?
        };
        let ln = self.post_attention_layernorm.forward(&h)?;
        let mlp = self
            .mlp
            .forward(&ln.to_dtype(dtype)?)?
            .to_dtype(DType::F32)?;
        if self.post_ln_residual {
            ln + mlp
        } else {
            h + mlp
        }
    }
}

/// The ChatGLM3 encoder, as Kolors uses it.
#[derive(Debug, Clone)]
pub struct ChatGlmEncoder {
    word_embeddings: Tensor,
    layers: Vec<GlmBlock>,
    cfg: ChatGlmConfig,
    dtype: DType,
}

/// The weight-key prefix of THUDM's `ChatGLMForConditionalGeneration` checkpoints.
const HF_PREFIX: &str = "transformer.";

impl ChatGlmEncoder {
    /// Builds the encoder from `ChatGLMModel` weights: `embedding.word_embeddings.weight`,
    /// `encoder.layers.{i}.{input_layernorm, self_attention.{query_key_value, dense},
    /// post_attention_layernorm, mlp.{dense_h_to_4h, dense_4h_to_h}}` (optionally under
    /// `transformer.`). The run dtype is `vb`'s.
    pub fn new(cfg: &ChatGlmConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let vb = if vb.contains_tensor("transformer.embedding.word_embeddings.weight") {
            vb.pp("transformer")
        } else {
            vb
        };
        let word_embeddings = vb
            .pp("embedding")
            .pp("word_embeddings")
            .get((cfg.padded_vocab_size, cfg.hidden_size), "weight")?;
        let layers = (0..cfg.num_layers)
            .map(|i| GlmBlock::new(cfg, vb.pp("encoder").pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(ChatGlmEncoder {
            word_embeddings,
            layers,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    /// Loads the `text_encoder/` component (`config.json` and its single or sharded
    /// safetensors; `variant` e.g. `fp16` as Kolors ships it) with
    /// [`crate::checkpoint::WeightFiles::lean_var_builder`]:
    /// only the tensors the encoder uses, shard by shard.
    pub fn load(
        component: &ComponentFolder,
        dtype: RunDtype,
        device: &Device,
        variant: Option<&str>,
    ) -> Result<Self> {
        let cfg: ChatGlmConfig = component.config()?;
        cfg.validate()?;
        let files = component.weight_files(variant)?;
        let vb = files.lean_var_builder(dtype, device, |name| {
            let name = name.strip_prefix(HF_PREFIX).unwrap_or(name);
            let used = name.starts_with("embedding.word_embeddings.")
                || name.starts_with("encoder.layers.");
            used.then(|| name.to_string())
        })?;
        Self::new(&cfg, vb)
    }

    /// The configuration.
    pub fn config(&self) -> &ChatGlmConfig {
        &self.cfg
    }

    /// The run dtype (of the outputs).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.word_embeddings.device()
    }

    /// Rotary (cos, sin) `[B, L, 1, head_dim/4]` in f32 for `position_ids` (`[B, L]`), computed
    /// as `RotaryEmbedding.forward_impl` does (f32 angles `position · θ`).
    fn rotary(&self, position_ids: &[Vec<u32>]) -> Result<(Tensor, Tensor)> {
        let n_elem = self.cfg.head_dim() / 2;
        let half = n_elem / 2;
        let theta: Vec<f32> = (0..half)
            .map(|j| (1.0 / 10000f64.powf((2 * j) as f64 / n_elem as f64)) as f32)
            .collect();
        let (b, l) = (position_ids.len(), position_ids.first().map_or(0, Vec::len));
        let mut cos = Vec::with_capacity(b * l * half);
        let mut sin = Vec::with_capacity(b * l * half);
        for row in position_ids {
            for &p in row {
                if p as usize >= self.cfg.seq_length {
                    return Err(ModelError::invalid(
                        "position_ids",
                        format!(
                            "position {p} is beyond the rotary table ({} positions)",
                            self.cfg.seq_length
                        ),
                    ));
                }
                for &t in &theta {
                    let a = p as f32 * t;
                    cos.push((a as f64).cos() as f32);
                    sin.push((a as f64).sin() as f32);
                }
            }
        }
        let dev = self.device();
        Ok((
            Tensor::from_vec(cos, (b, l, 1, half), dev)?,
            Tensor::from_vec(sin, (b, l, 1, half), dev)?,
        ))
    }

    /// The additive attention mask `[B, 1, L, L]` (0 or −inf) of `get_masks`: causal; with any
    /// padding in the row, padding keys are hidden and padding query rows see everything.
    fn mask(&self, attention_mask: &[Vec<u32>]) -> Result<Tensor> {
        let (b, l) = (
            attention_mask.len(),
            attention_mask.first().map_or(0, Vec::len),
        );
        let padded = attention_mask.iter().any(|r| r.contains(&0));
        let mut data = Vec::with_capacity(b * l * l);
        for row in attention_mask {
            for q in 0..l {
                for k in 0..l {
                    let allowed = if padded {
                        row[q] == 0 || (k <= q && row[k] != 0)
                    } else {
                        k <= q
                    };
                    data.push(if allowed { 0f32 } else { f32::NEG_INFINITY });
                }
            }
        }
        Ok(Tensor::from_vec(data, (b, 1, l, l), self.device())?.to_dtype(self.dtype)?)
    }

    /// Runs the encoder on tokenizer output (`[B, L]` rows of ids, attention mask and position
    /// ids, as [`crate::tokenizer::chatglm::ChatGlmTokenizer::encode_padded`] returns them)
    /// and returns what Kolors takes: `hidden_states[-2]` and the pre-norm last hidden state at
    /// the last position.
    pub fn forward(
        &self,
        input_ids: &[Vec<u32>],
        attention_mask: &[Vec<u32>],
        position_ids: &[Vec<u32>],
    ) -> Result<ChatGlmOutput> {
        let b = input_ids.len();
        let l = input_ids.first().map_or(0, Vec::len);
        let same = |rows: &[Vec<u32>]| rows.len() == b && rows.iter().all(|r| r.len() == l);
        if b == 0 || l == 0 || !same(input_ids) || !same(attention_mask) || !same(position_ids) {
            return Err(ModelError::invalid(
                "input_ids",
                "need a non-empty batch with input ids, attention mask and position ids of one shape",
            ));
        }
        let vocab = self.cfg.padded_vocab_size;
        if let Some(&bad) = input_ids.iter().flatten().find(|&&i| i as usize >= vocab) {
            return Err(ModelError::invalid(
                "input_ids",
                format!("token id {bad} is outside the embedding table ({vocab} rows)"),
            ));
        }
        let ids: Vec<u32> = input_ids.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(ids, b * l, self.device())?;
        let mut h = self
            .word_embeddings
            .index_select(&ids, 0)?
            .reshape((b, l, self.cfg.hidden_size))?
            .to_dtype(DType::F32)?;
        let rope = self.rotary(position_ids)?;
        let bias = self.mask(attention_mask)?;
        let mut before_last = h.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            if i + 1 == self.layers.len() {
                before_last = h.clone();
            }
            h = layer.forward(&h, &rope, &bias, self.dtype)?;
        }
        let pooled = h.narrow(1, l - 1, 1)?.squeeze(1)?;
        Ok(ChatGlmOutput {
            prompt_embeds: before_last.to_dtype(self.dtype)?,
            pooled: pooled.to_dtype(self.dtype)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_are_chatglm3() {
        let cfg: ChatGlmConfig = serde_json::from_str(
            r#"{"multi_query_attention": true, "multi_query_group_num": 2, "add_qkv_bias": true}"#,
        )
        .unwrap();
        assert_eq!(cfg.head_dim(), 128);
        assert_eq!(cfg.kv_groups(), 2);
        cfg.validate().unwrap();
        let bad: ChatGlmConfig = serde_json::from_str(r#"{"pre_seq_len": 128}"#).unwrap();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn rotary_rotates_interleaved_pairs_of_the_first_half() {
        // x = [1, 0, 0, 1 | 5, 6, 7, 8], one pair frequency-0 (angle = p), one at p·10000^-0.5.
        let x = Tensor::new(&[[[[1f32, 0., 0., 1., 5., 6., 7., 8.]]]], &Device::Cpu).unwrap();
        let p = 2f32;
        let t1 = (1.0 / 10000f64.powf(0.5)) as f32;
        let cos = Tensor::new(&[[[[p.cos(), (p * t1).cos()]]]], &Device::Cpu).unwrap();
        let sin = Tensor::new(&[[[[p.sin(), (p * t1).sin()]]]], &Device::Cpu).unwrap();
        let out = apply_rotary(&x, &(cos, sin)).unwrap();
        let v: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
        let a = p * t1;
        let want = [p.cos(), p.sin(), -a.sin(), a.cos(), 5., 6., 7., 8.];
        for (g, w) in v.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{v:?}");
        }
    }
}
