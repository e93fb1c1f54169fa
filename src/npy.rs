//! NumPy `.npy` files as [`HostTensor`]s: what `anemone mil run` reads as
//! inputs and writes as outputs.
//!
//! Format (NumPy's `format.py`): magic `\x93NUMPY`, version `u8 major, u8
//! minor`, header length (`u16` LE in version 1, `u32` LE in versions 2 and
//! 3), then a Python dict literal `{'descr': '<f4', 'fortran_order': False,
//! 'shape': (2, 3), }` padded with spaces and a newline, then the data.
//!
//! Read: little-endian (or byte-order-free) `f2`, `f4`, `f8` and `i4` data,
//! in C or Fortran order (Fortran-order data is transposed into the row-major
//! layout everything here uses). The shape's element count is computed with
//! checked arithmetic and must match the bytes that follow the header
//! exactly, so a truncated file or a hostile shape is an error naming the
//! file, before any allocation. Written: `<f4`, C order, version 1.
//! Not supported: big-endian data, structured dtypes, pickled objects.

use std::path::Path;

use crate::backend::cpu::HostTensor;
use crate::mil::{DType, TensorType};
use crate::{Error, Result};

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// What the header dict says.
#[derive(Debug, PartialEq)]
struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// Read a `.npy` file as a tensor.
pub fn read(path: &Path) -> Result<HostTensor> {
    let bytes = crate::memory::read_file(path, u64::MAX)?;
    decode(&bytes, path)
}

/// Parse the bytes of a `.npy` file; `path` names it in errors.
pub fn decode(bytes: &[u8], path: &Path) -> Result<HostTensor> {
    let bad = |field: &str, msg: String| Error::format(path, field, msg);
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(bad(
            "magic",
            "not a .npy file (it does not start with \\x93NUMPY)".into(),
        ));
    }
    let (header_len, header_start): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize,
            12,
        ),
        major => {
            return Err(bad(
                "version",
                format!("version {major} is not supported (1, 2 and 3 are)"),
            ));
        }
    };
    let data_start = header_start
        .checked_add(header_len)
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| {
            bad(
                "header",
                format!("the header runs past the end of the file ({header_len} bytes declared)"),
            )
        })?;
    let text = std::str::from_utf8(&bytes[header_start..data_start])
        .map_err(|_| bad("header", "not UTF-8 text".into()))?;
    let header = parse_header(text).map_err(|msg| bad("header", msg))?;
    let (width, dtype) = match header.descr.trim_start_matches(['<', '|', '=']) {
        "f2" => (2, DType::Fp16),
        "f4" => (4, DType::Fp32),
        "f8" => (8, DType::Fp32),
        "i4" => (4, DType::Int32),
        other => {
            return Err(bad(
                "descr",
                format!(
                    "unsupported dtype `{other}` (use little-endian float16, float32, float64 or int32)"
                ),
            ));
        }
    };
    let numel = header
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d));
    let data = &bytes[data_start..];
    if numel.and_then(|n| n.checked_mul(width)) != Some(data.len()) {
        return Err(bad(
            "shape",
            format!(
                "shape {:?} of {width}-byte values needs {} bytes of data, but {} follow the \
                 header (truncated or corrupt)",
                header.shape,
                numel
                    .and_then(|n| n.checked_mul(width))
                    .map_or("more than 2^64".to_string(), |n| n.to_string()),
                data.len()
            ),
        ));
    }
    let values: Vec<f32> = match header.descr.trim_start_matches(['<', '|', '=']) {
        "f2" => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        "f8" => data
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        "i4" => data
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as f32)
            .collect(),
        _ => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect(),
    };
    let values = if header.fortran_order {
        fortran_to_c(&values, &header.shape)
    } else {
        values
    };
    Ok(HostTensor {
        ty: TensorType::new(dtype, header.shape),
        data: values,
    })
}

/// Write `tensor` as a version 1, C-order `<f4` file (atomically).
pub fn write(path: &Path, tensor: &HostTensor) -> Result<()> {
    let shape = match tensor.ty.shape.as_slice() {
        [] => "()".to_string(),
        [d] => format!("({d},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // Pad so the data starts at a multiple of 64, the header ending in '\n'.
    let unpadded = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + 4 * tensor.data.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&[1, 0]);
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    tensor
        .data
        .iter()
        .for_each(|x| bytes.extend_from_slice(&x.to_le_bytes()));
    crate::atomic::write_atomic(path, &bytes)
}

/// Values stored first-axis-fastest, reordered last-axis-fastest.
fn fortran_to_c(values: &[f32], shape: &[usize]) -> Vec<f32> {
    let mut fortran_strides = vec![1usize; shape.len()];
    for axis in 1..shape.len() {
        fortran_strides[axis] = fortran_strides[axis - 1] * shape[axis - 1];
    }
    let mut index = vec![0usize; shape.len()];
    let mut out = Vec::with_capacity(values.len());
    for _ in 0..values.len() {
        let offset: usize = index
            .iter()
            .zip(&fortran_strides)
            .map(|(i, stride)| i * stride)
            .sum();
        out.push(values[offset]);
        // The next row-major index: the last axis moves fastest.
        for axis in (0..shape.len()).rev() {
            index[axis] += 1;
            if index[axis] < shape[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    out
}

/// The header dict: string keys, values a string, `True`/`False` or a tuple
/// of integers (the subset `numpy.save` writes).
fn parse_header(text: &str) -> std::result::Result<Header, String> {
    let mut p = Literal {
        rest: text.trim_end(),
    };
    p.expect('{')?;
    let (mut descr, mut fortran_order, mut shape) = (None, None, None);
    while !p.eat('}') {
        let key = p.string()?;
        p.expect(':')?;
        match key.as_str() {
            "descr" => descr = Some(p.string()?),
            "fortran_order" => fortran_order = Some(p.boolean()?),
            "shape" => shape = Some(p.int_tuple()?),
            other => return Err(format!("unexpected key '{other}'")),
        }
        if !p.eat(',') {
            p.expect('}')?;
            break;
        }
    }
    if !p.rest.is_empty() {
        return Err(format!("unexpected text after the dict: {:?}", p.rest));
    }
    Ok(Header {
        descr: descr.ok_or("missing 'descr'")?,
        fortran_order: fortran_order.ok_or("missing 'fortran_order'")?,
        shape: shape.ok_or("missing 'shape'")?,
    })
}

/// A cursor over a Python literal.
struct Literal<'t> {
    rest: &'t str,
}

impl Literal<'_> {
    fn eat(&mut self, c: char) -> bool {
        self.rest = self.rest.trim_start();
        match self.rest.strip_prefix(c) {
            Some(rest) => {
                self.rest = rest;
                true
            }
            None => false,
        }
    }

    fn expect(&mut self, c: char) -> std::result::Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("expected '{c}' at {:?}", short(self.rest)))
        }
    }

    fn string(&mut self) -> std::result::Result<String, String> {
        self.rest = self.rest.trim_start();
        let quote = self
            .rest
            .chars()
            .next()
            .filter(|q| *q == '\'' || *q == '"')
            .ok_or_else(|| format!("expected a string at {:?}", short(self.rest)))?;
        let body = &self.rest[1..];
        let end = body
            .find(quote)
            .ok_or_else(|| "unterminated string".to_string())?;
        self.rest = &body[end + 1..];
        Ok(body[..end].to_string())
    }

    fn boolean(&mut self) -> std::result::Result<bool, String> {
        self.rest = self.rest.trim_start();
        for (word, value) in [("True", true), ("False", false)] {
            if let Some(rest) = self.rest.strip_prefix(word) {
                self.rest = rest;
                return Ok(value);
            }
        }
        Err(format!("expected True or False at {:?}", short(self.rest)))
    }

    fn int_tuple(&mut self) -> std::result::Result<Vec<usize>, String> {
        self.expect('(')?;
        let mut out = Vec::new();
        while !self.eat(')') {
            self.rest = self.rest.trim_start();
            let digits = self
                .rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(self.rest.len());
            let value = self.rest[..digits]
                .parse()
                .map_err(|_| format!("expected a dimension at {:?}", short(self.rest)))?;
            self.rest = &self.rest[digits..];
            out.push(value);
            if !self.eat(',') {
                self.expect(')')?;
                break;
            }
        }
        Ok(out)
    }
}

fn short(text: &str) -> &str {
    &text[..text.char_indices().nth(20).map_or(text.len(), |(i, _)| i)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, fortran: bool, shape: &str, data: &[u8]) -> Vec<u8> {
        let header = format!(
            "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}\n",
            if fortran { "True" } else { "False" }
        );
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&[1, 0]);
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    fn f32s(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn fortran_order_is_transposed_into_row_major() {
        // np.asfortranarray([[1, 2, 3], [4, 5, 6]]) stores 1 4 2 5 3 6.
        let bytes = npy("<f4", true, "(2, 3)", &f32s(&[1., 4., 2., 5., 3., 6.]));
        let t = decode(&bytes, Path::new("f.npy")).unwrap();
        assert_eq!(t.ty.shape, vec![2, 3]);
        assert_eq!(t.data, vec![1., 2., 3., 4., 5., 6.]);
        let bytes = npy("<f4", false, "(2, 3)", &f32s(&[1., 2., 3., 4., 5., 6.]));
        assert_eq!(decode(&bytes, Path::new("c.npy")).unwrap().data, t.data);
    }

    #[test]
    fn truncated_and_hostile_files_name_the_file() {
        let bytes = npy("<f4", false, "(2, 3)", &f32s(&[1., 2.]));
        let msg = decode(&bytes, Path::new("short.npy"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("short.npy") && msg.contains("truncated"),
            "{msg}"
        );
        let bytes = npy("<f4", false, "(4294967296, 4294967296, 4294967296)", &[]);
        let msg = decode(&bytes, Path::new("huge.npy"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("huge.npy") && msg.contains("2^64"), "{msg}");
        let bytes = npy(">f4", false, "(1,)", &f32s(&[1.]));
        let msg = decode(&bytes, Path::new("be.npy")).unwrap_err().to_string();
        assert!(msg.contains("descr") && msg.contains(">f4"), "{msg}");
    }

    #[test]
    fn written_files_read_back() {
        let dir = std::env::temp_dir().join(format!("anemone-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for shape in [vec![], vec![3], vec![2, 1, 3]] {
            let n: usize = shape.iter().product();
            let t = HostTensor::new(
                TensorType::new(DType::Fp32, shape),
                (0..n).map(|i| i as f32 * 0.5).collect(),
            );
            let path = dir.join("t.npy");
            write(&path, &t).unwrap();
            assert_eq!(read(&path).unwrap(), t);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
