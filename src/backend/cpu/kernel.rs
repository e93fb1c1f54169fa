//! The plain interpreter: what one plan step runs ([`StepKernel`]) and the
//! lowering table from an operation to its kernel ([`StepKernel::lower`]),
//! one arm per op family or op, each handing the operation to the compiler
//! in the math file of its family.
//!
//! This file knows nothing of slots' homes, of running a plan, or of
//! fusions; the fused kernels are listed here only because a step may run
//! one (`fuse` makes them).

use super::values::{OpCtx, ValueSlot};
use super::{attention, elementwise, gemm, reduce, shape};
use crate::mil::op::Category;
use crate::mil::{DType, Op, Operation};

/// A lowered operation: parameters resolved, ready to run on `f32` slices.
#[derive(Debug)]
pub(super) enum StepKernel {
    /// `reshape`, `identity`: the plan gives the result the operand's storage
    /// (this variant only marks them; it never runs as a step).
    Copy,
    Unary(elementwise::Unary),
    Binary(elementwise::Binary),
    Select(elementwise::Broadcast),
    Cast(DType),
    Quantize(elementwise::Quantize),
    Dequantize(elementwise::Dequantize),
    Softmax(reduce::Softmax),
    /// `softmax(x * scale + mask)`, fused.
    MaskedSoftmax(reduce::MaskedSoftmax),
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
    /// Causal `softmax(Q K^T * scale + mask)` and its row extents (see [`attention`]).
    CausalScores(attention::Scores),
    /// Causal `softmax(Q K^T * scale + mask) V`, the probabilities never stored.
    Attend(attention::Attend),
    /// A product with causal probabilities (or their gradient) as one factor.
    TriMatmul(attention::TriMatmul),
    /// `P * (dP - rowsum(dP * P)) [* scale]` with `dP` a product, fused.
    SoftmaxBackward(attention::SoftmaxBackward),
    /// Consecutive elementwise ops in one pass (see [`elementwise::Chain`]).
    Chain(elementwise::Chain),
    /// Slices, scalar `mul`s and a `concat` rebuilding pairs (see [`shape::Pairs`]).
    Pairs(shape::Pairs),
}

impl StepKernel {
    /// The kernel of a checked, non-constant operation, op by op (no fusion).
    pub(super) fn lower(ctx: &OpCtx) -> StepKernel {
        match ctx.op.op.category() {
            Category::Unary => return StepKernel::Unary(elementwise::compile_unary(ctx)),
            Category::Binary => return StepKernel::Binary(elementwise::compile_binary(ctx)),
            _ => {}
        }
        match ctx.op.op {
            Op::Identity | Op::Reshape => StepKernel::Copy,
            Op::Select => StepKernel::Select(elementwise::compile_select(ctx)),
            Op::Cast => StepKernel::Cast(elementwise::compile_cast(ctx)),
            Op::Quantize => StepKernel::Quantize(elementwise::compile_quantize(ctx)),
            Op::Dequantize => StepKernel::Dequantize(elementwise::compile_dequantize(ctx)),
            Op::Softmax => StepKernel::Softmax(reduce::compile_softmax(ctx)),
            Op::ReduceSum | Op::ReduceMean | Op::ReduceMax => {
                StepKernel::Reduce(reduce::compile_reduce(ctx))
            }
            Op::Transpose => StepKernel::Gather(shape::compile_transpose(ctx)),
            Op::SliceBySize => StepKernel::Gather(shape::compile_slice(ctx)),
            Op::Concat => StepKernel::Concat(shape::compile_concat(ctx)),
            Op::Split => StepKernel::Split(shape::compile_split(ctx)),
            Op::Matmul => StepKernel::Matmul(gemm::compile_matmul(ctx)),
            Op::Conv => StepKernel::Conv(gemm::compile_conv(ctx)),
            Op::ScaledDotProductAttention => StepKernel::Attention(gemm::compile_attention(ctx)),
            other => unreachable!("`{other}` is lowered by its family or is a constant"),
        }
    }

    /// Compute the results from the operand values (in parameter order) into
    /// `outs`, overwriting every element.
    pub(super) fn run(&self, args: &[&[f32]], outs: &mut [&mut [f32]]) {
        let out = &mut *outs[0];
        match self {
            StepKernel::Copy => unreachable!("reshapes alias their operand and never run"),
            StepKernel::Unary(k) => k.run(args[0], out),
            StepKernel::Binary(k) => k.run(args[0], args[1], out),
            StepKernel::Select(b) => b.map([args[0], args[1], args[2]], out, |[c, a, b]| {
                if c != 0.0 { a } else { b }
            }),
            StepKernel::Cast(dtype) => {
                let dtype = *dtype;
                elementwise::map(args[0], out, move |v| elementwise::convert(v, dtype))
            }
            StepKernel::Quantize(k) => k.run(args[0], out),
            StepKernel::Dequantize(k) => k.run(args[0], out),
            StepKernel::Softmax(k) => k.run(args[0], out),
            StepKernel::MaskedSoftmax(k) => k.run(args[0], args[1], out),
            StepKernel::Reduce(k) => k.run(args[0], out),
            StepKernel::Gather(view) => view.gather(args[0], out),
            StepKernel::Split(views) => {
                for (view, out) in views.iter().zip(outs.iter_mut()) {
                    view.gather(args[0], out);
                }
            }
            StepKernel::Concat(k) => k.run(args, out),
            StepKernel::Matmul(k) => k.run(args[0], args[1], out),
            StepKernel::Conv(k) => k.run(args[0], args[1], args.get(2).copied(), out),
            StepKernel::Attention(k) => k.run(args[0], args[1], args[2], args.get(3).copied(), out),
            StepKernel::CausalScores(k) => {
                let [p, ext] = outs else {
                    unreachable!("causal scores have two results")
                };
                k.run(args[0], args[1], args[2], p, ext)
            }
            StepKernel::Attend(k) => k.run(args[0], args[1], args[2], args[3], out),
            StepKernel::TriMatmul(k) => k.run(args[0], args[1], args[2], out),
            StepKernel::SoftmaxBackward(k) => k.run(args[0], args[1], args[2], args[3], out),
            StepKernel::Chain(k) => k.run(args, out),
            StepKernel::Pairs(k) => k.run(args[0], out),
        }
    }

    /// `op -> result type` (the first result), naming fused steps by what they fuse.
    pub(super) fn label(&self, op: &Operation) -> String {
        let name = match self {
            StepKernel::MaskedSoftmax(_) => "softmax(x*s+mask)".to_string(),
            StepKernel::CausalScores(_) => "causal softmax(Q.K^T*s+mask)".to_string(),
            StepKernel::Attend(_) => "causal attention softmax(Q.K^T*s+mask).V".to_string(),
            StepKernel::TriMatmul(k) => {
                format!("matmul(causal P{})", if k.p_t { "^T" } else { "" })
            }
            StepKernel::SoftmaxBackward(_) => "softmax backward P*(dP-rowsum(dP*P))".to_string(),
            StepKernel::Chain(k) => format!("fused {} elementwise ops", k.instrs.len()),
            StepKernel::Pairs(_) => "pairs (slices, mul, concat)".to_string(),
            StepKernel::Matmul(m) => format!("matmul{}", m.flags_label()),
            _ => op.op.to_string(),
        };
        match op.outputs.first() {
            Some(out) => format!("{name} -> {}", out.ty),
            None => name,
        }
    }
}

/// One step of a plan: a kernel and the slots it reads and writes.
#[derive(Debug)]
pub(super) struct Step {
    pub(super) kernel: StepKernel,
    pub(super) args: Vec<ValueSlot>,
    pub(super) results: Vec<ValueSlot>,
    /// The op and its result type, for the op profile.
    pub(super) label: String,
}
