//! Token files: both formats byte for byte, error messages, splits, batch
//! sampling (sequential and seeded random, resumable), and `tokenize_files`.

use std::path::Path;
use std::sync::Arc;

use anemone::data::tokenizer::{BOS, Tokenizer};
use anemone::data::tokens::{
    Batcher, Dtype, Format, Order, TokenFile, TokenSpan, TokenWriter, tokenize_files, val_path_for,
};

use crate::common::temp_dir;

fn write_tokens(path: &Path, vocab: usize, ids: &[u32]) {
    let mut writer = TokenWriter::create(path, vocab).unwrap();
    writer.extend(ids).unwrap();
    assert_eq!(writer.finish().unwrap(), ids.len() as u64);
}

/// A raw u16 file whose token at position i is `i % 65536`.
fn positional_file(dir: &Path, n: usize) -> Arc<TokenFile> {
    let path = dir.join("positions.bin");
    let bytes: Vec<u8> = (0..n).flat_map(|i| (i as u16).to_le_bytes()).collect();
    std::fs::write(&path, bytes).unwrap();
    Arc::new(TokenFile::open(&path).unwrap())
}

#[test]
fn anemone_format_is_the_documented_bytes_and_reads_back() {
    let dir = temp_dir("tokens-anemone");
    let path = dir.join("t.bin");
    write_tokens(&path, 1000, &[1, 999, 258, 0]);
    let mut expected = b"ANEMTOK\0".to_vec();
    expected.extend([1, 0, 0, 0]); // version
    expected.extend([0xE8, 0x03, 0, 0]); // vocab_size 1000
    expected.extend([2, 0, 0, 0]); // dtype u16
    expected.extend([4, 0, 0, 0, 0, 0, 0, 0]); // n_tokens
    expected.resize(64, 0);
    expected.extend([1, 0, 0xE7, 0x03, 0x02, 0x01, 0, 0]);
    assert_eq!(std::fs::read(&path).unwrap(), expected);

    let file = TokenFile::open(&path).unwrap();
    assert_eq!(file.format(), Format::Anemone);
    assert_eq!(file.dtype(), Dtype::U16);
    assert_eq!(file.vocab_size(), Some(1000));
    assert_eq!(file.len(), 4);
    assert_eq!(file.window(1, 3).unwrap(), [999, 258, 0]);
    file.check_vocab(1000).unwrap();

    // A vocabulary above 2^16 stores u32 ids.
    let wide = dir.join("wide.bin");
    write_tokens(&wide, 70_000, &[69_999, 65_536, 7]);
    let bytes = std::fs::read(&wide).unwrap();
    assert_eq!(bytes.len(), 64 + 12);
    assert_eq!(&bytes[16..20], &[4, 0, 0, 0]);
    assert_eq!(&bytes[64..68], &69_999u32.to_le_bytes());
    let file = TokenFile::open(&wide).unwrap();
    assert_eq!(file.dtype(), Dtype::U32);
    assert_eq!(file.window(0, 3).unwrap(), [69_999, 65_536, 7]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn raw_u16_format_is_flat_little_endian() {
    let dir = temp_dir("tokens-raw");
    let path = dir.join("shard.bin");
    let mut writer = TokenWriter::create_raw_u16(&path).unwrap();
    writer.extend(&[1, 65535, 0x1234]).unwrap();
    writer.finish().unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        [0x01, 0x00, 0xFF, 0xFF, 0x34, 0x12]
    );
    let file = TokenFile::open(&path).unwrap();
    assert_eq!(file.format(), Format::RawU16);
    assert_eq!(file.vocab_size(), None);
    assert_eq!(file.window(0, 3).unwrap(), [1, 65535, 0x1234]);
    // Raw files have no recorded vocabulary: only the ids are checked.
    let err = file.check_vocab(32000).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "{}: token 1: id 65535 is out of range for the model's vocabulary of 32000; the \
             file was made with a different tokenizer",
            path.display()
        )
    );
    let mut writer = TokenWriter::create_raw_u16(&path).unwrap();
    assert!(
        writer
            .extend(&[65536])
            .unwrap_err()
            .to_string()
            .contains("token 0: id 65536")
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn short_or_corrupt_files_are_clear_errors() {
    let dir = temp_dir("tokens-corrupt");
    let good = dir.join("good.bin");
    write_tokens(&good, 500, &[1, 2, 3, 499]);
    let bytes = std::fs::read(&good).unwrap();
    let open_err = |name: &str, content: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        let msg = TokenFile::open(&path).unwrap_err().to_string();
        assert!(msg.starts_with(&path.display().to_string()), "{msg}");
        msg
    };
    assert!(
        open_err("truncated.bin", &bytes[..bytes.len() - 1])
            .contains("n_tokens: header says 4 tokens of 2 bytes but 7 bytes follow the header")
    );
    assert!(open_err("short-header.bin", &bytes[..20]).contains("header: file is 20 bytes"));
    let mut v2 = bytes.clone();
    v2[8] = 2;
    assert!(open_err("v2.bin", &v2).contains("version: version 2 is not supported"));
    let mut dtype = bytes.clone();
    dtype[16] = 3;
    assert!(open_err("dtype.bin", &dtype).contains("dtype: 3 is not a valid id width"));
    assert!(open_err("odd.bin", &[1, 0, 2]).contains("size: 3 bytes is odd"));

    let file = TokenFile::open(&good).unwrap();
    assert!(file.check_vocab(32000).unwrap_err().to_string().contains(
        "vocab_size: the file was tokenized with a vocabulary of 500 but the model has 32000"
    ));
    assert!(
        file.window(2, 3)
            .unwrap_err()
            .to_string()
            .contains("tokens 2..5 are past the end of the file (4 tokens)")
    );
    let mut writer = TokenWriter::create(&dir.join("w.bin"), 500).unwrap();
    writer.extend(&[1, 2]).unwrap();
    let msg = writer.extend(&[3, 500]).unwrap_err().to_string();
    assert!(msg.contains("token 3: id 500 does not fit"), "{msg}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unfinished_writer_leaves_nothing_behind() {
    let dir = temp_dir("tokens-unfinished");
    let path = dir.join("t.bin");
    write_tokens(&path, 10, &[1, 2]);
    {
        let mut writer = TokenWriter::create(&path, 10).unwrap();
        writer.extend(&[3, 4, 5]).unwrap();
    }
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["t.bin"]);
    assert_eq!(
        TokenFile::open(&path).unwrap().window(0, 2).unwrap(),
        [1, 2]
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn large_files_read_from_disk_give_the_same_windows() {
    let dir = temp_dir("tokens-disk");
    let memory = positional_file(&dir, 1000);
    let disk = TokenFile::open_with_limit(memory.path(), 0).unwrap();
    assert!(memory.is_in_memory() && !disk.is_in_memory());
    assert_eq!(
        disk.window(990, 10).unwrap(),
        memory.window(990, 10).unwrap()
    );
    assert_eq!(disk.window(3, 2).unwrap(), [3, 4]);
    disk.check_vocab(1000).unwrap();
    assert!(
        disk.check_vocab(999)
            .unwrap_err()
            .to_string()
            .contains("token 999: id 999")
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn sequential_windows_cover_the_span_then_wrap() {
    let dir = temp_dir("tokens-sequential");
    let file = positional_file(&dir, 20);
    let mut batcher = Batcher::new(TokenSpan::whole(file), 4, Order::Sequential, 0).unwrap();
    // (20 - 1) / 4 = 4 windows: starts 0, 4, 8, 12; then back to 0.
    assert_eq!(batcher.windows_per_epoch(), 4);
    let batch = batcher.next_batch(5).unwrap();
    assert_eq!(
        batch.inputs,
        [
            0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3
        ]
    );
    assert_eq!(
        batch.targets,
        [
            1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 1, 2, 3, 4
        ]
    );
    let state = batcher.state();
    assert_eq!((state.next_start, state.epoch), (4, 1));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn random_windows_follow_the_seeded_rng_and_resume_from_state() {
    let dir = temp_dir("tokens-random");
    // 1004 tokens, seq_len 4: 1000 possible starts; seed 12345 draws starts
    // 133, 204, 119, 176, 506 (Python reference in crate::rng tests).
    let file = positional_file(&dir, 1004);
    let span = TokenSpan::whole(file);
    let mut batcher = Batcher::new(span.clone(), 4, Order::Random, 12345).unwrap();
    let first = batcher.next_batch(2).unwrap();
    assert_eq!(first.inputs, [133, 134, 135, 136, 204, 205, 206, 207]);
    assert_eq!(first.targets, [134, 135, 136, 137, 205, 206, 207, 208]);
    let saved = batcher.state();
    let json = serde_json::to_string(&saved).unwrap();
    let rest = batcher.next_batch(3).unwrap();
    assert_eq!(
        rest.inputs.iter().step_by(4).copied().collect::<Vec<_>>(),
        [119, 176, 506]
    );

    let mut resumed = Batcher::new(span, 4, Order::Random, 999).unwrap();
    resumed
        .restore(serde_json::from_str(&json).unwrap())
        .unwrap();
    assert_eq!(resumed.next_batch(3).unwrap(), rest);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn validation_split_is_the_tail_and_short_spans_are_errors() {
    let dir = temp_dir("tokens-split");
    let file = positional_file(&dir, 100);
    let (train, val) = TokenSpan::split_tail(file.clone(), 0.1).unwrap();
    assert_eq!(
        (train.start(), train.len(), val.start(), val.len()),
        (0, 90, 90, 10)
    );
    let mut val_batcher = Batcher::new(val, 4, Order::Sequential, 0).unwrap();
    assert_eq!(val_batcher.windows_per_epoch(), 2);
    assert_eq!(
        val_batcher.next_batch(2).unwrap().inputs,
        [90, 91, 92, 93, 94, 95, 96, 97]
    );
    let (_, short_val) = TokenSpan::split_tail(file.clone(), 0.04).unwrap();
    let msg = Batcher::new(short_val, 4, Order::Random, 0)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("4 tokens (in the span used) are fewer than one window of seq_len + 1 = 5"),
        "{msg}"
    );
    assert!(TokenSpan::split_tail(file, 1.0).is_err());
    // Restoring a sequential position that cannot hold a window is refused.
    let mut batcher = Batcher::new(train, 4, Order::Sequential, 0).unwrap();
    let mut state = batcher.state();
    state.next_start = 86;
    assert!(batcher.restore(state).is_err());
    std::fs::remove_dir_all(dir).unwrap();
}

fn tiny_tokenizer() -> Tokenizer {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/tiny.bin");
    Tokenizer::read(&path, None).unwrap()
}

/// Split ids at BOS into documents and decode each.
fn documents(tokenizer: &Tokenizer, ids: &[u32]) -> Vec<String> {
    assert_eq!(ids.first(), Some(&BOS));
    ids.split(|&id| id == BOS)
        .skip(1)
        .map(|doc| tokenizer.decode(doc).unwrap())
        .collect()
}

#[test]
fn tokenize_files_writes_documents_and_a_tail_validation_file() {
    let dir = temp_dir("tokens-tokenize");
    let tokenizer = tiny_tokenizer();
    let a = dir.join("a.txt");
    let b = dir.join("b.txt");
    // 103 bytes in all; val_fraction 0.25 sends lines starting at byte >= 77.25 to val.
    let a_text = "First Citizen:\nBefore we proceed\n\nAll:\r\nSpeak, speak.\n"; // 54 bytes
    let b_text = "<|endoftext|>\nYou are resolved\nCafé 🦀 rather\n"; // 49 bytes: 54..103
    assert_eq!((a_text.len(), b_text.len()), (54, 49));
    std::fs::write(&a, a_text).unwrap();
    std::fs::write(&b, b_text).unwrap();
    let out = dir.join("tokens.bin");
    let mut calls = Vec::new();
    let report = tokenize_files(&tokenizer, &[a, b], &out, 0.25, &mut |done, total| {
        calls.push((done, total))
    })
    .unwrap();
    assert_eq!(calls.last(), Some(&(103, 103)));
    assert_eq!(report.val_path, Some(dir.join("tokens.val.bin")));
    assert_eq!(val_path_for(&out), dir.join("tokens.val.bin"));
    assert_eq!(report.documents, 4);
    assert_eq!(report.input_bytes, 103);

    let read_all = |path: &Path| {
        let file = TokenFile::open(path).unwrap();
        file.check_vocab(400).unwrap();
        file.window(0, file.len()).unwrap()
    };
    let train = read_all(&out);
    let val = read_all(&dir.join("tokens.val.bin"));
    assert_eq!(
        (report.train_tokens, report.val_tokens),
        (train.len() as u64, val.len() as u64)
    );
    // "You are resolved" starts at byte 68 (train); "Café ..." at byte 85 (val).
    assert_eq!(
        documents(&tokenizer, &train),
        [
            "First Citizen:\nBefore we proceed",
            "All:\nSpeak, speak.",
            "You are resolved"
        ]
    );
    assert_eq!(documents(&tokenizer, &val), ["Café 🦀 rather"]);

    let report =
        tokenize_files(&tokenizer, &[dir.join("a.txt")], &out, 0.0, &mut |_, _| {}).unwrap();
    assert_eq!(report.val_path, None);
    std::fs::write(dir.join("bad.txt"), b"ok\n\xFF\xFE\n").unwrap();
    let msg = tokenize_files(
        &tokenizer,
        &[dir.join("bad.txt")],
        &out,
        0.0,
        &mut |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("bad.txt: line 2: not valid UTF-8 at byte 0"),
        "{msg}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// With a Hugging Face tokenizer every document ends with its EOS
/// (`<|im_end|>`, id 2 in the fixture's generation config), in the training
/// file and the held-out one alike, and the file records the vocabulary
/// given for the model (Qwen2's fixture pads 323 ids to 336).
#[test]
fn tokenize_files_ends_hugging_face_documents_with_eos() {
    use anemone::data::hf::HfTokenizer;
    use anemone::data::tokens::HfDocuments;
    let dir = temp_dir("tokens-tokenize-hf");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/qwen2");
    let tokenizer = HfTokenizer::open(&model).unwrap();
    let a = dir.join("a.txt");
    let b = dir.join("b.txt");
    std::fs::write(
        &a,
        "First Citizen:\nBefore we proceed\n\nAll:\r\nSpeak, speak.\n",
    )
    .unwrap();
    std::fs::write(&b, "<|endoftext|>\nYou are resolved\nCafé 🦀 rather\n").unwrap();
    let out = dir.join("tokens.bin");
    let encoder = HfDocuments {
        tokenizer: &tokenizer,
        vocab_size: 336,
    };
    let report = tokenize_files(&encoder, &[a, b], &out, 0.25, &mut |_, _| {}).unwrap();
    assert_eq!(report.documents, 4);
    let read_all = |path: &Path| {
        let file = TokenFile::open(path).unwrap();
        assert_eq!(file.vocab_size(), Some(336));
        file.window(0, file.len()).unwrap()
    };
    let eos = 2;
    let documents = |ids: &[u32]| -> Vec<String> {
        assert_eq!(ids.last(), Some(&eos), "every document ends with EOS");
        ids[..ids.len() - 1]
            .split(|&id| id == eos)
            .map(|doc| tokenizer.decode(doc, false).unwrap())
            .collect()
    };
    assert_eq!(
        documents(&read_all(&out)),
        [
            "First Citizen:\nBefore we proceed",
            "All:\nSpeak, speak.",
            "You are resolved"
        ]
    );
    assert_eq!(
        documents(&read_all(&dir.join("tokens.val.bin"))),
        ["Café 🦀 rather"]
    );
    // A text of one line: the held-out tail is a document of its own, and
    // the training part ends with EOS too.
    let one = dir.join("one.txt");
    std::fs::write(&one, "To be or not to be, that is the question\n").unwrap();
    tokenize_files(&encoder, &[one], &out, 0.5, &mut |_, _| {}).unwrap();
    let (train, val) = (read_all(&out), read_all(&dir.join("tokens.val.bin")));
    let whole = format!("{}{}", documents(&train).concat(), documents(&val).concat());
    assert_eq!(whole, "To be or not to be, that is the question");
    std::fs::remove_dir_all(dir).unwrap();
}
