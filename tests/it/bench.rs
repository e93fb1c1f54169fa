//! `anemone bench ane-*` end to end on the CPU backend with `--quick`: each suite
//! prints its table, writes JSON whose FLOP counts match hand-derived values
//! (a linear layer C_in -> C_out over S positions is 2 * C_in * C_out * S), and
//! whose timings are sane. No timed assertions: only positivity and ordering.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

use crate::common::{anemone, temp_dir};

/// A JSON path unique to this process and call (tests run in parallel).
fn json_path(suite: &str) -> PathBuf {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    temp_dir(&format!("bench-{suite}-{call}")).join("report.json")
}

/// Run `anemone bench <suite> --quick --json FILE [extra]`; the parsed JSON and stdout.
fn run_suite(suite: &str, extra: &[&str]) -> (Value, String) {
    let path = json_path(suite);
    let out = anemone()
        .args(["bench", suite, "--quick", "--backend", "cpu", "--json"])
        .arg(&path)
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{suite} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    (serde_json::from_str(&text).unwrap(), stdout)
}

fn u(row: &Value, key: &str) -> u64 {
    row[key]
        .as_u64()
        .unwrap_or_else(|| panic!("`{key}` missing in {row}"))
}

fn f(row: &Value, key: &str) -> f64 {
    row[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` missing in {row}"))
}

/// The envelope names the suite and backend; every row has positive, finite,
/// ordered timings from `reps` samples.
fn check_report(report: &Value, suite: &str, reps: u64) -> Vec<Value> {
    assert_eq!(report["suite"], suite);
    assert_eq!(report["backend"], "cpu");
    assert_eq!(report["repeat"]["reps"].as_u64(), Some(reps));
    assert!(report["threads"].as_u64().unwrap() >= 1);
    let rows = report["rows"].as_array().expect("rows").clone();
    for row in &rows {
        assert_eq!(u(row, "samples"), reps, "{row}");
        let (min, q1, median, q3, max) = (
            f(row, "min_ms"),
            f(row, "q1_ms"),
            f(row, "median_ms"),
            f(row, "q3_ms"),
            f(row, "max_ms"),
        );
        assert!(min.is_finite() && max.is_finite() && min > 0.0, "{row}");
        assert!(
            min <= q1 && q1 <= median && median <= q3 && q3 <= max,
            "{row}"
        );
    }
    rows
}

/// GFLOP/s is FLOPs over the median time.
fn check_rate(row: &Value) {
    let want = u(row, "flops") as f64 / (f(row, "median_ms") * 1e6);
    let got = f(row, "gflops");
    assert!((got - want).abs() <= 1e-9 * want.max(1.0), "{row}");
}

#[test]
fn ane_peak_quick_counts_conv_stack_flops() {
    let (report, stdout) = run_suite("ane-peak", &[]);
    assert!(
        stdout.contains("GFLOP/s") && stdout.contains("4x conv 64ch sp64"),
        "{stdout}"
    );
    let rows = check_report(&report, "ane-peak", 3);
    // (C, S, d) = (64, 64, 4) and (128, 64, 8): 2 * C^2 * S * d.
    let want = [(64, 64, 4, 2_097_152u64), (128, 64, 8, 16_777_216)];
    assert_eq!(rows.len(), want.len());
    for (row, (c, s, d, flops)) in rows.iter().zip(want) {
        assert_eq!(
            (u(row, "channels"), u(row, "spatial"), u(row, "depth")),
            (c, s, d)
        );
        assert_eq!(u(row, "flops"), flops);
        assert_eq!(u(row, "flops"), 2 * c * c * s * d);
        // fp16 weights: d * C^2 * 2 bytes.
        assert_eq!(f(row, "weight_mib"), (d * c * c * 2) as f64 / 1048576.0);
        check_rate(row);
    }
}

#[test]
fn ane_peak_takes_explicit_shapes() {
    let (report, _) = run_suite(
        "ane-peak",
        &[
            "--channels",
            "32,64",
            "--depth",
            "2",
            "--spatial",
            "16",
            "--reps",
            "2",
        ],
    );
    let rows = check_report(&report, "ane-peak", 2);
    let flops: Vec<u64> = rows.iter().map(|r| u(r, "flops")).collect();
    assert_eq!(flops, [2 * 32 * 32 * 16 * 2, 2 * 64 * 64 * 16 * 2]);
}

#[test]
fn ane_dispatch_quick_times_run_and_round_trip() {
    let (report, stdout) = run_suite("ane-dispatch", &[]);
    assert!(stdout.contains("median us"), "{stdout}");
    let rows = check_report(&report, "ane-dispatch", 20);
    assert_eq!(rows.len(), 4);
    let modes: Vec<&str> = rows.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["run", "write+run+read", "run", "write+run+read"]);
    for row in &rows {
        // fp16 [1, 64, 1, 384] in and out.
        assert_eq!(u(row, "io_bytes"), 2 * 2 * 64 * 384);
    }
    assert!(rows[0]["kernel"].as_str().unwrap().starts_with("mul"));
    assert!(rows[2]["kernel"].as_str().unwrap().starts_with("conv"));
}

#[test]
fn ane_sram_quick_sweeps_weight_sizes_per_form() {
    let (report, _) = run_suite("ane-sram", &[]);
    let rows = check_report(&report, "ane-sram", 3);
    // Two forms x (C, S) = (64, 64), (128, 64), (256, 32).
    let sizes = [(64u64, 64u64), (128, 64), (256, 32)];
    assert_eq!(rows.len(), 6);
    for (i, row) in rows.iter().enumerate() {
        let form = if i < 3 { "conv" } else { "matmul-packed" };
        assert_eq!(row["form"], form);
        let (c, s) = sizes[i % 3];
        assert_eq!((u(row, "channels"), u(row, "spatial")), (c, s));
        assert_eq!(u(row, "flops"), 2 * c * c * s);
        let (w, act) = (
            (c * c * 2) as f64 / 1048576.0,
            (c * s * 2) as f64 / 1048576.0,
        );
        assert_eq!(f(row, "weight_mib"), w);
        assert_eq!(f(row, "act_mib"), act);
        assert!((f(row, "total_mib") - (w + 2.0 * act)).abs() < 1e-12);
        let relative = f(row, "relative");
        assert!(relative > 0.0 && relative <= 1.0, "{row}");
        check_rate(row);
    }
    for group in rows.chunks(3) {
        assert!(group.iter().any(|r| f(r, "relative") == 1.0));
    }
}

#[test]
fn ane_conv_vs_matmul_quick_compares_equal_flops() {
    let (report, _) = run_suite("ane-conv-vs-matmul", &[]);
    let rows = check_report(&report, "ane-conv-vs-matmul", 3);
    // (C_in, C_out, S, d) = (64, 128, 64, 1): 2*64*128*64; (128, 128, 64, 4): 2*128^2*64*4.
    let want = [1_048_576u64, 8_388_608];
    assert_eq!(rows.len(), 6);
    for (config, group) in rows.chunks(3).enumerate() {
        let forms: Vec<&str> = group.iter().map(|r| r["form"].as_str().unwrap()).collect();
        assert_eq!(forms, ["conv", "matmul-const", "matmul-packed"]);
        for row in group {
            assert_eq!(u(row, "flops"), want[config]);
            let (ci, co, s, d) = (
                u(row, "c_in"),
                u(row, "c_out"),
                u(row, "spatial"),
                u(row, "depth"),
            );
            assert_eq!(u(row, "flops"), 2 * s * (ci * co + (d - 1) * co * co));
            check_rate(row);
        }
        assert_eq!(f(&group[0], "speed_vs_conv"), 1.0);
        assert!(group.iter().all(|r| f(r, "speed_vs_conv") > 0.0));
    }
}

#[test]
fn ane_int8_quick_pairs_fp16_and_w8a8() {
    let (report, _) = run_suite("ane-int8", &[]);
    let rows = check_report(&report, "ane-int8", 3);
    // (C, S, d) = (64, 64, 4) and (128, 64, 2).
    let want = [(64u64, 4u64, 2_097_152u64), (128, 2, 4_194_304)];
    assert_eq!(rows.len(), 4);
    for (pair, (c, d, flops)) in rows.chunks(2).zip(want) {
        assert_eq!(pair[0]["form"], "conv");
        assert_eq!(pair[1]["form"], "conv-int8");
        for row in pair {
            assert_eq!((u(row, "channels"), u(row, "depth")), (c, d));
            assert_eq!(u(row, "flops"), flops);
            check_rate(row);
        }
        assert_eq!(
            f(&pair[0], "weight_mib"),
            (c * c * d * 2) as f64 / 1048576.0
        );
        assert_eq!(f(&pair[1], "weight_mib"), (c * c * d) as f64 / 1048576.0);
        assert_eq!(f(&pair[0], "speedup_vs_fp16"), 1.0);
        let speedup = f(&pair[1], "speedup_vs_fp16");
        let want = f(&pair[0], "median_ms") / f(&pair[1], "median_ms");
        assert!((speedup - want).abs() <= 1e-9 * want, "{speedup} vs {want}");
    }
}

#[test]
fn ane_all_quick_writes_every_suite() {
    let (report, stdout) = run_suite("ane-all", &[]);
    let suites: Vec<&str> = report["suites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["suite"].as_str().unwrap())
        .collect();
    assert_eq!(
        suites,
        [
            "ane-peak",
            "ane-dispatch",
            "ane-sram",
            "ane-conv-vs-matmul",
            "ane-int8"
        ]
    );
    for suite in suites {
        assert!(stdout.contains(&format!("{suite} on cpu")), "{stdout}");
    }
}

#[test]
fn ane_backend_is_a_clear_error_here() {
    let out = anemone()
        .args(["bench", "ane-dispatch", "--quick", "--backend", "ane"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ANE unavailable") && err.contains("hint: use --backend cpu"),
        "{err}"
    );
}

#[test]
fn train_step_reports_flops_phases_and_losses() {
    let path = json_path("train-step");
    let out = anemone()
        .args([
            "bench",
            "train-step",
            "--config",
            "tiny",
            "--seq",
            "32",
            "--batch",
            "2",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--threads",
            "2",
            "--ops",
            "--json",
        ])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    std::fs::remove_file(&path).unwrap();
    // The op profile counts every plan step. Per layer and sequence, weight
    // products: attn_fwd 3 projections, wo_fwd 1, ffn_fwd 3, ffn_bwd_w2 1,
    // ffn_bwd_w13 2, wo_bwd 1, q_bwd 1, kv_bwd 2: 14. Attention, fused (causal
    // mask): attn_fwd one step for softmax(QK^T) V; attn_bwd one step for the
    // probabilities, one for the softmax backward (with dP = dO V^T in it) and
    // three products with a causal factor (dV, dQ, dK); its recomputed PV is
    // dead and dropped. Times 4 layers and 2 sequences.
    let ops = r["ops"].as_array().unwrap();
    let calls = |prefix: &str| -> f64 {
        ops.iter()
            .filter(|o| o["label"].as_str().unwrap().starts_with(prefix))
            .map(|o| o["calls_per_step"].as_f64().unwrap())
            .sum()
    };
    assert_eq!(calls("matmul "), 14.0 * 8.0, "{ops:?}");
    assert_eq!(calls("matmul(causal P"), 3.0 * 8.0, "{ops:?}");
    assert_eq!(calls("causal attention"), 8.0, "{ops:?}");
    assert_eq!(calls("causal softmax"), 8.0, "{ops:?}");
    assert_eq!(calls("softmax backward"), 8.0, "{ops:?}");
    // No separate mask/softmax steps remain.
    assert_eq!(calls("softmax(x*s+mask)") + calls("softmax ->"), 0.0);
    assert!(stdout.contains("CPU plan steps (top"), "{stdout}");
    // tiny: dim 192, 4 layers, FFN 512, vocab 1024. Per token forward:
    // 2 * (4 * (4 * 192^2 + 3 * 192 * 512) + 1024 * 192) = 2 * 1,966,080 = 3,932,160
    // plus attention 4 * 32 * 192 * 4 layers = 98,304; training x3, 64 tokens:
    // 3 * 64 * 4,030,464 = 773,849,088.
    assert!((f(&r, "gflop_per_step") * 1e9 - 773_849_088.0).abs() < 1.0);
    assert_eq!((u(&r, "seq"), u(&r, "batch"), u(&r, "steps")), (32, 2, 2));
    assert!(f(&r, "ms_min") <= f(&r, "ms_median") && f(&r, "ms_median") <= f(&r, "ms_max"));
    assert!(f(&r, "gemm_peak_gflops") > 0.0 && f(&r, "gflops") > 0.0);
    // The machine, against /proc/cpuinfo's first processor (Linux x86-64).
    if let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") {
        let field = |name: &str| {
            info.lines()
                .find(|l| l.split(':').next().map(str::trim) == Some(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        };
        if let (Some(model), Some(flags)) = (field("model name"), field("flags")) {
            let has = |f: &str| flags.split_whitespace().any(|x| x == f);
            let simd = if has("avx512f") {
                "AVX-512"
            } else if has("avx2") && has("fma") {
                "AVX2+FMA"
            } else {
                "baseline"
            };
            assert_eq!(r["cpu"].as_str(), Some(model.as_str()));
            assert_eq!(r["simd"].as_str(), Some(simd));
            assert!(
                stdout.contains(&format!("machine      {model} ({simd})")),
                "{stdout}"
            );
        }
    }
    let phases: Vec<&str> = r["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for name in [
        "attn_fwd",
        "attn_bwd",
        "ffn_fwd",
        "dW gemm",
        "optimizer",
        "io",
        "other",
    ] {
        assert!(phases.contains(&name), "{name} missing from {phases:?}");
    }
    // With two threads the weight gradients run beside the backward kernels:
    // their whole time is listed apart, and the text says so.
    let side: Vec<(&str, f64)> = r["side_by_side"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["ms_per_step"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(side.len(), 1, "{side:?}");
    assert!(side[0].0 == "dW gemm" && side[0].1 > 0.0, "{side:?}");
    assert!(stdout.contains("side by side (whole time"), "{stdout}");
    assert_eq!(u(&r, "threads"), 2);
    // Random tokens over 1024 ids: the loss starts near ln(1024) = 6.93.
    let losses = r["losses"].as_array().unwrap();
    assert_eq!(losses.len(), 2);
    assert!(
        losses
            .iter()
            .all(|l| (l.as_f64().unwrap() - 6.93).abs() < 0.3)
    );
    assert!(stdout.contains("ms/step") && stdout.contains("dW gemm"));
    // Energy of the timed steps: "unavailable" (never 0) without counters.
    assert!(stdout.contains("energy"), "{stdout}");
    if std::env::consts::OS != "macos" {
        for field in [
            "cpu_j",
            "gpu_j",
            "ane_j",
            "joules_per_step",
            "tokens_per_joule",
        ] {
            assert_eq!(r["energy"][field], "unavailable", "{field}");
        }
    }
}

/// `bench train-step --lora`: LoRA steps with the adapters the flags say,
/// their FLOP count (2 x forward + the adapters' products), the merge timed
/// as its own phase; the LoRA flags need `--lora`.
#[test]
fn train_step_times_lora_steps() {
    let path = json_path("train-step-lora");
    let out = anemone()
        .args(["bench", "train-step", "--config", "tiny", "--seq", "32"])
        .args([
            "--batch",
            "2",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--threads",
            "2",
        ])
        .args(["--lora", "--lora-rank", "4", "--lora-targets", "down,q"])
        .args(["--lora-layers", "2", "--json"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(r["training"], "lora r=4 q,down (2 of 4 layers)");
    assert!(
        stdout.contains("(lora r=4 q,down (2 of 4 layers))"),
        "{stdout}"
    );
    // tiny at T=32: forward 4,030,464 per token (see above), twice; the
    // adapters 4 r (in + out) per token: q 192 + 192, down 512 + 192, on 2
    // layers: 4 * 4 * 2 * 1088 = 34,816. Times 64 tokens: 518,127,616.
    assert!((f(&r, "gflop_per_step") * 1e9 - 518_127_616.0).abs() < 1.0);
    let phases: Vec<&str> = r["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for name in ["attn_fwd", "ffn_bwd_w13", "dW gemm", "optimizer", "merge"] {
        assert!(phases.contains(&name), "{name} missing from {phases:?}");
    }
    let losses = r["losses"].as_array().unwrap();
    assert_eq!(losses.len(), 2);
    assert!(
        losses
            .iter()
            .all(|l| (l.as_f64().unwrap() - 6.93).abs() < 0.3),
        "{losses:?}"
    );
    assert!(f(&r, "peak_rss_mb") > 0.0);

    let out = anemone()
        .args([
            "bench",
            "train-step",
            "--config",
            "tiny",
            "--lora-rank",
            "4",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--lora"), "{err}");
}
