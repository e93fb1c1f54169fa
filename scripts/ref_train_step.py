#!/usr/bin/env python3
"""Reference training state for anemone's engine test (tests/it/train_ref.rs).

An independent PyTorch implementation of the llama2.c model (RMSNorm, RoPE on
interleaved pairs, GQA with query head h reading kv head h // (H/KVH), SwiGLU,
tied classifier), computed in float64. Writes, into tests/fixtures/train/:

  meta.json      config and optimizer hyper-parameters
  weights.npy    float32 flat parameters in anemone's layout (see src/model/weights.rs)
  inputs.npy     int32 (B, T) input ids;  targets.npy int32 (B, T)
  logits.npy     float32 (B, T, V)
  loss.npy       float64 (1,) mean cross-entropy
  grads.npy      float32 flat gradient of the mean loss, same layout as weights
  losses.npy     float64 (10,) losses before each of 10 AdamW steps

Run: python3 scripts/ref_train_step.py   (needs torch and numpy; not used by CI)
"""
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "train")
torch.manual_seed(1234)
torch.set_default_dtype(torch.float64)

cfg = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160, vocab_size=256, seq_len=32)
B, T = 2, 32
EPS, THETA = 1e-5, 10000.0
LR, BETAS, ADAM_EPS, WD = 1e-3, (0.9, 0.95), 1e-8, 0.1
D, L, H, KVH, FF, V = (cfg[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size"))
HD = D // H


def init(*shape, std=0.02):
    return (torch.randn(*shape) * std).requires_grad_()


params = {"embedding": init(V, D, std=0.2)}
for l in range(L):
    params[f"{l}.rms_att"] = (1.0 + 0.1 * torch.randn(D)).requires_grad_()
    params[f"{l}.wq"] = init(H * HD, D, std=0.15)
    params[f"{l}.wk"] = init(KVH * HD, D, std=0.15)
    params[f"{l}.wv"] = init(KVH * HD, D, std=0.15)
    params[f"{l}.wo"] = init(D, H * HD, std=0.1)
    params[f"{l}.rms_ffn"] = (1.0 + 0.1 * torch.randn(D)).requires_grad_()
    params[f"{l}.w1"] = init(FF, D, std=0.15)
    params[f"{l}.w2"] = init(D, FF, std=0.1)
    params[f"{l}.w3"] = init(FF, D, std=0.15)
params["rms_final"] = (1.0 + 0.1 * torch.randn(D)).requires_grad_()
ORDER = ["embedding"] + [f"{l}.{n}" for l in range(L) for n in
                         ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3")] + ["rms_final"]


def rmsnorm(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def rope(x):  # x (B, T, heads, HD), interleaved pairs
    i = torch.arange(HD // 2, dtype=torch.float64)
    freq = THETA ** (-2.0 * i / HD)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * freq[None, :]  # (T, HD/2)
    cos, sin = torch.cos(ang)[None, :, None, :], torch.sin(ang)[None, :, None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return out.flatten(-2)


def forward(p, tokens):
    x = p["embedding"][tokens]  # (B, T, D)
    mask = torch.full((T, T), float("-inf")).triu(1)
    for l in range(L):
        xn = rmsnorm(x, p[f"{l}.rms_att"])
        q = (xn @ p[f"{l}.wq"].T).view(B, T, H, HD)
        k = (xn @ p[f"{l}.wk"].T).view(B, T, KVH, HD)
        v = (xn @ p[f"{l}.wv"].T).view(B, T, KVH, HD)
        q, k = rope(q), rope(k)
        rep = H // KVH
        k = k.repeat_interleave(rep, dim=2)  # head h -> kv head h // rep
        v = v.repeat_interleave(rep, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, HD)
        s = q @ k.transpose(-1, -2) / math.sqrt(HD) + mask
        a = torch.softmax(s, dim=-1) @ v
        a = a.transpose(1, 2).reshape(B, T, H * HD)
        x = x + a @ p[f"{l}.wo"].T
        x2n = rmsnorm(x, p[f"{l}.rms_ffn"])
        g = F.silu(x2n @ p[f"{l}.w1"].T) * (x2n @ p[f"{l}.w3"].T)
        x = x + g @ p[f"{l}.w2"].T
    xf = rmsnorm(x, p["rms_final"])
    return xf @ p["embedding"].T


def flat(tensors):
    return np.concatenate([tensors[n].detach().numpy().ravel() for n in ORDER]).astype(np.float32)


tokens = torch.randint(0, V, (B, T + 1))
inputs, targets = tokens[:, :-1], tokens[:, 1:]
os.makedirs(OUT, exist_ok=True)
# The float32 weights are what anemone loads: compute the reference from exactly those.
with torch.no_grad():
    for n in ORDER:
        params[n].copy_(params[n].float().double())
np.save(os.path.join(OUT, "weights.npy"), flat(params))
np.save(os.path.join(OUT, "inputs.npy"), inputs.numpy().astype(np.int32))
np.save(os.path.join(OUT, "targets.npy"), targets.numpy().astype(np.int32))

logits = forward(params, inputs)
loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
loss.backward()
np.save(os.path.join(OUT, "logits.npy"), logits.detach().numpy().astype(np.float32))
np.save(os.path.join(OUT, "loss.npy"), np.array([loss.item()]))
np.save(os.path.join(OUT, "grads.npy"), flat({n: params[n].grad for n in ORDER}))

# 10 AdamW steps, no decay on norm weights, constant LR, no clipping.
for prm in params.values():
    prm.grad = None
decay = [params[n] for n in ORDER if params[n].dim() == 2]
no_decay = [params[n] for n in ORDER if params[n].dim() == 1]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                        lr=LR, betas=BETAS, eps=ADAM_EPS)
losses = []
for step in range(10):
    opt.zero_grad()
    l = F.cross_entropy(forward(params, inputs).reshape(-1, V), targets.reshape(-1))
    losses.append(l.item())
    l.backward()
    opt.step()
np.save(os.path.join(OUT, "losses.npy"), np.array(losses))
with open(os.path.join(OUT, "meta.json"), "w") as f:
    json.dump(dict(config=cfg, batch=B, seq=T, norm_eps=EPS, rope_theta=THETA, lr=LR, beta1=BETAS[0],
                   beta2=BETAS[1], eps=ADAM_EPS, weight_decay=WD, script="scripts/ref_train_step.py"), f, indent=1)
print("loss", loss.item(), "losses", [round(x, 6) for x in losses])
