#!/usr/bin/env bash
# anemone's first run on a Mac: everything we need to know about the ANE on
# your chip, in one archive to attach to an issue.
#
#   scripts/mac-first-run.sh            (from the repository root, on macOS / Apple silicon)
#
# It builds the release binary, runs the ANE tests, `doctor --json`, a short
# `train --backend auto` (with ANEMONE_DEBUG=1: compile events), a quick ANE
# benchmark and a train-step benchmark (both with energy, where macOS exposes
# it), a short LoRA run once anemone has one, and packs the reports and logs
# into anemone-first-run-<date>.tar.gz. Every step runs even when an earlier
# one fails; `summary.txt` lists each step's exit code. Nothing is uploaded:
# attach the archive yourself. It holds the OS and chip names, error texts,
# numbers and timings of these runs, and nothing from your files.
set -uo pipefail
cd "$(dirname "$0")/.."

stamp=$(date +%Y%m%d-%H%M%S)
name="anemone-first-run-$stamp"
out="$PWD/$name"
mkdir -p "$out"
summary="$out/summary.txt"
bin="$PWD/target/release/anemone"

note() { echo "$*" | tee -a "$summary"; }

# step NAME LOGFILE COMMAND...: run, log stdout+stderr, record the exit code.
step() {
    local label=$1 log=$2
    shift 2
    echo "== $label"
    "$@" >"$out/$log" 2>&1
    local code=$?
    note "$(printf '%-28s exit %-3s log %s' "$label" "$code" "$log")"
    return 0
}

note "anemone first run, $stamp"
note "os:      $(sw_vers -productName 2>/dev/null) $(sw_vers -productVersion 2>/dev/null) ($(uname -m))"
note "chip:    $(sysctl -n machdep.cpu.brand_string 2>/dev/null || echo unknown)"
note "memory:  $(( $(sysctl -n hw.memsize 2>/dev/null || echo 0) / 1073741824 )) GB"
note "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | head -c1 | sed 's/./(modified)/')"
note "rustc:   $(rustc --version 2>/dev/null || echo missing)"
if [ "$(uname -s)" != Darwin ] || [ "$(uname -m)" != arm64 ]; then
    note "warning: not macOS on Apple silicon; the ANE steps will report it unavailable"
fi
note ""

step "build (release)" build.log cargo build --release
if [ ! -x "$bin" ]; then
    note "error: the build failed; see build.log"
else
    # The ANE tests: the backend with the CPU stand-in, and on a Mac the
    # mac_only_* tests on the device (probe, every training kernel).
    step "cargo test ane" test-ane.log cargo test --release ane -- --nocapture
    step "doctor" doctor.txt "$bin" doctor --json "$out/doctor.json"
    step "train --backend auto" train.log env ANEMONE_DEBUG=1 "$bin" train --backend auto \
        --steps 20 --out "$out/run"
    step "bench ane-all --quick" bench-ane.txt "$bin" bench ane-all --quick --backend auto \
        --json "$out/bench-ane.json"
    step "bench train-step" bench-train-step.txt "$bin" bench train-step --config tiny \
        --seq 128 --batch 2 --steps 5 --warmup 1 --backend auto --json "$out/bench-train-step.json"
    # LoRA fine-tuning on the run above (its base baked into each layer's
    # kernels on the ANE), once this build has it.
    if "$bin" train --help 2>/dev/null | grep -q -- "--lora"; then
        step "train --lora (short)" lora.log env ANEMONE_DEBUG=1 "$bin" train --backend auto \
            --init "$out/run" --lora --steps 20 --out "$out/lora-run"
    else
        note "lora:    not in this build (skipped)"
    fi
fi

# Keep the reports, not the weights: metrics and configs of the runs only.
for run in run lora-run; do
    if [ -d "$out/$run" ]; then
        mkdir -p "$out/$run-reports"
        cp "$out/$run"/metrics.jsonl "$out/$run"/config.json "$out/$run-reports/" 2>/dev/null
        rm -rf "${out:?}/$run"
    fi
done

tar -czf "$name.tar.gz" "$name"
echo
cat "$summary"
echo
echo "Packed: $PWD/$name.tar.gz"
echo "Please open an issue and attach it, whether everything worked or not."
