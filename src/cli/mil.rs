//! `anemone mil check|run|fmt`: parse, verify, execute and re-emit MIL programs.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use anemone::backend::Precision;
use anemone::backend::cpu::{HostTensor, run_program};
use anemone::mil::verify::{Target, verify};
use anemone::mil::{DType, TensorType};
use anemone::package::ProgramPackage;
use npyz::WriterBuilder;

use super::choices::{no_about, one_of};

#[derive(Subcommand, Debug)]
pub enum MilCommand {
    /// Parse and verify a program (a .mil file or a package directory); exit 0 when valid
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
    /// Parse and re-emit canonically (to stdout, or in place with --write)
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
    let report = verify(&program, target);
    let text = report.to_string();
    if !text.trim().is_empty() {
        eprintln!("{text}");
    }
    if !report.is_ok() {
        bail!("{}: verification failed", path.display());
    }
    println!(
        "{}: ok ({} ops, {} inputs, {} outputs)",
        path.display(),
        program.main.ops.len(),
        program.main.inputs.len(),
        program.main.outputs.len()
    );
    Ok(())
}

fn fmt(path: &Path, write: bool) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let program =
        anemone::mil::parse(&text).with_context(|| format!("parsing {}", path.display()))?;
    let out = anemone::mil::emit(&program);
    if write {
        anemone::atomic::write_atomic(path, out.as_bytes())?;
    } else {
        print!("{out}");
    }
    Ok(())
}

fn read_npy(path: &Path) -> Result<HostTensor> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let npy = npyz::NpyFile::new(&bytes[..])
        .with_context(|| format!("{}: not a .npy file", path.display()))?;
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let dtype = npy.dtype();
    let descr = match &dtype {
        npyz::DType::Plain(t) => t.to_string(),
        other => bail!("{}: unsupported .npy dtype {other:?}", path.display()),
    };
    let (data, dt): (Vec<f32>, DType) = match descr.trim_start_matches(['<', '|', '=']) {
        "f4" => (npy.into_vec::<f32>()?, DType::Fp32),
        "f2" => (
            npy.into_vec::<half::f16>()?
                .into_iter()
                .map(f32::from)
                .collect(),
            DType::Fp16,
        ),
        "f8" => (
            npy.into_vec::<f64>()?
                .into_iter()
                .map(|x| x as f32)
                .collect(),
            DType::Fp32,
        ),
        "i4" => (
            npy.into_vec::<i32>()?
                .into_iter()
                .map(|x| x as f32)
                .collect(),
            DType::Int32,
        ),
        other => bail!(
            "{}: unsupported .npy dtype `{other}` (use float16, float32 or int32)",
            path.display()
        ),
    };
    Ok(HostTensor {
        ty: TensorType::new(dt, shape),
        data,
    })
}

fn write_npy(path: &Path, t: &HostTensor) -> Result<()> {
    let shape: Vec<u64> = t.ty.shape.iter().map(|&d| d as u64).collect();
    let mut bytes = Vec::new();
    {
        let mut w = npyz::WriteOptions::new()
            .default_dtype()
            .shape(&shape)
            .writer(&mut bytes)
            .begin_nd()?;
        w.extend(t.data.iter().copied())?;
        w.finish()?;
    }
    anemone::atomic::write_atomic(path, &bytes)?;
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
        host.push((name.to_string(), read_npy(Path::new(file))?));
    }
    let outputs = run_program(&program, &package.weights, &host, precision)?;
    std::fs::create_dir_all(output).with_context(|| format!("creating {}", output.display()))?;
    for (name, tensor) in &outputs {
        let file = output.join(format!("{name}.npy"));
        write_npy(&file, tensor)?;
        println!("{} {}", file.display(), tensor.ty);
    }
    Ok(())
}
