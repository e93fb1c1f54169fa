#!/usr/bin/env python3
"""Write NumPy reference cases for every MIL op the CPU backend implements.

Usage: python3 scripts/gen_op_fixtures.py   (writes tests/fixtures/ops/*.json)

Each case is one JSON file read by tests/it/cpu_ops.rs, which builds a one-op
MIL program from it, runs it on the CPU backend in both precisions, and compares:

  inputs   runtime inputs: name, dtype, shape, data
  args     call arguments: {"var": name} | {"lit": literal} | {"const": literal}
           (a `const` op defining the value) | {"tuple": [args]}
  attrs    attribute literals (constexpr_affine_dequantize)
  outputs  name, dtype, shape, and two references:
           fp32: the op in float64 on float32 inputs, rounded to float32;
           fp16: the op on float16 inputs, rounded once to float16; ops NumPy has
                 for float16 (add, mul, exp, ...) use float16 arithmetic directly.
           fp16_exact: the fp16 run must match bit for bit (elementwise and data
                 movement); otherwise within one fp16 ulp (sums, products).

A literal is {"dtype", "shape", "data"}. dtype "float" is fp32 in the fp32 run
and fp16 in the fp16 run. Non-finite floats are the strings "inf", "-inf", "nan".

Semantics follow coremltools 9 (iOS17/18 opsets): gelu's modes are EXACT
0.5 x (1 + erf(x / sqrt 2)) (the default), TANH_APPROXIMATION
0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) and SIGMOID_APPROXIMATION
x sigmoid(1.702 x); rsqrt/log add `epsilon`
(default 1e-12 / 1e-45 in x's dtype, i.e. 0 in fp16); quantize is
clip(round_half_even(x / scale) + zero_point); dequantize (q - zero_point) * scale;
cast to an integer truncates (NumPy astype); scaled_dot_product_attention is
softmax(q k^T / sqrt(E) + mask) v with a bool mask adding -inf where false.
"""

import json
import math
import pathlib

import numpy as np

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "ops"
GENERATOR = "scripts/gen_op_fixtures.py"
rng = np.random.default_rng(7)

# Ops NumPy evaluates natively in float16 (round once per op, like the backend).
NATIVE16 = {"add", "sub", "mul", "real_div", "maximum", "minimum", "pow", "sqrt", "exp", "tanh", "relu"}
# Ops whose fp16 result must match bit for bit.
EXACT16 = NATIVE16 | {
    "rsqrt", "log", "sigmoid", "silu", "gelu", "identity", "reshape", "transpose", "slice_by_size",
    "concat", "split", "select", "cast", "quantize", "dequantize", "constexpr_affine_dequantize",
}


def encode(values):
    out = []
    for v in np.asarray(values).reshape(-1).tolist():
        if isinstance(v, float) and not math.isfinite(v):
            out.append("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
        else:
            out.append(v)
    return out


def lit(dtype, values, shape=None):
    arr = np.asarray(values)
    return {"dtype": dtype, "shape": list(arr.shape if shape is None else shape), "data": encode(arr)}


class Case:
    def __init__(self, name, op):
        self.name, self.op = name, op
        self.inputs = {}  # name -> (dtype, array)
        self.args = {}
        self.attrs = {}
        self.consts = {}  # arg name -> (dtype, array) for float params that follow the precision

    def input(self, name, dtype, arr):
        self.inputs[name] = (dtype, np.asarray(arr))
        return self

    def arg(self, name, value):
        self.args[name] = value
        return self


def as_run(dtype, arr, run):
    """The values a run sees: floats rounded to the run's float type, upcast for math."""
    if dtype != "float":
        return np.asarray(arr)
    if run == "fp16":
        return np.asarray(arr, dtype=np.float16)
    return np.asarray(arr, dtype=np.float32)


def write_case(case, outputs, ref):
    """`outputs`: list of (name, dtype, shape); `ref(values, run, native)` returns arrays."""
    results = {}
    for run in ("fp32", "fp16"):
        native = run == "fp16" and case.op in NATIVE16
        vals = {}
        for name, (dtype, arr) in case.inputs.items():
            v = as_run(dtype, arr, run)
            vals[name] = v if (native or dtype != "float") else v.astype(np.float64)
        p = Params(run, native)
        with np.errstate(all="ignore"):
            res = ref(vals, p)
        if not isinstance(res, (list, tuple)):
            res = [res]
        results[run] = res
    doc = {
        "generator": GENERATOR,
        "case": case.name,
        "op": case.op,
        "inputs": [
            {"name": n, **lit(d, a.astype(np.float64) if d == "float" else a)}
            for n, (d, a) in case.inputs.items()
        ],
        "args": case.args,
        "attrs": case.attrs,
        "outputs": [],
    }
    for i, (name, dtype, shape) in enumerate(outputs):
        r32, r16 = results["fp32"][i], results["fp16"][i]
        if dtype == "float":
            r32 = np.asarray(r32).astype(np.float32)
            r16 = np.asarray(r16).astype(np.float16)
        assert list(np.shape(r32)) == list(shape), (case.name, np.shape(r32), shape)
        doc["outputs"].append({
            "name": name, "dtype": dtype, "shape": list(shape),
            "fp32": encode(np.asarray(r32, dtype=np.float64)),
            "fp16": encode(np.asarray(r16, dtype=np.float64)),
            "fp16_exact": case.op in EXACT16,
        })
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{case.name}.json").write_text(json.dumps(doc, separators=(",", ":")) + "\n")


class Params:
    """Float parameters as the run holds them: float16 in the fp16 run."""

    def __init__(self, run, native):
        self.run, self.native = run, native

    def f(self, v):
        v = np.asarray(v, dtype=np.float16 if self.run == "fp16" else np.float32)
        return v if self.native else v.astype(np.float64)


def var(name):
    return {"var": name}


def randn(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def one(name, op, inputs, ref, out_shape, args=None, out_dtype="float"):
    c = Case(name, op)
    for n, (d, a) in inputs.items():
        c.input(n, d, a)
    for n in inputs:
        c.arg(n, var(n))
    for n, a in (args or {}).items():
        c.arg(n, a)
    write_case(c, [("z", out_dtype, out_shape)], ref)


def softmax(x, axis):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def gelu(x, mode):
    """MIL's gelu, each mode as its definition reads, in float64."""
    if mode == "EXACT":
        return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return x * sigmoid(1.702 * x)


def conv_ref(x, w, b, strides, dil, pads, groups):
    """Direct NCHW convolution in float64; pads = [(before, after)] per spatial axis."""
    x = np.pad(x, [(0, 0), (0, 0)] + list(pads))
    n, cin, h, wd = x.shape
    cout, cin_g, kh, kw = w.shape
    oh = (h - ((kh - 1) * dil[0] + 1)) // strides[0] + 1
    ow = (wd - ((kw - 1) * dil[1] + 1)) // strides[1] + 1
    out = np.zeros((n, cout, oh, ow))
    cout_g = cout // groups
    for o in range(cout):
        g = o // cout_g
        for i in range(kh):
            for j in range(kw):
                patch = x[:, g * cin_g:(g + 1) * cin_g,
                          i * dil[0]: i * dil[0] + (oh - 1) * strides[0] + 1: strides[0],
                          j * dil[1]: j * dil[1] + (ow - 1) * strides[1] + 1: strides[1]]
                out[:, o] += np.einsum("nchw,c->nhw", patch, w[o, :, i, j])
    if b is not None:
        out += b.reshape(1, -1, 1, 1)
    return out


def quantize_ref(x, scale, zp, lo, hi):
    q = np.round(x / scale)  # round half to even, in the input's dtype
    return np.clip(q.astype(np.float64) + zp, lo, hi)


def main():
    for old in OUT.glob("*.json"):
        old.unlink()
    F = "float"

    # ---- binary, NumPy broadcasting --------------------------------------
    one("add_broadcast", "add", {"x": (F, randn(2, 3, 1, 4)), "y": (F, randn(1, 3, 1, 1))},
        lambda v, p: v["x"] + v["y"], [2, 3, 1, 4])
    one("add_inline_scalar", "add", {"x": (F, randn(2, 3))},
        lambda v, p: v["x"] + p.f(0.3), [2, 3], args={"y": {"lit": lit(F, 0.3, [])}})
    one("sub_rank_broadcast", "sub", {"x": (F, randn(2, 3, 4)), "y": (F, randn(4))},
        lambda v, p: v["x"] - v["y"], [2, 3, 4])
    # fp16: 300*300 and 100*700 overflow to inf; 1e-4*1e-4 = 1e-8 underflows to 0.
    one("mul_fp16_overflow", "mul",
        {"x": (F, np.array([300, -300, 1e-4, 2.5, 100, 0.1], np.float32)),
         "y": (F, np.array([300, 300, 1e-4, 4, 700, 0.2], np.float32))},
        lambda v, p: v["x"] * v["y"], [6])
    one("real_div", "real_div", {"x": (F, randn(2, 4)), "y": (F, np.array([0.5, -3, 1e-3, 7], np.float32))},
        lambda v, p: v["x"] / v["y"], [2, 4])
    one("maximum_const_scalar", "maximum", {"x": (F, randn(3, 4))},
        lambda v, p: np.maximum(v["x"], p.f(0.25)), [3, 4], args={"y": {"const": lit(F, 0.25, [])}})
    one("minimum_both_broadcast", "minimum", {"x": (F, randn(2, 1, 3)), "y": (F, randn(4, 1))},
        lambda v, p: np.minimum(v["x"], v["y"]), [2, 4, 3])
    one("pow", "pow", {"x": (F, np.abs(randn(2, 3)) + 0.1), "y": (F, np.array([2, 0.5, -1.5], np.float32))},
        lambda v, p: np.power(v["x"], v["y"]), [2, 3])
    one("pow_minus_half", "pow", {"x": (F, np.abs(randn(6)) + 1e-3)},
        lambda v, p: np.power(v["x"], p.f(-0.5)), [6], args={"y": {"lit": lit(F, -0.5, [])}})

    # ---- unary -------------------------------------------------------------
    pos = np.abs(randn(2, 5)) + 0.01
    one("sqrt", "sqrt", {"x": (F, pos)}, lambda v, p: np.sqrt(v["x"]), [2, 5])
    zero_pos = np.array([0.0, 1e-6, 0.25, 3.0, 1e4], np.float32)
    # Default epsilon 1e-12 is 0 in fp16: rsqrt(0) = inf there, 1e6 in fp32.
    one("rsqrt_default_epsilon", "rsqrt", {"x": (F, zero_pos)},
        lambda v, p: 1.0 / np.sqrt(v["x"] + p.f(1e-12)), [5])
    one("rsqrt_epsilon", "rsqrt", {"x": (F, zero_pos)},
        lambda v, p: 1.0 / np.sqrt(v["x"] + p.f(1e-3)), [5], args={"epsilon": {"lit": lit(F, 1e-3, [])}})
    # exp(12) = 162755 overflows fp16; exp(-20) = 2e-9 underflows to 0.
    one("exp_fp16_overflow", "exp", {"x": (F, np.array([12, -20, 0, 1.5, -3.25, 11], np.float32))},
        lambda v, p: np.exp(v["x"]), [6])
    # Default epsilon 1e-45 is 0 in fp16: log(0) = -inf there, log(1.4e-45) in fp32.
    one("log_default_epsilon", "log", {"x": (F, zero_pos)},
        lambda v, p: np.log(v["x"] + p.f(1e-45)), [5])
    one("log_epsilon", "log", {"x": (F, zero_pos)},
        lambda v, p: np.log(v["x"] + p.f(0.5)), [5], args={"epsilon": {"lit": lit(F, 0.5, [])}})
    wide = np.concatenate([randn(8, scale=2.0), np.array([-20, 20], np.float32)]).reshape(2, 5)
    one("tanh", "tanh", {"x": (F, wide)}, lambda v, p: np.tanh(v["x"]), [2, 5])
    one("sigmoid", "sigmoid", {"x": (F, wide)}, lambda v, p: sigmoid(v["x"]), [2, 5])
    one("silu", "silu", {"x": (F, wide)}, lambda v, p: v["x"] * sigmoid(v["x"]), [2, 5])
    one("relu", "relu", {"x": (F, wide)}, lambda v, p: np.maximum(v["x"], p.f(0)), [2, 5])
    one("identity", "identity", {"x": (F, randn(3, 2))}, lambda v, p: v["x"], [3, 2])

    # ---- softmax and reductions -------------------------------------------
    one("softmax_last_axis_large", "softmax", {"x": (F, randn(2, 3, 5, scale=30.0))},
        lambda v, p: softmax(v["x"], -1), [2, 3, 5], args={"axis": {"lit": lit("int32", -1, [])}})
    one("softmax_axis1", "softmax", {"x": (F, randn(2, 4, 3))},
        lambda v, p: softmax(v["x"], 1), [2, 4, 3], args={"axis": {"const": lit("int32", 1, [])}})
    one("softmax_default_axis", "softmax", {"x": (F, randn(3, 4))},
        lambda v, p: softmax(v["x"], -1), [3, 4])
    one("reduce_sum_channels_keep", "reduce_sum", {"x": (F, randn(1, 6, 1, 5))},
        lambda v, p: np.sum(v["x"], axis=1, keepdims=True), [1, 1, 1, 5],
        args={"axes": {"const": lit("int32", [1])}, "keep_dims": {"const": lit("bool", True, [])}})
    one("reduce_sum_all", "reduce_sum", {"x": (F, randn(2, 3))}, lambda v, p: np.sum(v["x"]), [])
    one("reduce_mean_last", "reduce_mean", {"x": (F, randn(2, 3, 4))},
        lambda v, p: np.mean(v["x"], axis=-1), [2, 3],
        args={"axes": {"lit": lit("int32", [-1])}, "keep_dims": {"lit": lit("bool", False, [])}})
    one("reduce_max_split_axes", "reduce_max", {"x": (F, randn(2, 3, 4))},
        lambda v, p: np.max(v["x"], axis=(0, 2)), [3], args={"axes": {"lit": lit("int32", [0, 2])}})

    # ---- data movement ----------------------------------------------------
    one("reshape_infer", "reshape", {"x": (F, randn(2, 3, 4))},
        lambda v, p: v["x"].reshape(4, 6), [4, 6], args={"shape": {"const": lit("int32", [4, -1])}})
    one("transpose", "transpose", {"x": (F, randn(2, 3, 4, 5))},
        lambda v, p: v["x"].transpose(0, 2, 3, 1), [2, 4, 5, 3],
        args={"perm": {"const": lit("int32", [0, 2, 3, 1])}})
    one("slice_by_size", "slice_by_size", {"x": (F, randn(3, 4, 5))},
        lambda v, p: v["x"][1:3, :, 2:5], [2, 4, 3],
        args={"begin": {"lit": lit("int32", [1, 0, 2])}, "size": {"lit": lit("int32", [2, -1, 3])}})
    c = Case("concat_axis1", "concat")
    for n, s in (("a", (2, 1, 3)), ("b", (2, 2, 3)), ("c", (2, 3, 3))):
        c.input(n, F, randn(*s))
    c.arg("values", {"tuple": [var("a"), var("b"), var("c")]})
    c.arg("axis", {"const": lit("int32", 1, [])})
    c.arg("interleave", {"const": lit("bool", False, [])})
    write_case(c, [("z", F, [2, 6, 3])], lambda v, p: np.concatenate([v["a"], v["b"], v["c"]], axis=1))
    c = Case("concat_interleave", "concat")
    c.input("a", F, randn(2, 3)).input("b", F, randn(2, 3))
    c.arg("values", {"tuple": [var("a"), var("b")]})
    c.arg("axis", {"lit": lit("int32", 0, [])})
    c.arg("interleave", {"lit": lit("bool", True, [])})
    write_case(c, [("z", F, [4, 3])], lambda v, p: np.stack([v["a"], v["b"]], axis=1).reshape(4, 3))
    c = Case("split_num_splits", "split")
    c.input("x", F, randn(2, 4, 3)).arg("x", var("x"))
    c.arg("num_splits", {"lit": lit("int32", 2, [])}).arg("axis", {"lit": lit("int32", 1, [])})
    write_case(c, [("z0", F, [2, 2, 3]), ("z1", F, [2, 2, 3])],
               lambda v, p: np.split(v["x"], 2, axis=1))
    c = Case("split_sizes", "split")
    c.input("x", F, randn(2, 6)).arg("x", var("x"))
    c.arg("split_sizes", {"const": lit("int32", [1, 3, 2])}).arg("axis", {"const": lit("int32", -1, [])})
    write_case(c, [("z0", F, [2, 1]), ("z1", F, [2, 3]), ("z2", F, [2, 2])],
               lambda v, p: np.split(v["x"], [1, 4], axis=-1))
    one("select_broadcast", "select",
        {"cond": ("bool", np.array([[1], [0]])), "a": (F, randn(2, 3)), "b": (F, randn(3))},
        lambda v, p: np.where(v["cond"] != 0, v["a"], v["b"]), [2, 3])

    # ---- cast ----------------------------------------------------------------
    trunc = np.array([2.7, -2.7, 0.5, -0.5, 100.4, 3.0], np.float32)
    one("cast_to_int32_truncates", "cast", {"x": (F, trunc)},
        lambda v, p: v["x"].astype(np.int32), [6], args={"dtype": {"const": lit("string", "int32", [])}},
        out_dtype="int32")
    one("cast_int32_to_fp32", "cast", {"x": ("int32", np.array([-3, 0, 7, 2048]))},
        lambda v, p: v["x"].astype(np.float32), [4], args={"dtype": {"lit": lit("string", "fp32", [])}},
        out_dtype="fp32")
    # Precision::Fp32 computes fp16-typed values in f32, so the fp32 run keeps x.
    one("cast_to_fp16", "cast", {"x": (F, randn(5))},
        lambda v, p: v["x"], [5], args={"dtype": {"lit": lit("string", "fp16", [])}}, out_dtype="fp16")

    # ---- conv (weights and bias as const ops) ---------------------------------
    def conv_case(name, x, w, b, strides, dil, pads, groups, extra):
        c = Case(name, "conv")
        c.input("x", F, x).arg("x", var("x"))
        c.arg("weight", {"const": lit(F, w)})
        if b is not None:
            c.arg("bias", {"const": lit(F, b)})
        for k, val in extra.items():
            c.arg(k, {"const": val})
        x4 = x if x.ndim == 4 else x[:, :, None, :]
        w4 = w if w.ndim == 4 else w[:, :, None, :]
        pads4 = pads if x.ndim == 4 else [(0, 0)] + pads
        st4 = strides if x.ndim == 4 else [1] + strides
        dl4 = dil if x.ndim == 4 else [1] + dil

        def ref(v, p):
            wv, bv = p.f(w).astype(np.float64), None if b is None else p.f(b).astype(np.float64)
            out = conv_ref(v["x"], wv.reshape(w4.shape), bv, st4, dl4, pads4, groups)
            return out if x.ndim == 4 else out[:, :, 0, :]
        shape = list(ref({"x": x4.astype(np.float64)}, Params("fp32", False)).shape)
        write_case(c, [("z", F, shape)], lambda v, p: ref({"x": v["x"].reshape(x4.shape)}, p))

    conv_case("conv_1x1_bias", randn(1, 8, 1, 6), randn(4, 8, 1, 1), randn(4), [1, 1], [1, 1],
              [(0, 0), (0, 0)], 1, {})
    conv_case("conv_groups_strides_dilations_pad", randn(2, 4, 7, 6), randn(6, 2, 3, 3), None, [2, 1], [1, 2],
              [(1, 0), (2, 1)], 2,
              {"strides": lit("int32", [2, 1]), "dilations": lit("int32", [1, 2]),
               "pad_type": lit("string", "custom", []), "pad": lit("int32", [1, 0, 2, 1]),
               "groups": lit("int32", 2, [])})
    # "same" with stride 2 on 5: output 3, total pad 2 -> (1, 1).
    conv_case("conv_same_stride2", randn(1, 3, 5, 5), randn(2, 3, 3, 3), randn(2), [2, 2], [1, 1],
              [(1, 1), (1, 1)], 1,
              {"strides": lit("int32", [2, 2]), "pad_type": lit("string", "same", [])})
    conv_case("conv_1d", randn(1, 2, 9), randn(3, 2, 3), None, [2], [1], [(0, 0)], 1,
              {"strides": lit("int32", [2]), "pad_type": lit("string", "valid", [])})

    # ---- matmul -----------------------------------------------------------------
    one("matmul_broadcast_rhs", "matmul", {"x": (F, randn(2, 3, 4)), "y": (F, randn(4, 5))},
        lambda v, p: v["x"] @ v["y"], [2, 3, 5])
    one("matmul_transposes_batch_broadcast", "matmul", {"x": (F, randn(2, 1, 4, 3)), "y": (F, randn(3, 5, 4))},
        lambda v, p: np.swapaxes(v["x"], -1, -2) @ np.swapaxes(v["y"], -1, -2), [2, 3, 3, 5],
        args={"transpose_x": {"const": lit("bool", True, [])}, "transpose_y": {"lit": lit("bool", True, [])}})
    one("matmul_vector_lhs", "matmul", {"x": (F, randn(4)), "y": (F, randn(2, 4, 3))},
        lambda v, p: v["x"] @ v["y"], [2, 3])

    # ---- quantization -----------------------------------------------------------
    qd = rng.integers(-128, 128, size=(3, 4))
    zp, sc = np.array([0, 5, -3]), np.array([0.1, 0.02, 1.5], np.float32)
    c = Case("constexpr_affine_dequantize_per_axis", "constexpr_affine_dequantize")
    c.attrs = {"quantized_data": lit("int8", qd), "zero_point": lit("int8", zp),
               "scale": lit(F, sc), "axis": lit("int32", 0, [])}
    write_case(c, [("z", F, [3, 4])],
               lambda v, p: (qd - zp[:, None]).astype(np.float64) * p.f(sc).astype(np.float64)[:, None])
    qu = rng.integers(0, 256, size=(2, 3))
    c = Case("constexpr_affine_dequantize_scalar_uint8", "constexpr_affine_dequantize")
    c.attrs = {"quantized_data": lit("uint8", qu), "zero_point": lit("uint8", 128, []),
               "scale": lit(F, 0.25, []), "axis": lit("int32", 1, [])}
    write_case(c, [("z", F, [2, 3])], lambda v, p: (qu - 128).astype(np.float64) * p.f(0.25).astype(np.float64))
    # x / 0.5 = 2.5, 3.5, -0.5 tie to even (2, 4, -0); +-100 saturate.
    xq = np.array([[1.25, 1.75, -0.25, 100, -100], [0.3, -0.7, 0, 10.1, -63.9]], np.float32)
    one("quantize_int8_ties_even_saturates", "quantize", {"input": (F, xq)},
        lambda v, p: quantize_ref(v["input"], p.f(0.5), 3, -128, 127), [2, 5],
        args={"scale": {"const": lit(F, 0.5, [])}, "zero_point": {"const": lit("int8", 3, [])},
              "output_dtype": {"const": lit("string", "int8", [])}}, out_dtype="int8")
    scq, zpq = np.array([0.25, 2.0], np.float32), np.array([10, 128])
    one("quantize_uint8_per_axis", "quantize", {"input": (F, xq)},
        lambda v, p: quantize_ref(v["input"], p.f(scq)[:, None], zpq[:, None], 0, 255), [2, 5],
        args={"scale": {"lit": lit(F, scq)}, "zero_point": {"lit": lit("uint8", zpq)},
              "axis": {"lit": lit("int32", 0, [])}, "output_dtype": {"lit": lit("string", "uint8", [])}},
        out_dtype="uint8")
    dq_in = rng.integers(-128, 128, size=(2, 3))
    dsc, dzp = np.array([0.5, 0.125, 3.0], np.float32), np.array([1, -2, 0])
    one("dequantize_per_axis", "dequantize", {"input": ("int8", dq_in)},
        lambda v, p: (v["input"] - dzp).astype(np.float64) * p.f(dsc).astype(np.float64), [2, 3],
        args={"scale": {"const": lit(F, dsc)}, "zero_point": {"const": lit("int8", dzp)},
              "axis": {"const": lit("int32", 1, [])}})
    du_in = rng.integers(0, 256, size=(4,))
    one("dequantize_scalar_uint8", "dequantize", {"input": ("uint8", du_in)},
        lambda v, p: v["input"].astype(np.float64) * p.f(0.01).astype(np.float64), [4],
        args={"scale": {"lit": lit(F, 0.01, [])}})

    # ---- attention -----------------------------------------------------------------
    def sdpa(q, k, v, mask=None):
        s = (q @ np.swapaxes(k, -1, -2)) / np.sqrt(q.shape[-1])
        if mask is not None:
            s = s + mask
        return softmax(s, -1) @ v

    one("sdpa_float_mask", "scaled_dot_product_attention",
        {"query": (F, randn(1, 2, 3, 4)), "key": (F, randn(1, 2, 5, 4)), "value": (F, randn(1, 2, 5, 6)),
         "attn_mask": (F, np.where(rng.random((1, 1, 3, 5)) < 0.3, -1e4, 0).astype(np.float32))},
        lambda v, p: sdpa(v["query"], v["key"], v["value"], v["attn_mask"]), [1, 2, 3, 6])
    keep = (rng.random((3, 5)) < 0.7).astype(np.int64)
    keep[:, 0] = 1  # every row keeps at least one position
    one("sdpa_bool_mask_rank3", "scaled_dot_product_attention",
        {"query": (F, randn(2, 3, 4)), "key": (F, randn(2, 5, 4)), "value": (F, randn(2, 5, 2)),
         "attn_mask": ("bool", keep)},
        lambda v, p: sdpa(v["query"], v["key"], v["value"], np.where(v["attn_mask"] != 0, 0.0, -np.inf)),
        [2, 3, 2])
    one("sdpa_no_mask", "scaled_dot_product_attention",
        {"query": (F, randn(1, 4, 4)), "key": (F, randn(1, 4, 4)), "value": (F, randn(1, 4, 3))},
        lambda v, p: sdpa(v["query"], v["key"], v["value"]), [1, 4, 3])

    # ---- gelu (last, so that the cases above keep their random draws) ----------
    g = np.concatenate([randn(12, scale=2.0), np.array([-8, -4, -1, -0.5, 0, 0.5, 1, 4], np.float32)])
    g = g.reshape(4, 5)
    one("gelu_default_mode", "gelu", {"x": (F, g)}, lambda v, p: gelu(v["x"], "EXACT"), [4, 5])
    for mode, spell in (("EXACT", "const"), ("TANH_APPROXIMATION", "lit"), ("SIGMOID_APPROXIMATION", "const")):
        one(f"gelu_{mode.lower()}", "gelu", {"x": (F, g)}, lambda v, p, mode=mode: gelu(v["x"], mode), [4, 5],
            args={"mode": {spell: lit("string", mode, [])}})

    total = sum(f.stat().st_size for f in OUT.glob("*.json"))
    print(f"wrote {len(list(OUT.glob('*.json')))} cases, {total} bytes, to {OUT}")


if __name__ == "__main__":
    main()
