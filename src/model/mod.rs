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
mod load;
pub mod lora;
pub mod rope;
pub mod weights;

pub use config::ModelConfig;
pub use rope::RopeScaling;
pub use weights::{Layout, Param, Weights, WeightsView};

pub use load::{DecoderWeights, load_for_decoding, load_fused, load_lora_base, load_weights};
