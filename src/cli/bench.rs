//! `anemone bench <suite>`: benchmark suites from `anemone::bench`, printed as
//! tables and optionally written as JSON.

use std::path::PathBuf;

use anemone::backend::Precision;
use anemone::bench::train_step::{self, TrainStepOptions};
use anemone::model::ModelConfig;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use super::train::{BackendChoice, kernel_options, make_backend};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Time whole training steps (forward, backward, AdamW) of a model preset
    TrainStep(TrainStepArgs),
}

#[derive(Args)]
pub struct TrainStepArgs {
    /// Model preset (layer768, stories15m, stories110m, ...) or a JSON config file
    #[arg(long, default_value = "layer768")]
    config: String,
    /// Tokens per sequence (default: the model's seq_len)
    #[arg(long)]
    seq: Option<usize>,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendChoice,
    /// fp32, or fp16 (rounding like the ANE)
    #[arg(long, default_value = "fp32")]
    precision: Precision,
    /// Timed steps (after the warmup)
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps first
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Also write the report as JSON
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::TrainStep(args) => train_step(args),
    }
}

fn train_step(args: TrainStepArgs) -> Result<()> {
    let config = ModelConfig::from_name_or_file(&args.config)?;
    let seq = args.seq.unwrap_or(config.seq_len);
    let (backend, precision) = make_backend(args.backend, args.precision)?;
    let opts = TrainStepOptions {
        config_name: args.config.clone(),
        kernels: kernel_options(precision, backend.as_ref()),
        config,
        seq,
        batch: args.batch,
        warmup: args.warmup,
        steps: args.steps,
    };
    let total = args.warmup + args.steps;
    let report = train_step::run(backend, &opts, &mut |step, seconds| {
        let kind = if step < args.warmup { "warmup" } else { "step" };
        eprintln!("{kind} {}/{total}: {:.1} ms", step + 1, seconds * 1e3);
    })?;
    print!("{}", train_step::format_report(&report));
    if let Some(path) = &args.json {
        let json = serde_json::to_vec_pretty(&report)?;
        anemone::atomic::write_atomic(path, &json)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
