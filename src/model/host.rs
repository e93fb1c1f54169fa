//! The CPU half of a training step, in the kernels' channel-major layout:
//! activations are `(C, T)` row-major (channel `c`, position `t`), the host
//! view of an ANE `[1, C, 1, T]` tensor. Embedding gather/scatter, RMSNorm
//! forward/backward (exact, including the norm weight), the classifier and
//! cross-entropy over the full vocabulary. Each forward sits next to its backward.

// Index loops over (channel, position) read clearest for this layout.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use crate::linalg::{gemm, n, t};

/// `x (C, T)[c, t] = embedding (V, C)[tokens[t], c]`.
pub fn embedding_forward(x: &mut [f32], embedding: &[f32], tokens: &[u32], dim: usize) {
    let seq = tokens.len();
    debug_assert_eq!(x.len(), dim * seq);
    for (pos, &tok) in tokens.iter().enumerate() {
        let row = &embedding[tok as usize * dim..(tok as usize + 1) * dim];
        for (c, &v) in row.iter().enumerate() {
            x[c * seq + pos] = v;
        }
    }
}

/// `d_embedding[tokens[t], c] += dx (C, T)[c, t]`.
pub fn embedding_backward(d_embedding: &mut [f32], dx: &[f32], tokens: &[u32], dim: usize) {
    let seq = tokens.len();
    for (pos, &tok) in tokens.iter().enumerate() {
        let row = &mut d_embedding[tok as usize * dim..(tok as usize + 1) * dim];
        for (c, r) in row.iter_mut().enumerate() {
            *r += dx[c * seq + pos];
        }
    }
}

/// RMSNorm over channels of `x (C, T)`: `y = x * rrms[t] * w[c]` with
/// `rrms[t] = 1 / sqrt(mean_c x[c,t]^2 + eps)`. Writes `rrms (T)` for the backward.
pub fn rmsnorm_forward(y: &mut [f32], rrms: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let (dim, seq) = (w.len(), rrms.len());
    debug_assert_eq!(x.len(), dim * seq);
    rrms.fill(0.0);
    for c in 0..dim {
        for (r, &v) in rrms.iter_mut().zip(&x[c * seq..(c + 1) * seq]) {
            *r += v * v;
        }
    }
    for r in rrms.iter_mut() {
        *r = 1.0 / (*r / dim as f32 + eps).sqrt();
    }
    for c in 0..dim {
        let (xs, ys) = (&x[c * seq..(c + 1) * seq], &mut y[c * seq..(c + 1) * seq]);
        for ((yv, &xv), &r) in ys.iter_mut().zip(xs).zip(rrms.iter()) {
            *yv = xv * r * w[c];
        }
    }
}

/// Backward of [`rmsnorm_forward`]: `dx += d/dx`, `dw += d/dw` given `dy (C, T)`.
/// `dx[c,t] = rrms (w[c] dy[c,t]) - x[c,t] rrms^3 / C * sum_c' w[c'] dy[c',t] x[c',t]`.
pub fn rmsnorm_backward(
    dx: &mut [f32],
    dw: &mut [f32],
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    rrms: &[f32],
) {
    let (dim, seq) = (w.len(), rrms.len());
    let mut dot = vec![0.0f32; seq];
    for c in 0..dim {
        let (xs, dys) = (&x[c * seq..(c + 1) * seq], &dy[c * seq..(c + 1) * seq]);
        let mut dw_c = 0.0;
        for pos in 0..seq {
            let g = dys[pos] * xs[pos];
            dot[pos] += w[c] * g;
            dw_c += g * rrms[pos];
        }
        dw[c] += dw_c;
    }
    for pos in 0..seq {
        dot[pos] *= rrms[pos] * rrms[pos] * rrms[pos] / dim as f32;
    }
    for c in 0..dim {
        let range = c * seq..(c + 1) * seq;
        let (xs, dys, dxs) = (&x[range.clone()], &dy[range.clone()], &mut dx[range]);
        for pos in 0..seq {
            dxs[pos] += rrms[pos] * w[c] * dys[pos] - xs[pos] * dot[pos];
        }
    }
}

/// `logits (T, V) = xf^T E^T` for `xf (C, T)` and a classifier `E (V, C)`.
pub fn classifier_forward(logits: &mut [f32], xf: &[f32], classifier: &[f32], dim: usize) {
    let vocab = classifier.len() / dim;
    let seq = xf.len() / dim;
    gemm(
        logits,
        seq,
        vocab,
        t(xf, dim, seq),
        t(classifier, vocab, dim),
        1.0,
        false,
    );
}

/// Backward of [`classifier_forward`]: `dxf (C, T) = E^T dlogits^T` (overwritten)
/// and `dE (V, C) += dlogits^T xf^T`.
pub fn classifier_backward(
    dxf: &mut [f32],
    d_classifier: &mut [f32],
    dlogits: &[f32],
    xf: &[f32],
    classifier: &[f32],
    dim: usize,
) {
    let vocab = classifier.len() / dim;
    let seq = xf.len() / dim;
    // dxf^T (T, C) = dlogits E with both operands row-major (the fast form for
    // a vocabulary-sized inner dimension), stored transposed: straight into dxf.
    crate::linalg::gemm_transposed_out(
        dxf,
        seq,
        dim,
        n(dlogits, seq, vocab),
        n(classifier, vocab, dim),
        1.0,
        false,
    );
    // dE^T (C, V) += xf dlogits, both row-major, into dE's storage (V, C).
    crate::linalg::gemm_transposed_out(
        d_classifier,
        dim,
        vocab,
        n(xf, dim, seq),
        n(dlogits, seq, vocab),
        1.0,
        true,
    );
}

/// Cross-entropy of `logits (T, V)` against `targets (T)`, in place: returns the
/// summed loss over positions (natural log) and overwrites `logits` with
/// `scale * (softmax - onehot)`, the gradient of `scale * summed loss`.
pub fn cross_entropy(logits: &mut [f32], targets: &[u32], scale: f32) -> f64 {
    let vocab = logits.len() / targets.len();
    // One loss per position, summed in order afterwards: the result does not
    // depend on how rayon splits the rows.
    let mut losses = vec![0.0f64; targets.len()];
    logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .zip(losses.par_iter_mut())
        .for_each(|((row, &target), loss)| {
            crate::math::simd(
                #[inline(always)]
                || {
                    let max = crate::math::max(row);
                    for v in row.iter_mut() {
                        *v = crate::math::exp(*v - max);
                    }
                    let sum = crate::math::sum_f64(row);
                    let target_p = row[target as usize] as f64 / sum;
                    let factor = (1.0 / sum) as f32 * scale;
                    for v in row.iter_mut() {
                        *v *= factor;
                    }
                    row[target as usize] -= scale;
                    *loss = -target_p.ln();
                },
            )
        });
    losses.iter().sum()
}

/// Log-probabilities are not needed for training; evaluation uses the loss only.
/// Mean loss of `logits (T, V)` against `targets` without touching the logits.
pub fn cross_entropy_loss(logits: &[f32], targets: &[u32]) -> f64 {
    let vocab = logits.len() / targets.len();
    let mut losses = vec![0.0f64; targets.len()];
    logits
        .par_chunks(vocab)
        .zip(targets.par_iter())
        .zip(losses.par_iter_mut())
        .for_each(|((row, &target), loss)| {
            crate::math::simd(
                #[inline(always)]
                || {
                    let max = crate::math::max(row);
                    let mut buf = [0.0f32; 256];
                    let mut sum = 0.0f64;
                    for chunk in row.chunks(buf.len()) {
                        let e = &mut buf[..chunk.len()];
                        for (e, &v) in e.iter_mut().zip(chunk) {
                            *e = crate::math::exp(v - max);
                        }
                        sum += crate::math::sum_f64(e);
                    }
                    *loss = sum.ln() + max as f64 - row[target as usize] as f64;
                },
            )
        });
    losses.iter().sum()
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
        rmsnorm_backward(&mut dx, &mut dw, &probe, &x, &w, &r);
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

    #[test]
    fn cross_entropy_gradient_and_value() {
        let (seq, vocab) = (3, 7);
        let logits = randn(seq * vocab, 4);
        let targets = [2u32, 0, 6];
        // hand-derived value: sum_t logsumexp(row) - row[target]
        let want: f64 = (0..seq)
            .map(|p| {
                let row = &logits[p * vocab..(p + 1) * vocab];
                let lse = row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
                lse - row[targets[p] as usize] as f64
            })
            .sum();
        assert!((cross_entropy_loss(&logits, &targets) - want).abs() < 1e-5);
        let mut g = logits.clone();
        let got = cross_entropy(&mut g, &targets, 0.5);
        assert!((got - want).abs() < 1e-5);
        for i in 0..seq * vocab {
            let num = fd(&|l| cross_entropy_loss(l, &targets), &logits, i) * 0.5;
            assert!((g[i] as f64 - num).abs() < 1e-3, "{i}");
        }
    }

    #[test]
    fn classifier_and_embedding_gradients() {
        let (dim, seq, vocab) = (4, 3, 5);
        let xf = randn(dim * seq, 5);
        let e = randn(vocab * dim, 6);
        let probe = randn(seq * vocab, 7);
        let loss = |xf: &[f32], e: &[f32]| {
            let mut l = vec![0.0; seq * vocab];
            classifier_forward(&mut l, xf, e, dim);
            l.iter()
                .zip(&probe)
                .map(|(a, b)| (a * b) as f64)
                .sum::<f64>()
        };
        let (mut dxf, mut de) = (vec![0.0; dim * seq], vec![0.0; vocab * dim]);
        classifier_backward(&mut dxf, &mut de, &probe, &xf, &e, dim);
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
