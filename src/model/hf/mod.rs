//! Hugging Face model directories: what `save_pretrained` writes for the
//! Llama-shaped architectures anemone trains (Llama 2/3, SmolLM2, TinyLlama,
//! Qwen2/2.5, Qwen3, Mistral).
//!
//! - [`config`]: `config.json` + `generation_config.json` -> a validated
//!   [`HfConfig`]; every unsupported feature is an error naming the field.
//! - [`tensors`]: safetensors files (single or sharded) read by HF tensor name
//!   as `f32`, the tensor list a config implies, and the writer.
//! - [`rope`]: the per-head row permutation between HF's half-split rotation
//!   and anemone's interleaved one (and the inverse frequencies per rope type,
//!   re-exported from [`crate::model::rope`]).
//! - [`adapter`]: PEFT LoRA adapter directories (`adapter_config.json`,
//!   `adapter_model.safetensors`) as [`crate::model::lora::Adapters`].
//! - [`weights`]: anemone's `ModelConfig` and `Weights` from these
//!   ([`crate::model::ModelConfig::from_hf`], [`crate::model::Weights::from_hf`])
//!   and the HF tensors of `Weights` ([`hf_tensors`], [`write_hf_safetensors`]).
//!
//! - [`files`]: what makes a directory a model, the tokenizer and generation
//!   files a run keeps of its base model, the config of a model or such a run.
//! - [`export`]: a model directory transformers loads, written from `Weights`
//!   (`config.json` in the 5.x layout, `model.safetensors`, the base files).
//!
//! [`HfCheckpoint::open`] ties the first two together. The tokenizer and chat
//! template live in [`crate::data::hf`]. Not here: any download (a directory
//! on disk is the input).

pub mod adapter;
pub mod config;
pub mod export;
pub mod files;
pub mod rope;
pub mod tensors;
pub mod weights;

use std::path::Path;

pub use config::{Architecture, FloatDtype, HfConfig, RopeScaling};
pub use tensors::{SafetensorsReader, TensorSpec, TensorToWrite};
pub use weights::{HfTensor, hf_name, hf_tensors, write_hf_safetensors};

use crate::Result;

/// A checked model directory: its config and its tensors, every tensor the
/// config implies present with the right shape and a readable dtype.
#[derive(Debug)]
pub struct HfCheckpoint {
    pub config: HfConfig,
    pub tensors: SafetensorsReader,
}

impl HfCheckpoint {
    /// Read `dir/config.json` (and `generation_config.json`), map the
    /// safetensors file(s) and check them against the config.
    pub fn open(dir: &Path) -> Result<HfCheckpoint> {
        let config = HfConfig::open(dir)?;
        let tensors = SafetensorsReader::open_dir(dir)?;
        tensors.check(&config)?;
        Ok(HfCheckpoint { config, tensors })
    }

    /// Tensor `name` as `f32`, checked against the shape the config implies
    /// (names outside [`tensors::expected_tensors`] are read with their stored
    /// shape) and finite: a NaN or infinite weight is an error naming it.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let expected = tensors::expected_tensors(&self.config);
        let shape = match expected.iter().find(|spec| spec.name == name) {
            Some(spec) => spec.shape.clone(),
            None => self
                .tensors
                .shape(name)
                .map(<[usize]>::to_vec)
                .unwrap_or_default(),
        };
        let values = self.tensors.read_f32(name, &shape)?;
        self.tensors.check_finite(name, &values)?;
        Ok(values)
    }
}
