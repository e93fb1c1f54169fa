//! llama2.c checkpoint files: read the legacy "version 0" file that llama2.c's
//! `run.c` loads and the 256-byte-header "version 1" file of its `export.py`,
//! and write both, mapping between llama2.c's per-kind arrays (`wq` of every
//! layer, then `wk` of every layer, ...) and our per-layer flat [`Weights`].
//!
//! Formats (all little-endian, f32 tensors `[out, in]` row-major):
//! - version 0: header `7 x i32 dim, hidden_dim, n_layers, n_heads, n_kv_heads,
//!   vocab_size, seq_len` (negative `vocab_size` = unshared classifier), then
//!   `embedding (V, C)`, `rms_att (L, C)`, `wq (L, C, C)`, `wk (L, kvC, C)`,
//!   `wv (L, kvC, C)`, `wo (L, C, C)`, `rms_ffn (L, C)`, `w1 (L, F, C)`,
//!   `w2 (L, C, F)`, `w3 (L, F, C)`, `rms_final (C)`, `freq_cis_real` and
//!   `freq_cis_imag` (each `(seq_len, head_dim / 2)`, unused by readers), then
//!   `wcls (V, C)` only when unshared.
//! - version 1: header `u32 magic 0x616b3432, i32 version 1, 7 x i32 config,
//!   u8 shared_classifier`, zero-padded to 256 bytes, then `rms_att (L, C)`,
//!   `rms_ffn (L, C)`, `rms_final (C)`, `embedding`, `wq`, `wk`, `wv`, `wo`,
//!   `w1`, `w2`, `w3` (each over all layers), then `wcls` only when unshared.
//!
//! llama2.c has no separate head_dim (it is `dim / n_heads`), no biases,
//! QK-norm or RoPE scaling, and its `run.c` hard-codes RMSNorm eps 1e-5 and
//! RoPE theta 10000: configs that differ are refused on export rather than
//! silently changed. Version 2 (Q8_0) is not
//! supported. This module does not run models (see [`crate::generate`]);
//! for them [`map`] leaves a file's tensors in a read-only memory map, where
//! the decoder reads them in place, instead of copying them into [`Weights`].

use std::collections::HashMap;
use std::path::Path;

use super::config::ModelConfig;
use super::weights::{Layout, Param, Weights, WeightsView};
use crate::atomic::write_atomic;
use crate::mmap::MappedFile;
use crate::{Error, Result};

/// `"ak42"` as a little-endian u32: the first 4 bytes of a versioned file.
pub const MAGIC: u32 = 0x616b_3432;
/// Size of the version 1 header, padding included.
pub const V1_HEADER_BYTES: usize = 256;
/// Size of the version 0 header.
pub const V0_HEADER_BYTES: usize = 28;
/// The RMSNorm eps and RoPE theta that llama2.c's `run.c` assumes.
const LLAMA2C_EPS: f32 = 1e-5;
const LLAMA2C_THETA: f32 = 10000.0;

/// One contiguous run of f32s in a llama2.c file.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Section {
    Tensor(Param),
    /// RoPE table `cos(pos * freq_i)`, `(seq_len, head_dim / 2)`; version 0 only.
    FreqCisReal,
    /// RoPE table `sin(pos * freq_i)`; version 0 only.
    FreqCisImag,
}

/// The sections of a file of `version` (0 or 1) for `config`, in file order.
fn sections(config: &ModelConfig, version: i32) -> Vec<Section> {
    let all_layers =
        |kind: fn(usize) -> Param| (0..config.n_layers).map(move |l| Section::Tensor(kind(l)));
    let mut out = Vec::new();
    if version == 0 {
        out.push(Section::Tensor(Param::Embedding));
        out.extend(all_layers(Param::RmsAtt));
        out.extend(all_layers(Param::Wq));
        out.extend(all_layers(Param::Wk));
        out.extend(all_layers(Param::Wv));
        out.extend(all_layers(Param::Wo));
        out.extend(all_layers(Param::RmsFfn));
        out.extend(all_layers(Param::W1));
        out.extend(all_layers(Param::W2));
        out.extend(all_layers(Param::W3));
        out.push(Section::Tensor(Param::RmsFinal));
        out.extend([Section::FreqCisReal, Section::FreqCisImag]);
    } else {
        out.extend(all_layers(Param::RmsAtt));
        out.extend(all_layers(Param::RmsFfn));
        out.push(Section::Tensor(Param::RmsFinal));
        out.push(Section::Tensor(Param::Embedding));
        out.extend(all_layers(Param::Wq));
        out.extend(all_layers(Param::Wk));
        out.extend(all_layers(Param::Wv));
        out.extend(all_layers(Param::Wo));
        out.extend(all_layers(Param::W1));
        out.extend(all_layers(Param::W2));
        out.extend(all_layers(Param::W3));
    }
    if !config.tied_embeddings {
        out.push(Section::Tensor(Param::Classifier));
    }
    out
}

/// Number of f32s in the body of a file of `version` for `config`; `None` on overflow.
fn body_floats(config: &ModelConfig, version: i32) -> Option<u64> {
    let (d, f, v, l) = (
        config.dim as u64,
        config.hidden_dim as u64,
        config.vocab_size as u64,
        config.n_layers as u64,
    );
    let kv = (config.n_kv_heads as u64).checked_mul(config.head_dim as u64)?;
    let per_layer = d
        .checked_mul(2 + 2 * d)? // rms_att, rms_ffn, wq, wo
        .checked_add(kv.checked_mul(2 * d)?)? // wk, wv
        .checked_add(f.checked_mul(3 * d)?)?; // w1, w2, w3
    let embeddings = v
        .checked_mul(d)?
        .checked_mul(if config.tied_embeddings { 1 } else { 2 })?;
    let freq_cis = if version == 0 {
        (config.seq_len as u64).checked_mul(config.head_dim as u64)?
    } else {
        0
    };
    per_layer
        .checked_mul(l)?
        .checked_add(embeddings)?
        .checked_add(d)?
        .checked_add(freq_cis)
}

/// Read a llama2.c checkpoint (version 0 or 1, detected by the magic). A
/// regular file is memory-mapped and decoded straight from the map (no copy
/// of the whole file first); anything else (a pipe) is read, within bounds.
pub fn read(path: &Path) -> Result<Weights> {
    if is_regular_file(path) {
        let file = MappedFile::open(path)?;
        return decode(file.bytes(), path);
    }
    let bytes = crate::memory::read_file(path, u64::MAX)?;
    decode(&bytes, path)
}

/// Whether `path` is a regular file (not a directory, pipe or device).
fn is_regular_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
}

/// A llama2.c checkpoint mapped read-only, its tensors borrowed in place
/// ([`Mapped::view`]): what `generate` decodes with, so that it starts
/// without reading or copying the whole file (the first token touches every
/// page anyway, through the page cache).
#[derive(Debug)]
pub struct Mapped {
    file: MappedFile,
    layout: Layout,
    /// Each tensor's first byte in the file.
    offsets: Vec<(Param, usize)>,
}

impl Mapped {
    pub fn config(&self) -> &ModelConfig {
        self.layout.config()
    }

    /// Every tensor, borrowed from the map.
    pub fn view(&self) -> WeightsView<'_> {
        let bytes = self.file.bytes();
        let tensors: HashMap<Param, &[f32]> = self
            .offsets
            .iter()
            .map(|&(p, offset)| {
                let n = self.layout.range(p).len();
                (p, floats_at(bytes, offset, n).expect("checked by `map`"))
            })
            .collect();
        WeightsView::new(self.layout.clone(), tensors)
    }
}

/// `n` little-endian f32s at `offset` of `bytes`, in place: `None` where the
/// host is big-endian or the bytes are not aligned for f32.
fn floats_at(bytes: &[u8], offset: usize, n: usize) -> Option<&[f32]> {
    if cfg!(target_endian = "big") {
        return None;
    }
    bytemuck::try_cast_slice(bytes.get(offset..offset + 4 * n)?).ok()
}

/// Map a llama2.c checkpoint for decoding: the same checks and errors as
/// [`read`] (header, size, every weight finite), no copy of the weights.
/// `Ok(None)` where the tensors cannot be used in place (not a regular file,
/// a big-endian host, an unaligned map): [`read`] it instead.
pub fn map(path: &Path) -> Result<Option<Mapped>> {
    if !is_regular_file(path) {
        return Ok(None);
    }
    let file = MappedFile::open(path)?;
    let header = parse_header(file.bytes(), path)?;
    let layout = Layout::new(&header.config);
    let mut offsets = Vec::new();
    let mut offset = header.bytes;
    for section in sections(&header.config, header.version) {
        let n = section_floats(&layout, section);
        if let Section::Tensor(p) = section {
            if floats_at(file.bytes(), offset, n).is_none() {
                return Ok(None);
            }
            offsets.push((p, offset));
        }
        offset += 4 * n;
    }
    let mapped = Mapped {
        file,
        layout,
        offsets,
    };
    mapped.view().check_finite(path)?;
    Ok(Some(mapped))
}

/// Number of f32s of `section` in a file of `layout`'s model.
fn section_floats(layout: &Layout, section: Section) -> usize {
    match section {
        Section::Tensor(p) => layout.range(p).len(),
        Section::FreqCisReal | Section::FreqCisImag => {
            let config = layout.config();
            config.seq_len * (config.head_dim / 2)
        }
    }
}

/// What a llama2.c file's header says, checked against the file's size.
struct Header {
    config: ModelConfig,
    version: i32,
    /// Bytes before the first tensor.
    bytes: usize,
}

/// Parse the bytes of a llama2.c checkpoint; `path` only names the file in errors.
pub fn decode(bytes: &[u8], path: &Path) -> Result<Weights> {
    let header = parse_header(bytes, path)?;
    let mut weights = Weights::zeros(&header.config);
    let mut offset = header.bytes;
    for section in sections(&header.config, header.version) {
        let n = section_floats(&weights.layout, section);
        let chunk = &bytes[offset..offset + 4 * n];
        offset += 4 * n;
        if let Section::Tensor(p) = section {
            for (dst, src) in weights.get_mut(p).iter_mut().zip(chunk.chunks_exact(4)) {
                *dst = f32::from_le_bytes(src.try_into().expect("4 bytes"));
            }
        }
    }
    debug_assert_eq!(offset, bytes.len());
    weights.check_finite(path)?;
    Ok(weights)
}

/// The header of a llama2.c checkpoint (version 0 or 1), its config
/// validated and the file's size checked against it.
fn parse_header(bytes: &[u8], path: &Path) -> Result<Header> {
    let int_at = |offset: usize, field: &str| -> Result<i32> {
        let word = bytes.get(offset..offset + 4).ok_or_else(|| {
            Error::format(
                path,
                field,
                format!(
                    "file ends after {} bytes, inside the header; not a llama2.c checkpoint",
                    bytes.len()
                ),
            )
        })?;
        Ok(i32::from_le_bytes(word.try_into().expect("4 bytes")))
    };
    let (version, config_offset, header_bytes) = if int_at(0, "header")? as u32 == MAGIC {
        match int_at(4, "version")? {
            1 => (1, 8, V1_HEADER_BYTES),
            2 => {
                return Err(Error::format(
                    path,
                    "version",
                    "version 2 (Q8_0 int8) is not supported; export float32 with llama2.c's \
                     `export.py --version 0` or `--version 1`",
                ));
            }
            other => {
                return Err(Error::format(
                    path,
                    "version",
                    format!("unknown llama2.c version {other} (supported: 0 and 1)"),
                ));
            }
        }
    } else {
        (0, 0, V0_HEADER_BYTES)
    };
    let names = [
        "dim",
        "hidden_dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "vocab_size",
        "seq_len",
    ];
    let mut fields = [0i32; 7];
    for (i, name) in names.iter().enumerate() {
        fields[i] = int_at(config_offset + 4 * i, &format!("header.{name}"))?;
    }
    let [
        dim,
        hidden_dim,
        n_layers,
        n_heads,
        n_kv_heads,
        vocab,
        seq_len,
    ] = fields;
    let shared = if version == 0 {
        vocab > 0
    } else {
        let flag = *bytes.get(36).ok_or_else(|| {
            Error::format(
                path,
                "header.shared_classifier",
                "file ends inside the 256-byte header",
            )
        })?;
        if flag > 1 {
            return Err(Error::format(
                path,
                "header.shared_classifier",
                format!("must be 0 or 1, found {flag}"),
            ));
        }
        if vocab < 0 {
            return Err(Error::format(
                path,
                "header.vocab_size",
                format!("must be positive in a version 1 file, found {vocab}"),
            ));
        }
        flag == 1
    };
    let vocab = vocab.unsigned_abs() as i32;
    for (name, value) in names.iter().zip([
        dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab, seq_len,
    ]) {
        if value <= 0 {
            return Err(Error::format(
                path,
                format!("header.{name}"),
                format!(
                    "must be positive, found {value}; the file is corrupt or not a llama2.c checkpoint"
                ),
            ));
        }
    }
    if dim % n_heads != 0 {
        return Err(Error::format(
            path,
            "header.n_heads",
            format!("dim ({dim}) is not a multiple of n_heads ({n_heads})"),
        ));
    }
    let config = ModelConfig {
        tied_embeddings: shared,
        ..ModelConfig::llama(
            dim as usize,
            n_layers as usize,
            n_heads as usize,
            n_kv_heads as usize,
            hidden_dim as usize,
            vocab as usize,
            seq_len as usize,
        )
    };
    let describe = || {
        format!(
            "dim={dim} hidden_dim={hidden_dim} n_layers={n_layers} n_heads={n_heads} \
             n_kv_heads={n_kv_heads} vocab_size={vocab} seq_len={seq_len} shared_classifier={shared}"
        )
    };
    let expected = body_floats(&config, version)
        .and_then(|n| n.checked_mul(4)?.checked_add(header_bytes as u64))
        .filter(|&n| n <= isize::MAX as u64)
        .ok_or_else(|| {
            Error::format(
                path,
                "header",
                format!("implausibly large config {}", describe()),
            )
        })?;
    config
        .validate()
        .map_err(|e| Error::format(path, "header", e.to_string()))?;
    if bytes.len() as u64 != expected {
        let what = if (bytes.len() as u64) < expected {
            "truncated"
        } else {
            "too long"
        };
        return Err(Error::format(
            path,
            "size",
            format!(
                "{what}: expected {expected} bytes for config {} (version {version}), got {}",
                describe(),
                bytes.len()
            ),
        ));
    }
    Ok(Header {
        config,
        version,
        bytes: header_bytes,
    })
}

/// Write the legacy version 0 file that llama2.c's `run.c` reads.
pub fn write_v0(weights: &Weights, path: &Path) -> Result<()> {
    write_atomic(path, &encode(weights, 0, path)?)
}

/// Write a version 1 file (256-byte header, norms first).
pub fn write_v1(weights: &Weights, path: &Path) -> Result<()> {
    write_atomic(path, &encode(weights, 1, path)?)
}

/// The bytes of a version 0 or 1 file; `path` only names the file in errors.
pub fn encode(weights: &Weights, version: i32, path: &Path) -> Result<Vec<u8>> {
    let config = weights.config();
    check_exportable(config, path)?;
    assert!(version == 0 || version == 1, "llama2.c version {version}");
    let header_fields = |vocab: usize| {
        [
            config.dim,
            config.hidden_dim,
            config.n_layers,
            config.n_heads,
            config.n_kv_heads,
            vocab,
            config.seq_len,
        ]
        .map(|x| x as i32)
    };
    let body = body_floats(config, version).expect("a validated config's size fits") as usize;
    let bytes = crate::memory::size(&[body, 4]).saturating_add(V1_HEADER_BYTES as u64);
    let hint = if version == 0 {
        "version 0 stores RoPE tables of seq_len rows; --version 1 has none"
    } else {
        ""
    };
    crate::memory::check(
        &format!("the llama2.c version {version} file {}", path.display()),
        bytes,
        hint,
    )?;
    let mut out = Vec::with_capacity(bytes as usize);
    if version == 0 {
        let mut fields = header_fields(config.vocab_size);
        if !config.tied_embeddings {
            fields[5] = -fields[5];
        }
        fields.iter().for_each(|x| out.extend(x.to_le_bytes()));
    } else {
        out.extend(MAGIC.to_le_bytes());
        out.extend(1i32.to_le_bytes());
        header_fields(config.vocab_size)
            .iter()
            .for_each(|x| out.extend(x.to_le_bytes()));
        out.push(config.tied_embeddings as u8);
        out.resize(V1_HEADER_BYTES, 0);
    }
    let (cos, sin) = freq_cis(config);
    for section in sections(config, version) {
        let floats: &[f32] = match section {
            Section::Tensor(p) => weights.get(p),
            Section::FreqCisReal => &cos,
            Section::FreqCisImag => &sin,
        };
        floats.iter().for_each(|x| out.extend(x.to_le_bytes()));
    }
    Ok(out)
}

/// Refuse configs a llama2.c file cannot describe, naming the field.
fn check_exportable(config: &ModelConfig, path: &Path) -> Result<()> {
    if config.qkv_bias || config.qk_norm || !config.rope_scaling.is_none() {
        return Err(Error::format(
            path,
            "config",
            "llama2.c has no q/k/v biases, QK-norm or RoPE scaling; a model with them cannot \
             be exported to its format (write Hugging Face safetensors instead)",
        ));
    }
    if config.n_heads * config.head_dim != config.dim {
        return Err(Error::format(
            path,
            "head_dim",
            format!(
                "llama2.c has no separate head_dim (it is dim / n_heads): n_heads ({}) x head_dim ({}) \
                 = {} != dim ({}); only models with head_dim = dim / n_heads can be exported",
                config.n_heads,
                config.head_dim,
                config.q_dim(),
                config.dim
            ),
        ));
    }
    if config.rope_theta != LLAMA2C_THETA || config.norm_eps != LLAMA2C_EPS {
        return Err(Error::format(
            path,
            "rope_theta",
            format!(
                "llama2.c's run.c assumes rope_theta 10000 and norm_eps 1e-5, this model has \
                 rope_theta {} and norm_eps {}; it would run incorrectly there",
                config.rope_theta, config.norm_eps
            ),
        ));
    }
    let ints = [
        ("dim", config.dim),
        ("hidden_dim", config.hidden_dim),
        ("vocab_size", config.vocab_size),
        ("seq_len", config.seq_len),
    ];
    for (name, value) in ints {
        if value > i32::MAX as usize {
            return Err(Error::format(
                path,
                name,
                format!("{value} does not fit the header's int32"),
            ));
        }
    }
    Ok(())
}

/// llama2.c's legacy RoPE tables: `real[pos, i] = cos(pos * freq_i)`,
/// `imag[pos, i] = sin(pos * freq_i)`, `freq_i = theta^(-2i / head_dim)` for
/// `i < head_dim / 2`; each `(seq_len, head_dim / 2)`.
fn freq_cis(config: &ModelConfig) -> (Vec<f32>, Vec<f32>) {
    let half = config.head_dim / 2;
    let theta = config.rope_theta as f64;
    let mut cos = Vec::with_capacity(config.seq_len * half);
    let mut sin = Vec::with_capacity(config.seq_len * half);
    for pos in 0..config.seq_len {
        for i in 0..half {
            let freq = theta.powf(-((2 * i) as f64) / config.head_dim as f64);
            let angle = pos as f64 * freq;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_cover_every_parameter_once() {
        for tied in [true, false] {
            let config = ModelConfig {
                tied_embeddings: tied,
                ..ModelConfig::preset("stories260k").unwrap()
            };
            let layout = crate::model::Layout::new(&config);
            for version in [0, 1] {
                let mut params: Vec<Param> = sections(&config, version)
                    .into_iter()
                    .filter_map(|s| match s {
                        Section::Tensor(p) => Some(p),
                        _ => None,
                    })
                    .collect();
                let mut expected = layout.params();
                let key = |p: &Param| layout.range(*p).start;
                params.sort_by_key(key);
                expected.sort_by_key(key);
                assert_eq!(params, expected);
            }
        }
    }
}
