//! Every command of the README's fenced `sh` blocks runs here, so the README
//! cannot drift from the tool (issue 23, class 8). A new command in a block
//! is covered without touching this file.
//!
//! How a block runs: in a fresh directory of its own (its commands share it,
//! as a reader's shell would), each line a command, `# comments` dropped.
//! `anemone ARGS` and `cargo run --release -- ARGS` run this build's binary.
//! Sizes are overridden where the README's would take minutes ([`OVERRIDES`]:
//! fewer steps, small batches and windows, a small built-in corpus, few
//! generated tokens); the README's own values stay otherwise. Its input
//! files are provided: `my.txt` (built-in stories), `my.jsonl` (short text
//! rows), `smollm2` (a tiny model directory), `tinyshakespeare.txt`
//! (the shared data file; the block is skipped visibly where it is absent).
//! Commands this test cannot run are [`EXCEPTIONS`], each named with why.

use std::path::Path;

use crate::common::{anemone, shared_data, temp_dir};

/// Flags set (or replaced) on a subcommand to keep it to seconds, and why.
const OVERRIDES: &[(&str, &[(&str, &str)])] = &[
    (
        "train",
        &[
            ("--steps", "2"),
            ("--warmup", "1"),
            ("--batch", "1"),
            ("--seq", "32"),
            ("--eval-every", "1"),
            ("--eval-batches", "1"),
        ],
    ),
    ("generate", &[("--max-tokens", "8")]),
];

/// Flags added to the main job (`train` without `--data`): a small corpus.
const MAIN_JOB_OVERRIDES: &[(&str, &str)] = &[("--corpus-mb", "0.2"), ("--samples", "1")];

/// Commands not run, by how they start, with the reason.
const EXCEPTIONS: &[(&str, &str)] = &[
    (
        "cargo test",
        "the test suite itself (and `ane` tests need a Mac)",
    ),
    (
        "scripts/mac-first-run.sh",
        "needs a Mac with the Neural Engine (it builds, probes and trains on the ANE)",
    ),
    (
        "huggingface-cli download",
        "a download; the test puts the llama fixture (tests/fixtures/hf/llama, a tiny \
         LlamaForCausalLM with a chat template) in its --local-dir",
    ),
    (
        "python3",
        "needs Python; the test writes what it writes (train.txt and val.txt, a 90/10 split)",
    ),
];

/// The commands of every fenced `sh` block, block by block.
fn blocks(readme: &str) -> Vec<Vec<String>> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in readme.lines() {
        let trimmed = line.trim();
        match &mut current {
            None if trimmed == "```sh" => current = Some(Vec::new()),
            Some(commands) if trimmed == "```" => {
                blocks.push(std::mem::take(commands));
                current = None;
            }
            Some(commands) => {
                let command = strip_comment(trimmed);
                if !command.is_empty() {
                    commands.push(command.to_string());
                }
            }
            None => {}
        }
    }
    blocks
}

/// `cmd args   # comment` -> `cmd args` (a `#` outside quotes starts a comment).
fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') => return line[..i].trim_end(),
            _ => {}
        }
    }
    line
}

/// Split a command line like a shell: words, with `"..."` and `'...'` quoting.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let (mut quote, mut in_word) = (None, false);
    for c in line.chars() {
        match (quote, c) {
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (Some(q), c) if c == q => quote = None,
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (_, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(word);
    }
    out
}

/// Set `flag` to `value` in `args`, replacing a value given.
fn set_flag(args: &mut Vec<String>, flag: &str, value: &str) {
    match args.iter().position(|a| a == flag) {
        Some(i) if i + 1 < args.len() => args[i + 1] = value.to_string(),
        _ => args.extend([flag.to_string(), value.to_string()]),
    }
}

/// The anemone arguments of a README command, with the size overrides;
/// `None` for a command that is not anemone's.
fn anemone_args(command: &[String]) -> Option<Vec<String>> {
    let mut args: Vec<String> = match command {
        [first, rest @ ..] if first == "anemone" => rest.to_vec(),
        [cargo, run, release, dashes, rest @ ..]
            if cargo == "cargo" && run == "run" && release == "--release" && dashes == "--" =>
        {
            rest.to_vec()
        }
        _ => return None,
    };
    let subcommand = args.first().cloned().unwrap_or_default();
    for (name, flags) in OVERRIDES {
        if *name == subcommand {
            for (flag, value) in *flags {
                set_flag(&mut args, flag, value);
            }
        }
    }
    if subcommand == "train" && !args.iter().any(|a| a == "--data") {
        for (flag, value) in MAIN_JOB_OVERRIDES {
            set_flag(&mut args, flag, value);
        }
    }
    Some(args)
}

/// The input files README commands read, written into `dir`.
fn provide_inputs(dir: &Path) {
    let stories = anemone::data::corpus::generate(&anemone::data::corpus::CorpusConfig {
        seed: 3,
        n_bytes: 60_000,
    });
    std::fs::write(dir.join("my.txt"), stories).unwrap();
    let rows: String = (0..40)
        .map(|i| format!("{{\"text\": \"{i} + 1 = {}\"}}\n", i + 1))
        .collect();
    std::fs::write(dir.join("my.jsonl"), rows).unwrap();
    copy_model("smollm2", dir);
}

/// A tiny Hugging Face model directory (the llama fixture) as `dir/name`,
/// standing in for a downloaded one.
fn copy_model(name: &str, dir: &Path) {
    let target = dir.join(name);
    std::fs::create_dir_all(&target).unwrap();
    let source = crate::common::fixture("hf").join("llama");
    for entry in std::fs::read_dir(source).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "reference.safetensors" {
            std::fs::copy(entry.path(), target.join(entry.file_name())).unwrap();
        }
    }
}

/// The stand-in for an [`EXCEPTIONS`] command whose output later commands read.
fn stand_in(command: &str, dir: &Path) -> Result<(), String> {
    if command.starts_with("huggingface-cli download") {
        let words = words(command);
        let local_dir = words
            .iter()
            .position(|w| w == "--local-dir")
            .and_then(|i| words.get(i + 1))
            .expect("--local-dir");
        copy_model(local_dir, dir);
    }
    if command.starts_with("python3") && command.contains("tinyshakespeare.txt") {
        let Some(path) = shared_data("tinyshakespeare.txt") else {
            return Err("tinyshakespeare.txt is absent".into());
        };
        let text = std::fs::read_to_string(path).unwrap();
        // Enough text for the block's commands, not the whole play.
        let text = &text[..text.len().min(200_000)];
        let cut = (text.len() as f64 * 0.9) as usize;
        let cut = (cut..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap();
        std::fs::write(dir.join("train.txt"), &text[..cut]).unwrap();
        std::fs::write(dir.join("val.txt"), &text[cut..]).unwrap();
    }
    Ok(())
}

#[test]
fn every_command_in_the_readme_runs() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let blocks = blocks(&readme);
    assert!(blocks.len() >= 4, "{} sh blocks", blocks.len());
    let mut ran = 0;
    'blocks: for (index, block) in blocks.iter().enumerate() {
        let dir = temp_dir(&format!("readme-{index}"));
        provide_inputs(&dir);
        for line in block {
            let command = words(line);
            if let Some((_, why)) = EXCEPTIONS.iter().find(|(start, _)| line.starts_with(start)) {
                eprintln!("README block {index}: not run: `{line}`: {why}");
                if let Err(missing) = stand_in(line, &dir) {
                    crate::common::skip(&format!("README block {index}: {missing}"));
                    continue 'blocks;
                }
                continue;
            }
            let args = anemone_args(&command)
                .unwrap_or_else(|| panic!("README block {index}: `{line}` is neither anemone's nor an exception; add it to EXCEPTIONS with why"));
            let out = anemone().args(&args).current_dir(&dir).output().unwrap();
            assert!(
                out.status.success(),
                "README block {index}: `{line}` (run as `anemone {}`) failed:\n{}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            ran += 1;
        }
    }
    assert!(ran >= 10, "only {ran} README commands ran");
}

#[test]
fn the_readme_parser_reads_shell_lines() {
    assert_eq!(
        words(r#"anemone generate --prompt "Once upon" --model 'a b'"#),
        [
            "anemone",
            "generate",
            "--prompt",
            "Once upon",
            "--model",
            "a b"
        ]
    );
    assert_eq!(strip_comment("cargo test   # what CI runs"), "cargo test");
    assert_eq!(strip_comment(r#"echo "a # b""#), r#"echo "a # b""#);
    let args = anemone_args(&words("cargo run --release -- train --steps 50")).unwrap();
    assert_eq!(args[..3], ["train", "--steps", "2"]);
    assert!(args.contains(&"--corpus-mb".to_string()), "{args:?}");
}
