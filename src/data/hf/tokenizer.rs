//! A Hugging Face `tokenizer.json` through the `tokenizers` crate (pure Rust:
//! the `fancy-regex` engine, no Oniguruma, no network), with the special
//! tokens of `tokenizer_config.json` (and of a 4.x `special_tokens_map.json`).
//!
//! Owns encoding and decoding, the vocabulary size including added tokens,
//! the named special tokens (`bos_token`, `eos_token`, ...) a chat template
//! sees, and the tokenizer's EOS id. The model's own EOS ids come from
//! `generation_config.json`/`config.json` ([`crate::model::hf::HfConfig`]);
//! [`HfTokenizer::stop_token_ids`] merges the two.
//!
//! Not here: chat templates (`super::chat`), token files and batching
//! (`crate::data::tokens`), the llama2.c tokenizer (`crate::data::tokenizer`).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{Error, Result};

/// The named special tokens transformers passes to a chat template, in its order.
pub const SPECIAL_TOKEN_NAMES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// A token's `(start, end)` bytes in the text it came from.
pub type ByteRange = (usize, usize);

/// A `tokenizer.json` tokenizer with the special tokens of its directory.
pub struct HfTokenizer {
    path: PathBuf,
    inner: tokenizers::Tokenizer,
    /// `(name, content)` for each of [`SPECIAL_TOKEN_NAMES`] that is set.
    special_tokens: Vec<(String, String)>,
    vocab_size: usize,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size)
            .field("special_tokens", &self.special_tokens)
            .finish()
    }
}

impl HfTokenizer {
    /// `dir/tokenizer.json`, with the special tokens of
    /// `dir/special_tokens_map.json` and `dir/tokenizer_config.json` (the
    /// latter wins), when present.
    pub fn open(dir: &Path) -> Result<HfTokenizer> {
        let mut tokenizer = HfTokenizer::from_file(&dir.join("tokenizer.json"))?;
        tokenizer.special_tokens = read_special_tokens(dir)?;
        Ok(tokenizer)
    }

    /// What `--tokenizer` names: a directory (its `tokenizer.json` and
    /// special tokens, [`HfTokenizer::open`]), a file called
    /// `tokenizer.json` (with its directory's special tokens) or another
    /// `.json` file (alone, [`HfTokenizer::from_file`]).
    pub fn open_path(path: &Path) -> Result<HfTokenizer> {
        if path.is_dir() {
            return HfTokenizer::open(path);
        }
        match path.parent() {
            Some(dir) if path.file_name() == Some("tokenizer.json".as_ref()) => {
                HfTokenizer::open(if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                })
            }
            _ => HfTokenizer::from_file(path),
        }
    }

    /// True when `path` names a Hugging Face tokenizer rather than a llama2.c
    /// `tokenizer.bin`: a directory holding `tokenizer.json`, or a `.json` file.
    pub fn is_hf_path(path: &Path) -> bool {
        if path.is_dir() {
            return path.join("tokenizer.json").is_file();
        }
        path.extension().is_some_and(|e| e == "json")
    }

    /// A `tokenizer.json` alone (no named special tokens).
    pub fn from_file(path: &Path) -> Result<HfTokenizer> {
        let bytes = crate::memory::read_file(path, crate::memory::TEXT_FILE_LIMIT)?;
        HfTokenizer::from_bytes(&bytes, path)
    }

    /// The bytes of a `tokenizer.json`; `path` names it in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<HfTokenizer> {
        // JSON syntax first: the `tokenizers` crate panics (rather than
        // failing) on some errors inside its `decoder` object, such as an
        // invalid string there (found by the `hf_tokenizer` fuzz target).
        serde_json::from_slice::<serde_json::Value>(bytes)
            .map_err(|e| Error::format(path, "tokenizer", format!("not valid JSON: {e}")))?;
        // Valid JSON of the wrong shape can still reach such a panic: it is
        // caught and reported as the error it is.
        let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(bytes))
            .map_err(|panic| {
                let why = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("a malformed field");
                Error::format(
                    path,
                    "tokenizer",
                    format!("the tokenizers crate could not read it ({why}); check its `decoder`"),
                )
            })?;
        let inner = parsed.map_err(|e| Error::format(path, "tokenizer", e.to_string()))?;
        let vocab_size = inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&id| id as usize + 1);
        Ok(HfTokenizer {
            path: path.to_path_buf(),
            inner,
            special_tokens: Vec::new(),
            vocab_size,
        })
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's
    /// post-processor (e.g. a BOS for Llama 2 tokenizers), as in Python.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| Error::format(&self.path, "encode", e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// [`encode`](Self::encode) with each token's byte range in `text`
    /// (`(start, end)`; tokens the post-processor adds, such as a BOS, have
    /// an empty range). Slower than `encode`: the fine-tuning data uses it to
    /// find which tokens a span of the text covers.
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<(Vec<u32>, Vec<ByteRange>)> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::format(&self.path, "encode", e.to_string()))?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }

    /// The text of `ids`, optionally leaving out special tokens.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::format(&self.path, "decode", e.to_string()))
    }

    /// One more than the largest id, added tokens included: the embedding
    /// rows the tokenizer needs.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// `(name, content)` of the named special tokens that are set
    /// (`("eos_token", "<|im_end|>")`, ...), in [`SPECIAL_TOKEN_NAMES`] order.
    pub fn special_tokens(&self) -> &[(String, String)] {
        &self.special_tokens
    }

    /// The id of named special token `name` (`"eos_token"`, ...), when set
    /// and in the vocabulary.
    pub fn special_token_id(&self, name: &str) -> Option<u32> {
        let (_, content) = self.special_tokens.iter().find(|(n, _)| n == name)?;
        self.inner.token_to_id(content)
    }

    /// Ids of the added tokens flagged special in `tokenizer.json`, sorted.
    pub fn added_special_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, token)| token.special)
            .map(|(id, _)| id)
            .collect();
        ids.sort_unstable();
        ids
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.special_token_id("bos_token")
    }

    /// The id of `tokenizer_config.json`'s `eos_token`.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.special_token_id("eos_token")
    }

    /// Ids that end generation: the model's (`HfConfig::eos_token_ids`, from
    /// `generation_config.json` or `config.json`), then the tokenizer's EOS
    /// when it is not among them.
    pub fn stop_token_ids(&self, model_eos_ids: &[u32]) -> Vec<u32> {
        let mut ids = model_eos_ids.to_vec();
        if let Some(eos) = self.eos_token_id()
            && !ids.contains(&eos)
        {
            ids.push(eos);
        }
        ids
    }

    /// Every id the tokenizer produces must index a row of the model's
    /// embedding (`vocab_size` of `config_path`); a larger model vocabulary
    /// (padding, as Qwen's) is fine.
    pub fn check_fits(&self, model_vocab_size: usize, config_path: &Path) -> Result<()> {
        if self.vocab_size > model_vocab_size {
            return Err(Error::format(
                config_path,
                "vocab_size",
                format!(
                    "{model_vocab_size} is smaller than the {} ids of {}; the tokenizer \
                     belongs to another model",
                    self.vocab_size,
                    self.path.display()
                ),
            ));
        }
        Ok(())
    }

    /// The `tokenizer.json` it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A JSON file of the directory, or `None` when it does not exist.
pub(crate) fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = crate::memory::read_text(path)?;
    serde_json::from_str(&text).map(Some).map_err(|e| {
        Error::format(
            path,
            format!("line {} column {}", e.line(), e.column()),
            e.to_string(),
        )
    })
}

/// The named special tokens of `special_tokens_map.json` and
/// `tokenizer_config.json` (the latter wins): each a string, an `AddedToken`
/// object with `content`, or null.
pub(crate) fn read_special_tokens(dir: &Path) -> Result<Vec<(String, String)>> {
    let mut tokens: Vec<(String, Option<String>)> = SPECIAL_TOKEN_NAMES
        .iter()
        .map(|name| (name.to_string(), None))
        .collect();
    for file in ["special_tokens_map.json", "tokenizer_config.json"] {
        let path = dir.join(file);
        let Some(json) = read_optional_json(&path)? else {
            continue;
        };
        for (name, slot) in tokens.iter_mut() {
            let content = match json.get(name.as_str()) {
                None => continue,
                Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(value) => match value.get("content").and_then(Value::as_str) {
                    Some(s) => Some(s.to_string()),
                    None => {
                        return Err(Error::format(
                            &path,
                            name.as_str(),
                            format!(
                                "expected a string or an object with \"content\", found {value}"
                            ),
                        ));
                    }
                },
            };
            *slot = content;
        }
    }
    Ok(tokens
        .into_iter()
        .filter_map(|(name, content)| Some((name, content?)))
        .collect())
}
