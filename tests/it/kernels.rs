//! Every layer kernel, compiled from its emitted MIL text and run on the CPU
//! backend: forward kernels against NumPy (`scripts/ref_kernels.py`, fixtures
//! in `tests/fixtures/kernels/`) in all three weight modes; backward kernels
//! against finite differences of the forward kernels (directional derivatives:
//! `<u, J d>` by central differences equals `<J^T u, d>` from the backward kernel).

use anemone::backend::Precision;
use anemone::backend::cpu::CpuBackend;
use anemone::mil::DType;
use anemone::mil::verify::{Target, verify};
use anemone::model::ModelConfig;
use anemone::model::kernels::{self, KernelOptions, KernelSpec, SlotRole, WeightMode};
use anemone::rng::Rng;
use anemone::train::kernel::CompiledKernel;

use crate::common::{Tolerance, fixture, read_npy_f32};

fn config() -> ModelConfig {
    // Matches scripts/ref_kernels.py.
    ModelConfig {
        head_dim: 8,
        ..ModelConfig::llama(32, 1, 4, 2, 48, 64, 8)
    }
}

const T: usize = 8;

fn arr(name: &str) -> Vec<f32> {
    read_npy_f32(&fixture("kernels").join(format!("{name}.npy")))
}

fn opts(mode: WeightMode) -> KernelOptions {
    KernelOptions {
        mode,
        ..KernelOptions::cpu()
    }
}

fn baked(name: &str) -> Option<Vec<f32>> {
    Some(arr(name))
}

/// Compile `spec` on a fresh CPU backend, write the named inputs, run, read outputs.
fn run(
    spec: &KernelSpec,
    inputs: &[(&str, Vec<f32>)],
    precision: Precision,
) -> Vec<(String, Vec<f32>)> {
    let mut backend = CpuBackend::new(precision);
    let k = CompiledKernel::new(&mut backend, spec.clone()).unwrap();
    // Runtime weights as separate inputs go straight to the backend; packed
    // slots go through the kernel's buffers.
    let packed = spec
        .inputs
        .iter()
        .chain(&spec.outputs)
        .any(|s| s.row != 0 || s.col != 0 || s.role == SlotRole::Weight { transposed: true });
    assert_eq!(k.direct(), !packed, "{}", spec.name);
    let mut outs: Vec<(String, Vec<f32>)> = spec
        .outputs
        .iter()
        .map(|s| (s.name.clone(), vec![f32::NAN; s.rows * s.cols]))
        .collect();
    let mut call = k.call();
    for (name, data) in inputs {
        if !spec.inputs.iter().any(|s| s.name == *name) {
            continue; // baked weights are not inputs
        }
        call = match spec.input(name).role {
            SlotRole::Activation => call.input(name, data),
            SlotRole::Weight { .. } => call.weight(name, data),
        };
    }
    for (name, out) in outs.iter_mut() {
        call = call.output(name, out);
    }
    call.run(&mut backend).unwrap();
    outs
}

fn output<'a>(outs: &'a [(String, Vec<f32>)], name: &str) -> &'a [f32] {
    &outs.iter().find(|(n, _)| n == name).unwrap().1
}

#[test]
fn forward_kernels_match_numpy_in_every_weight_mode() {
    let c = config();
    let tol = Tolerance {
        relative: 1e-5,
        absolute: 1e-5,
    };
    for mode in [WeightMode::Inputs, WeightMode::Packed, WeightMode::Baked] {
        let o = opts(mode);
        let attn = kernels::attn_fwd(&c, T, o, &baked).unwrap();
        let outs = run(
            &attn,
            &[
                ("xn", arr("xn")),
                ("wq", arr("wq")),
                ("wk", arr("wk")),
                ("wv", arr("wv")),
            ],
            Precision::Fp32,
        );
        for name in ["attn", "q_rope", "k_rope", "v"] {
            tol.assert_close(
                output(&outs, name),
                &arr(&format!("out_{name}")),
                &format!("{mode:?} attn_fwd {name}"),
            );
        }
        let wo = kernels::wo_fwd(&c, T, o, &baked).unwrap();
        let outs = run(
            &wo,
            &[("attn", arr("out_attn")), ("wo", arr("wo"))],
            Precision::Fp32,
        );
        tol.assert_close(
            output(&outs, "o"),
            &arr("out_o"),
            &format!("{mode:?} wo_fwd"),
        );
        let ffn = kernels::ffn_fwd(&c, T, o, &baked).unwrap();
        let outs = run(
            &ffn,
            &[
                ("x2n", arr("x2n")),
                ("w1", arr("w1")),
                ("w3", arr("w3")),
                ("w2", arr("w2")),
            ],
            Precision::Fp32,
        );
        for name in ["ffn", "h1", "h3", "gate"] {
            tol.assert_close(
                output(&outs, name),
                &arr(&format!("out_{name}")),
                &format!("{mode:?} ffn_fwd {name}"),
            );
        }
    }
}

#[test]
fn packed_kernels_have_one_input_and_one_output_and_pass_the_ane_rules() {
    let c = config();
    let o = KernelOptions {
        dtype: DType::Fp16,
        mode: WeightMode::Packed,
        ..KernelOptions::cpu()
    };
    let all = kernels::LayerKernels::build(&c, T, o, &|_| None).unwrap();
    for spec in all.iter() {
        assert_eq!(spec.program.main.inputs.len(), 1, "{}", spec.name);
        assert_eq!(spec.program.main.outputs.len(), 1, "{}", spec.name);
        let report = verify(&spec.program, Target::Ane);
        assert!(report.is_ok(), "{}:\n{report}", spec.name);
        // The text round-trips.
        let text = anemone::mil::emit(&spec.program);
        assert_eq!(
            anemone::mil::parse(&text).unwrap(),
            spec.program,
            "{}",
            spec.name
        );
    }
}

fn randn(n: usize, rng: &mut Rng, s: f32) -> Vec<f32> {
    (0..n).map(|_| s * rng.normal()).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Check a backward kernel: `forward(inputs)` gives outputs; for a random probe
/// `u` on the named forward outputs and a random direction `d` on input `wrt`,
/// `(<u, f(x + h d)> - <u, f(x - h d)>) / 2h` must equal `<grad, d>`.
fn check_directional(
    what: &str,
    forward: &dyn Fn(&[f32]) -> Vec<Vec<f32>>,
    x: &[f32],
    probes: &[Vec<f32>],
    grad: &[f32],
    rng: &mut Rng,
) {
    for trial in 0..3 {
        let d = randn(x.len(), rng, 1.0);
        let f = |v: &[f32]| -> f64 { forward(v).iter().zip(probes).map(|(o, u)| dot(o, u)).sum() };
        // Central differences at h and h/2 combined by Richardson extrapolation
        // (truncation error O(h^4)).
        let central = |h: f32| {
            let plus: Vec<f32> = x.iter().zip(&d).map(|(a, b)| a + h * b).collect();
            let minus: Vec<f32> = x.iter().zip(&d).map(|(a, b)| a - h * b).collect();
            (f(&plus) - f(&minus)) / (2.0 * h as f64)
        };
        let numeric = (4.0 * central(5e-3) - central(1e-2)) / 3.0;
        let analytic = dot(grad, &d);
        let err = (numeric - analytic).abs();
        assert!(
            err <= 2e-3 * (1.0 + analytic.abs()),
            "{what} trial {trial}: finite difference {numeric} vs backward kernel {analytic}"
        );
    }
}

#[test]
fn backward_kernels_match_finite_differences_of_the_forward_kernels() {
    let c = config();
    let o = opts(WeightMode::Inputs);
    let no = &|_: &str| None;
    let mut rng = Rng::new(11);
    let (qd, kvd, f) = (c.q_dim(), c.kv_dim(), c.hidden_dim);
    let (wq, wk, wv) = (arr("wq"), arr("wk"), arr("wv"));
    let (w1, w2, w3, wo) = (arr("w1"), arr("w2"), arr("w3"), arr("wo"));
    let p32 = Precision::Fp32;

    // FFN: ffn_bwd_w2 then ffn_bwd_w13 give d<u, ffn>/dx2n.
    let ffn = kernels::ffn_fwd(&c, T, o, no).unwrap();
    let ffn_of = |x: &[f32]| {
        let outs = run(
            &ffn,
            &[
                ("x2n", x.to_vec()),
                ("w1", w1.clone()),
                ("w3", w3.clone()),
                ("w2", w2.clone()),
            ],
            p32,
        );
        vec![output(&outs, "ffn").to_vec()]
    };
    let x2n = arr("x2n");
    let fwd = run(
        &ffn,
        &[
            ("x2n", x2n.clone()),
            ("w1", w1.clone()),
            ("w3", w3.clone()),
            ("w2", w2.clone()),
        ],
        p32,
    );
    let u = randn(c.dim * T, &mut rng, 1.0);
    let b2 = kernels::ffn_bwd_w2(&c, T, o, no).unwrap();
    let dgate = run(&b2, &[("dffn", u.clone()), ("w2", w2.clone())], p32);
    let b13 = kernels::ffn_bwd_w13(&c, T, o, no).unwrap();
    let outs = run(
        &b13,
        &[
            ("dgate", output(&dgate, "dgate").to_vec()),
            ("h1", output(&fwd, "h1").to_vec()),
            ("h3", output(&fwd, "h3").to_vec()),
            ("w1", w1.clone()),
            ("w3", w3.clone()),
        ],
        p32,
    );
    assert_eq!(output(&outs, "dh1").len(), f * T);
    check_directional(
        "ffn backward",
        &ffn_of,
        &x2n,
        &[u],
        output(&outs, "dx2n"),
        &mut rng,
    );

    // Wo: wo_bwd gives d<u, o>/dattn.
    let wo_k = kernels::wo_fwd(&c, T, o, no).unwrap();
    let wo_of = |x: &[f32]| {
        vec![
            output(
                &run(&wo_k, &[("attn", x.to_vec()), ("wo", wo.clone())], p32),
                "o",
            )
            .to_vec(),
        ]
    };
    let u = randn(c.dim * T, &mut rng, 1.0);
    let da = run(
        &kernels::wo_bwd(&c, T, o, no).unwrap(),
        &[("dx2", u.clone()), ("wo", wo.clone())],
        p32,
    );
    check_directional(
        "wo backward",
        &wo_of,
        &arr("out_attn"),
        &[u],
        output(&da, "dattn"),
        &mut rng,
    );

    // Attention: attn_bwd (then q_bwd, kv_bwd) gives d<u, attn>/dxn through
    // projections, RoPE, GQA and the causal softmax.
    let attn = kernels::attn_fwd(&c, T, o, no).unwrap();
    let attn_inputs = |x: &[f32]| {
        vec![
            ("xn", x.to_vec()),
            ("wq", wq.clone()),
            ("wk", wk.clone()),
            ("wv", wv.clone()),
        ]
    };
    let attn_of = |x: &[f32]| vec![output(&run(&attn, &attn_inputs(x), p32), "attn").to_vec()];
    let xn = arr("xn");
    let fwd = run(&attn, &attn_inputs(&xn), p32);
    let u = randn(qd * T, &mut rng, 1.0);
    let bwd = run(
        &kernels::attn_bwd(&c, T, o).unwrap(),
        &[
            ("q_rope", output(&fwd, "q_rope").to_vec()),
            ("k_rope", output(&fwd, "k_rope").to_vec()),
            ("v", output(&fwd, "v").to_vec()),
            ("dattn", u.clone()),
        ],
        p32,
    );
    assert_eq!(output(&bwd, "dk").len(), kvd * T);
    let dxq = run(
        &kernels::q_bwd(&c, T, o, no).unwrap(),
        &[("dq", output(&bwd, "dq").to_vec()), ("wq", wq.clone())],
        p32,
    );
    let dxkv = run(
        &kernels::kv_bwd(&c, T, o, no).unwrap(),
        &[
            ("dk", output(&bwd, "dk").to_vec()),
            ("dv", output(&bwd, "dv").to_vec()),
            ("wk", wk.clone()),
            ("wv", wv.clone()),
        ],
        p32,
    );
    let dxn: Vec<f32> = output(&dxq, "dxn")
        .iter()
        .zip(output(&dxkv, "dxn"))
        .map(|(a, b)| a + b)
        .collect();
    check_directional("attention backward", &attn_of, &xn, &[u], &dxn, &mut rng);
}

#[test]
fn rope_tables_and_mask_are_hand_checked() {
    let (cos, sin) = kernels::rope_tables(3, 4, 10000.0);
    // position 2, pair 1: angle = 2 * 10000^(-2/4) = 0.02
    assert!((cos[2 * 4 + 2] - 0.02f32.cos()).abs() < 1e-7);
    assert!((sin[2 * 4 + 3] - 0.02f32.sin()).abs() < 1e-7);
    assert_eq!(cos[0], 1.0);
    let m = kernels::causal_mask(3);
    assert_eq!(
        m,
        vec![0.0, -65504.0, -65504.0, 0.0, 0.0, -65504.0, 0.0, 0.0, 0.0]
    );
}

#[test]
fn a_call_with_an_unbound_slot_names_it() {
    let c = config();
    let spec = kernels::wo_fwd(&c, T, opts(WeightMode::Inputs), &baked).unwrap();
    let mut backend = CpuBackend::new(Precision::Fp32);
    let k = CompiledKernel::new(&mut backend, spec).unwrap();
    let attn = vec![0.0; c.q_dim() * T];
    let err = k
        .call()
        .input("attn", &attn)
        .run(&mut backend)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("kernel wo_fwd: nothing bound to wo, o"),
        "{err}"
    );
}

/// Random activations for every activation slot of `spec` (weights: the
/// fixture's), as `run`'s inputs.
fn random_inputs(spec: &KernelSpec, rng: &mut Rng) -> Vec<(&'static str, Vec<f32>)> {
    let names = [
        "xn", "q_rope", "k_rope", "v", "dattn", "probs", "dp", "wq", "wk", "wv",
    ];
    names
        .into_iter()
        .filter(|name| spec.inputs.iter().any(|slot| slot.name == *name))
        .map(|name| {
            let slot = spec.input(name);
            let values = match slot.role {
                SlotRole::Activation => randn(slot.rows * slot.cols, rng, 1.0),
                SlotRole::Weight { .. } => randn(slot.rows * slot.cols, rng, 0.3),
            };
            (name, values)
        })
        .collect()
}

/// The split attention backward (`attn_bwd_dv` then `attn_bwd_dqk`) on the
/// inputs of the fused `attn_bwd`.
fn split_attention_backward(
    c: &ModelConfig,
    seq: usize,
    o: KernelOptions,
    inputs: &[(&str, Vec<f32>)],
    precision: Precision,
) -> Vec<(String, Vec<f32>)> {
    let parts = kernels::attn_bwd_split(c, seq, o, &|_| None).unwrap();
    let names: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, kernels::ATTN_BWD_PARTS);
    let first = run(&parts[0], inputs, precision);
    let mut second_inputs: Vec<(&str, Vec<f32>)> = inputs.to_vec();
    second_inputs.push(("probs", output(&first, "probs").to_vec()));
    second_inputs.push(("dp", output(&first, "dp").to_vec()));
    let mut outs = run(&parts[1], &second_inputs, precision);
    outs.push(("dv".into(), output(&first, "dv").to_vec()));
    outs
}

/// The split attention backward computes the fused kernel's outputs (whose
/// numbers the finite-difference test above checks): within 1e-6 in fp32
/// (the CPU fuses the two programs differently), bit for bit in fp16 (packed,
/// as on the ANE: the probabilities cross as fp16, as the fused kernel's
/// every op rounds them). The probabilities `attn_bwd_dv` writes are the
/// causal softmax's: rows sum to 1, nothing above the diagonal.
#[test]
fn the_split_attention_backward_gives_the_fused_kernels_outputs() {
    let c = config();
    let mut rng = Rng::new(5);
    let fp16_packed = KernelOptions {
        dtype: DType::Fp16,
        mode: WeightMode::Packed,
        ..KernelOptions::cpu()
    };
    for (o, precision) in [
        (opts(WeightMode::Inputs), Precision::Fp32),
        (opts(WeightMode::Packed), Precision::Fp32),
        (fp16_packed, Precision::Fp16),
    ] {
        let fused = kernels::attn_bwd(&c, T, o).unwrap();
        let inputs = random_inputs(&fused, &mut rng);
        let want = run(&fused, &inputs, precision);
        let got = split_attention_backward(&c, T, o, &inputs, precision);
        for name in ["dq", "dk", "dv"] {
            let what = format!("{:?} {precision:?} {name}", o.mode);
            if precision == Precision::Fp16 {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(output(&got, name)),
                    bits(output(&want, name)),
                    "{what}"
                );
            } else {
                Tolerance {
                    relative: 1e-6,
                    absolute: 0.0,
                }
                .assert_close(output(&got, name), output(&want, name), &what);
            }
        }
        let parts = kernels::attn_bwd_split(&c, T, o, &|_| None).unwrap();
        let probs = output(&run(&parts[0], &inputs, precision), "probs").to_vec();
        assert_eq!(probs.len(), c.n_heads * T * T);
        for (r, row) in probs.chunks(T).enumerate() {
            let i = r % T;
            assert!(row[i + 1..].iter().all(|p| *p == 0.0), "row {r}: {row:?}");
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 2e-3, "row {r} sums to {sum}");
        }
    }
}

/// Rule ANE024: the ANE's attention softmax runs over a power-of-two number
/// of keys. At a window of 48 the ANE-bound kernels (fp16, packed) pad it to
/// 64 masked keys and trip no ANE024, where the same math unpadded (weights
/// as inputs, the CPU's form) would; run in the same fp16 on the CPU backend
/// they give the unpadded kernels' numbers (up to fp16 rounding of a sum
/// order), and the fp32 kernels' within fp16's tolerance.
#[test]
fn the_ane_softmax_over_a_window_of_48_runs_over_64_masked_keys_with_the_same_numbers() {
    let seq = 48;
    let c = ModelConfig {
        head_dim: 8,
        ..ModelConfig::llama(32, 1, 4, 2, 48, 64, 64)
    };
    assert_eq!(kernels::softmax_keys(seq, opts(WeightMode::Packed)), 48);
    let packed = KernelOptions {
        dtype: DType::Fp16,
        mode: WeightMode::Packed,
        ..KernelOptions::cpu()
    };
    assert_eq!(kernels::softmax_keys(seq, packed), 64);
    assert_eq!(kernels::softmax_keys(64, packed), 64);
    let unpadded = KernelOptions {
        dtype: DType::Fp16,
        ..KernelOptions::cpu()
    };
    let build = |o: KernelOptions| {
        let mut specs = vec![
            kernels::attn_fwd(&c, seq, o, &|_| None).unwrap(),
            kernels::attn_bwd(&c, seq, o).unwrap(),
        ];
        specs.extend(kernels::attn_bwd_split(&c, seq, o, &|_| None).unwrap());
        specs
    };
    let softmax_axes = |spec: &KernelSpec| -> Vec<usize> {
        let main = &spec.program.main;
        main.ops
            .iter()
            .filter(|op| op.op == anemone::mil::Op::Softmax)
            .map(|op| match op.arg("x") {
                Some(anemone::mil::Arg::Var(v)) => *main.var_type(v).unwrap().shape.last().unwrap(),
                other => panic!("{other:?}"),
            })
            .collect()
    };
    let mut rng = Rng::new(17);
    for ((padded, plain), exact) in build(packed)
        .iter()
        .zip(build(unpadded))
        .zip(build(KernelOptions::cpu()))
    {
        let name = padded.name.as_str();
        let report = verify(&padded.program, Target::Ane);
        assert!(!report.rule_ids().contains(&"ANE024"), "{name}:\n{report}");
        let plain_report = verify(&plain.program, Target::Ane);
        let has_softmax = name != "attn_bwd_dqk";
        assert_eq!(
            softmax_axes(padded),
            if has_softmax { vec![64] } else { vec![] },
            "{name}"
        );
        assert_eq!(
            plain_report.rule_ids().contains(&"ANE024"),
            has_softmax,
            "{name}:\n{plain_report}"
        );
        let inputs = random_inputs(padded, &mut rng);
        let got = run(padded, &inputs, Precision::Fp16);
        let want = run(&plain, &inputs, Precision::Fp16);
        let reference = run(&exact, &inputs, Precision::Fp32);
        for (slot, values) in &got {
            let what = format!("{name} {slot}");
            Tolerance {
                relative: 1e-3,
                absolute: 0.0,
            }
            .assert_close(
                values,
                output(&want, slot),
                &format!("{what}: padded vs unpadded fp16"),
            );
            Tolerance {
                relative: 2e-2,
                absolute: 0.0,
            }
            .assert_close(
                values,
                output(&reference, slot),
                &format!("{what}: fp16 vs fp32"),
            );
        }
    }
}

/// The attention kernels at the window of 48 against PyTorch
/// (`scripts/ref_attention_window.py`, fixtures in
/// `tests/fixtures/attention_t48/`): the CPU's fp32 kernels (softmax over 48
/// keys) within 1e-5, the ANE-bound fp16 ones (softmax over 64 keys, 16 of
/// them masked padding) within fp16's tolerance; the forward, the fused
/// backward and its split.
#[test]
fn attention_at_a_window_of_48_matches_pytorch_with_and_without_padded_keys() {
    let seq = 48;
    let c = ModelConfig {
        head_dim: 8,
        ..ModelConfig::llama(32, 1, 4, 2, 48, 64, 64)
    };
    let fx = |name: &str| read_npy_f32(&fixture("attention_t48").join(format!("{name}.npy")));
    let packed = KernelOptions {
        dtype: DType::Fp16,
        mode: WeightMode::Packed,
        ..KernelOptions::cpu()
    };
    let fp32 = Tolerance {
        relative: 1e-5,
        absolute: 1e-6,
    };
    let fp16 = Tolerance {
        relative: 1e-2,
        absolute: 1e-3,
    };
    for (o, precision, tol) in [
        (opts(WeightMode::Inputs), Precision::Fp32, &fp32),
        (packed, Precision::Fp16, &fp16),
    ] {
        let keys = kernels::softmax_keys(seq, o);
        let what = |kernel: &str, name: &str| format!("{kernel} {name} ({keys} keys)");
        let forward = kernels::attn_fwd(&c, seq, o, &|_| None).unwrap();
        let names = ["xn", "wq", "wk", "wv"];
        let inputs: Vec<(&str, Vec<f32>)> = names.iter().map(|n| (*n, fx(n))).collect();
        let outs = run(&forward, &inputs, precision);
        for name in ["attn", "q_rope", "k_rope", "v"] {
            let want = fx(&format!("out_{name}"));
            tol.assert_close(output(&outs, name), &want, &what("attn_fwd", name));
        }
        let inputs = vec![
            ("q_rope", fx("out_q_rope")),
            ("k_rope", fx("out_k_rope")),
            ("v", fx("out_v")),
            ("dattn", fx("dattn")),
        ];
        let fused = run(&kernels::attn_bwd(&c, seq, o).unwrap(), &inputs, precision);
        let split = split_attention_backward(&c, seq, o, &inputs, precision);
        for name in ["dq", "dk", "dv"] {
            let want = fx(&format!("out_{name}"));
            tol.assert_close(output(&fused, name), &want, &what("attn_bwd", name));
            tol.assert_close(output(&split, name), &want, &what("split", name));
        }
    }
}
