#!/usr/bin/env python3
"""Reference fixtures for anemone's tokenizer, made with the `sentencepiece` package.

Writes under tests/fixtures/tokenizer/:
  tinyshakespeare-llama2.ids  sp.encode(line) (no BOS/EOS) with the Llama-2 model for
                              every line of tinyshakespeare.txt split on "\\n"; one
                              line of space-separated ids per text line, after a
                              '#' header naming this script and the input's sha256.
  llama2-cases.json           hand-picked strings (accents, emoji, CJK, spaces) with
                              their Llama-2 ids and sp.decode of those ids.
  tiny.model / tiny.bin       a 400-piece BPE model trained here on the first 4000
                              lines of tinyshakespeare.txt with Llama-2's options
                              (byte fallback, identity normalizer), and its
                              llama2.c-format export (as llama2.c's tokenizer.py does:
                              "▁" -> " ", BOS "\\n<s>\\n", EOS "\\n</s>\\n").
  tiny-cases.json             the same strings plus some lines, encoded with tiny.model.
The committed tiny files let the encode test run without the Llama-2 files.

Usage: python3 scripts/gen_tokenizer_fixtures.py [DATA_DIR]   (default /work/shared/data)
"""

import hashlib
import json
import os
import struct
import sys

import sentencepiece as spm

DATA = sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data"
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "tokenizer")
HEADER = "made by scripts/gen_tokenizer_fixtures.py with sentencepiece " + spm.__version__

CASES = [
    "",
    "Hello world",
    " leading space",
    "two  spaces and   three",
    "trailing space ",
    "   ",
    "Café naïve résumé déjà vu",
    "emoji: 🦀🚀 and 👩‍👩‍👧 family",
    "中文字符 and 日本語",
    "tab\there",
    "numbers 1234567890 and 3.14159",
    "Zürich, Ærø, Ødegaard, ß",
    "<s> </s> <unk> <0x41> look like special pieces",
    "ALL CAPS SHOUTING!!!",
    "First Citizen:",
]


def export_llama2c(model_path, out_path):
    """Write a llama2.c tokenizer.bin for a sentencepiece model (own code; same format
    as llama2.c's tokenizer.py export)."""
    sp = spm.SentencePieceProcessor(model_file=model_path)
    tokens, scores = [], []
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        if i == sp.bos_id():
            piece = "\n<s>\n"
        elif i == sp.eos_id():
            piece = "\n</s>\n"
        tokens.append(piece.replace("\u2581", " ").encode("utf-8"))
        scores.append(sp.get_score(i))
    with open(out_path, "wb") as f:
        f.write(struct.pack("<I", max(len(t) for t in tokens)))
        for t, s in zip(tokens, scores):
            f.write(struct.pack("<fi", s, len(t)))
            f.write(t)


def write_cases(path, sp, texts, model_name):
    """JSON with one case per line: {"text", "ids" = sp.encode(text), "decoded" = sp.decode(ids)}."""
    head = {"made_by": HEADER, "model": model_name, "rule": "ids = sp.encode(text), no BOS/EOS; decoded = sp.decode(ids)"}
    cases = [json.dumps({"text": t, "ids": sp.encode(t), "decoded": sp.decode(sp.encode(t))}, ensure_ascii=False) for t in texts]
    with open(path, "w") as f:
        f.write(json.dumps(head, ensure_ascii=False)[:-1] + ',\n "cases": [\n  ' + ",\n  ".join(cases) + "\n ]\n}\n")


def main():
    os.makedirs(OUT, exist_ok=True)
    text_path = os.path.join(DATA, "tinyshakespeare.txt")
    raw = open(text_path, "rb").read()
    lines = raw.decode("utf-8").split("\n")

    llama = spm.SentencePieceProcessor(model_file=os.path.join(DATA, "llama2-tokenizer.model"))
    with open(os.path.join(OUT, "tinyshakespeare-llama2.ids"), "w") as f:
        f.write(f"# {HEADER}\n")
        f.write(f"# input tinyshakespeare.txt sha256 {hashlib.sha256(raw).hexdigest()} lines {len(lines)}\n")
        f.write("# rule: one line per text line (split on \\n): sp.encode(line), no BOS/EOS\n")
        for line in lines:
            f.write(" ".join(map(str, llama.encode(line))) + "\n")
    write_cases(os.path.join(OUT, "llama2-cases.json"), llama, CASES, "llama2-tokenizer.model")

    train_lines = [l for l in lines[:4000] if l]
    prefix = os.path.join(OUT, "tiny")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(train_lines),
        model_prefix=prefix,
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        num_threads=1,
        minloglevel=2,
    )
    os.remove(prefix + ".vocab")
    export_llama2c(prefix + ".model", prefix + ".bin")
    tiny = spm.SentencePieceProcessor(model_file=prefix + ".model")
    tiny_texts = CASES + lines[4000:4100]
    write_cases(os.path.join(OUT, "tiny-cases.json"), tiny, tiny_texts, "tiny.model")


if __name__ == "__main__":
    main()
