//! The shape of what crosses the ANE boundary, as numbers: the limits other
//! ANE projects reported for input and output tensors and for baked weights
//! (`docs/ane-notes.md` keeps each with its source), and the padding that
//! meets the I/O limits. The verifier checks these numbers (rules ANE009,
//! ANE010, ANE015, ANE016, ANE019-ANE021); the kernel builders
//! (`model::kernels`, `bench::ane`) pad to them with [`padded_io`] and the
//! builder's `padded_input` and `padded_output`.
//!
//! Padding never changes what a program computes: padded input rows and
//! columns are sliced away unread, and padded outputs repeat real values
//! (copies of the output along channels and width) that the host ignores.
//! This module computes shapes; it builds no ops and decides nothing.

use super::ir::DType;

/// Smallest input or output tensor, in bytes: smaller surfaces made evaluate
/// fail with 0x1d (ane-reference §2.5, unmerged PR #16).
pub const MIN_SURFACE_BYTES: usize = 49_152;
/// Fewest channels of an input or output (ane-reference §2.5, commit 184b182).
pub const MIN_CHANNELS: usize = 64;
/// Widths (last axis) are at least this and a multiple of it; other widths
/// silently corrupt data (rustane and jmanhype READMEs).
pub const WIDTH_MULTIPLE: usize = 16;
/// Rows (one width of elements) are a multiple of this many bytes.
pub const ROW_BYTES_MULTIPLE: usize = 64;
/// Largest tensor dimension the compiler takes (maderix/ANE#26, ANEForge#227).
pub const MAX_DIM: usize = 65_536;
/// Most baked weight bytes per program: the compiler's limit on a weight file
/// (coremltools#2593: "Weight file size ... exceeds the maximum (2147483648 bytes)").
pub const MAX_BAKED_BYTES: u64 = 2_147_483_648;
/// Most weight files (distinct BLOBFILE paths) per program.
pub const MAX_WEIGHT_FILES: usize = 16;

/// Bytes per element of an I/O dtype (fp16 2, everything else 4).
fn element_bytes(dtype: DType) -> usize {
    dtype.byte_size().unwrap_or(4)
}

/// The width step for `dtype`: a multiple of [`WIDTH_MULTIPLE`] elements whose
/// row is a multiple of [`ROW_BYTES_MULTIPLE`] bytes (32 for fp16, 16 for fp32).
pub fn width_multiple(dtype: DType) -> usize {
    let row = ROW_BYTES_MULTIPLE / element_bytes(dtype).min(ROW_BYTES_MULTIPLE);
    lcm(WIDTH_MULTIPLE, row.max(1))
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn lcm(a: usize, b: usize) -> usize {
    a / gcd(a, b) * b
}

/// The smallest `(channels, width)` at least `(channels, width)` that an I/O
/// tensor `[1, channels, height, width]` of `dtype` needs: the width rounded
/// up to [`width_multiple`], at least [`MIN_CHANNELS`] channels, and enough
/// channels for [`MIN_SURFACE_BYTES`].
pub fn padded_io(channels: usize, height: usize, width: usize, dtype: DType) -> (usize, usize) {
    let step = width_multiple(dtype);
    let width = width.max(1).div_ceil(step) * step;
    let row_bytes = height.max(1) * width * element_bytes(dtype);
    let channels = channels
        .max(MIN_CHANNELS)
        .max(MIN_SURFACE_BYTES.div_ceil(row_bytes));
    (channels, width)
}

/// Whether an output of `[1, C, H, W]` needs the builder's `padded_output`.
pub fn output_needs_padding(channels: usize, height: usize, width: usize, dtype: DType) -> bool {
    padded_io(channels, height, width, dtype) != (channels, width)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mil::verify::{Target, verify};
    use crate::mil::{Builder, Dialect};

    #[test]
    fn padding_meets_every_io_rule_and_leaves_conforming_shapes_alone() {
        assert_eq!(
            (width_multiple(DType::Fp16), width_multiple(DType::Fp32)),
            (32, 16)
        );
        // Already conforming: Stories110M's attention input, the probe.
        assert_eq!(padded_io(768, 1, 2560, DType::Fp16), (768, 2560));
        assert_eq!(padded_io(256, 1, 64, DType::Fp32), (256, 64));
        assert_eq!(padded_io(64, 1, 384, DType::Fp16), (64, 384));
        // stories260k's ffn_fwd (64 x 1028) and kv_bwd output (32 channels).
        assert_eq!(padded_io(64, 1, 1028, DType::Fp16), (64, 1056));
        assert_eq!(padded_io(32, 1, 512, DType::Fp16), (64, 512));
        // Tiny: 8 x 6 fp16 -> width 32, 49,152 / 64 bytes = 768 channels.
        assert_eq!(padded_io(8, 1, 6, DType::Fp16), (768, 32));
        // Two rows of height: the channel count halves.
        assert_eq!(padded_io(8, 2, 6, DType::Fp16), (384, 32));
    }

    #[test]
    fn padded_io_programs_verify_for_the_ane() {
        for (channels, width) in [(8, 6), (64, 384), (32, 40), (100, 16)] {
            let mut b = Builder::new(Dialect::Ios18);
            let (_, view) = b.padded_input("x", DType::Fp16, [1, channels, 1, width]);
            assert_eq!(view.shape(), [1, channels, 1, width]);
            let two = b.scalar(DType::Fp16, 2.0);
            let doubled = b.mul(&view, &two);
            let y = b.padded_output(&[&doubled, &view], "y");
            b.output(&y);
            let program = b.finish();
            let report = verify(&program, Target::Ane);
            assert!(report.is_ok(), "{channels}x{width}: {report}");
            assert_eq!(program.main.outputs, ["y"], "{channels}x{width}");
            let needs = output_needs_padding(2 * channels, 1, width, DType::Fp16);
            assert_eq!(needs, y.shape() != [1, 2 * channels, 1, width]);
        }
    }
}
