//! A builder that makes kernels pleasant to write: every method appends one
//! operation (plus the `const` operations holding its parameters), infers the
//! result type with [`super::infer`] and returns a [`Tensor`] handle.
//!
//! Kernel code is trusted code, so a shape or dtype mistake is a programmer
//! error and panics with the inference message (which names the op and the
//! operand). Text from users goes through [`super::parse`](mod@super::parse) and the verifier instead.
//!
//! Parameters (axes, perms, shapes, conv hyper-parameters) become named `const`
//! operations `<op name>_<parameter>`, the form coremltools writes and the ANE
//! compiler accepts in both dialects. Call arguments are kept in alphabetical
//! order, as the reference generators write them. Scalar operands created by
//! [`Builder::scalar`] take the dtype given.

use std::collections::HashSet;

use super::infer::infer_outputs;
use super::ir::Arg;
use super::ir::{DType, Dialect, Function, Literal, Operation, Program, TensorType, Var};
use super::layout;
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

    fn arg(&self) -> Arg {
        Arg::var(&self.name)
    }
}

/// Builds one `main` function. Names are `<prefix>_<n>` with a per-builder
/// counter unless set with [`Builder::name_next`].
#[derive(Debug)]
pub struct Builder {
    dialect: Dialect,
    func: Function,
    counter: usize,
    next_name: Option<String>,
    /// Every value name and op name used so far (one namespace, so both stay unique).
    names: HashSet<String>,
}

impl Builder {
    pub fn new(dialect: Dialect) -> Builder {
        Builder {
            dialect,
            func: Function {
                name: "main".to_string(),
                inputs: Vec::new(),
                ops: Vec::new(),
                outputs: Vec::new(),
            },
            counter: 0,
            next_name: None,
            names: HashSet::new(),
        }
    }

    /// Declare a function input.
    pub fn input(&mut self, name: &str, dtype: DType, shape: &[usize]) -> Tensor {
        self.claim(name);
        let ty = TensorType::new(dtype, shape);
        self.func.inputs.push(Var::new(name, ty.clone()));
        Tensor {
            name: name.to_string(),
            ty,
        }
    }

    /// Mark `t` as the next function output.
    pub fn output(&mut self, t: &Tensor) {
        assert!(
            self.func.var_type(&t.name) == Some(&t.ty),
            "output `{}` is not a value of this builder",
            t.name
        );
        self.func.outputs.push(t.name.clone());
    }

    /// Set the name of the next op's result (the value name and its `name` attribute).
    pub fn name_next(&mut self, name: &str) -> &mut Self {
        self.next_name = Some(name.to_string());
        self
    }

    /// The function built so far (for inspection in tests and debugging).
    pub fn function(&self) -> &Function {
        &self.func
    }

    /// The finished program. Panics if no output was declared.
    pub fn finish(self) -> Program {
        assert!(
            !self.func.outputs.is_empty(),
            "builder finished without an output; call `output` first"
        );
        Program {
            dialect: self.dialect,
            main: self.func,
        }
    }

    /// Generic escape hatch: append `op` with the given args and attributes,
    /// returning its results (one for every op but `split`).
    pub fn op(
        &mut self,
        op: Op,
        args: Vec<(&str, Arg)>,
        attrs: Vec<(&str, Literal)>,
    ) -> Vec<Tensor> {
        let name = self.take_name(op);
        self.push(op, name, args, attrs)
    }

    // ---- naming and appending ---------------------------------------------

    fn claim(&mut self, name: &str) {
        assert!(
            self.names.insert(name.to_string()),
            "name `{name}` is already used in this function"
        );
    }

    /// The name of the next op: the one set by `name_next`, else `<op>_<n>`.
    fn take_name(&mut self, op: Op) -> String {
        if let Some(name) = self.next_name.take() {
            return name;
        }
        loop {
            let name = format!("{}_{}", op.mil_name(), self.counter);
            self.counter += 1;
            if !self.names.contains(&name) {
                return name;
            }
        }
    }

    /// Append an operation named `name`; its result types come from inference.
    fn push(
        &mut self,
        op: Op,
        name: String,
        args: Vec<(&str, Arg)>,
        attrs: Vec<(&str, Literal)>,
    ) -> Vec<Tensor> {
        let mut args: Vec<(String, Arg)> =
            args.into_iter().map(|(k, a)| (k.to_string(), a)).collect();
        args.sort_by(|a, b| a.0.cmp(&b.0));
        let mut operation = Operation {
            op,
            name: name.clone(),
            outputs: Vec::new(),
            args,
            attrs: attrs.into_iter().map(|(k, l)| (k.to_string(), l)).collect(),
        };
        let types = infer_outputs(&self.func, &operation).unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<String> = if types.len() == 1 {
            vec![name]
        } else {
            (0..types.len()).map(|i| format!("{name}_{i}")).collect()
        };
        if names.len() != 1 {
            // The op name of a multi-result op is not a value name; keep it unique too.
            self.claim(&operation.name);
        }
        for n in &names {
            self.claim(n);
        }
        operation.outputs = names
            .iter()
            .zip(&types)
            .map(|(n, t)| Var::new(n.clone(), t.clone()))
            .collect();
        self.func.ops.push(operation);
        names
            .into_iter()
            .zip(types)
            .map(|(name, ty)| Tensor { name, ty })
            .collect()
    }

    fn push1(&mut self, op: Op, name: String, args: Vec<(&str, Arg)>) -> Tensor {
        let mut out = self.push(op, name, args, Vec::new());
        assert_eq!(out.len(), 1, "`{op}` yields {} results", out.len());
        out.pop().expect("one result")
    }

    fn op1(&mut self, op: Op, args: Vec<(&str, Arg)>) -> Tensor {
        let name = self.take_name(op);
        self.push1(op, name, args)
    }

    /// A `const` named `<base>_<key>` holding a parameter of op `base`.
    fn param(&mut self, base: &str, key: &str, lit: Literal) -> Arg {
        let name = format!("{base}_{key}");
        let out = self.push(Op::Const, name, Vec::new(), vec![("val", lit)]);
        out[0].arg()
    }

    fn ints(values: &[usize]) -> Literal {
        Literal::int32s(&values.iter().map(|&v| v as i64).collect::<Vec<_>>())
    }

    // ---- constants -------------------------------------------------------
    /// A `const` op holding `lit` (inline or BLOBFILE).
    pub fn constant(&mut self, lit: Literal) -> Tensor {
        let name = self.take_name(Op::Const);
        let mut out = self.push(Op::Const, name, Vec::new(), vec![("val", lit)]);
        out.pop().expect("const yields one result")
    }
    /// A rank-0 float constant of `dtype` (fp16 values are rounded).
    pub fn scalar(&mut self, dtype: DType, x: f32) -> Tensor {
        self.constant(Literal::floats(dtype, [], vec![x]))
    }
    /// A BLOBFILE constant of type `ty` at record `offset` of `@model_path/weights/<file>`.
    pub fn blob_const(&mut self, ty: TensorType, file: &str, offset: u64) -> Tensor {
        self.constant(Literal::blob(
            ty,
            format!("{}{file}", super::verify::WEIGHTS_PREFIX),
            offset,
        ))
    }

    // ---- elementwise (numpy broadcasting) ---------------------------------
    fn binary(&mut self, op: Op, x: &Tensor, y: &Tensor) -> Tensor {
        self.op1(op, vec![("x", x.arg()), ("y", y.arg())])
    }
    fn unary(&mut self, op: Op, x: &Tensor) -> Tensor {
        self.op1(op, vec![("x", x.arg())])
    }
    pub fn add(&mut self, x: &Tensor, y: &Tensor) -> Tensor {
        self.binary(Op::Add, x, y)
    }
    pub fn sub(&mut self, x: &Tensor, y: &Tensor) -> Tensor {
        self.binary(Op::Sub, x, y)
    }
    pub fn mul(&mut self, x: &Tensor, y: &Tensor) -> Tensor {
        self.binary(Op::Mul, x, y)
    }
    pub fn real_div(&mut self, x: &Tensor, y: &Tensor) -> Tensor {
        self.binary(Op::RealDiv, x, y)
    }
    pub fn maximum(&mut self, x: &Tensor, y: &Tensor) -> Tensor {
        self.binary(Op::Maximum, x, y)
    }
    pub fn minimum(&mut self, x: &Tensor, y: &Tensor) -> Tensor {
        self.binary(Op::Minimum, x, y)
    }
    pub fn pow(&mut self, x: &Tensor, y: &Tensor) -> Tensor {
        self.binary(Op::Pow, x, y)
    }
    pub fn sqrt(&mut self, x: &Tensor) -> Tensor {
        self.unary(Op::Sqrt, x)
    }
    pub fn rsqrt(&mut self, x: &Tensor) -> Tensor {
        self.unary(Op::Rsqrt, x)
    }
    pub fn exp(&mut self, x: &Tensor) -> Tensor {
        self.unary(Op::Exp, x)
    }
    pub fn log(&mut self, x: &Tensor) -> Tensor {
        self.unary(Op::Log, x)
    }
    pub fn tanh(&mut self, x: &Tensor) -> Tensor {
        self.unary(Op::Tanh, x)
    }
    pub fn sigmoid(&mut self, x: &Tensor) -> Tensor {
        self.unary(Op::Sigmoid, x)
    }
    pub fn silu(&mut self, x: &Tensor) -> Tensor {
        self.unary(Op::Silu, x)
    }
    pub fn relu(&mut self, x: &Tensor) -> Tensor {
        self.unary(Op::Relu, x)
    }
    pub fn identity(&mut self, x: &Tensor) -> Tensor {
        self.unary(Op::Identity, x)
    }
    pub fn select(&mut self, cond: &Tensor, a: &Tensor, b: &Tensor) -> Tensor {
        self.op1(
            Op::Select,
            vec![("cond", cond.arg()), ("a", a.arg()), ("b", b.arg())],
        )
    }
    pub fn cast(&mut self, x: &Tensor, dtype: DType) -> Tensor {
        let name = self.take_name(Op::Cast);
        let dtype = self.param(&name, "dtype", Literal::string(dtype.mil_name()));
        self.push1(Op::Cast, name, vec![("dtype", dtype), ("x", x.arg())])
    }

    // ---- reductions and shape ops -----------------------------------------
    pub fn softmax(&mut self, x: &Tensor, axis: i64) -> Tensor {
        let name = self.take_name(Op::Softmax);
        let axis = self.param(&name, "axis", Literal::int32(axis));
        self.push1(Op::Softmax, name, vec![("axis", axis), ("x", x.arg())])
    }
    fn reduce(&mut self, op: Op, x: &Tensor, axes: &[i64], keep_dims: bool) -> Tensor {
        let name = self.take_name(op);
        let axes = self.param(&name, "axes", Literal::int32s(axes));
        let keep_dims = self.param(&name, "keep_dims", Literal::bool(keep_dims));
        self.push1(
            op,
            name,
            vec![("axes", axes), ("keep_dims", keep_dims), ("x", x.arg())],
        )
    }
    pub fn reduce_sum(&mut self, x: &Tensor, axes: &[i64], keep_dims: bool) -> Tensor {
        self.reduce(Op::ReduceSum, x, axes, keep_dims)
    }
    pub fn reduce_mean(&mut self, x: &Tensor, axes: &[i64], keep_dims: bool) -> Tensor {
        self.reduce(Op::ReduceMean, x, axes, keep_dims)
    }
    pub fn reduce_max(&mut self, x: &Tensor, axes: &[i64], keep_dims: bool) -> Tensor {
        self.reduce(Op::ReduceMax, x, axes, keep_dims)
    }
    pub fn reshape(&mut self, x: &Tensor, shape: &[usize]) -> Tensor {
        let name = self.take_name(Op::Reshape);
        let shape = self.param(&name, "shape", Self::ints(shape));
        self.push1(Op::Reshape, name, vec![("shape", shape), ("x", x.arg())])
    }
    pub fn transpose(&mut self, x: &Tensor, perm: &[usize]) -> Tensor {
        let name = self.take_name(Op::Transpose);
        let perm = self.param(&name, "perm", Self::ints(perm));
        self.push1(Op::Transpose, name, vec![("perm", perm), ("x", x.arg())])
    }
    pub fn slice_by_size(&mut self, x: &Tensor, begin: &[usize], size: &[usize]) -> Tensor {
        let name = self.take_name(Op::SliceBySize);
        let begin = self.param(&name, "begin", Self::ints(begin));
        let size = self.param(&name, "size", Self::ints(size));
        self.push1(
            Op::SliceBySize,
            name,
            vec![("begin", begin), ("size", size), ("x", x.arg())],
        )
    }
    pub fn concat(&mut self, values: &[&Tensor], axis: i64) -> Tensor {
        let name = self.take_name(Op::Concat);
        let axis = self.param(&name, "axis", Literal::int32(axis));
        let interleave = self.param(&name, "interleave", Literal::bool(false));
        let values = Arg::Tuple(values.iter().map(|t| t.arg()).collect());
        self.push1(
            Op::Concat,
            name,
            vec![
                ("axis", axis),
                ("interleave", interleave),
                ("values", values),
            ],
        )
    }
    pub fn split(&mut self, x: &Tensor, split_sizes: &[usize], axis: i64) -> Vec<Tensor> {
        let name = self.take_name(Op::Split);
        let axis = self.param(&name, "axis", Literal::int32(axis));
        let sizes = self.param(&name, "split_sizes", Self::ints(split_sizes));
        self.push(
            Op::Split,
            name,
            vec![("axis", axis), ("split_sizes", sizes), ("x", x.arg())],
            Vec::new(),
        )
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
        let name = self.take_name(Op::Matmul);
        let tx = self.param(&name, "transpose_x", Literal::bool(transpose_x));
        let ty = self.param(&name, "transpose_y", Literal::bool(transpose_y));
        self.push1(
            Op::Matmul,
            name,
            vec![
                ("transpose_x", tx),
                ("transpose_y", ty),
                ("x", x.arg()),
                ("y", y.arg()),
            ],
        )
    }
    /// Convolution with `weight` `[OC, IC/groups, KH, KW]`, strides 1, valid padding.
    pub fn conv(&mut self, x: &Tensor, weight: &Tensor, groups: usize) -> Tensor {
        let name = self.take_name(Op::Conv);
        let dilations = self.param(&name, "dilations", Self::ints(&[1, 1]));
        let groups = self.param(&name, "groups", Literal::int32(groups as i64));
        let pad = self.param(&name, "pad", Self::ints(&[0, 0, 0, 0]));
        let pad_type = self.param(&name, "pad_type", Literal::string("valid"));
        let strides = self.param(&name, "strides", Self::ints(&[1, 1]));
        self.push1(
            Op::Conv,
            name,
            vec![
                ("dilations", dilations),
                ("groups", groups),
                ("pad", pad),
                ("pad_type", pad_type),
                ("strides", strides),
                ("weight", weight.arg()),
                ("x", x.arg()),
            ],
        )
    }

    // ---- quantization (per-tensor, zero point 0) ----------------------------
    /// `constexpr_affine_dequantize` of the int8/uint8 BLOBFILE tensor `data_ty` at
    /// record `offset` of `@model_path/weights/<file>`: `q * scale` of `dtype`,
    /// expanded at compile time (the reference's INT8 weight form).
    pub fn affine_dequantize_blob(
        &mut self,
        data_ty: TensorType,
        file: &str,
        offset: u64,
        scale: f32,
        dtype: DType,
    ) -> Tensor {
        let name = self.take_name(Op::ConstexprAffineDequantize);
        let zero_point = Literal::ints(data_ty.dtype, [], vec![0]);
        let path = format!("{}{file}", super::verify::WEIGHTS_PREFIX);
        let attrs = vec![
            ("quantized_data", Literal::blob(data_ty, path, offset)),
            ("zero_point", zero_point),
            ("scale", Literal::floats(dtype, [], vec![scale])),
            ("axis", Literal::int32(0)),
        ];
        let mut out = self.push(Op::ConstexprAffineDequantize, name, Vec::new(), attrs);
        out.pop()
            .expect("constexpr_affine_dequantize yields one result")
    }
    /// `quantize(x / scale)` to `output_dtype` (int8 or uint8), zero point 0.
    pub fn quantize(&mut self, x: &Tensor, scale: f32, output_dtype: DType) -> Tensor {
        let name = self.take_name(Op::Quantize);
        let dtype = self.param(
            &name,
            "output_dtype",
            Literal::string(output_dtype.mil_name()),
        );
        let scale = self.param(&name, "scale", Literal::floats(x.dtype(), [], vec![scale]));
        self.push1(
            Op::Quantize,
            name,
            vec![
                ("input", x.arg()),
                ("output_dtype", dtype),
                ("scale", scale),
            ],
        )
    }
    /// `dequantize`: `q * scale` as `dtype`, zero point 0.
    pub fn dequantize(&mut self, q: &Tensor, scale: f32, dtype: DType) -> Tensor {
        let name = self.take_name(Op::Dequantize);
        let scale = self.param(&name, "scale", Literal::floats(dtype, [], vec![scale]));
        self.push1(
            Op::Dequantize,
            name,
            vec![("input", q.arg()), ("scale", scale)],
        )
    }

    // ---- composites used by the Llama kernels ------------------------------
    /// `[1, IC, 1, S]` x const weight `[OC, IC, 1, 1]` -> `[1, OC, 1, S]` (1x1 conv).
    pub fn linear_conv1x1(&mut self, x: &Tensor, weight: &Tensor) -> Tensor {
        assert!(
            weight.shape().len() == 4 && weight.shape()[2..] == [1, 1],
            "linear_conv1x1: weight `{}` must be [OC, IC, 1, 1], got {:?}",
            weight.name,
            weight.shape()
        );
        self.conv(x, weight, 1)
    }
    /// `y[o, t] = sum_i x[i, t] * m[i, o]` for `x` `[1, IC, 1, S]` and a runtime
    /// matrix `m` `[1, IC, 1, OC]` (the packed-weight form): reshape, transpose,
    /// matmul, transpose back. Result `[1, OC, 1, S]`.
    pub fn linear_dynamic(&mut self, x: &Tensor, m: &Tensor) -> Tensor {
        let (ic, seq) = dims_1c1s("linear_dynamic", x);
        let (mic, oc) = dims_1c1s("linear_dynamic", m);
        assert_eq!(
            ic, mic,
            "linear_dynamic: `{}` has {ic} channels but matrix `{}` has {mic}",
            x.name, m.name
        );
        let x2 = self.reshape(x, &[1, 1, ic, seq]); // (1, 1, IC, S)
        let xt = self.transpose(&x2, &[0, 1, 3, 2]); // (1, 1, S, IC)
        let m2 = self.reshape(m, &[1, 1, ic, oc]); // (1, 1, IC, OC)
        let y = self.matmul(&xt, &m2, false, false); // (1, 1, S, OC)
        let yt = self.transpose(&y, &[0, 1, 3, 2]); // (1, 1, OC, S)
        self.reshape(&yt, &[1, oc, 1, seq])
    }
    /// RMSNorm over channels of `x` `[1, C, 1, S]`: `x * rsqrt(mean_c(x^2) + eps) * weight`
    /// with `weight` `[1, C, 1, 1]` (const or runtime). Built from mul/reduce_sum/add/pow
    /// (`pow(.., -0.5)`, the form the ANE is known to run).
    pub fn rmsnorm(&mut self, x: &Tensor, weight: &Tensor, eps: f32) -> Tensor {
        let (channels, _) = dims_1c1s("rmsnorm", x);
        let dtype = x.dtype();
        let sq = self.mul(x, x); // (1, C, 1, S)
        let ss = self.reduce_sum(&sq, &[1], true); // (1, 1, 1, S)
        let inv_c = self.scalar(dtype, 1.0 / channels as f32);
        let mean = self.mul(&ss, &inv_c);
        let eps = self.scalar(dtype, eps);
        let var = self.add(&mean, &eps);
        let minus_half = self.scalar(dtype, -0.5);
        let rrms = self.pow(&var, &minus_half); // (1, 1, 1, S)
        let xr = self.mul(x, &rrms); // (1, C, 1, S)
        self.mul(&xr, weight)
    }
    /// `[1, H*D, 1, S]` -> `[1, H, S, D]` (reshape + transpose).
    pub fn split_heads(&mut self, x: &Tensor, heads: usize) -> Tensor {
        let (channels, seq) = dims_1c1s("split_heads", x);
        assert!(
            heads > 0 && channels % heads == 0,
            "split_heads: {channels} channels of `{}` do not split into {heads} heads",
            x.name
        );
        let x4 = self.reshape(x, &[1, heads, channels / heads, seq]); // (1, H, D, S)
        self.transpose(&x4, &[0, 1, 3, 2])
    }
    /// `[1, H, S, D]` -> `[1, H*D, 1, S]`.
    pub fn merge_heads(&mut self, x: &Tensor) -> Tensor {
        let [one, heads, seq, head_dim] = x.shape() else {
            panic!(
                "merge_heads: `{}` must be [1, H, S, D], got {:?}",
                x.name,
                x.shape()
            );
        };
        assert_eq!(*one, 1, "merge_heads: `{}` must have batch 1", x.name);
        let (heads, seq, head_dim) = (*heads, *seq, *head_dim);
        let xt = self.transpose(x, &[0, 1, 3, 2]); // (1, H, D, S)
        self.reshape(&xt, &[1, heads * head_dim, 1, seq])
    }
    /// Causal attention per head: `softmax(q k^T * scale + mask) v` for `q`, `k`, `v`
    /// `[1, H, S, D]` and an additive `mask` `[1, 1, S, K]` (0 on and below the
    /// diagonal, -65504 above; `K = S`, or more keys for a padded softmax, see
    /// [`Builder::causal_probs`]). Returns `(out [1,H,S,D], probs [1,H,S,S])`.
    pub fn causal_attention(
        &mut self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        scale: f32,
    ) -> (Tensor, Tensor) {
        let probs = self.causal_probs(q, k, mask, scale); // (1, H, S, S)
        let out = self.matmul(&probs, v, false, false); // (1, H, S, D)
        (out, probs)
    }
    /// The probabilities of causal attention per head, `softmax(q k^T * scale
    /// + mask)` over the keys, `[1, H, S, S]`, for `q`, `k` `[1, H, S, D]` and
    /// an additive `mask` `[1, 1, S, K]`. With `K > S` the softmax runs over
    /// `K` keys (the ANE's kernels pad it to a power of two, rule ANE024):
    /// `k` gets `K - S` zero rows, whose scores the mask sets to -65504 so that
    /// their probabilities are exactly 0, and the probabilities are sliced
    /// back to the `S` real keys.
    pub fn causal_probs(&mut self, q: &Tensor, k: &Tensor, mask: &Tensor, scale: f32) -> Tensor {
        let (heads, seq) = (q.shape()[1], q.shape()[2]);
        let keys = mask.shape()[3];
        assert!(
            keys >= seq && k.shape()[2] == seq,
            "causal_probs: a mask over {keys} keys for {seq} positions of `{}`",
            k.name
        );
        let k = if keys > seq {
            self.zero_rows_below(k, keys - seq)
        } else {
            k.clone()
        };
        let scores = self.matmul(q, &k, false, true); // (1, H, S, K)
        let scale = self.scalar(q.dtype(), scale);
        let scaled = self.mul(&scores, &scale);
        let masked = self.add(&scaled, mask);
        let probs = self.softmax(&masked, -1);
        if keys > seq {
            self.slice_by_size(&probs, &[0, 0, 0, 0], &[1, heads, seq, seq])
        } else {
            probs
        }
    }
    /// `x` `[1, H, S, D]` followed by `rows` zero rows along axis 2: made from
    /// `x`'s own rows times 0 (no constant of the pad's size).
    fn zero_rows_below(&mut self, x: &Tensor, rows: usize) -> Tensor {
        let (heads, seq, width) = (x.shape()[1], x.shape()[2], x.shape()[3]);
        let block = rows.min(seq);
        let part = self.slice_by_size(x, &[0, 0, 0, 0], &[1, heads, block, width]);
        let zero = self.scalar(x.dtype(), 0.0);
        let zeros = self.mul(&part, &zero);
        let mut parts = vec![x.clone()];
        let mut left = rows;
        while left >= block {
            parts.push(zeros.clone());
            left -= block;
        }
        if left > 0 {
            let rest = self.slice_by_size(&zeros, &[0, 0, 0, 0], &[1, heads, left, width]);
            parts.push(rest);
        }
        let refs: Vec<&Tensor> = parts.iter().collect();
        self.concat(&refs, 2)
    }
    // ---- I/O padded to the ANE's rules (`super::layout`) -----------------
    /// Declare input `name` of logical shape `[1, C, H, W]`, padded to
    /// [`layout::padded_io`]. Returns `(input, view)`: the function input and
    /// the `[1, C, H, W]` tensor to compute with (the input itself when no
    /// padding is needed, else a slice of its first rows and columns).
    pub fn padded_input(
        &mut self,
        name: &str,
        dtype: DType,
        shape: [usize; 4],
    ) -> (Tensor, Tensor) {
        let [_, channels, height, width] = shape;
        let (padded_c, padded_w) = layout::padded_io(channels, height, width, dtype);
        if (padded_c, padded_w) == (channels, width) {
            let x = self.input(name, dtype, &shape);
            return (x.clone(), x);
        }
        let x = self.input(name, dtype, &[1, padded_c, height, padded_w]);
        let view = self.slice_by_size(&x, &[0, 0, 0, 0], &shape);
        (x, view)
    }
    /// The single output holding `parts` (`[1, C_i, H, W]`, one dtype) one
    /// after another along channels, padded to [`layout::padded_io`]: the
    /// channel concat repeats the parts until there are enough channels, and
    /// the width is padded with copies of the columns. The last op is named
    /// `name`; with a single part and nothing to pad, that part is returned as
    /// it is (and keeps its name).
    pub fn padded_output(&mut self, parts: &[&Tensor], name: &str) -> Tensor {
        assert!(!parts.is_empty(), "padded_output: no parts");
        let shape = parts[0].shape().to_vec();
        let dtype = parts[0].dtype();
        let (height, width) = (shape[2], shape[3]);
        let channels: usize = parts.iter().map(|p| p.shape()[1]).sum();
        let (padded_c, padded_w) = layout::padded_io(channels, height, width, dtype);
        let copies = padded_c.div_ceil(channels);
        let widen = padded_w > width;
        let mut y = if parts.len() * copies > 1 {
            let repeated: Vec<&Tensor> = (0..copies).flat_map(|_| parts.iter().copied()).collect();
            if !widen {
                self.name_next(name);
            }
            self.concat(&repeated, 1)
        } else {
            parts[0].clone()
        };
        if widen {
            let column_copies = padded_w.div_ceil(width);
            let cut = column_copies * width != padded_w;
            let columns: Vec<&Tensor> = (0..column_copies).map(|_| &y).collect();
            if !cut {
                self.name_next(name);
            }
            let wide = self.concat(&columns, 3);
            y = if cut {
                let rows = wide.shape()[1];
                self.name_next(name);
                self.slice_by_size(&wide, &[0, 0, 0, 0], &[1, rows, height, padded_w])
            } else {
                wide
            };
        }
        y
    }
    /// An inline `[1, 1, S, S]` causal mask constant of `dtype`.
    pub fn causal_mask(&mut self, dtype: DType, seq: usize) -> Tensor {
        let values = (0..seq)
            .flat_map(|t| (0..seq).map(move |t2| if t2 <= t { 0.0 } else { -65504.0 }))
            .collect();
        self.constant(Literal::floats(dtype, [1, 1, seq, seq], values))
    }
}

/// `(C, S)` of a `[1, C, 1, S]` tensor; panics naming `who` otherwise.
fn dims_1c1s(who: &str, t: &Tensor) -> (usize, usize) {
    match t.shape() {
        [1, c, 1, s] => (*c, *s),
        other => panic!("{who}: `{}` must be [1, C, 1, S], got {other:?}", t.name),
    }
}
