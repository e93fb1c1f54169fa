#!/usr/bin/env python3
"""RoPE inverse frequencies for every rope type anemone reads, for
tests/it/hf_io.rs (`rope_inv_freq_matches_transformers`).

Writes tests/fixtures/hf/rope/inv_freq.json: per case the head_dim, theta,
scaling parameters and `inv_freq` computed in float64 with NumPy from
transformers' formulas (`modeling_rope_utils`: default, linear,
`_compute_llama3_parameters`). Each case is also checked against
transformers' own `LlamaRotaryEmbedding.inv_freq` (float32, so to 1e-6
relative): the float64 numbers are the formula, not a transcription of it.

Run: /path/to/venv/bin/python scripts/gen_hf_rope_fixture.py
(needs numpy, torch, transformers; not used by CI)
"""
import json
import math
import os

import numpy as np
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.path.dirname(HERE), "tests", "fixtures", "hf", "rope", "inv_freq.json")

CASES = [
    dict(name="default 64", head_dim=64, theta=10000.0, scaling={"rope_type": "default"}),
    dict(name="default qwen3", head_dim=128, theta=1000000.0, scaling={"rope_type": "default"}),
    dict(name="linear llama-v4 fixture", head_dim=8, theta=500.0, scaling={"rope_type": "linear", "factor": 2.0}),
    dict(name="llama3 llama3-bf16 fixture", head_dim=16, theta=10000.0,
         scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}),
    dict(name="llama3 Llama-3.2-1B", head_dim=64, theta=500000.0,
         scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}),
    dict(name="llama3 Llama-3.1-8B", head_dim=128, theta=500000.0,
         scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}),
]


def inv_freq(head_dim, theta, scaling):
    base = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    kind = scaling["rope_type"]
    if kind == "default":
        return base
    if kind == "linear":
        return base / scaling["factor"]
    assert kind == "llama3"
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / base
    out = np.where(wavelen > low_wavelen, base / factor, base)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, out)


def transformers_inv_freq(head_dim, theta, scaling):
    config = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                         max_position_embeddings=4 * scaling.get("original_max_position_embeddings", 64),
                         rope_parameters=dict(scaling, rope_theta=theta))
    return LlamaRotaryEmbedding(config).inv_freq.double().numpy()


def main():
    cases = []
    for case in CASES:
        ours = inv_freq(case["head_dim"], case["theta"], case["scaling"])
        theirs = transformers_inv_freq(case["head_dim"], case["theta"], case["scaling"])
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)
        cases.append(dict(case, inv_freq=ours.tolist()))
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(dict(script="scripts/gen_hf_rope_fixture.py", cases=cases), f, indent=1)
    print(f"{OUT}: {len(cases)} cases")


if __name__ == "__main__":
    main()
