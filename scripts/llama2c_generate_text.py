#!/usr/bin/env python3
"""Greedy text from a llama2.c model + tokenizer.bin, independently of anemone:
the NumPy forward pass of scripts/llama2c_ref.py, and a tokenizer.bin reader
and decoder written from the llama2.c format (pieces, "\u2581" as space,
<0xNN> byte tokens, the leading space after BOS dropped).

Fixture for tests/it/generate.rs (`greedy_text_of_a_trained_model_matches_numpy`):
    anemone train --config small.json ...          # a model trained by anemone
    anemone export --model RUN --format llama2c --out tests/fixtures/generate/story_v0.bin
    cp RUN/tokenizer.bin tests/fixtures/generate/tokenizer.bin
    python3 scripts/llama2c_generate_text.py tests/fixtures/generate/story_v0.bin \
        tests/fixtures/generate/tokenizer.bin --out tests/fixtures/generate/expected.json
"""
import argparse
import json
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(__file__))
import llama2c_ref  # noqa: E402

BOS = 1


def read_tokenizer(path, vocab):
    raw = open(path, "rb").read()
    pos = 4  # max_token_length
    pieces = []
    for _ in range(vocab):
        _score, n = struct.unpack_from("<fi", raw, pos)
        pos += 8
        pieces.append(raw[pos:pos + n])
        pos += n
    return pieces


def decode(pieces, ids):
    out = bytearray()
    prev = BOS
    for i in ids:
        p = pieces[i]
        if len(p) == 6 and p.startswith(b"<0x") and p.endswith(b">"):
            out += bytes([int(p[3:5], 16)])
        else:
            s = p.replace("\u2581".encode(), b" ")
            if prev == BOS and s.startswith(b" "):
                s = s[1:]
            out += s
        prev = i
    return out.decode("utf-8")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("tokenizer")
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()
    m = llama2c_ref.read_v0(args.model)
    llama2c_ref.MAX_NEW_TOKENS = args.max_new_tokens
    new, gap = llama2c_ref.greedy(m, [BOS])
    text = decode(read_tokenizer(args.tokenizer, m["vocab"]), new)
    print(text)
    print(f"{len(new)} tokens, smallest top-2 logit gap {gap:.4f}")
    with open(args.out, "w") as f:
        json.dump({"made_by": "scripts/llama2c_generate_text.py", "prompt": [BOS], "ids": new,
                   "text": text, "min_top2_gap": float(gap)}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
