//! Reductions (`reduce_sum`, `reduce_mean`, `reduce_max`) and `softmax`.
//!
//! Both see their operand as `[outer, len, inner]` with the reduced axes in
//! the middle; reductions over axes that are not adjacent first move them to
//! the end with a transpose. Sums accumulate in `f64`.

use std::borrow::Cow;

use rayon::prelude::*;

use super::elementwise::PAR_MIN;
use super::shape::{View, contiguous_strides};
use super::values::OpCtx;
use crate::mil::Op;

/// Elements of input a parallel task covers at least.
const MIN_TASK: usize = 1 << 12;

/// Split `shape` around the adjacent axes `first..=last`: (before, those, after).
fn split3(shape: &[usize], first: usize, last: usize) -> (usize, usize, usize) {
    (
        shape[..first].iter().product(),
        shape[first..=last].iter().product(),
        shape[last + 1..].iter().product(),
    )
}

/// Run `body(outer_index, input_block, output_block)` over the `outer` blocks,
/// in parallel when there is enough work.
fn for_blocks(
    x: &[f32],
    out: &mut [f32],
    in_block: usize,
    out_block: usize,
    body: impl Fn(&[f32], &mut [f32]) + Sync + Send,
) {
    if in_block == 0 || out_block == 0 {
        return;
    }
    if x.len() >= PAR_MIN {
        out.par_chunks_mut(out_block)
            .zip(x.par_chunks(in_block))
            .with_min_len(MIN_TASK.div_ceil(in_block))
            .for_each(|(o, x)| body(x, o));
    } else {
        out.chunks_mut(out_block)
            .zip(x.chunks(in_block))
            .for_each(|(o, x)| body(x, o));
    }
}

/// `softmax` along one axis, numerically stable (the maximum is subtracted first).
#[derive(Debug)]
pub(super) struct Softmax {
    len: usize,
    inner: usize,
}

impl Softmax {
    pub(super) fn run(&self, x: &[f32], out: &mut [f32]) {
        let (len, inner) = (self.len, self.inner);
        if inner == 1 {
            // Softmax along the last axis: contiguous rows, vectorizable passes.
            for_blocks(x, out, len, len, |x, out| {
                crate::math::simd(
                    #[inline(always)]
                    || {
                        out.copy_from_slice(x);
                        let max = crate::math::max(out);
                        let inv = 1.0 / crate::math::exp_shifted_sum(out, max);
                        for o in out.iter_mut() {
                            *o *= inv;
                        }
                    },
                )
            });
            return;
        }
        for_blocks(x, out, len * inner, len * inner, |x, out| {
            // In `math::simd` for `exp`'s fused multiply-adds.
            crate::math::simd(
                #[inline(always)]
                || Self::strided(x, out, len, inner),
            )
        });
    }

    /// Softmax along a strided axis: `len` values `inner` apart, for each of
    /// `inner` offsets.
    #[inline(always)]
    fn strided(x: &[f32], out: &mut [f32], len: usize, inner: usize) {
        for i in 0..inner {
            let max = (0..len)
                .map(|r| x[r * inner + i])
                .fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for r in 0..len {
                let e = crate::math::exp(x[r * inner + i] - max);
                out[r * inner + i] = e;
                sum += e;
            }
            for r in 0..len {
                out[r * inner + i] /= sum;
            }
        }
    }
}

/// `softmax(x * scale + mask)` along the last axis of `x` (rows of `len`), with
/// `mask` one `[mask_rows, len]` matrix repeated over the leading axes; in fp16
/// precision the product and the sum are rounded to fp16 as the separate ops
/// would round them.
#[derive(Debug)]
pub(super) struct MaskedSoftmax {
    scale: f32,
    len: usize,
    mask_rows: usize,
    round: bool,
}

impl MaskedSoftmax {
    pub(super) fn new(scale: f32, len: usize, mask_rows: usize, round: bool) -> MaskedSoftmax {
        MaskedSoftmax {
            scale,
            len,
            mask_rows,
            round,
        }
    }

    pub(super) fn run(&self, x: &[f32], mask: &[f32], out: &mut [f32]) {
        let (len, scale, round) = (self.len, self.scale, self.round);
        if len == 0 {
            return;
        }
        let r16 = |v: f32| half::f16::from_f32(v).to_f32();
        let row = |(r, (out, x)): (usize, (&mut [f32], &[f32]))| {
            let m = &mask[(r % self.mask_rows) * len..][..len];
            crate::math::simd(
                #[inline(always)]
                || {
                    for ((o, &x), &m) in out.iter_mut().zip(x).zip(m) {
                        *o = if round {
                            r16(r16(x * scale) + m)
                        } else {
                            x * scale + m
                        };
                    }
                    let max = crate::math::max(out);
                    let inv = 1.0 / crate::math::exp_shifted_sum(out, max);
                    for o in out.iter_mut() {
                        *o *= inv;
                    }
                },
            )
        };
        if x.len() >= PAR_MIN {
            out.par_chunks_mut(len)
                .zip(x.par_chunks(len))
                .enumerate()
                .with_min_len(MIN_TASK.div_ceil(len))
                .for_each(row);
        } else {
            out.chunks_mut(len)
                .zip(x.chunks(len))
                .enumerate()
                .for_each(row);
        }
    }
}

pub(super) fn compile_softmax(ctx: &OpCtx) -> Softmax {
    let x = ctx.input("x");
    let axis = ctx.axis(ctx.int("axis").unwrap_or(-1), x.rank());
    let (_, len, inner) = split3(&x.shape, axis, axis);
    Softmax { len, inner }
}

/// A reduction over the middle of `[outer, len, inner]`, after an optional
/// transpose that makes the reduced axes adjacent.
#[derive(Debug)]
pub(super) struct Reduce {
    op: Op,
    transpose: Option<View>,
    len: usize,
    inner: usize,
}

impl Reduce {
    pub(super) fn run(&self, x: &[f32], out: &mut [f32]) {
        let x: Cow<[f32]> = match &self.transpose {
            Some(view) => {
                let mut moved = vec![0.0; x.len()];
                view.gather(x, &mut moved);
                Cow::Owned(moved)
            }
            None => Cow::Borrowed(x),
        };
        let (len, inner) = (self.len, self.inner);
        let op = self.op;
        for_blocks(&x, out, len * inner, inner, |x, out| {
            if op == Op::ReduceMax {
                out.fill(f32::NEG_INFINITY);
                for row in x.chunks_exact(inner) {
                    for (o, &v) in out.iter_mut().zip(row) {
                        if v > *o || v.is_nan() {
                            *o = v;
                        }
                    }
                }
                return;
            }
            let scale = if op == Op::ReduceMean {
                1.0 / len as f64
            } else {
                1.0
            };
            if inner == 1 {
                out[0] = (crate::math::simd(
                    #[inline(always)]
                    || crate::math::sum_f64(x),
                ) * scale) as f32;
                return;
            }
            let mut acc = vec![0.0f64; inner];
            for row in x.chunks_exact(inner) {
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += f64::from(v);
                }
            }
            for (o, a) in out.iter_mut().zip(acc) {
                *o = (a * scale) as f32;
            }
        });
    }
}

pub(super) fn compile_reduce(ctx: &OpCtx) -> Reduce {
    let x = ctx.input("x");
    let rank = x.rank();
    let mut axes: Vec<usize> = match ctx.ints("axes") {
        Some(axes) => axes.iter().map(|&a| ctx.axis(a, rank)).collect(),
        None => (0..rank).collect(),
    };
    axes.sort_unstable();
    let op = ctx.op.op;
    let (Some(&first), Some(&last)) = (axes.first(), axes.last()) else {
        // No axes: every element is its own group.
        return Reduce {
            op,
            transpose: None,
            len: 1,
            inner: 1,
        };
    };
    if last - first + 1 == axes.len() {
        let (_, len, inner) = split3(&x.shape, first, last);
        return Reduce {
            op,
            transpose: None,
            len,
            inner,
        };
    }
    // Move the reduced axes to the end, keeping the order of the others.
    let perm: Vec<usize> = (0..rank)
        .filter(|d| !axes.contains(d))
        .chain(axes.iter().copied())
        .collect();
    let strides = contiguous_strides(&x.shape);
    let view = View::new(
        perm.iter().map(|&d| x.shape[d]).collect(),
        perm.iter().map(|&d| strides[d]).collect(),
        0,
    );
    Reduce {
        op,
        transpose: Some(view),
        len: axes.iter().map(|&d| x.shape[d]).product(),
        inner: 1,
    }
}
