//! Model configuration: the shape of a Llama-architecture transformer and the
//! features an architecture adds to the layer (q/k/v biases, QK-norm, RoPE
//! scaling, a tied or untied classifier), named presets (llama2.c "stories"
//! shapes, a Qwen3-0.6B-like GQA shape, `tiny`, and the real shapes of
//! SmolLM2, Qwen2.5, Qwen3, Llama 3.2 and TinyLlama), and JSON config files.
//!
//! A new architecture is a config with the features it needs, not new layer
//! code. Every feature defaults to off, so configs and checkpoints written
//! before it existed load and compute as before, and it is written to JSON
//! only when on. Mapping a Hugging Face `config.json` onto this is
//! `super::hf`'s business.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::rope::RopeScaling;
use crate::{Error, Result};

/// Shape of a Llama-architecture model. Matrices are stored `[out, in]`
/// row-major, as in llama2.c.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Residual stream width C.
    pub dim: usize,
    pub n_layers: usize,
    /// Query heads H.
    pub n_heads: usize,
    /// Key/value heads (GQA); query head `h` uses kv head `h / (n_heads / n_kv_heads)`.
    pub n_kv_heads: usize,
    /// Per-head width D; `n_heads * head_dim` need not equal `dim` (Qwen3).
    pub head_dim: usize,
    /// SwiGLU hidden width.
    pub hidden_dim: usize,
    /// Vocabulary size V.
    pub vocab_size: usize,
    /// Maximum context length (RoPE table size, generation limit).
    pub seq_len: usize,
    #[serde(default = "default_eps")]
    pub norm_eps: f32,
    #[serde(default = "default_theta")]
    pub rope_theta: f32,
    /// Classifier shares the embedding matrix.
    #[serde(default = "default_true")]
    pub tied_embeddings: bool,
    /// Biases on the q, k and v projections (Qwen2/2.5), added before RoPE.
    #[serde(default, skip_serializing_if = "is_false")]
    pub qkv_bias: bool,
    /// RMSNorm of every q and k head over `head_dim`, with a learned weight
    /// of `head_dim` values per projection, before RoPE (Qwen3); its eps is `norm_eps`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub qk_norm: bool,
    /// How RoPE frequencies are rescaled (Llama 3's `llama3`, `linear`).
    #[serde(default, skip_serializing_if = "RopeScaling::is_none")]
    pub rope_scaling: RopeScaling,
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// Upper bounds on a config's sizes: far beyond any model anemone can
/// train, low enough that products of a few of them cannot overflow.
pub struct Limits {
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub vocab: usize,
    pub positions: usize,
}

/// The bounds [`ModelConfig::validate`] applies.
pub const LIMITS: Limits = Limits {
    width: 1 << 20,
    layers: 1 << 12,
    heads: 1 << 12,
    vocab: 1 << 24,
    positions: 1 << 24,
};

/// At most 2^38 parameters (1 TiB of f32).
pub const MAX_PARAMS: usize = 1 << 38;

fn default_eps() -> f32 {
    1e-5
}
fn default_theta() -> f32 {
    10000.0
}
fn default_true() -> bool {
    true
}

/// Names accepted by [`ModelConfig::preset`].
pub const PRESETS: &[&str] = &[
    "tiny",
    "stories2m",
    "stories260k",
    "stories15m",
    "stories42m",
    "stories110m",
    "qwen3-0.6b-shape",
    "layer768",
    "smollm2-135m",
    "smollm2-360m",
    "qwen2.5-0.5b",
    "qwen3-0.6b",
    "llama3.2-1b",
    "tinyllama-1.1b",
];

impl ModelConfig {
    /// A config whose head_dim is `dim / n_heads`, eps 1e-5, theta 1e4, tied classifier.
    pub fn llama(
        dim: usize,
        n_layers: usize,
        n_heads: usize,
        n_kv_heads: usize,
        hidden_dim: usize,
        vocab_size: usize,
        seq_len: usize,
    ) -> ModelConfig {
        ModelConfig {
            dim,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim: dim / n_heads,
            hidden_dim,
            vocab_size,
            seq_len,
            norm_eps: default_eps(),
            rope_theta: default_theta(),
            tied_embeddings: true,
            qkv_bias: false,
            qk_norm: false,
            rope_scaling: RopeScaling::None,
        }
    }

    /// A named preset (see [`PRESETS`]).
    pub fn preset(name: &str) -> Result<ModelConfig> {
        let config = match name {
            // A few million parameters: the quick default on a 2-core CPU.
            "tiny" => ModelConfig::llama(192, 4, 6, 6, 512, 1024, 128),
            // The main job's model: `tiny` with a context that holds a
            // whole story of the built-in corpus (2.0M parameters).
            "stories2m" => ModelConfig::llama(192, 4, 6, 6, 512, 1024, 256),
            // llama2.c's stories260K (trained with a 512-token vocabulary).
            "stories260k" => ModelConfig::llama(64, 5, 8, 4, 172, 512, 512),
            "stories15m" => ModelConfig::llama(288, 6, 6, 6, 768, 32000, 256),
            "stories42m" => ModelConfig::llama(512, 8, 8, 8, 1376, 32000, 1024),
            "stories110m" => ModelConfig::llama(768, 12, 12, 12, 2048, 32000, 1024),
            // Qwen3-0.6B's shape: GQA 16/8 with head_dim 128 (RoPE stays llama2.c's
            // interleaved form; no q/k norms).
            "qwen3-0.6b-shape" => ModelConfig {
                head_dim: 128,
                rope_theta: 1_000_000.0,
                ..ModelConfig::llama(1024, 28, 16, 8, 3072, 151936, 256)
            },
            // One Stories110M-width layer: the research code's single-layer benchmark. The
            // vocabulary is tiny so that the step is the layer (the classifier is ~2 % of it).
            "layer768" => ModelConfig::llama(768, 1, 12, 12, 2048, 256, 512),
            // The real shapes (Hugging Face `config.json`s; docs/field-reports (c)).
            // `seq_len` is the model's context (`max_position_embeddings`).
            "smollm2-135m" => ModelConfig {
                rope_theta: 100_000.0,
                ..ModelConfig::llama(576, 30, 9, 3, 1536, 49152, 8192)
            },
            "smollm2-360m" => ModelConfig {
                rope_theta: 100_000.0,
                ..ModelConfig::llama(960, 32, 15, 5, 2560, 49152, 8192)
            },
            "qwen2.5-0.5b" => ModelConfig {
                norm_eps: 1e-6,
                rope_theta: 1_000_000.0,
                qkv_bias: true,
                ..ModelConfig::llama(896, 24, 14, 2, 4864, 151936, 32768)
            },
            "qwen3-0.6b" => ModelConfig {
                head_dim: 128,
                norm_eps: 1e-6,
                rope_theta: 1_000_000.0,
                qk_norm: true,
                ..ModelConfig::llama(1024, 28, 16, 8, 3072, 151936, 40960)
            },
            "llama3.2-1b" => ModelConfig {
                rope_theta: 500_000.0,
                rope_scaling: RopeScaling::Llama3 {
                    factor: 32.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192,
                },
                ..ModelConfig::llama(2048, 16, 32, 8, 8192, 128256, 131072)
            },
            "tinyllama-1.1b" => ModelConfig {
                tied_embeddings: false,
                ..ModelConfig::llama(2048, 22, 32, 4, 5632, 32000, 2048)
            },
            other => {
                return Err(Error::Invalid(format!(
                    "unknown model preset `{other}`; known presets: {}",
                    PRESETS.join(", ")
                )));
            }
        };
        Ok(config)
    }

    /// A preset name, a path to a JSON config file, or a Hugging Face model
    /// directory (its `config.json`).
    pub fn from_name_or_file(name: &str) -> Result<ModelConfig> {
        if crate::model::hf::files::is_model_dir(Path::new(name)) {
            let hf = crate::model::hf::HfConfig::open(Path::new(name))?;
            return ModelConfig::from_hf(&hf);
        }
        if name.ends_with(".json") || Path::new(name).is_file() {
            Self::read_json(Path::new(name))
        } else {
            Self::preset(name)
        }
    }

    /// Read a JSON config file (the fields of this struct).
    pub fn read_json(path: &Path) -> Result<ModelConfig> {
        Self::parse_json(&crate::memory::read_text(path)?, path)
    }

    /// Parse and validate the text of a JSON config; `path` names it in errors.
    pub fn parse_json(text: &str, path: &Path) -> Result<ModelConfig> {
        let config: ModelConfig = serde_json::from_str(text).map_err(|e| {
            Error::format(
                path,
                format!("line {} column {}", e.line(), e.column()),
                e.to_string(),
            )
        })?;
        config
            .validate()
            .map_err(|e| Error::format(path, "config", e.to_string()))?;
        Ok(config)
    }

    /// Check the shape is usable; the message names the field and the fix.
    /// Every size is bounded ([`LIMITS`], [`MAX_PARAMS`]) and the parameter
    /// count is computed with checked arithmetic, so the layout arithmetic
    /// of a validated config cannot overflow.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Invalid(msg));
        for (field, value, max) in self.sizes() {
            if value == 0 || value > max {
                return Err(Error::out_of_range(
                    &format!("model config: `{field}`"),
                    value,
                    &format!("an integer in 1..={max}"),
                ));
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "model config: n_heads ({}) must be a multiple of n_kv_heads ({})",
                self.n_heads, self.n_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "model config: head_dim ({}) must be even for RoPE",
                self.head_dim
            ));
        }
        if !(self.norm_eps > 0.0 && self.norm_eps <= 1.0) {
            return Err(Error::out_of_range(
                "model config: `norm_eps`",
                self.norm_eps,
                "a number in (0, 1]",
            ));
        }
        if !(self.rope_theta > 1.0 && self.rope_theta <= 1e12) {
            return Err(Error::out_of_range(
                "model config: `rope_theta`",
                self.rope_theta,
                "a number in (1, 1e12]",
            ));
        }
        if let Some(problem) = self.rope_scaling.problem() {
            return bad(format!("model config: rope_scaling: {problem}"));
        }
        match self.checked_n_params() {
            Some(n) if n <= MAX_PARAMS => Ok(()),
            count => bad(format!(
                "model config: {} parameters is more than anemone handles ({MAX_PARAMS}); \
                 check dim, hidden_dim, n_layers and vocab_size",
                count.map_or("an overflowing number of".to_string(), |n| n.to_string())
            )),
        }
    }

    /// Every size field with its name and upper bound, in declaration order.
    fn sizes(&self) -> [(&'static str, usize, usize); 8] {
        [
            ("dim", self.dim, LIMITS.width),
            ("n_layers", self.n_layers, LIMITS.layers),
            ("n_heads", self.n_heads, LIMITS.heads),
            ("n_kv_heads", self.n_kv_heads, LIMITS.heads),
            ("head_dim", self.head_dim, LIMITS.width),
            ("hidden_dim", self.hidden_dim, LIMITS.width),
            ("vocab_size", self.vocab_size, LIMITS.vocab),
            ("seq_len", self.seq_len, LIMITS.positions),
        ]
    }

    /// [`ModelConfig::n_params`] with checked arithmetic: `None` on overflow.
    pub fn checked_n_params(&self) -> Option<usize> {
        let d = self.dim;
        let q = self.n_heads.checked_mul(self.head_dim)?;
        let kv = self.n_kv_heads.checked_mul(self.head_dim)?;
        let layer = [
            Some(2 * d),
            Some(if self.qkv_bias { q + 2 * kv } else { 0 }),
            Some(if self.qk_norm { 2 * self.head_dim } else { 0 }),
            q.checked_mul(d)?.checked_mul(2),
            kv.checked_mul(d)?.checked_mul(2),
            self.hidden_dim.checked_mul(d)?.checked_mul(3),
        ]
        .into_iter()
        .try_fold(0usize, |sum, term| sum.checked_add(term?))?;
        let emb = self.vocab_size.checked_mul(d)?;
        let classifier = if self.tied_embeddings { 0 } else { emb };
        layer
            .checked_mul(self.n_layers)?
            .checked_add(emb)?
            .checked_add(d)?
            .checked_add(classifier)
    }

    /// Query width `n_heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Key/value width `n_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Query heads per kv head.
    pub fn gqa_ratio(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Parameters per transformer layer.
    pub fn layer_params(&self) -> usize {
        self.layer_matmul_params() + 2 * self.dim + self.layer_vector_params()
    }

    /// Per layer, the parameters of the projection matrices (wq, wk, wv, wo, w1, w2, w3).
    fn layer_matmul_params(&self) -> usize {
        let (d, q, kv, h) = (self.dim, self.q_dim(), self.kv_dim(), self.hidden_dim);
        q * d + 2 * kv * d + d * q + 3 * h * d
    }

    /// Per layer, the parameters the features add: q/k/v biases and q/k norm weights.
    fn layer_vector_params(&self) -> usize {
        let biases = if self.qkv_bias {
            self.q_dim() + 2 * self.kv_dim()
        } else {
            0
        };
        let norms = if self.qk_norm { 2 * self.head_dim } else { 0 };
        biases + norms
    }

    /// The inverse RoPE frequencies of a head (`head_dim / 2`, see [`crate::model::rope`]).
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        super::rope::inv_freq(self.head_dim, self.rope_theta as f64, &self.rope_scaling)
    }

    /// Total parameter count (embedding, layers, final norm, untied classifier).
    pub fn n_params(&self) -> usize {
        let emb = self.vocab_size * self.dim;
        emb + self.n_layers * self.layer_params()
            + self.dim
            + if self.tied_embeddings { 0 } else { emb }
    }

    /// Training FLOPs per token for a window of `seq` tokens: 6 x (matmul
    /// parameters incl. classifier) + 12 x n_layers x seq x q_dim (attention
    /// scores and values, forward and backward, causal half not discounted).
    pub fn train_flops_per_token(&self, seq: usize) -> f64 {
        let matmul_params =
            (self.n_layers * self.layer_matmul_params() + self.vocab_size * self.dim) as f64;
        6.0 * matmul_params + 12.0 * (self.n_layers * seq * self.q_dim()) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stories110m_parameter_count_matches_the_reference() {
        // ane-reference 5.5: 7,079,424 per layer, 109.53M in all (tied).
        let c = ModelConfig::preset("stories110m").unwrap();
        assert_eq!(c.layer_params(), 7_079_424);
        assert_eq!(c.n_params(), 7_079_424 * 12 + 32000 * 768 + 768);
    }

    #[test]
    fn qwen_shape_parameter_count_matches_the_reference() {
        // ane-reference 5.5: 15,730,688 per layer.
        let c = ModelConfig::preset("qwen3-0.6b-shape").unwrap();
        assert_eq!(c.layer_params(), 15_730_688);
        assert_eq!((c.q_dim(), c.kv_dim(), c.gqa_ratio()), (2048, 1024, 2));
    }

    #[test]
    fn every_preset_validates_and_bad_configs_name_the_field() {
        for name in PRESETS {
            ModelConfig::preset(name).unwrap().validate().unwrap();
        }
        let mut c = ModelConfig::preset("tiny").unwrap();
        c.n_kv_heads = 4;
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("n_kv_heads"), "{msg}");
        for (field, config, needle) in [
            (
                "n_layers",
                ModelConfig {
                    n_layers: 1 << 62,
                    ..c.clone()
                },
                "1..=4096",
            ),
            (
                "norm_eps",
                ModelConfig {
                    norm_eps: f32::INFINITY,
                    n_kv_heads: 6,
                    ..c.clone()
                },
                "(0, 1]",
            ),
            (
                "rope_theta",
                ModelConfig {
                    rope_theta: f32::NAN,
                    n_kv_heads: 6,
                    ..c.clone()
                },
                "(1, 1e12]",
            ),
        ] {
            let msg = config.validate().unwrap_err().to_string();
            assert!(msg.contains(field) && msg.contains(needle), "{msg}");
        }
        // Every field at its bound: the count is checked, not wrapped.
        let huge = ModelConfig::llama(
            1 << 20,
            1 << 12,
            1 << 12,
            1 << 12,
            1 << 20,
            1 << 24,
            1 << 24,
        );
        assert!(huge.checked_n_params().is_none_or(|n| n > MAX_PARAMS));
        let msg = huge.validate().unwrap_err().to_string();
        assert!(msg.contains("parameters is more than"), "{msg}");
        assert!(
            ModelConfig::preset("nope")
                .unwrap_err()
                .to_string()
                .contains("stories15m")
        );
    }

    #[test]
    fn real_presets_have_the_published_parameter_counts() {
        // Hugging Face model cards and config.json arithmetic (field reports (c)).
        for (name, params) in [
            ("smollm2-135m", 134_515_008),
            ("smollm2-360m", 361_821_120),
            ("qwen2.5-0.5b", 494_032_768),
            ("qwen3-0.6b", 596_049_920),
            ("llama3.2-1b", 1_235_814_400),
            ("tinyllama-1.1b", 1_100_048_384),
        ] {
            assert_eq!(
                ModelConfig::preset(name).unwrap().n_params(),
                params,
                "{name}"
            );
        }
        let qwen = ModelConfig::preset("qwen2.5-0.5b").unwrap();
        assert_eq!(
            qwen.layer_params() - qwen.layer_matmul_params(),
            2 * 896 + 896 + 256
        );
    }

    #[test]
    fn features_default_off_and_are_written_only_when_on() {
        let c = ModelConfig::preset("stories15m").unwrap();
        let text = serde_json::to_string(&c).unwrap();
        for key in ["qkv_bias", "qk_norm", "rope_scaling"] {
            assert!(!text.contains(key), "{text}");
        }
        for name in ["qwen2.5-0.5b", "qwen3-0.6b", "llama3.2-1b"] {
            let c = ModelConfig::preset(name).unwrap();
            let text = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<ModelConfig>(&text).unwrap(), c);
        }
        let text = r#"{"dim":64,"n_layers":1,"n_heads":8,"n_kv_heads":4,"head_dim":8,
            "hidden_dim":172,"vocab_size":512,"seq_len":64,"qkv_bias":true,
            "rope_scaling":{"type":"linear","factor":0.0}}"#;
        let c: ModelConfig = serde_json::from_str(text).unwrap();
        assert!(c.qkv_bias && !c.qk_norm);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("rope_scaling")
        );
    }

    #[test]
    fn json_round_trip_with_defaults() {
        let c = ModelConfig::preset("stories260k").unwrap();
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<ModelConfig>(&text).unwrap(), c);
        let minimal = r#"{"dim":64,"n_layers":1,"n_heads":8,"n_kv_heads":4,"head_dim":8,
            "hidden_dim":172,"vocab_size":512,"seq_len":64}"#;
        let m: ModelConfig = serde_json::from_str(minimal).unwrap();
        assert_eq!(
            (m.norm_eps, m.rope_theta, m.tied_embeddings),
            (1e-5, 10000.0, true)
        );
    }
}
