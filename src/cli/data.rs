//! `anemone tokenizer train|encode`, `anemone tokenize`: text files through
//! the library's tokenizers (llama2.c's, or a Hugging Face `tokenizer.json`),
//! with a byte progress bar on a terminal.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::builder::RangedU64ValueParser;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use anemone::data::hf::HfTokenizer;
use anemone::data::tokenizer::Tokenizer;
use anemone::data::tokenizer::train::{TrainOptions, train_bpe};
use anemone::data::tokens::{DocumentEncoder, HfDocuments, TokenizeReport, tokenize_files};

#[derive(Subcommand, Debug)]
pub enum TokenizerCommand {
    /// Train a byte-fallback BPE tokenizer; writes a llama2.c tokenizer.bin
    Train {
        /// Text files (UTF-8)
        #[arg(long, num_args = 1.., required = true)]
        input: Vec<PathBuf>,
        /// Vocabulary size, including the 259 reserved ids (<unk>, <s>, </s>, 256 bytes)
        #[arg(long, default_value_t = 4096,
              value_parser = RangedU64ValueParser::<usize>::new().range(260..=1 << 20))]
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
            let named: Vec<(&str, &Path)> =
                input.iter().map(|p| ("--input", p.as_path())).collect();
            anemone::atomic::refuse_input_as_output("--out", &out, &named)?;
            let mut texts = Vec::new();
            for path in &input {
                let bytes = anemone::memory::read_file(path, u64::MAX)?;
                texts.push(String::from_utf8(bytes).map_err(|e| {
                    anyhow::anyhow!(
                        "{}: not UTF-8 text (invalid byte at {})",
                        path.display(),
                        e.utf8_error().valid_up_to()
                    )
                })?);
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
    /// llama2.c tokenizer.bin, or a Hugging Face tokenizer: a model
    /// directory (the token file then records the model's vocabulary) or a
    /// tokenizer.json
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Text files; a blank line (or `<|endoftext|>`) ends a document. Each
    /// document starts with BOS (llama2.c) or the tokenizer's own special
    /// tokens and ends with its EOS (Hugging Face)
    #[arg(long, num_args = 1.., required = true)]
    pub input: Vec<PathBuf>,
    /// Output token file (anemone format); the held-out part goes to <out>.val.bin
    #[arg(long, default_value = "tokens.bin")]
    pub out: PathBuf,
    /// Fraction of the input (at the end) written to the held-out file
    #[arg(long, default_value_t = 0.05, allow_negative_numbers = true)]
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
    let val = anemone::data::tokens::val_path_for(&args.out);
    for out in [&args.out, &val] {
        anemone::atomic::refuse_input_as_output("--out", out, &[("--tokenizer", &args.tokenizer)])?;
    }
    let report = if HfTokenizer::is_hf_path(&args.tokenizer) {
        let tokenizer = HfTokenizer::open_path(&args.tokenizer)?;
        // A model directory: its vocabulary (which may be padded past the
        // tokenizer's) is what the token file must record for training.
        let vocab_size = match anemone::model::hf::files::base_config(&args.tokenizer)? {
            Some(config) => {
                tokenizer.check_fits(config.vocab_size, &config.path)?;
                config.vocab_size
            }
            None => tokenizer.vocab_size(),
        };
        run_tokenize(
            &HfDocuments {
                tokenizer: &tokenizer,
                vocab_size,
            },
            &args,
        )?
    } else {
        run_tokenize(&Tokenizer::read(&args.tokenizer, None)?, &args)?
    };
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

/// [`tokenize_files`] with a progress bar.
fn run_tokenize(encoder: &dyn DocumentEncoder, args: &TokenizeArgs) -> Result<TokenizeReport> {
    let mut bar: Option<ProgressBar> = None;
    let report = tokenize_files(
        encoder,
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
    Ok(report)
}
