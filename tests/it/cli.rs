//! The `anemone` binary end to end: `mil run` against NumPy, `mil check`
//! diagnostics, and errors that name the problem.

use std::process::Command;

use crate::common::{Tolerance, fixture, read_npy_f32};

fn anemone() -> Command {
    Command::new(env!("CARGO_BIN_EXE_anemone"))
}

#[test]
fn mil_run_conv_with_blobfile_weight_matches_numpy() {
    // Package and expected output from scripts/gen_mil_run_fixture.py
    // (weight blob written by coremltools, reference by NumPy).
    let pkg = fixture("mil_run").join("conv");
    let out = std::env::temp_dir().join(format!("anemone-mil-run-{}", std::process::id()));
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
    let dir = std::env::temp_dir().join(format!("anemone-mil-check-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("weights")).unwrap();
    std::fs::copy(
        fixture("mil_run").join("conv/weights/w.bin"),
        dir.join("weights/w.bin"),
    )
    .unwrap();
    let good = std::fs::read_to_string(fixture("mil_run").join("conv/model.mil")).unwrap();
    let ok = anemone()
        .args(["mil", "check"])
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
