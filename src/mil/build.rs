//! A builder that makes kernels pleasant to write: every method appends one
//! operation (plus the `const` operations holding its parameters), infers the
//! result type with [`super::infer`] and returns a [`Tensor`] handle.
//!
//! Kernel code is trusted code, so a shape or dtype mistake is a programmer
//! error and panics with the inference message (which names the op and the
//! operand). Text from users goes through [`super::parse`] and the verifier instead.
//!
//! Parameters (axes, perms, shapes, conv hyper-parameters) become named `const`
//! operations, the form coremltools writes and the ANE compiler accepts in both dialects.
//! Scalar operands created by [`Builder::scalar`] take the dtype given.
//!
//! (Contract written first; bodies being written.)

use super::ir::Arg;
use super::ir::{DType, Dialect, Literal, Program, TensorType};
use super::op::Op;

/// Handle to a value of the function under construction.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub ty: TensorType,
}

impl Tensor {
    pub fn shape(&self) -> &[usize] {
        &self.ty.shape
    }

    pub fn dtype(&self) -> DType {
        self.ty.dtype
    }
}

/// Builds one `main` function. Names are `<prefix>_<n>` with a per-builder
/// counter unless set with [`Builder::name_next`].
#[derive(Debug)]
pub struct Builder {
    _private: (),
}

#[allow(unused_variables)]
impl Builder {
    pub fn new(dialect: Dialect) -> Builder {
        todo!()
    }

    /// Declare a function input.
    pub fn input(&mut self, name: &str, dtype: DType, shape: &[usize]) -> Tensor {
        todo!()
    }

    /// Mark `t` as the next function output.
    pub fn output(&mut self, t: &Tensor) {
        todo!()
    }

    /// Set the name of the next op's result (the value name and its `name` attribute).
    pub fn name_next(&mut self, name: &str) -> &mut Self {
        todo!()
    }

    /// The finished program. Panics if no output was declared.
    pub fn finish(self) -> Program {
        todo!()
    }

    /// Generic escape hatch: append `op` with the given args and attributes,
    /// returning its results (one for every op but `split`).
    pub fn op(
        &mut self,
        op: Op,
        args: Vec<(&str, Arg)>,
        attrs: Vec<(&str, Literal)>,
    ) -> Vec<Tensor> {
        todo!()
    }

    // ---- constants -------------------------------------------------------
    /// A `const` op holding `lit` (inline or BLOBFILE).
    pub fn constant(&mut self, lit: Literal) -> Tensor {
        todo!()
    }
    /// A rank-0 float constant of `dtype` (fp16 values are rounded).
    pub fn scalar(&mut self, dtype: DType, x: f32) -> Tensor {
        todo!()
    }
    /// A BLOBFILE constant of type `ty` at record `offset` of `@model_path/weights/<file>`.
    pub fn blob_const(&mut self, ty: TensorType, file: &str, offset: u64) -> Tensor {
        todo!()
    }

    // ---- elementwise (numpy broadcasting) ---------------------------------
    pub fn add(&mut self, x: &Tensor, y: &Tensor) -> Tensor {
        todo!()
    }
    pub fn sub(&mut self, x: &Tensor, y: &Tensor) -> Tensor {
        todo!()
    }
    pub fn mul(&mut self, x: &Tensor, y: &Tensor) -> Tensor {
        todo!()
    }
    pub fn real_div(&mut self, x: &Tensor, y: &Tensor) -> Tensor {
        todo!()
    }
    pub fn maximum(&mut self, x: &Tensor, y: &Tensor) -> Tensor {
        todo!()
    }
    pub fn minimum(&mut self, x: &Tensor, y: &Tensor) -> Tensor {
        todo!()
    }
    pub fn pow(&mut self, x: &Tensor, y: &Tensor) -> Tensor {
        todo!()
    }
    pub fn sqrt(&mut self, x: &Tensor) -> Tensor {
        todo!()
    }
    pub fn rsqrt(&mut self, x: &Tensor) -> Tensor {
        todo!()
    }
    pub fn exp(&mut self, x: &Tensor) -> Tensor {
        todo!()
    }
    pub fn log(&mut self, x: &Tensor) -> Tensor {
        todo!()
    }
    pub fn tanh(&mut self, x: &Tensor) -> Tensor {
        todo!()
    }
    pub fn sigmoid(&mut self, x: &Tensor) -> Tensor {
        todo!()
    }
    pub fn silu(&mut self, x: &Tensor) -> Tensor {
        todo!()
    }
    pub fn relu(&mut self, x: &Tensor) -> Tensor {
        todo!()
    }
    pub fn identity(&mut self, x: &Tensor) -> Tensor {
        todo!()
    }
    pub fn select(&mut self, cond: &Tensor, a: &Tensor, b: &Tensor) -> Tensor {
        todo!()
    }
    pub fn cast(&mut self, x: &Tensor, dtype: DType) -> Tensor {
        todo!()
    }

    // ---- reductions and shape ops -----------------------------------------
    pub fn softmax(&mut self, x: &Tensor, axis: i64) -> Tensor {
        todo!()
    }
    pub fn reduce_sum(&mut self, x: &Tensor, axes: &[i64], keep_dims: bool) -> Tensor {
        todo!()
    }
    pub fn reduce_mean(&mut self, x: &Tensor, axes: &[i64], keep_dims: bool) -> Tensor {
        todo!()
    }
    pub fn reduce_max(&mut self, x: &Tensor, axes: &[i64], keep_dims: bool) -> Tensor {
        todo!()
    }
    pub fn reshape(&mut self, x: &Tensor, shape: &[usize]) -> Tensor {
        todo!()
    }
    pub fn transpose(&mut self, x: &Tensor, perm: &[usize]) -> Tensor {
        todo!()
    }
    pub fn slice_by_size(&mut self, x: &Tensor, begin: &[usize], size: &[usize]) -> Tensor {
        todo!()
    }
    pub fn concat(&mut self, values: &[&Tensor], axis: i64) -> Tensor {
        todo!()
    }
    pub fn split(&mut self, x: &Tensor, split_sizes: &[usize], axis: i64) -> Vec<Tensor> {
        todo!()
    }

    // ---- linear algebra ---------------------------------------------------
    /// Batched matmul with numpy broadcasting over leading axes.
    pub fn matmul(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        transpose_x: bool,
        transpose_y: bool,
    ) -> Tensor {
        todo!()
    }
    /// Convolution with `weight` `[OC, IC/groups, KH, KW]`, strides 1, valid padding.
    pub fn conv(&mut self, x: &Tensor, weight: &Tensor, groups: usize) -> Tensor {
        todo!()
    }

    // ---- composites used by the Llama kernels ------------------------------
    /// `[1, IC, 1, S]` x const weight `[OC, IC, 1, 1]` -> `[1, OC, 1, S]` (1x1 conv).
    pub fn linear_conv1x1(&mut self, x: &Tensor, weight: &Tensor) -> Tensor {
        todo!()
    }
    /// `y[o, t] = sum_i x[i, t] * m[i, o]` for `x` `[1, IC, 1, S]` and a runtime
    /// matrix `m` `[1, IC, 1, OC]` (the packed-weight form): reshape, transpose,
    /// matmul, transpose back. Result `[1, OC, 1, S]`.
    pub fn linear_dynamic(&mut self, x: &Tensor, m: &Tensor) -> Tensor {
        todo!()
    }
    /// RMSNorm over channels of `x` `[1, C, 1, S]`: `x * rsqrt(mean_c(x^2) + eps) * weight`
    /// with `weight` `[1, C, 1, 1]` (const or runtime). Built from mul/reduce_sum/add/pow
    /// (`pow(.., -0.5)`, the form the ANE is known to run).
    pub fn rmsnorm(&mut self, x: &Tensor, weight: &Tensor, eps: f32) -> Tensor {
        todo!()
    }
    /// `[1, H*D, 1, S]` -> `[1, H, S, D]` (reshape + transpose).
    pub fn split_heads(&mut self, x: &Tensor, heads: usize) -> Tensor {
        todo!()
    }
    /// `[1, H, S, D]` -> `[1, H*D, 1, S]`.
    pub fn merge_heads(&mut self, x: &Tensor) -> Tensor {
        todo!()
    }
    /// Causal attention per head: `softmax(q k^T * scale + mask) v` for `q`, `k`, `v`
    /// `[1, H, S, D]` and an additive `mask` `[1, 1, S, S]` (0 on and below the
    /// diagonal, -65504 above). Returns `(out [1,H,S,D], probs [1,H,S,S])`.
    pub fn causal_attention(
        &mut self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        scale: f32,
    ) -> (Tensor, Tensor) {
        todo!()
    }
    /// An inline `[1, 1, S, S]` causal mask constant of `dtype`.
    pub fn causal_mask(&mut self, dtype: DType, seq: usize) -> Tensor {
        todo!()
    }
}
