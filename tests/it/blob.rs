//! MILBlob v2 weight files (`anemone::blob`) against coremltools.
//!
//! Reference: `scripts/gen_blob_fixtures.py` wrote `tests/fixtures/blob/*.bin`
//! with coremltools' `_BlobStorageWriter`, and `fixtures.json` with each blob's
//! input array, what coremltools' `_BlobStorageReader` read back, and the record
//! offset the writer returned. Other expected numbers are derived by hand from
//! the layout (module doc of `src/blob.rs`; platform notes, "coremltools as a
//! test oracle").

use anemone::Error;
use anemone::blob::{self, BlobDType, BlobFile, BlobWriter};
use proptest::prelude::*;
use serde_json::Value;

use crate::common::fixture;

fn manifest() -> Value {
    let text = std::fs::read_to_string(fixture("blob").join("fixtures.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn fixture_files() -> Vec<(String, Vec<u8>, Vec<Value>)> {
    let manifest = manifest();
    assert_eq!(manifest["made_by"], "scripts/gen_blob_fixtures.py");
    let files = manifest["files"].as_object().unwrap();
    assert!(
        files.len() >= 10,
        "fixtures.json lists {} files",
        files.len()
    );
    files
        .iter()
        .map(|(name, entry)| {
            let bytes = std::fs::read(fixture("blob").join(name)).unwrap();
            assert_eq!(
                bytes.len() as u64,
                entry["size"].as_u64().unwrap(),
                "{name}"
            );
            (
                name.clone(),
                bytes,
                entry["blobs"].as_array().unwrap().clone(),
            )
        })
        .collect()
}

/// A JSON number, or the strings "inf" / "-inf" the script writes for infinities.
fn json_f64(value: &Value) -> f64 {
    match value {
        Value::String(s) if s == "inf" => f64::INFINITY,
        Value::String(s) if s == "-inf" => f64::NEG_INFINITY,
        _ => value.as_f64().unwrap(),
    }
}

fn json_f32s(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| json_f64(v) as f32)
        .collect()
}

fn json_i64s(value: &Value) -> Vec<i64> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect()
}

fn bits_of(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

fn blob_message(result: Result<impl std::fmt::Debug, Error>) -> String {
    match result {
        Err(Error::Blob(msg)) => msg,
        other => panic!("expected Error::Blob, got {other:?}"),
    }
}

/// Adds one fixture blob to `writer` the way anemone's callers would; `None`
/// if the writer does not offer the dtype.
fn add_fixture_blob(writer: &mut BlobWriter, blob: &Value) -> Option<u64> {
    let ints = || json_i64s(&blob["input_int"]);
    let offset = match blob["dtype"].as_str().unwrap() {
        "fp16" => writer.add_fp16(&json_f32s(&blob["input_f32"])),
        "fp32" => writer.add_fp32(&json_f32s(&blob["input_f32"])),
        "int8" => writer.add_int8(&ints().iter().map(|v| *v as i8).collect::<Vec<_>>()),
        "uint8" => writer.add_uint8(&ints().iter().map(|v| *v as u8).collect::<Vec<_>>()),
        "int4" => writer
            .add_int4(&ints().iter().map(|v| *v as i8).collect::<Vec<_>>())
            .unwrap(),
        _ => return None,
    };
    Some(offset)
}

#[test]
fn writer_matches_coremltools_bytes_and_offsets() {
    let mut checked = 0;
    for (name, expected, blobs) in fixture_files() {
        let mut writer = BlobWriter::new();
        let offsets: Option<Vec<u64>> = blobs
            .iter()
            .map(|b| add_fixture_blob(&mut writer, b))
            .collect();
        let Some(offsets) = offsets else {
            assert_eq!(
                name, "subbyte.bin",
                "only subbyte.bin has dtypes the writer lacks"
            );
            continue;
        };
        let expected_offsets: Vec<u64> = blobs
            .iter()
            .map(|b| b["offset"].as_u64().unwrap())
            .collect();
        assert_eq!(offsets, expected_offsets, "{name}: record offsets");
        assert_eq!(writer.count() as usize, blobs.len(), "{name}");
        let bytes = writer.finish();
        assert!(bytes == expected, "{name}: bytes differ from coremltools'");
        checked += 1;
    }
    assert_eq!(checked, 9);
}

#[test]
fn reader_matches_coremltools_values_and_offsets() {
    for (name, bytes, blobs) in fixture_files() {
        let file = BlobFile::parse(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let record_offsets: Vec<u64> = file.records().iter().map(|r| r.offset).collect();
        let expected_offsets: Vec<u64> = blobs
            .iter()
            .map(|b| b["offset"].as_u64().unwrap())
            .collect();
        assert_eq!(record_offsets, expected_offsets, "{name}");
        for expected in &blobs {
            let offset = expected["offset"].as_u64().unwrap();
            let blob = file.blob_at(offset).unwrap();
            let what = format!("{name} @ {offset}");
            assert_eq!(
                blob.dtype().name(),
                expected["dtype"].as_str().unwrap(),
                "{what}"
            );
            // Data follows its record directly (coremltools' writer, and the layout notes).
            assert_eq!(blob.record.data_offset, offset + 64, "{what}");
            let n_decoded = expected["decoded"].as_array().unwrap().len();
            assert_eq!(blob.n_elements(), n_decoded, "{what}");
            match blob.dtype() {
                BlobDType::Fp16 => {
                    let want_bits: Vec<u16> = json_i64s(&expected["fp16_bits"])
                        .iter()
                        .map(|v| *v as u16)
                        .collect();
                    assert_eq!(blob.f16_bits().unwrap(), want_bits, "{what}");
                    let got = blob.to_f32().unwrap();
                    assert_eq!(
                        bits_of(&got),
                        bits_of(&json_f32s(&expected["decoded"])),
                        "{what}"
                    );
                }
                BlobDType::Fp32 => {
                    let got = blob.to_f32().unwrap();
                    assert_eq!(
                        bits_of(&got),
                        bits_of(&json_f32s(&expected["decoded"])),
                        "{what}"
                    );
                }
                _ => {
                    let want = json_i64s(&expected["decoded"]);
                    assert_eq!(blob.to_i64().unwrap(), want, "{what}");
                    let as_f32: Vec<f32> = want.iter().map(|v| *v as f32).collect();
                    assert_eq!(blob.to_f32().unwrap(), as_f32, "{what}");
                }
            }
        }
    }
}

/// platform-notes: "blobs fp16[3], fp16[40], f32[1] give records at 64, 192, 384,
/// data at 128, 256, 448, file size 452". Field positions from the same notes.
#[test]
fn platform_notes_example_layout() {
    let mut writer = BlobWriter::new();
    let a = writer.add_fp16(&[1.0, -2.0, 0.5]);
    let b = writer.add_fp16(&[0.25; 40]);
    let c = writer.add_fp32(&[3.0]);
    assert_eq!((a, b, c), (64, 192, 384));
    let bytes = writer.finish();
    assert_eq!(bytes.len(), 452);

    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
    assert_eq!((u32_at(0), u32_at(4)), (3, 2)); // count, version
    assert!(bytes[8..64].iter().all(|b| *b == 0));
    // (record, dtype code, size in bytes, data offset)
    for (record, dtype, size, data) in [(64, 1, 6, 128), (192, 1, 80, 256), (384, 2, 4, 448)] {
        assert_eq!(u32_at(record), 0xDEAD_BEEF);
        assert_eq!(u32_at(record + 4), dtype);
        assert_eq!(u64_at(record + 8), size);
        assert_eq!(u64_at(record + 16), data);
        assert!(bytes[record + 24..record + 64].iter().all(|b| *b == 0));
    }
    // fp16 1.0 = 0x3C00, -2.0 = 0xC000, 0.5 = 0x3800; f32 3.0 = 0x40400000.
    assert_eq!(bytes[128..134], [0x00, 0x3C, 0x00, 0xC0, 0x00, 0x38]);
    assert!(
        bytes[134..192].iter().all(|b| *b == 0),
        "padding up to the next record"
    );
    assert_eq!(bytes[256..258], [0x00, 0x34]); // 0.25 = 0x3400
    assert!(bytes[336..384].iter().all(|b| *b == 0));
    assert_eq!(bytes[448..452], [0x00, 0x00, 0x40, 0x40]);

    let file = BlobFile::parse(&bytes).unwrap();
    let data_offsets: Vec<u64> = file.records().iter().map(|r| r.data_offset).collect();
    assert_eq!(data_offsets, [128, 256, 448]);
    assert_eq!(
        file.blob_at(64).unwrap().to_f32().unwrap(),
        [1.0, -2.0, 0.5]
    );
    assert_eq!(file.blob_at(192).unwrap().n_elements(), 40);
    assert_eq!(file.blob_at(384).unwrap().to_f32().unwrap(), [3.0]);
    assert_eq!(
        file.to_string(),
        "3 blobs, 452 bytes\n\
         record 64: fp16 x3, 6 bytes at 128\n\
         record 192: fp16 x40, 80 bytes at 256\n\
         record 384: fp32 x1, 4 bytes at 448"
    );
}

#[test]
fn single_fp16_file() {
    let (bytes, offset) = blob::single_fp16(&[1.0, 0.1]);
    assert_eq!(offset, 64);
    assert_eq!(bytes.len(), 128 + 4);
    // 0.1 -> fp16 0x2E66 = (1 + 614/1024) * 2^-4 = 0.0999755859375 (round to nearest).
    assert_eq!(bytes[128..132], [0x00, 0x3C, 0x66, 0x2E]);
    assert_eq!(blob::read_f32(&bytes, 64).unwrap(), [1.0, 0.099_975_586]);
}

/// int4 packs two values per byte, first in the low nibble, with the record's
/// padding field counting the unused high nibble: [1, -2, 3] -> 0xE1 0x03.
#[test]
fn int4_packing_by_hand() {
    let mut writer = BlobWriter::new();
    writer.add_int4(&[1, -2, 3]).unwrap();
    let bytes = writer.finish();
    assert_eq!(bytes[72..80], 2u64.to_le_bytes()); // size in bytes
    assert_eq!(bytes[88..96], 4u64.to_le_bytes()); // padding bits
    assert_eq!(bytes[128..], [0xE1, 0x03]);
    let file = BlobFile::parse(&bytes).unwrap();
    assert_eq!(file.blob_at(64).unwrap().to_i64().unwrap(), [1, -2, 3]);

    let msg = blob_message(BlobWriter::new().add_int4(&[0, 8]));
    assert_eq!(
        msg,
        "int4 value 8 at index 1 is outside -8..=7; clamp or requantize it"
    );
}

/// A file built field by field, for dtypes the writer does not produce.
fn hand_file(dtype_code: u32, data: &[u8], padding_bits: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; 128];
    bytes[0] = 1; // count
    bytes[4] = 2; // version
    bytes[64..68].copy_from_slice(&0xDEAD_BEEFu32.to_le_bytes());
    bytes[68..72].copy_from_slice(&dtype_code.to_le_bytes());
    bytes[72..80].copy_from_slice(&(data.len() as u64).to_le_bytes());
    bytes[80..88].copy_from_slice(&128u64.to_le_bytes());
    bytes[88..96].copy_from_slice(&padding_bits.to_le_bytes());
    bytes.extend_from_slice(data);
    bytes
}

#[test]
fn bf16_and_fp8_by_hand() {
    // bf16 is the top half of an f32: 0x3F80 = 1.0, 0xC040 = -3.0, 0x7F80 = inf.
    let bytes = hand_file(5, &[0x80, 0x3F, 0x40, 0xC0, 0x80, 0x7F], 0);
    let blob = BlobFile::parse(&bytes).unwrap().blob_at(64).unwrap();
    assert_eq!(blob.dtype(), BlobDType::Bf16);
    assert_eq!(blob.to_f32().unwrap(), [1.0, -3.0, f32::INFINITY]);
    assert_eq!(
        blob_message(blob.to_i64()),
        "to_i64: record at 64 holds bf16, which to_i64 does not convert"
    );

    let bytes = hand_file(16, &[0x38, 0x40], 0);
    let blob = BlobFile::parse(&bytes).unwrap().blob_at(64).unwrap();
    assert_eq!(blob.n_elements(), 2);
    assert_eq!(
        blob_message(blob.to_f32()),
        "to_f32: record at 64 holds fp8_e4m3fn, which to_f32 does not convert"
    );
}

fn example_file() -> Vec<u8> {
    let mut writer = BlobWriter::new();
    writer.add_fp16(&[1.0, 2.0, 3.0]);
    writer.add_fp16(&[0.5; 40]);
    writer.add_fp32(&[7.0]);
    writer.finish() // records 64, 192, 384; data 128, 256, 448; 452 bytes
}

fn parse_error(bytes: &[u8]) -> String {
    blob_message(BlobFile::parse(bytes).map(|_| ()))
}

fn with_u32(mut bytes: Vec<u8>, at: usize, value: u32) -> Vec<u8> {
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    bytes
}

fn with_u64(mut bytes: Vec<u8>, at: usize, value: u64) -> Vec<u8> {
    bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
    bytes
}

#[test]
fn errors_name_the_problem() {
    let good = example_file();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            good[..10].to_vec(),
            "truncated: header needs 64 bytes, file has 10",
        ),
        (
            with_u32(good.clone(), 64, 0xDEAD_BE00),
            "wrong magic 0xDEADBE00 at record 64, expected 0xDEADBEEF",
        ),
        (
            with_u32(good.clone(), 192, 0),
            "wrong magic 0x00000000 at record 192, expected 0xDEADBEEF",
        ),
        (
            good[..200].to_vec(),
            "truncated: record at 192 needs 64 bytes, file has 200",
        ),
        (
            good[..300].to_vec(),
            "truncated: record at 192 has 80 data bytes at 256, file has 300",
        ),
        (
            good[..450].to_vec(),
            "truncated: record at 384 has 4 data bytes at 448, file has 450",
        ),
        (
            with_u32(good.clone(), 4, 1),
            "unsupported version 1 in header, expected 2 (version 1 is espresso's older blob_v1 format)",
        ),
        (
            with_u32(good.clone(), 4, 3),
            "unsupported version 3 in header, expected 2",
        ),
        (
            with_u32(good.clone(), 0, 4),
            "header count 4 but the file ends after 3 blobs, at byte 452",
        ),
        (
            with_u32(good.clone(), 0, 2),
            "header count 2 but another record follows at 384",
        ),
        (
            with_u32(good.clone(), 68, 99),
            "unknown dtype code 99 at record 64",
        ),
        (
            with_u32(good.clone(), 68, 0),
            "unknown dtype code 0 at record 64",
        ),
        (
            with_u64(good.clone(), 80, 130),
            "record at 64: data offset 130 is not 64-byte aligned",
        ),
        (
            with_u64(good.clone(), 80, 64),
            "record at 64: data offset 64 overlaps the record (must be at least 128)",
        ),
        (
            with_u64(good.clone(), 80, u64::MAX - 63),
            "truncated: record at 64 has 6 data bytes at 18446744073709551552, file has 452",
        ),
        (
            with_u64(good.clone(), 72, u64::MAX),
            "truncated: record at 64 has 18446744073709551615 data bytes at 128, file has 452",
        ),
        (
            with_u64(good.clone(), 392, 3),
            "record at 384: 3 bytes less 0 padding bits is not a whole number of fp32 elements",
        ),
        (
            with_u64(good.clone(), 88, 8),
            "record at 64: padding of 8 bits in 6 data bytes (must be below 8 and fit the data)",
        ),
        (
            with_u64(good.clone(), 88, 4),
            "record at 64: 6 bytes less 4 padding bits is not a whole number of fp16 elements",
        ),
        (
            [good.clone(), vec![0, 0, 7]].concat(),
            "3 unexpected bytes after the last blob, at 452",
        ),
        (
            [good.clone(), vec![0; 64]].concat(),
            "64 unexpected bytes after the last blob, at 452",
        ),
    ];
    for (bytes, want) in cases {
        assert_eq!(parse_error(&bytes), want);
    }

    // Alignment zeros after the last blob are accepted (coremltools writes none).
    let padded = [good.clone(), vec![0; 60]].concat();
    assert_eq!(BlobFile::parse(&padded).unwrap().records().len(), 3);

    let file = BlobFile::parse(&good).unwrap();
    assert_eq!(
        blob_message(file.blob_at(100)),
        "offset 100 is not a record (records at 64, 192, 384)"
    );
    assert_eq!(
        blob_message(file.blob_at(128)),
        "offset 128 is not a record (records at 64, 192, 384)"
    );
    assert_eq!(
        blob_message(file.blob_at(384).unwrap().f16_bits()),
        "f16_bits: record at 384 holds fp32, not fp16"
    );
    let empty = BlobWriter::new().finish();
    assert_eq!(
        blob_message(BlobFile::parse(&empty).unwrap().blob_at(64)),
        "offset 64 is not a record (the file has no blobs)"
    );
    assert_eq!(
        Error::Blob("x".into()).to_string(),
        "weight blob: x",
        "messages reach users through Error::Blob"
    );
}

// ---------------------------------------------------------------------------
// Property tests: round trips, and no panic on any input.
//
// Case counts default to a quick run; PROPTEST_CASES=200000 runs a long fuzz.

fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

#[derive(Clone, Debug)]
enum Spec {
    F16Bits(Vec<u16>),
    Fp32(Vec<f32>),
    Int8(Vec<i8>),
    Uint8(Vec<u8>),
    Int4(Vec<i8>),
}

fn spec() -> impl Strategy<Value = Spec> {
    prop_oneof![
        prop::collection::vec(any::<u16>(), 0..70).prop_map(Spec::F16Bits),
        prop::collection::vec(any::<f32>(), 0..40).prop_map(Spec::Fp32),
        prop::collection::vec(any::<i8>(), 0..130).prop_map(Spec::Int8),
        prop::collection::vec(any::<u8>(), 0..130).prop_map(Spec::Uint8),
        prop::collection::vec(-8i8..=7, 0..130).prop_map(Spec::Int4),
    ]
}

fn write_specs(specs: &[Spec]) -> (Vec<u8>, Vec<u64>) {
    let mut writer = BlobWriter::new();
    let offsets = specs
        .iter()
        .map(|s| match s {
            Spec::F16Bits(v) => writer.add_f16_bits(v),
            Spec::Fp32(v) => writer.add_fp32(v),
            Spec::Int8(v) => writer.add_int8(v),
            Spec::Uint8(v) => writer.add_uint8(v),
            Spec::Int4(v) => writer.add_int4(v).unwrap(),
        })
        .collect();
    (writer.finish(), offsets)
}

#[derive(Clone, Debug)]
enum Mutation {
    Truncate(usize),
    Xor(usize, u8),
    SetU32(usize, u32),
    SetU64(usize, u64),
    Append(Vec<u8>),
}

fn interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        prop::sample::select(vec![
            0,
            1,
            3,
            4,
            7,
            8,
            63,
            64,
            65,
            128,
            192,
            256,
            1 << 32,
            u64::MAX,
            u64::MAX - 63,
            1 << 61,
            1 << 63
        ]),
        0u64..4096,
        any::<u64>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 1u8..=255).prop_map(|(at, x)| Mutation::Xor(at, x)),
        (
            any::<usize>(),
            prop_oneof![0u32..20, any::<u32>(), Just(0xDEAD_BEEF)]
        )
            .prop_map(|(at, v)| Mutation::SetU32(at, v)),
        (any::<usize>(), interesting_u64()).prop_map(|(at, v)| Mutation::SetU64(at, v)),
        prop::collection::vec(any::<u8>(), 1..80).prop_map(Mutation::Append),
    ]
}

fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
    let len = bytes.len();
    match mutation {
        Mutation::Truncate(at) => bytes.truncate(at % (len + 1)),
        Mutation::Xor(at, x) if len > 0 => bytes[at % len] ^= x,
        // Fields sit at multiples of 4 (u32) and 8 (u64) within 64-byte blocks.
        Mutation::SetU32(at, v) if len >= 4 => {
            let at = (at % (len / 4)) * 4;
            bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        Mutation::SetU64(at, v) if len >= 8 => {
            let at = (at % (len / 8)) * 8;
            bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        Mutation::Append(extra) => bytes.extend_from_slice(extra),
        _ => {}
    }
}

/// Reads everything a caller could read; on acceptance, conversions must agree
/// with the record sizes. Must never panic.
fn exercise_reader(bytes: &[u8], probe_offsets: &[u64]) {
    let Ok(file) = BlobFile::parse(bytes) else {
        return;
    };
    for blob in file.blobs() {
        assert_eq!(blob.data.len() as u64, blob.record.size_in_bytes);
        let n = blob.n_elements();
        if let Ok(values) = blob.to_f32() {
            assert_eq!(values.len(), n);
        }
        if let Ok(values) = blob.to_i64() {
            assert_eq!(values.len(), n);
        }
        if let Ok(values) = blob.f16_bits() {
            assert_eq!(values.len(), n);
        }
        assert_eq!(file.blob_at(blob.record.offset).unwrap(), blob);
    }
    for offset in probe_offsets {
        let _ = file.blob_at(*offset);
        let _ = blob::read_f32(bytes, *offset);
    }
}

proptest! {
    #![proptest_config(cases(2000))]

    #[test]
    fn written_files_read_back(specs in prop::collection::vec(spec(), 0..6)) {
        let (bytes, offsets) = write_specs(&specs);
        let file = BlobFile::parse(&bytes).unwrap();
        prop_assert_eq!(file.records().len(), specs.len());
        for (spec, offset) in specs.iter().zip(offsets) {
            prop_assert_eq!(offset % 64, 0);
            let blob = file.blob_at(offset).unwrap();
            match spec {
                Spec::F16Bits(v) => prop_assert_eq!(&blob.f16_bits().unwrap(), v),
                Spec::Fp32(v) => prop_assert_eq!(bits_of(&blob.to_f32().unwrap()), bits_of(v)),
                Spec::Int8(v) => prop_assert_eq!(blob.to_i64().unwrap(), v.iter().map(|x| *x as i64).collect::<Vec<_>>()),
                Spec::Uint8(v) => prop_assert_eq!(blob.to_i64().unwrap(), v.iter().map(|x| *x as i64).collect::<Vec<_>>()),
                Spec::Int4(v) => prop_assert_eq!(blob.to_i64().unwrap(), v.iter().map(|x| *x as i64).collect::<Vec<_>>()),
            }
        }
    }

    #[test]
    fn fp16_writer_rounds_like_half(values in prop::collection::vec(any::<f32>(), 0..50)) {
        // half's scalar conversion is the independent reference for the slice path.
        let (bytes, offset) = blob::single_fp16(&values);
        let got = BlobFile::parse(&bytes).unwrap().blob_at(offset).unwrap().f16_bits().unwrap();
        let want: Vec<u16> = values.iter().map(|v| half::f16::from_f32(*v).to_bits()).collect();
        // NaN payloads may differ between conversion paths; only NaN-ness must agree.
        for (g, w) in got.iter().zip(&want) {
            let is_nan = |b: u16| b & 0x7C00 == 0x7C00 && b & 0x03FF != 0;
            if is_nan(*w) { prop_assert!(is_nan(*g)); } else { prop_assert_eq!(g, w); }
        }
        prop_assert_eq!(got.len(), want.len());
    }

    #[test]
    fn reader_never_panics_on_random_bytes(
        header in prop::option::of((0u32..6, prop_oneof![Just(2u32), any::<u32>()])),
        body in prop::collection::vec(any::<u8>(), 0..600),
        probes in prop::collection::vec(0u64..700, 0..4),
    ) {
        let mut bytes = Vec::new();
        if let Some((count, version)) = header {
            bytes.extend_from_slice(&count.to_le_bytes());
            bytes.extend_from_slice(&version.to_le_bytes());
            bytes.resize(64, 0);
        }
        bytes.extend_from_slice(&body);
        exercise_reader(&bytes, &probes);
    }

    #[test]
    fn reader_never_panics_on_mutated_files(
        specs in prop::collection::vec(spec(), 0..5),
        mutations in prop::collection::vec(mutation(), 1..5),
        probes in prop::collection::vec(0u64..2000, 0..4),
    ) {
        let (mut bytes, offsets) = write_specs(&specs);
        for m in &mutations {
            apply(&mut bytes, m);
        }
        let probes: Vec<u64> = probes.into_iter().chain(offsets).collect();
        exercise_reader(&bytes, &probes);
    }
}
