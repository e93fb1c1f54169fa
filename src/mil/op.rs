//! The one list of MIL operations anemone knows, with their exact MIL names and
//! parameters. Every other module matches on [`Op`]; the MIL strings live only here.

use std::fmt;

/// How a parameter must be supplied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// A tensor argument: a variable (runtime or const) or an inline literal.
    Tensor,
    /// An argument that must be a compile-time constant (a `const` variable or inline literal).
    Const,
    /// A tensor operand that must also be a compile-time constant (conv's `bias`): checked
    /// like `Const`, consumed like `Tensor`.
    ConstTensor,
    /// A parenthesised tuple of tensor arguments (`values = (a, b)`).
    Tuple,
    /// An entry of the attribute block (`[name = ..., axis = int32(0)]`), not a call argument.
    Attr,
}

/// One parameter of an op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Param {
    pub name: &'static str,
    pub kind: ParamKind,
    pub required: bool,
}

const fn req(name: &'static str, kind: ParamKind) -> Param {
    Param {
        name,
        kind,
        required: true,
    }
}

const fn opt(name: &'static str, kind: ParamKind) -> Param {
    Param {
        name,
        kind,
        required: false,
    }
}

use ParamKind::{Attr, Const, ConstTensor, Tensor, Tuple};

/// A MIL operation kind. Variants mirror the MIL op names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Const,
    Cast,
    Conv,
    Matmul,
    Add,
    Sub,
    Mul,
    RealDiv,
    Maximum,
    Minimum,
    Pow,
    Sqrt,
    Rsqrt,
    Exp,
    Log,
    Tanh,
    Sigmoid,
    Silu,
    Relu,
    Softmax,
    ReduceSum,
    ReduceMean,
    ReduceMax,
    Reshape,
    Transpose,
    SliceBySize,
    Concat,
    Split,
    Select,
    Identity,
    ConstexprAffineDequantize,
    Quantize,
    Dequantize,
    ScaledDotProductAttention,
}

const BINARY: &[Param] = &[req("x", Tensor), req("y", Tensor)];
const UNARY: &[Param] = &[req("x", Tensor)];
const REDUCE: &[Param] = &[
    req("x", Tensor),
    opt("axes", Const),
    opt("keep_dims", Const),
];

impl Op {
    /// Every op, in declaration order.
    pub const ALL: [Op; 34] = [
        Op::Const,
        Op::Cast,
        Op::Conv,
        Op::Matmul,
        Op::Add,
        Op::Sub,
        Op::Mul,
        Op::RealDiv,
        Op::Maximum,
        Op::Minimum,
        Op::Pow,
        Op::Sqrt,
        Op::Rsqrt,
        Op::Exp,
        Op::Log,
        Op::Tanh,
        Op::Sigmoid,
        Op::Silu,
        Op::Relu,
        Op::Softmax,
        Op::ReduceSum,
        Op::ReduceMean,
        Op::ReduceMax,
        Op::Reshape,
        Op::Transpose,
        Op::SliceBySize,
        Op::Concat,
        Op::Split,
        Op::Select,
        Op::Identity,
        Op::ConstexprAffineDequantize,
        Op::Quantize,
        Op::Dequantize,
        Op::ScaledDotProductAttention,
    ];

    /// The op's name in MIL text.
    pub fn mil_name(self) -> &'static str {
        match self {
            Op::Const => "const",
            Op::Cast => "cast",
            Op::Conv => "conv",
            Op::Matmul => "matmul",
            Op::Add => "add",
            Op::Sub => "sub",
            Op::Mul => "mul",
            Op::RealDiv => "real_div",
            Op::Maximum => "maximum",
            Op::Minimum => "minimum",
            Op::Pow => "pow",
            Op::Sqrt => "sqrt",
            Op::Rsqrt => "rsqrt",
            Op::Exp => "exp",
            Op::Log => "log",
            Op::Tanh => "tanh",
            Op::Sigmoid => "sigmoid",
            Op::Silu => "silu",
            Op::Relu => "relu",
            Op::Softmax => "softmax",
            Op::ReduceSum => "reduce_sum",
            Op::ReduceMean => "reduce_mean",
            Op::ReduceMax => "reduce_max",
            Op::Reshape => "reshape",
            Op::Transpose => "transpose",
            Op::SliceBySize => "slice_by_size",
            Op::Concat => "concat",
            Op::Split => "split",
            Op::Select => "select",
            Op::Identity => "identity",
            Op::ConstexprAffineDequantize => "constexpr_affine_dequantize",
            Op::Quantize => "quantize",
            Op::Dequantize => "dequantize",
            Op::ScaledDotProductAttention => "scaled_dot_product_attention",
        }
    }

    /// Inverse of [`Op::mil_name`].
    pub fn from_mil_name(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|o| o.mil_name() == name)
    }

    /// The op's parameters (MIL names), excluding the `name` attribute and `const`'s `val`.
    pub fn params(self) -> &'static [Param] {
        match self {
            Op::Const => &[],
            Op::Cast => const { &[req("x", Tensor), req("dtype", Const)] },
            Op::Conv => {
                const {
                    &[
                        req("x", Tensor),
                        req("weight", Tensor),
                        opt("bias", ConstTensor),
                        opt("strides", Const),
                        opt("pad_type", Const),
                        opt("pad", Const),
                        opt("dilations", Const),
                        opt("groups", Const),
                    ]
                }
            }
            Op::Matmul => {
                const {
                    &[
                        req("x", Tensor),
                        req("y", Tensor),
                        opt("transpose_x", Const),
                        opt("transpose_y", Const),
                    ]
                }
            }
            Op::Add | Op::Sub | Op::Mul | Op::RealDiv | Op::Maximum | Op::Minimum | Op::Pow => {
                BINARY
            }
            Op::Sqrt | Op::Exp | Op::Tanh | Op::Sigmoid | Op::Silu | Op::Relu | Op::Identity => {
                UNARY
            }
            Op::Rsqrt | Op::Log => const { &[req("x", Tensor), opt("epsilon", Const)] },
            Op::Softmax => const { &[req("x", Tensor), opt("axis", Const)] },
            Op::ReduceSum | Op::ReduceMean | Op::ReduceMax => REDUCE,
            Op::Reshape => const { &[req("x", Tensor), req("shape", Const)] },
            Op::Transpose => const { &[req("x", Tensor), req("perm", Const)] },
            Op::SliceBySize => {
                const { &[req("x", Tensor), req("begin", Const), req("size", Const)] }
            }
            Op::Concat => {
                const {
                    &[
                        req("values", Tuple),
                        req("axis", Const),
                        opt("interleave", Const),
                    ]
                }
            }
            Op::Split => {
                const {
                    &[
                        req("x", Tensor),
                        opt("num_splits", Const),
                        opt("split_sizes", Const),
                        req("axis", Const),
                    ]
                }
            }
            Op::Select => const { &[req("cond", Tensor), req("a", Tensor), req("b", Tensor)] },
            Op::ConstexprAffineDequantize => {
                const {
                    &[
                        req("quantized_data", Attr),
                        req("zero_point", Attr),
                        req("scale", Attr),
                        req("axis", Attr),
                    ]
                }
            }
            Op::Quantize => {
                const {
                    &[
                        req("input", Tensor),
                        opt("zero_point", Const),
                        req("scale", Const),
                        opt("axis", Const),
                        req("output_dtype", Const),
                    ]
                }
            }
            Op::Dequantize => {
                const {
                    &[
                        req("input", Tensor),
                        opt("zero_point", Const),
                        req("scale", Const),
                        opt("axis", Const),
                    ]
                }
            }
            Op::ScaledDotProductAttention => {
                const {
                    &[
                        req("query", Tensor),
                        req("key", Tensor),
                        req("value", Tensor),
                        opt("attn_mask", Tensor),
                    ]
                }
            }
        }
    }

    /// The parameter named `name`, if the op has one.
    pub fn param(self, name: &str) -> Option<&'static Param> {
        self.params().iter().find(|p| p.name == name)
    }

    /// True for ops whose result is a compile-time constant (`const`, `constexpr_*`).
    pub fn is_constant(self) -> bool {
        matches!(self, Op::Const | Op::ConstexprAffineDequantize)
    }

    /// Elementwise binary ops with NumPy broadcasting.
    pub fn is_binary_elementwise(self) -> bool {
        matches!(
            self,
            Op::Add | Op::Sub | Op::Mul | Op::RealDiv | Op::Maximum | Op::Minimum | Op::Pow
        )
    }

    /// Elementwise unary float ops.
    pub fn is_unary_elementwise(self) -> bool {
        matches!(
            self,
            Op::Sqrt
                | Op::Rsqrt
                | Op::Exp
                | Op::Log
                | Op::Tanh
                | Op::Sigmoid
                | Op::Silu
                | Op::Relu
                | Op::Identity
        )
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.mil_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for op in Op::ALL {
            assert!(
                seen.insert(op.mil_name()),
                "duplicate name {}",
                op.mil_name()
            );
            assert_eq!(Op::from_mil_name(op.mil_name()), Some(op));
        }
        assert_eq!(Op::from_mil_name("conv2d"), None);
    }
}
