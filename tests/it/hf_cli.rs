//! Hugging Face model directories through the command line (issue 20):
//! `eval`, `generate` (directory tokenizer, EOS ids, `--chat`), `train
//! --init`, `export --format hf`, `tokenize --tokenizer DIR|tokenizer.json`,
//! `doctor --config`, and the one-line errors of bad input.
//!
//! References: the fixtures' `reference.safetensors` (float64 transformers,
//! `scripts/gen_hf_fixtures.py`), `chat/cases.json` (`apply_chat_template`),
//! `shakespeare-ids.json` (the `tokenizers` package) and `export-losses.json`
//! (`scripts/check_hf_export.py --make-fixture`: transformers' loss of
//! exports made after `TRAIN_FLAGS` steps).

use std::path::{Path, PathBuf};
use std::process::Command;

use anemone::data::hf::{ChatMessage, ChatTemplate, HfTokenizer};
use anemone::data::tokens::{Dtype, TokenFile, TokenWriter};
use anemone::generate::{Generator, Sampler};
use anemone::model::hf::{FloatDtype, HfCheckpoint, HfConfig, SafetensorsReader};
use anemone::model::{Weights, load_weights};
use serde_json::Value;

use crate::common::{anemone, fails, fixture, shared_data, succeeds, temp_dir};

/// The architecture fixtures with references.
const MODELS: [&str; 6] = [
    "llama",
    "llama-v4",
    "llama3-bf16",
    "qwen2",
    "qwen3",
    "mistral",
];

/// The window of the references' eval losses.
const SEQ: usize = 16;

/// What `scripts/check_hf_export.py --make-fixture` fine-tunes with (its
/// `TRAIN_FLAGS`, recorded in `export-losses.json`).
const TRAIN_FLAGS: [&str; 14] = [
    "--steps",
    "4",
    "--batch",
    "2",
    "--seq",
    "16",
    "--lr",
    "1e-2",
    "--warmup",
    "0",
    "--backend",
    "cpu",
    "--seed",
    "7",
];

fn model_dir(name: &str) -> PathBuf {
    fixture("hf").join(name)
}

fn reference(name: &str) -> SafetensorsReader {
    SafetensorsReader::open_file(&model_dir(name).join("reference.safetensors")).unwrap()
}

fn ids(reference: &SafetensorsReader, tensor: &str) -> Vec<u32> {
    let values = reference.read_i64(tensor).unwrap();
    values.into_iter().map(|id| id as u32).collect()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The fixture's `eval_tokens` as a token file recording the model's vocabulary.
pub fn eval_tokens(name: &str, dir: &Path) -> PathBuf {
    let config = HfConfig::open(&model_dir(name)).unwrap();
    let path = dir.join(format!("{name}.bin"));
    let mut writer = TokenWriter::create(&path, config.vocab_size).unwrap();
    writer
        .extend(&ids(&reference(name), "eval_tokens"))
        .unwrap();
    writer.finish().unwrap();
    path
}

/// The `loss X` of `anemone eval` on `model`.
fn eval_loss(model: &Path, tokens: &Path) -> f64 {
    let out = anemone()
        .args(["eval", "--model"])
        .arg(model)
        .arg("--data")
        .arg(tokens)
        .args(["--seq", &SEQ.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "eval {}: {stdout}{}",
        model.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let words: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(words[0], "loss", "{stdout}");
    words[1].parse().unwrap()
}

fn stdout_of(command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `anemone eval --model HF_DIR` prints transformers' mean cross-entropy
/// over the same windows (float64 reference) within 1e-5 relative.
#[test]
fn hf_eval_prints_the_transformers_loss_of_every_architecture() {
    let dir = temp_dir("hf-cli-eval");
    for name in MODELS {
        let tokens = eval_tokens(name, &dir);
        let got = eval_loss(&model_dir(name), &tokens);
        let windows = reference(name).read_f64("eval_window_losses").unwrap();
        let want = windows.iter().sum::<f64>() / windows.len() as f64;
        assert!(
            (got - want).abs() <= 1e-5 * want,
            "{name}: anemone eval {got} vs transformers {want}"
        );
    }
    // The sharded fixture holds llama's weights.
    let tokens = eval_tokens("llama", &dir);
    assert_eq!(
        eval_loss(&model_dir("llama-sharded"), &tokens),
        eval_loss(&model_dir("llama"), &tokens)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `anemone generate --model HF_DIR` at temperature 0 writes the prompt and
/// the text of transformers' greedy ids, stopping where transformers stops
/// (an `eos_token_id` of `generation_config.json` among the greedy ids).
/// The reference prompts are random ids, given as ids (`--prompt-ids`).
#[test]
fn hf_generate_reproduces_transformers_greedy_text_and_stops_at_eos_ids() {
    for name in MODELS {
        let reference = reference(name);
        let tokenizer = HfTokenizer::open(&model_dir(name)).unwrap();
        let prompt_ids = ids(&reference, "prompt");
        let prompt = tokenizer.decode(&prompt_ids, true).unwrap();
        let mut greedy = ids(&reference, "greedy");
        // transformers emits the EOS id that stops it; anemone stops before it.
        let config = HfConfig::open(&model_dir(name)).unwrap();
        if greedy
            .last()
            .is_some_and(|id| config.eos_token_ids.contains(id))
        {
            greedy.pop();
        }
        let list: Vec<String> = prompt_ids.iter().map(u32::to_string).collect();
        let stdout = stdout_of(
            anemone()
                .args(["generate", "--model"])
                .arg(model_dir(name))
                .args(["--prompt-ids", &list.join(" "), "--temperature", "0"])
                .args(["--max-tokens", "20"]),
        );
        let want = format!("{prompt}{}\n", tokenizer.decode(&greedy, true).unwrap());
        assert_eq!(stdout, want, "{name}");
    }
    // A text prompt is encoded with the directory's tokenizer.
    let dir = model_dir("qwen3");
    let tokenizer = HfTokenizer::open(&dir).unwrap();
    let weights = load_weights(&dir).unwrap();
    let prompt = "First Citizen:\nBefore we proceed";
    let ids = tokenizer.encode(prompt, true).unwrap();
    let stop = tokenizer.stop_token_ids(&HfConfig::open(&dir).unwrap().eos_token_ids);
    let new = Generator::new(&weights)
        .generate_until(&ids, 10, &mut Sampler::greedy(), &stop, |_| {})
        .unwrap();
    let stdout = stdout_of(
        anemone()
            .args(["generate", "--model"])
            .arg(&dir)
            .args(["--prompt", prompt, "--temperature", "0"])
            .args(["--max-tokens", "10"]),
    );
    assert_eq!(
        stdout,
        format!("{prompt}{}\n", tokenizer.decode(&new, true).unwrap())
    );
}

/// `generate --chat` renders the directory's chat template with the
/// generation prompt as `apply_chat_template` does (`cases.json`), encodes it
/// without added special tokens and writes the assistant's turn only;
/// `--system` adds the system message.
#[test]
fn hf_generate_chat_writes_the_assistant_turn_of_the_rendered_template() {
    let cases = read_json(&fixture("hf").join("chat/cases.json"));
    let one_turn = cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["template"] == "chatml"
                && c["name"] == "one user turn"
                && c["add_generation_prompt"] == true
        })
        .unwrap();
    let rendered = one_turn["expected"].as_str().unwrap().to_string();
    let user = one_turn["messages"][0]["content"].as_str().unwrap();
    let dir = model_dir("llama");
    let tokenizer = HfTokenizer::open(&dir).unwrap();
    let weights = load_weights(&dir).unwrap();
    let config = HfConfig::open(&dir).unwrap();
    let stop = tokenizer.stop_token_ids(&config.eos_token_ids);
    let expected = |text: &str| {
        let prompt = tokenizer.encode(text, false).unwrap();
        let new = Generator::new(&weights)
            .generate_until(&prompt, 12, &mut Sampler::greedy(), &stop, |_| {})
            .unwrap();
        format!("{}\n", tokenizer.decode(&new, true).unwrap())
    };
    let run = |extra: &[&str]| {
        stdout_of(
            anemone()
                .args(["generate", "--model"])
                .arg(&dir)
                .args(["--chat", "--prompt", user, "--temperature", "0"])
                .args(["--max-tokens", "12"])
                .args(extra),
        )
    };
    assert_eq!(run(&[]), expected(&rendered));
    let system = "You speak like a sailor.";
    let template = ChatTemplate::open(&dir).unwrap().unwrap();
    let with_system = template
        .render(
            &[
                ChatMessage::new("system", system),
                ChatMessage::new("user", user),
            ],
            true,
            &serde_json::Map::new(),
        )
        .unwrap();
    assert!(with_system.contains(system) && !with_system.contains("helpful assistant"));
    assert_eq!(run(&["--system", system]), expected(&with_system));
    let err = fails(
        anemone()
            .args(["generate", "--model"])
            .arg(model_dir("llama-sharded"))
            .args(["--chat", "--prompt", "hi"]),
    );
    assert!(err.contains("no chat template"), "{err}");
}

/// Fine-tune `name` with `TRAIN_FLAGS` on its eval tokens into `run`, then
/// export the run to `export`.
fn fine_tune_and_export(name: &str, tokens: &Path, run: &Path, export: &Path) {
    succeeds(
        anemone()
            .args(["train", "--init"])
            .arg(model_dir(name))
            .arg("--data")
            .arg(tokens)
            .arg("--val-data")
            .arg(tokens)
            .arg("--out")
            .arg(run)
            .args(TRAIN_FLAGS),
    );
    succeeds(
        anemone()
            .args(["export", "--model"])
            .arg(run)
            .args(["--format", "hf", "--out"])
            .arg(export),
    );
}

/// `train --init HF_DIR` keeps the base model's config, tokenizer, chat
/// template and generation config in the run; `export --format hf` of the
/// run loads in transformers with anemone's loss: anemone's `eval` of the
/// export equals transformers' loss of the same export
/// (`export-losses.json`, recorded by `scripts/check_hf_export.py`) within
/// 1e-5 relative, for every architecture, in the source's dtype.
#[test]
fn hf_export_after_fine_tuning_has_the_transformers_loss() {
    let recorded = read_json(&fixture("hf").join("export-losses.json"));
    let flags: Vec<&str> = recorded["train_flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert_eq!(flags, TRAIN_FLAGS, "the script's flags");
    let dir = temp_dir("hf-cli-export");
    for name in MODELS {
        let tokens = eval_tokens(name, &dir);
        let (run, export) = (dir.join(format!("{name}-run")), dir.join(name));
        fine_tune_and_export(name, &tokens, &run, &export);
        for kept in ["hf_config.json", "tokenizer.json", "tokenizer_config.json"] {
            assert!(run.join(kept).is_file(), "{name}: {kept}");
        }
        let record = read_json(&run.join("config.json"));
        assert_eq!(
            Path::new(record["init"].as_str().unwrap()),
            std::path::absolute(model_dir(name)).unwrap()
        );
        let entry = &recorded["models"][name];
        let want = entry["transformers_loss"].as_f64().unwrap();
        let base = entry["base_loss"].as_f64().unwrap();
        let got = eval_loss(&export, &tokens);
        assert!(
            (got - want).abs() <= 1e-5 * want,
            "{name}: anemone {got} vs transformers {want}"
        );
        assert!(
            (got - base).abs() > 1e-3,
            "{name}: training changed nothing"
        );
        // The run itself evaluates to the same loss but for the dtype's rounding.
        let source = HfConfig::open(&model_dir(name)).unwrap();
        let exported = HfConfig::open(&export).unwrap();
        assert_eq!(exported.architecture, source.architecture, "{name}");
        assert_eq!(exported.dtype, source.dtype.or(Some(FloatDtype::F32)));
        assert_eq!(entry["dtype"], exported.dtype.unwrap().torch_name());
        assert_eq!(exported.eos_token_ids, source.eos_token_ids, "{name}");
        assert_eq!(exported.rope_scaling, source.rope_scaling, "{name}");
        assert_eq!(exported.rope_theta, source.rope_theta, "{name}");
        assert_eq!(exported.rms_norm_eps, source.rms_norm_eps, "{name}");
        assert_eq!(exported.tied_embeddings, source.tied_embeddings, "{name}");
        let config = read_json(&export.join("config.json"));
        for field in ["rope_theta", "rope_scaling", "torch_dtype"] {
            assert!(
                config.get(field).is_none(),
                "{name}: {field} in the 5.x layout"
            );
        }
        let reader = SafetensorsReader::open_dir(&export).unwrap();
        assert_eq!(
            reader.contains("lm_head.weight"),
            !source.tied_embeddings,
            "{name}"
        );
        // The run generates with the base model's tokenizer and template.
        succeeds(anemone().args(["generate", "--model"]).arg(&run).args([
            "--chat",
            "--prompt",
            "Hello",
            "--max-tokens",
            "4",
        ]));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// HF -> anemone -> HF without training gives the same tensors bit for bit
/// (fp32 and bf16 sources), and the same file as `save_pretrained`;
/// `--dtype` converts, and the output may not be the input.
#[test]
fn hf_export_round_trip_is_bit_for_bit() {
    let dir = temp_dir("hf-cli-round-trip");
    for name in MODELS {
        let out = dir.join(name);
        succeeds(
            anemone()
                .args(["export", "--model"])
                .arg(model_dir(name))
                .args(["--format", "hf", "--out"])
                .arg(&out),
        );
        let source = SafetensorsReader::open_dir(&model_dir(name)).unwrap();
        let exported = SafetensorsReader::open_dir(&out).unwrap();
        assert_eq!(
            source.names().collect::<Vec<_>>(),
            exported.names().collect::<Vec<_>>(),
            "{name}"
        );
        for tensor in source.names() {
            let shape = source.shape(tensor).unwrap().to_vec();
            assert_eq!(
                source.dtype_name(tensor),
                exported.dtype_name(tensor),
                "{name} {tensor}"
            );
            let bits = |r: &SafetensorsReader| -> Vec<u32> {
                let values = r.read_f32(tensor, &shape).unwrap();
                values.iter().map(|x| x.to_bits()).collect()
            };
            assert_eq!(bits(&source), bits(&exported), "{name} {tensor}");
        }
        assert_eq!(
            std::fs::read(model_dir(name).join("model.safetensors")).unwrap(),
            std::fs::read(out.join("model.safetensors")).unwrap(),
            "{name}: the bytes save_pretrained wrote"
        );
        for file in [
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            assert_eq!(
                std::fs::read(model_dir(name).join(file)).unwrap(),
                std::fs::read(out.join(file)).unwrap(),
                "{name}: {file}"
            );
        }
        let weights = Weights::from_hf(&HfCheckpoint::open(&out).unwrap()).unwrap();
        assert_eq!(weights, load_weights(&model_dir(name)).unwrap(), "{name}");
    }
    // --dtype fp16: every value rounded to the nearest fp16.
    let out = dir.join("fp16");
    succeeds(
        anemone()
            .args(["export", "--model"])
            .arg(model_dir("qwen2"))
            .args(["--format", "hf", "--dtype", "fp16", "--out"])
            .arg(&out),
    );
    let source = SafetensorsReader::open_dir(&model_dir("qwen2")).unwrap();
    let exported = SafetensorsReader::open_dir(&out).unwrap();
    for tensor in source.names() {
        let shape = source.shape(tensor).unwrap().to_vec();
        assert_eq!(exported.float_dtype(tensor), Some(FloatDtype::F16));
        let want: Vec<f32> = source
            .read_f32(tensor, &shape)
            .unwrap()
            .iter()
            .map(|&x| half::f16::from_f32(x).to_f32())
            .collect();
        assert_eq!(exported.read_f32(tensor, &shape).unwrap(), want, "{tensor}");
    }
    assert_eq!(HfConfig::open(&out).unwrap().dtype, Some(FloatDtype::F16));
    // Never over the input.
    let copy = dir.join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(model_dir("llama")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    let before = std::fs::read(copy.join("model.safetensors")).unwrap();
    let err = fails(
        anemone()
            .args(["export", "--model"])
            .arg(&copy)
            .args(["--format", "hf", "--dtype", "bf16", "--out"])
            .arg(copy.join(".")),
    );
    assert!(err.contains("never writes over its input"), "{err}");
    assert_eq!(
        std::fs::read(copy.join("model.safetensors")).unwrap(),
        before
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `tokenize --tokenizer MODEL_DIR` writes what the `tokenizers` package
/// encodes (`shakespeare-ids.json`: each line alone), one document per
/// line followed by the tokenizer's EOS, and records the model's vocabulary
/// (Qwen2's, padded past the tokenizer's), which `train --init` then accepts.
#[test]
fn hf_tokenize_writes_python_ids_with_eos_and_the_models_vocabulary() {
    let Some(text) = shared_data("tinyshakespeare.txt") else {
        return;
    };
    let text = std::fs::read_to_string(text).unwrap();
    let python = read_json(&fixture("hf").join("shakespeare-ids.json"));
    let first_lines = python["first_lines"].as_array().unwrap();
    let dir = temp_dir("hf-cli-tokenize");
    // One line per document: a blank line after each.
    let mut input = String::new();
    let mut want = Vec::new();
    // `<|im_end|>`, the eos_token of tokenizer_config.json: id 2 (the
    // generation config's eos_token_id).
    let eos = 2;
    for (line, line_ids) in text.split('\n').zip(first_lines) {
        if line.is_empty() {
            continue;
        }
        input.push_str(line);
        input.push_str("\n\n");
        want.extend(
            line_ids
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32),
        );
        want.push(eos);
    }
    std::fs::write(dir.join("in.txt"), &input).unwrap();
    let out = dir.join("tokens.bin");
    succeeds(
        anemone()
            .args(["tokenize", "--tokenizer"])
            .arg(model_dir("qwen2"))
            .arg("--input")
            .arg(dir.join("in.txt"))
            .arg("--out")
            .arg(&out)
            .args(["--val-fraction", "0"]),
    );
    let file = TokenFile::open(&out).unwrap();
    assert_eq!(file.vocab_size(), Some(336), "qwen2's config vocab_size");
    assert_eq!(file.dtype(), Dtype::U16);
    assert_eq!(file.window(0, file.len()).unwrap(), want);
    // The same with tokenizer.json named directly: the tokenizer's vocabulary.
    let out_json = dir.join("tokens-json.bin");
    succeeds(
        anemone()
            .args(["tokenize", "--tokenizer"])
            .arg(model_dir("qwen2").join("tokenizer.json"))
            .arg("--input")
            .arg(dir.join("in.txt"))
            .arg("--out")
            .arg(&out_json)
            .args(["--val-fraction", "0"]),
    );
    let file = TokenFile::open(&out_json).unwrap();
    assert_eq!(file.vocab_size(), Some(323));
    assert_eq!(file.window(0, file.len()).unwrap(), want);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A `tokenizer.json` with an added token past 65,535: `tokenize` writes
/// 32-bit ids; a model whose vocabulary the tokenizer exceeds is an error
/// naming the model's config and `vocab_size`.
#[test]
fn hf_tokenize_writes_u32_ids_for_a_large_vocabulary_and_refuses_a_small_model() {
    let dir = temp_dir("hf-cli-wide");
    let mut json = read_json(&model_dir("llama").join("tokenizer.json"));
    // In the model's vocabulary (so the id is kept) and an added token (so
    // the text finds it).
    json["model"]["vocab"]["<|wide|>"] = 70000.into();
    json["added_tokens"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "id": 70000, "content": "<|wide|>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    let wide = dir.join("wide.json");
    std::fs::write(&wide, json.to_string()).unwrap();
    let tokenizer = HfTokenizer::from_file(&wide).unwrap();
    assert_eq!(tokenizer.vocab_size(), 70001);
    std::fs::write(dir.join("in.txt"), "To be<|wide|> or not\n").unwrap();
    let out = dir.join("wide.bin");
    succeeds(
        anemone()
            .args(["tokenize", "--tokenizer"])
            .arg(&wide)
            .arg("--input")
            .arg(dir.join("in.txt"))
            .arg("--out")
            .arg(&out)
            .args(["--val-fraction", "0"]),
    );
    let file = TokenFile::open(&out).unwrap();
    assert_eq!((file.dtype(), file.vocab_size()), (Dtype::U32, Some(70001)));
    let got = file.window(0, file.len()).unwrap();
    assert_eq!(got, tokenizer.encode("To be<|wide|> or not", true).unwrap());
    assert!(got.contains(&70000), "{got:?}");
    // A truncated 32-bit file is refused.
    let bytes = std::fs::read(&out).unwrap();
    for cut in [1, 2, 3, 4] {
        let path = dir.join(format!("cut{cut}.bin"));
        std::fs::write(&path, &bytes[..bytes.len() - cut]).unwrap();
        let err = TokenFile::open(&path).unwrap_err().to_string();
        assert!(
            err.contains("n_tokens: header says") && err.contains("4 bytes"),
            "{err}"
        );
    }
    // The llama fixture has 323 rows.
    let err = fails(
        anemone()
            .args(["generate", "--model"])
            .arg(model_dir("llama"))
            .arg("--tokenizer")
            .arg(&wide)
            .args(["--prompt", "To be"]),
    );
    let config = model_dir("llama").join("config.json");
    assert!(
        err.contains(&format!(
            "{}: vocab_size: 323 is smaller than the 70001 ids of {}",
            config.display(),
            wide.display()
        )),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A copy of fixture `name` in `dir`.
fn copy_fixture(name: &str, dir: &Path) -> PathBuf {
    let copy = dir.join(name);
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(model_dir(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    copy
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let mut json = read_json(path);
    edit(json.as_object_mut().unwrap());
    std::fs::write(path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
}

/// Each bad model directory fails every command with one `error:` line
/// naming the file and the field.
#[test]
fn hf_bad_input_is_one_line_naming_the_file_and_the_field() {
    let dir = temp_dir("hf-cli-bad");
    let tokens = eval_tokens("llama", &dir);
    // `config_only`: the problem is in config.json, which `doctor --config`
    // reads too (it reads no tensors).
    let check = |model: &Path, file: &str, field: &str, says: &str, config_only: bool| {
        let commands: [Vec<std::ffi::OsString>; 5] = [
            vec![
                "eval".into(),
                "--model".into(),
                model.into(),
                "--data".into(),
                tokens.clone().into(),
            ],
            vec!["generate".into(), "--model".into(), model.into()],
            vec![
                "train".into(),
                "--init".into(),
                model.into(),
                "--data".into(),
                tokens.clone().into(),
                "--steps".into(),
                "1".into(),
                "--out".into(),
                dir.join("never").into(),
            ],
            vec![
                "export".into(),
                "--model".into(),
                model.into(),
                "--format".into(),
                "hf".into(),
                "--out".into(),
                dir.join("never-export").into(),
            ],
            vec!["doctor".into(), "--config".into(), model.into()],
        ];
        for args in commands {
            if args[0] == "doctor" && !config_only {
                continue;
            }
            let err = fails(anemone().args(&args));
            // Notes may come before it; the error is one line (a hint may follow).
            let mut from_error = err.lines().skip_while(|l| !l.starts_with("error: "));
            let line = from_error.next().unwrap();
            let want = format!("{}: {field}: ", model.join(file).display());
            assert!(line.contains(&want), "{args:?}: want {want:?} in {line}");
            assert!(line.contains(says), "{args:?}: want {says:?} in {line}");
            assert!(
                from_error.all(|l| l.starts_with("hint: ")),
                "{args:?}: one line: {err}"
            );
        }
        assert!(!dir.join("never").join("checkpoint.bin").exists());
        assert!(!dir.join("never-export").exists());
    };

    let sharded = copy_fixture("llama-sharded", &dir);
    std::fs::remove_file(sharded.join("model-00002-of-00003.safetensors")).unwrap();
    check(
        &sharded,
        "model.safetensors.index.json",
        "weight_map[\"model.layers.0.input_layernorm.weight\"]",
        "model-00002-of-00003.safetensors is missing",
        false,
    );

    let shape = copy_fixture("mistral", &dir);
    edit_json(&shape.join("config.json"), |c| {
        c.insert("intermediate_size".into(), 48.into());
    });
    check(
        &shape,
        "model.safetensors",
        "model.layers.0.mlp.gate_proj.weight",
        "shape [64, 32] where the config implies [48, 32]",
        false,
    );

    // A dtype anemone does not read: F64 where the header says so.
    let dtype = copy_fixture("qwen3", &dir);
    rewrite_dtype(&dtype.join("model.safetensors"), "model.norm.weight");
    check(
        &dtype,
        "model.safetensors",
        "model.norm.weight",
        "dtype F64 is not supported",
        false,
    );

    let gpt2 = copy_fixture("llama", &dir);
    edit_json(&gpt2.join("config.json"), |c| {
        c.insert(
            "architectures".into(),
            serde_json::json!(["GPT2LMHeadModel"]),
        );
        c.remove("model_type");
    });
    check(
        &gpt2,
        "config.json",
        "architectures",
        "\"GPT2LMHeadModel\" is not supported",
        true,
    );
    edit_json(&gpt2.join("config.json"), |c| {
        c.remove("architectures");
        c.insert("model_type".into(), "phi3".into());
    });
    check(
        &gpt2,
        "config.json",
        "model_type",
        "\"phi3\" is not supported",
        true,
    );

    let window = copy_fixture("mistral", &dir);
    edit_json(&window.join("config.json"), |c| {
        c.insert("sliding_window".into(), 32.into());
    });
    check(
        &window,
        "config.json",
        "sliding_window",
        "32 is shorter than max_position_embeddings (64)",
        true,
    );

    // The tokenizer does not fit the model: tokenize with a model directory
    // whose vocabulary is smaller than its tokenizer's.
    let small = copy_fixture("llama", &dir);
    edit_json(&small.join("config.json"), |c| {
        c.insert("vocab_size".into(), 300.into());
    });
    std::fs::write(dir.join("in.txt"), "To be or not\n").unwrap();
    let err = fails(
        anemone()
            .args(["tokenize", "--tokenizer"])
            .arg(&small)
            .arg("--input")
            .arg(dir.join("in.txt"))
            .arg("--out")
            .arg(dir.join("small.bin")),
    );
    assert!(
        err.contains(&format!(
            "{}: vocab_size: 300 is smaller than the 323 ids of",
            small.join("config.json").display()
        )),
        "{err}"
    );
    assert!(!dir.join("small.bin").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Rewrite one tensor of a safetensors file as F64 (same values).
fn rewrite_dtype(path: &Path, tensor: &str) {
    let reader = SafetensorsReader::open_file(path).unwrap();
    let mut stored: Vec<(String, Vec<usize>, Vec<u8>, safetensors::Dtype)> = Vec::new();
    for name in reader.names() {
        let shape = reader.shape(name).unwrap().to_vec();
        let values = reader.read_f32(name, &shape).unwrap();
        let (bytes, dtype) = if name == tensor {
            let bytes = values
                .iter()
                .flat_map(|&x| (x as f64).to_le_bytes())
                .collect();
            (bytes, safetensors::Dtype::F64)
        } else {
            let bytes = values.iter().flat_map(|x| x.to_le_bytes()).collect();
            (bytes, safetensors::Dtype::F32)
        };
        stored.push((name.to_string(), shape, bytes, dtype));
    }
    drop(reader);
    let views: Vec<(String, safetensors::tensor::TensorView)> = stored
        .iter()
        .map(|(name, shape, data, dtype)| {
            let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).unwrap();
            (name.clone(), view)
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// `doctor --config HF_DIR` takes the directory's shape.
#[test]
fn hf_config_dirs_give_their_model_shape() {
    let dir = model_dir("qwen3");
    let config = anemone::model::ModelConfig::from_name_or_file(dir.to_str().unwrap()).unwrap();
    let hf = HfConfig::open(&dir).unwrap();
    assert_eq!(
        (
            config.dim,
            config.head_dim,
            config.qk_norm,
            config.vocab_size
        ),
        (hf.dim, hf.head_dim, true, hf.vocab_size)
    );
}

/// A model trained from scratch (no Hugging Face base) exports as the
/// Llama its features call for, with llama2.c's BOS/EOS, and reads back
/// bit for bit; `doctor --config HF_DIR` compares that model's kernels.
#[test]
fn hf_export_of_a_run_without_a_base_reads_back_exactly() {
    let dir = temp_dir("hf-cli-scratch");
    let (config, tokens) = crate::common::small_run_inputs(&dir, 5);
    let run = dir.join("run");
    succeeds(
        anemone()
            .args(["train", "--config"])
            .arg(&config)
            .arg("--data")
            .arg(&tokens)
            .args(["--steps", "2", "--batch", "1", "--seq", "8", "--out"])
            .arg(&run),
    );
    let out = dir.join("hf");
    succeeds(
        anemone()
            .args(["export", "--model"])
            .arg(&run)
            .args(["--format", "hf", "--out"])
            .arg(&out),
    );
    let hf = HfConfig::open(&out).unwrap();
    assert_eq!(
        (hf.architecture.class_name(), hf.dtype, hf.bos_token_id),
        ("LlamaForCausalLM", Some(FloatDtype::F32), Some(1))
    );
    assert_eq!(hf.eos_token_ids, [2]);
    assert_eq!(load_weights(&out).unwrap(), load_weights(&run).unwrap());
    let stdout = stdout_of(
        anemone()
            .args(["doctor", "--config"])
            .arg(&out)
            .args(["--seq", "8"]),
    );
    // The attention forward's row: its input is 32 channels by 72 columns.
    let attn_fwd = stdout
        .lines()
        .find(|line| line.starts_with("attn_fwd "))
        .map(|line| line.split_whitespace().nth(1));
    assert!(
        stdout.contains(&format!("kernels of `{}`", out.display()))
            && attn_fwd == Some(Some("32x72")),
        "{stdout}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A run made from a Hugging Face model passes its base files on: `train
/// --init RUN` keeps them, even when it replaces that run (`--overwrite`);
/// `tokenize --tokenizer RUN` uses them (the model's vocabulary recorded).
#[test]
fn hf_runs_pass_their_base_files_on() {
    let dir = temp_dir("hf-cli-chain");
    let tokens = eval_tokens("qwen2", &dir);
    let (run, export) = (dir.join("run"), dir.join("export"));
    fine_tune_and_export("qwen2", &tokens, &run, &export);
    let kept = std::fs::read(run.join("tokenizer.json")).unwrap();
    assert_eq!(
        kept,
        std::fs::read(model_dir("qwen2").join("tokenizer.json")).unwrap()
    );
    succeeds(
        anemone()
            .args(["train", "--init"])
            .arg(&run)
            .arg("--data")
            .arg(&tokens)
            .arg("--val-data")
            .arg(&tokens)
            .arg("--out")
            .arg(&run)
            .arg("--overwrite")
            .args(TRAIN_FLAGS),
    );
    for name in ["hf_config.json", "tokenizer.json", "generation_config.json"] {
        assert!(run.join(name).is_file(), "{name}");
    }
    assert_eq!(std::fs::read(run.join("tokenizer.json")).unwrap(), kept);
    std::fs::write(dir.join("in.txt"), "To be or not\n").unwrap();
    succeeds(
        anemone()
            .args(["tokenize", "--tokenizer"])
            .arg(&run)
            .arg("--input")
            .arg(dir.join("in.txt"))
            .arg("--out")
            .arg(dir.join("again.bin"))
            .args(["--val-fraction", "0"]),
    );
    let file = TokenFile::open(&dir.join("again.bin")).unwrap();
    assert_eq!(file.vocab_size(), Some(336));
    std::fs::remove_dir_all(&dir).unwrap();
}
