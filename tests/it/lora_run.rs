//! `anemone train --lora` end to end (issue 21): a LoRA run on chat JSONL
//! made from tinyshakespeare and a committed tiny Qwen2 checkpoint learns,
//! leaves the base's bytes alone, writes PEFT adapters and its base's
//! fingerprint, resumes exactly, and is applied by `eval`, `generate` and
//! `fuse`; a changed base and bad flags are clear errors. The adapters'
//! gradients and AdamW steps against PEFT are `tests/it/lora.rs`'s.

use std::path::{Path, PathBuf};

use anemone::model::hf::adapter::{CONFIG_FILE, read_adapters};
use anemone::train::lora::load_checkpoint;

use crate::common::{anemone, fails, fixture, shared_data, succeeds, temp_dir};

/// A copy of the tiny qwen2 fixture (the tests change it or watch its bytes).
fn base_copy(dir: &Path) -> PathBuf {
    let base = dir.join("base");
    std::fs::create_dir_all(&base).unwrap();
    for entry in std::fs::read_dir(fixture("hf").join("qwen2")).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() != "reference.safetensors" {
            std::fs::copy(&path, base.join(path.file_name().unwrap())).unwrap();
        }
    }
    base
}

/// Every file of `dir` with its bytes, sorted by name.
fn contents(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    files.sort();
    files
}

/// `dir/data` with train.jsonl and valid.jsonl: consecutive line pairs of
/// tinyshakespeare as a user line and the assistant's answer, every tenth
/// pair held out; `None` without ../shared.
fn chat_data(dir: &Path, pairs: usize) -> Option<PathBuf> {
    let text = std::fs::read_to_string(shared_data("tinyshakespeare.txt")?).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let (mut train, mut valid) = (String::new(), String::new());
    for (index, pair) in lines.chunks_exact(2).take(pairs).enumerate() {
        let row = serde_json::json!({"messages": [
            {"role": "user", "content": pair[0]},
            {"role": "assistant", "content": pair[1]},
        ]});
        let out = if index % 10 == 0 {
            &mut valid
        } else {
            &mut train
        };
        out.push_str(&row.to_string());
        out.push('\n');
    }
    std::fs::write(data.join("train.jsonl"), train).unwrap();
    std::fs::write(data.join("valid.jsonl"), valid).unwrap();
    Some(data)
}

/// `train --lora` of `base` on `data` into `run`, with `extra` flags.
fn lora_train(base: &Path, data: &Path, run: &Path, extra: &[&str]) -> String {
    succeeds(
        anemone()
            .args([
                "--threads",
                "1",
                "train",
                "--lora",
                "--mask-prompt",
                "--init",
            ])
            .arg(base)
            .arg("--data")
            .arg(data)
            .arg("--out")
            .arg(run)
            .args(["--seq", "64", "--lr", "1e-2", "--warmup", "5"])
            .args(extra),
    )
}

/// The `val_loss` values of a run's metrics.jsonl, in order.
fn val_losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["val_loss"].as_f64())
        .collect()
}

/// `eval`'s `loss X` of `model` on `tokens` in windows of 32.
fn eval_loss(model: &Path, tokens: &Path) -> f64 {
    eval_loss_at(model, tokens, "32")
}

/// `eval`'s `loss X` of `model` on `tokens` in windows of `seq`.
fn eval_loss_at(model: &Path, tokens: &Path, seq: &str) -> f64 {
    let out = anemone()
        .args(["eval", "--seq", seq, "--model"])
        .arg(model)
        .arg("--data")
        .arg(tokens)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = String::from_utf8(out.stdout).unwrap();
    let loss = out.split_whitespace().nth(1).unwrap();
    loss.parse().unwrap_or_else(|_| panic!("{out}"))
}

#[test]
fn a_lora_run_learns_keeps_the_base_and_is_applied_by_eval_generate_and_fuse() {
    let dir = temp_dir("lora-run");
    let Some(data) = chat_data(&dir, 600) else {
        return;
    };
    let base = base_copy(&dir);
    let before = contents(&base);
    let run = dir.join("run");
    let steps = ["--steps", "150", "--batch", "8", "--eval-every", "10"];
    let log = lora_train(&base, &data, &run, &steps);
    assert!(
        log.contains("LoRA rank 8 alpha 16 on 14 projections"),
        "{log}"
    );
    assert_eq!(contents(&base), before, "the base's bytes changed");
    // Learning: the held-out masked loss falls clearly.
    let losses = val_losses(&run);
    assert_eq!(losses.len(), 15, "{losses:?}");
    assert!(losses[14] < losses[0] - 0.5, "held-out loss {losses:?}");
    // PEFT's layout, the defaults, and the base recorded.
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("adapters").join(CONFIG_FILE)).unwrap())
            .unwrap();
    assert_eq!(
        (config["r"].as_u64(), config["lora_alpha"].as_f64()),
        (Some(8), Some(16.0))
    );
    assert_eq!(config["target_modules"].as_array().unwrap().len(), 7);
    let base_model = config["base_model_name_or_path"].as_str().unwrap();
    assert_eq!(Path::new(base_model), std::path::absolute(&base).unwrap());
    let record = std::fs::read_to_string(run.join("base.json")).unwrap();
    assert!(record.contains("\"fingerprint\": \"crc32 "), "{record}");
    // The checkpoint's adapters are those written for PEFT.
    let ckpt = load_checkpoint(&run.join("lora_checkpoint.bin")).unwrap();
    let written = read_adapters(&run.join("adapters"), ckpt.adapters.model()).unwrap();
    assert!(written.data == ckpt.adapters.data);
    assert!(ckpt.adapters.data.iter().any(|&v| v != 0.0));
    // eval, generate and fuse apply base + adapters: the run and its fused
    // Hugging Face directory give the same loss and the same greedy text,
    // and the loss differs from the base's.
    let text = dir.join("eval.txt");
    std::fs::write(
        &text,
        "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    )
    .unwrap();
    let tokens = dir.join("eval.bin");
    succeeds(
        anemone()
            .args(["tokenize", "--val-fraction", "0", "--tokenizer"])
            .arg(&base)
            .arg("--input")
            .arg(&text)
            .arg("--out")
            .arg(&tokens),
    );
    let fused = dir.join("fused");
    succeeds(
        anemone()
            .args(["fuse", "--model"])
            .arg(&run)
            .arg("--out")
            .arg(&fused),
    );
    let (of_run, of_fused) = (eval_loss(&run, &tokens), eval_loss(&fused, &tokens));
    assert!(
        (of_run - of_fused).abs() <= 1e-6 * of_fused,
        "{of_run} vs {of_fused}"
    );
    assert!((of_run - eval_loss(&base, &tokens)).abs() > 1e-3);
    let generate = |model: &Path| {
        let args = [
            "--chat",
            "--prompt",
            "Speak.",
            "--temperature",
            "0",
            "--max-tokens",
            "8",
        ];
        let output = anemone()
            .arg("generate")
            .arg("--model")
            .arg(model)
            .args(args)
            .output();
        String::from_utf8(output.unwrap().stdout).unwrap()
    };
    assert_eq!(generate(&run), generate(&fused));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `train --lora` of `base` on `data` for 12 steps with `extra` flags,
/// whole and stopped after 5 then resumed: the adapters, moments and every
/// metrics row are the same bits. Returns the whole run's directory.
fn resumes_exactly(dir: &Path, base: &Path, data: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let (whole, split) = (
        dir.join(format!("{name}whole")),
        dir.join(format!("{name}split")),
    );
    let steps = [
        "--steps",
        "12",
        "--checkpoint-every",
        "4",
        "--eval-every",
        "6",
    ];
    lora_train(base, data, &whole, &[&steps[..], extra].concat());
    lora_train(
        base,
        data,
        &split,
        &[&steps[..], extra, &["--stop-after", "5"]].concat(),
    );
    succeeds(
        anemone()
            .args(["--threads", "1", "train", "--resume"])
            .arg(&split),
    );
    let adapters = |run: &Path| {
        let ckpt = load_checkpoint(&run.join("lora_checkpoint.bin")).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        (
            bits(&ckpt.adapters.data),
            bits(&ckpt.moments.0),
            bits(&ckpt.moments.1),
        )
    };
    assert!(
        adapters(&whole) == adapters(&split),
        "{name}: resumed adapters differ"
    );
    assert_eq!(metrics_rows(&whole), metrics_rows(&split), "{name}");
    whole
}

/// Each metrics.jsonl row's step, train_loss and val_loss.
fn metrics_rows(run: &Path) -> Vec<(Option<u64>, Option<f64>, Option<f64>)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let row: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                row["step"].as_u64(),
                row["train_loss"].as_f64(),
                row["val_loss"].as_f64(),
            )
        })
        .collect()
}

/// Exact resume without and with dropout on the adapters' input (its masks
/// are drawn again from the run's seed, update, micro-batch and sequence,
/// so a resumed run draws the uninterrupted run's); the dropout run trains
/// on other losses than the run without it and still learns.
#[test]
fn a_lora_run_resumes_exactly_and_refuses_a_changed_base() {
    let dir = temp_dir("lora-resume");
    let Some(data) = chat_data(&dir, 200) else {
        return;
    };
    let base = base_copy(&dir);
    let whole = resumes_exactly(&dir, &base, &data, "", &[]);
    let dropout = resumes_exactly(&dir, &base, &data, "dropout-", &["--lora-dropout", "0.1"]);
    let unmerged = resumes_exactly(&dir, &base, &data, "unmerged-", &["--lora-unmerged"]);
    let train_losses =
        |run: &Path| -> Vec<f64> { metrics_rows(run).iter().filter_map(|row| row.1).collect() };
    let (plain, dropped) = (train_losses(&whole), train_losses(&dropout));
    assert_eq!(plain.len(), dropped.len());
    // The first update's losses: the same adapters (B = 0, so dropout
    // changes no forward yet), then other gradients and other losses.
    assert_eq!(plain[0], dropped[0]);
    assert!(plain[1..].iter().zip(&dropped[1..]).all(|(a, b)| a != b));
    let val = val_losses(&dropout);
    assert!(val.len() >= 2 && val[val.len() - 1] < val[0], "{val:?}");
    // The adapters beside the base train the merged run's model: its
    // losses to rounding.
    for (a, b) in plain.iter().zip(&train_losses(&unmerged)) {
        assert!((a - b).abs() <= 1e-5 * a, "{plain:?} vs unmerged");
    }
    let err = fails(
        anemone()
            .args(["train", "--lora-unmerged", "--resume"])
            .arg(&whole),
    );
    assert!(
        err.contains("--lora-unmerged on conflicts with the run"),
        "{err}"
    );
    // A flag that would change the run.
    let err = fails(
        anemone()
            .args(["train", "--lora-rank", "4", "--resume"])
            .arg(&whole),
    );
    assert!(
        err.contains("--lora-rank 4 conflicts with the run"),
        "{err}"
    );
    // The base changes after the run began: resuming and evaluating refuse.
    let weights = base.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&weights, bytes).unwrap();
    let err = fails(
        anemone()
            .args(["train", "--steps", "14", "--resume"])
            .arg(&whole),
    );
    assert!(
        err.contains("base.json: fingerprint: the base model") && err.contains("has changed"),
        "{err}"
    );
    let err = fails(
        anemone()
            .args(["fuse", "--model"])
            .arg(&whole)
            .arg("--out")
            .arg(dir.join("f")),
    );
    assert!(err.contains("has changed since the run began"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_lora_flags_and_rows_are_clear_errors() {
    let dir = temp_dir("lora-flags");
    let base = base_copy(&dir);
    let data = dir.join("rows.jsonl");
    std::fs::write(
        &data,
        "{\"text\": \"one\"}\n{\"text\": \"two\"}\n{\"prompt\": \"p\"}\n",
    )
    .unwrap();
    let train = |args: &[&str]| fails(anemone().arg("train").args(args));
    let err = train(&["--lora", "--data", data.to_str().unwrap()]);
    assert!(
        err.contains("--lora trains adapters on a frozen base model: name it with --init"),
        "{err}"
    );
    let init = base.to_str().unwrap();
    let err = train(&[
        "--init",
        init,
        "--lora-rank",
        "4",
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(
        err.contains("--lora-rank sets up LoRA adapters: add --lora"),
        "{err}"
    );
    let err = train(&["--init", init, "--lora", "--data", data.to_str().unwrap()]);
    assert!(
        err.contains("rows.jsonl: line 3") && err.contains("completion"),
        "{err}"
    );
    let err = train(&["--init", init, "--lora", "--lora-targets", "q,lm_head"]);
    assert!(
        err.contains("lm_head") && err.contains("possible values"),
        "{err}"
    );
    let err = train(&[
        "--init",
        init,
        "--lora",
        "--lora-layers",
        "3",
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(err.contains("--lora-layers 3 is out of range"), "{err}");
    let err = train(&[
        "--init",
        init,
        "--lora",
        "--lora-dropout",
        "1",
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(
        err.contains("--lora-dropout 1.0 is out of range: expected a number in [0, 1)"),
        "{err}"
    );
    let tokens = dir.join("tokens.bin");
    std::fs::write(&tokens, [1u8, 0, 2, 0, 3, 0, 4, 0]).unwrap();
    let err = train(&[
        "--init",
        init,
        "--mask-prompt",
        "--data",
        tokens.to_str().unwrap(),
    ]);
    assert!(
        err.contains("--mask-prompt leaves prompts out of the loss of JSONL examples"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The acceptance check against PEFT (issue 21): for three tiny fixtures,
/// the adapters of a `train --lora` run on `tests/fixtures/lora/chat.jsonl`
/// with the flags `scripts/check_lora_run.py` used, loaded by
/// `peft.PeftModel.from_pretrained` on the base in float64, gave the loss
/// the fixture records; `anemone eval` of the run and of `fuse`'s output
/// give it within 1e-5 relative (and `fuse`'s output gave it in transformers).
#[test]
fn a_lora_runs_adapters_give_peft_s_loss() {
    let fixture_path = fixture("lora").join("run-losses.json");
    let text = std::fs::read_to_string(&fixture_path).unwrap();
    let fixture_json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let flags: Vec<String> = fixture_json["train_flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    let seq = fixture_json["seq"].as_u64().unwrap().to_string();
    let data = fixture("lora").join("chat.jsonl");
    let models = fixture_json["models"].as_object().unwrap();
    assert_eq!(models.len(), 3);
    for (name, want) in models {
        let dir = temp_dir(&format!("lora-peft-{name}"));
        let base = fixture("hf").join(name);
        let tokens = crate::hf_cli::eval_tokens(name, &dir);
        let run = dir.join("run");
        succeeds(
            anemone()
                .args(["--threads", "1", "train", "--init"])
                .arg(&base)
                .arg("--data")
                .arg(&data)
                .arg("--out")
                .arg(&run)
                .args(&flags),
        );
        let fused = dir.join("fused");
        succeeds(
            anemone()
                .args(["fuse", "--model"])
                .arg(&run)
                .arg("--out")
                .arg(&fused),
        );
        let peft = want["peft_loss"].as_f64().unwrap();
        for model in [&run, &fused] {
            let loss = eval_loss_at(model, &tokens, &seq);
            let err = (loss - peft).abs() / peft;
            eprintln!(
                "{name}: anemone eval of {} {loss} vs peft {peft} ({err:.1e})",
                model.display()
            );
            assert!(err <= 1e-5, "{name}: {loss} vs peft {peft}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
