//! The files of a Hugging Face model directory besides its weights, and the
//! copies a run keeps of them: what makes a directory a model
//! ([`is_model_dir`]), the tokenizer, chat template and generation config a
//! fine-tuned run carries on ([`BASE_FILES`], [`read_base_files`],
//! [`keep_base_files`]), and the
//! [`HfConfig`] of a model directory or of a run made from one
//! ([`base_config`]).
//!
//! A run directory has its own `config.json` (the run's record), so the
//! base model's `config.json` is kept as [`BASE_CONFIG`]; the other files
//! keep their names, so the tokenizer and chat template readers
//! ([`crate::data::hf`]) open a run directory as they open a model directory.
//!
//! Not here: the weights (`super::tensors`), writing a model directory
//! (`super::export`).

use std::path::{Path, PathBuf};

use super::config::HfConfig;
use super::tensors::{INDEX_FILE, SINGLE_FILE};
use crate::Result;

/// The base model's `config.json`, as a run directory keeps it.
pub const BASE_CONFIG: &str = "hf_config.json";

/// The files of a model directory that a run keeps and an export writes
/// (each when present): tokenizer, special tokens, chat template and
/// generation settings.
pub const BASE_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// A Hugging Face model directory: `config.json` and `model.safetensors` or
/// the sharded index beside it. (A run directory has a `config.json` but no
/// safetensors.)
pub fn is_model_dir(path: &Path) -> bool {
    path.is_dir()
        && path.join("config.json").is_file()
        && (path.join(SINGLE_FILE).is_file() || path.join(INDEX_FILE).is_file())
}

/// The directory the base files of `model` are in: a model directory or a
/// run directory (`None` for a model file, such as a llama2.c `model.bin`).
fn base_dir(model: &Path) -> Option<&Path> {
    model.is_dir().then_some(model)
}

/// The config of the Hugging Face model `model` is or was made from: the
/// model directory's `config.json`, or the [`BASE_CONFIG`] a run kept, each
/// with its directory's `generation_config.json`. `None` for anything else.
pub fn base_config(model: &Path) -> Result<Option<HfConfig>> {
    let Some(dir) = base_dir(model) else {
        return Ok(None);
    };
    if is_model_dir(dir) {
        return HfConfig::open(dir).map(Some);
    }
    let kept = dir.join(BASE_CONFIG);
    if kept.is_file() {
        return HfConfig::open_with(&kept, &dir.join("generation_config.json")).map(Some);
    }
    Ok(None)
}

/// The base files `model` (a model directory or a run made from one) holds,
/// as `(source, name to give the copy)`: its config first (as
/// [`BASE_CONFIG`] from a model directory; `config.json` when `export` is
/// true, the name a model directory gives it), then [`BASE_FILES`].
pub fn base_files(model: &Path, export: bool) -> Vec<(PathBuf, &'static str)> {
    let Some(dir) = base_dir(model) else {
        return Vec::new();
    };
    let mut files = Vec::new();
    let config = if is_model_dir(dir) {
        dir.join("config.json")
    } else {
        dir.join(BASE_CONFIG)
    };
    if config.is_file() {
        files.push((config, if export { "config.json" } else { BASE_CONFIG }));
    }
    for name in BASE_FILES {
        let path = dir.join(name);
        if path.is_file() {
            files.push((path, name));
        }
    }
    files
}

/// The base files of `model` (see [`base_files`]) read into memory, as
/// `(name of the copy, bytes)`: read before a run takes its directory, so
/// that a run replacing the one it starts from (`--overwrite`) keeps them.
pub fn read_base_files(model: &Path) -> Result<Vec<(&'static str, Vec<u8>)>> {
    base_files(model, false)
        .into_iter()
        .map(|(source, name)| {
            let bytes = crate::memory::read_file(&source, crate::memory::TEXT_FILE_LIMIT)?;
            Ok((name, bytes))
        })
        .collect()
}

/// Write base files read by [`read_base_files`] into `run_dir`, each
/// atomically; returns the names written.
pub fn keep_base_files(
    files: &[(&'static str, Vec<u8>)],
    run_dir: &Path,
) -> Result<Vec<&'static str>> {
    for (name, bytes) in files {
        crate::atomic::write_atomic(&run_dir.join(name), bytes)?;
    }
    Ok(files.iter().map(|(name, _)| *name).collect())
}

/// Copy `from` to `to` through a temp file and a rename.
pub fn copy_atomic(from: &Path, to: &Path) -> Result<()> {
    let bytes = crate::memory::read_file(from, crate::memory::TEXT_FILE_LIMIT)?;
    crate::atomic::write_atomic(to, &bytes)
}
