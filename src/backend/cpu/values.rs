//! The values of a program as lowering sees them: each tensor value's slot and
//! type, the literals behind `const` values, constant data, the operation
//! defining each value and how often it is used; and [`OpCtx`], one
//! operation's view of them, which the kernel compilers read.
//!
//! Everything read here was checked by [`crate::mil::infer`] before the
//! operation was lowered (`lower` does that), so the accessors of [`OpCtx`]
//! panic on what inference rejects. This file makes no steps and does no math.

use std::collections::HashMap;

use crate::backend::Precision;
use crate::mil::{Arg, DType, Function, Literal, Operation, TensorType, Var};
use crate::{Error, Result};

/// Index of a value in a running plan.
pub(super) type ValueSlot = usize;

/// The values lowered so far.
pub(super) struct Values<'p> {
    pub(super) precision: Precision,
    /// Tensor values by name (string constants have no slot).
    slots: HashMap<&'p str, ValueSlot>,
    types: Vec<TensorType>,
    /// For `reshape`/`identity` results: the slot whose storage they share.
    alias_of: Vec<Option<ValueSlot>>,
    /// Values of `const` operations, for parameters that must be constant.
    literals: HashMap<&'p str, &'p Literal>,
    /// Constant data, by slot (rounded as the precision demands).
    constants: Vec<(ValueSlot, Vec<f32>)>,
    /// The operation defining each value lowered so far (`const` ops aside).
    defs: HashMap<&'p str, &'p Operation>,
    /// How many times each value is an argument or a function output.
    uses: HashMap<&'p str, usize>,
}

impl<'p> Values<'p> {
    pub(super) fn new(func: &'p Function, precision: Precision) -> Values<'p> {
        Values {
            precision,
            slots: HashMap::new(),
            types: Vec::new(),
            alias_of: Vec::new(),
            literals: HashMap::new(),
            constants: Vec::new(),
            defs: HashMap::new(),
            uses: use_counts(func),
        }
    }

    /// Give `var` a slot; `op` names the defining operation for errors.
    pub(super) fn define(&mut self, var: &'p Var, op: Option<&Operation>) -> Result<ValueSlot> {
        if self.is_defined(&var.name) {
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

    /// A slot for a value without a name (an inline literal, a hidden result).
    pub(super) fn new_slot(&mut self, ty: TensorType) -> ValueSlot {
        self.types.push(ty);
        self.alias_of.push(None);
        self.types.len() - 1
    }

    /// Whether `name` is a tensor value or a `const` defined so far.
    pub(super) fn is_defined(&self, name: &str) -> bool {
        self.slots.contains_key(name) || self.literals.contains_key(name)
    }

    /// Record the literal of `const` value `name`.
    pub(super) fn set_literal(&mut self, name: &'p str, lit: &'p Literal) {
        self.literals.insert(name, lit);
    }

    /// Record constant data for `slot`.
    pub(super) fn set_constant(&mut self, slot: ValueSlot, data: Vec<f32>) {
        self.constants.push((slot, data));
    }

    /// Record `op` as the definition of its results.
    pub(super) fn set_def(&mut self, op: &'p Operation) {
        for out in &op.outputs {
            self.defs.insert(&out.name, op);
        }
    }

    /// Make `slot` share the storage of `source`.
    pub(super) fn alias(&mut self, slot: ValueSlot, source: ValueSlot) {
        self.alias_of[slot] = Some(self.root(source));
    }

    /// The slot whose storage `slot` uses.
    pub(super) fn root(&self, slot: ValueSlot) -> ValueSlot {
        self.alias_of[slot].unwrap_or(slot)
    }

    pub(super) fn slot(&self, name: &str) -> Option<ValueSlot> {
        self.slots.get(name).copied()
    }

    pub(super) fn ty(&self, slot: ValueSlot) -> &TensorType {
        &self.types[slot]
    }

    pub(super) fn type_of(&self, name: &str) -> Option<&TensorType> {
        self.slot(name).map(|s| &self.types[s])
    }

    /// The data of constant `slot`, if it is one.
    pub(super) fn constant(&self, slot: ValueSlot) -> Option<&[f32]> {
        self.constants
            .iter()
            .find(|(s, _)| *s == slot)
            .map(|(_, data)| data.as_slice())
    }

    /// The operation defining `name`, if it is an op result lowered so far.
    pub(super) fn def(&self, name: &str) -> Option<&'p Operation> {
        self.defs.get(name).copied()
    }

    /// How many times `name` is an argument or a function output.
    pub(super) fn uses(&self, name: &str) -> usize {
        self.uses.get(name).copied().unwrap_or(0)
    }

    /// The value of a constant scalar operand (inline or a `const`).
    pub(super) fn scalar(&self, arg: &Arg) -> Option<f32> {
        let lit = match arg {
            Arg::Lit(lit) => lit,
            Arg::Var(name) => self.literals.get(name.as_str())?,
            Arg::Tuple(_) => return None,
        };
        (lit.ty.numel() == 1).then(|| lit.as_floats().map(|v| v[0]))?
    }

    /// Whether values of `ty` are computed without fp16 rounding (fusions
    /// skip the roundings between the ops they merge, so only these fuse).
    pub(super) fn exact(&self, ty: &TensorType) -> bool {
        ty.dtype == DType::Fp32 || self.precision == Precision::Fp32
    }

    /// `op`'s view of the values, for its kernel compiler.
    pub(super) fn ctx<'a>(&'a self, op: &'a Operation) -> OpCtx<'a> {
        OpCtx { op, values: self }
    }

    /// What the plan needs of the values: their types, storage sharing and constants.
    pub(super) fn into_slots(self) -> Slots {
        Slots {
            types: self.types,
            alias_of: self.alias_of,
            constants: self.constants,
        }
    }
}

/// Every slot of a lowered program.
pub(super) struct Slots {
    pub(super) types: Vec<TensorType>,
    /// For slots sharing another's storage (reshapes): that slot.
    pub(super) alias_of: Vec<Option<ValueSlot>>,
    /// Constant data, by slot.
    pub(super) constants: Vec<(ValueSlot, Vec<f32>)>,
}

/// How many times each value is an argument or a function output.
pub(super) fn use_counts(func: &Function) -> HashMap<&str, usize> {
    fn count<'a>(arg: &'a Arg, uses: &mut HashMap<&'a str, usize>) {
        match arg {
            Arg::Var(name) => *uses.entry(name.as_str()).or_default() += 1,
            Arg::Tuple(items) => items.iter().for_each(|a| count(a, uses)),
            Arg::Lit(_) => {}
        }
    }
    let mut uses = HashMap::new();
    for op in &func.ops {
        for (_, arg) in &op.args {
            count(arg, &mut uses);
        }
    }
    for name in &func.outputs {
        *uses.entry(name.as_str()).or_default() += 1;
    }
    uses
}

/// An [`Error::Op`] naming `op`.
pub(super) fn op_error(op: &Operation, msg: impl ToString) -> Error {
    Error::Op {
        op: op.op.mil_name().to_string(),
        name: op.name.clone(),
        msg: msg.to_string(),
    }
}

/// What a kernel compiler sees of an operation: operand types, constant
/// parameters and declared results, all checked by inference.
pub(super) struct OpCtx<'a> {
    pub(super) op: &'a Operation,
    values: &'a Values<'a>,
}

impl<'a> OpCtx<'a> {
    pub(super) fn precision(&self) -> Precision {
        self.values.precision
    }

    fn arg_type(&self, arg: &'a Arg) -> &'a TensorType {
        match arg {
            Arg::Var(name) => {
                let slot = self.values.slot(name);
                &self.values.types[slot.expect("operands are tensors defined before the op")]
            }
            Arg::Lit(lit) => &lit.ty,
            Arg::Tuple(_) => unreachable!("inference rejects a tuple here"),
        }
    }

    /// Type of a required tensor operand.
    pub(super) fn input(&self, param: &str) -> &'a TensorType {
        self.opt_input(param)
            .unwrap_or_else(|| panic!("`{param}` is required"))
    }

    /// Type of an optional tensor operand.
    pub(super) fn opt_input(&self, param: &str) -> Option<&'a TensorType> {
        self.op.arg(param).map(|arg| self.arg_type(arg))
    }

    /// Types of the members of a tuple operand.
    pub(super) fn tuple(&self, param: &str) -> Vec<&'a TensorType> {
        match self.op.arg(param) {
            Some(Arg::Tuple(items)) => items.iter().map(|a| self.arg_type(a)).collect(),
            _ => unreachable!("inference checked that `{param}` is a tuple"),
        }
    }

    /// The value of a constant parameter (an inline literal or a `const`
    /// value), or `None` if absent.
    pub(super) fn lit(&self, param: &str) -> Option<&'a Literal> {
        match self.op.arg(param)? {
            Arg::Lit(lit) => Some(lit),
            Arg::Var(name) => Some(self.values.literals[name.as_str()]),
            Arg::Tuple(_) => unreachable!("inference checked that `{param}` is a constant"),
        }
    }

    fn kind<T>(&self, param: &str, get: impl FnOnce(&'a Literal) -> Option<T>) -> Option<T> {
        let lit = self.lit(param)?;
        Some(get(lit).unwrap_or_else(|| panic!("`{param}` of kind {}", lit.ty)))
    }

    /// Integer values of a constant parameter.
    pub(super) fn ints(&self, param: &str) -> Option<&'a [i64]> {
        self.kind(param, Literal::as_ints)
    }

    /// The single integer of a constant parameter.
    pub(super) fn int(&self, param: &str) -> Option<i64> {
        self.kind(param, Literal::as_int)
    }

    /// The boolean of a constant parameter.
    pub(super) fn flag(&self, param: &str) -> Option<bool> {
        self.kind(param, Literal::as_bool)
    }

    /// The string of a constant parameter, or its default choice when absent.
    pub(super) fn string(&self, param: &str) -> Option<&'a str> {
        self.kind(param, Literal::as_str)
            .or_else(|| self.op.op.param(param).and_then(|p| p.default_choice()))
    }

    /// Float values of a constant parameter.
    pub(super) fn floats(&self, param: &str) -> Option<&'a [f32]> {
        self.kind(param, Literal::as_floats)
    }

    /// The single declared result type.
    pub(super) fn output(&self) -> &'a TensorType {
        &self.op.outputs[0].ty
    }

    /// A possibly negative `axis` of a rank-`rank` tensor, in `0..rank`.
    pub(super) fn axis(&self, axis: i64, rank: usize) -> usize {
        crate::mil::infer::normalize_axis(axis, rank).expect("inference checked the axis")
    }
}
