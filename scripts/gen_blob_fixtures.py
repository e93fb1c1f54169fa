"""Write the MILBlob v2 weight-file fixtures under tests/fixtures/blob/.

The oracle is coremltools' own blob storage (`_BlobStorageWriter` writes the
.bin files, `_BlobStorageReader` reads every blob back). Alongside the .bin
files, `fixtures.json` records for each blob the input array, what coremltools
read back and the record offset its writer returned (the offset a MIL
BLOBFILE must name). tests/it/blob.rs checks that anemone writes the same bytes
from the same inputs and reads the same values and offsets.

Run from the repository root (needs numpy and coremltools 9.0, works on Linux):
    python3 scripts/gen_blob_fixtures.py
"""

import json
import os
import sys

import numpy as np
import coremltools
from coremltools.libmilstoragepython import _BlobStorageReader, _BlobStorageWriter

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "blob")

# dtype name -> (numpy dtype of the writer's argument, writer method, reader method)
DTYPES = {
    "fp16": (np.float16, "write_fp16_data", "read_fp16_data"),
    "fp32": (np.float32, "write_float_data", "read_float_data"),
    "uint8": (np.uint8, "write_uint8_data", "read_uint8_data"),
    "int8": (np.int8, "write_int8_data", "read_int8_data"),
    "int4": (np.int8, "write_int4_data", "read_int4_data"),
    "uint1": (np.uint8, "write_uint1_data", "read_uint1_data"),
    "uint2": (np.uint8, "write_uint2_data", "read_uint2_data"),
    "uint3": (np.uint8, "write_uint3_data", "read_uint3_data"),
    "uint4": (np.uint8, "write_uint4_data", "read_uint4_data"),
    "uint6": (np.uint8, "write_uint6_data", "read_uint6_data"),
    "int16": (np.int16, "write_int16_data", "read_int16_data"),
    "uint16": (np.uint16, "write_uint16_data", "read_uint16_data"),
    "int32": (np.int32, "write_int32_data", "read_int32_data"),
    "uint32": (np.uint32, "write_uint32_data", "read_uint32_data"),
}

rng = np.random.default_rng(20240611)


def normal_f32(n, scale=1.0):
    return (rng.standard_normal(n) * scale).astype(np.float32)


def ints(dtype, low, high, n):
    return rng.integers(low, high, size=n, endpoint=True).astype(dtype)


# fp16 inputs are float32 arrays: anemone converts f32 -> fp16 itself, numpy's
# astype(float16) (round to nearest even) is the reference conversion.
FP16_EDGE = np.array(
    [
        0.0, -0.0, 1.0, -2.5, 65504.0, -65504.0,
        65519.99,  # just below the rounding boundary: 65504
        65520.0,  # tie between 65504 and 65536: rounds to inf
        1e6, -1e6, np.inf, -np.inf,
        1.0 + 2.0**-11,  # tie: rounds down to 1.0 (even)
        1.0 + 3 * 2.0**-11,  # tie: rounds up to 1 + 2^-9 (even)
        1.0 + 2.0**-11 + 2.0**-20,  # just above the tie: rounds up
        2.0**-14,  # smallest normal
        2.0**-24,  # smallest subnormal
        2.0**-25,  # tie between 0 and 2^-24: rounds to 0
        3 * 2.0**-26,  # above that tie: 2^-24
        1e-10, -1e-10, 0.1, -0.3333333, 3.14159265,
    ],
    dtype=np.float32,
)

FILES = {
    "fp16_len1.bin": [("fp16", np.array([0.1], dtype=np.float32))],
    "fp16_len7.bin": [("fp16", normal_f32(7))],
    "fp16_4x16.bin": [("fp16", normal_f32(64, 3.0))],
    "fp16_edge.bin": [("fp16", FP16_EDGE)],
    "fp32_len5.bin": [("fp32", np.array([1.0, -0.0, 3.4028235e38, 1e-45, 0.1], dtype=np.float32))],
    "int8_len9.bin": [("int8", np.array([-128, -1, 0, 1, 127, 5, -77, 64, 3], dtype=np.int8))],
    "uint8_len10.bin": [("uint8", np.array([0, 1, 2, 127, 128, 200, 254, 255, 7, 9], dtype=np.uint8))],
    "int4_len7.bin": [("int4", np.array([-8, -1, 0, 1, 7, 3, -5], dtype=np.int8))],
    # The first three blobs are the platform-notes example: records 64, 192, 384.
    "mixed.bin": [
        ("fp16", normal_f32(3)),
        ("fp16", normal_f32(40)),
        ("fp32", normal_f32(1)),
        ("int8", ints(np.int8, -128, 127, 5)),
        ("fp16", np.zeros(0, dtype=np.float32)),
        ("uint8", ints(np.uint8, 0, 255, 70)),
        ("int4", ints(np.int8, -8, 7, 4)),
        ("fp32", normal_f32(17, 100.0)),
        ("int4", ints(np.int8, -8, 7, 1)),
    ],
    # Read-only for anemone (its writer does not offer these dtypes).
    "subbyte.bin": [
        ("uint1", ints(np.uint8, 0, 1, 11)),
        ("uint2", ints(np.uint8, 0, 3, 5)),
        ("uint3", ints(np.uint8, 0, 7, 7)),
        ("uint4", ints(np.uint8, 0, 15, 9)),
        ("uint6", ints(np.uint8, 0, 63, 3)),
        ("int16", np.array([-32768, -1, 32767], dtype=np.int16)),
        ("uint16", np.array([0, 1, 65535], dtype=np.uint16)),
        ("int32", np.array([-(2**31), -7, 2**31 - 1], dtype=np.int32)),
        ("uint32", np.array([0, 123456, 2**32 - 1], dtype=np.uint32)),
    ],
}


def write_file(name, blobs):
    path = os.path.join(OUT_DIR, name)
    writer = _BlobStorageWriter(path, truncate_file=True)
    offsets = []
    for dtype, values in blobs:
        np_dtype, write, _ = DTYPES[dtype]
        arg = values.astype(np.float16).view(np.uint16) if dtype == "fp16" else values.astype(np_dtype)
        offsets.append(int(getattr(writer, write)(arg)))
    del writer  # flushes and closes the file

    reader = _BlobStorageReader(path)
    entries = []
    for (dtype, values), offset in zip(blobs, offsets):
        _, _, read = DTYPES[dtype]
        entry = {"dtype": dtype, "offset": offset}
        if len(values) == 0:
            # coremltools writes an empty blob (a record with size 0) but its
            # reader refuses it ("index out of bounds"); nothing to read back.
            decoded = values
            entry["note"] = "empty: coremltools' reader refuses it"
        else:
            decoded = getattr(reader, read)(offset)
        if dtype == "fp16":
            half = values.astype(np.float16)
            assert np.array_equal(decoded.view(np.uint16), half.view(np.uint16))
            entry["input_f32"] = [float(v) for v in values]
            entry["fp16_bits"] = [int(b) for b in half.view(np.uint16)]
            entry["decoded"] = [float(v) for v in half.astype(np.float32)]
        elif dtype == "fp32":
            assert np.array_equal(decoded.view(np.uint32), values.view(np.uint32))
            entry["input_f32"] = [float(v) for v in values]
            entry["decoded"] = [float(v) for v in decoded]
        else:
            assert np.array_equal(decoded.astype(np.int64), values.astype(np.int64))
            entry["input_int"] = [int(v) for v in values]
            entry["decoded"] = [int(v) for v in decoded]
        entries.append(entry)
    return {"size": os.path.getsize(path), "blobs": entries}


def main():
    np.seterr(over="ignore")  # fp16_edge overflows to inf on purpose
    os.makedirs(OUT_DIR, exist_ok=True)
    manifest = {
        "made_by": "scripts/gen_blob_fixtures.py",
        "oracle": "coremltools %s libmilstoragepython._BlobStorageWriter / _BlobStorageReader" % coremltools.__version__,
        "note": "json floats that are infinite are written as the strings \"inf\" / \"-inf\"",
        "files": {name: write_file(name, blobs) for name, blobs in FILES.items()},
    }
    text = json.dumps(manifest, indent=1, allow_nan=True)
    text = text.replace("-Infinity", '"-inf"').replace("Infinity", '"inf"')
    with open(os.path.join(OUT_DIR, "fixtures.json"), "w") as f:
        f.write(text + "\n")
    total = sum(os.path.getsize(os.path.join(OUT_DIR, n)) for n in os.listdir(OUT_DIR))
    print("wrote %d files, %d bytes total" % (len(FILES) + 1, total), file=sys.stderr)


if __name__ == "__main__":
    main()
