//! The one list of MIL operations anemone knows. Each op is one row of the
//! table below: its MIL name, its family ([`Category`]), its parameters
//! ([`OpParam`]), the opset that introduced it and whether the reference ran it
//! on the ANE. Every other module matches on [`Op`] or on its category; the MIL
//! strings live only here.
//!
//! Adding an op is a row here. What it means lives elsewhere: its result types
//! in [`super::infer`] (by family: a new unary or binary op needs nothing
//! there), its values in the CPU backend.

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
pub struct OpParam {
    pub name: &'static str,
    pub kind: ParamKind,
    pub required: bool,
    /// For a constant string with a fixed set of values (gelu's `mode`,
    /// conv's `pad_type`): the values it may take, the default first.
    /// Empty for every other parameter.
    pub choices: &'static [&'static str],
}

impl OpParam {
    /// The value an optional string parameter with [`OpParam::choices`] takes when absent.
    pub fn default_choice(&self) -> Option<&'static str> {
        self.choices.first().copied()
    }
}

const fn req(name: &'static str, kind: ParamKind) -> OpParam {
    OpParam {
        name,
        kind,
        required: true,
        choices: &[],
    }
}

const fn opt(name: &'static str, kind: ParamKind) -> OpParam {
    OpParam {
        name,
        kind,
        required: false,
        choices: &[],
    }
}

/// An optional constant string that is one of `choices` (the first is the default).
const fn choice(name: &'static str, choices: &'static [&'static str]) -> OpParam {
    OpParam {
        name,
        kind: Const,
        required: false,
        choices,
    }
}

use ParamKind::{Attr, Const, ConstTensor, Tensor, Tuple};

/// The family of an op: modules that treat several ops alike (inference,
/// the CPU lowering) match on this instead of listing the ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Category {
    /// The result is a compile-time constant (`const`, `constexpr_*`).
    Constant,
    /// Elementwise float math on `x` (plus constant parameters); the result
    /// has the type of `x`.
    Unary,
    /// Elementwise on `x` and `y` with NumPy broadcasting; one dtype.
    Binary,
    /// Elementwise with rules of its own (`cast`, `select`, quantization).
    Elementwise,
    /// Along axes: `softmax` and the `reduce_*` ops.
    Reduction,
    /// Data movement: the values are the operand's, rearranged.
    Movement,
    /// Sums of products: `matmul`, `conv`, attention.
    Product,
}

/// The MIL opsets (Core ML's iOS versions) that introduced ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Opset {
    Ios15,
    Ios16,
    Ios17,
    Ios18,
}

impl fmt::Display for Opset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Opset::Ios15 => "iOS15",
            Opset::Ios16 => "iOS16",
            Opset::Ios17 => "iOS17",
            Opset::Ios18 => "iOS18",
        })
    }
}

/// One row of the table.
struct Def {
    name: &'static str,
    category: Category,
    since: Opset,
    ran_on_ane: bool,
    params: &'static [OpParam],
}

/// Declares [`Op`], [`Op::ALL`] and the table behind [`Op`]'s accessors from
/// one row per op.
macro_rules! ops {
    ($($variant:ident: $name:literal, $category:ident, $since:ident, $ane:literal, $params:expr;)*) => {
        /// A MIL operation kind. Variants mirror the MIL op names.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Op {
            $($variant,)*
        }

        const COUNT: usize = [$(Op::$variant,)*].len();

        /// The rows, in declaration order (`Op as usize` indexes them).
        static TABLE: [Def; COUNT] = [$(Def {
            name: $name,
            category: Category::$category,
            since: Opset::$since,
            ran_on_ane: $ane,
            params: $params,
        },)*];

        impl Op {
            /// Every op, in declaration order.
            pub const ALL: [Op; COUNT] = [$(Op::$variant,)*];
        }
    };
}

const BINARY: &[OpParam] = &[req("x", Tensor), req("y", Tensor)];
const UNARY: &[OpParam] = &[req("x", Tensor)];
const EPSILON: &[OpParam] = &[req("x", Tensor), opt("epsilon", Const)];
const REDUCE: &[OpParam] = &[
    req("x", Tensor),
    opt("axes", Const),
    opt("keep_dims", Const),
];
const DEQUANTIZE: &[OpParam] = &[
    req("input", Tensor),
    opt("zero_point", Const),
    req("scale", Const),
    opt("axis", Const),
];

// Parameters are listed without the `name` attribute and `const`'s `val`.
// "ANE" is whether the maderix/ANE reference ran the op on the hardware
// (ane-reference §4.3); the verifier warns about the others (ANE012).
ops! {
    // op:                     MIL name,                      family,      since, ANE,   parameters
    Const:                     "const",                       Constant,    Ios15, true,  &[];
    Cast:                      "cast",                        Elementwise, Ios15, true,  &[req("x", Tensor), req("dtype", Const)];
    Conv:                      "conv",                        Product,     Ios15, true,  &[
        req("x", Tensor), req("weight", Tensor), opt("bias", ConstTensor), opt("strides", Const),
        choice("pad_type", &["valid", "same", "same_lower", "custom"]), opt("pad", Const),
        opt("dilations", Const), opt("groups", Const),
    ];
    Matmul:                    "matmul",                      Product,     Ios15, true,  &[
        req("x", Tensor), req("y", Tensor), opt("transpose_x", Const), opt("transpose_y", Const),
    ];
    Add:                       "add",                         Binary,      Ios15, true,  BINARY;
    Sub:                       "sub",                         Binary,      Ios15, true,  BINARY;
    Mul:                       "mul",                         Binary,      Ios15, true,  BINARY;
    RealDiv:                   "real_div",                    Binary,      Ios15, false, BINARY;
    Maximum:                   "maximum",                     Binary,      Ios15, false, BINARY;
    Minimum:                   "minimum",                     Binary,      Ios15, false, BINARY;
    Pow:                       "pow",                         Binary,      Ios15, true,  BINARY;
    Sqrt:                      "sqrt",                        Unary,       Ios15, false, UNARY;
    Rsqrt:                     "rsqrt",                       Unary,       Ios15, false, EPSILON;
    Exp:                       "exp",                         Unary,       Ios15, false, UNARY;
    Log:                       "log",                         Unary,       Ios15, false, EPSILON;
    Tanh:                      "tanh",                        Unary,       Ios15, false, UNARY;
    Sigmoid:                   "sigmoid",                     Unary,       Ios15, true,  UNARY;
    Silu:                      "silu",                        Unary,       Ios15, false, UNARY;
    Relu:                      "relu",                        Unary,       Ios15, false, UNARY;
    Gelu:                      "gelu",                        Unary,       Ios15, false, &[
        req("x", Tensor), choice("mode", &["EXACT", "TANH_APPROXIMATION", "SIGMOID_APPROXIMATION"]),
    ];
    Softmax:                   "softmax",                     Reduction,   Ios15, true,  &[req("x", Tensor), opt("axis", Const)];
    ReduceSum:                 "reduce_sum",                  Reduction,   Ios15, true,  REDUCE;
    ReduceMean:                "reduce_mean",                 Reduction,   Ios15, false, REDUCE;
    ReduceMax:                 "reduce_max",                  Reduction,   Ios15, false, REDUCE;
    Reshape:                   "reshape",                     Movement,    Ios15, true,  &[req("x", Tensor), req("shape", Const)];
    Transpose:                 "transpose",                   Movement,    Ios15, true,  &[req("x", Tensor), req("perm", Const)];
    SliceBySize:               "slice_by_size",               Movement,    Ios15, true,  &[
        req("x", Tensor), req("begin", Const), req("size", Const),
    ];
    Concat:                    "concat",                      Movement,    Ios15, true,  &[
        req("values", Tuple), req("axis", Const), opt("interleave", Const),
    ];
    Split:                     "split",                       Movement,    Ios15, false, &[
        req("x", Tensor), opt("num_splits", Const), opt("split_sizes", Const), req("axis", Const),
    ];
    Select:                    "select",                      Elementwise, Ios15, false, &[
        req("cond", Tensor), req("a", Tensor), req("b", Tensor),
    ];
    Identity:                  "identity",                    Movement,    Ios15, false, UNARY;
    ConstexprAffineDequantize: "constexpr_affine_dequantize", Constant,    Ios16, true,  &[
        req("quantized_data", Attr), req("zero_point", Attr), req("scale", Attr), req("axis", Attr),
    ];
    Quantize:                  "quantize",                    Elementwise, Ios17, true,  &[
        req("input", Tensor), opt("zero_point", Const), req("scale", Const), opt("axis", Const),
        req("output_dtype", Const),
    ];
    Dequantize:                "dequantize",                  Elementwise, Ios17, true,  DEQUANTIZE;
    ScaledDotProductAttention: "scaled_dot_product_attention", Product,    Ios18, true,  &[
        req("query", Tensor), req("key", Tensor), req("value", Tensor), opt("attn_mask", Tensor),
    ];
}

impl Op {
    fn def(self) -> &'static Def {
        &TABLE[self as usize]
    }

    /// The op's name in MIL text.
    pub fn mil_name(self) -> &'static str {
        self.def().name
    }

    /// Inverse of [`Op::mil_name`].
    pub fn from_mil_name(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|o| o.mil_name() == name)
    }

    /// The op's family.
    pub fn category(self) -> Category {
        self.def().category
    }

    /// The opset that introduced the op.
    pub fn since(self) -> Opset {
        self.def().since
    }

    /// Whether the reference ran the op on the ANE (the rest is unverified there).
    pub fn ran_on_ane(self) -> bool {
        self.def().ran_on_ane
    }

    /// The op's parameters (MIL names), excluding the `name` attribute and `const`'s `val`.
    pub fn params(self) -> &'static [OpParam] {
        self.def().params
    }

    /// The parameter named `name`, if the op has one.
    pub fn param(self, name: &str) -> Option<&'static OpParam> {
        self.params().iter().find(|p| p.name == name)
    }

    /// True for ops whose result is a compile-time constant (`const`, `constexpr_*`).
    pub fn is_constant(self) -> bool {
        self.category() == Category::Constant
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

    #[test]
    fn parameters_are_unique_and_choices_are_optional_constants() {
        for op in Op::ALL {
            let mut names = std::collections::HashSet::new();
            for p in op.params() {
                assert!(names.insert(p.name), "{op}: `{}` twice", p.name);
                if !p.choices.is_empty() {
                    assert!(p.kind == Const && !p.required, "{op}: `{}`", p.name);
                }
            }
        }
        let pad_type = Op::Conv.param("pad_type").unwrap();
        assert_eq!(pad_type.default_choice(), Some("valid"));
        assert_eq!(Op::Add.param("x").unwrap().default_choice(), None);
    }

    #[test]
    fn families_group_the_ops_that_share_rules() {
        let of = |c: Category| -> Vec<Op> {
            Op::ALL.into_iter().filter(|o| o.category() == c).collect()
        };
        assert_eq!(
            of(Category::Constant),
            [Op::Const, Op::ConstexprAffineDequantize]
        );
        // Every unary op takes `x` and nothing but constants.
        for op in of(Category::Unary) {
            assert_eq!(op.params()[0], req("x", Tensor), "{op}");
            assert!(op.params()[1..].iter().all(|p| p.kind == Const), "{op}");
        }
        for op in of(Category::Binary) {
            assert_eq!(op.params(), BINARY, "{op}");
        }
    }
}
