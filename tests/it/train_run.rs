//! Whole training runs on the CPU backend: exact resume, learning, bad input.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anemone::backend::Precision;
use anemone::backend::cpu::CpuBackend;
use anemone::data::corpus::{self, CorpusConfig};
use anemone::data::tokenizer::train::{TrainOptions, train_bpe};
use anemone::data::tokens::{Batcher, Order, TokenFile, TokenSpan, TokenWriter};
use anemone::model::kernels::KernelOptions;
use anemone::model::{ModelConfig, Weights, checkpoint};
use anemone::train::engine::Engine;
use anemone::train::optim::{AdamW, Schedule};
use anemone::train::source::WindowSource;
use anemone::train::{Quiet, TrainConfig, Trainer};

use crate::common::temp_dir;

/// Built-in stories tokenized with a 300-token BPE into `dir/tokens.bin`.
fn story_tokens(dir: &Path) -> PathBuf {
    let text = corpus::generate(&CorpusConfig {
        seed: 5,
        n_bytes: 60_000,
    });
    let tok = train_bpe([text.as_str()], &TrainOptions::new(300)).unwrap();
    let path = dir.join("tokens.bin");
    let mut w = TokenWriter::create(&path, tok.vocab_size()).unwrap();
    for story in text.split("\n\n") {
        w.extend(&tok.encode(story, true, false)).unwrap();
    }
    w.finish().unwrap();
    path
}

fn config(steps: u64) -> TrainConfig {
    TrainConfig {
        model: ModelConfig::llama(32, 2, 4, 2, 64, 300, 32),
        preset: None,
        steps,
        batch: 2,
        seq: 32,
        accum: 2,
        lr: 3e-3,
        warmup: 3,
        schedule: Schedule::Cosine,
        optimizer: AdamW::default(),
        grad_clip: 1.0,
        seed: 9,
        eval_every: 5,
        eval_batches: 2,
        checkpoint_every: 0,
        fp16: false,
        lora: None,
    }
}

fn sources(tokens: &Path, c: &TrainConfig) -> (WindowSource, WindowSource) {
    let file = Arc::new(TokenFile::open(tokens).unwrap());
    let (train, val) = TokenSpan::split_tail(file, 0.1).unwrap();
    (
        WindowSource::new(Batcher::new(train, c.seq, Order::Random, c.seed).unwrap()),
        WindowSource::new(Batcher::new(val, c.seq, Order::Sequential, 0).unwrap()),
    )
}

fn engine(c: &TrainConfig) -> Engine {
    Engine::new(
        Box::new(CpuBackend::new(Precision::Fp32)),
        &c.model,
        c.seq,
        c.batch,
        KernelOptions::cpu(),
    )
    .unwrap()
}

fn losses(run: &Path) -> Vec<(u64, f32)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["train_loss"].as_f64().unwrap() as f32,
            )
        })
        .collect()
}

#[test]
fn resume_continues_bit_for_bit() {
    let dir = temp_dir("resume");
    let tokens = story_tokens(&dir);
    let c = config(20);

    let full = dir.join("full");
    let (mut data, mut val) = sources(&tokens, &c);
    let mut t = Trainer::new(c.clone(), Weights::init(&c.model, 1), engine(&c), &full).unwrap();
    t.train(&mut data, Some(&mut val), &mut Quiet, None)
        .unwrap();

    let split = dir.join("split");
    let (mut data, mut val) = sources(&tokens, &c);
    let mut t = Trainer::new(c.clone(), Weights::init(&c.model, 1), engine(&c), &split).unwrap();
    t.train(&mut data, Some(&mut val), &mut Quiet, Some(10))
        .unwrap();
    drop(t);
    // A fresh process would rebuild everything from the run directory.
    let (mut data, mut val) = sources(&tokens, &c);
    let mut t = Trainer::resume(&split, engine(&c), &mut data, None).unwrap();
    assert_eq!(t.step(), 10);
    t.train(&mut data, Some(&mut val), &mut Quiet, None)
        .unwrap();

    assert_eq!(losses(&full), losses(&split));
    assert_eq!(losses(&full).len(), 20);
    let a = checkpoint::load(&full.join("checkpoint.bin")).unwrap();
    let b = checkpoint::load(&split.join("checkpoint.bin")).unwrap();
    assert!(
        a.weights
            .data
            .iter()
            .zip(&b.weights.data)
            .all(|(x, y)| x.to_bits() == y.to_bits())
    );
    assert_eq!(a.moments, b.moments);
}

#[test]
fn training_lowers_held_out_loss_below_the_unigram_entropy() {
    let dir = temp_dir("learn");
    let tokens = story_tokens(&dir);
    let c = TrainConfig {
        lr: 1e-2,
        warmup: 10,
        ..config(600)
    };
    let ids = TokenFile::open(&tokens)
        .unwrap()
        .window(0, TokenFile::open(&tokens).unwrap().len())
        .unwrap();
    // Unigram entropy of the token stream (nats): what a model without context can reach.
    let mut counts = vec![0f64; 300];
    ids.iter().for_each(|&i| counts[i as usize] += 1.0);
    let n = ids.len() as f64;
    let unigram: f64 = counts
        .iter()
        .filter(|&&k| k > 0.0)
        .map(|&k| -(k / n) * (k / n).ln())
        .sum();

    let (mut data, mut val) = sources(&tokens, &c);
    let mut t = Trainer::new(
        c.clone(),
        Weights::init(&c.model, 1),
        engine(&c),
        &dir.join("run"),
    )
    .unwrap();
    let before = t.evaluate(&mut val).unwrap() as f64;
    assert!(
        (before - 300f64.ln()).abs() < 0.2,
        "initial loss {before} should be about ln(300)"
    );
    t.train(&mut data, Some(&mut val), &mut Quiet, None)
        .unwrap();
    let after = t.evaluate(&mut val).unwrap() as f64;
    assert!(
        after < unigram - 0.2,
        "held-out loss {after} vs unigram entropy {unigram} (start {before})"
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = temp_dir("bad");
    let c = config(5);
    // Token ids beyond the vocabulary.
    let path = dir.join("big.bin");
    let mut w = TokenWriter::create(&path, 1000).unwrap();
    w.extend(&(0..500).collect::<Vec<u32>>()).unwrap();
    w.finish().unwrap();
    let msg = TokenFile::open(&path)
        .unwrap()
        .check_vocab(300)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("big.bin") && msg.contains("1000"), "{msg}");
    // An empty data file.
    let empty = dir.join("empty.bin");
    TokenWriter::create(&empty, 300).unwrap().finish().unwrap();
    let file = Arc::new(TokenFile::open(&empty).unwrap());
    let msg = Batcher::new(TokenSpan::whole(file), 32, Order::Random, 0)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("empty.bin") && msg.contains("fewer than one window"),
        "{msg}"
    );
    // A checkpoint from another config cannot resume this run.
    let tokens = story_tokens(&dir);
    let (mut data, mut val) = sources(&tokens, &c);
    let mut t = Trainer::new(
        c.clone(),
        Weights::init(&c.model, 1),
        engine(&c),
        &dir.join("run"),
    )
    .unwrap();
    t.train(&mut data, Some(&mut val), &mut Quiet, None)
        .unwrap();
    let other = ModelConfig::llama(48, 2, 4, 2, 64, 300, 32);
    checkpoint::save(
        &dir.join("run/checkpoint.bin"),
        &Weights::init(&other, 1),
        None,
        &serde_json::json!({}),
    )
    .unwrap();
    let err = Trainer::resume(&dir.join("run"), engine(&c), &mut data, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("checkpoint.bin") && err.contains("config"),
        "{err}"
    );
    // Token ids outside the model's vocabulary reach the engine as an error, not a panic.
    let mut e = engine(&c);
    let w = Weights::init(&c.model, 1);
    let mut bad = vec![0u32; 64];
    bad[7] = 300;
    let err = e.loss(&w, &bad, &vec![0u32; 64]).unwrap_err().to_string();
    assert!(err.contains("300") && err.contains("position 7"), "{err}");
}
