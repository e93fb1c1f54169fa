//! Constants: literals and BLOBFILE tensors turned into `f32` values once, at
//! compile time, and `constexpr_affine_dequantize` evaluated on them.
//!
//! Reads just the 64-byte MILBlob record a BLOBFILE offset points at (sentinel,
//! dtype code, payload size, payload offset; little-endian) and the payload it
//! names. The blob file as a whole (header, writing) belongs to `crate::blob`.

use std::collections::BTreeMap;

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::elementwise::Dequantize;
use super::values::op_error;
use crate::mil::{BlobRef, DType, Literal, Operation, TensorType, Value};
use crate::{Error, Result};

/// Bytes of one blob metadata record.
const RECORD_LEN: usize = 64;
/// First field of every record.
const SENTINEL: u32 = 0xDEAD_BEEF;

/// The record's dtype code for `dtype`, if blobs can hold it.
fn dtype_code(dtype: DType) -> Option<u32> {
    match dtype {
        DType::Fp16 => Some(1),
        DType::Fp32 => Some(2),
        DType::Uint8 => Some(3),
        DType::Int8 => Some(4),
        _ => None,
    }
}

/// The values of `lit` (an operand or `const` of `op`) as `f32`: ints and bools
/// exactly, BLOBFILE data read from `weights`.
pub(super) fn materialize(
    lit: &Literal,
    weights: &BTreeMap<String, Vec<u8>>,
    op: &Operation,
) -> Result<Vec<f32>> {
    let values: Vec<f32> = match &lit.value {
        Value::Float(v) => v.clone(),
        Value::Int(v) => v.iter().map(|&i| i as f32).collect(),
        Value::Bool(v) => v.iter().map(|&b| f32::from(u8::from(b))).collect(),
        Value::Str(_) => {
            return Err(op_error(op, "a string constant cannot be used as a tensor"));
        }
        Value::Blob(blob) => return read_blob(blob, &lit.ty, weights, op),
    };
    if values.len() != lit.ty.numel() {
        return Err(op_error(
            op,
            format!(
                "literal of type {} has {} values, expected {}",
                lit.ty,
                values.len(),
                lit.ty.numel()
            ),
        ));
    }
    Ok(values)
}

fn read_blob(
    blob: &BlobRef,
    ty: &TensorType,
    weights: &BTreeMap<String, Vec<u8>>,
    op: &Operation,
) -> Result<Vec<f32>> {
    let bytes = weights.get(&blob.path).ok_or_else(|| {
        Error::Blob(format!(
            "BLOBFILE path `{}` (op \"{}\") is not in the package (have: {:?})",
            blob.path,
            op.name,
            weights.keys().collect::<Vec<_>>()
        ))
    })?;
    let fail = |msg: String| {
        Error::Blob(format!(
            "`{}` record at offset {} (op \"{}\"): {msg}",
            blob.path, blob.offset, op.name
        ))
    };
    let start = usize::try_from(blob.offset)
        .ok()
        .filter(|s| {
            s.checked_add(RECORD_LEN)
                .is_some_and(|end| end <= bytes.len())
        })
        .ok_or_else(|| {
            fail(format!(
                "lies past the end of the file ({} bytes)",
                bytes.len()
            ))
        })?;
    let record = &bytes[start..start + RECORD_LEN];
    let u32_at = |i: usize| u32::from_le_bytes(record[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(record[i..i + 8].try_into().expect("8 bytes"));

    let sentinel = u32_at(0);
    if sentinel != SENTINEL {
        return Err(fail(format!(
            "sentinel is 0x{sentinel:08x}, expected 0x{SENTINEL:08x}"
        )));
    }
    let want_code = dtype_code(ty.dtype)
        .ok_or_else(|| fail(format!("blobs cannot hold {} tensors", ty.dtype)))?;
    let code = u32_at(4);
    if code != want_code {
        return Err(fail(format!(
            "dtype code is {code}, but the constant is declared {ty} (code {want_code})"
        )));
    }
    let need = ty.byte_size().expect("blob dtypes have a size");
    let size = u64_at(8);
    if size != need as u64 {
        return Err(fail(format!(
            "payload size is {size} bytes, but {ty} needs {need}"
        )));
    }
    let data_offset = u64_at(16);
    let payload = usize::try_from(data_offset)
        .ok()
        .and_then(|s| bytes.get(s..s.checked_add(need)?))
        .ok_or_else(|| {
            fail(format!(
                "payload at offset {data_offset} ({need} bytes) lies past the end of the file ({} bytes)",
                bytes.len()
            ))
        })?;
    Ok(match ty.dtype {
        DType::Fp16 => {
            let halves: Vec<f16> = payload
                .chunks_exact(2)
                .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])))
                .collect();
            let mut out = vec![0.0; halves.len()];
            halves.convert_to_f32_slice(&mut out);
            out
        }
        DType::Fp32 => payload
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::Uint8 => payload.iter().map(|&b| f32::from(b)).collect(),
        DType::Int8 => payload.iter().map(|&b| f32::from(b as i8)).collect(),
        _ => unreachable!("dtype_code accepted it"),
    })
}

/// Evaluate `constexpr_affine_dequantize`: `(quantized_data - zero_point) * scale`
/// with `zero_point` and `scale` scalars or vectors along `axis`.
pub(super) fn affine_dequantize(
    op: &Operation,
    weights: &BTreeMap<String, Vec<u8>>,
) -> Result<Vec<f32>> {
    let attr = |key: &str| op.attr(key).expect("inference checked the attributes");
    let data = attr("quantized_data");
    let dequantize = Dequantize::new(
        materialize(attr("scale"), weights, op)?,
        Some(materialize(attr("zero_point"), weights, op)?),
        attr("axis").as_int(),
        &data.ty.shape,
    );
    let q = materialize(data, weights, op)?;
    let mut out = vec![0.0; q.len()];
    dequantize.run(&q, &mut out);
    Ok(out)
}
