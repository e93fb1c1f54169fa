//! Data: token files (memory-mapped, windows, splits), the llama2.c tokenizer
//! (read/write, encode/decode, BPE training), and the built-in story corpus.

pub mod corpus;
pub mod tokenizer;
pub mod tokens;
