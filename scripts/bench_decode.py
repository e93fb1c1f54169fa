#!/usr/bin/env python3
"""Decoding speed: `anemone generate` against llama2.c's `run.c` (stories
shapes) or against transformers' `generate` (qwen2.5-0.5b), in interleaved
rounds on the same machine.

llama2.c mode (`--models stories15m stories110m`, the default): writes random
llama2.c version 0 models of the stories15m shape (dim 288, 6 layers, 6 heads,
FFN 768, vocab 32000, seq_len 256) and the stories110m shape (768, 12, 12,
2048, 32000, seq_len 1024) with NumPy from a fixed seed into --workdir (kept
there and reused; never committed), then runs in each round, in alternating
order:

  anemone --threads T generate --model M --tokenizer TOK --temperature 0 --max-tokens N
  OMP_NUM_THREADS=T run M -z TOK -t 0 -n N -i ""

Both decode greedily from BOS alone for N positions (run.c's -n counts the
positions, the BOS one included, and anemone's --max-tokens the new tokens: with
a prompt of BOS alone both run N forward passes). Reported per side:
- tokens/s over the span run.c times (its `achieved tok/s`: the timer starts
  after the first forward pass, and counts the tokens after the first);
  anemone prints the same span as `then X tokens/s` on its second stderr line;
- wall time of the whole process, model loading included, and its user+system
  CPU time (less disturbed by other load than wall time);
- anemone's load time and time to the first token (its own report);
- whether both printed the same text (greedy decoding of the same weights:
  they should, unless two logits tie within rounding).
The summary gives medians over rounds and the ratio anemone/run.c of tokens/s
(above 1: anemone faster). With `--baseline BIN`, a second anemone binary (a
build before a change) runs as a third side in the same rounds, and the summary
adds its ratio to run.c and the median of anemone/baseline per round: on a
machine shared with other load, ratios within a round say more than absolute
rates.

run.c is run, never copied: give a built binary (`--runc PATH`) or its source
to build (`--runc-src run.c`, built as llama2.c builds it:
`gcc -Ofast -fopenmp -march=native run.c -lm -o run`).

Hugging Face mode (`--models qwen2.5-0.5b`): writes a random-weight
Qwen2ForCausalLM of the preset's shape (fp32, transformers' init, seed 0) as a
model directory with a small byte-level BPE tokenizer copied from
tests/fixtures/hf/tokenizer (the ids a random model produces need not decode
to text; the prompt is given as ids), and times `anemone generate --model DIR
--prompt-ids ... --temperature 0` against `model.generate(do_sample=False,
max_new_tokens=N)` in the same process for transformers (loading excluded
there; the rate counts the new tokens over generate()'s whole call, the
prompt's forward included, as anemone's first stderr line does). Both stop at
the config's EOS (id 0); the script reports whether both gave as many tokens
and the same text (the fixture tokenizer's decoding of transformers' ids
against what anemone printed).

Examples:
  cargo build --release
  python3 scripts/bench_decode.py --runc /path/to/llama2.c/run --tokenizer tokenizer.bin
  python3 scripts/bench_decode.py --runc-src /path/to/llama2.c/run.c --rounds 5
  python3 scripts/bench_decode.py --models qwen2.5-0.5b --rounds 3 --max-tokens 128
  python3 scripts/bench_decode.py --max-tokens 16 --rounds 1 --runc ...   # a quick check

Needs NumPy (and torch + transformers for the Hugging Face mode); never run by CI.
"""
import argparse
import json
import os
import re
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# name: (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len)
LLAMA2C = {
    "stories15m": (288, 768, 6, 6, 6, 32000, 256),
    "stories110m": (768, 2048, 12, 12, 12, 32000, 1024),
}
# qwen2.5-0.5b as src/model/config.rs (the checkpoint's config.json).
QWEN = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
            rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            tie_word_embeddings=True, use_sliding_window=False)
HF_PROMPT = [17, 42, 99, 7]


def write_llama2c(path, shape, seed=0):
    """A random llama2.c version 0 file (shared classifier): embedding N(0, 0.02),
    matrices N(0, 1/fan_in) so activations keep their scale, norms 1."""
    import numpy as np

    dim, hidden, layers, heads, kv_heads, vocab, seq = shape
    head_dim = dim // heads
    rng = np.random.default_rng(seed)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab, seq))

        def normal(*dims, std):
            f.write((rng.standard_normal(dims, dtype=np.float32) * std).astype("<f4").tobytes())

        normal(vocab, dim, std=0.02)
        f.write(np.ones((layers, dim), "<f4").tobytes())  # rms_att
        for rows, cols in ((dim, dim), (kv_heads * head_dim, dim), (kv_heads * head_dim, dim),
                           (dim, dim)):  # wq wk wv wo
            normal(layers, rows, cols, std=cols ** -0.5)
        f.write(np.ones((layers, dim), "<f4").tobytes())  # rms_ffn
        for rows, cols in ((hidden, dim), (dim, hidden), (hidden, dim)):  # w1 w2 w3
            normal(layers, rows, cols, std=cols ** -0.5)
        f.write(np.ones(dim, "<f4").tobytes())  # rms_final
        # freq_cis_real and freq_cis_imag, (seq_len, head_dim / 2) each: unused by readers.
        f.write(np.zeros(seq * head_dim, "<f4").tobytes())
    os.replace(tmp, path)


def timed(cmd, env=None):
    """Runs `cmd`; returns (stdout, stderr, wall seconds, user+sys seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
                 f"{proc.stderr.decode(errors='replace')}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"), wall, cpu


def parse_anemone(stderr):
    """anemone generate's two report lines: `N tokens, X tokens/s` and
    `load L s, first token after F s, then Y tokens/s`."""
    m = re.search(r"^(\d+) tokens, ([\d.]+) tokens/s$", stderr, re.M)
    if not m:
        sys.exit(f"anemone printed no `N tokens, X tokens/s` line:\n{stderr}")
    out = {"tokens": int(m.group(1)), "tokens_per_s": float(m.group(2))}
    m = re.search(r"^load ([\d.]+) s(?:, first token after ([\d.]+) s)?(?:, then ([\d.]+) tokens/s)?$",
                  stderr, re.M)
    if m:
        out["load_s"] = float(m.group(1))
        out["first_token_s"] = float(m.group(2)) if m.group(2) else None
        out["after_first_per_s"] = float(m.group(3)) if m.group(3) else None
    return out


def anemone_llama2c(args, model, binary=None):
    cmd = [binary or args.anemone, "--threads", str(args.threads), "generate", "--model", model,
           "--tokenizer", args.tokenizer, "--temperature", "0", "--max-tokens", str(args.max_tokens)]
    out, err, wall, cpu = timed(cmd)
    r = parse_anemone(err)
    r.update(text=out.strip(), wall_s=wall, cpu_s=cpu, rate=r.get("after_first_per_s"))
    return r


def runc(args, model):
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    cmd = [args.runc, model, "-z", args.tokenizer, "-t", "0", "-n", str(args.max_tokens), "-i", ""]
    out, err, wall, cpu = timed(cmd, env)
    m = re.search(r"achieved tok/s: ([\d.]+)", err)
    if not m:
        sys.exit(f"run.c printed no `achieved tok/s`:\n{err}")
    return {"text": out.strip(), "wall_s": wall, "cpu_s": cpu, "rate": float(m.group(1))}


def build_runc(src, workdir):
    binary = os.path.join(workdir, "run")
    cmd = ["gcc", "-Ofast", "-fopenmp", "-march=native", src, "-lm", "-o", binary]
    print("building run.c:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return binary


def bench_llama2c(args):
    if not args.runc and not args.runc_src:
        sys.exit("llama2.c mode needs --runc PATH (a built run) or --runc-src run.c")
    if not os.path.exists(args.tokenizer):
        sys.exit(f"{args.tokenizer} not found: pass --tokenizer (llama2.c's tokenizer.bin)")
    runc_bin = args.runc or build_runc(args.runc_src, args.workdir)
    results = {}
    for name in args.models:
        model = os.path.join(args.workdir, f"{name}-random.bin")
        if not os.path.exists(model):
            print(f"writing {model}", flush=True)
            write_llama2c(model, LLAMA2C[name])
        sides = [("anemone", lambda: anemone_llama2c(args, model)),
                 ("run.c", lambda: runc(args, model))]
        if args.baseline:
            sides.insert(1, ("baseline", lambda: anemone_llama2c(args, model, args.baseline)))
        rounds = []
        for rnd in range(args.rounds):
            order = sides if rnd % 2 == 0 else sides[::-1]
            got = {side: fn() for side, fn in order}
            a, c = got["anemone"], got["run.c"]
            got["ratio"] = a["rate"] / c["rate"] if a["rate"] else None
            got["same_text"] = a["text"] == c["text"]
            versus = ""
            if args.baseline:
                b = got["baseline"]
                got["baseline_ratio"] = b["rate"] / c["rate"] if b["rate"] else None
                got["same_text"] = got["same_text"] and b["text"] == c["text"]
                versus = (f"  baseline {b['rate'] or 0:7.1f} tok/s (ratio {got['baseline_ratio'] or 0:.2f}, "
                          f"anemone/baseline {a['rate'] / b['rate']:.3f})")
            rounds.append(got)
            print(f"round {rnd + 1}/{args.rounds} {name:12} anemone {a['rate'] or 0:7.1f} tok/s "
                  f"(wall {a['wall_s']:.2f} s, cpu {a['cpu_s']:.2f} s, load {a.get('load_s', 0):.3f} s, "
                  f"{a['tokens']} tokens)  run.c {c['rate']:7.1f} tok/s (wall {c['wall_s']:.2f} s, "
                  f"cpu {c['cpu_s']:.2f} s)  ratio {got['ratio'] or 0:.2f}{versus}  same text "
                  f"{'yes' if got['same_text'] else 'NO'}", flush=True)
        results[name] = rounds
    print()
    print("| model | rounds | anemone tok/s | run.c tok/s | ratio per round | median ratio "
          "| wall s anemone / run.c | user+sys s anemone / run.c | anemone load s "
          "| anemone first token s | same text |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for name, rounds in results.items():
        med = lambda side, key: statistics.median(r[side][key] for r in rounds)
        ratios = [r["ratio"] for r in rounds]
        s = {"anemone_tok_s": med("anemone", "rate"), "runc_tok_s": med("run.c", "rate"),
             "ratios": ratios, "median_ratio": statistics.median(ratios),
             "anemone_wall_s": med("anemone", "wall_s"), "runc_wall_s": med("run.c", "wall_s"),
             "anemone_cpu_s": med("anemone", "cpu_s"), "runc_cpu_s": med("run.c", "cpu_s"),
             "anemone_load_s": med("anemone", "load_s"),
             "anemone_first_token_s": med("anemone", "first_token_s"),
             "same_text": all(r["same_text"] for r in rounds)}
        if args.baseline:
            s["baseline_ratios"] = [r["baseline_ratio"] for r in rounds]
            s["baseline_median_ratio"] = statistics.median(s["baseline_ratios"])
            s["anemone_over_baseline"] = statistics.median(
                r["anemone"]["rate"] / r["baseline"]["rate"] for r in rounds)
        summary[name] = s
        print(f"| `{name}` (random weights) | {len(rounds)} | {s['anemone_tok_s']:.1f} "
              f"| {s['runc_tok_s']:.1f} | {' / '.join(f'{x:.2f}' for x in ratios)} "
              f"| **{s['median_ratio']:.2f}** | {s['anemone_wall_s']:.2f} / {s['runc_wall_s']:.2f} "
              f"| {s['anemone_cpu_s']:.2f} / {s['runc_cpu_s']:.2f} | {s['anemone_load_s']:.3f} "
              f"| {s['anemone_first_token_s']:.3f} | {'yes' if s['same_text'] else 'no'} |")
    if args.baseline:
        print()
        print(f"baseline {args.baseline}:")
        print("| model | baseline/run.c per round | median | anemone/baseline (median of rounds) |")
        print("|---|---|---|---|")
        for name, s in summary.items():
            print(f"| `{name}` | {' / '.join(f'{x:.2f}' for x in s['baseline_ratios'])} "
                  f"| {s['baseline_median_ratio']:.2f} | {s['anemone_over_baseline']:.3f} |")
    return {"rounds": results, "summary": summary}


def write_hf_model(path):
    """A random Qwen2ForCausalLM of qwen2.5-0.5b's shape (fp32) with the
    fixture tokenizer, as a model directory both sides read."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(**QWEN, bos_token_id=None, eos_token_id=0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(ROOT, "tests", "fixtures", "hf", "tokenizer", name), tmp)
    os.replace(tmp, path)


def bench_hf(args, name):
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = os.path.join(args.workdir, f"{name}-random")
    if not os.path.exists(model_dir):
        print(f"writing {model_dir}", flush=True)
        write_hf_model(model_dir)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0
    prompt = torch.tensor([HF_PROMPT])
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))

    def transformers_side():
        t0 = time.perf_counter()
        with torch.no_grad():
            # Greedy, stopping at the config's EOS (id 0, the tokenizer's
            # <|endoftext|>) as anemone does: the token counts are reported.
            out = model.generate(prompt, do_sample=False, max_new_tokens=args.max_tokens,
                                 pad_token_id=0)
        seconds = time.perf_counter() - t0
        new = out[0, len(HF_PROMPT):].tolist()
        # The text anemone prints: the prompt's, then the new tokens' (the
        # tokenizer has 323 ids: most of a random model's ids print nothing).
        text = tokenizer.decode(HF_PROMPT + new, skip_special_tokens=True)
        return {"rate": len(new) / seconds, "tokens": len(new), "seconds": seconds,
                "text": text.strip()}

    def anemone_side():
        cmd = [args.anemone, "--threads", str(args.threads), "generate", "--model", model_dir,
               "--prompt-ids", " ".join(map(str, HF_PROMPT)), "--temperature", "0",
               "--max-tokens", str(args.max_tokens)]
        out, err, wall, cpu = timed(cmd)
        r = parse_anemone(err)
        r.update(rate=r["tokens_per_s"], wall_s=wall, cpu_s=cpu, text=out.strip())
        return r

    rounds = []
    for rnd in range(args.rounds):
        sides = [("anemone", anemone_side), ("transformers", transformers_side)]
        order = sides if rnd % 2 == 0 else sides[::-1]
        got = {side: fn() for side, fn in order}
        a, t = got["anemone"], got["transformers"]
        got["ratio"] = a["rate"] / t["rate"]
        got["same_text"] = a["text"] == t["text"] and a["tokens"] == t["tokens"]
        rounds.append(got)
        print(f"round {rnd + 1}/{args.rounds} {name} anemone {a['rate']:.2f} tok/s ({a['tokens']} "
              f"tokens, wall {a['wall_s']:.2f} s with load {a.get('load_s', 0):.2f} s)  "
              f"transformers {t['rate']:.2f} tok/s ({t['tokens']} tokens)  ratio {got['ratio']:.2f}  "
              f"same tokens and text {'yes' if got['same_text'] else 'NO'}",
              flush=True)
    ratios = [r["ratio"] for r in rounds]
    s = {"anemone_tok_s": statistics.median(r["anemone"]["rate"] for r in rounds),
         "transformers_tok_s": statistics.median(r["transformers"]["rate"] for r in rounds),
         "ratios": ratios, "median_ratio": statistics.median(ratios),
         "transformers_load_s": load_s,
         "anemone_load_s": statistics.median(r["anemone"].get("load_s", 0) for r in rounds),
         "same_text": all(r["same_text"] for r in rounds)}
    print()
    print("| model | rounds | anemone tok/s | transformers tok/s | ratio per round | median ratio "
          "| load s anemone / transformers | same tokens and text |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| `{name}` (random weights, fp32) | {len(rounds)} | {s['anemone_tok_s']:.2f} "
          f"| {s['transformers_tok_s']:.2f} | {' / '.join(f'{x:.2f}' for x in ratios)} "
          f"| **{s['median_ratio']:.2f}** | {s['anemone_load_s']:.2f} / {load_s:.2f} "
          f"| {'yes' if s['same_text'] else 'no'} |")
    return {"rounds": rounds, "summary": s}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["stories15m", "stories110m"],
                   choices=list(LLAMA2C) + ["qwen2.5-0.5b"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--anemone", default=os.path.join(ROOT, "target", "release", "anemone"))
    p.add_argument("--runc", help="a built llama2.c run binary")
    p.add_argument("--baseline", help="another anemone binary (say, a build before a change) run "
                                      "as a third side in llama2.c mode, in the same rounds")
    p.add_argument("--runc-src", help="llama2.c's run.c, built with gcc -Ofast -fopenmp -march=native")
    p.add_argument("--tokenizer", default=os.path.join(ROOT, "..", "shared", "data",
                                                       "llama2-tokenizer.bin"),
                   help="llama2.c's tokenizer.bin (default ../shared/data/llama2-tokenizer.bin)")
    p.add_argument("--workdir", default=os.path.join(ROOT, "target", "bench-decode"),
                   help="where the random models are written and kept")
    p.add_argument("--json", help="write every round and the summary here")
    args = p.parse_args()
    if not os.path.exists(args.anemone):
        sys.exit(f"{args.anemone} not found: run `cargo build --release` first or pass --anemone")
    os.makedirs(args.workdir, exist_ok=True)
    report = {"args": vars(args)}
    stories = [m for m in args.models if m in LLAMA2C]
    if stories:
        report["llama2c"] = bench_llama2c(argparse.Namespace(**dict(vars(args), models=stories)))
    for name in (m for m in args.models if m not in LLAMA2C):
        report[name] = bench_hf(args, name)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
