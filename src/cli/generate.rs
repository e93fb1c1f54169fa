//! `anemone generate` and `anemone export`: flags into calls of
//! [`anemone::generate`], [`anemone::model::llama2c`] and
//! [`anemone::model::hf::export`].

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::builder::RangedU64ValueParser;
use clap::{Args, ValueEnum};

use anemone::data::hf::HfTokenizer;
use anemone::data::tokenizer::Tokenizer;
use anemone::generate::{HfText, Rate, Sampler, stream, stream_hf, tokenizer_beside};
use anemone::model::hf::FloatDtype;
use anemone::model::load_fused;
use anemone::model::{DecoderWeights, WeightsView, llama2c, load_for_decoding, load_weights};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Hugging Face model directory, run directory, anemone checkpoint or
    /// llama2.c model.bin
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT LoRA adapters (a directory with adapter_config.json and
    /// adapter_model.safetensors) merged into --model on loading
    #[arg(long)]
    pub adapters: Option<PathBuf>,
    /// tokenizer.bin, or a Hugging Face tokenizer (directory or
    /// tokenizer.json); default: the model directory's tokenizer.json, else
    /// the tokenizer.bin of the run directory or beside the model file
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Render the prompt as a user turn with the model's chat template (and
    /// the generation prompt) and generate the assistant's turn
    #[arg(long)]
    pub chat: bool,
    /// System message of the --chat conversation
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// The prompt as space-separated token ids of a Hugging Face tokenizer
    /// (tests: ids that no text encodes to)
    #[arg(long, hide = true, conflicts_with_all = ["prompt", "chat"])]
    pub prompt_ids: Option<String>,
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
    let load_started = Instant::now();
    // A llama2.c file stays in a read-only map, read in place; adapters are
    // merged into a loaded copy.
    let weights = match &args.adapters {
        Some(dir) => DecoderWeights::Loaded(load_fused(&args.model, dir).context("--adapters")?),
        None => load_for_decoding(&args.model).context("--model")?,
    };
    let load_s = load_started.elapsed().as_secs_f64();
    let hf_tokenizer = match &args.tokenizer {
        Some(path) => HfTokenizer::is_hf_path(path).then(|| path.clone()),
        None => HfTokenizer::is_hf_path(&args.model).then(|| args.model.clone()),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let (new, rate) = match hf_tokenizer {
        Some(path) => generate_hf(&args, weights.view(), &path, &mut sampler, &mut out)?,
        None => {
            if args.prompt_ids.is_some() {
                bail!("--prompt-ids takes ids of a Hugging Face tokenizer; use --prompt");
            }
            if args.chat {
                bail!(
                    "--chat needs a Hugging Face tokenizer with a chat template; {} has none\n\
                     hint: use a Hugging Face model directory (or a run made from one)",
                    args.model.display()
                );
            }
            let tokenizer_path = match &args.tokenizer {
                Some(path) => path.clone(),
                None => tokenizer_beside(&args.model)?,
            };
            let tokenizer = Tokenizer::read(&tokenizer_path, Some(weights.config().vocab_size))
                .context("--tokenizer")?;
            stream(
                weights.view(),
                &tokenizer,
                &args.prompt,
                args.max_tokens,
                &mut sampler,
                &mut out,
            )?
        }
    };
    writeln!(out)?;
    out.flush()?;
    eprintln!("{} tokens, {:.1} tokens/s", new.len(), rate.tokens_per_s);
    eprintln!("{}", timing_line(load_s, &rate));
    Ok(())
}

/// The second line of `generate`'s report: load time, time to the first new
/// token, and the rate after it (the span of llama2.c's `achieved tok/s`).
fn timing_line(load_s: f64, rate: &Rate) -> String {
    let mut line = format!("load {load_s:.3} s");
    if let Some(first) = rate.first_token_s {
        line.push_str(&format!(", first token after {first:.3} s"));
    }
    if let Some(after) = rate.after_first_per_s {
        line.push_str(&format!(", then {after:.1} tokens/s"));
    }
    line
}

/// Generation with a Hugging Face tokenizer at `tokenizer`: its stop ids,
/// and with `--chat` its chat template.
fn generate_hf(
    args: &GenerateArgs,
    weights: WeightsView<'_>,
    tokenizer: &std::path::Path,
    sampler: &mut Sampler,
    out: &mut dyn Write,
) -> Result<(Vec<u32>, Rate)> {
    let text =
        HfText::open(tokenizer, &args.model, weights.config().vocab_size).context("--tokenizer")?;
    let (ids, echo) = match &args.prompt_ids {
        Some(list) => {
            let ids = list
                .split_whitespace()
                .map(str::parse)
                .collect::<std::result::Result<Vec<u32>, _>>()
                .with_context(|| format!("--prompt-ids {list:?}: expected token ids"))?;
            let echo = text.tokenizer.decode(&ids, true)?;
            (ids, echo)
        }
        None => {
            let chat = args.chat.then_some(args.system.as_deref());
            let ids = text.prompt_ids(&args.prompt, chat)?;
            let echo = if args.chat { "" } else { args.prompt.as_str() };
            (ids, echo.to_string())
        }
    };
    Ok(stream_hf(
        weights,
        &text,
        &ids,
        args.max_tokens,
        sampler,
        &echo,
        out,
    )?)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// llama2.c model.bin (legacy version 0 by default; run.c reads it)
    Llama2c,
    /// A Hugging Face model directory (config.json, model.safetensors,
    /// tokenizer files, generation_config.json) transformers loads
    Hf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportDtype {
    Bf16,
    Fp16,
    Fp32,
}

impl ExportDtype {
    fn float(self) -> FloatDtype {
        match self {
            ExportDtype::Bf16 => FloatDtype::BF16,
            ExportDtype::Fp16 => FloatDtype::F16,
            ExportDtype::Fp32 => FloatDtype::F32,
        }
    }
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Run directory, anemone checkpoint, or (with --format hf) a Hugging
    /// Face model directory
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, value_enum, default_value = "llama2c")]
    pub format: ExportFormat,
    /// llama2.c file version: 0 (legacy, read by run.c) or 1
    #[arg(long, default_value_t = 0)]
    pub version: i32,
    /// Tensor dtype of --format hf (default: the base model's, else fp32)
    #[arg(long, value_enum)]
    pub dtype: Option<ExportDtype>,
    /// Output file (llama2c) or directory (hf)
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct FuseArgs {
    /// The base: a Hugging Face model directory (with --adapters), or a run
    /// of `train --lora` (its base and its adapters)
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT LoRA adapters: a directory with adapter_config.json and
    /// adapter_model.safetensors (from peft's save_pretrained, or anemone's);
    /// default: those of the --model run
    #[arg(long)]
    pub adapters: Option<PathBuf>,
    /// Tensor dtype (default: the base model's)
    #[arg(long, value_enum)]
    pub dtype: Option<ExportDtype>,
    /// Output directory: the merged model in the Hugging Face layout
    #[arg(long)]
    pub out: PathBuf,
}

/// `anemone fuse`: base + adapters merged (`W + s B A`), written as
/// `export --format hf` writes a model.
pub fn fuse(args: FuseArgs) -> Result<()> {
    let (weights, adapters) = match &args.adapters {
        Some(dir) => (
            load_fused(&args.model, dir).context("--adapters")?,
            dir.clone(),
        ),
        None if anemone::model::hf::adapter::is_lora_run(&args.model) => (
            load_weights(&args.model).context("--model")?,
            args.model.join(anemone::model::hf::adapter::RUN_ADAPTERS),
        ),
        None => bail!(
            "{} is not a LoRA run (no base.json and adapters/ in it): name the adapters to \
             merge with --adapters",
            args.model.display()
        ),
    };
    let exported = anemone::model::hf::export::export(
        &args.model,
        &weights,
        &args.out,
        args.dtype.map(ExportDtype::float),
    )?;
    eprintln!(
        "wrote {} ({} with the adapters of {} merged, {}): {}",
        args.out.display(),
        exported.architecture.class_name(),
        adapters.display(),
        exported.dtype.torch_name(),
        exported.files.join(", ")
    );
    Ok(())
}

pub fn export(args: ExportArgs) -> Result<()> {
    if args.format == ExportFormat::Hf {
        let weights = load_weights(&args.model).context("--model")?;
        let exported = anemone::model::hf::export::export(
            &args.model,
            &weights,
            &args.out,
            args.dtype.map(ExportDtype::float),
        )?;
        eprintln!(
            "wrote {} ({}, {}): {}",
            args.out.display(),
            exported.architecture.class_name(),
            exported.dtype.torch_name(),
            exported.files.join(", ")
        );
        return Ok(());
    }
    if args.dtype.is_some() {
        bail!("--dtype applies to --format hf (a llama2.c file is float32)");
    }
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
