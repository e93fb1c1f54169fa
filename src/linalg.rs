//! Host-side GEMM for the CPU half of training (weight gradients, classifier):
//! a thin wrapper over faer for row-major `f32` slices, and a blocked
//! transpose.

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

/// `dst (cols x rows) = src (rows x cols)^T`, both row-major.
///
/// Large matrices are split into bands of result rows (strips of `src`'s
/// columns), two per worker thread, run in parallel; each band walks `src`
/// down in tiles of 16 rows by 8 columns, which become 8 result rows of 16
/// values (a whole cache line each). On x86-64 with AVX2 a tile is two 8 x 8
/// transposes in registers (unpack, shuffle and lane-permute instructions
/// through pulp's safe wrappers); elsewhere, and for the edges, values move
/// one by one. Measured on Ice Lake with the operands in cache (ns a value,
/// one thread / two): 768x768 0.7 / 0.4, 2048x768 1.0-1.4 / 0.5, 32000x288
/// 2.6 / 1.6, against 1.4-2.4 / 0.8-1.4, 3.3-4.7 / 0.7-2.3 and 4.2-6.6 (one
/// thread) for the earlier 16 x 16 tiles through a local array. From cold
/// memory, as in a training step, a layer's weights still took about 2 ns a
/// value on that VM (`docs/performance.md`).
pub fn transpose_into(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    assert_eq!(src.len(), rows * cols, "transpose_into: source size");
    assert_eq!(dst.len(), rows * cols, "transpose_into: destination size");
    if rows == 0 || cols == 0 {
        return;
    }
    if src.len() < 1 << 16 {
        transpose_band(src, rows, cols, 0, dst);
        return;
    }
    // Two bands per thread (for balance), at least 64 result rows each.
    let threads = rayon::current_num_threads();
    let width = cols.div_ceil(2 * threads).next_multiple_of(16).max(64);
    dst.par_chunks_mut(width * rows)
        .enumerate()
        .for_each(|(b, out)| transpose_band(src, rows, cols, b * width, out));
}

/// Result rows `c0..c0 + out.len() / rows` of [`transpose_into`] into `out`:
/// whole tiles in blocks of 64 x 64 (source rows outer, so that `src` is read
/// in runs of the band's width), then the remaining rows value by value.
fn transpose_band(src: &[f32], rows: usize, cols: usize, c0: usize, out: &mut [f32]) {
    let width = out.len() / rows;
    let tiled = simd8::transpose_tiles(src, rows, cols, c0, out);
    for i in tiled..rows {
        for c in 0..width {
            out[c * rows + i] = src[i * cols + c0 + c];
        }
    }
}

/// 8 x 8 transposes in AVX registers, through pulp's safe intrinsics.
#[cfg(target_arch = "x86_64")]
mod simd8 {
    use std::arch::x86_64::__m256;

    use pulp::x86::V3;

    /// Source rows and columns per block of a band.
    const BLOCK: usize = 64;

    /// [`super::transpose_band`]'s whole tiles of 16 source rows, in blocks:
    /// returns how many source rows were done (0 without AVX2).
    pub(super) fn transpose_tiles(
        src: &[f32],
        rows: usize,
        cols: usize,
        c0: usize,
        out: &mut [f32],
    ) -> usize {
        let Some(v3) = V3::try_new() else {
            return 0;
        };
        let width = out.len() / rows;
        let tiled = rows / 16 * 16;
        v3.vectorize(
            #[inline(always)]
            || {
                for r0 in (0..tiled).step_by(BLOCK) {
                    for b0 in (0..width).step_by(BLOCK) {
                        let b1 = (b0 + BLOCK).min(width);
                        for r in (r0..(r0 + BLOCK).min(tiled)).step_by(16) {
                            let mut c = b0;
                            while c + 8 <= b1 {
                                let tile = |r: usize| {
                                    transpose(
                                        v3,
                                        std::array::from_fn(|i| {
                                            load(&src[(r + i) * cols + c0 + c..])
                                        }),
                                    )
                                };
                                let (top, bottom) = (tile(r), tile(r + 8));
                                for (j, (t, b)) in top.into_iter().zip(bottom).enumerate() {
                                    let dst = &mut out[(c + j) * rows + r..][..16];
                                    store(&mut dst[..8], t);
                                    store(&mut dst[8..], b);
                                }
                                c += 8;
                            }
                            for c in c..b1 {
                                for i in r..r + 16 {
                                    out[c * rows + i] = src[i * cols + c0 + c];
                                }
                            }
                        }
                    }
                }
            },
        );
        tiled
    }

    /// The first 8 values of `s`.
    #[inline(always)]
    fn load(s: &[f32]) -> __m256 {
        let a: [f32; 8] = s[..8].try_into().expect("8 values");
        pulp::cast(a)
    }

    /// `v` into the first 8 values of `d`.
    #[inline(always)]
    fn store(d: &mut [f32], v: __m256) {
        let a: [f32; 8] = pulp::cast(v);
        d[..8].copy_from_slice(&a);
    }

    /// Row `j` of the result is column `j` of the rows `r`.
    #[inline(always)]
    fn transpose(v3: V3, r: [__m256; 8]) -> [__m256; 8] {
        let a = v3.avx;
        // Pairs of rows interleaved, then pairs of pairs, then the 128-bit halves.
        let t: [__m256; 8] = std::array::from_fn(|i| {
            let (x, y) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
            if i % 2 == 0 {
                a._mm256_unpacklo_ps(x, y)
            } else {
                a._mm256_unpackhi_ps(x, y)
            }
        });
        let u: [__m256; 8] = std::array::from_fn(|i| {
            let (x, y) = (t[i / 4 * 4 + i % 4 / 2], t[i / 4 * 4 + i % 4 / 2 + 2]);
            if i % 2 == 0 {
                a._mm256_shuffle_ps::<0x44>(x, y)
            } else {
                a._mm256_shuffle_ps::<0xEE>(x, y)
            }
        });
        std::array::from_fn(|j| {
            let (x, y) = (u[j % 4], u[j % 4 + 4]);
            if j < 4 {
                a._mm256_permute2f128_ps::<0x20>(x, y)
            } else {
                a._mm256_permute2f128_ps::<0x31>(x, y)
            }
        })
    }
}

/// Without x86-64 every value of [`transpose_into`] moves one by one.
#[cfg(not(target_arch = "x86_64"))]
mod simd8 {
    pub(super) fn transpose_tiles(_: &[f32], _: usize, _: usize, _: usize, _: &mut [f32]) -> usize {
        0
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
    fn transpose_into_matches_the_definition() {
        for (rows, cols) in [
            (3, 5),
            (70, 33),
            (1, 40),
            (300, 257),
            (8, 8),
            (16, 72),
            (771, 300),
            // Whole 16 x 8 tiles only, and every kind of edge around them.
            (64, 64),
            (17, 9),
            (130, 77),
            (48, 1000),
            // In parallel bands, the last one narrower than a tile.
            (1024, 130),
        ] {
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
    }
}
