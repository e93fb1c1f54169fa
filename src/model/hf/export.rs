//! Writing a Hugging Face model directory that transformers'
//! `AutoModelForCausalLM.from_pretrained` loads: `config.json` as
//! transformers 5.x writes it, `model.safetensors` (RoPE rows back in HF's
//! order, no `lm_head.weight` when tied), and the tokenizer files and
//! `generation_config.json` of the base model.
//!
//! The config starts from the base model's (a model directory's
//! `config.json` or the copy a run kept, `super::files`), so fields anemone
//! does not model (`initializer_range`, `pad_token_id`, ...) are kept; the
//! shape, features, RoPE parameters and dtype are then written from the
//! weights, in the 5.x layout (`rope_parameters`, `dtype`) whatever the
//! source's. A model with no Hugging Face base (trained from scratch or from
//! llama2.c) is written as the architecture its features call for: Qwen3 for
//! QK-norm, Qwen2 for q/k/v biases, Llama otherwise.
//!
//! Every file is written atomically; the output may not be the input.
//!
//! Not here: the safetensors format (`super::tensors`), tensor names and the
//! row permutation (`super::weights`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::config::{Architecture, FloatDtype, HfConfig, read_json};
use super::files::{base_config, base_files, copy_atomic};
use super::tensors::INDEX_FILE;
use super::weights::write_hf_safetensors;
use crate::model::config::ModelConfig;
use crate::model::rope::RopeScaling;
use crate::model::weights::Weights;
use crate::{Error, Result};

/// llama2.c's BOS and EOS ids (`crate::generate`'s stop tokens), written
/// for a model with no Hugging Face base.
const LLAMA2C_BOS: u32 = 1;
const LLAMA2C_EOS: u32 = 2;

/// What [`export`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct Exported {
    pub architecture: Architecture,
    pub dtype: FloatDtype,
    /// File names written into the output directory, in order.
    pub files: Vec<String>,
}

/// Write `weights` (read from `model`: a model directory, a run directory or
/// a file) as a Hugging Face model directory `out`, tensors stored as `dtype`
/// (default: the base model's dtype, else float32).
pub fn export(
    model: &Path,
    weights: &Weights,
    out: &Path,
    dtype: Option<FloatDtype>,
) -> Result<Exported> {
    refuse_output(model, out)?;
    let base = base_config(model)?;
    let config = weights.config();
    let architecture = architecture_of(config, base.as_ref())?;
    let dtype = dtype
        .or(base.as_ref().and_then(|b| b.dtype))
        .unwrap_or(FloatDtype::F32);
    let base_json = match &base {
        Some(b) => Some(read_json(&b.path)?),
        None => None,
    };
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut files = Vec::new();
    let json = config_json(config, architecture, dtype, base.as_ref(), base_json);
    let text = serde_json::to_string_pretty(&json)
        .map_err(|e| Error::Invalid(format!("config.json: {e}")))?;
    crate::atomic::write_atomic(&out.join("config.json"), format!("{text}\n").as_bytes())?;
    files.push("config.json".to_string());
    write_hf_safetensors(weights, &out.join("model.safetensors"), dtype)?;
    files.push("model.safetensors".to_string());
    for (source, name) in base_files(model, true) {
        if name != "config.json" {
            copy_atomic(&source, &out.join(name))?;
            files.push(name.to_string());
        }
    }
    if !files.iter().any(|f| f == "generation_config.json") {
        let (bos, eos) = match &base {
            Some(b) => (b.bos_token_id, b.eos_token_ids.clone()),
            // llama2.c's convention, which the decoder stops at.
            None => (Some(LLAMA2C_BOS), vec![LLAMA2C_EOS]),
        };
        let generation = json!({"bos_token_id": bos, "eos_token_id": eos});
        let text = serde_json::to_string_pretty(&generation)
            .map_err(|e| Error::Invalid(format!("generation_config.json: {e}")))?;
        crate::atomic::write_atomic(
            &out.join("generation_config.json"),
            format!("{text}\n").as_bytes(),
        )?;
        files.push("generation_config.json".to_string());
    }
    Ok(Exported {
        architecture,
        dtype,
        files,
    })
}

/// `out` must not be the input (its directory, or a file of it) nor hold a
/// sharded checkpoint that would shadow the new `model.safetensors`.
fn refuse_output(model: &Path, out: &Path) -> Result<()> {
    if out.is_file() {
        return Err(Error::Invalid(format!(
            "--out {} is a file; an export is a directory\nhint: choose a new directory",
            out.display()
        )));
    }
    let real = |p: &Path| std::fs::canonicalize(p).ok();
    let model_dir: PathBuf = if model.is_dir() {
        model.to_path_buf()
    } else {
        model.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    if real(out).is_some() && real(out) == real(&model_dir) {
        return Err(Error::Invalid(format!(
            "--out {} is the directory of --model {}: an export never writes over its input\n\
             hint: choose another --out",
            out.display(),
            model.display()
        )));
    }
    if out.join(INDEX_FILE).exists() {
        return Err(Error::Invalid(format!(
            "--out {} holds a sharded checkpoint ({INDEX_FILE}), which transformers would read \
             instead of the export\nhint: choose an empty --out",
            out.display()
        )));
    }
    Ok(())
}

/// The architecture to write: the base model's (which must agree with the
/// weights' features), else the one the features call for.
fn architecture_of(config: &ModelConfig, base: Option<&HfConfig>) -> Result<Architecture> {
    let by_features = if config.qk_norm {
        Architecture::Qwen3
    } else if config.qkv_bias {
        Architecture::Qwen2
    } else {
        Architecture::Llama
    };
    let Some(base) = base else {
        if config.qk_norm && config.qkv_bias {
            return Err(Error::Invalid(
                "the model has both q/k/v biases and QK-norm, which no Hugging Face \
                 architecture anemone writes has"
                    .into(),
            ));
        }
        return Ok(by_features);
    };
    if base.qkv_bias != config.qkv_bias || base.qk_norm != config.qk_norm {
        return Err(Error::format(
            &base.path,
            "architectures",
            format!(
                "{} does not have the weights' features (q/k/v biases {}, QK-norm {})",
                base.architecture.class_name(),
                config.qkv_bias,
                config.qk_norm
            ),
        ));
    }
    Ok(base.architecture)
}

/// An `f32` of the model as the JSON number it was read as: the base
/// config's `f64` when it rounds to the same `f32`, else the shortest
/// decimal of the `f32`.
fn number(value: f32, base: Option<f64>) -> Value {
    let exact = match base {
        Some(b) if b as f32 == value => b,
        _ => value.to_string().parse::<f64>().unwrap_or(value as f64),
    };
    json!(exact)
}

/// `rope_parameters` as 5.x writes them.
fn rope_parameters(config: &ModelConfig, base: Option<&HfConfig>) -> Value {
    let mut params = BTreeMap::new();
    params.insert(
        "rope_theta",
        number(config.rope_theta, base.map(|b| b.rope_theta)),
    );
    match config.rope_scaling {
        RopeScaling::None => {
            params.insert("rope_type", json!("default"));
        }
        RopeScaling::Linear { factor } => {
            params.insert("rope_type", json!("linear"));
            params.insert("factor", json!(factor));
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            params.insert("rope_type", json!("llama3"));
            params.insert("factor", json!(factor));
            params.insert("low_freq_factor", json!(low_freq_factor));
            params.insert("high_freq_factor", json!(high_freq_factor));
            params.insert(
                "original_max_position_embeddings",
                json!(original_max_position_embeddings),
            );
        }
    }
    json!(params)
}

/// The `config.json` of the export: the base config's fields (4.x-only
/// ones dropped), then everything the weights define, keys sorted as
/// transformers writes them.
fn config_json(
    config: &ModelConfig,
    architecture: Architecture,
    dtype: FloatDtype,
    base: Option<&HfConfig>,
    base_json: Option<Value>,
) -> Value {
    let mut map: BTreeMap<String, Value> = match base_json {
        Some(Value::Object(fields)) => fields.into_iter().collect(),
        _ => BTreeMap::new(),
    };
    for old in [
        "rope_theta",
        "rope_scaling",
        "torch_dtype",
        "transformers_version",
    ] {
        map.remove(old);
    }
    let mut set = |key: &str, value: Value| {
        map.insert(key.to_string(), value);
    };
    set("architectures", json!([architecture.class_name()]));
    set("model_type", json!(architecture.model_type()));
    set("hidden_size", json!(config.dim));
    set("num_hidden_layers", json!(config.n_layers));
    set("num_attention_heads", json!(config.n_heads));
    set("num_key_value_heads", json!(config.n_kv_heads));
    set("head_dim", json!(config.head_dim));
    set("intermediate_size", json!(config.hidden_dim));
    set("vocab_size", json!(config.vocab_size));
    set("max_position_embeddings", json!(config.seq_len));
    set(
        "rms_norm_eps",
        number(config.norm_eps, base.map(|b| b.rms_norm_eps)),
    );
    set("rope_parameters", rope_parameters(config, base));
    set("tie_word_embeddings", json!(config.tied_embeddings));
    set("dtype", json!(dtype.torch_name()));
    set("hidden_act", json!("silu"));
    if base.is_none() {
        set("bos_token_id", json!(LLAMA2C_BOS));
        set("eos_token_id", json!(LLAMA2C_EOS));
        set("initializer_range", json!(0.02));
        set("attention_dropout", json!(0.0));
        set("use_cache", json!(true));
    }
    match architecture {
        Architecture::Llama => {
            set("attention_bias", json!(false));
            set("mlp_bias", json!(false));
        }
        Architecture::Qwen2 | Architecture::Qwen3 => {
            if architecture == Architecture::Qwen3 {
                set("attention_bias", json!(false));
            }
            set("use_sliding_window", json!(false));
            set("sliding_window", Value::Null);
            set(
                "layer_types",
                json!(vec!["full_attention"; config.n_layers]),
            );
        }
        Architecture::Mistral => {
            if base.is_none_or(|b| b.sliding_window.is_none()) {
                set("sliding_window", Value::Null);
            }
        }
    }
    json!(map)
}
