//! The CPU half of a training step, in the kernels' channel-major layout:
//! activations are `(C, T)` row-major (channel `c`, position `t`), the host
//! view of an ANE `[1, C, 1, T]` tensor. Embedding gather/scatter, RMSNorm
//! forward/backward (exact, including the norm weight), the classifier and
//! cross-entropy, over the full vocabulary or over blocks of its rows (for
//! vocabularies whose logits are too large to hold at once). Each forward
//! sits next to its backward.

// Index loops over (channel, position) read clearest for this layout.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use crate::linalg::{gemm, n, t};

thread_local! {
    /// The embedding rows of a sequence, position-major `(T, C)`, between
    /// [`embedding_forward`]'s gather and its transpose (and the reverse in
    /// [`embedding_backward`]); kept between calls.
    static ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `x (C, T)[c, t] = embedding (V, C)[tokens[t], c]`: the rows copied
/// position-major, then one tiled transpose (see [`crate::linalg::transpose_into`])
/// into the channel-major layout, instead of writing each channel's row a
/// value at a time.
pub fn embedding_forward(x: &mut [f32], embedding: &[f32], tokens: &[u32], dim: usize) {
    let seq = tokens.len();
    debug_assert_eq!(x.len(), dim * seq);
    ROWS.with_borrow_mut(|rows| {
        rows.clear();
        for &tok in tokens {
            rows.extend_from_slice(&embedding[tok as usize * dim..][..dim]);
        }
        crate::linalg::transpose_into(rows, seq, dim, x);
    });
}

/// `d_embedding[tokens[t], c] += dx (C, T)[c, t]`: `dx` transposed to
/// position-major rows, each added to its token's row; a repeated token adds
/// in position order.
pub fn embedding_backward(d_embedding: &mut [f32], dx: &[f32], tokens: &[u32], dim: usize) {
    let seq = tokens.len();
    debug_assert_eq!(dx.len(), dim * seq);
    ROWS.with_borrow_mut(|rows| {
        rows.resize(dim * seq, 0.0);
        crate::linalg::transpose_into(dx, dim, seq, rows);
        for (&tok, g) in tokens.iter().zip(rows.chunks_exact(dim)) {
            let dst = &mut d_embedding[tok as usize * dim..][..dim];
            crate::math::simd(
                #[inline(always)]
                || {
                    for (d, &g) in dst.iter_mut().zip(g) {
                        *d += g;
                    }
                },
            );
        }
    });
}

/// Elements (`C x T`) from which the RMSNorm backward's passes split over
/// threads (the forward's, from twice as many). Below it a pass takes tens of
/// microseconds, about what handing work to the pool's workers costs
/// (measured with criterion, `rmsnorm` group, Zen 4, 768 x 256: backward 170
/// us on one thread against 105 on two; the forward 40 against 50).
const NORM_PAR_MIN: usize = 1 << 17;

/// Whether a pass over `elements` values splits over threads.
fn norm_par(elements: usize) -> bool {
    elements >= NORM_PAR_MIN && rayon::current_num_threads() > 1
}

/// `f(t0, block)` for blocks of positions of a per-position vector `out`
/// (`t0`: the block's first position): one block of all of them, or with
/// `par` one block per worker thread (whole cache lines each), in parallel.
/// A block reads its span of every channel's row, so blocks are as long as
/// possible: runs of 64 positions across 768 rows took 2.5x as long as whole
/// rows on one thread.
fn per_position_blocks(par: bool, out: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync) {
    let len = if par {
        out.len()
            .div_ceil(rayon::current_num_threads())
            .next_multiple_of(16)
    } else {
        out.len()
    };
    let body = |(b, block): (usize, &mut [f32])| {
        crate::math::simd(
            #[inline(always)]
            || f(b * len, block),
        )
    };
    if par {
        out.par_chunks_mut(len).enumerate().for_each(body);
    } else {
        out.chunks_mut(len.max(1)).enumerate().for_each(body);
    }
}

/// RMSNorm over channels of `x (C, T)`: `y = x * rrms[t] * w[c]` with
/// `rrms[t] = 1 / sqrt(mean_c x[c,t]^2 + eps)`. Writes `rrms (T)` for the backward.
///
/// Two passes, each split over threads for large arrays ([`NORM_PAR_MIN`])
/// without changing a value: the per-position sums by blocks of positions
/// (each position sums its channels in order), then `y` by channel rows.
pub fn rmsnorm_forward(y: &mut [f32], rrms: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let (dim, seq) = (w.len(), rrms.len());
    debug_assert_eq!(x.len(), dim * seq);
    debug_assert_eq!(y.len(), dim * seq);
    if seq == 0 {
        return;
    }
    let par = norm_par(dim * seq / 2);
    // Both passes in one hand-over to the pool (see `math::on_pool`).
    let mut passes = || {
        per_position_blocks(
            par,
            rrms,
            #[inline(always)]
            |t0, r| {
                r.fill(0.0);
                for c in 0..dim {
                    for (r, &v) in r.iter_mut().zip(&x[c * seq + t0..]) {
                        *r += v * v;
                    }
                }
                for r in r.iter_mut() {
                    *r = 1.0 / (*r / dim as f32 + eps).sqrt();
                }
            },
        );
        let rrms = &*rrms;
        let row = |(c, ys): (usize, &mut [f32])| {
            crate::math::simd(
                #[inline(always)]
                || {
                    let xs = &x[c * seq..(c + 1) * seq];
                    for ((yv, &xv), &r) in ys.iter_mut().zip(xs).zip(rrms) {
                        *yv = xv * r * w[c];
                    }
                },
            )
        };
        if par {
            y.par_chunks_mut(seq).enumerate().for_each(row);
        } else {
            y.chunks_mut(seq).enumerate().for_each(row);
        }
    };
    if par {
        crate::math::on_pool(passes);
    } else {
        passes();
    }
}

/// SwiGLU's `gate = (h1 sigmoid(h1)) h3`, elementwise, with the ops of the
/// `ffn_fwd` kernel in its order (the CPU backend's numbers bit for bit in
/// fp32).
pub fn swiglu_gate(gate: &mut [f32], h1: &[f32], h3: &[f32]) {
    crate::math::simd(
        #[inline(always)]
        || {
            for ((gate, &a), &b) in gate.iter_mut().zip(h1).zip(h3) {
                *gate = a * crate::math::sigmoid(a) * b;
            }
        },
    )
}

/// Backward of [`rmsnorm_forward`]: `dx += d/dx`, `dw += d/dw` given `dy (C, T)`
/// (`dw` `None`: the weight is frozen, its gradient not computed).
/// `dx[c,t] = rrms (w[c] dy[c,t]) - x[c,t] rrms^3 / C * sum_c' w[c'] dy[c',t] x[c',t]`.
///
/// Two passes like the forward's: the per-position sums by blocks of
/// positions, then by channel rows `dw[c]` and `dx`'s row. Each `dw[c]` sums
/// over positions in eight interleaved lanes, so that the loop vectorizes (one
/// running sum would wait on every add; measured in `docs/performance.md`,
/// "Measurements behind host-code choices").
pub fn rmsnorm_backward(
    dx: &mut [f32],
    mut dw: Option<&mut [f32]>,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    rrms: &[f32],
) {
    let (dim, seq) = (w.len(), rrms.len());
    debug_assert_eq!(x.len(), dim * seq);
    debug_assert_eq!(dx.len(), dim * seq);
    if seq == 0 {
        return;
    }
    // This thread's per-position sums, kept between calls (no allocation per call).
    let mut dot = DOT.take();
    dot.clear();
    dot.resize(seq, 0.0);
    let par = norm_par(dim * seq);
    let mut passes = || {
        // dot[t] = rrms^3 / C * sum_c w[c] dy[c,t] x[c,t].
        per_position_blocks(
            par,
            &mut dot,
            #[inline(always)]
            |t0, dot| {
                for c in 0..dim {
                    let (xs, dys) = (&x[c * seq + t0..], &dy[c * seq + t0..]);
                    let wc = w[c];
                    for ((dot, &d), &xv) in dot.iter_mut().zip(dys).zip(xs) {
                        *dot += wc * (d * xv);
                    }
                }
                for (dot, &r) in dot.iter_mut().zip(&rrms[t0..]) {
                    *dot *= r * r * r / dim as f32;
                }
            },
        );
        let dots = &*dot;
        let full = seq / 8 * 8;
        // Row `c` of `dx`, and `dw[c]` when the weight's gradient is wanted.
        let row = |c: usize, dxs: &mut [f32], dwc: Option<&mut f32>| {
            crate::math::simd(
                #[inline(always)]
                || {
                    let (xs, dys) = (&x[c * seq..(c + 1) * seq], &dy[c * seq..(c + 1) * seq]);
                    if let Some(dwc) = dwc {
                        let mut lanes = [0.0f32; 8];
                        for ((d, xv), r) in dys[..full]
                            .chunks_exact(8)
                            .zip(xs.chunks_exact(8))
                            .zip(rrms.chunks_exact(8))
                        {
                            for i in 0..8 {
                                lanes[i] += d[i] * xv[i] * r[i];
                            }
                        }
                        let mut tail = 0.0f32;
                        for pos in full..seq {
                            tail += dys[pos] * xs[pos] * rrms[pos];
                        }
                        *dwc += lanes.iter().sum::<f32>() + tail;
                    }
                    let wc = w[c];
                    for pos in 0..seq {
                        dxs[pos] += rrms[pos] * wc * dys[pos] - xs[pos] * dots[pos];
                    }
                },
            )
        };
        match dw.as_deref_mut() {
            Some(dw) if par => (dx.par_chunks_mut(seq).zip(dw.par_iter_mut()))
                .enumerate()
                .for_each(|(c, (dxs, dwc))| row(c, dxs, Some(dwc))),
            Some(dw) => (dx.chunks_mut(seq).zip(dw.iter_mut()))
                .enumerate()
                .for_each(|(c, (dxs, dwc))| row(c, dxs, Some(dwc))),
            None if par => (dx.par_chunks_mut(seq))
                .enumerate()
                .for_each(|(c, dxs)| row(c, dxs, None)),
            None => (dx.chunks_mut(seq))
                .enumerate()
                .for_each(|(c, dxs)| row(c, dxs, None)),
        }
    };
    if par {
        crate::math::on_pool(passes);
    } else {
        passes();
    }
    DOT.set(dot);
}

thread_local! {
    /// [`rmsnorm_backward`]'s per-position sums, reused between calls.
    static DOT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `logits (V, P) = E x` for final-norm activations `x (C, P)` and a
/// classifier `E (V, C)`: vocabulary-major, one row per vocabulary entry and one
/// column per position, like every other host activation. In this form the
/// product (and both of its backward products) runs in faer's fast layout.
pub fn classifier_forward(logits: &mut [f32], x: &[f32], classifier: &[f32], dim: usize) {
    let vocab = classifier.len() / dim;
    let p = x.len() / dim;
    gemm(
        logits,
        vocab,
        p,
        n(classifier, vocab, dim),
        n(x, dim, p),
        1.0,
        false,
    );
}

/// Backward of [`classifier_forward`] given `g = dlogits (V, P)`:
/// `dx (C, P) = E^T g` (overwritten) and `dE (V, C) += g x^T` (`=` unless
/// `add`; `d_classifier` `None`: a frozen classifier, no `dE` product).
///
/// `E^T` as stored (`classifier_t`, `(C, V)`) gives the `dx` product a
/// row-major left operand, faer's fast form (reading `E` transposed in place
/// is slower: `docs/performance.md`). A caller with several groups of
/// positions per step transposes `E` once for all of them.
#[allow(clippy::too_many_arguments)]
pub fn classifier_backward(
    dx: &mut [f32],
    d_classifier: Option<&mut [f32]>,
    g: &[f32],
    x: &[f32],
    classifier: &[f32],
    classifier_t: Option<&[f32]>,
    dim: usize,
    add: bool,
) {
    let vocab = classifier.len() / dim;
    let p = x.len() / dim;
    let e_t = match classifier_t {
        Some(e_t) => n(e_t, dim, vocab),
        None => t(classifier, vocab, dim),
    };
    let mut dx_product = || gemm(dx, dim, p, e_t, n(g, vocab, p), 1.0, false);
    let Some(d_classifier) = d_classifier else {
        return dx_product();
    };
    // Two independent products, side by side (see `train::schedule`).
    rayon::join(dx_product, || {
        let (g, x) = (n(g, vocab, p), t(x, dim, p));
        gemm(d_classifier, vocab, dim, g, x, 1.0, add)
    });
}

/// [`classifier_backward`] for one block of vocabulary rows `E_b (R, C)`
/// given its logits' gradient `g (R, P)`: `dx (C, P) += E_b^T g` (`=` unless
/// `add_dx`: the first block) and `dE_b (R, C) += g x^T` (`=` unless `add`;
/// none when `d_classifier` is `None`). `E_b` is read transposed in place:
/// a chunked classifier keeps no transposed copy of a large vocabulary's matrix.
#[allow(clippy::too_many_arguments)]
pub fn classifier_backward_block(
    dx: &mut [f32],
    add_dx: bool,
    d_classifier: Option<&mut [f32]>,
    g: &[f32],
    x: &[f32],
    classifier: &[f32],
    dim: usize,
    add: bool,
) {
    let rows = classifier.len() / dim;
    let p = x.len() / dim;
    let mut dx_product = || {
        let e_t = t(classifier, rows, dim);
        gemm(dx, dim, p, e_t, n(g, rows, p), 1.0, add_dx)
    };
    let Some(d_classifier) = d_classifier else {
        return dx_product();
    };
    rayon::join(dx_product, || {
        let (g, x) = (n(g, rows, p), t(x, dim, p));
        gemm(d_classifier, rows, dim, g, x, 1.0, add)
    });
}

/// Logits per task of [`cross_entropy`]: 64 Ki floats (256 KiB), so that a
/// chunk stays in a core's L2 cache between its passes.
const CHUNK_FLOATS: usize = 1 << 16;

/// Rows of the vocabulary per task of [`cross_entropy`] for `p` positions
/// (a chunk of [`CHUNK_FLOATS`]); blocks of rows given to
/// [`cross_entropy_block`] start at multiples of it.
pub fn cross_entropy_rows(p: usize, vocab: usize) -> usize {
    (CHUNK_FLOATS / p).clamp(1, vocab.max(1))
}

/// [`cross_entropy`]'s statistics, kept between calls.
#[derive(Default)]
pub struct CrossEntropyScratch {
    /// Per chunk of rows: each position's maximum, then its sum of
    /// exponentials; then the merged maximum and `1 / sum` of each position.
    stats: Vec<f32>,
    /// Each position's sum of exponentials over the vocabulary.
    sums: Vec<f64>,
    /// Positions `P` and rows per chunk of the cross-entropy in progress.
    p: usize,
    rows: usize,
    /// Blocked cross-entropy: the chunks whose statistics the blocks so far filled.
    cursor: usize,
    /// Each position's loss weight (`P`), or empty: every position weighs 1.
    weights: Vec<f32>,
}

impl CrossEntropyScratch {
    /// Weigh each position's loss (and its gradient) by `weights` (`P`, the
    /// positions of the cross-entropies that follow), or by 1 (`None`, the
    /// default): a weight of 0 leaves a position out of the sum (a masked
    /// prompt or padding). Unweighted, the numbers are those of no weights.
    pub fn set_weights(&mut self, weights: Option<&[f32]>) {
        self.weights.clear();
        self.weights.extend_from_slice(weights.unwrap_or_default());
    }

    /// Size the statistics for `vocab` rows of `p` positions coming in
    /// blocks of `block_rows` rows (each cut into chunks of its own); returns
    /// the rows per chunk.
    fn start(&mut self, vocab: usize, p: usize, block_rows: usize) -> usize {
        let rows = cross_entropy_rows(p, vocab);
        let block_rows = block_rows.clamp(1, vocab.max(1));
        let chunks =
            (vocab / block_rows) * block_rows.div_ceil(rows) + (vocab % block_rows).div_ceil(rows);
        self.stats.resize((2 * chunks + 2) * p, 0.0);
        (self.p, self.rows, self.cursor) = (p, rows, 0);
        rows
    }

    /// The statistics of the next block's chunks, for a block of `len` logits.
    fn next_block(&mut self, len: usize) -> (&mut [f32], &mut [f32], &mut [f32]) {
        let (p, rows, first) = (self.p, self.rows, self.cursor);
        let chunks = (len / p).div_ceil(rows);
        self.cursor += chunks;
        let (per_chunk, max, inv_sum) = split_stats(&mut self.stats, p);
        (
            &mut per_chunk[2 * first * p..][..2 * chunks * p],
            max,
            inv_sum,
        )
    }
}

/// The per-chunk statistics (two rows of `P` per chunk), and the merged
/// maximum and `1 / sum` (`P` each).
fn split_stats(stats: &mut [f32], p: usize) -> (&mut [f32], &mut [f32], &mut [f32]) {
    let len = stats.len();
    let (per_chunk, merged) = stats.split_at_mut(len - 2 * p);
    let (max, inv_sum) = merged.split_at_mut(p);
    (per_chunk, max, inv_sum)
}

/// Cross-entropy (natural log) of vocabulary-major `logits (V, P)` against
/// `targets (P)`, summed over positions. With `grad_scale`, the logits are
/// overwritten with the gradient of `grad_scale * summed loss`,
/// `grad_scale * (softmax - onehot)`; without, they are left as scratch.
///
/// Rows are cut into chunks of [`CHUNK_FLOATS`]. Pass 1 (in parallel) reduces
/// each chunk to a per-position maximum `m_c` and sum `s_c` of `e^(l - m_c)`,
/// keeping the exponentials in place; the chunks merge in order into the
/// maximum `M` and sum `S` over the vocabulary (`S` in `f64`); pass 2 scales
/// each chunk's exponentials by `grad_scale e^(m_c - M) / S`. Two passes over
/// the logits, one exponential per logit, and the result does not depend on
/// the number of threads. [`cross_entropy_block`] and its companions run the
/// same passes on a vocabulary whose logits come in blocks of rows.
pub fn cross_entropy(
    logits: &mut [f32],
    targets: &[u32],
    grad_scale: Option<f32>,
    scratch: &mut CrossEntropyScratch,
) -> f64 {
    let p = targets.len();
    let vocab = logits.len() / p;
    assert_eq!(logits.len(), vocab * p, "cross_entropy: logits size");
    let rows = scratch.start(vocab, p, vocab);
    // The target logits, before pass 1 replaces them.
    let weights = &scratch.weights;
    let target_sum = target_logits(logits, targets, 0, weights);
    let (per_chunk, max, inv_sum) = split_stats(&mut scratch.stats, p);
    exp_pass(logits, p, rows, per_chunk);
    let total = merge_chunks(per_chunk, p, max, inv_sum, &mut scratch.sums, weights);
    if let Some(scale) = grad_scale {
        let stats = Merged {
            max,
            inv_sum,
            weights,
        };
        gradient_pass(logits, targets, 0, rows, scale, per_chunk, stats);
    }
    total - target_sum
}

/// Start a cross-entropy over `vocab` rows for `targets.len()` positions
/// whose logits come in blocks of rows (a classifier chunked over the
/// vocabulary): give every block to [`cross_entropy_block`], then
/// [`cross_entropy_finish`], then, for the gradient, every block again
/// (recomputed, in the same order) to [`cross_entropy_block_gradient`].
/// Blocks have `block_rows` rows (the last one the rest). Each block is cut
/// into chunks of the returned number of rows and the chunks merge in order,
/// so when `block_rows` is a multiple of it the values are those of
/// [`cross_entropy`] on the whole logits, bit for bit.
pub fn cross_entropy_begin(
    vocab: usize,
    p: usize,
    block_rows: usize,
    scratch: &mut CrossEntropyScratch,
) -> usize {
    scratch.start(vocab, p, block_rows)
}

/// Pass 1 of [`cross_entropy`] over the block `logits (R, P)` of vocabulary
/// rows `first_row..first_row + R` (exponentials left in place); returns the
/// sum of the target logits that fall in the block.
pub fn cross_entropy_block(
    logits: &mut [f32],
    first_row: usize,
    targets: &[u32],
    scratch: &mut CrossEntropyScratch,
) -> f64 {
    let (p, rows) = (scratch.p, scratch.rows);
    let target_sum = target_logits(logits, targets, first_row, &scratch.weights);
    let (block_stats, _, _) = scratch.next_block(logits.len());
    exp_pass(logits, p, rows, block_stats);
    target_sum
}

/// After every block: the sum over positions of `M + ln S` (the loss is
/// this minus the target logits' sum).
pub fn cross_entropy_finish(scratch: &mut CrossEntropyScratch) -> f64 {
    let p = scratch.p;
    let chunks = std::mem::take(&mut scratch.cursor);
    let (per_chunk, max, inv_sum) = split_stats(&mut scratch.stats, p);
    assert_eq!(
        per_chunk.len(),
        2 * chunks * p,
        "cross_entropy_finish: blocks missing"
    );
    let weights = &scratch.weights;
    merge_chunks(per_chunk, p, max, inv_sum, &mut scratch.sums, weights)
}

/// A frozen classifier's input gradient made in the pass that makes the
/// loss, so that no block's logits are made twice (LoRA's frozen head; with
/// `dE` wanted, every block's gradient needs the final statistics first).
/// After [`cross_entropy_block`] left block `logits (R, P)` as its chunks'
/// exponentials `e^(l - m_c)`: each position's running maximum `reference
/// (P)` rises to the block's (`dx` scaled by `e^(old - new)` where it
/// rose), each chunk's exponentials are scaled to it (`e^(l - reference)`),
/// and `dx (C, P) += E_block^T` times them (`first`: written, and
/// `reference` set). [`frozen_dx_finish`] makes `dx` the gradient.
#[allow(clippy::too_many_arguments)]
pub fn frozen_dx_block(
    logits: &mut [f32],
    classifier: &[f32],
    dim: usize,
    reference: &mut Vec<f32>,
    dx: &mut [f32],
    first: bool,
    scratch: &CrossEntropyScratch,
    factor: &mut Vec<f32>,
) {
    let (p, rows) = (scratch.p, scratch.rows);
    let chunks = (logits.len() / p).div_ceil(rows);
    let stats_end = 2 * scratch.cursor * p;
    let block_stats = &scratch.stats[stats_end - 2 * chunks * p..stats_end];
    let mut new_reference = match first {
        true => vec![f32::NEG_INFINITY; p],
        false => reference.clone(),
    };
    for st in block_stats.chunks(2 * p) {
        for (r, &m) in new_reference.iter_mut().zip(&st[..p]) {
            *r = r.max(m);
        }
    }
    factor.resize(p, 0.0);
    if !first {
        for ((f, &old), &new) in factor.iter_mut().zip(reference.iter()).zip(&new_reference) {
            *f = crate::math::exp(old - new);
        }
        scale_columns(dx, factor);
    }
    *reference = new_reference;
    for (l, st) in logits.chunks_mut(rows * p).zip(block_stats.chunks(2 * p)) {
        for ((f, &m), &r) in factor.iter_mut().zip(&st[..p]).zip(reference.iter()) {
            *f = crate::math::exp(m - r);
        }
        scale_columns(l, factor);
    }
    let block_rows = classifier.len() / dim;
    let e_t = t(classifier, block_rows, dim);
    gemm(dx, dim, p, e_t, n(logits, block_rows, p), 1.0, !first);
}

/// After every block's [`frozen_dx_block`] and [`cross_entropy_finish`]:
/// `dx (C, P)` becomes the gradient of `grad_scale` times the (weighted)
/// loss, `grad_scale w_j (E^T softmax_j - E[target_j])` per position `j`.
pub fn frozen_dx_finish(
    dx: &mut [f32],
    classifier: &[f32],
    dim: usize,
    targets: &[u32],
    grad_scale: f32,
    scratch: &mut CrossEntropyScratch,
) {
    let p = scratch.p;
    let weights = std::mem::take(&mut scratch.weights);
    let (_, _, inv_sum) = split_stats(&mut scratch.stats, p);
    let factor: Vec<f32> = (0..p)
        .map(|j| grad_scale * weight(&weights, j) * inv_sum[j])
        .collect();
    scale_columns(dx, &factor);
    for (j, &target) in targets.iter().enumerate() {
        let g = grad_scale * weight(&weights, j);
        if g == 0.0 {
            continue;
        }
        let row = &classifier[target as usize * dim..][..dim];
        for (c, &e) in row.iter().enumerate() {
            dx[c * p + j] -= g * e;
        }
    }
    scratch.weights = weights;
}

/// Pass 1 and pass 2 of [`cross_entropy`] on the block `logits (R, P)` of
/// rows `first_row..` (recomputed after [`cross_entropy_finish`]): the block
/// becomes the gradient `grad_scale (softmax - onehot)` of its rows.
pub fn cross_entropy_block_gradient(
    logits: &mut [f32],
    first_row: usize,
    targets: &[u32],
    grad_scale: f32,
    scratch: &mut CrossEntropyScratch,
) {
    let (p, rows) = (scratch.p, scratch.rows);
    let weights = std::mem::take(&mut scratch.weights);
    let (block_stats, max, inv_sum) = scratch.next_block(logits.len());
    exp_pass(logits, p, rows, block_stats);
    let stats = Merged {
        max,
        inv_sum,
        weights: &weights,
    };
    gradient_pass(
        logits,
        targets,
        first_row,
        rows,
        grad_scale,
        block_stats,
        stats,
    );
    scratch.weights = weights;
}

/// The merged statistics of every position, and the positions' loss weights
/// (empty: all 1).
struct Merged<'s> {
    max: &'s [f32],
    inv_sum: &'s [f32],
    weights: &'s [f32],
}

/// Position `j`'s loss weight (1 without weights).
#[inline(always)]
fn weight(weights: &[f32], j: usize) -> f32 {
    weights.get(j).copied().unwrap_or(1.0)
}

/// The sum of `logits[target - first_row, j]` over the positions `j` whose
/// target falls in the rows of `logits (R, P)`, each times its weight.
fn target_logits(logits: &[f32], targets: &[u32], first_row: usize, weights: &[f32]) -> f64 {
    let p = targets.len();
    let block = first_row..first_row + logits.len() / p;
    let terms = targets
        .iter()
        .enumerate()
        .filter(|(_, target)| block.contains(&(**target as usize)))
        .map(|(j, &target)| (j, f64::from(logits[(target as usize - first_row) * p + j])));
    if weights.is_empty() {
        return terms.map(|(_, logit)| logit).sum();
    }
    terms.map(|(j, logit)| f64::from(weights[j]) * logit).sum()
}

/// Pass 1: per chunk of `rows` rows of `logits (R, P)`, each position's
/// maximum and sum of `e^(l - max)` into `per_chunk` (`2 P` per chunk), the
/// exponentials in place.
fn exp_pass(logits: &mut [f32], p: usize, rows: usize, per_chunk: &mut [f32]) {
    logits
        .par_chunks_mut(rows * p)
        .zip(per_chunk.par_chunks_mut(2 * p))
        .for_each(|(l, st)| {
            let (max, sum) = st.split_at_mut(p);
            crate::math::simd(
                #[inline(always)]
                || {
                    max.copy_from_slice(&l[..p]);
                    column_max(&l[p..], max);
                    sum.fill(0.0);
                    exp_columns(l, max, sum);
                },
            )
        });
}

/// The chunks' statistics merged in order: each position's maximum `M` and
/// `1 / S` with `S = sum_c s_c e^(m_c - M)` in `f64`; returns `sum_j (M_j + ln S_j)`
/// (each term times position `j`'s weight, when there are weights).
fn merge_chunks(
    per_chunk: &[f32],
    p: usize,
    max: &mut [f32],
    inv_sum: &mut [f32],
    sums: &mut Vec<f64>,
    weights: &[f32],
) -> f64 {
    max.fill(f32::NEG_INFINITY);
    for st in per_chunk.chunks(2 * p) {
        for (m, &c) in max.iter_mut().zip(&st[..p]) {
            *m = m.max(c);
        }
    }
    // Chunk-major, so that the statistics are read in order.
    sums.clear();
    sums.resize(p, 0.0);
    for st in per_chunk.chunks(2 * p) {
        let (cmax, csum) = st.split_at(p);
        crate::math::simd(
            #[inline(always)]
            || {
                for (((s, &cm), &cs), &m) in sums.iter_mut().zip(cmax).zip(csum).zip(max.iter()) {
                    *s += f64::from(cs) * f64::from(crate::math::exp(cm - m));
                }
            },
        );
    }
    let mut total = 0.0f64;
    for (j, ((inv, &sum), &m)) in inv_sum
        .iter_mut()
        .zip(sums.iter())
        .zip(max.iter())
        .enumerate()
    {
        let term = f64::from(m) + sum.ln();
        total += match weights.is_empty() {
            true => term,
            false => f64::from(weights[j]) * term,
        };
        *inv = (1.0 / sum) as f32;
    }
    total
}

/// Pass 2: each chunk of `logits (R, P)` (rows `first_row..`, holding pass
/// 1's exponentials) scaled by `scale e^(m_c - M) / S`, and `scale`
/// subtracted at each position's target; each position's column also times
/// its weight, when there are weights.
fn gradient_pass(
    logits: &mut [f32],
    targets: &[u32],
    first_row: usize,
    rows: usize,
    scale: f32,
    per_chunk: &mut [f32],
    stats: Merged,
) {
    let p = targets.len();
    let Merged {
        max,
        inv_sum,
        weights,
    } = stats;
    logits
        .par_chunks_mut(rows * p)
        .zip(per_chunk.par_chunks_mut(2 * p))
        .enumerate()
        .for_each(|(c, (l, st))| {
            // The chunk's factors replace its maxima, no longer needed.
            let factor = &mut st[..p];
            crate::math::simd(
                #[inline(always)]
                || {
                    for ((f, &m), &inv) in factor.iter_mut().zip(max).zip(inv_sum) {
                        *f = crate::math::exp(*f - m) * inv * scale;
                    }
                    if !weights.is_empty() {
                        for (f, &w) in factor.iter_mut().zip(weights) {
                            *f *= w;
                        }
                    }
                    scale_columns(l, factor)
                },
            );
            let v0 = first_row + c * rows;
            for (j, &target) in targets.iter().enumerate() {
                let target = target as usize;
                if (v0..v0 + l.len() / p).contains(&target) {
                    l[(target - v0) * p + j] -= scale * weight(weights, j);
                }
            }
        });
}

/// `max[j] = max(max[j], l[r, j])` over the rows of `l (rows, P)`.
///
/// These three loops are plain zips over a row: in that form the compiler
/// vectorizes them across positions (with `math::exp` inlined); spelled as
/// fixed blocks of eight, it did not (`docs/performance.md`).
#[inline(always)]
fn column_max(l: &[f32], max: &mut [f32]) {
    for row in l.chunks_exact(max.len()) {
        for (m, &v) in max.iter_mut().zip(row) {
            *m = m.max(v);
        }
    }
}

/// `l = e^(l - max)` per position of `l (rows, P)`, each row added into `sum`.
#[inline(always)]
fn exp_columns(l: &mut [f32], max: &[f32], sum: &mut [f32]) {
    for row in l.chunks_exact_mut(max.len()) {
        for ((v, &m), s) in row.iter_mut().zip(max).zip(sum.iter_mut()) {
            *v = crate::math::exp(*v - m);
            *s += *v;
        }
    }
}

/// `l[r, j] *= factor[j]` over the rows of `l (rows, P)`.
#[inline(always)]
fn scale_columns(l: &mut [f32], factor: &[f32]) {
    for row in l.chunks_exact_mut(factor.len()) {
        for (v, &f) in row.iter_mut().zip(factor) {
            *v *= f;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn randn(n: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..n).map(|_| r.normal()).collect()
    }

    /// f64 finite difference of a scalar function of one perturbed element.
    fn fd(f: &dyn Fn(&[f32]) -> f64, x: &[f32], i: usize) -> f64 {
        let h = 1e-2f32;
        let mut xp = x.to_vec();
        xp[i] += h;
        let mut xm = x.to_vec();
        xm[i] -= h;
        (f(&xp) - f(&xm)) / (2.0 * h as f64)
    }

    /// A size with full lanes and a remainder (300 = 37 * 8 + 4), against the
    /// formulas summed in f64.
    #[test]
    fn rmsnorm_matches_f64_sums() {
        // One thread's size, and one large enough for both passes to split
        // over threads (in blocks of positions that are not whole 16s); the
        // split changes no value.
        for (dim, seq) in [(224, 300), (480, 600)] {
            rmsnorm_case(dim, seq);
        }
    }

    fn rmsnorm_case(dim: usize, seq: usize) {
        let (x, w, dy) = (randn(dim * seq, 4), randn(dim, 5), randn(dim * seq, 6));
        let run = || {
            let (mut y, mut r) = (vec![0.0; dim * seq], vec![0.0; seq]);
            rmsnorm_forward(&mut y, &mut r, &x, &w, 1e-5);
            let (mut dx, mut dw) = (vec![0.5; dim * seq], vec![0.25; dim]);
            rmsnorm_backward(&mut dx, Some(&mut dw), &dy, &x, &w, &r);
            (y, r, dx, dw)
        };
        let (y, r, dx, dw) = run();
        let one_thread = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("pool")
            .install(run);
        assert!(one_thread == (y.clone(), r.clone(), dx.clone(), dw.clone()));
        let at = |m: &[f32], c: usize, t: usize| f64::from(m[c * seq + t]);
        let mut want_dw = vec![0.25f64; dim];
        for t in 0..seq {
            let ms: f64 = (0..dim).map(|c| at(&x, c, t).powi(2)).sum::<f64>() / dim as f64;
            let rr = 1.0 / (ms + 1e-5).sqrt();
            assert!((f64::from(r[t]) - rr).abs() <= 1e-5 * rr, "rrms[{t}]");
            let dot: f64 = (0..dim)
                .map(|c| f64::from(w[c]) * at(&dy, c, t) * at(&x, c, t))
                .sum();
            for c in 0..dim {
                let wy = at(&x, c, t) * rr * f64::from(w[c]);
                assert!(
                    (at(&y, c, t) - wy).abs() <= 1e-5 * (1.0 + wy.abs()),
                    "y[{c},{t}]"
                );
                let wx = 0.5 + rr * f64::from(w[c]) * at(&dy, c, t)
                    - at(&x, c, t) * rr.powi(3) / dim as f64 * dot;
                assert!(
                    (at(&dx, c, t) - wx).abs() <= 1e-4 * (1.0 + wx.abs()),
                    "dx[{c},{t}]"
                );
                want_dw[c] += at(&dy, c, t) * at(&x, c, t) * rr;
            }
        }
        for c in 0..dim {
            let err = (f64::from(dw[c]) - want_dw[c]).abs();
            assert!(
                err <= 1e-4 * (1.0 + want_dw[c].abs()),
                "dw[{c}] {} {}",
                dw[c],
                want_dw[c]
            );
        }
    }

    /// 37 positions (whole 16 x 8 transpose tiles and edges) with repeated
    /// tokens, near each other and far apart, against position-by-position loops.
    #[test]
    fn embedding_gather_and_scatter_match_position_by_position() {
        let (vocab, dim, seq) = (11, 5, 37);
        let e = randn(vocab * dim, 7);
        let tokens: Vec<u32> = (0..seq).map(|t| ((t * 7) % vocab) as u32).collect();
        assert_eq!(tokens[2], tokens[13]);
        assert_eq!(tokens[0], tokens[22]);
        let mut x = vec![f32::NAN; dim * seq];
        embedding_forward(&mut x, &e, &tokens, dim);
        let dx = randn(dim * seq, 8);
        let mut de = vec![0.0; vocab * dim];
        embedding_backward(&mut de, &dx, &tokens, dim);
        let mut want = vec![0.0f64; vocab * dim];
        for (t, &tok) in tokens.iter().enumerate() {
            for c in 0..dim {
                assert_eq!(x[c * seq + t], e[tok as usize * dim + c]);
                want[tok as usize * dim + c] += f64::from(dx[c * seq + t]);
            }
        }
        for (i, (&g, &w)) in de.iter().zip(&want).enumerate() {
            assert!(
                (f64::from(g) - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "de[{i}]"
            );
        }
    }

    #[test]
    fn rmsnorm_backward_matches_finite_differences() {
        let (dim, seq) = (6, 5);
        let x = randn(dim * seq, 1);
        let w = randn(dim, 2);
        let probe = randn(dim * seq, 3); // loss = sum(probe * y)
        let loss = |x: &[f32], w: &[f32]| {
            let (mut y, mut r) = (vec![0.0; dim * seq], vec![0.0; seq]);
            rmsnorm_forward(&mut y, &mut r, x, w, 1e-5);
            y.iter()
                .zip(&probe)
                .map(|(a, b)| (a * b) as f64)
                .sum::<f64>()
        };
        let (mut y, mut r) = (vec![0.0; dim * seq], vec![0.0; seq]);
        rmsnorm_forward(&mut y, &mut r, &x, &w, 1e-5);
        let (mut dx, mut dw) = (vec![0.0; dim * seq], vec![0.0; dim]);
        rmsnorm_backward(&mut dx, Some(&mut dw), &probe, &x, &w, &r);
        for i in 0..dim * seq {
            let want = fd(&|x| loss(x, &w), &x, i);
            assert!(
                (dx[i] as f64 - want).abs() < 2e-3 * (1.0 + want.abs()),
                "dx[{i}] {} {want}",
                dx[i]
            );
        }
        for c in 0..dim {
            let want = fd(&|w| loss(&x, w), &w, c);
            assert!(
                (dw[c] as f64 - want).abs() < 2e-3 * (1.0 + want.abs()),
                "dw[{c}]"
            );
        }
    }

    /// `sum_j logsumexp(column j) - l[target_j, j]` in f64, and the softmax.
    fn reference_ce(logits: &[f32], targets: &[u32]) -> (f64, Vec<f64>) {
        let p = targets.len();
        let vocab = logits.len() / p;
        let mut softmax = vec![0.0; vocab * p];
        let mut loss = 0.0;
        for j in 0..p {
            let col = |v: usize| f64::from(logits[v * p + j]);
            let max = (0..vocab).map(col).fold(f64::MIN, f64::max);
            let sum: f64 = (0..vocab).map(|v| (col(v) - max).exp()).sum();
            loss += max + sum.ln() - col(targets[j] as usize);
            for v in 0..vocab {
                softmax[v * p + j] = (col(v) - max).exp() / sum;
            }
        }
        (loss, softmax)
    }

    #[test]
    fn cross_entropy_gradient_and_value() {
        let (seq, vocab) = (3, 7);
        let logits = randn(vocab * seq, 4); // (V, P)
        let targets = [2u32, 0, 6];
        let mut stats = CrossEntropyScratch::default();
        let loss =
            |l: &[f32]| cross_entropy(&mut l.to_vec(), &targets, None, &mut Default::default());
        let (want, _) = reference_ce(&logits, &targets);
        assert!((loss(&logits) - want).abs() < 1e-5);
        let mut g = logits.clone();
        let got = cross_entropy(&mut g, &targets, Some(0.5), &mut stats);
        assert!((got - want).abs() < 1e-5);
        for i in 0..seq * vocab {
            let num = fd(&loss, &logits, i) * 0.5;
            assert!((g[i] as f64 - num).abs() < 1e-3, "{i}");
        }
    }

    /// Many chunks (the last one partial), positions not a multiple of eight,
    /// and logits whose exponentials overflow `f32` unshifted: the merged
    /// statistics against an f64 softmax.
    #[test]
    fn cross_entropy_merges_chunks_exactly() {
        for (p, vocab, mag) in [(1000, 300, 1.0), (37, 5000, 60.0), (1, 70_000, 30.0)] {
            let logits: Vec<f32> = randn(vocab * p, 8).iter().map(|v| v * mag).collect();
            let targets: Vec<u32> = (0..p).map(|j| ((j * 7919 + 5) % vocab) as u32).collect();
            assert!(vocab.div_ceil((CHUNK_FLOATS / p).min(vocab)) > 1);
            let (want, softmax) = reference_ce(&logits, &targets);
            let mut g = logits.clone();
            let got = cross_entropy(&mut g, &targets, Some(2.0), &mut Default::default());
            assert!(
                (got - want).abs() < 1e-6 * want.abs().max(1.0),
                "{got} {want}"
            );
            for (i, (&g, &s)) in g.iter().zip(&softmax).enumerate() {
                let onehot = f64::from(u8::from(targets[i % p] as usize == i / p));
                let want = 2.0 * (s - onehot);
                assert!((f64::from(g) - want).abs() < 1e-6, "[{i}] {g} {want}");
            }
        }
    }

    #[test]
    fn classifier_and_embedding_gradients() {
        let (dim, seq, vocab) = (4, 3, 5);
        let xf = randn(dim * seq, 5);
        let e = randn(vocab * dim, 6);
        let probe = randn(vocab * seq, 7);
        let loss = |xf: &[f32], e: &[f32]| {
            let mut l = vec![0.0; vocab * seq];
            classifier_forward(&mut l, xf, e, dim);
            l.iter()
                .zip(&probe)
                .map(|(a, b)| (a * b) as f64)
                .sum::<f64>()
        };
        let (mut dxf, mut de) = (vec![0.0; dim * seq], vec![0.0; vocab * dim]);
        let mut et = vec![0.0; dim * vocab];
        crate::linalg::transpose_into(&e, vocab, dim, &mut et);
        classifier_backward(
            &mut dxf,
            Some(&mut de),
            &probe,
            &xf,
            &e,
            Some(&et),
            dim,
            true,
        );
        // E read transposed in place: the same gradients.
        let (mut dxf2, mut de2) = (vec![0.0; dim * seq], vec![0.0; vocab * dim]);
        classifier_backward(&mut dxf2, Some(&mut de2), &probe, &xf, &e, None, dim, true);
        assert!(dxf.iter().zip(&dxf2).all(|(a, b)| (a - b).abs() < 1e-5));
        assert!(de.iter().zip(&de2).all(|(a, b)| (a - b).abs() < 1e-5));
        for i in 0..dim * seq {
            assert!((dxf[i] as f64 - fd(&|x| loss(x, &e), &xf, i)).abs() < 1e-3);
        }
        for i in 0..vocab * dim {
            assert!((de[i] as f64 - fd(&|e| loss(&xf, e), &e, i)).abs() < 1e-3);
        }
        let tokens = [3u32, 1, 3];
        let mut x = vec![0.0; dim * seq];
        embedding_forward(&mut x, &e, &tokens, dim);
        assert_eq!(x[2 * seq + 1], e[dim + 2]);
        let mut de2 = vec![0.0; vocab * dim];
        embedding_backward(&mut de2, &x, &tokens, dim);
        assert_eq!(de2[3 * dim], 2.0 * e[3 * dim]);
        assert_eq!(de2[0], 0.0);
    }
}
