//! Host-side GEMM for the CPU half of training (weight gradients, classifier,
//! cross-entropy): a thin wrapper over faer for row-major `f32` slices.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

/// Parallelism for large products: all rayon threads (`RAYON_NUM_THREADS` /
/// `--threads`); small ones run on the calling thread.
fn par_for(m: usize, n: usize, k: usize) -> Par {
    if m * n * k < 1 << 18 {
        Par::Seq
    } else {
        Par::rayon(0)
    }
}

/// `dst (cols x rows) = src (rows x cols)^T`, both row-major, in 32 x 32 tiles
/// so that reads and writes both stay within a few cache lines; parallel over
/// bands of result rows.
fn transpose_into(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const TILE: usize = 32;
    debug_assert_eq!(src.len(), rows * cols);
    debug_assert_eq!(dst.len(), rows * cols);
    if rows == 0 || cols == 0 {
        return;
    }
    let band = |(b, out): (usize, &mut [f32])| {
        let c0 = b * TILE;
        let width = out.len() / rows;
        for r0 in (0..rows).step_by(TILE) {
            for c in 0..width {
                let row = &mut out[c * rows + r0..][..TILE.min(rows - r0)];
                for (i, d) in row.iter_mut().enumerate() {
                    *d = src[(r0 + i) * cols + c0 + c];
                }
            }
        }
    };
    if src.len() >= 1 << 16 {
        dst.par_chunks_mut(TILE * rows).enumerate().for_each(band);
    } else {
        dst.chunks_mut(TILE * rows).enumerate().for_each(band);
    }
}

/// Products at least this large whose left operand is stored transposed copy it
/// to row-major first: faer runs them 20-30 % slower than the row-major form
/// (768x2048x512 on Zen 3: 103 against 129 GFLOP/s), and the copy costs less
/// than the difference.
const ROW_MAJOR_LHS_FLOPS: usize = 1 << 24;

thread_local! {
    /// The row-major copy of a transposed left operand, reused between products.
    static LHS_ROW_MAJOR: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Call `f` with the left operand of an `m x k` by `k x n` product as a
/// row-major `m x k` slice: `a` itself unless it is stored transposed (`k x m`,
/// `a_t`) and the product is large, then a copy in a reused buffer.
pub(crate) fn with_row_major_lhs<R>(
    a: &[f32],
    a_t: bool,
    (m, k, n): (usize, usize, usize),
    f: impl FnOnce(&[f32], bool) -> R,
) -> R {
    if !a_t || m * k * n < ROW_MAJOR_LHS_FLOPS {
        return f(a, a_t);
    }
    LHS_ROW_MAJOR.with_borrow_mut(|scratch| {
        scratch.resize(m * k, 0.0);
        transpose_into(a, k, m, scratch);
        f(scratch, false)
    })
}

/// A row-major matrix operand, optionally transposed: `a` is `rows x cols` as
/// stored; `t` means use its transpose.
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub t: bool,
}

/// An operand `rows x cols` (row-major) used as is.
pub fn n(data: &[f32], rows: usize, cols: usize) -> Operand<'_> {
    Operand {
        data,
        rows,
        cols,
        t: false,
    }
}

/// An operand `rows x cols` (row-major, as stored) used transposed.
pub fn t(data: &[f32], rows: usize, cols: usize) -> Operand<'_> {
    Operand {
        data,
        rows,
        cols,
        t: true,
    }
}

impl<'a> Operand<'a> {
    fn view(&self) -> MatRef<'a, f32> {
        assert_eq!(self.data.len(), self.rows * self.cols, "operand size");
        let m = MatRef::from_row_major_slice(self.data, self.rows, self.cols);
        if self.t { m.transpose() } else { m }
    }
}

/// `c (m x n, row-major) = alpha * a b + (accumulate ? c : 0)`. Shapes are
/// checked (programmer errors panic).
pub fn gemm(
    c: &mut [f32],
    m: usize,
    nc: usize,
    a: Operand,
    b: Operand,
    alpha: f32,
    accumulate: bool,
) {
    if a.t && a.rows * a.cols * nc >= ROW_MAJOR_LHS_FLOPS {
        return with_row_major_lhs(a.data, true, (m, a.rows, nc), |a_rm, _| {
            gemm(c, m, nc, n(a_rm, m, a.rows), b, alpha, accumulate)
        });
    }
    product(c, false, m, nc, a, b, alpha, accumulate);
}

/// Like [`gemm`], but `c` is stored transposed: `c` holds the `m x n` result
/// as `n x m` row-major (column-major `m x n`). For products whose natural
/// left operand is a transposed activation, this form keeps both operands
/// row-major and needs no copy.
pub fn gemm_transposed_out(
    c: &mut [f32],
    m: usize,
    nc: usize,
    a: Operand,
    b: Operand,
    alpha: f32,
    accumulate: bool,
) {
    product(c, true, m, nc, a, b, alpha, accumulate);
}

/// `c = alpha a b (+ c)` with `c` row-major, or column-major (`c_t`).
#[allow(clippy::too_many_arguments)]
fn product(
    c: &mut [f32],
    c_t: bool,
    m: usize,
    nc: usize,
    a: Operand,
    b: Operand,
    alpha: f32,
    accumulate: bool,
) {
    let (a, b) = (a.view(), b.view());
    assert_eq!(
        (a.nrows(), b.ncols(), a.ncols()),
        (m, nc, b.nrows()),
        "gemm shapes"
    );
    assert_eq!(c.len(), m * nc, "gemm output size");
    let k = a.ncols();
    let dst = if c_t {
        MatMut::from_column_major_slice_mut(c, m, nc)
    } else {
        MatMut::from_row_major_slice_mut(c, m, nc)
    };
    let accum = if accumulate {
        Accum::Add
    } else {
        Accum::Replace
    };
    matmul(dst, accum, a, b, alpha, par_for(m, nc, k));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, nn: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * nn];
        for i in 0..m {
            for j in 0..nn {
                c[i * nn + j] = (0..k).map(|p| a[i * k + p] * b[p * nn + j]).sum();
            }
        }
        c
    }

    #[test]
    fn transpose_into_matches_the_definition() {
        for (rows, cols) in [(3, 5), (70, 33), (1, 40), (300, 257)] {
            let src: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
            let mut dst = vec![0.0; rows * cols];
            transpose_into(&src, rows, cols, &mut dst);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * rows + r],
                        src[r * cols + c],
                        "{rows}x{cols} at ({r}, {c})"
                    );
                }
            }
        }
    }

    #[test]
    fn transposed_operands_and_accumulation() {
        let (m, k, nn) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * nn).map(|i| (i as f32 * 0.11).cos()).collect();
        let want = naive(&a, &b, m, k, nn);
        // a^T stored (k x m), b^T stored (nn x k)
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let bt: Vec<f32> = (0..nn * k).map(|i| b[(i % k) * nn + i / k]).collect();
        let mut c = vec![1.0; m * nn];
        gemm(&mut c, m, nn, t(&at, k, m), t(&bt, nn, k), 2.0, true);
        for i in 0..m * nn {
            assert!((c[i] - (1.0 + 2.0 * want[i])).abs() < 1e-5);
        }
        gemm(&mut c, m, nn, n(&a, m, k), n(&b, k, nn), 1.0, false);
        for i in 0..m * nn {
            assert!((c[i] - want[i]).abs() < 1e-5);
        }
        // The result stored transposed (nn x m), accumulated.
        let mut ct = vec![1.0; m * nn];
        gemm_transposed_out(&mut ct, m, nn, n(&a, m, k), n(&b, k, nn), 2.0, true);
        for i in 0..m {
            for j in 0..nn {
                assert!((ct[j * m + i] - (1.0 + 2.0 * want[i * nn + j])).abs() < 1e-5);
            }
        }
    }
}
