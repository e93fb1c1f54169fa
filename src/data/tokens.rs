//! Token files: reading, writing, splitting, and sampling training windows.
//!
//! Two formats, told apart by the first eight bytes:
//! - raw: a flat array of little-endian `u16` ids, no header (the pretokenized
//!   TinyStories shards of llama2.c and the ANE research code);
//! - anemone: a 64-byte header, then the ids. Header (little-endian):
//!   `[0..8) magic "ANEMTOK\0"`, `[8..12) u32 version = 1`, `[12..16) u32 vocab_size`,
//!   `[16..20) u32 dtype` (bytes per id: 2 = u16, 4 = u32), `[20..28) u64 n_tokens`,
//!   `[28..64)` zeros.
//!
//! Reading: [`TokenFile::open`] reads the file into memory. It does not
//! memory-map: a mapping is not memory-safe Rust, and the crate keeps such code
//! to the ANE FFI layer (ARCHITECTURE.md, invariant 3). Files larger than
//! [`IN_MEMORY_LIMIT`] are read window by window with seek + read instead, so
//! memory stays bounded for multi-gigabyte corpora.
//!
//! Writing: [`TokenWriter`] streams ids to a temp file in constant memory and on
//! [`TokenWriter::finish`] writes the header (with the final count), syncs and
//! renames it over the target, so a reader never sees a half-written file.
//!
//! Sampling: a [`TokenSpan`] is a range of a file (the train or validation split);
//! a [`Batcher`] draws `seq_len + 1`-token windows from it, at random starts from
//! the seeded [`Rng`] or in sequential order, and exposes its whole state
//! ([`BatcherState`]) so a checkpoint can resume the exact stream.
//!
//! [`tokenize_files`] turns text files into a train and a validation token
//! file with any [`DocumentEncoder`]: the llama2.c tokenizer (documents start
//! with BOS) or a Hugging Face `tokenizer.json` (its post-processor's special
//! tokens at the start, its EOS at the end of every document). Ids of a
//! vocabulary above 65,536 are stored as `u32` (header dtype 4).
//!
//! This module does not know what a model is; callers pass the model's vocabulary
//! size to [`TokenFile::check_vocab`].

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::hf::HfTokenizer;
use crate::data::tokenizer::Tokenizer;
use crate::rng::Rng;
use crate::{Error, Result};

/// First eight bytes of an anemone token file.
pub const MAGIC: &[u8; 8] = b"ANEMTOK\0";
/// The anemone token-file version this build reads and writes.
pub const VERSION: u32 = 1;
/// Size of the anemone header in bytes.
pub const HEADER_LEN: usize = 64;
/// Files up to this size are read into memory; larger ones are read per window.
pub const IN_MEMORY_LIMIT: u64 = 1 << 30;

/// Storage type of the ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dtype {
    U16,
    U32,
}

impl Dtype {
    /// Bytes per id (also the header's dtype code).
    pub fn width(self) -> usize {
        match self {
            Dtype::U16 => 2,
            Dtype::U32 => 4,
        }
    }

    /// The narrowest dtype that holds every id below `vocab_size`.
    pub fn for_vocab(vocab_size: usize) -> Dtype {
        if vocab_size <= 1 << 16 {
            Dtype::U16
        } else {
            Dtype::U32
        }
    }
}

/// Which of the two layouts a file has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Flat little-endian `u16` ids, no header.
    RawU16,
    /// Versioned file with the `ANEMTOK` header.
    Anemone,
}

enum Storage {
    /// The whole file.
    Memory(Vec<u8>),
    /// Large files: read on demand.
    Disk(Mutex<File>),
}

/// An opened token file (either format).
pub struct TokenFile {
    path: PathBuf,
    format: Format,
    dtype: Dtype,
    /// Recorded in the anemone header; `None` for raw files.
    vocab_size: Option<usize>,
    n_tokens: usize,
    /// Byte offset of id 0.
    data_offset: usize,
    storage: Storage,
}

impl std::fmt::Debug for TokenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenFile")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("dtype", &self.dtype)
            .field("vocab_size", &self.vocab_size)
            .field("n_tokens", &self.n_tokens)
            .finish()
    }
}

/// What a file's first bytes and its length say about its layout.
struct Layout {
    format: Format,
    dtype: Dtype,
    vocab_size: Option<usize>,
    n_tokens: usize,
    data_offset: usize,
}

impl Layout {
    /// Check the header (`head`: the file's first bytes, up to [`HEADER_LEN`])
    /// against the file's length.
    fn parse(head: &[u8], file_len: u64, path: &Path) -> Result<Layout> {
        let fmt_err = |field: &str, msg: String| Error::format(path, field, msg);
        let (format, dtype, vocab_size, n_tokens, data_offset) =
            if head.len() >= 8 && &head[..8] == MAGIC {
                if file_len < HEADER_LEN as u64 {
                    return Err(fmt_err(
                        "header",
                        format!(
                            "file is {file_len} bytes, shorter than the {HEADER_LEN}-byte header; \
                         the file is truncated"
                        ),
                    ));
                }
                let u32_at = |at: usize| u32::from_le_bytes(head[at..at + 4].try_into().unwrap());
                let version = u32_at(8);
                if version != VERSION {
                    return Err(fmt_err(
                        "version",
                        format!("version {version} is not supported (this build reads {VERSION})"),
                    ));
                }
                let vocab_size = u32_at(12) as usize;
                let dtype = match u32_at(16) {
                    2 => Dtype::U16,
                    4 => Dtype::U32,
                    other => {
                        return Err(fmt_err(
                            "dtype",
                            format!("{other} is not a valid id width (2 for u16, 4 for u32)"),
                        ));
                    }
                };
                if vocab_size == 0 || (dtype == Dtype::U16 && vocab_size > 1 << 16) {
                    return Err(fmt_err(
                        "vocab_size",
                        format!("{vocab_size} does not fit dtype u{}", dtype.width() * 8),
                    ));
                }
                let n_tokens = u64::from_le_bytes(head[20..28].try_into().unwrap());
                let data_len = file_len - HEADER_LEN as u64;
                if n_tokens.checked_mul(dtype.width() as u64) != Some(data_len) {
                    return Err(fmt_err(
                        "n_tokens",
                        format!(
                            "header says {n_tokens} tokens of {} bytes but {data_len} bytes follow \
                         the header; the file is truncated or corrupt",
                            dtype.width()
                        ),
                    ));
                }
                (
                    Format::Anemone,
                    dtype,
                    Some(vocab_size),
                    n_tokens,
                    HEADER_LEN,
                )
            } else {
                if !file_len.is_multiple_of(2) {
                    return Err(fmt_err(
                        "size",
                        format!(
                            "{file_len} bytes is odd, so this is not a raw u16 token file (no \
                         ANEMTOK header either); the file is truncated or not a token file"
                        ),
                    ));
                }
                (Format::RawU16, Dtype::U16, None, file_len / 2, 0)
            };
        let n_tokens = usize::try_from(n_tokens)
            .map_err(|_| fmt_err("n_tokens", format!("{n_tokens} is too large")))?;
        Ok(Layout {
            format,
            dtype,
            vocab_size,
            n_tokens,
            data_offset,
        })
    }

    fn file(self, path: &Path, storage: Storage) -> TokenFile {
        TokenFile {
            path: path.to_path_buf(),
            format: self.format,
            dtype: self.dtype,
            vocab_size: self.vocab_size,
            n_tokens: self.n_tokens,
            data_offset: self.data_offset,
            storage,
        }
    }
}

impl TokenFile {
    /// Open and check the structure of a token file (see the module doc for the
    /// in-memory / on-disk choice). Ids are checked by [`TokenFile::check_vocab`].
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with_limit(path, IN_MEMORY_LIMIT)
    }

    /// [`TokenFile::open`] with an explicit in-memory size limit (bytes).
    pub fn open_with_limit(path: &Path, in_memory_limit: u64) -> Result<Self> {
        let io = |e| Error::io(path, e);
        let mut file = File::open(path).map_err(io)?;
        let metadata = file.metadata().map_err(io)?;
        if !metadata.is_file() {
            return Err(Error::format(
                path,
                "file",
                "not a regular file (a token file is read at random positions)",
            ));
        }
        let file_len = metadata.len();
        let mut head = [0u8; HEADER_LEN];
        let head_len = (file_len as usize).min(HEADER_LEN);
        file.read_exact(&mut head[..head_len]).map_err(io)?;
        let layout = Layout::parse(&head[..head_len], file_len, path)?;
        let storage = if file_len <= in_memory_limit {
            crate::memory::check(&format!("reading {}", path.display()), file_len, "")?;
            let mut bytes = Vec::with_capacity(file_len as usize);
            file.seek(SeekFrom::Start(0)).map_err(io)?;
            file.take(file_len + 1)
                .read_to_end(&mut bytes)
                .map_err(io)?;
            if bytes.len() as u64 != file_len {
                return Err(Error::format(
                    path,
                    "size",
                    "file changed while it was read".to_string(),
                ));
            }
            Storage::Memory(bytes)
        } else {
            Storage::Disk(Mutex::new(file))
        };
        Ok(layout.file(path, storage))
    }

    /// A token file held in `bytes` (either format); `path` names it in errors.
    pub fn from_bytes(bytes: Vec<u8>, path: &Path) -> Result<Self> {
        let head_len = bytes.len().min(HEADER_LEN);
        let layout = Layout::parse(&bytes[..head_len], bytes.len() as u64, path)?;
        Ok(layout.file(path, Storage::Memory(bytes)))
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Raw or anemone.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Storage type of the ids.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The vocabulary size recorded in the header (`None` for raw files).
    pub fn vocab_size(&self) -> Option<usize> {
        self.vocab_size
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.n_tokens
    }

    /// True if the file holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.n_tokens == 0
    }

    /// True if the whole file was read into memory.
    pub fn is_in_memory(&self) -> bool {
        matches!(self.storage, Storage::Memory(_))
    }

    /// Copy ids `start .. start + out.len()` into `out`.
    pub fn read_into(&self, start: usize, out: &mut [u32]) -> Result<()> {
        let end = start.checked_add(out.len()).filter(|&e| e <= self.n_tokens);
        if end.is_none() {
            return Err(Error::Invalid(format!(
                "{}: tokens {start}..{} are past the end of the file ({} tokens)",
                self.path.display(),
                start.saturating_add(out.len()),
                self.n_tokens
            )));
        }
        let width = self.dtype.width();
        let byte_start = self.data_offset + start * width;
        let byte_len = out.len() * width;
        match &self.storage {
            Storage::Memory(bytes) => {
                decode_ids(&bytes[byte_start..byte_start + byte_len], self.dtype, out)
            }
            Storage::Disk(file) => {
                let mut buf = vec![0u8; byte_len];
                let mut file = file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                file.seek(SeekFrom::Start(byte_start as u64))
                    .and_then(|_| file.read_exact(&mut buf))
                    .map_err(|e| Error::io(&self.path, e))?;
                decode_ids(&buf, self.dtype, out);
            }
        }
        Ok(())
    }

    /// Ids `start .. start + len`.
    pub fn window(&self, start: usize, len: usize) -> Result<Vec<u32>> {
        let mut out = vec![0; len];
        self.read_into(start, &mut out)?;
        Ok(out)
    }

    /// CRC-32 (IEEE) of the ids' bytes as stored (the header excluded): what a
    /// run records to know it continues on the same tokens.
    pub fn checksum(&self) -> Result<u32> {
        let width = self.dtype.width();
        let mut crc = crc32fast::Hasher::new();
        match &self.storage {
            Storage::Memory(bytes) => {
                crc.update(&bytes[self.data_offset..self.data_offset + self.n_tokens * width]);
            }
            Storage::Disk(file) => {
                let mut file = file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                file.seek(SeekFrom::Start(self.data_offset as u64))
                    .map_err(|e| Error::io(&self.path, e))?;
                let mut left = (self.n_tokens * width) as u64;
                let mut buf = vec![0u8; 1 << 20];
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    file.read_exact(&mut buf[..n])
                        .map_err(|e| Error::io(&self.path, e))?;
                    crc.update(&buf[..n]);
                    left -= n as u64;
                }
            }
        }
        Ok(crc.finalize())
    }

    /// Check the file against a model's vocabulary: the recorded vocabulary (if
    /// any) must equal it and every id must be below it. Scans the whole file.
    pub fn check_vocab(&self, model_vocab: usize) -> Result<()> {
        if let Some(recorded) = self.vocab_size
            && recorded != model_vocab
        {
            return Err(Error::format(
                &self.path,
                "vocab_size",
                format!(
                    "the file was tokenized with a vocabulary of {recorded} but the model has \
                     {model_vocab}; re-tokenize with the model's tokenizer"
                ),
            ));
        }
        const CHUNK: usize = 1 << 20;
        let mut buf = vec![0u32; CHUNK.min(self.n_tokens)];
        let mut start = 0;
        while start < self.n_tokens {
            let n = CHUNK.min(self.n_tokens - start);
            self.read_into(start, &mut buf[..n])?;
            if let Some(offset) = buf[..n].iter().position(|&id| id as usize >= model_vocab) {
                return Err(Error::format(
                    &self.path,
                    format!("token {}", start + offset),
                    format!(
                        "id {} is out of range for the model's vocabulary of {model_vocab}; \
                         the file was made with a different tokenizer",
                        buf[offset]
                    ),
                ));
            }
            start += n;
        }
        Ok(())
    }
}

fn decode_ids(bytes: &[u8], dtype: Dtype, out: &mut [u32]) {
    match dtype {
        Dtype::U16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = u16::from_le_bytes([b[0], b[1]]) as u32;
            }
        }
        Dtype::U32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
}

/// Streams ids into a token file in constant memory; atomic on [`TokenWriter::finish`].
/// Dropping an unfinished writer removes its temp file and leaves the target alone.
pub struct TokenWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    format: Format,
    dtype: Dtype,
    /// Exclusive upper bound on ids.
    id_limit: u64,
    vocab_size: usize,
    n_tokens: u64,
}

impl TokenWriter {
    /// An anemone-format writer for ids below `vocab_size` (u16 storage when it fits).
    pub fn create(path: &Path, vocab_size: usize) -> Result<Self> {
        if vocab_size == 0 || vocab_size > u32::MAX as usize {
            return Err(Error::Invalid(format!(
                "{}: vocab_size {vocab_size} must be in 1..=2^32-1",
                path.display()
            )));
        }
        let dtype = Dtype::for_vocab(vocab_size);
        Self::start(path, Format::Anemone, dtype, vocab_size, vocab_size as u64)
    }

    /// A raw-format writer (flat u16, no header) for tools that expect llama2.c shards.
    pub fn create_raw_u16(path: &Path) -> Result<Self> {
        Self::start(path, Format::RawU16, Dtype::U16, 0, 1 << 16)
    }

    fn start(
        path: &Path,
        format: Format,
        dtype: Dtype,
        vocab_size: usize,
        id_limit: u64,
    ) -> Result<Self> {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .ok_or_else(|| Error::Invalid(format!("{}: not a file path", path.display())))?;
        let tmp = crate::atomic::temp_path(dir, &name.to_string_lossy());
        crate::atomic::remove_stale_temps(dir);
        let mut out =
            BufWriter::with_capacity(1 << 20, File::create(&tmp).map_err(|e| Error::io(&tmp, e))?);
        if format == Format::Anemone {
            out.write_all(&[0u8; HEADER_LEN])
                .map_err(|e| Error::io(&tmp, e))?;
        }
        Ok(TokenWriter {
            path: path.to_path_buf(),
            tmp,
            out: Some(out),
            format,
            dtype,
            id_limit,
            vocab_size,
            n_tokens: 0,
        })
    }

    /// Append ids; an id at or above the vocabulary is an error naming its position.
    pub fn extend(&mut self, ids: &[u32]) -> Result<()> {
        let out = self.out.as_mut().expect("TokenWriter used after finish");
        for (i, &id) in ids.iter().enumerate() {
            if id as u64 >= self.id_limit {
                return Err(Error::Invalid(format!(
                    "{}: token {}: id {id} does not fit (ids must be below {})",
                    self.path.display(),
                    self.n_tokens + i as u64,
                    self.id_limit
                )));
            }
        }
        let write = |out: &mut BufWriter<File>| -> std::io::Result<()> {
            match self.dtype {
                Dtype::U16 => ids
                    .iter()
                    .try_for_each(|&id| out.write_all(&(id as u16).to_le_bytes())),
                Dtype::U32 => ids
                    .iter()
                    .try_for_each(|&id| out.write_all(&id.to_le_bytes())),
            }
        };
        write(out).map_err(|e| Error::io(&self.tmp, e))?;
        self.n_tokens += ids.len() as u64;
        Ok(())
    }

    /// Ids written so far.
    pub fn len(&self) -> u64 {
        self.n_tokens
    }

    /// True if nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.n_tokens == 0
    }

    /// Write the header, sync, and rename over the target. Returns the token count.
    pub fn finish(mut self) -> Result<u64> {
        let out = self.out.take().expect("TokenWriter finished twice");
        let result = (|| -> std::io::Result<()> {
            let mut file = out.into_inner().map_err(|e| e.into_error())?;
            if self.format == Format::Anemone {
                file.seek(SeekFrom::Start(0))?;
                file.write_all(&anemone_header(
                    self.vocab_size as u32,
                    self.dtype,
                    self.n_tokens,
                ))?;
            }
            file.sync_all()?;
            std::fs::rename(&self.tmp, &self.path)
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(Error::io(&self.path, e));
        }
        Ok(self.n_tokens)
    }
}

impl Drop for TokenWriter {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// The 64-byte anemone header.
pub fn anemone_header(vocab_size: u32, dtype: Dtype, n_tokens: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&vocab_size.to_le_bytes());
    h[16..20].copy_from_slice(&(dtype.width() as u32).to_le_bytes());
    h[20..28].copy_from_slice(&n_tokens.to_le_bytes());
    h
}

/// A contiguous range of a token file: the training or the validation split.
#[derive(Clone, Debug)]
pub struct TokenSpan {
    file: Arc<TokenFile>,
    start: usize,
    len: usize,
}

impl TokenSpan {
    /// The whole file.
    pub fn whole(file: Arc<TokenFile>) -> Self {
        let len = file.len();
        TokenSpan {
            file,
            start: 0,
            len,
        }
    }

    /// Split off the last `val_fraction` of the tokens (rounded down) as the
    /// validation span: returns (train, val).
    pub fn split_tail(file: Arc<TokenFile>, val_fraction: f64) -> Result<(TokenSpan, TokenSpan)> {
        check_val_fraction(val_fraction)?;
        let n = file.len();
        let val_len = (n as f64 * val_fraction) as usize;
        let train = TokenSpan {
            file: file.clone(),
            start: 0,
            len: n - val_len,
        };
        let val = TokenSpan {
            file,
            start: n - val_len,
            len: val_len,
        };
        Ok((train, val))
    }

    /// The file this span reads.
    pub fn file(&self) -> &TokenFile {
        &self.file
    }

    /// First token of the span in file positions.
    pub fn start(&self) -> usize {
        self.start
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the span is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn check_val_fraction(val_fraction: f64) -> Result<()> {
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(Error::out_of_range(
            "--val-fraction",
            val_fraction,
            "a number in [0, 1)",
        ));
    }
    Ok(())
}

/// How a [`Batcher`] picks window starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Order {
    /// Uniform random start in `0 ..= len - (seq_len + 1)`, from the seeded RNG.
    Random,
    /// Starts `0, seq_len, 2 seq_len, ...` (each token is a target once per
    /// epoch), wrapping to 0 when the next window would not fit.
    Sequential,
}

impl Order {
    /// Every order, the default first.
    pub const ALL: [Order; 2] = [Order::Random, Order::Sequential];

    /// The name `--data-order` takes.
    pub fn name(self) -> &'static str {
        match self {
            Order::Random => "random",
            Order::Sequential => "sequential",
        }
    }
}

impl fmt::Display for Order {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Order {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let names = Order::ALL.map(Order::name);
        Order::ALL
            .into_iter()
            .find(|order| order.name() == s)
            .ok_or_else(|| Error::unknown_name("data order", s, &names))
    }
}

/// Everything a [`Batcher`] needs to continue exactly where it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatcherState {
    /// [`Rng::state`] (random order).
    pub rng: u64,
    /// Next window start within the span (sequential order).
    pub next_start: u64,
    /// Completed passes over the span (sequential order).
    pub epoch: u64,
}

/// B windows of T inputs and their T next-token targets, row-major `(B, T)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub batch_size: usize,
    pub seq_len: usize,
    /// (B, T)
    pub inputs: Vec<u32>,
    /// (B, T): `targets[b][t] = inputs[b][t + 1]`, the last from the window's extra token.
    pub targets: Vec<u32>,
}

/// Draws `seq_len + 1`-token windows from a span.
#[derive(Debug)]
pub struct Batcher {
    span: TokenSpan,
    seq_len: usize,
    order: Order,
    rng: Rng,
    next_start: usize,
    epoch: u64,
    window: Vec<u32>,
}

impl Batcher {
    /// A batcher over `span`; `seed` seeds the random order. A span shorter than
    /// one window (`seq_len + 1` tokens) is an error.
    pub fn new(span: TokenSpan, seq_len: usize, order: Order, seed: u64) -> Result<Self> {
        if seq_len == 0 {
            return Err(Error::Invalid(
                "batcher: seq_len must be at least 1".to_string(),
            ));
        }
        if span.len() < seq_len + 1 {
            return Err(Error::Invalid(format!(
                "{}: {} tokens (in the span used) are fewer than one window of seq_len + 1 = \
                 {}; use a shorter sequence length or more data",
                span.file().path().display(),
                span.len(),
                seq_len + 1
            )));
        }
        Ok(Batcher {
            span,
            seq_len,
            order,
            rng: Rng::new(seed),
            next_start: 0,
            epoch: 0,
            window: vec![0; seq_len + 1],
        })
    }

    /// Sequence length T.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Windows per sequential epoch: `(len - 1) / seq_len`.
    pub fn windows_per_epoch(&self) -> usize {
        (self.span.len() - 1) / self.seq_len
    }

    /// The state to store in a checkpoint.
    pub fn state(&self) -> BatcherState {
        BatcherState {
            rng: self.rng.state(),
            next_start: self.next_start as u64,
            epoch: self.epoch,
        }
    }

    /// Continue from a saved state.
    pub fn restore(&mut self, state: BatcherState) -> Result<()> {
        let next_start = state.next_start as usize;
        if self.order == Order::Sequential && next_start + self.seq_len + 1 > self.span.len() {
            return Err(Error::Invalid(format!(
                "{}: saved batcher position {next_start} does not fit a window in {} tokens; \
                 the checkpoint was made with different data",
                self.span.file().path().display(),
                self.span.len()
            )));
        }
        self.rng = Rng::from_state(state.rng);
        self.next_start = next_start;
        self.epoch = state.epoch;
        Ok(())
    }

    /// Start (within the span) of the next window, advancing the state.
    pub fn next_start(&mut self) -> usize {
        let n_starts = self.span.len() - self.seq_len;
        match self.order {
            Order::Random => self.rng.below(n_starts as u64) as usize,
            Order::Sequential => {
                let start = self.next_start;
                self.next_start += self.seq_len;
                if self.next_start >= n_starts {
                    self.next_start = 0;
                    self.epoch += 1;
                }
                start
            }
        }
    }

    /// Fill one row: `inputs` and `targets` are each `seq_len` long.
    pub fn next_window(&mut self, inputs: &mut [u32], targets: &mut [u32]) -> Result<()> {
        assert!(inputs.len() == self.seq_len && targets.len() == self.seq_len);
        let start = self.next_start();
        self.span
            .file
            .read_into(self.span.start + start, &mut self.window)?;
        inputs.copy_from_slice(&self.window[..self.seq_len]);
        targets.copy_from_slice(&self.window[1..]);
        Ok(())
    }

    /// The next `batch_size` windows.
    pub fn next_batch(&mut self, batch_size: usize) -> Result<Batch> {
        let t = self.seq_len;
        let mut inputs = vec![0; batch_size * t];
        let mut targets = vec![0; batch_size * t];
        for (row_in, row_tg) in inputs.chunks_exact_mut(t).zip(targets.chunks_exact_mut(t)) {
            self.next_window(row_in, row_tg)?;
        }
        Ok(Batch {
            batch_size,
            seq_len: t,
            inputs,
            targets,
        })
    }
}

/// What [`tokenize_files`] needs of a tokenizer: the ids of a document's
/// first line and of a further line (given with its leading `\n`), the id
/// that ends a document (if any) and the vocabulary the token file records.
pub trait DocumentEncoder: Sync {
    /// One more than the largest id the encoder produces, or the model's
    /// vocabulary when it is larger (recorded in the token file's header).
    fn vocabulary(&self) -> usize;
    fn encode_first_line(&self, text: &str) -> Result<Vec<u32>>;
    fn encode_further_line(&self, text: &str) -> Result<Vec<u32>>;
    fn end_of_document(&self) -> Option<u32>;
}

/// llama2.c: BOS and the dummy prefix before a document, no end marker.
impl DocumentEncoder for Tokenizer {
    fn vocabulary(&self) -> usize {
        self.vocab_size()
    }
    fn encode_first_line(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode(text, true, false))
    }
    fn encode_further_line(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_continuation(text))
    }
    fn end_of_document(&self) -> Option<u32> {
        None
    }
}

/// A Hugging Face tokenizer for a model of `vocab_size` rows (at least the
/// tokenizer's own ids): a document's first line with the post-processor's
/// special tokens (`add_special_tokens`, as transformers encodes a text),
/// further lines without, and the tokenizer's EOS after the document.
#[derive(Debug)]
pub struct HfDocuments<'a> {
    pub tokenizer: &'a HfTokenizer,
    pub vocab_size: usize,
}

impl DocumentEncoder for HfDocuments<'_> {
    fn vocabulary(&self) -> usize {
        self.vocab_size.max(self.tokenizer.vocab_size())
    }
    fn encode_first_line(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text, true)
    }
    fn encode_further_line(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text, false)
    }
    fn end_of_document(&self) -> Option<u32> {
        self.tokenizer.eos_token_id()
    }
}

/// What [`tokenize_files`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizeReport {
    pub train_path: PathBuf,
    /// `None` when `val_fraction` was 0.
    pub val_path: Option<PathBuf>,
    pub train_tokens: u64,
    pub val_tokens: u64,
    /// Documents started (each begins with BOS).
    pub documents: u64,
    pub input_bytes: u64,
}

/// The validation file next to `out`: `tokens.bin` -> `tokens.val.bin`.
pub fn val_path_for(out: &Path) -> PathBuf {
    out.with_extension("val.bin")
}

/// Line that ends a document besides a blank line (TinyStories' text files).
const END_OF_TEXT: &str = "<|endoftext|>";

/// The longest line [`tokenize_files`] reads (its ids are held in memory).
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// Tokenize text files into `out` (train) and [`val_path_for`]`(out)` (validation).
///
/// Streaming, line by line: a document is a run of non-blank lines (a blank line
/// or a `<|endoftext|>` line ends it). Its first line is encoded as a text's
/// start (llama2.c: with BOS and the dummy prefix), each further line as
/// `"\n" + line` continuing it, so the ids decode back to the document's
/// text; the encoder's end-of-document id, if any, follows its last line. A trailing `\r` is dropped from each line.
/// Lines starting in the last `val_fraction` of the input bytes go to the
/// validation file (starting a new document there); when the input's last line
/// reaches into that part (a text of one line), it is split where the part
/// begins. Lines longer than [`MAX_LINE_BYTES`] are an error. The outputs must
/// not be inputs. `progress(done, total)` is called with byte counts.
pub fn tokenize_files(
    tokenizer: &dyn DocumentEncoder,
    inputs: &[PathBuf],
    out: &Path,
    val_fraction: f64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<TokenizeReport> {
    check_val_fraction(val_fraction)?;
    let val_path = (val_fraction > 0.0).then(|| val_path_for(out));
    let named: Vec<(&str, &Path)> = inputs.iter().map(|p| ("--input", p.as_path())).collect();
    crate::atomic::refuse_input_as_output("--out", out, &named)?;
    if let Some(val_path) = &val_path {
        crate::atomic::refuse_input_as_output("the held-out output", val_path, &named)?;
    }
    let mut total = 0u64;
    for path in inputs {
        total += std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .len();
    }
    let val_from = ((total as f64) * (1.0 - val_fraction)).ceil() as u64;
    let mut train = TokenWriter::create(out, tokenizer.vocabulary())?;
    let mut val = match &val_path {
        Some(p) => Some(TokenWriter::create(p, tokenizer.vocabulary())?),
        None => None,
    };

    // Lines are gathered into chunks, encoded in parallel, written in order;
    // a line with no text marks the end of a document.
    struct Line {
        text: String,
        first_of_document: bool,
        to_val: bool,
    }
    let end_of_document = |to_val: bool| Line {
        text: String::new(),
        first_of_document: false,
        to_val,
    };
    const CHUNK_BYTES: usize = 1 << 20;
    let mut chunk: Vec<Line> = Vec::new();
    let mut chunk_bytes = 0usize;
    let mut done = 0u64;
    let mut documents = 0u64;
    let mut in_document = false;
    let mut in_val = false;
    let flush = |chunk: &mut Vec<Line>,
                 train: &mut TokenWriter,
                 val: &mut Option<TokenWriter>|
     -> Result<()> {
        let encoded: Vec<Vec<u32>> = chunk
            .par_iter()
            .map(|line| {
                if line.text.is_empty() {
                    Ok(tokenizer.end_of_document().into_iter().collect())
                } else if line.first_of_document {
                    tokenizer.encode_first_line(&line.text)
                } else {
                    tokenizer.encode_further_line(&format!("\n{}", line.text))
                }
            })
            .collect::<Result<_>>()?;
        for (line, ids) in chunk.iter().zip(&encoded) {
            match (line.to_val, val.as_mut()) {
                (true, Some(v)) => v.extend(ids)?,
                _ => train.extend(ids)?,
            }
        }
        chunk.clear();
        Ok(())
    };
    for path in inputs {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut raw = Vec::new();
        let mut line_no = 0usize;
        loop {
            raw.clear();
            let n = (&mut reader)
                .take(MAX_LINE_BYTES as u64 + 1)
                .read_until(b'\n', &mut raw)
                .map_err(|e| Error::io(path, e))?;
            if n == 0 {
                break;
            }
            line_no += 1;
            if n > MAX_LINE_BYTES {
                return Err(Error::format(
                    path,
                    format!("line {line_no}"),
                    format!(
                        "longer than {} without a line break; this is not a text file, or \
                         its lines must be split",
                        crate::memory::human(MAX_LINE_BYTES as u64)
                    ),
                ));
            }
            let line_start = done;
            done += n as u64;
            let mut text = String::from_utf8(std::mem::take(&mut raw)).map_err(|e| {
                Error::format(
                    path,
                    format!("line {line_no}"),
                    format!(
                        "not valid UTF-8 at byte {} of the line",
                        e.utf8_error().valid_up_to()
                    ),
                )
            })?;
            while text.ends_with('\n') || text.ends_with('\r') {
                text.pop();
            }
            // The last line of the input reaching into the held-out part is
            // split there (at a character boundary), so that a text of one
            // line (one document) still holds some out; other lines go whole.
            let mut held_out_tail = None;
            if val.is_some() && !in_val && line_start < val_from && done >= total {
                let cut = (val_from - line_start) as usize;
                if let Some(at) = (cut..text.len()).find(|&i| text.is_char_boundary(i)) {
                    held_out_tail = Some(text.split_off(at));
                }
            }
            if val.is_some() && !in_val && line_start >= val_from {
                if in_document {
                    chunk.push(end_of_document(false));
                }
                in_val = true;
                in_document = false;
            }
            if text.is_empty() || text == END_OF_TEXT {
                if in_document {
                    chunk.push(end_of_document(in_val));
                }
                in_document = false;
                continue;
            }
            if !in_document {
                documents += 1;
            }
            chunk_bytes += text.len();
            chunk.push(Line {
                text,
                first_of_document: !in_document,
                to_val: in_val,
            });
            in_document = true;
            if let Some(tail) = held_out_tail {
                // The held-out part starts a document of its own.
                chunk.push(end_of_document(in_val));
                documents += 1;
                chunk_bytes += tail.len();
                chunk.push(Line {
                    text: tail,
                    first_of_document: true,
                    to_val: true,
                });
                in_val = true;
            }
            if chunk_bytes >= CHUNK_BYTES {
                flush(&mut chunk, &mut train, &mut val)?;
                chunk_bytes = 0;
                progress(done, total);
            }
        }
        // A document does not continue into the next file.
        if in_document {
            chunk.push(end_of_document(in_val));
        }
        in_document = false;
    }
    flush(&mut chunk, &mut train, &mut val)?;
    progress(done, total);
    let train_tokens = train.finish()?;
    let val_tokens = match val {
        Some(v) => v.finish()?,
        None => 0,
    };
    Ok(TokenizeReport {
        train_path: out.to_path_buf(),
        val_path,
        train_tokens,
        val_tokens,
        documents,
        input_bytes: total,
    })
}
