//! The anemone checkpoint format (reader and writer in this one file).
//!
//! ```text
//! offset 0   8 bytes  magic "ANEMCKPT"
//!        8   u32 LE   format version (2)
//!       12   u32 LE   header length H in bytes
//!       16   H bytes  UTF-8 JSON header: {"config": ModelConfig, "n_params": N,
//!                     "optimizer": bool, "adam_t": u64, "state": {...trainer state...}}
//!            zero padding to a multiple of 64 bytes
//!            N f32 LE weights, then (if "optimizer") N f32 LE first moments and N second moments
//!            u32 LE   CRC-32 (IEEE, as zlib's) of every byte before it   [version 2]
//! ```
//!
//! Version 2 added the trailing checksum, so a flipped bit anywhere (header,
//! weights, moments) is an error instead of a silently different model.
//! Version 1 files (the same layout without the checksum) are still read;
//! every write is version 2.
//!
//! The trainer's state (step, data position, RNG state, loss scale, schedule) is
//! an opaque JSON object here, so `model` knows nothing about `train`. Writes are
//! atomic (temp file + rename); reads check magic, version, header fields, the
//! exact file size (computed with checked arithmetic from a validated config),
//! the checksum and that every weight is finite, and name the file and field
//! on any mismatch. A file whose JSON header is intact but whose magic is not
//! is reported as a damaged checkpoint ([`looks_like_checkpoint`]), not handed
//! to another reader.

use std::io::{Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::config::ModelConfig;
use super::weights::{Layout, Weights};
use crate::atomic::write_atomic_with;
use crate::{Error, Result};

pub const MAGIC: &[u8; 8] = b"ANEMCKPT";
/// The version this build writes.
pub const VERSION: u32 = 2;
/// The oldest version this build reads (no checksum).
pub const OLDEST_VERSION: u32 = 1;
/// What a checkpoint's JSON header starts with, at offset 16.
const HEADER_START: &[u8] = b"{\"config\":";

#[derive(Serialize, Deserialize)]
struct Header {
    config: ModelConfig,
    n_params: u64,
    optimizer: bool,
    adam_t: u64,
    state: serde_json::Value,
}

/// A loaded checkpoint.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub weights: Weights,
    /// AdamW moments `(m, v)` and step count `t`, when saved.
    pub moments: Option<(Vec<f32>, Vec<f32>, u64)>,
    /// Trainer state (opaque here).
    pub state: serde_json::Value,
}

fn write_f32s(w: &mut dyn Write, values: &[f32]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1 << 16);
    for chunk in values.chunks(1 << 14) {
        buf.clear();
        for v in chunk {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        w.write_all(&buf)?;
    }
    Ok(())
}

/// A writer that keeps the CRC-32 of everything written through it.
struct Checksummed<'w> {
    inner: &'w mut dyn Write,
    crc: crc32fast::Hasher,
}

impl Write for Checksummed<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Save weights, optional AdamW moments `(m, v, t)` and trainer state atomically.
pub fn save(
    path: &Path,
    weights: &Weights,
    moments: Option<(&[f32], &[f32], u64)>,
    state: &serde_json::Value,
) -> Result<()> {
    let header = Header {
        config: weights.config().clone(),
        n_params: weights.data.len() as u64,
        optimizer: moments.is_some(),
        adam_t: moments.map_or(0, |m| m.2),
        state: state.clone(),
    };
    let json = serde_json::to_vec(&header).map_err(|e| Error::Invalid(e.to_string()))?;
    let mut arrays = vec![weights.data.as_slice()];
    if let Some((m, v, _)) = moments {
        arrays.extend([m, v]);
    }
    write_container(path, MAGIC, &json, &arrays)
}

/// Write the container every anemone checkpoint uses, atomically: `magic`
/// (8 bytes), [`VERSION`], the JSON header's length and bytes, zero padding
/// to a multiple of 64, the `arrays` as f32 LE one after the other, and the
/// CRC-32 of everything before it.
pub fn write_container(path: &Path, magic: &[u8; 8], json: &[u8], arrays: &[&[f32]]) -> Result<()> {
    let unpadded = 16 + json.len();
    let padding = unpadded.next_multiple_of(64) - unpadded;
    write_atomic_with(path, |out| {
        let mut w = Checksummed {
            inner: out,
            crc: crc32fast::Hasher::new(),
        };
        w.write_all(magic)?;
        w.write_all(&VERSION.to_le_bytes())?;
        w.write_all(&(json.len() as u32).to_le_bytes())?;
        w.write_all(json)?;
        w.write_all(&vec![0u8; padding])?;
        for array in arrays {
            write_f32s(&mut w, array)?;
        }
        let crc = w.crc.finalize();
        out.write_all(&crc.to_le_bytes())
    })
}

/// Check the trailing CRC-32 of a version-2 container's `bytes`.
fn check_crc(bytes: &[u8], path: &Path) -> Result<()> {
    let (data, stored) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes(stored.try_into().expect("4 bytes"));
    let computed = crc32fast::hash(data);
    if stored != computed {
        return Err(Error::format(
            path,
            "checksum",
            format!(
                "the stored CRC-32 {stored:08x} is not the data's {computed:08x}: the file \
                 is corrupt (a flipped bit or a bad copy); use an earlier checkpoint"
            ),
        ));
    }
    Ok(())
}

/// A container written by [`write_container`] with `magic`, read back: its
/// JSON header (parsed) and `arrays` f32 arrays of `n` values each, after
/// the magic, version, size and checksum are checked. `what` names the
/// kind of file in errors.
pub fn read_container<H: serde::de::DeserializeOwned>(
    bytes: &[u8],
    path: &Path,
    magic: &[u8; 8],
    what: &str,
    sizes: impl FnOnce(&H) -> Result<(usize, usize)>,
) -> Result<(H, Vec<Vec<f32>>)> {
    let bad = |field: &str, msg: String| Error::format(path, field, msg);
    if bytes.len() < 20 || &bytes[..8] != magic {
        return Err(bad(
            "magic",
            format!(
                "expected {:?}: the file is damaged or not {what}",
                String::from_utf8_lossy(magic)
            ),
        ));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(bad(
            "version",
            format!("version {version} is not supported (this anemone reads version {VERSION})"),
        ));
    }
    let header_len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    let header_end = 16usize
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| {
            bad(
                "header",
                "runs past the end of the file (truncated?)".into(),
            )
        })?;
    let header: H = serde_json::from_slice(&bytes[16..header_end])
        .map_err(|e| bad("header", format!("malformed JSON header: {e}")))?;
    let (n, arrays) = sizes(&header)?;
    let body = header_end.next_multiple_of(64);
    let expected = n
        .checked_mul(4 * arrays)
        .and_then(|b| b.checked_add(body + 4));
    if expected != Some(bytes.len()) {
        return Err(bad(
            "size",
            format!(
                "expected {arrays} arrays of {n} values, {} bytes in all; found {} (truncated \
                 or corrupt)",
                expected.map_or("more than 2^64".to_string(), |e| e.to_string()),
                bytes.len()
            ),
        ));
    }
    check_crc(bytes, path)?;
    let values = (0..arrays)
        .map(|k| {
            bytes[body + k * n * 4..body + (k + 1) * n * 4]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect()
        })
        .collect();
    Ok((header, values))
}

/// Does `path` start with the checkpoint magic?
pub fn is_checkpoint(path: &Path) -> bool {
    let mut magic = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == MAGIC
}

/// Is `path` a checkpoint, possibly with damaged magic or version: its JSON
/// header starts where a checkpoint's does. (A llama2.c file has floats there.)
pub fn looks_like_checkpoint(path: &Path) -> bool {
    let mut head = [0u8; 16 + HEADER_START.len()];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && (&head[..8] == MAGIC || &head[16..] == HEADER_START)
}

/// Load a checkpoint, validating everything against the file size.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let bytes = crate::memory::read_file(path, u64::MAX)?;
    decode(&bytes, path)
}

/// Parse the bytes of a checkpoint; `path` only names the file in errors.
pub fn decode(bytes: &[u8], path: &Path) -> Result<Checkpoint> {
    let bad = |field: &str, msg: String| Error::format(path, field, msg);
    if bytes.len() < 16 {
        return Err(bad(
            "magic",
            format!("file is {} bytes, too short for a checkpoint", bytes.len()),
        ));
    }
    if &bytes[..8] != MAGIC {
        return Err(bad(
            "magic",
            format!(
                "expected \"ANEMCKPT\", found {:?}; the file is damaged, or not an anemone \
                 checkpoint (a llama2.c model.bin is read by --init and --model too)",
                String::from_utf8_lossy(&bytes[..8])
            ),
        ));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if !(OLDEST_VERSION..=VERSION).contains(&version) {
        return Err(bad(
            "version",
            format!(
                "version {version} is not supported (this anemone reads versions \
                 {OLDEST_VERSION} to {VERSION})"
            ),
        ));
    }
    let header_len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    let header_end = 16usize
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| {
            bad(
                "header",
                format!(
                    "header length {header_len} runs past the end of the {}-byte file (truncated?)",
                    bytes.len()
                ),
            )
        })?;
    let header: Header = serde_json::from_slice(&bytes[16..header_end])
        .map_err(|e| bad("header", format!("malformed JSON header: {e}")))?;
    header
        .config
        .validate()
        .map_err(|e| bad("header.config", e.to_string()))?;
    let layout = Layout::new(&header.config);
    if header.n_params != layout.len() as u64 {
        return Err(bad(
            "header.n_params",
            format!(
                "{} does not match the config's {} parameters",
                header.n_params,
                layout.len()
            ),
        ));
    }
    let n = layout.len();
    let body = header_end.next_multiple_of(64);
    let arrays = if header.optimizer { 3 } else { 1 };
    let trailer = if version >= 2 { 4 } else { 0 };
    let expected = (n as u64)
        .checked_mul(4 * arrays)
        .and_then(|b| b.checked_add((body + trailer) as u64));
    if expected != Some(bytes.len() as u64) {
        return Err(bad(
            "size",
            format!(
                "expected {} bytes for {n} parameters{}, found {} (truncated or corrupt)",
                expected.map_or("more than 2^64".to_string(), |e| e.to_string()),
                if header.optimizer {
                    " with optimizer state"
                } else {
                    ""
                },
                bytes.len()
            ),
        ));
    }
    if trailer > 0 {
        check_crc(bytes, path)?;
    }
    let read = |k: usize| -> Vec<f32> {
        bytes[body + k * n * 4..body + (k + 1) * n * 4]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()
    };
    let weights = Weights {
        layout,
        data: read(0),
    };
    weights.check_finite(path)?;
    let moments = header.optimizer.then(|| (read(1), read(2), header.adam_t));
    Ok(Checkpoint {
        weights,
        moments,
        state: header.state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("anemone-ckpt-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("c.bin")
    }

    #[test]
    fn round_trip_is_bit_exact() {
        let config = ModelConfig::preset("stories260k").unwrap();
        let w = Weights::init(&config, 3);
        let m: Vec<f32> = w.data.iter().map(|x| x * 0.5).collect();
        let v: Vec<f32> = w.data.iter().map(|x| x * x).collect();
        let state = serde_json::json!({"step": 17, "rng": 12345678901234u64});
        let path = tmp("rt");
        save(&path, &w, Some((&m, &v, 17)), &state).unwrap();
        assert!(is_checkpoint(&path));
        let c = load(&path).unwrap();
        assert_eq!(c.weights, w);
        assert_eq!(c.moments, Some((m, v, 17)));
        assert_eq!(c.state, state);
        // without optimizer
        save(&path, &w, None, &state).unwrap();
        assert!(load(&path).unwrap().moments.is_none());
    }

    #[test]
    fn bad_files_name_the_field() {
        let config = ModelConfig::preset("stories260k").unwrap();
        let w = Weights::init(&config, 3);
        let path = tmp("bad");
        save(&path, &w, None, &serde_json::json!({})).unwrap();
        let good = std::fs::read(&path).unwrap();
        let check = |bytes: &[u8], field: &str| {
            std::fs::write(&path, bytes).unwrap();
            let msg = load(&path).unwrap_err().to_string();
            assert!(msg.contains(field) && msg.contains("c.bin"), "{msg}");
        };
        check(&good[..good.len() - 4], "size");
        let mut b = good.clone();
        b[0] = b'X';
        check(&b, "magic");
        let mut b = good.clone();
        b[8] = 9;
        check(&b, "version");
        let mut b = good.clone();
        let last = b.len() - 5;
        b[last] ^= 0x10;
        check(&b, "checksum");
        let mut b = good.clone();
        b[16] = b'!';
        check(&b, "header");
        check(&good[..10], "magic");
        std::fs::write(&path, &good[..10]).unwrap();
        assert!(!looks_like_checkpoint(&path));
        let mut b = good.clone();
        b[..8].copy_from_slice(b"ANEMCKPX");
        std::fs::write(&path, &b).unwrap();
        assert!(looks_like_checkpoint(&path));
        let mut b = good.clone();
        b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        check(&b, "header");
    }

    /// A version 1 file: the version 2 layout without the trailing checksum.
    #[test]
    fn version_1_files_are_still_read() {
        let config = ModelConfig::preset("stories260k").unwrap();
        let w = Weights::init(&config, 4);
        let path = tmp("v1");
        save(&path, &w, None, &serde_json::json!({"step": 3})).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 4);
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let c = load(&path).unwrap();
        assert_eq!(c.weights, w);
        assert_eq!(c.state["step"], 3);
    }

    #[test]
    fn non_finite_weights_are_refused_naming_the_tensor() {
        let config = ModelConfig::preset("stories260k").unwrap();
        let mut w = Weights::init(&config, 4);
        let start = w.layout.range(crate::model::Param::Wk(2)).start;
        w.data[start + 5] = f32::NAN;
        let path = tmp("nan");
        save(&path, &w, None, &serde_json::json!({})).unwrap();
        let msg = load(&path).unwrap_err().to_string();
        assert!(msg.contains("layers.2.wk") && msg.contains("NaN"), "{msg}");
    }

    /// A 512-byte file whose header claims 2^62 parameters is refused by the
    /// checked size, not loaded (the wrapped size once matched the file).
    #[test]
    fn a_header_only_file_with_a_huge_config_is_refused() {
        let mut config = ModelConfig::preset("stories260k").unwrap();
        config.n_layers = 1 << 60;
        let header = serde_json::json!({"config": config, "n_params": 1u64 << 62,
            "optimizer": false, "adam_t": 0, "state": {}});
        let json = serde_json::to_vec(&header).unwrap();
        let mut bytes = MAGIC.to_vec();
        bytes.extend(2u32.to_le_bytes());
        bytes.extend((json.len() as u32).to_le_bytes());
        bytes.extend(&json);
        bytes.resize(512, 0);
        let msg = decode(&bytes, Path::new("huge.bin"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("header.config") && msg.contains("n_layers"),
            "{msg}"
        );
    }
}
