//! Hugging Face checkpoints as anemone models and back: the [`ModelConfig`]
//! an [`HfConfig`] describes ([`ModelConfig::from_hf`]), [`Weights`] from an
//! [`HfCheckpoint`] ([`Weights::from_hf`]) and the HF tensors of [`Weights`]
//! ([`hf_tensors`], for [`write_safetensors`]).
//!
//! Each parameter is one HF tensor ([`hf_name`]); the q and k projections,
//! their biases and the QK-norm weights are permuted per head between HF's
//! half-split RoPE order and anemone's interleaved one (`super::rope`) on the
//! way in, and back on the way out, so a round trip is exact. bf16 and fp16
//! tensors widen to f32 exactly. A tied model reads no `lm_head.weight` and
//! writes none.
//!
//! Not here: `config.json` itself (`super::config`), reading the files
//! (`super::tensors`).

use std::borrow::Cow;
use std::path::Path;

use super::HfCheckpoint;
use super::config::{FloatDtype, HfConfig};
use super::rope::{hf_rows_to_interleaved, interleaved_rows_to_hf};
use super::tensors::{TensorToWrite, write_safetensors};
use crate::model::config::ModelConfig;
use crate::model::weights::{Param, Weights};
use crate::{Error, Result};

impl ModelConfig {
    /// The model `hf` describes, its features included. `seq_len` is the
    /// model's context, `max_position_embeddings`; `rope_theta` and
    /// `rms_norm_eps` are rounded to `f32` (every published theta is exact).
    pub fn from_hf(hf: &HfConfig) -> Result<ModelConfig> {
        let config = ModelConfig {
            dim: hf.dim,
            n_layers: hf.n_layers,
            n_heads: hf.n_heads,
            n_kv_heads: hf.n_kv_heads,
            head_dim: hf.head_dim,
            hidden_dim: hf.hidden_dim,
            vocab_size: hf.vocab_size,
            seq_len: hf.max_position_embeddings,
            norm_eps: hf.rms_norm_eps as f32,
            rope_theta: hf.rope_theta as f32,
            tied_embeddings: hf.tied_embeddings,
            qkv_bias: hf.qkv_bias,
            qk_norm: hf.qk_norm,
            rope_scaling: hf.rope_scaling,
        };
        config
            .validate()
            .map_err(|e| Error::format(&hf.path, "config", e.to_string()))?;
        Ok(config)
    }
}

/// How a parameter's rows are permuted between HF and anemone: by heads of
/// `head_dim` rows of `row_len` values, or not at all.
fn rope_rows(config: &ModelConfig, p: Param) -> Option<(usize, usize)> {
    match p {
        Param::Wq(_) | Param::Wk(_) => Some((config.head_dim, config.dim)),
        Param::Bq(_) | Param::Bk(_) | Param::QNorm(_) | Param::KNorm(_) => {
            Some((config.head_dim, 1))
        }
        _ => None,
    }
}

/// The Hugging Face name of parameter `p` (`model.layers.0.self_attn.q_proj.weight`, ...).
pub fn hf_name(p: Param) -> String {
    let layer = |l: usize, rest: &str| format!("model.layers.{l}.{rest}");
    match p {
        Param::Embedding => "model.embed_tokens.weight".into(),
        Param::RmsAtt(l) => layer(l, "input_layernorm.weight"),
        Param::Wq(l) => layer(l, "self_attn.q_proj.weight"),
        Param::Wk(l) => layer(l, "self_attn.k_proj.weight"),
        Param::Wv(l) => layer(l, "self_attn.v_proj.weight"),
        Param::Bq(l) => layer(l, "self_attn.q_proj.bias"),
        Param::Bk(l) => layer(l, "self_attn.k_proj.bias"),
        Param::Bv(l) => layer(l, "self_attn.v_proj.bias"),
        Param::QNorm(l) => layer(l, "self_attn.q_norm.weight"),
        Param::KNorm(l) => layer(l, "self_attn.k_norm.weight"),
        Param::Wo(l) => layer(l, "self_attn.o_proj.weight"),
        Param::RmsFfn(l) => layer(l, "post_attention_layernorm.weight"),
        Param::W1(l) => layer(l, "mlp.gate_proj.weight"),
        Param::W2(l) => layer(l, "mlp.down_proj.weight"),
        Param::W3(l) => layer(l, "mlp.up_proj.weight"),
        Param::RmsFinal => "model.norm.weight".into(),
        Param::Classifier => "lm_head.weight".into(),
    }
}

impl Weights {
    /// The model of a checked checkpoint: its config ([`ModelConfig::from_hf`])
    /// and every tensor in anemone's layout and RoPE row order.
    pub fn from_hf(checkpoint: &HfCheckpoint) -> Result<Weights> {
        let config = ModelConfig::from_hf(&checkpoint.config)?;
        let mut weights = Weights::zeros(&config);
        for p in weights.layout.params() {
            let shape = weights.layout.shape(p);
            let out = weights.get_mut(p);
            checkpoint.tensors.read_f32_into(&hf_name(p), &shape, out)?;
            if let Some((head_dim, row_len)) = rope_rows(&config, p) {
                let interleaved = hf_rows_to_interleaved(out, head_dim, row_len);
                out.copy_from_slice(&interleaved);
            }
        }
        Ok(weights)
    }
}

/// One tensor of a Hugging Face checkpoint: name, shape and values in HF's
/// row order (borrowed from the weights where no rows move).
#[derive(Clone, Debug)]
pub struct HfTensor<'w> {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Cow<'w, [f32]>,
}

impl HfTensor<'_> {
    /// The tensor as [`write_safetensors`] takes it.
    pub fn to_write(&self) -> TensorToWrite<'_> {
        TensorToWrite {
            name: &self.name,
            shape: &self.shape,
            data: &self.data,
        }
    }
}

/// Every parameter of `weights` as the HF tensor it came from (or would have):
/// HF names, `[out, in]` shapes, q/k rows back in HF's half-split order;
/// no `lm_head.weight` for a tied model. The inverse of [`Weights::from_hf`].
pub fn hf_tensors(weights: &Weights) -> Vec<HfTensor<'_>> {
    let config = weights.config();
    weights
        .layout
        .params()
        .into_iter()
        .map(|p| {
            let values = weights.get(p);
            let data = match rope_rows(config, p) {
                Some((head_dim, row_len)) => {
                    Cow::Owned(interleaved_rows_to_hf(values, head_dim, row_len))
                }
                None => Cow::Borrowed(values),
            };
            HfTensor {
                name: hf_name(p),
                shape: weights.layout.shape(p),
                data,
            }
        })
        .collect()
}

/// Write `weights` as one `model.safetensors` at `path`, every tensor stored
/// as `dtype` ([`hf_tensors`], [`write_safetensors`]).
pub fn write_hf_safetensors(weights: &Weights, path: &Path, dtype: FloatDtype) -> Result<()> {
    let tensors = hf_tensors(weights);
    let to_write: Vec<TensorToWrite> = tensors.iter().map(HfTensor::to_write).collect();
    write_safetensors(path, &to_write, dtype)
}
