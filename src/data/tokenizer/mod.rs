//! The llama2.c tokenizer: the `tokenizer.bin` format (read/write), encoding by
//! run.c's score-driven greedy pair merge, decoding, and (in [`train`]) a BPE
//! trainer that writes vocabularies in the same format.
//!
//! `tokenizer.bin` layout (little-endian): `u32 max_token_length`, then per token
//! id in order `f32 score, i32 len, len bytes`. Pieces hold raw bytes: llama2.c's
//! exporter stores SentencePiece's "▁" as a plain space, so piece `" the"` is the
//! word "the" with its leading space. Ids 0, 1, 2 are `<unk>`, BOS and EOS
//! (never produced from text, whatever their pieces hold); ids
//! 3..=258 are the byte-fallback pieces `<0x00>`..`<0xFF>` (checked on load).
//!
//! Encoding follows run.c: a dummy-prefix space when the text is non-empty, each
//! UTF-8 character mapped to its piece or to its byte tokens (id = byte + 3),
//! then, repeatedly, the adjacent pair whose concatenated bytes form the
//! highest-scoring piece is merged (leftmost on ties; scores at or below
//! [`NO_MERGE_SCORE`] never merge). A heap makes this O(n log n) instead of
//! run.c's O(n²); the result is the same. Two deliberate deviations, both only
//! visible with unusual vocabularies: BOS never takes part in merges, and a
//! vocabulary without a `" "` piece encodes the dummy prefix as byte token 0x20.
//!
//! Decoding inverts this: control tokens (0, 1, 2) produce nothing, byte pieces
//! produce their byte, and the one space that the dummy prefix added is removed
//! at the start of the sequence and after every BOS. Hence
//! `decode(encode(text, bos, eos)) == text` for every string.
//!
//! This module does not know about token files (see `data::tokens`).

pub mod train;

use std::collections::{BinaryHeap, HashMap};
use std::path::Path;

use crate::{Error, Result};

pub use train::{TrainOptions, train_bpe};

/// Id of `<unk>`.
pub const UNK: u32 = 0;
/// Id of the begin-of-sequence token.
pub const BOS: u32 = 1;
/// Id of the end-of-sequence token.
pub const EOS: u32 = 2;
/// Id of byte token `<0x00>`; byte `b` is token `BYTE_OFFSET + b`.
pub const BYTE_OFFSET: u32 = 3;
/// Number of ids before the first ordinary piece (3 control + 256 byte tokens).
pub const N_RESERVED: usize = 259;
/// run.c's initial best score: a piece scoring this or lower is never merged into.
pub const NO_MERGE_SCORE: f32 = -1e10;

/// Name used in errors for a tokenizer parsed from bytes without a path.
const BYTES_NAME: &str = "tokenizer.bin";

/// A llama2.c vocabulary plus the lookup index encoding needs.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    /// Piece bytes per id, exactly as stored in `tokenizer.bin` (space, not "▁").
    pieces: Vec<Vec<u8>>,
    /// Merge score per id (higher merges first).
    scores: Vec<f32>,
    /// The header field; every piece is at most this many bytes.
    max_token_length: u32,
    /// Piece bytes -> id (the lowest id when a string occurs twice).
    index: HashMap<Vec<u8>, u32>,
    /// `Some(b)` for ids whose piece is exactly `<0xHH>`.
    byte_of: Vec<Option<u8>>,
}

impl PartialEq for Tokenizer {
    fn eq(&self, other: &Self) -> bool {
        self.pieces == other.pieces
            && self.max_token_length == other.max_token_length
            && self.scores.len() == other.scores.len()
            && self
                .scores
                .iter()
                .zip(&other.scores)
                .all(|(a, b)| a.to_bits() == b.to_bits())
    }
}

/// The byte-fallback piece text for byte `b`: `<0x0A>`.
pub fn byte_piece(b: u8) -> Vec<u8> {
    format!("<0x{b:02X}>").into_bytes()
}

/// `Some(b)` if `piece` is exactly `<0xHH>` (upper- or lowercase hex).
fn parse_byte_piece(piece: &[u8]) -> Option<u8> {
    let hex = piece.strip_prefix(b"<0x")?.strip_suffix(b">")?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

/// Every single byte value, so byte tokens can decode to a borrowed slice.
const ALL_BYTES: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = i as u8;
        i += 1;
    }
    table
};

impl Tokenizer {
    /// Build from pieces and scores, computing `max_token_length`. Validates as
    /// [`Tokenizer::from_bytes`] does.
    pub fn new(pieces: Vec<Vec<u8>>, scores: Vec<f32>) -> Result<Self> {
        let max_len = pieces.iter().map(Vec::len).max().unwrap_or(0);
        let max_token_length = u32::try_from(max_len).map_err(|_| {
            Error::Invalid(format!("tokenizer: a piece of {max_len} bytes is too long"))
        })?;
        Self::validated(pieces, scores, max_token_length, Path::new("tokenizer"))
    }

    /// Read a llama2.c `tokenizer.bin`. `vocab_size` = the model's vocabulary: read
    /// exactly that many tokens (trailing bytes are ignored, as llama2.c does);
    /// `None` reads until the end of the file.
    pub fn read(path: &Path, vocab_size: Option<usize>) -> Result<Self> {
        let bytes = crate::memory::read_file(path, crate::memory::TEXT_FILE_LIMIT)?;
        Self::parse(&bytes, vocab_size, path)
    }

    /// Parse `tokenizer.bin` bytes (see [`Tokenizer::read`]); errors name "tokenizer.bin".
    pub fn from_bytes(bytes: &[u8], vocab_size: Option<usize>) -> Result<Self> {
        Self::parse(bytes, vocab_size, Path::new(BYTES_NAME))
    }

    fn parse(bytes: &[u8], vocab_size: Option<usize>, path: &Path) -> Result<Self> {
        let err = |field: String, msg: String| Error::format(path, field, msg);
        let take = |offset: usize, field: &dyn Fn() -> String| -> Result<[u8; 4]> {
            bytes
                .get(offset..offset + 4)
                .map(|s| s.try_into().expect("4-byte slice"))
                .ok_or_else(|| {
                    err(
                        field(),
                        format!(
                            "file ends at byte {} inside this field; the file is truncated",
                            bytes.len()
                        ),
                    )
                })
        };
        let max_token_length = u32::from_le_bytes(take(0, &|| "max_token_length".to_string())?);
        let mut offset = 4;
        let mut pieces = Vec::new();
        let mut scores = Vec::new();
        loop {
            let id = pieces.len();
            match vocab_size {
                Some(n) if id == n => break,
                None if offset == bytes.len() => break,
                Some(n) if offset == bytes.len() => {
                    return Err(err(
                        format!("token {id}"),
                        format!(
                            "file holds only {id} tokens but the model's vocabulary has {n}; \
                             use the tokenizer the model was trained with"
                        ),
                    ));
                }
                _ => {}
            }
            let score = f32::from_le_bytes(take(offset, &|| format!("token {id}: score"))?);
            let len = i32::from_le_bytes(take(offset + 4, &|| format!("token {id}: length"))?);
            offset += 8;
            if score.is_nan() {
                return Err(err(format!("token {id}"), "score is NaN".to_string()));
            }
            if len < 0 {
                return Err(err(
                    format!("token {id}"),
                    format!("length {len} is negative"),
                ));
            }
            let len = len as usize;
            let piece = bytes.get(offset..offset + len).ok_or_else(|| {
                err(
                    format!("token {id}"),
                    format!(
                        "length {len} runs past the end of the file ({} bytes left); \
                         the file is truncated",
                        bytes.len() - offset
                    ),
                )
            })?;
            offset += len;
            pieces.push(piece.to_vec());
            scores.push(score);
        }
        Self::validated(pieces, scores, max_token_length, path)
    }

    fn validated(
        pieces: Vec<Vec<u8>>,
        scores: Vec<f32>,
        max_token_length: u32,
        path: &Path,
    ) -> Result<Self> {
        if pieces.len() != scores.len() {
            return Err(Error::Invalid(format!(
                "{}: {} pieces but {} scores",
                path.display(),
                pieces.len(),
                scores.len()
            )));
        }
        if pieces.len() < N_RESERVED {
            return Err(Error::format(
                path,
                "vocabulary",
                format!(
                    "{} tokens, but a llama2.c vocabulary needs at least {N_RESERVED} \
                     (<unk>, <s>, </s> and 256 byte-fallback tokens)",
                    pieces.len()
                ),
            ));
        }
        if pieces.len() > u32::MAX as usize {
            return Err(Error::format(path, "vocabulary", "more than 2^32 tokens"));
        }
        for (id, (piece, score)) in pieces.iter().zip(&scores).enumerate() {
            if piece.len() > max_token_length as usize {
                return Err(Error::format(
                    path,
                    format!("token {id}"),
                    format!(
                        "length {} exceeds max_token_length {max_token_length} from the header",
                        piece.len()
                    ),
                ));
            }
            if score.is_nan() {
                return Err(Error::format(path, format!("token {id}"), "score is NaN"));
            }
        }
        for b in 0..=255u8 {
            let id = BYTE_OFFSET as usize + b as usize;
            if parse_byte_piece(&pieces[id]) != Some(b) {
                return Err(Error::format(
                    path,
                    format!("token {id}"),
                    format!(
                        "expected byte-fallback piece {} but found {:?}; only \
                         SentencePiece vocabularies with byte_fallback are supported",
                        String::from_utf8_lossy(&byte_piece(b)),
                        String::from_utf8_lossy(&pieces[id])
                    ),
                ));
            }
        }
        // Control ids never come from text, whatever their pieces spell: a
        // vocabulary whose piece 1 is "a" must not turn "a" into BOS.
        let mut index = HashMap::with_capacity(pieces.len());
        for (id, piece) in pieces.iter().enumerate().skip(BYTE_OFFSET as usize) {
            index.entry(piece.clone()).or_insert(id as u32);
        }
        let byte_of = pieces.iter().map(|p| parse_byte_piece(p)).collect();
        Ok(Tokenizer {
            pieces,
            scores,
            max_token_length,
            index,
            byte_of,
        })
    }

    /// Serialize to llama2.c `tokenizer.bin` bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let total: usize = self.pieces.iter().map(|p| 8 + p.len()).sum();
        let mut out = Vec::with_capacity(4 + total);
        out.extend_from_slice(&self.max_token_length.to_le_bytes());
        for (piece, score) in self.pieces.iter().zip(&self.scores) {
            out.extend_from_slice(&score.to_le_bytes());
            out.extend_from_slice(&(piece.len() as i32).to_le_bytes());
            out.extend_from_slice(piece);
        }
        out
    }

    /// Write `tokenizer.bin` atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::atomic::write_atomic(path, &self.to_bytes())
    }

    /// Number of tokens (V).
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// The `max_token_length` header field.
    pub fn max_token_length(&self) -> u32 {
        self.max_token_length
    }

    /// Piece bytes of `id` as stored (`None` if out of range).
    pub fn piece(&self, id: u32) -> Option<&[u8]> {
        self.pieces.get(id as usize).map(Vec::as_slice)
    }

    /// Score of `id` (`None` if out of range).
    pub fn score(&self, id: u32) -> Option<f32> {
        self.scores.get(id as usize).copied()
    }

    /// The id whose piece is exactly `bytes`.
    pub fn lookup(&self, bytes: &[u8]) -> Option<u32> {
        self.index.get(bytes).copied()
    }

    /// Encode like run.c: optional BOS, dummy-prefix space (if `text` is non-empty),
    /// characters, greedy merges, optional EOS.
    pub fn encode(&self, text: &str, bos: bool, eos: bool) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() + 3);
        if bos {
            ids.push(BOS);
        }
        let text_start = ids.len();
        if !text.is_empty() {
            self.push_chars(" ", &mut ids);
        }
        self.push_chars(text, &mut ids);
        self.merge(&mut ids, text_start);
        if eos {
            ids.push(EOS);
        }
        ids
    }

    /// Encode text that continues a sequence: no dummy prefix, no BOS/EOS. Used for
    /// the lines after the first of a document (`"\n" + line`).
    pub fn encode_continuation(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len());
        self.push_chars(text, &mut ids);
        self.merge(&mut ids, 0);
        ids
    }

    /// One id per character: its piece, or its UTF-8 bytes as byte tokens.
    fn push_chars(&self, text: &str, ids: &mut Vec<u32>) {
        let mut buf = [0u8; 4];
        for ch in text.chars() {
            let utf8 = ch.encode_utf8(&mut buf).as_bytes();
            match self.lookup(utf8) {
                Some(id) => ids.push(id),
                None => ids.extend(utf8.iter().map(|&b| BYTE_OFFSET + b as u32)),
            }
        }
    }

    /// The score-driven greedy merge of run.c over `ids[start..]`.
    fn merge(&self, ids: &mut Vec<u32>, start: usize) {
        let symbols = &ids[start..];
        let n = symbols.len();
        if n < 2 {
            return;
        }
        // Doubly linked list over positions; a merge keeps the left position.
        let mut id_at: Vec<u32> = symbols.to_vec();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut next: Vec<usize> = (1..=n).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::new();
        // Sized by the pieces, not by the header's `max_token_length`, which a
        // file may set to anything at least as large.
        let mut concat = Vec::new();
        for left in 0..n - 1 {
            self.push_candidate(&mut heap, &mut concat, left, left + 1, &id_at);
        }
        while let Some(candidate) = heap.pop() {
            let (left, right) = (candidate.left, candidate.right);
            let valid = alive[left]
                && alive[right]
                && next[left] == right
                && id_at[left] == candidate.left_id
                && id_at[right] == candidate.right_id;
            if !valid {
                continue;
            }
            id_at[left] = candidate.merged_id;
            alive[right] = false;
            next[left] = next[right];
            if next[left] < n {
                prev[next[left]] = left;
            }
            if prev[left] < n {
                self.push_candidate(&mut heap, &mut concat, prev[left], left, &id_at);
            }
            if next[left] < n {
                self.push_candidate(&mut heap, &mut concat, left, next[left], &id_at);
            }
        }
        let merged: Vec<u32> = (0..n).filter(|&i| alive[i]).map(|i| id_at[i]).collect();
        ids.truncate(start);
        ids.extend(merged);
    }

    fn push_candidate(
        &self,
        heap: &mut BinaryHeap<Candidate>,
        concat: &mut Vec<u8>,
        left: usize,
        right: usize,
        id_at: &[u32],
    ) {
        let (left_id, right_id) = (id_at[left], id_at[right]);
        concat.clear();
        concat.extend_from_slice(&self.pieces[left_id as usize]);
        concat.extend_from_slice(&self.pieces[right_id as usize]);
        if let Some(merged_id) = self.lookup(concat) {
            let score = self.scores[merged_id as usize];
            if score > NO_MERGE_SCORE {
                heap.push(Candidate {
                    // + 0.0 turns -0.0 into 0.0 so that total_cmp agrees with run.c's `>`.
                    score: score + 0.0,
                    left,
                    right,
                    left_id,
                    right_id,
                    merged_id,
                });
            }
        }
    }

    /// Decode a whole sequence to bytes (see the module doc for the rules).
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        let mut prev = None;
        for &id in ids {
            out.extend_from_slice(self.decode_token(prev, id)?);
            prev = Some(id);
        }
        Ok(out)
    }

    /// Decode a whole sequence to text; invalid UTF-8 (possible only from byte
    /// tokens a model emitted out of order) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.decode_bytes(ids)?).into_owned())
    }

    /// The bytes one token contributes, given the token before it (`None` at the
    /// start of a sequence). For streaming output during generation.
    pub fn decode_token(&self, prev: Option<u32>, id: u32) -> Result<&[u8]> {
        let piece = self.pieces.get(id as usize).ok_or_else(|| {
            Error::Invalid(format!(
                "tokenizer: token id {id} is out of range for a vocabulary of {}; \
                 the model and tokenizer do not match",
                self.pieces.len()
            ))
        })?;
        let bytes: &[u8] = match id {
            UNK | BOS | EOS => return Ok(&[]),
            _ => match self.byte_of[id as usize] {
                Some(b) => &ALL_BYTES[b as usize..b as usize + 1],
                None => piece,
            },
        };
        let at_text_start = matches!(prev, None | Some(BOS));
        Ok(match bytes {
            [b' ', rest @ ..] if at_text_start => rest,
            _ => bytes,
        })
    }
}

/// A mergeable adjacent pair in the heap: highest score first, then leftmost.
#[derive(Debug)]
struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    left_id: u32,
    right_id: u32,
    merged_id: u32,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Candidate {}
