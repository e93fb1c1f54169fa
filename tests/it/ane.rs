//! The ANE backend: a whole training step through its orchestration (surfaces,
//! packing, requests, temp directories) with the fake runtime, against the CPU
//! backend; and, where an Apple Neural Engine exists, the probe kernel and
//! every training kernel on the real device (these say why they skip elsewhere).

use anemone::backend::ane::budget::CompileBudget;
use anemone::backend::ane::fake::FakeRuntime;
use anemone::backend::ane::{self, AneBackend, probe};
use anemone::backend::cpu::CpuBackend;
use anemone::backend::{Backend, CompileLimit, Precision, Preferences};
use anemone::doctor;
use anemone::mil::DType;
use anemone::model::kernels::{KernelOptions, WeightMode};
use anemone::model::{ModelConfig, Weights};
use anemone::rng::Rng;
use anemone::train::engine::Engine;
use anemone::train::optim::{AdamW, Schedule};
use anemone::train::{Batches, Quiet, TrainConfig, Trainer};

use crate::common::{skip, temp_dir};

fn packed_fp16() -> KernelOptions {
    KernelOptions {
        dtype: DType::Fp16,
        mode: WeightMode::Packed,
        ..KernelOptions::cpu()
    }
}

/// GQA (4 query heads, 2 kv heads), two layers: every kernel and both head maps.
fn small_config() -> ModelConfig {
    ModelConfig::llama(64, 2, 4, 2, 128, 96, 32)
}

/// Deterministic random windows.
struct RandomBatches {
    rng: Rng,
    vocab: u64,
    seq: usize,
}

impl Batches for RandomBatches {
    fn next_batch(&mut self, inputs: &mut [u32], targets: &mut [u32]) -> anemone::Result<()> {
        for (row_in, row_t) in inputs
            .chunks_mut(self.seq)
            .zip(targets.chunks_mut(self.seq))
        {
            let window: Vec<u32> = (0..=self.seq)
                .map(|_| self.rng.below(self.vocab) as u32)
                .collect();
            row_in.copy_from_slice(&window[..self.seq]);
            row_t.copy_from_slice(&window[1..]);
        }
        Ok(())
    }
    fn state(&self) -> serde_json::Value {
        serde_json::json!(self.rng.state())
    }
    fn restore(&mut self, state: &serde_json::Value) -> anemone::Result<()> {
        self.rng = Rng::from_state(state.as_u64().unwrap());
        Ok(())
    }
    fn rewind(&mut self) {}
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn fake_ane_training_step_matches_the_cpu_backend_bit_for_bit() {
    let config = small_config();
    let (seq, batch) = (32, 2);
    let weights = Weights::init(&config, 4);
    let mut rng = Rng::new(8);
    let inputs: Vec<u32> = (0..batch * seq).map(|_| rng.below(96) as u32).collect();
    let targets: Vec<u32> = (0..batch * seq).map(|_| rng.below(96) as u32).collect();

    let root = temp_dir("fake-ane-step");
    let ane_backend = AneBackend::new(FakeRuntime::new(root.clone()), CompileBudget::default());
    let mut ane = Engine::new(Box::new(ane_backend), &config, seq, batch, packed_fp16()).unwrap();
    assert_eq!(ane.backend_name(), "ane");
    // Nine kernels, each in its own populated temp directory.
    let dirs: Vec<_> = std::fs::read_dir(&root).unwrap().collect();
    assert_eq!(dirs.len(), 9);
    for d in dirs {
        assert!(d.unwrap().path().join("model.mil").is_file());
    }
    let mut cpu = Engine::new(
        Box::new(CpuBackend::new(Precision::Fp16)),
        &config,
        seq,
        batch,
        packed_fp16(),
    )
    .unwrap();

    let mut g_ane = Weights::zeros(&config);
    let mut g_cpu = Weights::zeros(&config);
    let l_ane = ane
        .forward_backward(&weights, &mut g_ane, &inputs, &targets, 256.0)
        .unwrap();
    let l_cpu = cpu
        .forward_backward(&weights, &mut g_cpu, &inputs, &targets, 256.0)
        .unwrap();
    assert_eq!(l_ane.to_bits(), l_cpu.to_bits(), "loss {l_ane} vs {l_cpu}");
    assert!(g_cpu.data.iter().any(|g| *g != 0.0));
    assert_eq!(bits(&g_ane.data), bits(&g_cpu.data), "gradients differ");
    // A second step reuses the surfaces and requests: still identical.
    let l2_ane = ane
        .forward_backward(&weights, &mut g_ane, &inputs, &targets, 256.0)
        .unwrap();
    let l2_cpu = cpu
        .forward_backward(&weights, &mut g_cpu, &inputs, &targets, 256.0)
        .unwrap();
    assert_eq!(l2_ane.to_bits(), l2_cpu.to_bits());
    assert_eq!(bits(&g_ane.data), bits(&g_cpu.data));
    drop(ane);
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        0,
        "unloading removes every model directory"
    );
    let _ = std::fs::remove_dir_all(&root);
}

fn train_config(steps: u64) -> TrainConfig {
    TrainConfig {
        model: small_config(),
        preset: None,
        steps,
        batch: 2,
        seq: 32,
        accum: 2,
        lr: 3e-3,
        warmup: 1,
        schedule: Schedule::Cosine,
        optimizer: AdamW::default(),
        grad_clip: 1.0,
        seed: 3,
        eval_every: 0,
        eval_batches: 1,
        checkpoint_every: 0,
        fp16: true,
    }
}

#[test]
fn fake_ane_trainer_updates_match_the_cpu_backend_bit_for_bit() {
    let c = train_config(3);
    let run = |backend: Box<dyn Backend>, name: &str| {
        let engine = Engine::new(backend, &c.model, c.seq, c.batch, packed_fp16()).unwrap();
        let dir = temp_dir(name);
        let mut t = Trainer::new(c.clone(), Weights::init(&c.model, 11), engine, &dir).unwrap();
        let mut data = RandomBatches {
            rng: Rng::new(5),
            vocab: 96,
            seq: c.seq,
        };
        t.train(&mut data, None, &mut Quiet, None).unwrap();
        let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        let losses: Vec<f64> = metrics
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["train_loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect();
        let _ = std::fs::remove_dir_all(&dir);
        (t.weights.data.clone(), losses)
    };
    let fake = AneBackend::new(FakeRuntime::in_temp_dir(), CompileBudget::default());
    let (w_ane, loss_ane) = run(Box::new(fake), "fake-ane-trainer");
    let (w_cpu, loss_cpu) = run(Box::new(CpuBackend::new(Precision::Fp16)), "cpu-trainer");
    assert_eq!(loss_ane.len(), 3);
    assert_eq!(loss_ane, loss_cpu);
    assert_eq!(bits(&w_ane), bits(&w_cpu), "weights after 3 updates differ");
    assert_ne!(bits(&w_ane), bits(&Weights::init(&c.model, 11).data));
}

#[test]
fn compile_budget_is_enforced_before_compiling() {
    let budget = CompileBudget { limit: 8 };
    let backend = AneBackend::new(FakeRuntime::in_temp_dir(), budget);
    let err = Engine::new(Box::new(backend), &small_config(), 32, 1, packed_fp16())
        .err()
        .expect("9 kernels exceed a budget of 8");
    let text = err.to_string();
    assert!(
        text.starts_with("ane backend: compile budget: 8 compiles"),
        "{text}"
    );
}

/// Why the real-device tests cannot run here, or `None` with an ANE.
fn ane_skip_reason() -> Option<String> {
    ane::platform_unavailable_reason().or_else(|| ane::open().err().map(|e| e.to_string()))
}

#[test]
#[cfg_attr(not(target_os = "macos"), ignore = "needs the ANE (macOS)")]
fn mac_only_probe_kernel_compiles_loads_and_evaluates_on_the_ane() {
    if let Some(reason) = ane_skip_reason() {
        skip(&reason);
        return;
    }
    let (mut backend, family) = ane::open().unwrap();
    let r = probe::run_probe(&mut backend).unwrap();
    eprintln!(
        "ANE {family}: probe max error {} compile {:.1} ms run {:.3} ms",
        r.max_error, r.compile_ms, r.run_ms
    );
    assert!(r.max_error <= probe::PROBE_TOLERANCE);
}

#[test]
#[cfg_attr(not(target_os = "macos"), ignore = "needs the ANE (macOS)")]
fn mac_only_every_training_kernel_matches_the_cpu_on_the_ane() {
    if let Some(reason) = ane_skip_reason() {
        skip(&reason);
        return;
    }
    let (mut backend, _) = ane::open().unwrap();
    let config = ModelConfig::preset("tiny").unwrap();
    let report = doctor::compare_kernels(&mut backend, "ane", "tiny", &config, 128).unwrap();
    for row in &report.rows {
        assert!(row.error.is_none() && row.ok, "{row:?}");
    }
}

#[test]
fn backends_say_what_they_prefer_the_ane_packed_weights_under_its_compile_budget() {
    let mut ane = AneBackend::new(FakeRuntime::in_temp_dir(), CompileBudget { limit: 40 });
    let limit = |used| CompileLimit {
        limit: 40,
        used,
        raised_by: anemone::backend::ane::budget::BUDGET_ENV,
    };
    let packed = |used| Preferences {
        weight_mode: WeightMode::Packed,
        compile_limit: Some(limit(used)),
    };
    assert_eq!(ane.preferences(), packed(0));
    ane.compile(&probe::probe_package()).unwrap();
    assert_eq!(ane.preferences(), packed(1));
    let cpu = CpuBackend::new(Precision::Fp32);
    assert_eq!(
        cpu.preferences(),
        Preferences {
            weight_mode: WeightMode::Inputs,
            compile_limit: None
        }
    );
}
