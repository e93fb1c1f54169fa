//! `anemone generate` and `anemone export`, plus the main job's samples.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};

use anemone::data::tokenizer::Tokenizer;
use anemone::generate::{BOS, Generator, Sampler};
use anemone::model::{Weights, llama2c};

use super::train::load_weights;

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
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 = greedy (deterministic)
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

fn find_tokenizer(model: &Path, given: Option<&Path>) -> Result<PathBuf> {
    if let Some(t) = given {
        return Ok(t.to_path_buf());
    }
    let dir = if model.is_dir() {
        model
    } else {
        model.parent().unwrap_or(Path::new("."))
    };
    let candidate = dir.join("tokenizer.bin");
    if candidate.exists() {
        Ok(candidate)
    } else {
        bail!(
            "no tokenizer found beside {} (hint: pass --tokenizer tokenizer.bin)",
            model.display()
        )
    }
}

/// Generate from `prompt`, streaming text to `out`; returns (new ids, tokens/s).
pub fn stream(
    weights: &Weights,
    tokenizer: &Tokenizer,
    prompt: &str,
    max_tokens: usize,
    sampler: &mut Sampler,
    out: &mut dyn Write,
) -> Result<(Vec<u32>, f64)> {
    let mut ids = vec![BOS];
    if !prompt.is_empty() {
        ids = tokenizer.encode(prompt, true, false);
    }
    let mut generator = Generator::new(weights);
    let started = Instant::now();
    let mut prev = *ids.last().expect("BOS");
    write!(out, "{prompt}")?;
    let mut failure = None;
    let new = generator.generate(&ids, max_tokens, sampler, |id| {
        match tokenizer.decode_token(Some(prev), id) {
            Ok(bytes) => {
                let _ = out.write_all(bytes);
                let _ = out.flush();
            }
            Err(e) => failure = Some(e),
        }
        prev = id;
    })?;
    if let Some(e) = failure {
        return Err(e.into());
    }
    let rate = new.len() as f64 / started.elapsed().as_secs_f64().max(1e-9);
    Ok((new, rate))
}

pub fn generate(args: GenerateArgs) -> Result<()> {
    let weights =
        load_weights(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    let tokenizer_path = find_tokenizer(&args.model, args.tokenizer.as_deref())?;
    let tokenizer = Tokenizer::read(&tokenizer_path, Some(weights.config().vocab_size))?;
    let mut sampler = if args.temperature == 0.0 {
        Sampler::greedy()
    } else {
        Sampler::new(args.temperature, args.top_p, args.seed)
    };
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

/// The main job's closing samples.
pub fn print_samples(weights: &Weights, tokenizer_path: &Path, n: usize, seed: u64) -> Result<()> {
    let tokenizer = Tokenizer::read(tokenizer_path, Some(weights.config().vocab_size))?;
    let prompts = ["Once upon a time", "One day, a little", "Lily and her dog"];
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for i in 0..n {
        let mut sampler = Sampler::new(0.7, 0.9, seed + i as u64);
        writeln!(out, "\n--- sample {} ---", i + 1)?;
        stream(
            weights,
            &tokenizer,
            prompts[i % prompts.len()],
            200,
            &mut sampler,
            &mut out,
        )?;
        writeln!(out)?;
    }
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
    let weights =
        load_weights(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    match (args.format, args.version) {
        (ExportFormat::Llama2c, 0) => llama2c::write_v0(&weights, &args.out)?,
        (ExportFormat::Llama2c, 1) => llama2c::write_v1(&weights, &args.out)?,
        (_, v) => bail!("--version {v}: llama2.c export supports versions 0 and 1"),
    }
    eprintln!("wrote {} (llama2.c v{})", args.out.display(), args.version);
    Ok(())
}
