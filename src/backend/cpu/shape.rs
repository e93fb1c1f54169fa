//! Data movement: `transpose`, `slice_by_size`, `concat` and `split` (the plan
//! gives `reshape` and `identity` their operand's storage, no step), and the
//! fused pair rotation. Each is a strided [`View`] of a row-major buffer, read
//! into a dense result; `concat` copies the contiguous blocks of its operands.

use rayon::prelude::*;

use super::elementwise::PAR_MIN;
use super::values::OpCtx;

/// Row-major element strides of `shape`.
pub(super) fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    strides
}

/// Element `idx` of `shape` lives at `offset + sum(idx[d] * strides[d])`.
#[derive(Clone, Debug)]
pub(super) struct View {
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
}

impl View {
    /// The view, simplified: size-1 axes dropped and neighbouring axes that
    /// walk memory as one merged, so that the innermost loop is as long as it
    /// can be (a `[1, 12, 16384, 1]` slice of pairs becomes one stride-2 row).
    pub(super) fn new(shape: Vec<usize>, strides: Vec<usize>, offset: usize) -> View {
        let mut dims: Vec<(usize, usize)> = Vec::with_capacity(shape.len());
        if shape.contains(&0) {
            dims.push((0, 1));
        }
        for (&size, &stride) in shape.iter().zip(&strides) {
            if size == 1 || !dims.is_empty() && dims[0].0 == 0 {
                continue;
            }
            match dims.last_mut() {
                Some(last) if last.1 == size * stride => *last = (last.0 * size, stride),
                _ => dims.push((size, stride)),
            }
        }
        if dims.is_empty() {
            dims.push((1, 0));
        }
        View {
            shape: dims.iter().map(|d| d.0).collect(),
            strides: dims.iter().map(|d| d.1).collect(),
            offset,
        }
    }

    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Offset of the first element of row `r` (all axes but the last).
    fn row_offset(&self, mut r: usize) -> usize {
        let rank = self.shape.len();
        let mut offset = self.offset;
        for d in (0..rank - 1).rev() {
            offset += (r % self.shape[d]) * self.strides[d];
            r /= self.shape[d];
        }
        offset
    }

    /// The viewed elements of `src`, dense and row-major, into `out`.
    pub(super) fn gather(&self, src: &[f32], out: &mut [f32]) {
        let len = self.numel();
        debug_assert_eq!(out.len(), len);
        if len == 0 {
            return;
        }
        if self.transposes_matrices() {
            return self.gather_transposed(src, out);
        }
        let inner = *self.shape.last().expect("rank >= 1");
        let step = *self.strides.last().expect("rank >= 1");
        // Tasks of whole rows, at least ROW_BLOCK elements each.
        let rows_per_task = ROW_BLOCK.div_ceil(inner).max(1);
        let task = |(t, dst): (usize, &mut [f32])| {
            for (i, dst) in dst.chunks_mut(inner).enumerate() {
                let start = self.row_offset(t * rows_per_task + i);
                if step == 1 {
                    dst.copy_from_slice(&src[start..start + inner]);
                } else if step == 0 {
                    dst.fill(src[start]);
                } else {
                    let src = &src[start..start + (inner - 1) * step + 1];
                    for (d, s) in dst.iter_mut().zip(src.iter().step_by(step)) {
                        *d = *s;
                    }
                }
            }
        };
        if len >= PAR_MIN {
            out.par_chunks_mut(rows_per_task * inner)
                .enumerate()
                .for_each(task);
        } else {
            out.chunks_mut(rows_per_task * inner)
                .enumerate()
                .for_each(task);
        }
    }
}

impl View {
    /// Whether the view is a stack of transposed matrices: its last two axes
    /// `(R, C)` walk a row-major `C x R` matrix down its columns (strides 1 and
    /// `R`), as a `transpose` of the last two axes (split heads, merge heads)
    /// gives.
    fn transposes_matrices(&self) -> bool {
        let rank = self.shape.len();
        rank >= 2 && self.strides[rank - 2] == 1 && self.strides[rank - 1] == self.shape[rank - 2]
    }

    /// [`View::gather`] of a stack of transposed matrices: each matrix through
    /// the tiled [`crate::linalg::transpose_into`], matrices in parallel:
    /// faster than value by value (measured: `docs/performance.md`).
    fn gather_transposed(&self, src: &[f32], out: &mut [f32]) {
        let rank = self.shape.len();
        let (rows, cols) = (self.shape[rank - 2], self.shape[rank - 1]);
        let one = |(m, dst): (usize, &mut [f32])| {
            let start = self.row_offset(m * rows);
            crate::linalg::transpose_into(&src[start..start + rows * cols], cols, rows, dst);
        };
        if out.len() >= PAR_MIN {
            out.par_chunks_mut(rows * cols).enumerate().for_each(one);
        } else {
            out.chunks_mut(rows * cols).enumerate().for_each(one);
        }
    }
}

/// Elements per task of the data-movement loops.
const ROW_BLOCK: usize = 1 << 12;

pub(super) fn compile_transpose(ctx: &OpCtx) -> View {
    let x = ctx.input("x");
    let perm: Vec<usize> = ctx
        .ints("perm")
        .expect("required")
        .iter()
        .map(|&a| ctx.axis(a, x.rank()))
        .collect();
    let strides = contiguous_strides(&x.shape);
    View::new(
        ctx.output().shape.clone(),
        perm.iter().map(|&d| strides[d]).collect(),
        0,
    )
}

pub(super) fn compile_slice(ctx: &OpCtx) -> View {
    let x = ctx.input("x");
    let begin = ctx.ints("begin").expect("required");
    let strides = contiguous_strides(&x.shape);
    // A negative begin counts from the end; the sizes are the result's.
    let offset = (0..x.rank())
        .map(|d| begin[d].rem_euclid(x.shape[d] as i64) as usize * strides[d])
        .sum();
    View::new(ctx.output().shape.clone(), strides, offset)
}

/// A last axis of two elements rebuilt from the two elements of an operand of
/// the same shape, each times a scalar: `out[.., 0] = x[.., from[0].0] *
/// from[0].1`, likewise for `out[.., 1]`. RoPE's pair rotation `(a, b) ->
/// (-b, a)`, written as two slices, a `mul` and a `concat`, in one pass (the
/// plan fuses it; a factor of 1 stands for no `mul` and is exact).
#[derive(Debug)]
pub(super) struct Pairs {
    pub(super) from: [(usize, f32); 2],
}

impl Pairs {
    pub(super) fn run(&self, x: &[f32], out: &mut [f32]) {
        let [(c0, m0), (c1, m1)] = self.from;
        let body = |(o, x): (&mut [f32], &[f32])| {
            crate::math::simd(
                #[inline(always)]
                || {
                    for (o, x) in o.chunks_exact_mut(2).zip(x.chunks_exact(2)) {
                        o[0] = x[c0] * m0;
                        o[1] = x[c1] * m1;
                    }
                },
            )
        };
        if out.len() >= 1 << 16 {
            out.par_chunks_mut(ROW_BLOCK)
                .zip(x.par_chunks(ROW_BLOCK))
                .for_each(body);
        } else {
            body((out, x));
        }
    }
}

/// `concat`: the result is `outer` blocks; block `o` holds, in order, block `o`
/// of every operand (`parts[i]` contiguous elements each). With `interleave`
/// the parts instead alternate `slices` times, `after` elements at a time.
#[derive(Debug)]
pub(super) struct Concat {
    outer: usize,
    parts: Vec<usize>,
    /// `(slices, after)` for `interleave`.
    interleave: Option<(usize, usize)>,
}

impl Concat {
    pub(super) fn run(&self, args: &[&[f32]], out: &mut [f32]) {
        let block: usize = self.parts.iter().sum();
        debug_assert_eq!(out.len(), self.outer * block);
        if block == 0 {
            return;
        }
        let blocks_per_task = ROW_BLOCK.div_ceil(block).max(1);
        let task = |(t, dst): (usize, &mut [f32])| {
            for (i, dst) in dst.chunks_mut(block).enumerate() {
                let o = t * blocks_per_task + i;
                match self.interleave {
                    // Single elements (RoPE's pairs): plain stores, no copy calls.
                    None if self.parts.iter().all(|&p| p == 1) => {
                        for (d, src) in dst.iter_mut().zip(args) {
                            *d = src[o];
                        }
                    }
                    None => {
                        let mut at = 0;
                        for (src, &part) in args.iter().zip(&self.parts) {
                            dst[at..at + part].copy_from_slice(&src[o * part..][..part]);
                            at += part;
                        }
                    }
                    Some((slices, after)) => {
                        let n = args.len();
                        for j in 0..slices {
                            for (i, src) in args.iter().enumerate() {
                                let from = &src[o * slices * after + j * after..][..after];
                                dst[(j * n + i) * after..][..after].copy_from_slice(from);
                            }
                        }
                    }
                }
            }
        };
        if out.len() >= PAR_MIN {
            out.par_chunks_mut(blocks_per_task * block)
                .enumerate()
                .for_each(task);
        } else {
            out.chunks_mut(blocks_per_task * block)
                .enumerate()
                .for_each(task);
        }
    }
}

pub(super) fn compile_concat(ctx: &OpCtx) -> Concat {
    let values = ctx.tuple("values");
    let first = values[0];
    let axis = ctx.axis(ctx.int("axis").expect("required"), first.rank());
    let interleave = ctx.flag("interleave").unwrap_or(false);
    let outer: usize = first.shape[..axis].iter().product();
    let after: usize = first.shape[axis + 1..].iter().product();
    Concat {
        outer,
        parts: values.iter().map(|v| v.shape[axis] * after).collect(),
        interleave: interleave.then_some((first.shape[axis], after)),
    }
}

/// One view of `x` per result of `split`.
pub(super) fn compile_split(ctx: &OpCtx) -> Vec<View> {
    let x = ctx.input("x");
    let axis = ctx.axis(ctx.int("axis").expect("required"), x.rank());
    let strides = contiguous_strides(&x.shape);
    let mut start = 0;
    ctx.op
        .outputs
        .iter()
        .map(|out| {
            let view = View::new(out.ty.shape.clone(), strides.clone(), start * strides[axis]);
            start += out.ty.shape[axis];
            view
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_gather_strided_elements_and_merge_axes() {
        // x = [[0,1,2],[3,4,5]]; its transpose read through strides (1, 3).
        let x: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let t = View::new(vec![3, 2], vec![1, 3], 0);
        let mut gathered = vec![0.0; 6];
        t.gather(&x, &mut gathered);
        assert_eq!(gathered, [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert_eq!(contiguous_strides(&[2, 3, 4]), [12, 4, 1]);
        let mut one = [0.0];
        View::new(vec![], vec![], 4).gather(&x, &mut one);
        assert_eq!(one, [4.0]);
        // The odd elements of pairs [1, 3, 2]: size-1 axes go, the rest is one
        // stride-2 row starting at element 1.
        let odd = View::new(vec![1, 3, 1], vec![6, 2, 1], 1);
        assert_eq!(
            (odd.shape.as_slice(), odd.strides.as_slice()),
            ([3].as_slice(), [2].as_slice())
        );
        let mut out = [0.0; 3];
        odd.gather(&x, &mut out);
        assert_eq!(out, [1.0, 3.0, 5.0]);
        // An empty view stays empty.
        assert_eq!(View::new(vec![2, 0, 3], vec![0, 3, 1], 0).numel(), 0);
    }

    #[test]
    fn stacks_of_transposed_matrices_match_the_definition() {
        // Transposes of the last two axes (the tiled path), with the batch
        // axes in order and swapped, at sizes with whole 16 x 8 tiles, edges,
        // and enough elements for the parallel loop.
        for (shape, perm) in [
            (vec![2, 3, 5, 7], vec![0, 1, 3, 2]),
            (vec![1, 12, 64, 512], vec![0, 1, 3, 2]),
            (vec![1, 12, 512, 64], vec![0, 1, 3, 2]),
            (vec![3, 4, 33, 17], vec![1, 0, 3, 2]),
        ] {
            let x: Vec<f32> = (0..shape.iter().product::<usize>())
                .map(|v| v as f32)
                .collect();
            let strides = contiguous_strides(&shape);
            let out_shape: Vec<usize> = perm.iter().map(|&d| shape[d]).collect();
            let view = View::new(
                out_shape.clone(),
                perm.iter().map(|&d| strides[d]).collect(),
                0,
            );
            assert!(view.transposes_matrices(), "{shape:?} {perm:?}");
            let mut got = vec![0.0; x.len()];
            view.gather(&x, &mut got);
            // out[i0, i1, i2, i3] = x at index i permuted back.
            let out_strides = contiguous_strides(&out_shape);
            for (flat, &g) in got.iter().enumerate() {
                let idx: Vec<usize> = (0..4)
                    .map(|d| flat / out_strides[d] % out_shape[d])
                    .collect();
                let src: usize = (0..4).map(|d| idx[d] * strides[perm[d]]).sum();
                assert_eq!(g, x[src], "{shape:?} {perm:?} at {idx:?}");
            }
        }
    }

    #[test]
    fn concat_blocks_and_interleave() {
        // a = [[0,1],[2,3]], b = [[10],[11]] along axis 1 -> [[0,1,10],[2,3,11]].
        let cat = Concat {
            outer: 2,
            parts: vec![2, 1],
            interleave: None,
        };
        let mut out = [0.0; 6];
        cat.run(&[&[0., 1., 2., 3.], &[10., 11.]], &mut out);
        assert_eq!(out, [0., 1., 10., 2., 3., 11.]);
        // Pairs from single elements: [[0],[1],[2]] and [[10],[11],[12]] along axis 1.
        let pairs = Concat {
            outer: 3,
            parts: vec![1, 1],
            interleave: None,
        };
        pairs.run(&[&[0., 1., 2.], &[10., 11., 12.]], &mut out);
        assert_eq!(out, [0., 10., 1., 11., 2., 12.]);
        // Interleaving a = [0,1,2] and b = [10,11,12] one element at a time.
        let cat = Concat {
            outer: 1,
            parts: vec![3, 3],
            interleave: Some((3, 1)),
        };
        cat.run(&[&[0., 1., 2.], &[10., 11., 12.]], &mut out);
        assert_eq!(out, [0., 10., 1., 11., 2., 12.]);
    }
}
