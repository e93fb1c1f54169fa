//! anemone trains and fine-tunes Llama-architecture language models with kernels
//! written as MIL programs, the language of the Apple Neural Engine (ANE).
//!
//! Every heavy piece of a training step is a MIL program plus CoreML-format weight
//! blobs. The same program runs either on the ANE through Apple's private
//! in-memory compiler, or on the portable CPU backend, which interprets MIL and is
//! the executable specification of what the ANE must compute.
//!
//! Layers, bottom up (see `ARCHITECTURE.md`):
//! - [`mil`]: typed IR, op table, builder, text emitter and parser, verifier (no I/O).
//! - [`blob`]: the CoreML MILBlob v2 weight file format.
//! - [`package`]: MIL text + weight blobs = what a backend compiles.
//! - [`backend`]: the narrow backend trait, the CPU interpreter, the ANE runtime.
//! - [`model`]: configs and presets (an architecture's features as data: q/k/v
//!   biases, QK-norm, RoPE scaling), the flat weights, RoPE, the layer kernels
//!   as MIL, host math, checkpoints, llama2.c and Hugging Face formats.
//! - [`train`]: the training step, the optimizer, the run loop and whole jobs.
//! - [`dist`]: data-parallel runs: the collective seam, one process or MPI.
//! - [`data`]: token files, tokenizers (llama2.c and `tokenizer.json`), chat
//!   templates, the built-in corpus.
//! - [`generate`]: decoding with a KV cache.
//! - [`doctor`]: what this machine offers the ANE backend, as a shareable report.
//! - [`energy`]: CPU, GPU and ANE joules over a span (IOReport on macOS,
//!   "unavailable" elsewhere), for the benchmarks and `metrics.jsonl`.
//! - [`npy`]: NumPy `.npy` files (`mil run`'s inputs and outputs).
//! - [`report`]: run directories: metrics log, plots, run listings.
//! - [`bench`]: benchmark suites (training steps, ANE micro-benchmarks) and their timing harness.
//! - [`linalg`], [`math`], [`rng`]: GEMM and transposes, vectorizable `exp` and
//!   how hot loops run (`simd`, `on_pool`), the random generator.
//! - [`atomic`], [`mmap`]: atomic file writes (and the removal of temp files
//!   a killed process left), read-only memory maps (the one module besides the
//!   ANE FFI with `unsafe`).
//! - [`memory`]: the memory budget checked before input-sized allocations,
//!   and bounded file reads.

pub mod atomic;
pub mod backend;
pub mod bench;
pub mod blob;
pub mod data;
pub mod dist;
pub mod doctor;
pub mod energy;
pub mod error;
pub mod generate;
pub mod linalg;
pub mod math;
pub mod memory;
pub mod mil;
pub mod mmap;
pub mod model;
pub mod npy;
pub mod package;
pub mod report;
pub mod rng;
pub mod team;
pub mod train;

pub use error::{Error, Result};
