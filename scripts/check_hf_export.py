#!/usr/bin/env python3
"""Load a Hugging Face model directory written by `anemone export --format hf`
with transformers and compute its loss, the independent check that an export
is the model anemone trained.

Two uses:

  check_hf_export.py EXPORT_DIR --reference REF.safetensors [--expect LOSS]
      Load EXPORT_DIR with AutoModelForCausalLM.from_pretrained (float64),
      take `eval_tokens` of REF.safetensors (a fixture's reference file) and
      print `loss X`: the mean over consecutive windows of --seq tokens of
      PyTorch's mean cross-entropy, what `anemone eval --seq N` computes.
      With --expect, exit 1 unless X is within 1e-5 relative of LOSS.

  check_hf_export.py --make-fixture --anemone target/debug/anemone
      For every architecture fixture of tests/fixtures/hf: write its
      eval_tokens as an anemone token file, fine-tune the fixture with
      `anemone train --init` for a few steps on it (TRAIN_FLAGS, CPU, fp32),
      export the run with `anemone export --format hf`, and record both
      transformers' loss of the export and `anemone eval`'s in
      tests/fixtures/hf/export-losses.json. tests/it/hf_cli.rs repeats the
      same commands and checks anemone's loss against transformers'.

Needs torch, transformers (5.x), safetensors and numpy; not used by CI.
"""
import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")
MODELS = ["llama", "llama-v4", "llama3-bf16", "qwen2", "qwen3", "mistral"]
SEQ = 16
# The fine-tuning the fixture records; tests/it/hf_cli.rs runs the same.
TRAIN_FLAGS = ["--steps", "4", "--batch", "2", "--seq", str(SEQ), "--lr", "1e-2",
               "--warmup", "0", "--backend", "cpu", "--seed", "7"]


def transformers_loss(model_dir, tokens, seq=SEQ):
    """Mean over consecutive windows of seq tokens of the mean cross-entropy."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    model.eval()
    tokens = torch.tensor(tokens, dtype=torch.long)
    windows = (len(tokens) - 1) // seq
    losses = []
    with torch.no_grad():
        for w in range(windows):
            x = tokens[w * seq: w * seq + seq + 1]
            logits = model(input_ids=x[None, :-1]).logits
            losses.append(F.cross_entropy(logits[0], x[1:]).item())
    return sum(losses) / len(losses)


def write_token_file(path, ids, vocab):
    """An anemone token file: the 64-byte ANEMTOK header, then u16 ids."""
    header = b"ANEMTOK\0" + struct.pack("<IIIQ", 1, vocab, 2, len(ids))
    header += b"\0" * (64 - len(header))
    with open(path, "wb") as f:
        f.write(header + np.asarray(ids, dtype="<u2").tobytes())


def anemone_loss(anemone, model, tokens_path):
    out = subprocess.run([anemone, "eval", "--model", model, "--data", tokens_path,
                          "--seq", str(SEQ)], check=True, capture_output=True, text=True)
    return float(out.stdout.split()[1])


def make_fixture(anemone):
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            src = os.path.join(FIXTURES, name)
            ref = load_file(os.path.join(src, "reference.safetensors"))
            with open(os.path.join(src, "config.json")) as f:
                vocab = json.load(f)["vocab_size"]
            tokens = os.path.join(tmp, f"{name}.bin")
            write_token_file(tokens, ref["eval_tokens"].tolist(), vocab)
            run = os.path.join(tmp, f"{name}-run")
            export = os.path.join(tmp, f"{name}-export")
            subprocess.run([anemone, "train", "--init", src, "--data", tokens, "--val-data", tokens,
                            "--out", run] + TRAIN_FLAGS, check=True, capture_output=True)
            subprocess.run([anemone, "export", "--model", run, "--format", "hf", "--out", export],
                           check=True, capture_output=True)
            ours = anemone_loss(anemone, export, tokens)
            theirs = transformers_loss(export, ref["eval_tokens"].tolist())
            base = transformers_loss(src, ref["eval_tokens"].tolist())
            with open(os.path.join(export, "config.json")) as f:
                dtype = json.load(f)["dtype"]
            results[name] = dict(transformers_loss=theirs, anemone_loss=ours, base_loss=base,
                                 dtype=dtype)
            print(f"{name}: base {base:.6f} -> fine-tuned: transformers {theirs:.8f} "
                  f"anemone {ours:.8f} (rel {abs(ours - theirs) / theirs:.2e}, {dtype})")
    out = dict(script="scripts/check_hf_export.py --make-fixture", seq=SEQ, train_flags=TRAIN_FLAGS,
               note="transformers_loss: AutoModelForCausalLM.from_pretrained(export, float64) on "
                    "eval_tokens of the fixture's reference.safetensors, windows of seq",
               models=results)
    path = os.path.join(FIXTURES, "export-losses.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export_dir", nargs="?")
    p.add_argument("--reference", help="a fixture's reference.safetensors (its eval_tokens)")
    p.add_argument("--seq", type=int, default=SEQ)
    p.add_argument("--expect", type=float, help="anemone's loss to compare with (1e-5 relative)")
    p.add_argument("--make-fixture", action="store_true")
    p.add_argument("--anemone", default=os.path.join(ROOT, "target", "debug", "anemone"))
    args = p.parse_args()
    if args.make_fixture:
        make_fixture(args.anemone)
        return
    if not args.export_dir or not args.reference:
        p.error("give EXPORT_DIR and --reference, or --make-fixture")
    tokens = load_file(args.reference)["eval_tokens"].tolist()
    loss = transformers_loss(args.export_dir, tokens, args.seq)
    print(f"loss {loss:.8f}")
    if args.expect is not None:
        rel = abs(loss - args.expect) / abs(loss)
        print(f"anemone {args.expect:.8f}: relative difference {rel:.2e}")
        if rel > 1e-5:
            sys.exit(1)


if __name__ == "__main__":
    main()
