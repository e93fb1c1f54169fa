//! What a training job adds for fine-tuning on examples and for LoRA: JSONL
//! data (`data::sft`) encoded with the base model's tokenizer and chat
//! template into batch sources with loss weights, the record of those files
//! in the run directory (so `--resume` re-reads exactly them), and the
//! adapters' config from the `--lora-*` options.
//!
//! Not here: the examples' shapes, masking and windows (`data::sft`), the
//! LoRA step (`train::lora`), the run policy (`train::job`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::options::JobOptions;
use super::source::SftSource;
use crate::data::hf::{ChatTemplate, HfTokenizer};
use crate::data::sft::{Encoder, Example, SftBatcher, SftFiles, pad_id};
use crate::data::tokens::Order;
use crate::model::lora::{LoraConfig, Target};
use crate::{Error, Result};

/// `--lora-rank` when not given (mlx-lm's and many recipes' 8).
pub const DEFAULT_RANK: usize = 8;
/// `--lora-alpha` when not given (PEFT recipes' 2 x rank).
pub const DEFAULT_ALPHA: f32 = 16.0;

/// A JSONL file as a run records it: where it was, its size and CRC-32.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JsonlFile {
    /// Absolute path when the run started.
    pub path: PathBuf,
    pub bytes: u64,
    /// CRC-32 of the file's bytes, 8 hex digits.
    pub crc32: String,
}

impl JsonlFile {
    /// The record of the file at `path`.
    pub fn of(path: &Path) -> Result<JsonlFile> {
        let bytes = crate::memory::read_file(path, u64::MAX)?;
        Ok(JsonlFile {
            path: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
            bytes: bytes.len() as u64,
            crc32: format!("{:08x}", crc32fast::hash(&bytes)),
        })
    }

    /// An error unless the file at the recorded path still holds the
    /// recorded bytes.
    fn check(&self) -> Result<()> {
        let now = JsonlFile::of(&self.path)?;
        if now.bytes != self.bytes || now.crc32 != self.crc32 {
            return Err(Error::Invalid(format!(
                "{} has changed since the run began ({} bytes, CRC-32 {}; now {} bytes, CRC-32 \
                 {})\nhint: resume with the data the run started with",
                self.path.display(),
                self.bytes,
                self.crc32,
                now.bytes,
                now.crc32
            )));
        }
        Ok(())
    }
}

/// A run's fine-tuning data: its JSONL files and how they are read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SftRecord {
    pub train: JsonlFile,
    /// `valid.jsonl`, when the data directory has one.
    pub valid: Option<JsonlFile>,
    /// Without `valid`: the fraction of the examples held out (the last ones).
    pub val_fraction: f64,
    /// Only completions and assistant turns count in the loss.
    pub mask_prompt: bool,
}

impl SftRecord {
    /// The record of `--data` (a `.jsonl` file or a directory with
    /// `train.jsonl` and optionally `valid.jsonl`).
    pub fn of(data: &Path, val_fraction: f64, mask_prompt: bool) -> Result<SftRecord> {
        let files = SftFiles::locate(data)?;
        Ok(SftRecord {
            train: JsonlFile::of(&files.train)?,
            valid: files.valid.as_deref().map(JsonlFile::of).transpose()?,
            val_fraction,
            mask_prompt,
        })
    }
}

/// The batch sources of fine-tuning data, and notes for the user.
pub struct SftSources {
    pub train: SftSource,
    pub val: SftSource,
    pub notes: Vec<String>,
}

/// Encode the recorded JSONL files with the tokenizer and chat template of
/// `model_dir` (a Hugging Face model directory, or a run that kept them)
/// into windows of `seq`: training examples drawn in `order` from `seed`,
/// held-out ones in file order. Every id must be below `vocab`.
pub fn open(
    record: &SftRecord,
    model_dir: &Path,
    seq: usize,
    order: Order,
    seed: u64,
    vocab: usize,
) -> Result<SftSources> {
    record.train.check()?;
    if let Some(valid) = &record.valid {
        valid.check()?;
    }
    let tokenizer = HfTokenizer::open(model_dir).map_err(|e| {
        Error::Invalid(format!(
            "{e}\nhint: JSONL data is tokenized with the base model's tokenizer.json: use \
             --init with a Hugging Face model directory (or a run made from one)"
        ))
    })?;
    let template = ChatTemplate::open(model_dir)?;
    let encoder = Encoder {
        tokenizer: &tokenizer,
        template: template.as_ref(),
        mask_prompt: record.mask_prompt,
    };
    let mut train = encoder.encode_file(&record.train.path)?;
    let val = match &record.valid {
        Some(valid) => encoder.encode_file(&valid.path)?,
        None => {
            let held = ((train.len() as f64 * record.val_fraction).round() as usize)
                .clamp(1, train.len().saturating_sub(1).max(1));
            if train.len() < 2 {
                return Err(Error::format(
                    &record.train.path,
                    "rows",
                    "one example cannot be both trained on and held out\nhint: add rows, or \
                     give a directory with train.jsonl and valid.jsonl",
                ));
            }
            train.split_off(train.len() - held)
        }
    };
    let valid = record.valid.as_ref().unwrap_or(&record.train);
    for (examples, file) in [(&train, &record.train), (&val, valid)] {
        check_ids(examples, vocab, &tokenizer, &file.path)?;
    }
    let mut notes = vec![format!(
        "fine-tuning data: {} training and {} held-out examples from {}{}",
        train.len(),
        val.len(),
        record.train.path.display(),
        if record.mask_prompt {
            " (loss on completions and assistant turns only)"
        } else {
            ""
        }
    )];
    let unlocated: usize = train.iter().map(|e| e.unlocated_turns).sum();
    if unlocated > 0 {
        notes.push(format!(
            "note: {unlocated} assistant turns are left out of the loss: the chat template \
             renders the conversation before them differently (see docs/lora.md)"
        ));
    }
    let empty = |examples: &[Example]| {
        let counts = |e: &&Example| e.loss.iter().take(seq + 1).any(|&counted| counted);
        examples.len() - examples.iter().filter(counts).count()
    };
    if empty(&train) == train.len() {
        return Err(Error::format(
            &record.train.path,
            "rows",
            format!(
                "no example has a token that counts in the loss within --seq {seq} + 1 tokens \
                 (the prompts fill the window)\nhint: raise --seq{}",
                if record.mask_prompt {
                    ", or drop --mask-prompt"
                } else {
                    ""
                }
            ),
        ));
    }
    let without = empty(&train) + empty(&val);
    if without > 0 {
        notes.push(format!(
            "warning: {without} examples have nothing that counts in the loss within --seq \
             {seq} + 1 tokens (their prompts fill the window) and teach nothing (raise --seq)"
        ));
    }
    let pad = pad_id(&tokenizer);
    let train = SftBatcher::new(train, seq, pad, order, seed)?;
    let val = SftBatcher::new(val, seq, pad, Order::Sequential, 0)?;
    let too_long = train.too_long() + val.too_long();
    if too_long > 0 {
        notes.push(format!(
            "warning: {too_long} examples are longer than --seq {seq} + 1 tokens and are cut \
             there (raise --seq to keep them whole)"
        ));
    }
    Ok(SftSources {
        train: SftSource::new(train),
        val: SftSource::new(val),
        notes,
    })
}

/// The examples of a JSONL file to evaluate (`eval --data F.jsonl`, or a
/// directory's `valid.jsonl`), encoded with the tokenizer and chat template
/// of `model_dir`, and the pad id of its tokenizer.
pub fn eval_examples(
    data: &Path,
    model_dir: &Path,
    mask_prompt: bool,
    vocab: usize,
) -> Result<(Vec<Example>, u32)> {
    let files = SftFiles::locate(data)?;
    let path = files.valid.unwrap_or(files.train);
    let tokenizer = HfTokenizer::open(model_dir).map_err(|e| {
        Error::Invalid(format!(
            "{e}\nhint: JSONL data is tokenized with the model's tokenizer.json: --model must \
             be a Hugging Face model directory or a run made from one"
        ))
    })?;
    let template = ChatTemplate::open(model_dir)?;
    let encoder = Encoder {
        tokenizer: &tokenizer,
        template: template.as_ref(),
        mask_prompt,
    };
    let examples = encoder.encode_file(&path)?;
    check_ids(&examples, vocab, &tokenizer, &path)?;
    Ok((examples, pad_id(&tokenizer)))
}

/// Every id of `examples` below the model's vocabulary `vocab`.
fn check_ids(
    examples: &[Example],
    vocab: usize,
    tokenizer: &HfTokenizer,
    data: &Path,
) -> Result<()> {
    let largest = examples.iter().flat_map(|e| e.ids.iter()).max();
    match largest {
        Some(&id) if id as usize >= vocab => Err(Error::format(
            tokenizer.path(),
            "vocabulary",
            format!(
                "{} has token id {id}, outside the model's vocabulary of {vocab}: the tokenizer \
                 does not fit the model\nhint: use the tokenizer of the model --init names",
                data.display()
            ),
        )),
        _ => Ok(()),
    }
}

/// The adapters of a `--lora` run on a model of `n_layers` layers, from
/// the options (defaults: rank 8, alpha 16, no dropout, all seven targets,
/// every layer, merged into the base where the engine allows).
pub fn lora_config(options: &JobOptions, n_layers: usize) -> Result<LoraConfig> {
    let config = LoraConfig::new(
        options.lora_rank.unwrap_or(DEFAULT_RANK),
        options.lora_alpha.unwrap_or(DEFAULT_ALPHA),
        options.lora_dropout.unwrap_or(0.0),
        options.lora_targets.as_deref().unwrap_or(&Target::ALL),
        options.lora_layers,
        n_layers,
    )?;
    Ok(LoraConfig {
        unmerged: options.lora_unmerged,
        ..config
    })
}
