//! The `anemone` binary end to end: `mil run` against NumPy, `mil check`
//! diagnostics, and errors that name the problem.

use crate::common::{Tolerance, anemone, fixture, read_npy_f32, skip, temp_dir};

#[test]
fn mil_run_conv_with_blobfile_weight_matches_numpy() {
    // Package and expected output from scripts/gen_mil_run_fixture.py
    // (weight blob written by coremltools, reference by NumPy).
    let pkg = fixture("mil_run").join("conv");
    let out = temp_dir("mil-run");
    let status = anemone()
        .args(["mil", "run"])
        .arg(&pkg)
        .arg("--input")
        .arg(format!("x={}", pkg.join("x.npy").display()))
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let got = read_npy_f32(&out.join("y.npy"));
    let want = read_npy_f32(&pkg.join("y.npy"));
    Tolerance {
        relative: 1e-6,
        absolute: 1e-6,
    }
    .assert_close(&got, &want, "mil run y");
}

#[test]
fn mil_check_reports_and_fails_on_bad_programs() {
    let dir = temp_dir("mil-check");
    std::fs::create_dir_all(dir.join("weights")).unwrap();
    std::fs::copy(
        fixture("mil_run").join("conv/weights/w.bin"),
        dir.join("weights/w.bin"),
    )
    .unwrap();
    let good = std::fs::read_to_string(fixture("mil_run").join("conv/model.mil")).unwrap();
    // The fixture is CPU-sized (8 channels, 6 positions): the ANE's I/O rules
    // (ANE009/ANE010/ANE015/ANE016) refuse it since issue 22.
    let ok = anemone()
        .args(["mil", "check", "--target", "cpu"])
        .arg(fixture("mil_run").join("conv"))
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let cases = [
        (good.replace("= conv(", "= convolve("), "convolve"),
        (
            good.replace("offset = uint64(64)", "offset = uint64(100)"),
            "100",
        ),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad{i}.mil"));
        std::fs::write(&path, text).unwrap();
        let out = anemone()
            .args(["mil", "check"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(needle), "case {i}: {stderr}");
    }
}

#[test]
fn train_with_a_missing_data_file_names_it() {
    let out = anemone()
        .args(["train", "--data", "/nonexistent/tokens.bin", "--steps", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("/nonexistent/tokens.bin"), "{stderr}");
}

/// A tiny model config file and a token file of random ids for it.
fn tiny_run_inputs(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let config = dir.join("model.json");
    std::fs::write(
        &config,
        r#"{"dim": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "head_dim": 8,
            "hidden_dim": 64, "vocab_size": 64, "seq_len": 16}"#,
    )
    .unwrap();
    let tokens = dir.join("tokens.bin");
    let mut rng = anemone::rng::Rng::new(2);
    let ids: Vec<u32> = (0..4000).map(|_| rng.below(64) as u32).collect();
    let mut w = anemone::data::tokens::TokenWriter::create(&tokens, 64).unwrap();
    w.extend(&ids).unwrap();
    w.finish().unwrap();
    (config, tokens)
}

#[test]
fn train_backend_ane_without_an_ane_exits_2_with_a_hint() {
    let Some(reason) = anemone::backend::ane::platform_unavailable_reason() else {
        skip("this machine may have an ANE");
        return;
    };
    let out = anemone()
        .args(["train", "--backend", "ane", "--steps", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with("error: ane backend: dlopen: ANE unavailable: not "),
        "{stderr}"
    );
    assert!(stderr.contains(&reason), "{stderr}");
    if std::env::consts::OS == "linux" {
        assert!(stderr.contains("ANE unavailable: not macOS"), "{stderr}");
    }
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("hint: use --backend cpu")),
        "{stderr}"
    );
}

#[test]
fn doctor_reports_the_cpu_stand_in_and_writes_json() {
    let dir = temp_dir("cli-doctor");
    let (config, _) = tiny_run_inputs(&dir);
    let json = dir.join("report.json");
    let out = anemone()
        .args(["doctor", "--seq", "16", "--config"])
        .arg(&config)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["os"], std::env::consts::OS);
    let rows = report["kernels"]["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["kernel"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "attn_fwd",
            "wo_fwd",
            "ffn_fwd",
            "ffn_bwd_w2",
            "ffn_bwd_w13",
            "wo_bwd",
            "attn_bwd",
            "q_bwd",
            "kv_bwd",
            "attn_bwd_dv",
            "attn_bwd_dqk",
            "lora:attn_fwd",
            "lora:wo_fwd",
            "lora:ffn_fwd",
            "lora:ffn_bwd_w2",
            "lora:ffn_bwd_w13",
            "lora:wo_bwd",
            "lora:attn_bwd",
            "lora:q_bwd",
            "lora:kv_bwd"
        ]
    );
    for r in rows {
        assert_eq!(r["ok"], true, "{r}");
        assert!(r["max_error"].as_f64().unwrap() > 0.0, "{r}");
    }
    // wo_fwd: [q_dim = 32 channels, T + dim = 48 columns] -> [dim 32, T 16].
    assert_eq!(rows[1]["input"], serde_json::json!([32, 48]));
    assert_eq!(rows[1]["output"], serde_json::json!([32, 16]));
    if anemone::backend::ane::platform_unavailable_reason().is_some() {
        assert_eq!(report["energy"]["available"], false);
        assert_eq!(report["energy"]["idle_sample"]["ane_j"], "unavailable");
        assert_eq!(report["checks"], serde_json::json!([]));
        assert_eq!(report["auto_backend"], "cpu");
        assert_eq!(report["ane"]["available"], false);
        assert!(
            report["ane"]["reason"]
                .as_str()
                .unwrap()
                .contains("ANE unavailable"),
            "{report}"
        );
        assert_eq!(report["kernels"]["subject"], "cpu-fp16");
        assert!(report["probe"].is_null());
        assert_eq!(report["auto_backend"], "cpu");
        assert!(stdout.contains("backend:   cpu"), "{stdout}");
        assert!(stdout.contains("ane:       unavailable"), "{stdout}");
    }
    assert!(stdout.contains("kv_bwd"), "{stdout}");
}

#[test]
fn restart_every_execs_a_resuming_process_that_matches_an_uninterrupted_run() {
    let dir = temp_dir("cli-restart");
    let (config, tokens) = tiny_run_inputs(&dir);
    let train = |out: &str, extra: &[&str]| {
        let o = anemone()
            .args(["train", "--backend", "auto", "--steps", "5", "--batch", "2"])
            .args(["--seq", "16", "--eval-every", "0", "--eval-batches", "1"])
            .args(["--checkpoint-every", "0", "--samples", "0", "--config"])
            .arg(&config)
            .arg("--data")
            .arg(&tokens)
            .arg("--out")
            .arg(dir.join(out))
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{stderr}");
        stderr
    };
    let full = train("full", &[]);
    if anemone::backend::ane::platform_unavailable_reason().is_some() {
        assert!(
            full.contains("backend: cpu (ane backend: dlopen: ANE unavailable"),
            "{full}"
        );
    }
    let restarted = train("restarted", &["--restart-every", "2"]);
    assert_eq!(
        restarted.matches("[exec() restart at step").count(),
        2,
        "{restarted}"
    );
    assert!(restarted.contains("resumed"), "{restarted}");
    let load = |run: &str| {
        anemone::model::checkpoint::load(&dir.join(run).join("checkpoint.bin")).unwrap()
    };
    let (a, b) = (load("full"), load("restarted"));
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.weights.data), bits(&b.weights.data));
    let losses = |run: &str| -> Vec<(u64, f64)> {
        std::fs::read_to_string(dir.join(run).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["step"].as_u64().unwrap(),
                    v["train_loss"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(losses("full").len(), 5);
    assert_eq!(losses("full"), losses("restarted"));
}

/// `train --help` names every preset the library has (the list is written in
/// the flag's doc comment, so a new preset must be added there too).
#[test]
fn train_help_lists_every_preset() {
    let out = anemone().args(["train", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for preset in anemone::model::config::PRESETS {
        assert!(
            help.split(|c: char| c.is_whitespace() || c == ',')
                .any(|word| word == *preset),
            "train --help does not list the preset {preset}:\n{help}"
        );
    }
}
