//! The byte layout of a kernel tensor in an IOSurface, and the conversions
//! between host `f32` blocks and surface bytes. Pure logic, no OS calls.
//!
//! A `[1, C, 1, S]` tensor lives channel-major with no padding: element
//! `(c, s)` at element `c*S + s`, `bytes = C * S * sizeof(dtype)`, fp16 or fp32
//! little-endian (ane-reference §2.1-2.5). The surface is a flat byte buffer
//! created with six properties ([`SurfaceProperty`]). Conversions go through
//! `half`'s slice API, one contiguous run at a time (never element by element).
//! This module does not allocate or lock surfaces (see `ffi`), nor decide which
//! tensor goes where (see `model::kernels`).

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::backend::{Block, matrix_dims};
use crate::mil::{DType, TensorType};
use crate::{Error, Result};

/// The six `IOSurfaceCreate` properties every surface is created with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SurfaceProperty {
    Width,
    Height,
    BytesPerElement,
    BytesPerRow,
    AllocSize,
    PixelFormat,
}

impl SurfaceProperty {
    pub const ALL: [SurfaceProperty; 6] = [
        SurfaceProperty::Width,
        SurfaceProperty::Height,
        SurfaceProperty::BytesPerElement,
        SurfaceProperty::BytesPerRow,
        SurfaceProperty::AllocSize,
        SurfaceProperty::PixelFormat,
    ];

    /// The exported `CFStringRef` constant naming the key in IOSurface.framework.
    pub fn key_symbol(self) -> &'static str {
        match self {
            SurfaceProperty::Width => "kIOSurfaceWidth",
            SurfaceProperty::Height => "kIOSurfaceHeight",
            SurfaceProperty::BytesPerElement => "kIOSurfaceBytesPerElement",
            SurfaceProperty::BytesPerRow => "kIOSurfaceBytesPerRow",
            SurfaceProperty::AllocSize => "kIOSurfaceAllocSize",
            SurfaceProperty::PixelFormat => "kIOSurfacePixelFormat",
        }
    }
}

/// Where a tensor's elements live in its surface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SurfaceLayout {
    /// Rows: channels C (all axes but the last, flattened).
    pub channels: usize,
    /// Columns: spatial positions S (the last axis).
    pub spatial: usize,
    pub dtype: DType,
}

impl SurfaceLayout {
    /// The layout of a kernel input or output of type `ty` (fp16 or fp32).
    pub fn of(ty: &TensorType) -> Result<SurfaceLayout> {
        if !matches!(ty.dtype, DType::Fp16 | DType::Fp32) {
            return Err(Error::Backend {
                backend: "ane",
                step: "alloc",
                msg: format!("surfaces hold fp16 or fp32 tensors, not {ty}"),
            });
        }
        let (channels, spatial) = matrix_dims(ty);
        Ok(SurfaceLayout {
            channels,
            spatial,
            dtype: ty.dtype,
        })
    }

    pub fn element_bytes(&self) -> usize {
        match self.dtype {
            DType::Fp16 => 2,
            _ => 4,
        }
    }

    /// Bytes from one channel to the next: `S * sizeof(dtype)`, no padding.
    pub fn row_stride(&self) -> usize {
        self.spatial * self.element_bytes()
    }

    /// Total bytes: `C * S * sizeof(dtype)`.
    pub fn bytes(&self) -> usize {
        self.channels * self.row_stride()
    }

    /// Byte offset of element `(channel, position)`.
    pub fn offset(&self, channel: usize, position: usize) -> usize {
        channel * self.row_stride() + position * self.element_bytes()
    }

    /// Values of the six creation properties, in [`SurfaceProperty::ALL`] order:
    /// a flat buffer one byte per "element", one row of all the bytes.
    pub fn properties(&self) -> [(SurfaceProperty, usize); 6] {
        let bytes = self.bytes();
        SurfaceProperty::ALL.map(|p| {
            let v = match p {
                SurfaceProperty::Width => bytes,
                SurfaceProperty::Height => 1,
                SurfaceProperty::BytesPerElement => 1,
                SurfaceProperty::BytesPerRow => bytes,
                SurfaceProperty::AllocSize => bytes,
                SurfaceProperty::PixelFormat => 0,
            };
            (p, v)
        })
    }

    fn check(
        &self,
        surface: &[u8],
        block: &Block,
        values: usize,
        step: &'static str,
    ) -> Result<()> {
        let err = |msg: String| {
            Err(Error::Backend {
                backend: "ane",
                step,
                msg,
            })
        };
        if surface.len() < self.bytes() {
            return err(format!(
                "surface has {} bytes, the tensor needs {}",
                surface.len(),
                self.bytes()
            ));
        }
        if block.row + block.rows > self.channels || block.col + block.cols > self.spatial {
            return err(format!(
                "block rows {}..{} cols {}..{} outside [{} x {}]",
                block.row,
                block.row + block.rows,
                block.col,
                block.col + block.cols,
                self.channels,
                self.spatial
            ));
        }
        if values != block.len() {
            return err(format!(
                "block of {} x {} has {} values, got {values}",
                block.rows,
                block.cols,
                block.len()
            ));
        }
        Ok(())
    }

    /// Contiguous runs of the block: `(byte offset, first value, values)`.
    /// Whole-width blocks are one run.
    fn runs(&self, block: &Block) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let whole = block.col == 0 && block.cols == self.spatial;
        let (n_runs, run) = if whole {
            (usize::from(block.rows > 0), block.len())
        } else {
            (block.rows, block.cols)
        };
        let start = self.offset(block.row, block.col);
        let stride = if whole { 0 } else { self.row_stride() };
        (0..n_runs).map(move |r| (start + r * stride, r * run, run))
    }

    /// Convert `src` (row-major, `block.len()` values) into `block` of the
    /// surface bytes (round to nearest even for fp16).
    pub fn write_block(&self, surface: &mut [u8], block: Block, src: &[f32]) -> Result<()> {
        self.check(surface, &block, src.len(), "write")?;
        let eb = self.element_bytes();
        let mut halves: Vec<f16> = Vec::new();
        for (at, first, n) in self.runs(&block) {
            let dst = &mut surface[at..at + n * eb];
            let values = &src[first..first + n];
            match self.dtype {
                DType::Fp16 => {
                    halves.resize(n, f16::ZERO);
                    halves.convert_from_f32_slice(values);
                    dst.copy_from_slice(bytemuck::cast_slice(&halves));
                }
                _ => dst.copy_from_slice(bytemuck::cast_slice(values)),
            }
        }
        Ok(())
    }

    /// Convert `block` of the surface bytes into `dst` (row-major `f32`).
    pub fn read_block(&self, surface: &[u8], block: Block, dst: &mut [f32]) -> Result<()> {
        self.check(surface, &block, dst.len(), "read")?;
        let eb = self.element_bytes();
        let mut halves: Vec<f16> = Vec::new();
        for (at, first, n) in self.runs(&block) {
            let src = &surface[at..at + n * eb];
            let values = &mut dst[first..first + n];
            match self.dtype {
                DType::Fp16 => {
                    halves.resize(n, f16::ZERO);
                    bytemuck::cast_slice_mut::<f16, u8>(&mut halves).copy_from_slice(src);
                    halves.convert_to_f32_slice(values);
                }
                _ => bytemuck::cast_slice_mut::<f32, u8>(values).copy_from_slice(src),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use crate::model::kernels::{KernelOptions, LayerKernels, WeightMode};

    fn fp16(c: usize, s: usize) -> SurfaceLayout {
        SurfaceLayout::of(&TensorType::new(DType::Fp16, [1, c, 1, s])).unwrap()
    }

    #[test]
    fn sizes_strides_and_properties_of_the_reference_surfaces() {
        // ane-reference §2.5: the smallest training surface, [1,768,1,256] fp16.
        let l = fp16(768, 256);
        assert_eq!((l.channels, l.spatial, l.element_bytes()), (768, 256, 2));
        assert_eq!(l.row_stride(), 512);
        assert_eq!(l.bytes(), 393_216);
        assert_eq!(l.offset(3, 5), 3 * 512 + 10);
        let props = l.properties();
        let values: Vec<usize> = props.iter().map(|p| p.1).collect();
        assert_eq!(values, [393_216, 1, 1, 393_216, 393_216, 0]);
        let keys: Vec<&str> = props.iter().map(|p| p.0.key_symbol()).collect();
        assert_eq!(
            keys,
            [
                "kIOSurfaceWidth",
                "kIOSurfaceHeight",
                "kIOSurfaceBytesPerElement",
                "kIOSurfaceBytesPerRow",
                "kIOSurfaceAllocSize",
                "kIOSurfacePixelFormat"
            ]
        );
        // fp32 benchmark I/O (§2.4): 4 bytes per element.
        let f = SurfaceLayout::of(&TensorType::new(DType::Fp32, [1, 256, 1, 64])).unwrap();
        assert_eq!((f.row_stride(), f.bytes()), (256, 65_536));
        assert!(SurfaceLayout::of(&TensorType::new(DType::Int32, [1, 4, 1, 4])).is_err());
    }

    #[test]
    fn blocks_round_trip_and_land_channel_major() {
        for dtype in [DType::Fp16, DType::Fp32] {
            let l = SurfaceLayout::of(&TensorType::new(dtype, [1, 4, 1, 6])).unwrap();
            let mut bytes = vec![0u8; l.bytes()];
            // Columns 2..5 of channels 1..3: two runs.
            let block = Block {
                row: 1,
                rows: 2,
                col: 2,
                cols: 3,
            };
            let src = [0.5, -1.25, 3.0, 1024.0, -0.0625, 7.5];
            l.write_block(&mut bytes, block, &src).unwrap();
            let mut back = [0.0; 6];
            l.read_block(&bytes, block, &mut back).unwrap();
            assert_eq!(back, src, "{dtype:?}");
            // Element (2, 2) = 1024.0 sits at byte 2*stride + 2*eb, little-endian.
            let at = l.offset(2, 2);
            assert_eq!(at, 2 * 6 * l.element_bytes() + 2 * l.element_bytes());
            let expected: Vec<u8> = match dtype {
                DType::Fp16 => 0x6400u16.to_le_bytes().to_vec(),
                _ => 1024.0f32.to_le_bytes().to_vec(),
            };
            assert_eq!(&bytes[at..at + expected.len()], expected.as_slice());
            // Everything outside the block is untouched.
            let mut whole = vec![0.0; 24];
            l.read_block(
                &bytes,
                Block::whole(&TensorType::new(dtype, [1, 4, 1, 6])),
                &mut whole,
            )
            .unwrap();
            assert_eq!(whole.iter().filter(|v| **v != 0.0).count(), 6);
            assert_eq!(whole[6 + 2], 0.5);
            assert_eq!(whole[2 * 6 + 3], -0.0625);
            assert_eq!(whole[2 * 6 + 4], 7.5);
        }
    }

    #[test]
    fn fp16_conversion_rounds_to_nearest_even_and_saturates_to_inf() {
        let l = fp16(1, 4);
        let mut bytes = vec![0u8; l.bytes()];
        // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: ties to even (1.0).
        let src = [
            1.0 + 2f32.powi(-11),
            1.0 + 3.0 * 2f32.powi(-11),
            70000.0,
            1e-8,
        ];
        l.write_block(
            &mut bytes,
            Block::whole(&TensorType::new(DType::Fp16, [1, 1, 1, 4])),
            &src,
        )
        .unwrap();
        let mut back = [0.0; 4];
        l.read_block(
            &bytes,
            Block::whole(&TensorType::new(DType::Fp16, [1, 1, 1, 4])),
            &mut back,
        )
        .unwrap();
        assert_eq!(back[0], 1.0);
        assert_eq!(back[1], 1.0 + 2.0 * 2f32.powi(-10));
        assert_eq!(back[2], f32::INFINITY);
        assert_eq!(back[3], 0.0);
    }

    #[test]
    fn out_of_range_blocks_and_wrong_lengths_are_errors() {
        let l = fp16(4, 8);
        let mut bytes = vec![0u8; l.bytes()];
        let b = Block {
            row: 3,
            rows: 2,
            col: 0,
            cols: 8,
        };
        let err = l.write_block(&mut bytes, b, &[0.0; 16]).unwrap_err();
        assert!(
            err.to_string()
                .contains("ane backend: write: block rows 3..5"),
            "{err}"
        );
        let b = Block {
            row: 0,
            rows: 1,
            col: 0,
            cols: 8,
        };
        assert!(l.write_block(&mut bytes, b, &[0.0; 7]).is_err());
        assert!(l.read_block(&bytes[..10], b, &mut [0.0; 8]).is_err());
    }

    /// One row per kernel: single input `[1, C, 1, W]` and single output
    /// `[1, C', 1, T]` in fp16, and their byte sizes, derived by hand from the
    /// kernel table in `model::kernels`. `ref` marks sizes equal to the
    /// reference's dynamic-pipeline table (ane-reference §5.5.2); where our
    /// partition differs (residual kept on the CPU, extra backward taps, one
    /// attention backward kernel without tiled K/V) the size differs too.
    type Row = (&'static str, [usize; 2], usize, [usize; 2], usize);

    fn check_packed_layouts(config: &ModelConfig, rows: &[Row]) {
        let opts = KernelOptions {
            dtype: DType::Fp16,
            mode: WeightMode::Packed,
            ..KernelOptions::cpu()
        };
        let kernels = LayerKernels::build(config, 256, opts, &|_| None).unwrap();
        assert_eq!(kernels.iter().count(), rows.len());
        for (spec, (name, input, in_bytes, output, out_bytes)) in kernels.iter().zip(rows) {
            assert_eq!(spec.name, *name);
            let main = &spec.program.main;
            assert_eq!(main.inputs.len(), 1, "{name}: one input surface");
            let outs = main.output_vars();
            assert_eq!(outs.len(), 1, "{name}: one output surface");
            let li = SurfaceLayout::of(&main.inputs[0].ty).unwrap();
            let lo = SurfaceLayout::of(&outs[0].ty).unwrap();
            assert_eq!([li.channels, li.spatial], *input, "{name} input shape");
            assert_eq!(li.bytes(), *in_bytes, "{name} input bytes");
            assert_eq!([lo.channels, lo.spatial], *output, "{name} output shape");
            assert_eq!(lo.bytes(), *out_bytes, "{name} output bytes");
            // Every slot lies inside its surface and slots tile it exactly.
            let covered: usize = spec.inputs.iter().map(|s| s.rows * s.cols).sum();
            assert_eq!(
                covered * 2,
                li.bytes(),
                "{name}: input slots tile the surface"
            );
            let covered: usize = spec.outputs.iter().map(|s| s.rows * s.cols).sum();
            assert_eq!(
                covered * 2,
                lo.bytes(),
                "{name}: output slots tile the surface"
            );
        }
    }

    #[test]
    fn packed_layouts_of_every_stories110m_kernel() {
        // C=768, Qd=KVd=768, F=2048, T=256.
        let c = ModelConfig::preset("stories110m").unwrap();
        check_packed_layouts(
            &c,
            &[
                // xn | Wq^T | Wk^T | Wv^T: 256+3*768 = 2560 (ref sdpaFwd in 3,932,160).
                // attn, q_rope, k_rope, v: 4*768 (ref 3840 adds xnorm).
                ("attn_fwd", [768, 2560], 3_932_160, [3072, 256], 1_572_864),
                ("wo_fwd", [768, 1024], 1_572_864, [768, 256], 393_216), // ref woFwd
                // x2n | W1^T | W3^T | W2: 256+3*2048 (ref 6656 adds the residual x2).
                // ffn, h1, h3, gate: 768+3*2048 = 6912 (ref ffnFused out 3,538,944).
                ("ffn_fwd", [768, 6400], 9_830_400, [6912, 256], 3_538_944),
                ("ffn_bwd_w2", [768, 2304], 3_538_944, [2048, 256], 1_048_576), // ref ffnBwdW2t
                // dgate, h1, h3 | W1 | W3: 3*256+2*768 (ref 2*256+2*768); out dx2n, dh1, dh3.
                (
                    "ffn_bwd_w13",
                    [2048, 2304],
                    9_437_184,
                    [4864, 256],
                    2_490_368,
                ),
                ("wo_bwd", [768, 1024], 1_572_864, [768, 256], 393_216), // ref wotBwd
                // Channel-packed q_rope, k_rope, v, dattn (ref sdpaBwd1 in 1,572,864); dq, dk, dv.
                ("attn_bwd", [3072, 256], 1_572_864, [2304, 256], 1_179_648),
                ("q_bwd", [768, 1024], 1_572_864, [768, 256], 393_216), // ref qBwd
                ("kv_bwd", [768, 2048], 3_145_728, [768, 256], 393_216), // ref kvBwd
            ],
        );
    }

    #[test]
    fn packed_layouts_of_every_qwen3_kernel() {
        // C=1024, Qd=2048, KVd=1024, F=3072, T=256 (GQA 16/8, head_dim 128).
        let c = ModelConfig::preset("qwen3-0.6b-shape").unwrap();
        check_packed_layouts(
            &c,
            &[
                // 256+2048+2*1024 = 4352 (ref sdpaFwd in 8,912,896); out 2*2048+2*1024 (ref 7168).
                ("attn_fwd", [1024, 4352], 8_912_896, [6144, 256], 3_145_728),
                ("wo_fwd", [2048, 1280], 5_242_880, [1024, 256], 524_288), // ref woFwd
                // 256+3*3072 (ref 9728 adds x2); out 1024+3*3072 (ref ffnFused out 5,242,880).
                ("ffn_fwd", [1024, 9472], 19_398_656, [10240, 256], 5_242_880),
                (
                    "ffn_bwd_w2",
                    [1024, 3328],
                    6_815_744,
                    [3072, 256],
                    1_572_864,
                ), // ref ffnBwdW2t
                (
                    "ffn_bwd_w13",
                    [3072, 2816],
                    17_301_504,
                    [7168, 256],
                    3_670_016,
                ),
                ("wo_bwd", [1024, 2304], 4_718_592, [2048, 256], 1_048_576), // ref wotBwd
                // 2048+1024+1024+2048 untiled K/V (ref sdpaBwd1 tiles to 8192 channels).
                ("attn_bwd", [6144, 256], 3_145_728, [4096, 256], 2_097_152),
                ("q_bwd", [2048, 1280], 5_242_880, [1024, 256], 524_288), // ref qBwd
                ("kv_bwd", [1024, 2560], 5_242_880, [1024, 256], 524_288), // ref kvBwd
            ],
        );
    }

    #[test]
    fn packed_weight_regions_follow_the_activation_columns() {
        // ane-reference §5.5.1: channel i = [act_1[i, 0..T) | M_1[i, ..) | M_2[i, ..)].
        let c = ModelConfig::preset("stories110m").unwrap();
        let opts = KernelOptions {
            dtype: DType::Fp16,
            mode: WeightMode::Packed,
            ..KernelOptions::cpu()
        };
        let k = LayerKernels::build(&c, 256, opts, &|_| None).unwrap();
        let cols = |spec: &crate::model::kernels::KernelSpec| -> Vec<(String, usize, usize)> {
            spec.inputs
                .iter()
                .map(|s| (s.name.clone(), s.col, s.cols))
                .collect()
        };
        let named = |v: &[(&str, usize, usize)]| -> Vec<(String, usize, usize)> {
            v.iter().map(|(n, a, b)| (n.to_string(), *a, *b)).collect()
        };
        assert_eq!(
            cols(&k.attn_fwd),
            named(&[
                ("xn", 0, 256),
                ("wq", 256, 768),
                ("wk", 1024, 768),
                ("wv", 1792, 768)
            ])
        );
        assert_eq!(
            cols(&k.kv_bwd),
            named(&[
                ("dk", 0, 256),
                ("dv", 256, 256),
                ("wk", 512, 768),
                ("wv", 1280, 768)
            ])
        );
        let l = SurfaceLayout::of(&k.attn_fwd.program.main.inputs[0].ty).unwrap();
        // Wk^T column 0 of channel 1 is 2 bytes * (2560 + 1024) into the surface.
        assert_eq!(l.offset(1, 1024), 2 * (2560 + 1024));
    }
}
