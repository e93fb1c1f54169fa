#!/usr/bin/env python3
"""NumPy reference for anemone's forward layer kernels (tests/it/kernels.rs).

Small GQA shape: dim 32, 4 query heads, 2 kv heads, head_dim 8, hidden 48, T 8.
Computes, in float64 from float32 inputs, what `attn_fwd`, `wo_fwd` and
`ffn_fwd` must output, in the kernels' channel-major (C, T) layout:

  attn_fwd: xn (C,T), wq (Qd,C), wk (KVd,C), wv (KVd,C) -> attn (Qd,T), q_rope, k_rope (KVd,T), v
  wo_fwd:   attn (Qd,T), wo (C,Qd)                       -> o (C,T)
  ffn_fwd:  x2n (C,T), w1 (F,C), w3 (F,C), w2 (C,F)       -> ffn (C,T), h1, h3, gate (F,T)

RoPE: llama2.c interleaved pairs, theta 10000; GQA: query head h reads kv head h // 2.
Writes tests/fixtures/kernels/<name>.npy (float32). Run: python3 scripts/ref_kernels.py
"""
import os

import numpy as np

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "kernels")
rng = np.random.default_rng(7)
C, H, KVH, HD, F, T = 32, 4, 2, 8, 48, 8
QD, KVD = H * HD, KVH * HD


def r(*shape, s=1.0):
    return (rng.standard_normal(shape) * s).astype(np.float32)


arrays = dict(xn=r(C, T), wq=r(QD, C, s=0.3), wk=r(KVD, C, s=0.3), wv=r(KVD, C, s=0.3), wo=r(C, QD, s=0.3),
              x2n=r(C, T), w1=r(F, C, s=0.3), w3=r(F, C, s=0.3), w2=r(C, F, s=0.3))
a = {k: v.astype(np.float64) for k, v in arrays.items()}


def rope(x):  # x (heads, T, HD)
    i = np.arange(HD // 2)
    ang = np.arange(T)[:, None] * (10000.0 ** (-2.0 * i / HD))[None, :]
    cos, sin = np.cos(ang), np.sin(ang)
    out = np.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
    out[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
    return out


q = (a["wq"] @ a["xn"]).reshape(H, HD, T).transpose(0, 2, 1)  # (H, T, HD)
k = (a["wk"] @ a["xn"]).reshape(KVH, HD, T).transpose(0, 2, 1)
v = (a["wv"] @ a["xn"]).reshape(KVH, HD, T).transpose(0, 2, 1)
qr, kr = rope(q), rope(k)
attn = np.empty_like(qr)
for h in range(H):
    kv = h // (H // KVH)
    s = qr[h] @ kr[kv].T / np.sqrt(HD)
    s = s + np.triu(np.full((T, T), -np.inf), 1)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    attn[h] = p @ v[kv]


def merge(x):  # (heads, T, HD) -> (heads*HD, T)
    return x.transpose(0, 2, 1).reshape(-1, T)


h1 = a["w1"] @ a["x2n"]
h3 = a["w3"] @ a["x2n"]
gate = h1 / (1 + np.exp(-h1)) * h3
outputs = dict(attn=merge(attn), q_rope=merge(qr), k_rope=merge(kr), v=merge(v),
               o=a["wo"] @ merge(attn), ffn=a["w2"] @ gate, h1=h1, h3=h3, gate=gate)
os.makedirs(OUT, exist_ok=True)
for name, value in {**arrays, **{f"out_{k}": v for k, v in outputs.items()}}.items():
    np.save(os.path.join(OUT, f"{name}.npy"), value.astype(np.float32))
print("wrote", len(arrays) + len(outputs), "arrays to", OUT)
