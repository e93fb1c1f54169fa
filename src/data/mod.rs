//! Data: token files (windows, splits, batches), the llama2.c tokenizer
//! (read/write, encode/decode, BPE training), the seeded sampler RNG, and the
//! built-in story corpus.

pub mod corpus;
pub mod hf;
pub mod tokenizer;
pub mod tokens;
