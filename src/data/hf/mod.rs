//! Hugging Face tokenizers and chat templates, read from a model directory
//! as transformers saves it.
//!
//! - [`tokenizer`]: `tokenizer.json` (the `tokenizers` crate, pure Rust, no
//!   network) with the named special tokens of `tokenizer_config.json`.
//! - [`chat`]: the chat template, rendered as `apply_chat_template` renders it.
//!
//! Not here: the model's config and tensors ([`crate::model::hf`]), token
//! files and batching ([`crate::data::tokens`]).

pub mod chat;
pub mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate};
pub use tokenizer::HfTokenizer;
