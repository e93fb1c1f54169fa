//! `anemone train`, `anemone eval`: glue between token files, the model, the
//! backend and the trainer. With no `--data`, `train` runs the main job: built-in
//! corpus -> tokenizer -> token files -> `tiny` model -> samples.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use anemone::backend::ane::budget::{self, CompileBudget, CompilePlan, RestartDecision};
use anemone::backend::ane::restart;
use anemone::backend::cpu::CpuBackend;
use anemone::backend::{self, Backend, BackendKind, Precision};
use anemone::data::tokens::{Batcher, Order, TokenFile, TokenSpan};
use anemone::mil::DType;
use anemone::model::kernels::{KernelOptions, WeightMode};
use anemone::model::{ModelConfig, Weights, checkpoint};
use anemone::train::engine::Engine;
use anemone::train::optim::{AdamW, Schedule};
use anemone::train::source::WindowSource;
use anemone::train::{Batches, Metrics, Observer, TrainConfig, Trainer};

/// Which device runs the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    Cpu,
    Ane,
    Auto,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DataOrder {
    Random,
    Sequential,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Model preset (tiny, stories260k, stories15m, stories42m, stories110m,
    /// qwen3-0.6b-shape, layer768) or a JSON config file
    #[arg(long, default_value = "tiny")]
    pub config: String,
    /// Token file (anemone .bin with header, or raw uint16). Without it, the
    /// main job: generate the built-in corpus, train a tokenizer and tokenize it
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Held-out token file (default: the last --val-fraction of --data)
    #[arg(long)]
    pub val_data: Option<PathBuf>,
    /// Fraction of --data held out for evaluation when --val-data is absent
    #[arg(long, default_value_t = 0.05)]
    pub val_fraction: f64,
    /// Start from these weights: an anemone checkpoint or a llama2.c model.bin
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Continue the run in this directory from its checkpoint, exactly
    #[arg(long)]
    pub resume: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendChoice,
    /// Kernel precision: fp32, or fp16 (rounded after every op, with loss scaling)
    #[arg(long, default_value = "fp32")]
    pub precision: String,
    /// Optimizer updates
    #[arg(long)]
    pub steps: Option<u64>,
    /// Sequences per micro-batch
    #[arg(long)]
    pub batch: Option<usize>,
    /// Tokens per sequence (default: the model's seq_len, at most 256)
    #[arg(long)]
    pub seq: Option<usize>,
    /// Micro-batches per update (gradient accumulation)
    #[arg(long, default_value_t = 1)]
    pub accum: usize,
    #[arg(long)]
    pub lr: Option<f32>,
    /// Warmup updates
    #[arg(long)]
    pub warmup: Option<u64>,
    #[arg(long, value_enum, default_value = "cosine")]
    pub schedule: Schedule,
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f32,
    /// Global gradient-norm clip (0 disables)
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f32,
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    #[arg(long, value_enum, default_value = "random")]
    pub data_order: DataOrder,
    /// Run directory (default: runs/<config>-<n>)
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Evaluate held-out loss every N updates
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Held-out batches per evaluation
    #[arg(long, default_value_t = 8)]
    pub eval_batches: usize,
    /// Save a checkpoint every N updates (0: only at the end)
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: u64,
    /// Stop after this many updates of this invocation (the run can be resumed)
    #[arg(long, hide = true)]
    pub stop_after: Option<u64>,
    /// Checkpoint and exec() a resuming process every N updates (what the ANE
    /// compile budget forces on baked kernels; for tests)
    #[arg(long, hide = true)]
    pub restart_every: Option<u64>,
    /// Generated samples to print at the end of the main job
    #[arg(long, default_value_t = 3)]
    pub samples: usize,
    /// Built-in corpus size in MB (main job)
    #[arg(long, default_value_t = 4.0)]
    pub corpus_mb: f64,
}

impl From<BackendChoice> for BackendKind {
    fn from(choice: BackendChoice) -> BackendKind {
        match choice {
            BackendChoice::Cpu => BackendKind::Cpu,
            BackendChoice::Ane => BackendKind::Ane,
            BackendChoice::Auto => BackendKind::Auto,
        }
    }
}

/// Open the backend (`auto` probes for the ANE) and say which one runs; the
/// ANE forces fp16 kernels.
pub fn make_backend(
    choice: BackendChoice,
    precision: Precision,
) -> Result<(Box<dyn Backend>, Precision)> {
    let opened = backend::open(choice.into(), precision).map_err(|e| {
        anyhow!(
            "{e}\nhint: use --backend cpu, or --backend auto to use the ANE only where it works \
             (run `anemone doctor` on a Mac to see why it does not)"
        )
    })?;
    eprintln!("{}", opened.note);
    if opened.precision != precision {
        eprintln!("note: the ANE computes in fp16: using --precision fp16 (loss scaling on)");
    }
    Ok((opened.backend, opened.precision))
}

pub fn kernel_options(precision: Precision, backend: &dyn Backend) -> KernelOptions {
    let dtype = match precision {
        Precision::Fp16 => DType::Fp16,
        Precision::Fp32 => DType::Fp32,
    };
    let mode = if backend.name() == "cpu" {
        WeightMode::Inputs
    } else {
        WeightMode::Packed
    };
    KernelOptions {
        dtype,
        mode,
        ..KernelOptions::cpu()
    }
}

/// Updates this process may run before it must checkpoint and `exec()` a
/// resuming copy of itself: `--restart-every`, else the ANE compile budget
/// (never, for the packed kernels training uses).
fn updates_before_restart(
    args: &TrainArgs,
    backend: &dyn Backend,
    mode: WeightMode,
) -> Result<Option<u64>> {
    if let Some(n) = args.restart_every {
        if n == 0 {
            bail!("--restart-every must be at least 1");
        }
        return Ok(Some(n));
    }
    if backend.name() != "ane" {
        return Ok(None);
    }
    // Nine kernels, eight of them with weights.
    let plan = CompilePlan::new(mode, 9, 8);
    match plan.decide(CompileBudget::from_env()?, budget::process_compiles())? {
        RestartDecision::Never => Ok(None),
        RestartDecision::After(n) => Ok(Some(n)),
    }
}

/// After a bounded run: if the run is not finished, replace this process with
/// one that resumes it (the checkpoint was saved by the trainer).
fn restart_if_unfinished(trainer: &Trainer, restart_after: Option<u64>) -> Result<()> {
    if restart_after.is_none() || trainer.step() >= trainer.config.steps {
        return Ok(());
    }
    eprintln!(
        "[exec() restart at step {}: compile budget; resuming {}]",
        trainer.step(),
        trainer.run_dir().display()
    );
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    let args = restart::resume_args(&argv, trainer.run_dir());
    Err(restart::exec_self(&args).into())
}

/// Load initial weights from an anemone checkpoint or a llama2.c file.
pub fn load_weights(path: &Path) -> Result<Weights> {
    if path.is_dir() {
        return load_weights(&path.join("checkpoint.bin"));
    }
    if checkpoint::is_checkpoint(path) {
        Ok(checkpoint::load(path)?.weights)
    } else {
        Ok(anemone::model::llama2c::read(path)?)
    }
}

fn next_run_dir(name: &str) -> PathBuf {
    let base = Path::new("runs");
    (1..)
        .map(|i| base.join(format!("{name}-{i}")))
        .find(|p| !p.exists())
        .expect("a free run directory")
}

/// Progress: a live bar on a terminal, periodic plain lines otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    every: u64,
    last_val: Option<f32>,
}

impl Progress {
    fn new(total: u64, start: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
                )
                .expect("valid template"),
            );
            bar.set_position(start);
            bar
        });
        Progress {
            bar,
            every: (total / 20).max(1),
            last_val: None,
        }
    }
}

impl Observer for Progress {
    fn on_step(&mut self, m: &Metrics, total: u64) {
        let val = self
            .last_val
            .map(|v| format!(" val {v:.4}"))
            .unwrap_or_default();
        let msg = format!(
            "loss {:.4}{val} lr {:.2e} {:.0} tok/s",
            m.train_loss.unwrap_or(f32::NAN),
            m.lr,
            m.tokens_per_s
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(m.step);
                bar.set_message(msg);
            }
            None => {
                if m.step % self.every == 0 || m.step == total || m.step == 1 {
                    eprintln!("step {}/{total} {msg} ({:.0}s)", m.step, m.elapsed_s);
                }
            }
        }
    }

    fn on_eval(&mut self, _step: u64, val_loss: f32) {
        self.last_val = Some(val_loss);
    }

    fn on_message(&mut self, message: &str) {
        match &self.bar {
            Some(bar) => bar.println(message),
            None => eprintln!("{message}"),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// Token spans for training and evaluation.
fn spans(args: &TrainArgs, data: &Path, vocab: usize) -> Result<(TokenSpan, TokenSpan)> {
    let file = Arc::new(TokenFile::open(data)?);
    file.check_vocab(vocab)?;
    match &args.val_data {
        Some(v) => {
            let val = Arc::new(TokenFile::open(v)?);
            val.check_vocab(vocab)?;
            Ok((TokenSpan::whole(file), TokenSpan::whole(val)))
        }
        None => Ok(TokenSpan::split_tail(file, args.val_fraction)?),
    }
}

pub fn train(args: TrainArgs) -> Result<()> {
    let precision: Precision = args.precision.parse()?;
    if let Some(dir) = &args.resume {
        return resume(&args, dir, precision);
    }
    // Open the backend first: `--backend ane` fails before any data is prepared.
    let (backend, precision) = make_backend(args.backend, precision)?;
    let (data, val_data, run_dir, tokenizer) = match &args.data {
        Some(d) => (
            d.clone(),
            None,
            args.out
                .clone()
                .unwrap_or_else(|| next_run_dir(&args.config)),
            None,
        ),
        None => {
            let run_dir = args.out.clone().unwrap_or_else(|| next_run_dir("tiny"));
            let prepared = super::data::prepare_builtin(&run_dir, args.corpus_mb, args.seed)?;
            (
                prepared.train,
                Some(prepared.val),
                run_dir,
                Some(prepared.tokenizer),
            )
        }
    };
    let mut model = if let Some(init) = &args.init {
        load_weights(init)
            .with_context(|| format!("loading --init {}", init.display()))?
            .config()
            .clone()
    } else {
        ModelConfig::from_name_or_file(&args.config)?
    };
    if let Some(t) = &tokenizer {
        model.vocab_size = t.vocab_size();
    }
    let seq = args.seq.unwrap_or(model.seq_len.min(256));
    if seq > model.seq_len {
        model.seq_len = seq;
    }
    let main_job = args.data.is_none();
    let config = TrainConfig {
        preset: anemone::model::config::PRESETS
            .contains(&args.config.as_str())
            .then(|| args.config.clone()),
        steps: args.steps.unwrap_or(if main_job { 200 } else { 1000 }),
        batch: args.batch.unwrap_or(if main_job { 8 } else { 4 }),
        seq,
        accum: args.accum,
        lr: args.lr.unwrap_or(if main_job { 3e-3 } else { 5e-4 }),
        warmup: args.warmup.unwrap_or(if main_job { 20 } else { 100 }),
        schedule: args.schedule,
        optimizer: AdamW {
            weight_decay: args.weight_decay,
            ..AdamW::default()
        },
        grad_clip: args.grad_clip,
        seed: args.seed,
        eval_every: args.eval_every.unwrap_or(if main_job { 50 } else { 200 }),
        eval_batches: args.eval_batches,
        checkpoint_every: args.checkpoint_every,
        fp16: precision == Precision::Fp16,
        model,
    };
    let weights = match &args.init {
        Some(init) => load_weights(init)?,
        None => Weights::init(&config.model, config.seed),
    };
    let order = match args.data_order {
        DataOrder::Random => Order::Random,
        DataOrder::Sequential => Order::Sequential,
    };
    let args_val = TrainArgs {
        val_data: val_data.or(args.val_data.clone()),
        ..clone_args(&args)
    };
    let (train_span, val_span) = spans(&args_val, &data, config.model.vocab_size)?;
    let mut source = WindowSource::new(Batcher::new(train_span, seq, order, config.seed)?);
    let mut val = WindowSource::new(Batcher::new(val_span, seq, Order::Sequential, 0)?);

    let opts = kernel_options(precision, backend.as_ref());
    let restart_after = updates_before_restart(&args, backend.as_ref(), opts.mode)?;
    let engine = Engine::new(backend, &config.model, seq, config.batch, opts)?;
    eprintln!(
        "training {} ({:.2}M parameters, dim {}, {} layers) on {} for {} steps of {} x {} tokens -> {}",
        config.preset.as_deref().unwrap_or("model"),
        config.model.n_params() as f64 / 1e6,
        config.model.dim,
        config.model.n_layers,
        engine.backend_name(),
        config.steps,
        config.batch * config.accum,
        seq,
        run_dir.display()
    );
    let mut trainer = Trainer::new(config, weights, engine, &run_dir)?;
    run_loop(
        &mut trainer,
        &mut source,
        &mut val,
        min_some(args.stop_after, restart_after),
    )?;
    restart_if_unfinished(
        &trainer,
        restart_after.filter(|_| args.stop_after.is_none()),
    )?;
    if main_job {
        let tokenizer_path = run_dir.join("tokenizer.bin");
        super::generate::print_samples(&trainer.weights, &tokenizer_path, args.samples, args.seed)?;
    }
    Ok(())
}

fn clone_args(a: &TrainArgs) -> TrainArgs {
    TrainArgs {
        config: a.config.clone(),
        data: a.data.clone(),
        val_data: a.val_data.clone(),
        val_fraction: a.val_fraction,
        init: a.init.clone(),
        resume: a.resume.clone(),
        backend: a.backend,
        precision: a.precision.clone(),
        steps: a.steps,
        batch: a.batch,
        seq: a.seq,
        accum: a.accum,
        lr: a.lr,
        warmup: a.warmup,
        schedule: a.schedule,
        weight_decay: a.weight_decay,
        grad_clip: a.grad_clip,
        seed: a.seed,
        data_order: a.data_order,
        out: a.out.clone(),
        eval_every: a.eval_every,
        eval_batches: a.eval_batches,
        checkpoint_every: a.checkpoint_every,
        stop_after: a.stop_after,
        restart_every: a.restart_every,
        samples: a.samples,
        corpus_mb: a.corpus_mb,
    }
}

fn run_loop(
    trainer: &mut Trainer,
    source: &mut dyn Batches,
    val: &mut dyn Batches,
    stop_after: Option<u64>,
) -> Result<()> {
    let started = Instant::now();
    let mut progress = Progress::new(trainer.config.steps, trainer.step());
    trainer.train(source, Some(val), &mut progress, stop_after)?;
    drop(progress);
    let val_loss = trainer.evaluate(val)?;
    eprintln!(
        "step {}: held-out loss {val_loss:.4} (perplexity {:.1}); {:.0}s; saved {}",
        trainer.step(),
        val_loss.exp(),
        started.elapsed().as_secs_f64(),
        trainer.run_dir().join("checkpoint.bin").display()
    );
    Ok(())
}

fn resume(args: &TrainArgs, dir: &Path, precision: Precision) -> Result<()> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).with_context(|| {
        format!(
            "reading {} (is --resume a run directory?)",
            config_path.display()
        )
    })?;
    let config: TrainConfig = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", config_path.display()))?;
    let data = match &args.data {
        Some(d) => d.clone(),
        None if dir.join("tokens.bin").exists() => dir.join("tokens.bin"),
        None => bail!("--resume needs --data (the token file the run was started with)"),
    };
    let val_data = args
        .val_data
        .clone()
        .or_else(|| Some(dir.join("tokens.val.bin")).filter(|p| p.exists()));
    let a = TrainArgs {
        val_data,
        ..clone_args(args)
    };
    let (train_span, val_span) = spans(&a, &data, config.model.vocab_size)?;
    let order = match args.data_order {
        DataOrder::Random => Order::Random,
        DataOrder::Sequential => Order::Sequential,
    };
    let mut source = WindowSource::new(Batcher::new(train_span, config.seq, order, config.seed)?);
    let mut val = WindowSource::new(Batcher::new(val_span, config.seq, Order::Sequential, 0)?);
    let wanted = if config.fp16 {
        Precision::Fp16
    } else {
        precision
    };
    let (backend, precision) = make_backend(args.backend, wanted)?;
    if precision != wanted {
        bail!(
            "{} was trained with fp32 kernels; the ANE runs fp16 kernels (hint: resume it with --backend cpu)",
            dir.display()
        );
    }
    let opts = kernel_options(precision, backend.as_ref());
    let restart_after = updates_before_restart(args, backend.as_ref(), opts.mode)?;
    let engine = Engine::new(backend, &config.model, config.seq, config.batch, opts)?;
    let mut trainer = Trainer::resume(dir, engine, &mut source, args.steps)?;
    eprintln!("resumed {} at step {}", dir.display(), trainer.step());
    run_loop(
        &mut trainer,
        &mut source,
        &mut val,
        min_some(args.stop_after, restart_after),
    )?;
    restart_if_unfinished(
        &trainer,
        restart_after.filter(|_| args.stop_after.is_none()),
    )
}

fn min_some(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Run directory, anemone checkpoint or llama2.c model.bin
    #[arg(long)]
    pub model: PathBuf,
    /// Token file
    #[arg(long)]
    pub data: PathBuf,
    /// Evaluate at most this many tokens (from the start, in consecutive windows)
    #[arg(long, default_value_t = 65536)]
    pub max_tokens: usize,
    /// Window length (default: the model's seq_len, at most 256)
    #[arg(long)]
    pub seq: Option<usize>,
}

pub fn eval(args: EvalArgs) -> Result<()> {
    let weights =
        load_weights(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    let config = weights.config().clone();
    let seq = args.seq.unwrap_or(config.seq_len.min(256));
    let file = Arc::new(TokenFile::open(&args.data)?);
    file.check_vocab(config.vocab_size)?;
    let windows = ((file.len().saturating_sub(1)) / seq).min((args.max_tokens / seq).max(1));
    if windows == 0 {
        bail!(
            "{}: {} tokens are fewer than one window of {} + 1",
            args.data.display(),
            file.len(),
            seq
        );
    }
    let mut batcher = Batcher::new(TokenSpan::whole(file), seq, Order::Sequential, 0)?;
    let backend: Box<dyn Backend> = Box::new(CpuBackend::new(Precision::Fp32));
    let mut engine = Engine::new(backend, &config, seq, 1, KernelOptions::cpu())?;
    let (mut inputs, mut targets) = (vec![0u32; seq], vec![0u32; seq]);
    let mut total = 0.0;
    for _ in 0..windows {
        batcher.next_window(&mut inputs, &mut targets)?;
        total += engine.loss(&weights, &inputs, &targets)?;
    }
    let loss = total / windows as f64;
    println!(
        "loss {loss:.6} perplexity {:.3} ({} tokens in {windows} windows of {seq})",
        loss.exp(),
        windows * seq
    );
    Ok(())
}
