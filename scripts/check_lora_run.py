#!/usr/bin/env python3
"""The independent check that a `anemone train --lora` run's adapters are
PEFT's: load the base with transformers, the run's `adapters/` with
`peft.PeftModel.from_pretrained`, and compare their loss with `anemone eval`
of the run (base + adapters) and with transformers' loss of `anemone fuse`'s
output.

  check_lora_run.py --make-fixture --anemone target/debug/anemone
      For the tiny qwen2, qwen3 and llama fixtures of tests/fixtures/hf:
      train LoRA adapters with `anemone train --init FIXTURE --lora` on
      tests/fixtures/lora/chat.jsonl (TRAIN_FLAGS, CPU, fp32), fuse the run,
      and record in tests/fixtures/lora/run-losses.json PEFT's loss of base +
      adapters (float64), transformers' loss of the fused directory and
      anemone's `eval` loss of the run, each on the fixture's eval_tokens in
      windows of SEQ. tests/it/lora_run.rs repeats the same commands and
      checks anemone's losses against PEFT's (1e-5 relative).

Needs torch, transformers (5.x), peft, safetensors and numpy; not used by CI.
"""
import argparse
import json
import os
import subprocess
import tempfile

import torch
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from check_hf_export import anemone_loss, transformers_loss, write_token_file, SEQ

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HF = os.path.join(ROOT, "tests", "fixtures", "hf")
LORA = os.path.join(ROOT, "tests", "fixtures", "lora")
MODELS = ["qwen2", "qwen3", "llama"]
# The run the fixture records; tests/it/lora_run.rs runs the same.
TRAIN_FLAGS = ["--lora", "--mask-prompt", "--lora-rank", "4", "--lora-alpha", "8",
               "--steps", "6", "--batch", "2", "--seq", "64", "--lr", "2e-2", "--warmup", "0",
               "--backend", "cpu", "--seed", "5"]


def peft_loss(base_dir, adapters_dir, tokens, seq=SEQ):
    """transformers_loss of the base with PEFT's adapters applied (float64)."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
    model = PeftModel.from_pretrained(base, adapters_dir)
    model.eval()
    tokens = torch.tensor(tokens, dtype=torch.long)
    windows = (len(tokens) - 1) // seq
    losses = []
    with torch.no_grad():
        for w in range(windows):
            x = tokens[w * seq: w * seq + seq + 1]
            logits = model(input_ids=x[None, :-1]).logits
            losses.append(torch.nn.functional.cross_entropy(logits[0], x[1:]).item())
    return sum(losses) / len(losses)


def make_fixture(anemone):
    results = {}
    data = os.path.join(LORA, "chat.jsonl")
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            src = os.path.join(HF, name)
            tokens = load_file(os.path.join(src, "reference.safetensors"))["eval_tokens"].tolist()
            with open(os.path.join(src, "config.json")) as f:
                vocab = json.load(f)["vocab_size"]
            tokens_path = os.path.join(tmp, f"{name}.bin")
            write_token_file(tokens_path, tokens, vocab)
            run = os.path.join(tmp, f"{name}-run")
            fused = os.path.join(tmp, f"{name}-fused")
            subprocess.run([anemone, "train", "--init", src, "--data", data, "--out", run]
                           + TRAIN_FLAGS, check=True, capture_output=True)
            subprocess.run([anemone, "fuse", "--model", run, "--out", fused],
                           check=True, capture_output=True)
            peft = peft_loss(src, os.path.join(run, "adapters"), tokens)
            fused_loss = transformers_loss(fused, tokens)
            ours = anemone_loss(anemone, run, tokens_path)
            base = transformers_loss(src, tokens)
            results[name] = dict(peft_loss=peft, transformers_fused_loss=fused_loss,
                                 anemone_loss=ours, base_loss=base)
            print(f"{name}: base {base:.8f}; with the run's adapters: peft {peft:.8f}, "
                  f"transformers of the fused model {fused_loss:.8f}, anemone eval {ours:.8f} "
                  f"(rel {abs(ours - peft) / peft:.2e})")
    out = dict(script="scripts/check_lora_run.py --make-fixture", seq=SEQ, data="chat.jsonl",
               train_flags=TRAIN_FLAGS,
               note="peft_loss: PeftModel.from_pretrained(base float64, RUN/adapters) on "
                    "eval_tokens of the hf fixture's reference.safetensors, windows of seq",
               models=results)
    path = os.path.join(LORA, "run-losses.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--make-fixture", action="store_true", required=True)
    p.add_argument("--anemone", default=os.path.join(ROOT, "target", "debug", "anemone"))
    make_fixture(p.parse_args().anemone)


if __name__ == "__main__":
    main()
