#!/usr/bin/env python3
"""anemone against PyTorch on the same machine, in interleaved rounds.

Runs `anemone bench train-step` and `scripts/bench_pytorch.py` on the same
workloads, one after the other, for several rounds. The order within a round
alternates (anemone first in odd rounds, PyTorch first in even ones), so a slow
spell of a shared VM lands on both sides. Each round gives one ratio
anemone/PyTorch of the two medians; the summary reports the median of those
ratios next to the medians of the step times, and, as a secondary figure
less disturbed by other load, the ratio of each side's fastest step over all
rounds.

Examples:
  cargo build --release
  python3 scripts/bench_compare.py                         # the three workloads, 5 rounds
  python3 scripts/bench_compare.py --workloads layer768 --rounds 3
  python3 scripts/bench_compare.py --json compare.json     # every run's fields too
  python3 scripts/bench_compare.py --baseline /tmp/anemone-old   # also an older build, same rounds
  python3 scripts/bench_compare.py --workloads smollm2-135m qwen2.5-0.5b --rounds 3

Workloads (docs/performance.md): layer768 (seq 512, batch 1), stories110m
(seq 256, batch 1), stories15m (seq 256, batch 8), the default three; and the
Hugging Face shapes smollm2-135m and qwen2.5-0.5b (seq 512, batch 1; full
fine-tuning, PyTorch's side being transformers' own model class), which run 3
timed steps after 1 warm-up unless --steps/--warmup say otherwise (a
qwen2.5-0.5b step takes tens of seconds). Peak RSS is reported for each side,
with the bounds of issue 20 (anemone at most PyTorch's for smollm2-135m, at
most 12 GB for qwen2.5-0.5b). Needs torch (CPU is enough; transformers for the
Hugging Face shapes) and a release build of anemone; never run by CI.

`--lora` compares LoRA steps instead (`bench train-step --lora` against
`bench_pytorch.py --lora`, transformers + peft; rank `--lora-rank`, alpha
twice the rank, all seven projections of every layer), on the Hugging Face
shapes only (by default both), with the bounds of issue 21: at most 0.5x
PyTorch's step time, peak RSS below PyTorch's, qwen2.5-0.5b within 4 GB:
  python3 scripts/bench_compare.py --lora --lora-rank 16 --rounds 3
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

WORKLOADS = {
    "layer768": (512, 1),
    "stories110m": (256, 1),
    "stories15m": (256, 8),
    "smollm2-135m": (512, 1),
    "qwen2.5-0.5b": (512, 1),
}
DEFAULT_WORKLOADS = ["layer768", "stories110m", "stories15m"]
# Timed steps and warm-up steps of the large workloads when not given.
LARGE = {"smollm2-135m": (3, 1), "qwen2.5-0.5b": (3, 1)}
# Peak RSS bounds (MB) of issue 20 on anemone's side: None = PyTorch's own.
RSS_BOUND_MB = {"smollm2-135m": None, "qwen2.5-0.5b": 12000}
# The same for LoRA steps (issue 21).
LORA_RSS_BOUND_MB = {"smollm2-135m": None, "qwen2.5-0.5b": 4000}
LORA_WORKLOADS = ["smollm2-135m", "qwen2.5-0.5b"]


def lora_args(args):
    """The LoRA flags, the same on both sides (none without --lora)."""
    return ["--lora", "--lora-rank", str(args.lora_rank)] if args.lora else []


def steps_of(args, name):
    """(timed steps, warm-up steps) of workload `name`."""
    steps, warmup = LARGE.get(name, (5, 1))
    return (args.steps or steps, warmup if args.warmup is None else args.warmup)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run(cmd, json_path):
    """Runs one benchmark command and returns its JSON report."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}")
    with open(json_path) as f:
        return json.load(f)


def anemone(args, name, seq, batch, json_path, binary=None):
    steps, warmup = steps_of(args, name)
    cmd = [binary or args.anemone, "bench", "train-step", "--config", name, "--seq", str(seq),
           "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup),
           "--threads", str(args.threads), "--json", json_path] + lora_args(args)
    r = run(cmd, json_path)
    return {"ms": r["ms_median"], "min": r["ms_min"], "max": r["ms_max"],
            "gflops": r["gflops"], "peak": r["gemm_peak_gflops"],
            "rss": r["peak_rss_mb"], "cpu": r.get("cpu"), "simd": r.get("simd")}


def pytorch(args, name, seq, batch, json_path):
    steps, warmup = steps_of(args, name)
    cmd = [args.python, os.path.join(HERE, "bench_pytorch.py"), "--config", name,
           "--seq", str(seq), "--batch", str(batch), "--steps", str(steps),
           "--warmup", str(warmup), "--threads", str(args.threads), "--json", json_path]
    r = run(cmd + lora_args(args), json_path)
    return {"ms": r["median_ms"], "min": r["min_ms"], "max": r["max_ms"],
            "gflops": r["gflops"], "peak": r["gemm_peak_gflops"],
            "rss": r["peak_rss_mb"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS),
                   help=f"default: {' '.join(DEFAULT_WORKLOADS)} ({' '.join(LORA_WORKLOADS)} "
                   "with --lora)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, help="timed steps per run (default 5; 3 for the "
                   "Hugging Face shapes)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 1)")
    p.add_argument("--python", default=sys.executable,
                   help="the Python that has torch (and transformers) for bench_pytorch.py")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--anemone", default=os.path.join(ROOT, "target", "release", "anemone"),
                   help="the anemone binary (default: target/release/anemone)")
    p.add_argument("--baseline", help="a second anemone binary (an earlier build) run in the same "
                   "rounds, in rotating order, to compare two builds of anemone")
    p.add_argument("--json", help="write every run's fields and the summary here")
    p.add_argument("--lora", action="store_true",
                   help="LoRA steps (peft on PyTorch's side); Hugging Face shapes only")
    p.add_argument("--lora-rank", type=int, default=16)
    args = p.parse_args()
    if args.workloads is None:
        args.workloads = LORA_WORKLOADS if args.lora else DEFAULT_WORKLOADS
    if args.lora and any(w not in LORA_WORKLOADS for w in args.workloads):
        p.error(f"--lora runs the Hugging Face shapes only: {' '.join(LORA_WORKLOADS)}")
    bounds = LORA_RSS_BOUND_MB if args.lora else RSS_BOUND_MB
    if not os.path.exists(args.anemone):
        sys.exit(f"{args.anemone} not found: run `cargo build --release` first "
                 "or pass --anemone PATH")

    results = {w: [] for w in args.workloads}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for w in args.workloads:
                seq, batch = WORKLOADS[w]
                path = os.path.join(tmp, f"{w}-{rnd}.json")
                sides = [("anemone", lambda *a: anemone(*a)), ("pytorch", pytorch)]
                if args.baseline:
                    sides.insert(1, ("baseline", lambda *a: anemone(*a, binary=args.baseline)))
                # Rotate the order from round to round, so that a slow spell
                # of a shared VM lands on every side.
                k = rnd % len(sides)
                sides = sides[k:] + sides[:k]
                got = {side: fn(args, w, seq, batch, path) for side, fn in sides}
                got["ratio"] = got["anemone"]["ms"] / got["pytorch"]["ms"]
                if args.baseline:
                    got["vs_baseline"] = got["anemone"]["ms"] / got["baseline"]["ms"]
                results[w].append(got)
                a, t = got["anemone"], got["pytorch"]
                extra = (f"  baseline {got['baseline']['ms']:8.1f} ms  anemone/baseline "
                         f"{got['vs_baseline']:.3f}") if args.baseline else ""
                print(f"round {rnd + 1}/{args.rounds} {w:12} anemone {a['ms']:8.1f} ms "
                      f"({a['gflops']:.0f} of {a['peak']:.0f} GFLOP/s)  pytorch {t['ms']:8.1f} ms "
                      f"({t['gflops']:.0f} of {t['peak']:.0f} GFLOP/s)  ratio {got['ratio']:.2f}{extra}",
                      flush=True)

    first = next(iter(results.values()))[0]["anemone"]
    print(f"\nmachine: {first['cpu'] or 'unknown CPU'} ({first['simd']}), {args.threads} threads")
    if args.lora:
        print(f"LoRA steps: rank {args.lora_rank}, alpha {2 * args.lora_rank}, all seven "
              "projections of every layer; goal: median ratio at most 0.5")
    print()
    print("| workload | rounds | anemone ms/step (median of medians) | PyTorch ms/step "
          "| ratio per round | median ratio | fastest steps' ratio "
          "| anemone share of in-run GEMM peak | peak RSS anemone / PyTorch |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for w, runs in results.items():
        ratios = [r["ratio"] for r in runs]
        a_ms = statistics.median(r["anemone"]["ms"] for r in runs)
        t_ms = statistics.median(r["pytorch"]["ms"] for r in runs)
        share = statistics.median(r["anemone"]["gflops"] / r["anemone"]["peak"] for r in runs)
        a_rss = max(r["anemone"]["rss"] for r in runs)
        t_rss = max(r["pytorch"]["rss"] for r in runs)
        # Each side's fastest step over all rounds: the least disturbed by
        # other load on a shared machine (a secondary figure; the goal is
        # stated on the median).
        fastest = min(r["anemone"]["min"] for r in runs) / min(r["pytorch"]["min"] for r in runs)
        summary[w] = {"anemone_ms": a_ms, "pytorch_ms": t_ms, "ratios": ratios,
                      "median_ratio": statistics.median(ratios), "fastest_ratio": fastest,
                      "gemm_peak_share": share,
                      "anemone_rss_mb": a_rss, "pytorch_rss_mb": t_rss}
        seq, batch = WORKLOADS[w]
        print(f"| `{w}`, seq {seq}, batch {batch} | {len(runs)} | {a_ms:.1f} | {t_ms:.1f} "
              f"| {' / '.join(f'{x:.2f}' for x in ratios)} | **{statistics.median(ratios):.2f}** "
              f"| {fastest:.2f} | {share * 100:.0f} % | {a_rss:.0f} MB / {t_rss:.0f} MB |")
    for w in results:
        if w in bounds:
            a_rss, t_rss = summary[w]["anemone_rss_mb"], summary[w]["pytorch_rss_mb"]
            bound = bounds[w] or t_rss
            name = f"{bound:.0f} MB" if bounds[w] else f"PyTorch's {t_rss:.0f} MB"
            verdict = "within" if a_rss <= bound else "OVER"
            summary[w]["rss_bound_mb"] = bound
            print(f"{w}: anemone peak RSS {a_rss:.0f} MB, {verdict} the bound ({name})")
    if args.baseline:
        print(f"\nanemone ({args.anemone}) against the baseline build ({args.baseline}), same rounds:\n")
        print("| workload | anemone ms/step | baseline ms/step | anemone/baseline per round "
              "| median | fastest steps' ratio |")
        print("|---|---|---|---|---|---|")
        for w, runs in results.items():
            vs = [r["vs_baseline"] for r in runs]
            a_ms = statistics.median(r["anemone"]["ms"] for r in runs)
            b_ms = statistics.median(r["baseline"]["ms"] for r in runs)
            fastest = min(r["anemone"]["min"] for r in runs) / min(r["baseline"]["min"] for r in runs)
            summary[w]["baseline_ms"] = b_ms
            summary[w]["vs_baseline"] = statistics.median(vs)
            print(f"| `{w}` | {a_ms:.1f} | {b_ms:.1f} | {' / '.join(f'{x:.3f}' for x in vs)} "
                  f"| **{statistics.median(vs):.3f}** | {fastest:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": results, "summary": summary, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
