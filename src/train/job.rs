//! A training job from options to a finished run directory, and the run
//! policy around it: the main job (no token file given: the built-in corpus,
//! a tokenizer trained on it, token files, the `tiny` model, samples at the
//! end), the defaults that differ between the main job and a run on the
//! user's data ([`RunDefaults`]), resuming a run directory, the kernel options
//! and restart decision the backend's [`Preferences`] call for, and the
//! held-out evaluation of a saved model ([`evaluate`]).
//!
//! The CLI parses flags into [`JobOptions`] (whose `Default` holds the flags'
//! defaults) and calls [`run`]; progress and notes go to an [`Observer`],
//! samples to a writer. This module does not parse arguments, draw progress,
//! or replace the process: [`Outcome::Restart`] says that a process resuming
//! the run must take over (the ANE's compile budget), and the caller execs it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::engine::Engine;
use super::optim::{AdamW, Schedule};
use super::source::WindowSource;
use super::{Batches, Observer, TrainConfig, Trainer};
use crate::backend::{self, BackendKind, CompilePlan, Opened, Precision, Preferences};
use crate::data::corpus::{self, CorpusConfig};
use crate::data::tokenizer::train::{TrainOptions, train_bpe};
use crate::data::tokens::{Batcher, Order, TokenFile, TokenSpan, tokenize_files, val_path_for};
use crate::mil::DType;
use crate::model::kernels::KernelOptions;
use crate::model::{ModelConfig, Weights, load_weights};
use crate::{Error, Result};

/// Everything a training job can be told (`anemone train`'s flags). `None`
/// fields take the [`RunDefaults`] of the kind of run.
#[derive(Clone, Debug, PartialEq)]
pub struct JobOptions {
    /// Model preset or JSON config file.
    pub config: String,
    /// Token file; `None` runs the main job.
    pub data: Option<PathBuf>,
    /// Held-out token file (default: the last `val_fraction` of `data`).
    pub val_data: Option<PathBuf>,
    /// Fraction of `data` held out when `val_data` is absent.
    pub val_fraction: f64,
    /// Initial weights: an anemone checkpoint or a llama2.c model.bin.
    pub init: Option<PathBuf>,
    /// Continue the run in this directory from its checkpoint, exactly.
    pub resume: Option<PathBuf>,
    pub backend: BackendKind,
    pub precision: Precision,
    /// Optimizer updates.
    pub steps: Option<u64>,
    /// Sequences per micro-batch.
    pub batch: Option<usize>,
    /// Tokens per sequence (default: the model's seq_len, at most 256).
    pub seq: Option<usize>,
    /// Micro-batches per update.
    pub accum: usize,
    pub lr: Option<f32>,
    /// Warmup updates.
    pub warmup: Option<u64>,
    pub schedule: Schedule,
    pub weight_decay: f32,
    /// Global gradient-norm clip (0 disables).
    pub grad_clip: f32,
    pub seed: u64,
    pub data_order: Order,
    /// Run directory (default: `runs/<config>-<n>`, `runs/tiny-<n>` for the main job).
    pub out: Option<PathBuf>,
    /// Evaluate held-out loss every N updates.
    pub eval_every: Option<u64>,
    /// Held-out batches per evaluation.
    pub eval_batches: usize,
    /// Save a checkpoint every N updates (0: only at the end).
    pub checkpoint_every: u64,
    /// Stop after this many updates of this process (the run can be resumed).
    pub stop_after: Option<u64>,
    /// Checkpoint and restart every N updates (what the ANE compile budget
    /// forces on baked kernels; for tests).
    pub restart_every: Option<u64>,
    /// Samples printed at the end of the main job.
    pub samples: usize,
    /// Size of the main job's built-in corpus, in MB.
    pub corpus_mb: f64,
}

impl Default for JobOptions {
    /// The main job with the flags' defaults.
    fn default() -> Self {
        JobOptions {
            config: "tiny".into(),
            data: None,
            val_data: None,
            val_fraction: 0.05,
            init: None,
            resume: None,
            backend: BackendKind::Cpu,
            precision: Precision::Fp32,
            steps: None,
            batch: None,
            seq: None,
            accum: 1,
            lr: None,
            warmup: None,
            schedule: Schedule::Cosine,
            weight_decay: 0.1,
            grad_clip: 1.0,
            seed: 1337,
            data_order: Order::Random,
            out: None,
            eval_every: None,
            eval_batches: 8,
            checkpoint_every: 100,
            stop_after: None,
            restart_every: None,
            samples: 3,
            corpus_mb: 4.0,
        }
    }
}

/// What a run uses for the options left unset, by kind of run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RunDefaults {
    pub steps: u64,
    pub batch: usize,
    pub lr: f32,
    pub warmup: u64,
    pub eval_every: u64,
}

impl RunDefaults {
    /// The main job: a few minutes of the `tiny` model on the built-in corpus.
    pub const MAIN_JOB: RunDefaults = RunDefaults {
        steps: 200,
        batch: 8,
        lr: 3e-3,
        warmup: 20,
        eval_every: 50,
    };
    /// A run on the user's token file.
    pub const OWN_DATA: RunDefaults = RunDefaults {
        steps: 1000,
        batch: 4,
        lr: 5e-4,
        warmup: 100,
        eval_every: 200,
    };
}

/// The main job's model preset, which also names its run directories.
pub const MAIN_JOB_PRESET: &str = "tiny";
/// Vocabulary of the tokenizer the main job trains on the built-in corpus.
pub const MAIN_JOB_VOCAB: usize = 1024;
/// Fraction of the built-in corpus the main job holds out.
pub const MAIN_JOB_VAL_FRACTION: f64 = 0.05;

/// How a job ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The run did its updates (all of them, or `stop_after`); checkpoint saved.
    Finished { run_dir: PathBuf, step: u64 },
    /// The backend's compile budget is spent before the last update: the
    /// checkpoint is saved, and a process resuming `run_dir` must take over.
    Restart { run_dir: PathBuf, step: u64 },
}

/// Run the job `options` describe: a new run, the main job, or a resumed run.
/// Progress and notes go to `observer`; the main job's samples to `samples_out`.
pub fn run(
    options: &JobOptions,
    observer: &mut dyn Observer,
    samples_out: &mut dyn Write,
) -> Result<Outcome> {
    if let Some(dir) = &options.resume {
        return resume(options, dir, observer);
    }
    // Open the backend first: `--backend ane` fails before any data is prepared.
    let opened = open_backend(options.backend, options.precision)?;
    observer.on_message(&opened.note);
    let main_job = options.data.is_none();
    let (data, val_data, run_dir, vocab) = match &options.data {
        Some(data) => {
            let run_dir = options
                .out
                .clone()
                .unwrap_or_else(|| next_run_dir(&options.config));
            (data.clone(), options.val_data.clone(), run_dir, None)
        }
        None => {
            let run_dir = options
                .out
                .clone()
                .unwrap_or_else(|| next_run_dir(MAIN_JOB_PRESET));
            let prepared = prepare_main_job(&run_dir, options.corpus_mb, options.seed, observer)?;
            (
                prepared.train,
                Some(prepared.val),
                run_dir,
                Some(prepared.vocab),
            )
        }
    };
    let init = match &options.init {
        Some(path) => Some(
            load_weights(path)
                .map_err(|e| Error::Invalid(format!("loading --init {}: {e}", path.display())))?,
        ),
        None => None,
    };
    let mut model = match &init {
        Some(weights) => weights.config().clone(),
        None => ModelConfig::from_name_or_file(&options.config)?,
    };
    if let Some(vocab) = vocab {
        model.vocab_size = vocab;
    }
    let seq = options.seq.unwrap_or(model.seq_len.min(256));
    model.seq_len = model.seq_len.max(seq);
    let defaults = if main_job {
        RunDefaults::MAIN_JOB
    } else {
        RunDefaults::OWN_DATA
    };
    let config = train_config(options, defaults, model, seq, opened.precision);
    let weights = init.unwrap_or_else(|| Weights::init(&config.model, config.seed));
    let (train_span, val_span) =
        spans(&data, val_data.as_deref(), options, config.model.vocab_size)?;
    let mut source = WindowSource::new(Batcher::new(
        train_span,
        seq,
        options.data_order,
        config.seed,
    )?);
    let mut val = WindowSource::new(Batcher::new(val_span, seq, Order::Sequential, 0)?);

    let preferences = opened.backend.preferences();
    let restart_after = updates_before_restart(options.restart_every, &preferences)?;
    let kernels = kernel_options(opened.precision, &preferences);
    let engine = Engine::new(opened.backend, &config.model, seq, config.batch, kernels)?;
    observer.on_message(&format!(
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
    ));
    let mut trainer = Trainer::new(config, weights, engine, &run_dir)?;
    let outcome = run_loop(
        &mut trainer,
        &mut source,
        &mut val,
        options,
        restart_after,
        observer,
    )?;
    if main_job && matches!(outcome, Outcome::Finished { .. }) {
        let tokenizer = run_dir.join("tokenizer.bin");
        crate::generate::samples(
            &trainer.weights,
            &tokenizer,
            options.samples,
            options.seed,
            samples_out,
        )?;
    }
    Ok(outcome)
}

/// This run's config: the options, else `defaults`.
fn train_config(
    options: &JobOptions,
    defaults: RunDefaults,
    model: ModelConfig,
    seq: usize,
    precision: Precision,
) -> TrainConfig {
    TrainConfig {
        preset: crate::model::config::PRESETS
            .contains(&options.config.as_str())
            .then(|| options.config.clone()),
        steps: options.steps.unwrap_or(defaults.steps),
        batch: options.batch.unwrap_or(defaults.batch),
        seq,
        accum: options.accum,
        lr: options.lr.unwrap_or(defaults.lr),
        warmup: options.warmup.unwrap_or(defaults.warmup),
        schedule: options.schedule,
        optimizer: AdamW {
            weight_decay: options.weight_decay,
            ..AdamW::default()
        },
        grad_clip: options.grad_clip,
        seed: options.seed,
        eval_every: options.eval_every.unwrap_or(defaults.eval_every),
        eval_batches: options.eval_batches,
        checkpoint_every: options.checkpoint_every,
        fp16: precision == Precision::Fp16,
        model,
    }
}

/// Continue the run in `dir` from its checkpoint, with its saved config.
fn resume(options: &JobOptions, dir: &Path, observer: &mut dyn Observer) -> Result<Outcome> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| {
        Error::Invalid(format!(
            "reading {} (is --resume a run directory?): {e}",
            config_path.display()
        ))
    })?;
    let config: TrainConfig = serde_json::from_str(&text)
        .map_err(|e| Error::Invalid(format!("parsing {}: {e}", config_path.display())))?;
    let data = match &options.data {
        Some(data) => data.clone(),
        None if dir.join("tokens.bin").exists() => dir.join("tokens.bin"),
        None => {
            return Err(Error::Invalid(
                "--resume needs --data (the token file the run was started with)".into(),
            ));
        }
    };
    let val_data = options
        .val_data
        .clone()
        .or_else(|| Some(dir.join("tokens.val.bin")).filter(|p| p.exists()));
    let (train_span, val_span) =
        spans(&data, val_data.as_deref(), options, config.model.vocab_size)?;
    let mut source = WindowSource::new(Batcher::new(
        train_span,
        config.seq,
        options.data_order,
        config.seed,
    )?);
    let mut val = WindowSource::new(Batcher::new(val_span, config.seq, Order::Sequential, 0)?);
    // A run keeps the precision it started with (fp16 runs carry a loss scale).
    let wanted = if config.fp16 {
        Precision::Fp16
    } else {
        options.precision
    };
    let opened = open_backend(options.backend, wanted)?;
    observer.on_message(&opened.note);
    if opened.precision != wanted {
        return Err(Error::Invalid(format!(
            "{} was trained with fp32 kernels; the ANE runs fp16 kernels (hint: resume it with --backend cpu)",
            dir.display()
        )));
    }
    let preferences = opened.backend.preferences();
    let restart_after = updates_before_restart(options.restart_every, &preferences)?;
    let kernels = kernel_options(opened.precision, &preferences);
    let engine = Engine::new(
        opened.backend,
        &config.model,
        config.seq,
        config.batch,
        kernels,
    )?;
    let mut trainer = Trainer::resume(dir, engine, &mut source, options.steps)?;
    observer.on_message(&format!(
        "resumed {} at step {}",
        dir.display(),
        trainer.step()
    ));
    run_loop(
        &mut trainer,
        &mut source,
        &mut val,
        options,
        restart_after,
        observer,
    )
}

/// Train until the end of the run, `stop_after` or the compile budget,
/// report the held-out loss, and say whether a restart must continue the run.
fn run_loop(
    trainer: &mut Trainer,
    source: &mut dyn Batches,
    val: &mut dyn Batches,
    options: &JobOptions,
    restart_after: Option<u64>,
    observer: &mut dyn Observer,
) -> Result<Outcome> {
    let started = Instant::now();
    let stop_after = match (options.stop_after, restart_after) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    trainer.train(source, Some(val), observer, stop_after)?;
    let val_loss = trainer.evaluate(val)?;
    observer.on_message(&format!(
        "step {}: held-out loss {val_loss:.4} (perplexity {:.1}); {:.0}s; saved {}",
        trainer.step(),
        val_loss.exp(),
        started.elapsed().as_secs_f64(),
        trainer.run_dir().join("checkpoint.bin").display()
    ));
    let (run_dir, step) = (trainer.run_dir().to_path_buf(), trainer.step());
    // `stop_after` ends a process on purpose (tests of interrupted runs): no restart.
    let restart = restart_after.is_some() && options.stop_after.is_none();
    if restart && step < trainer.config.steps {
        Ok(Outcome::Restart { run_dir, step })
    } else {
        Ok(Outcome::Finished { run_dir, step })
    }
}

/// [`backend::open`] for a job asked to compute in `precision`: the error
/// says what to try instead; the note says when the backend changed the precision.
pub fn open_backend(kind: BackendKind, precision: Precision) -> Result<Opened> {
    let mut opened = backend::open(kind, precision).map_err(|e| {
        Error::Invalid(format!(
            "{e}\nhint: use --backend cpu, or --backend auto to use the ANE only where it works \
             (run `anemone doctor` on a Mac to see why it does not)"
        ))
    })?;
    if opened.precision != precision {
        opened
            .note
            .push_str("\nnote: the ANE computes in fp16: using --precision fp16 (loss scaling on)");
    }
    Ok(opened)
}

/// The training kernels' options: `precision`'s dtype, the backend's weight mode.
pub fn kernel_options(precision: Precision, preferences: &Preferences) -> KernelOptions {
    let dtype = match precision {
        Precision::Fp16 => DType::Fp16,
        Precision::Fp32 => DType::Fp32,
    };
    KernelOptions {
        dtype,
        mode: preferences.weight_mode,
        ..KernelOptions::cpu()
    }
}

/// Updates this process may run before it must checkpoint and `exec()` a
/// resuming copy of itself: `restart_every` when given, else what the
/// backend's compile limit allows (never, for the packed kernels training uses).
pub fn updates_before_restart(
    restart_every: Option<u64>,
    preferences: &Preferences,
) -> Result<Option<u64>> {
    if let Some(n) = restart_every {
        if n == 0 {
            return Err(Error::Invalid("--restart-every must be at least 1".into()));
        }
        return Ok(Some(n));
    }
    let counts = crate::model::kernels::kernel_counts();
    let plan = CompilePlan::new(
        preferences.weight_mode,
        counts.kernels,
        counts.reading_weights,
    );
    preferences.updates_before_restart(plan)
}

/// The first free `runs/<name>-<n>`.
fn next_run_dir(name: &str) -> PathBuf {
    let base = Path::new("runs");
    (1..)
        .map(|i| base.join(format!("{name}-{i}")))
        .find(|p| !p.exists())
        .expect("a free run directory")
}

/// Token spans for training and evaluation: `val_data` whole, else the tail of `data`.
fn spans(
    data: &Path,
    val_data: Option<&Path>,
    options: &JobOptions,
    vocab: usize,
) -> Result<(TokenSpan, TokenSpan)> {
    let file = Arc::new(TokenFile::open(data)?);
    file.check_vocab(vocab)?;
    match val_data {
        Some(path) => {
            let val = Arc::new(TokenFile::open(path)?);
            val.check_vocab(vocab)?;
            Ok((TokenSpan::whole(file), TokenSpan::whole(val)))
        }
        None => TokenSpan::split_tail(file, options.val_fraction),
    }
}

/// What the main job prepared in its run directory.
struct Prepared {
    vocab: usize,
    train: PathBuf,
    val: PathBuf,
}

/// The main job's data: generate the built-in corpus (`corpus_mb` MB), train a
/// tokenizer on it and tokenize it into `run_dir` (`corpus.txt`,
/// `tokenizer.bin`, `tokens.bin`, `tokens.val.bin`).
fn prepare_main_job(
    run_dir: &Path,
    corpus_mb: f64,
    seed: u64,
    observer: &mut dyn Observer,
) -> Result<Prepared> {
    if corpus_mb.is_nan() || corpus_mb <= 0.0 {
        return Err(Error::Invalid("--corpus-mb must be positive".into()));
    }
    std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    let started = Instant::now();
    let text = corpus::generate(&CorpusConfig {
        seed,
        n_bytes: (corpus_mb * 1e6) as usize,
    });
    let corpus_path = run_dir.join("corpus.txt");
    crate::atomic::write_atomic(&corpus_path, text.as_bytes())?;
    let tokenizer = train_bpe([text.as_str()], &TrainOptions::new(MAIN_JOB_VOCAB))?;
    tokenizer.write(&run_dir.join("tokenizer.bin"))?;
    let train = run_dir.join("tokens.bin");
    let report = tokenize_files(
        &tokenizer,
        &[corpus_path],
        &train,
        MAIN_JOB_VAL_FRACTION,
        &mut |_, _| {},
    )?;
    observer.on_message(&format!(
        "built-in corpus: {:.1} MB of stories, {}-token tokenizer, {} train / {} held-out tokens ({:.1}s)",
        text.len() as f64 / 1e6,
        tokenizer.vocab_size(),
        report.train_tokens,
        report.val_tokens,
        started.elapsed().as_secs_f64()
    ));
    Ok(Prepared {
        vocab: tokenizer.vocab_size(),
        val: val_path_for(&train),
        train,
    })
}

/// Mean loss of a saved model over the start of a token file.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evaluation {
    /// Mean cross-entropy per token (nats).
    pub loss: f64,
    /// Windows evaluated, each of `seq` tokens.
    pub windows: usize,
    pub seq: usize,
}

/// Evaluate the model at `model` (run directory, checkpoint or llama2.c file)
/// on at most `max_tokens` tokens of `data`, in consecutive windows of `seq`
/// tokens (default: the model's seq_len, at most 256), on the CPU in fp32.
pub fn evaluate(
    model: &Path,
    data: &Path,
    max_tokens: usize,
    seq: Option<usize>,
) -> Result<Evaluation> {
    let weights = load_weights(model)
        .map_err(|e| Error::Invalid(format!("loading {}: {e}", model.display())))?;
    let config = weights.config().clone();
    let seq = seq.unwrap_or(config.seq_len.min(256));
    let file = Arc::new(TokenFile::open(data)?);
    file.check_vocab(config.vocab_size)?;
    let windows = ((file.len().saturating_sub(1)) / seq).min((max_tokens / seq).max(1));
    if windows == 0 {
        return Err(Error::Invalid(format!(
            "{}: {} tokens are fewer than one window of {} + 1",
            data.display(),
            file.len(),
            seq
        )));
    }
    let mut batcher = Batcher::new(TokenSpan::whole(file), seq, Order::Sequential, 0)?;
    let cpu = backend::open(BackendKind::Cpu, Precision::Fp32)?.backend;
    let mut engine = Engine::new(cpu, &config, seq, 1, KernelOptions::cpu())?;
    let (mut inputs, mut targets) = (vec![0u32; seq], vec![0u32; seq]);
    let mut total = 0.0;
    for _ in 0..windows {
        batcher.next_window(&mut inputs, &mut targets)?;
        total += engine.loss(&weights, &inputs, &targets)?;
    }
    Ok(Evaluation {
        loss: total / windows as f64,
        windows,
        seq,
    })
}
