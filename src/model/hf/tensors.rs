//! Safetensors files of a Hugging Face model directory: reading tensors by
//! their HF name as `f32`, the tensor list an [`HfConfig`] implies, and
//! writing one `model.safetensors`.
//!
//! Reading maps each file ([`crate::mmap`]) and parses its header with the
//! `safetensors` crate, which checks that the offsets tile the data exactly;
//! a tensor is then converted straight from the mapped bytes (fp32, fp16, or
//! bf16, whose conversion to fp32 is exact). A directory holds either one
//! `model.safetensors` or shards listed by `model.safetensors.index.json`
//! (`weight_map`: tensor name -> shard file), as `save_pretrained` writes
//! them. Every problem (a missing shard or tensor, a shape other than the
//! config implies, a dtype other than the three) is a one-line error naming
//! the file and the tensor.
//!
//! Writing streams the converted tensors into a temp file renamed over the
//! target ([`crate::atomic`]); the header and layout are byte for byte what
//! the `safetensors` crate (and so Python's `save_file`) writes, with the
//! `{"format": "pt"}` metadata transformers adds.
//!
//! Not here: the RoPE row permutation between HF and anemone layouts
//! (`super::rope`), and placing tensors into [`crate::model::Weights`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};

use super::config::{FloatDtype, HfConfig};
use crate::mmap::MappedFile;
use crate::{Error, Result};

/// The single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The safetensors dtype of a float format and back.
fn float_dtype_of(dtype: Dtype) -> Option<FloatDtype> {
    match dtype {
        Dtype::F32 => Some(FloatDtype::F32),
        Dtype::F16 => Some(FloatDtype::F16),
        Dtype::BF16 => Some(FloatDtype::BF16),
        _ => None,
    }
}

fn safetensors_dtype(dtype: FloatDtype) -> Dtype {
    match dtype {
        FloatDtype::F32 => Dtype::F32,
        FloatDtype::F16 => Dtype::F16,
        FloatDtype::BF16 => Dtype::BF16,
    }
}

/// A tensor a model needs: HF name and shape (row-major, `[out, in]` for matrices).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

/// Every tensor of the model `config` describes, in model order: embedding,
/// each layer's norms, attention (with Qwen2's biases, Qwen3's q/k norms)
/// and SwiGLU, final norm, and `lm_head.weight` when untied.
pub fn expected_tensors(config: &HfConfig) -> Vec<TensorSpec> {
    let (c, f, v, d) = (
        config.dim,
        config.hidden_dim,
        config.vocab_size,
        config.head_dim,
    );
    let (q, kv) = (config.q_dim(), config.kv_dim());
    let spec = |name: String, shape: &[usize]| TensorSpec {
        name,
        shape: shape.to_vec(),
    };
    let mut specs = vec![spec("model.embed_tokens.weight".into(), &[v, c])];
    for layer_idx in 0..config.n_layers {
        let p = format!("model.layers.{layer_idx}");
        specs.push(spec(format!("{p}.input_layernorm.weight"), &[c]));
        specs.push(spec(format!("{p}.self_attn.q_proj.weight"), &[q, c]));
        specs.push(spec(format!("{p}.self_attn.k_proj.weight"), &[kv, c]));
        specs.push(spec(format!("{p}.self_attn.v_proj.weight"), &[kv, c]));
        if config.qkv_bias {
            specs.push(spec(format!("{p}.self_attn.q_proj.bias"), &[q]));
            specs.push(spec(format!("{p}.self_attn.k_proj.bias"), &[kv]));
            specs.push(spec(format!("{p}.self_attn.v_proj.bias"), &[kv]));
        }
        if config.qk_norm {
            specs.push(spec(format!("{p}.self_attn.q_norm.weight"), &[d]));
            specs.push(spec(format!("{p}.self_attn.k_norm.weight"), &[d]));
        }
        specs.push(spec(format!("{p}.self_attn.o_proj.weight"), &[c, q]));
        specs.push(spec(format!("{p}.post_attention_layernorm.weight"), &[c]));
        specs.push(spec(format!("{p}.mlp.gate_proj.weight"), &[f, c]));
        specs.push(spec(format!("{p}.mlp.up_proj.weight"), &[f, c]));
        specs.push(spec(format!("{p}.mlp.down_proj.weight"), &[c, f]));
    }
    specs.push(spec("model.norm.weight".into(), &[c]));
    if !config.tied_embeddings {
        specs.push(spec("lm_head.weight".into(), &[v, c]));
    }
    specs
}

/// Tensors a checkpoint may hold beyond [`expected_tensors`] without changing
/// the model: `lm_head.weight` of a tied model (transformers ties it to the
/// embedding and ignores the stored copy, and so do we) and the RoPE
/// `inv_freq` buffers old Llama checkpoints saved.
pub fn is_ignored_tensor(config: &HfConfig, name: &str) -> bool {
    (config.tied_embeddings && name == "lm_head.weight")
        || name.ends_with(".self_attn.rotary_emb.inv_freq")
}

/// One mapped safetensors file and its parsed header.
struct Shard {
    file: MappedFile,
    /// Offset of the data section (8 + header length).
    data_start: usize,
    metadata: Metadata,
}

/// The safetensors file(s) of a checkpoint, mapped, with every tensor by name.
pub struct SafetensorsReader {
    /// `model.safetensors` or the index: where a missing tensor is reported.
    source: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name -> index into `shards`.
    tensors: BTreeMap<String, usize>,
}

impl std::fmt::Debug for SafetensorsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsReader")
            .field("source", &self.source)
            .field("shards", &self.shards.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl SafetensorsReader {
    /// `dir/model.safetensors`, else the shards of `dir/model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<SafetensorsReader> {
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        if single.exists() {
            SafetensorsReader::open_file(&single)
        } else if index.exists() {
            SafetensorsReader::open_index(&index)
        } else {
            Err(Error::format(
                dir,
                SINGLE_FILE,
                format!(
                    "neither {SINGLE_FILE} nor {INDEX_FILE} is in this directory; anemone reads \
                     safetensors checkpoints (re-save a pytorch_model.bin with transformers' \
                     save_pretrained)"
                ),
            ))
        }
    }

    /// One safetensors file.
    pub fn open_file(path: &Path) -> Result<SafetensorsReader> {
        let shard = open_shard(path)?;
        let tensors = shard
            .metadata
            .offset_keys()
            .into_iter()
            .map(|name| (name, 0))
            .collect();
        Ok(SafetensorsReader {
            source: path.to_path_buf(),
            shards: vec![shard],
            tensors,
        })
    }

    /// The shards listed by a `model.safetensors.index.json`; every tensor of
    /// its `weight_map` must be in the shard it names.
    pub fn open_index(index_path: &Path) -> Result<SafetensorsReader> {
        let text = crate::memory::read_text(index_path)?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            Error::format(
                index_path,
                format!("line {} column {}", e.line(), e.column()),
                e.to_string(),
            )
        })?;
        let weight_map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                Error::format(
                    index_path,
                    "weight_map",
                    "missing, or not an object of tensor name -> shard file",
                )
            })?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut shard_of_file: BTreeMap<&str, usize> = BTreeMap::new();
        let mut shards = Vec::new();
        let mut tensors = BTreeMap::new();
        for (name, file) in weight_map {
            let field = format!("weight_map[\"{name}\"]");
            let file = file.as_str().ok_or_else(|| {
                Error::format(
                    index_path,
                    &field,
                    format!("expected a file name, found {file}"),
                )
            })?;
            if file.is_empty()
                || file.contains(['/', '\\'])
                || file == ".."
                || !file.ends_with(".safetensors")
            {
                return Err(Error::format(
                    index_path,
                    &field,
                    format!("\"{file}\" is not a .safetensors file name in this directory"),
                ));
            }
            let shard_idx = match shard_of_file.get(file) {
                Some(&idx) => idx,
                None => {
                    let path = dir.join(file);
                    if !path.exists() {
                        return Err(Error::format(
                            index_path,
                            &field,
                            format!("shard file {} is missing", path.display()),
                        ));
                    }
                    shards.push(open_shard(&path)?);
                    shard_of_file.insert(file, shards.len() - 1);
                    shards.len() - 1
                }
            };
            let shard = &shards[shard_idx];
            if shard.metadata.info(name).is_none() {
                return Err(Error::format(
                    shard.file.path(),
                    name,
                    format!("missing from this shard, which {INDEX_FILE} names for it"),
                ));
            }
            tensors.insert(name.clone(), shard_idx);
        }
        Ok(SafetensorsReader {
            source: index_path.to_path_buf(),
            shards,
            tensors,
        })
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The shape stored for `name`.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.info(name).map(|(_, info)| info.shape.as_slice())
    }

    /// The stored dtype's safetensors name (`"BF16"`, `"I8"`, ...).
    pub fn dtype_name(&self, name: &str) -> Option<String> {
        self.info(name).map(|(_, info)| format!("{:?}", info.dtype))
    }

    /// The stored dtype, when it is one anemone reads.
    pub fn float_dtype(&self, name: &str) -> Option<FloatDtype> {
        self.info(name)
            .and_then(|(_, info)| float_dtype_of(info.dtype))
    }

    /// The file holding `name`.
    pub fn path_of(&self, name: &str) -> Option<&Path> {
        self.info(name).map(|(shard, _)| shard.file.path())
    }

    fn info(&self, name: &str) -> Option<(&Shard, &TensorInfo)> {
        let shard = &self.shards[*self.tensors.get(name)?];
        Some((shard, shard.metadata.info(name)?))
    }

    /// Check `name` is present with `expected_shape` and a readable dtype, and
    /// return its bytes and dtype.
    fn checked(&self, name: &str, expected_shape: &[usize]) -> Result<(&[u8], FloatDtype)> {
        let (shard, info) = self.info(name).ok_or_else(|| {
            Error::format(
                &self.source,
                name,
                format!("missing (expected shape {expected_shape:?})"),
            )
        })?;
        let path = shard.file.path();
        if info.shape != expected_shape {
            return Err(Error::format(
                path,
                name,
                format!(
                    "shape {:?} where the config implies {expected_shape:?}",
                    info.shape
                ),
            ));
        }
        let dtype = float_dtype_of(info.dtype).ok_or_else(|| {
            Error::format(
                path,
                name,
                format!(
                    "dtype {:?} is not supported (anemone reads F32, F16 and BF16)",
                    info.dtype
                ),
            )
        })?;
        let (start, end) = info.data_offsets;
        let bytes = shard
            .file
            .bytes()
            .get(shard.data_start + start..shard.data_start + end)
            .ok_or_else(|| Error::format(path, name, "data offsets past the end of the file"))?;
        Ok((bytes, dtype))
    }

    /// Tensor `name` as `f32`, which must have `expected_shape` (the values
    /// as stored; model loading checks them with [`Self::check_finite`]).
    pub fn read_f32(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<f32>> {
        let (bytes, dtype) = self.checked(name, expected_shape)?;
        let mut out = vec![0.0; bytes.len() / dtype.size()];
        decode_f32(dtype, bytes, &mut out);
        Ok(out)
    }

    /// An error naming the file, the tensor and the element when a value of
    /// tensor `name` is NaN or infinite: what loading a model's weights calls,
    /// as checkpoints and llama2.c files are checked.
    pub fn check_finite(&self, name: &str, values: &[f32]) -> Result<()> {
        match values.iter().position(|x| !x.is_finite()) {
            None => Ok(()),
            Some(i) => Err(Error::format(
                self.path_of(name).unwrap_or(&self.source),
                name,
                format!("element {i} is {}: the weights are not finite", values[i]),
            )),
        }
    }

    /// Like [`read_f32`](Self::read_f32), into `out` (its length must be the
    /// tensor's element count; a mismatch is a programmer error and panics).
    pub fn read_f32_into(
        &self,
        name: &str,
        expected_shape: &[usize],
        out: &mut [f32],
    ) -> Result<()> {
        let (bytes, dtype) = self.checked(name, expected_shape)?;
        assert_eq!(
            out.len() * dtype.size(),
            bytes.len(),
            "{name}: output length"
        );
        decode_f32(dtype, bytes, out);
        Ok(())
    }

    /// A value of a file's `__metadata__` (the first file that has `key`).
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.shards.iter().find_map(|shard| {
            let map = shard.metadata.metadata().as_ref()?;
            map.get(key).map(String::as_str)
        })
    }

    /// Tensor `name`'s bytes and dtype, whatever the dtype (for reference
    /// files holding more than weights).
    fn raw(&self, name: &str) -> Result<(&[u8], Dtype)> {
        let (shard, info) = self
            .info(name)
            .ok_or_else(|| Error::format(&self.source, name, "missing"))?;
        let (start, end) = info.data_offsets;
        let bytes = shard
            .file
            .bytes()
            .get(shard.data_start + start..shard.data_start + end)
            .ok_or_else(|| {
                Error::format(
                    shard.file.path(),
                    name,
                    "data offsets past the end of the file",
                )
            })?;
        Ok((bytes, info.dtype))
    }

    /// Tensor `name` of a float dtype (F64, or one [`read_f32`](Self::read_f32)
    /// reads) as `f64`, exactly, in its stored shape.
    pub fn read_f64(&self, name: &str) -> Result<Vec<f64>> {
        let (bytes, dtype) = self.raw(name)?;
        if dtype == Dtype::F64 {
            let words = bytes.chunks_exact(8);
            return Ok(words
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect());
        }
        let shape = self.shape(name).unwrap_or_default().to_vec();
        Ok(self
            .read_f32(name, &shape)?
            .into_iter()
            .map(f64::from)
            .collect())
    }

    /// Tensor `name` of an integer dtype (I32, I64, U32 or U16) as `i64`, in
    /// its stored shape.
    pub fn read_i64(&self, name: &str) -> Result<Vec<i64>> {
        let (bytes, dtype) = self.raw(name)?;
        let values = match dtype {
            Dtype::I32 => bytes
                .chunks_exact(4)
                .map(|b| i64::from(i32::from_le_bytes(b.try_into().expect("4 bytes"))))
                .collect(),
            Dtype::U32 => bytes
                .chunks_exact(4)
                .map(|b| i64::from(u32::from_le_bytes(b.try_into().expect("4 bytes"))))
                .collect(),
            Dtype::U16 => bytes
                .chunks_exact(2)
                .map(|b| i64::from(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect(),
            other => {
                let path = self.path_of(name).unwrap_or(&self.source);
                return Err(Error::format(
                    path,
                    name,
                    format!("dtype {other:?} is not an integer type anemone reads"),
                ));
            }
        };
        Ok(values)
    }

    /// Every tensor of [`expected_tensors`] present with its shape and a
    /// readable dtype, and nothing else but [`is_ignored_tensor`] ones.
    pub fn check(&self, config: &HfConfig) -> Result<()> {
        let specs = expected_tensors(config);
        for spec in &specs {
            self.checked(&spec.name, &spec.shape)?;
        }
        let expected: std::collections::HashSet<&str> =
            specs.iter().map(|s| s.name.as_str()).collect();
        if let Some(name) = self
            .names()
            .find(|name| !expected.contains(name) && !is_ignored_tensor(config, name))
        {
            let path = self.path_of(name).unwrap_or(&self.source);
            return Err(Error::format(
                path,
                name,
                format!(
                    "not part of the {} model {} describes (a feature its config does not \
                     declare?)",
                    config.architecture.class_name(),
                    config.path.display()
                ),
            ));
        }
        Ok(())
    }
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file = MappedFile::open(path)?;
    let (header_len, metadata) = safetensors::SafeTensors::read_metadata(file.bytes())
        .map_err(|e| Error::format(path, "header", e.to_string()))?;
    Ok(Shard {
        file,
        data_start: 8 + header_len,
        metadata,
    })
}

/// Elements per parallel task when converting.
const CHUNK: usize = 1 << 16;

/// Little-endian `dtype` elements of `bytes` into `out` (bf16 and fp16 to
/// fp32 are exact).
fn decode_f32(dtype: FloatDtype, bytes: &[u8], out: &mut [f32]) {
    let size = dtype.size();
    out.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * size))
        .for_each(|(out, bytes)| match dtype {
            FloatDtype::F32 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            FloatDtype::F16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
            FloatDtype::BF16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
                }
            }
        });
}

/// `data` as little-endian `dtype` bytes appended to `out`, rounding to
/// nearest even for fp16 and bf16 (the `half` crate's conversions; NaN stays
/// NaN, overflow becomes infinity).
fn encode(dtype: FloatDtype, data: &[f32], out: &mut Vec<u8>) {
    match dtype {
        FloatDtype::F32 => data.iter().for_each(|x| out.extend(x.to_le_bytes())),
        FloatDtype::F16 => data
            .iter()
            .for_each(|&x| out.extend(half::f16::from_f32(x).to_le_bytes())),
        FloatDtype::BF16 => data
            .iter()
            .for_each(|&x| out.extend(half::bf16::from_f32(x).to_le_bytes())),
    }
}

/// A tensor to write: HF name, shape, `f32` values (row-major).
#[derive(Clone, Copy, Debug)]
pub struct TensorToWrite<'a> {
    pub name: &'a str,
    pub shape: &'a [usize],
    pub data: &'a [f32],
}

/// Write `tensors` as one safetensors file at `path`, every tensor stored as
/// `dtype`, atomically. Tensors are laid out sorted by name, with metadata
/// `{"format": "pt"}`, exactly as the `safetensors` crate serializes them.
pub fn write_safetensors(
    path: &Path,
    tensors: &[TensorToWrite<'_>],
    dtype: FloatDtype,
) -> Result<()> {
    let mut sorted: Vec<&TensorToWrite> = tensors.iter().collect();
    sorted.sort_by_key(|t| t.name);
    let mut infos = Vec::with_capacity(sorted.len());
    let mut offset = 0usize;
    for (i, tensor) in sorted.iter().enumerate() {
        let invalid = |msg: String| Err(Error::format(path, tensor.name, msg));
        if tensor.name.is_empty() || tensor.name == "__metadata__" {
            return invalid("not a usable tensor name".into());
        }
        if i > 0 && sorted[i - 1].name == tensor.name {
            return invalid("given twice".into());
        }
        let elements = tensor
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d));
        if elements != Some(tensor.data.len()) {
            return invalid(format!(
                "shape {:?} does not hold its {} values",
                tensor.shape,
                tensor.data.len()
            ));
        }
        let end = offset + tensor.data.len() * dtype.size();
        infos.push((
            tensor.name.to_string(),
            TensorInfo {
                dtype: safetensors_dtype(dtype),
                shape: tensor.shape.to_vec(),
                data_offsets: (offset, end),
            },
        ));
        offset = end;
    }
    let format_pt = [("format".to_string(), "pt".to_string())]
        .into_iter()
        .collect();
    let metadata = Metadata::new(Some(format_pt), infos)
        .map_err(|e| Error::format(path, "header", e.to_string()))?;
    let mut header = serde_json::to_string(&metadata)
        .map_err(|e| Error::format(path, "header", e.to_string()))?
        .into_bytes();
    // The data section starts 8-byte aligned: the header is padded with spaces.
    header.resize(header.len().next_multiple_of(8), b' ');
    crate::atomic::write_atomic_with(path, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        let mut buffer = Vec::with_capacity(CHUNK * dtype.size());
        for tensor in &sorted {
            for chunk in tensor.data.chunks(CHUNK) {
                buffer.clear();
                encode(dtype, chunk, &mut buffer);
                w.write_all(&buffer)?;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("anemone-hf-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Values that exercise rounding: ties, subnormals, overflow, signs, NaN.
    fn awkward_values() -> Vec<f32> {
        let mut values = vec![
            0.0,
            -0.0,
            1.0,
            -2.5,
            65504.0,
            65520.0,
            1e-8,
            -3e-39,
            1e38,
            3.4e38,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
            // bf16 ties: 1 + 2^-8 sits halfway between 1 and 1 + 2^-7.
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            // fp16 ties: 1 + 2^-11 between 1 and 1 + 2^-10.
            1.0 + 1.0 / 2048.0,
            1.0 + 3.0 / 2048.0,
        ];
        let mut state = 0x9e3779b97f4a7c15u64;
        for _ in 0..200 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            values.push(f32::from_bits((state >> 32) as u32));
        }
        values
    }

    #[test]
    fn the_writer_matches_the_safetensors_crate_byte_for_byte_in_every_dtype() {
        let dir = temp_dir("writer");
        let a: Vec<f32> = awkward_values()
            .into_iter()
            .filter(|x| !x.is_nan())
            .take(12)
            .collect();
        let b: Vec<f32> = (0..5).map(|i| i as f32 * 0.1).collect();
        let tensors = [
            TensorToWrite {
                name: "z.weight",
                shape: &[3, 4],
                data: &a,
            },
            TensorToWrite {
                name: "a.bias",
                shape: &[5],
                data: &b,
            },
        ];
        for dtype in [FloatDtype::F32, FloatDtype::F16, FloatDtype::BF16] {
            let path = dir.join(format!("{}.safetensors", dtype.torch_name()));
            write_safetensors(&path, &tensors, dtype).unwrap();
            let bytes: Vec<Vec<u8>> = tensors
                .iter()
                .map(|t| {
                    let mut out = Vec::new();
                    encode(dtype, t.data, &mut out);
                    out
                })
                .collect();
            let views: Vec<(&str, safetensors::tensor::TensorView)> = tensors
                .iter()
                .zip(&bytes)
                .map(|(t, b)| {
                    let view = safetensors::tensor::TensorView::new(
                        safetensors_dtype(dtype),
                        t.shape.to_vec(),
                        b,
                    )
                    .unwrap();
                    (t.name, view)
                })
                .collect();
            let metadata = [("format".to_string(), "pt".to_string())]
                .into_iter()
                .collect();
            let want = safetensors::serialize(views, Some(metadata)).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), want, "{dtype:?}");

            let reader = SafetensorsReader::open_file(&path).unwrap();
            assert_eq!(reader.names().collect::<Vec<_>>(), ["a.bias", "z.weight"]);
            assert_eq!(reader.float_dtype("z.weight"), Some(dtype));
            let back = reader.read_f32("z.weight", &[3, 4]).unwrap();
            let mut expected_bytes = Vec::new();
            encode(dtype, &a, &mut expected_bytes);
            let mut expected = vec![0.0; a.len()];
            decode_f32(dtype, &expected_bytes, &mut expected);
            assert_eq!(
                back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                expected.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            if dtype == FloatDtype::F32 {
                assert_eq!(back, a);
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bf16_and_fp16_round_to_nearest_even_and_read_back_exactly() {
        let values = awkward_values();
        for dtype in [FloatDtype::BF16, FloatDtype::F16] {
            let mut bytes = Vec::new();
            encode(dtype, &values, &mut bytes);
            let mut back = vec![0.0; values.len()];
            decode_f32(dtype, &bytes, &mut back);
            for (i, (&x, &y)) in values.iter().zip(&back).enumerate() {
                if x.is_nan() {
                    assert!(y.is_nan());
                    continue;
                }
                // Reference rounding in f64: the nearest representable value,
                // ties to the even mantissa.
                let want = round_reference(dtype, x);
                assert_eq!(
                    y.to_bits(),
                    want.to_bits(),
                    "{dtype:?} {x:e} -> {y:e}, want {want:e}"
                );
                // Decoding is exact: encoding the decoded value gives the same bits.
                let mut again = Vec::new();
                encode(dtype, &[y], &mut again);
                assert_eq!(again, bytes[i * 2..i * 2 + 2]);
            }
        }
        assert_eq!(
            {
                let mut b = Vec::new();
                encode(
                    FloatDtype::BF16,
                    &[1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0],
                    &mut b,
                );
                b
            },
            [0x80, 0x3f, 0x82, 0x3f],
            "ties go to the even mantissa"
        );
    }

    /// Nearest bf16/fp16 value of `x` by search over the neighbours' bit
    /// patterns, ties to even: an independent route from `half`'s bit tricks.
    fn round_reference(dtype: FloatDtype, x: f32) -> f32 {
        let to_f32 = |bits: u16| match dtype {
            FloatDtype::BF16 => f32::from_bits((bits as u32) << 16),
            _ => half::f16::from_bits(bits).to_f32(),
        };
        let inf = match dtype {
            FloatDtype::BF16 => 0x7f80u16,
            _ => 0x7c00u16,
        };
        let sign = if x.is_sign_negative() { 0x8000u16 } else { 0 };
        let a = (x as f64).abs();
        if x.is_infinite() {
            return to_f32(sign | inf);
        }
        // Overflow: from max + half an ulp of max on, values round to infinity.
        let max = to_f32(inf - 1) as f64;
        let ulp = max - to_f32(inf - 2) as f64;
        if a >= max + ulp / 2.0 {
            return to_f32(sign | inf);
        }
        let mut best = 0u16;
        for bits in 0..inf {
            let v = to_f32(bits) as f64;
            let (d_best, d) = ((to_f32(best) as f64 - a).abs(), (v - a).abs());
            if d < d_best || (d == d_best && bits % 2 == 0 && best % 2 == 1) {
                best = bits;
            }
        }
        to_f32(sign | best)
    }

    #[test]
    fn writer_rejects_bad_tensors_naming_them() {
        let dir = temp_dir("writer-bad");
        let path = dir.join("model.safetensors");
        let data = [1.0f32; 6];
        let cases: [(&[TensorToWrite], &str); 3] = [
            (
                &[TensorToWrite {
                    name: "x",
                    shape: &[4, 2],
                    data: &data,
                }],
                "x: shape [4, 2] does not hold its 6 values",
            ),
            (
                &[
                    TensorToWrite {
                        name: "x",
                        shape: &[6],
                        data: &data,
                    },
                    TensorToWrite {
                        name: "x",
                        shape: &[6],
                        data: &data,
                    },
                ],
                "x: given twice",
            ),
            (
                &[TensorToWrite {
                    name: "__metadata__",
                    shape: &[6],
                    data: &data,
                }],
                "__metadata__: not a usable",
            ),
        ];
        for (tensors, want) in cases {
            let err = write_safetensors(&path, tensors, FloatDtype::F32)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(want) && err.contains("model.safetensors"),
                "{err}"
            );
        }
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_truncated_or_empty_file_is_an_error_naming_it() {
        let dir = temp_dir("truncated");
        let path = dir.join("model.safetensors");
        let data = [1.0f32; 6];
        write_safetensors(
            &path,
            &[TensorToWrite {
                name: "x",
                shape: &[6],
                data: &data,
            }],
            FloatDtype::F32,
        )
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        for cut in [0, 4, bytes.len() - 1] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let err = SafetensorsReader::open_file(&path).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("{}: header: ", path.display())),
                "{err}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
