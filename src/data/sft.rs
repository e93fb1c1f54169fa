//! Fine-tuning data: JSONL rows to token ids with a loss flag per token, and
//! batches of padded windows with a loss weight per target.
//!
//! Files: a `.jsonl` file, or a directory with `train.jsonl` and optionally
//! `valid.jsonl` (mlx-lm's layout) ([`SftFiles::locate`]). One JSON object a
//! line, blank lines skipped, in one of three shapes ([`Row`]):
//! - `{"text": ...}`: tokenized with the tokenizer's special tokens (a BOS
//!   where its post-processor adds one), EOS appended unless it ends with it;
//!   every token counts;
//! - `{"prompt": ..., "completion": ...}`: with a chat template, the
//!   conversation `[user: prompt, assistant: completion]`; without one, the
//!   text `prompt + completion` tokenized like a text row;
//! - `{"messages": [{"role", "content"}, ...]}`: rendered with the model's
//!   chat template ([`ChatTemplate::render`]) and tokenized without special
//!   tokens (the template writes them), as `apply_chat_template` does.
//!
//! Other keys of a row are ignored. A line that is not JSON, a row of none of
//! the shapes, a field of the wrong type, or a template that fails to render
//! is an error naming the file and the line.
//!
//! Masking (`mask_prompt`): only completions and assistant turns count. An
//! assistant turn `i` spans the text from the end of the conversation before
//! it rendered with the generation prompt (`messages[..i]`,
//! `add_generation_prompt`) to the end of the conversation up to and
//! including it (`messages[..=i]`): its content and whatever the template
//! closes it with (`<|im_end|>\n`), so the model learns to stop. Both
//! renderings must be text prefixes of the whole conversation's text; a
//! template that rewrites earlier turns (Qwen3's drops the reasoning of
//! answers before the last user message) breaks that for those turns, which
//! are then left out of the loss and counted ([`Example::unlocated_turns`]),
//! as is an assistant message that opens a conversation.
//! A token counts when its byte range starts inside a span (token offsets of
//! the one tokenization of the whole text, so tokens merged across a
//! boundary are never split). Without `mask_prompt` every token counts.
//!
//! Batching ([`window`], [`SftBatcher`]): one example a window of `seq`
//! positions, inputs `ids[..n - 1]` and targets `ids[1..n]` of its first
//! `n = min(len, seq + 1)` tokens, the rest padded with the pad id and given
//! weight 0; an example longer than `seq + 1` tokens is truncated and counted
//! ([`SftBatch::truncated`]). Short examples are padded, not packed: packing
//! several into a window needs attention that stops at example boundaries,
//! which the causal attention kernels do not have. With right padding and
//! causal attention the pads change nothing before them. The loss is the mean
//! cross-entropy over the targets of weight 1 of the whole batch (not a mean
//! of per-sequence means), `sum(w ce) / sum(w)`, as `transformers` computes it
//! with labels of -100.
//!
//! Not here: the tokenizer and template themselves (`super::hf`), token files
//! (`super::tokens`), the loss (the training engine).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::hf::{ChatMessage, ChatTemplate, HfTokenizer};
use super::tokens::{BatcherState, Order};
use crate::rng::Rng;
use crate::{Error, Result};

/// One training row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Row {
    Text(String),
    Completion { prompt: String, completion: String },
    Chat(Vec<ChatMessage>),
}

/// What a row must hold, for error messages.
const SHAPES: &str = r#"expected {"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [{"role": ..., "content": ...}, ...]}"#;

impl Row {
    /// The row a parsed line holds; the error says which field is wrong.
    pub fn from_json(json: &Value) -> std::result::Result<Row, String> {
        let Value::Object(map) = json else {
            return Err(format!("{SHAPES}, found {}", kind(json)));
        };
        let string = |key: &str| -> std::result::Result<String, String> {
            match map.get(key) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(format!("\"{key}\" must be a string, found {}", kind(other))),
                None => Err(format!("missing \"{key}\"")),
            }
        };
        if map.contains_key("messages") {
            let Some(Value::Array(items)) = map.get("messages") else {
                return Err("\"messages\" must be a list of {\"role\", \"content\"}".into());
            };
            if items.is_empty() {
                return Err("\"messages\" is empty".into());
            }
            let messages = items
                .iter()
                .enumerate()
                .map(|(i, item)| message(item).map_err(|e| format!("messages[{i}]: {e}")))
                .collect::<std::result::Result<_, _>>()?;
            return Ok(Row::Chat(messages));
        }
        if map.contains_key("prompt") || map.contains_key("completion") {
            return Ok(Row::Completion {
                prompt: string("prompt")?,
                completion: string("completion")?,
            });
        }
        if map.contains_key("text") {
            return Ok(Row::Text(string("text")?));
        }
        let keys: Vec<&str> = map.keys().map(String::as_str).collect();
        Err(format!("{SHAPES}, found the keys [{}]", keys.join(", ")))
    }
}

fn message(item: &Value) -> std::result::Result<ChatMessage, String> {
    let field = |key: &str| match item.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("\"{key}\" must be a string, found {}", kind(other))),
        None => Err(format!("missing \"{key}\"")),
    };
    if !item.is_object() {
        return Err(format!(
            "expected {{\"role\", \"content\"}}, found {}",
            kind(item)
        ));
    }
    Ok(ChatMessage::new(field("role")?, field("content")?))
}

/// A JSON value's kind, as error messages name it.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The field of an error about line `line` (1-based).
fn line_field(line: usize) -> String {
    format!("line {line}")
}

/// Every row of a JSONL file with its line number (1-based); blank lines skipped.
pub fn read_rows(path: &Path) -> Result<Vec<(usize, Row)>> {
    let text = crate::memory::read_text(path)?;
    let mut rows = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let json: Value = serde_json::from_str(line).map_err(|e| {
            Error::format(
                path,
                line_field(index + 1),
                format!("not JSON ({e}); each line must be one JSON object"),
            )
        })?;
        let row =
            Row::from_json(&json).map_err(|e| Error::format(path, line_field(index + 1), e))?;
        rows.push((index + 1, row));
    }
    if rows.is_empty() {
        return Err(Error::format(path, "rows", "the file has no rows"));
    }
    Ok(rows)
}

/// The JSONL files of `--data`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SftFiles {
    pub train: PathBuf,
    /// `valid.jsonl` beside `train.jsonl`, when there is one.
    pub valid: Option<PathBuf>,
}

impl SftFiles {
    /// A `.jsonl` file (training only), or a directory holding `train.jsonl`
    /// and optionally `valid.jsonl`.
    pub fn locate(path: &Path) -> Result<SftFiles> {
        if path.is_dir() {
            let train = path.join("train.jsonl");
            if !train.is_file() {
                return Err(Error::format(
                    path,
                    "train.jsonl",
                    "missing: a data directory holds train.jsonl (and optionally valid.jsonl)",
                ));
            }
            let valid = Some(path.join("valid.jsonl")).filter(|p| p.is_file());
            return Ok(SftFiles { train, valid });
        }
        if !path.is_file() {
            return Err(Error::format(
                path,
                "data",
                "no such file or directory (expected a .jsonl file or a directory with train.jsonl)",
            ));
        }
        Ok(SftFiles {
            train: path.to_path_buf(),
            valid: None,
        })
    }

    /// Whether `path` is JSONL data rather than a token file: a directory or
    /// a name ending in `.jsonl`.
    pub fn is_jsonl(path: &Path) -> bool {
        path.is_dir() || path.extension().is_some_and(|e| e == "jsonl")
    }
}

/// One row as tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    /// Per token: whether predicting it counts in the loss (`loss[0]`, which
    /// nothing predicts, is false).
    pub loss: Vec<bool>,
    /// Assistant turns left out of the loss because the template renders
    /// the conversation before them differently (see the module docs).
    pub unlocated_turns: usize,
}

/// Turns rows into [`Example`]s with a model's tokenizer and chat template.
#[derive(Clone, Copy, Debug)]
pub struct Encoder<'a> {
    pub tokenizer: &'a HfTokenizer,
    /// Needed by `messages` rows; `prompt`/`completion` rows use it when present.
    pub template: Option<&'a ChatTemplate>,
    pub mask_prompt: bool,
}

impl Encoder<'_> {
    /// The example of `row`. Errors name the template or tokenizer file; the
    /// callers add the row's file and line ([`Encoder::encode_file`]).
    pub fn encode(&self, row: &Row) -> Result<Example> {
        match row {
            Row::Text(text) => self.text(text, 0),
            Row::Completion { prompt, completion } => match self.template {
                Some(_) => self.chat(&[
                    ChatMessage::new("user", prompt.as_str()),
                    ChatMessage::new("assistant", completion.as_str()),
                ]),
                None => {
                    let start = if self.mask_prompt { prompt.len() } else { 0 };
                    self.text(&format!("{prompt}{completion}"), start)
                }
            },
            Row::Chat(messages) => self.chat(messages),
        }
    }

    /// Every row of a JSONL file as an example; an error names the file and line.
    pub fn encode_file(&self, path: &Path) -> Result<Vec<Example>> {
        read_rows(path)?
            .into_iter()
            .map(|(line, row)| {
                self.encode(&row).map_err(|e| {
                    let msg = match e {
                        Error::Format {
                            path: source,
                            field,
                            msg,
                        } => format!("{}: {field}: {msg}", source.display()),
                        other => other.to_string(),
                    };
                    Error::format(path, line_field(line), msg)
                })
            })
            .collect()
    }

    /// A text with special tokens, EOS appended unless last; tokens starting
    /// at byte `loss_from` or later count.
    fn text(&self, text: &str, loss_from: usize) -> Result<Example> {
        let (mut ids, offsets) = self.tokenizer.encode_with_offsets(text, true)?;
        let mut loss: Vec<bool> = offsets
            .iter()
            .map(|&(start, _)| start >= loss_from)
            .collect();
        if let Some(eos) = self.tokenizer.eos_token_id()
            && ids.last() != Some(&eos)
        {
            ids.push(eos);
            loss.push(true);
        }
        if let Some(first) = loss.first_mut() {
            *first = false;
        }
        Ok(Example {
            ids,
            loss,
            unlocated_turns: 0,
        })
    }

    fn chat(&self, messages: &[ChatMessage]) -> Result<Example> {
        let template = self.template.ok_or_else(|| {
            Error::format(
                self.tokenizer.path(),
                "chat_template",
                "the model has no chat template, which \"messages\" rows need (use \"text\" rows, \
                 or add chat_template.jinja to the model directory)",
            )
        })?;
        let no_extra = serde_json::Map::new();
        let full = template.render(messages, false, &no_extra)?;
        let (ids, offsets) = self.tokenizer.encode_with_offsets(&full, false)?;
        let mut loss = vec![!self.mask_prompt; ids.len()];
        let mut unlocated_turns = 0;
        if self.mask_prompt {
            for (i, m) in messages.iter().enumerate() {
                if m.role != "assistant" {
                    continue;
                }
                if i == 0 {
                    // Nothing before it to render a generation prompt from.
                    unlocated_turns += 1;
                    continue;
                }
                let start = template.render(&messages[..i], true, &no_extra)?;
                let end = template.render(&messages[..=i], false, &no_extra)?;
                if !(full.starts_with(&end) && end.starts_with(&start)) {
                    unlocated_turns += 1;
                    continue;
                }
                let span = start.len()..end.len();
                for (flag, &(token_start, _)) in loss.iter_mut().zip(&offsets) {
                    *flag |= span.contains(&token_start);
                }
            }
        }
        if let Some(first) = loss.first_mut() {
            *first = false;
        }
        Ok(Example {
            ids,
            loss,
            unlocated_turns,
        })
    }
}

/// One window of `seq` positions of `example` (see the module docs):
/// `inputs`, `targets` and `weights` (1 where the target counts) each `seq`
/// long; returns whether the example was truncated.
pub fn window(
    example: &Example,
    pad_id: u32,
    inputs: &mut [u32],
    targets: &mut [u32],
    weights: &mut [f32],
) -> bool {
    let seq = inputs.len();
    assert!(
        targets.len() == seq && weights.len() == seq,
        "window: lengths"
    );
    let n = example.ids.len().min(seq + 1);
    let predicted = n.saturating_sub(1);
    inputs.fill(pad_id);
    targets.fill(pad_id);
    weights.fill(0.0);
    inputs[..predicted].copy_from_slice(&example.ids[..predicted]);
    if n > 0 {
        targets[..predicted].copy_from_slice(&example.ids[1..n]);
    }
    for (w, &counts) in weights
        .iter_mut()
        .zip(example.loss.get(1..n).unwrap_or(&[]))
    {
        *w = if counts { 1.0 } else { 0.0 };
    }
    example.ids.len() > seq + 1
}

/// B windows of T positions, row-major `(B, T)`, with a loss weight per target.
#[derive(Clone, Debug, PartialEq)]
pub struct SftBatch {
    pub batch_size: usize,
    pub seq_len: usize,
    /// (B, T)
    pub inputs: Vec<u32>,
    /// (B, T)
    pub targets: Vec<u32>,
    /// (B, T): 1 where the target counts, 0 for prompts and padding.
    pub weights: Vec<f32>,
    /// Examples of this batch cut at `T + 1` tokens.
    pub truncated: usize,
}

impl SftBatch {
    /// B windows of T positions, one example each ([`window`]).
    pub fn from_examples(examples: &[&Example], seq_len: usize, pad_id: u32) -> SftBatch {
        let n = examples.len() * seq_len;
        let mut batch = SftBatch {
            batch_size: examples.len(),
            seq_len,
            inputs: vec![pad_id; n],
            targets: vec![pad_id; n],
            weights: vec![0.0; n],
            truncated: 0,
        };
        let rows = batch
            .inputs
            .chunks_exact_mut(seq_len)
            .zip(batch.targets.chunks_exact_mut(seq_len))
            .zip(batch.weights.chunks_exact_mut(seq_len));
        for (example, ((inputs, targets), weights)) in examples.iter().zip(rows) {
            batch.truncated += usize::from(window(example, pad_id, inputs, targets, weights));
        }
        batch
    }

    /// Targets that count (the loss is their mean).
    pub fn counted(&self) -> usize {
        self.weights.iter().filter(|&&w| w > 0.0).count()
    }
}

/// The pad id of a tokenizer: its `pad_token`, else its EOS, else 0. Any id
/// would do (padding has weight 0 and comes after what counts).
pub fn pad_id(tokenizer: &HfTokenizer) -> u32 {
    tokenizer
        .special_token_id("pad_token")
        .or_else(|| tokenizer.eos_token_id())
        .unwrap_or(0)
}

/// Draws batches of examples, in file order or at random, resumably.
#[derive(Debug)]
pub struct SftBatcher {
    examples: Vec<Example>,
    seq_len: usize,
    pad_id: u32,
    order: Order,
    rng: Rng,
    /// Next example (sequential order).
    next: usize,
    epoch: u64,
}

impl SftBatcher {
    /// A batcher over `examples` (at least one) with windows of `seq_len`;
    /// `seed` seeds the random order (each example drawn uniformly).
    pub fn new(
        examples: Vec<Example>,
        seq_len: usize,
        pad_id: u32,
        order: Order,
        seed: u64,
    ) -> Result<SftBatcher> {
        if seq_len == 0 || examples.is_empty() {
            return Err(Error::Invalid(format!(
                "fine-tuning batches need at least one example and a sequence length of at \
                 least 1 (got {} examples, seq {seq_len})",
                examples.len()
            )));
        }
        Ok(SftBatcher {
            examples,
            seq_len,
            pad_id,
            order,
            rng: Rng::new(seed),
            next: 0,
            epoch: 0,
        })
    }

    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    /// Positions per window.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// How many examples are longer than a window (`seq_len + 1` tokens).
    pub fn too_long(&self) -> usize {
        let limit = self.seq_len + 1;
        self.examples.iter().filter(|e| e.ids.len() > limit).count()
    }

    /// The index of the next example, advancing the state.
    fn next_index(&mut self) -> usize {
        let n = self.examples.len();
        match self.order {
            Order::Random => self.rng.below(n as u64) as usize,
            Order::Sequential => {
                let index = self.next;
                self.next += 1;
                if self.next == n {
                    self.next = 0;
                    self.epoch += 1;
                }
                index
            }
        }
    }

    /// The next `batch_size` examples as one batch.
    pub fn next_batch(&mut self, batch_size: usize) -> SftBatch {
        let indices: Vec<usize> = (0..batch_size).map(|_| self.next_index()).collect();
        let examples: Vec<&Example> = indices.iter().map(|&i| &self.examples[i]).collect();
        SftBatch::from_examples(&examples, self.seq_len, self.pad_id)
    }

    /// The state to store in a checkpoint (`next_start` is the next example).
    pub fn state(&self) -> BatcherState {
        BatcherState {
            rng: self.rng.state(),
            next_start: self.next as u64,
            epoch: self.epoch,
        }
    }

    /// Continue from a saved state.
    pub fn restore(&mut self, state: BatcherState) -> Result<()> {
        if state.next_start as usize >= self.examples.len() {
            return Err(Error::Invalid(format!(
                "saved batcher position {} is past the {} examples; the checkpoint was made \
                 with different data",
                state.next_start,
                self.examples.len()
            )));
        }
        self.rng = Rng::from_state(state.rng);
        self.next = state.next_start as usize;
        self.epoch = state.epoch;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(line: &str) -> std::result::Result<Row, String> {
        Row::from_json(&serde_json::from_str(line).unwrap())
    }

    #[test]
    fn rows_of_every_shape_and_their_errors() {
        assert_eq!(row(r#"{"text": "a", "id": 3}"#), Ok(Row::Text("a".into())));
        assert_eq!(
            row(r#"{"prompt": "p", "completion": "c"}"#),
            Ok(Row::Completion {
                prompt: "p".into(),
                completion: "c".into()
            })
        );
        assert_eq!(
            row(r#"{"messages": [{"role": "user", "content": "hi"}]}"#),
            Ok(Row::Chat(vec![ChatMessage::new("user", "hi")]))
        );
        assert_eq!(
            row(r#"{"prompt": "p"}"#),
            Err("missing \"completion\"".into())
        );
        assert_eq!(
            row(r#"{"text": 3}"#),
            Err("\"text\" must be a string, found a number".into())
        );
        assert_eq!(
            row(r#"{"messages": [{"role": "user"}]}"#),
            Err("messages[0]: missing \"content\"".into())
        );
        assert_eq!(
            row(r#"{"messages": []}"#),
            Err("\"messages\" is empty".into())
        );
        assert!(
            row(r#"{"input": "x"}"#)
                .unwrap_err()
                .ends_with("found the keys [input]")
        );
        assert!(row("[1]").unwrap_err().ends_with("found a list"));
    }

    #[test]
    fn windows_truncate_and_pad() {
        let example = Example {
            ids: vec![5, 6, 7, 8, 9],
            loss: vec![false, false, true, true, true],
            unlocated_turns: 0,
        };
        let (mut inputs, mut targets, mut weights) = (vec![0; 3], vec![0; 3], vec![0.0; 3]);
        assert!(window(&example, 1, &mut inputs, &mut targets, &mut weights));
        assert_eq!(
            (inputs, targets, weights),
            (vec![5, 6, 7], vec![6, 7, 8], vec![0.0, 1.0, 1.0])
        );
        let (mut inputs, mut targets, mut weights) = (vec![0; 6], vec![0; 6], vec![0.0; 6]);
        assert!(!window(
            &example,
            1,
            &mut inputs,
            &mut targets,
            &mut weights
        ));
        assert_eq!(inputs, vec![5, 6, 7, 8, 1, 1]);
        assert_eq!(targets, vec![6, 7, 8, 9, 1, 1]);
        assert_eq!(weights, vec![0.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn sequential_batches_wrap_and_resume() {
        let examples: Vec<Example> = (0..3)
            .map(|i| Example {
                ids: vec![i, i + 10],
                loss: vec![false, true],
                unlocated_turns: 0,
            })
            .collect();
        let mut batcher = SftBatcher::new(examples.clone(), 2, 0, Order::Sequential, 1).unwrap();
        let first = batcher.next_batch(2);
        assert_eq!(first.inputs, vec![0, 0, 1, 0]);
        assert_eq!(first.targets, vec![10, 0, 11, 0]);
        let state = batcher.state();
        let second = batcher.next_batch(2);
        assert_eq!(second.inputs, vec![2, 0, 0, 0]);
        let mut again = SftBatcher::new(examples.clone(), 2, 0, Order::Sequential, 1).unwrap();
        again.restore(state).unwrap();
        assert_eq!(again.next_batch(2), second);
        let mut random = SftBatcher::new(examples.clone(), 2, 0, Order::Random, 7).unwrap();
        let state = random.state();
        let drawn = random.next_batch(4);
        let mut again = SftBatcher::new(examples, 2, 0, Order::Random, 99).unwrap();
        again.restore(state).unwrap();
        assert_eq!(again.next_batch(4), drawn);
    }
}
