//! `anemone generate` and `anemone export`: flags into calls of
//! [`anemone::generate`] and [`anemone::model::llama2c`].

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::builder::RangedU64ValueParser;
use clap::{Args, ValueEnum};

use anemone::data::tokenizer::Tokenizer;
use anemone::generate::{Sampler, stream, tokenizer_beside};
use anemone::model::{llama2c, load_weights};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Run directory, anemone checkpoint or llama2.c model.bin
    #[arg(long)]
    pub model: PathBuf,
    /// tokenizer.bin (default: the run directory's, or one beside the model file)
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// New tokens at most (generation also stops at the end of a document, a
    /// BOS or EOS token, and at the model's context length)
    #[arg(long, default_value_t = 256, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_tokens: usize,
    /// 0 = greedy (deterministic); at most 100
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 samples from every token
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true)]
    pub top_p: f32,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

pub fn generate(args: GenerateArgs) -> Result<()> {
    // Settings first: a bad flag fails before a large model is read.
    let checked = Sampler::checked(args.temperature, args.top_p, args.seed)?;
    let mut sampler = if args.temperature == 0.0 {
        Sampler::greedy()
    } else {
        checked
    };
    let weights = load_weights(&args.model).context("--model")?;
    let tokenizer_path = match args.tokenizer {
        Some(path) => path,
        None => tokenizer_beside(&args.model)?,
    };
    let tokenizer = Tokenizer::read(&tokenizer_path, Some(weights.config().vocab_size))
        .context("--tokenizer")?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let (new, rate) = stream(
        &weights,
        &tokenizer,
        &args.prompt,
        args.max_tokens,
        &mut sampler,
        &mut out,
    )?;
    writeln!(out)?;
    out.flush()?;
    eprintln!("{} tokens, {rate:.1} tokens/s", new.len());
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// llama2.c model.bin (legacy version 0 by default; run.c reads it)
    Llama2c,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Run directory or anemone checkpoint
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, value_enum, default_value = "llama2c")]
    pub format: ExportFormat,
    /// llama2.c file version: 0 (legacy, read by run.c) or 1
    #[arg(long, default_value_t = 0)]
    pub version: i32,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn export(args: ExportArgs) -> Result<()> {
    // A run directory is read through its checkpoint.
    let input = if args.model.is_dir() {
        args.model.join("checkpoint.bin")
    } else {
        args.model.clone()
    };
    anemone::atomic::refuse_input_as_output("--out", &args.out, &[("--model", &input)])?;
    let weights = load_weights(&args.model).context("--model")?;
    match (args.format, args.version) {
        (ExportFormat::Llama2c, 0) => llama2c::write_v0(&weights, &args.out)?,
        (ExportFormat::Llama2c, 1) => llama2c::write_v1(&weights, &args.out)?,
        (_, v) => bail!("--version {v}: llama2.c export supports versions 0 and 1"),
    }
    eprintln!("wrote {} (llama2.c v{})", args.out.display(), args.version);
    Ok(())
}
