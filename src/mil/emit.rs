//! Graph -> MIL text. [`emit`] writes one canonical spelling of a [`Program`]
//! in the program's own [`Dialect`] (`program.dialect`; to write another
//! dialect, clone the program and set the field). Same program, same bytes.
//!
//! Canonical form (what [`super::parse`](mod@super::parse) reads back to the same program):
//! - `program(<version>)`, the dialect's `buildInfo` line, `{`, the function
//!   indented 4 spaces, statements indented 8, `}` and a trailing newline.
//! - Statements: `<type> <var> = <op>(<k> = <arg>, ...)[name = string("<n>"), <attrs>];`
//!   with arguments and attributes in stored order. `split` declares its results
//!   as `<type> a, <type> b = split(...)`, the unparenthesised form the MIL text
//!   printer uses (the parser also accepts `(<type> a, <type> b) = ...`).
//! - Literals: scalars `fp16(0.125)`, tensors `tensor<int32, [4]>([0, 1, 3, 2])`,
//!   weights `tensor<fp16, [..]>(BLOBFILE(path = string(".."), offset = uint64(64)))`
//!   (always the `tensor<..>` form, also for a rank-0 blob).
//! - Floats: Rust's shortest round-trip spelling of the stored `f32`, always with
//!   a `.` or an exponent (`1.0`, `0.125`, `1e-5`, `-65504.0`); non-finite values
//!   are `inf`, `-inf` and `nan` (a NaN's payload is not kept).
//! - Integers in decimal; a `uint64` value is stored as `i64` bits and printed unsigned.
//! - Strings in double quotes with `\\`, `\"`, `\n`, `\r`, `\t` escaped.
//! - [`Dialect::Ios16`] writes every rank-0 type and literal verbosely:
//!   `tensor<fp16, []>` in declarations, `tensor<string, []>("x")`, `tensor<uint64, []>(64)`.
//!
//! The emitter does not check the program (see `verify`): it writes what it is given.

use std::fmt::Write;

use super::ir::{Arg, DType, Dialect, Literal, Operation, Program, TensorType, Value, Var};

/// Emit `program` as MIL text in `program.dialect`. Deterministic: same program, same bytes.
pub fn emit(program: &Program) -> String {
    let dialect = program.dialect;
    let main = &program.main;
    let mut out = String::new();
    out.push_str(&format!("program({})\n", dialect.program_version()));
    let dict_type = match dialect {
        Dialect::Ios18 => "dict<string, string>",
        Dialect::Ios16 => "dict<tensor<string, []>, tensor<string, []>>",
    };
    let entries: Vec<String> = dialect
        .build_info()
        .iter()
        .map(|(k, v)| format!("{{{}, {}}}", quote(k), quote(v)))
        .collect();
    out.push_str(&format!(
        "[buildInfo = {dict_type}({{{}}})]\n{{\n",
        entries.join(", ")
    ));
    let inputs: Vec<String> = main.inputs.iter().map(|v| declare(v, dialect)).collect();
    out.push_str(&format!(
        "    func {}<{}>({}) {{\n",
        main.name,
        dialect.opset(),
        inputs.join(", ")
    ));
    for op in &main.ops {
        out.push_str("        ");
        statement(&mut out, op, dialect);
        out.push_str(";\n");
    }
    out.push_str(&format!("    }} -> ({});\n}}\n", main.outputs.join(", ")));
    out
}

/// `<outputs> = <op>(<args>)[name = ..., <attrs>]`, without the `;`.
fn statement(out: &mut String, op: &Operation, dialect: Dialect) {
    let outputs: Vec<String> = op.outputs.iter().map(|v| declare(v, dialect)).collect();
    let args: Vec<String> = op
        .args
        .iter()
        .map(|(key, arg)| format!("{key} = {}", argument(arg, dialect)))
        .collect();
    let mut attrs = vec![format!(
        "name = {}",
        literal(&Literal::string(op.name.clone()), dialect)
    )];
    attrs.extend(
        op.attrs
            .iter()
            .map(|(key, lit)| format!("{key} = {}", literal(lit, dialect))),
    );
    let _ = write!(
        out,
        "{} = {}({})[{}]",
        outputs.join(", "),
        op.op.mil_name(),
        args.join(", "),
        attrs.join(", ")
    );
}

/// `<type> <name>`, as in a function signature or on the left of a statement.
fn declare(var: &Var, dialect: Dialect) -> String {
    format!("{} {}", type_name(&var.ty, dialect), var.name)
}

/// The spelling of a type: `fp16` / `tensor<fp16, []>` for a scalar (by dialect),
/// `tensor<fp16, [1, 2]>` otherwise.
fn type_name(ty: &TensorType, dialect: Dialect) -> String {
    if ty.is_scalar() && dialect == Dialect::Ios16 {
        format!("tensor<{}, []>", ty.dtype)
    } else {
        ty.to_string()
    }
}

fn argument(arg: &Arg, dialect: Dialect) -> String {
    match arg {
        Arg::Var(name) => name.clone(),
        Arg::Lit(lit) => literal(lit, dialect),
        Arg::Tuple(items) => {
            let items: Vec<String> = items.iter().map(|a| argument(a, dialect)).collect();
            format!("({})", items.join(", "))
        }
    }
}

/// A typed literal in canonical form for `dialect`.
fn literal(lit: &Literal, dialect: Dialect) -> String {
    let ty = &lit.ty;
    let tensor_type = format!("tensor<{}, [{}]>", ty.dtype, dims(&ty.shape));
    match &lit.value {
        Value::Blob(blob) => format!(
            "{tensor_type}(BLOBFILE(path = {}, offset = {}))",
            literal(&Literal::string(blob.path.clone()), dialect),
            literal(&Literal::uint64(blob.offset), dialect)
        ),
        value if ty.is_scalar() => {
            let text = values(ty.dtype, value);
            match dialect {
                Dialect::Ios18 => format!("{}({text})", ty.dtype),
                Dialect::Ios16 => format!("{tensor_type}({text})"),
            }
        }
        value => format!("{tensor_type}([{}])", values(ty.dtype, value)),
    }
}

fn dims(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    dims.join(", ")
}

/// Comma-separated element values.
fn values(dtype: DType, value: &Value) -> String {
    let items: Vec<String> = match value {
        Value::Float(v) => v.iter().map(|&x| float(x)).collect(),
        Value::Int(v) if dtype == DType::Uint64 => {
            v.iter().map(|&x| (x as u64).to_string()).collect()
        }
        Value::Int(v) => v.iter().map(i64::to_string).collect(),
        Value::Bool(v) => v.iter().map(bool::to_string).collect(),
        Value::Str(v) => v.iter().map(|s| quote(s)).collect(),
        Value::Blob(_) => Vec::new(), // written by `literal`
    };
    items.join(", ")
}

/// Shortest round-trip spelling with a `.` or exponent; `inf`, `-inf`, `nan`.
pub(crate) fn float(x: f32) -> String {
    if x.is_nan() {
        "nan".to_string()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.to_string()
    } else {
        // `Debug` is the shortest round-trip form and always has `.` or `e`.
        format!("{x:?}")
    }
}

/// A double-quoted string literal with escapes.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_keep_a_point_or_exponent() {
        assert_eq!(float(1.0), "1.0");
        assert_eq!(float(-0.0), "-0.0");
        assert_eq!(float(0.125), "0.125");
        assert_eq!(float(-65504.0), "-65504.0");
        assert_eq!(float(1e-7), "1e-7");
        assert_eq!(float(f32::INFINITY), "inf");
        assert_eq!(float(f32::NEG_INFINITY), "-inf");
        assert_eq!(float(f32::NAN), "nan");
    }

    #[test]
    fn strings_are_escaped() {
        assert_eq!(quote("a\"b\\c\nd"), r#""a\"b\\c\nd""#);
    }
}
