#!/usr/bin/env python3
"""Greedy text from a llama2.c model + tokenizer.bin as llama2.c's run.c prints
it, independently of anemone: the NumPy forward pass of scripts/llama2c_ref.py,
and a tokenizer.bin reader, encoder and decoder written from the llama2.c
format and run.c's loop:

- encode: BOS, a dummy-prefix space when the prompt is not empty, each UTF-8
  character its piece or its byte tokens (id = byte + 3), then repeatedly the
  adjacent pair whose concatenation is the best-scoring piece is merged;
- generate: positions 0 .. steps - 1 (steps capped at seq_len); a prompt token
  is forced while one is left, then the argmax is taken; a BOS (1) ends the
  text (run.c's "data-dependent terminating condition: the BOS token delimits
  sequences"), nothing is printed for it;
- print: each token's piece, the leading space dropped after BOS, "<0xNN>"
  pieces as their byte, and single-byte pieces that are neither printable
  nor whitespace skipped (run.c's safe_printf); a newline at the end.

Fixtures for tests/it/generate.rs:
    # greedy_text_of_a_trained_model_matches_numpy (the ids from BOS alone):
    python3 scripts/llama2c_generate_text.py tests/fixtures/generate/story_v0.bin \
        tests/fixtures/generate/tokenizer.bin --steps 48 --out tests/fixtures/generate/expected.json
    # generation_stops_where_run_c_stops (several prompts, to the end of a story):
    python3 scripts/llama2c_generate_text.py tests/fixtures/generate/stops/stops_v0.bin \
        tests/fixtures/generate/stops/tokenizer.bin --steps 256 --prompt "" \
        --prompt "The end" --prompt "Tom and" --out tests/fixtures/generate/stops/expected.json
The stops model: the main job's corpus and tokenizer (`anemone train
--corpus-mb 1`), then `anemone train --config m.json` (dim 48, 2 layers,
heads 4/2, hidden 128, seq_len 256; 600 steps of 8 x 128, lr 3e-3) and
`anemone export --format llama2c`.
"""
import argparse
import json
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import llama2c_ref  # noqa: E402

BOS = 1


def read_tokenizer(path, vocab):
    raw = open(path, "rb").read()
    pos = 4  # max_token_length
    pieces, scores = [], []
    for _ in range(vocab):
        score, n = struct.unpack_from("<fi", raw, pos)
        pos += 8
        pieces.append(raw[pos:pos + n])
        scores.append(score)
        pos += n
    return pieces, scores


def encode(pieces, scores, text):
    """run.c's encode(text, bos=1, eos=0)."""
    index = {}
    for i, p in enumerate(pieces):
        index.setdefault(p, i)
    ids = [BOS]
    symbols = []
    if text:
        symbols.append(index[b" "])
    for ch in text:
        b = ch.encode("utf-8")
        if b in index:
            symbols.append(index[b])
        else:
            symbols.extend(x + 3 for x in b)
    while True:
        best, best_i, best_id = -1e10, -1, -1
        for i in range(len(symbols) - 1):
            merged = index.get(pieces[symbols[i]] + pieces[symbols[i + 1]])
            if merged is not None and scores[merged] > best:
                best, best_i, best_id = scores[merged], i, merged
        if best_i < 0:
            break
        symbols[best_i:best_i + 2] = [best_id]
    return ids + symbols


def piece_bytes(pieces, prev, token):
    """run.c's decode(prev, token) followed by safe_printf's filter."""
    p = pieces[token]
    if prev == BOS and p.startswith(b" "):
        p = p[1:]
    if len(p) == 6 and p.startswith(b"<0x") and p.endswith(b">"):
        p = bytes([int(p[3:5], 16)])
    if len(p) == 1 and not (32 <= p[0] < 127 or p[0] in b" \t\n\v\f\r"):
        return b""
    return p


def run_c(m, pieces, scores, prompt, steps):
    """The ids generated after the prompt and the bytes run.c prints."""
    tokens = encode(pieces, scores, prompt)
    steps = min(steps, m["seq_len"]) if steps > 0 else m["seq_len"]
    out, new, gaps, stopped = bytearray(), [], [], False
    context, token = [tokens[0]], tokens[0]
    for pos in range(steps):
        if pos < len(tokens) - 1:
            nxt = tokens[pos + 1]
        else:
            logits = llama2c_ref.forward(m, context)[-1]
            top2 = np.sort(logits)[-2:]
            gaps.append(float(top2[1] - top2[0]))
            nxt = int(np.argmax(logits))
        if nxt == BOS:
            stopped = True
            break
        if pos >= len(tokens) - 1:
            new.append(nxt)
        out += piece_bytes(pieces, token, nxt)
        context.append(nxt)
        token = nxt
    out += b"\n"
    return new, bytes(out), min(gaps, default=float("inf")), stopped


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("tokenizer")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=48, help="run.c's -n")
    ap.add_argument("--prompt", action="append", help="run.c's -i (repeat for several cases)")
    args = ap.parse_args()
    m = llama2c_ref.read_v0(args.model)
    pieces, scores = read_tokenizer(args.tokenizer, m["vocab"])
    if args.prompt is None:
        # One case from BOS alone, in the original fixture's fields.
        new, text, gap, _ = run_c(m, pieces, scores, "", args.steps)
        doc = {"made_by": "scripts/llama2c_generate_text.py", "prompt": [BOS], "ids": new,
               "text": text[:-1].decode("utf-8"), "min_top2_gap": gap}
    else:
        cases = []
        for prompt in args.prompt:
            new, text, gap, stopped = run_c(m, pieces, scores, prompt, args.steps)
            print(f"{prompt!r}: {len(new)} tokens, ended by {'a BOS' if stopped else 'the steps'}, "
                  f"smallest top-2 gap {gap:.4f}")
            cases.append({"prompt": prompt, "steps": args.steps, "ids": new, "stops_at_bos": stopped,
                          "stdout": text.decode("utf-8"), "min_top2_gap": gap})
        doc = {"made_by": "scripts/llama2c_generate_text.py", "cases": cases}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
