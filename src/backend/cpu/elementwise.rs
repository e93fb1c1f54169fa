//! Elementwise kernels: unary math, binary ops and `select` with NumPy
//! broadcasting, `cast`, `quantize`/`dequantize`, and rounding to fp16.
//! No reductions and no data movement (see `reduce` and `shape`).
//!
//! Every op computes in `f32`; the plan rounds fp16-typed results afterwards.

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::values::OpCtx;
use crate::math::sigmoid;
use crate::mil::ir::round_fp16;
use crate::mil::{DType, Op};

/// Loops over fewer elements than this stay on one thread.
pub(super) const PAR_MIN: usize = 1 << 16;

/// Round every value to the nearest fp16 (ties to even), in place.
pub(super) fn round_to_fp16(data: &mut [f32]) {
    const CHUNK: usize = 1024;
    let round = |chunk: &mut [f32]| {
        let mut halves = [f16::ZERO; CHUNK];
        let halves = &mut halves[..chunk.len()];
        halves.convert_from_f32_slice(chunk);
        halves.convert_to_f32_slice(chunk);
    };
    if data.len() >= PAR_MIN {
        data.par_chunks_mut(CHUNK).for_each(round);
    } else {
        data.chunks_mut(CHUNK).for_each(round);
    }
}

/// Elements per task of the parallel elementwise loops.
const CHUNK: usize = 1 << 14;

/// `out[i] = f(x[i])` for every element, on several threads for long slices.
pub(super) fn map(x: &[f32], out: &mut [f32], f: impl Fn(f32) -> f32 + Sync + Send) {
    debug_assert_eq!(x.len(), out.len());
    let body = |(o, x): (&mut [f32], &[f32])| {
        crate::math::simd(
            #[inline(always)]
            || {
                for (o, &x) in o.iter_mut().zip(x) {
                    *o = f(x);
                }
            },
        )
    };
    if x.len() >= PAR_MIN {
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(body);
    } else {
        body((out, x));
    }
}

/// Convert `x` to the value a `dtype` tensor holds: floats unchanged (the plan
/// rounds fp16), integers truncated toward zero and clamped to the dtype's
/// range with NaN -> 0 (NumPy `astype` on in-range values), bools 0 or 1.
pub(super) fn convert(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::Bool => f32::from(u8::from(x != 0.0)),
        d => match d.int_range() {
            Some(_) if x.is_nan() => 0.0,
            // `+ 0.0` turns -0.0 (from truncating -0.5) into the integer 0.
            Some((lo, hi)) => x.trunc().clamp(lo as f32, hi as f32) + 0.0,
            None => x,
        },
    }
}

/// NumPy's broadcast of `shapes`, or `None` if they are incompatible.
pub(super) fn broadcast_shape(shapes: &[&[usize]]) -> Option<Vec<usize>> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = vec![1; rank];
    for shape in shapes {
        for (i, &d) in shape.iter().rev().enumerate() {
            let o = &mut out[rank - 1 - i];
            if *o == 1 {
                *o = d;
            } else if d != 1 && d != *o {
                return None;
            }
        }
    }
    Some(out)
}

/// How operands map onto a result shape under NumPy broadcasting. Dimensions
/// that can be walked as one are merged, so `[1,C,1,S] + [1,C,1,1]` runs as
/// rows of `S`.
#[derive(Clone, Debug)]
pub(super) struct Broadcast {
    /// Merged result dimensions (at least one).
    shape: Vec<usize>,
    /// Per operand, the element stride of each merged dimension (0 = broadcast).
    strides: Vec<Vec<usize>>,
}

impl Broadcast {
    /// Broadcast `shapes` to `out`; the error text says what does not fit.
    pub(super) fn new(shapes: &[&[usize]], out: &[usize]) -> Result<Broadcast, String> {
        let expected = broadcast_shape(shapes)
            .ok_or_else(|| format!("operand shapes {shapes:?} do not broadcast"))?;
        if expected != out {
            return Err(format!(
                "declared result shape {out:?} but operands {shapes:?} broadcast to {expected:?}"
            ));
        }
        Broadcast::to(shapes, out)
    }

    /// Broadcast each of `shapes` to `out`, which may be larger than their broadcast.
    pub(super) fn to(shapes: &[&[usize]], out: &[usize]) -> Result<Broadcast, String> {
        for shape in shapes {
            if broadcast_shape(&[shape, out]).as_deref() != Some(out) {
                return Err(format!("shape {shape:?} does not broadcast to {out:?}"));
            }
        }
        let rank = out.len();
        let full: Vec<Vec<usize>> = shapes
            .iter()
            .map(|shape| {
                let mut strides = vec![0; rank];
                let mut step = 1;
                for (i, &d) in shape.iter().enumerate().rev() {
                    if d != 1 {
                        strides[rank - shape.len() + i] = step;
                    }
                    step *= d;
                }
                strides
            })
            .collect();
        let mut shape: Vec<usize> = Vec::new();
        let mut strides: Vec<Vec<usize>> = vec![Vec::new(); shapes.len()];
        for (d, &n) in out.iter().enumerate() {
            if n == 1 {
                continue;
            }
            let mergeable = !shape.is_empty()
                && full
                    .iter()
                    .zip(&strides)
                    .all(|(f, s)| s.last() == Some(&(f[d] * n)));
            if mergeable {
                *shape.last_mut().expect("not empty") *= n;
                for (s, f) in strides.iter_mut().zip(&full) {
                    *s.last_mut().expect("not empty") = f[d];
                }
            } else {
                shape.push(n);
                for (s, f) in strides.iter_mut().zip(&full) {
                    s.push(f[d]);
                }
            }
        }
        if shape.is_empty() {
            shape.push(1);
            strides.iter_mut().for_each(|s| s.push(0));
        }
        Ok(Broadcast { shape, strides })
    }

    /// `f` applied to the broadcast operands, written to `out` (one value per
    /// element of the result).
    pub(super) fn map<const N: usize>(
        &self,
        inputs: [&[f32]; N],
        out: &mut [f32],
        f: impl Fn([f32; N]) -> f32 + Sync + Send,
    ) {
        let len: usize = self.shape.iter().product();
        debug_assert_eq!(out.len(), len);
        if len == 0 {
            return;
        }
        let rank = self.shape.len();
        let inner = self.shape[rank - 1];
        let step: [usize; N] = std::array::from_fn(|k| self.strides[k][rank - 1]);
        if rank == 1 && step.iter().all(|&s| s <= 1) {
            // One row (every dense operation, after merging dimensions) of dense
            // operands and scalars: split it into chunks.
            let body = |(c, o): (usize, &mut [f32])| {
                let start = c * CHUNK;
                let fills: [Vec<f32>; N] = std::array::from_fn(|k| {
                    if step[k] == 0 {
                        vec![inputs[k][0]; o.len()]
                    } else {
                        Vec::new()
                    }
                });
                let ins: [&[f32]; N] = std::array::from_fn(|k| {
                    if step[k] == 0 {
                        &fills[k][..]
                    } else {
                        &inputs[k][start..start + o.len()]
                    }
                });
                crate::math::simd(
                    #[inline(always)]
                    || {
                        for (j, o) in o.iter_mut().enumerate() {
                            *o = f(std::array::from_fn(|k| ins[k][j]));
                        }
                    },
                );
            };
            if len >= PAR_MIN {
                out.par_chunks_mut(CHUNK).enumerate().for_each(body);
            } else {
                out.chunks_mut(CHUNK).enumerate().for_each(body);
            }
            return;
        }
        // Rows of the result, several per task; an operand that is not
        // contiguous along the row (broadcast or strided) is first copied into a
        // row buffer so that the loop over the row runs on dense slices.
        let rows_per_task = (CHUNK / inner.max(1)).max(1);
        let task = |(t, chunk): (usize, &mut [f32])| {
            let mut rows: [Vec<f32>; N] = std::array::from_fn(|k| {
                if step[k] == 1 {
                    Vec::new()
                } else {
                    vec![0.0; inner]
                }
            });
            for (i, out_row) in chunk.chunks_mut(inner).enumerate() {
                let mut rest = t * rows_per_task + i;
                let mut base = [0usize; N];
                for d in (0..rank - 1).rev() {
                    let idx = rest % self.shape[d];
                    rest /= self.shape[d];
                    for (b, s) in base.iter_mut().zip(&self.strides) {
                        *b += idx * s[d];
                    }
                }
                for k in 0..N {
                    match step[k] {
                        1 => {}
                        0 => rows[k].fill(inputs[k][base[k]]),
                        st => {
                            for (j, v) in rows[k].iter_mut().enumerate() {
                                *v = inputs[k][base[k] + j * st];
                            }
                        }
                    }
                }
                let ins: [&[f32]; N] = std::array::from_fn(|k| {
                    if step[k] == 1 {
                        &inputs[k][base[k]..base[k] + inner]
                    } else {
                        &rows[k][..]
                    }
                });
                crate::math::simd(
                    #[inline(always)]
                    || {
                        for (j, o) in out_row.iter_mut().enumerate() {
                            *o = f(std::array::from_fn(|k| ins[k][j]));
                        }
                    },
                );
            }
        };
        if len >= PAR_MIN {
            out.par_chunks_mut(inner * rows_per_task)
                .enumerate()
                .for_each(task);
        } else {
            out.chunks_mut(inner * rows_per_task)
                .enumerate()
                .for_each(task);
        }
    }
}

/// A unary float op, its constant parameters resolved (`epsilon` is added to
/// the operand first). A unary op is three adjacent pieces: its variant here,
/// its arm in [`compile_unary`] and its scalar function in `with_unary!`.
#[derive(Clone, Copy, Debug)]
pub(super) enum Unary {
    Sqrt,
    Rsqrt {
        epsilon: f32,
    },
    Exp,
    Log {
        epsilon: f32,
    },
    Tanh,
    Sigmoid,
    Silu,
    Relu,
    /// `gelu`, mode `EXACT`: `0.5 x (1 + erf(x / sqrt 2))`.
    GeluExact,
    /// `gelu`, mode `TANH_APPROXIMATION`: `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`.
    GeluTanh,
    /// `gelu`, mode `SIGMOID_APPROXIMATION`: `x sigmoid(1.702 x)`.
    GeluSigmoid,
}

/// The unary kernel of `ctx`'s op.
pub(super) fn compile_unary(ctx: &OpCtx) -> Unary {
    let x = ctx.input("x");
    // The default epsilon is a literal of x's dtype: 1e-12 and 1e-45 are 0 in fp16.
    let epsilon = |default: f32| match ctx.floats("epsilon") {
        Some(e) => e[0],
        None if x.dtype == DType::Fp16 => round_fp16(default),
        None => default,
    };
    match ctx.op.op {
        Op::Sqrt => Unary::Sqrt,
        Op::Rsqrt => Unary::Rsqrt {
            epsilon: epsilon(1e-12),
        },
        Op::Exp => Unary::Exp,
        Op::Log => Unary::Log {
            epsilon: epsilon(1e-45),
        },
        Op::Tanh => Unary::Tanh,
        Op::Sigmoid => Unary::Sigmoid,
        Op::Silu => Unary::Silu,
        Op::Relu => Unary::Relu,
        Op::Gelu => match ctx.string("mode") {
            Some("EXACT") => Unary::GeluExact,
            Some("TANH_APPROXIMATION") => Unary::GeluTanh,
            Some("SIGMOID_APPROXIMATION") => Unary::GeluSigmoid,
            mode => unreachable!("gelu mode {mode:?} passed inference"),
        },
        other => unreachable!("no CPU kernel for unary `{other}`"),
    }
}

/// `$body` with `$f` bound to the scalar function of unary op `$u`
/// (one arm per op, so that loops in `$body` see a concrete closure).
macro_rules! with_unary {
    ($u:expr, |$f:ident| $body:expr) => {
        match $u {
            Unary::Sqrt => {
                let $f = f32::sqrt;
                $body
            }
            Unary::Rsqrt { epsilon } => {
                let $f = move |v: f32| 1.0 / (v + epsilon).sqrt();
                $body
            }
            Unary::Exp => {
                let $f = crate::math::exp;
                $body
            }
            Unary::Log { epsilon } => {
                let $f = move |v: f32| (v + epsilon).ln();
                $body
            }
            Unary::Tanh => {
                let $f = f32::tanh;
                $body
            }
            Unary::Sigmoid => {
                let $f = sigmoid;
                $body
            }
            Unary::Silu => {
                let $f = |v: f32| v * sigmoid(v);
                $body
            }
            Unary::Relu => {
                let $f = |v: f32| maximum(v, 0.0);
                $body
            }
            Unary::GeluExact => {
                let $f = gelu_exact;
                $body
            }
            // 0.5 (1 + tanh(u)) = sigmoid(2 u), without the cancellation for negative u.
            Unary::GeluTanh => {
                let $f = |v: f32| v * sigmoid(2.0 * GELU_TANH_SCALE * (v + 0.044715 * v * v * v));
                $body
            }
            Unary::GeluSigmoid => {
                let $f = |v: f32| v * sigmoid(1.702 * v);
                $body
            }
        }
    };
}

/// `$body` with `$f` bound to the scalar function of binary op `$op`.
macro_rules! with_binary {
    ($op:expr, |$f:ident| $body:expr) => {
        match $op {
            Op::Add => {
                let $f = |a: f32, b: f32| a + b;
                $body
            }
            Op::Sub => {
                let $f = |a: f32, b: f32| a - b;
                $body
            }
            Op::Mul => {
                let $f = |a: f32, b: f32| a * b;
                $body
            }
            Op::RealDiv => {
                let $f = |a: f32, b: f32| a / b;
                $body
            }
            Op::Maximum => {
                let $f = maximum;
                $body
            }
            Op::Minimum => {
                let $f = minimum;
                $body
            }
            Op::Pow => {
                let $f = f32::powf;
                $body
            }
            other => unreachable!("{other} is not binary"),
        }
    };
}

impl Unary {
    pub(super) fn run(self, x: &[f32], out: &mut [f32]) {
        with_unary!(self, |f| map(x, out, f))
    }
}

/// `sqrt(2 / pi)`, the scale of gelu's tanh approximation.
const GELU_TANH_SCALE: f32 = 0.797_884_6;

/// Exact gelu, `0.5 x (1 + erf(x / sqrt 2)) = 0.5 x erfc(-x / sqrt 2)`, in
/// `f64` and without cancellation where `erf` is near -1.
fn gelu_exact(x: f32) -> f32 {
    let x = f64::from(x);
    (0.5 * x * erfc(-x * std::f64::consts::FRAC_1_SQRT_2)) as f32
}

/// The complementary error function, to about `1e-10` relative error:
/// `1 - erf(z)` with erf's Maclaurin series below 2.5, the continued
/// fraction `erfc(z) = exp(-z^2) / sqrt(pi) / (z + (1/2) / (z + 1 / (z + (3/2) / (z + ...))))`
/// from there on (60 terms, evaluated from the tail), and
/// `erfc(-z) = 2 - erfc(z)`. NaN stays NaN.
fn erfc(z: f64) -> f64 {
    if z < 0.0 {
        return 2.0 - erfc(-z);
    }
    let two_over_sqrt_pi = std::f64::consts::FRAC_2_SQRT_PI;
    if z < 2.5 {
        // erf(z) = 2 / sqrt(pi) * sum_n (-1)^n z^(2n+1) / (n! (2n+1)).
        let (z2, mut term, mut sum) = (z * z, z, z);
        for n in 1..100 {
            term *= -z2 / n as f64;
            let add = term / (2 * n + 1) as f64;
            sum += add;
            if add.abs() <= 1e-17 * sum.abs() {
                break;
            }
        }
        return 1.0 - two_over_sqrt_pi * sum;
    }
    let mut tail = z;
    for k in (1..=60).rev() {
        tail = z + (k as f64 / 2.0) / tail;
    }
    (-z * z).exp() * two_over_sqrt_pi / (2.0 * tail)
}

/// NumPy `maximum`: NaN if either operand is NaN.
fn maximum(a: f32, b: f32) -> f32 {
    if a >= b || a.is_nan() { a } else { b }
}

/// NumPy `minimum`: NaN if either operand is NaN.
fn minimum(a: f32, b: f32) -> f32 {
    if a <= b || a.is_nan() { a } else { b }
}

/// A binary op on broadcast operands.
#[derive(Clone, Debug)]
pub(super) struct Binary {
    op: Op,
    broadcast: Broadcast,
}

impl Binary {
    pub(super) fn run(&self, x: &[f32], y: &[f32], out: &mut [f32]) {
        let b = &self.broadcast;
        with_binary!(self.op, |f| b.map([x, y], out, |[a, b]| f(a, b)))
    }

    pub(super) fn op(&self) -> Op {
        self.op
    }
}

/// How an operand of a fused [`Chain`] maps onto its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Leaf {
    /// The result's shape: element `i` is operand element `i`.
    Dense,
    /// One value for every element.
    Scalar,
    /// A trailing block of the result's shape (leading dimensions 1):
    /// element `i` is operand element `i % len`.
    Repeat(usize),
}

impl Leaf {
    /// How an operand of `shape` maps onto a result of `out`, if it is one of
    /// the three forms.
    pub(super) fn of(shape: &[usize], out: &[usize]) -> Option<Leaf> {
        let numel: usize = shape.iter().product();
        if shape == out {
            return Some(Leaf::Dense);
        }
        if numel == 1 {
            return Some(Leaf::Scalar);
        }
        let dims: Vec<usize> = shape.iter().copied().skip_while(|&d| d == 1).collect();
        (dims.len() <= out.len() && out.ends_with(&dims)).then_some(Leaf::Repeat(numel))
    }
}

/// One instruction of a [`Chain`]: an op on registers (for a unary op the
/// second register is unused).
#[derive(Clone, Copy, Debug)]
pub(super) enum ChainOp {
    Unary(Unary),
    Binary(Op),
}

/// A fused chain of elementwise ops on the same result shape: the plan
/// absorbs an op's operand into its consumer when the operand is itself an
/// elementwise result used only there. Registers `0..leaves.len()` are the
/// step's operands; register `leaves.len() + j` is instruction `j`'s result;
/// the last instruction writes the step's result. Each instruction rounds as
/// the op alone does (`f32`), so the values are those of the separate ops;
/// only the passes over memory are fewer.
#[derive(Clone, Debug)]
pub(super) struct Chain {
    pub(super) leaves: Vec<Leaf>,
    pub(super) instrs: Vec<(ChainOp, usize, usize)>,
}

/// Elements per register block of a chain (registers stay in L1/L2).
const CHAIN_CHUNK: usize = 2048;

thread_local! {
    static CHAIN_REGS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Chain {
    pub(super) fn run(&self, args: &[&[f32]], out: &mut [f32]) {
        let n_leaves = self.leaves.len();
        let last = self.instrs.len() - 1;
        let body = |(c, o): (usize, &mut [f32])| {
            let (start, n) = (c * CHAIN_CHUNK, o.len());
            CHAIN_REGS.with_borrow_mut(|regs| {
                let need = (n_leaves + self.instrs.len()) * CHAIN_CHUNK;
                if regs.len() < need {
                    regs.resize(need, 0.0);
                }
                for (k, leaf) in self.leaves.iter().enumerate() {
                    let dst = &mut regs[k * CHAIN_CHUNK..][..n];
                    match *leaf {
                        Leaf::Dense => {}
                        Leaf::Scalar => dst.fill(args[k][0]),
                        Leaf::Repeat(len) => {
                            let mut at = start % len;
                            let mut filled = 0;
                            while filled < n {
                                let take = (len - at).min(n - filled);
                                dst[filled..filled + take].copy_from_slice(&args[k][at..at + take]);
                                filled += take;
                                at = 0;
                            }
                        }
                    }
                }
                for (j, &(op, a, b)) in self.instrs.iter().enumerate() {
                    let (before, after) = regs.split_at_mut((n_leaves + j) * CHAIN_CHUNK);
                    let reg = |i: usize| -> &[f32] {
                        match self.leaves.get(i) {
                            Some(Leaf::Dense) => &args[i][start..start + n],
                            _ => &before[i * CHAIN_CHUNK..][..n],
                        }
                    };
                    let dst: &mut [f32] = if j == last { &mut *o } else { &mut after[..n] };
                    let x = reg(a);
                    match op {
                        ChainOp::Unary(u) => with_unary!(u, |f| crate::math::simd(
                            #[inline(always)]
                            || {
                                for (d, &x) in dst.iter_mut().zip(x) {
                                    *d = f(x);
                                }
                            }
                        )),
                        ChainOp::Binary(op) => {
                            let y = reg(b);
                            with_binary!(op, |f| crate::math::simd(
                                #[inline(always)]
                                || {
                                    for ((d, &x), &y) in dst.iter_mut().zip(x).zip(y) {
                                        *d = f(x, y);
                                    }
                                }
                            ))
                        }
                    }
                }
            });
        };
        if out.len() >= PAR_MIN {
            out.par_chunks_mut(CHAIN_CHUNK)
                .enumerate()
                .with_min_len(4)
                .for_each(body);
        } else {
            out.chunks_mut(CHAIN_CHUNK).enumerate().for_each(body);
        }
    }
}

pub(super) fn compile_binary(ctx: &OpCtx) -> Binary {
    let (x, y) = (ctx.input("x"), ctx.input("y"));
    Binary {
        op: ctx.op.op,
        broadcast: Broadcast::new(&[&x.shape, &y.shape], &ctx.output().shape)
            .expect("inference checked the broadcast"),
    }
}

pub(super) fn compile_select(ctx: &OpCtx) -> Broadcast {
    let shapes = ["cond", "a", "b"].map(|p| ctx.input(p).shape.as_slice());
    Broadcast::new(&shapes, &ctx.output().shape).expect("inference checked the broadcast")
}

pub(super) fn compile_cast(ctx: &OpCtx) -> DType {
    ctx.output().dtype
}

/// A quantization parameter: one value, or one per index along an axis.
#[derive(Debug)]
struct PerAxis {
    values: Vec<f32>,
    /// Elements per step along the axis (product of the later dimensions).
    inner: usize,
}

impl PerAxis {
    /// `values` for a tensor of `shape`: one value, or one per index along `axis`.
    fn new(values: Vec<f32>, axis: Option<i64>, shape: &[usize]) -> PerAxis {
        if values.len() == 1 {
            return PerAxis { values, inner: 1 };
        }
        let axis = axis.expect("inference checked that a vector has an axis");
        let axis = crate::mil::infer::normalize_axis(axis, shape.len()).expect("checked");
        debug_assert_eq!(values.len(), shape[axis]);
        PerAxis {
            values,
            inner: shape[axis + 1..].iter().product(),
        }
    }

    /// The parameter for flat element index `i`.
    fn at(&self, i: usize) -> f32 {
        self.values[(i / self.inner) % self.values.len()]
    }
}

/// `quantize`: `clamp(round_half_even(x / scale) + zero_point)` to int8/uint8.
#[derive(Debug)]
pub(super) struct Quantize {
    scale: PerAxis,
    zero_point: PerAxis,
    dtype: DType,
    /// The quotient `x / scale` is an fp16 value (fp16 input in fp16 precision).
    round_quotient: bool,
}

impl Quantize {
    pub(super) fn run(&self, x: &[f32], q: &mut [f32]) {
        for (i, (q, &v)) in q.iter_mut().zip(x).enumerate() {
            *q = v / self.scale.at(i);
        }
        if self.round_quotient {
            round_to_fp16(q);
        }
        for (i, v) in q.iter_mut().enumerate() {
            *v = convert(v.round_ties_even() + self.zero_point.at(i), self.dtype);
        }
    }
}

pub(super) fn compile_quantize(ctx: &OpCtx) -> Quantize {
    let x = ctx.input("input");
    let axis = ctx.int("axis");
    let scale = ctx.floats("scale").expect("required");
    let zero_point = match ctx.ints("zero_point") {
        Some(zp) => zp.iter().map(|&v| v as f32).collect(),
        None => vec![0.0],
    };
    Quantize {
        scale: PerAxis::new(scale.to_vec(), axis, &x.shape),
        zero_point: PerAxis::new(zero_point, axis, &x.shape),
        dtype: ctx.output().dtype,
        round_quotient: x.dtype == DType::Fp16
            && ctx.precision() == crate::backend::Precision::Fp16,
    }
}

/// `dequantize`: `(q - zero_point) * scale`.
#[derive(Debug)]
pub(super) struct Dequantize {
    scale: PerAxis,
    zero_point: PerAxis,
}

impl Dequantize {
    pub(super) fn new(
        scale: Vec<f32>,
        zero_point: Option<Vec<f32>>,
        axis: Option<i64>,
        shape: &[usize],
    ) -> Dequantize {
        Dequantize {
            scale: PerAxis::new(scale, axis, shape),
            zero_point: PerAxis::new(zero_point.unwrap_or_else(|| vec![0.0]), axis, shape),
        }
    }

    pub(super) fn run(&self, q: &[f32], out: &mut [f32]) {
        for (i, (o, &v)) in out.iter_mut().zip(q).enumerate() {
            *o = (v - self.zero_point.at(i)) * self.scale.at(i);
        }
    }
}

pub(super) fn compile_dequantize(ctx: &OpCtx) -> Dequantize {
    let zero_point = ctx
        .ints("zero_point")
        .map(|zp| zp.iter().map(|&v| v as f32).collect());
    Dequantize::new(
        ctx.floats("scale").expect("required").to_vec(),
        zero_point,
        ctx.int("axis"),
        &ctx.input("input").shape,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_merges_dimensions_walked_together() {
        let b = Broadcast::new(&[&[1, 3, 1, 4], &[1, 3, 1, 1]], &[1, 3, 1, 4]).unwrap();
        assert_eq!(b.shape, vec![3, 4]);
        assert_eq!(b.strides, vec![vec![4, 1], vec![1, 0]]);
        let x: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let mut out = vec![0.0; 12];
        b.map([&x, &[100.0, 200.0, 300.0]], &mut out, |[a, b]| a + b);
        assert_eq!(out[0..4], [100.0, 101.0, 102.0, 103.0]);
        assert_eq!(out[8..12], [308.0, 309.0, 310.0, 311.0]);
        assert!(Broadcast::new(&[&[2, 3], &[4, 3]], &[4, 3]).is_err());
        assert!(Broadcast::new(&[&[2, 3], &[3]], &[3, 3]).is_err());
    }

    /// `erfc` against Python's `math.erfc`:
    /// `[math.erfc(z) for z in (-1.5, 0, 0.3, 1, 2.4, 2.6, 5, 10, 26)]`.
    #[test]
    fn erfc_matches_a_reference_on_both_sides_of_the_switch() {
        let cases = [
            (-1.5, 1.9661051464753108),
            (0.0, 1.0),
            (0.3, 0.6713732405408726),
            (1.0, 0.15729920705028513),
            (2.4, 0.0006885138966450789),
            (2.6, 0.00023603441652934908),
            (5.0, 1.5374597944280351e-12),
            (10.0, 2.088487583762545e-45),
            (26.0, 5.663192408856143e-296),
        ];
        for (z, want) in cases {
            let got = erfc(z);
            assert!(
                (got - want).abs() <= 1e-10 * want,
                "erfc({z}) = {got}, want {want}"
            );
        }
        assert!(erfc(f64::NAN).is_nan());
        // As the definition gives: -inf * 0.5 * (1 + erf(-inf)) is -inf * 0.
        assert!(gelu_exact(f32::NEG_INFINITY).is_nan());
        assert_eq!(gelu_exact(f32::INFINITY), f32::INFINITY);
    }

    #[test]
    fn convert_truncates_and_saturates_integers() {
        assert_eq!(convert(2.7, DType::Int32), 2.0);
        assert_eq!(convert(-2.7, DType::Int32), -2.0);
        assert!(convert(-0.5, DType::Int32).is_sign_positive());
        assert_eq!(convert(300.0, DType::Int8), 127.0);
        assert_eq!(convert(-1.0, DType::Uint8), 0.0);
        assert_eq!(convert(f32::NAN, DType::Int8), 0.0);
        assert_eq!(convert(-0.5, DType::Bool), 1.0);
        assert_eq!(convert(1.5, DType::Fp16), 1.5);
    }

    #[test]
    fn fp16_rounding_is_nearest_even_with_overflow_and_underflow() {
        // 2049 lies halfway between fp16 neighbours 2048 and 2050: ties go to even (2048).
        // 65520 is the first value that rounds to inf; 2^-25 is halfway to the
        // smallest subnormal 2^-24 and rounds to 0.
        let mut v = vec![2049.0, 2051.0, 65519.0, 65520.0, 2f32.powi(-25), -1e-9];
        round_to_fp16(&mut v);
        assert_eq!(v[..3], [2048.0, 2052.0, 65504.0]);
        assert_eq!(v[3], f32::INFINITY);
        assert_eq!(v[4], 0.0);
        assert!(v[5] == 0.0 && v[5].is_sign_negative());
        // Long slices take the parallel path; it must agree with scalar conversion.
        let mut long: Vec<f32> = (0..3 * PAR_MIN)
            .map(|i| (i as f32 * 0.377).sin() * 70000.0)
            .collect();
        let scalar: Vec<f32> = long.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        round_to_fp16(&mut long);
        assert_eq!(long, scalar);
    }
}
