//! Data movement: `reshape`, `identity`, `transpose`, `slice_by_size`, `concat`
//! and `split`. Each is a strided [`View`] of a row-major buffer, read into a
//! dense result (gather) or, for `concat`, written into one (scatter).

use rayon::prelude::*;

use super::elementwise::PAR_MIN;
use super::exec::{Kernel, OpCtx};
use crate::Result;

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
    pub(super) fn new(shape: Vec<usize>, strides: Vec<usize>, offset: usize) -> View {
        let (shape, strides) = if shape.is_empty() {
            (vec![1], vec![0])
        } else {
            (shape, strides)
        };
        View {
            shape,
            strides,
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
        let inner = *self.shape.last().expect("rank >= 1");
        let step = *self.strides.last().expect("rank >= 1");
        let row = |(r, dst): (usize, &mut [f32])| {
            let start = self.row_offset(r);
            if step == 1 {
                dst.copy_from_slice(&src[start..start + inner]);
            } else {
                for (j, d) in dst.iter_mut().enumerate() {
                    *d = src[start + j * step];
                }
            }
        };
        if len >= PAR_MIN {
            out.par_chunks_mut(inner).enumerate().for_each(row);
        } else {
            out.chunks_mut(inner).enumerate().for_each(row);
        }
    }

    /// Write dense, row-major `src` into the viewed elements of `dst`.
    fn scatter(&self, src: &[f32], dst: &mut [f32]) {
        let inner = *self.shape.last().expect("rank >= 1");
        if inner == 0 {
            return;
        }
        let step = *self.strides.last().expect("rank >= 1");
        for (r, row) in src.chunks_exact(inner).enumerate() {
            let start = self.row_offset(r);
            if step == 1 {
                dst[start..start + inner].copy_from_slice(row);
            } else {
                for (j, &v) in row.iter().enumerate() {
                    dst[start + j * step] = v;
                }
            }
        }
    }
}

/// `reshape` and `identity` keep the data as it is.
pub(super) fn compile_copy(ctx: &OpCtx) -> Result<Kernel> {
    let x = ctx.input("x")?;
    let out = ctx.output();
    if ctx.op.op == crate::mil::Op::Identity {
        ctx.expect_output(x.dtype, &x.shape)?;
        return Ok(Kernel::Copy);
    }
    let spec = ctx
        .ints("shape")?
        .ok_or_else(|| ctx.err("missing required parameter `shape`"))?;
    // -1 stands for the dimension that keeps the element count.
    let known: i64 = spec.iter().filter(|&&d| d != -1).product();
    let inferred = match spec.iter().filter(|&&d| d == -1).count() {
        0 => None,
        1 if known > 0 && x.numel() as i64 % known == 0 => Some(x.numel() as i64 / known),
        _ => return Err(ctx.err(format!("`shape` {spec:?} cannot reshape {x}"))),
    };
    let shape = spec
        .iter()
        .map(|&d| match d {
            -1 => inferred.map(|d| d as usize),
            d if d >= 0 => Some(d as usize),
            _ => None,
        })
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| ctx.err(format!("`shape` {spec:?} has a negative dimension")))?;
    if shape.iter().product::<usize>() != x.numel() {
        return Err(ctx.err(format!(
            "`shape` {shape:?} holds {} elements but {x} has {}",
            shape.iter().product::<usize>(),
            x.numel()
        )));
    }
    if out.dtype != x.dtype {
        return Err(ctx.err(format!("result is declared {out} but `x` is {}", x.dtype)));
    }
    ctx.expect_output(x.dtype, &shape)?;
    Ok(Kernel::Copy)
}

pub(super) fn compile_transpose(ctx: &OpCtx) -> Result<Kernel> {
    let x = ctx.input("x")?;
    let spec = ctx
        .ints("perm")?
        .ok_or_else(|| ctx.err("missing required parameter `perm`"))?;
    let perm = spec
        .iter()
        .map(|&a| ctx.axis("perm", a, x.rank()))
        .collect::<Result<Vec<_>>>()?;
    let mut sorted = perm.clone();
    sorted.sort_unstable();
    if sorted != (0..x.rank()).collect::<Vec<_>>() {
        return Err(ctx.err(format!(
            "`perm` {spec:?} is not a permutation of the {} axes of {x}",
            x.rank()
        )));
    }
    let out_shape: Vec<usize> = perm.iter().map(|&d| x.shape[d]).collect();
    ctx.expect_output(x.dtype, &out_shape)?;
    let strides = contiguous_strides(&x.shape);
    Ok(Kernel::Gather(View::new(
        out_shape,
        perm.iter().map(|&d| strides[d]).collect(),
        0,
    )))
}

pub(super) fn compile_slice(ctx: &OpCtx) -> Result<Kernel> {
    let x = ctx.input("x")?;
    let begin = ctx
        .ints("begin")?
        .ok_or_else(|| ctx.err("missing required parameter `begin`"))?;
    let size = ctx
        .ints("size")?
        .ok_or_else(|| ctx.err("missing required parameter `size`"))?;
    if begin.len() != x.rank() || size.len() != x.rank() {
        return Err(ctx.err(format!(
            "`begin` {begin:?} and `size` {size:?} need one entry per axis of {x}"
        )));
    }
    let strides = contiguous_strides(&x.shape);
    let mut offset = 0;
    let mut out_shape = Vec::with_capacity(x.rank());
    for d in 0..x.rank() {
        let dim = x.shape[d] as i64;
        // A negative begin counts from the end; size -1 means "to the end".
        let b = if begin[d] < 0 {
            begin[d] + dim
        } else {
            begin[d]
        };
        let s = if size[d] == -1 { dim - b } else { size[d] };
        if b < 0 || s < 0 || b + s > dim {
            return Err(ctx.err(format!(
                "axis {d}: begin {} size {} is outside dimension {dim} of {x}",
                begin[d], size[d]
            )));
        }
        offset += b as usize * strides[d];
        out_shape.push(s as usize);
    }
    ctx.expect_output(x.dtype, &out_shape)?;
    Ok(Kernel::Gather(View::new(out_shape, strides, offset)))
}

/// `concat`: operand `i` is written into `views[i]` of a `len`-element result.
#[derive(Debug)]
pub(super) struct Concat {
    views: Vec<View>,
    len: usize,
}

impl Concat {
    pub(super) fn run(&self, args: &[&[f32]], out: &mut [f32]) {
        debug_assert_eq!(out.len(), self.len);
        for (view, src) in self.views.iter().zip(args) {
            view.scatter(src, out);
        }
    }
}

pub(super) fn compile_concat(ctx: &OpCtx) -> Result<Kernel> {
    let values = ctx.tuple("values")?;
    let first = *values
        .first()
        .ok_or_else(|| ctx.err("`values` must hold at least one tensor"))?;
    let rank = first.rank();
    let axis = ctx.axis(
        "axis",
        ctx.int("axis")?
            .ok_or_else(|| ctx.err("missing required parameter `axis`"))?,
        rank,
    )?;
    let interleave = ctx.flag("interleave")?.unwrap_or(false);
    for (i, v) in values.iter().enumerate() {
        let fits = v.dtype == first.dtype
            && v.rank() == rank
            && (0..rank).all(|d| (d == axis && !interleave) || v.shape[d] == first.shape[d]);
        if !fits {
            let rule = if interleave {
                "equal shapes"
            } else {
                "equal shapes except along the axis"
            };
            return Err(ctx.err(format!(
                "value {i} is {v} but value 0 is {first}; concat along axis {axis} needs {rule}"
            )));
        }
    }
    let mut out_shape = first.shape.clone();
    out_shape[axis] = values.iter().map(|v| v.shape[axis]).sum();
    let out = ctx.expect_output(first.dtype, &out_shape)?;
    let strides = contiguous_strides(&out_shape);
    let n = values.len();
    let mut views = Vec::with_capacity(n);
    let mut start = 0;
    for (i, v) in values.iter().enumerate() {
        let view = if interleave {
            // Slice j of value i lands at index j * n + i along the axis.
            let mut s = strides.clone();
            s[axis] *= n;
            View::new(v.shape.clone(), s, i * strides[axis])
        } else {
            View::new(v.shape.clone(), strides.clone(), start * strides[axis])
        };
        start += v.shape[axis];
        views.push(view);
    }
    Ok(Kernel::Concat(Concat {
        views,
        len: out.numel(),
    }))
}

pub(super) fn compile_split(ctx: &OpCtx) -> Result<Kernel> {
    let x = ctx.input("x")?;
    let axis = ctx.axis(
        "axis",
        ctx.int("axis")?
            .ok_or_else(|| ctx.err("missing required parameter `axis`"))?,
        x.rank(),
    )?;
    let dim = x.shape[axis];
    let sizes: Vec<usize> = match (ctx.ints("split_sizes")?, ctx.int("num_splits")?) {
        (Some(sizes), _) => {
            if sizes.iter().any(|&s| s < 0) || sizes.iter().sum::<i64>() != dim as i64 {
                return Err(ctx.err(format!(
                    "`split_sizes` {sizes:?} must be non-negative and sum to {dim} (axis {axis} of {x})"
                )));
            }
            sizes.iter().map(|&s| s as usize).collect()
        }
        (None, Some(n)) if n > 0 && dim % n as usize == 0 => vec![dim / n as usize; n as usize],
        (None, Some(n)) => {
            return Err(ctx.err(format!(
                "`num_splits` {n} does not divide axis {axis} of {x}"
            )));
        }
        (None, None) => return Err(ctx.err("give `num_splits` or `split_sizes`")),
    };
    let outputs = &ctx.op.outputs;
    if outputs.len() != sizes.len() {
        return Err(ctx.err(format!(
            "the split makes {} parts but {} results are declared",
            sizes.len(),
            outputs.len()
        )));
    }
    let strides = contiguous_strides(&x.shape);
    let mut views = Vec::with_capacity(sizes.len());
    let mut start = 0;
    for (size, out) in sizes.iter().zip(outputs) {
        let mut shape = x.shape.clone();
        shape[axis] = *size;
        if out.ty.dtype != x.dtype || out.ty.shape != shape {
            return Err(ctx.err(format!(
                "result `{}` is declared {} but the split gives {}",
                out.name,
                out.ty,
                crate::mil::TensorType::new(x.dtype, shape)
            )));
        }
        views.push(View::new(shape, strides.clone(), start * strides[axis]));
        start += size;
    }
    Ok(Kernel::Split(views))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_gather_and_scatter_strided_elements() {
        // x = [[0,1,2],[3,4,5]]; its transpose read through strides (1, 3).
        let x: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let t = View::new(vec![3, 2], vec![1, 3], 0);
        let mut gathered = vec![0.0; 6];
        t.gather(&x, &mut gathered);
        assert_eq!(gathered, [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        let mut back = vec![0.0; 6];
        t.scatter(&gathered, &mut back);
        assert_eq!(back, x);
        assert_eq!(contiguous_strides(&[2, 3, 4]), [12, 4, 1]);
        let mut one = [0.0];
        View::new(vec![], vec![], 4).gather(&x, &mut one);
        assert_eq!(one, [4.0]);
    }
}
