//! anemone trains and fine-tunes Llama-architecture language models with kernels
//! written as MIL programs, the language of the Apple Neural Engine (ANE).
//!
//! Every heavy piece of a training step is a MIL program plus CoreML-format weight
//! blobs. The same program runs either on the ANE through Apple's private
//! in-memory compiler, or on the portable CPU backend, which interprets MIL and is
//! the executable specification of what the ANE must compute.
//!
//! Layers, bottom up (see `ARCHITECTURE.md`):
//! - [`mil`]: typed IR, builder, text emitter and parser, verifier (no I/O).
//! - [`blob`]: the CoreML MILBlob v2 weight file format.
//! - [`package`]: MIL text + weight blobs = what a backend compiles.
//! - [`backend`]: the narrow backend trait, the CPU interpreter, the ANE runtime.
//! - [`doctor`]: what this machine offers the ANE backend, as a shareable report.
//! - [`report`]: run directories: metrics log, plots, run listings.
//! - [`bench`]: benchmark suites (training steps, ANE micro-benchmarks) and their timing harness.
//! - [`math`]: vectorizable `exp`, sigmoid and reductions for the hot loops, and
//!   how they run (`simd`, `on_pool`).

pub mod atomic;
pub mod backend;
pub mod bench;
pub mod blob;
pub mod data;
pub mod doctor;
pub mod error;
pub mod generate;
pub mod linalg;
pub mod math;
pub mod mil;
pub mod mmap;
pub mod model;
pub mod package;
pub mod report;
pub mod rng;
pub mod train;

pub use error::{Error, Result};
