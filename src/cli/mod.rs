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

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};

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
    /// Export a model (llama2.c model.bin, or a Hugging Face model directory)
    Export(generate::ExportArgs),
    /// Merge PEFT LoRA adapters into a Hugging Face model, written as a
    /// Hugging Face model directory
    Fuse(generate::FuseArgs),
    /// Train or use a llama2.c tokenizer
    #[command(subcommand)]
    Tokenizer(data::TokenizerCommand),
    /// Tokenize text files into token files (train + held-out) with a
    /// llama2.c tokenizer.bin or a Hugging Face tokenizer
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

fn run(command: Command, matches: &ArgMatches) -> anyhow::Result<()> {
    match command {
        Command::Train(args) => {
            let train = matches.subcommand_matches("train");
            let given = |id: &str| {
                train.is_some_and(|m| m.value_source(id) == Some(ValueSource::CommandLine))
            };
            train::train(args.into_options(&given))
        }
        Command::Eval(args) => train::eval(args),
        Command::Generate(args) => generate::generate(args),
        Command::Export(args) => generate::export(args),
        Command::Fuse(args) => generate::fuse(args),
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

/// The most worker threads `--threads` takes: more than 8 per core only
/// thrash (5000 on 2 cores made a step 100 times slower).
fn max_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    (8 * cores).max(64)
}

pub fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    if let Some(threads) = cli.threads {
        let max = max_threads();
        if !(1..=max).contains(&threads) {
            eprintln!(
                "error: --threads {threads} is out of range: expected an integer in 1..={max} \
                 (8 per core, at least 64)"
            );
            return ExitCode::from(2);
        }
    }
    if let Some(threads) = cli.threads
        && let Err(err) = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
    {
        eprintln!("error: --threads {threads}: {err}");
        return ExitCode::from(2);
    }
    match run(cli.command, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
