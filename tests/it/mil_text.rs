//! MIL text: `parse(emit(p)) == p` over generated programs covering every op,
//! `emit(parse(t)) == t` on the hand-written canonical fixtures in
//! `tests/fixtures/mil/`, the non-canonical and ios16 samples of
//! ane-reference 3.2 and 4.5 (rewritten for these tests), error positions,
//! exact float literal values, and a no-panic fuzz of the parser.

use anemone::Error;
use anemone::mil::op::ParamKind;
use anemone::mil::{
    self, Arg, BlobRef, DType, Dialect, Function, Literal, Op, Operation, Program, TensorType,
    Value, Var,
};
use proptest::prelude::*;

use crate::common::fixture;

// ---- helpers ------------------------------------------------------------------

fn fp16_tensor(shape: &[usize]) -> TensorType {
    TensorType::new(DType::Fp16, shape)
}

/// An operation with the `name` attribute equal to its single result's name.
fn op(
    op: Op,
    result: &str,
    ty: TensorType,
    args: Vec<(&str, Arg)>,
    attrs: Vec<(&str, Literal)>,
) -> Operation {
    Operation {
        op,
        name: result.to_string(),
        outputs: vec![Var::new(result, ty)],
        args: args.into_iter().map(|(k, a)| (k.to_string(), a)).collect(),
        attrs: attrs.into_iter().map(|(k, l)| (k.to_string(), l)).collect(),
    }
}

fn constant(result: &str, lit: Literal) -> Operation {
    let ty = lit.ty.clone();
    op(Op::Const, result, ty, vec![], vec![("val", lit)])
}

fn var(name: &str) -> Arg {
    Arg::var(name)
}

/// Structural equality that treats NaN as equal to NaN (`Debug` of an `f32` is
/// its shortest round-trip spelling, so equal `Debug` means equal bits otherwise).
fn assert_same(actual: &Program, expected: &Program, context: &str) {
    assert_eq!(
        format!("{actual:#?}"),
        format!("{expected:#?}"),
        "programs differ: {context}"
    );
}

fn parse_ok(text: &str) -> Program {
    match mil::parse(text) {
        Ok(p) => p,
        Err(e) => panic!("parse failed: {e}\n--- text ---\n{text}"),
    }
}

// ---- random programs ------------------------------------------------------------

/// A deterministic generator driven by a proptest seed: the crate's SplitMix64.
struct Rng(anemone::rng::Rng);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(anemone::rng::Rng::new(seed))
    }
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn below(&mut self, n: usize) -> usize {
        self.0.below(n.max(1) as u64) as usize
    }
    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// fp16 and fp32 edge values: signed zeros, fp16 extremes (max, min normal, min
/// subnormal, a tie), f32 extremes, infinities, NaN and values with long spellings.
const FLOAT_EDGES: &[f32] = &[
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    65504.0,
    -65504.0,
    65520.0,
    6.103_515_6e-5,
    5.960_464_5e-8,
    2.980_232_2e-8,
    0.1,
    1.0 / 3.0,
    f32::MAX,
    f32::MIN,
    f32::MIN_POSITIVE,
    1e-45,
    1e16,
    1.234_567_9e-5,
    f32::INFINITY,
    f32::NEG_INFINITY,
    f32::NAN,
];

const STRINGS: &[&str] = &[
    "",
    "valid",
    "fp16",
    "a \"quoted\" word",
    "back\\slash",
    "line\nbreak\ttab\r",
    "ünïcødé ✓",
    "@model_path/weights/w.bin",
];

/// Variable names, some of them spelled like keywords of the text format.
const ODD_NAMES: &[&str] = &[
    "tensor", "fp16", "string", "true", "inf", "nan", "BLOBFILE", "func", "program", "name",
    "const", "_", "_0", "A_b_9",
];

fn random_type(rng: &mut Rng, dtypes: &[DType]) -> TensorType {
    let dtype = *rng.pick(dtypes);
    let rank = rng.below(5);
    let shape: Vec<usize> = (0..rank)
        .map(|_| {
            if rng.below(8) == 0 {
                0
            } else {
                1 + rng.below(3)
            }
        })
        .collect();
    TensorType::new(dtype, shape)
}

fn random_int(rng: &mut Rng, dtype: DType) -> i64 {
    let (lo, hi) = dtype.int_range().expect("integer dtype");
    let v: i128 = match rng.below(4) {
        0 => lo,
        1 => hi,
        2 => [0, 1, lo.max(-1)][rng.below(3)],
        _ => lo + (u128::from(rng.next()) % (hi - lo + 1) as u128) as i128,
    };
    // uint64 values are stored as their bits in an i64 (see `Literal::uint64`).
    v as u64 as i64
}

fn random_literal(rng: &mut Rng) -> Literal {
    if rng.below(6) == 0 {
        let non_string = &DType::ALL[..DType::ALL.len() - 1];
        let mut ty = random_type(rng, non_string);
        if rng.coin() {
            ty.shape = vec![1 + rng.below(4096), 768, 1, 1];
        }
        let offset = if rng.coin() {
            64 + 64 * rng.below(100) as u64
        } else {
            rng.next()
        };
        let path = format!("@model_path/weights/{}", rng.pick(STRINGS));
        return Literal::blob(ty, path, offset);
    }
    let ty = random_type(rng, &DType::ALL);
    let n = ty.numel();
    match ty.dtype {
        DType::Fp16 | DType::Fp32 => {
            let values = (0..n)
                .map(|_| {
                    if rng.coin() {
                        *rng.pick(FLOAT_EDGES)
                    } else {
                        f32::from_bits(rng.next() as u32)
                    }
                })
                .collect();
            Literal::floats(ty.dtype, ty.shape, values)
        }
        DType::Bool => Literal {
            value: Value::Bool((0..n).map(|_| rng.coin()).collect()),
            ty,
        },
        DType::String => Literal {
            value: Value::Str((0..n).map(|_| rng.pick(STRINGS).to_string()).collect()),
            ty,
        },
        int => {
            let values = (0..n).map(|_| random_int(rng, int)).collect();
            Literal::ints(int, ty.shape, values)
        }
    }
}

fn random_operand(rng: &mut Rng, defined: &[String]) -> Arg {
    if rng.below(3) == 0 {
        Arg::Lit(random_literal(rng))
    } else {
        Arg::var(rng.pick(defined).clone())
    }
}

/// A program with one statement for every op of [`Op::ALL`] (in random order,
/// plus a few repeats), each op's parameters from [`Op::params`] in random order
/// (optional ones sometimes left out), random types and literals, `split` with
/// one to four results, and several function outputs.
fn random_program(seed: u64) -> Program {
    let mut rng = Rng::new(seed);
    let dialect = if rng.coin() {
        Dialect::Ios18
    } else {
        Dialect::Ios16
    };
    let mut counter = 0;
    let mut odd_names: Vec<&str> = ODD_NAMES.to_vec();
    let mut fresh = |rng: &mut Rng| -> String {
        counter += 1;
        match odd_names.pop() {
            Some(name) if rng.below(6) == 0 => name.to_string(),
            Some(name) => {
                odd_names.push(name);
                format!("v{counter}")
            }
            None => format!("v{counter}"),
        }
    };
    let all_dtypes = DType::ALL;
    let inputs: Vec<Var> = (0..1 + rng.below(3))
        .map(|_| {
            let ty = random_type(&mut rng, &all_dtypes);
            Var::new(fresh(&mut rng), ty)
        })
        .collect();
    let mut defined: Vec<String> = inputs.iter().map(|v| v.name.clone()).collect();
    let mut order: Vec<Op> = Op::ALL.to_vec();
    for _ in 0..rng.below(4) {
        order.push(*rng.pick(&Op::ALL));
    }
    for i in (1..order.len()).rev() {
        let j = rng.below(i + 1);
        order.swap(i, j);
    }
    let mut ops = Vec::new();
    for kind in order {
        let n_results = if kind == Op::Split {
            1 + rng.below(4)
        } else {
            1
        };
        let outputs: Vec<Var> = (0..n_results)
            .map(|_| {
                let ty = random_type(&mut rng, &all_dtypes);
                Var::new(fresh(&mut rng), ty)
            })
            .collect();
        let mut params: Vec<_> = kind.params().to_vec();
        for i in (1..params.len()).rev() {
            let j = rng.below(i + 1);
            params.swap(i, j);
        }
        let mut args = Vec::new();
        let mut attrs = Vec::new();
        if kind == Op::Const {
            attrs.push(("val".to_string(), random_literal(&mut rng)));
        }
        for p in params {
            if !p.required && rng.coin() {
                continue;
            }
            let key = p.name.to_string();
            match p.kind {
                ParamKind::Tensor | ParamKind::Const | ParamKind::ConstTensor => {
                    args.push((key, random_operand(&mut rng, &defined)))
                }
                ParamKind::Tuple => {
                    let items = (0..rng.below(4))
                        .map(|_| random_operand(&mut rng, &defined))
                        .collect();
                    args.push((key, Arg::Tuple(items)));
                }
                ParamKind::Attr => attrs.push((key, random_literal(&mut rng))),
            }
        }
        let name = if rng.below(4) == 0 {
            format!("{} {}", rng.pick(STRINGS), ops.len())
        } else {
            outputs[0].name.clone()
        };
        defined.extend(outputs.iter().map(|v| v.name.clone()));
        ops.push(Operation {
            op: kind,
            name,
            outputs,
            args,
            attrs,
        });
    }
    let outputs = (0..1 + rng.below(3))
        .map(|_| rng.pick(&defined).clone())
        .collect();
    Program {
        dialect,
        main: Function {
            name: "main".to_string(),
            inputs,
            ops,
            outputs,
        },
    }
}

fn check_round_trip(program: &Program) {
    let text = mil::emit(program);
    let parsed = parse_ok(&text);
    assert_same(&parsed, program, &text);
    assert_eq!(mil::emit(&parsed), text, "emit is not stable");
}

proptest! {
    #[test]
    fn parse_inverts_emit(seed in any::<u64>()) {
        check_round_trip(&random_program(seed));
    }
}

/// The generator behind `parse_inverts_emit` reaches what it claims to.
#[test]
fn generated_programs_cover_every_op_param_and_literal_kind() {
    use std::collections::BTreeSet;
    let mut params = BTreeSet::new();
    let mut literal_dtypes = BTreeSet::new();
    let (mut blobs, mut tuples, mut multi_split, mut ios16, mut ios18) = (0, 0, 0, 0, 0);
    let mut nan_and_inf = (false, false);
    for seed in 0..64 {
        let p = random_program(seed);
        match p.dialect {
            Dialect::Ios16 => ios16 += 1,
            Dialect::Ios18 => ios18 += 1,
        }
        for o in &p.main.ops {
            if o.op == Op::Split && o.outputs.len() > 1 {
                multi_split += 1;
            }
            let mut literals: Vec<&Literal> = o.attrs.iter().map(|(_, l)| l).collect();
            for (key, arg) in &o.args {
                params.insert((o.op, key.clone()));
                match arg {
                    Arg::Lit(l) => literals.push(l),
                    Arg::Tuple(items) => {
                        tuples += 1;
                        literals.extend(items.iter().filter_map(|a| match a {
                            Arg::Lit(l) => Some(l),
                            _ => None,
                        }));
                    }
                    Arg::Var(_) => {}
                }
            }
            for (key, _) in &o.attrs {
                params.insert((o.op, key.clone()));
            }
            for l in literals {
                literal_dtypes.insert(l.ty.dtype);
                match &l.value {
                    Value::Blob(_) => blobs += 1,
                    Value::Float(v) => {
                        nan_and_inf.0 |= v.iter().any(|x| x.is_nan());
                        nan_and_inf.1 |= v.iter().any(|x| x.is_infinite());
                    }
                    _ => {}
                }
            }
        }
    }
    for kind in Op::ALL {
        for p in kind.params() {
            assert!(
                params.contains(&(kind, p.name.to_string())),
                "{kind} {} never generated",
                p.name
            );
        }
    }
    assert!(params.contains(&(Op::Const, "val".to_string())));
    assert_eq!(literal_dtypes.len(), DType::ALL.len());
    assert!(blobs > 0 && tuples > 0 && multi_split > 0 && ios16 > 0 && ios18 > 0);
    assert_eq!(nan_and_inf, (true, true));
}

// ---- canonical fixtures -------------------------------------------------------------

/// The text of `tests/fixtures/mil/<name>`.
fn mil_fixture(name: &str) -> String {
    let path = fixture("mil").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn emit_inverts_parse_on_canonical_fixtures() {
    let mut names: Vec<String> = std::fs::read_dir(fixture("mil"))
        .expect("fixture dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".mil"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "attention_ios18.mil",
            "quant_conv_ios18.mil",
            "rmsnorm_ios16.mil",
            "rmsnorm_ios18.mil"
        ]
    );
    for name in names {
        let text = mil_fixture(&name);
        let program = parse_ok(&text);
        assert_eq!(mil::emit(&program), text, "{name}");
    }
}

#[test]
fn fixture_literals_have_the_written_values() {
    let p = parse_ok(&mil_fixture("quant_conv_ios18.mil"));
    let f = &p.main;
    assert_eq!(
        f.const_value("m"),
        Some(&Literal::floats(
            DType::Fp16,
            [2, 2],
            vec![0.0, -65504.0, f32::NEG_INFINITY, 65504.0]
        ))
    );
    assert_eq!(
        f.const_value("big").and_then(Literal::as_ints),
        Some(&[-1i64][..])
    );
    assert_eq!(
        f.const_value("lim"),
        Some(&Literal::ints(DType::Int8, [2], vec![-128, 127]))
    );
    assert_eq!(
        f.const_value("labels").map(|l| &l.value),
        Some(&Value::Str(vec![
            "a \"quoted\" name".to_string(),
            "tab\there".to_string()
        ]))
    );
    assert_eq!(f.const_value("none"), Some(&Literal::int32s(&[])));
    assert_eq!(f.const_value("eps").and_then(Literal::as_float), Some(1e-5));
    let wq = f.ops.iter().find(|o| o.name == "wq").expect("wq");
    assert_eq!(wq.op, Op::ConstexprAffineDequantize);
    assert!(wq.args.is_empty());
    let keys: Vec<&str> = wq.attrs.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["quantized_data", "zero_point", "scale", "axis"]);
    assert_eq!(
        wq.attr("quantized_data").and_then(Literal::as_blob),
        Some(&BlobRef {
            path: "@model_path/weights/wq.bin".to_string(),
            offset: 64
        })
    );
    assert_eq!(wq.attr("scale"), Some(&Literal::fp16(0.0078125)));

    let a = parse_ok(&mil_fixture("attention_ios18.mil"));
    let split = &a.main.ops[2];
    assert_eq!(split.op, Op::Split);
    let results: Vec<&str> = split.outputs.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(results, ["q", "k", "v"]);
    assert_eq!(a.main.outputs, ["out", "p"]);
    // 1/sqrt(8) in fp16 is 1448 * 2^-12; `0.35351563` is one of its two shortest spellings.
    let ss = a.main.ops.iter().find(|o| o.name == "ss").expect("ss");
    assert_eq!(ss.arg("y"), Some(&Arg::Lit(Literal::fp16(1448.0 / 4096.0))));
    let concat = a.main.ops.last().expect("concat");
    assert_eq!(
        concat.arg("values"),
        Some(&Arg::Tuple(vec![var("om"), var("q")]))
    );
}

// ---- the ane-reference 4.5 sample, written with non-canonical spacing ---------------

const SAMPLE_4_5: &str = r#"program(1.3)
[buildInfo = dict<string, string>({{"coremlc-component-MIL", "3510.2.1"}, {"coremlc-version", "3505.4.1"}, {"coremltools-component-milinternal", ""}, {"coremltools-version", "9.0"}})]
{
  func main<ios18>(tensor<fp16, [1, 128, 1, 96]> x) {
            tensor<int32, [4]> b0 = const()[name=string("b0"), val=tensor<int32, [4]>([0,0,0,0])];
	tensor<int32,[4]> s0 = const()[name=string("s0"),val=tensor<int32,[4]>([1,128,1,32])];
    tensor<fp16, [1,128,1,32]> act = slice_by_size(x=x,begin=b0,size=s0)[name=string("act")];
    // the packed matrix occupies spatial columns 32..95
    tensor<int32, [4]> b1 = const()[name=string("b1"), val=tensor<int32, [4]>([0,0,0,32])];
    tensor<int32, [4]> s1 = const()[name=string("s1"), val=tensor<int32, [4]>([1,128,1,64])];
    tensor<fp16, [1,128,1,64]> mat = slice_by_size(x=x,begin=b1,size=s1)[name=string("mat")];
    tensor<int32, [4]> r1 = const()[name=string("r1"), val=tensor<int32, [4]>([1,1,128,32])];
    tensor<fp16, [1,1,128,32]> a2 = reshape(shape=r1,x=act)[name=string("a2")];
    tensor<int32, [4]> pm = const()[name=string("pm"), val=tensor<int32, [4]>([0,1,3,2])];
    tensor<fp16, [1,1,32,128]> at = transpose(perm=pm,x=a2)[name=string("at")];
    tensor<int32, [4]> r2 = const()[name=string("r2"), val=tensor<int32, [4]>([1,1,128,64])];
    tensor<fp16, [1,1,128,64]> m2 = reshape(shape=r2,x=mat)[name=string("m2")];
    bool f = const()[name=string("f"), val=bool(false)];
    tensor<fp16, [1,1,32,64]> yh = matmul(transpose_x=f,transpose_y=f,x=at,y=m2)[name=string("yh")];
    tensor<fp16, [1,1,64,32]> yt = transpose(perm=pm,x=yh)[name=string("yt")];
    tensor<int32, [4]> r3 = const()[name=string("r3"), val=tensor<int32, [4]>([1,64,1,32])];
    tensor<fp16, [1,64,1,32]> y = reshape(shape=r3,x=yt)[name=string("y")];
    string pt = const()[name=string("pt"), val=string("valid")];
    tensor<int32, [2]> st = const()[name=string("st"), val=tensor<int32, [2]>([1,1])];
    tensor<int32, [4]> pd = const()[name=string("pd"), val=tensor<int32, [4]>([0,0,0,0])];
    tensor<int32, [2]> dl = const()[name=string("dl"), val=tensor<int32, [2]>([1,1])];
    int32 gr = const()[name=string("gr"), val=int32(1)];
    tensor<fp16, [64, 128, 1, 1]> W = const()[name=string("W"), val=tensor<fp16, [64, 128, 1, 1]>(BLOBFILE(path=string("@model_path/weights/w.bin"), offset=uint64(64)))];
    tensor<fp16, [1,64,1,32]> yc = conv(dilations=dl,groups=gr,pad=pd,pad_type=pt,strides=st,weight=W,x=act)[name=string("yc")];
  } -> (y,yc);
}
"#;

#[test]
fn reference_sample_parses_to_the_expected_graph() {
    let int4 = |v: [i64; 4]| Literal::int32s(&v);
    let t = |s: &[usize]| fp16_tensor(s);
    let expected = Program {
        dialect: Dialect::Ios18,
        main: Function {
            name: "main".to_string(),
            inputs: vec![Var::new("x", t(&[1, 128, 1, 96]))],
            ops: vec![
                constant("b0", int4([0, 0, 0, 0])),
                constant("s0", int4([1, 128, 1, 32])),
                op(
                    Op::SliceBySize,
                    "act",
                    t(&[1, 128, 1, 32]),
                    vec![("x", var("x")), ("begin", var("b0")), ("size", var("s0"))],
                    vec![],
                ),
                constant("b1", int4([0, 0, 0, 32])),
                constant("s1", int4([1, 128, 1, 64])),
                op(
                    Op::SliceBySize,
                    "mat",
                    t(&[1, 128, 1, 64]),
                    vec![("x", var("x")), ("begin", var("b1")), ("size", var("s1"))],
                    vec![],
                ),
                constant("r1", int4([1, 1, 128, 32])),
                op(
                    Op::Reshape,
                    "a2",
                    t(&[1, 1, 128, 32]),
                    vec![("shape", var("r1")), ("x", var("act"))],
                    vec![],
                ),
                constant("pm", int4([0, 1, 3, 2])),
                op(
                    Op::Transpose,
                    "at",
                    t(&[1, 1, 32, 128]),
                    vec![("perm", var("pm")), ("x", var("a2"))],
                    vec![],
                ),
                constant("r2", int4([1, 1, 128, 64])),
                op(
                    Op::Reshape,
                    "m2",
                    t(&[1, 1, 128, 64]),
                    vec![("shape", var("r2")), ("x", var("mat"))],
                    vec![],
                ),
                constant("f", Literal::bool(false)),
                op(
                    Op::Matmul,
                    "yh",
                    t(&[1, 1, 32, 64]),
                    vec![
                        ("transpose_x", var("f")),
                        ("transpose_y", var("f")),
                        ("x", var("at")),
                        ("y", var("m2")),
                    ],
                    vec![],
                ),
                op(
                    Op::Transpose,
                    "yt",
                    t(&[1, 1, 64, 32]),
                    vec![("perm", var("pm")), ("x", var("yh"))],
                    vec![],
                ),
                constant("r3", int4([1, 64, 1, 32])),
                op(
                    Op::Reshape,
                    "y",
                    t(&[1, 64, 1, 32]),
                    vec![("shape", var("r3")), ("x", var("yt"))],
                    vec![],
                ),
                constant("pt", Literal::string("valid")),
                constant("st", Literal::int32s(&[1, 1])),
                constant("pd", int4([0, 0, 0, 0])),
                constant("dl", Literal::int32s(&[1, 1])),
                constant("gr", Literal::int32(1)),
                constant(
                    "W",
                    Literal::blob(t(&[64, 128, 1, 1]), "@model_path/weights/w.bin", 64),
                ),
                op(
                    Op::Conv,
                    "yc",
                    t(&[1, 64, 1, 32]),
                    vec![
                        ("dilations", var("dl")),
                        ("groups", var("gr")),
                        ("pad", var("pd")),
                        ("pad_type", var("pt")),
                        ("strides", var("st")),
                        ("weight", var("W")),
                        ("x", var("act")),
                    ],
                    vec![],
                ),
            ],
            outputs: vec!["y".to_string(), "yc".to_string()],
        },
    };
    let parsed = parse_ok(SAMPLE_4_5);
    assert_eq!(parsed, expected);
    // Canonical spelling of two of its statements, written by hand.
    let text = mil::emit(&parsed);
    assert!(text.contains(
        "\n        tensor<fp16, [1, 128, 1, 32]> act = slice_by_size(x = x, begin = b0, size = s0)[name = string(\"act\")];\n"
    ));
    assert!(text.contains(
        "\n        tensor<int32, [4]> s0 = const()[name = string(\"s0\"), val = tensor<int32, [4]>([1, 128, 1, 32])];\n"
    ));
    assert!(text.ends_with("    } -> (y, yc);\n}\n"));
}

// ---- ios16 ------------------------------------------------------------------------

#[test]
fn ios16_verbose_scalars_parse_to_the_same_graph_as_ios18() {
    let p16 = parse_ok(&mil_fixture("rmsnorm_ios16.mil"));
    let p18 = parse_ok(&mil_fixture("rmsnorm_ios18.mil"));
    assert_eq!(p16.dialect, Dialect::Ios16);
    assert_eq!(p18.dialect, Dialect::Ios18);
    let f = &p16.main;
    assert_eq!(f.var_type("kd"), Some(&TensorType::scalar(DType::Bool)));
    assert_eq!(f.const_value("kd"), Some(&Literal::bool(true)));
    assert_eq!(f.const_value("inv"), Some(&Literal::fp16(0.015625)));
    assert_eq!(f.const_value("one"), Some(&Literal::int32(1)));
    assert_eq!(
        f.const_value("w").and_then(Literal::as_blob),
        Some(&BlobRef {
            path: "@model_path/weights/rms.bin".to_string(),
            offset: 64
        })
    );
    let me = f.ops.iter().find(|o| o.name == "me").expect("me");
    assert_eq!(
        me.arg("y"),
        Some(&Arg::Lit(Literal::fp16(f32::powi(2.0, -14))))
    );
    // The first ten statements are the same program in both dialects.
    assert_eq!(f.ops[..10], p18.main.ops[..10]);
    assert_eq!(f.inputs, p18.main.inputs);

    // Written as ios18, the verbose scalars become compact.
    let mut as18 = p16.clone();
    as18.dialect = Dialect::Ios18;
    let text = mil::emit(&as18);
    assert!(text.starts_with("program(1.3)\n"));
    assert!(text.contains("    func main<ios18>(tensor<fp16, [1, 64, 1, 16]> x) {\n"));
    assert!(text.contains("        bool kd = const()[name = string(\"kd\"), val = bool(true)];\n"));
    assert!(text.contains("offset = uint64(64)))];"));
    assert!(!text.contains("[]>"));
    assert_eq!(parse_ok(&text).main, p16.main);
}

#[test]
fn either_scalar_spelling_is_accepted_in_either_dialect() {
    let text = r#"program(1.0)
{
    func main<ios16>(fp16 x) {
        tensor<fp16, []> y = mul(x = x, y = fp16(2.0))[name = string("y")];
        fp16 z = add(x = y, y = tensor<fp16, []>(1.0))[name = tensor<string, []>("z")];
    } -> (z);
}
"#;
    let p = parse_ok(text);
    assert_eq!(p.dialect, Dialect::Ios16);
    assert_eq!(
        p.main.inputs,
        [Var::new("x", TensorType::scalar(DType::Fp16))]
    );
    assert_eq!(p.main.ops[0].arg("y"), Some(&Arg::Lit(Literal::fp16(2.0))));
    assert_eq!(p.main.ops[1].arg("y"), Some(&Arg::Lit(Literal::fp16(1.0))));
    assert_eq!(p.main.ops[1].name, "z");
}

#[test]
fn parenthesised_split_results_are_accepted() {
    let text = r#"program(1.3)
{
    func main<ios18>(tensor<fp16, [1, 4]> x) {
        (tensor<fp16, [1, 2]> a, tensor<fp16, [1, 2]> b) = split(x = x, num_splits = int32(2), axis = int32(1))[name = string("s")];
    } -> (b, a);
}
"#;
    let p = parse_ok(text);
    let names: Vec<&str> = p.main.ops[0]
        .outputs
        .iter()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(names, ["a", "b"]);
    assert!(mil::emit(&p).contains(
        "        tensor<fp16, [1, 2]> a, tensor<fp16, [1, 2]> b = split(x = x, num_splits = int32(2), axis = int32(1))[name = string(\"s\")];\n"
    ));
}

// ---- errors -----------------------------------------------------------------------

/// A one-statement program with `statement` on line 4 and `outputs` returned.
fn program_with(statement: &str, outputs: &str) -> String {
    format!(
        "program(1.3)\n{{\n    func main<ios18>(tensor<fp16, [1, 4]> x) {{\n        {statement}\n    }} -> ({outputs});\n}}\n"
    )
}

/// Parsing `text` fails at the first occurrence of `needle` on 1-based `line`
/// (the column is found in the text, not taken from the parser), with a
/// message containing `fragment`.
fn check_error(text: &str, line: usize, needle: &str, fragment: &str) {
    let source_line = text.lines().nth(line - 1).expect("line exists");
    let col = source_line
        .find(needle)
        .unwrap_or_else(|| panic!("`{needle}` not on line {line}: {source_line}"))
        + 1;
    match mil::parse(text) {
        Err(Error::Parse {
            line: l,
            col: c,
            msg,
        }) => {
            assert!(
                msg.contains(fragment),
                "message {msg:?} lacks {fragment:?}\n{text}"
            );
            assert_eq!((l, c), (line, col), "position of error {msg:?}\n{text}");
            let shown = mil::parse(text).unwrap_err().to_string();
            assert!(shown.starts_with(&format!("line {line}, column {col}: ")));
        }
        Err(other) => panic!("not a parse error: {other}"),
        Ok(_) => panic!("parsed but should fail with {fragment:?}:\n{text}"),
    }
}

fn check_statement_error(statement: &str, needle: &str, fragment: &str) {
    check_error(&program_with(statement, "y"), 4, needle, fragment);
}

#[test]
fn malformed_input_errors_name_the_problem_and_its_position() {
    // Unknown op, with the list of known ones.
    check_statement_error(
        r#"tensor<fp16, [1, 4]> y = softplus(x = x)[name = string("y")];"#,
        "softplus",
        "unknown op `softplus` (known ops: const, cast,",
    );
    // Unknown dtypes in a declared type and in a literal.
    check_statement_error(
        r#"tensor<fp64, [1, 4]> y = relu(x = x)[name = string("y")];"#,
        "fp64",
        "unknown dtype `fp64`",
    );
    check_statement_error(
        r#"tensor<fp16, [1, 4]> y = add(x = x, y = bf16(1.0))[name = string("y")];"#,
        "bf16",
        "unknown dtype `bf16`",
    );
    // Malformed literal values.
    check_statement_error(
        r#"tensor<fp16, [1, 4]> y = softmax(x = x, axis = int32(1.5))[name = string("y")];"#,
        "1.5",
        "malformed int32 value",
    );
    check_statement_error(
        r#"tensor<fp16, [1, 4]> y = add(x = x, y = fp16(one))[name = string("y")];"#,
        "one",
        "malformed fp16 value",
    );
    check_statement_error(
        r#"tensor<fp16, [1, 4]> y = matmul(x = x, y = x, transpose_x = bool(1))[name = string("y")];"#,
        "1)",
        "malformed bool value",
    );
    check_statement_error(
        r#"tensor<fp16, [1, 4]> y = cast(x = x, dtype = string(fp16))[name = string("y")];"#,
        "fp16))",
        "malformed string value",
    );
    // Element count not matching the shape.
    check_statement_error(
        r#"tensor<fp16, [1, 4]> y = transpose(x = x, perm = tensor<int32, [4]>([0, 1, 2]))[name = string("y")];"#,
        "[0, 1",
        "has 3 value(s) but its type needs 4",
    );
    check_statement_error(
        r#"tensor<fp16, [1, 4]> y = add(x = x, y = fp16(1.0, 2.0))[name = string("y")];"#,
        "fp16(1",
        "needs a scalar",
    );
    // Integers out of range for their dtype.
    check_statement_error(
        r#"tensor<fp16, [1, 4]> y = dequantize(input = x, scale = fp16(0.5), zero_point = int8(200))[name = string("y")];"#,
        "200",
        "value 200 is out of range for int8 (-128..=127)",
    );
    check_statement_error(
        r#"tensor<fp16, [1, 4]> y = dequantize(input = x, scale = fp16(0.5), zero_point = uint8(-1))[name = string("y")];"#,
        "-1",
        "value -1 is out of range for uint8",
    );
    check_statement_error(
        r#"tensor<fp16, [1, 4]> y = softmax(x = x, axis = int32(2147483648))[name = string("y")];"#,
        "2147483648",
        "out of range for int32",
    );
    check_statement_error(
        r#"tensor<fp16, [1, 4]> y = softmax(x = x, axis = tensor<uint64, [1]>([18446744073709551616]))[name = string("y")];"#,
        "18446744073709551616",
        "out of range for uint64",
    );
    // A finite float beyond the dtype's range.
    check_statement_error(
        r#"tensor<fp16, [1, 4]> y = mul(x = x, y = fp16(70000.0))[name = string("y")];"#,
        "70000",
        "out of range for fp16",
    );
    check_statement_error(
        r#"tensor<fp16, [1, 4]> y = mul(x = x, y = fp16(-0x1.ffep15))[name = string("y")];"#,
        "-0x",
        "out of range for fp16",
    );
    // Missing `name`, with and without an attribute block.
    check_statement_error(
        r#"tensor<fp16, [1, 4]> y = relu(x = x);"#,
        "relu",
        "op `relu` has no `name` attribute",
    );
    check_statement_error(
        r#"tensor<fp16, [1, 4]> y = softmax(x = x)[axis = int32(1)];"#,
        "softmax",
        "has no `name` attribute",
    );
    // Duplicate definitions: a statement result and a function input.
    check_error(
        &program_with(
            r#"tensor<fp16, [1, 4]> x = relu(x = x)[name = string("x")];"#,
            "x",
        ),
        4,
        "x =",
        "variable `x` is already defined (line 3)",
    );
    check_error(
        "program(1.3)\n{\n    func main<ios18>(fp16 a, fp16 a) {\n    } -> (a);\n}\n",
        3,
        "a)",
        "variable `a` is already defined",
    );
    // Use of an undefined variable, including a statement's own result.
    check_statement_error(
        r#"tensor<fp16, [1, 4]> y = add(x = x, y = z)[name = string("y")];"#,
        "z)",
        "variable `z` is used before it is defined",
    );
    check_statement_error(
        r#"tensor<fp16, [1, 4]> y = add(x = x, y = y)[name = string("y")];"#,
        "y)",
        "variable `y` is used before it is defined",
    );
    check_statement_error(
        r#"tensor<fp16, [1, 4]> y = concat(values = (x, w), axis = int32(0))[name = string("y")];"#,
        "w)",
        "variable `w` is used before it is defined",
    );
    // An output naming an undefined variable.
    check_error(
        &program_with(
            r#"tensor<fp16, [1, 4]> y = relu(x = x)[name = string("y")];"#,
            "y, q",
        ),
        5,
        "q",
        "output `q` is not a defined variable",
    );
}

#[test]
fn structural_errors_point_at_the_token() {
    let ok = r#"tensor<fp16, [1, 4]> y = relu(x = x)[name = string("y")];"#;
    check_error(
        &program_with(ok, "y").replace("ios18", "ios17"),
        3,
        "ios17",
        "unsupported opset `ios17`",
    );
    check_error(
        &program_with(
            r#"tensor<fp16, [1, 4]> y = relu(x = x)[name = string("y")]"#,
            "y",
        ),
        5,
        "}",
        "expected `;` at the end of the statement, found `}`",
    );
    check_statement_error(
        r#"tensor<fp16, [1, 4]> y = relu(x = x)[name = string("y)];"#,
        "\"y",
        "unterminated string",
    );
    check_statement_error(
        r#"tensor<fp16, [1, 4]> y = relu(x = $x)[name = string("y")];"#,
        "$",
        "unexpected character '$'",
    );
    check_statement_error(
        r#"tensor<fp16, [1, 4]> y, tensor<fp16, [1, 4]> z = relu(x = x)[name = string("y")];"#,
        "z",
        "op `relu` has one result",
    );
    check_statement_error(
        r#"tensor<fp16, [1, 4]> y = relu(x = x, x = x)[name = string("y")];"#,
        "x = x)",
        "argument `x` is given twice",
    );
    check_statement_error(
        r#"tensor<fp16, [1, 4]> y = relu(x = x)[name = string("y"), name = string("z")];"#,
        "name = string(\"z",
        "attribute `name` is given twice",
    );
    check_statement_error(
        r#"tensor<fp16, [1, -4]> y = relu(x = x)[name = string("y")];"#,
        "-",
        "shape dimension must be a non-negative integer",
    );
    check_statement_error(
        r#"tensor<fp16, [1, 4]> y = concat(values = ((x), x), axis = int32(0))[name = string("y")];"#,
        "(x)",
        "tuples cannot be nested",
    );
    check_statement_error(
        r#"tensor<fp16, [65536, 65536, 65536, 65536]> y = relu(x = x)[name = string("y")];"#,
        "[65536",
        "shape has too many elements",
    );
    check_statement_error(
        r#"tensor<string, [2]> y = const()[name = string("y"), val = tensor<string, [2]>(BLOBFILE(path = string("p"), offset = uint64(0)))];"#,
        "BLOBFILE",
        "string tensor cannot live in a BLOBFILE",
    );
    check_statement_error(
        r#"tensor<fp16, [2]> y = const()[name = string("y"), val = tensor<fp16, [2]>(BLOBFILE(path = string("p"), offset = int32(0)))];"#,
        "int32(0)",
        "BLOBFILE offset must be a uint64",
    );
    let mut trailing = program_with(ok, "y");
    trailing.push_str("extra\n");
    check_error(&trailing, 7, "extra", "after the end of the program");
}

// ---- float and integer values ----------------------------------------------------------

#[test]
fn hex_and_printf_floats_parse_to_exact_values() {
    // (literal, expected value). Expected values derived by hand: an fp16 in
    // [2^e, 2^(e+1)) is a multiple of 2^(e-10); subnormals are multiples of 2^-24.
    let cases: &[(&str, f32)] = &[
        ("fp16(0x1p-3)", 0.125),
        ("fp32(0x1.8p+1)", 3.0),
        ("fp16(0x1.8p+1)", 3.0),
        ("fp32(-0x1.4p-2)", -0.3125),
        ("fp16(0.125000)", 0.125),
        ("fp16(-1)", -1.0),
        ("fp32(-1)", -1.0),
        ("fp16(+2)", 2.0),
        ("fp16(1.0)", 1.0),
        ("fp16(-0.5)", -0.5),
        // 0.204124 * 2^13 = 1672.18 -> 1672 * 2^-13.
        ("fp16(0.204124)", 1672.0 / 8192.0),
        // 0.001302 * 2^20 = 1365.25 -> 1365 * 2^-20.
        ("fp16(0.001302)", 1365.0 / 1048576.0),
        // 1e-05 * 2^24 = 167.77 -> 168 * 2^-24 (subnormal).
        ("fp16(1e-05)", 168.0 / 16777216.0),
        ("fp16(0.00001)", 168.0 / 16777216.0),
        // 3e-8 is above half the smallest subnormal (2^-25 = 2.98e-8); 1e-8 is below.
        ("fp16(3e-8)", 1.0 / 16777216.0),
        ("fp16(1e-8)", 0.0),
        ("fp16(65504)", 65504.0),
        // 65519 is below the midpoint 65520 between 65504 and 2^16.
        ("fp16(65519.0)", 65504.0),
        ("fp16(-65504.0)", -65504.0),
        // 1 + 2^-11 is halfway between two fp16s: ties to even.
        ("fp16(1.00048828125)", 1.0),
        ("fp16(0x1.003p0)", 1.0 + 1.0 / 1024.0),
        ("fp16(0x1p-24)", 1.0 / 16777216.0),
        ("fp16(0x1p-25)", 0.0),
        ("fp16(0x1.8p-25)", 1.0 / 16777216.0),
        ("fp16(-0.0)", -0.0),
        ("fp16(inf)", f32::INFINITY),
        ("fp32(-inf)", f32::NEG_INFINITY),
        ("fp32(.5)", 0.5),
        ("fp32(2.)", 2.0),
        ("fp32(1E+2)", 100.0),
        ("fp32(0x1p-149)", f32::from_bits(1)),
        ("fp32(0x1.fffffep127)", f32::MAX),
        // 1 + 2^-24 exactly is a tie between 1 and 1 + 2^-23 (even: 1); a hair above rounds up.
        ("fp32(1.000000059604644775390625)", 1.0),
        ("fp32(1.000000059604644775390626)", 1.0 + f32::EPSILON),
    ];
    for &(literal, expected) in cases {
        let value = float_literal(literal);
        assert_eq!(
            value.to_bits(),
            expected.to_bits(),
            "{literal}: got {value:e}, expected {expected:e}"
        );
    }
    // f32 bit patterns of 1e-5 and 0.1 (IEEE-754 single, e.g. numpy float32(...).view(uint32)).
    assert_eq!(float_literal("fp32(1e-05)").to_bits(), 0x3727_C5AC);
    assert_eq!(float_literal("fp32(0.1)").to_bits(), 0x3DCC_CCCD);
    assert!(float_literal("fp16(nan)").is_nan());
    assert!(float_literal("fp32(nan)").is_nan());
}

#[test]
fn integer_literals_parse_in_decimal_and_hex() {
    let ints = |text: &str| -> Vec<i64> {
        let lit = literal_of(text);
        lit.as_ints().expect("integer literal").to_vec()
    };
    assert_eq!(ints("int32(-2147483648)"), [i64::from(i32::MIN)]);
    assert_eq!(ints("int32(0x10)"), [16]);
    assert_eq!(ints("tensor<int8, [3]>([-128, +0, 127])"), [-128, 0, 127]);
    assert_eq!(ints("uint64(18446744073709551615)"), [-1]);
    assert_eq!(ints("tensor<uint8, [2]>([0,255])"), [0, 255]);
}

/// The literal of `y = <text>` in a one-statement program.
fn literal_of(text: &str) -> Literal {
    let program = program_with(
        &format!(r#"tensor<fp16, [1, 4]> y = mul(x = x, y = {text})[name = string("y")];"#),
        "y",
    );
    match parse_ok(&program).main.ops[0].arg("y") {
        Some(Arg::Lit(lit)) => lit.clone(),
        other => panic!("not a literal: {other:?}"),
    }
}

fn float_literal(text: &str) -> f32 {
    let lit = literal_of(text);
    lit.as_float()
        .unwrap_or_else(|| panic!("{text}: not a float scalar: {lit:?}"))
}

#[test]
fn comments_and_free_formatting_are_accepted() {
    let text = "// a kernel\nprogram(1.3){func main<ios18>(tensor<fp16,[1,4]> x){tensor<fp16,[1,4]> y=relu(x=x)[name=string(\"y\")]; // relu\n}->(y);}";
    let p = parse_ok(text);
    assert_eq!(p.main.ops.len(), 1);
    assert_eq!(p.main.ops[0].op, Op::Relu);
    assert_eq!(p.main.outputs, ["y"]);
}

// ---- the parser never panics ----------------------------------------------------------

/// Tokens to build MIL-like noise from.
const NOISE: &[&str] = &[
    "program",
    "(",
    ")",
    "1.3",
    "1.0",
    "[",
    "]",
    "{",
    "}",
    "<",
    ">",
    ",",
    "=",
    ";",
    "->",
    "-",
    "+",
    "func",
    "main",
    "ios18",
    "ios16",
    "tensor",
    "fp16",
    "fp32",
    "int8",
    "uint8",
    "int32",
    "uint64",
    "bool",
    "string",
    "x",
    "y",
    "const",
    "relu",
    "split",
    "concat",
    "name",
    "val",
    "BLOBFILE",
    "path",
    "offset",
    "\"s\"",
    "0",
    "1",
    "-1",
    "0x1p-3",
    "1e-05",
    "inf",
    "nan",
    "true",
    "buildInfo",
    "dict",
    "//",
    "\n",
    "\"",
    "\\",
    "0x",
    "99999999999999999999999",
    "0x1p99999999999999999999",
];

/// Assert that `text` either parses to a program that survives emit -> parse,
/// or fails with a parse error inside the text.
fn check_total(text: &str) {
    match mil::parse(text) {
        Ok(p) => {
            let again = parse_ok(&mil::emit(&p));
            assert_same(&again, &p, text);
        }
        Err(Error::Parse { line, col, .. }) => {
            assert!(line >= 1 && col >= 1);
            assert!(line <= text.split('\n').count(), "line {line} past the end");
        }
        Err(other) => panic!("not a parse error: {other}"),
    }
}

fn mutate(text: &str, seed: u64) -> String {
    let mut rng = Rng::new(seed);
    let mut chars: Vec<char> = text.chars().collect();
    for _ in 0..1 + rng.below(4) {
        let len = chars.len();
        let at = rng.below(len + 1);
        match rng.below(6) {
            0 => {
                let end = (at + 1 + rng.below(12)).min(len);
                chars.drain(at.min(end)..end);
            }
            1 => {
                let token: Vec<char> = rng.pick(NOISE).chars().collect();
                chars.splice(at..at, token);
            }
            2 if at < len => chars[at] = char::from(rng.below(128) as u8),
            3 => {
                let end = (at + 1 + rng.below(40)).min(len);
                let copy: Vec<char> = chars[at.min(end)..end].to_vec();
                let to = rng.below(len + 1);
                chars.splice(to..to, copy);
            }
            4 => chars.truncate(at),
            _ => {
                let lines: Vec<String> = chars
                    .iter()
                    .collect::<String>()
                    .split('\n')
                    .map(str::to_string)
                    .collect();
                let (a, b) = (rng.below(lines.len()), rng.below(lines.len()));
                let mut lines = lines;
                lines.swap(a, b);
                chars = lines.join("\n").chars().collect();
            }
        }
    }
    chars.into_iter().collect()
}

/// Found by reading the parser for recursion: `BLOBFILE` fields are literals,
/// which could themselves hold a `BLOBFILE`, nesting without bound.
#[test]
fn regression_nested_blobfile_is_an_error_not_a_stack_overflow() {
    let depth = 20_000;
    let nested = "tensor<uint64, []>(BLOBFILE(path = string(\"p\"), offset = ".repeat(depth);
    let statement = format!(
        "tensor<fp16, [2]> y = const()[name = string(\"y\"), val = tensor<fp16, [2]>(BLOBFILE(path = string(\"p\"), offset = {nested}uint64(0){})))];",
        ")))".repeat(depth)
    );
    let text = program_with(&statement, "y");
    // The error is at the second BLOBFILE, the first one inside a field.
    let col = statement.find("[]>(BLOBFILE").expect("nested") + "[]>(".len() + 9;
    match mil::parse(&text) {
        Err(Error::Parse { line, col: c, msg }) => {
            assert_eq!((line, c), (4, col));
            assert!(msg.contains("BLOBFILE fields cannot be BLOBFILEs"), "{msg}");
        }
        other => panic!("expected a parse error, got {other:?}"),
    }
}

proptest! {
    #[test]
    fn parser_is_total_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        check_total(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn parser_is_total_on_token_soup(picks in proptest::collection::vec(0..NOISE.len(), 0..120)) {
        let text: Vec<&str> = picks.iter().map(|&i| NOISE[i]).collect();
        check_total(&text.join(" "));
    }

    #[test]
    fn parser_is_total_on_mutated_programs(seed in any::<u64>(), mutation in any::<u64>()) {
        let text = mil::emit(&random_program(seed));
        check_total(&mutate(&text, mutation));
    }
}
