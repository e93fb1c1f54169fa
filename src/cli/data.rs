//! `anemone tokenizer train`, `anemone tokenize`, and the main job's data
//! preparation (built-in corpus -> tokenizer -> token files).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use anemone::data::corpus::{self, CorpusConfig};
use anemone::data::tokenizer::Tokenizer;
use anemone::data::tokenizer::train::{TrainOptions, train_bpe};
use anemone::data::tokens::{tokenize_files, val_path_for};

#[derive(Subcommand, Debug)]
pub enum TokenizerCommand {
    /// Train a byte-fallback BPE tokenizer; writes a llama2.c tokenizer.bin
    Train {
        /// Text files (UTF-8)
        #[arg(long, num_args = 1.., required = true)]
        input: Vec<PathBuf>,
        /// Vocabulary size, including the 259 reserved ids (<unk>, <s>, </s>, 256 bytes)
        #[arg(long, default_value_t = 4096)]
        vocab: usize,
        #[arg(long, default_value = "tokenizer.bin")]
        out: PathBuf,
    },
    /// Encode text with a tokenizer.bin and print the ids (one line per input line)
    Encode {
        #[arg(long)]
        tokenizer: PathBuf,
        text: String,
    },
}

pub fn tokenizer(cmd: TokenizerCommand) -> Result<()> {
    match cmd {
        TokenizerCommand::Train { input, vocab, out } => {
            let mut texts = Vec::new();
            for path in &input {
                texts.push(
                    std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?,
                );
            }
            let started = std::time::Instant::now();
            let tok = train_bpe(texts.iter().map(String::as_str), &TrainOptions::new(vocab))?;
            tok.write(&out)?;
            eprintln!(
                "trained a {}-token tokenizer on {} bytes in {:.1}s -> {}",
                tok.vocab_size(),
                texts.iter().map(String::len).sum::<usize>(),
                started.elapsed().as_secs_f64(),
                out.display()
            );
            Ok(())
        }
        TokenizerCommand::Encode { tokenizer, text } => {
            let tok = Tokenizer::read(&tokenizer, None)?;
            let ids = tok.encode(&text, true, false);
            println!(
                "{}",
                ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
            );
            Ok(())
        }
    }
}

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// llama2.c tokenizer.bin
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Text files; a blank line (or `<|endoftext|>`) ends a document, each document starts with BOS
    #[arg(long, num_args = 1.., required = true)]
    pub input: Vec<PathBuf>,
    /// Output token file (anemone format); the held-out part goes to <out>.val.bin
    #[arg(long, default_value = "tokens.bin")]
    pub out: PathBuf,
    /// Fraction of the input (at the end) written to the held-out file
    #[arg(long, default_value_t = 0.05)]
    pub val_fraction: f64,
}

fn byte_bar(total: u64, what: &str) -> Option<ProgressBar> {
    std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(&format!(
                "{what} {{bar:30}} {{bytes}}/{{total_bytes}} [{{eta}}]"
            ))
            .expect("valid template"),
        );
        bar
    })
}

pub fn tokenize(args: TokenizeArgs) -> Result<()> {
    let tok = Tokenizer::read(&args.tokenizer, None)?;
    let mut bar: Option<ProgressBar> = None;
    let report = tokenize_files(
        &tok,
        &args.input,
        &args.out,
        args.val_fraction,
        &mut |done, total| {
            let b = bar.get_or_insert_with(|| {
                byte_bar(total, "tokenizing").unwrap_or_else(ProgressBar::hidden)
            });
            b.set_position(done);
        },
    )?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    eprintln!(
        "{} documents, {} bytes -> {} train tokens ({}){}",
        report.documents,
        report.input_bytes,
        report.train_tokens,
        report.train_path.display(),
        report
            .val_path
            .as_ref()
            .map(|p| format!(", {} held-out tokens ({})", report.val_tokens, p.display()))
            .unwrap_or_default()
    );
    Ok(())
}

/// What the main job prepared in its run directory.
pub struct Prepared {
    pub tokenizer: Tokenizer,
    pub train: PathBuf,
    pub val: PathBuf,
}

/// Vocabulary of the tokenizer trained on the built-in corpus.
const BUILTIN_VOCAB: usize = 1024;

/// Generate the built-in corpus (`corpus_mb` MB), train a tokenizer on it and
/// tokenize it into `run_dir` (`corpus.txt`, `tokenizer.bin`, `tokens.bin`, `tokens.val.bin`).
pub fn prepare_builtin(run_dir: &Path, corpus_mb: f64, seed: u64) -> Result<Prepared> {
    if corpus_mb.is_nan() || corpus_mb <= 0.0 {
        bail!("--corpus-mb must be positive");
    }
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let started = std::time::Instant::now();
    let text = corpus::generate(&CorpusConfig {
        seed,
        n_bytes: (corpus_mb * 1e6) as usize,
    });
    let corpus_path = run_dir.join("corpus.txt");
    anemone::atomic::write_atomic(&corpus_path, text.as_bytes())?;
    let tokenizer = train_bpe([text.as_str()], &TrainOptions::new(BUILTIN_VOCAB))?;
    let tokenizer_path = run_dir.join("tokenizer.bin");
    tokenizer.write(&tokenizer_path)?;
    let train = run_dir.join("tokens.bin");
    let report = tokenize_files(&tokenizer, &[corpus_path], &train, 0.05, &mut |_, _| {})?;
    eprintln!(
        "built-in corpus: {:.1} MB of stories, {}-token tokenizer, {} train / {} held-out tokens ({:.1}s)",
        text.len() as f64 / 1e6,
        tokenizer.vocab_size(),
        report.train_tokens,
        report.val_tokens,
        started.elapsed().as_secs_f64()
    );
    Ok(Prepared {
        tokenizer,
        val: val_path_for(&train),
        train,
    })
}
