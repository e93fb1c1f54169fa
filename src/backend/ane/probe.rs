//! The probe kernel: the smallest program the reference saw work on every chip
//! it tried (a 256-channel 1x1 conv at spatial 64 with fp32 I/O and in-graph
//! casts, ane-reference §1.6 `test_qos_sweep`, §8.2 commit 184b182), run once
//! and compared with the CPU interpreter. Used by `--backend auto` to decide
//! whether the ANE works, and by `doctor`.

use std::time::Instant;

use super::{AneBackend, Runtime};
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, Block, Precision};
use crate::blob::BlobWriter;
use crate::mil::{Builder, DType, Dialect, TensorType};
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
    let mut weights = vec![0.0; c * c];
    for o in 0..c {
        weights[o * c + o] = 0.5;
        weights[o * c + (o + 1) % c] = 0.25;
    }
    let mut blob = BlobWriter::new();
    blob.add_fp16(&weights);
    ProgramPackage::from_program(&program, [("w.bin".to_string(), blob.finish())])
}

/// The probe input: small integers and halves, exact in fp16.
pub fn probe_input() -> Vec<f32> {
    (0..PROBE_CHANNELS * PROBE_SPATIAL)
        .map(|i| ((i * 7) % 33) as f32 * 0.5 - 8.0)
        .collect()
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
    let package = probe_package();
    let started = Instant::now();
    let kernel = backend.compile(&package)?;
    let compile_ms = started.elapsed().as_secs_f64() * 1e3;
    let info = backend.kernel_info(kernel).clone();
    let x = backend.alloc(&info.inputs[0].ty)?;
    let y = backend.alloc(&info.outputs[0].ty)?;
    let input = probe_input();
    backend.write(x, Block::whole(&info.inputs[0].ty), &input)?;
    backend.run(kernel, &[x], &[y])?;
    let started = Instant::now();
    backend.run(kernel, &[x], &[y])?;
    let run_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut got = vec![0.0; input.len()];
    backend.read(y, Block::whole(&info.outputs[0].ty), &mut got)?;

    let mut cpu = CpuBackend::new(Precision::Fp16);
    let k = cpu.compile(&package)?;
    let (cx, cy) = (
        cpu.alloc(&info.inputs[0].ty)?,
        cpu.alloc(&info.outputs[0].ty)?,
    );
    cpu.write(cx, Block::whole(&info.inputs[0].ty), &input)?;
    cpu.run(k, &[cx], &[cy])?;
    let mut want = vec![0.0; input.len()];
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
                "probe kernel output differs from the CPU by {max_error} (tolerance {PROBE_TOLERANCE})"
            ),
        });
    }
    Ok(ProbeResult {
        max_error,
        compile_ms,
        run_ms,
    })
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
