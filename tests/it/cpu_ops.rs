//! The CPU backend, the executable specification of MIL, against NumPy.
//!
//! Every file in `tests/fixtures/ops/` (written by `scripts/gen_op_fixtures.py`)
//! is a one-op program with inputs and references; it runs in fp32 and in fp16
//! precision through one `check` path. The rest exercises the `Backend` trait
//! surface, BLOBFILE constants and the error messages, with hand-derived values.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anemone::backend::cpu::{CpuBackend, HostTensor, run_program};
use anemone::backend::{Backend, Block, BufferId, HostCall, KernelId, Precision};
use anemone::mil::{
    Arg, DType, Dialect, Function, Literal, Op, Operation, Program, TensorType, Value, Var,
};
use half::f16;
use serde_json::Value as Json;

/// Float comparison: `|actual - expected| <= abs + rel * |expected|`;
/// infinities must match exactly and NaN matches NaN.
#[derive(Clone, Copy, Debug)]
struct Tolerance {
    rel: f32,
    abs: f32,
}

impl Tolerance {
    /// fp32 results against a float64 NumPy reference rounded to float32:
    /// f32 rounding of sums of a few dozen O(1) terms.
    const FP32: Tolerance = Tolerance {
        rel: 1e-5,
        abs: 1e-5,
    };
    /// fp16 sums and products against a float64 reference rounded once to fp16:
    /// one fp16 ulp (2^-10 relative), or a tiny absolute error near zero.
    const FP16: Tolerance = Tolerance {
        rel: 1e-3,
        abs: 1e-4,
    };
    /// Bit for bit (so `-0.0 != 0.0`); NaN matches NaN.
    const EXACT: Tolerance = Tolerance { rel: 0.0, abs: 0.0 };

    fn check(self, actual: &[f32], expected: &[f32]) -> Result<(), String> {
        if actual.len() != expected.len() {
            return Err(format!(
                "{} values, expected {}",
                actual.len(),
                expected.len()
            ));
        }
        for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
            let ok = if a.is_nan() || e.is_nan() {
                a.is_nan() && e.is_nan()
            } else if self.rel == 0.0 && self.abs == 0.0 {
                a.to_bits() == e.to_bits()
            } else if e.is_infinite() || a.is_infinite() {
                a == e
            } else {
                (a - e).abs() <= self.abs + self.rel * e.abs()
            };
            if !ok {
                return Err(format!("element {i}: got {a:e}, expected {e:e} ({self:?})"));
            }
        }
        Ok(())
    }
}

// ---- fixture cases ------------------------------------------------------------

fn number(j: &Json) -> f32 {
    match j {
        Json::String(s) if s == "inf" => f32::INFINITY,
        Json::String(s) if s == "-inf" => f32::NEG_INFINITY,
        Json::String(s) if s == "nan" => f32::NAN,
        Json::Bool(b) => f32::from(u8::from(*b)),
        other => other.as_f64().expect("a number") as f32,
    }
}

/// `"float"` is the run's float dtype; anything else is a MIL dtype name.
fn dtype(j: &Json, float: DType) -> DType {
    match j.as_str().expect("dtype string") {
        "float" => float,
        name => DType::from_mil_name(name).expect("known dtype"),
    }
}

fn tensor_type(j: &Json, float: DType) -> TensorType {
    let shape = j["shape"]
        .as_array()
        .expect("shape")
        .iter()
        .map(|d| d.as_u64().expect("dim") as usize)
        .collect::<Vec<_>>();
    TensorType::new(dtype(&j["dtype"], float), shape)
}

fn values(j: &Json) -> Vec<f32> {
    j["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(number)
        .collect()
}

fn literal(j: &Json, float: DType) -> Literal {
    let ty = tensor_type(j, float);
    let data = j["data"].as_array().expect("data");
    match ty.dtype {
        d if d.is_float() => Literal::floats(d, ty.shape, values(j)),
        d if d.is_int() => Literal::ints(
            d,
            ty.shape,
            data.iter().map(|v| v.as_i64().unwrap()).collect(),
        ),
        DType::Bool => Literal {
            ty,
            value: Value::Bool(data.iter().map(|v| v.as_bool().unwrap()).collect()),
        },
        _ => Literal {
            ty,
            value: Value::Str(
                data.iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect(),
            ),
        },
    }
}

fn const_op(name: &str, lit: Literal) -> Operation {
    Operation {
        op: Op::Const,
        name: name.to_string(),
        outputs: vec![Var::new(name, lit.ty.clone())],
        args: vec![],
        attrs: vec![("val".to_string(), lit)],
    }
}

/// An argument; `{"const": ..}` appends a `const` op to `ops` and refers to it.
fn argument(j: &Json, param: &str, ops: &mut Vec<Operation>, float: DType) -> Arg {
    if let Some(name) = j.get("var") {
        Arg::var(name.as_str().unwrap())
    } else if let Some(lit) = j.get("lit") {
        Arg::Lit(literal(lit, float))
    } else if let Some(lit) = j.get("const") {
        let name = format!("{param}_const");
        ops.push(const_op(&name, literal(lit, float)));
        Arg::var(name)
    } else {
        let items = j["tuple"].as_array().expect("var, lit, const or tuple");
        Arg::Tuple(
            items
                .iter()
                .map(|a| argument(a, param, ops, float))
                .collect(),
        )
    }
}

/// The case's one-op program, built directly in the IR.
fn program(case: &Json, float: DType) -> Program {
    let inputs = case["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| Var::new(i["name"].as_str().unwrap(), tensor_type(i, float)))
        .collect();
    let mut ops = Vec::new();
    let args = case["args"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(param, a)| (param.clone(), argument(a, param, &mut ops, float)))
        .collect();
    let attrs = case["attrs"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(key, lit)| (key.clone(), literal(lit, float)))
        .collect();
    let outputs: Vec<Var> = case["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| Var::new(o["name"].as_str().unwrap(), tensor_type(o, float)))
        .collect();
    ops.push(Operation {
        op: Op::from_mil_name(case["op"].as_str().unwrap()).expect("known op"),
        name: "op".to_string(),
        outputs: outputs.clone(),
        args,
        attrs,
    });
    Program {
        dialect: Dialect::Ios18,
        main: Function {
            name: "main".to_string(),
            inputs,
            ops,
            outputs: outputs.into_iter().map(|v| v.name).collect(),
        },
    }
}

/// Run one case in one precision; `Err` describes every mismatch.
fn check(case: &Json, precision: Precision) -> Result<(), String> {
    let float = match precision {
        Precision::Fp32 => DType::Fp32,
        Precision::Fp16 => DType::Fp16,
    };
    let program = program(case, float);
    let inputs: Vec<(String, HostTensor)> = case["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let tensor = HostTensor::new(tensor_type(i, float), values(i));
            (i["name"].as_str().unwrap().to_string(), tensor)
        })
        .collect();
    let outputs = run_program(&program, &BTreeMap::new(), &inputs, precision)
        .map_err(|e| format!("run failed: {e}"))?;
    let expected = case["outputs"].as_array().unwrap();
    if outputs.len() != expected.len() {
        return Err(format!(
            "{} outputs, expected {}",
            outputs.len(),
            expected.len()
        ));
    }
    for ((name, tensor), want) in outputs.iter().zip(expected) {
        let ty = tensor_type(want, float);
        if *name != want["name"] || tensor.ty != ty {
            return Err(format!(
                "output {name}: {}, expected {} {ty}",
                tensor.ty, want["name"]
            ));
        }
        let tolerance = match precision {
            _ if !ty.dtype.is_float() => Tolerance::EXACT,
            Precision::Fp32 => Tolerance::FP32,
            Precision::Fp16 if want["fp16_exact"] == true => Tolerance::EXACT,
            Precision::Fp16 => Tolerance::FP16,
        };
        let reference = match precision {
            Precision::Fp32 => &want["fp32"],
            Precision::Fp16 => &want["fp16"],
        };
        let reference: Vec<f32> = reference.as_array().unwrap().iter().map(number).collect();
        tolerance
            .check(&tensor.data, &reference)
            .map_err(|e| format!("output {name}: {e}"))?;
    }
    Ok(())
}

#[test]
fn every_op_matches_numpy_in_fp32_and_fp16() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ops");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/fixtures/ops exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    assert!(
        paths.len() >= 50,
        "only {} cases in {}",
        paths.len(),
        dir.display()
    );
    let mut covered = BTreeSet::new();
    let mut failures = Vec::new();
    for path in &paths {
        let case: Json = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(
            case["generator"],
            "scripts/gen_op_fixtures.py",
            "{}",
            path.display()
        );
        covered.extend(program(&case, DType::Fp32).main.ops.iter().map(|o| o.op));
        for precision in [Precision::Fp32, Precision::Fp16] {
            if let Err(e) = check(&case, precision) {
                failures.push(format!("{} ({precision:?}): {e}", case["case"]));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let missing: Vec<Op> = Op::ALL
        .into_iter()
        .filter(|op| !covered.contains(op))
        .collect();
    assert!(
        missing.is_empty(),
        "ops without a fixture case: {missing:?}"
    );
}

/// gelu is one row of the op table plus its math: the text round-trips, the
/// verifier checks `mode` against the table's choices (EXACT when absent), and
/// the interpreter runs every mode. References (Python):
/// `[0.5*x*(1+math.erf(x/math.sqrt(2))) for x in xs]`,
/// `[0.5*x*(1+math.tanh(math.sqrt(2/math.pi)*(x+0.044715*x**3))) for x in xs]`,
/// `[x/(1+math.exp(-1.702*x)) for x in xs]` with `xs = [-2, -0.5, 0.5, 3]`.
#[test]
fn gelu_modes_come_from_the_op_table() {
    use anemone::mil::verify::{Target, verify};
    let program = |mode: &str| {
        let text = format!(
            "program(1.3)\n{{\n    func main<ios18>(tensor<fp32, [1, 4]> x) {{\n        \
             tensor<fp32, [1, 4]> y = gelu(x = x{mode})[name = string(\"y\")];\n    }} -> (y);\n}}\n"
        );
        let program = anemone::mil::parse(&text).unwrap();
        assert_eq!(
            anemone::mil::parse(&anemone::mil::emit(&program)).unwrap(),
            program
        );
        program
    };
    let x = HostTensor::new(
        TensorType::new(DType::Fp32, [1, 4]),
        vec![-2.0, -0.5, 0.5, 3.0],
    );
    let run = |program: &Program| {
        run_program(
            program,
            &BTreeMap::new(),
            &[("x".into(), x.clone())],
            Precision::Fp32,
        )
    };
    let exact = [-0.045500264, -0.15426877, 0.34573123, 2.9959503];
    let tanh = [-0.045402306, -0.154286, 0.345714, 2.9963626];
    let sigmoid = [-0.06434138, -0.14961156, 0.35038844, 2.9819287];
    for (mode, want) in [
        ("", exact),
        (", mode = string(\"EXACT\")", exact),
        (", mode = string(\"TANH_APPROXIMATION\")", tanh),
        (", mode = string(\"SIGMOID_APPROXIMATION\")", sigmoid),
    ] {
        let program = program(mode);
        assert!(verify(&program, Target::Cpu).is_ok(), "{mode}");
        let got = &run(&program).unwrap()[0].1.data;
        Tolerance::FP32
            .check(got, &want)
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
    }
    let unknown = program(", mode = string(\"FAST\")");
    assert!(verify(&unknown, Target::Cpu).fired("MIL001"));
    let err = run(&unknown).unwrap_err().to_string();
    assert!(
        err.contains("op `gelu` (name \"y\")")
            && err.contains(
                "\"FAST\" is not one of EXACT, TANH_APPROXIMATION, SIGMOID_APPROXIMATION"
            ),
        "{err}"
    );
}

// ---- hand-built programs ------------------------------------------------------------

fn operation(op: Op, out: Var, args: Vec<(&str, Arg)>) -> Operation {
    Operation {
        op,
        name: out.name.clone(),
        outputs: vec![out],
        args: args.into_iter().map(|(k, a)| (k.to_string(), a)).collect(),
        attrs: vec![],
    }
}

fn main_fn(inputs: Vec<Var>, ops: Vec<Operation>, outputs: &[&str]) -> Program {
    Program {
        dialect: Dialect::Ios18,
        main: Function {
            name: "main".to_string(),
            inputs,
            ops,
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
        },
    }
}

/// `z = x * scale` with `x` `[1, 4, 1, 3]` and a per-channel const `scale` = 1, 2, 3, 4.
fn channel_scale(dtype: DType) -> Program {
    channel_scale_over(dtype, 3)
}

/// `z = x * [1, 2, 3, 4]` per channel of `x [1, 4, 1, len]`.
fn channel_scale_over(dtype: DType, len: usize) -> Program {
    let x = TensorType::new(dtype, [1, 4, 1, len]);
    let scale = Literal::floats(dtype, [1, 4, 1, 1], vec![1.0, 2.0, 3.0, 4.0]);
    main_fn(
        vec![Var::new("x", x.clone())],
        vec![
            const_op("scale", scale),
            operation(
                Op::Mul,
                Var::new("z", x),
                vec![("x", Arg::var("x")), ("y", Arg::var("scale"))],
            ),
        ],
        &["z"],
    )
}

#[test]
fn backend_runs_a_kernel_twice_on_written_blocks() {
    let mut cpu = CpuBackend::new(Precision::Fp32);
    let kernel = cpu
        .compile_program(&channel_scale(DType::Fp32), &BTreeMap::new())
        .unwrap();
    let info = cpu.kernel_info(kernel).clone();
    assert_eq!(info.inputs[0].name, "x");
    assert_eq!(info.outputs[0].name, "z");
    let ty = info.inputs[0].ty.clone();
    let x = cpu.alloc(&ty).unwrap();
    let z = cpu.alloc(&info.outputs[0].ty).unwrap();

    // x[c][s] = 10c + s, written as two blocks of two channels.
    let first: Vec<f32> = (0..4)
        .flat_map(|c| (0..3).map(move |s| (10 * c + s) as f32))
        .collect();
    cpu.write(x, Block::rows(&ty, 0, 2), &first[..6]).unwrap();
    cpu.write(x, Block::rows(&ty, 2, 2), &first[6..]).unwrap();
    cpu.run(kernel, &[x], &[z]).unwrap();
    // Positions 1..3 of every channel: (10c + s) * (c + 1).
    let mut got = vec![0.0; 8];
    cpu.read(z, Block::columns(&ty, 1, 2), &mut got).unwrap();
    assert_eq!(got, [1., 2., 22., 24., 63., 66., 124., 128.]);

    // Overwrite position 0 of every channel with -1 and run again.
    cpu.write(x, Block::columns(&ty, 0, 1), &[-1.0; 4]).unwrap();
    cpu.run(kernel, &[x], &[z]).unwrap();
    let mut all = vec![0.0; 12];
    cpu.read(z, Block::whole(&ty), &mut all).unwrap();
    assert_eq!(
        all,
        [-1., 1., 2., -2., 22., 24., -3., 63., 66., -4., 124., 128.]
    );
}

/// `f` in a rayon pool of two threads.
fn on_two_threads<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    pool.install(f)
}

/// A CPU backend in fp32 with `program` compiled.
fn fp32_kernel(program: &Program) -> (CpuBackend, KernelId) {
    let mut cpu = CpuBackend::new(Precision::Fp32);
    let kernel = cpu.compile_program(program, &BTreeMap::new()).unwrap();
    (cpu, kernel)
}

/// `kernel` (one input, one output of the input's size) on each of `inputs`
/// in one `run_host_many`; the outputs start as NaN.
fn run_each(cpu: &mut CpuBackend, kernel: KernelId, inputs: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let mut outputs: Vec<Vec<f32>> = inputs.iter().map(|x| vec![f32::NAN; x.len()]).collect();
    let mut calls: Vec<HostCall> = inputs
        .iter()
        .zip(outputs.iter_mut())
        .map(|(x, z)| HostCall {
            inputs: vec![x.as_slice()],
            outputs: vec![z.as_mut_slice()],
        })
        .collect();
    assert!(cpu.run_host_many(kernel, &mut calls).unwrap());
    drop(calls);
    outputs
}

/// Many calls whose own op runs in parallel (a product of 4 x 2^15 values, over
/// the pool's threshold): a worker waiting inside one call's parallel loop
/// runs other calls meanwhile, and each must still get a workspace of its own.
/// Every result checked against its own input, over repeated runs.
#[test]
fn run_host_many_with_parallel_ops_inside_the_calls() {
    let len = 1 << 15;
    on_two_threads(|| {
        let (mut cpu, kernel) = fp32_kernel(&channel_scale_over(DType::Fp32, len));
        let inputs: Vec<Vec<f32>> = (0..16)
            .map(|k| (0..4 * len).map(|i| (i % 1000 + k) as f32).collect())
            .collect();
        for round in 0..20 {
            let outputs = run_each(&mut cpu, kernel, &inputs);
            for (k, (x, z)) in inputs.iter().zip(&outputs).enumerate() {
                for (i, (&x, &z)) in x.iter().zip(z).enumerate() {
                    let c = (i / len) as f32 + 1.0;
                    assert_eq!(z, x * c, "round {round}, call {k}, value {i}");
                }
            }
        }
    });
}

/// Several sequences through one kernel at once: five calls on two worker
/// threads, each result `(10c + s + 100k) * (c + 1)` of its
/// own input; wrong array lengths are an error naming the input; an fp16
/// kernel declines (nothing written).
#[test]
fn run_host_many_runs_every_call_on_its_own_arrays() {
    on_two_threads(|| {
        let (mut cpu, kernel) = fp32_kernel(&channel_scale(DType::Fp32));
        let inputs: Vec<Vec<f32>> = (0..5)
            .map(|k| {
                (0..4)
                    .flat_map(|c| (0..3).map(move |s| (10 * c + s + 100 * k) as f32))
                    .collect()
            })
            .collect();
        let outputs = run_each(&mut cpu, kernel, &inputs);
        for (k, z) in outputs.iter().enumerate() {
            let want: Vec<f32> = (0..4)
                .flat_map(|c| (0..3).map(move |s| ((10 * c + s + 100 * k) * (c + 1)) as f32))
                .collect();
            assert_eq!(z, &want, "call {k}");
        }

        // One call alone, and one among others on the pool.
        let (ok, short) = ([0.0f32; 12], [0.0f32; 11]);
        for (count, bad) in [(1, 0), (3, 1)] {
            let mut zs = vec![[0.0f32; 12]; count];
            let mut calls: Vec<HostCall> = zs
                .iter_mut()
                .enumerate()
                .map(|(k, z)| HostCall {
                    inputs: vec![if k == bad { &short[..] } else { &ok[..] }],
                    outputs: vec![&mut z[..]],
                })
                .collect();
            let err = cpu
                .run_host_many(kernel, &mut calls)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("`x`") && err.contains("needs 12 values, got 11"),
                "{count} calls: {err}"
            );
        }

        let half = cpu
            .compile_program(&channel_scale(DType::Fp16), &BTreeMap::new())
            .unwrap();
        let x = [1.0f32; 12];
        let mut z = [7.0f32; 12];
        let mut calls = vec![HostCall {
            inputs: vec![&x[..]],
            outputs: vec![&mut z[..]],
        }];
        assert!(!cpu.run_host_many(half, &mut calls).unwrap());
        drop(calls);
        assert_eq!(z, [7.0; 12]);
    });
}

#[test]
fn fp16_precision_rounds_writes_and_results() {
    // z = x * x on fp16 values: 300^2 and 2049^2 overflow, (1e-4)^2 underflows.
    let ty = TensorType::new(DType::Fp16, [1, 4]);
    let program = main_fn(
        vec![Var::new("x", ty.clone())],
        vec![operation(
            Op::Mul,
            Var::new("z", ty.clone()),
            vec![("x", Arg::var("x")), ("y", Arg::var("x"))],
        )],
        &["z"],
    );
    let input = [300.0, 0.5, 1e-4, 2049.0];
    let run = |precision| {
        let mut cpu = CpuBackend::new(precision);
        let kernel = cpu.compile_program(&program, &BTreeMap::new()).unwrap();
        let (x, z) = (cpu.alloc(&ty).unwrap(), cpu.alloc(&ty).unwrap());
        cpu.write(x, Block::whole(&ty), &input).unwrap();
        cpu.run(kernel, &[x], &[z]).unwrap();
        let (mut xs, mut zs) = (vec![0.0; 4], vec![0.0; 4]);
        cpu.read(x, Block::whole(&ty), &mut xs).unwrap();
        cpu.read(z, Block::whole(&ty), &mut zs).unwrap();
        (xs, zs)
    };
    let (xs, zs) = run(Precision::Fp16);
    // 2049 is a tie between fp16 neighbours 2048 and 2050 and goes to even.
    let x16 = f16::from_f32(1e-4).to_f32();
    assert_eq!(xs, [300.0, 0.5, x16, 2048.0]);
    assert_eq!(zs, [f32::INFINITY, 0.25, 0.0, f32::INFINITY]);
    let (xs, zs) = run(Precision::Fp32);
    assert_eq!(xs, input);
    assert_eq!(zs, [90000.0, 0.25, 1e-4f32 * 1e-4f32, 2049.0 * 2049.0]);
}

#[test]
fn backend_rejects_wrong_buffers_and_blocks() {
    let mut cpu = CpuBackend::new(Precision::Fp32);
    let kernel = cpu
        .compile_program(&channel_scale(DType::Fp32), &BTreeMap::new())
        .unwrap();
    let ty = TensorType::new(DType::Fp32, [1, 4, 1, 3]);
    let good = cpu.alloc(&ty).unwrap();
    let narrow = cpu
        .alloc(&TensorType::new(DType::Fp32, [1, 4, 1, 2]))
        .unwrap();
    let half = cpu
        .alloc(&TensorType::new(DType::Fp16, [1, 4, 1, 3]))
        .unwrap();

    let err = cpu.run(kernel, &[narrow], &[good]).unwrap_err().to_string();
    assert!(
        err.contains("input `x`") && err.contains("[1, 4, 1, 2]"),
        "{err}"
    );
    let err = cpu.run(kernel, &[good], &[half]).unwrap_err().to_string();
    assert!(err.contains("output `z`") && err.contains("fp16"), "{err}");
    let err = cpu
        .run(kernel, &[good, good], &[good])
        .unwrap_err()
        .to_string();
    assert!(err.contains("1 inputs"), "{err}");
    assert!(cpu.run(kernel, &[BufferId(99)], &[good]).is_err());

    // Blocks must lie inside the buffer and match the slice length.
    assert!(
        cpu.write(good, Block::columns(&ty, 2, 2), &[0.0; 8])
            .is_err()
    );
    let err = cpu
        .write(good, Block::whole(&ty), &[0.0; 5])
        .unwrap_err()
        .to_string();
    assert!(err.contains("12 values, got 5"), "{err}");
    assert!(
        cpu.read(good, Block::rows(&ty, 3, 2), &mut [0.0; 6])
            .is_err()
    );
}

#[test]
fn run_program_names_missing_unknown_and_misshaped_inputs() {
    let program = channel_scale(DType::Fp32);
    let ty = TensorType::new(DType::Fp32, [1, 4, 1, 3]);
    let weights = BTreeMap::new();
    let ok = HostTensor::new(ty.clone(), vec![1.0; 12]);
    let out = run_program(
        &program,
        &weights,
        &[("x".into(), ok.clone())],
        Precision::Fp32,
    )
    .unwrap();
    assert_eq!(out[0].0, "z");
    assert_eq!(
        out[0].1.data,
        [1., 1., 1., 2., 2., 2., 3., 3., 3., 4., 4., 4.]
    );

    let err = run_program(&program, &weights, &[], Precision::Fp32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing input `x`"), "{err}");
    let extra = [("x".into(), ok.clone()), ("y".into(), ok)];
    let err = run_program(&program, &weights, &extra, Precision::Fp32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown input `y`"), "{err}");
    let wrong = HostTensor::new(TensorType::new(DType::Fp32, [1, 3, 1, 4]), vec![0.0; 12]);
    let err = run_program(&program, &weights, &[("x".into(), wrong)], Precision::Fp32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("input `x`") && err.contains("[1, 3, 1, 4]"),
        "{err}"
    );
}

#[test]
fn compile_errors_name_the_op_and_the_operand() {
    // The declared result shape disagrees with the broadcast of the operands.
    let x = TensorType::new(DType::Fp32, [2, 3]);
    let bad_shape = main_fn(
        vec![Var::new("x", x.clone())],
        vec![operation(
            Op::Add,
            Var::new("z", TensorType::new(DType::Fp32, [3, 2])),
            vec![("x", Arg::var("x")), ("y", Arg::var("x"))],
        )],
        &["z"],
    );
    let err = run_program(&bad_shape, &BTreeMap::new(), &[], Precision::Fp32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("op `add` (name \"z\")") && err.contains("[2, 3]"),
        "{err}"
    );

    let undefined = main_fn(
        vec![Var::new("x", x.clone())],
        vec![operation(
            Op::Relu,
            Var::new("z", x),
            vec![("x", Arg::var("nope"))],
        )],
        &["z"],
    );
    let err = CpuBackend::new(Precision::Fp32)
        .compile_program(&undefined, &BTreeMap::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("relu") && err.contains("`nope`"), "{err}");
}

// ---- BLOBFILE constants ------------------------------------------------------------

const BLOB_KEY: &str = "@model_path/weights/w.bin";

/// A 64-byte record: sentinel, dtype code, payload size, payload offset.
fn record(code: u32, size: u64, data_offset: u64) -> [u8; 64] {
    let mut r = [0u8; 64];
    r[0..4].copy_from_slice(&0xDEAD_BEEFu32.to_le_bytes());
    r[4..8].copy_from_slice(&code.to_le_bytes());
    r[8..16].copy_from_slice(&size.to_le_bytes());
    r[16..24].copy_from_slice(&data_offset.to_le_bytes());
    r
}

/// Blob file bytes: header (ignored here), an fp16 `[1, 4]` record at 64 with
/// data at 128, an int8 `[1, 4]` record at 192 with data at 256.
fn blob_file() -> Vec<u8> {
    let mut bytes = vec![0u8; 64];
    bytes.extend(record(1, 8, 128));
    for v in [0.5f32, -2.0, 3.0, 65504.0] {
        bytes.extend(f16::from_f32(v).to_bits().to_le_bytes());
    }
    bytes.resize(192, 0);
    bytes.extend(record(4, 4, 256));
    bytes.extend([-128i8, -1, 0, 127].map(|v| v as u8));
    bytes
}

/// `y = x + w` with `w` an fp16 BLOBFILE const, and `q` = the dequantized int8 blob.
fn blob_program() -> Program {
    let ty = TensorType::new(DType::Fp16, [1, 4]);
    let w = Literal::blob(ty.clone(), BLOB_KEY, 64);
    let dequantize = Operation {
        op: Op::ConstexprAffineDequantize,
        name: "q".to_string(),
        outputs: vec![Var::new("q", ty.clone())],
        args: vec![],
        attrs: vec![
            (
                "quantized_data".to_string(),
                Literal::blob(TensorType::new(DType::Int8, [1, 4]), BLOB_KEY, 192),
            ),
            ("zero_point".to_string(), Literal::int8(0)),
            ("scale".to_string(), Literal::fp16(0.5)),
            ("axis".to_string(), Literal::int32(0)),
        ],
    };
    main_fn(
        vec![Var::new("x", ty.clone())],
        vec![
            const_op("w", w),
            dequantize,
            operation(
                Op::Add,
                Var::new("y", ty),
                vec![("x", Arg::var("x")), ("y", Arg::var("w"))],
            ),
        ],
        &["y", "q"],
    )
}

#[test]
fn blobfile_constants_come_from_the_package_weights() {
    let weights = BTreeMap::from([(BLOB_KEY.to_string(), blob_file())]);
    let x = HostTensor::new(
        TensorType::new(DType::Fp16, [1, 4]),
        vec![1.0, 1.0, 1.0, 32.0],
    );
    let out = run_program(
        &blob_program(),
        &weights,
        &[("x".into(), x)],
        Precision::Fp16,
    )
    .unwrap();
    // 65504 + 32 = 65536 rounds to inf in fp16 (the largest finite is 65504).
    assert_eq!(out[0].1.data, [1.5, -1.0, 4.0, f32::INFINITY]);
    assert_eq!(out[1].0, "q");
    assert_eq!(out[1].1.data, [-64.0, -0.5, 0.0, 63.5]);
}

#[test]
fn blobfile_errors_name_the_path_and_the_problem() {
    let err = CpuBackend::new(Precision::Fp32)
        .compile_program(&blob_program(), &BTreeMap::new())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(BLOB_KEY) && err.contains("not in the package"),
        "{err}"
    );

    let mut bad_sentinel = blob_file();
    bad_sentinel[64] = 0;
    let err = CpuBackend::new(Precision::Fp32)
        .compile_program(
            &blob_program(),
            &BTreeMap::from([(BLOB_KEY.into(), bad_sentinel)]),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("sentinel") && err.contains("offset 64"),
        "{err}"
    );

    let mut wrong_dtype = blob_file();
    wrong_dtype[192 + 4] = 3; // uint8, but the constant is declared int8
    let err = CpuBackend::new(Precision::Fp32)
        .compile_program(
            &blob_program(),
            &BTreeMap::from([(BLOB_KEY.into(), wrong_dtype)]),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("dtype code is 3"), "{err}");

    let truncated = blob_file()[..200].to_vec();
    let err = CpuBackend::new(Precision::Fp32)
        .compile_program(
            &blob_program(),
            &BTreeMap::from([(BLOB_KEY.into(), truncated)]),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("past the end"), "{err}");
}

#[test]
fn large_tensors_take_the_parallel_paths() {
    // Sizes above the single-thread thresholds: 64 x 1100 elementwise values,
    // 4 GEMMs of 128^3 and 64 small 16^3 ones. References are naive f64 loops.
    let (c_len, s_len) = (64, 1100);
    let x_ty = TensorType::new(DType::Fp32, [1, c_len, 1, s_len]);
    let big = TensorType::new(DType::Fp32, [4, 128, 128]);
    let small = TensorType::new(DType::Fp32, [64, 16, 16]);
    let f32_ty = |shape: &[usize]| TensorType::new(DType::Fp32, shape.to_vec());
    let scale: Vec<f32> = (0..c_len).map(|c| (c + 1) as f32 / 64.0).collect();
    let ops = vec![
        const_op(
            "s",
            Literal::floats(DType::Fp32, [1, c_len, 1, 1], scale.clone()),
        ),
        operation(
            Op::Mul,
            Var::new("a", x_ty.clone()),
            vec![("x", Arg::var("x")), ("y", Arg::var("s"))],
        ),
        operation(
            Op::Exp,
            Var::new("b", x_ty.clone()),
            vec![("x", Arg::var("a"))],
        ),
        operation(
            Op::ReduceSum,
            Var::new("c", f32_ty(&[1, 1, 1, s_len])),
            vec![
                ("x", Arg::var("b")),
                ("axes", Arg::Lit(Literal::int32s(&[1]))),
                ("keep_dims", Arg::Lit(Literal::bool(true))),
            ],
        ),
        operation(
            Op::Transpose,
            Var::new("d", f32_ty(&[1, s_len, 1, c_len])),
            vec![
                ("x", Arg::var("b")),
                ("perm", Arg::Lit(Literal::int32s(&[0, 3, 2, 1]))),
            ],
        ),
        operation(
            Op::Softmax,
            Var::new("e", f32_ty(&[1, s_len, 1, c_len])),
            vec![("x", Arg::var("d")), ("axis", Arg::Lit(Literal::int32(-1)))],
        ),
        operation(
            Op::Matmul,
            Var::new("pq", big.clone()),
            vec![("x", Arg::var("p")), ("y", Arg::var("q"))],
        ),
        operation(
            Op::Matmul,
            Var::new("uw", small.clone()),
            vec![
                ("x", Arg::var("u")),
                ("y", Arg::var("w")),
                ("transpose_y", Arg::Lit(Literal::bool(true))),
            ],
        ),
    ];
    let program = main_fn(
        vec![
            Var::new("x", x_ty.clone()),
            Var::new("p", big.clone()),
            Var::new("q", big.clone()),
            Var::new("u", small.clone()),
            Var::new("w", small.clone()),
        ],
        ops,
        &["c", "e", "pq", "uw"],
    );
    let fill = |n: usize, k: f32| (0..n).map(|i| ((i as f32) * k).sin()).collect::<Vec<f32>>();
    let x = fill(c_len * s_len, 0.0137);
    let (p, q) = (fill(big.numel(), 0.31), fill(big.numel(), 0.77));
    let (u, w) = (fill(small.numel(), 0.53), fill(small.numel(), 0.19));
    let inputs = [
        ("x".to_string(), HostTensor::new(x_ty, x.clone())),
        ("p".to_string(), HostTensor::new(big.clone(), p.clone())),
        ("q".to_string(), HostTensor::new(big, q.clone())),
        ("u".to_string(), HostTensor::new(small.clone(), u.clone())),
        ("w".to_string(), HostTensor::new(small, w.clone())),
    ];
    let out = run_program(&program, &BTreeMap::new(), &inputs, Precision::Fp32).unwrap();

    let b = |c: usize, s: usize| (f64::from(x[c * s_len + s]) * f64::from(scale[c])).exp();
    let c_ref: Vec<f32> = (0..s_len)
        .map(|s| (0..c_len).map(|c| b(c, s)).sum::<f64>() as f32)
        .collect();
    let e_ref: Vec<f32> = (0..s_len)
        .flat_map(|s| {
            let max = (0..c_len).map(|c| b(c, s)).fold(f64::MIN, f64::max);
            let sum: f64 = (0..c_len).map(|c| (b(c, s) - max).exp()).sum();
            (0..c_len).map(move |c| ((b(c, s) - max).exp() / sum) as f32)
        })
        .collect();
    // out[bt][i][j] = sum_k lhs[bt][i][k] * rhs(bt, k, j)
    let gemm_ref = |n: usize,
                    batches: usize,
                    lhs: &[f32],
                    rhs: &dyn Fn(usize, usize, usize) -> f32| {
        let mut out = Vec::with_capacity(batches * n * n);
        for bt in 0..batches {
            for i in 0..n {
                for j in 0..n {
                    let acc: f64 = (0..n)
                        .map(|k| f64::from(lhs[(bt * n + i) * n + k]) * f64::from(rhs(bt, k, j)))
                        .sum();
                    out.push(acc as f32);
                }
            }
        }
        out
    };
    let pq_ref = gemm_ref(128, 4, &p, &|bt, k, j| q[(bt * 128 + k) * 128 + j]);
    let uw_ref = gemm_ref(16, 64, &u, &|bt, k, j| w[(bt * 16 + j) * 16 + k]);
    let wide = Tolerance {
        rel: 1e-5,
        abs: 1e-4,
    };
    for ((name, tensor), (reference, tolerance)) in out.iter().zip([
        (c_ref, Tolerance::FP32),
        (e_ref, Tolerance::FP32),
        // 128-term sums of O(1) products: f32 rounding of the partial sums.
        (pq_ref, wide),
        (uw_ref, Tolerance::FP32),
    ]) {
        tolerance
            .check(&tensor.data, &reference)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}
