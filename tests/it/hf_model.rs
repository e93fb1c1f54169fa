//! Hugging Face models through anemone against `transformers`: for every
//! architecture fixture (Llama with a 5.x and a 4.x config, tied and untied,
//! linear and llama3 RoPE scaling, bf16 weights; Qwen2's q/k/v biases; Qwen3's
//! QK-norm with a free head_dim; Mistral), the logits, the loss, every
//! parameter's gradient and the losses of five AdamW steps of the training
//! engine, greedy decoding, evaluation windows, the weights' round trip
//! through safetensors, the fake ANE runtime on the features, and the ANE
//! rules on every kernel of every real preset.
//!
//! Reference: `scripts/gen_hf_fixtures.py` (float64 PyTorch from exactly the
//! stored weights), `tests/fixtures/hf/<model>/reference.safetensors`, read
//! with anemone's own `SafetensorsReader`.

use std::path::PathBuf;

use anemone::backend::Precision;
use anemone::backend::cpu::CpuBackend;
use anemone::model::hf::{HfCheckpoint, SafetensorsReader, hf_tensors};
use anemone::model::kernels::{KernelOptions, WeightMode};
use anemone::model::{ModelConfig, Weights};
use anemone::train::engine::Engine;
use anemone::train::optim::{AdamState, AdamW};

use crate::common::{Tolerance, fixture};

/// The architecture fixtures with references.
const MODELS: [&str; 6] = [
    "llama",
    "llama-v4",
    "llama3-bf16",
    "qwen2",
    "qwen3",
    "mistral",
];

/// The gradients' absolute floor, as a fraction of each tensor's largest magnitude.
const GRAD_FLOOR: f64 = 4e-6;

fn model_dir(name: &str) -> PathBuf {
    fixture("hf").join(name)
}

/// One fixture: the checkpoint, its weights in anemone's layout, the reference.
struct Case {
    name: &'static str,
    checkpoint: HfCheckpoint,
    weights: Weights,
    reference: SafetensorsReader,
}

impl Case {
    fn open(name: &'static str) -> Case {
        let dir = model_dir(name);
        let checkpoint = HfCheckpoint::open(&dir).unwrap();
        let weights = Weights::from_hf(&checkpoint).unwrap();
        let reference = SafetensorsReader::open_file(&dir.join("reference.safetensors")).unwrap();
        Case {
            name,
            checkpoint,
            weights,
            reference,
        }
    }

    fn config(&self) -> &ModelConfig {
        self.weights.config()
    }

    fn ids(&self, tensor: &str) -> Vec<u32> {
        let ids = self.reference.read_i64(tensor).unwrap();
        ids.into_iter().map(|id| id as u32).collect()
    }

    fn f32s(&self, tensor: &str) -> Vec<f32> {
        let shape = self.reference.shape(tensor).unwrap().to_vec();
        self.reference.read_f32(tensor, &shape).unwrap()
    }

    fn f64s(&self, tensor: &str) -> Vec<f64> {
        self.reference.read_f64(tensor).unwrap()
    }

    /// `(batch, seq)` of the reference batch.
    fn batch_seq(&self) -> (usize, usize) {
        let shape = self.reference.shape("input_ids").unwrap();
        (shape[0], shape[1])
    }

    fn engine(&self, precision: Precision, opts: KernelOptions) -> Engine {
        let (batch, seq) = self.batch_seq();
        let backend = Box::new(CpuBackend::new(precision));
        Engine::new(backend, self.config(), seq, batch, opts).unwrap()
    }

    fn meta(&self, key: &str) -> f64 {
        self.reference.metadata(key).unwrap().parse().unwrap()
    }
}

/// `|got - want| <= max(relative |want|, floor * max|want|)` for every
/// element: relative error, with an absolute floor scaled to the tensor.
/// Returns the largest error as a fraction of the tensor's largest
/// magnitude, and the largest relative error of the elements above the floor.
fn assert_elementwise(
    got: &[f32],
    want: &[f32],
    relative: f64,
    floor: f64,
    what: &str,
) -> (f64, f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f64, |m, &w| m.max((w as f64).abs()));
    let (mut worst, mut worst_relative): (f64, f64) = (0.0, 0.0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (err, w) = ((g as f64 - w as f64).abs(), w as f64);
        let bound = (relative * w.abs()).max(floor * scale);
        assert!(
            err <= bound,
            "{what}[{i}]: {g} vs {w} (error {err:.3e} > {bound:.3e}, scale {scale:.3e})"
        );
        worst = worst.max(err / scale);
        if relative * w.abs() > floor * scale {
            worst_relative = worst_relative.max(err / w.abs());
        }
    }
    (worst, worst_relative)
}

/// The largest `|got - want|` as a fraction of `want`'s largest magnitude.
fn scaled_error(got: &[f32], want: &[f32]) -> f64 {
    let scale = want.iter().fold(0.0f64, |m, &w| m.max((w as f64).abs()));
    let err = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w as f64).abs())
        .fold(0.0, f64::max);
    err / scale
}

/// Logits and loss within 1e-5 relative (logits: of the tensor's largest
/// magnitude), every gradient element within `max(1e-4 |ref|, 4e-6 max|ref|)`
/// (the floor: f32 sums over the batch and the model of terms as large as the
/// tensor's largest carry absolute errors of ~1e-6 of it, measured up to
/// 1.4e-6, so elements far below the largest are judged against that), and
/// the five AdamW losses within 1e-4 relative, for one weight mode on the CPU
/// in fp32. Returns the largest relative errors of the logits, the loss, the
/// gradients (of each tensor's largest magnitude, and relative where the
/// relative bound applies) and the AdamW losses.
fn check_training(case: &Case, mode: WeightMode) -> (f64, f64, (f64, f64), f64) {
    let opts = KernelOptions {
        mode,
        ..KernelOptions::cpu()
    };
    let mut engine = case.engine(Precision::Fp32, opts);
    let (inputs, targets) = (case.ids("input_ids"), case.ids("targets"));
    let logits: Vec<f32> = engine.logits(&case.weights, &inputs).unwrap().concat();
    let want_logits = case.f32s("logits");
    let tol = Tolerance {
        relative: 1e-5,
        absolute: 0.0,
    };
    let what = format!("{} {mode:?}", case.name);
    tol.assert_close(&logits, &want_logits, &format!("{what}: logits"));
    let scale = want_logits
        .iter()
        .fold(0.0f64, |m, &w| m.max((w as f64).abs()));
    let logits_err = logits
        .iter()
        .zip(&want_logits)
        .map(|(&g, &w)| (g as f64 - w as f64).abs() / scale)
        .fold(0.0, f64::max);

    let mut grads = Weights::zeros(case.config());
    let loss = engine
        .forward_backward(&case.weights, &mut grads, &inputs, &targets, 1.0)
        .unwrap();
    let want_loss = case.f64s("loss")[0];
    let loss_err = (loss - want_loss).abs() / want_loss;
    assert!(loss_err <= 1e-5, "{what}: loss {loss} vs {want_loss}");
    let (mut grad_err, mut grad_relative): (f64, f64) = (0.0, 0.0);
    for tensor in hf_tensors(&grads) {
        let want = case.f32s(&format!("grad.{}", tensor.name));
        let (err, relative) = assert_elementwise(
            &tensor.data,
            &want,
            1e-4,
            GRAD_FLOOR,
            &format!("{what}: gradient of {}", tensor.name),
        );
        grad_err = grad_err.max(err);
        grad_relative = grad_relative.max(relative);
    }
    assert_eq!(
        hf_tensors(&grads).len(),
        case.reference
            .names()
            .filter(|n| n.starts_with("grad."))
            .count(),
        "{what}: every parameter has a reference gradient"
    );

    let opt = AdamW {
        beta1: case.meta("beta1") as f32,
        beta2: case.meta("beta2") as f32,
        eps: case.meta("eps") as f32,
        weight_decay: case.meta("weight_decay") as f32,
    };
    let lr = case.meta("lr") as f32;
    let mut weights = case.weights.clone();
    let mut state = AdamState::new(weights.data.len());
    let mut adam_err: f64 = 0.0;
    for (step, want) in case.f64s("losses").into_iter().enumerate() {
        grads.data.fill(0.0);
        let loss = engine
            .forward_backward(&weights, &mut grads, &inputs, &targets, 1.0)
            .unwrap();
        let err = (loss - want).abs() / want;
        assert!(
            err <= 1e-4,
            "{what}: AdamW step {step}: loss {loss} vs {want}"
        );
        adam_err = adam_err.max(err);
        opt.step(&mut weights, &grads.data, &mut state, lr, 1.0);
    }
    (logits_err, loss_err, (grad_err, grad_relative), adam_err)
}

#[test]
fn training_matches_transformers_on_every_architecture() {
    for name in MODELS {
        let case = Case::open(name);
        for mode in [WeightMode::Inputs, WeightMode::Packed] {
            let (logits, loss, (grads, grads_relative), adam) = check_training(&case, mode);
            eprintln!(
                "{name} {mode:?}: largest errors: logits {logits:.2e} (of the largest), \
                 loss {loss:.2e}, gradients {grads:.2e} of each tensor's largest \
                 ({grads_relative:.2e} relative above the floor), AdamW losses {adam:.2e}"
            );
        }
    }
}

/// Weights in, HF tensors out: every tensor equals the checkpoint's bit for
/// bit (bf16 widened), through `Weights::from_hf` and `hf_tensors`, and
/// through a safetensors file written in the checkpoint's dtype and an
/// anemone checkpoint; the sharded fixture reads as its single-file twin.
#[test]
fn weights_round_trip_bit_for_bit_on_every_fixture() {
    for name in MODELS {
        let case = Case::open(name);
        let tensors = hf_tensors(&case.weights);
        for tensor in &tensors {
            let stored = case
                .checkpoint
                .tensors
                .read_f32(&tensor.name, &tensor.shape)
                .unwrap();
            let same = stored
                .iter()
                .zip(tensor.data.iter())
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{name}: {}", tensor.name);
        }
        let dtype = case
            .checkpoint
            .tensors
            .float_dtype("model.embed_tokens.weight")
            .unwrap();
        let dir = crate::common::temp_dir(&format!("hf-model-round-trip-{name}"));
        std::fs::copy(model_dir(name).join("config.json"), dir.join("config.json")).unwrap();
        anemone::model::hf::write_hf_safetensors(
            &case.weights,
            &dir.join("model.safetensors"),
            dtype,
        )
        .unwrap();
        let again = Weights::from_hf(&HfCheckpoint::open(&dir).unwrap()).unwrap();
        assert_eq!(again.config(), case.config(), "{name}");
        let same = again
            .data
            .iter()
            .zip(&case.weights.data)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{name}: weights after writing and reading");
        // anemone's own checkpoint keeps the features in its config.
        let path = dir.join("checkpoint.bin");
        anemone::model::checkpoint::save(&path, &case.weights, None, &serde_json::json!({}))
            .unwrap();
        assert_eq!(
            anemone::model::load_weights(&path).unwrap(),
            case.weights,
            "{name}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    // The sharded copy of `llama` gives the same weights.
    let sharded = HfCheckpoint::open(&model_dir("llama-sharded")).unwrap();
    let weights = Weights::from_hf(&sharded).unwrap();
    assert_eq!(weights, Case::open("llama").weights);
}

/// A model with a feature llama2.c cannot describe is not exported to its format.
#[test]
fn llama2c_export_refuses_the_features() {
    for name in ["qwen2", "qwen3", "llama3-bf16"] {
        let case = Case::open(name);
        let path = crate::common::temp_dir(&format!("hf-model-llama2c-{name}")).join("model.bin");
        let err = anemone::model::llama2c::write_v0(&case.weights, &path)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("biases, QK-norm or RoPE scaling"),
            "{name}: {err}"
        );
        assert!(!path.exists());
    }
}

#[test]
fn configs_map_every_feature() {
    use anemone::model::RopeScaling;
    let features = |name: &'static str| {
        let c = Case::open(name).config().clone();
        (c.qkv_bias, c.qk_norm, c.tied_embeddings, c.rope_scaling)
    };
    assert_eq!(features("llama"), (false, false, true, RopeScaling::None));
    assert_eq!(
        features("llama-v4"),
        (false, false, false, RopeScaling::Linear { factor: 2.0 })
    );
    assert!(matches!(
        features("llama3-bf16"),
        (false, false, true, RopeScaling::Llama3 { .. })
    ));
    assert_eq!(features("qwen2"), (true, false, true, RopeScaling::None));
    assert_eq!(features("qwen3"), (false, true, true, RopeScaling::None));
    assert_eq!(
        features("mistral"),
        (false, false, false, RopeScaling::None)
    );
    let qwen3 = Case::open("qwen3");
    assert_eq!(qwen3.config().head_dim, 16);
    assert_ne!(qwen3.config().q_dim(), qwen3.config().dim);
    assert_eq!(qwen3.config().seq_len, 64);
}

/// The classifier in blocks of vocabulary rows (how 128K-152K vocabularies
/// run without a `(V, T)` logits array) against the whole vocabulary at once:
/// on the qwen2 fixture in blocks of 100 rows (chunk boundaries differ, so
/// values agree to rounding: loss within 1e-6 relative, logits within 1e-6 and
/// gradients within 1e-5 of each tensor's largest magnitude), and on a
/// vocabulary of 4,096 whose blocks of 1,024 rows are whole chunks of the
/// cross-entropy, where the loss is the same bit for bit.
#[test]
fn the_classifier_in_blocks_matches_the_whole_vocabulary() {
    let compare = |config: &ModelConfig,
                   weights: &Weights,
                   inputs: &[u32],
                   targets: &[u32],
                   seq: usize,
                   rows: usize|
     -> (f64, f64) {
        let batch = inputs.len() / seq;
        let run = |blocks: Option<usize>| {
            let backend = Box::new(CpuBackend::new(Precision::Fp32));
            let mut engine =
                Engine::new(backend, config, seq, batch, KernelOptions::cpu()).unwrap();
            engine.set_classifier_blocks(blocks);
            let logits = engine.logits(weights, inputs).unwrap().concat();
            let loss = engine.loss(weights, inputs, targets).unwrap();
            let mut grads = Weights::zeros(config);
            let train_loss = engine
                .forward_backward(weights, &mut grads, inputs, targets, 1.0)
                .unwrap();
            assert_eq!(loss, train_loss);
            (logits, loss, grads)
        };
        let (logits, loss, grads) = run(None);
        let (blocked_logits, blocked_loss, blocked_grads) = run(Some(rows));
        let tol = Tolerance {
            relative: 1e-6,
            absolute: 0.0,
        };
        tol.assert_close(&blocked_logits, &logits, "logits in blocks");
        for p in grads.layout.params() {
            let range = grads.layout.range(p);
            Tolerance {
                relative: 1e-5,
                absolute: 0.0,
            }
            .assert_close(
                &blocked_grads.data[range.clone()],
                &grads.data[range],
                &format!("gradient of {} in blocks", p.name()),
            );
        }
        (loss, blocked_loss)
    };

    let case = Case::open("qwen2");
    let (_, seq) = case.batch_seq();
    let (inputs, targets) = (case.ids("input_ids"), case.ids("targets"));
    let (loss, blocked) = compare(case.config(), &case.weights, &inputs, &targets, seq, 100);
    assert!((loss - blocked).abs() <= 1e-6 * loss, "{loss} vs {blocked}");

    let config = ModelConfig::llama(32, 1, 4, 2, 64, 4096, 64);
    let weights = Weights::init(&config, 5);
    let mut rng = anemone::rng::Rng::new(9);
    let tokens: Vec<u32> = (0..4 * 64).map(|_| rng.below(4096) as u32).collect();
    let (inputs, targets) = tokens.split_at(2 * 64);
    let (loss, blocked) = compare(&config, &weights, inputs, targets, 64, 1024);
    assert_eq!(loss.to_bits(), blocked.to_bits(), "{loss} vs {blocked}");
}

/// Greedy decoding with the KV-cache decoder equals `transformers`'
/// `generate(do_sample=False)` id for id, stopping at any of the
/// `generation_config.json` EOS ids (the mistral fixture stops at its second;
/// transformers includes the stopping id, anemone's decoder stops before it).
#[test]
fn greedy_decoding_matches_transformers() {
    use anemone::generate::{Generator, Sampler};
    for name in MODELS {
        let case = Case::open(name);
        let prompt = case.ids("prompt");
        let want = case.ids("greedy");
        let stop = &case.checkpoint.config.eos_token_ids;
        assert!(
            !stop.is_empty(),
            "{name}: generation_config.json names EOS ids"
        );
        let mut generator = Generator::new(&case.weights);
        // transformers emits the EOS id that stops it; anemone stops before it.
        let without_stops = generator
            .generate_until(&prompt, want.len(), &mut Sampler::greedy(), &[], |_| {})
            .unwrap();
        assert_eq!(without_stops, want, "{name}");
        let got = generator
            .generate_until(&prompt, 20, &mut Sampler::greedy(), stop, |_| {})
            .unwrap();
        match want.split_last() {
            Some((last, before)) if stop.contains(last) => assert_eq!(got, before, "{name}"),
            _ => assert_eq!(got, want, "{name}"),
        }
        // The decoder's logits are the training engine's (one sequence).
        let logits = generator.forward_logits(&prompt).unwrap().concat();
        let backend = Box::new(CpuBackend::new(Precision::Fp32));
        let mut engine = Engine::new(
            backend,
            case.config(),
            prompt.len(),
            1,
            KernelOptions::cpu(),
        )
        .unwrap();
        let engine_logits = engine.logits(&case.weights, &prompt).unwrap().concat();
        Tolerance {
            relative: 1e-5,
            absolute: 0.0,
        }
        .assert_close(&logits, &engine_logits, &format!("{name}: decoder logits"));
    }
    let mistral = Case::open("mistral");
    assert_eq!(mistral.checkpoint.config.eos_token_ids.len(), 2);
    assert!(
        mistral.ids("greedy").len() < 20,
        "the mistral fixture stops early"
    );
}

/// Evaluation as the trainer runs it (consecutive windows of `eval_seq`
/// tokens from a token file, `Order::Sequential`, the mean of the windows'
/// losses) reproduces the mean of `transformers`' window losses within 1e-5.
#[test]
fn evaluation_windows_match_transformers() {
    use anemone::data::tokens::{Batcher, Order, TokenFile, TokenSpan, TokenWriter};
    use std::sync::Arc;
    for name in MODELS {
        let case = Case::open(name);
        let eval_seq = case.meta("eval_seq") as usize;
        let tokens = case.ids("eval_tokens");
        let dir = crate::common::temp_dir(&format!("hf-model-eval-{name}"));
        let path = dir.join("eval.tok");
        let mut writer = TokenWriter::create(&path, case.config().vocab_size).unwrap();
        writer.extend(&tokens).unwrap();
        writer.finish().unwrap();
        let span = TokenSpan::whole(Arc::new(TokenFile::open(&path).unwrap()));
        let mut batcher = Batcher::new(span, eval_seq, Order::Sequential, 0).unwrap();
        let want = case.f64s("eval_window_losses");
        assert_eq!(batcher.windows_per_epoch(), want.len());
        let backend = Box::new(CpuBackend::new(Precision::Fp32));
        let mut engine =
            Engine::new(backend, case.config(), eval_seq, 1, KernelOptions::cpu()).unwrap();
        let mut total = 0.0;
        for _ in 0..want.len() {
            let batch = batcher.next_batch(1).unwrap();
            total += engine
                .loss(&case.weights, &batch.inputs, &batch.targets)
                .unwrap();
        }
        let (got, want) = (
            total / want.len() as f64,
            want.iter().sum::<f64>() / want.len() as f64,
        );
        assert!(
            (got - want).abs() <= 1e-5 * want,
            "{name}: mean eval loss {got} vs {want}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The fake ANE runtime (the same packages in fp16, through surfaces,
/// packing and requests) on the features: the qwen2 fixture (q/k/v biases)
/// and the qwen3 fixture (QK-norm), packed fp16 kernels. It equals the CPU
/// backend in fp16 bit for bit, and `transformers` within the fp16
/// tolerances of `train_ref`'s fp16 test: logits within 2e-2 (relative to the
/// largest, plus 2e-2), the loss within 1e-2 relative, gradients (loss scale
/// 256, unscaled) within 5e-2 of each tensor's largest magnitude plus 1e-4.
#[test]
fn fake_ane_runs_biases_and_qk_norm_within_fp16_tolerance() {
    use anemone::backend::ane::AneBackend;
    use anemone::backend::ane::budget::CompileBudget;
    use anemone::backend::ane::fake::FakeRuntime;
    use anemone::mil::DType;
    let packed_fp16 = KernelOptions {
        dtype: DType::Fp16,
        mode: WeightMode::Packed,
        ..KernelOptions::cpu()
    };
    for name in ["qwen2", "qwen3"] {
        let case = Case::open(name);
        let (batch, seq) = case.batch_seq();
        let root = crate::common::temp_dir(&format!("hf-model-fake-ane-{name}"));
        let backend = AneBackend::new(FakeRuntime::new(root.clone()), CompileBudget::default());
        let mut ane =
            Engine::new(Box::new(backend), case.config(), seq, batch, packed_fp16).unwrap();
        let mut cpu = case.engine(Precision::Fp16, packed_fp16);
        let (inputs, targets) = (case.ids("input_ids"), case.ids("targets"));
        let logits = ane.logits(&case.weights, &inputs).unwrap().concat();
        assert_eq!(logits, cpu.logits(&case.weights, &inputs).unwrap().concat());
        Tolerance {
            relative: 2e-2,
            absolute: 2e-2,
        }
        .assert_close(
            &logits,
            &case.f32s("logits"),
            &format!("{name}: fp16 logits"),
        );
        let scale = 256.0;
        let mut grads = Weights::zeros(case.config());
        let loss = ane
            .forward_backward(&case.weights, &mut grads, &inputs, &targets, scale)
            .unwrap();
        let mut cpu_grads = Weights::zeros(case.config());
        let cpu_loss = cpu
            .forward_backward(&case.weights, &mut cpu_grads, &inputs, &targets, scale)
            .unwrap();
        assert_eq!(loss.to_bits(), cpu_loss.to_bits(), "{name}");
        let bits = |w: &Weights| w.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&grads),
            bits(&cpu_grads),
            "{name}: fake ANE vs CPU fp16"
        );
        let want_loss = case.f64s("loss")[0];
        assert!(
            (loss - want_loss).abs() <= 1e-2 * want_loss,
            "{name}: {loss} vs {want_loss}"
        );
        grads.data.iter_mut().for_each(|g| *g /= scale);
        let mut grad_err: f64 = 0.0;
        for tensor in hf_tensors(&grads) {
            let want = case.f32s(&format!("grad.{}", tensor.name));
            Tolerance {
                relative: 5e-2,
                absolute: 1e-4,
            }
            .assert_close(
                &tensor.data,
                &want,
                &format!("{name}: fp16 gradient of {}", tensor.name),
            );
            grad_err = grad_err.max(scaled_error(&tensor.data, &want));
        }
        eprintln!(
            "{name} fake ANE fp16: logits {:.2e}, loss {:.2e}, gradients {grad_err:.2e} \
             (largest errors relative to each tensor's largest magnitude)",
            scaled_error(&logits, &case.f32s("logits")),
            (loss - want_loss).abs() / want_loss
        );
        drop(ane);
        let _ = std::fs::remove_dir_all(&root);
    }
}

/// Every kernel of every real preset, packed fp16 as the ANE takes them,
/// passes the verifier's ANE rules without errors (warnings are listed).
#[test]
fn every_kernel_of_the_real_presets_passes_the_ane_rules() {
    use anemone::mil::DType;
    use anemone::mil::verify::Target;
    use anemone::model::kernels::LayerKernels;
    let packed_fp16 = KernelOptions {
        dtype: DType::Fp16,
        mode: WeightMode::Packed,
        ..KernelOptions::cpu()
    };
    for name in [
        "smollm2-135m",
        "smollm2-360m",
        "qwen2.5-0.5b",
        "qwen3-0.6b",
        "llama3.2-1b",
        "tinyllama-1.1b",
    ] {
        let config = ModelConfig::preset(name).unwrap();
        let specs = LayerKernels::build(&config, 256, packed_fp16, &|_| None).unwrap();
        for spec in specs.iter() {
            assert_eq!(spec.program.main.inputs.len(), 1, "{name} {}", spec.name);
            assert_eq!(spec.program.main.outputs.len(), 1, "{name} {}", spec.name);
            let report = spec.package.verify(Target::Ane).unwrap();
            assert!(report.is_ok(), "{name} {}:\n{report}", spec.name);
            let warnings: Vec<String> = report.warnings().map(|w| w.to_string()).collect();
            if !warnings.is_empty() {
                eprintln!("{name} {}: {}", spec.name, warnings.join("; "));
            }
        }
    }
}

/// Every kernel of the feature models (qwen2: biases; qwen3: QK-norm) in all
/// three weight modes, fp32 on the CPU: `Packed` (weights and vectors in the
/// single input) and `Baked` (BLOBFILE constants) give `Inputs`' outputs
/// within 1e-6 of each output's largest magnitude.
#[test]
fn feature_kernels_agree_in_every_weight_mode() {
    use anemone::model::Param;
    use anemone::model::kernels::{KernelSpec, LayerKernels, SlotRole};
    use anemone::train::kernel::CompiledKernel;
    for name in ["qwen2", "qwen3"] {
        let case = Case::open(name);
        let (_, seq) = case.batch_seq();
        let slot_param = |slot: &str| -> Option<Param> {
            Some(match slot {
                "wq" => Param::Wq(0),
                "wk" => Param::Wk(0),
                "wv" => Param::Wv(0),
                "bq" => Param::Bq(0),
                "bk" => Param::Bk(0),
                "bv" => Param::Bv(0),
                "q_norm" => Param::QNorm(0),
                "k_norm" => Param::KNorm(0),
                "wo" => Param::Wo(0),
                "w1" => Param::W1(0),
                "w2" => Param::W2(0),
                "w3" => Param::W3(0),
                _ => return None,
            })
        };
        let baked = |slot: &str| slot_param(slot).map(|p| case.weights.get(p).to_vec());
        let run = |spec: &KernelSpec| -> Vec<Vec<f32>> {
            let mut backend = CpuBackend::new(Precision::Fp32);
            let kernel = CompiledKernel::new(&mut backend, spec.clone()).unwrap();
            let mut rng = anemone::rng::Rng::new(3);
            let acts: Vec<(String, Vec<f32>)> = spec
                .inputs
                .iter()
                .filter(|slot| slot.role == SlotRole::Activation)
                .map(|slot| {
                    let values = (0..slot.rows * slot.cols).map(|_| rng.normal()).collect();
                    (slot.name.clone(), values)
                })
                .collect();
            let mut outs: Vec<Vec<f32>> = spec
                .outputs
                .iter()
                .map(|slot| vec![f32::NAN; slot.rows * slot.cols])
                .collect();
            let mut call = kernel.call();
            for slot in &spec.inputs {
                if slot.role != SlotRole::Activation {
                    let param = slot_param(&slot.name).unwrap();
                    call = call.weight(&slot.name, case.weights.get(param));
                }
            }
            for (slot_name, values) in &acts {
                call = call.input(slot_name, values);
            }
            for (slot, out) in spec.outputs.iter().zip(outs.iter_mut()) {
                call = call.output(&slot.name, out);
            }
            call.run(&mut backend).unwrap();
            outs
        };
        let build = |mode: WeightMode| {
            let opts = KernelOptions {
                mode,
                ..KernelOptions::cpu()
            };
            LayerKernels::build(case.config(), seq, opts, &baked).unwrap()
        };
        let inputs = build(WeightMode::Inputs);
        for mode in [WeightMode::Packed, WeightMode::Baked] {
            for (spec, reference) in build(mode).iter().zip(inputs.iter()) {
                let names: Vec<&str> = spec.outputs.iter().map(|s| s.name.as_str()).collect();
                let want_names: Vec<&str> =
                    reference.outputs.iter().map(|s| s.name.as_str()).collect();
                assert_eq!(names, want_names, "{name} {mode:?} {}", spec.name);
                for ((got, want), slot) in run(spec).iter().zip(run(reference)).zip(&spec.outputs) {
                    Tolerance {
                        relative: 1e-6,
                        absolute: 0.0,
                    }
                    .assert_close(
                        got,
                        &want,
                        &format!("{name} {mode:?} {} {}", spec.name, slot.name),
                    );
                }
            }
        }
    }
}
