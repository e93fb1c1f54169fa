//! RoPE between Hugging Face checkpoints and anemone: the row permutation that
//! maps HF's half-split rotation onto anemone's interleaved one, and the
//! inverse frequencies of every rope type
//! [`RopeScaling`](crate::model::rope::RopeScaling) names (re-exported from
//! [`crate::model::rope`], where the model computes them).
//!
//! HF rotates pairs `(x[i], x[i + D/2])` of a head of width D (`rotate_half`);
//! anemone, like llama2.c, rotates pairs `(x[2i], x[2i + 1])`, with the same
//! frequency for pair `i`. Moving HF row `i` to row `2i` and HF row `D/2 + i`
//! to row `2i + 1` within every head of the q and k projections (llama2.c's
//! `export.py` `permute_reverse`) makes the interleaved rotation compute
//! exactly the permuted HF result, and attention scores, which pair q and k
//! heads permuted alike, are unchanged. The q/k biases move with their rows;
//! QK-norm weights (one per head dimension, applied before RoPE) are one
//! "head" of D rows of width 1.
//!
//! Pure functions, no I/O. Not here: which tensors get permuted (the caller
//! applies these to q/k weights, biases and norms, and the inverse on export).

/// The inverse frequencies of every rope type, as the model computes them.
pub use crate::model::rope::inv_freq;

/// Row of the interleaved layout that HF row `row` (within one head of
/// `head_dim` rows) moves to.
pub fn interleaved_row(row: usize, head_dim: usize) -> usize {
    let half = head_dim / 2;
    if row < half {
        2 * row
    } else {
        2 * (row - half) + 1
    }
}

/// Rows of `hf` (heads of `head_dim` rows, each `row_len` values) reordered
/// from HF's half-split layout to anemone's interleaved one. For a q or k
/// projection `[n_heads * head_dim, dim]` pass `row_len = dim`; for a bias
/// `row_len = 1`; for a QK-norm weight `[head_dim]`, `row_len = 1`.
///
/// Panics if `head_dim` is odd or `hf.len()` is not a whole number of heads
/// (programmer errors: the config and tensor shapes are checked before).
pub fn hf_rows_to_interleaved(hf: &[f32], head_dim: usize, row_len: usize) -> Vec<f32> {
    permute_rows(hf, head_dim, row_len, true)
}

/// The inverse of [`hf_rows_to_interleaved`], for export.
pub fn interleaved_rows_to_hf(interleaved: &[f32], head_dim: usize, row_len: usize) -> Vec<f32> {
    permute_rows(interleaved, head_dim, row_len, false)
}

fn permute_rows(src: &[f32], head_dim: usize, row_len: usize, to_interleaved: bool) -> Vec<f32> {
    assert!(
        head_dim.is_multiple_of(2) && row_len > 0,
        "head_dim {head_dim} must be even and row_len {row_len} positive"
    );
    let head = head_dim * row_len;
    assert!(
        src.len().is_multiple_of(head),
        "{} values are not whole heads of {head_dim} rows of {row_len}",
        src.len()
    );
    let mut out = vec![0.0; src.len()];
    for (src_head, out_head) in src.chunks(head).zip(out.chunks_mut(head)) {
        for hf_row in 0..head_dim {
            let interleaved = interleaved_row(hf_row, head_dim);
            let (from, to) = if to_interleaved {
                (hf_row, interleaved)
            } else {
                (interleaved, hf_row)
            };
            out_head[to * row_len..(to + 1) * row_len]
                .copy_from_slice(&src_head[from * row_len..(from + 1) * row_len]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rope::RopeScaling;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// HF's RoPE on one head: `x * cos + rotate_half(x) * sin`, with
    /// `rotate_half(x) = cat(-x[D/2:], x[:D/2])` and `cos`/`sin` of
    /// `cat(freqs, freqs)`.
    fn rope_hf(x: &[f64], pos: f64, freqs: &[f64]) -> Vec<f64> {
        let half = x.len() / 2;
        (0..x.len())
            .map(|j| {
                let angle = pos * freqs[j % half];
                let rotated = if j < half { -x[j + half] } else { x[j - half] };
                x[j] * angle.cos() + rotated * angle.sin()
            })
            .collect()
    }

    /// anemone's (llama2.c's) RoPE on one head: pair `(x[2i], x[2i+1])` turned
    /// by `pos * freqs[i]`.
    fn rope_interleaved(x: &[f64], pos: f64, freqs: &[f64]) -> Vec<f64> {
        let mut out = x.to_vec();
        for (i, &freq) in freqs.iter().enumerate() {
            let (c, s) = ((pos * freq).cos(), (pos * freq).sin());
            let (a, b) = (x[2 * i], x[2 * i + 1]);
            out[2 * i] = a * c - b * s;
            out[2 * i + 1] = a * s + b * c;
        }
        out
    }

    #[test]
    fn llama2c_permutation_of_a_head_of_eight() {
        // HF rows 0..3 go to 0, 2, 4, 6; rows 4..7 to 1, 3, 5, 7.
        let rows: Vec<usize> = (0..8).map(|r| interleaved_row(r, 8)).collect();
        assert_eq!(rows, [0, 2, 4, 6, 1, 3, 5, 7]);
        let hf: Vec<f32> = (0..8).map(|r| r as f32).collect();
        assert_eq!(
            hf_rows_to_interleaved(&hf, 8, 1),
            [0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0]
        );
    }

    #[test]
    fn permutation_then_inverse_is_the_identity_on_every_layout() {
        for (n_heads, head_dim, row_len) in [(1, 2, 1), (3, 8, 5), (2, 16, 1), (4, 6, 3)] {
            let w = random(n_heads * head_dim * row_len, 7 + head_dim as u64);
            let there = hf_rows_to_interleaved(&w, head_dim, row_len);
            if head_dim > 2 {
                assert_ne!(there, w);
            }
            assert_eq!(interleaved_rows_to_hf(&there, head_dim, row_len), w);
            assert_eq!(
                hf_rows_to_interleaved(
                    &interleaved_rows_to_hf(&w, head_dim, row_len),
                    head_dim,
                    row_len
                ),
                w
            );
        }
    }

    #[test]
    fn interleaved_rope_of_the_permuted_vector_is_the_permuted_hf_rope() {
        let head_dim = 16;
        let n_heads = 3;
        let freqs = inv_freq(head_dim, 10000.0, &RopeScaling::None);
        let x = random(n_heads * head_dim, 11);
        let x_interleaved = hf_rows_to_interleaved(&x, head_dim, 1);
        for pos in [0.0, 1.0, 7.0, 123.0] {
            for h in 0..n_heads {
                let head = |v: &[f32]| -> Vec<f64> {
                    v[h * head_dim..(h + 1) * head_dim]
                        .iter()
                        .map(|&a| a as f64)
                        .collect()
                };
                let hf = rope_hf(&head(&x), pos, &freqs);
                let ours = rope_interleaved(&head(&x_interleaved), pos, &freqs);
                let hf_f32: Vec<f32> = hf.iter().map(|&a| a as f32).collect();
                let want: Vec<f64> = hf_rows_to_interleaved(&hf_f32, head_dim, 1)
                    .iter()
                    .map(|&a| a as f64)
                    .collect();
                for (a, b) in ours.iter().zip(&want) {
                    assert!(
                        (a - b).abs() < 1e-6,
                        "pos {pos} head {h}: {ours:?} vs {want:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_permuted_projection_gives_the_permuted_output() {
        // q = W x: permuting W's rows per head permutes q the same way, so the
        // weight permutation is the vector permutation the RoPE test relies on.
        let (n_heads, head_dim, dim) = (2, 8, 5);
        let w = random(n_heads * head_dim * dim, 3);
        let x = random(dim, 4);
        let matvec = |w: &[f32]| -> Vec<f32> {
            w.chunks(dim)
                .map(|row| row.iter().zip(&x).map(|(a, b)| a * b).sum())
                .collect()
        };
        let q = matvec(&w);
        assert_eq!(
            matvec(&hf_rows_to_interleaved(&w, head_dim, dim)),
            hf_rows_to_interleaved(&q, head_dim, 1)
        );
    }

    #[test]
    fn linear_and_llama3_scaling_by_hand() {
        let base = inv_freq(8, 100.0, &RopeScaling::None);
        for (got, want) in
            base.iter()
                .zip([1.0, 0.316_227_766_016_837_94, 0.1, 0.031_622_776_601_683_79])
        {
            assert!((got - want).abs() <= 4e-16 * want, "{base:?}");
        }
        let linear = inv_freq(8, 100.0, &RopeScaling::Linear { factor: 4.0 });
        assert!(linear.iter().zip(&base).all(|(l, b)| *l == b / 4.0));
        // Wavelengths 2*pi/f: 6.28, 19.9, 62.8, 198.7. With original 64, low 1,
        // high 4: > 64 divided by 8, < 16 kept, 19.9 and 62.8 blended.
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        };
        let llama3 = inv_freq(8, 100.0, &scaling);
        assert_eq!(llama3[0], base[0]);
        assert_eq!(llama3[3], base[3] / 8.0);
        for i in [1, 2] {
            let wavelen = 2.0 * std::f64::consts::PI / base[i];
            let smooth = (64.0 / wavelen - 1.0) / 3.0;
            assert!(
                (llama3[i] - ((1.0 - smooth) * base[i] / 8.0 + smooth * base[i])).abs() < 1e-15
            );
            assert!(llama3[i] < base[i] && llama3[i] > base[i] / 8.0);
        }
    }
}
