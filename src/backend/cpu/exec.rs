//! Compiling a MIL [`Program`] into a [`Plan`] and running it.
//!
//! Compilation gives every value a slot, materializes constants once (inline
//! literals, BLOBFILE tensors, `constexpr_*` results) and lowers every other
//! operation to a [`Kernel`] whose parameters are resolved and whose operand and
//! result shapes are checked against the declared types. Running a plan is then
//! a loop over steps with no lookups by name; a value is dropped after its last use.
//!
//! This module owns the op-independent parts (slots, parameter access through
//! [`OpCtx`], fp16 rounding of results); the math of each op lives in the kernel
//! modules next to it.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use super::{constant, elementwise, gemm, reduce, shape};
use crate::backend::Precision;
use crate::mil::op::ParamKind;
use crate::mil::{Arg, DType, Literal, Op, Operation, Program, TensorType, Value, Var};
use crate::{Error, Result};

/// Index of a value in a running plan.
pub(super) type Slot = usize;

/// A lowered operation: parameters resolved, ready to run on `f32` slices.
#[derive(Debug)]
pub(super) enum Kernel {
    /// `reshape`, `identity`: the data is unchanged.
    Copy,
    Unary(elementwise::Unary),
    Binary(elementwise::Binary),
    Select(elementwise::Broadcast),
    Cast(DType),
    Quantize(elementwise::Quantize),
    Dequantize(elementwise::Dequantize),
    Softmax(reduce::Softmax),
    Reduce(reduce::Reduce),
    /// `transpose`, `slice_by_size`: one strided read.
    Gather(shape::View),
    /// `split`: one strided read per result.
    Split(Vec<shape::View>),
    /// `concat`: operand `i` is written to view `i` of the result.
    Concat(shape::Concat),
    Matmul(gemm::Matmul),
    Conv(gemm::Conv),
    Attention(gemm::Attention),
}

impl Kernel {
    /// Compute the results from the operand values (in parameter order).
    fn run(&self, args: &[&[f32]]) -> Vec<Vec<f32>> {
        match self {
            Kernel::Copy => vec![args[0].to_vec()],
            Kernel::Unary(k) => vec![k.run(args[0])],
            Kernel::Binary(k) => vec![k.run(args[0], args[1])],
            Kernel::Select(b) => {
                vec![b.map(
                    [args[0], args[1], args[2]],
                    |[c, a, b]| {
                        if c != 0.0 { a } else { b }
                    },
                )]
            }
            Kernel::Cast(dtype) => {
                let dtype = *dtype;
                vec![elementwise::map(args[0], move |v| {
                    elementwise::convert(v, dtype)
                })]
            }
            Kernel::Quantize(k) => vec![k.run(args[0])],
            Kernel::Dequantize(k) => vec![k.run(args[0])],
            Kernel::Softmax(k) => vec![k.run(args[0])],
            Kernel::Reduce(k) => vec![k.run(args[0])],
            Kernel::Gather(view) => vec![view.gather(args[0])],
            Kernel::Split(views) => views.iter().map(|v| v.gather(args[0])).collect(),
            Kernel::Concat(k) => vec![k.run(args)],
            Kernel::Matmul(k) => vec![k.run(args[0], args[1])],
            Kernel::Conv(k) => vec![k.run(args[0], args[1], args.get(2).copied())],
            Kernel::Attention(k) => vec![k.run(args[0], args[1], args[2], args.get(3).copied())],
        }
    }
}

#[derive(Debug)]
struct Step {
    kernel: Kernel,
    args: Vec<Slot>,
    results: Vec<Slot>,
    /// Slots whose last use is this step; dropped after it runs.
    release: Vec<Slot>,
}

/// A compiled program: slots, constants and steps.
#[derive(Debug)]
pub(super) struct Plan {
    /// Function inputs; input `i` lives in slot `i`.
    pub(super) inputs: Vec<Var>,
    /// Function outputs, in signature order.
    pub(super) outputs: Vec<Var>,
    output_slots: Vec<Slot>,
    slot_types: Vec<TensorType>,
    constants: Vec<(Slot, Vec<f32>)>,
    steps: Vec<Step>,
    precision: Precision,
}

impl Plan {
    /// Compile `program`, resolving BLOBFILE constants from `weights`
    /// (`@model_path/weights/<file>` -> file bytes).
    pub(super) fn compile(
        program: &Program,
        weights: &BTreeMap<String, Vec<u8>>,
        precision: Precision,
    ) -> Result<Plan> {
        let func = &program.main;
        let mut b = PlanBuilder {
            weights,
            precision,
            slots: HashMap::new(),
            literals: HashMap::new(),
            slot_types: Vec::new(),
            constants: Vec::new(),
            steps: Vec::new(),
        };
        for input in &func.inputs {
            b.define(input, None)?;
        }
        for op in &func.ops {
            b.lower(op)?;
        }
        let mut output_slots = Vec::new();
        let mut outputs = Vec::new();
        for name in &func.outputs {
            let slot = *b.slots.get(name.as_str()).ok_or_else(|| {
                Error::Verify(format!(
                    "function output `{name}` is not defined by any input or operation"
                ))
            })?;
            output_slots.push(slot);
            outputs.push(Var::new(name.clone(), b.slot_types[slot].clone()));
        }
        let mut steps = b.steps;
        // A slot is released after the last step that reads or writes it,
        // unless it is a function output.
        let mut last_use = vec![None; b.slot_types.len()];
        for (step_idx, step) in steps.iter().enumerate() {
            for &slot in step.args.iter().chain(&step.results) {
                last_use[slot] = Some(step_idx);
            }
        }
        for &slot in &output_slots {
            last_use[slot] = None;
        }
        for (slot, last) in last_use.into_iter().enumerate() {
            if let Some(step_idx) = last {
                steps[step_idx].release.push(slot);
            }
        }
        Ok(Plan {
            inputs: func.inputs.clone(),
            outputs,
            output_slots,
            slot_types: b.slot_types,
            constants: b.constants,
            steps,
            precision,
        })
    }

    /// Run the plan on input values (one slice per function input, each of the
    /// input's element count) and return the output values in order.
    pub(super) fn execute(&self, inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>> {
        if inputs.len() != self.inputs.len() {
            return Err(run_error(format!(
                "the program has {} inputs but {} values were given",
                self.inputs.len(),
                inputs.len()
            )));
        }
        let mut values: Vec<Option<Cow<'_, [f32]>>> = vec![None; self.slot_types.len()];
        for (slot, (data, var)) in inputs.iter().zip(&self.inputs).enumerate() {
            if data.len() != var.ty.numel() {
                return Err(run_error(format!(
                    "input `{}` of type {} needs {} values, got {}",
                    var.name,
                    var.ty,
                    var.ty.numel(),
                    data.len()
                )));
            }
            values[slot] = Some(Cow::Borrowed(data));
        }
        for (slot, data) in &self.constants {
            values[*slot] = Some(Cow::Borrowed(data));
        }
        for step in &self.steps {
            let args: Vec<&[f32]> = step
                .args
                .iter()
                .map(|&slot| {
                    values[slot]
                        .as_deref()
                        .expect("operands are defined before use")
                })
                .collect();
            let results = step.kernel.run(&args);
            debug_assert_eq!(results.len(), step.results.len());
            for (&slot, mut data) in step.results.iter().zip(results) {
                debug_assert_eq!(data.len(), self.slot_types[slot].numel(), "{step:?}");
                if self.rounds(&self.slot_types[slot]) {
                    elementwise::round_to_fp16(&mut data);
                }
                values[slot] = Some(Cow::Owned(data));
            }
            for &slot in &step.release {
                values[slot] = None;
            }
        }
        let mut outputs = Vec::with_capacity(self.output_slots.len());
        for (i, &slot) in self.output_slots.iter().enumerate() {
            let used_again = self.output_slots[i + 1..].contains(&slot);
            let value = if used_again {
                values[slot].as_deref().map(<[f32]>::to_vec)
            } else {
                values[slot].take().map(Cow::into_owned)
            };
            outputs.push(value.expect("outputs are defined"));
        }
        Ok(outputs)
    }

    /// Whether values of type `ty` are rounded to fp16 in this plan's precision.
    fn rounds(&self, ty: &TensorType) -> bool {
        self.precision == Precision::Fp16 && ty.dtype == DType::Fp16
    }
}

fn run_error(msg: String) -> Error {
    Error::Backend {
        backend: "cpu",
        step: "run",
        msg,
    }
}

struct PlanBuilder<'p> {
    weights: &'p BTreeMap<String, Vec<u8>>,
    precision: Precision,
    /// Tensor values by name (string constants have no slot).
    slots: HashMap<&'p str, Slot>,
    /// Values of `const` operations, for parameters that must be constant.
    literals: HashMap<&'p str, &'p Literal>,
    slot_types: Vec<TensorType>,
    constants: Vec<(Slot, Vec<f32>)>,
    steps: Vec<Step>,
}

impl<'p> PlanBuilder<'p> {
    /// Give `var` a slot; `op` names the defining operation for errors.
    fn define(&mut self, var: &'p Var, op: Option<&Operation>) -> Result<Slot> {
        if self.slots.contains_key(var.name.as_str())
            || self.literals.contains_key(var.name.as_str())
        {
            let msg = format!("value `{}` is defined twice", var.name);
            return Err(match op {
                Some(op) => op_error(op, msg),
                None => Error::Verify(msg),
            });
        }
        let slot = self.new_slot(var.ty.clone());
        self.slots.insert(&var.name, slot);
        Ok(slot)
    }

    fn new_slot(&mut self, ty: TensorType) -> Slot {
        self.slot_types.push(ty);
        self.slot_types.len() - 1
    }

    /// Store constant `data` for `slot`, rounded as the precision demands.
    fn set_constant(&mut self, slot: Slot, mut data: Vec<f32>) {
        if self.precision == Precision::Fp16 && self.slot_types[slot].dtype == DType::Fp16 {
            elementwise::round_to_fp16(&mut data);
        }
        self.constants.push((slot, data));
    }

    fn lower(&mut self, op: &'p Operation) -> Result<()> {
        check_params(op)?;
        match op.op {
            Op::Const => {
                let [out] = op.outputs.as_slice() else {
                    return Err(op_error(op, "`const` must have exactly one result"));
                };
                let lit = op
                    .attr("val")
                    .ok_or_else(|| op_error(op, "missing the `val` attribute"))?;
                if lit.ty != out.ty {
                    return Err(op_error(
                        op,
                        format!(
                            "`val` has type {} but the result is declared {}",
                            lit.ty, out.ty
                        ),
                    ));
                }
                if lit.ty.dtype == DType::String {
                    if self.slots.contains_key(out.name.as_str())
                        || self.literals.contains_key(out.name.as_str())
                    {
                        return Err(op_error(
                            op,
                            format!("value `{}` is defined twice", out.name),
                        ));
                    }
                } else {
                    let data = constant::materialize(lit, self.weights, op)?;
                    let slot = self.define(out, Some(op))?;
                    self.set_constant(slot, data);
                }
                self.literals.insert(&out.name, lit);
                Ok(())
            }
            Op::ConstexprAffineDequantize => {
                let data = constant::affine_dequantize(&self.ctx(op), self.weights)?;
                let slot = self.define(&op.outputs[0], Some(op))?;
                self.set_constant(slot, data);
                Ok(())
            }
            _ => {
                let kernel = lower_kernel(&self.ctx(op))?;
                let args = self.operand_slots(op)?;
                let mut results = Vec::new();
                for out in &op.outputs {
                    results.push(self.define(out, Some(op))?);
                }
                self.steps.push(Step {
                    kernel,
                    args,
                    results,
                    release: Vec::new(),
                });
                Ok(())
            }
        }
    }

    fn ctx<'a>(&'a self, op: &'a Operation) -> OpCtx<'a> {
        OpCtx {
            op,
            slots: &self.slots,
            slot_types: &self.slot_types,
            literals: &self.literals,
            precision: self.precision,
        }
    }

    /// Slots of the tensor operands of `op`, in parameter order (tuples expanded).
    fn operand_slots(&mut self, op: &'p Operation) -> Result<Vec<Slot>> {
        let mut slots = Vec::new();
        for param in op.op.params() {
            let Some(arg) = op.arg(param.name) else {
                continue;
            };
            match (param.kind, arg) {
                (ParamKind::Tuple, Arg::Tuple(items)) => {
                    for item in items {
                        slots.push(self.operand_slot(op, param.name, item)?);
                    }
                }
                (ParamKind::Tensor | ParamKind::ConstTensor | ParamKind::Tuple, arg) => {
                    slots.push(self.operand_slot(op, param.name, arg)?)
                }
                _ => {}
            }
        }
        Ok(slots)
    }

    fn operand_slot(&mut self, op: &Operation, param: &str, arg: &Arg) -> Result<Slot> {
        match arg {
            Arg::Var(name) => self.slots.get(name.as_str()).copied().ok_or_else(|| {
                op_error(
                    op,
                    format!("`{param}` refers to `{name}`, which is not a tensor value"),
                )
            }),
            Arg::Lit(lit) => {
                let data = constant::materialize(lit, self.weights, op)?;
                let slot = self.new_slot(lit.ty.clone());
                self.set_constant(slot, data);
                Ok(slot)
            }
            Arg::Tuple(_) => Err(op_error(
                op,
                format!("`{param}` must be a tensor, not a tuple"),
            )),
        }
    }
}

pub(super) fn op_error(op: &Operation, msg: impl ToString) -> Error {
    Error::Op {
        op: op.op.mil_name().to_string(),
        name: op.name.clone(),
        msg: msg.to_string(),
    }
}

/// Reject unknown parameters and missing required ones, whatever the op.
fn check_params(op: &Operation) -> Result<()> {
    for (key, _) in &op.args {
        match op.op.param(key) {
            Some(p) if p.kind != ParamKind::Attr => {}
            _ => return Err(op_error(op, format!("unknown parameter `{key}`"))),
        }
    }
    for param in op.op.params().iter().filter(|p| p.required) {
        let present = match param.kind {
            ParamKind::Attr => op.attr(param.name).is_some(),
            _ => op.arg(param.name).is_some(),
        };
        if !present {
            return Err(op_error(
                op,
                format!("missing required parameter `{}`", param.name),
            ));
        }
    }
    if op.op != Op::Split && op.outputs.len() != 1 {
        return Err(op_error(
            op,
            format!("expected one result, {} are declared", op.outputs.len()),
        ));
    }
    Ok(())
}

fn lower_kernel(ctx: &OpCtx) -> Result<Kernel> {
    match ctx.op.op {
        Op::Const | Op::ConstexprAffineDequantize => unreachable!("constants are materialized"),
        Op::Identity | Op::Reshape => shape::compile_copy(ctx),
        Op::Sqrt | Op::Rsqrt | Op::Exp | Op::Log | Op::Tanh | Op::Sigmoid | Op::Silu | Op::Relu => {
            elementwise::compile_unary(ctx)
        }
        Op::Add | Op::Sub | Op::Mul | Op::RealDiv | Op::Maximum | Op::Minimum | Op::Pow => {
            elementwise::compile_binary(ctx)
        }
        Op::Select => elementwise::compile_select(ctx),
        Op::Cast => elementwise::compile_cast(ctx),
        Op::Quantize => elementwise::compile_quantize(ctx),
        Op::Dequantize => elementwise::compile_dequantize(ctx),
        Op::Softmax => reduce::compile_softmax(ctx),
        Op::ReduceSum | Op::ReduceMean | Op::ReduceMax => reduce::compile_reduce(ctx),
        Op::Transpose => shape::compile_transpose(ctx),
        Op::SliceBySize => shape::compile_slice(ctx),
        Op::Concat => shape::compile_concat(ctx),
        Op::Split => shape::compile_split(ctx),
        Op::Matmul => gemm::compile_matmul(ctx),
        Op::Conv => gemm::compile_conv(ctx),
        Op::ScaledDotProductAttention => gemm::compile_attention(ctx),
    }
}

/// What a kernel compiler sees of an operation: operand types, constant
/// parameters, declared results, and an error constructor naming the op.
pub(super) struct OpCtx<'a> {
    pub(super) op: &'a Operation,
    slots: &'a HashMap<&'a str, Slot>,
    slot_types: &'a [TensorType],
    literals: &'a HashMap<&'a str, &'a Literal>,
    pub(super) precision: Precision,
}

impl<'a> OpCtx<'a> {
    /// An [`Error::Op`] naming this operation.
    pub(super) fn err(&self, msg: impl ToString) -> Error {
        op_error(self.op, msg)
    }

    fn arg_type(&self, param: &str, arg: &'a Arg) -> Result<&'a TensorType> {
        match arg {
            Arg::Var(name) => match self.slots.get(name.as_str()) {
                Some(&slot) => Ok(&self.slot_types[slot]),
                None if self.literals.contains_key(name.as_str()) => Err(self.err(format!(
                    "`{param}` refers to the string constant `{name}`, expected a tensor"
                ))),
                None => Err(self.err(format!(
                    "`{param}` refers to `{name}`, which is not defined before this op"
                ))),
            },
            Arg::Lit(lit) => Ok(&lit.ty),
            Arg::Tuple(_) => Err(self.err(format!("`{param}` must be a tensor, not a tuple"))),
        }
    }

    /// Type of a required tensor operand.
    pub(super) fn input(&self, param: &str) -> Result<&'a TensorType> {
        self.opt_input(param)?
            .ok_or_else(|| self.err(format!("missing required parameter `{param}`")))
    }

    /// Type of an optional tensor operand.
    pub(super) fn opt_input(&self, param: &str) -> Result<Option<&'a TensorType>> {
        match self.op.arg(param) {
            None => Ok(None),
            Some(arg) => self.arg_type(param, arg).map(Some),
        }
    }

    /// Types of the members of a tuple operand (a single tensor counts as a 1-tuple).
    pub(super) fn tuple(&self, param: &str) -> Result<Vec<&'a TensorType>> {
        match self.op.arg(param) {
            None => Err(self.err(format!("missing required parameter `{param}`"))),
            Some(Arg::Tuple(items)) => items.iter().map(|a| self.arg_type(param, a)).collect(),
            Some(arg) => Ok(vec![self.arg_type(param, arg)?]),
        }
    }

    /// The value of a parameter that must be constant (an inline literal or a
    /// `const` value), or `None` if absent.
    pub(super) fn lit(&self, param: &str) -> Result<Option<&'a Literal>> {
        match self.op.arg(param) {
            None => Ok(None),
            Some(Arg::Lit(lit)) => Ok(Some(lit)),
            Some(Arg::Var(name)) => match self.literals.get(name.as_str()) {
                Some(lit) => Ok(Some(lit)),
                None => Err(self.err(format!(
                    "`{param}` must be a constant, but `{name}` is computed at run time"
                ))),
            },
            Some(Arg::Tuple(_)) => {
                Err(self.err(format!("`{param}` must be a constant, not a tuple")))
            }
        }
    }

    fn wrong_kind(&self, param: &str, lit: &Literal, want: &str) -> Error {
        let got = match &lit.value {
            Value::Blob(_) => "a BLOBFILE tensor".to_string(),
            _ => format!("{}", lit.ty),
        };
        self.err(format!("`{param}` must be an inline {want}, got {got}"))
    }

    /// Integer values of a constant parameter.
    pub(super) fn ints(&self, param: &str) -> Result<Option<&'a [i64]>> {
        match self.lit(param)? {
            None => Ok(None),
            Some(lit) => lit
                .as_ints()
                .map(Some)
                .ok_or_else(|| self.wrong_kind(param, lit, "integer tensor")),
        }
    }

    /// The single integer of a constant parameter.
    pub(super) fn int(&self, param: &str) -> Result<Option<i64>> {
        match self.lit(param)? {
            None => Ok(None),
            Some(lit) => lit
                .as_int()
                .map(Some)
                .ok_or_else(|| self.wrong_kind(param, lit, "integer scalar")),
        }
    }

    /// The boolean of a constant parameter.
    pub(super) fn flag(&self, param: &str) -> Result<Option<bool>> {
        match self.lit(param)? {
            None => Ok(None),
            Some(lit) => lit
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.wrong_kind(param, lit, "bool scalar")),
        }
    }

    /// The string of a constant parameter.
    pub(super) fn string(&self, param: &str) -> Result<Option<&'a str>> {
        match self.lit(param)? {
            None => Ok(None),
            Some(lit) => lit
                .as_str()
                .map(Some)
                .ok_or_else(|| self.wrong_kind(param, lit, "string scalar")),
        }
    }

    /// Float values of a constant parameter.
    pub(super) fn floats(&self, param: &str) -> Result<Option<&'a [f32]>> {
        match self.lit(param)? {
            None => Ok(None),
            Some(lit) => lit
                .as_floats()
                .map(Some)
                .ok_or_else(|| self.wrong_kind(param, lit, "float tensor")),
        }
    }

    /// The single declared result type.
    pub(super) fn output(&self) -> &'a TensorType {
        &self.op.outputs[0].ty
    }

    /// Check that the single result is declared with `dtype` and `shape`.
    pub(super) fn expect_output(&self, dtype: DType, shape: &[usize]) -> Result<&'a TensorType> {
        let out = self.output();
        if out.dtype != dtype || out.shape != shape {
            return Err(self.err(format!(
                "result `{}` is declared {out} but the operands give {}",
                self.op.outputs[0].name,
                TensorType::new(dtype, shape)
            )));
        }
        Ok(out)
    }

    /// Normalize a possibly negative `axis` of a rank-`rank` tensor.
    pub(super) fn axis(&self, param: &str, axis: i64, rank: usize) -> Result<usize> {
        let r = rank as i64;
        if axis < -r || axis >= r.max(1) {
            return Err(self.err(format!(
                "`{param}` = {axis} is out of range for rank {rank}"
            )));
        }
        Ok(if axis < 0 {
            (axis + r) as usize
        } else {
            axis as usize
        })
    }

    /// Require a float (fp16/fp32) operand.
    pub(super) fn expect_float(&self, param: &str, ty: &TensorType) -> Result<()> {
        if ty.dtype.is_float() {
            Ok(())
        } else {
            Err(self.err(format!("`{param}` must be fp16 or fp32, got {ty}")))
        }
    }
}
