//! `anemone mil check|run|fmt`: parse, verify, execute and re-emit MIL programs.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use anemone::backend::Precision;
use anemone::backend::cpu::{check_program, run_program};
use anemone::mil::verify::Target;
use anemone::package::ProgramPackage;

use super::choices::{no_about, one_of};

#[derive(Subcommand, Debug)]
pub enum MilCommand {
    /// Parse and verify a program (a .mil file or a package directory) with its
    /// weight files, and everything `mil run` checks but executing; exit 0 when valid
    Check {
        path: PathBuf,
        /// Rules to apply: the ANE catalogue (default) or structural checks only
        #[arg(
            long,
            value_parser = one_of(&Target::ALL, Target::name, no_about),
            default_value_t = Target::Ane
        )]
        target: Target,
    },
    /// Execute a program on the CPU backend with .npy inputs; one .npy per output
    Run {
        /// Package directory (model.mil + weights/) or a .mil file
        path: PathBuf,
        /// NAME=FILE.npy for each function input
        #[arg(long = "input", value_name = "NAME=FILE.npy")]
        inputs: Vec<String>,
        /// Directory for the outputs (created)
        #[arg(long)]
        output: PathBuf,
        #[arg(long, default_value_t = Precision::Fp32)]
        precision: Precision,
    },
    /// Parse and re-emit canonically, keeping comments (to stdout, or in place with --write)
    Fmt {
        path: PathBuf,
        #[arg(long)]
        write: bool,
    },
}

pub fn run(cmd: MilCommand) -> Result<()> {
    match cmd {
        MilCommand::Check { path, target } => check(&path, target),
        MilCommand::Run {
            path,
            inputs,
            output,
            precision,
        } => execute(&path, &inputs, &output, precision),
        MilCommand::Fmt { path, write } => fmt(&path, write),
    }
}

fn load(path: &Path) -> Result<ProgramPackage> {
    ProgramPackage::read(path).with_context(|| format!("reading {}", path.display()))
}

fn check(path: &Path, target: Target) -> Result<()> {
    let package = load(path)?;
    let program = package
        .program()
        .with_context(|| format!("parsing {}", path.display()))?;
    // The rules, with the weight files at hand (a BLOBFILE record must exist
    // and fit its type).
    let report = package.verify(target)?;
    let text = report.to_string();
    if !text.trim().is_empty() {
        eprintln!("{text}");
    }
    if !report.is_ok() {
        bail!("{}: verification failed", path.display());
    }
    // Everything `mil run` checks before executing: lowering, constants, memory.
    let bytes = check_program(&program, &package.weights, Precision::Fp32)
        .with_context(|| format!("{}: the CPU backend cannot run it", path.display()))?;
    println!(
        "{}: ok ({} ops, {} inputs, {} outputs; a CPU run takes {})",
        path.display(),
        program.main.ops.len(),
        program.main.inputs.len(),
        program.main.outputs.len(),
        anemone::memory::human(bytes)
    );
    Ok(())
}

fn fmt(path: &Path, write: bool) -> Result<()> {
    let text = anemone::memory::read_text(path)?;
    let out = anemone::mil::format::format(&text)
        .with_context(|| format!("parsing {}", path.display()))?;
    if write {
        anemone::atomic::write_atomic(path, out.as_bytes())?;
    } else {
        print!("{out}");
    }
    Ok(())
}

fn execute(path: &Path, inputs: &[String], output: &Path, precision: Precision) -> Result<()> {
    let package = load(path)?;
    let program = package
        .program()
        .with_context(|| format!("parsing {}", path.display()))?;
    let mut host = Vec::new();
    for spec in inputs {
        let (name, file) = spec
            .split_once('=')
            .with_context(|| format!("--input `{spec}`: expected NAME=FILE.npy"))?;
        host.push((name.to_string(), anemone::npy::read(Path::new(file))?));
    }
    let outputs = run_program(&program, &package.weights, &host, precision)?;
    std::fs::create_dir_all(output).with_context(|| format!("creating {}", output.display()))?;
    for (name, tensor) in &outputs {
        let file = output.join(format!("{name}.npy"));
        anemone::npy::write(&file, tensor)?;
        println!("{} {}", file.display(), tensor.ty);
    }
    Ok(())
}
