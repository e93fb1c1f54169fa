//! Reading a model from whatever a path holds ([`load_weights`]): a Hugging
//! Face model directory, a run directory (a LoRA run's base with its
//! adapters merged), an anemone checkpoint or a llama2.c file; the same for
//! the decoder with a llama2.c file mapped ([`load_for_decoding`]); a base
//! with PEFT adapters merged ([`load_fused`]).

use std::path::Path;

use super::hf::adapter::{self, BaseRecord, RUN_ADAPTERS, read_adapters};
use super::{ModelConfig, Weights, WeightsView, checkpoint, hf, llama2c};

/// Weights from a Hugging Face model directory (`config.json` and
/// safetensors), a run directory (its `checkpoint.bin`; a LoRA run's base
/// with its adapters merged), an anemone
/// checkpoint or a llama2.c `model.bin`, whichever `path` is. A checkpoint
/// whose magic is damaged is reported as a checkpoint, not read as llama2.c.
pub fn load_weights(path: &Path) -> crate::Result<Weights> {
    if hf::files::is_model_dir(path) {
        return Weights::from_hf(&hf::HfCheckpoint::open(path)?);
    }
    if path.is_dir() && !path.join("checkpoint.bin").exists() && adapter::is_lora_run(path) {
        return load_lora_run(path);
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

/// The weights of the model at `model` (any form [`load_weights`] reads)
/// with the PEFT adapters of `dir` merged in (`W + s B A`, exact): what
/// `generate --adapters` and `fuse` run on.
pub fn load_fused(model: &Path, dir: &Path) -> crate::Result<Weights> {
    let mut weights = load_weights(model)?;
    let adapters = read_adapters(dir, weights.config())?;
    adapters.fuse_into(&mut weights);
    Ok(weights)
}

/// The frozen base of the LoRA run in `run_dir`, once its files are checked
/// to be those the run began with, and its record.
pub fn load_lora_base(run_dir: &Path) -> crate::Result<(Weights, BaseRecord)> {
    let record = BaseRecord::read(run_dir)?;
    record.check(run_dir)?;
    Ok((load_weights(&record.path)?, record))
}

/// A LoRA run's model: its base (checked against the record) with its
/// latest adapters merged in.
fn load_lora_run(run_dir: &Path) -> crate::Result<Weights> {
    let (mut weights, _) = load_lora_base(run_dir)?;
    let adapters = read_adapters(&run_dir.join(RUN_ADAPTERS), weights.config())?;
    adapters.fuse_into(&mut weights);
    Ok(weights)
}
