//! Whole jobs through the library's `train::job`, as `anemone train` runs
//! them: the main job on a small built-in corpus with its defaults and
//! samples, and the restart policy (a run stopped for a restart and resumed
//! to the end matches an uninterrupted one bit for bit).

use std::path::{Path, PathBuf};

use anemone::model::checkpoint;
use anemone::train::job::{self, JobOptions, Outcome, RunDefaults};
use anemone::train::{Metrics, Observer, TrainConfig};

use crate::common::temp_dir;

/// Keeps the job's notes.
#[derive(Default)]
struct Notes(Vec<String>);

impl Observer for Notes {
    fn on_step(&mut self, _: &Metrics, _: u64) {}
    fn on_message(&mut self, message: &str) {
        self.0.push(message.to_string());
    }
}

fn saved_config(run_dir: &Path) -> TrainConfig {
    serde_json::from_slice(&std::fs::read(run_dir.join("config.json")).unwrap()).unwrap()
}

#[test]
fn the_main_job_prepares_its_data_trains_with_its_defaults_and_prints_samples() {
    let run_dir = temp_dir("job-main").join("run");
    let options = JobOptions {
        corpus_mb: Some(0.1),
        steps: Some(2),
        batch: Some(1),
        seq: Some(32),
        eval_batches: Some(1),
        samples: Some(2),
        out: Some(run_dir.clone()),
        ..JobOptions::default()
    };
    let (mut notes, mut samples) = (Notes::default(), Vec::new());
    let outcome = job::run(&options, &mut notes, &mut samples).unwrap();
    assert_eq!(
        outcome,
        Outcome::Finished {
            run_dir: run_dir.clone(),
            step: 2
        }
    );
    for file in [
        "config.json",
        "metrics.jsonl",
        "checkpoint.bin",
        "tokenizer.bin",
        "corpus.txt",
        "tokens.bin",
        "tokens.val.bin",
    ] {
        assert!(run_dir.join(file).exists(), "{file}");
    }
    let config = saved_config(&run_dir);
    let defaults = RunDefaults::MAIN_JOB;
    assert_eq!(config.preset.as_deref(), Some(job::MAIN_JOB_PRESET));
    assert_eq!(config.model.vocab_size, job::MAIN_JOB_VOCAB);
    assert_eq!((config.steps, config.batch, config.seq), (2, 1, 32));
    assert_eq!(
        (config.lr, config.warmup, config.eval_every),
        (defaults.lr, defaults.warmup, defaults.eval_every)
    );
    assert_eq!(config.seed, job::DEFAULTS.seed);
    assert_eq!(notes.0[0], "backend: cpu");
    assert!(notes.0[1].starts_with("built-in corpus: 0.1 MB of stories, 1024-token tokenizer"));
    assert!(notes.0[2].starts_with(
        "training stories2m (1.97M parameters, dim 192, 4 layers) on cpu for 2 steps of 1 x 32 tokens"
    ));
    assert!(
        notes.0[3].starts_with("step 2: held-out loss "),
        "{:?}",
        notes.0
    );
    // An untrained model samples byte tokens too: not always UTF-8.
    let text = String::from_utf8_lossy(&samples);
    assert!(
        text.starts_with("\n--- sample 1 ---\nOnce upon a time"),
        "{text}"
    );
    assert!(
        text.contains("\n--- sample 2 ---\nOne day, a little"),
        "{text}"
    );
    assert!(!text.contains("--- sample 3 ---"), "{text}");
}

/// A one-layer model file and tokens for it, in `dir`.
fn small_run_inputs(dir: &Path) -> (PathBuf, PathBuf) {
    let config = dir.join("model.json");
    std::fs::write(
        &config,
        r#"{"dim": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "head_dim": 8,
            "hidden_dim": 64, "vocab_size": 64, "seq_len": 16}"#,
    )
    .unwrap();
    let tokens = dir.join("tokens.bin");
    let mut rng = anemone::rng::Rng::new(3);
    let ids: Vec<u32> = (0..4000).map(|_| rng.below(64) as u32).collect();
    let mut writer = anemone::data::tokens::TokenWriter::create(&tokens, 64).unwrap();
    writer.extend(&ids).unwrap();
    writer.finish().unwrap();
    (config, tokens)
}

#[test]
fn restarts_resume_to_the_same_run_and_defaults_fill_what_is_unset() {
    let dir = temp_dir("job-restart");
    let (model, tokens) = small_run_inputs(&dir);
    let options = |out: &str| JobOptions {
        config: Some(model.to_string_lossy().into_owned()),
        data: Some(tokens.clone()),
        steps: Some(5),
        batch: Some(2),
        eval_batches: Some(1),
        out: Some(dir.join(out)),
        ..JobOptions::default()
    };
    let quiet = |options: &JobOptions| {
        job::run(options, &mut Notes::default(), &mut std::io::sink()).unwrap()
    };
    let full = quiet(&options("full"));
    assert!(
        matches!(full, Outcome::Finished { step: 5, .. }),
        "{full:?}"
    );
    let config = saved_config(&dir.join("full"));
    let defaults = RunDefaults::OWN_DATA;
    assert_eq!(config.preset, None);
    assert_eq!(config.seq, 16, "the model's seq_len");
    assert_eq!((config.lr, config.warmup), (defaults.lr, defaults.warmup));

    // Every two updates the job stops for a restart; resuming continues it.
    let mut restarted = JobOptions {
        restart_every: Some(2),
        ..options("restarted")
    };
    let mut steps = Vec::new();
    loop {
        match quiet(&restarted) {
            Outcome::Restart { run_dir, step } => {
                steps.push(step);
                restarted.resume = Some(run_dir);
            }
            Outcome::Finished { step, .. } => {
                steps.push(step);
                break;
            }
        }
    }
    assert_eq!(steps, [2, 4, 5]);
    let weights = |run: &str| checkpoint::load(&dir.join(run).join("checkpoint.bin")).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&weights("full").weights.data),
        bits(&weights("restarted").weights.data)
    );

    // `stop_after` ends a process on purpose: finished, not a restart.
    let stopped = quiet(&JobOptions {
        restart_every: Some(2),
        stop_after: Some(1),
        ..options("stopped")
    });
    assert!(
        matches!(stopped, Outcome::Finished { step: 1, .. }),
        "{stopped:?}"
    );
    let zero = JobOptions {
        restart_every: Some(0),
        ..options("zero")
    };
    let err = job::run(&zero, &mut Notes::default(), &mut std::io::sink()).unwrap_err();
    assert_eq!(err.to_string(), "--restart-every must be at least 1");
}
