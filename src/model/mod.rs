//! The model: configuration (with the features an architecture needs: q/k/v
//! biases, QK-norm, RoPE scaling, a tied classifier), parameters, RoPE, the
//! Llama kernels as MIL graphs (forward/backward pairs), the CPU-side math,
//! checkpoints, llama2.c import/export, Hugging Face checkpoints, LoRA
//! adapters (`lora`), and
//! [`load_weights`], which reads a Hugging Face model directory, a run
//! directory, an anemone checkpoint or a llama2.c file, whichever a path holds
//! ([`load_for_decoding`] the same for the decoder, a llama2.c file mapped).
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
pub use weights::{Layout, Param, Weights, WeightsView};

/// Weights from a Hugging Face model directory (`config.json` and
/// safetensors), a run directory (its `checkpoint.bin`; a LoRA run's base
/// with its adapters merged), an anemone
/// checkpoint or a llama2.c `model.bin`, whichever `path` is. A checkpoint
/// whose magic is damaged is reported as a checkpoint, not read as llama2.c.
pub fn load_weights(path: &Path) -> crate::Result<Weights> {
    if hf::files::is_model_dir(path) {
        return Weights::from_hf(&hf::HfCheckpoint::open(path)?);
    }
    if path.is_dir() && !path.join("checkpoint.bin").exists() && hf::adapter::is_lora_run(path) {
        return hf::adapter::load_run(path);
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

/// Weights the decoder reads: a llama2.c file's tensors in place in a
/// read-only memory map, or any other model loaded whole.
#[derive(Debug)]
pub enum DecoderWeights {
    Mapped(llama2c::Mapped),
    Loaded(Weights),
}

impl DecoderWeights {
    pub fn config(&self) -> &ModelConfig {
        match self {
            DecoderWeights::Mapped(m) => m.config(),
            DecoderWeights::Loaded(w) => w.config(),
        }
    }

    /// Every tensor, borrowed.
    pub fn view(&self) -> WeightsView<'_> {
        match self {
            DecoderWeights::Mapped(m) => m.view(),
            DecoderWeights::Loaded(w) => w.view(),
        }
    }
}

/// [`load_weights`] for decoding: a llama2.c file is memory-mapped and its
/// tensors read in place ([`llama2c::map`]), with the same checks and errors;
/// everything else (and a file that cannot be used in place) is loaded whole.
pub fn load_for_decoding(path: &Path) -> crate::Result<DecoderWeights> {
    let is_llama2c = path.is_file()
        && !hf::files::is_model_dir(path)
        && !checkpoint::looks_like_checkpoint(path);
    if is_llama2c && let Some(mapped) = llama2c::map(path)? {
        return Ok(DecoderWeights::Mapped(mapped));
    }
    load_weights(path).map(DecoderWeights::Loaded)
}
