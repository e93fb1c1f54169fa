//! Shape and dtype inference for every op in [`Op::ALL`], following the MIL op
//! definitions of coremltools (iOS15 through iOS18 opsets). Given a function
//! and one of its operations, [`infer_outputs`] checks the operands (presence,
//! kind, dtype, shape, constant parameters) and returns the result types.
//! It is the one place operands and parameters are checked: the verifier
//! (MIL001, MIL002 through [`result_mismatches`]) and the CPU backend's
//! lowering call it and trust what it accepts. Unary and binary ops are
//! inferred by their family ([`Category`]), the others op by op; a string
//! parameter with [`choices`](super::op::OpParam::choices) is checked against them.
//!
//! Shapes are static: parameters that decide a shape (axes, perms, reshape
//! shapes, slice bounds, conv hyper-parameters) must be compile-time constants,
//! either inline literals or `const` variables. Where MIL semantics changed
//! between opsets, the newest rule is used (`reshape` with `0` follows iOS17);
//! `verify` warns where an older dialect differs.
//!
//! This module does not check ordering or uniqueness of names, nor anything
//! ANE-specific; that is [`super::verify`].

use std::collections::HashSet;

use super::ir::{Arg, DType, Function, Literal, Operation, TensorType, Value};
use super::op::{Category, Op, ParamKind};
use crate::{Error, Result};

/// Infer the result types of `op`, looking up operand types and constant values
/// in `func` (which holds every statement before `op`).
///
/// Errors are [`Error::Op`] naming the op, its `name` and the operand or parameter at fault.
pub fn infer_outputs(func: &Function, op: &Operation) -> Result<Vec<TensorType>> {
    let results = infer_unchecked(func, op)?;
    // Element and byte counts stay representable for every later consumer,
    // as the parser keeps them for declared types.
    for ty in &results {
        let fits = ty
            .shape
            .iter()
            .try_fold(8usize, |acc, &d| acc.checked_mul(d))
            .is_some();
        if !fits {
            return Err(Error::Op {
                op: op.op.to_string(),
                name: op.name.clone(),
                msg: format!("the result shape {:?} has too many elements", ty.shape),
            });
        }
    }
    Ok(results)
}

fn infer_unchecked(func: &Function, op: &Operation) -> Result<Vec<TensorType>> {
    let cx = Cx { func, op };
    cx.check_params()?;
    match op.op.category() {
        Category::Unary => return cx.unary(),
        Category::Binary => return cx.binary(),
        _ => {}
    }
    match op.op {
        Op::Const => cx.constant(),
        Op::ConstexprAffineDequantize => cx.constexpr_affine_dequantize(),
        Op::Cast => cx.cast(),
        Op::Select => cx.select(),
        Op::Quantize => cx.quantize(),
        Op::Dequantize => cx.dequantize(),
        Op::Softmax => cx.softmax(),
        Op::ReduceSum | Op::ReduceMean | Op::ReduceMax => cx.reduce(),
        Op::Identity => Ok(vec![cx.tensor("x")?]),
        Op::Reshape => cx.reshape(),
        Op::Transpose => cx.transpose(),
        Op::SliceBySize => cx.slice_by_size(),
        Op::Concat => cx.concat(),
        Op::Split => cx.split(),
        Op::Matmul => cx.matmul(),
        Op::Conv => cx.conv(),
        Op::ScaledDotProductAttention => cx.sdpa(),
        unary_or_binary => unreachable!("`{unary_or_binary}` is inferred by its category"),
    }
}

/// How the declared result types of `op` differ from the `inferred` ones,
/// one message per difference (empty when they agree).
pub fn result_mismatches(op: &Operation, inferred: &[TensorType]) -> Vec<String> {
    if op.outputs.len() != inferred.len() {
        return vec![format!(
            "declares {} results but the op yields {}",
            op.outputs.len(),
            inferred.len()
        )];
    }
    op.outputs
        .iter()
        .zip(inferred)
        .filter(|(var, ty)| var.ty != **ty)
        .map(|(var, ty)| format!("result `{}` is declared {} but is {ty}", var.name, var.ty))
        .collect()
}

/// NumPy broadcasting of two shapes: align right, each pair of dims equal or one of them 1.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let dim = |s: &[usize], i: usize| {
        let pad = rank - s.len();
        if i < pad { 1 } else { s[i - pad] }
    };
    (0..rank)
        .map(|i| match (dim(a, i), dim(b, i)) {
            (x, y) if x == y => Some(x),
            (1, y) => Some(y),
            (x, 1) => Some(x),
            _ => None,
        })
        .collect()
}

/// Normalize a possibly negative axis into `0..rank`.
pub fn normalize_axis(axis: i64, rank: usize) -> Option<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    (0..r).contains(&a).then_some(a as usize)
}

const FLOAT: &[DType] = &[DType::Fp16, DType::Fp32];
const NUMERIC: &[DType] = &[DType::Fp16, DType::Fp32, DType::Int32];
const QUANTIZED: &[DType] = &[DType::Int8, DType::Uint8];

fn dtype_list(dtypes: &[DType]) -> String {
    dtypes
        .iter()
        .map(|d| d.mil_name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// One op being inferred, with the function it lives in.
struct Cx<'a> {
    func: &'a Function,
    op: &'a Operation,
}

impl<'a> Cx<'a> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::Op {
            op: self.op.op.mil_name().to_string(),
            name: self.op.name.clone(),
            msg: msg.into(),
        }
    }

    /// Every argument names a parameter of the op in the right form; required ones are present.
    fn check_params(&self) -> Result<()> {
        let kind = self.op.op;
        let mut seen = HashSet::new();
        for (key, arg) in &self.op.args {
            if !seen.insert(key.as_str()) {
                return Err(self.err(format!("parameter `{key}` is given twice")));
            }
            let Some(param) = kind.param(key) else {
                let names: Vec<_> = kind.params().iter().map(|p| p.name).collect();
                return Err(self.err(format!(
                    "unknown parameter `{key}` (expected one of: {})",
                    names.join(", ")
                )));
            };
            match (param.kind, arg) {
                (ParamKind::Attr, _) => {
                    return Err(self.err(format!(
                        "parameter `{key}` belongs in the attribute block, not the call"
                    )));
                }
                (ParamKind::Tuple, Arg::Tuple(_)) => {}
                (ParamKind::Tuple, _) => {
                    return Err(self.err(format!(
                        "parameter `{key}` must be a tuple of tensors `(a, b, ...)`"
                    )));
                }
                (_, Arg::Tuple(_)) => {
                    return Err(self.err(format!("parameter `{key}` must not be a tuple")));
                }
                (ParamKind::Const | ParamKind::ConstTensor, Arg::Var(name))
                    if !self.is_constant(name) =>
                {
                    return Err(self.err(format!(
                        "parameter `{key}` must be a compile-time constant, but `{name}` is not defined by a `const` op"
                    )));
                }
                _ => {}
            }
        }
        for (key, _) in &self.op.attrs {
            let known = match kind {
                Op::Const => key == "val",
                _ => kind.param(key).is_some_and(|p| p.kind == ParamKind::Attr),
            };
            if !known {
                return Err(self.err(format!("unknown attribute `{key}`")));
            }
            if !seen.insert(key.as_str()) {
                return Err(self.err(format!("parameter `{key}` is given twice")));
            }
        }
        for param in kind.params().iter().filter(|p| !p.choices.is_empty()) {
            if let Some(value) = self.string(param.name)?
                && !param.choices.contains(&value)
            {
                return Err(self.err(format!(
                    "parameter `{}`: \"{value}\" is not one of {}",
                    param.name,
                    param.choices.join(", ")
                )));
            }
        }
        if kind == Op::Const && self.op.attr("val").is_none() {
            return Err(self.err("missing attribute `val`"));
        }
        for param in kind.params().iter().filter(|p| p.required) {
            if !seen.contains(param.name) {
                return Err(self.err(format!("missing required parameter `{}`", param.name)));
            }
        }
        Ok(())
    }

    /// Whether `name` is the result of a constant op (`const`, `constexpr_*`).
    fn is_constant(&self, name: &str) -> bool {
        self.func
            .ops
            .iter()
            .any(|o| o.op.is_constant() && o.outputs.iter().any(|v| v.name == name))
    }

    fn arg_type(&self, param: &str, arg: &Arg) -> Result<TensorType> {
        match arg {
            Arg::Var(name) => {
                self.func.var_type(name).cloned().ok_or_else(|| {
                    self.err(format!("operand `{param}`: unknown variable `{name}`"))
                })
            }
            Arg::Lit(lit) => Ok(lit.ty.clone()),
            Arg::Tuple(_) => Err(self.err(format!("parameter `{param}` must not be a tuple"))),
        }
    }

    fn opt_tensor(&self, param: &str) -> Result<Option<TensorType>> {
        match self.op.arg(param) {
            Some(arg) => self.arg_type(param, arg).map(Some),
            None => Ok(None),
        }
    }

    fn tensor(&self, param: &str) -> Result<TensorType> {
        self.opt_tensor(param)?
            .ok_or_else(|| self.err(format!("missing required parameter `{param}`")))
    }

    /// A tensor operand whose dtype must be one of `dtypes`.
    fn typed(&self, param: &str, dtypes: &[DType]) -> Result<TensorType> {
        let ty = self.tensor(param)?;
        self.check_dtype(param, &ty, dtypes)?;
        Ok(ty)
    }

    fn check_dtype(&self, param: &str, ty: &TensorType, dtypes: &[DType]) -> Result<()> {
        if dtypes.contains(&ty.dtype) {
            Ok(())
        } else {
            Err(self.err(format!(
                "operand `{param}`: dtype {} is not supported (expected one of: {})",
                ty.dtype,
                dtype_list(dtypes)
            )))
        }
    }

    fn same_dtype(
        &self,
        param: &str,
        ty: &TensorType,
        other: &str,
        oty: &TensorType,
    ) -> Result<()> {
        if ty.dtype == oty.dtype {
            Ok(())
        } else {
            Err(self.err(format!(
                "operand `{param}`: dtype {} differs from `{other}` dtype {}",
                ty.dtype, oty.dtype
            )))
        }
    }

    /// The literal behind a constant parameter (inline, a `const` variable, or an attribute).
    fn literal(&self, param: &str) -> Result<Option<&'a Literal>> {
        if let Some(lit) = self.op.attr(param) {
            return Ok(Some(lit));
        }
        match self.op.arg(param) {
            None => Ok(None),
            Some(Arg::Lit(lit)) => Ok(Some(lit)),
            Some(Arg::Var(name)) => self.func.const_value(name).map(Some).ok_or_else(|| {
                self.err(format!(
                    "parameter `{param}` must be a compile-time constant, but `{name}` is not defined by a `const` op"
                ))
            }),
            Some(Arg::Tuple(_)) => Err(self.err(format!("parameter `{param}` must not be a tuple"))),
        }
    }

    fn int_values(&self, param: &str, lit: &Literal) -> Result<Vec<i64>> {
        if lit.ty.dtype != DType::Int32 {
            return Err(self.err(format!("parameter `{param}` must be int32, got {}", lit.ty)));
        }
        lit.as_ints()
            .map(<[i64]>::to_vec)
            .ok_or_else(|| self.err(format!("parameter `{param}` must be an inline int32 value")))
    }

    /// A rank-1 int32 constant (axes, perm, shape, begin, ...).
    fn ints(&self, param: &str) -> Result<Option<Vec<i64>>> {
        let Some(lit) = self.literal(param)? else {
            return Ok(None);
        };
        if lit.ty.rank() != 1 {
            return Err(self.err(format!(
                "parameter `{param}` must be a rank-1 int32 tensor, got {}",
                lit.ty
            )));
        }
        self.int_values(param, lit).map(Some)
    }

    /// A scalar int32 constant (axis, groups, num_splits).
    fn int(&self, param: &str) -> Result<Option<i64>> {
        let Some(lit) = self.literal(param)? else {
            return Ok(None);
        };
        if !lit.ty.is_scalar() {
            return Err(self.err(format!(
                "parameter `{param}` must be a scalar int32, got {}",
                lit.ty
            )));
        }
        Ok(self.int_values(param, lit)?.first().copied())
    }

    fn bool(&self, param: &str) -> Result<Option<bool>> {
        let Some(lit) = self.literal(param)? else {
            return Ok(None);
        };
        match (lit.ty.is_scalar(), lit.as_bool()) {
            (true, Some(b)) => Ok(Some(b)),
            _ => Err(self.err(format!(
                "parameter `{param}` must be a scalar bool, got {}",
                lit.ty
            ))),
        }
    }

    fn string(&self, param: &str) -> Result<Option<&'a str>> {
        let Some(lit) = self.literal(param)? else {
            return Ok(None);
        };
        match (lit.ty.is_scalar(), lit.as_str()) {
            (true, Some(s)) => Ok(Some(s)),
            _ => Err(self.err(format!(
                "parameter `{param}` must be a string, got {}",
                lit.ty
            ))),
        }
    }

    fn axis(&self, param: &str, axis: i64, rank: usize) -> Result<usize> {
        normalize_axis(axis, rank).ok_or_else(|| {
            self.err(format!(
                "parameter `{param}`: axis {axis} is out of range for rank {rank} (expected {}..{rank})",
                -(rank as i64)
            ))
        })
    }

    // ---- ops ----------------------------------------------------------------

    fn constant(&self) -> Result<Vec<TensorType>> {
        let lit = self.op.attr("val").expect("checked by check_params");
        let count = match &lit.value {
            Value::Float(v) => Some(v.len()),
            Value::Int(v) => Some(v.len()),
            Value::Bool(v) => Some(v.len()),
            Value::Str(v) => Some(v.len()),
            Value::Blob(_) => None,
        };
        if let Some(count) = count
            && count != lit.ty.numel()
        {
            return Err(self.err(format!(
                "attribute `val`: {count} values for type {} ({} expected)",
                lit.ty,
                lit.ty.numel()
            )));
        }
        Ok(vec![lit.ty.clone()])
    }

    fn cast(&self) -> Result<Vec<TensorType>> {
        const CASTABLE: &[DType] = &[
            DType::Fp16,
            DType::Fp32,
            DType::Int8,
            DType::Uint8,
            DType::Int32,
            DType::Bool,
        ];
        let x = self.typed("x", CASTABLE)?;
        let name = self.string("dtype")?.expect("required");
        let dtype = DType::from_mil_name(name)
            .filter(|d| CASTABLE.contains(d))
            .ok_or_else(|| {
                self.err(format!(
                    "parameter `dtype`: cannot cast to \"{name}\" (expected one of: {})",
                    dtype_list(CASTABLE)
                ))
            })?;
        Ok(vec![TensorType::new(dtype, x.shape)])
    }

    fn binary(&self) -> Result<Vec<TensorType>> {
        let x = self.typed("x", NUMERIC)?;
        let y = self.tensor("y")?;
        self.same_dtype("y", &y, "x", &x)?;
        let shape = broadcast_shapes(&x.shape, &y.shape).ok_or_else(|| {
            self.err(format!(
                "operand `y`: shape {:?} does not broadcast with `x` shape {:?}",
                y.shape, x.shape
            ))
        })?;
        Ok(vec![TensorType::new(x.dtype, shape)])
    }

    fn unary(&self) -> Result<Vec<TensorType>> {
        let x = self.typed("x", FLOAT)?;
        if let Some(eps) = self.literal("epsilon")?
            && (!eps.ty.is_scalar() || eps.ty.dtype != x.dtype)
        {
            return Err(self.err(format!(
                "parameter `epsilon` must be a scalar {} like `x`, got {}",
                x.dtype, eps.ty
            )));
        }
        Ok(vec![x])
    }

    fn softmax(&self) -> Result<Vec<TensorType>> {
        let x = self.typed("x", FLOAT)?;
        let axis = self.int("axis")?.unwrap_or(-1);
        self.axis("axis", axis, x.rank())?;
        Ok(vec![x])
    }

    fn reduce(&self) -> Result<Vec<TensorType>> {
        let x = self.typed("x", NUMERIC)?;
        let keep_dims = self.bool("keep_dims")?.unwrap_or(false);
        let axes = match self.ints("axes")? {
            Some(axes) => {
                let mut normalized = Vec::new();
                for a in axes {
                    let n = self.axis("axes", a, x.rank())?;
                    if normalized.contains(&n) {
                        return Err(self.err(format!("parameter `axes`: axis {a} is repeated")));
                    }
                    normalized.push(n);
                }
                normalized
            }
            None => (0..x.rank()).collect(),
        };
        let shape = x
            .shape
            .iter()
            .enumerate()
            .filter_map(|(i, &d)| match (axes.contains(&i), keep_dims) {
                (false, _) => Some(d),
                (true, true) => Some(1),
                (true, false) => None,
            })
            .collect::<Vec<_>>();
        Ok(vec![TensorType::new(x.dtype, shape)])
    }

    fn reshape(&self) -> Result<Vec<TensorType>> {
        let x = self.tensor("x")?;
        let spec = self.ints("shape")?.expect("required");
        if spec.iter().filter(|&&d| d == -1).count() > 1 {
            return Err(self.err(format!("parameter `shape`: {spec:?} has more than one -1")));
        }
        if let Some(bad) = spec.iter().find(|&&d| d < -1) {
            return Err(self.err(format!(
                "parameter `shape`: {spec:?} has invalid dimension {bad}"
            )));
        }
        // iOS17 rule: a 0 copies the dimension of `x` at the same position counted from
        // the right, or 1 when `x` has no such dimension.
        let n = spec.len();
        let mut shape: Vec<Option<usize>> = spec
            .iter()
            .enumerate()
            .map(|(i, &d)| match d {
                -1 => None,
                0 => {
                    let from_right = n - i;
                    Some(if from_right <= x.rank() {
                        x.shape[x.rank() - from_right]
                    } else {
                        1
                    })
                }
                d => Some(d as usize),
            })
            .collect();
        let known: usize = shape.iter().flatten().product();
        let total = x.numel();
        if let Some(slot) = shape.iter_mut().find(|d| d.is_none()) {
            if known == 0 || total % known != 0 {
                return Err(self.err(format!(
                    "parameter `shape`: {spec:?} cannot hold the {total} elements of `x` shape {:?}",
                    x.shape
                )));
            }
            *slot = Some(total / known);
        }
        let shape: Vec<usize> = shape.into_iter().flatten().collect();
        if shape.iter().product::<usize>() != total {
            return Err(self.err(format!(
                "parameter `shape`: {spec:?} has {} elements but `x` shape {:?} has {total}",
                shape.iter().product::<usize>(),
                x.shape
            )));
        }
        Ok(vec![TensorType::new(x.dtype, shape)])
    }

    fn transpose(&self) -> Result<Vec<TensorType>> {
        let x = self.tensor("x")?;
        let perm = self.ints("perm")?.expect("required");
        if perm.len() != x.rank() {
            return Err(self.err(format!(
                "parameter `perm`: {perm:?} has {} entries but `x` has rank {}",
                perm.len(),
                x.rank()
            )));
        }
        let mut seen = vec![false; x.rank()];
        let mut shape = Vec::with_capacity(x.rank());
        for &p in &perm {
            let axis = self.axis("perm", p, x.rank())?;
            if std::mem::replace(&mut seen[axis], true) {
                return Err(self.err(format!("parameter `perm`: {perm:?} is not a permutation")));
            }
            shape.push(x.shape[axis]);
        }
        Ok(vec![TensorType::new(x.dtype, shape)])
    }

    fn slice_by_size(&self) -> Result<Vec<TensorType>> {
        let x = self.tensor("x")?;
        let begin = self.ints("begin")?.expect("required");
        let size = self.ints("size")?.expect("required");
        for (param, v) in [("begin", &begin), ("size", &size)] {
            if v.len() != x.rank() {
                return Err(self.err(format!(
                    "parameter `{param}`: {v:?} has {} entries but `x` has rank {}",
                    v.len(),
                    x.rank()
                )));
            }
        }
        let mut shape = Vec::with_capacity(x.rank());
        for (i, (&b, &s)) in begin.iter().zip(&size).enumerate() {
            let dim = x.shape[i] as i64;
            let b = if b < 0 { b + dim } else { b };
            if !(0..dim).contains(&b) {
                return Err(self.err(format!(
                    "parameter `begin`: {begin:?} is out of range at axis {i} for `x` shape {:?}",
                    x.shape
                )));
            }
            let s = match s {
                -1 => dim - b,
                s if s >= 1 && b + s <= dim => s,
                _ => {
                    return Err(self.err(format!(
                        "parameter `size`: {size:?} does not fit at axis {i} (begin {b}, `x` shape {:?}); sizes are >= 1 or -1 for \"to the end\"",
                        x.shape
                    )));
                }
            };
            shape.push(s as usize);
        }
        Ok(vec![TensorType::new(x.dtype, shape)])
    }

    fn concat(&self) -> Result<Vec<TensorType>> {
        let Some(Arg::Tuple(values)) = self.op.arg("values") else {
            return Err(self.err("parameter `values` must be a tuple of tensors"));
        };
        let types = values
            .iter()
            .map(|v| self.arg_type("values", v))
            .collect::<Result<Vec<_>>>()?;
        let Some(first) = types.first() else {
            return Err(self.err("parameter `values` is empty"));
        };
        if first.rank() == 0 {
            return Err(self.err("operand `values`: scalars cannot be concatenated"));
        }
        let axis = self.int("axis")?.expect("required");
        let axis = self.axis("axis", axis, first.rank())?;
        let interleave = self.bool("interleave")?.unwrap_or(false);
        let mut shape = first.shape.clone();
        for (i, ty) in types.iter().enumerate().skip(1) {
            if ty.dtype != first.dtype {
                return Err(self.err(format!(
                    "operand `values[{i}]`: dtype {} differs from `values[0]` dtype {}",
                    ty.dtype, first.dtype
                )));
            }
            let fits = ty.rank() == first.rank()
                && (0..ty.rank())
                    .all(|d| ty.shape[d] == first.shape[d] || (d == axis && !interleave));
            if !fits {
                return Err(self.err(format!(
                    "operand `values[{i}]`: shape {:?} does not fit `values[0]` shape {:?} for concatenation along axis {axis}{}",
                    ty.shape,
                    first.shape,
                    if interleave { " with interleave (shapes must be equal)" } else { "" }
                )));
            }
            shape[axis] += ty.shape[axis];
        }
        Ok(vec![TensorType::new(first.dtype, shape)])
    }

    fn split(&self) -> Result<Vec<TensorType>> {
        let x = self.tensor("x")?;
        let axis_value = self.int("axis")?.expect("required");
        let axis = self.axis("axis", axis_value, x.rank())?;
        let dim = x.shape[axis];
        let num_splits = self.int("num_splits")?;
        let sizes: Vec<usize> = match (self.ints("split_sizes")?, num_splits) {
            (None, None) => {
                return Err(self.err("one of `num_splits` or `split_sizes` is required"));
            }
            (Some(sizes), n) => {
                if let Some(n) = n
                    && n != sizes.len() as i64
                {
                    return Err(self.err(format!(
                        "parameter `num_splits`: {n} differs from the {} entries of `split_sizes`",
                        sizes.len()
                    )));
                }
                let sum: i64 = sizes.iter().sum();
                if sizes.is_empty() || sizes.iter().any(|&s| s < 1) || sum != dim as i64 {
                    return Err(self.err(format!(
                        "parameter `split_sizes`: {sizes:?} must be positive and sum to {dim}, the size of `x` shape {:?} at axis {axis_value}",
                        x.shape
                    )));
                }
                sizes.iter().map(|&s| s as usize).collect()
            }
            (None, Some(n)) => {
                if n < 1 || dim % n as usize != 0 {
                    return Err(self.err(format!(
                        "parameter `num_splits`: {n} does not divide {dim}, the size of `x` shape {:?} at axis {axis_value}",
                        x.shape
                    )));
                }
                vec![dim / n as usize; n as usize]
            }
        };
        Ok(sizes
            .into_iter()
            .map(|s| {
                let mut shape = x.shape.clone();
                shape[axis] = s;
                TensorType::new(x.dtype, shape)
            })
            .collect())
    }

    fn select(&self) -> Result<Vec<TensorType>> {
        let cond = self.typed("cond", &[DType::Bool])?;
        let a = self.typed("a", &[DType::Fp16, DType::Fp32, DType::Int32, DType::Bool])?;
        let b = self.tensor("b")?;
        self.same_dtype("b", &b, "a", &a)?;
        let ab = broadcast_shapes(&a.shape, &b.shape).ok_or_else(|| {
            self.err(format!(
                "operand `b`: shape {:?} does not broadcast with `a` shape {:?}",
                b.shape, a.shape
            ))
        })?;
        let shape = broadcast_shapes(&cond.shape, &ab).ok_or_else(|| {
            self.err(format!(
                "operand `cond`: shape {:?} does not broadcast with `a`/`b` shape {ab:?}",
                cond.shape
            ))
        })?;
        Ok(vec![TensorType::new(a.dtype, shape)])
    }

    fn matmul(&self) -> Result<Vec<TensorType>> {
        let x = self.typed("x", NUMERIC)?;
        let y = self.tensor("y")?;
        self.same_dtype("y", &y, "x", &x)?;
        let transpose_x = self.bool("transpose_x")?.unwrap_or(false);
        let transpose_y = self.bool("transpose_y")?.unwrap_or(false);
        for (param, ty) in [("x", &x), ("y", &y)] {
            if ty.rank() == 0 {
                return Err(self.err(format!(
                    "operand `{param}`: matmul needs rank >= 1, got a scalar"
                )));
            }
        }
        if x.rank() == 1 && transpose_x {
            return Err(self.err("parameter `transpose_x`: `x` is rank 1 and cannot be transposed"));
        }
        // Rank-1 operands are promoted (x: prepend 1, y: append 1) and the
        // inserted dimension is removed from the result.
        let mut xs = x.shape.clone();
        let mut ys = y.shape.clone();
        if xs.len() == 1 {
            xs.insert(0, 1);
        } else if transpose_x {
            let n = xs.len();
            xs.swap(n - 1, n - 2);
        }
        if ys.len() == 1 {
            ys.push(1);
        } else if transpose_y {
            let n = ys.len();
            ys.swap(n - 1, n - 2);
        }
        let (m, k) = (xs[xs.len() - 2], xs[xs.len() - 1]);
        let (k2, n) = (ys[ys.len() - 2], ys[ys.len() - 1]);
        if k != k2 {
            return Err(self.err(format!(
                "operand `y`: shape {:?}{} has inner dimension {k2} but `x` shape {:?}{} has {k}",
                y.shape,
                if transpose_y { " (transposed)" } else { "" },
                x.shape,
                if transpose_x { " (transposed)" } else { "" },
            )));
        }
        let batch =
            broadcast_shapes(&xs[..xs.len() - 2], &ys[..ys.len() - 2]).ok_or_else(|| {
                self.err(format!(
                "operand `y`: batch dimensions of shape {:?} do not broadcast with `x` shape {:?}",
                y.shape, x.shape
            ))
            })?;
        let mut shape = batch;
        if x.rank() > 1 {
            shape.push(m);
        }
        if y.rank() > 1 {
            shape.push(n);
        }
        Ok(vec![TensorType::new(x.dtype, shape)])
    }

    fn conv(&self) -> Result<Vec<TensorType>> {
        let x = self.typed("x", FLOAT)?;
        let w = self.tensor("weight")?;
        self.same_dtype("weight", &w, "x", &x)?;
        // Two spatial axes, or one (a 1-D convolution).
        let spatial = match (x.rank(), w.rank()) {
            (4, 4) => 2,
            (3, 3) => 1,
            (4, _) => {
                return Err(self.err(format!(
                    "operand `weight`: needs rank 4 [OC, IC/groups, KH, KW], got shape {:?}",
                    w.shape
                )));
            }
            _ => {
                return Err(self.err(format!(
                    "operand `x`: conv needs a rank-4 [N, C, H, W] input (or a rank-3 [N, C, W] one with a rank-3 weight), got shape {:?}",
                    x.shape
                )));
            }
        };
        let groups = self.int("groups")?.unwrap_or(1);
        let (c_in, c_out) = (x.shape[1], w.shape[0]);
        if groups < 1 || c_in % groups as usize != 0 || c_out % groups as usize != 0 {
            return Err(self.err(format!(
                "parameter `groups`: {groups} must be >= 1 and divide both the {c_in} input channels of `x` and the {c_out} output channels of `weight`"
            )));
        }
        let groups = groups as usize;
        if w.shape[1] != c_in / groups {
            return Err(self.err(format!(
                "operand `weight`: shape {:?} needs dimension 1 = input channels / groups = {c_in} / {groups} = {}",
                w.shape,
                c_in / groups
            )));
        }
        if let Some(bias) = self.opt_tensor("bias")? {
            self.same_dtype("bias", &bias, "x", &x)?;
            if bias.shape != [c_out] {
                return Err(self.err(format!(
                    "operand `bias`: shape {:?} must be [{c_out}], one value per output channel",
                    bias.shape
                )));
            }
        }
        let list = |param: &str, len: usize, min: i64, default: usize| -> Result<Vec<usize>> {
            match self.ints(param)? {
                None => Ok(vec![default; len]),
                Some(v) if v.len() == len && v.iter().all(|&s| s >= min) => {
                    Ok(v.iter().map(|&s| s as usize).collect())
                }
                Some(v) => Err(self.err(format!(
                    "parameter `{param}`: {v:?} must hold {len} values >= {min}"
                ))),
            }
        };
        let strides = list("strides", spatial, 1, 1)?;
        let dilations = list("dilations", spatial, 1, 1)?;
        let pad = list("pad", 2 * spatial, 0, 0)?;
        let pad_type = self.string("pad_type")?.unwrap_or("valid");
        let mut shape = vec![x.shape[0], c_out];
        for d in 0..spatial {
            let input = x.shape[2 + d];
            if w.shape[2 + d] == 0 || input == 0 {
                return Err(self.err(format!(
                    "operand `{}`: spatial axis {d} has size 0 (weight shape {:?}, x shape {:?})",
                    if input == 0 { "x" } else { "weight" },
                    w.shape,
                    x.shape
                )));
            }
            let stride = strides[d];
            // Sizes from hyper-parameters are checked: a huge dilation or pad
            // is an error, not a wrapped size.
            let too_large = || {
                self.err(format!(
                    "parameters `dilations`, `strides` or `pad` at spatial axis {d} give sizes \
                     too large to represent"
                ))
            };
            let kernel = (w.shape[2 + d] - 1)
                .checked_mul(dilations[d])
                .and_then(|k| k.checked_add(1))
                .ok_or_else(too_large)?;
            // Total padding along the axis, as in coremltools' `aggregated_pad`.
            let total_pad = match pad_type {
                "valid" => 0,
                "custom" => pad[2 * d]
                    .checked_add(pad[2 * d + 1])
                    .ok_or_else(too_large)?,
                "same" | "same_lower" => stride
                    .checked_mul(input.div_ceil(stride))
                    .and_then(|n| n.checked_add(kernel))
                    .ok_or_else(too_large)?
                    .saturating_sub(input + stride),
                other => unreachable!("pad_type \"{other}\" passed check_params"),
            };
            let padded = input.checked_add(total_pad).ok_or_else(too_large)?;
            if padded < kernel {
                return Err(self.err(format!(
                    "operand `weight`: dilated kernel size {kernel} exceeds the padded input size {padded} at spatial axis {d}"
                )));
            }
            shape.push((padded - kernel) / stride + 1);
        }
        Ok(vec![TensorType::new(x.dtype, shape)])
    }

    /// Checks shared by the quantization ops: `scale`/`zero_point` are scalars, or
    /// vectors along `axis` of `data` (with `axis` given exactly when they are vectors
    /// unless `axis_required`).
    fn quant_params(
        &self,
        data_param: &str,
        data: &TensorType,
        scale: &TensorType,
        zero_point: Option<&TensorType>,
        axis_required: bool,
    ) -> Result<()> {
        let axis = self.int("axis")?;
        let axis = match axis {
            Some(a) => Some(self.axis("axis", a, data.rank())?),
            None => None,
        };
        for (param, ty) in
            std::iter::once(("scale", scale)).chain(zero_point.map(|z| ("zero_point", z)))
        {
            match ty.rank() {
                0 => {
                    if axis.is_some() && !axis_required {
                        return Err(self.err(format!(
                            "parameter `axis` must be omitted when `{param}` is a scalar"
                        )));
                    }
                }
                1 => {
                    let Some(axis) = axis else {
                        return Err(self.err(format!(
                            "parameter `axis` is required when `{param}` is a vector"
                        )));
                    };
                    if ty.shape[0] != data.shape[axis] {
                        return Err(self.err(format!(
                            "parameter `{param}`: {} values but `{data_param}` shape {:?} has {} at axis {axis}",
                            ty.shape[0], data.shape, data.shape[axis]
                        )));
                    }
                }
                _ => {
                    return Err(self.err(format!(
                        "parameter `{param}` must be a scalar or a vector, got {ty}"
                    )));
                }
            }
        }
        if let Some(z) = zero_point
            && z.rank() != scale.rank()
        {
            return Err(self.err(
                "parameters `scale` and `zero_point` must both be scalars or both be vectors",
            ));
        }
        Ok(())
    }

    fn const_type(&self, param: &str) -> Result<Option<TensorType>> {
        Ok(self.literal(param)?.map(|l| l.ty.clone()))
    }

    fn check_nonzero_scale(&self) -> Result<()> {
        if let Some(values) = self.literal("scale")?.and_then(Literal::as_floats)
            && values.contains(&0.0)
        {
            return Err(self.err("parameter `scale` must not contain 0"));
        }
        Ok(())
    }

    fn constexpr_affine_dequantize(&self) -> Result<Vec<TensorType>> {
        let data = self.const_type("quantized_data")?.expect("required");
        let scale = self.const_type("scale")?.expect("required");
        let zero_point = self.const_type("zero_point")?.expect("required");
        self.check_dtype("quantized_data", &data, QUANTIZED)?;
        self.check_dtype("scale", &scale, FLOAT)?;
        if zero_point.dtype != data.dtype && zero_point.dtype != DType::Fp32 {
            return Err(self.err(format!(
                "parameter `zero_point`: dtype {} must be fp32 or the dtype of `quantized_data` ({})",
                zero_point.dtype, data.dtype
            )));
        }
        if data.rank() == 0 {
            return Err(self.err("parameter `quantized_data` must have rank >= 1"));
        }
        self.quant_params("quantized_data", &data, &scale, Some(&zero_point), true)?;
        Ok(vec![TensorType::new(scale.dtype, data.shape)])
    }

    fn quantize(&self) -> Result<Vec<TensorType>> {
        let input = self.typed("input", FLOAT)?;
        let scale = self.const_type("scale")?.expect("required");
        self.same_dtype("scale", &scale, "input", &input)?;
        self.check_nonzero_scale()?;
        let name = self.string("output_dtype")?.expect("required");
        let dtype = DType::from_mil_name(name)
            .filter(|d| QUANTIZED.contains(d))
            .ok_or_else(|| {
                self.err(format!(
                    "parameter `output_dtype`: \"{name}\" is not one of int8, uint8"
                ))
            })?;
        let zero_point = self.const_type("zero_point")?;
        if let Some(z) = &zero_point
            && z.dtype != dtype
        {
            return Err(self.err(format!(
                "parameter `zero_point`: dtype {} differs from `output_dtype` {dtype}",
                z.dtype
            )));
        }
        self.quant_params("input", &input, &scale, zero_point.as_ref(), false)?;
        Ok(vec![TensorType::new(dtype, input.shape)])
    }

    fn dequantize(&self) -> Result<Vec<TensorType>> {
        let input = self.typed("input", QUANTIZED)?;
        let scale = self.const_type("scale")?.expect("required");
        self.check_dtype("scale", &scale, FLOAT)?;
        let zero_point = self.const_type("zero_point")?;
        if let Some(z) = &zero_point {
            self.same_dtype("zero_point", z, "input", &input)?;
        }
        self.quant_params("input", &input, &scale, zero_point.as_ref(), false)?;
        Ok(vec![TensorType::new(scale.dtype, input.shape)])
    }

    fn sdpa(&self) -> Result<Vec<TensorType>> {
        let q = self.typed("query", FLOAT)?;
        let k = self.tensor("key")?;
        let v = self.tensor("value")?;
        self.same_dtype("key", &k, "query", &q)?;
        self.same_dtype("value", &v, "query", &q)?;
        if q.rank() < 3 || k.rank() != q.rank() || v.rank() != q.rank() {
            return Err(self.err(format!(
                "operands `query`, `key`, `value` need one rank >= 3, got shapes {:?}, {:?}, {:?}",
                q.shape, k.shape, v.shape
            )));
        }
        let r = q.rank();
        if k.shape[..r - 2] != q.shape[..r - 2] || v.shape[..r - 2] != q.shape[..r - 2] {
            return Err(self.err(format!(
                "operands `key`/`value`: batch dimensions of shapes {:?}, {:?} differ from `query` shape {:?}",
                k.shape, v.shape, q.shape
            )));
        }
        if k.shape[r - 1] != q.shape[r - 1] {
            return Err(self.err(format!(
                "operand `key`: shape {:?} has embedding size {} but `query` shape {:?} has {}",
                k.shape,
                k.shape[r - 1],
                q.shape,
                q.shape[r - 1]
            )));
        }
        if v.shape[r - 2] != k.shape[r - 2] {
            return Err(self.err(format!(
                "operand `value`: shape {:?} has sequence length {} but `key` shape {:?} has {}",
                v.shape,
                v.shape[r - 2],
                k.shape,
                k.shape[r - 2]
            )));
        }
        if let Some(mask) = self.opt_tensor("attn_mask")? {
            self.check_dtype("attn_mask", &mask, &[DType::Bool, DType::Fp16, DType::Fp32])?;
            let fits = mask.rank() >= 1
                && mask.shape[mask.rank() - 1] == k.shape[r - 2]
                && broadcast_shapes(&q.shape[..r - 1], &mask.shape[..mask.rank() - 1])
                    .is_some_and(|s| s == q.shape[..r - 1]);
            if !fits {
                return Err(self.err(format!(
                    "operand `attn_mask`: shape {:?} does not broadcast to [..., L, S] = {:?}",
                    mask.shape,
                    [&q.shape[..r - 1], &k.shape[r - 2..r - 1]].concat()
                )));
            }
        }
        let mut shape = q.shape[..r - 1].to_vec();
        shape.push(v.shape[r - 1]);
        Ok(vec![TensorType::new(q.dtype, shape)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_follows_numpy() {
        assert_eq!(broadcast_shapes(&[2, 1, 4], &[3, 1]), Some(vec![2, 3, 4]));
        assert_eq!(broadcast_shapes(&[], &[5]), Some(vec![5]));
        assert_eq!(broadcast_shapes(&[2, 4], &[1, 3]), None);
    }

    #[test]
    fn axes_normalize() {
        assert_eq!(normalize_axis(-1, 4), Some(3));
        assert_eq!(normalize_axis(-4, 4), Some(0));
        assert_eq!(normalize_axis(4, 4), None);
        assert_eq!(normalize_axis(-5, 4), None);
    }
}
