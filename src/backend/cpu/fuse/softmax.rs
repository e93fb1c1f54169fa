//! `softmax(x * scale + mask)` along the last axis, with `scale` a constant
//! scalar and `mask` of shape `[1, .., 1, L, S]`: one pass over the scores
//! instead of three (the `mul` and `add` steps become dead).

use super::super::kernel::StepKernel;
use super::super::reduce::MaskedSoftmax;
use super::super::values::{ValueSlot, Values};
use super::facts::{Facts, Fused};
use super::pattern::{Match, Pat, match_at, op};
use crate::backend::Precision;
use crate::mil::{DType, Op, Operation};

/// `scores * scale`, `scale` a constant scalar.
const SCALED: Pat = op(
    Op::Mul,
    "mul",
    &[("x", Pat::Value("scores")), ("y", Pat::Scalar("scale"))],
);
/// `scores * scale + mask`.
const MASKED: Pat = op(Op::Add, "add", &[("x", SCALED), ("y", Pat::Value("mask"))]);
/// `softmax(scores * scale + mask)`.
const MASKED_SOFTMAX: Pat = op(Op::Softmax, "softmax", &[("x", MASKED)]);

/// The scores, mask and scale of `op` if it is a `softmax(x * scale + mask)`
/// this file fuses: along the last axis, a mask of the scores' last two
/// dimensions, one type throughout.
pub(crate) fn masked_softmax_parts<'p>(
    values: &Values<'p>,
    op: &'p Operation,
) -> Option<(&'p str, &'p str, f32)> {
    let m: Match<'p> = match_at(values, op, &MASKED_SOFTMAX)?;
    let (scores, mask, scale) = (m.value("scores")?, m.value("mask")?, m.scalar("scale")?);
    let (x, mk) = (values.type_of(scores)?, values.type_of(mask)?);
    let rank = x.rank();
    let axis = values.ctx(op).int("axis").unwrap_or(-1);
    let fits = rank >= 2
        && (axis == -1 || axis == rank as i64 - 1)
        && mk.dtype == x.dtype
        && mk.rank() == rank
        && mk.shape[rank - 2..] == x.shape[rank - 2..]
        && mk.shape[..rank - 2].iter().all(|&d| d == 1)
        && [m.op("add")?, m.op("mul")?, op]
            .iter()
            .all(|o| o.outputs[0].ty == *x);
    fits.then_some((scores, mask, scale))
}

/// The fused step of a masked softmax (both precisions: the kernel rounds as
/// the separate ops would).
pub(crate) fn masked_softmax<'p>(
    values: &Values<'p>,
    _: &Facts,
    op: &'p Operation,
    _: &StepKernel,
    _: &[ValueSlot],
) -> Option<Fused> {
    let (scores, mask, scale) = masked_softmax_parts(values, op)?;
    let x = values.type_of(scores)?;
    let rank = x.rank();
    let round = values.precision == Precision::Fp16 && x.dtype == DType::Fp16;
    let kernel = MaskedSoftmax::new(scale, x.shape[rank - 1], x.shape[rank - 2], round);
    let args = vec![values.slot(scores)?, values.slot(mask)?];
    Some(Fused::plain(StepKernel::MaskedSoftmax(kernel), args))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::backend::Precision;
    use crate::backend::cpu::elementwise;
    use crate::backend::cpu::plan::tests::{program, run};
    use crate::backend::cpu::plan::{Plan, Workspace};

    #[test]
    fn scaled_masked_softmax_fuses_and_matches_the_separate_ops() {
        // p = softmax(s * 0.3 + mask), fused and op by op.
        let body = "        tensor<fp16, [1, 2, 3, 4]> m = mul(x = s, y = fp16(0.3))[name = string(\"m\")];\n\
                    \x20       tensor<fp16, [1, 2, 3, 4]> a = add(x = m, y = mask)[name = string(\"a\")];\n\
                    \x20       tensor<fp16, [1, 2, 3, 4]> p = softmax(x = a, axis = int32(-1))[name = string(\"p\")];\n";
        let sig = "tensor<fp16, [1, 2, 3, 4]> s, tensor<fp16, [1, 1, 3, 4]> mask";
        let mut rng = crate::rng::Rng::new(5);
        let scores: Vec<f32> = (0..24).map(|_| 8.0 * rng.next_f32() - 4.0).collect();
        let mask: Vec<f32> = (0..12)
            .map(|i| if i % 4 > i / 4 { -65504.0 } else { 0.0 })
            .collect();
        for precision in [Precision::Fp32, Precision::Fp16] {
            let program = program(body, sig, "p");
            let fused = Plan::compile(&program, &BTreeMap::new(), precision).unwrap();
            let separate = Plan::lower_unfused(&program, &BTreeMap::new(), precision).unwrap();
            assert_eq!(
                (fused.step_labels().len(), separate.step_labels().len()),
                (1, 3)
            );
            let mut inputs = [scores.clone(), mask.clone()];
            if precision == Precision::Fp16 {
                for v in inputs.iter_mut() {
                    elementwise::round_to_fp16(v);
                }
            }
            let args = [&inputs[0][..], &inputs[1][..]];
            let got = run(&fused, &mut Workspace::default(), &args);
            let want = run(&separate, &mut Workspace::default(), &args);
            assert_eq!(got[0], want[0], "{precision:?}");
            // Masked positions get probability 0; rows sum to 1.
            assert_eq!(got[0][1], 0.0);
            assert!((got[0][20..24].iter().sum::<f32>() - 1.0).abs() < 2e-3);
        }
    }

    /// The pattern's inner ops must be used only by their consumer: with the
    /// scaled scores also an output, nothing fuses (the plan keeps three steps).
    #[test]
    fn an_intermediate_used_elsewhere_is_not_absorbed() {
        let body = "        tensor<fp32, [1, 2, 3]> m = mul(x = s, y = fp32(0.3))[name = string(\"m\")];\n\
                    \x20       tensor<fp32, [1, 2, 3]> a = add(x = m, y = mask)[name = string(\"a\")];\n\
                    \x20       tensor<fp32, [1, 2, 3]> p = softmax(x = a, axis = int32(-1))[name = string(\"p\")];\n";
        let sig = "tensor<fp32, [1, 2, 3]> s, tensor<fp32, [1, 2, 3]> mask";
        let program = program(body, sig, "p, m");
        let fused = Plan::compile(&program, &BTreeMap::new(), Precision::Fp32).unwrap();
        assert_eq!(fused.step_labels().len(), 3);
        let separate = Plan::lower_unfused(&program, &BTreeMap::new(), Precision::Fp32).unwrap();
        let (s, mask) = ([0.5, -1.0, 2.0, 0.0, 1.5, -0.25], [0.0; 6]);
        let args = [&s[..], &mask[..]];
        assert_eq!(
            run(&fused, &mut Workspace::default(), &args),
            run(&separate, &mut Workspace::default(), &args)
        );
    }
}
