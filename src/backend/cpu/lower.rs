//! Lowering: a program becomes a list of steps over value slots. Each
//! operation is checked by [`crate::mil::infer`] (operands, parameters,
//! declared result types) before anything reads it; constants are
//! materialized once (rounded in fp16 precision); every other operation
//! becomes one step, its kernel from the lowering table
//! ([`StepKernel::lower`]) or, when fusing, the step of the first fusion in
//! [`FUSIONS`] that matches it.
//!
//! This file does not decide where values live or run anything (`plan.rs`),
//! and holds no op semantics (`kernel.rs` and the math files).

use std::collections::BTreeMap;

use super::constant;
use super::elementwise::round_to_fp16;
use super::fuse::{self, Facts, Fused, Fusion};
use super::kernel::{Step, StepKernel};
use super::values::{Slots, ValueSlot, Values, op_error};
use crate::backend::Precision;
use crate::mil::infer::{infer_outputs, result_mismatches};
use crate::mil::op::{Category, ParamKind};
use crate::mil::{Arg, DType, Function, Operation, Program, Var};
use crate::{Error, Result};

/// The fusions, tried in this order on every operation; the first that
/// matches replaces the operation's own step.
const FUSIONS: [Fusion; 6] = [
    fuse::causal_scores,
    fuse::masked_softmax,
    fuse::causal_product,
    fuse::softmax_backward,
    fuse::pairs,
    fuse::elementwise_chain,
];

/// A lowered program: the steps and what the plan needs to place values.
pub(super) struct Lowered {
    /// Function inputs; input `i` lives in slot `i`.
    pub(super) inputs: Vec<Var>,
    /// Function outputs, with their slots, in signature order.
    pub(super) outputs: Vec<(ValueSlot, Var)>,
    pub(super) slots: Slots,
    pub(super) steps: Vec<Step>,
}

/// Lower `program`, resolving BLOBFILE constants from `weights`
/// (`@model_path/weights/<file>` -> file bytes); `fuse` tries the fusions.
pub(super) fn lower(
    program: &Program,
    weights: &BTreeMap<String, Vec<u8>>,
    precision: Precision,
    fuse: bool,
) -> Result<Lowered> {
    let func = &program.main;
    let mut lowering = Lowering {
        func,
        weights,
        fuse,
        values: Values::new(func, precision),
        facts: Facts::default(),
        steps: Vec::new(),
    };
    for input in &func.inputs {
        lowering.values.define(input, None)?;
    }
    for op in &func.ops {
        lowering.op(op)?;
    }
    let Lowering { values, steps, .. } = lowering;
    let mut outputs = Vec::new();
    for name in &func.outputs {
        let slot = values.slot(name).ok_or_else(|| {
            Error::Verify(format!(
                "function output `{name}` is not defined by any input or operation"
            ))
        })?;
        outputs.push((slot, Var::new(name.clone(), values.ty(slot).clone())));
    }
    Ok(Lowered {
        inputs: func.inputs.clone(),
        outputs,
        slots: values.into_slots(),
        steps,
    })
}

struct Lowering<'p> {
    func: &'p Function,
    weights: &'p BTreeMap<String, Vec<u8>>,
    /// Whether to try the fusions.
    fuse: bool,
    values: Values<'p>,
    facts: Facts,
    steps: Vec<Step>,
}

impl<'p> Lowering<'p> {
    fn op(&mut self, op: &'p Operation) -> Result<()> {
        self.check(op)?;
        match op.op.category() {
            Category::Constant => self.constant(op),
            _ => self.step(op),
        }
    }

    /// Every operand is defined before `op`, and inference accepts `op` with
    /// the result types it declares.
    fn check(&self, op: &Operation) -> Result<()> {
        for (param, arg) in &op.args {
            let items = match arg {
                Arg::Tuple(items) => items.as_slice(),
                single => std::slice::from_ref(single),
            };
            for item in items {
                if let Arg::Var(name) = item
                    && !self.values.is_defined(name)
                {
                    return Err(op_error(
                        op,
                        format!(
                            "`{param}` refers to `{name}`, which is not defined before this op"
                        ),
                    ));
                }
            }
        }
        let inferred = infer_outputs(self.func, op)?;
        let mismatches = result_mismatches(op, &inferred);
        if !mismatches.is_empty() {
            return Err(op_error(op, mismatches.join("; ")));
        }
        Ok(())
    }

    /// `const` and `constexpr_*`: values computed now; string constants
    /// only as literals (parameters), without a slot.
    fn constant(&mut self, op: &'p Operation) -> Result<()> {
        let out = &op.outputs[0];
        let lit = op.attr("val");
        let data = match lit {
            Some(lit) if lit.ty.dtype == DType::String => None,
            Some(lit) => Some(constant::materialize(lit, self.weights, op)?),
            None => Some(constant::affine_dequantize(op, self.weights)?),
        };
        match data {
            Some(data) => {
                let slot = self.values.define(out, Some(op))?;
                self.set_constant(slot, data);
            }
            None if self.values.is_defined(&out.name) => {
                return Err(op_error(
                    op,
                    format!("value `{}` is defined twice", out.name),
                ));
            }
            None => {}
        }
        if let Some(lit) = lit {
            self.values.set_literal(&out.name, lit);
        }
        Ok(())
    }

    /// Store constant `data` for `slot`, rounded as the precision demands.
    fn set_constant(&mut self, slot: ValueSlot, mut data: Vec<f32>) {
        if self.values.precision == Precision::Fp16 && self.values.ty(slot).dtype == DType::Fp16 {
            round_to_fp16(&mut data);
        }
        self.values.set_constant(slot, data);
    }

    /// A computing operation: its step, fused if a fusion matches.
    fn step(&mut self, op: &'p Operation) -> Result<()> {
        let args = self.operand_slots(op)?;
        let kernel = StepKernel::lower(&self.values.ctx(op));
        let fused = match self.fuse {
            true => FUSIONS
                .iter()
                .find_map(|fusion| fusion(&self.values, &self.facts, op, &kernel, &args)),
            false => None,
        };
        let Fused {
            kernel,
            args,
            chain,
            hidden,
            extents,
        } = fused.unwrap_or_else(|| Fused::plain(kernel, args));
        self.values.set_def(op);
        let mut results = Vec::with_capacity(op.outputs.len() + 1);
        for out in &op.outputs {
            results.push(self.values.define(out, Some(op))?);
        }
        if let StepKernel::Copy = kernel {
            // Same values, same element count: share the operand's storage.
            self.values.alias(results[0], args[0]);
            return Ok(());
        }
        if let Some(ty) = hidden {
            results.push(self.values.new_slot(ty));
        }
        self.facts.record(&self.values, &results, chain, extents);
        let label = kernel.label(op);
        self.steps.push(Step {
            kernel,
            args,
            results,
            label,
        });
        Ok(())
    }

    /// Slots of the tensor operands of `op`, in parameter order (tuples
    /// expanded); inline literals become constants. A string constant is no
    /// tensor operand (the kernel compilers see tensors only).
    fn operand_slots(&mut self, op: &Operation) -> Result<Vec<ValueSlot>> {
        let mut slots = Vec::new();
        for param in op.op.params() {
            match op.arg(param.name) {
                Some(Arg::Tuple(items)) => {
                    for item in items {
                        slots.push(self.operand_slot(op, param.name, item)?);
                    }
                }
                Some(arg) if matches!(param.kind, ParamKind::Tensor | ParamKind::ConstTensor) => {
                    slots.push(self.operand_slot(op, param.name, arg)?)
                }
                _ => {}
            }
        }
        Ok(slots)
    }

    fn operand_slot(&mut self, op: &Operation, param: &str, arg: &Arg) -> Result<ValueSlot> {
        match arg {
            Arg::Var(name) => self.values.slot(name).ok_or_else(|| {
                op_error(
                    op,
                    format!("`{param}` refers to `{name}`, which is not a tensor value"),
                )
            }),
            Arg::Lit(lit) => {
                let data = constant::materialize(lit, self.weights, op)?;
                let slot = self.values.new_slot(lit.ty.clone());
                self.set_constant(slot, data);
                Ok(slot)
            }
            Arg::Tuple(_) => unreachable!("inference rejects nested tuples"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::backend::Precision;
    use crate::backend::cpu::plan::Plan;
    use crate::backend::cpu::plan::tests::program;

    /// Inference accepts any type for `identity`, but a string constant is
    /// no tensor the interpreter holds: an error naming it, not a panic.
    #[test]
    fn a_string_constant_is_no_tensor_operand() {
        let body = "        string s = const()[name = string(\"s\"), val = string(\"text\")];\n\
                    \x20       string y = identity(x = s)[name = string(\"y\")];\n";
        let program = program(body, "tensor<fp32, [1]> x", "y");
        let err = Plan::compile(&program, &BTreeMap::new(), Precision::Fp32)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`x` refers to `s`, which is not a tensor value"),
            "{err}"
        );
    }
}
