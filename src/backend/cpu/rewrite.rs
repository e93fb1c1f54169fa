//! Graph rewrites the CPU backend applies before lowering, so that the MIL
//! idioms written for the ANE do not cost copies here. Each rewrite keeps every
//! value a program computes (transposes are exact), and the plan tests run the
//! rewritten and original programs side by side.
//!
//! - A `matmul` operand that is a transpose of its last two axes, possibly seen
//!   through reshapes that restore the same shape, becomes the untransposed
//!   value with the `transpose_x`/`transpose_y` flag flipped.
//! - A `matmul` whose only use is such a transpose computes the transposed
//!   product directly: `(A B)^T = B^T A^T`.
//! - The transposes and reshapes these folds bypass are dropped once unused.
//!
//! A rewrite only touches operations that are well formed (declared types agree
//! with their operands), so errors in a program are still reported by lowering.
//!
//! This module does not change what a program means, only what it costs.

use std::collections::HashMap;

use crate::mil::{Arg, Literal, Op, Operation, Program, TensorType};

/// The rewritten program.
pub(super) fn rewrite(program: &Program) -> Program {
    let mut program = program.clone();
    let bypassed = fold_operand_transposes(&mut program);
    fold_result_transposes(&mut program);
    drop_unused(&mut program, &bypassed);
    program
}

/// Index of the operation defining each value.
fn definitions(program: &Program) -> HashMap<String, usize> {
    let mut defs = HashMap::new();
    for (i, op) in program.main.ops.iter().enumerate() {
        for out in &op.outputs {
            defs.insert(out.name.clone(), i);
        }
    }
    defs
}

/// Uses of each value as an operation argument or function output, by name.
fn use_counts(program: &Program) -> HashMap<String, usize> {
    super::values::use_counts(&program.main)
        .into_iter()
        .map(|(name, n)| (name.to_string(), n))
        .collect()
}

/// The value a constant `perm` argument names, as integers.
fn perm_of(program: &Program, defs: &HashMap<String, usize>, op: &Operation) -> Option<Vec<i64>> {
    match op.arg("perm")? {
        Arg::Lit(lit) => lit.as_ints().map(<[i64]>::to_vec),
        Arg::Var(name) => {
            let def = &program.main.ops[*defs.get(name)?];
            (def.op == Op::Const)
                .then(|| def.attr("val")?.as_ints().map(<[i64]>::to_vec))
                .flatten()
        }
        Arg::Tuple(_) => None,
    }
}

/// The variable argument `x` of `op` and its declared type.
fn operand_x<'p>(program: &'p Program, op: &'p Operation) -> Option<(&'p str, &'p TensorType)> {
    match op.arg("x")? {
        Arg::Var(name) => Some((name, program.main.var_type(name)?)),
        _ => None,
    }
}

/// Whether `op` is a well-formed `transpose` that swaps the last two axes only.
fn swaps_last_two(program: &Program, defs: &HashMap<String, usize>, op: &Operation) -> bool {
    if op.op != Op::Transpose || op.outputs.len() != 1 {
        return false;
    }
    let (Some(perm), Some((_, x))) = (perm_of(program, defs, op), operand_x(program, op)) else {
        return false;
    };
    let r = perm.len();
    let mut swapped = x.shape.clone();
    if r >= 2 && x.rank() == r {
        swapped.swap(r - 2, r - 1);
    }
    r >= 2
        && (0..r - 2).all(|d| perm[d] == d as i64)
        && perm[r - 2] == r as i64 - 1
        && perm[r - 1] == r as i64 - 2
        && op.outputs[0].ty == TensorType::new(x.dtype, swapped)
}

/// Whether `op` is a well-formed `reshape`/`identity` (same dtype and element count).
fn keeps_data(program: &Program, op: &Operation) -> bool {
    matches!(op.op, Op::Reshape | Op::Identity)
        && op.outputs.len() == 1
        && operand_x(program, op).is_some_and(|(_, x)| {
            x.dtype == op.outputs[0].ty.dtype && x.numel() == op.outputs[0].ty.numel()
        })
}

/// A boolean flag argument (`transpose_x`), absent meaning false.
fn flag(
    program: &Program,
    defs: &HashMap<String, usize>,
    op: &Operation,
    param: &str,
) -> Option<bool> {
    match op.arg(param) {
        None => Some(false),
        Some(Arg::Lit(lit)) => lit.as_bool(),
        Some(Arg::Var(name)) => {
            let def = &program.main.ops[*defs.get(name)?];
            (def.op == Op::Const)
                .then(|| def.attr("val")?.as_bool())
                .flatten()
        }
        Some(Arg::Tuple(_)) => None,
    }
}

fn set_arg(op: &mut Operation, param: &str, arg: Arg) {
    match op.args.iter_mut().find(|(k, _)| k == param) {
        Some((_, a)) => *a = arg,
        None => op.args.push((param.to_string(), arg)),
    }
}

/// For a matmul operand `name`: the value it transposes (last two axes), if it
/// is such a transpose or a reshape chain back to one of the same shape; also
/// the values on the way, which may become unused.
fn transposed_source(
    program: &Program,
    defs: &HashMap<String, usize>,
    name: &str,
) -> Option<(String, Vec<String>)> {
    let ops = &program.main.ops;
    let shape = &program.main.var_type(name)?.shape;
    let mut chain = vec![name.to_string()];
    loop {
        let def = &ops[*defs.get(chain.last()?)?];
        if swaps_last_two(program, defs, def) && &def.outputs[0].ty.shape == shape {
            return Some((operand_x(program, def)?.0.to_string(), chain));
        }
        if !keeps_data(program, def) {
            return None;
        }
        chain.push(operand_x(program, def)?.0.to_string());
    }
}

/// Returns the names of the values the folds bypassed.
fn fold_operand_transposes(program: &mut Program) -> Vec<String> {
    let defs = definitions(program);
    let mut bypassed = Vec::new();
    for i in 0..program.main.ops.len() {
        let op = &program.main.ops[i];
        if op.op != Op::Matmul {
            continue;
        }
        let mut changes = Vec::new();
        for (param, flag_name) in [("x", "transpose_x"), ("y", "transpose_y")] {
            let Some(Arg::Var(name)) = op.arg(param) else {
                continue;
            };
            let rank = program.main.var_type(name).map_or(0, |t| t.rank());
            let (Some((source, chain)), Some(flipped)) = (
                transposed_source(program, &defs, name),
                flag(program, &defs, op, flag_name),
            ) else {
                continue;
            };
            if rank >= 2 {
                changes.push((param, flag_name, source, !flipped));
                bypassed.extend(chain);
            }
        }
        let op = &mut program.main.ops[i];
        for (param, flag_name, source, value) in changes {
            set_arg(op, param, Arg::Var(source));
            set_arg(op, flag_name, Arg::Lit(Literal::bool(value)));
        }
    }
    bypassed
}

fn fold_result_transposes(program: &mut Program) {
    let defs = definitions(program);
    let uses = use_counts(program);
    let mut consumer: HashMap<String, usize> = HashMap::new();
    for (i, op) in program.main.ops.iter().enumerate() {
        if let Some(Arg::Var(x)) = op.arg("x")
            && op.op == Op::Transpose
        {
            consumer.insert(x.clone(), i);
        }
    }
    let mut removed = Vec::new();
    for i in 0..program.main.ops.len() {
        let op = &program.main.ops[i];
        let (Op::Matmul, [result]) = (op.op, op.outputs.as_slice()) else {
            continue;
        };
        let result = &result.name;
        let Some(&t) = consumer.get(result) else {
            continue;
        };
        let ranks_ok = ["x", "y"].iter().all(|p| match op.arg(p) {
            Some(Arg::Var(v)) => program.main.var_type(v).is_some_and(|t| t.rank() >= 2),
            _ => false,
        });
        let transpose = &program.main.ops[t];
        if uses.get(result) != Some(&1) || !ranks_ok || !swaps_last_two(program, &defs, transpose) {
            continue;
        }
        let (Some(tx), Some(ty)) = (
            flag(program, &defs, op, "transpose_x"),
            flag(program, &defs, op, "transpose_y"),
        ) else {
            continue;
        };
        let (x, y) = (op.arg("x").cloned(), op.arg("y").cloned());
        let out = transpose.outputs[0].clone();
        let op = &mut program.main.ops[i];
        set_arg(op, "x", y.expect("checked"));
        set_arg(op, "y", x.expect("checked"));
        set_arg(op, "transpose_x", Arg::Lit(Literal::bool(!ty)));
        set_arg(op, "transpose_y", Arg::Lit(Literal::bool(!tx)));
        op.outputs[0] = out;
        removed.push(t);
    }
    removed.sort_unstable();
    for t in removed.into_iter().rev() {
        program.main.ops.remove(t);
    }
}

/// Remove the operations defining `bypassed` values that nothing uses any more.
fn drop_unused(program: &mut Program, bypassed: &[String]) {
    loop {
        let uses = use_counts(program);
        let before = program.main.ops.len();
        program.main.ops.retain(|op| {
            !op.outputs
                .iter()
                .all(|o| bypassed.contains(&o.name) && !uses.contains_key(&o.name))
        });
        if program.main.ops.len() == before {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::backend::Precision;
    use crate::backend::cpu::plan::Plan;
    use crate::model::ModelConfig;
    use crate::model::kernels::{KernelOptions, LayerKernels, WeightMode};
    use crate::rng::Rng;

    fn count(program: &Program, op: Op) -> usize {
        program.main.ops.iter().filter(|o| o.op == op).count()
    }

    /// Every training kernel (GQA 4/2, both runtime-weight modes) computes the
    /// same values rewritten and fused as written and run op by op, with fewer
    /// transposes.
    #[test]
    fn rewritten_training_kernels_match_the_program_as_written() {
        let config = ModelConfig::llama(64, 1, 4, 2, 96, 32, 16);
        for mode in [WeightMode::Inputs, WeightMode::Packed] {
            let opts = KernelOptions {
                mode,
                ..KernelOptions::cpu()
            };
            let kernels = LayerKernels::build(&config, 16, opts, &|_| None).unwrap();
            for spec in kernels.iter() {
                let program = &spec.program;
                let rewritten = rewrite(program);
                let before = count(program, Op::Transpose);
                let after = count(&rewritten, Op::Transpose);
                assert!(
                    after < before,
                    "{}: {before} -> {after} transposes",
                    spec.name
                );
                let weights: BTreeMap<String, Vec<u8>> = spec.package.weights.clone();
                let fast = Plan::compile(program, &weights, Precision::Fp32).unwrap();
                let exact = Plan::lower_unfused(program, &weights, Precision::Fp32).unwrap();
                let mut rng = Rng::new(3);
                let inputs: Vec<Vec<f32>> = exact
                    .inputs
                    .iter()
                    .map(|v| (0..v.ty.numel()).map(|_| rng.next_f32() - 0.5).collect())
                    .collect();
                for (got, want) in fast.run_once(&inputs).iter().zip(exact.run_once(&inputs)) {
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "{}: {g} vs {w}",
                            spec.name
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn malformed_transposes_are_left_for_lowering_to_report() {
        // The transpose declares a wrong result shape: no fold, and lowering fails.
        let text = "program(1.3)\n{\n    func main<ios18>(tensor<fp32, [2, 3]> a, tensor<fp32, [2, 3]> b) {\n\
                    \x20       tensor<fp32, [2, 3]> at = transpose(x = a, perm = tensor<int32, [2]>([1, 0]))[name = string(\"at\")];\n\
                    \x20       tensor<fp32, [3, 3]> c = matmul(x = at, y = b)[name = string(\"c\")];\n\
                    \x20   } -> (c);\n}\n";
        let program = crate::mil::parse(text).unwrap();
        assert_eq!(count(&rewrite(&program), Op::Transpose), 1);
        assert!(Plan::compile(&program, &BTreeMap::new(), Precision::Fp32).is_err());
    }
}
