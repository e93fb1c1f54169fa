//! RoPE's pair rotation `(a, b) -> (-b, a)`, written as two one-element
//! slices along the last axis of one tensor `x` of the result's shape, each
//! possibly times a constant scalar, and a `concat` of the two: one pass over
//! `x` ([`Pairs`]). fp32 values only.

use super::super::kernel::StepKernel;
use super::super::shape::Pairs;
use super::super::values::{ValueSlot, Values};
use super::facts::{Facts, Fused};
use super::pattern::{Pat, commuting, match_at, op};
use crate::mil::{Op, Operation};

const SLICE_0: Pat = op(Op::SliceBySize, "slice0", &[("x", Pat::Value("x"))]);
const SLICE_1: Pat = op(Op::SliceBySize, "slice1", &[("x", Pat::Value("x"))]);
/// A slice of `x`, or a slice of `x` times a constant scalar.
const MEMBER_0: Pat = Pat::Either(&[
    SLICE_0,
    commuting(
        Op::Mul,
        "mul0",
        &[("x", SLICE_0), ("y", Pat::Scalar("factor0"))],
    ),
]);
const MEMBER_1: Pat = Pat::Either(&[
    SLICE_1,
    commuting(
        Op::Mul,
        "mul1",
        &[("x", SLICE_1), ("y", Pat::Scalar("factor1"))],
    ),
]);
/// `concat((member0, member1))`.
const PAIRS: Pat = op(
    Op::Concat,
    "concat",
    &[("values", Pat::Tuple(&[MEMBER_0, MEMBER_1]))],
);

/// The fused pair rotation ending at `concat` `op`: along the last axis of
/// two elements, each slice one element of it (column 0 or 1) over the
/// whole of `x`.
pub(crate) fn pairs<'p>(
    values: &Values<'p>,
    _: &Facts,
    op: &'p Operation,
    _: &StepKernel,
    _: &[ValueSlot],
) -> Option<Fused> {
    let out = &op.outputs[0].ty;
    let r = out.rank();
    if op.op != Op::Concat || r == 0 || out.shape[r - 1] != 2 || !values.exact(out) {
        return None;
    }
    let ctx = values.ctx(op);
    let axis = ctx.int("axis")?;
    if !(axis == -1 || axis == r as i64 - 1) || ctx.flag("interleave").unwrap_or(false) {
        return None;
    }
    let m = match_at(values, op, &PAIRS)?;
    let x = m.value("x")?;
    if values.type_of(x) != Some(out) {
        return None;
    }
    let mut want_size: Vec<i64> = out.shape.iter().map(|&d| d as i64).collect();
    want_size[r - 1] = 1;
    let mut from = [(0usize, 1.0f32); 2];
    for (k, (slice, factor)) in [("slice0", "factor0"), ("slice1", "factor1")]
        .into_iter()
        .enumerate()
    {
        let slice = values.ctx(m.op(slice)?);
        let (begin, size) = (slice.ints("begin")?, slice.ints("size")?);
        let col = begin[r - 1];
        let fits =
            begin[..r - 1].iter().all(|&b| b == 0) && (col == 0 || col == 1) && size == want_size;
        if !fits {
            return None;
        }
        from[k] = (col as usize, m.scalar(factor).unwrap_or(1.0));
    }
    Some(Fused::plain(
        StepKernel::Pairs(Pairs { from }),
        vec![values.slot(x)?],
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::backend::Precision;
    use crate::backend::cpu::plan::tests::{program, run};
    use crate::backend::cpu::plan::{Plan, Workspace};

    /// RoPE's pair rotation `(a, b) -> (-b, a)` (two slices, a `mul`, a
    /// `concat`) runs as one step with the separate ops' values.
    #[test]
    fn pair_rotation_fuses_and_matches_the_separate_ops() {
        let body = "        tensor<fp32, [1, 3, 1]> e = slice_by_size(x = x, begin = tensor<int32, [3]>([0, 0, 0]), size = tensor<int32, [3]>([1, 3, 1]))[name = string(\"e\")];\n\
                    \x20       tensor<fp32, [1, 3, 1]> o = slice_by_size(x = x, begin = tensor<int32, [3]>([0, 0, 1]), size = tensor<int32, [3]>([1, 3, 1]))[name = string(\"o\")];\n\
                    \x20       tensor<fp32, [1, 3, 1]> n = mul(x = o, y = fp32(-1))[name = string(\"n\")];\n\
                    \x20       tensor<fp32, [1, 3, 2]> r = concat(values = (n, e), axis = int32(-1))[name = string(\"r\")];\n";
        let program = program(body, "tensor<fp32, [1, 3, 2]> x", "r");
        let fused = Plan::compile(&program, &BTreeMap::new(), Precision::Fp32).unwrap();
        let separate = Plan::lower_unfused(&program, &BTreeMap::new(), Precision::Fp32).unwrap();
        assert_eq!(
            fused.step_labels(),
            ["pairs (slices, mul, concat) -> tensor<fp32, [1, 3, 2]>"]
        );
        let x = [1.0, 2.0, 3.0, -4.0, 5.5, 0.0];
        let got = run(&fused, &mut Workspace::default(), &[&x]);
        assert_eq!(got, run(&separate, &mut Workspace::default(), &[&x]));
        assert_eq!(got[0], [-2.0, 1.0, 4.0, 3.0, -0.0, 5.5]);
    }
}
