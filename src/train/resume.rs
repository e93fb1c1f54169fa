//! What `train --resume DIR` may be told besides the directory. The run's
//! record ([`RunRecord`]) holds everything it started with, so `--resume
//! DIR` alone continues it exactly. A flag given with it:
//!
//! - that would change the run's trajectory (model, weights, data, order,
//!   batch, sequence, optimizer, schedule, seed, precision) and differs from
//!   the record is an error naming the flag, its value and the recorded one;
//!   the same value is accepted;
//! - that extends or observes the run (`--steps`, `--eval-every`,
//!   `--eval-batches`, `--checkpoint-every`) is an override: applied to the
//!   record and reported in a note;
//! - that only concerns the process (`--backend`, `--stop-after`,
//!   `--restart-every`, `--samples`) is used as given; `--overwrite` does
//!   nothing (a note says so: an ANE restart repeats the first process's flags).
//!
//! The token files are matched by their checksum in `train::job`.

use std::fmt::Display;
use std::path::Path;

use super::options::JobOptions;
use super::run_dir::RunRecord;
use crate::backend::Precision;
use crate::model::ModelConfig;
use crate::model::lora::Target;
use crate::{Error, Result};

/// A flag given with `--resume` that the run's record contradicts.
fn conflict(dir: &Path, flag: &str, given: impl Display, recorded: impl Display) -> Error {
    Error::Invalid(format!(
        "{flag} {given} conflicts with the run in {}, which started with {flag} {recorded}\n\
         hint: --resume continues a run exactly as it started: drop {flag} (or start a new \
         run with another --out)",
        dir.display()
    ))
}

/// Compare the options given with `--resume` to `record`: an error for a
/// conflicting flag, the overrides applied to `record` with a note each.
pub(super) fn reconcile(
    record: &mut RunRecord,
    options: &JobOptions,
    dir: &Path,
) -> Result<Vec<String>> {
    let recorded = &record.config;
    if options.init.is_some() {
        return Err(Error::Invalid(format!(
            "--init conflicts with --resume: {} continues from its own checkpoint\nhint: drop \
             --init, or start a new run from those weights with another --out",
            dir.display()
        )));
    }
    if let Some(out) = &options.out
        && std::path::absolute(out).ok() != std::path::absolute(dir).ok()
    {
        return Err(conflict(dir, "--out", out.display(), dir.display()));
    }
    if let Some(mb) = options.corpus_mb {
        match record.corpus_mb {
            Some(recorded) if recorded == mb => {}
            Some(recorded) => return Err(conflict(dir, "--corpus-mb", mb, recorded)),
            None => {
                return Err(Error::Invalid(format!(
                    "--corpus-mb {mb} only applies to the main job; {} trains on a token file",
                    dir.display()
                )));
            }
        }
    }
    if let Some(name) = &options.config {
        check_model(name, recorded.preset.as_deref(), &recorded.model, dir)?;
    }
    let precision = if recorded.fp16 {
        Precision::Fp16
    } else {
        Precision::Fp32
    };
    // Flags that shape the run: the same value or an error.
    let same = [
        (
            "--batch",
            options.batch.map(|v| v.to_string()),
            recorded.batch.to_string(),
        ),
        (
            "--seq",
            options.seq.map(|v| v.to_string()),
            recorded.seq.to_string(),
        ),
        (
            "--accum",
            options.accum.map(|v| v.to_string()),
            recorded.accum.to_string(),
        ),
        (
            "--lr",
            options.lr.map(|v| v.to_string()),
            recorded.lr.to_string(),
        ),
        (
            "--warmup",
            options.warmup.map(|v| v.to_string()),
            recorded.warmup.to_string(),
        ),
        (
            "--schedule",
            options.schedule.map(|v| v.to_string()),
            recorded.schedule.to_string(),
        ),
        (
            "--weight-decay",
            options.weight_decay.map(|v| v.to_string()),
            recorded.optimizer.weight_decay.to_string(),
        ),
        (
            "--grad-clip",
            options.grad_clip.map(|v| v.to_string()),
            recorded.grad_clip.to_string(),
        ),
        (
            "--seed",
            options.seed.map(|v| v.to_string()),
            recorded.seed.to_string(),
        ),
        (
            "--data-order",
            options.data_order.map(|v| v.to_string()),
            record.data_order.to_string(),
        ),
        (
            "--precision",
            options.precision.map(|v| v.to_string()),
            precision.to_string(),
        ),
    ];
    for (flag, given, recorded) in same.into_iter().chain(lora_flags(record, options)) {
        if let Some(given) = given
            && given != recorded
        {
            return Err(conflict(dir, flag, given, recorded));
        }
    }
    if let Some(fraction) = options.val_fraction {
        match record.val_fraction {
            Some(recorded) if recorded == fraction => {}
            Some(recorded) => return Err(conflict(dir, "--val-fraction", fraction, recorded)),
            None if record.val_data.is_some() => {
                return Err(conflict(dir, "--val-fraction", fraction, "--val-data"));
            }
            None => {}
        }
    }
    Ok(overrides(record, options))
}

/// The LoRA and fine-tuning flags as `(flag, given, recorded)`: a run is
/// resumed as the LoRA run (or full training) it began as.
fn lora_flags(
    record: &RunRecord,
    options: &JobOptions,
) -> Vec<(&'static str, Option<String>, String)> {
    let lora = record.config.lora.as_ref();
    let recorded = |value: Option<String>| value.unwrap_or_else(|| "(none: not a LoRA run)".into());
    let targets = |targets: &[Target]| {
        let names: Vec<&str> = targets.iter().map(|t| t.name()).collect();
        names.join(",")
    };
    let last_layers = lora.map(|l| l.layers.len().to_string());
    let mask_prompt = record.sft.as_ref().is_some_and(|sft| sft.mask_prompt);
    vec![
        (
            "--lora",
            options.lora.then(|| "on".to_string()),
            recorded(lora.map(|_| "on".to_string())),
        ),
        (
            "--lora-rank",
            options.lora_rank.map(|v| v.to_string()),
            recorded(lora.map(|l| l.rank.to_string())),
        ),
        (
            "--lora-alpha",
            options.lora_alpha.map(|v| v.to_string()),
            recorded(lora.map(|l| l.alpha.to_string())),
        ),
        (
            "--lora-dropout",
            options.lora_dropout.map(|v| v.to_string()),
            recorded(lora.map(|l| l.dropout.to_string())),
        ),
        (
            "--lora-targets",
            options.lora_targets.as_deref().map(targets),
            recorded(lora.map(|l| targets(&l.targets))),
        ),
        (
            "--lora-layers",
            options.lora_layers.map(|v| v.to_string()),
            recorded(last_layers),
        ),
        (
            "--lora-unmerged",
            options.lora_unmerged.then(|| "on".to_string()),
            recorded(lora.map(|l| if l.unmerged { "on" } else { "off" }.to_string())),
        ),
        (
            "--mask-prompt",
            options.mask_prompt.then(|| "on".to_string()),
            if mask_prompt { "on" } else { "off" }.to_string(),
        ),
    ]
}

/// `--config NAME|FILE` given with `--resume`: the run's own preset, or a
/// file describing the run's model (its vocabulary and context may have been
/// taken from the data and `--seq`).
fn check_model(name: &str, preset: Option<&str>, model: &ModelConfig, dir: &Path) -> Result<()> {
    if preset == Some(name) {
        return Ok(());
    }
    let recorded = preset.unwrap_or("(a config file)");
    let given = ModelConfig::from_name_or_file(name)?;
    let comparable = ModelConfig {
        vocab_size: model.vocab_size,
        seq_len: model.seq_len,
        ..given
    };
    if preset.is_none() && &comparable == model {
        return Ok(());
    }
    Err(conflict(dir, "--config", name, recorded))
}

/// The options that may change a resumed run, applied to `record`.
fn overrides(record: &mut RunRecord, options: &JobOptions) -> Vec<String> {
    let recorded = &mut record.config;
    let mut notes = Vec::new();
    let mut note = |flag: &str, given: String, recorded: String, what: &str| {
        if given != recorded {
            notes.push(format!(
                "note: {flag} {given} overrides the run's {flag} {recorded}{what}"
            ));
        }
    };
    if let Some(steps) = options.steps {
        note(
            "--steps",
            steps.to_string(),
            recorded.steps.to_string(),
            " (the learning-rate schedule follows the new total)",
        );
        recorded.steps = steps;
    }
    if let Some(every) = options.eval_every {
        note(
            "--eval-every",
            every.to_string(),
            recorded.eval_every.to_string(),
            "",
        );
        recorded.eval_every = every;
    }
    if let Some(batches) = options.eval_batches {
        note(
            "--eval-batches",
            batches.to_string(),
            recorded.eval_batches.to_string(),
            "",
        );
        recorded.eval_batches = batches;
    }
    if let Some(every) = options.checkpoint_every {
        note(
            "--checkpoint-every",
            every.to_string(),
            recorded.checkpoint_every.to_string(),
            "",
        );
        recorded.checkpoint_every = every;
    }
    notes
}
