//! Argument parsing and dispatch. Errors print as `error: ...` (with a `hint:`
//! line where a fix is known) and exit with code 2.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "anemone",
    version,
    about = "Train Llama-architecture language models with ANE-shaped MIL kernels"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (not yet available in this version)
    Train,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train => Err(anyhow::anyhow!("`anemone train` is not implemented yet")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
