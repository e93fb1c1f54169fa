//! PEFT LoRA adapters on disk: the `adapter_config.json` and
//! `adapter_model.safetensors` that `PeftModel.save_pretrained` writes and
//! `PeftModel.from_pretrained` reads, as [`Adapters`] and back.
//!
//! Tensors are named as PEFT saves them (the adapter name left out):
//! `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (A,
//! `(r, in)`) and `...lora_B.weight` (B, `(out, r)`), for `q_proj`, `k_proj`,
//! `v_proj`, `o_proj` under `self_attn` and `gate_proj`, `up_proj`,
//! `down_proj` under `mlp`. The rows of B of `q_proj` and `k_proj` are
//! permuted per head from HF's half-split RoPE order to anemone's interleaved
//! one on reading, as the base q/k rows are (`super::rope`), and back on
//! writing, so a round trip is exact. Written in f32 (PEFT's default for
//! f32 bases); read from f32, f16 or bf16.
//!
//! The config fields read: `peft_type` (`LORA`), `r`, `lora_alpha`,
//! `lora_dropout`, `target_modules` (a list of the seven names, or
//! `"all-linear"`), `layers_to_transform` (null, a layer or a list),
//! `use_rslora`. Refused with an error naming the field: DoRA, QA-LoRA,
//! biases, `fan_in_fan_out`, `modules_to_save`, per-module ranks or alphas,
//! other target modules, and the fields that touch other weights
//! (`exclude_modules`, `layer_replication`, `target_parameters`,
//! `trainable_token_indices`, `alora_invocation_tokens`) unless null. The tensors must be exactly those the config implies on
//! the base model, each with the shape the base and the rank imply.
//!
//! Not here: the adapters' math (`crate::model::lora`).

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::config::FloatDtype;
use super::files::is_model_dir;
use super::rope::{hf_rows_to_interleaved, interleaved_rows_to_hf};
use super::tensors::INDEX_FILE;
use super::tensors::{SafetensorsReader, TensorToWrite, write_safetensors};
use crate::model::config::ModelConfig;
use crate::model::lora::{Adapters, LoraConfig, Target};
use crate::{Error, Result};

/// The config file of a PEFT adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The tensors of a PEFT adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Which of an adapter's two matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Matrix {
    A,
    B,
}

/// PEFT's name of matrix `m` of the adapter on `target` of layer `layer`.
pub fn peft_name(layer: usize, target: Target, m: Matrix) -> String {
    let m = match m {
        Matrix::A => "A",
        Matrix::B => "B",
    };
    format!(
        "base_model.model.model.layers.{layer}.{}.lora_{m}.weight",
        target.path()
    )
}

/// `(layer, target, matrix)` of a PEFT tensor name, `None` for any other name.
pub fn parse_peft_name(name: &str) -> Option<(usize, Target, Matrix)> {
    let rest = name.strip_prefix("base_model.model.model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (path, m) = if let Some(path) = rest.strip_suffix(".lora_A.weight") {
        (path, Matrix::A)
    } else {
        (rest.strip_suffix(".lora_B.weight")?, Matrix::B)
    };
    let target = Target::ALL.into_iter().find(|t| t.path() == path)?;
    Some((layer, target, m))
}

/// The `LoraConfig` of an `adapter_config.json` (`path` names it in errors)
/// for a base model of `n_layers` layers.
pub fn parse_config(path: &Path, json: &Value, n_layers: usize) -> Result<LoraConfig> {
    let err = |field: &str, msg: String| Error::format(path, field, msg);
    let get = |field: &str| json.get(field).filter(|v| !v.is_null());
    match get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        other => {
            return Err(err(
                "peft_type",
                format!("{other:?} is not a LoRA adapter (expected \"LORA\")"),
            ));
        }
    }
    let number = |field: &str| -> Result<f64> {
        get(field)
            .and_then(Value::as_f64)
            .ok_or_else(|| err(field, "missing or not a number".into()))
    };
    let rank = get("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or_else(|| err("r", "missing or not a positive integer".into()))?
        as usize;
    let alpha = number("lora_alpha")? as f32;
    let dropout = get("lora_dropout").map_or(Ok(0.0), |_| number("lora_dropout"))? as f32;
    let flag = |field: &str| get(field).and_then(Value::as_bool).unwrap_or(false);
    for (field, what) in [
        ("use_dora", "DoRA"),
        ("use_qalora", "QA-LoRA"),
        ("lora_bias", "biased"),
        ("fan_in_fan_out", "transposed (Conv1D) weights"),
    ] {
        if flag(field) {
            return Err(err(field, format!("{what} adapters are not supported")));
        }
    }
    // Fields that change which weights an adapter touches, beyond the plain
    // LoRA of listed projections.
    for field in [
        "exclude_modules",
        "layer_replication",
        "target_parameters",
        "trainable_token_indices",
        "alora_invocation_tokens",
    ] {
        if let Some(value) = get(field).filter(|v| v.as_array().is_none_or(|a| !a.is_empty())) {
            return Err(err(
                field,
                format!("{value} is not supported (expected null)"),
            ));
        }
    }
    if let Some(bias) = get("bias").and_then(Value::as_str)
        && bias != "none"
    {
        return Err(err(
            "bias",
            format!("\"{bias}\": trained biases are not supported (expected \"none\")"),
        ));
    }
    if let Some(modules) =
        get("modules_to_save").filter(|v| v.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(err(
            "modules_to_save",
            format!("{modules}: fully trained modules beside the adapters are not supported"),
        ));
    }
    for field in ["rank_pattern", "alpha_pattern"] {
        if get(field).is_some_and(|v| v.as_object().is_none_or(|m| !m.is_empty())) {
            return Err(err(
                field,
                "per-module ranks and alphas are not supported".into(),
            ));
        }
    }
    let targets = targets(json, &err)?;
    let layers = match get("layers_to_transform") {
        None => (0..n_layers).collect(),
        Some(Value::Number(layer)) => vec![layer.as_u64().unwrap_or(u64::MAX) as usize],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_u64().map(|l| l as usize))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| err("layers_to_transform", "expected layer numbers".into()))?,
        Some(other) => {
            return Err(err(
                "layers_to_transform",
                format!("expected a layer number or a list of them, found {other}"),
            ));
        }
    };
    let mut layers = layers;
    layers.sort_unstable();
    layers.dedup();
    if let Some(&layer) = layers.iter().find(|&&l| l >= n_layers) {
        return Err(err(
            "layers_to_transform",
            format!("layer {layer} is not in the base model, which has {n_layers} layers"),
        ));
    }
    let config = LoraConfig {
        rank,
        alpha,
        dropout,
        targets,
        layers,
        rslora: flag("use_rslora"),
        unmerged: false,
    };
    config
        .check()
        .map_err(|e| err("config", format!("{e} (from {})", path.display())))?;
    Ok(config)
}

/// `target_modules`: names of the seven projections, or `"all-linear"`.
fn targets(json: &Value, err: &dyn Fn(&str, String) -> Error) -> Result<Vec<Target>> {
    let field = "target_modules";
    let names: Vec<String> = match json.get(field) {
        Some(Value::String(s)) if s == "all-linear" => {
            return Ok(Target::ALL.to_vec());
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| err(field, "expected a list of module names".into()))?,
        other => {
            return Err(err(
                field,
                format!(
                    "expected a list of module names or \"all-linear\", found {} (regular \
                     expressions are not supported)",
                    other.map_or("nothing".to_string(), Value::to_string)
                ),
            ));
        }
    };
    let mut targets = Vec::new();
    for name in &names {
        let target = Target::from_module(name).ok_or_else(|| {
            let known: Vec<&str> = Target::ALL.iter().map(|t| t.module()).collect();
            err(
                field,
                format!(
                    "\"{name}\" is not a projection anemone adapts (expected some of {})",
                    known.join(", ")
                ),
            )
        })?;
        targets.push(target);
    }
    targets.sort();
    targets.dedup();
    Ok(targets)
}

/// The `adapter_config.json` of `config`, with the fields PEFT writes for a
/// plain LoRA adapter of a causal language model.
pub fn config_json(config: &LoraConfig, n_layers: usize, base_model: Option<&str>) -> Value {
    // An f32 as the decimal it was written as (0.05, not 0.05000000074505806);
    // a whole alpha as an integer, as PEFT writes it.
    let decimal = |x: f32| json!(x.to_string().parse::<f64>().unwrap_or(f64::from(x)));
    let alpha = if config.alpha.fract() == 0.0 && config.alpha.abs() < 1e9 {
        json!(config.alpha as i64)
    } else {
        decimal(config.alpha)
    };
    let layers = if config.layers.len() == n_layers {
        Value::Null
    } else {
        json!(config.layers)
    };
    let mut modules: Vec<&str> = config.targets.iter().map(|t| t.module()).collect();
    modules.sort_unstable();
    json!({
        "alpha_pattern": {},
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": layers,
        "lora_alpha": alpha,
        "lora_dropout": decimal(config.dropout),
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": config.rank,
        "rank_pattern": {},
        "revision": null,
        "target_modules": modules,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": config.rslora,
    })
}

/// The adapters in directory `dir` for the base model `model`.
pub fn read_adapters(dir: &Path, model: &ModelConfig) -> Result<Adapters> {
    let config_path = dir.join(CONFIG_FILE);
    let text = crate::memory::read_text(&config_path)?;
    let json: Value = serde_json::from_str(&text).map_err(|e| {
        Error::format(
            &config_path,
            format!("line {} column {}", e.line(), e.column()),
            e.to_string(),
        )
    })?;
    let config = parse_config(&config_path, &json, model.n_layers)?;
    let weights_path = dir.join(WEIGHTS_FILE);
    let reader = SafetensorsReader::open_file(&weights_path)?;
    let mut adapters = Adapters::zeros(model, &config)
        .map_err(|e| Error::format(&config_path, "config", e.to_string()))?;
    for name in reader.names() {
        let known = parse_peft_name(name)
            .is_some_and(|(layer, target, _)| adapters.contains(layer, target));
        if !known {
            return Err(Error::format(
                &weights_path,
                name,
                format!(
                    "not an adapter {} describes (lora_A/lora_B of its target_modules in its \
                     layers_to_transform)",
                    config_path.display()
                ),
            ));
        }
    }
    let rank = config.rank;
    for (layer, target) in config.entries() {
        let (out, input) = target.shape(model);
        for (m, shape) in [(Matrix::A, [rank, input]), (Matrix::B, [out, rank])] {
            let name = peft_name(layer, target, m);
            let values = read_checked(&reader, &weights_path, &name, &shape)?;
            let slot = match m {
                Matrix::A => adapters.a_mut(layer, target),
                Matrix::B => adapters.b_mut(layer, target),
            };
            if m == Matrix::B && target.rope_rows() {
                slot.copy_from_slice(&hf_rows_to_interleaved(&values, model.head_dim, rank));
            } else {
                slot.copy_from_slice(&values);
            }
        }
    }
    Ok(adapters)
}

/// Tensor `name` with `shape`, finite; the errors say what the shape should be and why.
fn read_checked(
    reader: &SafetensorsReader,
    path: &Path,
    name: &str,
    shape: &[usize],
) -> Result<Vec<f32>> {
    match reader.shape(name) {
        None => {
            return Err(Error::format(
                path,
                name,
                format!(
                    "missing (expected shape {shape:?}): the config's targets and layers need it"
                ),
            ));
        }
        Some(found) if found != shape => {
            return Err(Error::format(
                path,
                name,
                format!(
                    "shape {found:?} where the base model and the rank of {CONFIG_FILE} need \
                     {shape:?}: the adapters were made for another model"
                ),
            ));
        }
        Some(_) => {}
    }
    let values = reader.read_f32(name, shape)?;
    reader.check_finite(name, &values)?;
    Ok(values)
}

/// Every matrix of `adapters` as PEFT stores it: name, shape, values (B of
/// q and k with its rows back in HF's order), in storage order.
pub fn peft_tensors(adapters: &Adapters) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let model = adapters.model();
    let rank = adapters.config.rank;
    let mut tensors = Vec::new();
    for (layer, target) in adapters.config.entries() {
        let (out, input) = target.shape(model);
        let b = adapters.b(layer, target);
        let b = if target.rope_rows() {
            interleaved_rows_to_hf(b, model.head_dim, rank)
        } else {
            b.to_vec()
        };
        let a = adapters.a(layer, target).to_vec();
        tensors.push((peft_name(layer, target, Matrix::A), vec![rank, input], a));
        tensors.push((peft_name(layer, target, Matrix::B), vec![out, rank], b));
    }
    tensors
}

/// Write `adapters` into `dir` (created if missing) as PEFT does:
/// `adapter_config.json` ([`config_json`], `base_model` as
/// `base_model_name_or_path`) and `adapter_model.safetensors` in f32
/// ([`peft_tensors`]), both atomically.
pub fn write_adapters(adapters: &Adapters, dir: &Path, base_model: Option<&str>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensors = peft_tensors(adapters);
    let to_write: Vec<TensorToWrite> = tensors
        .iter()
        .map(|(name, shape, data)| TensorToWrite { name, shape, data })
        .collect();
    write_safetensors(&dir.join(WEIGHTS_FILE), &to_write, FloatDtype::F32)?;
    let config = config_json(&adapters.config, adapters.model().n_layers, base_model);
    let mut text = serde_json::to_string_pretty(&config).expect("a JSON value serializes");
    text.push('\n');
    crate::atomic::write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())
}

/// A LoRA run's record of its frozen base, in the run directory.
pub const BASE_RECORD: &str = "base.json";
/// A LoRA run's adapters (PEFT's layout), in the run directory.
pub const RUN_ADAPTERS: &str = "adapters";

/// Where a LoRA run's base model is and its [`fingerprint`] when the run
/// began: a run's adapters mean nothing on another base.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BaseRecord {
    /// Absolute path of the base (a model directory, a run or a model file).
    pub path: std::path::PathBuf,
    pub fingerprint: String,
}

impl BaseRecord {
    /// The record of the base at `base`, fingerprinted now.
    pub fn of(base: &Path) -> Result<BaseRecord> {
        Ok(BaseRecord {
            path: std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf()),
            fingerprint: fingerprint(base)?,
        })
    }

    /// Write `run_dir/base.json` atomically.
    pub fn write(&self, run_dir: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| Error::Invalid(e.to_string()))?;
        crate::atomic::write_atomic(&run_dir.join(BASE_RECORD), &json)
    }

    /// Read `run_dir/base.json`.
    pub fn read(run_dir: &Path) -> Result<BaseRecord> {
        let path = run_dir.join(BASE_RECORD);
        let text = crate::memory::read_text(&path)?;
        serde_json::from_str(&text).map_err(|e| {
            Error::format(
                &path,
                format!("line {} column {}", e.line(), e.column()),
                e.to_string(),
            )
        })
    }

    /// An error unless the base's files are those the run of `run_dir`
    /// began with (its [`fingerprint`]), naming `run_dir/base.json`.
    pub fn check(&self, run_dir: &Path) -> Result<()> {
        let record = run_dir.join(BASE_RECORD);
        if !self.path.exists() {
            return Err(Error::format(
                &record,
                "path",
                format!(
                    "the base model {} is gone\nhint: put the base the run was trained on back \
                     there (its adapters mean nothing on another model)",
                    self.path.display()
                ),
            ));
        }
        let now = fingerprint(&self.path)?;
        if now != self.fingerprint {
            return Err(Error::format(
                &record,
                "fingerprint",
                format!(
                    "the base model {} has changed since the run began ({}; now {now})\nhint: \
                     restore the base the run was trained on (its adapters mean nothing on \
                     another model)",
                    self.path.display(),
                    self.fingerprint
                ),
            ));
        }
        Ok(())
    }
}

/// Whether `dir` is a LoRA run: a base record and adapters.
pub fn is_lora_run(dir: &Path) -> bool {
    dir.join(BASE_RECORD).is_file() && dir.join(RUN_ADAPTERS).join(CONFIG_FILE).is_file()
}

/// The files whose bytes make up the model at `model`: a model directory's
/// `config.json`, index and every `.safetensors` file (sorted by name); a
/// run directory's `checkpoint.bin`, or a LoRA run's base record and
/// adapter tensors; a model file itself.
fn model_files(model: &Path) -> Result<Vec<PathBuf>> {
    if !model.is_dir() {
        return Ok(vec![model.to_path_buf()]);
    }
    if is_model_dir(model) {
        let mut files = vec![model.join("config.json")];
        let entries = std::fs::read_dir(model).map_err(|e| crate::Error::io(model, e))?;
        let mut tensors: Vec<PathBuf> = entries
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                name.is_some_and(|n| n.ends_with(".safetensors") || n == INDEX_FILE)
            })
            .collect();
        tensors.sort();
        files.extend(tensors);
        return Ok(files);
    }
    let checkpoint = model.join("checkpoint.bin");
    if checkpoint.is_file() {
        return Ok(vec![checkpoint]);
    }
    Ok(vec![
        model.join(BASE_RECORD),
        model.join(RUN_ADAPTERS).join(WEIGHTS_FILE),
    ])
}

/// A fingerprint of the model at `model` (any form `model::load_weights`
/// reads): the CRC-32 of its files' names and bytes ([`model_files`]),
/// their count and size, e.g. `crc32 1a2b3c4d of 2 files, 538 MB`. A LoRA run
/// records its base's, so that a base changed since is an error, not
/// silently different adapters.
pub fn fingerprint(model: &Path) -> Result<String> {
    use std::io::Read;
    let files = model_files(model)?;
    let mut crc = crc32fast::Hasher::new();
    let mut bytes = 0u64;
    let mut buffer = vec![0u8; 1 << 20];
    for path in &files {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        crc.update(name.unwrap_or_default().as_bytes());
        let mut file = std::fs::File::open(path).map_err(|e| crate::Error::io(path, e))?;
        loop {
            let n = file
                .read(&mut buffer)
                .map_err(|e| crate::Error::io(path, e))?;
            if n == 0 {
                break;
            }
            crc.update(&buffer[..n]);
            bytes += n as u64;
        }
    }
    Ok(format!(
        "crc32 {:08x} of {} files, {bytes} bytes",
        crc.finalize(),
        files.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for target in Target::ALL {
            for m in [Matrix::A, Matrix::B] {
                assert_eq!(
                    parse_peft_name(&peft_name(11, target, m)),
                    Some((11, target, m))
                );
            }
        }
        assert_eq!(
            peft_name(0, Target::Gate, Matrix::B),
            "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight"
        );
        assert_eq!(
            parse_peft_name("base_model.model.lm_head.lora_A.weight"),
            None
        );
        assert_eq!(
            parse_peft_name("base_model.model.model.layers.0.mlp.q_proj.lora_A.weight"),
            None
        );
    }

    #[test]
    fn config_fields_and_their_errors() {
        let path = Path::new("adapter_config.json");
        let base = json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05,
            "target_modules": ["v_proj", "q_proj"], "layers_to_transform": [1], "bias": "none",
            "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": null});
        let config = parse_config(path, &base, 2).unwrap();
        assert_eq!(config.targets, vec![Target::Q, Target::V]);
        assert_eq!(
            (config.rank, config.alpha, config.layers.clone()),
            (4, 8.0, vec![1])
        );
        let again = parse_config(path, &config_json(&config, 2, None), 2).unwrap();
        assert_eq!(again, config);
        let err = |patch: Value| {
            let mut json = base.clone();
            for (k, v) in patch.as_object().unwrap() {
                json[k] = v.clone();
            }
            parse_config(path, &json, 2).unwrap_err().to_string()
        };
        assert!(err(json!({"use_dora": true})).starts_with("adapter_config.json: use_dora: DoRA"));
        assert!(
            err(json!({"target_modules": ["lm_head"]})).contains("\"lm_head\" is not a projection")
        );
        assert!(err(json!({"target_modules": ".*proj"})).contains("regular expressions"));
        assert!(
            err(json!({"layers_to_transform": [2]})).contains("layer 2 is not in the base model")
        );
        assert!(err(json!({"bias": "all"})).starts_with("adapter_config.json: bias:"));
        assert!(err(json!({"rank_pattern": {"q_proj": 8}})).contains("rank_pattern"));
        assert!(err(json!({"r": 0})).starts_with("adapter_config.json: r:"));
        assert!(err(json!({"peft_type": "IA3"})).contains("not a LoRA adapter"));
        assert!(err(json!({"modules_to_save": ["lm_head"]})).contains("modules_to_save"));
        assert!(
            err(json!({"layer_replication": [[0, 2]]}))
                .starts_with("adapter_config.json: layer_replication:")
        );
        assert!(err(json!({"lora_bias": true})).contains("biased adapters"));
        let all = parse_config(
            path,
            &json!({"peft_type": "LORA", "r": 2, "lora_alpha": 2.5,
            "target_modules": "all-linear", "use_rslora": true}),
            3,
        )
        .unwrap();
        assert_eq!(
            (all.targets.len(), all.layers.len(), all.scale()),
            (7, 3, 2.5 / 2f32.sqrt())
        );
    }
}
