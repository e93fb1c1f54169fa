//! What a training job can be told ([`JobOptions`], `anemone train`'s
//! flags), the defaults of what is not said ([`DEFAULTS`], and
//! [`RunDefaults`] by kind of run), and the ranges of the options that no
//! [`TrainConfig`](super::TrainConfig) field carries.
//!
//! An option is `None` when it was not given: a new run takes the default, a
//! resumed run the value it recorded, and a given value that differs from the
//! recorded one is a conflict (`train::resume`).

use std::path::PathBuf;

use super::optim::Schedule;
use crate::backend::{BackendKind, Precision};
use crate::data::tokens::Order;
use crate::model::lora::Target;
use crate::{Error, Result};

/// Everything a training job can be told (`anemone train`'s flags).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobOptions {
    /// Model preset or JSON config file.
    pub config: Option<String>,
    /// Token file; `None` runs the main job (or, resuming, the recorded file).
    pub data: Option<PathBuf>,
    /// Held-out token file (default: the last `val_fraction` of `data`).
    pub val_data: Option<PathBuf>,
    /// Fraction of `data` held out when `val_data` is absent.
    pub val_fraction: Option<f64>,
    /// Initial weights: an anemone checkpoint or a llama2.c model.bin.
    pub init: Option<PathBuf>,
    /// Continue the run in this directory from its checkpoint, exactly.
    pub resume: Option<PathBuf>,
    /// `None`: the CPU (the device is no part of a run; resuming may change it).
    pub backend: Option<BackendKind>,
    pub precision: Option<Precision>,
    /// Optimizer updates.
    pub steps: Option<u64>,
    /// Sequences per micro-batch.
    pub batch: Option<usize>,
    /// Tokens per sequence (default: the model's seq_len, at most 256).
    pub seq: Option<usize>,
    /// Micro-batches per update.
    pub accum: Option<usize>,
    pub lr: Option<f32>,
    /// Warmup updates.
    pub warmup: Option<u64>,
    pub schedule: Option<Schedule>,
    pub weight_decay: Option<f32>,
    /// Global gradient-norm clip (0 disables).
    pub grad_clip: Option<f32>,
    pub seed: Option<u64>,
    pub data_order: Option<Order>,
    /// Run directory (default: `runs/<config>-<n>`, `runs/tiny-<n>` for the main job).
    pub out: Option<PathBuf>,
    /// Replace the run already in `out` (its files; nothing else there).
    pub overwrite: bool,
    /// Evaluate held-out loss every N updates.
    pub eval_every: Option<u64>,
    /// Held-out batches per evaluation.
    pub eval_batches: Option<usize>,
    /// Save a checkpoint every N updates (0: only at the end).
    pub checkpoint_every: Option<u64>,
    /// Stop after this many updates of this process (the run can be resumed).
    pub stop_after: Option<u64>,
    /// Checkpoint and restart every N updates (what the ANE compile budget
    /// forces on baked kernels; for tests).
    pub restart_every: Option<u64>,
    /// Samples printed at the end of the main job.
    pub samples: Option<usize>,
    /// Size of the main job's built-in corpus, in MB.
    pub corpus_mb: Option<f64>,
    /// Train LoRA adapters on the frozen `--init` model instead of every weight.
    pub lora: bool,
    pub lora_rank: Option<usize>,
    pub lora_alpha: Option<f32>,
    pub lora_dropout: Option<f32>,
    /// Projections with adapters (default: all seven).
    pub lora_targets: Option<Vec<Target>>,
    /// Adapters on the last N layers (default: all).
    pub lora_layers: Option<usize>,
    /// Adapters beside the base, not merged into it (less memory).
    pub lora_unmerged: bool,
    /// JSONL data: only completions and assistant turns count in the loss.
    pub mask_prompt: bool,
}

/// The values of the options that are not given, whatever the kind of run
/// (the flags' defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Defaults {
    pub val_fraction: f64,
    pub backend: BackendKind,
    pub precision: Precision,
    pub accum: usize,
    pub schedule: Schedule,
    pub weight_decay: f32,
    pub grad_clip: f32,
    pub seed: u64,
    pub data_order: Order,
    pub eval_batches: usize,
    pub checkpoint_every: u64,
    pub samples: usize,
    pub corpus_mb: f64,
}

/// What an option not given takes.
pub const DEFAULTS: Defaults = Defaults {
    val_fraction: 0.05,
    backend: BackendKind::Cpu,
    precision: Precision::Fp32,
    accum: 1,
    schedule: Schedule::Cosine,
    weight_decay: 0.1,
    grad_clip: 1.0,
    seed: 1337,
    data_order: Order::Random,
    eval_batches: 8,
    checkpoint_every: 100,
    samples: 3,
    corpus_mb: 4.0,
};

/// What a run uses for the options left unset, by kind of run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RunDefaults {
    /// The model preset when `--config` is not given.
    pub config: &'static str,
    pub steps: u64,
    pub batch: usize,
    pub lr: f32,
    pub warmup: u64,
    pub eval_every: u64,
}

impl RunDefaults {
    /// The defaults of the main job or of a run on the user's data.
    pub fn of(main_job: bool) -> RunDefaults {
        if main_job {
            RunDefaults::MAIN_JOB
        } else {
            RunDefaults::OWN_DATA
        }
    }

    /// The defaults of the run `options` describe: LoRA, the main job, or
    /// a run on the user's data.
    pub fn for_options(options: &JobOptions) -> RunDefaults {
        if options.lora {
            RunDefaults::LORA
        } else {
            RunDefaults::of(options.data.is_none())
        }
    }
}

impl RunDefaults {
    /// The main job: about two minutes of the `stories2m` model on the
    /// built-in corpus on a 2-core machine (README, "The main job").
    pub const MAIN_JOB: RunDefaults = RunDefaults {
        config: "stories2m",
        steps: 1200,
        batch: 4,
        lr: 3e-3,
        warmup: 50,
        eval_every: 200,
    };
    /// A run on the user's token file.
    pub const OWN_DATA: RunDefaults = RunDefaults {
        config: "tiny",
        steps: 1000,
        batch: 4,
        lr: 5e-4,
        warmup: 100,
        eval_every: 200,
    };
}

impl RunDefaults {
    /// A LoRA run (`--lora`): a learning rate for adapters (PEFT recipes'
    /// 1e-4 to 2e-4), a short warmup, fewer steps than training from scratch.
    pub const LORA: RunDefaults = RunDefaults {
        config: "tiny",
        steps: 500,
        batch: 4,
        lr: 2e-4,
        warmup: 20,
        eval_every: 100,
    };
}

/// The largest built-in corpus the main job generates, in MB.
pub const MAX_CORPUS_MB: f64 = 1000.0;
/// The most samples the main job prints.
pub const MAX_SAMPLES: usize = 100;

impl JobOptions {
    /// Check the options no [`TrainConfig`](super::TrainConfig) field holds
    /// (those are checked by `TrainConfig::validate` once resolved).
    pub fn validate(&self) -> Result<()> {
        if let Some(f) = self.val_fraction
            && !(0.0..1.0).contains(&f)
        {
            return Err(Error::out_of_range(
                "--val-fraction",
                f,
                "a number in [0, 1)",
            ));
        }
        if let Some(mb) = self.corpus_mb
            && !(mb > 0.0 && mb <= MAX_CORPUS_MB)
        {
            return Err(Error::out_of_range(
                "--corpus-mb",
                mb,
                &format!("a number in (0, {MAX_CORPUS_MB}]"),
            ));
        }
        if let Some(n) = self.samples
            && n > MAX_SAMPLES
        {
            return Err(Error::out_of_range(
                "--samples",
                n,
                &format!("an integer in 0..={MAX_SAMPLES}"),
            ));
        }
        for (flag, value) in [
            ("--stop-after", self.stop_after),
            ("--restart-every", self.restart_every),
        ] {
            if value == Some(0) {
                return Err(Error::Invalid(format!("{flag} must be at least 1")));
            }
        }
        self.validate_lora()?;
        if let Some(warmup) = self.warmup {
            // A default warmup longer than a short run is the documented
            // default; a warmup asked for and never finished is a mistake.
            let kind = RunDefaults::for_options(self);
            let steps = self.steps.unwrap_or(kind.steps);
            if self.resume.is_none() && warmup > steps {
                return Err(Error::out_of_range(
                    "--warmup",
                    warmup,
                    &format!("an integer in 0..={steps} (--steps)"),
                ));
            }
        }
        Ok(())
    }
}

impl JobOptions {
    /// The LoRA and fine-tuning flags: each `--lora-*` needs `--lora`, a new
    /// LoRA run needs the base (`--init`), `--mask-prompt` needs JSONL data.
    fn validate_lora(&self) -> Result<()> {
        let lora_flags = [
            ("--lora-rank", self.lora_rank.is_some()),
            ("--lora-alpha", self.lora_alpha.is_some()),
            ("--lora-dropout", self.lora_dropout.is_some()),
            ("--lora-targets", self.lora_targets.is_some()),
            ("--lora-layers", self.lora_layers.is_some()),
            ("--lora-unmerged", self.lora_unmerged),
        ];
        if let Some((flag, _)) = lora_flags.iter().find(|(_, given)| *given)
            && !self.lora
            && self.resume.is_none()
        {
            return Err(Error::Invalid(format!(
                "{flag} sets up LoRA adapters: add --lora (or drop {flag} to train every weight)"
            )));
        }
        if self.lora && self.init.is_none() && self.resume.is_none() {
            return Err(Error::Invalid(
                "--lora trains adapters on a frozen base model: name it with --init (a Hugging \
                 Face model directory, a run directory or a model file)"
                    .into(),
            ));
        }
        let jsonl = self
            .data
            .as_deref()
            .is_some_and(crate::data::sft::SftFiles::is_jsonl);
        if self.mask_prompt && !jsonl && self.resume.is_none() {
            return Err(Error::Invalid(
                "--mask-prompt leaves prompts out of the loss of JSONL examples: give --data a \
                 .jsonl file or a directory with train.jsonl (a token file has no prompts)"
                    .into(),
            ));
        }
        if jsonl && self.init.is_none() && self.resume.is_none() {
            return Err(Error::Invalid(
                "JSONL data is tokenized with the base model's tokenizer: name a Hugging Face \
                 model directory (or a run made from one) with --init"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_outside_their_range_name_the_flag_and_the_range() {
        let cases = [
            (
                JobOptions {
                    corpus_mb: Some(f64::INFINITY),
                    ..JobOptions::default()
                },
                "--corpus-mb inf is out of range: expected a number in (0, 1000]",
            ),
            (
                JobOptions {
                    val_fraction: Some(1.0),
                    ..JobOptions::default()
                },
                "--val-fraction 1.0 is out of range: expected a number in [0, 1)",
            ),
        ];
        for (options, message) in cases {
            assert_eq!(options.validate().unwrap_err().to_string(), message);
        }
        JobOptions::default().validate().unwrap();
    }
}
