//! `mpirun -np 2 anemone train` on this machine (issue 24; compiled with
//! `--features mpi`, run by `.ci/run` as `cargo test --features mpi --test it
//! mpi::`): two ranks with `--batch B` against one process with `--batch 2B`
//! (the reference), exact resume under the same mpirun line, ranks that
//! disagree refusing to start, and a killed rank ending the run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anemone::data::tokens::TokenWriter;
use anemone::model::{ModelConfig, checkpoint};
use anemone::rng::Rng;

use crate::common::{Tolerance, anemone, temp_dir};

/// The fp32 tolerance of another summation order (`dist.rs` has the why).
const LOSS: Tolerance = Tolerance {
    relative: 1e-5,
    absolute: 1e-6,
};
const WEIGHTS: Tolerance = Tolerance {
    relative: 1e-4,
    absolute: 1e-5,
};

/// `mpirun -np <ranks>` of this build's binary, allowed to run as root
/// (CI), on one machine with more ranks than cores if need be.
fn mpirun(ranks: usize) -> Command {
    let mut command = Command::new("mpirun");
    command
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .args(["--oversubscribe", "--bind-to", "none", "-np"])
        .arg(ranks.to_string())
        .arg(env!("CARGO_BIN_EXE_anemone"));
    command
}

/// A token file (ids below 64) and a small model's config file in `dir`.
fn inputs(dir: &Path) -> (PathBuf, PathBuf) {
    let tokens = dir.join("tokens.bin");
    let mut rng = Rng::new(3);
    let ids: Vec<u32> = (0..20_000).map(|_| rng.below(64) as u32).collect();
    let mut writer = TokenWriter::create(&tokens, 64).unwrap();
    writer.extend(&ids).unwrap();
    writer.finish().unwrap();
    let config = dir.join("model.json");
    let model = ModelConfig::llama(32, 2, 4, 2, 64, 64, 16);
    std::fs::write(&config, serde_json::to_vec(&model).unwrap()).unwrap();
    (tokens, config)
}

/// `train` flags of a run of `steps` updates of `batch` sequences per rank.
fn train_args(tokens: &Path, config: &Path, out: &Path, batch: usize, steps: u64) -> Vec<String> {
    let mut args: Vec<String> = ["--threads", "1", "train", "--backend", "cpu"]
        .map(String::from)
        .to_vec();
    let flags = [
        ("--data", tokens.display().to_string()),
        ("--config", config.display().to_string()),
        ("--out", out.display().to_string()),
        ("--batch", batch.to_string()),
        ("--steps", steps.to_string()),
        ("--seq", "16".into()),
        ("--accum", "2".into()),
        ("--lr", "3e-3".into()),
        ("--warmup", "2".into()),
        ("--eval-every", "4".into()),
        ("--seed", "4".into()),
    ];
    for (flag, value) in flags {
        args.push(flag.into());
        args.push(value);
    }
    args
}

fn succeeded(output: Output, what: &str) -> Output {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// `(train_loss, val_loss)` columns of a run's `metrics.jsonl`.
fn losses(run: &Path) -> (Vec<f32>, Vec<f32>) {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let column = |name: &str| {
        rows.iter()
            .filter_map(|row| row[name].as_f64().map(|v| v as f32))
            .collect()
    };
    (column("train_loss"), column("val_loss"))
}

#[test]
fn mpi_two_ranks_of_batch_b_match_one_process_of_batch_2b_issue_24() {
    let dir = temp_dir("mpi-match");
    let (tokens, config) = inputs(&dir);
    let one = dir.join("one");
    let output = anemone()
        .args(train_args(&tokens, &config, &one, 4, 8))
        .output()
        .unwrap();
    succeeded(output, "one process");
    let two = dir.join("two");
    let output = mpirun(2)
        .args(train_args(&tokens, &config, &two, 2, 8))
        .output()
        .unwrap();
    let output = succeeded(output, "mpirun -np 2");
    // Rank 0 alone reports: one summary line, not two.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.matches("held-out loss").count(), 1, "{stderr}");

    let (train_one, val_one) = losses(&one);
    let (train_two, val_two) = losses(&two);
    assert_eq!((train_one.len(), val_one.len()), (8, 2));
    LOSS.assert_close(&train_two, &train_one, "training losses");
    LOSS.assert_close(&val_two, &val_one, "held-out losses");
    // The comparison can fail: the losses move from step to step by far
    // more than the tolerance.
    let spread = train_one
        .iter()
        .fold(0.0f32, |m, l| m.max(l - train_one[0]).max(train_one[0] - l));
    assert!(spread > 1e-3, "{train_one:?}");
    let a = checkpoint::load(&one.join("checkpoint.bin")).unwrap();
    let b = checkpoint::load(&two.join("checkpoint.bin")).unwrap();
    WEIGHTS.assert_close(&b.weights.data, &a.weights.data, "final weights");
}

/// Issue 24, item 2: under mpirun the gradients are summed bucket by bucket
/// during the backward (nonblocking all-reduces polled between layers);
/// with two ranks every element is one addition in any bucketing, so the run
/// equals the flat all-reduce's (`ANEMONE_ALLREDUCE=flat`) bit for bit:
/// metrics (losses, norms) and final weights.
#[test]
fn mpi_overlapped_sums_equal_the_flat_all_reduce_bit_for_bit_issue_24() {
    let dir = temp_dir("mpi-overlap");
    let (tokens, config) = inputs(&dir);
    let run = |mode: &str| {
        let out = dir.join(mode);
        let output = mpirun(2)
            .env("ANEMONE_ALLREDUCE", mode)
            .args(train_args(&tokens, &config, &out, 2, 6))
            .output()
            .unwrap();
        succeeded(
            output,
            &format!("mpirun -np 2 with ANEMONE_ALLREDUCE={mode}"),
        );
        let metrics: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        let columns: Vec<[Option<f64>; 3]> = metrics
            .iter()
            .map(|row| ["train_loss", "grad_norm", "val_loss"].map(|name| row[name].as_f64()))
            .collect();
        (
            columns,
            checkpoint::load(&out.join("checkpoint.bin")).unwrap(),
        )
    };
    let (overlapped, a) = run("overlap");
    let (flat, b) = run("flat");
    assert_eq!(overlapped.len(), 6);
    assert_eq!(
        overlapped, flat,
        "losses and norms, overlapped against flat"
    );
    assert!(a.weights.data == b.weights.data, "final weights differ");
    // And an unknown mode is refused, naming the variable.
    let output = mpirun(2)
        .env("ANEMONE_ALLREDUCE", "ring")
        .args(train_args(&tokens, &config, &dir.join("ring"), 2, 6))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("ANEMONE_ALLREDUCE=ring"), "{stderr}");
}

#[test]
fn mpi_two_ranks_resume_exactly_issue_24() {
    let dir = temp_dir("mpi-resume");
    let (tokens, config) = inputs(&dir);
    let straight = dir.join("straight");
    let output = mpirun(2)
        .args(train_args(&tokens, &config, &straight, 2, 8))
        .output()
        .unwrap();
    succeeded(output, "straight run");
    let split = dir.join("split");
    let output = mpirun(2)
        .args(train_args(&tokens, &config, &split, 2, 8))
        .args(["--stop-after", "3"])
        .output()
        .unwrap();
    succeeded(output, "first half");
    let output = mpirun(2)
        .args(["--threads", "1", "train", "--backend", "cpu", "--resume"])
        .arg(&split)
        .output()
        .unwrap();
    succeeded(output, "resumed half");
    assert_eq!(losses(&straight), losses(&split));
    let a = checkpoint::load(&straight.join("checkpoint.bin")).unwrap();
    let b = checkpoint::load(&split.join("checkpoint.bin")).unwrap();
    assert!(a.weights.data == b.weights.data, "resumed weights differ");
}

#[test]
fn mpi_ranks_that_disagree_refuse_to_start_issue_24() {
    let dir = temp_dir("mpi-disagree");
    let (tokens, config) = inputs(&dir);
    let out = dir.join("run");
    let mut second = train_args(&tokens, &config, &out, 2, 8);
    let seed = second.iter().position(|a| a == "--seed").unwrap();
    second[seed + 1] = "5".into();
    // MPMD: rank 0 and rank 1 run different command lines.
    let output = mpirun(1)
        .args(train_args(&tokens, &config, &out, 2, 8))
        .args([":", "-np", "1", env!("CARGO_BIN_EXE_anemone")])
        .args(second)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("rank 1 of 2 has another config than rank 0"),
        "{stderr}"
    );
    assert!(!out.join("checkpoint.bin").exists());
}

/// The process of `rank` among `mpirun`'s children (Linux: its environment).
fn rank_pid(mpirun: u32, rank: usize) -> Option<u32> {
    let wanted = format!("OMPI_COMM_WORLD_RANK={rank}");
    for entry in std::fs::read_dir("/proc").ok()? {
        let Ok(pid) = entry.ok()?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Field 4 of /proc/PID/stat, after the parenthesized name, is the parent.
        let parent = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let has_rank = environ
            .split(|b| *b == 0)
            .any(|var| var == wanted.as_bytes());
        if parent == Some(mpirun) && has_rank {
            return Some(pid);
        }
    }
    None
}

#[test]
fn mpi_killed_rank_ends_the_run_and_its_checkpoint_resumes_issue_24() {
    let dir = temp_dir("mpi-kill");
    let (tokens, config) = inputs(&dir);
    let out = dir.join("run");
    let mut child = mpirun(2)
        .args(train_args(&tokens, &config, &out, 2, 100_000))
        .args(["--checkpoint-every", "3"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !out.join("checkpoint.bin").exists() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let victim = rank_pid(child.id(), 1).expect("rank 1's process among mpirun's children");
    let killed = Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let killed_at = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if killed_at.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("rank 0 still runs 30 s after rank 1 was killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "mpirun exited 0 after a rank was killed");
    assert!(killed_at.elapsed() < Duration::from_secs(15));

    // The last checkpoint loads, and the same mpirun line resumes it.
    let saved = checkpoint::load(&out.join("checkpoint.bin")).unwrap();
    let step = saved.state["step"].as_u64().unwrap();
    assert!(step >= 3 && step.is_multiple_of(3), "step {step}");
    let output = mpirun(2)
        .args(["--threads", "1", "train", "--backend", "cpu", "--resume"])
        .arg(&out)
        .args(["--steps", &(step + 2).to_string()])
        .output()
        .unwrap();
    succeeded(output, "resume after the kill");
    let resumed = checkpoint::load(&out.join("checkpoint.bin")).unwrap();
    assert_eq!(resumed.state["step"].as_u64(), Some(step + 2));
}

/// LoRA under mpirun (issue 24): two ranks of `--batch 2` on fine-tuning
/// examples (prompts masked) against one process of `--batch 4`: the same
/// losses and adapters; rank 0 alone writes the adapters.
#[test]
fn mpi_two_lora_ranks_of_batch_b_match_one_process_of_batch_2b_issue_24() {
    let dir = temp_dir("mpi-lora");
    let data = dir.join("data.jsonl");
    let rows: String = (0..60)
        .map(|i| {
            let prompt = ["the king", "a rose", "the sea at night"][i % 3];
            let completion = ["wind", "a crown of gold", "rose and sea", "night"][i % 4];
            format!(
                "{}\n",
                serde_json::json!({"prompt": prompt, "completion": completion})
            )
        })
        .collect();
    std::fs::write(&data, rows).unwrap();
    let base = crate::common::fixture("hf").join("qwen2");
    let args = |out: &Path, batch: usize| -> Vec<String> {
        let mut args: Vec<String> = ["--threads", "1", "train", "--lora", "--mask-prompt"]
            .map(String::from)
            .to_vec();
        for (flag, value) in [
            ("--init", base.display().to_string()),
            ("--data", data.display().to_string()),
            ("--out", out.display().to_string()),
            ("--batch", batch.to_string()),
            ("--steps", "6".into()),
            ("--seq", "64".into()),
            ("--accum", "2".into()),
            ("--lr", "2e-2".into()),
            ("--eval-every", "3".into()),
            ("--lora-rank", "4".into()),
        ] {
            args.push(flag.into());
            args.push(value);
        }
        args
    };
    let one = dir.join("one");
    succeeded(
        anemone().args(args(&one, 4)).output().unwrap(),
        "one process",
    );
    let two = dir.join("two");
    succeeded(
        mpirun(2).args(args(&two, 2)).output().unwrap(),
        "mpirun -np 2",
    );
    let (train_one, val_one) = losses(&one);
    let (train_two, val_two) = losses(&two);
    assert_eq!((train_one.len(), val_one.len()), (6, 2));
    LOSS.assert_close(&train_two, &train_one, "LoRA training losses");
    LOSS.assert_close(&val_two, &val_one, "LoRA held-out losses");
    let load = |run: &Path| anemone::train::lora::load_checkpoint(&run.join("lora_checkpoint.bin"));
    let (a, b) = (load(&one).unwrap(), load(&two).unwrap());
    WEIGHTS.assert_close(&b.adapters.data, &a.adapters.data, "final adapters");
    assert!(a.adapters.data.iter().any(|&v| v != 0.0));
}
