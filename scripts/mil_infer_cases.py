"""Reference result types for `mil::infer`, computed by coremltools' MIL builder.

Writes tests/fixtures/mil_infer/cases.json: for every case the op, its function
inputs, named const tensors, arguments and the result types coremltools infers
(opset iOS18), or "error" when coremltools rejects the op. Used by
tests/it/verify.rs. Cases where anemone deliberately differs are tested by hand
there instead: coremltools 9.0 gives [1, 3] for matmul([4], [10, 4, 3]) where its
docstring and NumPy give [10, 3], and it does not range-check softmax's axis.
Run from the repository root:

    python3 scripts/mil_infer_cases.py
"""

import json
import warnings

import numpy as np

warnings.filterwarnings("ignore")
import coremltools as ct  # noqa: E402
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import Function, types  # noqa: E402

OUT = "tests/fixtures/mil_infer/cases.json"

NP = {
    "fp16": np.float16,
    "fp32": np.float32,
    "int8": np.int8,
    "uint8": np.uint8,
    "int32": np.int32,
    "bool": np.bool_,
}
MB = {
    "fp16": types.fp16,
    "fp32": types.fp32,
    "int8": types.int8,
    "uint8": types.uint8,
    "int32": types.int32,
    "bool": types.bool,
}


def var(name):
    return {"var": name}


def i32(v):
    return {"int32": v}


def i32s(*v):
    return {"int32s": list(v)}


def tensor(dtype, shape, fill=1):
    return {"tensor": {"dtype": dtype, "shape": list(shape), "fill": fill}}


def case(id, op, inputs=None, consts=None, **args):
    return {
        "id": id,
        "op": op,
        "inputs": {k: [d, list(s)] for k, (d, s) in (inputs or {}).items()},
        "consts": {k: v["tensor"] for k, v in (consts or {}).items()},
        "args": args,
    }


F16 = "fp16"
CASES = [
    # elementwise binary
    case("add_broadcast", "add", {"x": (F16, [2, 1, 4]), "y": (F16, [3, 1])}, x=var("x"), y=var("y")),
    case("mul_channel_weight", "mul", {"x": (F16, [1, 64, 1, 16])}, {"w": tensor(F16, [1, 64, 1, 1])}, x=var("x"), y=var("w")),
    case("sub_scalar", "sub", {"x": (F16, [2, 3])}, {"s": tensor(F16, [], 0.5)}, x=var("x"), y=var("s")),
    case("real_div_fp32", "real_div", {"x": ("fp32", [4]), "y": ("fp32", [4])}, x=var("x"), y=var("y")),
    case("maximum_rank_up", "maximum", {"x": (F16, [5]), "y": (F16, [2, 5])}, x=var("x"), y=var("y")),
    case("minimum_same", "minimum", {"x": (F16, [3, 3]), "y": (F16, [3, 3])}, x=var("x"), y=var("y")),
    case("pow_scalar", "pow", {"x": (F16, [1, 1, 1, 8])}, {"e": tensor(F16, [], -0.5)}, x=var("x"), y=var("e")),
    case("add_no_broadcast", "add", {"x": (F16, [2, 4]), "y": (F16, [1, 3])}, x=var("x"), y=var("y")),
    case("add_int32", "add", {"x": ("int32", [3]), "y": ("int32", [1])}, x=var("x"), y=var("y")),
    # elementwise unary
    case("sqrt", "sqrt", {"x": (F16, [2, 3])}, x=var("x")),
    case("rsqrt_eps", "rsqrt", {"x": (F16, [2, 3])}, {"e": tensor(F16, [], 1e-5)}, x=var("x"), epsilon=var("e")),
    case("exp", "exp", {"x": ("fp32", [7])}, x=var("x")),
    case("log", "log", {"x": (F16, [1, 2])}, x=var("x")),
    case("tanh", "tanh", {"x": (F16, [1, 2, 3])}, x=var("x")),
    case("sigmoid", "sigmoid", {"x": (F16, [1, 8, 1, 4])}, x=var("x")),
    case("silu", "silu", {"x": (F16, [1, 8, 1, 4])}, x=var("x")),
    case("relu", "relu", {"x": (F16, [4])}, x=var("x")),
    case("gelu_default", "gelu", {"x": (F16, [1, 8, 1, 4])}, x=var("x")),
    case("gelu_tanh", "gelu", {"x": ("fp32", [2, 3])}, x=var("x"), mode={"str": "TANH_APPROXIMATION"}),
    case("gelu_sigmoid", "gelu", {"x": (F16, [4])}, x=var("x"), mode={"str": "SIGMOID_APPROXIMATION"}),
    case("gelu_unknown_mode", "gelu", {"x": (F16, [4])}, x=var("x"), mode={"str": "FAST"}),
    case("gelu_int_rejected", "gelu", {"x": ("int32", [3])}, x=var("x")),
    case("identity", "identity", {"x": (F16, [1, 64, 1, 8])}, x=var("x")),
    case("sqrt_int_rejected", "sqrt", {"x": ("int32", [3])}, x=var("x")),
    # softmax
    case("softmax_default", "softmax", {"x": (F16, [1, 2, 4, 4])}, x=var("x")),
    case("softmax_axis1", "softmax", {"x": (F16, [1, 32, 1, 8])}, x=var("x"), axis=i32(1)),
    # reductions
    case("reduce_sum_keep", "reduce_sum", {"x": (F16, [1, 64, 1, 16])}, x=var("x"), axes=i32s(1), keep_dims={"bool": True}),
    case("reduce_mean_drop_neg", "reduce_mean", {"x": (F16, [2, 3, 4])}, x=var("x"), axes=i32s(-1, 0), keep_dims={"bool": False}),
    case("reduce_max_all", "reduce_max", {"x": (F16, [2, 3])}, x=var("x")),
    case("reduce_sum_all_keep", "reduce_sum", {"x": ("fp32", [2, 3])}, x=var("x"), keep_dims={"bool": True}),
    case("reduce_sum_bad_axis", "reduce_sum", {"x": (F16, [2, 3])}, x=var("x"), axes=i32s(2)),
    # reshape
    case("reshape_heads", "reshape", {"x": (F16, [1, 768, 1, 256])}, x=var("x"), shape=i32s(1, 12, 64, 256)),
    case("reshape_zero_minus_one", "reshape", {"x": (F16, [1, 4, 1, 3])}, x=var("x"), shape=i32s(0, -1)),
    case("reshape_zero_right_aligned", "reshape", {"x": (F16, [2, 50])}, x=var("x"), shape=i32s(1, 0, -1, 0)),
    case("reshape_count_mismatch", "reshape", {"x": (F16, [2, 3])}, x=var("x"), shape=i32s(4, 2)),
    case("reshape_two_minus_one", "reshape", {"x": (F16, [2, 3])}, x=var("x"), shape=i32s(-1, -1)),
    # transpose
    case("transpose_last_two", "transpose", {"x": (F16, [1, 12, 64, 256])}, x=var("x"), perm=i32s(0, 1, 3, 2)),
    case("transpose_negative", "transpose", {"x": (F16, [2, 3, 4])}, x=var("x"), perm=i32s(-1, 0, 1)),
    case("transpose_wrong_length", "transpose", {"x": (F16, [2, 3, 4])}, x=var("x"), perm=i32s(1, 0)),
    # slice_by_size
    case("slice_weights", "slice_by_size", {"x": (F16, [1, 256, 1, 192])}, x=var("x"), begin=i32s(0, 0, 0, 64), size=i32s(1, 256, 1, 128)),
    case("slice_to_end", "slice_by_size", {"x": (F16, [1, 256, 1, 192])}, x=var("x"), begin=i32s(0, 16, 0, 100), size=i32s(-1, -1, 1, -1)),
    case("slice_negative_begin", "slice_by_size", {"x": (F16, [4, 6])}, x=var("x"), begin=i32s(-2, 0), size=i32s(2, 3)),
    case("slice_wrong_length", "slice_by_size", {"x": (F16, [4, 6])}, x=var("x"), begin=i32s(0), size=i32s(1)),
    # concat
    case("concat_taps", "concat", {"a": (F16, [1, 64, 1, 8]), "b": (F16, [1, 32, 1, 8]), "c": (F16, [1, 16, 1, 8])},
         values={"tuple": [var("a"), var("b"), var("c")]}, axis=i32(1), interleave={"bool": False}),
    case("concat_last", "concat", {"a": (F16, [1, 2, 3, 4]), "b": (F16, [1, 2, 3, 1])}, values={"tuple": [var("a"), var("b")]}, axis=i32(-1)),
    case("concat_interleave", "concat", {"a": (F16, [3, 2]), "b": (F16, [3, 2])}, values={"tuple": [var("a"), var("b")]}, axis=i32(0), interleave={"bool": True}),
    case("concat_rank_mismatch", "concat", {"a": (F16, [3, 2]), "b": (F16, [3, 2, 1])}, values={"tuple": [var("a"), var("b")]}, axis=i32(0)),
    case("concat_dim_mismatch", "concat", {"a": (F16, [3, 2]), "b": (F16, [4, 3])}, values={"tuple": [var("a"), var("b")]}, axis=i32(0)),
    # split
    case("split_even", "split", {"x": (F16, [1, 8, 1, 4])}, x=var("x"), num_splits=i32(2), axis=i32(1)),
    case("split_sizes", "split", {"x": (F16, [4, 6])}, x=var("x"), split_sizes=i32s(1, 5), axis=i32(-1)),
    case("split_uneven", "split", {"x": (F16, [4, 6])}, x=var("x"), num_splits=i32(4), axis=i32(1)),
    # select
    case("select_broadcast", "select", {"c": ("bool", [2, 1]), "a": (F16, [1, 3]), "b": (F16, [2, 3])}, cond=var("c"), a=var("a"), b=var("b")),
    # cast
    case("cast_up", "cast", {"x": (F16, [1, 64, 1, 8])}, x=var("x"), dtype={"str": "fp32"}),
    case("cast_int8", "cast", {"x": ("fp32", [3])}, x=var("x"), dtype={"str": "int8"}),
    case("cast_unknown", "cast", {"x": (F16, [3])}, x=var("x"), dtype={"str": "int64"}),
    # conv
    case("conv_1x1", "conv", {"x": (F16, [1, 768, 1, 256])}, {"w": tensor(F16, [2048, 768, 1, 1])},
         x=var("x"), weight=var("w"), strides=i32s(1, 1), pad_type={"str": "valid"}, pad=i32s(0, 0, 0, 0), dilations=i32s(1, 1), groups=i32(1)),
    case("conv_same_stride2", "conv", {"x": (F16, [1, 8, 9, 10])}, {"w": tensor(F16, [4, 8, 3, 3])},
         x=var("x"), weight=var("w"), strides=i32s(2, 2), pad_type={"str": "same"}),
    case("conv_custom_pad_dilated", "conv", {"x": ("fp32", [2, 3, 10, 12])}, {"w": tensor("fp32", [6, 3, 3, 2])},
         x=var("x"), weight=var("w"), pad_type={"str": "custom"}, pad=i32s(1, 2, 0, 3), dilations=i32s(2, 3), strides=i32s(1, 2)),
    case("conv_valid_strided", "conv", {"x": (F16, [1, 4, 7, 7])}, {"w": tensor(F16, [2, 4, 3, 3])},
         x=var("x"), weight=var("w"), strides=i32s(2, 3)),
    case("conv_groups", "conv", {"x": (F16, [1, 16, 1, 8])}, {"w": tensor(F16, [32, 8, 1, 1])}, x=var("x"), weight=var("w"), groups=i32(2)),
    case("conv_bias", "conv", {"x": (F16, [1, 16, 1, 8])}, {"w": tensor(F16, [32, 16, 1, 1]), "b": tensor(F16, [32])}, x=var("x"), weight=var("w"), bias=var("b")),
    case("conv_group_mismatch", "conv", {"x": (F16, [1, 16, 1, 8])}, {"w": tensor(F16, [32, 16, 1, 1])}, x=var("x"), weight=var("w"), groups=i32(2)),
    case("conv_channel_mismatch", "conv", {"x": (F16, [1, 16, 1, 8])}, {"w": tensor(F16, [32, 12, 1, 1])}, x=var("x"), weight=var("w")),
    case("conv_1d_strided", "conv", {"x": (F16, [1, 4, 9])}, {"w": tensor(F16, [2, 4, 3])},
         x=var("x"), weight=var("w"), strides=i32s(2), pad_type={"str": "valid"}),
    case("conv_1d_custom_pad_dilated", "conv", {"x": ("fp32", [2, 3, 10])}, {"w": tensor("fp32", [6, 3, 2])},
         x=var("x"), weight=var("w"), pad_type={"str": "custom"}, pad=i32s(1, 2), dilations=i32s(3)),
    case("conv_1d_same", "conv", {"x": (F16, [1, 2, 7])}, {"w": tensor(F16, [4, 2, 3])},
         x=var("x"), weight=var("w"), strides=i32s(2), pad_type={"str": "same"}),
    case("conv_rank_mismatch", "conv", {"x": (F16, [1, 4, 9])}, {"w": tensor(F16, [2, 4, 1, 3])}, x=var("x"), weight=var("w")),
    # matmul
    case("matmul_scores", "matmul", {"q": (F16, [1, 12, 256, 64]), "k": (F16, [1, 12, 256, 64])},
         x=var("q"), y=var("k"), transpose_x={"bool": False}, transpose_y={"bool": True}),
    case("matmul_broadcast_batch", "matmul", {"x": (F16, [10, 4, 3]), "y": (F16, [5, 10, 3, 2])}, x=var("x"), y=var("y")),
    case("matmul_transpose_x", "matmul", {"x": ("fp32", [2, 3, 5]), "y": ("fp32", [2, 3, 7])}, x=var("x"), y=var("y"), transpose_x={"bool": True}),
    case("matmul_inner_mismatch", "matmul", {"x": (F16, [2, 3]), "y": (F16, [4, 5])}, x=var("x"), y=var("y")),
    case("matmul_transpose_rank1", "matmul", {"x": (F16, [3]), "y": (F16, [3, 5])}, x=var("x"), y=var("y"), transpose_x={"bool": True}),
    # constexpr_affine_dequantize
    case("cad_scalar", "constexpr_affine_dequantize",
         quantized_data=tensor("int8", [4, 8]), zero_point={"tensor": {"dtype": "int8", "shape": [], "fill": 0}},
         scale=tensor(F16, [], 0.125), axis=i32(0)),
    case("cad_vector", "constexpr_affine_dequantize",
         quantized_data=tensor("uint8", [4, 8]), zero_point=tensor("uint8", [8], 3),
         scale=tensor("fp32", [8], 0.5), axis=i32(1)),
    case("cad_vector_wrong_size", "constexpr_affine_dequantize",
         quantized_data=tensor("int8", [4, 8]), zero_point=tensor("int8", [], 0),
         scale=tensor(F16, [5], 0.5), axis=i32(1)),
    # quantize / dequantize
    case("quantize_int8", "quantize", {"x": (F16, [2, 3])}, input=var("x"), scale=tensor(F16, [], 0.1), output_dtype={"str": "int8"}),
    case("quantize_uint8_vector", "quantize", {"x": ("fp32", [2, 3])}, input=var("x"), scale=tensor("fp32", [3], 0.1),
         zero_point=tensor("uint8", [3], 128), axis=i32(1), output_dtype={"str": "uint8"}),
    case("quantize_zp_mismatch", "quantize", {"x": (F16, [2, 3])}, input=var("x"), scale=tensor(F16, [], 0.1),
         zero_point=tensor("uint8", [], 1), output_dtype={"str": "int8"}),
    case("dequantize_fp32", "dequantize", {"x": ("int8", [2, 3])}, input=var("x"), scale=tensor("fp32", [], 0.1)),
    case("dequantize_vector", "dequantize", {"x": ("uint8", [2, 3])}, input=var("x"), scale=tensor(F16, [2], 0.1),
         zero_point=tensor("uint8", [2], 7), axis=i32(0)),
    # scaled_dot_product_attention
    case("sdpa", "scaled_dot_product_attention", {"q": (F16, [1, 2, 4, 8]), "k": (F16, [1, 2, 6, 8]), "v": (F16, [1, 2, 6, 5])},
         query=var("q"), key=var("k"), value=var("v")),
    case("sdpa_mask", "scaled_dot_product_attention", {"q": (F16, [1, 2, 4, 8]), "k": (F16, [1, 2, 6, 8]), "v": (F16, [1, 2, 6, 5]), "m": (F16, [1, 1, 4, 6])},
         query=var("q"), key=var("k"), value=var("v"), attn_mask=var("m")),
    case("sdpa_embedding_mismatch", "scaled_dot_product_attention", {"q": (F16, [1, 2, 4, 8]), "k": (F16, [1, 2, 6, 7]), "v": (F16, [1, 2, 6, 5])},
         query=var("q"), key=var("k"), value=var("v")),
]


def np_tensor(spec):
    values = np.full(spec["shape"], spec["fill"], dtype=NP[spec["dtype"]])
    return values if spec["shape"] else NP[spec["dtype"]](spec["fill"])


def run(c):
    placeholders = {
        k: mb.placeholder(shape=tuple(s), dtype=MB[d]) for k, (d, s) in c["inputs"].items()
    }
    result = {}
    with Function(placeholders, opset_version=ct.target.iOS18) as func:
        env = dict(func.inputs)
        for k, spec in c["consts"].items():
            env[k] = mb.const(val=np_tensor(spec), name=k)

        def value(a):
            if "var" in a:
                return env[a["var"]]
            if "int32" in a:
                return np.int32(a["int32"])
            if "int32s" in a:
                return np.array(a["int32s"], dtype=np.int32)
            if "bool" in a:
                return a["bool"]
            if "str" in a:
                return a["str"]
            if "tensor" in a:
                return np_tensor(a["tensor"])
            if "tuple" in a:
                return tuple(value(x) for x in a["tuple"])
            raise ValueError(a)

        try:
            out = getattr(mb, c["op"])(**{k: value(a) for k, a in c["args"].items()})
            outs = out if isinstance(out, (list, tuple)) else [out]
            result["expect"] = [
                [types.builtin_to_string(o.dtype), [int(d) for d in o.shape]] for o in outs
            ]
        except Exception as e:  # noqa: BLE001 - any rejection is the reference answer
            result["expect"] = "error"
            result["reason"] = (str(e).splitlines() or [type(e).__name__])[0][:200]
    return result


def main():
    out = []
    for c in CASES:
        for d, s in c["inputs"].values():
            assert s, "scalar function inputs are not supported by this script"
        c = dict(c)
        c.update(run(c))
        out.append(c)
    with open(OUT, "w") as f:
        f.write('{"_generated_by": "scripts/mil_infer_cases.py (coremltools %s, opset iOS18)",\n' % ct.__version__)
        f.write(' "cases": [\n')
        f.write(",\n".join("  " + json.dumps(c) for c in out))
        f.write("\n]}\n")
    for c in out:
        print(c["id"], c["expect"], c.get("reason", ""))


if __name__ == "__main__":
    main()
