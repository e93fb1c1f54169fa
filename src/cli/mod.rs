//! Argument parsing and dispatch: one module per group of subcommands, each a
//! thin layer over the library. Errors print as `error: ...` (with a `hint:`
//! where a fix is known) and exit with code 2.

mod bench;
mod choices;
mod data;
mod doctor;
mod generate;
mod mil;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "anemone",
    version,
    about = "Train Llama-architecture language models with ANE-shaped MIL kernels",
    long_about = "Train Llama-architecture language models with kernels written as MIL programs \
                  (the Apple Neural Engine's language), run on the ANE or on the portable CPU backend.\n\n\
                  `anemone train` with no arguments runs the built-in demo: stories -> tokenizer -> tiny model -> samples."
)]
struct Cli {
    /// Worker threads for the CPU math (default: RAYON_NUM_THREADS, else all cores)
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (no arguments: the built-in corpus and the `tiny` model)
    Train(Box<train::TrainArgs>),
    /// Mean loss and perplexity of a model on a token file
    Eval(train::EvalArgs),
    /// Generate text with a KV cache, streaming to stdout
    Generate(generate::GenerateArgs),
    /// Export a checkpoint (llama2.c model.bin)
    Export(generate::ExportArgs),
    /// Train or use a llama2.c tokenizer
    #[command(subcommand)]
    Tokenizer(data::TokenizerCommand),
    /// Tokenize text files into token files (train + held-out)
    Tokenize(data::TokenizeArgs),
    /// Plot loss, learning rate and tokens/s of a run (PNG or SVG)
    Plot {
        run_dir: PathBuf,
        /// Output file (.png or .svg); default RUN_DIR/plot.png
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List run directories with their config, steps and best held-out loss
    Runs {
        #[arg(default_value = "runs")]
        dir: PathBuf,
    },
    /// MIL tools: check, run, fmt
    #[command(subcommand)]
    Mil(mil::MilCommand),
    /// Benchmarks: training steps, ANE-style kernels
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// What this machine offers the ANE backend: OS, chip, framework, probe,
    /// every training kernel against the CPU (share `--json` reports)
    Doctor(doctor::DoctorArgs),
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Train(args) => train::train(*args),
        Command::Eval(args) => train::eval(args),
        Command::Generate(args) => generate::generate(args),
        Command::Export(args) => generate::export(args),
        Command::Tokenizer(cmd) => data::tokenizer(cmd),
        Command::Tokenize(args) => data::tokenize(args),
        Command::Plot { run_dir, out } => {
            let out = out.unwrap_or_else(|| run_dir.join("plot.png"));
            anemone::report::plot(&run_dir, &out)?;
            eprintln!("wrote {}", out.display());
            Ok(())
        }
        Command::Runs { dir } => {
            let runs = anemone::report::list_runs(&dir)?;
            print!("{}", anemone::report::format_runs(&runs));
            Ok(())
        }
        Command::Mil(cmd) => mil::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Doctor(args) => doctor::doctor(args),
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(threads) = cli.threads
        && let Err(err) = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
    {
        eprintln!("error: --threads {threads}: {err}");
        return ExitCode::from(2);
    }
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
