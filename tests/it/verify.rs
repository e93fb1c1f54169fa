//! Shape/dtype inference, the builder and the verifier (structural and ANE rules).
//!
//! References: `tests/fixtures/mil_infer/cases.json` (result types computed by
//! coremltools' MIL builder, written by `scripts/mil_infer_cases.py`) and
//! hand-derived shapes and messages, each derived in a comment.

use std::collections::BTreeMap;

use anemone::Error;
use anemone::mil::infer::infer_outputs;
use anemone::mil::verify::{
    RULES, Severity, Target, VerifyReport, rule_by_id, verify, verify_with_weights,
};
use anemone::mil::{
    Arg, Builder, DType, Dialect, Function, Literal, Op, Operation, Program, Tensor, TensorType,
    Value, Var,
};
use serde_json::Value as Json;

// ---- inference against coremltools ------------------------------------------

fn dtype(name: &str) -> DType {
    DType::from_mil_name(name).unwrap_or_else(|| panic!("fixture dtype {name}"))
}

fn json_shape(v: &Json) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect()
}

/// A literal from the fixture's `{"tensor": {dtype, shape, fill}}` form.
fn fixture_tensor(spec: &Json) -> Literal {
    let dt = dtype(spec["dtype"].as_str().unwrap());
    let shape = json_shape(&spec["shape"]);
    let n: usize = shape.iter().product();
    let fill = spec["fill"].as_f64().unwrap();
    if dt.is_float() {
        Literal::floats(dt, shape, vec![fill as f32; n])
    } else if dt.is_int() {
        Literal::ints(dt, shape, vec![fill as i64; n])
    } else {
        Literal {
            ty: TensorType::new(dt, shape),
            value: Value::Bool(vec![fill != 0.0; n]),
        }
    }
}

fn fixture_arg(v: &Json) -> Arg {
    let obj = v.as_object().unwrap();
    let (kind, val) = obj.iter().next().unwrap();
    match kind.as_str() {
        "var" => Arg::var(val.as_str().unwrap()),
        "int32" => Arg::Lit(Literal::int32(val.as_i64().unwrap())),
        "int32s" => Arg::Lit(Literal::int32s(
            &val.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect::<Vec<_>>(),
        )),
        "bool" => Arg::Lit(Literal::bool(val.as_bool().unwrap())),
        "str" => Arg::Lit(Literal::string(val.as_str().unwrap())),
        "tensor" => Arg::Lit(fixture_tensor(val)),
        "tuple" => Arg::Tuple(val.as_array().unwrap().iter().map(fixture_arg).collect()),
        other => panic!("fixture arg kind {other}"),
    }
}

/// The function and operation a fixture case describes.
fn fixture_case(case: &Json) -> (Function, Operation) {
    let mut func = Function {
        name: "main".into(),
        inputs: Vec::new(),
        ops: Vec::new(),
        outputs: Vec::new(),
    };
    for (name, spec) in case["inputs"].as_object().unwrap() {
        let ty = TensorType::new(dtype(spec[0].as_str().unwrap()), json_shape(&spec[1]));
        func.inputs.push(Var::new(name.clone(), ty));
    }
    for (name, spec) in case["consts"].as_object().unwrap() {
        let lit = fixture_tensor(spec);
        func.ops.push(Operation {
            op: Op::Const,
            name: name.clone(),
            outputs: vec![Var::new(name.clone(), lit.ty.clone())],
            args: Vec::new(),
            attrs: vec![("val".into(), lit)],
        });
    }
    let op = Op::from_mil_name(case["op"].as_str().unwrap()).unwrap();
    let mut operation = Operation {
        op,
        name: "under_test".into(),
        outputs: Vec::new(),
        args: Vec::new(),
        attrs: Vec::new(),
    };
    for (key, spec) in case["args"].as_object().unwrap() {
        let arg = fixture_arg(spec);
        let is_attr = op
            .param(key)
            .is_some_and(|p| p.kind == anemone::mil::op::ParamKind::Attr);
        match (is_attr, arg) {
            (true, Arg::Lit(lit)) => operation.attrs.push((key.clone(), lit)),
            (true, other) => panic!("attribute {key} must be a literal, got {other:?}"),
            (false, arg) => operation.args.push((key.clone(), arg)),
        }
    }
    (func, operation)
}

#[test]
fn inference_matches_coremltools() {
    let fixture: Json =
        serde_json::from_str(include_str!("../fixtures/mil_infer/cases.json")).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    let mut covered = std::collections::BTreeSet::new();
    let mut failures = Vec::new();
    for case in cases {
        let id = case["id"].as_str().unwrap();
        let (func, op) = fixture_case(case);
        covered.insert(op.op);
        let got = infer_outputs(&func, &op);
        match (&case["expect"], got) {
            (Json::String(s), Err(e)) if s == "error" => {
                // Every rejection names the op kind and the op's name.
                let msg = e.to_string();
                let prefix = format!("op `{}` (name \"under_test\"): ", op.op);
                if !msg.starts_with(&prefix) {
                    failures.push(format!("{id}: message `{msg}` lacks `{prefix}`"));
                }
            }
            (Json::String(_), Ok(types)) => {
                failures.push(format!("{id}: coremltools rejects, we infer {types:?}"))
            }
            (expect, Err(e)) => failures.push(format!("{id}: expected {expect}, got error {e}")),
            (expect, Ok(types)) => {
                let want: Vec<TensorType> = expect
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| TensorType::new(dtype(t[0].as_str().unwrap()), json_shape(&t[1])))
                    .collect();
                if want != types {
                    failures.push(format!("{id}: expected {want:?}, got {types:?}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let missing: Vec<_> = Op::ALL
        .iter()
        .filter(|o| **o != Op::Const && !covered.contains(o))
        .collect();
    assert!(
        missing.is_empty(),
        "ops without a coremltools case: {missing:?}"
    );
}

// ---- inference: hand-derived cases and messages ---------------------------

/// A function with the given inputs, and an op `op` (name "t") over `args`.
fn one_op(
    inputs: &[(&str, DType, &[usize])],
    op: Op,
    args: Vec<(&str, Arg)>,
) -> (Function, Operation) {
    let func = Function {
        name: "main".into(),
        inputs: inputs
            .iter()
            .map(|(n, d, s)| Var::new(*n, TensorType::new(*d, *s)))
            .collect(),
        ops: Vec::new(),
        outputs: Vec::new(),
    };
    let operation = Operation {
        op,
        name: "t".into(),
        outputs: Vec::new(),
        args: args.into_iter().map(|(k, a)| (k.to_string(), a)).collect(),
        attrs: Vec::new(),
    };
    (func, operation)
}

fn infer_one(
    inputs: &[(&str, DType, &[usize])],
    op: Op,
    args: Vec<(&str, Arg)>,
) -> anemone::Result<Vec<TensorType>> {
    let (func, operation) = one_op(inputs, op, args);
    infer_outputs(&func, &operation)
}

fn err_msg(r: anemone::Result<Vec<TensorType>>) -> String {
    match r {
        Err(e @ Error::Op { .. }) => e.to_string(),
        other => panic!("expected an op error, got {other:?}"),
    }
}

const F16: DType = DType::Fp16;

#[test]
fn matmul_rank1_operands_follow_numpy() {
    // numpy: matmul((4,), (10, 4, 3)) -> (10, 3); matmul((10, 3, 4), (4,)) -> (10, 3);
    // matmul((4,), (4,)) -> () (coremltools 9.0 gets the first one wrong: [1, 3]).
    let x = Arg::var("x");
    let y = Arg::var("y");
    let r = infer_one(
        &[("x", F16, &[4]), ("y", F16, &[10, 4, 3])],
        Op::Matmul,
        vec![("x", x.clone()), ("y", y.clone())],
    );
    assert_eq!(r.unwrap(), vec![TensorType::new(F16, [10, 3])]);
    let r = infer_one(
        &[("x", F16, &[10, 3, 4]), ("y", F16, &[4])],
        Op::Matmul,
        vec![("x", x.clone()), ("y", y.clone())],
    );
    assert_eq!(r.unwrap(), vec![TensorType::new(F16, [10, 3])]);
    let r = infer_one(
        &[("x", F16, &[4]), ("y", F16, &[4])],
        Op::Matmul,
        vec![("x", x), ("y", y)],
    );
    assert_eq!(r.unwrap(), vec![TensorType::scalar(F16)]);
}

#[test]
fn error_messages_name_op_and_operand() {
    let xy = || vec![("x", Arg::var("x")), ("y", Arg::var("y"))];
    let msg = err_msg(infer_one(
        &[("x", F16, &[2, 4]), ("y", F16, &[1, 3])],
        Op::Add,
        xy(),
    ));
    assert_eq!(
        msg,
        "op `add` (name \"t\"): operand `y`: shape [1, 3] does not broadcast with `x` shape [2, 4]"
    );
    let msg = err_msg(infer_one(
        &[("x", F16, &[2]), ("y", DType::Fp32, &[2])],
        Op::Mul,
        xy(),
    ));
    assert_eq!(
        msg,
        "op `mul` (name \"t\"): operand `y`: dtype fp32 differs from `x` dtype fp16"
    );
    let msg = err_msg(infer_one(
        &[("x", F16, &[2])],
        Op::Add,
        vec![("x", Arg::var("x"))],
    ));
    assert_eq!(msg, "op `add` (name \"t\"): missing required parameter `y`");
    let msg = err_msg(infer_one(
        &[("x", F16, &[2])],
        Op::Add,
        vec![("x", Arg::var("x")), ("z", Arg::var("x"))],
    ));
    assert!(msg.contains("unknown parameter `z`"), "{msg}");
    let msg = err_msg(infer_one(
        &[("x", F16, &[2])],
        Op::Add,
        vec![("x", Arg::var("x")), ("y", Arg::var("nope"))],
    ));
    assert!(
        msg.contains("operand `y`: unknown variable `nope`"),
        "{msg}"
    );
    // softmax over axis 4 of a rank-4 tensor (valid axes -4..=3).
    let msg = err_msg(infer_one(
        &[("x", F16, &[1, 32, 1, 8])],
        Op::Softmax,
        vec![("x", Arg::var("x")), ("axis", Arg::Lit(Literal::int32(4)))],
    ));
    assert!(
        msg.starts_with("op `softmax` (name \"t\"): parameter `axis`: axis 4 is out of range"),
        "{msg}"
    );
    // A shape parameter that is a runtime input, not a constant.
    let msg = err_msg(infer_one(
        &[("x", F16, &[2, 3]), ("s", DType::Int32, &[2])],
        Op::Reshape,
        vec![("x", Arg::var("x")), ("shape", Arg::var("s"))],
    ));
    assert!(
        msg.contains("parameter `shape` must be a compile-time constant"),
        "{msg}"
    );
    // conv needs a rank-4 input.
    let msg = err_msg(infer_one(
        &[("x", F16, &[1, 8, 5]), ("w", F16, &[4, 8, 1, 1])],
        Op::Conv,
        vec![("x", Arg::var("x")), ("weight", Arg::var("w"))],
    ));
    assert!(msg.contains("operand `x`: conv needs a rank-4"), "{msg}");
    // conv's bias is a constant parameter in MIL; a runtime bias is rejected.
    let msg = err_msg(infer_one(
        &[
            ("x", F16, &[1, 8, 1, 5]),
            ("w", F16, &[4, 8, 1, 1]),
            ("b", F16, &[4]),
        ],
        Op::Conv,
        vec![
            ("x", Arg::var("x")),
            ("weight", Arg::var("w")),
            ("bias", Arg::var("b")),
        ],
    ));
    assert!(
        msg.contains("parameter `bias` must be a compile-time constant"),
        "{msg}"
    );
    // concat of fp16 and fp32.
    let msg = err_msg(infer_one(
        &[("a", F16, &[2]), ("b", DType::Fp32, &[2])],
        Op::Concat,
        vec![
            ("values", Arg::Tuple(vec![Arg::var("a"), Arg::var("b")])),
            ("axis", Arg::Lit(Literal::int32(0))),
        ],
    ));
    assert!(
        msg.contains("operand `values[1]`: dtype fp32 differs"),
        "{msg}"
    );
    // axis given as a one-element tensor instead of a scalar.
    let msg = err_msg(infer_one(
        &[("a", F16, &[2])],
        Op::Concat,
        vec![
            ("values", Arg::Tuple(vec![Arg::var("a")])),
            ("axis", Arg::Lit(Literal::int32s(&[0]))),
        ],
    ));
    assert!(
        msg.contains("parameter `axis` must be a scalar int32"),
        "{msg}"
    );
}

#[test]
fn const_infers_its_literal_type() {
    let lit = Literal::floats(F16, [2, 2], vec![1.0, 2.0, 3.0, 4.0]);
    let op = Operation {
        op: Op::Const,
        name: "c".into(),
        outputs: Vec::new(),
        args: Vec::new(),
        attrs: vec![("val".into(), lit)],
    };
    let func = one_op(&[], Op::Const, Vec::new()).0;
    assert_eq!(
        infer_outputs(&func, &op).unwrap(),
        vec![TensorType::new(F16, [2, 2])]
    );
    let missing = Operation {
        attrs: Vec::new(),
        ..op
    };
    assert!(err_msg(infer_outputs(&func, &missing)).contains("missing attribute `val`"));
}

// ---- builder ----------------------------------------------------------------

fn non_const_ops(p: &Program) -> Vec<Op> {
    p.main
        .ops
        .iter()
        .map(|o| o.op)
        .filter(|o| *o != Op::Const)
        .collect()
}

/// The scalar float value of the const op named `name`.
fn const_scalar(p: &Program, name: &str) -> f32 {
    p.main
        .const_value(name)
        .and_then(Literal::as_float)
        .unwrap()
}

fn assert_clean(p: &Program) {
    let report = verify(p, Target::Ane);
    assert!(
        report.diagnostics.is_empty(),
        "expected no diagnostics:\n{report}"
    );
}

#[test]
fn rmsnorm_kernel_is_the_reference_sequence_and_verifies_clean() {
    // C = 64, S = 384: the smallest I/O with >= 64 channels and >= 49,152 bytes.
    let mut b = Builder::new(Dialect::Ios18);
    let x = b.input("x", F16, &[1, 64, 1, 384]);
    let w = b.blob_const(TensorType::new(F16, [1, 64, 1, 1]), "rms.bin", 64);
    let y = b.rmsnorm(&x, &w, 1e-5);
    assert_eq!(y.shape(), [1, 64, 1, 384]);
    b.output(&y);
    let p = b.finish();
    assert_eq!(
        non_const_ops(&p),
        [
            Op::Mul,
            Op::ReduceSum,
            Op::Mul,
            Op::Add,
            Op::Pow,
            Op::Mul,
            Op::Mul
        ]
    );
    // The three scalars, in order: 1/C, eps, -0.5 (fp16-rounded: 1/64 and -0.5 are exact,
    // 1e-5 rounds to the fp16 subnormal 168 * 2^-24).
    let scalars: Vec<f32> = p
        .main
        .ops
        .iter()
        .filter(|o| o.op == Op::Const)
        .filter_map(|o| o.attr("val").and_then(Literal::as_float))
        .collect();
    assert_eq!(scalars, [1.0 / 64.0, 168.0 * 2f32.powi(-24), -0.5]);
    // reduce_sum over channels with keep_dims gives the per-position [1, 1, 1, S] statistic.
    let reduce = p.main.ops.iter().find(|o| o.op == Op::ReduceSum).unwrap();
    assert_eq!(reduce.outputs[0].ty.shape, [1, 1, 1, 384]);
    assert_clean(&p);
}

/// One packed input `[1, 3*H*D, 1, S]` (q, k, v along channels) -> attention output `[1, H*D, 1, S]`.
fn attention_kernel(heads: usize, head_dim: usize, seq: usize) -> (Program, Tensor, Tensor) {
    let dim = heads * head_dim;
    let mut b = Builder::new(Dialect::Ios18);
    let x = b.input("qkv", F16, &[1, 3 * dim, 1, seq]);
    let q = b.slice_by_size(&x, &[0, 0, 0, 0], &[1, dim, 1, seq]);
    let k = b.slice_by_size(&x, &[0, dim, 0, 0], &[1, dim, 1, seq]);
    let v = b.slice_by_size(&x, &[0, 2 * dim, 0, 0], &[1, dim, 1, seq]);
    let (q, k, v) = (
        b.split_heads(&q, heads),
        b.split_heads(&k, heads),
        b.split_heads(&v, heads),
    );
    assert_eq!(q.shape(), [1, heads, seq, head_dim]);
    let mask = b.causal_mask(F16, seq);
    let (out, probs) = b.causal_attention(&q, &k, &v, &mask, 1.0 / (head_dim as f32).sqrt());
    let merged = b.merge_heads(&out);
    b.output(&merged);
    (b.finish(), merged, probs)
}

#[test]
fn attention_kernel_shapes_and_verification() {
    // Small sizes: H = 2, D = 4, S = 8; only the I/O size rules fire (errors
    // since issue 22: too few channels and bytes, too narrow a width).
    let (p, out, probs) = attention_kernel(2, 4, 8);
    assert_eq!(out.shape(), [1, 8, 1, 8]);
    assert_eq!(probs.shape(), [1, 2, 8, 8]);
    let report = verify(&p, Target::Ane);
    assert!(!report.is_ok(), "{report}");
    assert_eq!(
        report.rule_ids(),
        ["ANE009", "ANE010", "ANE015", "ANE016"],
        "{report}"
    );
    assert!(verify(&p, Target::Cpu).diagnostics.is_empty());
    // The attention core is matmul(transpose_y) / mul(scale) / add(mask) / softmax(-1) / matmul.
    let core: Vec<Op> = non_const_ops(&p)
        .into_iter()
        .skip_while(|o| *o != Op::Matmul)
        .take(5)
        .collect();
    assert_eq!(
        core,
        [Op::Matmul, Op::Mul, Op::Add, Op::Softmax, Op::Matmul]
    );
    let first_matmul = p.main.ops.iter().find(|o| o.op == Op::Matmul).unwrap();
    let Some(Arg::Var(ty_name)) = first_matmul.arg("transpose_y") else {
        panic!()
    };
    assert_eq!(
        p.main.const_value(ty_name).and_then(Literal::as_bool),
        Some(true)
    );
    let mul = p.main.ops.iter().find(|o| o.op == Op::Mul).unwrap();
    let Some(Arg::Var(scale)) = mul.arg("y") else {
        panic!()
    };
    assert_eq!(const_scalar(&p, scale), 0.5); // 1/sqrt(4)

    // Production-like sizes: H = 2, D = 32, S = 384 verify with one warning,
    // a softmax over 384 positions (not a power of two, ANE024).
    let (p, out, _) = attention_kernel(2, 32, 384);
    assert_eq!(out.shape(), [1, 64, 1, 384]);
    let report = verify(&p, Target::Ane);
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.rule_ids(), ["ANE024"], "{report}");
    // At S = 512 (a power of two) nothing fires.
    assert_clean(&attention_kernel(2, 32, 512).0);
}

#[test]
fn causal_mask_values() {
    // [t][t2] = 0 if t2 <= t else -65504 (ane-reference §3.4).
    let mut b = Builder::new(Dialect::Ios18);
    let m = b.causal_mask(F16, 3);
    assert_eq!(m.shape(), [1, 1, 3, 3]);
    let lit = b.function().const_value(&m.name).unwrap();
    let n = -65504.0;
    assert_eq!(
        lit.as_floats().unwrap(),
        [0.0, n, n, 0.0, 0.0, n, 0.0, 0.0, 0.0]
    );
}

#[test]
fn linear_kernels_verify_clean() {
    // Dynamic: activations [1, 64, 1, 256] and matrix [1, 64, 1, 128] packed along S.
    let mut b = Builder::new(Dialect::Ios18);
    let x = b.input("x", F16, &[1, 64, 1, 256 + 128]);
    let act = b.slice_by_size(&x, &[0, 0, 0, 0], &[1, 64, 1, 256]);
    let m = b.slice_by_size(&x, &[0, 0, 0, 256], &[1, 64, 1, 128]);
    let y = b.linear_dynamic(&act, &m);
    assert_eq!(y.shape(), [1, 128, 1, 256]);
    b.output(&y);
    let p = b.finish();
    assert_eq!(
        non_const_ops(&p),
        [
            Op::SliceBySize,
            Op::SliceBySize,
            Op::Reshape,
            Op::Transpose,
            Op::Reshape,
            Op::Matmul,
            Op::Transpose,
            Op::Reshape
        ]
    );
    let matmul = p.main.ops.iter().find(|o| o.op == Op::Matmul).unwrap();
    assert_eq!(matmul.outputs[0].ty.shape, [1, 1, 256, 128]);
    assert_clean(&p);

    // Const weight: 1x1 conv [128, 64, 1, 1].
    let mut b = Builder::new(Dialect::Ios18);
    let x = b.input("x", F16, &[1, 64, 1, 384]);
    let w = b.blob_const(TensorType::new(F16, [128, 64, 1, 1]), "w.bin", 64);
    let y = b.linear_conv1x1(&x, &w);
    assert_eq!(y.shape(), [1, 128, 1, 384]);
    b.output(&y);
    assert_clean(&b.finish());
}

#[test]
fn builder_shape_ops_and_names() {
    let mut b = Builder::new(Dialect::Ios18);
    let x = b.input("x", F16, &[1, 8, 1, 6]);
    let parts = b.split(&x, &[2, 6], 1);
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0].shape(), [1, 2, 1, 6]);
    assert_eq!(parts[1].shape(), [1, 6, 1, 6]);
    let joined = b.name_next("joined").concat(&[&parts[1], &parts[0]], 1);
    assert_eq!(joined.name, "joined");
    assert_eq!(joined.shape(), [1, 8, 1, 6]);
    let op = b
        .function()
        .ops
        .iter()
        .find(|o| o.name == "joined")
        .unwrap();
    // Parameters are consts named after the op; arguments in alphabetical order.
    let keys: Vec<&str> = op.args.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["axis", "interleave", "values"]);
    assert_eq!(
        b.function()
            .const_value("joined_axis")
            .and_then(Literal::as_int),
        Some(1)
    );
    let s = b.reduce_max(&joined, &[-1], false);
    assert_eq!(s.shape(), [1, 8, 1]);
    let c = b.cast(&s, DType::Fp32);
    assert_eq!(c.ty, TensorType::new(DType::Fp32, [1, 8, 1]));
    let t = b.transpose(&x, &[3, 1, 2, 0]);
    assert_eq!(t.shape(), [6, 8, 1, 1]);
    let r = b.reshape(&t, &[48]);
    assert_eq!(r.shape(), [48]);
    b.output(&r);
    let p = b.finish();
    assert!(verify(&p, Target::Cpu).is_ok());
}

#[test]
#[should_panic(expected = "operand `y`: shape [1, 3] does not broadcast with `x` shape [2, 4]")]
fn builder_panics_with_the_inference_message() {
    let mut b = Builder::new(Dialect::Ios18);
    let x = b.input("x", F16, &[2, 4]);
    let y = b.input("y", F16, &[1, 3]);
    b.add(&x, &y);
}

#[test]
#[should_panic(expected = "name `x` is already used")]
fn builder_rejects_duplicate_names() {
    let mut b = Builder::new(Dialect::Ios18);
    let x = b.input("x", F16, &[2]);
    b.name_next("x").relu(&x);
}

// ---- verifier: structural rules --------------------------------------------

/// `x [1, 64, 1, 384] -> y = mul(x, x)`: clean for the ANE.
fn base_program() -> Program {
    let mut b = Builder::new(Dialect::Ios18);
    let x = b.input("x", F16, &[1, 64, 1, 384]);
    let y = b.mul(&x, &x);
    b.output(&y);
    b.finish()
}

fn fired(p: &Program, target: Target) -> Vec<&'static str> {
    verify(p, target).rule_ids()
}

#[test]
fn base_program_is_clean() {
    assert_clean(&base_program());
    assert!(verify(&base_program(), Target::Cpu).diagnostics.is_empty());
}

#[test]
fn declared_type_mismatch_is_caught() {
    let mut p = base_program();
    p.main.ops[0].outputs[0].ty = TensorType::new(F16, [1, 64, 1, 383]);
    let report = verify(&p, Target::Cpu);
    assert_eq!(report.rule_ids(), ["MIL002"]);
    assert!(!report.is_ok());
    let d = report.errors().next().unwrap();
    assert_eq!(d.op, Some(Op::Mul));
    assert_eq!(
        d.message,
        "result `mul_0` is declared tensor<fp16, [1, 64, 1, 383]> but is tensor<fp16, [1, 64, 1, 384]>"
    );
    assert!(
        report
            .to_string()
            .contains("error[MIL002] op `mul` (name \"mul_0\")"),
        "{report}"
    );
    let err = report.into_result().unwrap_err();
    assert!(matches!(err, Error::Verify(ref s) if s.contains("MIL002")));
}

#[test]
fn structural_rules_fire() {
    // MIL001: operands that do not fit (y broadcast failure), written directly in the IR.
    let mut p = base_program();
    p.main
        .inputs
        .push(Var::new("z", TensorType::new(F16, [1, 3])));
    p.main.ops[0].args[1].1 = Arg::var("z");
    let report = verify(&p, Target::Cpu);
    assert_eq!(report.rule_ids(), ["MIL001"]);
    assert!(
        report.diagnostics[0]
            .message
            .contains("operand `y`: shape [1, 3]")
    );

    // MIL003: two ops with one name; MIL004: use before definition; MIL005: undefined output.
    let mut b = Builder::new(Dialect::Ios18);
    let x = b.input("x", F16, &[1, 64, 1, 384]);
    let a = b.relu(&x);
    let c = b.sigmoid(&a);
    b.output(&c);
    let good = b.finish();
    let mut p = good.clone();
    p.main.ops[1].name = p.main.ops[0].name.clone();
    assert_eq!(fired(&p, Target::Cpu), ["MIL003"]);
    let mut p = good.clone();
    p.main.ops.swap(0, 1);
    let report = verify(&p, Target::Cpu);
    assert_eq!(report.rule_ids(), ["MIL004"]);
    assert!(
        report.diagnostics[0].message.contains("defines only later"),
        "{report}"
    );
    let mut p = good.clone();
    p.main.outputs = vec!["nowhere".into()];
    assert_eq!(fired(&p, Target::Cpu), ["MIL005"]);
    p.main.outputs.clear();
    assert_eq!(fired(&p, Target::Cpu), ["MIL005"]);

    // MIL006: BLOBFILE outside @model_path/weights/ and at an unaligned offset.
    let mut b = Builder::new(Dialect::Ios18);
    let x = b.input("x", F16, &[1, 64, 1, 384]);
    let w = b.constant(Literal::blob(
        TensorType::new(F16, [1, 64, 1, 1]),
        "weights/w.bin",
        32,
    ));
    let y = b.mul(&x, &w);
    b.output(&y);
    let report = verify(&b.finish(), Target::Cpu);
    assert_eq!(report.rule_ids(), ["MIL006"]);
    assert_eq!(report.errors().count(), 2, "{report}");

    // MIL008: quantize in the ios16 dialect.
    let mut b = Builder::new(Dialect::Ios16);
    let x = b.input("x", F16, &[1, 64, 1, 384]);
    let q = b.op(
        Op::Quantize,
        vec![
            ("input", Arg::var(&x.name)),
            ("scale", Arg::Lit(Literal::fp16(0.5))),
            ("output_dtype", Arg::Lit(Literal::string("int8"))),
        ],
        Vec::new(),
    );
    b.output(&q[0]);
    let report = verify(&b.finish(), Target::Cpu);
    assert_eq!(report.rule_ids(), ["MIL008"]);
    assert!(report.is_ok(), "MIL008 is a warning");
}

/// A MILBlob file with one fp16 record at 64 and its payload at 128, built by hand
/// from ane-reference §3.1: header {count 1, version 2}, record {0xDEADBEEF, 1, size, 128}.
fn blob_file(payload_len: u64, dtype_code: u32) -> Vec<u8> {
    let mut bytes = vec![0u8; 128 + payload_len as usize];
    bytes[0..4].copy_from_slice(&1u32.to_le_bytes());
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    bytes[64..68].copy_from_slice(&0xDEADBEEFu32.to_le_bytes());
    bytes[68..72].copy_from_slice(&dtype_code.to_le_bytes());
    bytes[72..80].copy_from_slice(&payload_len.to_le_bytes());
    bytes[80..88].copy_from_slice(&128u64.to_le_bytes());
    bytes
}

#[test]
fn weight_files_are_checked_against_declared_types() {
    let mut b = Builder::new(Dialect::Ios18);
    let x = b.input("x", F16, &[1, 64, 1, 384]);
    let w = b.blob_const(TensorType::new(F16, [1, 64, 1, 1]), "rms.bin", 64);
    let y = b.mul(&x, &w);
    b.output(&y);
    let p = b.finish();
    let key = "@model_path/weights/rms.bin".to_string();
    let with = |bytes: Vec<u8>| BTreeMap::from([(key.clone(), bytes)]);

    // 64 fp16 values = 128 bytes.
    assert!(
        verify_with_weights(&p, &with(blob_file(128, 1)), Target::Ane)
            .diagnostics
            .is_empty()
    );
    let missing = verify_with_weights(&p, &BTreeMap::new(), Target::Cpu);
    assert_eq!(missing.rule_ids(), ["MIL007"]);
    assert!(
        missing.diagnostics[0]
            .message
            .contains("not in the package")
    );
    let wrong_size = verify_with_weights(&p, &with(blob_file(256, 1)), Target::Cpu);
    assert!(
        wrong_size.diagnostics[0]
            .message
            .contains("payload size 256"),
        "{wrong_size}"
    );
    let wrong_dtype = verify_with_weights(&p, &with(blob_file(128, 2)), Target::Cpu);
    assert!(
        wrong_dtype.diagnostics[0].message.contains("dtype code 2"),
        "{wrong_dtype}"
    );
}

// ---- verifier: ANE rules ----------------------------------------------------

/// Verify for the ANE and expect exactly the rules `want` to fire.
fn check_ane(p: &Program, want: &[&str]) -> VerifyReport {
    let report = verify(p, Target::Ane);
    assert_eq!(report.rule_ids(), want, "{report}");
    // Structural rules are the only ones for the CPU.
    assert!(
        verify(p, Target::Cpu)
            .diagnostics
            .iter()
            .all(|d| d.rule.starts_with("MIL")),
        "ANE rules ran for the CPU"
    );
    report
}

fn program(
    dialect: Dialect,
    input: &[usize],
    dtype: DType,
    body: impl FnOnce(&mut Builder, Tensor) -> Tensor,
) -> Program {
    let mut b = Builder::new(dialect);
    let x = b.input("x", dtype, input);
    let y = body(&mut b, x);
    b.output(&y);
    b.finish()
}

const IO: [usize; 4] = [1, 64, 1, 384];

#[test]
fn ane001_io_rank_and_dtype() {
    let p = program(Dialect::Ios18, &[64, 384], F16, |b, x| b.reshape(&x, &IO));
    check_ane(&p, &["ANE001"]);
    let p = program(Dialect::Ios18, &IO, DType::Int32, |b, x| b.cast(&x, F16));
    check_ane(&p, &["ANE001"]);
}

#[test]
fn ane002_io_layout() {
    // [1, 64, 2, 192]: 49,152 bytes, 64 channels, but H = 2.
    let p = program(Dialect::Ios18, &[1, 64, 2, 192], F16, |b, x| {
        b.reshape(&x, &IO)
    });
    check_ane(&p, &["ANE002"]);
}

#[test]
fn ane003_single_input_and_output() {
    let mut b = Builder::new(Dialect::Ios18);
    let x = b.input("x", F16, &IO);
    let y = b.input("y", F16, &IO);
    let s = b.add(&x, &y);
    b.output(&s);
    let report = check_ane(&b.finish(), &["ANE003"]);
    assert_eq!(report.diagnostics[0].severity, Severity::Warning);
}

#[test]
fn ane004_conv_weight_must_be_const() {
    // The weight is sliced out of the input: a runtime value.
    let p = program(Dialect::Ios18, &IO, F16, |b, x| {
        let w = b.slice_by_size(&x, &[0, 0, 0, 0], &[1, 64, 1, 64]);
        let w = b.reshape(&w, &[64, 64, 1, 1]);
        b.conv(&x, &w, 1)
    });
    check_ane(&p, &["ANE004"]);
    let p = program(Dialect::Ios18, &IO, F16, |b, x| {
        let w = b.blob_const(TensorType::new(F16, [64, 64, 1, 1]), "w.bin", 64);
        b.conv(&x, &w, 1)
    });
    check_ane(&p, &[]);
}

fn sdpa_program(with_mask: bool) -> Program {
    program(Dialect::Ios18, &IO, F16, |b, x| {
        let q = b.reshape(&x, &[1, 2, 384, 32]);
        let mut args = vec![
            ("query", Arg::var(&q.name)),
            ("key", Arg::var(&q.name)),
            ("value", Arg::var(&q.name)),
        ];
        if with_mask {
            let mask = b.causal_mask(F16, 384);
            args.push(("attn_mask", Arg::var(&mask.name)));
        }
        let a = b.op(Op::ScaledDotProductAttention, args, Vec::new());
        b.reshape(&a[0], &IO)
    })
}

#[test]
fn ane005_sdpa_mask_is_ignored() {
    let report = check_ane(&sdpa_program(true), &["ANE005"]);
    assert!(!report.is_ok());
    check_ane(&sdpa_program(false), &[]);
}

fn matmul_program(dialect: Dialect) -> Program {
    program(dialect, &IO, F16, |b, x| {
        let x2 = b.reshape(&x, &[1, 1, 64, 384]);
        let s = b.matmul(&x2, &x2, true, false); // (1, 1, 384, 384)
        let y = b.matmul(&x2, &s, false, false); // (1, 1, 64, 384)
        b.reshape(&y, &IO)
    })
}

#[test]
fn ane006_matmul_in_ios16() {
    let report = check_ane(&matmul_program(Dialect::Ios16), &["ANE006"]);
    assert_eq!(report.warnings().count(), 2);
    check_ane(&matmul_program(Dialect::Ios18), &[]);
}

#[test]
fn ane007_cast_in_ios16() {
    let body = |b: &mut Builder, x: Tensor| {
        let up = b.cast(&x, DType::Fp32);
        b.cast(&up, F16)
    };
    check_ane(&program(Dialect::Ios16, &IO, F16, body), &["ANE007"]);
    check_ane(&program(Dialect::Ios18, &IO, F16, body), &[]);
}

#[test]
fn ane008_fp32_io_needs_cast() {
    // [1, 64, 1, 192] fp32 = 49,152 bytes.
    let io = [1, 64, 1, 192];
    let p = program(Dialect::Ios18, &io, DType::Fp32, |b, x| b.mul(&x, &x));
    let report = check_ane(&p, &["ANE008"]);
    assert_eq!(report.warnings().count(), 2, "input and output: {report}");
    let p = program(Dialect::Ios18, &io, DType::Fp32, |b, x| {
        let h = b.cast(&x, F16);
        let y = b.mul(&h, &h);
        b.cast(&y, DType::Fp32)
    });
    check_ane(&p, &[]);
}

#[test]
fn ane009_and_ane010_minimum_sizes() {
    // 32 channels x 768 = 49,152 bytes: only the channel rule.
    check_ane(
        &program(Dialect::Ios18, &[1, 32, 1, 768], F16, |b, x| b.mul(&x, &x)),
        &["ANE009"],
    );
    // 64 channels x 64 positions = 8,192 bytes: only the surface-size rule.
    check_ane(
        &program(Dialect::Ios18, &[1, 64, 1, 64], F16, |b, x| b.mul(&x, &x)),
        &["ANE010"],
    );
}

#[test]
fn ane009_and_ane010_are_errors_with_the_padding_in_the_message() {
    let report = check_ane(
        &program(Dialect::Ios18, &[1, 32, 1, 768], F16, |b, x| b.mul(&x, &x)),
        &["ANE009"],
    );
    assert!(!report.is_ok());
    assert!(
        report.diagnostics[0]
            .message
            .contains("pad it to [1, 64, 1, 768]"),
        "{report}"
    );
}

#[test]
fn ane015_and_ane016_io_widths() {
    // 776 positions: not a multiple of 16, and 1,552-byte rows.
    let p = program(Dialect::Ios18, &[1, 64, 1, 776], F16, |b, x| b.mul(&x, &x));
    let report = check_ane(&p, &["ANE015", "ANE016"]);
    assert_eq!(report.errors().count(), 4, "input and output: {report}");
    // 400 positions: a multiple of 16, but 800-byte rows.
    let p = program(Dialect::Ios18, &[1, 64, 1, 400], F16, |b, x| b.mul(&x, &x));
    check_ane(&p, &["ANE016"]);
    // In fp32 (with casts) the same width has 1,600-byte rows: clean.
    let p = program(Dialect::Ios18, &[1, 64, 1, 400], DType::Fp32, |b, x| {
        let h = b.cast(&x, F16);
        let y = b.mul(&h, &h);
        b.cast(&y, DType::Fp32)
    });
    check_ane(&p, &[]);
}

#[test]
fn ane017_and_ane018_several_inputs() {
    // Different sizes: 384 and 768 positions.
    let mut b = Builder::new(Dialect::Ios18);
    let x = b.input("x", F16, &IO);
    let y = b.input("y", F16, &[1, 64, 1, 768]);
    let head = b.slice_by_size(&y, &[0, 0, 0, 0], &IO);
    let s = b.add(&x, &head);
    b.output(&s);
    let report = check_ane(&b.finish(), &["ANE003", "ANE017"]);
    assert!(!report.is_ok());
    // Equal sizes declared out of name order.
    let mut b = Builder::new(Dialect::Ios18);
    let y = b.input("y", F16, &IO);
    let x = b.input("x", F16, &IO);
    let s = b.add(&x, &y);
    b.output(&s);
    let report = check_ane(&b.finish(), &["ANE003", "ANE018"]);
    assert!(
        report.to_string().contains(r#"name order ["x", "y"]"#),
        "{report}"
    );
}

#[test]
fn ane019_dimensions_above_65536() {
    // A conv to 70,000 channels (a classifier over a large vocabulary).
    let p = program(Dialect::Ios18, &IO, F16, |b, x| {
        let w = b.blob_const(TensorType::new(F16, [70000, 64, 1, 1]), "w.bin", 64);
        b.conv(&x, &w, 1)
    });
    let report = check_ane(&p, &["ANE019"]);
    assert_eq!(
        report.errors().count(),
        2,
        "the weight and the result: {report}"
    );
}

#[test]
fn ane020_more_than_2_gib_of_baked_weights() {
    // Two 2 GiB matrices (32,768 x 32,768 fp16), one file each.
    let p = program(Dialect::Ios18, &IO, F16, |b, x| {
        for file in ["a.bin", "b.bin"] {
            b.blob_const(TensorType::new(F16, [32768, 32768]), file, 64);
        }
        b.mul(&x, &x)
    });
    check_ane(&p, &["ANE020"]);
}

#[test]
fn ane021_more_than_16_weight_files() {
    let many = |files: usize| {
        program(Dialect::Ios18, &IO, F16, move |b, x| {
            let mut h = x;
            for i in 0..files {
                let w = b.blob_const(
                    TensorType::new(F16, [1, 64, 1, 1]),
                    &format!("w{i}.bin"),
                    64,
                );
                h = b.mul(&h, &w);
            }
            h
        })
    };
    check_ane(&many(16), &[]);
    check_ane(&many(17), &["ANE021"]);
}

#[test]
fn ane022_root_of_a_reduction() {
    let p = program(Dialect::Ios18, &IO, F16, |b, x| {
        let sq = b.mul(&x, &x);
        let ss = b.reduce_sum(&sq, &[1], true);
        let eps = b.scalar(F16, 1e-5);
        let var = b.add(&ss, &eps);
        let r = b.rsqrt(&var);
        b.mul(&x, &r)
    });
    let report = check_ane(&p, &["ANE012", "ANE022"]);
    assert!(report.to_string().contains("pow(x, -0.5)"), "{report}");
    // A root of something else is only unverified (ANE012).
    let p = program(Dialect::Ios18, &IO, F16, |b, x| {
        let sq = b.mul(&x, &x);
        b.sqrt(&sq)
    });
    check_ane(&p, &["ANE012"]);
}

#[test]
fn ane023_reduce_mean() {
    let p = program(Dialect::Ios18, &IO, F16, |b, x| {
        let m = b.reduce_mean(&x, &[1], true);
        b.mul(&x, &m)
    });
    let report = check_ane(&p, &["ANE012", "ANE023"]);
    assert!(report.to_string().contains("reduce_sum"), "{report}");
}

#[test]
fn ane024_softmax_over_a_power_of_two() {
    // Over the width (384): warned; over the channels (64): fine.
    check_ane(
        &program(Dialect::Ios18, &IO, F16, |b, x| b.softmax(&x, -1)),
        &["ANE024"],
    );
    check_ane(
        &program(Dialect::Ios18, &IO, F16, |b, x| b.softmax(&x, 1)),
        &[],
    );
}

#[test]
fn ane011_huge_conv_input_channels() {
    let p = program(Dialect::Ios18, &[1, 32000, 1, 384], F16, |b, x| {
        let w = b.blob_const(TensorType::new(F16, [64, 32000, 1, 1]), "w.bin", 64);
        b.conv(&x, &w, 1)
    });
    check_ane(&p, &["ANE011"]);
}

#[test]
fn ane012_unverified_ops() {
    let report = check_ane(
        &program(Dialect::Ios18, &IO, F16, |b, x| b.silu(&x)),
        &["ANE012"],
    );
    assert!(
        report.diagnostics[0]
            .message
            .contains("not used by the reference; unverified")
    );
    check_ane(
        &program(Dialect::Ios18, &IO, F16, |b, x| b.sigmoid(&x)),
        &[],
    );
}

#[test]
fn ane013_one_record_per_weight_file() {
    let p = program(Dialect::Ios18, &IO, F16, |b, x| {
        let w = b.blob_const(TensorType::new(F16, [1, 64, 1, 1]), "all.bin", 256);
        b.mul(&x, &w)
    });
    check_ane(&p, &["ANE013"]);
}

#[test]
fn ane014_optional_parameters_spelled_out() {
    let p = program(Dialect::Ios18, &IO, F16, |b, x| {
        let w = b.blob_const(TensorType::new(F16, [64, 64, 1, 1]), "w.bin", 64);
        let y = b.op(
            Op::Conv,
            vec![("x", Arg::var(&x.name)), ("weight", Arg::var(&w.name))],
            Vec::new(),
        );
        y[0].clone()
    });
    let report = check_ane(&p, &["ANE014"]);
    assert!(
        report.diagnostics[0]
            .message
            .contains("dilations, groups, pad, pad_type, strides")
    );
}

#[test]
fn every_ane_rule_has_a_test_and_a_catalogue_entry() {
    // The ANE rules exercised above; a new rule needs a test here too.
    let tested = [
        "ANE001", "ANE002", "ANE003", "ANE004", "ANE005", "ANE006", "ANE007", "ANE008", "ANE009",
        "ANE010", "ANE011", "ANE012", "ANE013", "ANE014", "ANE015", "ANE016", "ANE017", "ANE018",
        "ANE019", "ANE020", "ANE021", "ANE022", "ANE023", "ANE024",
    ];
    let catalogue: Vec<&str> = RULES
        .iter()
        .map(|r| r.id)
        .filter(|id| id.starts_with("ANE"))
        .collect();
    assert_eq!(catalogue, tested);
    // Sources: the reference's engineering notes, or a field report of
    // another project (docs/shared field-reports.md, issue 22).
    for id in tested {
        let source = rule_by_id(id).unwrap().source;
        assert!(
            source.starts_with("ane-reference §") || source.starts_with("field report: "),
            "{id}: {source}"
        );
    }
}

#[test]
fn value_literals_in_fixture_helpers_are_exact() {
    // Guard for the fixture reader: a uint8 tensor with fill 3 becomes ints.
    let lit = fixture_tensor(&serde_json::json!({"dtype": "uint8", "shape": [2], "fill": 3}));
    assert_eq!(lit.as_ints(), Some(&[3i64, 3][..]));
}
