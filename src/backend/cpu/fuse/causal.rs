//! Causal attention, fused (the kernels are in `attention.rs`): the scores'
//! softmax with a causal constant mask, the products with its probabilities,
//! and the softmax backward. A fused result that is zero beyond per-row
//! extents carries them in [`Facts`], so that its consumers skip the zeros.
//! fp32 values only.

use super::super::attention::{
    Attend, CausalMask, MatrixLayout, Scores, SoftmaxBackward, TriMatmul,
};
use super::super::kernel::StepKernel;
use super::super::values::{ValueSlot, Values};
use super::facts::{ExtentsOf, Facts, Fused, RowExtents};
use super::pattern::{Pat, commuting, match_at, op};
use super::softmax::masked_softmax_parts;
use crate::mil::{DType, Op, Operation, TensorType};

/// The operands of a `matmul` whose operands both have the batch dimensions of
/// its result (no broadcasting): slots, transpose flags, and the batch count.
struct MatmulParts {
    x: ValueSlot,
    y: ValueSlot,
    tx: bool,
    ty: bool,
    batches: usize,
}

/// The operands of `matmul` `op` if both are tensors with its result's batch
/// dimensions and rank.
fn matmul_parts(values: &Values, op: &Operation) -> Option<MatmulParts> {
    if op.op != Op::Matmul {
        return None;
    }
    let var = |p: &str| match op.arg(p) {
        Some(crate::mil::Arg::Var(name)) => values.slot(name),
        _ => None,
    };
    let (x, y) = (var("x")?, var("y")?);
    let out = &op.outputs[0].ty;
    let r = out.rank();
    let same_batch = |t: &TensorType| t.rank() == r && t.shape[..r - 2] == out.shape[..r - 2];
    if r < 2 || !same_batch(values.ty(x)) || !same_batch(values.ty(y)) {
        return None;
    }
    let ctx = values.ctx(op);
    Some(MatmulParts {
        x,
        y,
        tx: ctx.flag("transpose_x").unwrap_or(false),
        ty: ctx.flag("transpose_y").unwrap_or(false),
        batches: out.shape[..r - 2].iter().product(),
    })
}

/// `softmax(matmul(q, k^T) * scale + mask)` with `mask` a constant whose
/// rows end in skippable columns (the causal mask): the probabilities,
/// computed blockwise without the skipped columns, and their row extents.
pub(crate) fn causal_scores<'p>(
    values: &Values<'p>,
    _: &Facts,
    op: &'p Operation,
    _: &StepKernel,
    _: &[ValueSlot],
) -> Option<Fused> {
    let (scores, mask, scale) = masked_softmax_parts(values, op)?;
    let x = values.type_of(scores)?;
    let r = x.rank();
    let t = x.shape[r - 1];
    if x.shape[r - 2] != t || !values.exact(x) || values.uses(scores) != 1 {
        return None;
    }
    let parts = matmul_parts(values, values.def(scores)?)?;
    let mask_slot = values.slot(mask)?;
    let causal = CausalMask::analyze(values.constant(mask_slot)?, t)?;
    let d = match parts.tx {
        false => values.ty(parts.x).shape[r - 1],
        true => values.ty(parts.x).shape[r - 2],
    };
    let layout = |t_: bool| MatrixLayout {
        rows: t,
        cols: d,
        t: t_,
    };
    let kernel = Scores {
        batches: parts.batches,
        q: layout(parts.tx),
        k: layout(!parts.ty),
        scale,
        mask: causal,
    };
    let args = [parts.x, parts.y, mask_slot];
    Some(Fused {
        kernel: StepKernel::CausalScores(kernel.clone()),
        args: args.to_vec(),
        chain: None,
        hidden: Some(TensorType::new(DType::Fp32, vec![parts.batches, t])),
        extents: Some(ExtentsOf::Hidden(Some((kernel, args)))),
    })
}

/// A `matmul` with causal probabilities (or their gradient) as one
/// operand: blockwise without the zero blocks; `P V` straight from the
/// scores' operands when `P` comes from [`causal_scores`].
pub(crate) fn causal_product<'p>(
    values: &Values<'p>,
    facts: &Facts,
    op: &'p Operation,
    _: &StepKernel,
    _: &[ValueSlot],
) -> Option<Fused> {
    let parts = matmul_parts(values, op)?;
    let out = &op.outputs[0].ty;
    let r = out.rank();
    let (m, n) = (out.shape[r - 2], out.shape[r - 1]);
    let layout = |rows, cols, t| MatrixLayout { rows, cols, t };
    // out = op(P) op(Y), or out^T = op(P)^T op(X)^T when P is the right operand.
    let (extents, p, p_t, y, y_layout, out_layout) =
        match (facts.extents.get(&parts.x), facts.extents.get(&parts.y)) {
            (Some(e), None) => {
                let (t, y_t) = (e.t, parts.ty);
                (
                    e,
                    parts.x,
                    parts.tx,
                    parts.y,
                    layout(t, n, y_t),
                    layout(t, n, false),
                )
            }
            (None, Some(e)) => {
                let (t, x_t) = (e.t, !parts.tx);
                (
                    e,
                    parts.y,
                    !parts.ty,
                    parts.x,
                    layout(t, m, x_t),
                    layout(t, m, true),
                )
            }
            _ => return None,
        };
    if !values.exact(out) || extents.batches != parts.batches {
        return None;
    }
    if let (false, Some((scores, [q, k, mask]))) = (p_t, &extents.source) {
        let kernel = Attend {
            scores: scores.clone(),
            v: y_layout,
            out: out_layout,
        };
        return Some(Fused::plain(
            StepKernel::Attend(kernel),
            vec![*q, *k, *mask, y],
        ));
    }
    let kernel = TriMatmul {
        batches: extents.batches,
        t: extents.t,
        p_t,
        y: y_layout,
        out: out_layout,
    };
    Some(Fused::plain(
        StepKernel::TriMatmul(kernel),
        vec![p, extents.ext, y],
    ))
}

/// `dP * P`, either order.
const PRODUCT: Pat = commuting(
    Op::Mul,
    "product",
    &[("x", Pat::Value("dp")), ("y", Pat::Value("p"))],
);
/// `reduce_sum(dP * P)` (the axes are checked by the fusion).
const ROWSUM: Pat = op(Op::ReduceSum, "rowsum", &[("x", PRODUCT)]);
/// `dP - reduce_sum(dP * P)`.
const CENTERED: Pat = op(
    Op::Sub,
    "centered",
    &[("x", Pat::Value("dp")), ("y", ROWSUM)],
);
/// `P * (dP - reduce_sum(dP * P))`, either order: the softmax backward.
const SOFTMAX_BACKWARD: Pat = commuting(
    Op::Mul,
    "backward",
    &[("x", Pat::Value("p")), ("y", CENTERED)],
);
/// The softmax backward times a constant scalar, either order.
const SCALED_SOFTMAX_BACKWARD: Pat = commuting(
    Op::Mul,
    "scaled",
    &[("x", SOFTMAX_BACKWARD), ("y", Pat::Scalar("scale"))],
);

/// The softmax backward of attention (optionally times a constant scalar)
/// with `P` causal probabilities, the row sums along the last axis kept,
/// and `dP` a `matmul` used only here (twice): one blockwise pass.
pub(crate) fn softmax_backward<'p>(
    values: &Values<'p>,
    facts: &Facts,
    op: &'p Operation,
    _: &StepKernel,
    _: &[ValueSlot],
) -> Option<Fused> {
    if op.op != Op::Mul || !values.exact(&op.outputs[0].ty) {
        return None;
    }
    let m = match_at(values, op, &SCALED_SOFTMAX_BACKWARD)
        .or_else(|| match_at(values, op, &SOFTMAX_BACKWARD))?;
    let (p, dp) = (m.value("p")?, m.value("dp")?);
    let extents = facts.extents.get(&values.slot(p)?)?;
    let ty = values.type_of(p)?;
    let rowsum = values.ctx(m.op("rowsum")?);
    let rank = ty.rank() as i64;
    let fits = values.uses(dp) == 2
        && matches!(rowsum.ints("axes"), Some([a]) if *a == -1 || *a == rank - 1)
        && rowsum.flag("keep_dims") == Some(true)
        && values.type_of(dp) == Some(ty)
        && ["product", "centered", "backward"]
            .iter()
            .all(|name| m.op(name).is_some_and(|o| o.outputs[0].ty == *ty));
    let parts = matmul_parts(values, values.def(dp)?).filter(|_| fits)?;
    let r = ty.rank();
    if parts.batches != extents.batches || ty.shape[r - 2..] != [extents.t, extents.t] {
        return None;
    }
    let e = match parts.tx {
        false => values.ty(parts.x).shape[r - 1],
        true => values.ty(parts.x).shape[r - 2],
    };
    let t = extents.t;
    let kernel = SoftmaxBackward {
        batches: extents.batches,
        t,
        a: MatrixLayout {
            rows: t,
            cols: e,
            t: parts.tx,
        },
        b: MatrixLayout {
            rows: e,
            cols: t,
            t: parts.ty,
        },
        scale: m.scalar("scale"),
    };
    Some(Fused {
        kernel: StepKernel::SoftmaxBackward(kernel),
        args: vec![values.slot(p)?, extents.ext, parts.x, parts.y],
        chain: None,
        hidden: None,
        // The gradient is zero where `P` is, but it is not `P`: no source.
        extents: Some(ExtentsOf::Same(RowExtents {
            source: None,
            ..extents.clone()
        })),
    })
}
