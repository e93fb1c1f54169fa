//! The fuzz targets: one function per parser or loader, each taking raw
//! bytes as a hostile user would hand them over. A target may return an
//! error (ignored here) but must not panic, overflow (the fuzzing build and
//! the tests check overflow), hang, or allocate beyond what its input
//! justifies (libFuzzer's `-malloc_limit_mb` catches that).
//!
//! Compiled twice: by the cargo-fuzz binaries in `fuzz_targets/` and, with
//! `#[path]`, by `tests/it/fuzz.rs`, which replays the regression corpus in
//! `tests/fixtures/fuzz/<target>/` under `cargo test`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anemone::backend::Precision;
use anemone::data::tokens::{Batcher, Order, TokenFile, TokenSpan};

/// A fuzz target: raw bytes in, nothing out (errors are fine, panics not).
pub type Target = fn(&[u8]);

/// Every target by name, as `fuzz_targets/<name>.rs` and the corpus
/// directories are named.
pub const TARGETS: &[(&str, Target)] = &[
    ("mil", mil),
    ("blob", blob),
    ("checkpoint", checkpoint),
    ("llama2c", llama2c),
    ("tokenizer_bin", tokenizer_bin),
    ("tokens", tokens),
    ("npy", npy),
    ("model_config", model_config),
    ("hf_config", hf_config),
    ("safetensors", safetensors),
    ("hf_tokenizer", hf_tokenizer),
    ("sft_jsonl", sft_jsonl),
    ("peft_adapter_config", peft_adapter_config),
];

fn name(file: &str) -> PathBuf {
    PathBuf::from(format!("fuzz/{file}"))
}

/// MIL text through everything `mil check` and `mil run` do before executing:
/// parse, verify (both rule sets, with the weight file), the canonical text
/// and the formatter, lowering and planning on the CPU backend. Bytes after
/// the first NUL are the package's weight file `@model_path/weights/w.bin`.
pub fn mil(data: &[u8]) {
    let (text, blob) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let _ = anemone::mil::format::format(text);
    let Ok(program) = anemone::mil::parse(text) else {
        return;
    };
    let _ = anemone::mil::emit(&program);
    let weights: BTreeMap<String, Vec<u8>> =
        [("@model_path/weights/w.bin".to_string(), blob.to_vec())].into();
    for target in anemone::mil::verify::Target::ALL {
        let _ = anemone::mil::verify::verify_with_weights(&program, &weights, target);
    }
    for precision in [Precision::Fp32, Precision::Fp16] {
        let _ = anemone::backend::cpu::check_program(&program, &weights, precision);
    }
}

/// A CoreML weight blob file: parse, then decode every record.
pub fn blob(data: &[u8]) {
    let Ok(file) = anemone::blob::BlobFile::parse(data) else {
        let _ = anemone::blob::read_f32(data, 64);
        return;
    };
    for blob in file.blobs() {
        let _ = blob.to_f32();
        let _ = blob.to_i64();
        let _ = blob.f16_bits();
    }
    for record in file.records() {
        let _ = file.blob_at(record.offset);
    }
}

/// An anemone checkpoint.
pub fn checkpoint(data: &[u8]) {
    let _ = anemone::model::checkpoint::decode(data, &name("checkpoint.bin"));
}

/// A llama2.c `model.bin` (versions 0 and 1).
pub fn llama2c(data: &[u8]) {
    if let Ok(weights) = anemone::model::llama2c::decode(data, &name("model.bin")) {
        let _ = anemone::model::llama2c::encode(&weights, 1, &name("out.bin"));
    }
}

/// A llama2.c `tokenizer.bin`, read to the end and as a 300-token vocabulary;
/// a vocabulary that loads encodes and decodes a text.
pub fn tokenizer_bin(data: &[u8]) {
    use anemone::data::tokenizer::Tokenizer;
    for vocab in [None, Some(300)] {
        if let Ok(tokenizer) = Tokenizer::from_bytes(data, vocab) {
            let ids = tokenizer.encode("Once upon a time, ünïcödé <s>\n", true, true);
            let _ = tokenizer.decode(&ids);
            let _ = tokenizer.to_bytes();
        }
    }
}

/// A token file (either format): its vocabulary check and a few windows in
/// both orders.
pub fn tokens(data: &[u8]) {
    let Ok(file) = TokenFile::from_bytes(data.to_vec(), &name("tokens.bin")) else {
        return;
    };
    let _ = file.check_vocab(1000);
    let file = Arc::new(file);
    for order in Order::ALL {
        let Ok(mut batcher) = Batcher::new(TokenSpan::whole(file.clone()), 4, order, 7) else {
            continue;
        };
        for _ in 0..3 {
            let _ = batcher.next_batch(2);
        }
    }
    let _ = TokenSpan::split_tail(file, 0.1);
}

/// A NumPy `.npy` file.
pub fn npy(data: &[u8]) {
    let _ = anemone::npy::decode(data, &name("x.npy"));
}

/// anemone's JSON model config (`--config FILE`) and a run directory's
/// `config.json`; a config that validates has its layout computed.
pub fn model_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = anemone::model::ModelConfig::parse_json(text, &name("model.json")) {
        let layout = anemone::model::Layout::new(&config);
        for param in layout.params() {
            let _ = layout.range(param);
        }
        let _ = config.n_params();
        let _ = config.train_flops_per_token(config.seq_len);
    }
    let _ = anemone::train::TrainConfig::parse_json(text, &name("config.json"));
}

/// A Hugging Face `config.json` (and what it implies: tensor list, counts).
pub fn hf_config(data: &[u8]) {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(config) = anemone::model::hf::HfConfig::from_json(&name("config.json"), &json) {
        let _ = config.n_params();
        let _ = anemone::model::hf::tensors::expected_tensors(&config);
    }
}

/// A safetensors file (read through a temp file, as the loader maps files):
/// every tensor converted with its stored shape.
pub fn safetensors(data: &[u8]) {
    let path = std::env::temp_dir().join(format!(
        "anemone-fuzz-{}-{:?}.safetensors",
        std::process::id(),
        std::thread::current().id()
    ));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(reader) = anemone::model::hf::SafetensorsReader::open_file(&path) {
        let names: Vec<String> = reader.names().map(str::to_string).collect();
        for name in names {
            let shape = reader
                .shape(&name)
                .map(<[usize]>::to_vec)
                .unwrap_or_default();
            let _ = reader.read_f32(&name, &shape);
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// A Hugging Face `tokenizer.json`; one that loads encodes and decodes a text.
pub fn hf_tokenizer(data: &[u8]) {
    let path = name("tokenizer.json");
    if let Ok(tokenizer) = anemone::data::hf::HfTokenizer::from_bytes(data, Path::new(&path)) {
        if let Ok(ids) = tokenizer.encode("Hello, wörld <s>", true) {
            let _ = tokenizer.decode(&ids, false);
        }
        let _ = tokenizer.vocab_size();
    }
}

/// Fine-tuning JSONL (read through a temp file, as the loader reads files):
/// every row parsed; each row's text as the ids of a one-token-per-byte
/// example put in a short window.
pub fn sft_jsonl(data: &[u8]) {
    use anemone::data::sft::{Example, Row, read_rows, window};
    let path = std::env::temp_dir().join(format!(
        "anemone-fuzz-{}-{:?}.jsonl",
        std::process::id(),
        std::thread::current().id()
    ));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(rows) = read_rows(&path) {
        for (_, row) in rows {
            let text = match row {
                Row::Text(text) => text,
                Row::Completion { prompt, completion } => prompt + &completion,
                Row::Chat(messages) => messages.into_iter().map(|m| m.content).collect(),
            };
            let ids: Vec<u32> = text.bytes().map(u32::from).collect();
            let loss = ids.iter().map(|&id| id % 2 == 0).collect();
            let example = Example {
                ids,
                loss,
                unlocated_turns: 0,
            };
            let (mut inputs, mut targets, mut weights) = (vec![0; 7], vec![0; 7], vec![0.0; 7]);
            let _ = window(&example, 0, &mut inputs, &mut targets, &mut weights);
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// A PEFT `adapter_config.json` for a two-layer base; one that parses is
/// written back, read again, and sized on the base (a huge rank is refused).
pub fn peft_adapter_config(data: &[u8]) {
    use anemone::model::hf::adapter::{config_json, parse_config};
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let path = name("adapter_config.json");
    if let Ok(config) = parse_config(&path, &json, 2) {
        let again = parse_config(&path, &config_json(&config, 2, None), 2);
        assert_eq!(
            again.ok().as_ref(),
            Some(&config),
            "adapter_config.json round trip"
        );
        let model = anemone::model::ModelConfig::llama(16, 2, 2, 1, 32, 40, 8);
        let _ = anemone::model::lora::Adapters::zeros(&model, &config);
    }
}
