//! A training job from options to a finished run directory, and the run
//! policy around it: the main job (no token file given: the built-in corpus,
//! a tokenizer trained on it, token files, the `tiny` model, samples at the
//! end), the defaults that differ between the main job and a run on the
//! user's data ([`RunDefaults`]), the run directory a job takes (locked,
//! refused when it holds a run unless `--overwrite`), resuming a run from its
//! record with nothing but its directory, the memory a run needs checked
//! before anything is allocated, the kernel options and restart decision
//! the backend's [`Preferences`] call for, and the held-out evaluation of a
//! saved model ([`evaluate`]).
//!
//! The CLI parses flags into [`JobOptions`] (`None` for a flag not given) and
//! calls [`run`]; progress and notes go to an [`Observer`], samples to a
//! writer. This module does not parse arguments, draw progress, or replace
//! the process: [`Outcome::Restart`] says that a process resuming the run
//! must take over (the ANE's compile budget), and the caller execs it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::engine::Engine;
use super::finetune::{self, SftRecord};
use super::optim::AdamW;
use super::run_dir::{DataFile, RunLock, RunRecord};
use super::source::WindowSource;
use super::{Batches, Observer, TrainConfig, Trainer};
use crate::backend::{self, Backend, BackendKind, CompilePlan, Opened, Precision, Preferences};
use crate::data::corpus::{self, CorpusConfig};
use crate::data::sft::SftFiles;
use crate::data::tokenizer::train::{TrainOptions, train_bpe};
use crate::data::tokens::{Batcher, Order, TokenFile, TokenSpan, tokenize_files, val_path_for};
use crate::dist::Collective;
use crate::mil::DType;
use crate::model::hf::adapter::BaseRecord;
use crate::model::kernels::KernelOptions;
use crate::model::lora::Adapters;
use crate::model::{ModelConfig, Weights, load_weights};
use crate::rng::Rng;
use crate::{Error, Result};

pub use super::options::{DEFAULTS, Defaults, JobOptions, RunDefaults};

/// The main job's model preset, which also names its run directories.
pub const MAIN_JOB_PRESET: &str = RunDefaults::MAIN_JOB.config;
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
    run_on(options, crate::dist::single(), observer, samples_out)
}

/// [`run`] as one rank of `dist` (data parallel under `mpirun`, see
/// [`Trainer`]): every rank runs the same job on its share of each batch;
/// rank 0 alone locks and writes the run directory. The ranks refuse to
/// start unless they agree on the config, the token files and the weights.
pub fn run_on(
    options: &JobOptions,
    dist: Arc<dyn Collective>,
    observer: &mut dyn Observer,
    samples_out: &mut dyn Write,
) -> Result<Outcome> {
    options.validate()?;
    if dist.size() > 1 && options.data.is_none() && options.resume.is_none() {
        return Err(Error::Invalid(format!(
            "{} ranks need a token file: the main job (no --data) prepares its corpus and \
             tokenizer in its run directory, in one process\nhint: pass --data (a token \
             file every rank can read), or run the main job without mpirun",
            dist.size()
        )));
    }
    match &options.resume {
        Some(dir) => resume(options, dir, dist, observer, samples_out),
        None => start(options, dist, observer, samples_out),
    }
}

/// With two or more ranks: one all-gather per item that every rank has the
/// same config, token files (counts and CRC-32s) and starting weights.
fn check_ranks_agree(dist: &dyn Collective, record: &RunRecord, weights: &Weights) -> Result<()> {
    if dist.size() == 1 {
        return Ok(());
    }
    let config = serde_json::to_vec(&record.config).map_err(|e| Error::Invalid(e.to_string()))?;
    let mut data: String = [&record.data, &record.val_data]
        .iter()
        .map(|file| match file {
            Some(file) => format!("{} {};", file.tokens, file.crc32),
            None => "none;".into(),
        })
        .collect();
    if let Some(sft) = &record.sft {
        for file in std::iter::once(&sft.train).chain(&sft.valid) {
            data.push_str(&format!("{} {};", file.bytes, file.crc32));
        }
    }
    let checks = [
        (
            "config",
            crate::dist::digest(&config),
            "start every rank with the same flags and config file (mpirun runs one command line)",
        ),
        (
            "token file (--data/--val-data)",
            crate::dist::digest(data.as_bytes()),
            "give every machine a copy of the same token files",
        ),
        (
            "starting weights (--init or the checkpoint)",
            crate::dist::digest(bytemuck::cast_slice(&weights.data)),
            "give every machine the same --init model, or the same run directory to resume",
        ),
    ];
    for (what, digest, hint) in checks {
        crate::dist::agree(dist, what, digest, hint)?;
    }
    Ok(())
}

/// The token files of a run, opened: training data and held-out data (a
/// file of its own, or the tail of the training data).
struct DataFiles {
    train: Arc<TokenFile>,
    val: Option<Arc<TokenFile>>,
    val_fraction: f64,
}

impl DataFiles {
    fn open(data: &Path, val_data: Option<&Path>, val_fraction: f64) -> Result<DataFiles> {
        Ok(DataFiles {
            train: Arc::new(TokenFile::open(data)?),
            val: match val_data {
                Some(path) => Some(Arc::new(TokenFile::open(path)?)),
                None => None,
            },
            val_fraction,
        })
    }

    /// Every id below `vocab`, then the spans for training and evaluation.
    fn spans(&self, vocab: usize) -> Result<(TokenSpan, TokenSpan)> {
        self.train.check_vocab(vocab)?;
        match &self.val {
            Some(val) => {
                val.check_vocab(vocab)?;
                Ok((
                    TokenSpan::whole(self.train.clone()),
                    TokenSpan::whole(val.clone()),
                ))
            }
            None => TokenSpan::split_tail(self.train.clone(), self.val_fraction),
        }
    }

    /// The batch sources over the spans: training windows in `order`,
    /// held-out windows in sequence.
    fn sources(&self, config: &TrainConfig, order: Order) -> Result<(WindowSource, WindowSource)> {
        let (train_span, val_span) = self.spans(config.model.vocab_size)?;
        Ok((
            WindowSource::new(Batcher::new(train_span, config.seq, order, config.seed)?),
            WindowSource::new(Batcher::new(val_span, config.seq, Order::Sequential, 0)?),
        ))
    }
}

/// Lock `run_dir` for a new run and check it holds no run (or remove the
/// old run's files with `overwrite`); notes say what was found.
fn take_run_dir(run_dir: &Path, overwrite: bool, observer: &mut dyn Observer) -> Result<RunLock> {
    let (lock, stale) = RunLock::acquire(run_dir)?;
    if let Some(pid) = stale {
        observer.on_message(&format!(
            "note: {} was locked by process {pid}, which ended without releasing it; taken over",
            run_dir.display()
        ));
    }
    for path in crate::atomic::remove_stale_temps(run_dir) {
        observer.on_message(&format!(
            "note: removed {}, left by a process that was killed while writing it",
            path.display()
        ));
    }
    let removed = super::run_dir::prepare_new(run_dir, overwrite)?;
    if !removed.is_empty() {
        observer.on_message(&format!(
            "--overwrite: removed the previous run's {}",
            removed
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(lock)
}

/// A new run (the main job when `options.data` is `None`).
fn start(
    options: &JobOptions,
    dist: Arc<dyn Collective>,
    observer: &mut dyn Observer,
    samples_out: &mut dyn Write,
) -> Result<Outcome> {
    // Open the backend first: `--backend ane` fails before any data is prepared.
    let precision = options.precision.unwrap_or(DEFAULTS.precision);
    let opened = open_backend(options.backend.unwrap_or(DEFAULTS.backend), precision)?;
    observer.on_message(&opened.note);
    let main_job = options.data.is_none();
    // Everything is checked before the run directory is touched.
    let (mut config, data, init) = plan_new_run(options, opened.precision, observer)?;
    let data_order = options.data_order.unwrap_or(DEFAULTS.data_order);
    let (sft, base) = plan_fine_tuning(options, &config, &data, data_order, observer)?;
    let config_name = options
        .config
        .as_deref()
        .unwrap_or(RunDefaults::for_options(options).config);
    let run_dir = options
        .out
        .clone()
        .unwrap_or_else(|| next_run_dir(config_name));
    // Read before the directory is taken: `--overwrite` of the run `--init`
    // names removes them there.
    let base_files = match &options.init {
        Some(init) => crate::model::hf::files::read_base_files(init)?,
        None => Vec::new(),
    };
    let rank0 = dist.rank() == 0;
    let _lock = match rank0 {
        true => Some(take_run_dir(&run_dir, options.overwrite, observer)?),
        false => None,
    };
    if let Some(init) = options.init.as_ref().filter(|_| rank0) {
        keep_base_files(init, &base_files, &run_dir, observer)?;
    }
    let (mut record, mut source, mut val) = match (data, sft) {
        (NewData::Sft(record), Some(sources)) => {
            let run = record_of(options, &config, data_order, None, Some(record))?;
            let (train, val): (Box<dyn Batches>, Box<dyn Batches>) =
                (Box::new(sources.train), Box::new(sources.val));
            (run, train, val)
        }
        (data, _) => {
            let files = match data {
                NewData::Tokens(files) => files,
                _ => {
                    let mb = options.corpus_mb.unwrap_or(DEFAULTS.corpus_mb);
                    let prepared = prepare_main_job(&run_dir, mb, config.seed, observer)?;
                    config.model.vocab_size = prepared.vocab;
                    config.validate()?;
                    DataFiles::open(&prepared.train, Some(&prepared.val), 0.0)?
                }
            };
            let (train, val) = files.sources(&config, data_order)?;
            let run = record_of(options, &config, data_order, Some(&files), None);
            let (train, val): (Box<dyn Batches>, Box<dyn Batches>) =
                (Box::new(train), Box::new(val));
            (run?, train, val)
        }
    };
    record.config = config.clone();
    let weights = init.unwrap_or_else(|| Weights::init(&config.model, config.seed));
    let preferences = opened.backend.preferences();
    let restart_after = updates_before_restart(options.restart_every, &preferences)?;
    let engine = training_engine(opened, &config, Some(&weights), observer)?;
    observer.on_message(&format!(
        "training {} ({:.2}M parameters, dim {}, {} layers{}) on {} for {} steps of {} x {} tokens -> {}",
        config.preset.as_deref().unwrap_or("model"),
        config.model.n_params() as f64 / 1e6,
        config.model.dim,
        config.model.n_layers,
        lora_summary(&config),
        engine.backend_name(),
        config.steps,
        config.batch * config.accum,
        config.seq,
        run_dir.display()
    ));
    check_ranks_agree(dist.as_ref(), &record, &weights)?;
    let mut trainer = match (&config.lora, base) {
        (Some(lora), Some(base)) => {
            let adapters = Adapters::init(&config.model, lora, &mut Rng::new(config.seed))?;
            let name = base.path.display().to_string();
            if rank0 {
                base.write(&run_dir)?;
            }
            Trainer::new_lora_on(config, weights, adapters, &name, engine, &run_dir, dist)?
        }
        _ => Trainer::new_on(config, weights, engine, &run_dir, dist)?,
    };
    if rank0 {
        record.write(&run_dir)?;
    }
    let outcome = run_loop(
        &mut trainer,
        source.as_mut(),
        val.as_mut(),
        options,
        restart_after,
        observer,
    )?;
    finish(&trainer, &outcome, main_job, options, samples_out)?;
    Ok(outcome)
}

/// The engine of a run's steps on the opened backend, its fallbacks noted;
/// a LoRA run's for its frozen `weights` (`Engine::for_lora`).
fn training_engine(
    opened: Opened,
    config: &TrainConfig,
    weights: Option<&Weights>,
    observer: &mut dyn Observer,
) -> Result<Engine> {
    let kernels = kernel_options(opened.precision, opened.backend.as_ref());
    let (seq, batch) = (config.seq, config.batch);
    let engine = match (&config.lora, weights) {
        (Some(lora), Some(base)) => {
            Engine::for_lora(opened.backend, base, lora, seq, batch, kernels)?
        }
        _ => Engine::new(opened.backend, &config.model, seq, batch, kernels)?,
    };
    for note in engine.fallbacks() {
        observer.on_message(&note);
    }
    Ok(engine)
}

/// ", LoRA rank r on N projections" for a LoRA run's summary line.
fn lora_summary(config: &TrainConfig) -> String {
    match &config.lora {
        Some(lora) => {
            let adapters = lora.layers.len() * lora.targets.len();
            let values: usize = lora
                .entries()
                .iter()
                .map(|(_, target)| {
                    let (out, input) = target.shape(&config.model);
                    lora.rank * (out + input)
                })
                .sum();
            format!(
                "; LoRA rank {} alpha {} on {adapters} projections, {:.2}M trained",
                lora.rank,
                lora.alpha,
                values as f64 / 1e6
            )
        }
        None => String::new(),
    }
}

/// A new run's record: its data (token files or fine-tuning examples) and
/// where its weights came from.
fn record_of(
    options: &JobOptions,
    config: &TrainConfig,
    data_order: Order,
    files: Option<&DataFiles>,
    sft: Option<SftRecord>,
) -> Result<RunRecord> {
    let main_job = options.data.is_none();
    Ok(RunRecord {
        config: config.clone(),
        data_order,
        data: files.map(|f| DataFile::of(&f.train)).transpose()?,
        val_data: files
            .and_then(|f| f.val.as_deref())
            .map(DataFile::of)
            .transpose()?,
        val_fraction: files.and_then(|f| f.val.is_none().then_some(f.val_fraction)),
        init: options
            .init
            .as_ref()
            .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())),
        main_job,
        corpus_mb: main_job.then(|| options.corpus_mb.unwrap_or(DEFAULTS.corpus_mb)),
        sft,
    })
}

/// What a fine-tuning run needs before its directory is taken: its JSONL
/// examples encoded (errors in the data come first) and, for LoRA, the
/// record of its base model.
fn plan_fine_tuning(
    options: &JobOptions,
    config: &TrainConfig,
    data: &NewData,
    order: Order,
    observer: &mut dyn Observer,
) -> Result<(Option<finetune::SftSources>, Option<BaseRecord>)> {
    let sft = match (data, &options.init) {
        (NewData::Sft(record), Some(init)) => {
            let vocab = config.model.vocab_size;
            let sources = finetune::open(record, init, config.seq, order, config.seed, vocab)?;
            for note in &sources.notes {
                observer.on_message(note);
            }
            Some(sources)
        }
        _ => None,
    };
    let base = match (&config.lora, &options.init) {
        (Some(_), Some(init)) => Some(BaseRecord::of(init)?),
        _ => None,
    };
    Ok((sft, base))
}

/// Copy what a Hugging Face base model (a model directory, or a run made
/// from one) has besides weights into a new run's directory: its config (as
/// `hf_config.json`), tokenizer, chat template and generation config, so
/// that `generate`, `eval` and `export` of the run find them.
fn keep_base_files(
    init: &Path,
    files: &[(&'static str, Vec<u8>)],
    run_dir: &Path,
    observer: &mut dyn Observer,
) -> Result<()> {
    let kept = crate::model::hf::files::keep_base_files(files, run_dir)?;
    if !kept.is_empty() {
        observer.on_message(&format!(
            "kept {} of {} in {}",
            kept.join(", "),
            init.display(),
            run_dir.display()
        ));
    }
    Ok(())
}

/// A new run's data: the user's token files, the main job's (made once
/// the run directory is taken), or fine-tuning examples in JSONL.
enum NewData {
    Tokens(DataFiles),
    MainJob,
    Sft(SftRecord),
}

/// A new run's config, validated and within memory, its data and its
/// `--init` weights.
fn plan_new_run(
    options: &JobOptions,
    precision: Precision,
    observer: &mut dyn Observer,
) -> Result<(TrainConfig, NewData, Option<Weights>)> {
    let fraction = options.val_fraction.unwrap_or(DEFAULTS.val_fraction);
    let data = match &options.data {
        Some(data) if SftFiles::is_jsonl(data) => {
            if options.val_data.is_some() {
                return Err(Error::Invalid(
                    "--val-data names a token file; with JSONL data put the held-out rows in \
                     valid.jsonl beside train.jsonl (a directory as --data)"
                        .into(),
                ));
            }
            NewData::Sft(SftRecord::of(data, fraction, options.mask_prompt)?)
        }
        Some(data) => NewData::Tokens(DataFiles::open(
            data,
            options.val_data.as_deref(),
            fraction,
        )?),
        None => NewData::MainJob,
    };
    if let (Some(name), Some(_)) = (&options.config, &options.init) {
        return Err(Error::Invalid(format!(
            "--config {name} conflicts with --init: the model is the one the --init weights \
             describe\nhint: drop --config"
        )));
    }
    let init = match &options.init {
        Some(path) => Some(load_weights(path).map_err(|e| Error::Invalid(format!("--init: {e}")))?),
        None => None,
    };
    let vocab = match &data {
        NewData::Tokens(files) => files
            .train
            .vocab_size()
            .map(|v| (v, files.train.path().to_path_buf())),
        // The main job's tokenizer has at most this many tokens.
        NewData::MainJob => Some((MAIN_JOB_VOCAB, PathBuf::new())),
        NewData::Sft(_) => None,
    };
    let model = new_model(options, init.as_ref(), vocab, observer)?;
    let mut config = train_config(options, init.is_none(), model, precision);
    if options.lora {
        config.lora = Some(finetune::lora_config(options, config.model.n_layers)?);
    }
    config.validate()?;
    check_training_memory(&config)?;
    Ok((config, data, init))
}

/// The main job's closing samples, once its last update is done.
fn finish(
    trainer: &Trainer,
    outcome: &Outcome,
    main_job: bool,
    options: &JobOptions,
    samples_out: &mut dyn Write,
) -> Result<()> {
    let done = matches!(outcome, Outcome::Finished { step, .. } if *step == trainer.config.steps);
    if main_job && done {
        crate::generate::samples(
            trainer.weights(),
            &trainer.run_dir().join("tokenizer.bin"),
            options.samples.unwrap_or(DEFAULTS.samples),
            trainer.config.seed,
            samples_out,
        )?;
    }
    Ok(())
}

/// The model of a new run: the `--init` weights' shape, else the preset or
/// config file with the vocabulary of the token file (`vocab`: its size and
/// path; an empty path for the main job's tokenizer), and a context of at
/// least `--seq` tokens; each change from the config said in a note.
fn new_model(
    options: &JobOptions,
    init: Option<&Weights>,
    vocab: Option<(usize, PathBuf)>,
    observer: &mut dyn Observer,
) -> Result<ModelConfig> {
    if let Some(weights) = init {
        // `--seq` beyond the weights' context is refused by the config check.
        return Ok(weights.config().clone());
    }
    let main_job = vocab
        .as_ref()
        .is_some_and(|(_, path)| path.as_os_str().is_empty());
    let name = options
        .config
        .as_deref()
        .unwrap_or(RunDefaults::of(main_job).config);
    let mut model = ModelConfig::from_name_or_file(name)?;
    if let Some((vocab, path)) = vocab
        && vocab != model.vocab_size
    {
        if !path.as_os_str().is_empty() {
            observer.on_message(&format!(
                "vocabulary: {vocab} tokens, from {} (--config {name} has {}; a new model \
                 takes its token file's)",
                path.display(),
                model.vocab_size
            ));
        }
        model.vocab_size = vocab;
    }
    let seq = options.seq.unwrap_or(model.seq_len.min(256));
    let max_seq = crate::model::config::LIMITS.positions;
    if seq > max_seq {
        return Err(Error::out_of_range(
            "--seq",
            seq,
            &format!("an integer in 1..={max_seq}"),
        ));
    }
    if seq > model.seq_len {
        observer.on_message(&format!(
            "context: {seq} tokens (--seq {seq}; --config {name} has seq_len {})",
            model.seq_len
        ));
        model.seq_len = seq;
    }
    Ok(model)
}

/// This run's config: the options, else the defaults of its kind of run.
fn train_config(
    options: &JobOptions,
    fresh: bool,
    model: ModelConfig,
    precision: Precision,
) -> TrainConfig {
    let defaults = RunDefaults::for_options(options);
    // Adapters train without weight decay unless asked (PEFT's and
    // transformers' default); full training keeps anemone's.
    let weight_decay = match options.lora {
        true => 0.0,
        false => DEFAULTS.weight_decay,
    };
    let name = options.config.as_deref().unwrap_or(defaults.config);
    TrainConfig {
        // A preset names the model only when the model is the preset's.
        preset: (fresh && crate::model::config::PRESETS.contains(&name)).then(|| name.to_string()),
        steps: options.steps.unwrap_or(defaults.steps),
        batch: options.batch.unwrap_or(defaults.batch),
        seq: options.seq.unwrap_or(model.seq_len.min(256)),
        accum: options.accum.unwrap_or(DEFAULTS.accum),
        lr: options.lr.unwrap_or(defaults.lr),
        warmup: options.warmup.unwrap_or(defaults.warmup),
        schedule: options.schedule.unwrap_or(DEFAULTS.schedule),
        optimizer: AdamW {
            weight_decay: options.weight_decay.unwrap_or(weight_decay),
            ..AdamW::default()
        },
        grad_clip: options.grad_clip.unwrap_or(DEFAULTS.grad_clip),
        seed: options.seed.unwrap_or(DEFAULTS.seed),
        eval_every: options.eval_every.unwrap_or(defaults.eval_every),
        eval_batches: options.eval_batches.unwrap_or(DEFAULTS.eval_batches),
        checkpoint_every: options
            .checkpoint_every
            .unwrap_or(DEFAULTS.checkpoint_every),
        fp16: precision == Precision::Fp16,
        model,
        lora: None,
    }
}

/// Bytes a training step holds, estimated from the shapes (saturating): the
/// weights with their gradients and two AdamW moments, the activations the
/// forward saves and the backward's arrays per token, the classifier's
/// logits, and per sequence in flight the attention's `T x T` masks and
/// probabilities.
pub fn training_bytes(model: &ModelConfig, batch: usize, seq: usize) -> u64 {
    use crate::memory::size;
    let (width, hidden) = (model.dim, model.hidden_dim);
    let (q_width, kv_width) = (model.q_dim(), model.kv_dim());
    let params = model.checked_n_params().unwrap_or(usize::MAX);
    // The FFN saves `h1` and `h3` (its gate is rebuilt in the backward).
    let per_layer_token = 6 * width + 2 * hidden + 2 * q_width + 2 * kv_width + 2;
    let backward_token = 4 * width + 3 * hidden + 2 * q_width + 2 * kv_width;
    let tokens = size(&[batch, seq]);
    let in_flight = batch.min(rayon::current_num_threads()).max(1);
    [
        size(&[params, 4, 5]),
        tokens.saturating_mul(size(&[model.n_layers, per_layer_token, 4])),
        tokens.saturating_mul(size(&[backward_token + model.vocab_size, 4])),
        size(&[in_flight, model.n_heads + 2, seq, seq, 4]),
    ]
    .into_iter()
    .fold(0, u64::saturating_add)
}

/// Bytes of a training step ([`training_bytes`]), or of a LoRA step: that
/// without the base's gradient and AdamW moments (12 bytes a parameter),
/// with the adapted matrices' bf16 copy (2 bytes a parameter at most).
pub fn step_bytes(model: &ModelConfig, batch: usize, seq: usize, lora: bool) -> u64 {
    let bytes = training_bytes(model, batch, seq);
    if !lora {
        return bytes;
    }
    let params = model.checked_n_params().unwrap_or(usize::MAX) as u64;
    bytes.saturating_sub(params.saturating_mul(10))
}

/// Refuse a run whose step would not fit in memory, before allocating it.
fn check_training_memory(config: &TrainConfig) -> Result<()> {
    crate::memory::check(
        &format!(
            "training a {:.1}M-parameter model on {} x {} tokens",
            config.model.checked_n_params().unwrap_or(usize::MAX) as f64 / 1e6,
            config.batch,
            config.seq
        ),
        step_bytes(
            &config.model,
            config.batch,
            config.seq,
            config.lora.is_some(),
        ),
        "lower --batch (use --accum for the same tokens per update) or --seq, or use a smaller --config",
    )
}

/// Continue the run in `dir` from its checkpoint and its record; the
/// options given besides must agree with the record (`train::resume`).
fn resume(
    options: &JobOptions,
    dir: &Path,
    dist: Arc<dyn Collective>,
    observer: &mut dyn Observer,
    samples_out: &mut dyn Write,
) -> Result<Outcome> {
    RunRecord::read(dir)?;
    let rank0 = dist.rank() == 0;
    let (_lock, stale) = match rank0 {
        true => {
            let (lock, stale) = RunLock::acquire(dir)?;
            (Some(lock), stale)
        }
        false => (None, None),
    };
    if let Some(pid) = stale {
        observer.on_message(&format!(
            "note: {} was locked by process {pid}, which ended without releasing it; taken over",
            dir.display()
        ));
    }
    let mut record = RunRecord::read(dir)?;
    let mut notes = super::resume::reconcile(&mut record, options, dir)?;
    if options.overwrite {
        notes.push("note: --overwrite does nothing with --resume (the run continues)".into());
    }
    let files = match &record.sft {
        Some(_) => None,
        None => Some(resume_data(&mut record, options, dir, observer)?),
    };
    record.config.validate()?;
    for note in &notes {
        observer.on_message(note);
    }
    if rank0 {
        record.write(dir)?;
    }
    // Every rank reads the run's config.json (in `Trainer::resume_on`) only
    // after rank 0 has rewritten it: one all-gather as a barrier.
    if dist.size() > 1 {
        dist.all_gather_u64(0);
    }
    let config = record.config.clone();
    // A run keeps the precision it started with (fp16 runs carry a loss scale).
    let wanted = if config.fp16 {
        Precision::Fp16
    } else {
        Precision::Fp32
    };
    let opened = open_backend(options.backend.unwrap_or(DEFAULTS.backend), wanted)?;
    observer.on_message(&opened.note);
    if opened.precision != wanted {
        return Err(Error::Invalid(format!(
            "{} was trained with fp32 kernels; the ANE runs fp16 kernels (hint: resume it with --backend cpu)",
            dir.display()
        )));
    }
    check_training_memory(&config)?;
    let (mut source, mut val) = resumed_sources(&record, files, dir, observer)?;
    let preferences = opened.backend.preferences();
    let restart_after = updates_before_restart(options.restart_every, &preferences)?;
    // A LoRA run's base must be the one it began with (its fingerprint).
    let base = match &config.lora {
        Some(_) => {
            let (weights, base) = crate::model::load_lora_base(dir)?;
            Some((weights, base.path.display().to_string()))
        }
        None => None,
    };
    let engine = training_engine(opened, &config, base.as_ref().map(|b| &b.0), observer)?;
    let mut trainer =
        Trainer::resume_with_base(dir, base, engine, source.as_mut(), None, dist.clone())?;
    record.config = trainer.config.clone();
    check_ranks_agree(dist.as_ref(), &record, trainer.weights())?;
    observer.on_message(&format!(
        "resumed {} at step {} of {}",
        dir.display(),
        trainer.step(),
        trainer.config.steps
    ));
    let outcome = run_loop(
        &mut trainer,
        source.as_mut(),
        val.as_mut(),
        options,
        restart_after,
        observer,
    )?;
    finish(&trainer, &outcome, record.main_job, options, samples_out)?;
    Ok(outcome)
}

/// The batch sources of a resumed run: over its token `files`, or over its
/// recorded JSONL examples, encoded again with the tokenizer and chat
/// template it kept.
fn resumed_sources(
    record: &RunRecord,
    files: Option<DataFiles>,
    dir: &Path,
    observer: &mut dyn Observer,
) -> Result<(Box<dyn Batches>, Box<dyn Batches>)> {
    let config = &record.config;
    match (&record.sft, files) {
        (Some(sft), _) => {
            let vocab = config.model.vocab_size;
            let order = record.data_order;
            let sources = finetune::open(sft, dir, config.seq, order, config.seed, vocab)?;
            for note in sources
                .notes
                .iter()
                .filter(|n| !n.starts_with("fine-tuning data"))
            {
                observer.on_message(note);
            }
            Ok((Box::new(sources.train), Box::new(sources.val)))
        }
        (None, Some(files)) => {
            let (train, val) = files.sources(config, record.data_order)?;
            Ok((Box::new(train), Box::new(val)))
        }
        (None, None) => Err(Error::Invalid(format!("{} records no data", dir.display()))),
    }
}

/// The token files of a resumed run: the recorded ones, found by their
/// recorded paths or by `--data`/`--val-data`, and holding the recorded
/// tokens. Runs from before files were recorded take `--data` (or the run's
/// own `tokens.bin`) and record it now.
fn resume_data(
    record: &mut RunRecord,
    options: &JobOptions,
    dir: &Path,
    observer: &mut dyn Observer,
) -> Result<DataFiles> {
    // A moved run directory: its own token files are found in it.
    let moved = |recorded: &DataFile| -> Option<PathBuf> {
        let inside = dir.join(recorded.path.file_name()?);
        (!recorded.path.exists() && inside.is_file()).then_some(inside)
    };
    let train = match &record.data {
        Some(recorded) => {
            let given = options.data.clone().or_else(|| moved(recorded));
            recorded_file(recorded, given.as_deref(), "--data", observer)?
        }
        None => {
            let path = match &options.data {
                Some(data) => data.clone(),
                None if dir.join("tokens.bin").exists() => dir.join("tokens.bin"),
                None => {
                    return Err(Error::Invalid(format!(
                        "{} does not record its token file (a run from an older anemone): \
                         --resume it with --data (the token file it was started with)",
                        dir.display()
                    )));
                }
            };
            let file = TokenFile::open(&path)?;
            record.data = Some(DataFile::of(&file)?);
            file
        }
    };
    let val = match (&record.val_data, record.val_fraction) {
        (Some(recorded), _) => {
            let given = options.val_data.clone().or_else(|| moved(recorded));
            Some(recorded_file(
                recorded,
                given.as_deref(),
                "--val-data",
                observer,
            )?)
        }
        (None, Some(_)) if options.val_data.is_some() => {
            return Err(Error::Invalid(format!(
                "--val-data conflicts with the run in {}, which holds out the tail of its \
                 training data\nhint: drop --val-data",
                dir.display()
            )));
        }
        (None, Some(_)) => None,
        (None, None) => {
            let path = options
                .val_data
                .clone()
                .or_else(|| Some(dir.join("tokens.val.bin")).filter(|p| p.exists()));
            match path {
                Some(path) => {
                    let file = TokenFile::open(&path)?;
                    record.val_data = Some(DataFile::of(&file)?);
                    Some(file)
                }
                None => {
                    record.val_fraction = Some(DEFAULTS.val_fraction);
                    None
                }
            }
        }
    };
    Ok(DataFiles {
        train: Arc::new(train),
        val: val.map(Arc::new),
        val_fraction: record.val_fraction.unwrap_or(DEFAULTS.val_fraction),
    })
}

/// A recorded token file, at `given` when a flag names one, else where it
/// was; its tokens must be the recorded ones.
fn recorded_file(
    recorded: &DataFile,
    given: Option<&Path>,
    flag: &str,
    observer: &mut dyn Observer,
) -> Result<TokenFile> {
    let path = given.unwrap_or(&recorded.path);
    let file = TokenFile::open(path).map_err(|e| match given {
        None => Error::Invalid(format!(
            "{e}\nhint: the run's token file is not where it was; pass {flag} with a file \
             holding the same tokens"
        )),
        Some(_) => e,
    })?;
    let found = DataFile::of(&file)?;
    if found.tokens != recorded.tokens || found.crc32 != recorded.crc32 {
        return Err(Error::Invalid(format!(
            "{} holds other tokens than the run started with ({} tokens, CRC-32 {}; now {} \
             tokens, CRC-32 {})\nhint: resume with the token file the run started with ({flag})",
            path.display(),
            recorded.tokens,
            recorded.crc32,
            found.tokens,
            found.crc32
        )));
    }
    if found.path != recorded.path {
        observer.on_message(&format!(
            "note: {flag} {}: the same tokens as {}, which the run started with",
            path.display(),
            recorded.path.display()
        ));
    }
    Ok(file)
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
        trainer.checkpoint_path().display()
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

/// The training kernels' options: `precision`'s dtype, the weight mode the
/// backend prefers and the MIL dialect it compiles ([`Backend::dialect`]:
/// ios16 on a chip the probes found refusing ios18).
pub fn kernel_options(precision: Precision, backend: &dyn Backend) -> KernelOptions {
    let dtype = match precision {
        Precision::Fp16 => DType::Fp16,
        Precision::Fp32 => DType::Fp32,
    };
    KernelOptions {
        deltas: crate::model::kernels::Deltas::NONE,
        dtype,
        mode: backend.preferences().weight_mode,
        dialect: backend.dialect(),
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
    // At most: attn_bwd refused whole and compiled as its two parts.
    let plan = CompilePlan::new(
        preferences.weight_mode,
        counts.most_compiles,
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

/// Evaluate the model at `model` (Hugging Face model directory, run
/// directory, checkpoint or llama2.c file)
/// on at most `max_tokens` tokens of `data`, in consecutive windows of `seq`
/// tokens (default: the model's seq_len, at most 256), on the CPU in fp32.
pub fn evaluate(
    model: &Path,
    data: &Path,
    max_tokens: usize,
    seq: Option<usize>,
) -> Result<Evaluation> {
    evaluate_with(model, data, max_tokens, seq, false)
}

/// [`evaluate`], and for JSONL data (a `.jsonl` file, or a directory's
/// `valid.jsonl`): the mean cross-entropy over the targets that count
/// (`mask_prompt`: completions and assistant turns only), one example per
/// window of `seq`, padded; `windows` are then the examples.
pub fn evaluate_with(
    model: &Path,
    data: &Path,
    max_tokens: usize,
    seq: Option<usize>,
    mask_prompt: bool,
) -> Result<Evaluation> {
    if max_tokens == 0 {
        return Err(Error::out_of_range("--max-tokens", 0, "an integer >= 1"));
    }
    let weights = load_weights(model).map_err(|e| Error::Invalid(format!("--model: {e}")))?;
    let config = weights.config().clone();
    let seq = seq.unwrap_or(config.seq_len.min(256));
    if !(1..=config.seq_len).contains(&seq) {
        return Err(Error::out_of_range(
            "--seq",
            seq,
            &format!("an integer in 1..={} (the model's seq_len)", config.seq_len),
        ));
    }
    crate::memory::check(
        &format!("evaluating windows of {seq} tokens"),
        training_bytes(&config, 1, seq),
        "lower --seq",
    )?;
    if SftFiles::is_jsonl(data) {
        return evaluate_examples(&weights, model, data, seq, mask_prompt);
    }
    if mask_prompt {
        return Err(Error::Invalid(
            "--mask-prompt leaves prompts out of the loss of JSONL examples; a token file \
             has none"
                .into(),
        ));
    }
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
    if !total.is_finite() {
        return Err(Error::Invalid(format!(
            "the loss of {} on {} is {total}: its weights overflow the computation \
             (finite, but too large)",
            model.display(),
            data.display()
        )));
    }
    Ok(Evaluation {
        loss: total / windows as f64,
        windows,
        seq,
    })
}

/// [`evaluate_with`] of JSONL examples: `sum(w ce) / sum(w)` over every
/// example, each in its own window of `seq` positions.
fn evaluate_examples(
    weights: &Weights,
    model: &Path,
    data: &Path,
    seq: usize,
    mask_prompt: bool,
) -> Result<Evaluation> {
    let config = weights.config();
    let (examples, pad) = finetune::eval_examples(data, model, mask_prompt, config.vocab_size)?;
    let cpu = backend::open(BackendKind::Cpu, Precision::Fp32)?.backend;
    let mut engine = Engine::new(cpu, config, seq, 1, KernelOptions::cpu())?;
    let (mut total, mut counted) = (0.0, 0usize);
    for example in &examples {
        let batch = crate::data::sft::SftBatch::from_examples(&[example], seq, pad);
        let loss = super::engine::LossWeights {
            targets: &batch.targets,
            weights: Some(&batch.weights),
            divisor: 1.0,
        };
        total += engine.weighted_loss_sum(weights, &batch.inputs, loss)?;
        counted += batch.counted();
    }
    if counted == 0 {
        return Err(Error::Invalid(format!(
            "{}: no target counts in the loss within windows of {seq} tokens (raise --seq{})",
            data.display(),
            if mask_prompt {
                ", or drop --mask-prompt"
            } else {
                ""
            }
        )));
    }
    Ok(Evaluation {
        loss: total / counted as f64,
        windows: examples.len(),
        seq,
    })
}
