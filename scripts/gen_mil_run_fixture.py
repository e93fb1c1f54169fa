#!/usr/bin/env python3
"""Fixture for `anemone mil run` (tests/it/cli.rs): a package with a 1x1 conv
whose weight is a BLOBFILE constant written by coremltools' blob writer, an
input x.npy and NumPy's expected output y.npy. Run: python3 scripts/gen_mil_run_fixture.py"""
import os

import numpy as np
from coremltools.libmilstoragepython import _BlobStorageWriter

D = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "mil_run", "conv")
os.makedirs(os.path.join(D, "weights"), exist_ok=True)
rng = np.random.default_rng(3)
C_IN, C_OUT, S = 8, 4, 6
w = rng.standard_normal((C_OUT, C_IN, 1, 1)).astype(np.float16)
x = rng.standard_normal((1, C_IN, 1, S)).astype(np.float32)
writer = _BlobStorageWriter(os.path.join(D, "weights", "w.bin"), truncate_file=True)
offset = writer.write_fp16_data(w.ravel().view(np.uint16))
del writer
mil = f"""program(1.3)
[buildInfo = dict<string, string>({{{{"coremlc-component-MIL", "3510.2.1"}}, {{"coremlc-version", "3505.4.1"}}, {{"coremltools-component-milinternal", ""}}, {{"coremltools-version", "9.0"}}}})]
{{
    func main<ios18>(tensor<fp32, [1, {C_IN}, 1, {S}]> x) {{
        string to16 = const()[name = string("to16"), val = string("fp16")];
        tensor<fp16, [1, {C_IN}, 1, {S}]> xh = cast(dtype = to16, x = x)[name = string("xh")];
        tensor<fp16, [{C_OUT}, {C_IN}, 1, 1]> W = const()[name = string("W"), val = tensor<fp16, [{C_OUT}, {C_IN}, 1, 1]>(BLOBFILE(path = string("@model_path/weights/w.bin"), offset = uint64({offset})))];
        string pt = const()[name = string("pt"), val = string("valid")];
        tensor<int32, [2]> st = const()[name = string("st"), val = tensor<int32, [2]>([1, 1])];
        tensor<int32, [4]> pd = const()[name = string("pd"), val = tensor<int32, [4]>([0, 0, 0, 0])];
        tensor<int32, [2]> dl = const()[name = string("dl"), val = tensor<int32, [2]>([1, 1])];
        int32 gr = const()[name = string("gr"), val = int32(1)];
        tensor<fp16, [1, {C_OUT}, 1, {S}]> yh = conv(dilations = dl, groups = gr, pad = pd, pad_type = pt, strides = st, weight = W, x = xh)[name = string("yh")];
        string to32 = const()[name = string("to32"), val = string("fp32")];
        tensor<fp32, [1, {C_OUT}, 1, {S}]> y = cast(dtype = to32, x = yh)[name = string("y")];
    }} -> (y);
}}
"""
open(os.path.join(D, "model.mil"), "w").write(mil)
np.save(os.path.join(D, "x.npy"), x)
# fp32 CPU semantics: the input is used as given, the fp16 weight exactly.
np.save(os.path.join(D, "y.npy"), np.einsum("oi,bis->bos", w[:, :, 0, 0].astype(np.float64), x[:, :, 0, :].astype(np.float64))[:, :, None, :].astype(np.float32))
print("offset", offset)
