//! The ANE micro-benchmarks (issue 4 item 6, after the reference's programs in
//! ane-reference §7.2), written against `&mut dyn Backend` so that the same
//! programs run on the ANE and, here and in CI, on the CPU backend:
//!
//! | suite | question | kernel |
//! |---|---|---|
//! | [`peak`] | peak throughput | `d` chained 1x1 convs `C -> C` (`inmem_peak`: 128 x conv 512ch sp64) |
//! | [`dispatch`] | fixed cost of one evaluation | one tiny op, with and without host I/O |
//! | [`sram`] | where the weights stop fitting on chip | one `C -> C` layer per size (`sram_bench`), conv and matmul |
//! | [`conv_vs_matmul`] | cost of runtime weights | the same linear layer as conv, const matmul, packed matmul |
//! | [`int8`] | INT8 W8A8 vs FP16 | `ane_int8_bench`'s conv stack, int8 weights and activations |
//!
//! Every kernel is built with the MIL [`Builder`], packaged as a
//! [`ProgramPackage`] (all weights as records of one `weight.bin`, as the
//! reference's benchmarks write them), verified against the ANE rule
//! catalogue (errors fail the suite, warnings are allowed), compiled and run
//! through the trait, and released when measured. All kernel I/O is fp16
//! `[1, C, H, W]`, padded where a shape is below the ANE's I/O rules
//! (`mil::layout`: the padding is sliced away unread, FLOPs and sizes count
//! the benchmark's shape); inputs
//! hold seeded random values scaled so activations stay O(1) through a stack
//! (weights uniform in `±sqrt(3 / C_in)`), which keeps the CPU away from
//! denormals and the ANE away from fp16 overflow.
//!
//! ## FLOP accounting
//! - A linear layer (1x1 conv or matmul) `C_in -> C_out` over `S` positions
//!   (`S = H * W`) is `2 * C_in * C_out * S` FLOPs (one multiply and one add per
//!   weight per position); a stack sums its layers (`d` layers `C -> C`: `2 * C^2 * S * d`).
//! - `quantize`/`dequantize`, reshapes, transposes and slices count 0 FLOPs, so
//!   INT8 and FP16 rows of one config carry the same count.
//! - GFLOP/s = FLOPs / median seconds / 1e9 (the reference divides the total of
//!   N back-to-back evaluations by N instead; same unit, TFLOPS = GFLOP/s / 1000).
//! - The dispatch suite counts no FLOPs; it reports time per evaluation.
//! - Weight sizes are MiB (2^20 bytes) of the stored tensors: fp16 2 bytes and
//!   int8 1 byte per element, as the reference's `W (MB)` columns.
//!
//! This module does not pick the backend, parse arguments or print (the CLI
//! does), and it makes no claim about what the numbers should be.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{Repeat, Row, Stats, gflops, mib, time_ms};
use crate::backend::{Backend, Block, BufferId, KernelId};
use crate::blob::BlobWriter;
use crate::energy::{self, Energy};
use crate::mil::verify::Target;
use crate::mil::{Builder, DType, Dialect, TensorType, layout};
use crate::package::ProgramPackage;
use crate::rng::Rng;
use crate::{Error, Result};

/// Receives one line per finished measurement (the CLI prints it to stderr).
pub type Progress<'a> = &'a mut dyn FnMut(&str);

/// Activation quantization scale of the W8A8 kernels: int8 covers `±4`.
pub const ACT_SCALE: f32 = 4.0 / 127.0;

// ---- kernel shapes and forms -------------------------------------------------

/// The shape of a benchmark kernel: `depth` chained linear layers over a
/// `[1, C, height, width]` activation, the first `c_in -> c_out`, the others
/// `c_out -> c_out`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stack {
    pub c_in: usize,
    pub c_out: usize,
    pub height: usize,
    pub width: usize,
    pub depth: usize,
}

impl Stack {
    /// `depth` layers `channels -> channels` over `[1, C, 1, spatial]`.
    pub fn square(channels: usize, spatial: usize, depth: usize) -> Stack {
        Stack {
            c_in: channels,
            c_out: channels,
            height: 1,
            width: spatial,
            depth,
        }
    }

    /// Positions `S = height * width`.
    pub fn positions(&self) -> usize {
        self.height * self.width
    }

    /// `(C_in, C_out)` of layer `layer`.
    pub fn layer_dims(&self, layer: usize) -> (usize, usize) {
        if layer == 0 {
            (self.c_in, self.c_out)
        } else {
            (self.c_out, self.c_out)
        }
    }

    /// Weight elements over all layers.
    pub fn weight_elements(&self) -> usize {
        (0..self.depth)
            .map(|l| {
                let (i, o) = self.layer_dims(l);
                i * o
            })
            .sum()
    }

    /// FLOPs of one evaluation: `2 * S * sum(C_in * C_out)` over the layers.
    pub fn flops(&self) -> u64 {
        2 * (self.positions() * self.weight_elements()) as u64
    }

    /// Short label, e.g. `128x conv 512ch sp64` style: `512->512 1x64 d128`.
    pub fn label(&self) -> String {
        let channels = if self.c_in == self.c_out {
            format!("{}ch", self.c_in)
        } else {
            format!("{}->{}ch", self.c_in, self.c_out)
        };
        let spatial = if self.height == 1 {
            format!("sp{}", self.width)
        } else {
            format!("sp{}x{}", self.height, self.width)
        };
        format!("{}x {channels} {spatial}", self.depth)
    }

    fn check(&self) -> Result<()> {
        if self.c_in == 0 || self.c_out == 0 || self.positions() == 0 || self.depth == 0 {
            return Err(Error::Invalid(format!(
                "benchmark shape {}: channels, spatial size and depth must be positive",
                self.label()
            )));
        }
        Ok(())
    }
}

/// How a kernel computes its linear layers and where their weights live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Form {
    /// 1x1 `conv` with fp16 BLOBFILE weights (weights baked at compile time).
    Conv,
    /// 1x1 `conv` with int8 weights through `constexpr_affine_dequantize`, and
    /// a `quantize`/`dequantize` int8 pair after every layer but the last (W8A8).
    ConvInt8,
    /// `matmul` with fp16 BLOBFILE weights, activations transposed to
    /// `[1, 1, S, C]` once at the start and back once at the end.
    MatmulConst,
    /// `matmul` with the weights as data: packed after the activation along the
    /// spatial axis of the single input and sliced out (the dynamic pipeline).
    MatmulPacked,
}

impl Form {
    pub const ALL: [Form; 4] = [
        Form::Conv,
        Form::ConvInt8,
        Form::MatmulConst,
        Form::MatmulPacked,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Form::Conv => "conv",
            Form::ConvInt8 => "conv-int8",
            Form::MatmulConst => "matmul-const",
            Form::MatmulPacked => "matmul-packed",
        }
    }

    /// Bytes per stored weight element.
    pub fn weight_bytes(self) -> usize {
        match self {
            Form::ConvInt8 => 1,
            _ => 2,
        }
    }
}

impl fmt::Display for Form {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Form {
    type Err = Error;
    fn from_str(s: &str) -> Result<Form> {
        Form::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| Error::unknown_name("kernel form", s, &Form::ALL.map(Form::name)))
    }
}

/// A benchmark program and how to fill its inputs.
#[derive(Clone, Debug)]
pub struct BenchKernel {
    pub name: String,
    pub package: ProgramPackage,
    /// Inputs are filled uniformly in `±input_amplitude`.
    pub input_amplitude: f32,
}

fn uniform(rng: &mut Rng, n: usize, amplitude: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.next_f32() * 2.0 - 1.0) * amplitude)
        .collect()
}

/// Weight amplitude that keeps activation variance through a `c_in`-wide layer.
fn weight_amplitude(c_in: usize) -> f32 {
    (3.0 / c_in as f32).sqrt()
}

/// Build the kernel computing `stack` in `form`; weights are seeded by `seed`.
pub fn build(form: Form, stack: &Stack, seed: u64) -> Result<BenchKernel> {
    stack.check()?;
    let mut rng = Rng::new(seed);
    let name = format!("{form} {}", stack.label());
    let (package, input_amplitude) = match form {
        Form::Conv | Form::ConvInt8 => (conv_stack(stack, form == Form::ConvInt8, &mut rng), 1.0),
        Form::MatmulConst | Form::MatmulPacked => {
            if stack.height != 1 {
                return Err(Error::Invalid(format!(
                    "{name}: matmul kernels take [1, C, 1, S] inputs (height 1)"
                )));
            }
            let packed = form == Form::MatmulPacked;
            if packed && stack.depth > 1 && stack.c_in != stack.c_out {
                return Err(Error::Invalid(format!(
                    "{name}: packed weights of a stack deeper than 1 need C_in == C_out \
                     (every matrix is packed along the input's {} channels)",
                    stack.c_in
                )));
            }
            let amplitude = if packed {
                weight_amplitude(stack.c_in)
            } else {
                1.0
            };
            (matmul_stack(stack, packed, &mut rng), amplitude)
        }
    };
    Ok(BenchKernel {
        name,
        package,
        input_amplitude,
    })
}

/// The one weight file of a benchmark kernel (rule ANE021).
const WEIGHT_FILE: &str = "weight.bin";

/// `d` chained 1x1 convs over `[1, C, H, W]`, fp16 or W8A8.
fn conv_stack(stack: &Stack, int8: bool, rng: &mut Rng) -> ProgramPackage {
    let mut b = Builder::new(Dialect::Ios18);
    let shape = [1, stack.c_in, stack.height, stack.width];
    let (_, mut h) = b.padded_input("x", DType::Fp16, shape);
    let pad_output =
        layout::output_needs_padding(stack.c_out, stack.height, stack.width, DType::Fp16);
    let mut blob = BlobWriter::new();
    for layer in 0..stack.depth {
        let (c_in, c_out) = stack.layer_dims(layer);
        let shape = [c_out, c_in, 1, 1]; // (C_out, C_in, 1, 1)
        let amplitude = weight_amplitude(c_in);
        let weight = if int8 {
            let q: Vec<i8> = (0..c_in * c_out)
                .map(|_| (rng.below(255) as i64 - 127) as i8)
                .collect();
            let offset = blob.add_int8(&q);
            let ty = TensorType::new(DType::Int8, shape);
            b.affine_dequantize_blob(ty, WEIGHT_FILE, offset, amplitude / 127.0, DType::Fp16)
        } else {
            let offset = blob.add_fp16(&uniform(rng, c_in * c_out, amplitude));
            b.blob_const(TensorType::new(DType::Fp16, shape), WEIGHT_FILE, offset)
        };
        let last = layer + 1 == stack.depth;
        if last && !pad_output {
            b.name_next("y");
        }
        h = b.conv(&h, &weight, 1);
        if int8 && !last {
            let q = b.quantize(&h, ACT_SCALE, DType::Int8);
            h = b.dequantize(&q, ACT_SCALE, DType::Fp16);
        }
    }
    let y = b.padded_output(&[&h], "y");
    b.output(&y);
    ProgramPackage::from_program(&b.finish(), [(WEIGHT_FILE.to_string(), blob.finish())])
}

/// `d` chained matmuls on `[1, 1, S, C]`, weights const or packed in the input.
fn matmul_stack(stack: &Stack, packed: bool, rng: &mut Rng) -> ProgramPackage {
    let seq = stack.width;
    let mut b = Builder::new(Dialect::Ios18);
    let packed_cols: usize = (0..stack.depth).map(|l| stack.layer_dims(l).1).sum();
    let width = if packed { seq + packed_cols } else { seq };
    // Spare rows and columns up to the ANE's I/O rules (mil::layout), unread.
    let padded = layout::padded_io(stack.c_in, 1, width, DType::Fp16);
    let x = b.input("x", DType::Fp16, &[1, padded.0, 1, padded.1]);
    let act = if packed || padded != (stack.c_in, width) {
        b.slice_by_size(&x, &[0, 0, 0, 0], &[1, stack.c_in, 1, seq])
    } else {
        x.clone()
    };
    let a = b.reshape(&act, &[1, 1, stack.c_in, seq]); // (1, 1, C_in, S)
    let mut h = b.transpose(&a, &[0, 1, 3, 2]); // (1, 1, S, C_in)
    let mut blob = BlobWriter::new();
    let mut col = seq;
    for layer in 0..stack.depth {
        let (c_in, c_out) = stack.layer_dims(layer);
        let weight = if packed {
            let m = b.slice_by_size(&x, &[0, 0, 0, col], &[1, c_in, 1, c_out]);
            col += c_out;
            b.reshape(&m, &[1, 1, c_in, c_out])
        } else {
            let offset = blob.add_fp16(&uniform(rng, c_in * c_out, weight_amplitude(c_in)));
            b.blob_const(
                TensorType::new(DType::Fp16, [1, 1, c_in, c_out]),
                WEIGHT_FILE,
                offset,
            )
        };
        h = b.matmul(&h, &weight, false, false); // (1, 1, S, C_out)
    }
    let t = b.transpose(&h, &[0, 1, 3, 2]); // (1, 1, C_out, S)
    if !layout::output_needs_padding(stack.c_out, 1, seq, DType::Fp16) {
        b.name_next("y");
    }
    let y = b.reshape(&t, &[1, stack.c_out, 1, seq]);
    let y = b.padded_output(&[&y], "y");
    b.output(&y);
    let files = if packed {
        Vec::new()
    } else {
        vec![(WEIGHT_FILE.to_string(), blob.finish())]
    };
    ProgramPackage::from_program(&b.finish(), files)
}

/// The dispatch probe: `y = x * 0.5` on `[1, C, 1, S]`, one op and no weights
/// (plus the ANE's I/O padding for shapes below its rules).
pub fn scale_kernel(channels: usize, spatial: usize) -> BenchKernel {
    let mut b = Builder::new(Dialect::Ios18);
    let (_, x) = b.padded_input("x", DType::Fp16, [1, channels, 1, spatial]);
    let half = b.scalar(DType::Fp16, 0.5);
    if !layout::output_needs_padding(channels, 1, spatial, DType::Fp16) {
        b.name_next("y");
    }
    let y = b.mul(&x, &half);
    let y = b.padded_output(&[&y], "y");
    b.output(&y);
    BenchKernel {
        name: format!("mul {channels}ch sp{spatial}"),
        package: ProgramPackage::from_program(&b.finish(), Vec::new()),
        input_amplitude: 1.0,
    }
}

// ---- compiling and timing ---------------------------------------------------------

/// A compiled kernel with random inputs and its output buffers.
struct Loaded {
    kernel: KernelId,
    inputs: Vec<BufferId>,
    outputs: Vec<BufferId>,
}

/// Verify `k` against the ANE rules, compile it, allocate and fill its buffers.
fn load(backend: &mut dyn Backend, k: &BenchKernel, seed: u64) -> Result<Loaded> {
    let context = |e: Error| Error::Invalid(format!("benchmark kernel `{}`: {e}", k.name));
    k.package
        .verify(Target::Ane)
        .and_then(|report| report.into_result())
        .map_err(context)?;
    let kernel = backend.compile(&k.package).map_err(context)?;
    let info = backend.kernel_info(kernel).clone();
    let mut rng = Rng::new(seed);
    let mut inputs = Vec::with_capacity(info.inputs.len());
    for var in &info.inputs {
        let buffer = backend.alloc(&var.ty).map_err(context)?;
        let values = uniform(&mut rng, var.ty.numel(), k.input_amplitude);
        backend
            .write(buffer, Block::whole(&var.ty), &values)
            .map_err(context)?;
        inputs.push(buffer);
    }
    let mut outputs = Vec::with_capacity(info.outputs.len());
    for var in &info.outputs {
        outputs.push(backend.alloc(&var.ty).map_err(context)?);
    }
    Ok(Loaded {
        kernel,
        inputs,
        outputs,
    })
}

/// [`time_ms`] plus the energy of the timed repetitions (not the warm-up),
/// each of which processes `tokens` tokens (positions).
fn timed(
    repeat: Repeat,
    tokens: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<(Stats, Energy)> {
    for _ in 0..repeat.warmup {
        f()?;
    }
    let span = energy::start();
    let stats = time_ms(Repeat::new(0, repeat.reps), f)?;
    let evaluations = stats.samples as u64;
    Ok((stats, span.finish(evaluations, evaluations * tokens as u64)))
}

/// The energy column: millijoules per evaluation, or "unavailable".
fn energy_cell(energy: &Energy) -> String {
    energy
        .joules_per_step
        .value()
        .map_or(energy::UNAVAILABLE.to_string(), |j| {
            format!("{:.3}", j * 1e3)
        })
}

/// Compile `k`, time back-to-back evaluations of `tokens` positions each (no
/// host I/O in the loop) with their energy, and unload the kernel.
pub fn measure(
    backend: &mut dyn Backend,
    k: &BenchKernel,
    repeat: Repeat,
    tokens: usize,
) -> Result<(Stats, Energy)> {
    let loaded = load(backend, k, 0x5EED)?;
    let context = |e: Error| Error::Invalid(format!("benchmark kernel `{}`: {e}", k.name));
    let measured = timed(repeat, tokens, || {
        backend.run(loaded.kernel, &loaded.inputs, &loaded.outputs)
    })
    .map_err(context)?;
    backend.release(loaded.kernel).map_err(context)?;
    Ok(measured)
}

fn done(progress: Progress, what: &str, stats: &Stats) {
    progress(&format!(
        "{what}: median {:.3} ms ({} ms)",
        stats.median_ms,
        stats.spread(3)
    ));
}

// ---- ane-peak -----------------------------------------------------------------------

/// One row of the peak suite.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeakRow {
    pub config: String,
    pub channels: usize,
    pub spatial: usize,
    pub depth: usize,
    pub weight_mib: f64,
    pub flops: u64,
    #[serde(flatten)]
    pub stats: Stats,
    /// Energy per evaluation (tokens are positions), "unavailable" off macOS.
    pub energy: Energy,
    pub gflops: f64,
}

impl Row for PeakRow {
    fn columns() -> &'static [&'static str] {
        &[
            "config",
            "W (MiB)",
            "GFLOP",
            "median ms",
            "min..max ms",
            "GFLOP/s",
            "mJ/eval",
        ]
    }
    fn cells(&self) -> Vec<String> {
        vec![
            self.config.clone(),
            format!("{:.2}", self.weight_mib),
            format!("{:.3}", self.flops as f64 * 1e-9),
            format!("{:.3}", self.stats.median_ms),
            self.stats.spread(3),
            format!("{:.1}", self.gflops),
            energy_cell(&self.energy),
        ]
    }
}

/// The reference's `inmem_peak` configs `(C, S, d)`, or a small set for `quick`.
pub fn peak_configs(quick: bool) -> Vec<Stack> {
    let triples: &[(usize, usize, usize)] = if quick {
        &[(64, 64, 4), (128, 64, 8)]
    } else {
        &[
            (512, 64, 32),
            (512, 64, 48),
            (512, 64, 64),
            (512, 64, 96),
            (512, 64, 128),
            (256, 64, 64),
            (256, 64, 128),
            (256, 64, 256),
            (384, 64, 64),
            (384, 64, 128),
        ]
    };
    triples
        .iter()
        .map(|&(c, s, d)| Stack::square(c, s, d))
        .collect()
}

/// Peak throughput: deep stacks of fp16 1x1 convs `C -> C` (square stacks only).
pub fn peak(
    backend: &mut dyn Backend,
    configs: &[Stack],
    repeat: Repeat,
    progress: Progress,
) -> Result<Vec<PeakRow>> {
    let mut rows = Vec::with_capacity(configs.len());
    for (i, stack) in configs.iter().enumerate() {
        let kernel = build(Form::Conv, stack, 1 + i as u64)?;
        let (stats, energy) = measure(backend, &kernel, repeat, stack.positions())?;
        done(progress, &kernel.name, &stats);
        rows.push(PeakRow {
            config: format!(
                "{}x conv {}ch sp{}",
                stack.depth,
                stack.c_out,
                stack.positions()
            ),
            channels: stack.c_out,
            spatial: stack.positions(),
            depth: stack.depth,
            weight_mib: mib((stack.weight_elements() * 2) as f64),
            flops: stack.flops(),
            gflops: gflops(stack.flops() as f64, stats.median_ms),
            stats,
            energy,
        });
    }
    Ok(rows)
}

// ---- ane-dispatch -------------------------------------------------------------------

/// One row of the dispatch suite.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DispatchRow {
    pub kernel: String,
    /// What one timed repetition does: `run`, or `write+run+read` (host I/O included).
    pub mode: String,
    /// fp16 bytes of the input plus the output tensor.
    pub io_bytes: usize,
    #[serde(flatten)]
    pub stats: Stats,
    /// Energy per evaluation (tokens are positions), "unavailable" off macOS.
    pub energy: Energy,
}

impl Row for DispatchRow {
    fn columns() -> &'static [&'static str] {
        &[
            "kernel",
            "mode",
            "I/O bytes",
            "median us",
            "min..max us",
            "IQR us",
            "mJ/eval",
        ]
    }
    fn cells(&self) -> Vec<String> {
        let us = |ms: f64| format!("{:.1}", ms * 1e3);
        vec![
            self.kernel.clone(),
            self.mode.clone(),
            self.io_bytes.to_string(),
            us(self.stats.median_ms),
            format!("{}..{}", us(self.stats.min_ms), us(self.stats.max_ms)),
            us(self.stats.iqr_ms()),
            energy_cell(&self.energy),
        ]
    }
}

/// The dispatch probe's default `(C, S)`: 64 x 384 fp16 = 49,152 bytes, the
/// smallest surface claimed to work (ane-reference 2.5).
pub const DISPATCH_SHAPE: (usize, usize) = (64, 384);

/// Dispatch latency of tiny kernels: a weight-free `mul` and a 1x1 conv
/// `C -> C`, each timed as `run` alone and as `write + run + read`.
pub fn dispatch(
    backend: &mut dyn Backend,
    (channels, spatial): (usize, usize),
    repeat: Repeat,
    progress: Progress,
) -> Result<Vec<DispatchRow>> {
    let mut conv = build(Form::Conv, &Stack::square(channels, spatial, 1), 1)?;
    conv.name = format!("conv {channels}ch sp{spatial}");
    let kernels = [scale_kernel(channels, spatial), conv];
    let io_bytes = 2 * (2 * channels * spatial);
    let mut rows = Vec::new();
    for k in &kernels {
        let loaded = load(backend, k, 0x5EED)?;
        let context = |e: Error| Error::Invalid(format!("benchmark kernel `{}`: {e}", k.name));
        let (stats, energy) = timed(repeat, spatial, || {
            backend.run(loaded.kernel, &loaded.inputs, &loaded.outputs)
        })
        .map_err(context)?;
        done(progress, &format!("{} run", k.name), &stats);
        rows.push(DispatchRow {
            kernel: k.name.clone(),
            mode: "run".into(),
            io_bytes,
            stats,
            energy,
        });

        let info = backend.kernel_info(loaded.kernel).clone();
        let (in_ty, out_ty) = (&info.inputs[0].ty, &info.outputs[0].ty);
        let host_in = uniform(&mut Rng::new(7), in_ty.numel(), 1.0);
        let mut host_out = vec![0.0f32; out_ty.numel()];
        let (stats, energy) = timed(repeat, spatial, || {
            backend.write(loaded.inputs[0], Block::whole(in_ty), &host_in)?;
            backend.run(loaded.kernel, &loaded.inputs, &loaded.outputs)?;
            backend.read(loaded.outputs[0], Block::whole(out_ty), &mut host_out)
        })
        .map_err(context)?;
        done(progress, &format!("{} write+run+read", k.name), &stats);
        rows.push(DispatchRow {
            kernel: k.name.clone(),
            mode: "write+run+read".into(),
            io_bytes,
            stats,
            energy,
        });
        backend.release(loaded.kernel).map_err(context)?;
    }
    Ok(rows)
}

// ---- ane-sram -----------------------------------------------------------------------

/// One row of the SRAM sweep.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SramRow {
    pub form: Form,
    pub channels: usize,
    pub spatial: usize,
    /// fp16 weight matrix `C x C`.
    pub weight_mib: f64,
    /// One fp16 activation `C x S`.
    pub act_mib: f64,
    /// Weights plus input and output activations.
    pub total_mib: f64,
    pub flops: u64,
    #[serde(flatten)]
    pub stats: Stats,
    /// Energy per evaluation (tokens are positions), "unavailable" off macOS.
    pub energy: Energy,
    pub gflops: f64,
    /// GFLOP/s per MiB of weights (the reference's efficiency column).
    pub gflops_per_mib: f64,
    /// GFLOP/s relative to the best row of the same form (1.0 = best).
    pub relative: f64,
}

impl Row for SramRow {
    fn columns() -> &'static [&'static str] {
        &[
            "form",
            "C",
            "S",
            "W MiB",
            "total MiB",
            "median ms",
            "min..max ms",
            "GFLOP/s",
            "GFLOP/s/MiB",
            "vs best",
            "mJ/eval",
        ]
    }
    fn cells(&self) -> Vec<String> {
        vec![
            self.form.to_string(),
            self.channels.to_string(),
            self.spatial.to_string(),
            format!("{:.2}", self.weight_mib),
            format!("{:.2}", self.total_mib),
            format!("{:.3}", self.stats.median_ms),
            self.stats.spread(3),
            format!("{:.1}", self.gflops),
            format!("{:.2}", self.gflops_per_mib),
            format!("{:.2}", self.relative),
            energy_cell(&self.energy),
        ]
    }
}

/// `sram_bench`'s sizes `(C, S)` (weights 0.125 to 128 MiB), or a small set for `quick`.
pub fn sram_configs(quick: bool) -> Vec<Stack> {
    let pairs: &[(usize, usize)] = if quick {
        &[(64, 64), (128, 64), (256, 32)]
    } else {
        &[
            (256, 64),
            (512, 64),
            (1024, 64),
            (2048, 64),
            (3072, 64),
            (4096, 64),
            (5120, 64),
            (6144, 64),
            (8192, 32),
        ]
    };
    pairs.iter().map(|&(c, s)| Stack::square(c, s, 1)).collect()
}

/// Throughput of one `C -> C` layer as the weights grow, per form (conv with
/// baked weights, matmul with packed weights, ...), to locate the on-chip
/// memory cliff (around 32 MB of weights on the ANE per the reference).
pub fn sram(
    backend: &mut dyn Backend,
    configs: &[Stack],
    forms: &[Form],
    repeat: Repeat,
    progress: Progress,
) -> Result<Vec<SramRow>> {
    let mut rows: Vec<SramRow> = Vec::new();
    for &form in forms {
        let first = rows.len();
        for (i, stack) in configs.iter().enumerate() {
            let kernel = build(form, stack, 1 + i as u64)?;
            let (stats, energy) = measure(backend, &kernel, repeat, stack.positions())?;
            done(progress, &kernel.name, &stats);
            let (weight_mib, act_mib) = (
                mib((stack.weight_elements() * form.weight_bytes()) as f64),
                mib((stack.c_in * stack.positions() * 2) as f64),
            );
            let rate = gflops(stack.flops() as f64, stats.median_ms);
            rows.push(SramRow {
                form,
                channels: stack.c_in,
                spatial: stack.positions(),
                weight_mib,
                act_mib,
                total_mib: weight_mib + 2.0 * act_mib,
                flops: stack.flops(),
                stats,
                energy,
                gflops: rate,
                gflops_per_mib: rate / weight_mib,
                relative: 0.0,
            });
        }
        let best = rows[first..].iter().map(|r| r.gflops).fold(0.0, f64::max);
        for r in &mut rows[first..] {
            r.relative = r.gflops / best;
        }
    }
    Ok(rows)
}

// ---- ane-conv-vs-matmul -------------------------------------------------------------

/// One row of the conv-vs-matmul suite.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConvVsMatmulRow {
    pub config: String,
    pub form: Form,
    pub c_in: usize,
    pub c_out: usize,
    pub spatial: usize,
    pub depth: usize,
    pub flops: u64,
    #[serde(flatten)]
    pub stats: Stats,
    /// Energy per evaluation (tokens are positions), "unavailable" off macOS.
    pub energy: Energy,
    pub gflops: f64,
    /// The conv row's median time over this row's (> 1: faster than conv).
    pub speed_vs_conv: f64,
}

impl Row for ConvVsMatmulRow {
    fn columns() -> &'static [&'static str] {
        &[
            "config",
            "form",
            "GFLOP",
            "median ms",
            "min..max ms",
            "GFLOP/s",
            "vs conv",
            "mJ/eval",
        ]
    }
    fn cells(&self) -> Vec<String> {
        vec![
            self.config.clone(),
            self.form.to_string(),
            format!("{:.3}", self.flops as f64 * 1e-9),
            format!("{:.3}", self.stats.median_ms),
            self.stats.spread(3),
            format!("{:.1}", self.gflops),
            format!("{:.2}", self.speed_vs_conv),
            energy_cell(&self.energy),
        ]
    }
}

/// Training-shaped layers (dim 768, hidden 2048, 256 positions) plus a deep
/// square stack that amortizes dispatch; or a small set for `quick`.
pub fn conv_vs_matmul_configs(quick: bool) -> Vec<Stack> {
    let quads: &[(usize, usize, usize, usize)] = if quick {
        &[(64, 128, 64, 1), (128, 128, 64, 4)]
    } else {
        &[
            (768, 768, 256, 1),
            (768, 2048, 256, 1),
            (2048, 768, 256, 1),
            (768, 768, 256, 8),
        ]
    };
    quads
        .iter()
        .map(|&(c_in, c_out, width, depth)| Stack {
            c_in,
            c_out,
            height: 1,
            width,
            depth,
        })
        .collect()
}

/// The same linear layers (same FLOPs) as 1x1 conv with baked weights, matmul
/// with baked weights and matmul with weights packed into the input.
pub fn conv_vs_matmul(
    backend: &mut dyn Backend,
    configs: &[Stack],
    forms: &[Form],
    repeat: Repeat,
    progress: Progress,
) -> Result<Vec<ConvVsMatmulRow>> {
    let mut rows: Vec<ConvVsMatmulRow> = Vec::new();
    for (i, stack) in configs.iter().enumerate() {
        let first = rows.len();
        for &form in forms {
            let kernel = build(form, stack, 1 + i as u64)?;
            let (stats, energy) = measure(backend, &kernel, repeat, stack.positions())?;
            done(progress, &kernel.name, &stats);
            rows.push(ConvVsMatmulRow {
                config: stack.label(),
                form,
                c_in: stack.c_in,
                c_out: stack.c_out,
                spatial: stack.positions(),
                depth: stack.depth,
                flops: stack.flops(),
                gflops: gflops(stack.flops() as f64, stats.median_ms),
                stats,
                energy,
                speed_vs_conv: f64::NAN,
            });
        }
        let conv_ms = rows[first..]
            .iter()
            .find(|r| r.form == Form::Conv)
            .map(|r| r.stats.median_ms);
        for r in &mut rows[first..] {
            // Without a conv row to compare with, the row compares with itself.
            r.speed_vs_conv = conv_ms.unwrap_or(r.stats.median_ms) / r.stats.median_ms;
        }
    }
    Ok(rows)
}

// ---- ane-int8 -----------------------------------------------------------------------

/// One row of the INT8 suite.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Int8Row {
    pub config: String,
    /// `conv` (fp16) or `conv-int8` (W8A8).
    pub form: Form,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub depth: usize,
    /// Stored weights: 2 bytes per element in fp16, 1 in int8.
    pub weight_mib: f64,
    pub flops: u64,
    #[serde(flatten)]
    pub stats: Stats,
    /// Energy per evaluation (tokens are positions), "unavailable" off macOS.
    pub energy: Energy,
    pub gflops: f64,
    /// The fp16 row's median time over this row's (> 1: faster than fp16).
    pub speedup_vs_fp16: f64,
}

impl Row for Int8Row {
    fn columns() -> &'static [&'static str] {
        &[
            "config",
            "form",
            "W MiB",
            "GFLOP",
            "median ms",
            "min..max ms",
            "GFLOP/s",
            "vs fp16",
            "mJ/eval",
        ]
    }
    fn cells(&self) -> Vec<String> {
        vec![
            self.config.clone(),
            self.form.to_string(),
            format!("{:.2}", self.weight_mib),
            format!("{:.3}", self.flops as f64 * 1e-9),
            format!("{:.3}", self.stats.median_ms),
            self.stats.spread(3),
            format!("{:.1}", self.gflops),
            format!("{:.2}", self.speedup_vs_fp16),
            energy_cell(&self.energy),
        ]
    }
}

/// INT8 configs. The reference's are `(C, 64x64, d)` = (512, 128), (512, 64),
/// (256, 256), (256, 128), (384, 128) (about 0.3 TFLOP per evaluation, seconds
/// on a CPU; pass them explicitly on a Mac). The defaults keep its channel and
/// depth pairs at 256 positions in a row; `quick` is small.
pub fn int8_configs(quick: bool) -> Vec<Stack> {
    let (spatial, pairs): (usize, &[(usize, usize)]) = if quick {
        (64, &[(64, 4), (128, 2)])
    } else {
        (256, &[(512, 32), (256, 64)])
    };
    pairs
        .iter()
        .map(|&(c, d)| Stack::square(c, spatial, d))
        .collect()
}

/// FP16 vs INT8 W8A8 conv stacks of the same shape.
pub fn int8(
    backend: &mut dyn Backend,
    configs: &[Stack],
    repeat: Repeat,
    progress: Progress,
) -> Result<Vec<Int8Row>> {
    let mut rows = Vec::new();
    for (i, stack) in configs.iter().enumerate() {
        let mut fp16_ms = None;
        for form in [Form::Conv, Form::ConvInt8] {
            let kernel = build(form, stack, 1 + i as u64)?;
            let (stats, energy) = measure(backend, &kernel, repeat, stack.positions())?;
            done(progress, &kernel.name, &stats);
            let reference_ms = *fp16_ms.get_or_insert(stats.median_ms);
            rows.push(Int8Row {
                config: stack.label(),
                form,
                channels: stack.c_in,
                height: stack.height,
                width: stack.width,
                depth: stack.depth,
                weight_mib: mib((stack.weight_elements() * form.weight_bytes()) as f64),
                flops: stack.flops(),
                gflops: gflops(stack.flops() as f64, stats.median_ms),
                speedup_vs_fp16: reference_ms / stats.median_ms,
                stats,
                energy,
            });
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Precision;
    use crate::backend::cpu::CpuBackend;
    use crate::mil::Op;

    #[test]
    fn flops_follow_the_documented_convention() {
        // 128 x conv 512ch sp64 (the reference's peak config): 2 * 512^2 * 64 * 128.
        assert_eq!(Stack::square(512, 64, 128).flops(), 4_294_967_296);
        // 768 -> 2048 over 256 positions, then 2048 -> 2048: 2*256*(768*2048 + 2048^2).
        let s = Stack {
            c_in: 768,
            c_out: 2048,
            height: 1,
            width: 256,
            depth: 2,
        };
        assert_eq!(s.flops(), 2 * 256 * (768 * 2048 + 2048 * 2048));
        // 2-D spatial counts H * W positions (ane_int8_bench: 2 C^2 S^2 d).
        let s = Stack {
            height: 64,
            ..Stack::square(512, 64, 128)
        };
        assert_eq!(s.flops(), 2 * 512 * 512 * 64 * 64 * 128);
        assert_eq!(s.label(), "128x 512ch sp64x64");
    }

    #[test]
    fn every_form_verifies_for_the_ane_and_has_one_input_and_output() {
        let square = Stack::square(64, 64, 3);
        let wide = Stack {
            c_out: 128,
            depth: 1,
            ..square
        };
        for form in Form::ALL {
            for stack in [square, wide] {
                let k = build(form, &stack, 1).unwrap();
                let report = k.package.verify(Target::Ane).unwrap();
                assert!(report.is_ok(), "{}: {report}", k.name);
                let program = k.package.program().unwrap();
                assert_eq!(program.main.inputs.len(), 1, "{}", k.name);
                assert_eq!(program.main.outputs, ["y"], "{}", k.name);
                // Every weight a record of one weight.bin.
                let weight_files = match form {
                    Form::MatmulPacked => 0,
                    _ => 1,
                };
                assert_eq!(k.package.weights.len(), weight_files, "{}", k.name);
            }
        }
    }

    #[test]
    fn int8_stack_quantizes_between_layers_only() {
        let k = build(Form::ConvInt8, &Stack::square(64, 32, 3), 1).unwrap();
        let ops: Vec<Op> = k
            .package
            .program()
            .unwrap()
            .main
            .ops
            .iter()
            .map(|o| o.op)
            .collect();
        let count = |op| ops.iter().filter(|&&o| o == op).count();
        assert_eq!(count(Op::ConstexprAffineDequantize), 3);
        assert_eq!(count(Op::Conv), 3);
        assert_eq!((count(Op::Quantize), count(Op::Dequantize)), (2, 2));
    }

    /// The matmul forms compute what the conv form computes (same math, same weights
    /// layout aside): checked through the CPU backend on a packed kernel whose
    /// weights are written by hand.
    #[test]
    fn packed_matmul_computes_x_times_the_packed_matrix() {
        let stack = Stack {
            c_in: 2,
            c_out: 3,
            height: 1,
            width: 2,
            depth: 1,
        };
        let k = build(Form::MatmulPacked, &stack, 1).unwrap();
        let mut cpu = CpuBackend::new(Precision::Fp32);
        let kernel = cpu.compile(&k.package).unwrap();
        let info = cpu.kernel_info(kernel).clone();
        // The [2, 2 + 3] packed input at the origin of an input padded to the
        // ANE's rules; the [3, 2] output likewise.
        let padded = layout::padded_io(2, 1, 2 + 3, DType::Fp16);
        assert_eq!(info.inputs[0].ty.shape, [1, padded.0, 1, padded.1]);
        let x = cpu.alloc(&info.inputs[0].ty).unwrap();
        let y = cpu.alloc(&info.outputs[0].ty).unwrap();
        // Activation (C_in=2, S=2) = [[1, 2], [3, 4]]; matrix M (C_in=2, C_out=3) = [[1,0,1],[0,1,1]].
        let packed = [1.0, 2.0, 1.0, 0.0, 1.0, 3.0, 4.0, 0.0, 1.0, 1.0];
        let block = |rows, cols| Block {
            row: 0,
            rows,
            col: 0,
            cols,
        };
        cpu.write(x, block(2, 5), &packed).unwrap();
        cpu.run(kernel, &[x], &[y]).unwrap();
        let mut out = vec![0.0; 6];
        cpu.read(y, block(3, 2), &mut out).unwrap();
        // y[o, t] = sum_i x[i, t] M[i, o]: o0 = x0, o1 = x1, o2 = x0 + x1.
        assert_eq!(out, [1.0, 2.0, 3.0, 4.0, 4.0, 6.0]);
    }

    #[test]
    fn forms_parse_by_name_and_errors_list_them() {
        for form in Form::ALL {
            assert_eq!(form.name().parse::<Form>().unwrap(), form);
        }
        let err = "conv2d".parse::<Form>().unwrap_err().to_string();
        assert!(err.contains("matmul-packed"), "{err}");
    }

    #[test]
    fn bad_shapes_are_clear_errors() {
        let deep_rect = Stack {
            c_out: 128,
            ..Stack::square(64, 64, 2)
        };
        let err = build(Form::MatmulPacked, &deep_rect, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("C_in == C_out"), "{err}");
        let two_d = Stack {
            height: 2,
            ..Stack::square(64, 64, 1)
        };
        let err = build(Form::MatmulConst, &two_d, 1).unwrap_err().to_string();
        assert!(err.contains("height 1"), "{err}");
        let err = build(Form::Conv, &Stack::square(64, 64, 0), 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be positive"), "{err}");
    }

    #[test]
    fn suites_run_on_the_cpu_backend() {
        let mut cpu = CpuBackend::new(Precision::Fp32);
        let repeat = Repeat::new(0, 2);
        let mut lines = Vec::new();
        let mut progress = |s: &str| lines.push(s.to_string());
        let rows = int8(&mut cpu, &[Stack::square(64, 16, 2)], repeat, &mut progress).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].speedup_vs_fp16, 1.0);
        assert_eq!(rows[1].weight_mib * 2.0, rows[0].weight_mib);
        let rows = dispatch(&mut cpu, (64, 16), repeat, &mut progress).unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!(lines.len(), 6);
    }
}
