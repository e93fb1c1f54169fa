//! CoreML MILBlob v2 weight files: the binary format a MIL constant
//! `BLOBFILE(path = string("@model_path/weights/w.bin"), offset = uint64(N))`
//! points into.
//!
//! Layout (all fields little-endian, every record 64-byte aligned):
//! ```text
//! 0     header   u32 count, u32 version = 2, 56 zero bytes
//! 64    record   u32 0xDEADBEEF, u32 dtype code, u64 size_in_bytes,
//!                u64 data offset (absolute), u64 padding_size_in_bits, 32 zero bytes
//! 128   data     size_in_bytes bytes, then zeros up to the next 64-byte boundary
//! ...   record, data, ... (the last blob is not tail-padded)
//! ```
//! `N` names the blob's 64-byte *record*, not its data. Sub-byte dtypes (int4,
//! uint1..uint6) pack elements least-significant bit first, and the record's
//! `padding_size_in_bits` says how many bits of the last byte are unused.
//! The writer reproduces coremltools' `_BlobStorageWriter` byte for byte.
//!
//! Owns: writing files ([`BlobWriter`]), validating and reading them
//! ([`BlobFile`]), converting blob data to numbers ([`Blob`]).
//! Does not: file I/O (bytes in, bytes out), or check a blob against the MIL
//! tensor type that names it (callers compare [`Blob::n_elements`] and
//! [`BlobDType::for_mil`] with the BLOBFILE's type).

use std::fmt;

use half::{bf16, f16, slice::HalfFloatSliceExt};

use crate::mil::DType;
use crate::{Error, Result};

/// Bytes in the file header and in each blob record; also the alignment of records and data.
pub const ALIGNMENT: u64 = 64;
/// First field of every blob record.
pub const SENTINEL: u32 = 0xDEAD_BEEF;
/// The only storage format version this module reads and writes.
pub const VERSION: u32 = 2;

/// Element type codes of the MILBlob format (`BlobDataType` in coremltools).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum BlobDType {
    Fp16 = 1,
    Fp32 = 2,
    Uint8 = 3,
    Int8 = 4,
    Bf16 = 5,
    Int16 = 6,
    Uint16 = 7,
    Int4 = 8,
    Uint1 = 9,
    Uint2 = 10,
    Uint4 = 11,
    Uint3 = 12,
    Uint6 = 13,
    Int32 = 14,
    Uint32 = 15,
    Fp8E4M3Fn = 16,
    Fp8E5M2 = 17,
}

impl BlobDType {
    /// Every dtype, in code order (`ALL[i].code() == i + 1`).
    pub const ALL: [BlobDType; 17] = [
        BlobDType::Fp16,
        BlobDType::Fp32,
        BlobDType::Uint8,
        BlobDType::Int8,
        BlobDType::Bf16,
        BlobDType::Int16,
        BlobDType::Uint16,
        BlobDType::Int4,
        BlobDType::Uint1,
        BlobDType::Uint2,
        BlobDType::Uint4,
        BlobDType::Uint3,
        BlobDType::Uint6,
        BlobDType::Int32,
        BlobDType::Uint32,
        BlobDType::Fp8E4M3Fn,
        BlobDType::Fp8E5M2,
    ];

    /// The code stored in a record's dtype field.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// Inverse of [`BlobDType::code`].
    pub fn from_code(code: u32) -> Option<BlobDType> {
        let index = usize::try_from(code).ok()?.checked_sub(1)?;
        BlobDType::ALL.get(index).copied()
    }

    /// Lowercase name, spelled like MIL dtypes where MIL has one.
    pub fn name(self) -> &'static str {
        match self {
            BlobDType::Fp16 => "fp16",
            BlobDType::Fp32 => "fp32",
            BlobDType::Uint8 => "uint8",
            BlobDType::Int8 => "int8",
            BlobDType::Bf16 => "bf16",
            BlobDType::Int16 => "int16",
            BlobDType::Uint16 => "uint16",
            BlobDType::Int4 => "int4",
            BlobDType::Uint1 => "uint1",
            BlobDType::Uint2 => "uint2",
            BlobDType::Uint4 => "uint4",
            BlobDType::Uint3 => "uint3",
            BlobDType::Uint6 => "uint6",
            BlobDType::Int32 => "int32",
            BlobDType::Uint32 => "uint32",
            BlobDType::Fp8E4M3Fn => "fp8_e4m3fn",
            BlobDType::Fp8E5M2 => "fp8_e5m2",
        }
    }

    /// Bits per element.
    pub fn bits(self) -> u64 {
        match self {
            BlobDType::Uint1 => 1,
            BlobDType::Uint2 => 2,
            BlobDType::Uint3 => 3,
            BlobDType::Int4 | BlobDType::Uint4 => 4,
            BlobDType::Uint6 => 6,
            BlobDType::Uint8 | BlobDType::Int8 | BlobDType::Fp8E4M3Fn | BlobDType::Fp8E5M2 => 8,
            BlobDType::Fp16 | BlobDType::Bf16 | BlobDType::Int16 | BlobDType::Uint16 => 16,
            BlobDType::Fp32 | BlobDType::Int32 | BlobDType::Uint32 => 32,
        }
    }

    /// `Some(signed)` for integer dtypes, `None` for floating point ones.
    pub fn int_signedness(self) -> Option<bool> {
        match self {
            BlobDType::Int4 | BlobDType::Int8 | BlobDType::Int16 | BlobDType::Int32 => Some(true),
            BlobDType::Uint1
            | BlobDType::Uint2
            | BlobDType::Uint3
            | BlobDType::Uint4
            | BlobDType::Uint6
            | BlobDType::Uint8
            | BlobDType::Uint16
            | BlobDType::Uint32 => Some(false),
            _ => None,
        }
    }

    /// The blob dtype that stores a MIL constant of `dtype`, if there is one.
    pub fn for_mil(dtype: DType) -> Option<BlobDType> {
        match dtype {
            DType::Fp16 => Some(BlobDType::Fp16),
            DType::Fp32 => Some(BlobDType::Fp32),
            DType::Int8 => Some(BlobDType::Int8),
            DType::Uint8 => Some(BlobDType::Uint8),
            DType::Int32 => Some(BlobDType::Int32),
            DType::Uint64 | DType::Bool | DType::String => None,
        }
    }
}

impl fmt::Display for BlobDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn blob_error(msg: String) -> Error {
    Error::Blob(msg)
}

// ---------------------------------------------------------------------------
// Writing

/// Builds a weight file in memory. Each `add_*` appends one blob and returns
/// its record offset, the number a BLOBFILE's `offset` must name.
#[derive(Clone, Debug)]
pub struct BlobWriter {
    bytes: Vec<u8>,
    count: u32,
}

impl Default for BlobWriter {
    fn default() -> Self {
        BlobWriter::new()
    }
}

impl BlobWriter {
    /// An empty file: just the header.
    pub fn new() -> Self {
        let mut bytes = vec![0u8; ALIGNMENT as usize];
        bytes[4..8].copy_from_slice(&VERSION.to_le_bytes());
        BlobWriter { bytes, count: 0 }
    }

    /// Number of blobs added so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// f32 values stored as fp16, rounded to nearest even (overflow becomes ±inf).
    pub fn add_fp16(&mut self, values: &[f32]) -> u64 {
        let mut halves = vec![f16::ZERO; values.len()];
        halves.convert_from_f32_slice(values);
        let data: Vec<u8> = halves.iter().flat_map(|h| h.to_le_bytes()).collect();
        self.push(BlobDType::Fp16, &data, 0)
    }

    /// fp16 values given as raw bit patterns.
    pub fn add_f16_bits(&mut self, bits: &[u16]) -> u64 {
        let data: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        self.push(BlobDType::Fp16, &data, 0)
    }

    pub fn add_fp32(&mut self, values: &[f32]) -> u64 {
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.push(BlobDType::Fp32, &data, 0)
    }

    pub fn add_int8(&mut self, values: &[i8]) -> u64 {
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.push(BlobDType::Int8, &data, 0)
    }

    pub fn add_uint8(&mut self, values: &[u8]) -> u64 {
        self.push(BlobDType::Uint8, values, 0)
    }

    /// int4 values in `-8..=7`, two per byte, the first in the low nibble.
    pub fn add_int4(&mut self, values: &[i8]) -> Result<u64> {
        if let Some((index, value)) = values
            .iter()
            .enumerate()
            .find(|(_, v)| !(-8..=7).contains(*v))
        {
            return Err(blob_error(format!(
                "int4 value {value} at index {index} is outside -8..=7; clamp or requantize it"
            )));
        }
        let data: Vec<u8> = values
            .chunks(2)
            .map(|pair| {
                let low = pair[0] as u8 & 0x0F;
                let high = pair.get(1).map_or(0, |v| *v as u8 & 0x0F);
                low | high << 4
            })
            .collect();
        let padding_bits = if values.len() % 2 == 1 { 4 } else { 0 };
        Ok(self.push(BlobDType::Int4, &data, padding_bits))
    }

    /// The complete file.
    pub fn finish(mut self) -> Vec<u8> {
        self.bytes[0..4].copy_from_slice(&self.count.to_le_bytes());
        self.bytes
    }

    fn push(&mut self, dtype: BlobDType, data: &[u8], padding_bits: u64) -> u64 {
        let record = self.bytes.len().next_multiple_of(ALIGNMENT as usize);
        self.bytes.resize(record, 0);
        let data_offset = (record + ALIGNMENT as usize) as u64;
        let mut meta = [0u8; ALIGNMENT as usize];
        meta[0..4].copy_from_slice(&SENTINEL.to_le_bytes());
        meta[4..8].copy_from_slice(&dtype.code().to_le_bytes());
        meta[8..16].copy_from_slice(&(data.len() as u64).to_le_bytes());
        meta[16..24].copy_from_slice(&data_offset.to_le_bytes());
        meta[24..32].copy_from_slice(&padding_bits.to_le_bytes());
        self.bytes.extend_from_slice(&meta);
        self.bytes.extend_from_slice(data);
        self.count += 1;
        record as u64
    }
}

/// A file holding one fp16 blob: (file bytes, record offset = 64).
pub fn single_fp16(values: &[f32]) -> (Vec<u8>, u64) {
    let mut writer = BlobWriter::new();
    let offset = writer.add_fp16(values);
    (writer.finish(), offset)
}

// ---------------------------------------------------------------------------
// Reading

/// One validated blob record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// File offset of the 64-byte record (what BLOBFILE names).
    pub offset: u64,
    pub dtype: BlobDType,
    /// File offset of the data (64-byte aligned, after the record).
    pub data_offset: u64,
    pub size_in_bytes: u64,
    /// Unused bits at the end of the last data byte (sub-byte dtypes only).
    pub padding_bits: u64,
}

impl Record {
    /// Number of elements the data holds.
    pub fn n_elements(&self) -> u64 {
        let data_bits = self.size_in_bytes.saturating_mul(8);
        data_bits.saturating_sub(self.padding_bits) / self.dtype.bits()
    }
}

/// A validated weight file borrowing its bytes. [`BlobFile::parse`] checks the
/// whole file up front, so lookups afterwards only fail on a wrong offset.
#[derive(Clone, Debug)]
pub struct BlobFile<'a> {
    bytes: &'a [u8],
    records: Vec<Record>, // sorted by offset
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

impl<'a> BlobFile<'a> {
    /// Validate a whole file: header size, version and count; then every record's
    /// sentinel, dtype code, size, padding, and data offset (aligned, after its
    /// record, inside the file); and that nothing but alignment zeros follows the last blob.
    pub fn parse(bytes: &'a [u8]) -> Result<BlobFile<'a>> {
        let file_len = bytes.len() as u64;
        if file_len < ALIGNMENT {
            return Err(blob_error(format!(
                "truncated: header needs {ALIGNMENT} bytes, file has {file_len}"
            )));
        }
        let count = u32_at(bytes, 0);
        let version = u32_at(bytes, 4);
        if version != VERSION {
            let hint = if version == 1 {
                " (version 1 is espresso's older blob_v1 format)"
            } else {
                ""
            };
            return Err(blob_error(format!(
                "unsupported version {version} in header, expected {VERSION}{hint}"
            )));
        }

        let mut records = Vec::new();
        let mut record_offset = ALIGNMENT; // where the next record must start
        let mut end_of_last = ALIGNMENT; // end of the last data read so far
        for index in 0..count {
            if record_offset >= file_len {
                return Err(blob_error(format!(
                    "header count {count} but the file ends after {index} blobs, at byte {file_len}"
                )));
            }
            let record = read_record(bytes, record_offset)?;
            end_of_last = record.data_offset + record.size_in_bytes;
            record_offset = end_of_last.next_multiple_of(ALIGNMENT);
            records.push(record);
        }

        let rest = &bytes[end_of_last as usize..];
        if !rest.is_empty() {
            let next = end_of_last.next_multiple_of(ALIGNMENT);
            let next_is_record = next + 4 <= file_len && u32_at(bytes, next as usize) == SENTINEL;
            if next_is_record {
                return Err(blob_error(format!(
                    "header count {count} but another record follows at {next}"
                )));
            }
            if rest.len() as u64 >= ALIGNMENT || rest.iter().any(|b| *b != 0) {
                return Err(blob_error(format!(
                    "{} unexpected bytes after the last blob, at {end_of_last}",
                    rest.len()
                )));
            }
        }
        Ok(BlobFile { bytes, records })
    }

    /// Every record, in file order.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// Every blob, in file order.
    pub fn blobs(&self) -> impl Iterator<Item = Blob<'a>> + '_ {
        self.records.iter().map(|record| self.blob(record))
    }

    /// The blob whose record starts at `record_offset` (a BLOBFILE offset).
    pub fn blob_at(&self, record_offset: u64) -> Result<Blob<'a>> {
        match self
            .records
            .binary_search_by_key(&record_offset, |r| r.offset)
        {
            Ok(index) => Ok(self.blob(&self.records[index])),
            Err(_) => {
                const SHOWN: usize = 8;
                let listed = if self.records.is_empty() {
                    "the file has no blobs".to_string()
                } else {
                    let offsets: Vec<String> = self
                        .records
                        .iter()
                        .take(SHOWN)
                        .map(|r| r.offset.to_string())
                        .collect();
                    let more = if self.records.len() > SHOWN {
                        ", ..."
                    } else {
                        ""
                    };
                    format!("records at {}{more}", offsets.join(", "))
                };
                Err(blob_error(format!(
                    "offset {record_offset} is not a record ({listed})"
                )))
            }
        }
    }

    fn blob(&self, record: &Record) -> Blob<'a> {
        let start = record.data_offset as usize;
        let end = start + record.size_in_bytes as usize;
        Blob {
            record: *record,
            data: &self.bytes[start..end],
        }
    }
}

/// One line per record, for debug output (`ANEMONE_DEBUG=4`):
/// `record 64: fp16 x3, 6 bytes at 128`.
impl fmt::Display for BlobFile<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} blobs, {} bytes",
            self.records.len(),
            self.bytes.len()
        )?;
        for r in &self.records {
            write!(
                f,
                "\nrecord {}: {} x{}, {} bytes at {}",
                r.offset,
                r.dtype,
                r.n_elements(),
                r.size_in_bytes,
                r.data_offset
            )?;
        }
        Ok(())
    }
}

/// Read and check the record at `offset`; `offset + 64 <= bytes.len()` is not assumed.
fn read_record(bytes: &[u8], offset: u64) -> Result<Record> {
    let file_len = bytes.len() as u64;
    if offset + ALIGNMENT > file_len {
        return Err(blob_error(format!(
            "truncated: record at {offset} needs {ALIGNMENT} bytes, file has {file_len}"
        )));
    }
    let at = offset as usize;
    let sentinel = u32_at(bytes, at);
    if sentinel != SENTINEL {
        return Err(blob_error(format!(
            "wrong magic 0x{sentinel:08X} at record {offset}, expected 0x{SENTINEL:08X}"
        )));
    }
    let code = u32_at(bytes, at + 4);
    let dtype = BlobDType::from_code(code)
        .ok_or_else(|| blob_error(format!("unknown dtype code {code} at record {offset}")))?;
    let size_in_bytes = u64_at(bytes, at + 8);
    let data_offset = u64_at(bytes, at + 16);
    let padding_bits = u64_at(bytes, at + 24);

    if data_offset < offset + ALIGNMENT {
        return Err(blob_error(format!(
            "record at {offset}: data offset {data_offset} overlaps the record (must be at least {})",
            offset + ALIGNMENT
        )));
    }
    if !data_offset.is_multiple_of(ALIGNMENT) {
        return Err(blob_error(format!(
            "record at {offset}: data offset {data_offset} is not {ALIGNMENT}-byte aligned"
        )));
    }
    if data_offset
        .checked_add(size_in_bytes)
        .is_none_or(|end| end > file_len)
    {
        return Err(blob_error(format!(
            "truncated: record at {offset} has {size_in_bytes} data bytes at {data_offset}, file has {file_len}"
        )));
    }
    // size_in_bytes <= file_len now, so size_in_bytes * 8 cannot overflow.
    let data_bits = size_in_bytes * 8;
    if padding_bits >= 8 || padding_bits > data_bits {
        return Err(blob_error(format!(
            "record at {offset}: padding of {padding_bits} bits in {size_in_bytes} data bytes (must be below 8 and fit the data)"
        )));
    }
    if !(data_bits - padding_bits).is_multiple_of(dtype.bits()) {
        return Err(blob_error(format!(
            "record at {offset}: {size_in_bytes} bytes less {padding_bits} padding bits is not a whole number of {dtype} elements"
        )));
    }
    Ok(Record {
        offset,
        dtype,
        data_offset,
        size_in_bytes,
        padding_bits,
    })
}

/// One blob: its record and a view of its data bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blob<'a> {
    pub record: Record,
    /// Exactly `size_in_bytes` bytes, little-endian elements (sub-byte dtypes packed LSB first).
    pub data: &'a [u8],
}

impl Blob<'_> {
    pub fn dtype(&self) -> BlobDType {
        self.record.dtype
    }

    /// Number of elements.
    pub fn n_elements(&self) -> usize {
        self.record.n_elements() as usize
    }

    /// The raw fp16 bit patterns of an fp16 blob.
    pub fn f16_bits(&self) -> Result<Vec<u16>> {
        self.expect(BlobDType::Fp16, "f16_bits")?;
        Ok(self
            .data
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect())
    }

    /// Values as f32: exact for fp16, bf16, fp32 and integers up to 24 bits;
    /// int32/uint32 round to the nearest f32. Not supported for the fp8 dtypes.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        match self.dtype() {
            BlobDType::Fp16 => {
                let halves: Vec<f16> = self.f16_bits()?.into_iter().map(f16::from_bits).collect();
                let mut out = vec![0.0f32; halves.len()];
                halves.convert_to_f32_slice(&mut out);
                Ok(out)
            }
            BlobDType::Bf16 => {
                let halves: Vec<bf16> = self
                    .data
                    .chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]]))
                    .collect();
                let mut out = vec![0.0f32; halves.len()];
                halves.convert_to_f32_slice(&mut out);
                Ok(out)
            }
            BlobDType::Fp32 => Ok(self
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()),
            BlobDType::Fp8E4M3Fn | BlobDType::Fp8E5M2 => Err(self.unsupported("to_f32")),
            _ => Ok(self.to_i64()?.into_iter().map(|v| v as f32).collect()),
        }
    }

    /// Values of an integer blob (any width, sign-extended for signed dtypes).
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        let dtype = self.dtype();
        let signed = dtype
            .int_signedness()
            .ok_or_else(|| self.unsupported("to_i64"))?;
        let bits = dtype.bits() as usize;
        let n = self.n_elements();
        let values = if bits >= 8 {
            let width = bits / 8;
            self.data
                .chunks_exact(width)
                .map(|chunk| {
                    let mut word = [0u8; 8];
                    word[..width].copy_from_slice(chunk);
                    sign_extend(u64::from_le_bytes(word), bits, signed)
                })
                .collect()
        } else {
            let mask = (1u16 << bits) - 1;
            (0..n)
                .map(|index| {
                    let first_bit = index * bits;
                    let byte = first_bit / 8;
                    let low = u16::from(self.data.get(byte).copied().unwrap_or(0));
                    let high = u16::from(self.data.get(byte + 1).copied().unwrap_or(0));
                    let raw = ((low | high << 8) >> (first_bit % 8)) & mask;
                    sign_extend(u64::from(raw), bits, signed)
                })
                .collect()
        };
        Ok(values)
    }

    fn expect(&self, dtype: BlobDType, what: &str) -> Result<()> {
        if self.dtype() == dtype {
            Ok(())
        } else {
            Err(blob_error(format!(
                "{what}: record at {} holds {}, not {dtype}",
                self.record.offset,
                self.dtype()
            )))
        }
    }

    fn unsupported(&self, what: &str) -> Error {
        blob_error(format!(
            "{what}: record at {} holds {}, which {what} does not convert",
            self.record.offset,
            self.dtype()
        ))
    }
}

fn sign_extend(raw: u64, bits: usize, signed: bool) -> i64 {
    if signed {
        let shift = 64 - bits;
        ((raw << shift) as i64) >> shift
    } else {
        raw as i64
    }
}

/// The f32 values of the blob at `record_offset` in file `bytes` (parse, look up, convert).
pub fn read_f32(bytes: &[u8], record_offset: u64) -> Result<Vec<f32>> {
    BlobFile::parse(bytes)?.blob_at(record_offset)?.to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_codes_round_trip() {
        for (index, dtype) in BlobDType::ALL.into_iter().enumerate() {
            assert_eq!(dtype.code() as usize, index + 1);
            assert_eq!(BlobDType::from_code(dtype.code()), Some(dtype));
        }
        assert_eq!(BlobDType::from_code(0), None);
        assert_eq!(BlobDType::from_code(18), None);
    }

    #[test]
    fn sign_extend_narrow_widths() {
        assert_eq!(sign_extend(0b1000, 4, true), -8);
        assert_eq!(sign_extend(0b0111, 4, true), 7);
        assert_eq!(sign_extend(0b1111, 4, false), 15);
        assert_eq!(sign_extend(0xFFFF_FFFF, 32, true), -1);
        assert_eq!(sign_extend(0xFFFF_FFFF, 32, false), 4_294_967_295);
    }
}
