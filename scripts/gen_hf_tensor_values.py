#!/usr/bin/env python3
"""What Python's `safetensors` reads from each checkpoint under
tests/fixtures/hf/, for tests/it/hf_io.rs (`tensors_match_python_safetensors`).

Writes tests/fixtures/hf/tensor-values.json: per model directory, per tensor
(sharded checkpoints through model.safetensors.index.json) its stored dtype,
shape, first 8 values as float32 and an FNV-1a 64 digest of all its values as
little-endian float32 bytes (bf16 and fp16 widen to float32 exactly).

Run: /path/to/venv/bin/python scripts/gen_hf_tensor_values.py
(needs safetensors, torch; not used by CI)
"""
import json
import os

import torch
from safetensors import safe_open

HERE = os.path.dirname(os.path.abspath(__file__))
HF = os.path.join(os.path.dirname(HERE), "tests", "fixtures", "hf")
MODELS = ["llama", "llama-v4", "llama3-bf16", "qwen2", "qwen3", "mistral", "llama-sharded"]
FIRST = 8


def fnv1a64(data):
    h = 0xcbf29ce484222325
    for byte in data:
        h ^= byte
        h = (h * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def files(d):
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return sorted(set(weight_map.values()))
    return ["model.safetensors"]


def main():
    out = dict(script="scripts/gen_hf_tensor_values.py", first=FIRST,
               digest_rule="FNV-1a 64 over the tensor's values as little-endian float32 bytes", models={})
    for model in MODELS:
        d = os.path.join(HF, model)
        tensors = {}
        for name in files(d):
            with safe_open(os.path.join(d, name), framework="pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    flat = t.to(torch.float32).reshape(-1)
                    tensors[key] = dict(file=name, dtype=str(t.dtype).removeprefix("torch."),
                                        shape=list(t.shape), first=flat[:FIRST].tolist(),
                                        digest=format(fnv1a64(flat.numpy().astype("<f4").tobytes()), "016x"))
        out["models"][model] = dict(sorted(tensors.items()))
    path = os.path.join(HF, "tensor-values.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(path, {m: len(t) for m, t in out["models"].items()})


if __name__ == "__main__":
    main()
