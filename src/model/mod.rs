//! The model: configuration (with the features an architecture needs: q/k/v
//! biases, QK-norm, RoPE scaling, a tied classifier), parameters, RoPE, the
//! Llama kernels as MIL graphs (forward/backward pairs), the CPU-side math,
//! checkpoints, llama2.c import/export, Hugging Face checkpoints, LoRA
//! adapters (`lora`), and
//! [`load_weights`], which reads a Hugging Face model directory, a run
//! directory, an anemone checkpoint or a llama2.c file, whichever a path holds.
//! Talks to devices only through the [`crate::backend::Backend`] trait.

pub mod checkpoint;
pub mod config;
pub mod hf;
pub mod host;
pub mod kernels;
pub mod llama2c;
pub mod lora;
pub mod rope;
pub mod weights;

use std::path::Path;

pub use config::ModelConfig;
pub use rope::RopeScaling;
pub use weights::{Layout, Param, Weights};

/// Weights from a Hugging Face model directory (`config.json` and
/// safetensors), a run directory (its `checkpoint.bin`), an anemone
/// checkpoint or a llama2.c `model.bin`, whichever `path` is. A checkpoint
/// whose magic is damaged is reported as a checkpoint, not read as llama2.c.
pub fn load_weights(path: &Path) -> crate::Result<Weights> {
    if hf::files::is_model_dir(path) {
        return Weights::from_hf(&hf::HfCheckpoint::open(path)?);
    }
    if path.is_dir() {
        return load_weights(&path.join("checkpoint.bin"));
    }
    if checkpoint::looks_like_checkpoint(path) {
        Ok(checkpoint::load(path)?.weights)
    } else {
        llama2c::read(path)
    }
}
