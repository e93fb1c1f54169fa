//! Host-side GEMM for the CPU half of training (weight gradients, classifier,
//! cross-entropy): a thin wrapper over faer for row-major `f32` slices.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

/// Parallelism for large products: all rayon threads (`RAYON_NUM_THREADS` /
/// `--threads`); small ones run on the calling thread.
fn par_for(m: usize, n: usize, k: usize) -> Par {
    if m * n * k < 1 << 18 {
        Par::Seq
    } else {
        Par::rayon(0)
    }
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
    let (a, b) = (a.view(), b.view());
    assert_eq!(
        (a.nrows(), b.ncols(), a.ncols()),
        (m, nc, b.nrows()),
        "gemm shapes"
    );
    assert_eq!(c.len(), m * nc, "gemm output size");
    let k = a.ncols();
    let dst = MatMut::from_row_major_slice_mut(c, m, nc);
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
    }
}
