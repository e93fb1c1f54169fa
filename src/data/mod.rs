//! Data: token files (windows, splits, batches), the llama2.c tokenizer
//! (read/write, encode/decode, BPE training), the seeded sampler RNG, the
//! built-in story corpus, and fine-tuning data (`sft`: JSONL rows as tokens
//! with a loss mask, padded batches).

pub mod corpus;
pub mod hf;
pub mod sft;
pub mod tokenizer;
pub mod tokens;
