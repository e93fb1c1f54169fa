//! MIL, the Model Intermediate Language the ANE compiler consumes: a typed IR
//! ([`ir`]), the op list ([`op`]), shape/dtype inference ([`infer`]), a builder
//! for kernels ([`build`]), the text emitter ([`emit`](mod@emit)) and parser ([`parse`](mod@parse)),
//! the formatter that keeps comments ([`format`](mod@format)), the verifier
//! with the catalogue of ANE rules ([`verify`]), and the ANE's I/O limits with
//! the padding that meets them ([`layout`]).
//!
//! This module does no I/O, is plain safe Rust, and knows nothing about macOS.

pub mod build;
pub mod emit;
pub mod format;
pub mod infer;
pub mod ir;
pub mod layout;
pub mod op;
pub mod parse;
pub mod verify;

pub use build::{Builder, Tensor};
pub use emit::emit;
pub use ir::{
    Arg, BlobRef, DType, Dialect, Function, Literal, Operation, Program, TensorType, Value, Var,
};
pub use op::Op;
pub use parse::parse;
