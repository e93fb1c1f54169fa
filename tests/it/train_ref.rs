//! The training engine against PyTorch: logits, loss, every parameter gradient
//! and the losses of 10 AdamW steps, for a small GQA model.
//!
//! Reference: `scripts/ref_train_step.py` (float64 PyTorch llama2.c model),
//! fixtures in `tests/fixtures/train/`.

use anemone::backend::Precision;
use anemone::backend::cpu::CpuBackend;
use anemone::mil::DType;
use anemone::model::kernels::{KernelOptions, WeightMode};
use anemone::model::{ModelConfig, Weights};
use anemone::train::engine::{Engine, GradWrite};
use anemone::train::optim::{AdamState, AdamW, global_norm};

use crate::common::{Tolerance, fixture, read_npy_f32, read_npy_f64, read_npy_i32, temp_dir};

struct Reference {
    config: ModelConfig,
    batch: usize,
    seq: usize,
    weights: Vec<f32>,
    inputs: Vec<u32>,
    targets: Vec<u32>,
    logits: Vec<f32>,
    loss: f64,
    grads: Vec<f32>,
    losses: Vec<f64>,
    meta: serde_json::Value,
}

fn reference() -> Reference {
    let dir = fixture("train");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    let c = &meta["config"];
    let u = |k: &str| c[k].as_u64().unwrap() as usize;
    let config = ModelConfig::llama(
        u("dim"),
        u("n_layers"),
        u("n_heads"),
        u("n_kv_heads"),
        u("hidden_dim"),
        u("vocab_size"),
        u("seq_len"),
    );
    let ids = |name: &str| {
        read_npy_i32(&dir.join(name))
            .into_iter()
            .map(|x| x as u32)
            .collect()
    };
    Reference {
        batch: meta["batch"].as_u64().unwrap() as usize,
        seq: meta["seq"].as_u64().unwrap() as usize,
        weights: read_npy_f32(&dir.join("weights.npy")),
        inputs: ids("inputs.npy"),
        targets: ids("targets.npy"),
        logits: read_npy_f32(&dir.join("logits.npy")),
        loss: read_npy_f64(&dir.join("loss.npy"))[0],
        grads: read_npy_f32(&dir.join("grads.npy")),
        losses: read_npy_f64(&dir.join("losses.npy")),
        config,
        meta,
    }
}

fn engine(r: &Reference, precision: Precision, dtype: DType, mode: WeightMode) -> Engine {
    let opts = KernelOptions {
        dtype,
        mode,
        ..KernelOptions::cpu()
    };
    Engine::new(
        Box::new(CpuBackend::new(precision)),
        &r.config,
        r.seq,
        r.batch,
        opts,
    )
    .unwrap()
}

fn check_against_pytorch(
    classifier_group: Option<usize>,
    precision: Precision,
    dtype: DType,
    mode: WeightMode,
    tol: Tolerance,
    grad_tol: Tolerance,
    loss_rel: f64,
) {
    let r = reference();
    let mut weights = Weights::zeros(&r.config);
    assert_eq!(weights.data.len(), r.weights.len(), "fixture layout");
    weights.data.copy_from_slice(&r.weights);
    let mut e = engine(&r, precision, dtype, mode);
    if let Some(n) = classifier_group {
        e.set_classifier_group(n);
    }

    let logits = e.logits(&weights, &r.inputs).unwrap();
    let vocab = r.config.vocab_size;
    #[allow(clippy::needless_range_loop)]
    for b in 0..r.batch {
        let want = &r.logits[b * r.seq * vocab..(b + 1) * r.seq * vocab];
        tol.assert_close(&logits[b], want, &format!("logits of sequence {b}"));
    }

    let mut grads = Weights::zeros(&r.config);
    let loss = e
        .forward_backward(&weights, &mut grads, &r.inputs, &r.targets, 1.0)
        .unwrap();
    assert!(
        (loss - r.loss).abs() <= loss_rel * r.loss,
        "loss {loss} vs {}",
        r.loss
    );
    for p in weights.layout.params() {
        let range = weights.layout.range(p);
        grad_tol.assert_close(
            &grads.data[range.clone()],
            &r.grads[range],
            &format!("gradient of {}", p.name()),
        );
    }

    let opt = AdamW {
        beta1: r.meta["beta1"].as_f64().unwrap() as f32,
        beta2: r.meta["beta2"].as_f64().unwrap() as f32,
        eps: r.meta["eps"].as_f64().unwrap() as f32,
        weight_decay: r.meta["weight_decay"].as_f64().unwrap() as f32,
    };
    let lr = r.meta["lr"].as_f64().unwrap() as f32;
    let mut state = AdamState::new(weights.data.len());
    for (step, want) in r.losses.iter().enumerate() {
        grads.data.fill(0.0);
        let loss = e
            .forward_backward(&weights, &mut grads, &r.inputs, &r.targets, 1.0)
            .unwrap();
        assert!(
            (loss - want).abs() <= loss_rel * want,
            "step {step}: loss {loss} vs PyTorch {want}"
        );
        opt.step(&mut weights, &grads.data, &mut state, lr, 1.0);
    }
}

/// [`check_against_pytorch`] in fp32: logits within 1e-4 of the tensor's
/// largest magnitude plus 1e-5, gradients within 1e-4 plus 1e-6 (f32
/// accumulation against a float64 reference), losses within 1e-4 relative.
fn check_fp32(classifier_group: Option<usize>, mode: WeightMode) {
    let tol = Tolerance {
        relative: 1e-4,
        absolute: 1e-5,
    };
    let grad_tol = Tolerance {
        relative: 1e-4,
        absolute: 1e-6,
    };
    check_against_pytorch(
        classifier_group,
        Precision::Fp32,
        DType::Fp32,
        mode,
        tol,
        grad_tol,
        1e-4,
    );
}

#[test]
fn fp32_engine_matches_pytorch_logits_loss_gradients_and_adamw_steps() {
    // One worker thread runs the weight gradients after each backward kernel,
    // two run them beside it (`train::schedule`): both must match.
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| check_fp32(None, WeightMode::Inputs));
    }
}

/// One sequence per classifier group: two groups, each gathered, through the
/// classifier with `E^T` transposed once, and scattered back per sequence.
#[test]
fn one_sequence_per_classifier_group_matches_pytorch() {
    let r = reference();
    assert_eq!(r.batch, 2, "the fixture has two sequences");
    check_fp32(Some(1), WeightMode::Inputs);
}

/// Five sequences of a random batch in groups of 1, 2 and 5 (five groups of
/// one, three groups with a last one of one, one group) give the gradients of
/// one group, the form the PyTorch tests check.
#[test]
fn every_classifier_grouping_gives_the_same_gradients() {
    let r = reference();
    let batch = 5;
    let mut rng = anemone::rng::Rng::new(11);
    let vocab = r.config.vocab_size as u64;
    let tokens: Vec<u32> = (0..2 * batch * r.seq)
        .map(|_| rng.below(vocab) as u32)
        .collect();
    let (inputs, targets) = tokens.split_at(batch * r.seq);
    let mut weights = Weights::zeros(&r.config);
    weights.data.copy_from_slice(&r.weights);
    let run = |group: usize| {
        let mut e = Engine::new(
            Box::new(CpuBackend::new(Precision::Fp32)),
            &r.config,
            r.seq,
            batch,
            KernelOptions::cpu(),
        )
        .unwrap();
        e.set_classifier_group(group);
        let mut grads = Weights::zeros(&r.config);
        let loss = e
            .forward_backward(&weights, &mut grads, inputs, targets, 1.0)
            .unwrap();
        (loss, grads)
    };
    let (loss, want) = run(batch);
    let tol = Tolerance {
        relative: 1e-5,
        absolute: 1e-7,
    };
    for group in [1, 2] {
        let (l, grads) = run(group);
        assert!(
            (l - loss).abs() <= 1e-6 * loss,
            "group {group}: loss {l} vs {loss}"
        );
        for p in want.layout.params() {
            let range = want.layout.range(p);
            tol.assert_close(
                &grads.data[range.clone()],
                &want.data[range],
                &format!("group {group}: gradient of {}", p.name()),
            );
        }
    }
}

#[test]
fn packed_weight_kernels_give_the_same_training_step() {
    check_fp32(None, WeightMode::Packed);
}

#[test]
fn fp16_simulation_stays_within_fp16_tolerances() {
    // fp16 kernels (every op rounded to half): ~3 significant digits per op,
    // compounded over two layers; losses within 1 %.
    let tol = Tolerance {
        relative: 2e-2,
        absolute: 2e-2,
    };
    let grad_tol = Tolerance {
        relative: 5e-2,
        absolute: 1e-4,
    };
    check_against_pytorch(
        None,
        Precision::Fp16,
        DType::Fp16,
        WeightMode::Packed,
        tol,
        grad_tol,
        1e-2,
    );
}

#[test]
fn llama2c_export_round_trip_keeps_logits_and_the_pytorch_loss() {
    // Export the reference weights as a llama2.c v0 file, import it, and check
    // the engine's loss on the reference tokens equals PyTorch's.
    let r = reference();
    let mut weights = Weights::zeros(&r.config);
    weights.data.copy_from_slice(&r.weights);
    let path = temp_dir("train-ref-export").join("model.bin");
    anemone::model::llama2c::write_v0(&weights, &path).unwrap();
    let imported = anemone::model::llama2c::read(&path).unwrap();
    assert!(
        imported
            .data
            .iter()
            .zip(&weights.data)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    let mut e = engine(&r, Precision::Fp32, DType::Fp32, WeightMode::Inputs);
    let loss = e.loss(&imported, &r.inputs, &r.targets).unwrap();
    assert!(
        (loss - r.loss).abs() <= 1e-4 * r.loss,
        "imported loss {loss} vs PyTorch {}",
        r.loss
    );
    assert_eq!(
        e.logits(&imported, &r.inputs).unwrap(),
        e.logits(&weights, &r.inputs).unwrap()
    );
}

/// Writing over the gradients (the first micro-batch of a step) gives, from
/// gradients full of NaN, what adding to zeroed ones gives: for the fixture's
/// tied model and an untied one, in one classifier group and in one per
/// sequence, with the weight gradients after the kernels (one thread) and
/// beside them (two). The values compare equal (`-0.0 == 0.0`: adding a
/// product to zero may turn a negative zero positive).
#[test]
fn overwriting_the_gradients_equals_adding_to_zeros() {
    let r = reference();
    for tied in [true, false] {
        let mut config = r.config.clone();
        config.tied_embeddings = tied;
        let weights = Weights::init(&config, 3);
        for group in [r.batch, 1] {
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| {
                    let mut e = Engine::new(
                        Box::new(CpuBackend::new(Precision::Fp32)),
                        &config,
                        r.seq,
                        r.batch,
                        KernelOptions::cpu(),
                    )
                    .unwrap();
                    e.set_classifier_group(group);
                    let mut added = Weights::zeros(&config);
                    let l1 = e
                        .forward_backward(&weights, &mut added, &r.inputs, &r.targets, 1.0)
                        .unwrap();
                    let mut written = Weights::zeros(&config);
                    written.data.fill(f32::NAN);
                    let l2 = e
                        .forward_backward_as(
                            &weights,
                            &mut written,
                            GradWrite::Overwrite,
                            &r.inputs,
                            &r.targets,
                            1.0,
                        )
                        .unwrap();
                    assert_eq!(l1, l2);
                    for p in added.layout.params() {
                        let range = added.layout.range(p);
                        let (a, w) = (&added.data[range.clone()], &written.data[range]);
                        let same = a.iter().zip(w).all(|(a, w)| a == w);
                        assert!(
                            same,
                            "tied {tied}, group {group}, {threads} threads: gradient of {}",
                            p.name()
                        );
                    }
                    assert_eq!(added.data.len(), written.data.len());
                    assert!(
                        written.data.iter().all(|v| !v.is_nan()),
                        "no value left unwritten"
                    );
                    // The engine's norm, taken parameter by parameter as the
                    // pass finished each, is the whole gradient's; after a
                    // second pass that adds, the sum's.
                    let close = |got: f64, want: f64| {
                        assert!(
                            (got - want).abs() <= 1e-12 * want,
                            "tied {tied}, group {group}, {threads} threads: norm {got} vs {want}"
                        )
                    };
                    close(e.grad_norm(), global_norm(&written.data));
                    e.forward_backward(&weights, &mut written, &r.inputs, &r.targets, 0.5)
                        .unwrap();
                    close(e.grad_norm(), global_norm(&written.data));
                });
            }
        }
    }
}
