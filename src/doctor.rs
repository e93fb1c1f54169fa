//! `anemone doctor`: what this machine offers the ANE backend, as a report a
//! user can share. OS and chip, whether `AppleNeuralEngine.framework` and its
//! classes load, the ANE family (`_ANEDeviceInfo`), the probe kernels (conv in
//! the ios18 dialect, else ios16; width-axis slice/concat/reshape; matmul on
//! runtime tensors: each names what needs it when the chip refuses it), the
//! energy counters, then every training kernel of a small config run on the
//! subject backend (the ANE, or the CPU in fp16 where there is none) against
//! the CPU interpreter in fp32, the specification, with max error, time and
//! the ANE rules each kernel's package trips.
//!
//! This module gathers and formats; it does not decide which backend training
//! uses (that is [`crate::backend::open`]).

use std::time::Instant;

use serde::Serialize;

use crate::backend::ane::{self, budget, private::REQUIRED_CLASSES, probe};
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, Block, Precision};
use crate::mil::DType;
use crate::mil::verify::Target;
use crate::model::ModelConfig;
use crate::model::kernels::{KernelOptions, KernelSpec, LayerKernels, SlotRole, WeightMode};
use crate::rng::Rng;
use crate::{Error, Result};

/// Allowed `max |subject - fp32 reference|` per kernel: `relative * scale +
/// absolute`, scale = the largest reference magnitude of that kernel's outputs.
/// Loose enough for fp16 rounding after every op through attention, tight
/// enough to catch a wrong layout (errors of the order of the values).
pub const KERNEL_TOLERANCE: (f32, f32) = (2e-2, 2e-3);

/// The whole report (`--json` writes it).
#[derive(Clone, Debug, Serialize)]
pub struct DoctorReport {
    pub anemone_version: String,
    pub os: String,
    pub arch: String,
    pub os_version: Option<String>,
    pub chip: Option<String>,
    pub ane: AneStatus,
    pub probe: Option<ProbeReport>,
    /// Every probe kernel run, in order (empty without an ANE).
    pub checks: Vec<CheckReport>,
    /// The MIL dialect the chip compiled the conv probe in (`ios18`, `ios16`).
    pub dialect: Option<String>,
    /// "ane" when the probes found nothing the training kernels need refused, else "cpu".
    pub auto_backend: String,
    /// Why `--backend auto` takes the CPU (the refused probe and what needs it).
    pub auto_reason: Option<String>,
    pub energy: EnergyReport,
    pub kernels: KernelReport,
}

/// One probe kernel: what it checks, in which dialect, and how it went.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    pub name: String,
    pub dialect: String,
    pub needed_for: String,
    #[serde(flatten)]
    pub result: ProbeReport,
}

/// Whether the energy counters can be read, and a short idle sample.
#[derive(Clone, Debug, Serialize)]
pub struct EnergyReport {
    pub available: bool,
    pub reason: Option<String>,
    /// 200 ms of the idle machine, per rail ("unavailable" where missing).
    pub idle_sample: crate::energy::Energy,
}

/// What loading the private framework found.
#[derive(Clone, Debug, Serialize)]
pub struct AneStatus {
    pub available: bool,
    /// Why not, when not available (the error text, naming the step).
    pub reason: Option<String>,
    pub framework: String,
    pub framework_loaded: bool,
    /// Every class the backend needs, and `_ANEDeviceInfo`, with whether it loaded.
    pub classes: Vec<(String, bool)>,
    /// `_ANEDeviceInfo.aneSubType`, e.g. "H16G".
    pub family: Option<String>,
    pub compile_budget: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProbeReport {
    pub ok: bool,
    pub error: Option<String>,
    pub max_error: Option<f32>,
    pub compile_ms: Option<f64>,
    pub run_ms: Option<f64>,
}

/// Every training kernel on the subject backend against the CPU in fp32.
#[derive(Clone, Debug, Serialize)]
pub struct KernelReport {
    pub config: String,
    pub seq: usize,
    /// "ane" or "cpu-fp16".
    pub subject: String,
    pub reference: String,
    pub tolerance_relative: f32,
    pub tolerance_absolute: f32,
    pub rows: Vec<KernelRow>,
}

#[derive(Clone, Debug, Serialize)]
pub struct KernelRow {
    pub kernel: String,
    /// `[C, W]` the slots of the single packed input and output cover.
    pub input: [usize; 2],
    pub output: [usize; 2],
    /// `[C, W]` of the input and output tensors, padded to the ANE's I/O
    /// rules where the slots alone are too small (`mil::layout`).
    pub surface_input: [usize; 2],
    pub surface_output: [usize; 2],
    pub max_error: Option<f32>,
    /// Largest reference magnitude.
    pub scale: Option<f32>,
    pub ok: bool,
    pub error: Option<String>,
    pub subject_ms: Option<f64>,
    pub reference_ms: Option<f64>,
    /// Ids of the ANE rules the kernel's package trips (errors and warnings).
    pub ane_rules: Vec<String>,
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// The CPU's name: `machdep.cpu.brand_string` on macOS, else `/proc/cpuinfo`'s
/// first `model name`.
pub fn chip_name() -> Option<String> {
    if std::env::consts::OS == "macos" {
        return command_output("sysctl", &["-n", "machdep.cpu.brand_string"]);
    }
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
}

fn os_version() -> Option<String> {
    if std::env::consts::OS == "macos" {
        return command_output("sw_vers", &["-productVersion"]).map(|v| format!("macOS {v}"));
    }
    let release = std::fs::read_to_string("/etc/os-release").ok()?;
    release
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
}

/// Deterministic inputs for `spec`: activations in [-1, 1), weight slots
/// scaled by `1/sqrt(rows)` so outputs stay of order one.
pub fn kernel_inputs(spec: &KernelSpec, inputs: &[crate::mil::Var], seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Rng::new(seed);
    let mut data: Vec<Vec<f32>> = inputs
        .iter()
        .map(|v| {
            (0..v.ty.numel())
                .map(|_| rng.next_f32() * 2.0 - 1.0)
                .collect()
        })
        .collect();
    for slot in &spec.inputs {
        if let SlotRole::Weight { .. } = slot.role {
            let (_, width) = crate::backend::matrix_dims(&inputs[slot.buffer].ty);
            let scale = 1.0 / (slot.rows as f32).sqrt();
            for r in slot.row..slot.row + slot.rows {
                for v in
                    &mut data[slot.buffer][r * width + slot.col..r * width + slot.col + slot.cols]
                {
                    *v *= scale;
                }
            }
        }
    }
    data
}

/// Compile `spec` on `backend`, run it once to warm up and once timed on
/// `inputs`; returns the outputs and the timed run in ms.
pub fn run_kernel(
    backend: &mut dyn Backend,
    spec: &KernelSpec,
    inputs: &[Vec<f32>],
) -> Result<(Vec<Vec<f32>>, f64)> {
    let id = backend.compile(&spec.package)?;
    let info = backend.kernel_info(id).clone();
    let ins = info
        .inputs
        .iter()
        .map(|v| backend.alloc(&v.ty))
        .collect::<Result<Vec<_>>>()?;
    let outs = info
        .outputs
        .iter()
        .map(|v| backend.alloc(&v.ty))
        .collect::<Result<Vec<_>>>()?;
    for ((buffer, var), data) in ins.iter().zip(&info.inputs).zip(inputs) {
        backend.write(*buffer, Block::whole(&var.ty), data)?;
    }
    backend.run(id, &ins, &outs)?;
    let started = Instant::now();
    backend.run(id, &ins, &outs)?;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let mut results = Vec::new();
    for (buffer, var) in outs.iter().zip(&info.outputs) {
        let mut v = vec![0.0; var.ty.numel()];
        backend.read(*buffer, Block::whole(&var.ty), &mut v)?;
        results.push(v);
    }
    backend.release(id)?;
    Ok((results, ms))
}

/// `(max |a - b|, max |b|)` over all outputs.
pub fn max_error(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f32) {
    let mut err = 0.0f32;
    let mut scale = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        for (p, q) in x.iter().zip(y) {
            let e = (p - q).abs();
            err = if e.is_nan() { f32::NAN } else { err.max(e) };
            scale = scale.max(q.abs());
        }
    }
    (err, scale)
}

/// Seeded random values for the baked tensor of slot `name` of `config`'s
/// layer kernels (weights scaled by `1 / sqrt(in)`, as [`kernel_inputs`]
/// scales packed ones); `None` for another name.
fn random_baked(config: &ModelConfig) -> impl Fn(&str) -> Option<Vec<f32>> + '_ {
    move |name: &str| {
        let (rows, cols) = crate::model::kernels::slot_shape(config, name)?;
        let mut rng = Rng::new(crate::dist::digest(name.as_bytes()));
        let scale = 1.0 / (cols as f32).sqrt();
        Some(
            (0..rows * cols)
                .map(|_| (rng.next_f32() * 2.0 - 1.0) * scale)
                .collect(),
        )
    }
}

/// Run every kernel of `config` (packed fp16 in the subject's dialect, window
/// `seq`), and the split attention backward, on `subject` and on the CPU in
/// fp32; then LoRA's kernels (rows `lora:NAME`): a layer's base baked in
/// (random values), the adapters' part of q, k, v, gate and up as added
/// inputs, as a LoRA run on the ANE compiles them.
pub fn compare_kernels(
    subject: &mut dyn Backend,
    subject_name: &str,
    config_name: &str,
    config: &ModelConfig,
    seq: usize,
) -> Result<KernelReport> {
    let opts = KernelOptions {
        deltas: crate::model::kernels::Deltas::NONE,
        dtype: DType::Fp16,
        mode: WeightMode::Packed,
        dialect: subject.dialect(),
    };
    let kernels = LayerKernels::build(config, seq, opts, &|_| None)?;
    // With the split attention backward training falls back to where a chip
    // refuses the fused one: whether the chip takes it is worth a row each.
    let split = crate::model::kernels::attn_bwd_split(config, seq, opts, &|_| None)?;
    let lora_opts = KernelOptions {
        mode: WeightMode::Baked,
        deltas: crate::model::kernels::Deltas::ALL,
        ..opts
    };
    let lora = LayerKernels::build(config, seq, lora_opts, &random_baked(config))?;
    let labelled = (kernels
        .iter()
        .chain(&split)
        .map(|spec| (spec.name.clone(), spec)))
    .chain(
        lora.iter()
            .map(|spec| (format!("lora:{}", spec.name), spec)),
    );
    let (rel, abs) = KERNEL_TOLERANCE;
    let mut rows = Vec::new();
    for (i, (label, spec)) in labelled.enumerate() {
        let main = &spec.program.main;
        let dims = |ty| {
            let (r, c) = crate::backend::matrix_dims(ty);
            [r, c]
        };
        let outputs = main.output_vars();
        let inputs = kernel_inputs(spec, &main.inputs, 1000 + i as u64);
        let covered = |slots: &[crate::model::kernels::TensorSlot]| {
            let rows = slots.iter().map(|s| s.row + s.rows).max().unwrap_or(0);
            let cols = slots.iter().map(|s| s.col + s.cols).max().unwrap_or(0);
            [rows, cols]
        };
        let mut row = KernelRow {
            kernel: label,
            input: covered(&spec.inputs),
            output: covered(&spec.outputs),
            surface_input: dims(&main.inputs[0].ty),
            surface_output: dims(&outputs[0].ty),
            max_error: None,
            scale: None,
            ok: false,
            error: None,
            subject_ms: None,
            reference_ms: None,
            ane_rules: spec
                .package
                .verify(Target::Ane)
                .map(|r| r.rule_ids().iter().map(|id| id.to_string()).collect())
                .unwrap_or_default(),
        };
        let mut reference = CpuBackend::new(Precision::Fp32);
        let outcome = run_kernel(&mut reference, spec, &inputs).and_then(|(want, ref_ms)| {
            run_kernel(subject, spec, &inputs).map(|(got, ms)| (want, ref_ms, got, ms))
        });
        match outcome {
            Ok((want, ref_ms, got, ms)) => {
                let (err, scale) = max_error(&got, &want);
                row.max_error = Some(err);
                row.scale = Some(scale);
                row.ok = err <= rel * scale + abs;
                row.subject_ms = Some(ms);
                row.reference_ms = Some(ref_ms);
            }
            Err(e) => row.error = Some(e.to_string()),
        }
        rows.push(row);
    }
    Ok(KernelReport {
        config: config_name.to_string(),
        seq,
        subject: subject_name.to_string(),
        reference: "cpu-fp32".into(),
        tolerance_relative: rel,
        tolerance_absolute: abs,
        rows,
    })
}

/// Gather the whole report: probe and kernels on the ANE when it loads, on
/// the CPU in fp16 otherwise. Only a failure of the CPU reference is an error.
pub fn run(config_name: &str, seq: usize) -> Result<DoctorReport> {
    let config = ModelConfig::from_name_or_file(config_name)?;
    if seq == 0 || seq > config.seq_len {
        return Err(Error::Invalid(format!(
            "--seq {seq} must be between 1 and the model's seq_len {}",
            config.seq_len
        )));
    }
    let budget_limit = budget::CompileBudget::from_env()?.limit;
    let mut status = AneStatus {
        available: false,
        reason: None,
        framework: ane::ANE_FRAMEWORK.to_string(),
        framework_loaded: false,
        classes: Vec::new(),
        family: None,
        compile_budget: budget_limit,
    };
    let mut probe_report = None;
    let mut checks = Vec::new();
    let mut dialect = None;
    let auto_reason;
    let opened = ane::open();
    let kernels = match opened {
        Ok((mut backend, family)) => {
            status.framework_loaded = true;
            status.family = Some(family);
            let runtime = backend.runtime();
            status.classes = REQUIRED_CLASSES
                .iter()
                .chain(&["_ANEDeviceInfo"])
                .map(|c| (c.to_string(), runtime.has_class(c)))
                .collect();
            let chip = probe::examine(&mut backend);
            status.available = chip.dialect.is_some();
            if let Some(first) = chip.checks.first() {
                status.reason = first.result.clone().err();
                probe_report = Some(probe_row(&first.result));
            }
            auto_reason = chip.training_refusal();
            dialect = chip.dialect.map(|d| d.opset().to_string());
            checks = chip
                .checks
                .iter()
                .map(|c| CheckReport {
                    name: c.name.to_string(),
                    dialect: c.dialect.opset().to_string(),
                    needed_for: c.needed_for.to_string(),
                    result: probe_row(&c.result),
                })
                .collect();
            compare_kernels(&mut backend, "ane", config_name, &config, seq)?
        }
        Err(e) => {
            // A missing class means the framework itself loaded.
            status.framework_loaded = matches!(
                &e,
                Error::Backend {
                    step: "class lookup",
                    ..
                }
            );
            status.reason = Some(e.to_string());
            auto_reason = status.reason.clone();
            let mut cpu = CpuBackend::new(Precision::Fp16);
            compare_kernels(&mut cpu, "cpu-fp16", config_name, &config, seq)?
        }
    };
    Ok(DoctorReport {
        anemone_version: env!("CARGO_PKG_VERSION").to_string(),
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        os_version: os_version(),
        chip: chip_name(),
        auto_backend: if auto_reason.is_none() { "ane" } else { "cpu" }.into(),
        auto_reason,
        ane: status,
        probe: probe_report,
        checks,
        dialect,
        energy: energy_report(),
        kernels,
    })
}

fn probe_row(result: &std::result::Result<probe::ProbeResult, String>) -> ProbeReport {
    match result {
        Ok(p) => ProbeReport {
            ok: true,
            error: None,
            max_error: Some(p.max_error),
            compile_ms: Some(p.compile_ms),
            run_ms: Some(p.run_ms),
        },
        Err(e) => ProbeReport {
            ok: false,
            error: Some(e.clone()),
            max_error: None,
            compile_ms: None,
            run_ms: None,
        },
    }
}

/// The energy counters, and 200 ms of the idle machine through them.
fn energy_report() -> EnergyReport {
    let reason = crate::energy::unavailable_reason();
    let span = crate::energy::start();
    if reason.is_none() {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    EnergyReport {
        available: reason.is_none(),
        reason,
        idle_sample: span.finish(1, 0),
    }
}

fn opt<T: std::fmt::Display>(v: &Option<T>, f: impl Fn(&T) -> String) -> String {
    v.as_ref().map(f).unwrap_or_else(|| "-".into())
}

/// The report as the table `doctor` prints.
pub fn format(report: &DoctorReport) -> String {
    let mut s = String::new();
    let a = &report.ane;
    s += &format!(
        "anemone {}\nos:        {} {} ({})\nchip:      {}\n",
        report.anemone_version,
        report.os,
        report.arch,
        report.os_version.as_deref().unwrap_or("unknown version"),
        report.chip.as_deref().unwrap_or("unknown"),
    );
    s += &format!(
        "framework: {} ({})\n",
        if a.framework_loaded {
            "loaded"
        } else {
            "not loaded"
        },
        a.framework
    );
    for (class, ok) in &a.classes {
        s += &format!(
            "class:     {class} {}\n",
            if *ok { "ok" } else { "MISSING" }
        );
    }
    s += &format!(
        "ane:       {}{}\n",
        if a.available {
            "available"
        } else {
            "unavailable"
        },
        opt(&a.family, |f| format!(", family {f}"))
    );
    if let Some(reason) = &a.reason {
        s += &format!("reason:    {reason}\n");
    }
    s += &format!("budget:    {} compiles per process\n", a.compile_budget);
    s += &format!(
        "backend:   {} (what `--backend auto` picks){}\n",
        report.auto_backend,
        opt(&report.auto_reason, |r| format!(": {r}"))
    );
    if let Some(d) = &report.dialect {
        s += &format!("dialect:   {d}\n");
    }
    for c in &report.checks {
        let p = &c.result;
        s += &format!(
            "check:     {} ({}): {}\n",
            c.name,
            c.dialect,
            if p.ok {
                format!(
                    "ok (max error {})",
                    opt(&p.max_error, |e| format!("{e:.2e}"))
                )
            } else {
                format!(
                    "REFUSED: {}; needed by {}",
                    p.error.as_deref().unwrap_or("?"),
                    c.needed_for
                )
            }
        );
    }
    let e = &report.energy;
    s += &format!(
        "energy:    {}\n",
        match &e.reason {
            Some(reason) => format!("unavailable ({reason})"),
            None => format!(
                "IOReport counters; idle 200 ms: cpu {} J, gpu {} J, ane {} J",
                e.idle_sample.cpu_j, e.idle_sample.gpu_j, e.idle_sample.ane_j
            ),
        }
    );
    match &report.probe {
        Some(p) if p.ok => {
            s += &format!(
                "probe:     ok (max error {}, compile {} ms, run {} ms)\n",
                opt(&p.max_error, |e| format!("{e:.2e}")),
                opt(&p.compile_ms, |m| format!("{m:.1}")),
                opt(&p.run_ms, |m| format!("{m:.3}"))
            )
        }
        Some(p) => s += &format!("probe:     FAILED: {}\n", p.error.as_deref().unwrap_or("?")),
        None => s += "probe:     not run (no ANE)\n",
    }
    let k = &report.kernels;
    s += &format!(
        "\nkernels of `{}` (seq {}), {} vs {} (tolerance {} x scale + {}):\n",
        k.config, k.seq, k.subject, k.reference, k.tolerance_relative, k.tolerance_absolute
    );
    s += &format!(
        "{:<16} {:>12} {:>12} {:>10} {:>9} {:>11} {:>11}  {}\n",
        "kernel",
        "input",
        "output",
        "max err",
        "scale",
        "subject ms",
        "cpu32 ms",
        "result (ANE rules tripped)"
    );
    for r in &k.rows {
        s += &format!(
            "{:<16} {:>12} {:>12} {:>10} {:>9} {:>11} {:>11}  {}\n",
            r.kernel,
            format!("{}x{}", r.input[0], r.input[1]),
            format!("{}x{}", r.output[0], r.output[1]),
            opt(&r.max_error, |e| format!("{e:.2e}")),
            opt(&r.scale, |e| format!("{e:.2}")),
            opt(&r.subject_ms, |m| format!("{m:.2}")),
            opt(&r.reference_ms, |m| format!("{m:.2}")),
            match (&r.error, r.ok) {
                (Some(e), _) => format!("ERROR {e}"),
                (None, true) => "ok".into(),
                (None, false) => "MISMATCH".into(),
            } + &if r.ane_rules.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.ane_rules.join(", "))
            }
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_fp16_kernels_stay_within_the_tolerance_of_fp32_and_a_wrong_layout_does_not() {
        let config = ModelConfig::llama(64, 1, 4, 2, 128, 64, 32);
        let mut cpu = CpuBackend::new(Precision::Fp16);
        let report = compare_kernels(&mut cpu, "cpu-fp16", "test", &config, 32).unwrap();
        // The nine kernels of the set, then attn_bwd's split, then LoRA's nine.
        assert_eq!(report.rows.len(), 20);
        assert_eq!(report.rows[9].kernel, "attn_bwd_dv");
        assert_eq!(report.rows[10].kernel, "attn_bwd_dqk");
        assert_eq!(report.rows[11].kernel, "lora:attn_fwd");
        assert_eq!(report.rows[19].kernel, "lora:kv_bwd");
        for r in &report.rows {
            assert!(r.ok, "{r:?}");
            assert!(r.max_error.unwrap() > 0.0, "fp16 differs from fp32: {r:?}");
        }
        // The tolerance rejects outputs read from the wrong place: swap two rows.
        let spec = &LayerKernels::build(
            &config,
            32,
            KernelOptions {
                dtype: DType::Fp16,
                mode: WeightMode::Packed,
                ..KernelOptions::cpu()
            },
            &|_| None,
        )
        .unwrap()
        .wo_fwd;
        let inputs = kernel_inputs(spec, &spec.program.main.inputs, 3);
        let (want, _) = run_kernel(&mut CpuBackend::new(Precision::Fp32), spec, &inputs).unwrap();
        let mut wrong = want.clone();
        wrong[0].rotate_left(32);
        let (err, scale) = max_error(&wrong, &want);
        assert!(err > KERNEL_TOLERANCE.0 * scale + KERNEL_TOLERANCE.1);
    }
}
