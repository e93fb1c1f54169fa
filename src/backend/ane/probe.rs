//! The probe kernels, each run and compared with the CPU interpreter. First
//! the smallest program the reference saw work on every chip it tried (a
//! 256-channel 1x1 conv at spatial 64 with fp32 I/O and in-graph casts,
//! ane-reference §1.6 `test_qos_sweep`, §8.2 commit 184b182), in the ios16
//! dialect (`program(1.0)`, fp16 I/O) where ios18 is refused; then what the
//! packed training kernels need and other projects saw chips refuse:
//! width-axis slice/concat/reshape (M3 Ultra) and matmul on runtime tensors
//! (M1/M2). [`examine`] runs them; `--backend auto` uses the ANE only when
//! [`ChipReport::training_refusal`] finds nothing, and `doctor` shows them all.

use std::time::Instant;

use super::{AneBackend, Runtime};
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, Block, Precision};
use crate::blob::BlobWriter;
use crate::mil::{Builder, DType, Dialect, Tensor, TensorType};
use crate::package::ProgramPackage;
use crate::{Error, Result};

/// Channels and spatial width of the probe.
pub const PROBE_CHANNELS: usize = 256;
pub const PROBE_SPATIAL: usize = 64;

/// `y = cast32(conv1x1(cast16(x), W))` with a fixed, exactly representable `W`.
pub fn probe_package() -> ProgramPackage {
    let c = PROBE_CHANNELS;
    let mut b = Builder::new(Dialect::Ios18);
    let x = b.input("x", DType::Fp32, &[1, c, 1, PROBE_SPATIAL]);
    let x16 = b.cast(&x, DType::Fp16);
    let w = b.blob_const(TensorType::new(DType::Fp16, [c, c, 1, 1]), "w.bin", 64);
    let y16 = b.linear_conv1x1(&x16, &w);
    let y = b.cast(&y16, DType::Fp32);
    b.output(&y);
    let program = b.finish();
    // W = 0.5 I + 0.25 (shifted identity): every output is 0.5 x[c] + 0.25 x[c+1].
    let mut blob = BlobWriter::new();
    blob.add_fp16(&probe_matrix(c));
    ProgramPackage::from_program(&program, [("w.bin".to_string(), blob.finish())])
}

/// The probe input: small integers and halves, exact in fp16.
pub fn probe_input() -> Vec<f32> {
    small_values(PROBE_CHANNELS * PROBE_SPATIAL)
}

/// What one probe run found.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeResult {
    /// Largest |ANE - CPU| over the output.
    pub max_error: f32,
    /// Compile + load time.
    pub compile_ms: f64,
    /// One evaluation (after the first, which may initialise the device).
    pub run_ms: f64,
}

/// Largest absolute difference the probe tolerates (outputs are at most 12 in
/// magnitude; fp16 spacing there is 2^-7).
pub const PROBE_TOLERANCE: f32 = 1.0 / 64.0;

/// Compile, run and check the probe on `backend`.
pub fn run_probe<R: Runtime>(backend: &mut AneBackend<R>) -> Result<ProbeResult> {
    run_check(backend, &conv_check(Dialect::Ios18))
}

/// One probe kernel: what it checks, what needs it, its package and input.
pub struct Check {
    pub name: &'static str,
    /// What fails on a chip that refuses it, and where the report comes from.
    pub needed_for: &'static str,
    pub dialect: Dialect,
    pub package: ProgramPackage,
    pub input: Vec<f32>,
}

/// The conv probe in `dialect`: [`probe_package`] for ios18; for ios16 the
/// same conv with fp16 I/O and no `cast` (M1/M2 reportedly lack it), at
/// `[1, 256, 1, 96]` fp16 (49,152 bytes).
pub fn conv_check(dialect: Dialect) -> Check {
    let (package, input) = match dialect {
        Dialect::Ios18 => (probe_package(), probe_input()),
        Dialect::Ios16 => {
            let c = PROBE_CHANNELS;
            let mut b = Builder::new(dialect);
            let x = b.input("x", DType::Fp16, &[1, c, 1, 96]);
            let w = b.blob_const(TensorType::new(DType::Fp16, [c, c, 1, 1]), "w.bin", 64);
            let y = b.linear_conv1x1(&x, &w);
            b.output(&y);
            let mut blob = BlobWriter::new();
            blob.add_fp16(&probe_matrix(c));
            let package =
                ProgramPackage::from_program(&b.finish(), [("w.bin".to_string(), blob.finish())]);
            (package, small_values(c * 96))
        }
    };
    Check {
        name: "conv",
        needed_for: "every kernel (a 1x1 conv with baked weights, the form every chip ran)",
        dialect,
        package,
        input,
    }
}

/// `W = 0.5 I + 0.25 (shifted identity)` as a `(c, c)` matrix: every output
/// is `0.5 x[o] + 0.25 x[o+1]`, exact in fp16 for [`small_values`].
fn probe_matrix(c: usize) -> Vec<f32> {
    let mut weights = vec![0.0; c * c];
    for o in 0..c {
        weights[o * c + o] = 0.5;
        weights[o * c + (o + 1) % c] = 0.25;
    }
    weights
}

/// Small integers and halves, exact in fp16.
fn small_values(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7) % 33) as f32 * 0.5 - 8.0).collect()
}

/// `(C, S)` of the width and matmul probes: 128 channels, 256 positions plus
/// a 128-column packed matrix (the smallest output is 128 x 256 fp16, 64 KiB).
const PACKED_PROBE: (usize, usize) = (128, 256);

/// The probe's input and output in `dialect`: fp32 with casts in ios18 (the
/// form probes ran on M5), fp16 in ios16 (no `cast` on M1/M2).
fn probe_io(b: &mut Builder, dialect: Dialect, shape: &[usize]) -> (Tensor, DType) {
    match dialect {
        Dialect::Ios18 => {
            let x = b.input("x", DType::Fp32, shape);
            (b.cast(&x, DType::Fp16), DType::Fp32)
        }
        Dialect::Ios16 => (b.input("x", DType::Fp16, shape), DType::Fp16),
    }
}

fn probe_output(b: &mut Builder, y: &Tensor, io: DType) {
    let y = if io == DType::Fp16 {
        y.clone()
    } else {
        b.cast(y, io)
    };
    b.output(&y);
}

/// Width-axis slices, concat and reshape, the moves the packed-weight kernels
/// make (reported refused on an M3 Ultra, rustane#9): the two halves of the
/// width swapped, through a reshape that splits the width.
pub fn width_check(dialect: Dialect) -> Check {
    let (c, s) = (PACKED_PROBE.0, 2 * PACKED_PROBE.1);
    let mut b = Builder::new(dialect);
    let (x, io) = probe_io(&mut b, dialect, &[1, c, 1, s]);
    let left = b.slice_by_size(&x, &[0, 0, 0, 0], &[1, c, 1, s / 2]);
    let right = b.slice_by_size(&x, &[0, 0, 0, s / 2], &[1, c, 1, s / 2]);
    let swapped = b.concat(&[&right, &left], 3);
    let split = b.reshape(&swapped, &[1, c, 16, s / 16]);
    let y = b.reshape(&split, &[1, c, 1, s]);
    probe_output(&mut b, &y, io);
    Check {
        name: "width-axis slice/concat/reshape",
        needed_for: "the packed-weight training kernels (reported refused on an M3 Ultra, rustane#9); \
                     baked weights, as LoRA uses, avoid them",
        dialect,
        package: ProgramPackage::from_program(&b.finish(), []),
        input: small_values(c * s),
    }
}

/// `matmul` on runtime tensors, as the packed-weight kernels compute every
/// linear layer (reported to fail on M1/M2): activations `(C, S)` and the
/// matrix [`probe_matrix`] packed along the width of one input.
pub fn matmul_check(dialect: Dialect) -> Check {
    let (c, s) = PACKED_PROBE;
    let mut b = Builder::new(dialect);
    let (x, io) = probe_io(&mut b, dialect, &[1, c, 1, s + c]);
    let act = b.slice_by_size(&x, &[0, 0, 0, 0], &[1, c, 1, s]);
    let m = b.slice_by_size(&x, &[0, 0, 0, s], &[1, c, 1, c]);
    let y = b.linear_dynamic(&act, &m);
    probe_output(&mut b, &y, io);
    // Row i: activations x[i, 0..S), then M[i, 0..C) with M = W^T.
    let w = probe_matrix(c);
    let act = small_values(c * s);
    let mut input = Vec::with_capacity(c * (s + c));
    for i in 0..c {
        input.extend_from_slice(&act[i * s..(i + 1) * s]);
        input.extend((0..c).map(|o| w[o * c + i]));
    }
    Check {
        name: "runtime matmul",
        needed_for: "the packed-weight training kernels (matmul on runtime tensors was reported to fail on M1/M2)",
        dialect,
        package: ProgramPackage::from_program(&b.finish(), []),
        input,
    }
}

/// Compile, run (twice: the first may initialise the device) and check `check`
/// against the CPU interpreter in fp16; the kernel is released afterwards.
pub fn run_check<R: Runtime>(backend: &mut AneBackend<R>, check: &Check) -> Result<ProbeResult> {
    let package = &check.package;
    let started = Instant::now();
    let kernel = backend.compile(package)?;
    let compile_ms = started.elapsed().as_secs_f64() * 1e3;
    let info = backend.kernel_info(kernel).clone();
    let x = backend.alloc(&info.inputs[0].ty)?;
    let y = backend.alloc(&info.outputs[0].ty)?;
    let input = &check.input;
    backend.write(x, Block::whole(&info.inputs[0].ty), input)?;
    backend.run(kernel, &[x], &[y])?;
    let started = Instant::now();
    backend.run(kernel, &[x], &[y])?;
    let run_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut got = vec![0.0; info.outputs[0].ty.numel()];
    backend.read(y, Block::whole(&info.outputs[0].ty), &mut got)?;
    backend.release(kernel)?;

    let mut cpu = CpuBackend::new(Precision::Fp16);
    let k = cpu.compile(package)?;
    let (cx, cy) = (
        cpu.alloc(&info.inputs[0].ty)?,
        cpu.alloc(&info.outputs[0].ty)?,
    );
    cpu.write(cx, Block::whole(&info.inputs[0].ty), input)?;
    cpu.run(k, &[cx], &[cy])?;
    let mut want = vec![0.0; got.len()];
    cpu.read(cy, Block::whole(&info.outputs[0].ty), &mut want)?;

    let max_error = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0f32, |m, e| if e.is_nan() { f32::NAN } else { m.max(e) });
    if max_error.is_nan() || max_error > PROBE_TOLERANCE {
        return Err(Error::Backend {
            backend: "ane",
            step: "evaluate",
            msg: format!(
                "{} probe output differs from the CPU by {max_error} (tolerance {PROBE_TOLERANCE})",
                check.name
            ),
        });
    }
    Ok(ProbeResult {
        max_error,
        compile_ms,
        run_ms,
    })
}

/// One probe's outcome.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckOutcome {
    pub name: &'static str,
    pub needed_for: &'static str,
    pub dialect: Dialect,
    /// The measurement, or the error text (naming the step).
    pub result: std::result::Result<ProbeResult, String>,
}

/// What the chip takes, probed in order: the conv probe in ios18, else in
/// ios16 (`program(1.0)`, M1/M2's dialect); then in that dialect the
/// width-axis moves and runtime matmul that the packed training kernels need.
#[derive(Clone, Debug, PartialEq)]
pub struct ChipReport {
    /// The dialect the conv probe ran in; `None` when it ran in neither.
    pub dialect: Option<Dialect>,
    pub checks: Vec<CheckOutcome>,
}

impl ChipReport {
    /// Why the packed-weight training kernels cannot run on this chip, or `None`.
    pub fn training_refusal(&self) -> Option<String> {
        let error = |c: &CheckOutcome| c.result.clone().err().unwrap_or_default();
        let Some(dialect) = self.dialect else {
            let errors: Vec<String> = self
                .checks
                .iter()
                .map(|c| format!("{}: {}", c.dialect.opset(), error(c)))
                .collect();
            return Some(format!(
                "the probe kernel (a 1x1 conv) failed in both dialects ({})",
                errors.join("; ")
            ));
        };
        for name in ["width-axis slice/concat/reshape", "runtime matmul"] {
            if let Some(c) = self
                .checks
                .iter()
                .find(|c| c.name == name && c.dialect == dialect && c.result.is_err())
            {
                return Some(format!(
                    "the {} probe failed ({}); needed by {}",
                    c.name,
                    error(c),
                    c.needed_for
                ));
            }
        }
        None
    }

    /// One line: what passed, in which dialect.
    pub fn summary(&self) -> String {
        let dialect = self.dialect.map_or("none", Dialect::opset);
        let passed: Vec<&str> = self
            .checks
            .iter()
            .filter(|c| c.result.is_ok())
            .map(|c| c.name)
            .collect();
        format!("dialect {dialect}; probes passed: {}", passed.join(", "))
    }
}

fn outcome<R: Runtime>(backend: &mut AneBackend<R>, check: Check) -> CheckOutcome {
    CheckOutcome {
        name: check.name,
        needed_for: check.needed_for,
        dialect: check.dialect,
        result: run_check(backend, &check).map_err(|e| e.to_string()),
    }
}

/// Probe the chip behind `backend` (up to four compiles, each released), and
/// set the backend's dialect to the one the conv probe ran in.
pub fn examine<R: Runtime>(backend: &mut AneBackend<R>) -> ChipReport {
    let mut checks = vec![outcome(backend, conv_check(Dialect::Ios18))];
    let mut dialect = checks[0].result.is_ok().then_some(Dialect::Ios18);
    if dialect.is_none() {
        checks.push(outcome(backend, conv_check(Dialect::Ios16)));
        dialect = checks[1].result.is_ok().then_some(Dialect::Ios16);
    }
    if let Some(d) = dialect {
        backend.set_dialect(d);
        checks.push(outcome(backend, width_check(d)));
        checks.push(outcome(backend, matmul_check(d)));
    }
    ChipReport { dialect, checks }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ane::budget::CompileBudget;
    use crate::backend::ane::fake::FakeRuntime;
    use crate::mil::verify::Target;

    #[test]
    fn probe_is_a_clean_ane_program_and_passes_on_the_fake_runtime() {
        let report = probe_package().verify(Target::Ane).unwrap();
        assert!(report.diagnostics.is_empty(), "{:?}", report.diagnostics);
        let mut backend = AneBackend::new(FakeRuntime::in_temp_dir(), CompileBudget::default());
        let r = run_probe(&mut backend).unwrap();
        assert_eq!(r.max_error, 0.0);
        assert_eq!(backend.runtime().evaluations(), 2);
        assert_eq!(
            backend.request_count(),
            1,
            "the second run reuses the request"
        );
        // Independent check of one output: 0.5 x[c] + 0.25 x[c+1] at (c=0, s=0).
        let x = probe_input();
        let expect = 0.5 * x[0] + 0.25 * x[PROBE_SPATIAL];
        let mut cpu = CpuBackend::new(Precision::Fp32);
        let k = cpu.compile(&probe_package()).unwrap();
        let ty = TensorType::new(DType::Fp32, [1, PROBE_CHANNELS, 1, PROBE_SPATIAL]);
        let (a, b) = (cpu.alloc(&ty).unwrap(), cpu.alloc(&ty).unwrap());
        cpu.write(a, Block::whole(&ty), &x).unwrap();
        cpu.run(k, &[a], &[b]).unwrap();
        let mut y = vec![0.0; x.len()];
        cpu.read(b, Block::whole(&ty), &mut y).unwrap();
        assert_eq!(y[0], expect);
    }
}
