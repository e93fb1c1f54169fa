//! The model: configuration, parameters, the Llama kernels as MIL graphs
//! (forward/backward pairs), the CPU-side math, checkpoints and llama2.c
//! import/export. Talks to devices only through the [`crate::backend::Backend`] trait.

pub mod checkpoint;
pub mod config;
pub mod hf;
pub mod host;
pub mod kernels;
pub mod llama2c;
pub mod weights;

pub use config::ModelConfig;
pub use weights::{Layout, Param, Weights};
