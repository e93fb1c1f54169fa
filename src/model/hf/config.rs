//! `config.json` (and `generation_config.json`) of a Hugging Face model
//! directory, parsed into a validated [`HfConfig`].
//!
//! Reads both layouts transformers writes: 4.x (`rope_theta`, `rope_scaling`
//! with `type` or `rope_type`, `torch_dtype`) and 5.x (`rope_parameters` with
//! `rope_theta`, `rope_type` and the scaling fields, `dtype`). Four
//! architectures are accepted, each a Llama-shaped decoder with a feature or
//! two: `LlamaForCausalLM`, `Qwen2ForCausalLM` (q/k/v biases),
//! `Qwen3ForCausalLM` (QK-norm, free `head_dim`) and `MistralForCausalLM`.
//! Everything that would make the model compute something anemone's layer
//! does not (another architecture, biases elsewhere, a sliding window that
//! can cut into a sequence, experts, another activation or RoPE variant, a
//! quantized checkpoint) is an error naming the file, the field and the value.
//!
//! Missing fields take the defaults of transformers 5.25's config classes
//! (e.g. `tie_word_embeddings` false for all four, `rms_norm_eps` 1e-6,
//! `rope_theta` 1e4, Qwen3's `head_dim` 128).
//!
//! Not here: tensors (`super::tensors`), RoPE frequencies and the row
//! permutation (`super::rope`), the tokenizer (`crate::data::hf`), the
//! mapping onto anemone's `ModelConfig` (`super::weights`), and writing a
//! config (`super::export`).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

pub use crate::model::rope::RopeScaling;
use crate::{Error, Result};

/// The float formats anemone reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatDtype {
    F32,
    F16,
    BF16,
}

impl FloatDtype {
    /// From a config's `dtype`/`torch_dtype` value (`"bfloat16"`, ...).
    pub fn from_torch_name(name: &str) -> Option<FloatDtype> {
        match name {
            "float32" => Some(FloatDtype::F32),
            "float16" => Some(FloatDtype::F16),
            "bfloat16" => Some(FloatDtype::BF16),
            _ => None,
        }
    }

    /// The name a config's `dtype` uses.
    pub fn torch_name(self) -> &'static str {
        match self {
            FloatDtype::F32 => "float32",
            FloatDtype::F16 => "float16",
            FloatDtype::BF16 => "bfloat16",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FloatDtype::F32 => 4,
            FloatDtype::F16 | FloatDtype::BF16 => 2,
        }
    }
}

/// The supported `architectures[0]` values (with their `model_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// `LlamaForCausalLM` (`llama`): Llama 2/3, SmolLM2, TinyLlama.
    Llama,
    /// `Qwen2ForCausalLM` (`qwen2`): Qwen2/2.5, biases on q, k and v.
    Qwen2,
    /// `Qwen3ForCausalLM` (`qwen3`): RMSNorm of q and k per head before RoPE.
    Qwen3,
    /// `MistralForCausalLM` (`mistral`) without a sliding window in use.
    Mistral,
}

impl Architecture {
    pub const ALL: [Architecture; 4] = [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
        Architecture::Mistral,
    ];

    /// The transformers class name, as in `architectures`.
    pub fn class_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
        }
    }

    /// The `model_type` value.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Mistral => "mistral",
        }
    }

    fn from_class_name(name: &str) -> Option<Architecture> {
        Architecture::ALL
            .into_iter()
            .find(|a| a.class_name() == name)
    }

    fn from_model_type(name: &str) -> Option<Architecture> {
        Architecture::ALL
            .into_iter()
            .find(|a| a.model_type() == name)
    }

    fn class_names() -> String {
        Architecture::ALL.map(|a| a.class_name()).join(", ")
    }
}

/// A validated Hugging Face model configuration: what anemone needs to build
/// the model and read its tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct HfConfig {
    /// The `config.json` it was read from (for error messages).
    pub path: PathBuf,
    pub architecture: Architecture,
    /// `hidden_size`: residual stream width C.
    pub dim: usize,
    /// `num_hidden_layers`.
    pub n_layers: usize,
    /// `num_attention_heads` H.
    pub n_heads: usize,
    /// `num_key_value_heads` (defaults to H).
    pub n_kv_heads: usize,
    /// Per-head width D (`head_dim`, else C / H; Qwen3 defaults to 128).
    pub head_dim: usize,
    /// `intermediate_size`: SwiGLU hidden width.
    pub hidden_dim: usize,
    /// `vocab_size` V: rows of the embedding (may exceed the tokenizer's).
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Biases on the q, k and v projections (Qwen2).
    pub qkv_bias: bool,
    /// RMSNorm over `head_dim` of every q and k head before RoPE (Qwen3).
    pub qk_norm: bool,
    /// `tie_word_embeddings`: the classifier is the embedding matrix.
    pub tied_embeddings: bool,
    /// `dtype` (5.x) or `torch_dtype` (4.x), when given.
    pub dtype: Option<FloatDtype>,
    /// `bos_token_id` of `generation_config.json`, else of `config.json`.
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` (an int or a list) of `generation_config.json`, else of `config.json`.
    pub eos_token_ids: Vec<u32>,
    /// Mistral's `sliding_window` when set; accepted only when it is at least
    /// `max_position_embeddings`, so it never cuts into a sequence the model
    /// can see. A caller running longer sequences must check against it.
    pub sliding_window: Option<usize>,
}

/// Upper bounds that keep a hostile or corrupt config from turning into a
/// huge allocation; far beyond any model anemone can train.
const MAX_WIDTH: usize = 1 << 20;
const MAX_LAYERS: usize = 1 << 12;
const MAX_HEADS: usize = 1 << 12;
const MAX_VOCAB: usize = 1 << 24;
const MAX_POSITIONS: usize = 1 << 24;
/// 2^38 parameters: 1 TiB of fp32.
const MAX_PARAMS: usize = 1 << 38;

/// Fields that only mixture-of-experts configs carry.
const MOE_FIELDS: [&str; 5] = [
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
];

impl HfConfig {
    /// Read `dir/config.json` and, when present, `dir/generation_config.json`.
    pub fn open(dir: &Path) -> Result<HfConfig> {
        HfConfig::open_with(
            &dir.join("config.json"),
            &dir.join("generation_config.json"),
        )
    }

    /// A `config.json` under another name (`path`, the copy a run keeps) with
    /// the `generation_config.json` at `generation_path`, when present.
    pub fn open_with(path: &Path, generation_path: &Path) -> Result<HfConfig> {
        let mut config = HfConfig::from_json(path, &read_json(path)?)?;
        if generation_path.exists() {
            let json = read_json(generation_path)?;
            let fields = Fields::root(generation_path, &json)?;
            if let Some(bos) = fields.token_ids("bos_token_id")? {
                config.bos_token_id = bos.first().copied();
            }
            if let Some(eos) = fields.token_ids("eos_token_id")? {
                config.eos_token_ids = eos;
            }
        }
        Ok(config)
    }

    /// Parse a `config.json` already read; `path` names it in errors.
    pub fn from_json(path: &Path, json: &Value) -> Result<HfConfig> {
        let fields = Fields::root(path, json)?;
        let architecture = architecture(&fields)?;

        if let Some(quantization) = fields.get("quantization_config") {
            return Err(fields.error(
                "quantization_config",
                format!(
                    "quantized checkpoints are not supported (found {}); use the unquantized model",
                    short(quantization)
                ),
            ));
        }
        let act = fields.str("hidden_act")?.unwrap_or("silu");
        if act != "silu" && act != "swish" {
            return Err(fields.error(
                "hidden_act",
                format!("\"{act}\" is not supported; anemone's feed-forward is SwiGLU (silu)"),
            ));
        }
        for field in ["attention_bias", "mlp_bias"] {
            if fields.bool(field)? == Some(true) {
                return Err(fields.error(
                    field,
                    "true is not supported: anemone's layer has no biases there \
                     (only Qwen2's q/k/v biases are read)",
                ));
            }
        }
        for field in MOE_FIELDS {
            if let Some(value) = fields.get(field)
                && value.as_u64() != Some(0)
            {
                return Err(fields.error(
                    field,
                    format!(
                        "{} marks a mixture-of-experts model, which is not supported",
                        short(value)
                    ),
                ));
            }
        }
        let sliding_window = sliding_window(&fields, architecture)?;

        let dim = fields.size("hidden_size", MAX_WIDTH)?;
        let n_layers = fields.size("num_hidden_layers", MAX_LAYERS)?;
        let n_heads = fields.size("num_attention_heads", MAX_HEADS)?;
        let n_kv_heads = match fields.get("num_key_value_heads") {
            Some(_) => fields.size("num_key_value_heads", MAX_HEADS)?,
            None => n_heads,
        };
        if n_heads % n_kv_heads != 0 {
            return Err(fields.error(
                "num_key_value_heads",
                format!("{n_kv_heads} does not divide num_attention_heads ({n_heads})"),
            ));
        }
        let head_dim = match fields.get("head_dim") {
            Some(_) => fields.size("head_dim", MAX_WIDTH)?,
            None if architecture == Architecture::Qwen3 => 128,
            None if dim % n_heads == 0 => dim / n_heads,
            None => {
                return Err(fields.error(
                    "head_dim",
                    format!(
                        "missing, and hidden_size ({dim}) is not a multiple of \
                         num_attention_heads ({n_heads}); add \"head_dim\""
                    ),
                ));
            }
        };
        if head_dim % 2 != 0 {
            return Err(fields.error("head_dim", format!("{head_dim} is odd; RoPE rotates pairs")));
        }
        let hidden_dim = fields.size("intermediate_size", MAX_WIDTH)?;
        let vocab_size = fields.size("vocab_size", MAX_VOCAB)?;
        let max_position_embeddings = fields.size("max_position_embeddings", MAX_POSITIONS)?;
        if let Some(window) = sliding_window
            && window < max_position_embeddings
        {
            return Err(fields.error(
                "sliding_window",
                format!(
                    "{window} is shorter than max_position_embeddings ({max_position_embeddings}): \
                     attention would be cut on longer sequences and anemone's attention is full \
                     causal; set \"sliding_window\": null to train on full attention"
                ),
            ));
        }
        let rms_norm_eps = fields.f64("rms_norm_eps")?.unwrap_or(1e-6);
        if !(rms_norm_eps > 0.0 && rms_norm_eps < 1.0) {
            return Err(fields.error("rms_norm_eps", format!("{rms_norm_eps} is not in (0, 1)")));
        }
        let (rope_theta, rope_scaling) = rope(&fields)?;
        let tied_embeddings = fields.bool("tie_word_embeddings")?.unwrap_or(false);
        let dtype = dtype(&fields)?;
        let bos_token_id = fields
            .token_ids("bos_token_id")?
            .and_then(|ids| ids.first().copied());
        let eos_token_ids = fields.token_ids("eos_token_id")?.unwrap_or_default();

        let config = HfConfig {
            path: path.to_path_buf(),
            architecture,
            dim,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            hidden_dim,
            vocab_size,
            max_position_embeddings,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            qkv_bias: architecture == Architecture::Qwen2,
            qk_norm: architecture == Architecture::Qwen3,
            tied_embeddings,
            dtype,
            bos_token_id,
            eos_token_ids,
            sliding_window,
        };
        if config.checked_n_params().is_none_or(|n| n > MAX_PARAMS) {
            return Err(Error::format(
                path,
                "hidden_size",
                format!(
                    "the sizes imply more than 2^38 parameters (hidden_size {dim}, \
                     num_hidden_layers {n_layers}, intermediate_size {hidden_dim}, vocab_size \
                     {vocab_size}); is this file corrupt?"
                ),
            ));
        }
        Ok(config)
    }

    /// Query width `n_heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Key/value width `n_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Number of parameters (the classifier counted once when tied).
    pub fn n_params(&self) -> usize {
        self.checked_n_params()
            .expect("validated when the config was parsed")
    }

    fn checked_n_params(&self) -> Option<usize> {
        let (c, f, v) = (self.dim, self.hidden_dim, self.vocab_size);
        let q = self.n_heads.checked_mul(self.head_dim)?;
        let kv = self.n_kv_heads.checked_mul(self.head_dim)?;
        let attention = c.checked_mul(q.checked_mul(2)?.checked_add(kv.checked_mul(2)?)?)?;
        let bias = if self.qkv_bias { q + 2 * kv } else { 0 };
        let qk_norm = if self.qk_norm { 2 * self.head_dim } else { 0 };
        let ffn = c.checked_mul(f)?.checked_mul(3)?;
        let layer = attention
            .checked_add(ffn)?
            .checked_add(bias + qk_norm)?
            .checked_add(c.checked_mul(2)?)?;
        let classifiers = if self.tied_embeddings { 1 } else { 2 };
        layer
            .checked_mul(self.n_layers)?
            .checked_add(v.checked_mul(c)?.checked_mul(classifiers)?)?
            .checked_add(c)
    }
}

/// A JSON file, its syntax errors naming the line and column.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = crate::memory::read_text(path)?;
    serde_json::from_str(&text).map_err(|e| {
        Error::format(
            path,
            format!("line {} column {}", e.line(), e.column()),
            e.to_string(),
        )
    })
}

/// `architectures[0]` and `model_type`, which must agree.
fn architecture(fields: &Fields) -> Result<Architecture> {
    let from_class = match fields.get("architectures") {
        None => None,
        Some(Value::Array(names)) => {
            let name = match names.as_slice() {
                [Value::String(name)] => name,
                _ => {
                    return Err(fields.error(
                        "architectures",
                        format!(
                            "expected one class name, found {}",
                            short(&Value::Array(names.clone()))
                        ),
                    ));
                }
            };
            Some(Architecture::from_class_name(name).ok_or_else(|| {
                fields.error(
                    "architectures",
                    format!(
                        "\"{name}\" is not supported; anemone reads {}",
                        Architecture::class_names()
                    ),
                )
            })?)
        }
        Some(other) => {
            return Err(fields.error(
                "architectures",
                format!("expected a list of class names, found {}", short(other)),
            ));
        }
    };
    let from_type = match fields.str("model_type")? {
        None => None,
        Some(name) => Some(Architecture::from_model_type(name).ok_or_else(|| {
            fields.error(
                "model_type",
                format!(
                    "\"{name}\" is not supported; anemone reads {}",
                    Architecture::ALL.map(|a| a.model_type()).join(", ")
                ),
            )
        })?),
    };
    match (from_class, from_type) {
        (Some(class), Some(model_type)) if class != model_type => Err(fields.error(
            "model_type",
            format!(
                "\"{}\" does not match architectures \"{}\" (model_type \"{}\")",
                model_type.model_type(),
                class.class_name(),
                class.model_type()
            ),
        )),
        (Some(arch), _) | (None, Some(arch)) => Ok(arch),
        (None, None) => Err(fields.error(
            "architectures",
            format!(
                "missing, and so is model_type; expected one of {}",
                Architecture::class_names()
            ),
        )),
    }
}

/// The sliding window in use, if any, after the per-architecture rules:
/// Qwen's `use_sliding_window` must be false, every `layer_types` entry
/// `full_attention`; Mistral's `sliding_window` is returned for the caller's
/// length check.
fn sliding_window(fields: &Fields, architecture: Architecture) -> Result<Option<usize>> {
    if let Some(types) = fields.get("layer_types") {
        let types = types.as_array().ok_or_else(|| {
            fields.error(
                "layer_types",
                format!("expected a list, found {}", short(types)),
            )
        })?;
        if let Some((layer_idx, other)) = types
            .iter()
            .enumerate()
            .find(|(_, t)| t.as_str() != Some("full_attention"))
        {
            return Err(fields.error(
                &format!("layer_types[{layer_idx}]"),
                format!(
                    "{} is not supported; anemone's attention is full causal in every layer \
                     (\"full_attention\")",
                    short(other)
                ),
            ));
        }
    }
    match architecture {
        Architecture::Qwen2 | Architecture::Qwen3 => {
            if fields.bool("use_sliding_window")? == Some(true) {
                return Err(fields.error(
                    "use_sliding_window",
                    "true is not supported: anemone's attention is full causal; \
                     set it to false to train on full attention",
                ));
            }
            Ok(None)
        }
        Architecture::Mistral => match fields.get("sliding_window") {
            None => Ok(None),
            Some(_) => Ok(Some(fields.size("sliding_window", usize::MAX)?)),
        },
        Architecture::Llama => Ok(None),
    }
}

/// `(rope_theta, scaling)` from 5.x `rope_parameters` or 4.x `rope_theta` + `rope_scaling`.
fn rope(fields: &Fields) -> Result<(f64, RopeScaling)> {
    let top_theta = fields.f64("rope_theta")?;
    let (params, theta) = match fields.get("rope_parameters") {
        Some(value) => {
            let params = fields.object("rope_parameters", value)?;
            let theta = params.f64("rope_theta")?.or(top_theta);
            (Some(params), theta)
        }
        None => match fields.get("rope_scaling") {
            Some(value) => (Some(fields.object("rope_scaling", value)?), top_theta),
            None => (None, top_theta),
        },
    };
    let theta = theta.unwrap_or(10000.0);
    if !(theta > 1.0 && theta.is_finite()) {
        let field = if fields.get("rope_parameters").is_some() {
            "rope_parameters.rope_theta"
        } else {
            "rope_theta"
        };
        return Err(fields.error(field, format!("{theta} must be a finite number > 1")));
    }
    let Some(params) = params else {
        return Ok((theta, RopeScaling::None));
    };
    if let Some(partial) = params.f64("partial_rotary_factor")?
        && partial != 1.0
    {
        return Err(params.error(
            "partial_rotary_factor",
            format!("{partial} is not supported; anemone rotates the whole head"),
        ));
    }
    let (type_field, rope_type) = match params.str("rope_type")? {
        Some(t) => ("rope_type", t),
        None => ("type", params.str("type")?.unwrap_or("default")),
    };
    let positive = |key: &str| -> Result<f64> {
        match params.f64(key)? {
            Some(x) if x > 0.0 && x.is_finite() => Ok(x),
            Some(x) => Err(params.error(key, format!("{x} must be a finite number > 0"))),
            None => Err(params.error(key, format!("missing (required by rope type {rope_type})"))),
        }
    };
    let scaling = match rope_type {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: positive("factor")?,
        },
        "llama3" => {
            let low_freq_factor = positive("low_freq_factor")?;
            let high_freq_factor = positive("high_freq_factor")?;
            if high_freq_factor <= low_freq_factor {
                return Err(params.error(
                    "high_freq_factor",
                    format!("{high_freq_factor} must exceed low_freq_factor ({low_freq_factor})"),
                ));
            }
            RopeScaling::Llama3 {
                factor: positive("factor")?,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: params
                    .size("original_max_position_embeddings", MAX_POSITIONS)?,
            }
        }
        other => {
            return Err(params.error(
                type_field,
                format!(
                    "unknown rope type \"{other}\"; anemone supports \"default\", \"linear\" \
                     and \"llama3\""
                ),
            ));
        }
    };
    Ok((theta, scaling))
}

/// 5.x `dtype`, else 4.x `torch_dtype`.
fn dtype(fields: &Fields) -> Result<Option<FloatDtype>> {
    for key in ["dtype", "torch_dtype"] {
        if let Some(name) = fields.str(key)? {
            return FloatDtype::from_torch_name(name).map(Some).ok_or_else(|| {
                fields.error(
                    key,
                    format!(
                        "\"{name}\" is not supported; anemone reads float32, float16 and bfloat16"
                    ),
                )
            });
        }
    }
    Ok(None)
}

/// A JSON value cut to a short one-line form for error messages.
fn short(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 60 {
        format!("{}...", text.chars().take(57).collect::<String>())
    } else {
        text
    }
}

/// Typed access to the fields of one JSON object, with errors naming the file
/// and the field (`prefix.key` inside a nested object).
struct Fields<'a> {
    path: &'a Path,
    prefix: String,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn root(path: &'a Path, json: &'a Value) -> Result<Fields<'a>> {
        let map = json.as_object().ok_or_else(|| {
            Error::format(
                path,
                "(top level)",
                format!("expected a JSON object, found {}", short(json)),
            )
        })?;
        Ok(Fields {
            path,
            prefix: String::new(),
            map,
        })
    }

    fn object(&self, key: &str, value: &'a Value) -> Result<Fields<'a>> {
        let map = value.as_object().ok_or_else(|| {
            self.error(key, format!("expected an object, found {}", short(value)))
        })?;
        Ok(Fields {
            path: self.path,
            prefix: self.name(key),
            map,
        })
    }

    fn name(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    fn error(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::format(self.path, self.name(key), msg)
    }

    /// The value, with JSON `null` read as missing.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => {
                Err(self.error(key, format!("expected a string, found {}", short(other))))
            }
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.error(
                key,
                format!("expected true or false, found {}", short(other)),
            )),
        }
    }

    fn f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(other) => {
                Err(self.error(key, format!("expected a number, found {}", short(other))))
            }
        }
    }

    /// A required integer in `1..=max`.
    fn size(&self, key: &str, max: usize) -> Result<usize> {
        let value = self
            .get(key)
            .ok_or_else(|| self.error(key, "missing (required)"))?;
        match value.as_u64().and_then(|n| usize::try_from(n).ok()) {
            Some(n) if (1..=max).contains(&n) => Ok(n),
            Some(n) => Err(self.error(key, format!("{n} is out of range 1..={max}"))),
            None => Err(self.error(
                key,
                format!("expected a positive integer, found {}", short(value)),
            )),
        }
    }

    /// A token id or a list of them; `None` when missing or null.
    fn token_ids(&self, key: &str) -> Result<Option<Vec<u32>>> {
        let id = |value: &Value| {
            value
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    self.error(
                        key,
                        format!(
                            "expected a token id or a list of them, found {}",
                            short(value)
                        ),
                    )
                })
        };
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items.iter().map(id).collect::<Result<_>>().map(Some),
            Some(value) => Ok(Some(vec![id(value)?])),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
            "vocab_size": 100,
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
            "dtype": "bfloat16",
            "bos_token_id": 1,
            "eos_token_id": [2, 3]
        })
    }

    fn parse(json: &Value) -> Result<HfConfig> {
        HfConfig::from_json(Path::new("dir/config.json"), json)
    }

    fn error_of(json: &Value) -> String {
        parse(json).unwrap_err().to_string()
    }

    fn with(mut json: Value, key: &str, value: Value) -> Value {
        json.as_object_mut().unwrap().insert(key.to_string(), value);
        json
    }

    #[test]
    fn a_5x_llama_config_gives_every_field_and_the_defaults() {
        let config = parse(&llama()).unwrap();
        assert_eq!(config.architecture, Architecture::Llama);
        assert_eq!(
            (
                config.dim,
                config.n_layers,
                config.n_heads,
                config.n_kv_heads
            ),
            (64, 2, 4, 2)
        );
        assert_eq!(
            (config.head_dim, config.hidden_dim, config.vocab_size),
            (16, 128, 100)
        );
        assert_eq!(config.rope_theta, 500000.0);
        assert_eq!(config.rope_scaling, RopeScaling::None);
        assert!(!config.tied_embeddings && !config.qkv_bias && !config.qk_norm);
        assert_eq!(config.dtype, Some(FloatDtype::BF16));
        assert_eq!(
            (config.bos_token_id, config.eos_token_ids.clone()),
            (Some(1), vec![2, 3])
        );
        let (c, f, v, q, kv) = (64, 128, 100, 64, 32);
        assert_eq!(
            config.n_params(),
            2 * (2 * c * q + 2 * c * kv + 3 * c * f + 2 * c) + 2 * v * c + c
        );
    }

    #[test]
    fn a_4x_rope_scaling_with_type_or_rope_type_is_read() {
        let mut json = llama();
        let map = json.as_object_mut().unwrap();
        map.remove("rope_parameters");
        map.insert("rope_theta".into(), json!(10000.0));
        map.insert(
            "rope_scaling".into(),
            json!({"type": "linear", "factor": 4.0}),
        );
        map.insert("torch_dtype".into(), json!("float16"));
        map.remove("dtype");
        let config = parse(&json).unwrap();
        assert_eq!(config.rope_theta, 10000.0);
        assert_eq!(config.rope_scaling, RopeScaling::Linear { factor: 4.0 });
        assert_eq!(config.dtype, Some(FloatDtype::F16));
        let llama3 = json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let config = parse(&with(json, "rope_scaling", llama3)).unwrap();
        assert_eq!(
            config.rope_scaling,
            RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            }
        );
    }

    #[test]
    fn qwen3_head_dim_defaults_to_128_and_others_to_hidden_over_heads() {
        let mut json = with(llama(), "architectures", json!(["Qwen3ForCausalLM"]));
        json = with(json, "model_type", json!("qwen3"));
        let config = parse(&json).unwrap();
        assert_eq!((config.head_dim, config.qk_norm), (128, true));
        let json = with(json, "head_dim", json!(8));
        assert_eq!(parse(&json).unwrap().head_dim, 8);
    }

    #[test]
    fn unsupported_features_name_the_file_the_field_and_the_value() {
        let cases = [
            (
                with(llama(), "architectures", json!(["GPT2LMHeadModel"])),
                "architectures",
                "GPT2LMHeadModel",
            ),
            (
                with(llama(), "model_type", json!("qwen2")),
                "model_type",
                "qwen2",
            ),
            (
                with(llama(), "attention_bias", json!(true)),
                "attention_bias",
                "true",
            ),
            (with(llama(), "mlp_bias", json!(true)), "mlp_bias", "true"),
            (
                with(llama(), "hidden_act", json!("gelu")),
                "hidden_act",
                "gelu",
            ),
            (
                with(llama(), "num_local_experts", json!(8)),
                "num_local_experts",
                "8",
            ),
            (
                with(
                    llama(),
                    "rope_parameters",
                    json!({"rope_type": "yarn", "factor": 4.0}),
                ),
                "rope_parameters.rope_type",
                "yarn",
            ),
            (
                with(llama(), "rope_parameters", json!({"rope_type": "linear"})),
                "rope_parameters.factor",
                "missing",
            ),
            (
                with(llama(), "num_key_value_heads", json!(3)),
                "num_key_value_heads",
                "3",
            ),
            (with(llama(), "hidden_size", json!(0)), "hidden_size", "0"),
            (
                with(llama(), "vocab_size", json!(1u64 << 40)),
                "vocab_size",
                "1099511627776",
            ),
            (with(llama(), "dtype", json!("int8")), "dtype", "int8"),
            (
                with(
                    llama(),
                    "layer_types",
                    json!(["full_attention", "sliding_attention"]),
                ),
                "layer_types[1]",
                "sliding_attention",
            ),
            (
                with(
                    llama(),
                    "quantization_config",
                    json!({"quant_method": "gptq"}),
                ),
                "quantization_config",
                "gptq",
            ),
        ];
        for (json, field, value) in cases {
            let err = error_of(&json);
            assert!(
                err.starts_with(&format!("dir/config.json: {field}: ")),
                "{err}"
            );
            assert!(err.contains(value), "{err}");
        }
    }

    #[test]
    fn absurd_sizes_that_each_pass_their_limit_are_caught_by_the_parameter_count() {
        let json = with(
            with(llama(), "hidden_size", json!(1 << 20)),
            "intermediate_size",
            json!(1 << 20),
        );
        let err = error_of(&with(json, "num_hidden_layers", json!(4000)));
        assert!(err.contains("2^38 parameters"), "{err}");
    }

    #[test]
    fn sliding_windows_are_errors_unless_they_cover_every_position() {
        let qwen = with(
            with(llama(), "architectures", json!(["Qwen2ForCausalLM"])),
            "model_type",
            json!("qwen2"),
        );
        let err = error_of(&with(qwen.clone(), "use_sliding_window", json!(true)));
        assert!(
            err.starts_with("dir/config.json: use_sliding_window: true"),
            "{err}"
        );
        // Qwen2.5 configs carry a window size next to use_sliding_window false.
        let config = parse(&with(
            with(qwen, "use_sliding_window", json!(false)),
            "sliding_window",
            json!(4096),
        ))
        .unwrap();
        assert_eq!((config.qkv_bias, config.sliding_window), (true, None));

        let mistral = with(
            with(llama(), "architectures", json!(["MistralForCausalLM"])),
            "model_type",
            json!("mistral"),
        );
        let err = error_of(&with(mistral.clone(), "sliding_window", json!(128)));
        assert!(
            err.starts_with("dir/config.json: sliding_window: 128 is shorter"),
            "{err}"
        );
        let config = parse(&with(mistral.clone(), "sliding_window", json!(256))).unwrap();
        assert_eq!(config.sliding_window, Some(256));
        assert_eq!(
            parse(&with(mistral, "sliding_window", Value::Null))
                .unwrap()
                .sliding_window,
            None
        );
    }

    #[test]
    fn eos_token_id_may_be_an_int_a_list_or_null() {
        assert_eq!(
            parse(&with(llama(), "eos_token_id", json!(7)))
                .unwrap()
                .eos_token_ids,
            vec![7]
        );
        assert!(
            parse(&with(llama(), "eos_token_id", Value::Null))
                .unwrap()
                .eos_token_ids
                .is_empty()
        );
        let err = error_of(&with(llama(), "eos_token_id", json!("</s>")));
        assert!(err.starts_with("dir/config.json: eos_token_id: "), "{err}");
    }
}
