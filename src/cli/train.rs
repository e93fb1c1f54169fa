//! `anemone train`, `anemone eval`: flags into [`JobOptions`] (a flag not
//! given is `None`), the library's
//! job ([`anemone::train::job`]) run with a progress display, and the `exec()`
//! of a resuming process when the job says the compile budget is spent.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use anemone::backend::ane::restart;
use anemone::backend::{BackendKind, Precision};
use anemone::data::sft::SftFiles;
use anemone::data::tokens::Order;
use anemone::model::lora::Target;
use anemone::train::job::{self, DEFAULTS, JobOptions, Outcome};
use anemone::train::optim::Schedule;
use anemone::train::{Metrics, Observer, Quiet};

use super::choices::{no_about, one_of};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Model preset, a JSON config file or a Hugging Face model directory (its
    /// shape only; default: stories2m for the main job, tiny with --data); a new
    /// model takes the token file's vocabulary.
    /// Presets: tiny, stories2m, stories260k, stories15m, stories42m,
    /// stories110m, qwen3-0.6b-shape, layer768, smollm2-135m, smollm2-360m,
    /// qwen2.5-0.5b, qwen3-0.6b, llama3.2-1b, tinyllama-1.1b
    #[arg(long)]
    pub config: Option<String>,
    /// Token file (anemone .bin with header, or raw uint16), or fine-tuning
    /// examples: a .jsonl file or a directory with train.jsonl and
    /// valid.jsonl (rows {"text"}, {"prompt", "completion"} or {"messages"},
    /// tokenized with the --init model's tokenizer and chat template).
    /// Without it, the main job: generate the built-in corpus, train a
    /// tokenizer and tokenize it
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Held-out token file (default: the last --val-fraction of --data)
    #[arg(long)]
    pub val_data: Option<PathBuf>,
    /// Fraction of --data held out for evaluation when --val-data is absent
    #[arg(long, default_value_t = DEFAULTS.val_fraction, allow_negative_numbers = true)]
    pub val_fraction: f64,
    /// Start from these weights: a Hugging Face model directory (full
    /// fine-tuning; its tokenizer, chat template and generation config are
    /// kept in the run directory), a run directory, an anemone checkpoint or
    /// a llama2.c model.bin
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Continue the run in this directory from its checkpoint, exactly (its
    /// data, order and settings are recorded; other flags must agree, and
    /// --steps, --eval-every, --eval-batches, --checkpoint-every override)
    #[arg(long)]
    pub resume: Option<PathBuf>,
    #[arg(
        long,
        value_parser = one_of(&BackendKind::ALL, BackendKind::name, no_about),
        default_value_t = DEFAULTS.backend
    )]
    pub backend: BackendKind,
    /// Kernel precision: fp32, or fp16 (rounded after every op, with loss scaling)
    #[arg(long, default_value_t = DEFAULTS.precision)]
    pub precision: Precision,
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
    #[arg(long, default_value_t = DEFAULTS.accum)]
    pub accum: usize,
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f32>,
    /// Warmup updates
    #[arg(long)]
    pub warmup: Option<u64>,
    #[arg(
        long,
        value_parser = one_of(&Schedule::ALL, Schedule::name, Schedule::about),
        default_value_t = DEFAULTS.schedule
    )]
    pub schedule: Schedule,
    #[arg(long, default_value_t = DEFAULTS.weight_decay, allow_negative_numbers = true)]
    pub weight_decay: f32,
    /// Global gradient-norm clip (0 disables)
    #[arg(long, default_value_t = DEFAULTS.grad_clip, allow_negative_numbers = true)]
    pub grad_clip: f32,
    #[arg(long, default_value_t = DEFAULTS.seed)]
    pub seed: u64,
    #[arg(
        long,
        value_parser = one_of(&Order::ALL, Order::name, no_about),
        default_value_t = DEFAULTS.data_order
    )]
    pub data_order: Order,
    /// Run directory (default: runs/<config>-<n>); an existing run there is
    /// refused unless --overwrite
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace the run already in --out (its files only)
    #[arg(long)]
    pub overwrite: bool,
    /// Evaluate held-out loss every N updates
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Held-out batches per evaluation
    #[arg(long, default_value_t = DEFAULTS.eval_batches)]
    pub eval_batches: usize,
    /// Save a checkpoint every N updates (0: only at the end)
    #[arg(long, default_value_t = DEFAULTS.checkpoint_every)]
    pub checkpoint_every: u64,
    /// Stop after this many updates of this invocation (the run can be resumed)
    #[arg(long, hide = true)]
    pub stop_after: Option<u64>,
    /// Checkpoint and exec() a resuming process every N updates (what the ANE
    /// compile budget forces on baked kernels; for tests)
    #[arg(long, hide = true)]
    pub restart_every: Option<u64>,
    /// Generated samples to print at the end of the main job
    #[arg(long, default_value_t = DEFAULTS.samples)]
    pub samples: usize,
    /// Built-in corpus size in MB (main job)
    #[arg(long, default_value_t = DEFAULTS.corpus_mb, allow_negative_numbers = true)]
    pub corpus_mb: f64,
    /// Train LoRA adapters on the frozen --init model instead of every
    /// weight; they are written to RUN/adapters in PEFT's layout
    #[arg(long, help_heading = "LoRA")]
    pub lora: bool,
    /// Adapter rank r [default: 8]
    #[arg(long, help_heading = "LoRA")]
    pub lora_rank: Option<usize>,
    /// Adapter alpha (the update is scaled by alpha / r) [default: 16]
    #[arg(long, help_heading = "LoRA", allow_negative_numbers = true)]
    pub lora_alpha: Option<f32>,
    /// Dropout on the adapters' input while training, in [0, 1) (PEFT's lora_dropout) [default: 0]
    #[arg(long, help_heading = "LoRA", allow_negative_numbers = true)]
    pub lora_dropout: Option<f32>,
    /// Projections with adapters, comma-separated: q,k,v,o,gate,up,down [default: all]
    #[arg(long, help_heading = "LoRA", value_delimiter = ',', value_parser = one_of(&Target::ALL, Target::name, no_about))]
    pub lora_targets: Option<Vec<Target>>,
    /// Adapters on the last N layers [default: all]
    #[arg(long, help_heading = "LoRA")]
    pub lora_layers: Option<usize>,
    /// Keep the adapters beside the frozen base instead of merged into it:
    /// less memory (no copy of the adapted matrices), a few % slower on the
    /// CPU; always so on the ANE and with --lora-dropout
    #[arg(long, help_heading = "LoRA")]
    pub lora_unmerged: bool,
    /// JSONL data: put the loss on completions and assistant turns only
    #[arg(long)]
    pub mask_prompt: bool,
}

impl TrainArgs {
    /// The job's options: a flag not given on the command line is `None`
    /// (`given` says which were), so a resumed run can tell a flag that
    /// repeats a default from one not given.
    pub fn into_options(self, given: &dyn Fn(&str) -> bool) -> JobOptions {
        let TrainArgs {
            config,
            data,
            val_data,
            val_fraction,
            init,
            resume,
            backend,
            precision,
            steps,
            batch,
            seq,
            accum,
            lr,
            warmup,
            schedule,
            weight_decay,
            grad_clip,
            seed,
            data_order,
            out,
            overwrite,
            eval_every,
            eval_batches,
            checkpoint_every,
            stop_after,
            restart_every,
            samples,
            corpus_mb,
            lora,
            lora_rank,
            lora_alpha,
            lora_dropout,
            lora_targets,
            lora_layers,
            lora_unmerged,
            mask_prompt,
        } = self;
        JobOptions {
            config,
            data,
            val_data,
            val_fraction: given("val_fraction").then_some(val_fraction),
            init,
            resume,
            backend: given("backend").then_some(backend),
            precision: given("precision").then_some(precision),
            steps,
            batch,
            seq,
            accum: given("accum").then_some(accum),
            lr,
            warmup,
            schedule: given("schedule").then_some(schedule),
            weight_decay: given("weight_decay").then_some(weight_decay),
            grad_clip: given("grad_clip").then_some(grad_clip),
            seed: given("seed").then_some(seed),
            data_order: given("data_order").then_some(data_order),
            out,
            overwrite,
            eval_every,
            eval_batches: given("eval_batches").then_some(eval_batches),
            checkpoint_every: given("checkpoint_every").then_some(checkpoint_every),
            stop_after,
            restart_every,
            samples: given("samples").then_some(samples),
            corpus_mb: given("corpus_mb").then_some(corpus_mb),
            lora,
            lora_rank,
            lora_alpha,
            lora_dropout,
            lora_targets,
            lora_layers,
            lora_unmerged,
            mask_prompt,
        }
    }
}

/// A job in this process, or as one rank of the processes `mpirun` started
/// (`--features mpi`): only rank 0 shows progress; an error on any rank
/// names it and ends every rank (MPI_Abort) instead of leaving the others
/// waiting in a collective.
pub fn train(options: JobOptions) -> Result<()> {
    let dist = anemone::dist::from_launcher()?;
    let (rank, ranks) = (dist.rank(), dist.size());
    let mut progress = Progress::default();
    let mut quiet = Quiet;
    let observer: &mut dyn Observer = match rank {
        0 => &mut progress,
        _ => &mut quiet,
    };
    let result = job::run_on(&options, dist.clone(), observer, &mut std::io::stdout());
    drop(progress);
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(err) if ranks > 1 => {
            eprintln!("error: rank {rank} of {ranks}: {err:#}");
            dist.abort(2)
        }
        Err(err) => return Err(err.into()),
    };
    match outcome {
        Outcome::Finished { .. } => Ok(()),
        Outcome::Restart { run_dir, step } if ranks > 1 => {
            eprintln!(
                "error: rank {rank} of {ranks}: the ANE's compile budget is spent at step \
                 {step}; the checkpoint is saved\nhint: continue with the same mpirun line and \
                 --resume {}",
                run_dir.display()
            );
            dist.abort(2)
        }
        Outcome::Restart { run_dir, step } => {
            eprintln!(
                "[exec() restart at step {step}: compile budget; resuming {}]",
                run_dir.display()
            );
            let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
            let args = restart::resume_args(&argv, &run_dir);
            Err(restart::exec_self(&args).into())
        }
    }
}

/// Progress: a live bar on a terminal (from the first update on), periodic
/// plain lines otherwise; notes above the bar.
#[derive(Default)]
struct Progress {
    bar: Option<ProgressBar>,
    last_val: Option<f32>,
}

impl Progress {
    fn bar(total: u64) -> Option<ProgressBar> {
        std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
                )
                .expect("valid template"),
            );
            bar
        })
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
        if self.bar.is_none() {
            self.bar = Progress::bar(total);
        }
        match &self.bar {
            Some(bar) => {
                bar.set_position(m.step);
                bar.set_message(msg);
            }
            None => {
                let every = (total / 20).max(1);
                if m.step.is_multiple_of(every) || m.step == total || m.step == 1 {
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

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Hugging Face model directory, run directory, anemone checkpoint or
    /// llama2.c model.bin
    #[arg(long)]
    pub model: PathBuf,
    /// Token file, or JSONL examples (a .jsonl file, or a directory's
    /// valid.jsonl) tokenized with the model's tokenizer and chat template
    #[arg(long)]
    pub data: PathBuf,
    /// Evaluate at most this many tokens (from the start, in consecutive windows)
    #[arg(long, default_value_t = 65536,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_tokens: usize,
    /// Window length (default: the model's seq_len, at most 256)
    #[arg(long)]
    pub seq: Option<usize>,
    /// JSONL data: the loss of completions and assistant turns only
    #[arg(long)]
    pub mask_prompt: bool,
}

pub fn eval(args: EvalArgs) -> Result<()> {
    let result = job::evaluate_with(
        &args.model,
        &args.data,
        args.max_tokens,
        args.seq,
        args.mask_prompt,
    )?;
    if SftFiles::is_jsonl(&args.data) {
        println!(
            "loss {:.6} perplexity {:.3} ({} examples in windows of {})",
            result.loss,
            result.loss.exp(),
            result.windows,
            result.seq
        );
        return Ok(());
    }
    println!(
        "loss {:.6} perplexity {:.3} ({} tokens in {} windows of {})",
        result.loss,
        result.loss.exp(),
        result.windows * result.seq,
        result.windows,
        result.seq
    );
    Ok(())
}
