//! The CPU decoder and sampler against an independent NumPy implementation
//! (`scripts/llama2c_ref.py`, float64, whole-sequence attention without a KV
//! cache) run on a llama2.c file that anemone exported, and sampling
//! frequencies against hand-derived probabilities.

use std::path::Path;

use anemone::generate::{Generator, Sampler, argmax};
use anemone::model::llama2c;

use crate::llama2c::FIXTURE;

const EXPECTED: &str = "tests/fixtures/llama2c/tiny_v0.expected.json";

struct Expected {
    prompt: Vec<u32>,
    max_new_tokens: usize,
    logits: Vec<Vec<f32>>,
    greedy: Vec<u32>,
}

fn expected() -> Expected {
    let text = std::fs::read_to_string(EXPECTED).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = |key: &str| -> Vec<u32> {
        doc[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    Expected {
        prompt: ids("prompt"),
        max_new_tokens: doc["max_new_tokens"].as_u64().unwrap() as usize,
        logits: doc["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect(),
        greedy: ids("greedy"),
    }
}

#[test]
fn logits_match_numpy_at_every_prompt_position() {
    let weights = llama2c::read(Path::new(FIXTURE)).unwrap();
    let expected = expected();
    let logits = Generator::new(&weights)
        .forward_logits(&expected.prompt)
        .unwrap();
    assert_eq!(logits.len(), expected.logits.len());
    let (relative, absolute) = (1e-4f32, 1e-4f32);
    let mut worst = 0.0f32;
    for (pos, (ours, numpy)) in logits.iter().zip(&expected.logits).enumerate() {
        assert_eq!(ours.len(), 512);
        for (v, (&a, &b)) in ours.iter().zip(numpy).enumerate() {
            let err = (a - b).abs();
            worst = worst.max(err / b.abs().max(1.0));
            assert!(
                err <= absolute + relative * b.abs(),
                "pos {pos} token {v}: ours {a}, numpy {b}"
            );
        }
    }
    // The fixture is meant to have well-separated logits (not a near-uniform random model).
    let spread = expected.logits[0]
        .iter()
        .fold(0.0f32, |m, x| m.max(x.abs()));
    assert!(
        spread > 1.0,
        "fixture logits are too flat: max |logit| {spread}"
    );
    eprintln!("worst relative logit error vs numpy: {worst:e}");
}

#[test]
fn greedy_generation_reproduces_numpy_token_ids() {
    let weights = llama2c::read(Path::new(FIXTURE)).unwrap();
    let expected = expected();
    let mut generator = Generator::new(&weights);
    let mut streamed = Vec::new();
    let ids = generator
        .generate(
            &expected.prompt,
            expected.max_new_tokens,
            &mut Sampler::greedy(),
            |id| streamed.push(id),
        )
        .unwrap();
    assert_eq!(ids, expected.greedy);
    assert_eq!(streamed, ids);
    // No EOS in the continuation, so the context limit (seq_len 64) ended it:
    // 64 - 12 prompt tokens + 1 = 53 new tokens.
    assert_eq!(ids.len(), 64 - expected.prompt.len() + 1);
    assert_eq!(generator.position(), 64);
    // A shorter budget is a prefix of the same continuation.
    let five = generator
        .generate(&expected.prompt, 5, &mut Sampler::greedy(), |_| {})
        .unwrap();
    assert_eq!(five, expected.greedy[..5]);
}

#[test]
fn the_mapped_file_gives_the_read_weights_logits_and_ids_bit_for_bit() {
    let weights = llama2c::read(Path::new(FIXTURE)).unwrap();
    let mapped = llama2c::map(Path::new(FIXTURE))
        .unwrap()
        .expect("a regular file maps");
    let expected = expected();
    let read_logits = Generator::new(&weights)
        .forward_logits(&expected.prompt)
        .unwrap();
    let mapped_logits = Generator::from_view(mapped.view())
        .forward_logits(&expected.prompt)
        .unwrap();
    let bits = |rows: &[Vec<f32>]| -> Vec<Vec<u32>> {
        rows.iter()
            .map(|row| row.iter().map(|x| x.to_bits()).collect())
            .collect()
    };
    assert_eq!(bits(&mapped_logits), bits(&read_logits));
    let ids = Generator::from_view(mapped.view())
        .generate(
            &expected.prompt,
            expected.max_new_tokens,
            &mut Sampler::greedy(),
            |_| {},
        )
        .unwrap();
    assert_eq!(ids, expected.greedy);
}

#[test]
fn kv_cache_decoding_equals_fresh_recomputation() {
    // Logits of the last position of a prefix must not depend on what was
    // decoded before the cache was reset.
    let weights = llama2c::read(Path::new(FIXTURE)).unwrap();
    let mut generator = Generator::new(&weights);
    let tokens = [1, 5, 9, 300, 4];
    let all = generator.forward_logits(&tokens).unwrap();
    generator.forward_logits(&[1, 7, 7, 7]).unwrap();
    let prefix = generator.forward_logits(&tokens[..3]).unwrap();
    assert_eq!(prefix[..], all[..3]);
}

#[test]
fn generator_errors_are_clear() {
    let weights = llama2c::read(Path::new(FIXTURE)).unwrap();
    let mut generator = Generator::new(&weights);
    let err = generator.forward(512).unwrap_err().to_string();
    assert!(err.contains("512") && err.contains("vocabulary"), "{err}");
    let err = generator
        .generate(&[], 4, &mut Sampler::greedy(), |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("empty"), "{err}");
    let err = generator
        .generate(&[1; 65], 4, &mut Sampler::greedy(), |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("65") && err.contains("64"), "{err}");
    let mut generator = Generator::new(&weights);
    for _ in 0..64 {
        generator.forward(1).unwrap();
    }
    let err = generator.forward(1).unwrap_err().to_string();
    assert!(err.contains("context is full"), "{err}");
}

/// Sampling frequencies over `draws` draws.
fn frequencies(sampler: &mut Sampler, logits: &[f32], draws: usize) -> Vec<f64> {
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..draws {
        counts[sampler.sample(logits) as usize] += 1;
    }
    counts.iter().map(|&c| c as f64 / draws as f64).collect()
}

#[test]
fn sampling_frequencies_match_hand_derived_probabilities() {
    let probs = [0.5f32, 0.3, 0.15, 0.05];
    let logits: Vec<f32> = probs.iter().map(|p| p.ln() + 3.0).collect();
    let draws = 40_000;
    let close = |got: &[f64], want: &[f64]| got.iter().zip(want).all(|(g, w)| (g - w).abs() < 0.01);

    // T = 1, no nucleus: the distribution itself.
    let got = frequencies(&mut Sampler::new(1.0, 1.0, 11), &logits, draws);
    assert!(close(&got, &[0.5, 0.3, 0.15, 0.05]), "{got:?}");

    // T = 2: p^(1/2) renormalised: sqrt(.5, .3, .15, .05) / 1.86570.
    let got = frequencies(&mut Sampler::new(2.0, 1.0, 12), &logits, draws);
    assert!(
        close(&got, &[0.37900, 0.29358, 0.20759, 0.11985]),
        "{got:?}"
    );

    // top_p 0.7: 0.5 + 0.3 = 0.8 is the first mass above 0.7, so the nucleus
    // is {0, 1} with probabilities 0.5/0.8 and 0.3/0.8.
    let got = frequencies(&mut Sampler::new(1.0, 0.7, 13), &logits, draws);
    assert_eq!((got[2], got[3]), (0.0, 0.0), "{got:?}");
    assert!(close(&got, &[0.625, 0.375, 0.0, 0.0]), "{got:?}");

    // A nucleus smaller than the top token keeps just the top token.
    let got = frequencies(&mut Sampler::new(1.0, 0.01, 14), &logits, 1000);
    assert_eq!(got, [1.0, 0.0, 0.0, 0.0]);

    // Same seed, same draws.
    let a: Vec<u32> = {
        let mut s = Sampler::new(0.9, 0.9, 99);
        (0..50).map(|_| s.sample(&logits)).collect()
    };
    let mut s = Sampler::new(0.9, 0.9, 99);
    assert!(a.iter().all(|&t| t == s.sample(&logits)));
}

#[test]
fn greedy_sampler_is_argmax_with_ties_to_the_lowest_id() {
    let mut sampler = Sampler::greedy();
    assert_eq!(sampler.sample(&[0.1, 2.0, -3.0, 2.0]), 1);
    assert_eq!(argmax(&[5.0, 5.0, 5.0]), 0);
}

/// A model trained by anemone (built-in stories, 2 layers, dim 64), exported
/// with `anemone export --format llama2c`, with its tokenizer: greedy text from
/// BOS equals the independent NumPy implementation's byte for byte
/// (`scripts/llama2c_generate_text.py`, fixtures in `tests/fixtures/generate/`).
#[test]
fn greedy_text_of_a_trained_model_matches_numpy() {
    let dir = crate::common::fixture("generate");
    let weights = anemone::model::llama2c::read(&dir.join("story_v0.bin")).unwrap();
    let tokenizer = anemone::data::tokenizer::Tokenizer::read(
        &dir.join("tokenizer.bin"),
        Some(weights.config().vocab_size),
    )
    .unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let want_ids: Vec<u32> = expected["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let mut generator = anemone::generate::Generator::new(&weights);
    let mut sampler = anemone::generate::Sampler::greedy();
    let ids = generator
        .generate(
            &[anemone::generate::BOS],
            want_ids.len(),
            &mut sampler,
            |_| {},
        )
        .unwrap();
    assert_eq!(ids, want_ids);
    let mut text = vec![anemone::generate::BOS];
    text.extend(&ids);
    assert_eq!(
        tokenizer.decode(&text).unwrap(),
        expected["text"].as_str().unwrap()
    );
}

/// Issue 23, class 6: a model trained on several documents (anemone's
/// `tokenize` starts each with BOS) ends its document with a BOS, and
/// generation stops there, as llama2.c's `run.c` does: `anemone generate`
/// at temperature 0 prints byte for byte what `run.c -t 0 -n STEPS -i PROMPT`
/// prints, including where it stops. The expected output comes from the
/// independent NumPy decoder `scripts/llama2c_generate_text.py`, which follows
/// run.c's loop and stopping rule (and was checked against run.c itself,
/// `docs/robustness.md`); two prompts end at a BOS, one at the step limit.
#[test]
fn generation_stops_where_run_c_stops() {
    let dir = crate::common::fixture("generate").join("stops");
    let model = dir.join("stops_v0.bin");
    let tokenizer_path = dir.join("tokenizer.bin");
    let weights = llama2c::read(&model).unwrap();
    let tokenizer = anemone::data::tokenizer::Tokenizer::read(
        &tokenizer_path,
        Some(weights.config().vocab_size),
    )
    .unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let cases = expected["cases"].as_array().unwrap();
    assert!(cases.iter().filter(|c| c["stops_at_bos"] == true).count() >= 2);
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        // run.c's steps count positions from the first prompt token: the new
        // tokens at most are steps - prompt length + 1.
        let prompt_ids = tokenizer.encode(prompt, true, false);
        let max_tokens = steps - prompt_ids.len() + 1;
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let ids = Generator::new(&weights)
            .generate(&prompt_ids, max_tokens, &mut Sampler::greedy(), |_| {})
            .unwrap();
        assert_eq!(ids, want, "prompt {prompt:?}");
        let out = crate::common::anemone()
            .args(["generate", "--temperature", "0", "--model"])
            .arg(&model)
            .arg("--tokenizer")
            .arg(&tokenizer_path)
            .args(["--prompt", prompt, "--max-tokens", &max_tokens.to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            case["stdout"].as_str().unwrap(),
            "prompt {prompt:?}"
        );
    }
}

/// A model whose every prediction is token `favourite`: a constant
/// embedding, layers that add nothing, an untied classifier with one row.
fn always(favourite: u32) -> anemone::model::Weights {
    use anemone::model::{ModelConfig, Param, Weights};
    let config = ModelConfig {
        tied_embeddings: false,
        ..ModelConfig::llama(8, 1, 2, 2, 8, 16, 32)
    };
    let mut weights = Weights::zeros(&config);
    weights.get_mut(Param::Embedding).fill(1.0);
    for norm in [Param::RmsAtt(0), Param::RmsFfn(0), Param::RmsFinal] {
        weights.get_mut(norm).fill(1.0);
    }
    let row = favourite as usize * 8;
    weights.get_mut(Param::Classifier)[row..row + 8].fill(1.0);
    weights
}

/// Issue 23, class 6: BOS and EOS end generation, and so do a model's own
/// stop tokens (a Hugging Face config's `eos_token_id`s) when set.
#[test]
fn bos_eos_and_set_stop_tokens_end_generation() {
    let prompt = [anemone::generate::BOS, 7];
    for stop in [anemone::generate::BOS, anemone::generate::EOS] {
        let weights = always(stop);
        let ids = Generator::new(&weights)
            .generate(&prompt, 10, &mut Sampler::greedy(), |_| {})
            .unwrap();
        assert!(ids.is_empty(), "{stop}: {ids:?}");
    }
    let weights = always(9);
    let mut generator = Generator::new(&weights);
    let ids = generator
        .generate(&prompt, 10, &mut Sampler::greedy(), |_| {})
        .unwrap();
    assert_eq!(ids, [9; 10]);
    generator.set_stop_tokens(&[9]);
    let ids = generator
        .generate(&prompt, 10, &mut Sampler::greedy(), |_| {})
        .unwrap();
    assert!(ids.is_empty(), "{ids:?}");
}
