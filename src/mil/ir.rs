//! The MIL intermediate representation: dtypes, tensor types, literals and the
//! program/function/operation graph. Plain data, no I/O; `emit` and `parse`
//! translate it to and from text, `infer`/`verify` check it, `build` makes it.

use std::fmt;

use super::op::Op;

/// Element types a MIL value may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    Fp16,
    Fp32,
    Int8,
    Uint8,
    Int32,
    Uint64,
    Bool,
    String,
}

impl DType {
    /// Every dtype, in declaration order.
    pub const ALL: [DType; 8] = [
        DType::Fp16,
        DType::Fp32,
        DType::Int8,
        DType::Uint8,
        DType::Int32,
        DType::Uint64,
        DType::Bool,
        DType::String,
    ];

    /// The spelling used in MIL text (`fp16`, `int32`, ...).
    pub fn mil_name(self) -> &'static str {
        match self {
            DType::Fp16 => "fp16",
            DType::Fp32 => "fp32",
            DType::Int8 => "int8",
            DType::Uint8 => "uint8",
            DType::Int32 => "int32",
            DType::Uint64 => "uint64",
            DType::Bool => "bool",
            DType::String => "string",
        }
    }

    /// Inverse of [`DType::mil_name`].
    pub fn from_mil_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.mil_name() == name)
    }

    /// `fp16` or `fp32`.
    pub fn is_float(self) -> bool {
        matches!(self, DType::Fp16 | DType::Fp32)
    }

    /// Any integer dtype.
    pub fn is_int(self) -> bool {
        matches!(
            self,
            DType::Int8 | DType::Uint8 | DType::Int32 | DType::Uint64
        )
    }

    /// Bytes per element in a weight blob or I/O buffer; `None` for strings.
    pub fn byte_size(self) -> Option<usize> {
        match self {
            DType::Fp16 => Some(2),
            DType::Fp32 | DType::Int32 => Some(4),
            DType::Int8 | DType::Uint8 | DType::Bool => Some(1),
            DType::Uint64 => Some(8),
            DType::String => None,
        }
    }

    /// Inclusive value range of an integer dtype.
    pub fn int_range(self) -> Option<(i128, i128)> {
        match self {
            DType::Int8 => Some((i8::MIN as i128, i8::MAX as i128)),
            DType::Uint8 => Some((0, u8::MAX as i128)),
            DType::Int32 => Some((i32::MIN as i128, i32::MAX as i128)),
            DType::Uint64 => Some((0, u64::MAX as i128)),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.mil_name())
    }
}

/// A tensor type: dtype plus static shape. Rank 0 is a scalar.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorType {
    pub fn new(dtype: DType, shape: impl Into<Vec<usize>>) -> Self {
        TensorType {
            dtype,
            shape: shape.into(),
        }
    }

    pub fn scalar(dtype: DType) -> Self {
        TensorType {
            dtype,
            shape: Vec::new(),
        }
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn is_scalar(&self) -> bool {
        self.shape.is_empty()
    }

    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of a dense buffer of this type; `None` for strings.
    pub fn byte_size(&self) -> Option<usize> {
        self.dtype.byte_size().map(|b| b * self.numel())
    }
}

impl fmt::Display for TensorType {
    /// Canonical `program(1.3)` spelling: `fp16` for a scalar, `tensor<fp16, [1, 2]>` otherwise.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_scalar() {
            return f.write_str(self.dtype.mil_name());
        }
        write!(f, "tensor<{}, [", self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]>")
    }
}

/// A reference to data in a weight blob file: `BLOBFILE(path = string(...), offset = uint64(...))`.
/// `offset` is the file offset of the blob's 64-byte metadata record, not of its payload.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BlobRef {
    pub path: String,
    pub offset: u64,
}

/// The payload of a literal. Floats are stored as `f32` already rounded to the
/// literal's dtype (an fp16 literal holds exactly representable fp16 values).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Float(Vec<f32>),
    Int(Vec<i64>),
    Bool(Vec<bool>),
    Str(Vec<String>),
    Blob(BlobRef),
}

/// A typed constant: inline scalar or tensor, or a BLOBFILE reference.
#[derive(Clone, Debug, PartialEq)]
pub struct Literal {
    pub ty: TensorType,
    pub value: Value,
}

/// Round an `f32` to the nearest fp16 (ties to even) and back.
pub fn round_fp16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

impl Literal {
    /// A float tensor literal; values are rounded to `dtype` (which must be fp16 or fp32).
    pub fn floats(dtype: DType, shape: impl Into<Vec<usize>>, values: Vec<f32>) -> Self {
        assert!(
            dtype.is_float(),
            "float literal needs a float dtype, got {dtype}"
        );
        let values = if dtype == DType::Fp16 {
            values.into_iter().map(round_fp16).collect()
        } else {
            values
        };
        let ty = TensorType::new(dtype, shape);
        assert_eq!(
            ty.numel(),
            values.len(),
            "literal shape and value count differ"
        );
        Literal {
            ty,
            value: Value::Float(values),
        }
    }

    /// An integer tensor literal of `dtype`.
    pub fn ints(dtype: DType, shape: impl Into<Vec<usize>>, values: Vec<i64>) -> Self {
        assert!(
            dtype.is_int(),
            "integer literal needs an integer dtype, got {dtype}"
        );
        let ty = TensorType::new(dtype, shape);
        assert_eq!(
            ty.numel(),
            values.len(),
            "literal shape and value count differ"
        );
        Literal {
            ty,
            value: Value::Int(values),
        }
    }

    pub fn fp16(x: f32) -> Self {
        Literal::floats(DType::Fp16, [], vec![x])
    }

    pub fn fp32(x: f32) -> Self {
        Literal::floats(DType::Fp32, [], vec![x])
    }

    pub fn int32(x: i64) -> Self {
        Literal::ints(DType::Int32, [], vec![x])
    }

    pub fn int8(x: i64) -> Self {
        Literal::ints(DType::Int8, [], vec![x])
    }

    pub fn uint8(x: i64) -> Self {
        Literal::ints(DType::Uint8, [], vec![x])
    }

    pub fn uint64(x: u64) -> Self {
        Literal::ints(DType::Uint64, [], vec![x as i64])
    }

    /// A rank-1 `int32` tensor, e.g. a shape, perm or axes list.
    pub fn int32s(values: &[i64]) -> Self {
        Literal::ints(DType::Int32, [values.len()], values.to_vec())
    }

    pub fn bool(b: bool) -> Self {
        Literal {
            ty: TensorType::scalar(DType::Bool),
            value: Value::Bool(vec![b]),
        }
    }

    pub fn string(s: impl Into<String>) -> Self {
        Literal {
            ty: TensorType::scalar(DType::String),
            value: Value::Str(vec![s.into()]),
        }
    }

    /// A tensor whose data lives in a weight blob.
    pub fn blob(ty: TensorType, path: impl Into<String>, offset: u64) -> Self {
        Literal {
            ty,
            value: Value::Blob(BlobRef {
                path: path.into(),
                offset,
            }),
        }
    }

    /// Integer values, if this is an inline integer literal.
    pub fn as_ints(&self) -> Option<&[i64]> {
        match &self.value {
            Value::Int(v) => Some(v),
            _ => None,
        }
    }

    /// The single integer of a scalar (or one-element) integer literal.
    pub fn as_int(&self) -> Option<i64> {
        match self.as_ints() {
            Some([v]) => Some(*v),
            _ => None,
        }
    }

    /// Float values, if this is an inline float literal.
    pub fn as_floats(&self) -> Option<&[f32]> {
        match &self.value {
            Value::Float(v) => Some(v),
            _ => None,
        }
    }

    /// The single value of a scalar (or one-element) float literal.
    pub fn as_float(&self) -> Option<f32> {
        match self.as_floats() {
            Some([v]) => Some(*v),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match &self.value {
            Value::Bool(v) if v.len() == 1 => Some(v[0]),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(v) if v.len() == 1 => Some(&v[0]),
            _ => None,
        }
    }

    pub fn as_blob(&self) -> Option<&BlobRef> {
        match &self.value {
            Value::Blob(b) => Some(b),
            _ => None,
        }
    }
}

/// An operation argument: a variable, an inline literal, or a tuple (`values = (a, b)`).
#[derive(Clone, Debug, PartialEq)]
pub enum Arg {
    Var(String),
    Lit(Literal),
    Tuple(Vec<Arg>),
}

impl Arg {
    pub fn var(name: impl Into<String>) -> Self {
        Arg::Var(name.into())
    }
}

/// A named, typed value: a function input or an operation result.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Var {
    pub name: String,
    pub ty: TensorType,
}

impl Var {
    pub fn new(name: impl Into<String>, ty: TensorType) -> Self {
        Var {
            name: name.into(),
            ty,
        }
    }
}

/// One statement: `outputs = op(args)[name = string("name"), attrs...]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Operation {
    pub op: Op,
    /// The `name` attribute (unique within the function).
    pub name: String,
    /// Declared results, in order (one for every op but `split`).
    pub outputs: Vec<Var>,
    /// Keyword arguments inside the call parentheses, in written order.
    pub args: Vec<(String, Arg)>,
    /// Attributes besides `name`, in written order (`val` for `const`, the
    /// parameters of `constexpr_*` ops).
    pub attrs: Vec<(String, Literal)>,
}

impl Operation {
    pub fn arg(&self, param: &str) -> Option<&Arg> {
        self.args.iter().find(|(k, _)| k == param).map(|(_, a)| a)
    }

    pub fn attr(&self, key: &str) -> Option<&Literal> {
        self.attrs.iter().find(|(k, _)| k == key).map(|(_, l)| l)
    }
}

/// The MIL text dialect a program is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Dialect {
    /// `program(1.3)` with `func main<ios18>` and compact scalar syntax (M3 and later).
    #[default]
    Ios18,
    /// `program(1.0)` with `func main<ios16>` and verbose scalars `tensor<int32, []>(1)`
    /// (reported as required on M1/M2).
    Ios16,
}

impl Dialect {
    /// The number in `program(...)`.
    pub fn program_version(self) -> &'static str {
        match self {
            Dialect::Ios18 => "1.3",
            Dialect::Ios16 => "1.0",
        }
    }

    /// The opset in `func main<...>`.
    pub fn opset(self) -> &'static str {
        match self {
            Dialect::Ios18 => "ios18",
            Dialect::Ios16 => "ios16",
        }
    }

    /// The `buildInfo` dictionary entries emitted after `program(...)`.
    pub fn build_info(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Dialect::Ios18 => &[
                ("coremlc-component-MIL", "3510.2.1"),
                ("coremlc-version", "3505.4.1"),
                ("coremltools-component-milinternal", ""),
                ("coremltools-version", "9.0"),
            ],
            Dialect::Ios16 => &[("coremlc-version", "3505.4.1")],
        }
    }
}

/// A function: typed inputs, a list of operations in SSA order, named outputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Function {
    pub name: String,
    pub inputs: Vec<Var>,
    pub ops: Vec<Operation>,
    pub outputs: Vec<String>,
}

impl Function {
    /// The declared type of a variable (function input or op result).
    pub fn var_type(&self, name: &str) -> Option<&TensorType> {
        self.inputs
            .iter()
            .chain(self.ops.iter().flat_map(|o| o.outputs.iter()))
            .find(|v| v.name == name)
            .map(|v| &v.ty)
    }

    /// The `const` operation that defines `name`, if any.
    pub fn const_value(&self, name: &str) -> Option<&Literal> {
        self.ops
            .iter()
            .find(|o| o.op == Op::Const && o.outputs.first().is_some_and(|v| v.name == name))
            .and_then(|o| o.attr("val"))
    }

    /// Output variables with their types, in order.
    pub fn output_vars(&self) -> Vec<Var> {
        self.outputs
            .iter()
            .filter_map(|n| self.var_type(n).map(|t| Var::new(n.clone(), t.clone())))
            .collect()
    }
}

/// A MIL program: one `main` function in a dialect.
#[derive(Clone, Debug, PartialEq)]
pub struct Program {
    pub dialect: Dialect,
    pub main: Function,
}

impl Program {
    /// Every BLOBFILE reference in the program, in statement order.
    pub fn blob_refs(&self) -> Vec<(&Operation, &Literal)> {
        let mut refs = Vec::new();
        for op in &self.main.ops {
            for (_, lit) in &op.attrs {
                if lit.as_blob().is_some() {
                    refs.push((op, lit));
                }
            }
        }
        refs
    }
}
