//! Matrix products: `matmul`, `conv` and `scaled_dot_product_attention`. Every
//! product goes through faer's GEMM; this module only arranges operands
//! (batch offsets, im2col for convolutions that are not 1x1) around it.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::elementwise::{Broadcast, broadcast_shape};
use super::values::OpCtx;
use crate::mil::DType;

/// Products with fewer multiply-adds than this run on one thread.
const PAR_FLOPS: usize = 1 << 18;

/// Batched products below this many multiply-adds each are spread over threads
/// one product per task rather than each product over all threads.
const BATCH_PAR_FLOPS: usize = 1 << 26;

fn par_for(flops: usize) -> Par {
    if flops >= PAR_FLOPS {
        Par::rayon(0)
    } else {
        Par::Seq
    }
}

/// Products with a left operand stored transposed (the backward `W^T dY`) at
/// least this large (multiply-adds) may run through [`gemm_transposed_lhs`]
/// (see [`transposed_lhs_detour`]); smaller ones read it in place, which
/// measured as fast or faster (`docs/performance.md`, "Measurements behind CPU
/// backend choices"). faer's fast form wants its right operand column-major in
/// a column-major result, or, for a row-major result, a row-major left operand.
const TRANSPOSED_LHS_FLOPS: usize = 1 << 28;

thread_local! {
    /// [`gemm_transposed_lhs`]'s column-major copies of the right operand and of
    /// the result, reused between products.
    static COLUMN_MAJOR: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// `out (m x n) = a (m x k) * b (k x n)` on row-major slices; `a_t`/`b_t` say
/// that `a`/`b` are stored transposed (`k x m`, `n x k`).
#[allow(clippy::too_many_arguments)]
fn gemm(
    out: &mut [f32],
    a: &[f32],
    a_t: bool,
    b: &[f32],
    b_t: bool,
    (m, k, n): (usize, usize, usize),
    par: Par,
) {
    if a_t && !matches!(par, Par::Seq) && transposed_lhs_detour((m, k, n), crate::math::avx512()) {
        return gemm_transposed_lhs(out, a, b, b_t, (m, k, n), par);
    }
    let dst = MatMut::from_row_major_slice_mut(out, m, n);
    matmul(
        dst,
        Accum::Replace,
        view(a, a_t, m, k),
        view(b, b_t, k, n),
        1.0f32,
        par,
    );
}

/// Whether a product with a transposed left operand goes through
/// [`gemm_transposed_lhs`]: large ones on AVX2, and on CPUs with AVX-512
/// (where faer runs its 512-bit kernels) only those with more result rows than
/// inner dimension; each choice is the faster one measured
/// (`docs/performance.md`).
fn transposed_lhs_detour((m, k, n): (usize, usize, usize), avx512: bool) -> bool {
    m * k * n >= TRANSPOSED_LHS_FLOPS && (!avx512 || m > k)
}

/// The `rows x cols` operand stored row-major, or transposed (`cols x rows`) if `t`.
fn view(x: &[f32], t: bool, rows: usize, cols: usize) -> MatRef<'_, f32> {
    if t {
        MatRef::from_row_major_slice(x, cols, rows).transpose()
    } else {
        MatRef::from_row_major_slice(x, rows, cols)
    }
}

/// `out = a b` with `a` stored transposed, in faer's fast form: the product is
/// made column-major from `a` as stored (column-major `m x k`) and a
/// column-major `b` (a transposed copy, unless `b` is stored transposed),
/// then transposed into `out`. The copies touch `k n + 2 m n` values against
/// the product's `m k n` multiply-adds.
fn gemm_transposed_lhs(
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    b_t: bool,
    (m, k, n): (usize, usize, usize),
    par: Par,
) {
    COLUMN_MAJOR.with_borrow_mut(|(b_cm, c_cm)| {
        let rhs = if b_t {
            view(b, true, k, n)
        } else {
            b_cm.resize(k * n, 0.0);
            crate::linalg::transpose_into(b, k, n, b_cm);
            view(b_cm, true, k, n)
        };
        c_cm.resize(m * n, 0.0);
        let lhs = view(a, true, m, k);
        let dst = MatMut::from_column_major_slice_mut(c_cm, m, n);
        matmul(dst, Accum::Replace, lhs, rhs, 1.0f32, par);
        crate::linalg::transpose_into(c_cm, n, m, out);
    });
}

/// For every index of the broadcast shape `out`, the flat index into `shape`
/// (right-aligned, size-1 dimensions repeated).
fn broadcast_index(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let numel: usize = out.iter().product();
    let offset = out.len() - shape.len();
    (0..numel)
        .map(|mut flat| {
            let (mut index, mut step) = (0, 1);
            for d in (0..out.len()).rev() {
                let i = flat % out[d];
                flat /= out[d];
                if d >= offset && shape[d - offset] != 1 {
                    index += i * step;
                }
                if d >= offset {
                    step *= shape[d - offset];
                }
            }
            index
        })
        .collect()
}

/// Batched `x @ y` with broadcast batch dimensions.
#[derive(Debug)]
pub(super) struct Matmul {
    mkn: (usize, usize, usize),
    transpose_x: bool,
    transpose_y: bool,
    /// Per result batch: element offsets of its `x` and `y` matrices.
    batches: Vec<(usize, usize)>,
}

impl Matmul {
    /// `[B x] MxK . KxN` with the transpose flags, for profiles.
    pub(super) fn flags_label(&self) -> String {
        let (m, k, n) = self.mkn;
        let t = |f: bool| if f { "^T" } else { "" };
        format!(
            " {}x[{m}x{k}{} . {k}x{n}{}]",
            self.batches.len(),
            t(self.transpose_x),
            t(self.transpose_y)
        )
    }

    /// Multiply-adds of one run.
    pub(super) fn multiply_adds(&self) -> usize {
        let (m, k, n) = self.mkn;
        m * k * n * self.batches.len()
    }

    pub(super) fn run(&self, x: &[f32], y: &[f32], out: &mut [f32]) {
        let (m, k, n) = self.mkn;
        debug_assert_eq!(out.len(), self.batches.len() * m * n);
        if m * n == 0 {
            return;
        }
        let one = |(b, dst): (usize, &mut [f32]), par: Par| {
            let (xo, yo) = self.batches[b];
            let (xs, ys) = (&x[xo..xo + m * k], &y[yo..yo + k * n]);
            gemm(
                dst,
                xs,
                self.transpose_x,
                ys,
                self.transpose_y,
                self.mkn,
                par,
            );
        };
        let flops = m * n * k;
        // Many small products (attention heads): one thread each, in parallel.
        // Few large ones: each product on all threads.
        let batches = self.batches.len();
        if batches > 1 && flops < BATCH_PAR_FLOPS && flops * batches >= PAR_FLOPS {
            out.par_chunks_mut(m * n)
                .enumerate()
                .for_each(|job| one(job, Par::Seq));
        } else {
            out.chunks_mut(m * n)
                .enumerate()
                .for_each(|job| one(job, par_for(flops)));
        }
    }
}

pub(super) fn compile_matmul(ctx: &OpCtx) -> Matmul {
    let (x, y) = (ctx.input("x"), ctx.input("y"));
    // Rank-1 operands as in NumPy: x [K] is [1, K], y [K] is [K, 1]; no transposes.
    let (xs, tx) = match x.rank() {
        1 => (vec![1, x.shape[0]], false),
        _ => (x.shape.clone(), ctx.flag("transpose_x").unwrap_or(false)),
    };
    let (ys, ty) = match y.rank() {
        1 => (vec![y.shape[0], 1], false),
        _ => (y.shape.clone(), ctx.flag("transpose_y").unwrap_or(false)),
    };
    let (xr, yr) = (xs.len(), ys.len());
    let (m, k) = if tx {
        (xs[xr - 1], xs[xr - 2])
    } else {
        (xs[xr - 2], xs[xr - 1])
    };
    let n = if ty { ys[yr - 2] } else { ys[yr - 1] };
    let (bx, by) = (&xs[..xr - 2], &ys[..yr - 2]);
    let batch = broadcast_shape(&[bx, by]).expect("inference checked the batch dimensions");
    let batches = broadcast_index(bx, &batch)
        .into_iter()
        .zip(broadcast_index(by, &batch))
        .map(|(i, j)| (i * m * k, j * k * n))
        .collect();
    Matmul {
        mkn: (m, k, n),
        transpose_x: tx,
        transpose_y: ty,
        batches,
    }
}

/// A 2-D convolution `[N, C, H, W]` (1-D inputs run with `H = 1`).
#[derive(Debug)]
pub(super) struct Conv {
    batch: usize,
    in_channels: usize,
    in_hw: (usize, usize),
    out_channels: usize,
    groups: usize,
    kernel: (usize, usize),
    strides: (usize, usize),
    dilations: (usize, usize),
    /// Padding before the first row and column.
    pad_before: (usize, usize),
    out_hw: (usize, usize),
}

impl Conv {
    pub(super) fn run(&self, x: &[f32], weight: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
        let (h, w) = self.in_hw;
        let (kh, kw) = self.kernel;
        let (oh, ow) = self.out_hw;
        let cin_g = self.in_channels / self.groups;
        let cout_g = self.out_channels / self.groups;
        let patch = cin_g * kh * kw;
        let positions = oh * ow;
        // A 1x1 kernel with unit strides and no padding multiplies the input as is.
        let pointwise = (kh, kw) == (1, 1)
            && self.strides == (1, 1)
            && self.pad_before == (0, 0)
            && (oh, ow) == (h, w);
        debug_assert_eq!(out.len(), self.batch * self.out_channels * positions);
        if positions == 0 {
            return;
        }
        let mut columns = vec![0.0f32; if pointwise { 0 } else { patch * positions }];
        let par = par_for(cout_g * patch * positions);
        for b in 0..self.batch {
            for g in 0..self.groups {
                let xg = &x[(b * self.in_channels + g * cin_g) * h * w..][..cin_g * h * w];
                let rhs: &[f32] = if pointwise {
                    xg
                } else {
                    self.im2col(xg, &mut columns);
                    &columns
                };
                let wg = &weight[g * cout_g * patch..][..cout_g * patch];
                let og = &mut out[(b * self.out_channels + g * cout_g) * positions..]
                    [..cout_g * positions];
                gemm(og, wg, false, rhs, false, (cout_g, patch, positions), par);
            }
        }
        if let Some(bias) = bias {
            for (i, plane) in out.chunks_mut(positions).enumerate() {
                let add = bias[i % self.out_channels];
                plane.iter_mut().for_each(|v| *v += add);
            }
        }
    }

    /// Unfold one group's input `[cin_g, H, W]` into `[cin_g*KH*KW, OH*OW]`.
    fn im2col(&self, x: &[f32], columns: &mut [f32]) {
        let (h, w) = self.in_hw;
        let (kh, kw) = self.kernel;
        let (oh, ow) = self.out_hw;
        let (sh, sw) = self.strides;
        let (dh, dw) = self.dilations;
        let (pt, pl) = self.pad_before;
        for (r, row) in columns.chunks_mut(oh * ow).enumerate() {
            let (c, i, j) = (r / (kh * kw), (r / kw) % kh, r % kw);
            let plane = &x[c * h * w..][..h * w];
            for oy in 0..oh {
                let iy = (oy * sh + i * dh).wrapping_sub(pt);
                for ox in 0..ow {
                    let ix = (ox * sw + j * dw).wrapping_sub(pl);
                    // Positions in the padding wrap around to huge values and read 0.
                    row[oy * ow + ox] = if iy < h && ix < w {
                        plane[iy * w + ix]
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}

pub(super) fn compile_conv(ctx: &OpCtx) -> Conv {
    let (x, weight) = (ctx.input("x"), ctx.input("weight"));
    let spatial = x.rank() - 2;
    let list = |param: &str| -> Vec<usize> {
        match ctx.ints(param) {
            Some(v) => v.iter().map(|&s| s as usize).collect(),
            None => vec![1; spatial],
        }
    };
    let (strides, dilations) = (list("strides"), list("dilations"));
    let (in_sp, kernel, out_sp) = (&x.shape[2..], &weight.shape[2..], &ctx.output().shape[2..]);
    let pad_type = ctx.string("pad_type").expect("has a default");
    let pad_before: Vec<usize> = (0..spatial)
        .map(|d| match pad_type {
            "custom" => ctx.ints("pad").map_or(0, |p| p[2 * d] as usize),
            // The total padding that gives the result's size; "same" puts
            // an odd extra pad after, "same_lower" before.
            "same" | "same_lower" => {
                let effective = (kernel[d].max(1) - 1) * dilations[d] + 1;
                let total =
                    ((out_sp[d].max(1) - 1) * strides[d] + effective).saturating_sub(in_sp[d]);
                if pad_type == "same" {
                    total / 2
                } else {
                    total - total / 2
                }
            }
            _ => 0,
        })
        .collect();
    // A 1-D convolution is a 2-D one with a single row.
    let two = |v: &[usize], fill: usize| {
        if spatial == 1 {
            (fill, v[0])
        } else {
            (v[0], v[1])
        }
    };
    Conv {
        batch: x.shape[0],
        in_channels: x.shape[1],
        in_hw: two(in_sp, 1),
        out_channels: weight.shape[0],
        groups: ctx.int("groups").unwrap_or(1) as usize,
        kernel: two(kernel, 1),
        strides: two(&strides, 1),
        dilations: two(&dilations, 1),
        pad_before: two(&pad_before, 0),
        out_hw: two(out_sp, 1),
    }
}

/// `softmax(q k^T / sqrt(E) + mask) v` over batches of `[L, E]`, `[S, E]`, `[S, EV]`.
#[derive(Debug)]
pub(super) struct Attention {
    batch: usize,
    /// (L, S, E, EV).
    dims: (usize, usize, usize, usize),
    /// How the mask broadcasts to `[batch..., L, S]`, and whether it is boolean.
    mask: Option<(Broadcast, bool)>,
}

impl Attention {
    pub(super) fn run(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let (l, s, e, ev) = self.dims;
        // A boolean mask keeps positions where it is true; a float mask is added.
        let mask = match (&self.mask, mask) {
            (Some((b, is_bool)), Some(m)) => {
                let mut full = vec![0.0f32; self.batch * l * s];
                if *is_bool {
                    b.map([m], &mut full, |[keep]| {
                        if keep != 0.0 { 0.0 } else { f32::NEG_INFINITY }
                    });
                } else {
                    b.map([m], &mut full, |[add]| add);
                }
                Some(full)
            }
            _ => None,
        };
        let scale = (e as f32).sqrt();
        debug_assert_eq!(out.len(), self.batch * l * ev);
        if l * ev == 0 {
            return;
        }
        let one = |(b, dst): (usize, &mut [f32])| {
            let mut scores = vec![0.0f32; l * s];
            let (qb, kb) = (&q[b * l * e..][..l * e], &k[b * s * e..][..s * e]);
            gemm(&mut scores, qb, false, kb, true, (l, e, s), Par::Seq);
            for (i, row) in scores.chunks_mut(s.max(1)).enumerate() {
                let mask_row = mask.as_ref().map(|m| &m[(b * l + i) * s..][..s]);
                for (j, x) in row.iter_mut().enumerate() {
                    *x = *x / scale + mask_row.map_or(0.0, |m| m[j]);
                }
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                crate::math::simd(
                    #[inline(always)]
                    || {
                        let mut sum = 0.0f32;
                        for x in row.iter_mut() {
                            *x = crate::math::exp(*x - max);
                            sum += *x;
                        }
                        row.iter_mut().for_each(|x| *x /= sum);
                    },
                );
            }
            gemm(
                dst,
                &scores,
                false,
                &v[b * s * ev..][..s * ev],
                false,
                (l, s, ev),
                Par::Seq,
            );
        };
        if self.batch > 1 && l * s * (e + ev) >= 1 << 12 {
            out.par_chunks_mut(l * ev).enumerate().for_each(one);
        } else {
            out.chunks_mut(l * ev).enumerate().for_each(one);
        }
    }
}

pub(super) fn compile_attention(ctx: &OpCtx) -> Attention {
    let (q, k, v) = (ctx.input("query"), ctx.input("key"), ctx.input("value"));
    let rank = q.rank();
    let (l, e) = (q.shape[rank - 2], q.shape[rank - 1]);
    let (s, ev) = (k.shape[rank - 2], v.shape[rank - 1]);
    let batch_shape = &q.shape[..rank - 2];
    let mask = ctx.opt_input("attn_mask").map(|m| {
        let target: Vec<usize> = batch_shape.iter().copied().chain([l, s]).collect();
        let b = Broadcast::to(&[&m.shape], &target).expect("inference checked the mask");
        (b, m.dtype == DType::Bool)
    });
    Attention {
        batch: batch_shape.iter().product(),
        dims: (l, s, e, ev),
        mask,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_index_repeats_size_one_dimensions() {
        assert_eq!(broadcast_index(&[2, 1], &[2, 3]), [0, 0, 0, 1, 1, 1]);
        assert_eq!(broadcast_index(&[3], &[2, 3]), [0, 1, 2, 0, 1, 2]);
        assert_eq!(broadcast_index(&[], &[2]), [0, 0]);
    }

    #[test]
    fn gemm_handles_transposed_operands() {
        // a = [[1,2],[3,4]], b = [[5,6],[7,8]]; a b = [[19,22],[43,50]].
        let mut out = [0.0f32; 4];
        gemm(
            &mut out,
            &[1., 2., 3., 4.],
            false,
            &[5., 6., 7., 8.],
            false,
            (2, 2, 2),
            Par::Seq,
        );
        assert_eq!(out, [19., 22., 43., 50.]);
        // a stored transposed, b stored transposed: same product.
        gemm(
            &mut out,
            &[1., 3., 2., 4.],
            true,
            &[5., 7., 6., 8.],
            true,
            (2, 2, 2),
            Par::Seq,
        );
        assert_eq!(out, [19., 22., 43., 50.]);
    }

    #[test]
    fn transposed_products_take_the_detour_where_measured_faster() {
        // 2^28 multiply-adds is the size bound on every CPU.
        assert!(!transposed_lhs_detour((512, 512, 1023), false));
        assert!(transposed_lhs_detour((512, 512, 1024), false));
        // Without AVX-512 every large product goes column-major.
        assert!(transposed_lhs_detour((768, 768, 512), false));
        assert!(transposed_lhs_detour((768, 2048, 512), false));
        // With it, only those with more result rows than inner dimension.
        assert!(!transposed_lhs_detour((768, 768, 512), true));
        assert!(!transposed_lhs_detour((768, 2048, 512), true));
        assert!(transposed_lhs_detour((2048, 768, 512), true));
    }

    /// A large product with a transposed left operand, by each path (read in
    /// place, the column-major detour, and whichever `gemm` picks on this CPU):
    /// values checked against an `f64` dot product on a sample of entries
    /// (every row and column appears), with `b` stored both ways and shapes
    /// that are not multiples of the transpose tiles.
    #[test]
    fn large_products_with_a_transposed_left_operand() {
        let (m, k, n) = (1031, 517, 509);
        assert!(m * k * n >= TRANSPOSED_LHS_FLOPS);
        let a_t: Vec<f32> = (0..k * m)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 32.0)
            .collect();
        let mut b_t = vec![0.0; k * n];
        crate::linalg::transpose_into(&b, k, n, &mut b_t);
        let par = Par::rayon(0);
        for ((rhs, rhs_t), path) in [(&b, false), (&b_t, true)]
            .into_iter()
            .flat_map(|r| (0..3).map(move |p| (r, p)))
        {
            let mut out = vec![f32::NAN; m * n];
            match path {
                0 => {
                    let dst = MatMut::from_row_major_slice_mut(&mut out, m, n);
                    let (lhs, rhs) = (view(&a_t, true, m, k), view(rhs, rhs_t, k, n));
                    matmul(dst, Accum::Replace, lhs, rhs, 1.0f32, par);
                }
                1 => gemm_transposed_lhs(&mut out, &a_t, rhs, rhs_t, (m, k, n), par),
                _ => gemm(&mut out, &a_t, true, rhs, rhs_t, (m, k, n), par),
            }
            for i in 0..m {
                for j in [i % n, (i * 7 + 3) % n, n - 1 - i % n] {
                    let want: f64 = (0..k)
                        .map(|p| f64::from(a_t[p * m + i]) * f64::from(b[p * n + j]))
                        .sum();
                    let got = f64::from(out[i * n + j]);
                    assert!(
                        (got - want).abs() < 1e-3,
                        "path {path}, ({i}, {j}): {got} against {want}"
                    );
                }
            }
        }
    }
}
