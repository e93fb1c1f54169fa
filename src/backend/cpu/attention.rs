//! Causal attention, fused: the CPU backend's form of the attention idioms the
//! Llama kernels write as separate MIL ops (`fuse/causal.rs` matches the
//! patterns). What changes is the work done, not the values:
//!
//! - **Causal skipping.** A constant mask whose rows end in a run of large
//!   negative values (the causal mask: `-65504` above the diagonal) makes those
//!   softmax entries exactly zero, provided the scores are bounded: with
//!   `B_i = |scale| |q_i| max_j |k_j|`, a skipped entry sits at least
//!   `gap_i - 2 B_i` below the row's maximum (`gap_i`: the mask's kept maximum
//!   minus its skipped maximum), and `exp` of anything below -103.97 is 0 in
//!   `f32`. Rows whose bound fails (huge or non-finite scores) are computed over
//!   every column, so the result is the unfused program's in every case.
//!   The per-row extents travel with the probabilities as a hidden `[B, T]`
//!   tensor, so every consumer skips exactly the entries that are zero.
//! - **Blocking.** Each head is processed in blocks of [`BLOCK`] query rows:
//!   the block's scores (at most `BLOCK x T`) stay in cache between the product
//!   that makes them, the softmax and the product that consumes them; the
//!   forward pass never writes the `T x T` probabilities at all.
//!
//! Heads run in parallel (one rayon task per head); the products inside a
//! head run on its thread through faer. Only fp32 values are fused: programs
//! that round to fp16 after every op keep their op-by-op steps.

use std::cell::RefCell;

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

/// Query rows per block.
const BLOCK: usize = 64;

/// Mask values at or below this end a row's kept columns.
const SKIP: f32 = -1.0e4;

/// Below this margin `exp(v - max)` is exactly 0 in `f32` (`exp` underflows
/// at -103.97); the rest covers rounding of the scores.
const MARGIN: f32 = 128.0;

/// Which columns of each row of an additive `[T, T]` mask may be skipped.
#[derive(Debug, Clone)]
pub(super) struct CausalMask {
    /// Row `i` keeps columns `0..ends[i]`; every later column is at most [`SKIP`].
    ends: Vec<usize>,
    /// Largest kept mask value minus largest skipped one, per row.
    gaps: Vec<f32>,
}

impl CausalMask {
    /// The skippable structure of `mask` (`t x t`, row-major), or `None` when
    /// no row ends in skippable columns (or the mask holds a NaN).
    pub(super) fn analyze(mask: &[f32], t: usize) -> Option<CausalMask> {
        if t == 0 || mask.len() != t * t || mask.iter().any(|m| m.is_nan()) {
            return None;
        }
        let mut ends = Vec::with_capacity(t);
        let mut gaps = Vec::with_capacity(t);
        for row in mask.chunks(t) {
            let end = row.iter().rposition(|&m| m > SKIP).map_or(0, |j| j + 1);
            let (kept, skipped) = row.split_at(end);
            let max = |s: &[f32]| s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            if kept.is_empty() || skipped.is_empty() {
                ends.push(t);
                gaps.push(0.0);
            } else {
                ends.push(end);
                gaps.push(max(kept) - max(skipped));
            }
        }
        ends.iter()
            .any(|&e| e < t)
            .then_some(CausalMask { ends, gaps })
    }
}

/// One matrix of a batch: `rows x cols` as used, stored row-major either so
/// or transposed (`cols x rows`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct MatrixLayout {
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) t: bool,
}

impl MatrixLayout {
    fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// The Euclidean norm of each of the `rows` rows of one matrix `data` in
    /// this layout into `norms`, summed in `f32` (an overflow gives infinity,
    /// a NaN stays NaN: both fail the scores bound, which is what they should do).
    fn row_norms(&self, data: &[f32], norms: &mut [f32]) {
        crate::math::simd(
            #[inline(always)]
            || {
                norms.fill(0.0);
                if self.t {
                    for col in data.chunks_exact(self.rows) {
                        for (n, &v) in norms.iter_mut().zip(col) {
                            *n += v * v;
                        }
                    }
                } else {
                    for (n, row) in norms.iter_mut().zip(data.chunks_exact(self.cols)) {
                        *n = row.iter().map(|&v| v * v).sum();
                    }
                }
                for n in norms.iter_mut() {
                    *n = n.sqrt();
                }
            },
        );
    }

    fn view<'a>(&self, data: &'a [f32]) -> MatRef<'a, f32> {
        if self.t {
            MatRef::from_row_major_slice(data, self.cols, self.rows).transpose()
        } else {
            MatRef::from_row_major_slice(data, self.rows, self.cols)
        }
    }

    fn view_mut<'a>(&self, data: &'a mut [f32]) -> MatMut<'a, f32> {
        if self.t {
            MatMut::from_row_major_slice_mut(data, self.cols, self.rows).transpose_mut()
        } else {
            MatMut::from_row_major_slice_mut(data, self.rows, self.cols)
        }
    }
}

thread_local! {
    /// A block of scores (`BLOCK x T`), reused between blocks and calls.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The query and key row norms of [`Scores::with_bounds`].
    static NORMS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `f` on this thread's scratch buffer of at least `len` elements.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with_borrow_mut(|s| {
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(&mut s[..len])
    })
}

/// `dst (rows x cols, row stride `stride`) = a b`, on this thread.
fn product_into(dst: &mut [f32], stride: usize, a: MatRef<f32>, b: MatRef<f32>) {
    let (rows, cols) = (a.nrows(), b.ncols());
    if rows == 0 || cols == 0 {
        return;
    }
    // A row-major strided view built as the transpose of a column-major one:
    // faer 0.24.4's `from_row_major_slice_with_stride_mut` gives its rows the
    // column stride (the view comes out transposed).
    let dst = MatMut::from_column_major_slice_with_stride_mut(
        &mut dst[..(rows - 1) * stride + cols],
        cols,
        rows,
        stride,
    )
    .transpose_mut();
    matmul(dst, Accum::Replace, a, b, 1.0f32, Par::Seq);
}

/// `softmax(Q K^T scale + mask)` over the last axis, `Q` and `K` `T x D` per
/// batch, `mask` `[T, T]` shared by every batch.
#[derive(Debug, Clone)]
pub(super) struct Scores {
    pub(super) batches: usize,
    pub(super) q: MatrixLayout,
    pub(super) k: MatrixLayout,
    pub(super) scale: f32,
    pub(super) mask: CausalMask,
}

impl Scores {
    fn t(&self) -> usize {
        self.q.rows
    }

    /// `f` on the norms of one batch's query rows and `max_j |k_j|` over its
    /// key rows (infinite if any is not finite), in this thread's buffer.
    fn with_bounds<R>(&self, q: &[f32], k: &[f32], f: impl FnOnce((&[f32], f32)) -> R) -> R {
        NORMS.with_borrow_mut(|norms| {
            norms.resize(self.q.rows + self.k.rows, 0.0);
            let (qn, kn) = norms.split_at_mut(self.q.rows);
            self.q.row_norms(q, qn);
            self.k.row_norms(k, kn);
            let kmax = kn.iter().fold(0.0f32, |m, &n| {
                if n.is_finite() {
                    m.max(n)
                } else {
                    f32::INFINITY
                }
            });
            f((qn, kmax))
        })
    }

    /// Columns to compute for row `i` (query norm `qn`): its mask extent if
    /// the scores bound allows skipping the rest, all `T` otherwise.
    fn extent(&self, i: usize, qn: f32, kmax: f32) -> usize {
        let (end, gap) = (self.mask.ends[i], self.mask.gaps[i]);
        if end == self.t() {
            return end;
        }
        let bound = self.scale.abs() * qn * kmax * 1.01;
        if 2.0 * bound + MARGIN < gap {
            end
        } else {
            self.t()
        }
    }

    /// Rows `r0..r0 + rows` of the probabilities into `dst` (row stride `T`):
    /// columns below each row's extent computed, the rest up to `zero_to` (or
    /// the block's widest extent, whichever is larger) set to 0. Writes each
    /// row's extent into `ext` and returns the block's widest one.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        q: MatRef<f32>,
        k: MatRef<f32>,
        (qn, kmax): (&[f32], f32),
        mask: &[f32],
        r0: usize,
        dst: &mut [f32],
        ext: &mut [usize],
        zero_to: usize,
    ) -> usize {
        let t = self.t();
        let rows = ext.len();
        for (r, e) in ext.iter_mut().enumerate() {
            *e = self.extent(r0 + r, qn[r0 + r], kmax);
        }
        let width = ext.iter().copied().max().unwrap_or(0);
        product_into(dst, t, q.subrows(r0, rows), k.subrows(0, width).transpose());
        let scale = self.scale;
        for (r, &e) in ext.iter().enumerate() {
            let row = &mut dst[r * t..r * t + zero_to.max(width)];
            let m = &mask[(r0 + r) * t..][..e];
            crate::math::simd(
                #[inline(always)]
                || {
                    let (kept, rest) = row.split_at_mut(e);
                    for (o, &m) in kept.iter_mut().zip(m) {
                        *o = *o * scale + m;
                    }
                    let max = crate::math::max(kept);
                    let inv = 1.0 / crate::math::exp_shifted_sum(kept, max);
                    for o in kept.iter_mut() {
                        *o *= inv;
                    }
                    rest.fill(0.0);
                },
            );
        }
        width
    }

    /// `p` (`[B, T, T]`) and its row extents `ext` (`[B, T]`, as `f32`).
    pub(super) fn run(&self, q: &[f32], k: &[f32], mask: &[f32], p: &mut [f32], ext: &mut [f32]) {
        let t = self.t();
        if t == 0 {
            return;
        }
        let (ql, kl) = (self.q.len(), self.k.len());
        debug_assert_eq!(p.len(), self.batches * t * t);
        p.par_chunks_mut(t * t)
            .zip(ext.par_chunks_mut(t))
            .enumerate()
            .for_each(|(b, (p, ext_out))| {
                let (qd, kd) = (&q[b * ql..][..ql], &k[b * kl..][..kl]);
                let (qb, kb) = (self.q.view(qd), self.k.view(kd));
                let mut ext = [0usize; BLOCK];
                self.with_bounds(qd, kd, |bounds| {
                    for r0 in (0..t).step_by(BLOCK) {
                        let rows = BLOCK.min(t - r0);
                        let dst = &mut p[r0 * t..(r0 + rows) * t];
                        self.block(qb, kb, bounds, mask, r0, dst, &mut ext[..rows], t);
                        for (o, &e) in ext_out[r0..r0 + rows].iter_mut().zip(&ext[..rows]) {
                            *o = e as f32;
                        }
                    }
                });
            });
    }
}

/// `softmax(Q K^T scale + mask) V`, the probabilities never stored: per block
/// of query rows, scores in a scratch buffer, then their product with `V`.
#[derive(Debug, Clone)]
pub(super) struct Attend {
    pub(super) scores: Scores,
    /// `V`: `T x N` per batch.
    pub(super) v: MatrixLayout,
    /// The result: `T x N` per batch.
    pub(super) out: MatrixLayout,
}

impl Attend {
    pub(super) fn run(&self, q: &[f32], k: &[f32], mask: &[f32], v: &[f32], out: &mut [f32]) {
        let s = &self.scores;
        let t = s.t();
        if t == 0 || self.out.len() == 0 {
            return;
        }
        let (ql, kl, vl) = (s.q.len(), s.k.len(), self.v.len());
        let f = |b: usize, out: &mut [f32]| {
            let (qd, kd) = (&q[b * ql..][..ql], &k[b * kl..][..kl]);
            let (qb, kb) = (s.q.view(qd), s.k.view(kd));
            let vb = self.v.view(&v[b * vl..][..vl]);
            let mut ext = [0usize; BLOCK];
            let mut out = self.out.view_mut(out);
            s.with_bounds(qd, kd, |bounds| {
                with_scratch(BLOCK * t, |scores| {
                    for r0 in (0..t).step_by(BLOCK) {
                        let rows = BLOCK.min(t - r0);
                        let width = s.block(qb, kb, bounds, mask, r0, scores, &mut ext[..rows], 0);
                        let p = MatRef::from_row_major_slice_with_stride(
                            &scores[..(rows - 1) * t + width],
                            rows,
                            width,
                            t,
                        );
                        let dst = out.as_mut().subrows_mut(r0, rows);
                        matmul(
                            dst,
                            Accum::Replace,
                            p,
                            vb.subrows(0, width),
                            1.0f32,
                            Par::Seq,
                        );
                    }
                })
            });
        };
        out.par_chunks_mut(self.out.len())
            .enumerate()
            .for_each(|(b, o)| f(b, o));
    }
}

/// `P Y` or `P^T Y` for `P` (`T x T` per batch) zero beyond its row extents.
#[derive(Debug, Clone)]
pub(super) struct TriMatmul {
    pub(super) batches: usize,
    pub(super) t: usize,
    /// Use `P^T`.
    pub(super) p_t: bool,
    /// `Y`: `T x N` per batch.
    pub(super) y: MatrixLayout,
    /// The result: `T x N` per batch.
    pub(super) out: MatrixLayout,
}

impl TriMatmul {
    pub(super) fn run(&self, p: &[f32], ext: &[f32], y: &[f32], out: &mut [f32]) {
        let t = self.t;
        if t == 0 || self.out.len() == 0 {
            return;
        }
        let yl = self.y.len();
        let f = |b: usize, out: &mut [f32]| {
            let pb = MatRef::from_row_major_slice(&p[b * t * t..][..t * t], t, t);
            let eb = &ext[b * t..][..t];
            let yb = self.y.view(&y[b * yl..][..yl]);
            let mut out = self.out.view_mut(out);
            for r0 in (0..t).step_by(BLOCK) {
                let rows = BLOCK.min(t - r0);
                let mut dst = out.as_mut().subrows_mut(r0, rows);
                if self.p_t {
                    // Result rows r0.. are P's columns r0..: rows of P whose
                    // extent does not pass r0 hold zeros there.
                    let start = eb.iter().position(|&e| e as usize > r0).unwrap_or(t);
                    let a = pb.submatrix(start, r0, t - start, rows).transpose();
                    if start == t {
                        dst.fill(0.0);
                    } else {
                        matmul(
                            dst,
                            Accum::Replace,
                            a,
                            yb.subrows(start, t - start),
                            1.0f32,
                            Par::Seq,
                        );
                    }
                } else {
                    let width = eb[r0..r0 + rows]
                        .iter()
                        .map(|&e| e as usize)
                        .max()
                        .unwrap_or(0);
                    if width == 0 {
                        dst.fill(0.0);
                    } else {
                        let a = pb.submatrix(r0, 0, rows, width);
                        matmul(
                            dst,
                            Accum::Replace,
                            a,
                            yb.subrows(0, width),
                            1.0f32,
                            Par::Seq,
                        );
                    }
                }
            }
        };
        debug_assert_eq!(out.len(), self.batches * self.out.len());
        out.par_chunks_mut(self.out.len())
            .enumerate()
            .for_each(|(b, o)| f(b, o));
    }
}

/// The softmax backward of attention: with `dP = A B` (`A` `T x E`, `B`
/// `E x T` per batch), `dS = P * (dP - rowsum(dP * P))`, times `scale` if
/// given; the ops' own order of rounding, and `dS` zero beyond `P`'s extents.
#[derive(Debug, Clone)]
pub(super) struct SoftmaxBackward {
    pub(super) batches: usize,
    pub(super) t: usize,
    pub(super) a: MatrixLayout,
    pub(super) b: MatrixLayout,
    pub(super) scale: Option<f32>,
}

impl SoftmaxBackward {
    pub(super) fn run(&self, p: &[f32], ext: &[f32], a: &[f32], b: &[f32], ds: &mut [f32]) {
        let t = self.t;
        if t == 0 {
            return;
        }
        let (al, bl) = (self.a.len(), self.b.len());
        debug_assert_eq!(ds.len(), self.batches * t * t);
        ds.par_chunks_mut(t * t)
            .zip(p.par_chunks(t * t))
            .enumerate()
            .for_each(|(n, (ds, p))| {
                let (ab, bb) = (
                    self.a.view(&a[n * al..][..al]),
                    self.b.view(&b[n * bl..][..bl]),
                );
                let eb = &ext[n * t..][..t];
                with_scratch(BLOCK * t, |dp| {
                    for r0 in (0..t).step_by(BLOCK) {
                        let rows = BLOCK.min(t - r0);
                        let ends = &eb[r0..r0 + rows];
                        let width = ends.iter().map(|&e| e as usize).max().unwrap_or(0);
                        product_into(dp, t, ab.subrows(r0, rows), bb.subcols(0, width));
                        for (r, &e) in ends.iter().enumerate() {
                            let e = e as usize;
                            let i = r0 + r;
                            let (pr, dr) = (&p[i * t..][..e], &dp[r * t..][..e]);
                            let (out, rest) = ds[i * t..(i + 1) * t].split_at_mut(e);
                            self.row(pr, dr, out);
                            rest.fill(0.0);
                        }
                    }
                });
            });
    }

    fn row(&self, p: &[f32], dp: &[f32], out: &mut [f32]) {
        let scale = self.scale;
        crate::math::simd(
            #[inline(always)]
            || {
                let sum = crate::math::sum_products_f64(dp, p) as f32;
                match scale {
                    Some(s) => {
                        for ((o, &p), &d) in out.iter_mut().zip(p).zip(dp) {
                            *o = p * (d - sum) * s;
                        }
                    }
                    None => {
                        for ((o, &p), &d) in out.iter_mut().zip(p).zip(dp) {
                            *o = p * (d - sum);
                        }
                    }
                }
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::BTreeMap;

    use crate::backend::Precision;
    use crate::backend::cpu::plan::Plan;
    use crate::model::ModelConfig;
    use crate::model::kernels::{KernelOptions, LayerKernels, WeightMode};
    use crate::rng::Rng;

    /// The attention kernels (MHA and GQA 4/2; one block, and several blocks
    /// with a ragged last one) give the values of their programs run op by op,
    /// with the fused steps in place of the attention ops. With inputs of
    /// magnitude 300 the scores bound fails and every row is computed in full,
    /// masked entries included (they are no longer exactly zero there).
    #[test]
    fn fused_attention_matches_the_program_run_op_by_op() {
        for (heads, kv_heads, seq) in [(4, 4, 16), (4, 2, 150), (2, 1, 64)] {
            let config = ModelConfig::llama(64, 1, heads, kv_heads, 96, 32, seq);
            let opts = KernelOptions {
                mode: WeightMode::Inputs,
                ..KernelOptions::cpu()
            };
            let kernels = LayerKernels::build(&config, seq, opts, &|_| None).unwrap();
            for spec in [&kernels.attn_fwd, &kernels.attn_bwd] {
                let weights: BTreeMap<String, Vec<u8>> = spec.package.weights.clone();
                let fused = Plan::compile(&spec.program, &weights, Precision::Fp32).unwrap();
                let exact = Plan::lower_unfused(&spec.program, &weights, Precision::Fp32).unwrap();
                let labels = fused.step_labels();
                let expect: &[&str] = if spec.name == "attn_fwd" {
                    &["causal attention"]
                } else {
                    &[
                        "causal softmax",
                        "softmax backward",
                        "matmul(causal P^T)",
                        "matmul(causal P)",
                    ]
                };
                for want in expect {
                    assert!(
                        labels.iter().any(|l| l.starts_with(want)),
                        "{}: no `{want}` step in {labels:?}",
                        spec.name
                    );
                }
                for magnitude in [1.0f32, 300.0] {
                    let mut rng = Rng::new(11);
                    let inputs: Vec<Vec<f32>> = exact
                        .inputs
                        .iter()
                        .map(|v| {
                            (0..v.ty.numel())
                                .map(|_| (rng.next_f32() - 0.5) * magnitude)
                                .collect()
                        })
                        .collect();
                    for (got, want) in fused.run_once(&inputs).iter().zip(exact.run_once(&inputs)) {
                        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                        for (g, w) in got.iter().zip(&want) {
                            assert!(
                                (g - w).abs() <= 2e-5 * (scale + w.abs())
                                    || (g.is_nan() && w.is_nan()),
                                "{} seq {seq} magnitude {magnitude}: {g} vs {w}",
                                spec.name
                            );
                        }
                    }
                }
            }
        }
    }

    /// The strided product writes rows of the right stride (see `product_into`).
    #[test]
    fn a_strided_product_writes_row_major_rows() {
        let (m, k, n, stride) = (3, 2, 4, 7);
        let a: Vec<f32> = (0..m * k).map(|v| v as f32).collect();
        let b: Vec<f32> = (0..k * n).map(|v| (v * v) as f32).collect();
        let mut dst = vec![-1.0; (m - 1) * stride + n];
        let (av, bv) = (
            MatRef::from_row_major_slice(&a, m, k),
            MatRef::from_row_major_slice(&b, k, n),
        );
        product_into(&mut dst, stride, av, bv);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
                assert_eq!(dst[i * stride + j], want, "({i}, {j})");
            }
            if i + 1 < m {
                assert!(
                    dst[i * stride + n..(i + 1) * stride]
                        .iter()
                        .all(|&v| v == -1.0)
                );
            }
        }
    }

    /// Probabilities and extents against softmax in f64: bounded scores skip
    /// the masked columns (extent `i + 1`); scores too large for the bound are
    /// computed over the whole row, where masked entries are no longer zero.
    #[test]
    fn scores_skip_masked_columns_only_when_the_bound_allows() {
        let (t, d, heads, scale) = (70, 8, 2, 0.35f32);
        let mask = crate::model::kernels::causal_mask(t);
        let lay = MatrixLayout {
            rows: t,
            cols: d,
            t: false,
        };
        for (magnitude, skips) in [(1.0f32, true), (3000.0, false)] {
            let mut rng = Rng::new(5);
            let mut draw = || -> Vec<f32> {
                (0..heads * t * d)
                    .map(|_| (rng.next_f32() - 0.5) * magnitude)
                    .collect()
            };
            let (q, k) = (draw(), draw());
            let scores = Scores {
                batches: heads,
                q: lay,
                k: lay,
                scale,
                mask: CausalMask::analyze(&mask, t).unwrap(),
            };
            let (mut p, mut ext) = (vec![f32::NAN; heads * t * t], vec![0.0; heads * t]);
            scores.run(&q, &k, &mask, &mut p, &mut ext);
            let mut masked_mass = 0.0f64;
            for h in 0..heads {
                for i in 0..t {
                    let want_ext = if skips { i + 1 } else { t };
                    assert_eq!(ext[h * t + i] as usize, want_ext, "head {h} row {i}");
                    let v: Vec<f64> = (0..t)
                        .map(|j| {
                            let dot = (0..d)
                                .map(|c| f64::from(q[(h * t + i) * d + c] * k[(h * t + j) * d + c]))
                                .sum::<f64>();
                            dot * f64::from(scale) + f64::from(mask[i * t + j])
                        })
                        .collect();
                    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = v.iter().map(|x| (x - max).exp()).sum();
                    for j in 0..t {
                        let want = (v[j] - max).exp() / z;
                        let got = f64::from(p[(h * t + i) * t + j]);
                        assert!(
                            (got - want).abs() < 1e-5,
                            "head {h} ({i}, {j}): {got} vs {want}"
                        );
                        if j > i {
                            masked_mass += got;
                        }
                    }
                }
            }
            assert_eq!(masked_mass > 0.0, !skips, "magnitude {magnitude}");
        }
    }

    #[test]
    fn the_causal_mask_keeps_the_diagonal_and_skips_above_it() {
        let t = 5;
        let mask = crate::model::kernels::causal_mask(t);
        let m = CausalMask::analyze(&mask, t).unwrap();
        assert_eq!(m.ends, vec![1, 2, 3, 4, 5]);
        assert_eq!(&m.gaps[..4], &[65504.0; 4]);
        // A mask without skippable columns, and one holding a NaN, give nothing.
        assert!(CausalMask::analyze(&vec![0.0; t * t], t).is_none());
        let mut nan = mask.clone();
        nan[3] = f32::NAN;
        assert!(CausalMask::analyze(&nan, t).is_none());
        // A sliding window: row 3 keeps columns 2..=3 and skips the rest, but
        // only the columns after its last kept one are skippable here.
        let window: Vec<f32> = (0..t * t)
            .map(|i| {
                let (r, c) = (i / t, i % t);
                if c <= r && r - c < 2 { 0.0 } else { -65504.0 }
            })
            .collect();
        let w = CausalMask::analyze(&window, t).unwrap();
        assert_eq!(w.ends, vec![1, 2, 3, 4, 5]);
    }
}
