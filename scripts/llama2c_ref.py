#!/usr/bin/env python3
"""Independent NumPy reference for llama2.c checkpoints: reads a legacy
("version 0") llama2.c model file and runs a float64 Llama forward pass over
whole sequences (no KV cache), written from the format description in
docs/platform-notes.md ("llama2.c formats"), not from anemone's Rust code.

It writes a JSON file with the logits at every position of a fixed prompt
and the greedy (argmax) continuation, which tests/it/llama2c.rs and
tests/it/generate.rs compare against anemone's reader and decoder.

Regenerate the fixture (the model file is written by anemone itself):
    cargo test --test it llama2c::regenerate_fixture -- --ignored
    python3 scripts/llama2c_ref.py tests/fixtures/llama2c/tiny_v0.bin \
        --out tests/fixtures/llama2c/tiny_v0.expected.json
"""
import argparse
import json
import struct

import numpy as np

PROMPT = [1, 300, 17, 45, 200, 511, 3, 99, 250, 128, 64, 7]
MAX_NEW_TOKENS = 64
EOS = 2
EPS = 1e-5
THETA = 10000.0


def read_v0(path):
    raw = open(path, "rb").read()
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack("<7i", raw[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    head = dim // n_heads
    kv = n_kv_heads * head
    floats = np.frombuffer(raw, dtype="<f4", offset=28).astype(np.float64)
    cursor = [0]

    def take(*shape):
        n = int(np.prod(shape))
        out = floats[cursor[0]:cursor[0] + n].reshape(shape)
        cursor[0] += n
        return out

    m = dict(dim=dim, hidden=hidden, n_layers=n_layers, n_heads=n_heads,
             n_kv_heads=n_kv_heads, vocab=vocab, seq_len=seq_len, head=head)
    m["emb"] = take(vocab, dim)
    m["rms_att"] = take(n_layers, dim)
    m["wq"] = take(n_layers, dim, dim)
    m["wk"] = take(n_layers, kv, dim)
    m["wv"] = take(n_layers, kv, dim)
    m["wo"] = take(n_layers, dim, dim)
    m["rms_ffn"] = take(n_layers, dim)
    m["w1"] = take(n_layers, hidden, dim)
    m["w2"] = take(n_layers, dim, hidden)
    m["w3"] = take(n_layers, hidden, dim)
    m["rms_final"] = take(dim)
    take(seq_len, head // 2)  # freq_cis_real (unused)
    take(seq_len, head // 2)  # freq_cis_imag (unused)
    m["wcls"] = m["emb"] if shared else take(vocab, dim)
    assert cursor[0] == floats.size, f"{floats.size - cursor[0]} floats left over"
    return m


def rmsnorm(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * w


def rotate(x, head):
    """x: (T, n, head). Pairs (2i, 2i+1) as complex numbers times e^{i pos f_i}."""
    t = x.shape[0]
    freqs = THETA ** (-np.arange(0, head, 2) / head)          # (head/2)
    angles = np.arange(t)[:, None] * freqs[None, :]            # (T, head/2)
    z = x[..., 0::2] + 1j * x[..., 1::2]
    z = z * np.exp(1j * angles)[:, None, :]
    out = np.empty_like(x)
    out[..., 0::2] = z.real
    out[..., 1::2] = z.imag
    return out


def forward(m, tokens):
    """Logits (T, V) for every position of `tokens`, causal attention."""
    t, hd = len(tokens), m["head"]
    x = m["emb"][tokens]                                        # (T, C)
    mask = np.triu(np.full((t, t), -np.inf), k=1)
    rep = m["n_heads"] // m["n_kv_heads"]
    for l in range(m["n_layers"]):
        xn = rmsnorm(x, m["rms_att"][l])
        q = rotate((xn @ m["wq"][l].T).reshape(t, m["n_heads"], hd), hd)
        k = rotate((xn @ m["wk"][l].T).reshape(t, m["n_kv_heads"], hd), hd)
        v = (xn @ m["wv"][l].T).reshape(t, m["n_kv_heads"], hd)
        k = np.repeat(k, rep, axis=1)                           # query head h -> kv head h // rep
        v = np.repeat(v, rep, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        att = np.einsum("hts,shd->thd", scores, v).reshape(t, -1)
        x = x + att @ m["wo"][l].T
        xn = rmsnorm(x, m["rms_ffn"][l])
        a = xn @ m["w1"][l].T
        g = a / (1 + np.exp(-a)) * (xn @ m["w3"][l].T)
        x = x + g @ m["w2"][l].T
    return rmsnorm(x, m["rms_final"]) @ m["wcls"].T


def greedy(m, prompt):
    tokens, new, min_gap = list(prompt), [], np.inf
    while len(new) < MAX_NEW_TOKENS and len(tokens) <= m["seq_len"]:
        logits = forward(m, tokens)[-1]
        top2 = np.sort(logits)[-2:]
        min_gap = min(min_gap, top2[1] - top2[0])
        nxt = int(np.argmax(logits))
        if nxt == EOS:
            break
        new.append(nxt)
        tokens.append(nxt)
    return new, min_gap


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    m = read_v0(args.model)
    logits = forward(m, PROMPT)
    new, min_gap = greedy(m, PROMPT)
    print(f"{args.model}: dim {m['dim']} layers {m['n_layers']} vocab {m['vocab']}; "
          f"logit std {logits.std():.3f}; greedy {len(new)} tokens, smallest top-2 gap {min_gap:.4f}")
    doc = {
        "made_by": "scripts/llama2c_ref.py (NumPy float64, from the llama2.c format spec)",
        "model": args.model.split("/")[-1],
        "prompt": PROMPT,
        "max_new_tokens": MAX_NEW_TOKENS,
        "logits": [[float(f"{v:.9g}") for v in row] for row in logits],
        "greedy": new,
        "greedy_min_top2_gap": float(min_gap),
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
