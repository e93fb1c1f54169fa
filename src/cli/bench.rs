//! `anemone bench <suite>`: run a benchmark suite of [`anemone::bench`], print
//! its table to stdout (progress to stderr) and optionally write its JSON.
//! One subcommand per suite; options shared by all suites live in [`CommonArgs`].

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use clap::builder::RangedU64ValueParser;
use clap::{Args, Subcommand};
use serde::Serialize;

use anemone::backend::{self, Backend, BackendKind, Precision};
use anemone::bench::ane::{self, Form, Stack};
use anemone::bench::train_step::{self, TrainStepOptions};
use anemone::bench::{Repeat, Report, Row, write_json};
use anemone::model::ModelConfig;
use anemone::model::lora::{LoraConfig, Target};
use anemone::train::job::{kernel_options, open_backend};

use super::choices::{no_about, one_of};

/// The backends the ane-* suites run on.
const SUITE_BACKENDS: [BackendKind; 2] = [BackendKind::Cpu, BackendKind::Ane];

/// The backend for `kind`. The CPU backend runs in fp32 (the kernels stay
/// fp16-typed, so the MIL is exactly what the ANE would receive).
pub fn backend_for(kind: BackendKind) -> Result<Box<dyn Backend>> {
    let opened = backend::open(kind, Precision::Fp32)
        .map_err(|e| anyhow!("{e}\nhint: use --backend cpu"))?;
    if kind != BackendKind::Cpu {
        eprintln!("{}", opened.note);
    }
    Ok(opened.backend)
}

/// Options every suite takes.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    #[arg(
        long,
        value_parser = one_of(&SUITE_BACKENDS, BackendKind::name, no_about),
        default_value_t = BackendKind::Cpu
    )]
    pub backend: BackendKind,
    /// Also write the results as JSON to this file
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Small shapes and few repetitions (seconds on a CPU; for tests and smoke runs)
    #[arg(long)]
    pub quick: bool,
    /// Untimed runs before timing (default: per suite)
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Timed repetitions (default: per suite)
    #[arg(long, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub reps: Option<usize>,
}

impl CommonArgs {
    /// `--warmup`/`--reps`, else the suite's defaults (`quick` ones with `--quick`).
    fn repeat(&self, normal: Repeat, quick: Repeat) -> Repeat {
        let default = if self.quick { quick } else { normal };
        Repeat::new(
            self.warmup.unwrap_or(default.warmup),
            self.reps.unwrap_or(default.reps),
        )
    }
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Whole training steps (forward, backward, clip, AdamW) of a model preset:
    /// ms/step, tokens/s, GFLOP/s against the GEMM peak measured in the same run,
    /// per-phase breakdown, peak memory
    TrainStep(TrainStepArgs),
    /// Peak throughput: deep stacks of fp16 1x1 convs (default: the reference's
    /// inmem_peak configs, 32-256 convs of 256-512 channels at 64 positions)
    AnePeak(PeakArgs),
    /// Dispatch latency of a tiny kernel, with and without host I/O
    AneDispatch(DispatchArgs),
    /// SRAM sweep: one C x C layer per weight size, conv and packed matmul
    AneSram(SramArgs),
    /// The same linear layers as conv, const-weight matmul and packed-weight matmul
    AneConvVsMatmul(ConvVsMatmulArgs),
    /// INT8 W8A8 (int8 weights and activations) vs FP16 conv stacks
    AneInt8(Int8Args),
    /// Every ane-* suite with its default shapes, one after the other
    AneAll(CommonArgs),
}

#[derive(Args, Debug)]
pub struct PeakArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Channel counts C (comma-separated); with --depth replaces the default configs
    #[arg(long, value_delimiter = ',', value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub channels: Vec<usize>,
    /// Positions S per config when --channels/--depth are given
    #[arg(long, default_value_t = 64, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub spatial: usize,
    /// Stack depths d (comma-separated)
    #[arg(long, value_delimiter = ',', value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub depth: Vec<usize>,
}

#[derive(Args, Debug)]
pub struct DispatchArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[arg(long, default_value_t = ane::DISPATCH_SHAPE.0, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub channels: usize,
    #[arg(long, default_value_t = ane::DISPATCH_SHAPE.1, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub spatial: usize,
}

#[derive(Args, Debug)]
pub struct SramArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Channel counts C (comma-separated; weights are C x C fp16)
    #[arg(long, value_delimiter = ',', value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub channels: Vec<usize>,
    /// Positions S when --channels is given
    #[arg(long, default_value_t = 64, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub spatial: usize,
    /// Kernel forms (conv, conv-int8, matmul-const, matmul-packed)
    #[arg(long, value_delimiter = ',', default_value = "conv,matmul-packed")]
    pub forms: Vec<Form>,
}

#[derive(Args, Debug)]
pub struct ConvVsMatmulArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Input channels of one config (with --c-out; replaces the defaults)
    #[arg(long, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub c_in: Option<usize>,
    #[arg(long, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub c_out: Option<usize>,
    #[arg(long, default_value_t = 256, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub spatial: usize,
    /// Chained layers (needs --c-in == --c-out above 1 for packed weights)
    #[arg(long, default_value_t = 1, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub depth: usize,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "conv,matmul-const,matmul-packed"
    )]
    pub forms: Vec<Form>,
}

#[derive(Args, Debug)]
pub struct Int8Args {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Channel counts C (comma-separated); with --depth replaces the defaults
    #[arg(long, value_delimiter = ',', value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub channels: Vec<usize>,
    /// Stack depths d (comma-separated)
    #[arg(long, value_delimiter = ',', value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub depth: Vec<usize>,
    /// Spatial height H (the reference uses 64 x 64)
    #[arg(long, default_value_t = 1, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub height: usize,
    /// Spatial width W
    #[arg(long, default_value_t = 256, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub width: usize,
}

// Default repetitions per suite, (normal, `--quick`): a stable median on the CPU
// backend in well under a minute per suite. On the ANE, where an evaluation
// takes about a millisecond, the reference's `--warmup 10 --reps 50` is cheap.
const QUICK: Repeat = Repeat::new(1, 3);
const PEAK_REPEAT: (Repeat, Repeat) = (Repeat::new(5, 20), QUICK);
const DISPATCH_REPEAT: (Repeat, Repeat) = (Repeat::new(20, 200), Repeat::new(2, 20));
const SRAM_REPEAT: (Repeat, Repeat) = (Repeat::new(1, 5), QUICK);
const CVM_REPEAT: (Repeat, Repeat) = (Repeat::new(3, 15), QUICK);
const INT8_REPEAT: (Repeat, Repeat) = (Repeat::new(2, 10), QUICK);

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::TrainStep(a) => train_step(a),
        BenchCommand::AnePeak(a) => finish(&a.common, peak(&a)?),
        BenchCommand::AneDispatch(a) => finish(&a.common, dispatch(&a)?),
        BenchCommand::AneSram(a) => finish(&a.common, sram(&a)?),
        BenchCommand::AneConvVsMatmul(a) => finish(&a.common, conv_vs_matmul(&a)?),
        BenchCommand::AneInt8(a) => finish(&a.common, int8(&a)?),
        BenchCommand::AneAll(common) => all(common),
    }
}

#[derive(Args, Debug)]
pub struct TrainStepArgs {
    /// Model preset (layer768, stories15m, stories110m, ...) or a JSON config file
    #[arg(long, default_value = "layer768")]
    config: String,
    /// Tokens per sequence (default: the model's seq_len)
    #[arg(long, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    seq: Option<usize>,
    #[arg(long, default_value_t = 1, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    batch: usize,
    #[arg(
        long,
        value_parser = one_of(&BackendKind::ALL, BackendKind::name, no_about),
        default_value_t = BackendKind::Cpu
    )]
    backend: BackendKind,
    /// fp32, or fp16 (rounding like the ANE)
    #[arg(long, default_value_t = Precision::Fp32)]
    precision: Precision,
    /// Timed steps (after the warmup)
    #[arg(long, default_value_t = 10, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    steps: usize,
    /// Untimed steps first
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Also write the report as JSON
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Also time every op of the CPU kernels (top 30 printed, all in the JSON)
    #[arg(long)]
    ops: bool,
    /// Time LoRA steps (frozen random bf16 base, adapters trained) instead of full training
    #[arg(long)]
    lora: bool,
    /// LoRA rank (with --lora)
    #[arg(long, default_value_t = 16, requires = "lora", value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    lora_rank: usize,
    /// LoRA alpha (with --lora; default: 2 x the rank)
    #[arg(long, requires = "lora")]
    lora_alpha: Option<f32>,
    /// Adapted projections, comma-separated (with --lora; default: all)
    #[arg(
        long,
        requires = "lora",
        value_delimiter = ',',
        value_parser = one_of(&Target::ALL, Target::name, no_about)
    )]
    lora_targets: Vec<Target>,
    /// Adapt the last N layers only (with --lora; default: every layer)
    #[arg(long, requires = "lora", value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    lora_layers: Option<usize>,
    /// Dropout on the adapters' input (with --lora; default 0): the adapters
    /// then run beside the base instead of merged into it
    #[arg(long, requires = "lora")]
    lora_dropout: Option<f32>,
    /// The adapters beside the base, not merged into it (with --lora; as
    /// `train --lora-unmerged`)
    #[arg(long, requires = "lora")]
    lora_unmerged: bool,
    /// Under mpirun: sum the gradients in one all-reduce after the backward,
    /// not layer by layer during it (as `train` does)
    #[arg(long)]
    no_overlap: bool,
}

impl TrainStepArgs {
    /// The adapters `--lora` and its flags describe (`None` without it).
    fn lora_config(&self, config: &ModelConfig) -> Result<Option<LoraConfig>> {
        if !self.lora {
            return Ok(None);
        }
        let targets = match self.lora_targets.as_slice() {
            [] => Target::ALL.as_slice(),
            targets => targets,
        };
        let alpha = self.lora_alpha.unwrap_or(2.0 * self.lora_rank as f32);
        let (rank, layers) = (self.lora_rank, self.lora_layers);
        let dropout = self.lora_dropout.unwrap_or(0.0);
        let lora = LoraConfig::new(rank, alpha, dropout, targets, layers, config.n_layers)?;
        Ok(Some(LoraConfig {
            unmerged: self.lora_unmerged,
            ..lora
        }))
    }
}

fn train_step(args: TrainStepArgs) -> Result<()> {
    let config = ModelConfig::from_name_or_file(&args.config)?;
    let seq = args.seq.unwrap_or(config.seq_len);
    if seq > config.seq_len {
        return Err(anemone::Error::out_of_range(
            "--seq",
            seq,
            &format!("an integer in 1..={} (the model's seq_len)", config.seq_len),
        )
        .into());
    }
    let lora = args.lora_config(&config)?;
    anemone::memory::check(
        &format!("training steps of {} x {seq} tokens", args.batch),
        anemone::train::job::step_bytes(&config, args.batch, seq, lora.is_some()),
        "lower --batch or --seq",
    )?;
    // Under `mpirun` (`--features mpi`) each rank runs the step on its own
    // batch and all-reduces the gradients; rank 0 reports.
    let dist = anemone::dist::from_launcher()?;
    let rank0 = dist.rank() == 0;
    let opened = open_backend(args.backend, args.precision)?;
    if rank0 {
        eprintln!("{}", opened.note);
    }
    let (backend, precision) = (opened.backend, opened.precision);
    let opts = TrainStepOptions {
        config_name: args.config.clone(),
        kernels: kernel_options(precision, backend.as_ref()),
        config,
        seq,
        batch: args.batch,
        warmup: args.warmup,
        steps: args.steps,
        ops: args.ops,
        lora,
        overlap: !args.no_overlap,
    };
    let total = args.warmup + args.steps;
    let result = train_step::run_on(backend, &opts, dist.clone(), &mut |step, seconds| {
        let kind = if step < args.warmup { "warmup" } else { "step" };
        if rank0 {
            eprintln!("{kind} {}/{total}: {:.1} ms", step + 1, seconds * 1e3);
        }
    });
    let report = match result {
        Err(err) if dist.size() > 1 => {
            eprintln!("error: rank {} of {}: {err:#}", dist.rank(), dist.size());
            dist.abort(2)
        }
        result => result?,
    };
    if !rank0 {
        return Ok(());
    }
    print!("{}", train_step::format_report(&report));
    if let Some(path) = &args.json {
        let json = serde_json::to_vec_pretty(&report)?;
        anemone::atomic::write_atomic(path, &json)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Print a suite's report and write its JSON when asked.
fn finish<R: Row + Serialize>(common: &CommonArgs, report: Report<R>) -> Result<()> {
    print_report(&report);
    if let Some(path) = &common.json {
        write_report(path, &report)?;
    }
    Ok(())
}

fn print_report<R: Row + Serialize>(report: &Report<R>) {
    println!(
        "{} on {} ({} threads, warmup {}, {} reps; times per evaluation)",
        report.suite, report.backend, report.threads, report.repeat.warmup, report.repeat.reps
    );
    print!("{}", report.table());
}

fn write_report(path: &Path, value: &impl Serialize) -> Result<()> {
    write_json(path, value).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn progress(line: &str) {
    eprintln!("  {line}");
}

fn peak(a: &PeakArgs) -> Result<Report<ane::PeakRow>> {
    let configs = if a.channels.is_empty() && a.depth.is_empty() {
        ane::peak_configs(a.common.quick)
    } else {
        let channels = or_default(&a.channels, &[512]);
        let depths = or_default(&a.depth, &[128]);
        product(&channels, &depths, |c, d| Stack::square(c, a.spatial, d))
    };
    let repeat = a.common.repeat(PEAK_REPEAT.0, PEAK_REPEAT.1);
    let mut backend = backend_for(a.common.backend)?;
    let rows = ane::peak(backend.as_mut(), &configs, repeat, &mut progress).context("ane-peak")?;
    Ok(Report::new("ane-peak", backend.name(), repeat, rows))
}

fn dispatch(a: &DispatchArgs) -> Result<Report<ane::DispatchRow>> {
    let repeat = a.common.repeat(DISPATCH_REPEAT.0, DISPATCH_REPEAT.1);
    let mut backend = backend_for(a.common.backend)?;
    let rows = ane::dispatch(
        backend.as_mut(),
        (a.channels, a.spatial),
        repeat,
        &mut progress,
    )
    .context("ane-dispatch")?;
    Ok(Report::new("ane-dispatch", backend.name(), repeat, rows))
}

fn sram(a: &SramArgs) -> Result<Report<ane::SramRow>> {
    let configs = if a.channels.is_empty() {
        ane::sram_configs(a.common.quick)
    } else {
        a.channels
            .iter()
            .map(|&c| Stack::square(c, a.spatial, 1))
            .collect()
    };
    let repeat = a.common.repeat(SRAM_REPEAT.0, SRAM_REPEAT.1);
    let mut backend = backend_for(a.common.backend)?;
    let rows = ane::sram(backend.as_mut(), &configs, &a.forms, repeat, &mut progress)
        .context("ane-sram")?;
    Ok(Report::new("ane-sram", backend.name(), repeat, rows))
}

fn conv_vs_matmul(a: &ConvVsMatmulArgs) -> Result<Report<ane::ConvVsMatmulRow>> {
    let configs = match (a.c_in, a.c_out) {
        (None, None) => ane::conv_vs_matmul_configs(a.common.quick),
        (c_in, c_out) => {
            let c_in = c_in.or(c_out).expect("one of them is set");
            vec![Stack {
                c_in,
                c_out: c_out.unwrap_or(c_in),
                height: 1,
                width: a.spatial,
                depth: a.depth,
            }]
        }
    };
    let repeat = a.common.repeat(CVM_REPEAT.0, CVM_REPEAT.1);
    let mut backend = backend_for(a.common.backend)?;
    let rows = ane::conv_vs_matmul(backend.as_mut(), &configs, &a.forms, repeat, &mut progress)
        .context("ane-conv-vs-matmul")?;
    Ok(Report::new(
        "ane-conv-vs-matmul",
        backend.name(),
        repeat,
        rows,
    ))
}

fn int8(a: &Int8Args) -> Result<Report<ane::Int8Row>> {
    let configs = if a.channels.is_empty() && a.depth.is_empty() {
        ane::int8_configs(a.common.quick)
    } else {
        let channels = or_default(&a.channels, &[512]);
        let depths = or_default(&a.depth, &[32]);
        product(&channels, &depths, |c, d| Stack {
            height: a.height,
            ..Stack::square(c, a.width, d)
        })
    };
    let repeat = a.common.repeat(INT8_REPEAT.0, INT8_REPEAT.1);
    let mut backend = backend_for(a.common.backend)?;
    let rows = ane::int8(backend.as_mut(), &configs, repeat, &mut progress).context("ane-int8")?;
    Ok(Report::new("ane-int8", backend.name(), repeat, rows))
}

/// Every suite with default shapes; one JSON object `{"suites": [report, ...]}`.
fn all(common: CommonArgs) -> Result<()> {
    let no_json = CommonArgs {
        json: None,
        ..common.clone()
    };
    let mut reports = Vec::new();
    macro_rules! suite {
        ($report:expr) => {{
            let report = $report;
            print_report(&report);
            println!();
            reports.push(report.to_json());
        }};
    }
    suite!(peak(&PeakArgs {
        common: no_json.clone(),
        channels: Vec::new(),
        spatial: 64,
        depth: Vec::new(),
    })?);
    suite!(dispatch(&DispatchArgs {
        common: no_json.clone(),
        channels: ane::DISPATCH_SHAPE.0,
        spatial: ane::DISPATCH_SHAPE.1,
    })?);
    suite!(sram(&SramArgs {
        common: no_json.clone(),
        channels: Vec::new(),
        spatial: 64,
        forms: vec![Form::Conv, Form::MatmulPacked],
    })?);
    suite!(conv_vs_matmul(&ConvVsMatmulArgs {
        common: no_json.clone(),
        c_in: None,
        c_out: None,
        spatial: 256,
        depth: 1,
        forms: vec![Form::Conv, Form::MatmulConst, Form::MatmulPacked],
    })?);
    suite!(int8(&Int8Args {
        common: no_json,
        channels: Vec::new(),
        depth: Vec::new(),
        height: 1,
        width: 256,
    })?);
    if let Some(path) = &common.json {
        write_report(path, &serde_json::json!({ "suites": reports }))?;
    }
    Ok(())
}

fn or_default(values: &[usize], default: &[usize]) -> Vec<usize> {
    if values.is_empty() {
        default.to_vec()
    } else {
        values.to_vec()
    }
}

fn product(a: &[usize], b: &[usize], make: impl Fn(usize, usize) -> Stack) -> Vec<Stack> {
    a.iter()
        .flat_map(|&x| b.iter().map(move |&y| (x, y)))
        .map(|(x, y)| make(x, y))
        .collect()
}
