//! llama2.c checkpoint import/export: byte layout against hand-derived values,
//! round trips for version 0 and 1 (tied and untied), the NumPy-read fixture,
//! and error messages.

use std::path::Path;

use anemone::model::llama2c::{self, MAGIC};
use anemone::model::{ModelConfig, Param, Weights};
use anemone::rng::Rng;

use crate::common::temp_dir;

pub const FIXTURE: &str = "tests/fixtures/llama2c/tiny_v0.bin";

/// The model behind `tests/fixtures/llama2c/tiny_v0.bin`: dim 64, 2 layers,
/// 8 heads, 4 kv heads, hidden 172, vocab 512, seq_len 64, untied classifier.
/// Weights are rescaled from the 0.02-std init to std 1/sqrt(fan_in) (the
/// classifier 4/sqrt(fan_in), the embedding 1) and the norms randomized around 1, so logits are far from uniform and greedy
/// decoding has clear winners.
pub fn fixture_weights() -> Weights {
    let config = ModelConfig {
        tied_embeddings: false,
        ..ModelConfig::llama(64, 2, 8, 4, 172, 512, 64)
    };
    let mut weights = Weights::init(&config, 42);
    let mut rng = Rng::new(7);
    for p in weights.layout.params() {
        let fan_in = *weights.layout.shape(p).last().unwrap() as f32;
        let values = weights.get_mut(p);
        if p.is_norm() {
            values
                .iter_mut()
                .for_each(|x| *x = 1.0 + 0.2 * rng.normal());
        } else {
            let std = (values.iter().map(|x| x * x).sum::<f32>() / values.len() as f32).sqrt();
            let target = match p {
                Param::Embedding => 1.0,
                Param::Classifier => 4.0 / fan_in.sqrt(),
                _ => 1.0 / fan_in.sqrt(),
            };
            values.iter_mut().for_each(|x| *x *= target / std);
        }
    }
    weights
}

/// Writes the fixture model; then run `scripts/llama2c_ref.py` on it (see its header).
#[test]
#[ignore = "regenerates tests/fixtures/llama2c/tiny_v0.bin"]
fn regenerate_fixture() {
    llama2c::write_v0(&fixture_weights(), Path::new(FIXTURE)).unwrap();
}

/// A small GQA model with distinct random values everywhere.
fn small_weights(tied: bool) -> Weights {
    let config = ModelConfig {
        tied_embeddings: tied,
        ..ModelConfig::llama(16, 3, 4, 2, 24, 40, 12)
    };
    let mut weights = Weights::init(&config, 5);
    let mut rng = Rng::new(9);
    weights.data.iter_mut().for_each(|x| *x = rng.normal());
    weights
}

fn le_i32s(bytes: &[u8]) -> Vec<i32> {
    bytes
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn le_f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn round_trips_are_bit_exact_for_both_versions_tied_and_untied() {
    for tied in [true, false] {
        let weights = small_weights(tied);
        for (version, name) in [(0, "v0.bin"), (1, "v1.bin")] {
            let path = temp_dir(&format!("llama2c-rt-{tied}-{version}")).join(name);
            if version == 0 {
                llama2c::write_v0(&weights, &path).unwrap();
            } else {
                llama2c::write_v1(&weights, &path).unwrap();
            }
            let back = llama2c::read(&path).unwrap();
            assert_eq!(
                back.config(),
                weights.config(),
                "tied {tied} version {version}"
            );
            let same_bits = back
                .data
                .iter()
                .zip(&weights.data)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same_bits, "tied {tied} version {version}");
            std::fs::remove_file(&path).unwrap();
        }
    }
}

#[test]
fn v0_header_and_size_match_hand_derived_bytes() {
    // dim 16, hidden 24, 3 layers, 4 heads, 2 kv heads, vocab 40, seq 12; head 4, kv dim 8.
    for tied in [true, false] {
        let bytes = llama2c::encode(&small_weights(tied), 0, Path::new("x.bin")).unwrap();
        let vocab: i32 = if tied { 40 } else { -40 };
        assert_eq!(le_i32s(&bytes[..28]), [16, 24, 3, 4, 2, vocab, 12]);
        if !tied {
            assert_eq!(&bytes[20..24], &[0xd8, 0xff, 0xff, 0xff]); // -40, two's complement
        }
        // Per layer: 2*16 norms + 2*16*16 (wq, wo) + 2*8*16 (wk, wv) + 3*24*16 (ffn) = 1952.
        // Body: 40*16 embedding + 3*1952 + 16 rms_final + 2*12*2 freq_cis (+ 40*16 wcls).
        let floats = 640 + 3 * 1952 + 16 + 48 + if tied { 0 } else { 640 };
        assert_eq!(bytes.len(), 28 + 4 * floats);
    }
}

#[test]
fn v0_freq_cis_tables_hold_cos_and_sin_of_pos_times_freq() {
    // head 4: freq_0 = 1, freq_1 = 10000^(-2/4) = 0.01. Tables are (seq 12, 2),
    // right after rms_final: 28 + 4 * (640 + 3*1952 + 16) bytes into the file.
    let bytes = llama2c::encode(&small_weights(true), 0, Path::new("x.bin")).unwrap();
    let start = 28 + 4 * (640 + 3 * 1952 + 16);
    let real = le_f32s(&bytes[start..start + 4 * 24]);
    let imag = le_f32s(&bytes[start + 4 * 24..start + 4 * 48]);
    assert_eq!(bytes.len(), start + 4 * 48, "tied: tables end the file");
    let cases = [
        (0, 0, 0.0f64),
        (1, 0, 1.0),
        (1, 1, 0.01),
        (5, 0, 5.0),
        (11, 1, 0.11),
    ];
    for (pos, i, angle) in cases {
        assert!(
            (real[pos * 2 + i] as f64 - angle.cos()).abs() < 1e-7,
            "cos pos {pos} i {i}"
        );
        assert!(
            (imag[pos * 2 + i] as f64 - angle.sin()).abs() < 1e-7,
            "sin pos {pos} i {i}"
        );
    }
}

/// Fill every tensor with its own marker value, then read the file's body as
/// runs of equal values: their order must be llama2.c's export order.
fn marker_runs(tied: bool, version: i32) -> Vec<String> {
    let mut weights = small_weights(tied);
    let params = weights.layout.params();
    for (i, &p) in params.iter().enumerate() {
        weights.get_mut(p).fill(1000.0 + i as f32);
    }
    let bytes = llama2c::encode(&weights, version, Path::new("x.bin")).unwrap();
    let header = if version == 0 { 28 } else { 256 };
    let mut runs: Vec<String> = Vec::new();
    let mut last = f32::NAN;
    for value in le_f32s(&bytes[header..]) {
        if value != last {
            let name = if value >= 1000.0 {
                params[(value - 1000.0) as usize].name()
            } else {
                "freq_cis".into()
            };
            if value >= 1000.0 || runs.last().map(String::as_str) != Some("freq_cis") {
                runs.push(name);
            }
            last = value;
        }
    }
    runs
}

#[test]
fn body_order_follows_llama2c_export_py() {
    // llama2.c export.py: legacy_export and version1_export (written out by hand).
    fn per_kind(kind: &'static str) -> impl Iterator<Item = String> {
        (0..3).map(move |l| format!("layers.{l}.{kind}"))
    }
    let mut v0: Vec<String> = vec!["embedding".into()];
    for kind in [
        "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3",
    ] {
        v0.extend(per_kind(kind));
    }
    v0.extend(["rms_final".into(), "freq_cis".into(), "classifier".into()]);
    assert_eq!(marker_runs(false, 0), v0);

    let mut v1: Vec<String> = per_kind("rms_att").chain(per_kind("rms_ffn")).collect();
    v1.extend(["rms_final".into(), "embedding".into()]);
    for kind in ["wq", "wk", "wv", "wo", "w1", "w2", "w3"] {
        v1.extend(per_kind(kind));
    }
    assert_eq!(marker_runs(true, 1), v1);
    v1.push("classifier".into());
    assert_eq!(marker_runs(false, 1), v1);
}

#[test]
fn v1_header_matches_hand_derived_bytes() {
    for tied in [true, false] {
        let bytes = llama2c::encode(&small_weights(tied), 1, Path::new("x.bin")).unwrap();
        assert_eq!(&bytes[..4], b"24ka"); // 0x616b3432 little-endian
        assert_eq!(le_i32s(&bytes[4..36]), [1, 16, 24, 3, 4, 2, 40, 12]);
        assert_eq!(bytes[36], tied as u8);
        assert!(bytes[37..256].iter().all(|&b| b == 0));
        let floats = 640 + 3 * 1952 + 16 + if tied { 0 } else { 640 };
        assert_eq!(bytes.len(), 256 + 4 * floats);
    }
}

#[test]
fn fixture_header_is_the_documented_tiny_model() {
    let bytes = std::fs::read(FIXTURE).unwrap();
    assert_eq!(le_i32s(&bytes[..28]), [64, 172, 2, 8, 4, -512, 64]);
    let weights = llama2c::read(Path::new(FIXTURE)).unwrap();
    let config = weights.config();
    assert!(!config.tied_embeddings);
    assert_eq!((config.head_dim, config.kv_dim()), (8, 32));
}

fn read_err(bytes: &[u8]) -> String {
    let path = temp_dir("llama2c-bad").join("bad.bin");
    std::fs::write(&path, bytes).unwrap();
    let msg = llama2c::read(&path).unwrap_err().to_string();
    assert!(msg.contains("bad.bin"), "error must name the file: {msg}");
    // The decoder's map of the file refuses it with the same words.
    let mapped = llama2c::map(&path).unwrap_err().to_string();
    assert_eq!(mapped, msg);
    msg
}

#[test]
fn mapped_tensors_are_the_read_weights_bit_for_bit() {
    for tied in [true, false] {
        let weights = small_weights(tied);
        for version in [0, 1] {
            let path = temp_dir(&format!("llama2c-map-{tied}-{version}")).join("m.bin");
            std::fs::write(&path, llama2c::encode(&weights, version, &path).unwrap()).unwrap();
            let mapped = llama2c::map(&path).unwrap().expect("a regular file maps");
            assert_eq!(mapped.config(), weights.config());
            let view = mapped.view();
            for p in weights.layout.params() {
                let same = view
                    .get(p)
                    .iter()
                    .zip(weights.get(p))
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same && view.get(p).len() == weights.get(p).len(),
                    "{} tied {tied} version {version}",
                    p.name()
                );
            }
            assert!(matches!(
                anemone::model::load_for_decoding(&path).unwrap(),
                anemone::model::DecoderWeights::Mapped(_)
            ));
        }
    }
}

#[test]
fn a_mapped_file_with_a_nan_is_refused_like_a_read_one() {
    let mut weights = small_weights(false);
    weights.get_mut(anemone::model::Param::W3(2))[5] = f32::NAN;
    let bytes = llama2c::encode(&weights, 0, Path::new("x.bin")).unwrap();
    let msg = read_err(&bytes);
    assert!(
        msg.contains("layers.2.w3") && msg.contains("element 5 "),
        "{msg}"
    );
}

fn header_v0(fields: [i32; 7]) -> Vec<u8> {
    fields.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn bad_files_give_errors_naming_file_and_field() {
    let good = llama2c::encode(&small_weights(false), 0, Path::new("x.bin")).unwrap();
    let msg = read_err(&good[..good.len() - 4]);
    let expected = good.len();
    assert!(
        msg.contains(&format!("expected {expected} bytes"))
            && msg.contains("dim=16")
            && msg.contains(&format!("got {}", expected - 4)),
        "{msg}"
    );
    let mut long = good.clone();
    long.extend([0; 8]);
    assert!(read_err(&long).contains("too long"));

    assert!(read_err(&[1, 2, 3]).contains("header"));
    let msg = read_err(&header_v0([16, 24, 3, 0, 2, 40, 12]));
    assert!(
        msg.contains("header.n_heads") && msg.contains("positive"),
        "{msg}"
    );
    let msg = read_err(&header_v0([-16, 24, 3, 4, 2, 40, 12]));
    assert!(msg.contains("header.dim"), "{msg}");
    let msg = read_err(&header_v0([18, 24, 3, 4, 2, 40, 12]));
    assert!(msg.contains("n_heads") && msg.contains("18"), "{msg}");
    let msg = read_err(&header_v0([16, 24, 3, 4, 3, 40, 12]));
    assert!(msg.contains("n_kv_heads"), "{msg}");
    let msg = read_err(&header_v0([1 << 30, 1 << 30, i32::MAX, 1, 1, i32::MAX, 2]));
    assert!(msg.contains("implausibly large"), "{msg}");

    let mut v1 = llama2c::encode(&small_weights(true), 1, Path::new("x.bin")).unwrap();
    v1[4] = 7;
    assert!(read_err(&v1).contains("unknown llama2.c version 7"));
    v1[4] = 2;
    assert!(read_err(&v1).contains("Q8_0"));
    v1[4] = 1;
    v1[36] = 5;
    assert!(read_err(&v1).contains("header.shared_classifier"));
    v1[36] = 1;
    v1[28..32].copy_from_slice(&(-40i32).to_le_bytes());
    assert!(read_err(&v1).contains("header.vocab_size"));
    let mut magic_only = MAGIC.to_le_bytes().to_vec();
    magic_only.extend(1i32.to_le_bytes());
    assert!(read_err(&magic_only).contains("header"));

    let missing = llama2c::read(Path::new("/nonexistent/anemone.bin")).unwrap_err();
    assert!(missing.to_string().contains("/nonexistent/anemone.bin"));
}

#[test]
fn export_refuses_configs_llama2c_cannot_describe() {
    let config = ModelConfig {
        head_dim: 8,
        ..ModelConfig::llama(16, 1, 4, 2, 24, 40, 12)
    };
    let dir = temp_dir("llama2c-refused");
    let err = llama2c::write_v0(&Weights::zeros(&config), &dir.join("hd.bin"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("head_dim") && err.contains("32 != dim (16)"),
        "{err}"
    );
    assert!(!dir.join("hd.bin").exists());

    let config = ModelConfig {
        rope_theta: 1e6,
        ..ModelConfig::llama(16, 1, 4, 2, 24, 40, 12)
    };
    let err = llama2c::write_v1(&Weights::zeros(&config), &dir.join("th.bin"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rope_theta") && err.contains("1000000"),
        "{err}"
    );
}
