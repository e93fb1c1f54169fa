//! The Hugging Face I/O layer on the tiny checkpoints of
//! `scripts/gen_hf_fixtures.py` (tests/fixtures/hf/): configs, tensors against
//! what Python's `safetensors` reads (`scripts/gen_hf_tensor_values.py`),
//! shards, the writer, RoPE frequencies (`scripts/gen_hf_rope_fixture.py`),
//! the tokenizer against Python's `tokenizers` on tinyshakespeare, chat
//! templates against `apply_chat_template`, and the errors of broken copies.

use std::path::{Path, PathBuf};

use anemone::data::hf::{ChatMessage, ChatTemplate, HfTokenizer};
use anemone::model::hf::rope::inv_freq;
use anemone::model::hf::tensors::{expected_tensors, write_safetensors};
use anemone::model::hf::{
    Architecture, FloatDtype, HfCheckpoint, HfConfig, RopeScaling, SafetensorsReader, TensorToWrite,
};
use serde_json::{Value, json};

use crate::common::{fixture, shared_data, temp_dir};

const MODELS: [&str; 7] = [
    "llama",
    "llama-v4",
    "llama3-bf16",
    "qwen2",
    "qwen3",
    "mistral",
    "llama-sharded",
];

/// `tests/fixtures/hf/<name>`.
fn hf_fixture(name: &str) -> PathBuf {
    fixture("hf").join(name)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A fresh copy of fixture directory `model` to break.
fn broken_copy(model: &str, case: &str) -> PathBuf {
    let dir = temp_dir(&format!("hf-{model}-{case}"));
    for entry in std::fs::read_dir(hf_fixture(model)).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() != "reference.safetensors" {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    dir
}

/// Edit `dir/config.json`.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("config.json");
    let mut json = read_json(&path);
    edit(json.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
}

fn fnv1a64(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut hash = 0xcbf29ce484222325u64;
    for byte in bytes {
        hash ^= byte as u64;
        hash = hash.wrapping_mul(0x100000001b3);
    }
    hash
}

#[test]
fn configs_of_every_fixture() {
    struct Want {
        model: &'static str,
        architecture: Architecture,
        heads: (usize, usize, usize),
        vocab: usize,
        theta: f64,
        scaling: RopeScaling,
        features: (bool, bool, bool),
        dtype: FloatDtype,
        eos: &'static [u32],
    }
    let llama3 = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 32,
    };
    let wants = [
        Want {
            model: "llama",
            architecture: Architecture::Llama,
            heads: (4, 2, 8),
            vocab: 323,
            theta: 10000.0,
            scaling: RopeScaling::None,
            features: (false, false, true),
            dtype: FloatDtype::F32,
            eos: &[2],
        },
        Want {
            model: "llama-v4",
            architecture: Architecture::Llama,
            heads: (4, 4, 8),
            vocab: 323,
            theta: 500.0,
            scaling: RopeScaling::Linear { factor: 2.0 },
            features: (false, false, false),
            dtype: FloatDtype::F32,
            eos: &[2],
        },
        Want {
            model: "llama3-bf16",
            architecture: Architecture::Llama,
            heads: (2, 1, 16),
            vocab: 323,
            theta: 10000.0,
            scaling: llama3,
            features: (false, false, true),
            dtype: FloatDtype::BF16,
            eos: &[2],
        },
        Want {
            model: "qwen2",
            architecture: Architecture::Qwen2,
            heads: (4, 2, 8),
            vocab: 336,
            theta: 1e6,
            scaling: RopeScaling::None,
            features: (true, false, true),
            dtype: FloatDtype::F32,
            eos: &[2],
        },
        Want {
            model: "qwen3",
            architecture: Architecture::Qwen3,
            heads: (4, 2, 16),
            vocab: 323,
            theta: 1e6,
            scaling: RopeScaling::None,
            features: (false, true, true),
            dtype: FloatDtype::F32,
            eos: &[2],
        },
        Want {
            model: "mistral",
            architecture: Architecture::Mistral,
            heads: (4, 1, 8),
            vocab: 323,
            theta: 10000.0,
            scaling: RopeScaling::None,
            features: (false, false, false),
            dtype: FloatDtype::F32,
            eos: &[2, 301],
        },
        Want {
            model: "llama-sharded",
            architecture: Architecture::Llama,
            heads: (4, 2, 8),
            vocab: 323,
            theta: 10000.0,
            scaling: RopeScaling::None,
            features: (false, false, true),
            dtype: FloatDtype::F32,
            eos: &[2],
        },
    ];
    for want in wants {
        let config = HfConfig::open(&hf_fixture(want.model)).unwrap();
        let m = want.model;
        assert_eq!(config.architecture, want.architecture, "{m}");
        assert_eq!(
            (config.dim, config.n_layers, config.hidden_dim),
            (32, 2, 64),
            "{m}"
        );
        assert_eq!(
            (config.n_heads, config.n_kv_heads, config.head_dim),
            want.heads,
            "{m}"
        );
        assert_eq!(config.vocab_size, want.vocab, "{m}");
        assert_eq!(
            (config.max_position_embeddings, config.rms_norm_eps),
            (64, 1e-5),
            "{m}"
        );
        assert_eq!(
            (config.rope_theta, config.rope_scaling),
            (want.theta, want.scaling),
            "{m}"
        );
        assert_eq!(
            (config.qkv_bias, config.qk_norm, config.tied_embeddings),
            want.features,
            "{m}"
        );
        assert_eq!(config.dtype, Some(want.dtype), "{m}");
        // config.json says null; generation_config.json gives the ids.
        assert_eq!(
            (config.bos_token_id, config.eos_token_ids.as_slice()),
            (None, want.eos),
            "{m}"
        );
        assert_eq!(config.sliding_window, None, "{m}");
    }
}

#[test]
fn tensors_match_python_safetensors() {
    let values = read_json(&hf_fixture("tensor-values.json"));
    for model in MODELS {
        let dir = hf_fixture(model);
        let checkpoint = HfCheckpoint::open(&dir).unwrap();
        let want = values["models"][model].as_object().unwrap();
        let names: Vec<&str> = checkpoint.tensors.names().collect();
        assert_eq!(
            names,
            want.keys().map(String::as_str).collect::<Vec<_>>(),
            "{model}"
        );
        // The config's tensor list is what the file holds.
        let n_values: usize = want
            .values()
            .map(|t| {
                t["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .product::<usize>()
            })
            .sum();
        assert_eq!(
            checkpoint.config.n_params(),
            n_values,
            "{model}: parameter count"
        );
        let mut expected: Vec<String> = expected_tensors(&checkpoint.config)
            .into_iter()
            .map(|s| s.name)
            .collect();
        expected.sort();
        assert_eq!(names, expected, "{model}");
        for (name, want) in want {
            let shape: Vec<usize> = serde_json::from_value(want["shape"].clone()).unwrap();
            assert_eq!(
                checkpoint.tensors.shape(name),
                Some(shape.as_slice()),
                "{model} {name}"
            );
            let dtype = match want["dtype"].as_str().unwrap() {
                "float32" => "F32",
                "bfloat16" => "BF16",
                other => panic!("{other}"),
            };
            assert_eq!(
                checkpoint.tensors.dtype_name(name).unwrap(),
                dtype,
                "{model} {name}"
            );
            assert_eq!(
                checkpoint.tensors.path_of(name).unwrap(),
                dir.join(want["file"].as_str().unwrap()),
                "{model} {name}"
            );
            let data = checkpoint.read_f32(name).unwrap();
            assert_eq!(
                data.len(),
                shape.iter().product::<usize>(),
                "{model} {name}"
            );
            let first: Vec<f32> = serde_json::from_value(want["first"].clone()).unwrap();
            assert_eq!(
                data[..first.len()]
                    .iter()
                    .map(|x| x.to_bits())
                    .collect::<Vec<_>>(),
                first.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{model} {name}"
            );
            let digest = format!(
                "{:016x}",
                fnv1a64(data.iter().flat_map(|x| x.to_le_bytes()))
            );
            assert_eq!(
                digest,
                want["digest"].as_str().unwrap(),
                "{model} {name}: every value"
            );
        }
    }
}

#[test]
fn sharded_tensors_equal_the_unsharded_ones_bit_for_bit() {
    let single = HfCheckpoint::open(&hf_fixture("llama")).unwrap();
    let sharded = HfCheckpoint::open(&hf_fixture("llama-sharded")).unwrap();
    assert_eq!(
        single.config,
        HfConfig {
            path: single.config.path.clone(),
            ..sharded.config.clone()
        }
    );
    let files: std::collections::BTreeSet<&Path> = sharded
        .tensors
        .names()
        .map(|n| sharded.tensors.path_of(n).unwrap())
        .collect();
    assert_eq!(files.len(), 3, "three shards");
    let names: Vec<&str> = single.tensors.names().collect();
    assert_eq!(names, sharded.tensors.names().collect::<Vec<_>>());
    for name in names {
        let (a, b) = (
            single.read_f32(name).unwrap(),
            sharded.read_f32(name).unwrap(),
        );
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()) && a.len() == b.len(),
            "{name}"
        );
    }
}

#[test]
fn bf16_weights_widen_exactly_and_the_writer_reproduces_save_pretrained_byte_for_byte() {
    for (model, dtype) in [
        ("llama3-bf16", FloatDtype::BF16),
        ("llama", FloatDtype::F32),
        ("qwen3", FloatDtype::F32),
    ] {
        let checkpoint = HfCheckpoint::open(&hf_fixture(model)).unwrap();
        let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = checkpoint
            .tensors
            .names()
            .map(|name| {
                let shape = checkpoint.tensors.shape(name).unwrap().to_vec();
                (name.to_string(), shape, checkpoint.read_f32(name).unwrap())
            })
            .collect();
        if dtype == FloatDtype::BF16 {
            // A bf16 value is the top half of an f32: the low 16 bits are zero.
            assert!(
                tensors
                    .iter()
                    .all(|(_, _, data)| data.iter().all(|x| x.to_bits() & 0xffff == 0))
            );
        }
        let dir = broken_copy(model, "rewrite");
        let path = dir.join("rewritten.safetensors");
        let to_write: Vec<TensorToWrite> = tensors
            .iter()
            .map(|(name, shape, data)| TensorToWrite { name, shape, data })
            .collect();
        write_safetensors(&path, &to_write, dtype).unwrap();
        // Re-encoding the widened values gives transformers' file exactly.
        assert!(
            std::fs::read(&path).unwrap()
                == std::fs::read(hf_fixture(model).join("model.safetensors")).unwrap(),
            "{model}: rewritten file differs from save_pretrained's"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn rope_inv_freq_matches_transformers() {
    let fixture = read_json(&hf_fixture("rope/inv_freq.json"));
    for case in fixture["cases"].as_array().unwrap() {
        let s = &case["scaling"];
        let scaling = match s["rope_type"].as_str().unwrap() {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: s["factor"].as_f64().unwrap(),
            },
            "llama3" => RopeScaling::Llama3 {
                factor: s["factor"].as_f64().unwrap(),
                low_freq_factor: s["low_freq_factor"].as_f64().unwrap(),
                high_freq_factor: s["high_freq_factor"].as_f64().unwrap(),
                original_max_position_embeddings: s["original_max_position_embeddings"]
                    .as_u64()
                    .unwrap() as usize,
            },
            other => panic!("{other}"),
        };
        let head_dim = case["head_dim"].as_u64().unwrap() as usize;
        let got = inv_freq(head_dim, case["theta"].as_f64().unwrap(), &scaling);
        let want: Vec<f64> = serde_json::from_value(case["inv_freq"].clone()).unwrap();
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-14 * w,
                "{}: inv_freq[{i}] {g} vs {w}",
                case["name"]
            );
        }
    }
    // The fixture configs' scalings, as parsed, are the ones the cases use.
    let config = HfConfig::open(&hf_fixture("llama3-bf16")).unwrap();
    let fixture_case = &fixture["cases"][3];
    let want: Vec<f64> = serde_json::from_value(fixture_case["inv_freq"].clone()).unwrap();
    let got = inv_freq(config.head_dim, config.rope_theta, &config.rope_scaling);
    assert!(
        got.iter()
            .zip(&want)
            .all(|(g, w)| (g - w).abs() <= 1e-14 * w)
    );
}

#[test]
fn tokenizer_ids_match_python_on_every_line_of_tinyshakespeare() {
    let Some(text_path) = shared_data("tinyshakespeare.txt") else {
        return;
    };
    let fixture = read_json(&hf_fixture("shakespeare-ids.json"));
    assert_eq!(
        fixture["digest_rule"],
        "FNV-1a 64 over u32 little-endian words: per line its token count, then its ids"
    );
    let tokenizer = HfTokenizer::open(&hf_fixture("tokenizer")).unwrap();
    let text = std::fs::read_to_string(&text_path).unwrap();
    let lines: Vec<&str> = text.split('\n').collect();
    assert_eq!(lines.len() as u64, fixture["lines"].as_u64().unwrap());
    let ids: Vec<Vec<u32>> = lines
        .iter()
        .map(|line| tokenizer.encode(line, false).unwrap())
        .collect();
    let first: Vec<Vec<u32>> = serde_json::from_value(fixture["first_lines"].clone()).unwrap();
    for (line_idx, want) in first.iter().enumerate() {
        assert_eq!(
            &ids[line_idx], want,
            "line {line_idx}: {:?}",
            lines[line_idx]
        );
    }
    let words = |block: &[Vec<u32>]| -> Vec<u8> {
        block
            .iter()
            .flat_map(|ids| std::iter::once(ids.len() as u32).chain(ids.iter().copied()))
            .flat_map(u32::to_le_bytes)
            .collect()
    };
    let block_lines = fixture["block_lines"].as_u64().unwrap() as usize;
    for (block_idx, (block, want)) in ids
        .chunks(block_lines)
        .zip(fixture["block_digests"].as_array().unwrap())
        .enumerate()
    {
        assert_eq!(
            format!("{:016x}", fnv1a64(words(block))),
            want.as_str().unwrap(),
            "lines {}..{}",
            block_idx * block_lines,
            block_idx * block_lines + block.len()
        );
    }
    assert_eq!(
        format!("{:016x}", fnv1a64(words(&ids))),
        fixture["digest"].as_str().unwrap()
    );
    assert_eq!(
        ids.iter().map(Vec::len).sum::<usize>() as u64,
        fixture["tokens"].as_u64().unwrap()
    );
    // Byte-level BPE decodes back to the line.
    for line_idx in [0, 1, 2, 100] {
        assert_eq!(
            tokenizer.decode(&ids[line_idx], false).unwrap(),
            lines[line_idx]
        );
    }
}

#[test]
fn tokenizer_special_tokens_vocabulary_and_stop_ids() {
    let tokenizer = HfTokenizer::open(&hf_fixture("mistral")).unwrap();
    assert_eq!(tokenizer.vocab_size(), 323);
    assert_eq!(
        tokenizer.special_tokens(),
        [
            ("eos_token".to_string(), "<|im_end|>".to_string()),
            ("pad_token".to_string(), "<|endoftext|>".to_string())
        ]
    );
    assert_eq!(
        (tokenizer.eos_token_id(), tokenizer.bos_token_id()),
        (Some(2), None)
    );
    assert_eq!(tokenizer.added_special_ids(), [0, 1, 2]);
    let config = HfConfig::open(&hf_fixture("mistral")).unwrap();
    assert_eq!(tokenizer.stop_token_ids(&config.eos_token_ids), [2, 301]);
    assert_eq!(tokenizer.stop_token_ids(&[]), [2]);
    // Special tokens in text are single ids; skipping them on decode drops them.
    let ids = tokenizer
        .encode("<|im_start|>user\nHi<|im_end|>", false)
        .unwrap();
    assert_eq!((ids[0], *ids.last().unwrap()), (1, 2));
    assert_eq!(tokenizer.decode(&ids, true).unwrap(), "user\nHi");
    // Qwen2's embedding is padded past the tokenizer: fine; a smaller one is not.
    let qwen2 = HfConfig::open(&hf_fixture("qwen2")).unwrap();
    tokenizer.check_fits(qwen2.vocab_size, &qwen2.path).unwrap();
    let err = tokenizer
        .check_fits(300, &qwen2.path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("qwen2/config.json: vocab_size: 300 is smaller than the 323 ids"),
        "{err}"
    );
}

#[test]
fn chat_templates_match_apply_chat_template() {
    let cases = read_json(&hf_fixture("chat/cases.json"));
    let special_tokens = HfTokenizer::open(&hf_fixture("tokenizer"))
        .unwrap()
        .special_tokens()
        .to_vec();
    let mut n_errors = 0;
    for case in cases["cases"].as_array().unwrap() {
        let template_path = hf_fixture(&format!(
            "chat/{}.jinja",
            case["template"].as_str().unwrap()
        ));
        let source = std::fs::read_to_string(&template_path).unwrap();
        let template = ChatTemplate::from_source(&template_path, &source)
            .unwrap()
            .with_special_tokens(special_tokens.clone());
        let messages: Vec<ChatMessage> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let got = template.render(
            &messages,
            case["add_generation_prompt"].as_bool().unwrap(),
            case["extra"].as_object().unwrap(),
        );
        let what = format!(
            "{} / {} / {} / {}",
            case["template"], case["name"], case["add_generation_prompt"], case["extra"]
        );
        match (&case["expected"], &case["error"]) {
            (Value::String(expected), _) => assert_eq!(got.unwrap(), *expected, "{what}"),
            (_, Value::String(error)) => {
                n_errors += 1;
                let err = got.unwrap_err().to_string();
                assert!(err.contains(error.as_str()), "{what}: {err}");
                assert!(
                    err.starts_with(&format!("{}: chat_template: ", template_path.display())),
                    "{err}"
                );
            }
            _ => panic!("{what}: neither expected nor error"),
        }
    }
    assert_eq!(n_errors, 2);
}

#[test]
fn chat_template_with_tools_matches_apply_chat_template() {
    let path = hf_fixture("chat/llama4-tools.json");
    let fixture = read_json(&path);
    let template = ChatTemplate::from_source(&path, fixture["template"].as_str().unwrap()).unwrap();
    let messages: Vec<ChatMessage> = fixture["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    for case in fixture["cases"].as_array().unwrap() {
        let got = template
            .render(&messages, true, case["extra"].as_object().unwrap())
            .unwrap();
        assert_eq!(got, case["expected"].as_str().unwrap(), "{}", case["extra"]);
    }
}

#[test]
fn chat_templates_are_found_where_transformers_saves_them() {
    let hello = [ChatMessage::new("user", "Hello there")];
    let no_extra = serde_json::Map::new();
    // 5.x: chat_template.jinja beside tokenizer_config.json.
    let mistral = ChatTemplate::open(&hf_fixture("mistral")).unwrap().unwrap();
    assert!(mistral.path().ends_with("mistral/chat_template.jinja"));
    // 4.x: inside tokenizer_config.json.
    let llama = ChatTemplate::open(&hf_fixture("llama")).unwrap().unwrap();
    assert!(llama.path().ends_with("llama/tokenizer_config.json"));
    let want = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(mistral.render(&hello, true, &no_extra).unwrap(), want);
    assert_eq!(llama.render(&hello, true, &no_extra).unwrap(), want);
    // Qwen3's reasoning template with enable_thinking, from tokenizer_config.json.
    let qwen3 = ChatTemplate::open(&hf_fixture("qwen3")).unwrap().unwrap();
    let extra = json!({"enable_thinking": false});
    assert!(
        qwen3
            .render(&hello, true, extra.as_object().unwrap())
            .unwrap()
            .ends_with("<think>\n\n</think>\n\n")
    );
    // No template at all.
    assert!(
        ChatTemplate::open(&hf_fixture("llama-sharded"))
            .unwrap()
            .is_none()
    );
    // A list of named templates: `default` is taken; without one, an error.
    let dir = broken_copy("tokenizer", "named-templates");
    std::fs::remove_file(dir.join("chat_template.jinja")).unwrap();
    let write_templates = |templates: Value| {
        let mut config = read_json(&dir.join("tokenizer_config.json"));
        config["chat_template"] = templates;
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    };
    write_templates(
        json!([{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "{{ eos_token }}"}]),
    );
    let template = ChatTemplate::open(&dir).unwrap().unwrap();
    assert_eq!(
        template.render(&hello, false, &no_extra).unwrap(),
        "<|im_end|>"
    );
    write_templates(json!([{"name": "tool_use", "template": "tools"}]));
    let err = ChatTemplate::open(&dir).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer_config.json: chat_template: no template named \"default\""),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Rewrite `dir/model.safetensors` with `edit` applied to its tensors.
fn rewrite_tensors(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>)) {
    let reader = SafetensorsReader::open_dir(dir).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = reader
        .names()
        .map(|name| {
            let shape = reader.shape(name).unwrap().to_vec();
            (
                name.to_string(),
                shape.clone(),
                reader.read_f32(name, &shape).unwrap(),
            )
        })
        .collect();
    drop(reader);
    edit(&mut tensors);
    let to_write: Vec<TensorToWrite> = tensors
        .iter()
        .map(|(name, shape, data)| TensorToWrite { name, shape, data })
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &to_write, FloatDtype::F32).unwrap();
}

/// `HfCheckpoint::open(dir)`'s error, which must start with `file: field: `
/// and contain every one of `contains`.
fn check_error(dir: &Path, file: &str, field: &str, contains: &[&str]) {
    let err = HfCheckpoint::open(dir).unwrap_err().to_string();
    let prefix = format!("{}: {field}: ", dir.join(file).display());
    assert!(
        err.starts_with(&prefix),
        "want prefix {prefix:?}, got {err}"
    );
    for part in contains {
        assert!(err.contains(part), "want {part:?} in {err}");
    }
    assert!(!err.contains('\n'), "one line: {err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn broken_checkpoints_are_errors_naming_the_file_and_the_field() {
    // A missing shard file: the index names the tensor and the shard.
    let dir = broken_copy("llama-sharded", "missing-shard");
    std::fs::remove_file(dir.join("model-00002-of-00003.safetensors")).unwrap();
    check_error(
        &dir,
        "model.safetensors.index.json",
        "weight_map[\"model.layers.0.input_layernorm.weight\"]",
        &["model-00002-of-00003.safetensors is missing"],
    );

    // A tensor with the wrong shape.
    let dir = broken_copy("llama", "wrong-shape");
    rewrite_tensors(&dir, |tensors| {
        let k = tensors
            .iter_mut()
            .find(|t| t.0 == "model.layers.1.self_attn.k_proj.weight")
            .unwrap();
        k.1 = vec![32, 16];
    });
    check_error(
        &dir,
        "model.safetensors",
        "model.layers.1.self_attn.k_proj.weight",
        &["shape [32, 16]", "[16, 32]"],
    );

    // A missing tensor (Qwen2 without its biases).
    let dir = broken_copy("qwen2", "missing-tensor");
    rewrite_tensors(&dir, |tensors| {
        tensors.retain(|t| t.0 != "model.layers.0.self_attn.v_proj.bias")
    });
    check_error(
        &dir,
        "model.safetensors",
        "model.layers.0.self_attn.v_proj.bias",
        &["missing", "[16]"],
    );

    // A tensor the config does not declare (a bias on a Llama).
    let dir = broken_copy("llama", "extra-tensor");
    rewrite_tensors(&dir, |tensors| {
        tensors.push((
            "model.layers.0.self_attn.o_proj.bias".into(),
            vec![32],
            vec![0.0; 32],
        ))
    });
    check_error(
        &dir,
        "model.safetensors",
        "model.layers.0.self_attn.o_proj.bias",
        &["not part of the LlamaForCausalLM model"],
    );

    // An int8 tensor.
    let dir = broken_copy("llama", "int8");
    let reader = SafetensorsReader::open_dir(&dir).unwrap();
    let mut stored: Vec<(String, Vec<usize>, Vec<u8>, safetensors::Dtype)> = reader
        .names()
        .map(|name| {
            let shape = reader.shape(name).unwrap().to_vec();
            let data = reader.read_f32(name, &shape).unwrap();
            (
                name.to_string(),
                shape,
                data.iter().flat_map(|x| x.to_le_bytes()).collect(),
                safetensors::Dtype::F32,
            )
        })
        .collect();
    drop(reader);
    let norm = stored
        .iter_mut()
        .find(|t| t.0 == "model.norm.weight")
        .unwrap();
    norm.2 = vec![1u8; 32];
    norm.3 = safetensors::Dtype::I8;
    let views: Vec<(String, safetensors::tensor::TensorView)> = stored
        .iter()
        .map(|(name, shape, data, dtype)| {
            (
                name.clone(),
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    check_error(
        &dir,
        "model.safetensors",
        "model.norm.weight",
        &["dtype I8 is not supported"],
    );

    // Unsupported architecture.
    let dir = broken_copy("llama", "gpt2");
    edit_config(&dir, |c| {
        c.insert("architectures".into(), json!(["GPT2LMHeadModel"]));
        c.insert("model_type".into(), json!("gpt2"));
    });
    check_error(
        &dir,
        "config.json",
        "architectures",
        &["\"GPT2LMHeadModel\" is not supported", "LlamaForCausalLM"],
    );

    // A sliding window in use.
    let dir = broken_copy("qwen2", "sliding");
    edit_config(&dir, |c| {
        c.insert("use_sliding_window".into(), json!(true));
        c.remove("layer_types");
    });
    check_error(
        &dir,
        "config.json",
        "use_sliding_window",
        &["true is not supported"],
    );
    let dir = broken_copy("mistral", "sliding");
    edit_config(&dir, |c| {
        c.insert("sliding_window".into(), json!(16));
    });
    check_error(
        &dir,
        "config.json",
        "sliding_window",
        &["16 is shorter than max_position_embeddings (64)"],
    );

    // An unknown rope type, in the 5.x and the 4.x layouts.
    let dir = broken_copy("llama", "rope");
    edit_config(&dir, |c| {
        c.insert(
            "rope_parameters".into(),
            json!({"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}),
        );
    });
    check_error(
        &dir,
        "config.json",
        "rope_parameters.rope_type",
        &["unknown rope type \"yarn\""],
    );
    let dir = broken_copy("llama-v4", "rope");
    edit_config(&dir, |c| {
        c.insert(
            "rope_scaling".into(),
            json!({"type": "dynamic", "factor": 2.0}),
        );
    });
    check_error(
        &dir,
        "config.json",
        "rope_scaling.type",
        &["unknown rope type \"dynamic\""],
    );

    // A tied checkpoint that also stores lm_head.weight, and an old RoPE
    // buffer: accepted, as transformers accepts them.
    let dir = broken_copy("llama", "tied-lm-head");
    rewrite_tensors(&dir, |tensors| {
        let embedding = tensors
            .iter()
            .find(|t| t.0 == "model.embed_tokens.weight")
            .unwrap()
            .clone();
        tensors.push(("lm_head.weight".into(), embedding.1, embedding.2));
        tensors.push((
            "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
            vec![4],
            vec![1.0; 4],
        ));
    });
    let checkpoint = HfCheckpoint::open(&dir).unwrap();
    assert!(checkpoint.config.tied_embeddings && checkpoint.tensors.contains("lm_head.weight"));
    std::fs::remove_dir_all(&dir).unwrap();

    // Neither a single file nor an index.
    let dir = broken_copy("llama", "no-weights");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let err = HfCheckpoint::open(&dir).unwrap_err().to_string();
    assert!(
        err.contains("neither model.safetensors nor model.safetensors.index.json"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A `tokenizer.json` whose `decoder` the `tokenizers` crate cannot read
/// (it panics inside its decoder deserializer rather than failing) is an
/// error naming the file, as is one that is not valid JSON (issue 23's
/// `hf_tokenizer` fuzz target found the second).
#[test]
fn a_tokenizer_whose_decoder_the_tokenizers_crate_cannot_read_is_an_error() {
    let dir = temp_dir("hf-bad-decoder");
    let mut json = read_json(&hf_fixture("tokenizer/tokenizer.json"));
    json["decoder"] = json!({"type": "ByteLevel", "add_prefix_space": "yes"});
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
    let Err(err) = HfTokenizer::from_file(&path) else {
        panic!("{} was accepted", path.display())
    };
    let err = err.to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("decoder"),
        "{err}"
    );
    let mut bytes = std::fs::read(hf_fixture("tokenizer/tokenizer.json")).unwrap();
    let at = bytes.windows(8).position(|w| w == b"\"decoder").unwrap();
    bytes[at + 20] = 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let Err(err) = HfTokenizer::from_file(&path) else {
        panic!("{} was accepted", path.display())
    };
    let err = err.to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("not valid JSON"),
        "{err}"
    );
}
