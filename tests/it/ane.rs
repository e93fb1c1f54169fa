//! The ANE backend: a whole training step through its orchestration (surfaces,
//! packing, requests, temp directories) with the fake runtime, against the CPU
//! backend; and, where an Apple Neural Engine exists, the probe kernel and
//! every training kernel on the real device (these say why they skip elsewhere).

use anemone::backend::ane::budget::CompileBudget;
use anemone::backend::ane::fake::FakeRuntime;
use anemone::backend::ane::{self, AneBackend, probe};
use anemone::backend::cpu::CpuBackend;
use anemone::backend::{
    Backend, Block, CompileLimit, Compiled, Precision, Preferences, compile_or_split,
    is_compile_refusal,
};
use anemone::bench::Repeat;
use anemone::bench::ane as ane_bench;
use anemone::doctor;
use anemone::mil::verify::Target;
use anemone::mil::{DType, Dialect};
use anemone::model::kernels::{KernelOptions, LayerKernels, WeightMode};
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
        lora: None,
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
        (t.weights().data.clone(), losses)
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

/// The rules of the ANE catalogue that issue 22 added or made errors: no
/// ANE-bound package of ours may trip them.
const FIELD_RULES: [&str; 12] = [
    "ANE009", "ANE010", "ANE015", "ANE016", "ANE017", "ANE018", "ANE019", "ANE020", "ANE021",
    "ANE022", "ANE023", "ANE024",
];

fn assert_passes_the_field_rules(what: &str, package: &anemone::package::ProgramPackage) {
    let report = package.verify(Target::Ane).unwrap();
    assert!(report.is_ok(), "{what}:\n{report}");
    let tripped: Vec<&str> = report
        .rule_ids()
        .into_iter()
        .filter(|id| FIELD_RULES.contains(id))
        .collect();
    assert!(tripped.is_empty(), "{what} trips {tripped:?}:\n{report}");
}

/// Zero weights of the right size for every baked slot of `config`.
fn zero_weights(config: &ModelConfig) -> impl Fn(&str) -> Option<Vec<f32>> + '_ {
    move |name: &str| {
        let (rows, cols) = anemone::model::kernels::slot_shape(config, name)?;
        Some(vec![0.0; rows * cols])
    }
}

/// Issue 22, acceptance: every kernel the model builds for the ANE (every
/// preset at its training window and at doctor's, and at a window that is no
/// power of two, packed and baked weights, both dialects, with the split
/// attention backward), every benchmark kernel (quick and full configs of
/// every suite and form) and every probe passes the field's rules; so do
/// LoRA's kernels (issue 21: the base baked, the adapters' part of q, k, v,
/// gate and up as added inputs packed with the activations).
#[test]
fn every_ane_bound_kernel_benchmark_and_probe_passes_the_field_rules() {
    for preset in anemone::model::config::PRESETS {
        let config = ModelConfig::preset(preset).unwrap();
        let weights = zero_weights(&config);
        // 96: no power of two, softmax over 128 keys (ANE024); the padding
        // does not depend on the dialect, so ios18 alone there.
        let mut windows = vec![
            (
                config.seq_len.min(256),
                &[Dialect::Ios18, Dialect::Ios16][..],
            ),
            (
                config.seq_len.min(128),
                &[Dialect::Ios18, Dialect::Ios16][..],
            ),
            (config.seq_len.min(96), &[Dialect::Ios18][..]),
        ];
        windows.dedup_by_key(|(seq, _)| *seq);
        for (seq, dialects) in windows {
            let lora = anemone::model::kernels::Deltas::ALL;
            let none = anemone::model::kernels::Deltas::NONE;
            let modes = [
                (WeightMode::Packed, none),
                (WeightMode::Baked, none),
                (WeightMode::Baked, lora),
            ];
            for (mode, deltas) in modes {
                for &dialect in dialects {
                    let opts = KernelOptions {
                        deltas,
                        dtype: DType::Fp16,
                        mode,
                        dialect,
                    };
                    let specs = LayerKernels::build(&config, seq, opts, &weights).unwrap();
                    let split =
                        anemone::model::kernels::attn_bwd_split(&config, seq, opts, &weights)
                            .unwrap();
                    for spec in specs.iter().chain(&split) {
                        let what = format!(
                            "{preset} seq {seq} {mode:?} {deltas:?} {dialect:?} {}",
                            spec.name
                        );
                        assert_passes_the_field_rules(&what, &spec.package);
                    }
                }
            }
        }
    }
    for quick in [true, false] {
        let suites = [
            (ane_bench::peak_configs(quick), vec![ane_bench::Form::Conv]),
            (
                ane_bench::sram_configs(quick),
                ane_bench::Form::ALL.to_vec(),
            ),
            (
                ane_bench::conv_vs_matmul_configs(quick),
                ane_bench::Form::ALL.to_vec(),
            ),
            (
                ane_bench::int8_configs(quick),
                vec![ane_bench::Form::Conv, ane_bench::Form::ConvInt8],
            ),
        ];
        for (configs, forms) in suites {
            for stack in configs {
                for &form in &forms {
                    let Ok(k) = ane_bench::build(form, &stack, 1) else {
                        continue; // a shape the form does not take (a clear error)
                    };
                    assert_passes_the_field_rules(&k.name, &k.package);
                }
            }
        }
    }
    for (c, s) in [ane_bench::DISPATCH_SHAPE, (64, 16)] {
        let k = ane_bench::scale_kernel(c, s);
        assert_passes_the_field_rules(&k.name, &k.package);
    }
    for dialect in [Dialect::Ios18, Dialect::Ios16] {
        for check in [
            probe::conv_check(dialect),
            probe::width_check(dialect),
            probe::matmul_check(dialect),
        ] {
            assert_passes_the_field_rules(check.name, &check.package);
        }
    }
}

/// A chip that refuses the fused attention backward refuses it at step
/// "compile" (not a budget, load or I/O failure), the case in which
/// `train::kernel::compile` compiles its split instead; other failures stop
/// the engine and name the kernel they happened to.
#[test]
fn a_chip_refusing_the_fused_attention_backward_is_a_compile_refusal() {
    let config = small_config();
    let specs = LayerKernels::build(&config, 32, packed_fp16(), &|_| None).unwrap();
    let fused = specs.attn_bwd.program.clone();
    let runtime = FakeRuntime::in_temp_dir()
        .refusing("the fused attention backward is too big", move |p| {
            *p == fused
        });
    let mut backend = AneBackend::new(runtime, CompileBudget::default());
    let err = backend.compile(&specs.attn_bwd.package).unwrap_err();
    assert!(is_compile_refusal(&err), "{err}");
    assert!(err.to_string().contains("too big"), "{err}");
    let budget = CompileBudget { limit: 3 };
    let spent = Engine::new(
        Box::new(AneBackend::new(FakeRuntime::in_temp_dir(), budget)),
        &config,
        32,
        1,
        packed_fp16(),
    )
    .err()
    .unwrap();
    assert!(
        !is_compile_refusal(&spent),
        "a spent budget is no refusal: {spent}"
    );
    // The fourth kernel of the set is the one the budget stops.
    assert!(
        spent.to_string().ends_with("(layer kernel `ffn_bwd_w2`)"),
        "{spent}"
    );
}

/// A fake ANE that refuses the programs of `refused` (the fused kernels it
/// was built from), with `reason`.
fn refusing_programs(
    root: std::path::PathBuf,
    refused: Vec<anemone::mil::Program>,
    reason: &str,
) -> AneBackend<FakeRuntime> {
    let runtime = FakeRuntime::new(root).refusing(reason, move |p| refused.contains(p));
    AneBackend::new(runtime, CompileBudget::default())
}

/// Loss and gradients of one `forward_backward` (loss scale 256) of
/// `engine` on fixed tokens, twice (the second reuses everything).
fn two_passes(
    engine: &mut Engine,
    config: &ModelConfig,
    seq: usize,
    batch: usize,
) -> Vec<(f64, Vec<f32>)> {
    let weights = Weights::init(config, 4);
    let mut rng = Rng::new(8);
    let vocab = config.vocab_size as u64;
    let inputs: Vec<u32> = (0..batch * seq).map(|_| rng.below(vocab) as u32).collect();
    let targets: Vec<u32> = (0..batch * seq).map(|_| rng.below(vocab) as u32).collect();
    (0..2)
        .map(|_| {
            let mut grads = Weights::zeros(config);
            let loss = engine
                .forward_backward(&weights, &mut grads, &inputs, &targets, 256.0)
                .unwrap();
            (loss, grads.data)
        })
        .collect()
}

/// Issue 22, acceptance: a fake ANE that refuses the fused `attn_bwd` makes
/// the engine compile its split (two kernels, ten in all, the note saying
/// so once), and training runs through it with the fused kernel's numbers,
/// with GQA, and with q/k/v biases and QK-norm (whose backward reads the
/// split's `dq`, `dk`).
/// The parts are the fused kernel's ops in its order and the probabilities
/// cross between them as fp16 surfaces, which is what every fp16 op of the
/// fused kernel rounds them to: the same numbers, bit for bit.
#[test]
fn a_chip_refusing_the_fused_attention_backward_trains_with_the_split_kernels() {
    let features = ModelConfig {
        qkv_bias: true,
        qk_norm: true,
        ..small_config()
    };
    for config in [small_config(), features] {
        let what = format!("bias {} qk-norm {}", config.qkv_bias, config.qk_norm);
        let (seq, batch) = (32, 2);
        let specs = LayerKernels::build(&config, seq, packed_fp16(), &|_| None).unwrap();
        let root = temp_dir("fake-ane-split");
        let reason = "the fused attention backward is too big";
        let refused = vec![specs.attn_bwd.program.clone()];
        let split = refusing_programs(root.clone(), refused, reason);
        let mut split = Engine::new(Box::new(split), &config, seq, batch, packed_fp16()).unwrap();
        let dirs = std::fs::read_dir(&root).unwrap().count();
        assert_eq!(dirs, 10, "{what}: 8 whole kernels and attn_bwd's two parts");
        let notes = split.fallbacks();
        assert_eq!(notes.len(), 1, "{what}: {notes:?}");
        for needle in ["`attn_bwd`", "attn_bwd_dv then attn_bwd_dqk", reason] {
            assert!(notes[0].contains(needle), "{needle}: {}", notes[0]);
        }
        let fused = AneBackend::new(FakeRuntime::in_temp_dir(), CompileBudget::default());
        let mut fused = Engine::new(Box::new(fused), &config, seq, batch, packed_fp16()).unwrap();
        assert!(fused.fallbacks().is_empty());
        let got = two_passes(&mut split, &config, seq, batch);
        let want = two_passes(&mut fused, &config, seq, batch);
        for ((l_split, g_split), (l_fused, g_fused)) in got.iter().zip(&want) {
            assert_eq!(
                l_split.to_bits(),
                l_fused.to_bits(),
                "{what}: loss {l_split} vs {l_fused}"
            );
            assert!(g_fused.iter().any(|g| *g != 0.0));
            assert_eq!(bits(g_split), bits(g_fused), "{what}: gradients differ");
        }
        // The split's kernels ran: they have their own clocks.
        let profile = split.take_profile();
        let phases: Vec<&str> = profile.phases.iter().map(|(p, _)| p.as_str()).collect();
        for part in ["attn_bwd_dv", "attn_bwd_dqk"] {
            assert!(phases.contains(&part), "{what}: {part}: {phases:?}");
        }
        assert!(!phases.contains(&"attn_bwd"), "{what}: {phases:?}");
        drop(split);
        let _ = std::fs::remove_dir_all(&root);
    }
}

/// The compile plan leaves room for the split: a chip refusing the fused
/// attention backward compiles 8 + 2 = 10 kernels (the refused compile is
/// not counted), so a budget of 10 suffices and 9 does not, and a process
/// that has 91 of 100 compiles behind it restarts before training (91 + 10
/// > 100) where 90 does not.
#[test]
fn the_compile_plan_counts_the_split_attention_backward() {
    use anemone::train::job::updates_before_restart;
    let config = small_config();
    let specs = LayerKernels::build(&config, 32, packed_fp16(), &|_| None).unwrap();
    for (limit, fits) in [(10, true), (9, false)] {
        let refused = [specs.attn_bwd.program.clone()];
        let runtime = FakeRuntime::in_temp_dir().refusing("refused", move |p| refused.contains(p));
        let backend = AneBackend::new(runtime, CompileBudget { limit });
        let engine = Engine::new(Box::new(backend), &config, 32, 1, packed_fp16());
        assert_eq!(engine.is_ok(), fits, "budget {limit}");
    }
    let packed = |used| Preferences {
        weight_mode: WeightMode::Packed,
        compile_limit: Some(CompileLimit {
            limit: 100,
            used,
            raised_by: "the budget",
        }),
    };
    assert_eq!(updates_before_restart(None, &packed(90)).unwrap(), None);
    assert_eq!(updates_before_restart(None, &packed(91)).unwrap(), Some(0));
}

/// A CPU backend whose compiler refuses the programs `refused`: the split
/// fallback in fp32, where the CPU is the specification.
struct RefusingCpu {
    cpu: CpuBackend,
    refused: Vec<anemone::mil::Program>,
}

impl Backend for RefusingCpu {
    fn name(&self) -> &'static str {
        self.cpu.name()
    }
    fn preferences(&self) -> Preferences {
        self.cpu.preferences()
    }
    fn compile(
        &mut self,
        package: &anemone::package::ProgramPackage,
    ) -> anemone::Result<anemone::backend::KernelId> {
        if self.refused.contains(&package.program()?) {
            return Err(anemone::Error::Backend {
                backend: "cpu",
                step: "compile",
                msg: "refused by the test".into(),
            });
        }
        self.cpu.compile(package)
    }
    fn kernel_info(&self, kernel: anemone::backend::KernelId) -> &anemone::backend::KernelInfo {
        self.cpu.kernel_info(kernel)
    }
    fn alloc(
        &mut self,
        ty: &anemone::mil::TensorType,
    ) -> anemone::Result<anemone::backend::BufferId> {
        self.cpu.alloc(ty)
    }
    fn write(
        &mut self,
        buffer: anemone::backend::BufferId,
        block: Block,
        src: &[f32],
    ) -> anemone::Result<()> {
        self.cpu.write(buffer, block, src)
    }
    fn read(
        &self,
        buffer: anemone::backend::BufferId,
        block: Block,
        dst: &mut [f32],
    ) -> anemone::Result<()> {
        self.cpu.read(buffer, block, dst)
    }
    fn run(
        &mut self,
        kernel: anemone::backend::KernelId,
        inputs: &[anemone::backend::BufferId],
        outputs: &[anemone::backend::BufferId],
    ) -> anemone::Result<()> {
        self.cpu.run(kernel, inputs, outputs)
    }
    fn run_host(
        &mut self,
        kernel: anemone::backend::KernelId,
        inputs: &[&[f32]],
        outputs: &mut [&mut [f32]],
    ) -> anemone::Result<bool> {
        self.cpu.run_host(kernel, inputs, outputs)
    }
}

/// The split on the CPU backend in fp32 (weights as inputs, the CPU's
/// kernels; GQA, MHA, biases and QK-norm): the loss and every gradient
/// equal the fused kernel's within
/// 1e-6 of the largest gradient (the CPU fuses the two programs' attention
/// differently, so the last bits may differ).
#[test]
fn the_split_attention_backward_gives_the_fused_numbers_on_the_cpu_in_fp32() {
    let features = ModelConfig {
        qkv_bias: true,
        qk_norm: true,
        ..small_config()
    };
    let mha = ModelConfig::llama(64, 1, 4, 4, 128, 96, 32);
    for config in [small_config(), mha, features] {
        let (seq, batch) = (32, 2);
        let opts = KernelOptions::cpu();
        let specs = LayerKernels::build(&config, seq, opts, &|_| None).unwrap();
        let refusing = RefusingCpu {
            cpu: CpuBackend::new(Precision::Fp32),
            refused: vec![specs.attn_bwd.program.clone()],
        };
        let mut split = Engine::new(Box::new(refusing), &config, seq, batch, opts).unwrap();
        assert_eq!(split.fallbacks().len(), 1);
        let cpu = Box::new(CpuBackend::new(Precision::Fp32));
        let mut fused = Engine::new(cpu, &config, seq, batch, opts).unwrap();
        let got = two_passes(&mut split, &config, seq, batch);
        let want = two_passes(&mut fused, &config, seq, batch);
        for ((l_split, g_split), (l_fused, g_fused)) in got.iter().zip(&want) {
            assert!(
                (l_split - l_fused).abs() <= 1e-6 * l_fused.abs(),
                "{l_split} vs {l_fused}"
            );
            crate::common::Tolerance {
                relative: 1e-6,
                absolute: 0.0,
            }
            .assert_close(g_split, g_fused, "split vs fused gradients");
        }
    }
}

/// Issue 22: the training kernels are built in the dialect the backend
/// compiles. A chip that refuses ios18 is found to take ios16 by the probes;
/// `kernel_options` then builds ios16 kernels, which compile there and give
/// the CPU's numbers, where ios18 kernels are refused.
#[test]
fn kernel_options_take_the_dialect_the_probes_found() {
    use anemone::train::job::kernel_options;
    let runtime = FakeRuntime::in_temp_dir().refusing_dialect(Dialect::Ios18);
    let mut backend = AneBackend::new(runtime, CompileBudget::default());
    let chip = probe::examine(&mut backend);
    assert_eq!(chip.dialect, Some(Dialect::Ios16));
    let opts = kernel_options(Precision::Fp16, &backend);
    assert_eq!(
        opts,
        KernelOptions {
            deltas: anemone::model::kernels::Deltas::NONE,
            dtype: DType::Fp16,
            mode: WeightMode::Packed,
            dialect: Dialect::Ios16,
        }
    );
    let cpu = CpuBackend::new(Precision::Fp32);
    assert_eq!(kernel_options(Precision::Fp32, &cpu), KernelOptions::cpu());
    let config = small_config();
    let refused = Engine::new(Box::new(backend), &config, 32, 1, packed_fp16())
        .err()
        .unwrap();
    assert!(is_compile_refusal(&refused), "{refused}");
    assert!(refused.to_string().contains("ios18"), "{refused}");
    // A fresh backend on the same chip, with the options built for it.
    let runtime = FakeRuntime::in_temp_dir().refusing_dialect(Dialect::Ios18);
    let mut backend = AneBackend::new(runtime, CompileBudget::default());
    probe::examine(&mut backend);
    let opts = kernel_options(Precision::Fp16, &backend);
    let mut ane = Engine::new(Box::new(backend), &config, 32, 2, opts).unwrap();
    let cpu = Box::new(CpuBackend::new(Precision::Fp16));
    let mut cpu = Engine::new(cpu, &config, 32, 2, opts).unwrap();
    let got = two_passes(&mut ane, &config, 32, 2);
    let want = two_passes(&mut cpu, &config, 32, 2);
    for ((l_ane, g_ane), (l_cpu, g_cpu)) in got.iter().zip(&want) {
        assert_eq!(l_ane.to_bits(), l_cpu.to_bits());
        assert_eq!(bits(g_ane), bits(g_cpu));
    }
}

/// Issue 22 (ANE024): a window that is not a power of two (48) trains on the
/// fake ANE with its softmax padded to 64 masked keys, and gives the numbers
/// of the unpadded kernels computed in the same fp16 (weights as inputs on
/// the CPU backend), and those of fp32 within fp16's tolerance; also when
/// the fused attention backward is refused and its split runs.
#[test]
fn a_window_that_is_no_power_of_two_trains_on_the_fake_ane_with_the_unpadded_numbers() {
    let config = ModelConfig::llama(64, 2, 4, 2, 128, 96, 64);
    let (seq, batch) = (48, 2);
    let fp16_inputs = KernelOptions {
        dtype: DType::Fp16,
        ..KernelOptions::cpu()
    };
    let cpu = Box::new(CpuBackend::new(Precision::Fp16));
    let mut unpadded = Engine::new(cpu, &config, seq, batch, fp16_inputs).unwrap();
    let want = two_passes(&mut unpadded, &config, seq, batch);
    let cpu = Box::new(CpuBackend::new(Precision::Fp32));
    let mut exact = Engine::new(cpu, &config, seq, batch, KernelOptions::cpu()).unwrap();
    let fp32 = two_passes(&mut exact, &config, seq, batch);
    let specs = LayerKernels::build(&config, seq, packed_fp16(), &|_| None).unwrap();
    for refused in [vec![], vec![specs.attn_bwd.program.clone()]] {
        let split = !refused.is_empty();
        let ane = refusing_programs(temp_dir("fake-ane-48"), refused, "refused");
        let mut ane = Engine::new(Box::new(ane), &config, seq, batch, packed_fp16()).unwrap();
        assert_eq!(ane.fallbacks().len(), usize::from(split));
        let got = two_passes(&mut ane, &config, seq, batch);
        for (((l_ane, g_ane), (l_want, g_want)), (l32, g32)) in got.iter().zip(&want).zip(&fp32) {
            assert!(
                (l_ane - l_want).abs() <= 1e-6,
                "split {split}: loss {l_ane} vs {l_want}"
            );
            crate::common::Tolerance {
                relative: 1e-3,
                absolute: 0.0,
            }
            .assert_close(
                g_ane,
                g_want,
                &format!("split {split}: padded vs unpadded fp16"),
            );
            assert!(
                (l_ane - l32).abs() <= 1e-3 * l32,
                "split {split}: loss {l_ane} vs fp32 {l32}"
            );
            crate::common::Tolerance {
                relative: 3e-2,
                absolute: 0.0,
            }
            .assert_close(g_ane, g32, &format!("split {split}: fp16 vs fp32"));
        }
    }
}

/// `y = 2x + 1` whole, or as `t = 2x` then `y = t + 1`.
fn affine_packages() -> (
    anemone::package::ProgramPackage,
    Vec<anemone::package::ProgramPackage>,
) {
    use anemone::mil::Builder;
    use anemone::package::ProgramPackage;
    let io = [1, 64, 1, 384];
    let scaled = |b: &mut Builder, x: &anemone::mil::Tensor| {
        let two = b.scalar(DType::Fp16, 2.0);
        b.mul(x, &two)
    };
    let shifted = |b: &mut Builder, x: &anemone::mil::Tensor| {
        let one = b.scalar(DType::Fp16, 1.0);
        b.add(x, &one)
    };
    let mut b = Builder::new(Dialect::Ios18);
    let x = b.input("x", DType::Fp16, &io);
    let t = scaled(&mut b, &x);
    let y = shifted(&mut b, &t);
    b.output(&y);
    let whole = ProgramPackage::from_program(&b.finish(), []);
    let mut parts = Vec::new();
    for part in [scaled, shifted] {
        let mut b = Builder::new(Dialect::Ios18);
        let x = b.input("x", DType::Fp16, &io);
        let y = part(&mut b, &x);
        b.output(&y);
        parts.push(ProgramPackage::from_program(&b.finish(), []));
    }
    (whole, parts)
}

/// The split fallback: a runtime that refuses a kernel compiles its parts
/// instead, and the parts run in order give the whole's numbers bit for bit.
#[test]
fn a_refused_kernel_runs_split_into_parts_with_the_same_numbers() {
    let (whole, parts) = affine_packages();
    let refused = whole.program().unwrap();
    let runtime = FakeRuntime::in_temp_dir().refusing("too many ops", move |p| *p == refused);
    let mut ane = AneBackend::new(runtime, CompileBudget::default());
    let compiled = compile_or_split(&mut ane, &whole, || Ok(parts.clone())).unwrap();
    let Compiled::Split {
        parts: ids,
        refused,
    } = compiled
    else {
        panic!("expected the split form, got {compiled:?}");
    };
    assert_eq!(ids.len(), 2);
    assert!(refused.contains("too many ops"), "{refused}");
    let ty = ane.kernel_info(ids[0]).inputs[0].ty.clone();
    let x: Vec<f32> = (0..ty.numel())
        .map(|i| (i % 97) as f32 * 0.125 - 6.0)
        .collect();
    let (bx, bt, by) = (
        ane.alloc(&ty).unwrap(),
        ane.alloc(&ty).unwrap(),
        ane.alloc(&ty).unwrap(),
    );
    ane.write(bx, Block::whole(&ty), &x).unwrap();
    ane.run(ids[0], &[bx], &[bt]).unwrap();
    ane.run(ids[1], &[bt], &[by]).unwrap();
    let mut split = vec![0.0; ty.numel()];
    ane.read(by, Block::whole(&ty), &mut split).unwrap();
    // The whole kernel where it is not refused.
    let mut cpu = CpuBackend::new(Precision::Fp16);
    let Compiled::Whole(k) = compile_or_split(&mut cpu, &whole, || unreachable!()).unwrap() else {
        panic!("the CPU takes the whole kernel");
    };
    let (cx, cy) = (cpu.alloc(&ty).unwrap(), cpu.alloc(&ty).unwrap());
    cpu.write(cx, Block::whole(&ty), &x).unwrap();
    cpu.run(k, &[cx], &[cy]).unwrap();
    let mut joined = vec![0.0; ty.numel()];
    cpu.read(cy, Block::whole(&ty), &mut joined).unwrap();
    assert_eq!(bits(&split), bits(&joined));
    // Other failures are not papered over by splitting.
    let mut spent = AneBackend::new(FakeRuntime::in_temp_dir(), CompileBudget { limit: 1 });
    spent.compile(&parts[0]).unwrap();
    let err = compile_or_split(&mut spent, &whole, || Ok(Vec::new())).unwrap_err();
    assert!(err.to_string().contains("compile budget"), "{err}");
}

/// The benchmarks unload every model when they are done with it (the ANE
/// keeps no more than one benchmark kernel loaded), and report energy
/// ("unavailable" off macOS).
#[test]
fn benchmarks_unload_each_kernel_and_report_energy() {
    let mut ane = AneBackend::new(FakeRuntime::in_temp_dir(), CompileBudget::default());
    let forms = [ane_bench::Form::Conv, ane_bench::Form::MatmulPacked];
    let configs = ane_bench::sram_configs(true);
    let rows = ane_bench::sram(&mut ane, &configs, &forms, Repeat::new(0, 1), &mut |_| {}).unwrap();
    assert_eq!(rows.len(), 6);
    assert_eq!(anemone::backend::ane::Runtime::compiles(ane.runtime()), 6);
    assert_eq!(ane.loaded_kernels(), 0);
    assert!(ane.runtime().live_dirs().is_empty());
    let rows = ane_bench::dispatch(&mut ane, (64, 16), Repeat::new(0, 1), &mut |_| {}).unwrap();
    assert_eq!(ane.loaded_kernels(), 0);
    if std::env::consts::OS != "macos" {
        let json = serde_json::to_value(&rows[0]).unwrap();
        assert_eq!(json["energy"]["joules_per_step"], "unavailable", "{json}");
        assert_eq!(json["energy"]["ane_j"], "unavailable", "{json}");
    }
}

/// `metrics.jsonl` carries each update's energy; off macOS every field is
/// "unavailable", never 0.
#[test]
fn metrics_rows_carry_the_energy_of_each_update() {
    let c = train_config(2);
    let engine = Engine::new(
        Box::new(CpuBackend::new(Precision::Fp16)),
        &c.model,
        c.seq,
        c.batch,
        packed_fp16(),
    )
    .unwrap();
    let dir = temp_dir("energy-metrics");
    let mut t = Trainer::new(c.clone(), Weights::init(&c.model, 1), engine, &dir).unwrap();
    let mut data = RandomBatches {
        rng: Rng::new(5),
        vocab: 96,
        seq: c.seq,
    };
    t.train(&mut data, None, &mut Quiet, None).unwrap();
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    for row in &rows {
        let energy = &row["energy"];
        for field in [
            "cpu_j",
            "gpu_j",
            "ane_j",
            "joules_per_step",
            "tokens_per_joule",
        ] {
            let value = &energy[field];
            if std::env::consts::OS == "macos" {
                assert!(value.is_number() || value == "unavailable", "{row}");
            } else {
                assert_eq!(value, "unavailable", "{field} in {row}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
