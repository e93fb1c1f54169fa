#!/usr/bin/env python3
"""PyTorch reference for anemone's attention kernels at a window that is not a
power of two (tests/it/kernels.rs): T = 48, whose ANE-bound kernels run their
softmax over 64 keys, 16 of them padding (rule ANE024).

Same GQA shape as scripts/ref_kernels.py: dim 32, 4 query heads, 2 kv heads,
head_dim 8; llama2.c interleaved RoPE, theta 10000; query head h reads kv head
h // 2. In float64 from float32 inputs, in the kernels' channel-major (C, T)
layout:

  attn_fwd: xn (C,T), wq (Qd,C), wk (KVd,C), wv (KVd,C)
            -> out_attn (Qd,T), out_q_rope (Qd,T), out_k_rope (KVd,T), out_v (KVd,T)
  attn_bwd: q_rope = out_q_rope, k_rope = out_k_rope, v = out_v, dattn (Qd,T)
            -> out_dq (Qd,T), out_dk (KVd,T) (gradients of the pre-RoPE q, k), out_dv (KVd,T)

the backward by autograd of <dattn, attn>. Writes
tests/fixtures/attention_t48/<name>.npy (float32).
Run: /path/to/venv/bin/python scripts/ref_attention_window.py
"""
import os

import numpy as np
import torch

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "attention_t48")
rng = np.random.default_rng(48)
C, H, KVH, HD, T = 32, 4, 2, 8, 48
QD, KVD = H * HD, KVH * HD


def r(*shape, s=1.0):
    return (rng.standard_normal(shape) * s).astype(np.float32)


arrays = dict(xn=r(C, T), wq=r(QD, C, s=0.3), wk=r(KVD, C, s=0.3), wv=r(KVD, C, s=0.3), dattn=r(QD, T))
a = {k: torch.tensor(v, dtype=torch.float64) for k, v in arrays.items()}

i = torch.arange(HD // 2, dtype=torch.float64)
angle = torch.arange(T, dtype=torch.float64)[:, None] * (10000.0 ** (-2.0 * i / HD))[None, :]
cos, sin = torch.cos(angle), torch.sin(angle)


def rope(x):  # (heads, T, HD), interleaved pairs
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).reshape(x.shape)


def heads(x, n):  # (n*HD, T) -> (n, T, HD)
    return x.reshape(n, HD, T).transpose(1, 2)


def merge(x):  # (n, T, HD) -> (n*HD, T)
    return x.transpose(1, 2).reshape(-1, T)


def attention(q_rope, k_rope, v):  # (H, T, HD), (KVH, T, HD), (KVH, T, HD)
    group = H // KVH
    k = k_rope.repeat_interleave(group, dim=0)
    vv = v.repeat_interleave(group, dim=0)
    scores = q_rope @ k.transpose(1, 2) / HD ** 0.5
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ vv


# Forward from the projections.
q = heads(a["wq"] @ a["xn"], H)
k = heads(a["wk"] @ a["xn"], KVH)
v = heads(a["wv"] @ a["xn"], KVH)
q_rope, k_rope = rope(q), rope(k)
outputs = dict(attn=merge(attention(q_rope, k_rope, v)), q_rope=merge(q_rope), k_rope=merge(k_rope), v=merge(v))

# Backward from the saved q_rope, k_rope, v (as float32, what the kernel reads):
# gradients of the pre-RoPE q, k (RoPE is a rotation: q = rope^-1(q_rope)) and of v.
def unrope(x):
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos + odd * sin, -even * sin + odd * cos), dim=-1).reshape(x.shape)


saved = {n: torch.tensor(outputs[n].numpy().astype(np.float32), dtype=torch.float64) for n in ("q_rope", "k_rope", "v")}
q_pre = unrope(heads(saved["q_rope"], H)).requires_grad_()
k_pre = unrope(heads(saved["k_rope"], KVH)).requires_grad_()
v_leaf = heads(saved["v"], KVH).requires_grad_()
out = attention(rope(q_pre), rope(k_pre), v_leaf)
(merge(out) * a["dattn"]).sum().backward()
outputs.update(dq=merge(q_pre.grad), dk=merge(k_pre.grad), dv=merge(v_leaf.grad))

os.makedirs(OUT, exist_ok=True)
named = {**arrays, **{f"out_{k}": v.detach().numpy() for k, v in outputs.items()}}
for name, value in named.items():
    np.save(os.path.join(OUT, f"{name}.npy"), np.asarray(value, dtype=np.float32))
print("wrote", len(named), "arrays to", OUT)
