//! The llama2.c tokenizer against SentencePiece (fixtures from
//! `scripts/gen_tokenizer_fixtures.py`), hand-derived merges, format round trips
//! and error messages, and the BPE trainer.

use std::path::Path;

use anemone::data::tokenizer::{
    BOS, BYTE_OFFSET, EOS, NO_MERGE_SCORE, Tokenizer, TrainOptions, byte_piece, train_bpe,
};

use crate::common::{fixture, shared_data, skip, temp_dir};

/// Reserved ids (0..259) as llama2.c lays them out, then `extra` (piece, score).
fn vocab(extra: &[(&str, f32)]) -> Tokenizer {
    let mut pieces = vec![b"<unk>".to_vec(), b"\n<s>\n".to_vec(), b"\n</s>\n".to_vec()];
    pieces.extend((0..=255u8).map(byte_piece));
    let mut scores = vec![0.0; pieces.len()];
    for (piece, score) in extra {
        pieces.push(piece.as_bytes().to_vec());
        scores.push(*score);
    }
    Tokenizer::new(pieces, scores).unwrap()
}

struct Case {
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

fn cases(path: &Path) -> Vec<Case> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().unwrap().to_string(),
            ids: c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect(),
            decoded: c["decoded"].as_str().unwrap().to_string(),
        })
        .collect()
}

fn check_cases(tokenizer: &Tokenizer, cases: &[Case]) {
    for case in cases {
        assert_eq!(
            tokenizer.encode(&case.text, false, false),
            case.ids,
            "{:?}",
            case.text
        );
        let mut with_marks = vec![BOS];
        with_marks.extend(&case.ids);
        with_marks.push(EOS);
        assert_eq!(tokenizer.encode(&case.text, true, true), with_marks);
        assert_eq!(tokenizer.decode(&case.ids).unwrap(), case.decoded);
        assert_eq!(tokenizer.decode(&with_marks).unwrap(), case.text);
    }
}

#[test]
fn tiny_sentencepiece_model_encodes_identically() {
    let tokenizer = Tokenizer::read(&fixture("tokenizer").join("tiny.bin"), None).unwrap();
    assert_eq!(tokenizer.vocab_size(), 400);
    let cases = cases(&fixture("tokenizer").join("tiny-cases.json"));
    assert_eq!(cases.len(), 115);
    check_cases(&tokenizer, &cases);
}

#[test]
fn llama2_tokenizer_encodes_unicode_cases_like_sentencepiece() {
    let Some(path) = shared_data("llama2-tokenizer.bin") else {
        return;
    };
    let tokenizer = Tokenizer::read(&path, Some(32000)).unwrap();
    check_cases(
        &tokenizer,
        &cases(&fixture("tokenizer").join("llama2-cases.json")),
    );
}

#[test]
fn llama2_tokenizer_encodes_every_tinyshakespeare_line_like_sentencepiece() {
    let (Some(tok_path), Some(text_path)) = (
        shared_data("llama2-tokenizer.bin"),
        shared_data("tinyshakespeare.txt"),
    ) else {
        return;
    };
    let tokenizer = Tokenizer::read(&tok_path, Some(32000)).unwrap();
    let text = std::fs::read_to_string(text_path).unwrap();
    let lines: Vec<&str> = text.split('\n').collect();
    let fixture_text =
        std::fs::read_to_string(fixture("tokenizer").join("tinyshakespeare-llama2.ids")).unwrap();
    let expected: Vec<Vec<u32>> = fixture_text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split_whitespace().map(|v| v.parse().unwrap()).collect())
        .collect();
    assert_eq!(expected.len(), lines.len());
    assert_eq!(lines.len(), 40001);
    let mut mismatches = Vec::new();
    for (line_idx, (line, want)) in lines.iter().zip(&expected).enumerate() {
        let got = tokenizer.encode(line, false, false);
        if &got != want {
            mismatches.push(line_idx);
        }
        assert_eq!(tokenizer.decode(&got).unwrap(), *line, "line {line_idx}");
    }
    // docs/tokenizer.md: no known differences on this text.
    assert_eq!(mismatches, Vec::<usize>::new());
}

#[test]
fn tokenizer_bin_round_trips_byte_for_byte() {
    let mut files = vec![fixture("tokenizer").join("tiny.bin")];
    files.extend(shared_data("llama2-tokenizer.bin"));
    let dir = temp_dir("tokenizer-round-trip");
    for path in files {
        let bytes = std::fs::read(&path).unwrap();
        let tokenizer = Tokenizer::from_bytes(&bytes, None).unwrap();
        assert_eq!(tokenizer.to_bytes(), bytes, "{}", path.display());
        let out = dir.join("copy.bin");
        tokenizer.write(&out).unwrap();
        assert_eq!(Tokenizer::read(&out, None).unwrap(), tokenizer);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// Byte offset of token `id`'s score field in a tokenizer.bin.
fn token_offset(bytes: &[u8], id: usize) -> usize {
    let mut offset = 4;
    for _ in 0..id {
        let len = i32::from_le_bytes(bytes[offset + 4..offset + 8].try_into().unwrap());
        offset += 8 + len as usize;
    }
    offset
}

#[test]
fn malformed_tokenizer_files_name_the_token_and_field() {
    let bytes = std::fs::read(fixture("tokenizer").join("tiny.bin")).unwrap();
    let err = |b: &[u8], vocab| Tokenizer::from_bytes(b, vocab).unwrap_err().to_string();

    let mut negative = bytes.clone();
    let at = token_offset(&bytes, 17) + 4;
    negative[at..at + 4].copy_from_slice(&(-3i32).to_le_bytes());
    assert_eq!(
        err(&negative, None),
        "tokenizer.bin: token 17: length -3 is negative"
    );

    let cut = token_offset(&bytes, 300) + 6;
    assert_eq!(
        err(&bytes[..cut], None),
        format!(
            "tokenizer.bin: token 300: length: file ends at byte {cut} inside this field; the \
             file is truncated"
        )
    );
    assert!(err(&bytes[..2], None).contains("max_token_length"));

    assert_eq!(
        err(&bytes, Some(401)),
        "tokenizer.bin: token 400: file holds only 400 tokens but the model's vocabulary has \
         401; use the tokenizer the model was trained with"
    );
    // Fewer tokens than the model's vocabulary asks for is fine the other way round.
    assert_eq!(
        Tokenizer::from_bytes(&bytes, Some(300))
            .unwrap()
            .vocab_size(),
        300
    );
    assert!(err(&bytes, Some(200)).contains("needs at least 259"));

    let mut wrong_byte_piece = bytes.clone();
    let at = token_offset(&bytes, 13) + 8;
    wrong_byte_piece[at..at + 6].copy_from_slice(b"<0x0B>");
    assert!(
        err(&wrong_byte_piece, None)
            .starts_with("tokenizer.bin: token 13: expected byte-fallback piece <0x0A>"),
        "{}",
        err(&wrong_byte_piece, None)
    );

    let mut long = bytes.clone();
    long[..4].copy_from_slice(&2u32.to_le_bytes());
    assert!(err(&long, None).contains("exceeds max_token_length 2"));

    let path = temp_dir("tokenizer-missing").join("nope.bin");
    let msg = Tokenizer::read(&path, None).unwrap_err().to_string();
    assert!(msg.contains("nope.bin"), "{msg}");
}

#[test]
fn merges_pick_the_highest_score_then_the_leftmost_pair() {
    let tokenizer = vocab(&[
        (" ", -10.0),  // 259
        ("a", -11.0),  // 260
        ("aa", 0.0),   // 261
        (" a", -1e10), // 262: at run.c's floor, never merged
        ("b", -12.0),  // 263
        ("ab", -1.0),  // 264
        ("x", -13.0),  // 265
        ("y", -14.0),  // 266
        ("xa", -0.0),  // 267: ties with 0.0 as run.c's `>` sees it
        ("ay", 0.0),   // 268
    ]);
    // " aaa": "aa" at positions 1 and 2 tie; the leftmost wins.
    assert_eq!(tokenizer.encode("aaa", false, false), [259, 261, 260]);
    // " aab": "aa" (0) beats "ab" (-1) although "ab" is to the right.
    assert_eq!(tokenizer.encode("aab", false, false), [259, 261, 263]);
    // " ab": "ab" merges, " a" does not.
    assert_eq!(tokenizer.encode("ab", false, false), [259, 264]);
    // " xay": -0.0 and 0.0 are equal scores, so the leftmost pair "xa" wins.
    assert_eq!(tokenizer.encode("xay", false, false), [259, 267, 266]);
    // Characters without a piece fall back to their UTF-8 bytes (id = byte + 3).
    assert_eq!(
        tokenizer.encode("é", false, false),
        [259, BYTE_OFFSET + 0xC3, BYTE_OFFSET + 0xA9]
    );
    assert_eq!(tokenizer.encode("", true, true), [BOS, EOS]);
    assert_eq!(NO_MERGE_SCORE, -1e10);
}

#[test]
fn decode_strips_the_dummy_prefix_only_at_text_starts() {
    let tokenizer = vocab(&[(" ", -10.0), (" hi", -1.0), ("hi", -2.0)]);
    let (space, space_hi, hi) = (259, 260, 261);
    assert_eq!(tokenizer.decode(&[space_hi, space_hi]).unwrap(), "hi hi");
    assert_eq!(
        tokenizer
            .decode(&[BOS, space_hi, EOS, BOS, space_hi])
            .unwrap(),
        "hihi"
    );
    // After EOS (no BOS) the space is kept; a leading " " token is the dummy prefix.
    assert_eq!(tokenizer.decode(&[EOS, space_hi]).unwrap(), " hi");
    assert_eq!(tokenizer.decode(&[space, space, hi]).unwrap(), " hi");
    // Byte tokens reassemble multi-byte UTF-8: 🦀 is F0 9F A6 80.
    let crab: Vec<u32> = [0xF0, 0x9F, 0xA6, 0x80]
        .iter()
        .map(|b| BYTE_OFFSET + b)
        .collect();
    assert_eq!(tokenizer.decode(&crab).unwrap(), "🦀");
    assert_eq!(tokenizer.decode_token(Some(hi), space_hi).unwrap(), b" hi");
    assert_eq!(tokenizer.decode_token(Some(BOS), space_hi).unwrap(), b"hi");
    assert_eq!(
        tokenizer.decode(&[262]).unwrap_err().to_string(),
        "tokenizer: token id 262 is out of range for a vocabulary of 262; the model and \
         tokenizer do not match"
    );
}

// Hand derivation (words carry their leading space, counts in parentheses):
//   " hug"(10) " pug"(5) " pun"(12) " bun"(4) " hugs"(5)
// characters by frequency: ' ' 36, u 36, g 20, p 17, n 16, h 15, s 5, b 4 -> ids 259..=266
// merges (count; ties go to the smaller id pair):
//   u+g (20) -> "ug"; ' '+p (17) -> " p"; u+n (16) -> "un";
//   ' '+h (15, ties with h+ug: (259,264) < (264,267)) -> " h"; " h"+ug (15) -> " hug";
//   " p"+un (12) -> " pun"; " p"+ug (5, ties with " hug"+s: (268,267) < (271,265)) -> " pug";
//   " hug"+s (5) -> " hugs"; ' '+b (4) -> " b"; " b"+un (4) -> " bun"
#[test]
fn trainer_learns_the_hand_derived_merge_order() {
    let words: Vec<&str> = std::iter::repeat_n("hug", 10)
        .chain(std::iter::repeat_n("pug", 5))
        .chain(std::iter::repeat_n("pun", 12))
        .chain(std::iter::repeat_n("bun", 4))
        .chain(std::iter::repeat_n("hugs", 5))
        .collect();
    let text = words.join(" ");
    let mut options = TrainOptions::new(1000);
    options.character_coverage = 1.0;
    let tokenizer = train_bpe([text.as_str()], &options).unwrap();
    let learned: Vec<String> = (259..tokenizer.vocab_size() as u32)
        .map(|id| String::from_utf8(tokenizer.piece(id).unwrap().to_vec()).unwrap())
        .collect();
    let expected = [
        " ", "u", "g", "p", "n", "h", "s", "b", // characters
        "ug", " p", "un", " h", " hug", " pun", " pug", " hugs", " b", " bun", // merges
    ];
    assert_eq!(learned, expected);
    let scores: Vec<f32> = (259..277).map(|id| tokenizer.score(id).unwrap()).collect();
    let expected_scores = [
        -10.0, -11.0, -12.0, -13.0, -14.0, -15.0, -16.0, -17.0, // characters below merges
        0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0, // -rank
    ];
    assert_eq!(scores, expected_scores);
    assert_eq!(tokenizer.score(BOS), Some(NO_MERGE_SCORE));
    assert_eq!(tokenizer.score(BYTE_OFFSET + 65), Some(NO_MERGE_SCORE));
    assert_eq!(tokenizer.piece(BOS), Some(&b"<s>"[..]));
    // Greedy encoding replays the merges: ug, un, " h", " hug", " hugs", " b", " bun".
    assert_eq!(tokenizer.encode("hugs bun", false, false), [274, 276]);
    // " gun hub": only "un" and " h" apply.
    assert_eq!(
        tokenizer.encode("gun hub", false, false),
        [259, 261, 269, 270, 260, 266]
    );
    // The vocabulary cap stops training after two merges.
    let capped = train_bpe(
        [text.as_str()],
        &TrainOptions {
            vocab_size: 269,
            ..options
        },
    )
    .unwrap();
    assert_eq!(capped.vocab_size(), 269);
    assert_eq!(capped.piece(268), Some(&b" p"[..]));
}

#[test]
fn trainer_drops_rare_characters_to_byte_fallback() {
    // ' ' 2, a 4, é 1 of 7: coverage 0.8 keeps a (4/7) and ' ' (6/7), not é.
    let options = TrainOptions {
        vocab_size: 300,
        character_coverage: 0.8,
        max_piece_chars: 16,
    };
    let tokenizer = train_bpe(["aaaa é"], &options).unwrap();
    assert_eq!(tokenizer.piece(259), Some(&b" "[..]));
    assert_eq!(tokenizer.piece(260), Some(&b"a"[..]));
    assert_eq!(tokenizer.lookup("é".as_bytes()), None);
    let ids = tokenizer.encode("aaaa é", false, false);
    assert!(ids.contains(&(BYTE_OFFSET + 0xC3)) && ids.contains(&(BYTE_OFFSET + 0xA9)));
    assert_eq!(tokenizer.decode(&ids).unwrap(), "aaaa é");
}

#[test]
fn trainer_never_creates_pieces_that_spell_reserved_tokens() {
    let text = "<s> <0x41> </s> <unk> ".repeat(50);
    let tokenizer = train_bpe([text.as_str()], &TrainOptions::new(400)).unwrap();
    for id in 259..tokenizer.vocab_size() as u32 {
        let piece = tokenizer.piece(id).unwrap();
        for reserved in [&b"<s>"[..], b"</s>", b"<unk>", b"<0x41>"] {
            assert_ne!(piece, reserved, "piece {id}");
        }
    }
    let ids = tokenizer.encode(&text, false, false);
    assert!(!ids.contains(&BOS) && !ids.contains(&(BYTE_OFFSET + 0x41)));
    assert_eq!(tokenizer.decode(&ids).unwrap(), text);
}

const HELD_OUT: &[&str] = &[
    "Thou art more lovely and more temperate:",
    "Café au lait, naïve façade, Ångström, Øresund, straße",
    "emoji 🦀🚀 and a family 👩‍👩‍👧 with CJK 中文",
    "  two leading spaces, trailing tab\t",
    "",
    "x",
];

#[test]
fn trained_tokenizer_round_trips_held_out_text_and_its_file() {
    let text = std::fs::read_to_string(fixture("tokenizer").join("tiny-cases.json")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let tokenizer = train_bpe(lines.iter().copied(), &TrainOptions::new(512)).unwrap();
    assert_eq!(tokenizer.vocab_size(), 512);
    for line in HELD_OUT {
        let ids = tokenizer.encode(line, true, true);
        assert_eq!(tokenizer.decode(&ids).unwrap(), *line);
    }
    let dir = temp_dir("trained-tokenizer");
    let path = dir.join("tokenizer.bin");
    tokenizer.write(&path).unwrap();
    let read = Tokenizer::read(&path, Some(512)).unwrap();
    assert_eq!(read, tokenizer);
    assert_eq!(
        read.encode(HELD_OUT[1], false, false),
        tokenizer.encode(HELD_OUT[1], false, false)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// Training speed on ~5 MB (tinyshakespeare x 5), vocab 4096. Slow in debug
/// builds: runs only with ANEMONE_SLOW=1 (use `cargo test --release`).
#[test]
fn trainer_speed_on_five_megabytes() {
    if std::env::var_os("ANEMONE_SLOW").is_none() {
        skip("set ANEMONE_SLOW=1 to run the tokenizer training speed test");
        return;
    }
    let Some(path) = shared_data("tinyshakespeare.txt") else {
        return;
    };
    let text = std::fs::read_to_string(path).unwrap().repeat(5);
    let start = std::time::Instant::now();
    let tokenizer = train_bpe(text.lines(), &TrainOptions::new(4096)).unwrap();
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "trained vocab {} on {} bytes in {seconds:.2} s",
        tokenizer.vocab_size(),
        text.len()
    );
    assert_eq!(tokenizer.vocab_size(), 4096);
    assert!(seconds < 60.0, "{seconds} s");
    for line in text.lines().take(2000) {
        assert_eq!(
            tokenizer
                .decode(&tokenizer.encode(line, true, false))
                .unwrap(),
            line
        );
    }
}
