//! The Llama layer as MIL kernels, forward and backward-dx pairs side by side.
//!
//! Partition (per layer, shared by all layers when weights are not baked):
//!
//! | kernel        | channels C | reads                                   | writes                       |
//! |---------------|-----------|------------------------------------------|------------------------------|
//! | `attn_fwd`    | dim       | xn (C,T); Wq, Wk, Wv                     | attn (Qd), q_rope (Qd), k_rope (KVd), v (KVd) |
//! | `wo_fwd`      | q_dim     | attn (Qd,T); Wo                          | o (C)                        |
//! | `ffn_fwd`     | dim       | x2n (C,T); W1, W3, W2                    | ffn (C), h1, h3, gate (F)    |
//! | `ffn_bwd_w2`  | dim       | dffn (C,T); W2 (used transposed)         | dgate (F)                    |
//! | `ffn_bwd_w13` | hidden    | dgate, h1, h3 (F,T); W1, W3 (transposed) | dx2n (C), dh1, dh3 (F)       |
//! | `wo_bwd`      | dim       | dx2 (C,T); Wo (transposed)               | dattn (Qd)                   |
//! | `attn_bwd`    | -         | q_rope, k_rope, v, dattn                 | dq, dk, dv (pre-RoPE)        |
//! | `q_bwd`       | q_dim     | dq (Qd,T); Wq (transposed)               | dxn (C)                      |
//! | `kv_bwd`      | kv_dim    | dk, dv (KVd,T); Wk, Wv (transposed)      | dxn (C)                      |
//!
//! Where a chip's compiler refuses the fused `attn_bwd`, its split
//! ([`attn_bwd_split`], the reference's `sdpaBwd1`/`sdpaBwd2`) computes the
//! same with the same ops: `attn_bwd_dv` reads what `attn_bwd` reads and
//! writes `dv (KVd)`, `probs`, `dp (H*T, T)`; `attn_bwd_dqk` reads `probs`,
//! `dp`, `q_rope`, `k_rope` and writes `dq (Qd)`, `dk (KVd)`. The set
//! declares it ([`KernelDecl::split`]); `train` compiles it only when the
//! whole is refused.
//!
//! A config's features add to these kernels, nothing else: with `qkv_bias`,
//! `attn_fwd` reads `bq (Qd)`, `bk`, `bv (KVd)` and adds them to the
//! projections before RoPE; with `qk_norm`, it reads `q_norm`, `k_norm (D)`,
//! normalises every q and k head before RoPE and also writes the projections
//! `q_lin (Qd)`, `k_lin (KVd)`; `q_bwd` (resp. `kv_bwd`) then also reads
//! `q_lin` and `q_norm`, runs the norm's backward first (its `dq` is the
//! gradient of the normed queries) and also writes `dq_lin (Qd)`, the
//! projection's gradient, and `dq_norm (D)`, the norm weight's gradient per
//! position summed over heads (`dk_lin`, `dk_norm`). The RoPE tables come
//! from the config's scaled frequencies. Bias and norm-weight gradients are
//! sums over positions, done on the host.
//!
//! This follows the reference's dynamic pipeline (ane-reference 5.5.2) with two
//! changes: the residual adds stay on the CPU in fp32 (the reference adds them on
//! the ANE in fp16), and attention backward is one kernel whose inputs are packed
//! along channels (the reference splits it in two and round-trips the `H*T x T`
//! probabilities through memory; that split is the fallback above). RMSNorm,
//! embedding, classifier and loss run on the CPU.
//!
//! The attention softmax of ANE-bound kernels runs over a power-of-two number
//! of keys (rule ANE024: softmax over other sizes was reported to fail to
//! compile): for a window `T` that is not one, the keys are padded with zero
//! rows up to [`softmax_keys`] and masked (-65504, so their probabilities are
//! exactly 0), and the probabilities are sliced back to `T` columns
//! (`Builder::causal_probs`). The CPU's kernels (fp32, or `Inputs`) are
//! never padded.
//!
//! Where weights come from is one choice per kernel build, [`WeightMode`]:
//! - `Baked`: BLOBFILE constants, conv 1x1 (frozen weights, inference; recompile
//!   on change), the activations packed along channels into one input and the
//!   outputs into one;
//! - `Packed`: appended along the spatial axis of the single input (the ANE's
//!   dynamic-weight trick: compile once, one input and one output surface);
//! - `Inputs`: one function input per tensor (cheapest on the CPU backend).
//!
//! A vector parameter (a bias, a norm weight; [`KernelBuilder::vector`]) of `n`
//! values is a `[1, n, 1, 1]` input in `Inputs` mode, one column (rows
//! `0..n`) of the single packed input in `Packed` mode (so `n` must not
//! exceed the kernel's channel count C), and a BLOBFILE constant when baked.
//!
//! Every kernel reads and writes `[1, C, 1, W]` tensors. A [`KernelSpec`] records
//! where each logical tensor lives (buffer, channel rows, spatial columns), so the
//! host code is the same in every mode. ANE-bound kernels (fp16, packed or
//! baked) have their input and output padded to the ANE's I/O rules
//! (`mil::layout`: at least 64 channels and 49,152 bytes, widths a multiple of
//! 32) where the slots alone fall short; the host never touches the padding.
//! Baked weights and tables are records of one `weight.bin` (one file per
//! tensor in the ios16 dialect).
//!
//! The set is declared once, [`LAYER_KERNELS`] (each kernel's builder and
//! whether it reads weights); [`LayerKernels::build`] maps it into specs, the
//! engine maps those into compiled kernels, and [`kernel_counts`] gives the
//! ANE compile plan its numbers. How the host calls a kernel is `train`'s.

use std::collections::BTreeMap;

use crate::blob::BlobWriter;
use crate::mil::{Builder, DType, Dialect, Program, Tensor, TensorType, layout};
use crate::package::ProgramPackage;
use crate::{Error, Result};

use super::config::ModelConfig;
use super::rope;

/// Where kernel weights come from (see the module docs); defined beside the
/// backend trait, whose backends say which mode they prefer.
pub use crate::backend::WeightMode;

/// How kernels are typed and where their weights live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOptions {
    /// fp16 for the ANE (and CPU fp16 simulation), fp32 on the CPU otherwise.
    pub dtype: DType,
    pub mode: WeightMode,
    pub dialect: Dialect,
    /// The projections whose output takes an added input (LoRA's adapter
    /// path, made on the host): none for plain kernels.
    pub deltas: Deltas,
}

/// Which projections of `attn_fwd` and `ffn_fwd` take an added input, the
/// adapter's part `s B A drop(x)` of a LoRA projection made on the host
/// (`train::adapter_path`): `q_delta (Qd)`, `k_delta`, `v_delta (KVd)` are
/// added to the q/k/v projections (after their biases, before QK-norm and
/// RoPE); `gate_delta`, `up_delta (F)` to `h1 = W1 x`, `h3 = W3 x`, before
/// the SwiGLU. The other adapted projections (`o`, `down`) feed the
/// residual stream or the host directly, so the host adds theirs after the
/// kernel. This is how a baked, frozen base meets adapters that change
/// every step: the base never travels, the kernel compiles once per run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Deltas {
    pub q: bool,
    pub k: bool,
    pub v: bool,
    pub gate: bool,
    pub up: bool,
}

impl Deltas {
    pub const NONE: Deltas = Deltas {
        q: false,
        k: false,
        v: false,
        gate: false,
        up: false,
    };
    /// Every projection's (a LoRA run on all seven targets).
    pub const ALL: Deltas = Deltas {
        q: true,
        k: true,
        v: true,
        gate: true,
        up: true,
    };
}

impl KernelOptions {
    pub fn cpu() -> KernelOptions {
        KernelOptions {
            deltas: Deltas::NONE,
            dtype: DType::Fp32,
            mode: WeightMode::Inputs,
            dialect: Dialect::Ios18,
        }
    }
}

/// What a tensor slot holds: an activation, or a weight the host writes as
/// the parameter is stored (`W`, rows = W's rows) or transposed (`W^T`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotRole {
    Activation,
    Weight { transposed: bool },
}

/// Where one logical tensor lives among a kernel's buffers: rows
/// `row..row+rows` (channels) and columns `col..col+cols` (positions or weight
/// columns) of buffer `buffer` (an index into the kernel's inputs or outputs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSlot {
    pub name: String,
    pub role: SlotRole,
    pub buffer: usize,
    pub row: usize,
    pub rows: usize,
    pub col: usize,
    pub cols: usize,
}

/// A built kernel: the package to compile plus the host-side map of its I/O.
#[derive(Clone, Debug)]
pub struct KernelSpec {
    pub name: String,
    pub program: Program,
    pub package: ProgramPackage,
    pub inputs: Vec<TensorSlot>,
    pub outputs: Vec<TensorSlot>,
    /// The weights and vectors built into the program as constants
    /// (`WeightMode::Baked`): they have no slot, the host binds nothing.
    pub baked: Vec<String>,
}

impl KernelSpec {
    /// Whether `name` is a weight or vector baked into the program.
    pub fn is_baked(&self, name: &str) -> bool {
        self.baked.iter().any(|baked| baked == name)
    }

    pub fn input(&self, name: &str) -> &TensorSlot {
        self.inputs
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("kernel {} has no input `{name}`", self.name))
    }

    pub fn output(&self, name: &str) -> &TensorSlot {
        self.outputs
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("kernel {} has no output `{name}`", self.name))
    }
}

/// How a kernel uses a weight matrix `W (rows, cols)` stored `[out, in]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Use {
    /// `y = W x`: in = cols, out = rows.
    Forward,
    /// `y = W^T x`: in = rows, out = cols.
    Transposed,
}

#[derive(Clone, Debug)]
struct WeightDecl {
    name: String,
    rows: usize,
    cols: usize,
    usage: Use,
}

impl WeightDecl {
    fn in_out(&self) -> (usize, usize) {
        match self.usage {
            Use::Forward => (self.cols, self.rows),
            Use::Transposed => (self.rows, self.cols),
        }
    }
}

/// Handle to a declared weight.
#[derive(Clone, Copy, Debug)]
pub struct WeightId(usize);

/// Handle to a declared vector parameter (a bias, a norm weight): `len`
/// values, one per channel, read as a `[1, len, 1, 1]` tensor.
#[derive(Clone, Copy, Debug)]
pub struct VectorId(usize);

/// Builds one kernel: declare activations and weights, call [`KernelBuilder::begin`],
/// write the body with the returned tensors, declare outputs, [`KernelBuilder::finish`].
pub struct KernelBuilder<'w> {
    name: String,
    opts: KernelOptions,
    seq: usize,
    b: Builder,
    acts: Vec<(String, usize)>,
    weights: Vec<WeightDecl>,
    /// Vector parameters: name and length.
    vectors: Vec<(String, usize)>,
    /// Baked values by weight name (the parameter as stored), for `WeightMode::Baked`.
    baked: &'w dyn Fn(&str) -> Option<Vec<f32>>,
    act_tensors: Vec<Tensor>,
    /// Per weight: its input tensor, and whether it holds `M = [in, out]` (else the
    /// `[out, in]` form that the kernel transposes).
    weight_tensors: Vec<Option<(Tensor, bool)>>,
    /// Per vector: its `[1, len, 1, 1]` tensor.
    vector_tensors: Vec<Tensor>,
    inputs: Vec<TensorSlot>,
    outputs: Vec<(String, Tensor)>,
    blobs: BTreeMap<String, BlobWriter>,
}

fn no_baked(_: &str) -> Option<Vec<f32>> {
    None
}

impl<'w> KernelBuilder<'w> {
    pub fn new(name: &str, opts: KernelOptions, seq: usize) -> KernelBuilder<'static> {
        KernelBuilder {
            name: name.to_string(),
            opts,
            seq,
            b: Builder::new(opts.dialect),
            acts: Vec::new(),
            weights: Vec::new(),
            vectors: Vec::new(),
            baked: &no_baked,
            act_tensors: Vec::new(),
            weight_tensors: Vec::new(),
            vector_tensors: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            blobs: BTreeMap::new(),
        }
    }

    /// Supply weight values for `WeightMode::Baked` (parameter as stored, by slot name).
    pub fn with_baked<'v>(self, baked: &'v dyn Fn(&str) -> Option<Vec<f32>>) -> KernelBuilder<'v>
    where
        'w: 'v,
    {
        KernelBuilder { baked, ..self }
    }

    /// Declare an activation input `(channels, T)`; returns its index for `begin`'s result.
    pub fn act(&mut self, name: &str, channels: usize) -> usize {
        self.acts.push((name.to_string(), channels));
        self.acts.len() - 1
    }

    fn weight(&mut self, name: &str, rows: usize, cols: usize, usage: Use) -> WeightId {
        self.weights.push(WeightDecl {
            name: name.to_string(),
            rows,
            cols,
            usage,
        });
        WeightId(self.weights.len() - 1)
    }

    /// Declare a weight `W (rows, cols)` used as `y = W x`.
    pub fn weight_forward(&mut self, name: &str, rows: usize, cols: usize) -> WeightId {
        self.weight(name, rows, cols, Use::Forward)
    }

    /// Declare a weight `W (rows, cols)` used as `y = W^T x`.
    pub fn weight_transposed(&mut self, name: &str, rows: usize, cols: usize) -> WeightId {
        self.weight(name, rows, cols, Use::Transposed)
    }

    /// Declare a vector parameter of `len` values (a bias, a norm weight).
    /// Its slot holds it as a column `(len, 1)`: one input `[1, len, 1, 1]`, a
    /// column of the packed input (`len` at most its channel count), or a
    /// BLOBFILE constant when baked.
    pub fn vector(&mut self, name: &str, len: usize) -> VectorId {
        self.vectors.push((name.to_string(), len));
        VectorId(self.vectors.len() - 1)
    }

    /// The `[1, len, 1, 1]` tensor of a declared vector (after `begin`).
    pub fn vector_tensor(&self, v: VectorId) -> Tensor {
        self.vector_tensors[v.0].clone()
    }

    fn dtype(&self) -> DType {
        self.opts.dtype
    }

    /// Create the function inputs and the slices that unpack them. Returns the
    /// activation tensors `[1, C, 1, T]` in declaration order.
    pub fn begin(&mut self) -> Result<Vec<Tensor>> {
        let dtype = self.dtype();
        let seq = self.seq;
        // Weight slot orientation: the `[1, in, 1, out]` form needs no in-kernel
        // transpose; in packed mode the channel count decides. With separate
        // inputs (the CPU's mode) a weight is passed as stored, so the host never
        // transposes it: the CPU backend folds the in-kernel transpose into the matmul.
        let packed_channels = self.pack_axis()?;
        let mut items: Vec<(String, SlotRole, usize, usize)> = Vec::new(); // name, role, rows, cols
        let mut m_forms = Vec::new();
        for (name, channels) in &self.acts {
            items.push((name.clone(), SlotRole::Activation, *channels, seq));
        }
        for w in &self.weights {
            if self.opts.mode == WeightMode::Baked {
                continue;
            }
            let (inp, out) = w.in_out();
            let m_form = match packed_channels {
                Some(PackAxis::Width(c)) => inp == c,
                None if self.opts.mode == WeightMode::Inputs => w.usage == Use::Transposed,
                _ => true,
            };
            // The `[in, out]` matrix M is W^T for forward use and W for transposed use.
            let (transposed, rows, cols) = if m_form {
                (w.usage == Use::Forward, inp, out)
            } else {
                (w.usage == Use::Transposed, out, inp)
            };
            items.push((w.name.clone(), SlotRole::Weight { transposed }, rows, cols));
            m_forms.push(m_form);
        }
        let n_weight_items = m_forms.len();
        if self.opts.mode != WeightMode::Baked {
            for (name, len) in &self.vectors {
                items.push((
                    name.clone(),
                    SlotRole::Weight { transposed: false },
                    *len,
                    1,
                ));
            }
        }
        let mut tensors = Vec::new();
        match packed_channels {
            None => {
                for (i, (name, role, rows, cols)) in items.iter().enumerate() {
                    let t = self.b.input(name, dtype, &[1, *rows, 1, *cols]);
                    self.inputs
                        .push(tensor_slot(name, *role, i, 0, *rows, 0, *cols));
                    tensors.push(t);
                }
            }
            Some(axis) => {
                let (channels, width) = match axis {
                    PackAxis::Width(c) => (c, items.iter().map(|i| i.3).sum()),
                    PackAxis::Channels(w) => (items.iter().map(|i| i.2).sum(), w),
                };
                // ANE-bound: spare rows and columns up to the I/O rules
                // (mil::layout); the slices below never read them.
                let (channels, width) = if self.ane_layout() {
                    layout::padded_io(channels, 1, width, dtype)
                } else {
                    (channels, width)
                };
                let x = self.b.input("x", dtype, &[1, channels, 1, width]);
                let mut offset = 0;
                for (name, role, rows, cols) in &items {
                    let (begin, s) = match axis {
                        PackAxis::Width(_) => (
                            vec![0, 0, 0, offset],
                            tensor_slot(name, *role, 0, 0, *rows, offset, *cols),
                        ),
                        PackAxis::Channels(_) => (
                            vec![0, offset, 0, 0],
                            tensor_slot(name, *role, 0, offset, *rows, 0, *cols),
                        ),
                    };
                    offset += if matches!(axis, PackAxis::Width(_)) {
                        *cols
                    } else {
                        *rows
                    };
                    self.b.name_next(name);
                    let t = self.b.slice_by_size(&x, &begin, &[1, *rows, 1, *cols]);
                    self.inputs.push(s);
                    tensors.push(t);
                }
            }
        }
        let n_acts = self.acts.len();
        self.act_tensors = tensors[..n_acts].to_vec();
        let vector_tensors = tensors.split_off(n_acts + n_weight_items);
        self.vector_tensors = match self.opts.mode {
            WeightMode::Baked => self.baked_vectors()?,
            _ => vector_tensors,
        };
        let mut rest = tensors[n_acts..].iter().cloned().zip(m_forms);
        self.weight_tensors = (0..self.weights.len())
            .map(|_| {
                if self.opts.mode == WeightMode::Baked {
                    None
                } else {
                    rest.next()
                }
            })
            .collect();
        Ok(self.act_tensors.clone())
    }

    /// Whether the kernel is built for the ANE's surfaces: fp16 I/O packed
    /// into one input and one output (`Packed` or `Baked`). Its I/O is then
    /// padded to the ANE's rules (`mil::layout`, rules ANE009/ANE010/ANE015/ANE016);
    /// fp32 and `Inputs` kernels are the CPU's and keep their exact shapes.
    fn ane_layout(&self) -> bool {
        ane_bound(self.opts)
    }

    /// The causal mask table `mask` `[1, 1, T, K]` over the kernel's
    /// [`softmax_keys`] `K` (`T`, or a power of two for the ANE).
    pub fn causal_mask_table(&mut self) -> Tensor {
        let (seq, keys) = (self.seq, softmax_keys(self.seq, self.opts));
        let values = causal_mask_keys(seq, keys);
        self.table("mask", &[1, 1, seq, keys], &values)
    }

    /// The weight file of a baked tensor or table named `name`: all of a
    /// program's records in one `weight.bin`, as the reference's benchmarks
    /// write them (rule ANE021); in the ios16 dialect of M1/M2, which took only
    /// one record per file (ANE013), a file per tensor.
    fn blob_file(&self, name: &str) -> String {
        match self.opts.dialect {
            Dialect::Ios16 => format!("{name}.bin"),
            Dialect::Ios18 => "weight.bin".to_string(),
        }
    }

    /// How the inputs are packed into one. Packed mode: everything shares the
    /// channel count (concatenate along width), or, for weight-free kernels,
    /// the width (concatenate along channels). Baked mode: the activations
    /// along channels, when there are several or the ANE's rules need padding.
    fn pack_axis(&self) -> Result<Option<PackAxis>> {
        if self.opts.mode == WeightMode::Baked {
            let rows: usize = self.acts.iter().map(|a| a.1).sum();
            let pad = self.ane_layout()
                && layout::padded_io(rows, 1, self.seq, self.dtype()) != (rows, self.seq);
            return Ok((self.acts.len() > 1 || pad).then_some(PackAxis::Channels(self.seq)));
        }
        if self.opts.mode != WeightMode::Packed {
            return Ok(None);
        }
        if self.weights.is_empty() && self.vectors.is_empty() {
            return Ok(Some(PackAxis::Channels(self.seq)));
        }
        let c = self.acts.first().map(|a| a.1).ok_or_else(|| {
            Error::Invalid(format!(
                "kernel {}: packed mode needs an activation",
                self.name
            ))
        })?;
        for (name, channels) in &self.acts {
            if *channels != c {
                return Err(Error::Invalid(format!(
                    "kernel {}: packed activation `{name}` has {channels} channels, expected {c}",
                    self.name
                )));
            }
        }
        for w in &self.weights {
            let (inp, out) = w.in_out();
            if inp != c && out != c {
                return Err(Error::Invalid(format!(
                    "kernel {}: weight `{}` ({} x {}) fits neither way into {c} channels",
                    self.name, w.name, w.rows, w.cols
                )));
            }
        }
        if let Some((name, len)) = self.vectors.iter().find(|(_, len)| *len > c) {
            return Err(Error::Invalid(format!(
                "kernel {}: vector `{name}` ({len} values) is longer than the packed input's {c} channels",
                self.name
            )));
        }
        Ok(Some(PackAxis::Width(c)))
    }

    /// `WeightMode::Baked`: every vector as a BLOBFILE constant `[1, len, 1, 1]`.
    fn baked_vectors(&mut self) -> Result<Vec<Tensor>> {
        let vectors = self.vectors.clone();
        vectors
            .iter()
            .map(|(name, len)| {
                let values = (self.baked)(name).ok_or_else(|| {
                    Error::Invalid(format!(
                        "kernel {}: no baked value for vector `{name}`",
                        self.name
                    ))
                })?;
                if values.len() != *len {
                    return Err(Error::Invalid(format!(
                        "kernel {}: baked vector `{name}` has {} values, expected {len}",
                        self.name,
                        values.len()
                    )));
                }
                Ok(self.table(name, &[1, *len, 1, 1], &values))
            })
            .collect()
    }

    /// The builder, for the kernel body.
    pub fn b(&mut self) -> &mut Builder {
        &mut self.b
    }

    /// `y = A x` for `x` `[1, in, 1, T]` with `A` the declared use of weight `w`.
    pub fn linear(&mut self, x: &Tensor, w: WeightId) -> Result<Tensor> {
        let decl = self.weights[w.0].clone();
        let (inp, out) = decl.in_out();
        if self.opts.mode == WeightMode::Baked {
            let values = (self.baked)(&decl.name).ok_or_else(|| {
                Error::Invalid(format!(
                    "kernel {}: no baked value for weight `{}`",
                    self.name, decl.name
                ))
            })?;
            // conv weight [out, in, 1, 1] = A.
            let a = match decl.usage {
                Use::Forward => values,
                Use::Transposed => transpose(&values, decl.rows, decl.cols),
            };
            let file = self.blob_file(&decl.name);
            let dtype = self.dtype();
            let writer = self.blobs.entry(file.clone()).or_default();
            let offset = match dtype {
                DType::Fp16 => writer.add_fp16(&a),
                _ => writer.add_fp32(&a),
            };
            self.b.name_next(&decl.name);
            let weight = self
                .b
                .blob_const(TensorType::new(dtype, [out, inp, 1, 1]), &file, offset);
            return Ok(self.b.linear_conv1x1(x, &weight));
        }
        let (t, m_form) = self.weight_tensors[w.0]
            .clone()
            .expect("weight tensor after begin");
        let m = if m_form {
            t
        } else {
            // Stored `[1, out, 1, in]`: transpose to `[1, in, 1, out]` inside the kernel.
            let r = self.b.reshape(&t, &[1, 1, out, inp]);
            let tr = self.b.transpose(&r, &[0, 1, 3, 2]);
            self.b.reshape(&tr, &[1, inp, 1, out])
        };
        Ok(self.b.linear_dynamic(x, &m))
    }

    /// A constant `[1, 1, rows, cols]`-shaped table stored as a BLOBFILE.
    pub fn table(&mut self, name: &str, shape: &[usize], values: &[f32]) -> Tensor {
        let dtype = self.dtype();
        let file = self.blob_file(name);
        let writer = self.blobs.entry(file.clone()).or_default();
        let offset = match dtype {
            DType::Fp16 => writer.add_fp16(values),
            _ => writer.add_fp32(values),
        };
        self.b.name_next(name);
        self.b
            .blob_const(TensorType::new(dtype, shape.to_vec()), &file, offset)
    }

    /// Declare an output `[1, C, 1, T]`.
    pub fn output(&mut self, name: &str, t: Tensor) {
        self.outputs.push((name.to_string(), t));
    }

    /// Finish: a single output in the packed and baked modes (the outputs
    /// concatenated along channels, padded to the ANE's rules when ANE-bound),
    /// one per tensor in the inputs mode.
    pub fn finish(mut self) -> Result<KernelSpec> {
        let mut slots = Vec::new();
        let rows: usize = self.outputs.iter().map(|(_, t)| t.shape()[1]).sum();
        let pad =
            self.ane_layout() && layout::output_needs_padding(rows, 1, self.seq, self.dtype());
        if self.opts.mode != WeightMode::Inputs && (self.outputs.len() > 1 || pad) {
            let mut row = 0;
            for (name, t) in &self.outputs {
                let (rows, cols) = (t.shape()[1], t.shape()[3]);
                slots.push(tensor_slot(
                    name,
                    SlotRole::Activation,
                    0,
                    row,
                    rows,
                    0,
                    cols,
                ));
                row += rows;
            }
            let parts: Vec<Tensor> = self.outputs.iter().map(|(_, t)| t.clone()).collect();
            let refs: Vec<&Tensor> = parts.iter().collect();
            let y = if self.ane_layout() {
                self.b.padded_output(&refs, "y")
            } else {
                self.b.name_next("y");
                self.b.concat(&refs, 1)
            };
            self.b.output(&y);
        } else {
            for (i, (name, t)) in self.outputs.iter().enumerate() {
                let (rows, cols) = (t.shape()[1], t.shape()[3]);
                slots.push(tensor_slot(name, SlotRole::Activation, i, 0, rows, 0, cols));
                self.b.output(t);
            }
        }
        let program = self.b.finish();
        let weights = self.blobs.into_iter().map(|(f, w)| (f, w.finish()));
        let package = ProgramPackage::from_program(&program, weights);
        let baked = match self.opts.mode {
            WeightMode::Baked => (self.weights.iter().map(|w| w.name.clone()))
                .chain(self.vectors.iter().map(|(name, _)| name.clone()))
                .collect(),
            _ => Vec::new(),
        };
        Ok(KernelSpec {
            name: self.name,
            program,
            package,
            inputs: self.inputs,
            outputs: slots,
            baked,
        })
    }
}

#[derive(Clone, Copy, Debug)]
enum PackAxis {
    /// All inputs have this many channels; concatenate along width.
    Width(usize),
    /// All inputs have this width; concatenate along channels.
    Channels(usize),
}

fn tensor_slot(
    name: &str,
    role: SlotRole,
    buffer: usize,
    row: usize,
    rows: usize,
    col: usize,
    cols: usize,
) -> TensorSlot {
    TensorSlot {
        name: name.to_string(),
        role,
        buffer,
        row,
        rows,
        col,
        cols,
    }
}

/// `(rows, cols)` row-major -> `(cols, rows)` row-major.
pub fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; a.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = a[r * cols + c];
        }
    }
    out
}

/// Unscaled RoPE tables `[1, 1, T, D]`: entries `2i` and `2i+1` of row `p` hold
/// `cos(p * theta^(-2i/D))` (resp. `sin`), llama2.c's interleaved pairs
/// ([`crate::model::rope::tables`]; a config's own are [`rope_tables_of`]).
pub fn rope_tables(seq: usize, head_dim: usize, theta: f32) -> (Vec<f32>, Vec<f32>) {
    let freqs = rope::inv_freq(head_dim, theta as f64, &rope::RopeScaling::None);
    rope::tables(seq, &freqs)
}

/// The RoPE tables `[1, 1, T, D]` of `config` (its theta and scaling) for `seq` positions.
pub fn rope_tables_of(config: &ModelConfig, seq: usize) -> (Vec<f32>, Vec<f32>) {
    rope::tables(seq, &config.rope_inv_freq())
}

/// The additive causal mask `[1, 1, T, T]`: 0 on and below the diagonal, -65504 above.
pub fn causal_mask(seq: usize) -> Vec<f32> {
    causal_mask_keys(seq, seq)
}

/// The additive causal mask `[1, 1, T, K]` over `K >= T` keys: 0 where key
/// `j <= ` position `i`, -65504 elsewhere, so the `K - T` padding keys are
/// masked in every row.
pub fn causal_mask_keys(seq: usize, keys: usize) -> Vec<f32> {
    (0..seq * keys)
        .map(|i| if i % keys <= i / keys { 0.0 } else { -65504.0 })
        .collect()
}

/// How many keys the attention softmax of a kernel built with `opts` runs
/// over at window `seq`: `seq` itself, or, for ANE-bound kernels (fp16,
/// packed or baked), `seq` rounded up to a power of two (rule ANE024: softmax
/// over other sizes failed to compile), the extra keys masked. The CPU's
/// kernels are never padded.
pub fn softmax_keys(seq: usize, opts: KernelOptions) -> usize {
    if ane_bound(opts) {
        seq.next_power_of_two()
    } else {
        seq
    }
}

/// Whether kernels built with `opts` are the ANE's: fp16 I/O packed into one
/// input and one output (`Packed` or `Baked`); fp32 and `Inputs` kernels are
/// the CPU's.
fn ane_bound(opts: KernelOptions) -> bool {
    opts.dtype == DType::Fp16 && opts.mode != WeightMode::Inputs
}

/// `rot(x)` for `x` `[1, H, T, D]`: pairs `(a, b)` -> `(-b, a)`.
fn rotate_pairs(b: &mut Builder, x: &Tensor) -> Tensor {
    let s = x.shape().to_vec();
    let (h, t, d) = (s[1], s[2], s[3]);
    let pairs = b.reshape(x, &[1, h, t * d / 2, 2]);
    let even = b.slice_by_size(&pairs, &[0, 0, 0, 0], &[1, h, t * d / 2, 1]);
    let odd = b.slice_by_size(&pairs, &[0, 0, 0, 1], &[1, h, t * d / 2, 1]);
    let minus_one = b.scalar(x.dtype(), -1.0);
    let neg_odd = b.mul(&odd, &minus_one);
    let rotated = b.concat(&[&neg_odd, &even], 3);
    b.reshape(&rotated, &[1, h, t, d])
}

/// RoPE forward: `x cos + rot(x) sin`.
fn rope(b: &mut Builder, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let xc = b.mul(x, cos);
    let r = rotate_pairs(b, x);
    let rs = b.mul(&r, sin);
    b.add(&xc, &rs)
}

/// RoPE backward (the rotation is orthogonal): `dy cos - rot(dy sin)`.
fn rope_backward(b: &mut Builder, dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let dc = b.mul(dy, cos);
    let ds = b.mul(dy, sin);
    let r = rotate_pairs(b, &ds);
    b.sub(&dc, &r)
}

/// `[1, KVH, T, D]` -> `[1, KVH*g, T, D]` with query head `h` reading kv head `h / g`.
fn expand_kv(b: &mut Builder, x: &Tensor, group: usize) -> Tensor {
    if group == 1 {
        return x.clone();
    }
    let s = x.shape().to_vec();
    let (kvh, t, d) = (s[1], s[2], s[3]);
    let flat = b.reshape(x, &[1, kvh, 1, t * d]);
    let copies: Vec<&Tensor> = (0..group).map(|_| &flat).collect();
    let tiled = b.concat(&copies, 2);
    b.reshape(&tiled, &[1, kvh * group, t, d])
}

/// Backward of [`expand_kv`]: sum the gradients of each group's query heads.
fn reduce_kv(b: &mut Builder, dx: &Tensor, group: usize) -> Tensor {
    if group == 1 {
        return dx.clone();
    }
    let s = dx.shape().to_vec();
    let (h, t, d) = (s[1], s[2], s[3]);
    let grouped = b.reshape(dx, &[1, h / group, group, t * d]);
    let summed = b.reduce_sum(&grouped, &[2], true);
    b.reshape(&summed, &[1, h / group, t, d])
}

fn rope_consts(k: &mut KernelBuilder, config: &ModelConfig, seq: usize) -> (Tensor, Tensor) {
    let (cos, sin) = rope_tables_of(config, seq);
    let shape = [1, 1, seq, config.head_dim];
    (
        k.table("rope_cos", &shape, &cos),
        k.table("rope_sin", &shape, &sin),
    )
}

/// The kernels of one layer (see the module docs), one `T` per kernel: the
/// set's declaration ([`LAYER_KERNELS`]), the specs it builds, an engine's
/// compiled kernels, their names (`LAYER_KERNELS.map(|decl| decl.name)`).
/// Everything about the set maps its declaration, so a kernel is added in one
/// place (and its builder).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerKernels<T> {
    pub attn_fwd: T,
    pub wo_fwd: T,
    pub ffn_fwd: T,
    pub ffn_bwd_w2: T,
    pub ffn_bwd_w13: T,
    pub wo_bwd: T,
    pub attn_bwd: T,
    pub q_bwd: T,
    pub kv_bwd: T,
}

/// How many kernels a layer has (the fields of [`LayerKernels`]).
pub const KERNELS_PER_LAYER: usize = 9;

/// The layer's kernel set: each kernel's name, how it is built and whether it
/// reads weights.
pub const LAYER_KERNELS: LayerKernels<KernelDecl> = LayerKernels {
    attn_fwd: KernelDecl::with_weights("attn_fwd", attn_fwd),
    wo_fwd: KernelDecl::with_weights("wo_fwd", wo_fwd),
    ffn_fwd: KernelDecl::with_weights("ffn_fwd", ffn_fwd),
    ffn_bwd_w2: KernelDecl::with_weights("ffn_bwd_w2", ffn_bwd_w2),
    ffn_bwd_w13: KernelDecl::with_weights("ffn_bwd_w13", ffn_bwd_w13),
    wo_bwd: KernelDecl::with_weights("wo_bwd", wo_bwd),
    attn_bwd: KernelDecl {
        name: "attn_bwd",
        build: |config, seq, opts, _| attn_bwd(config, seq, opts),
        reads_weights: false,
        split: Some(SplitDecl {
            parts: &ATTN_BWD_PARTS,
            build: attn_bwd_split,
        }),
    },
    q_bwd: KernelDecl::with_weights("q_bwd", q_bwd),
    kv_bwd: KernelDecl::with_weights("kv_bwd", kv_bwd),
};

/// One kernel of the set: its name (the built spec's), its builder (`baked`
/// supplies weight values by slot name for `WeightMode::Baked`), whether it
/// reads weights, in which case a `Baked` kernel is compiled again whenever
/// they change, and the kernels that compute it where a device refuses it
/// whole, if it has such a split.
#[derive(Clone, Copy, Debug)]
pub struct KernelDecl {
    pub name: &'static str,
    pub build: fn(&ModelConfig, usize, KernelOptions, Baked) -> Result<KernelSpec>,
    pub reads_weights: bool,
    pub split: Option<SplitDecl>,
}

/// A kernel's split: the kernels that, run in order, compute what it does
/// (their names, and their builder). The host passes what one part writes to
/// the next (`train::stages`); the parts read no weights the whole does not.
#[derive(Clone, Copy, Debug)]
pub struct SplitDecl {
    pub parts: &'static [&'static str],
    pub build: fn(&ModelConfig, usize, KernelOptions, Baked) -> Result<Vec<KernelSpec>>,
}

impl KernelDecl {
    const fn with_weights(
        name: &'static str,
        build: fn(&ModelConfig, usize, KernelOptions, Baked) -> Result<KernelSpec>,
    ) -> KernelDecl {
        KernelDecl {
            name,
            build,
            reads_weights: true,
            split: None,
        }
    }
}

impl<T> LayerKernels<T> {
    /// Apply `f` to every kernel, in declaration order, stopping at the first error.
    pub fn try_map<U, E>(
        self,
        mut f: impl FnMut(T) -> std::result::Result<U, E>,
    ) -> std::result::Result<LayerKernels<U>, E> {
        Ok(LayerKernels {
            attn_fwd: f(self.attn_fwd)?,
            wo_fwd: f(self.wo_fwd)?,
            ffn_fwd: f(self.ffn_fwd)?,
            ffn_bwd_w2: f(self.ffn_bwd_w2)?,
            ffn_bwd_w13: f(self.ffn_bwd_w13)?,
            wo_bwd: f(self.wo_bwd)?,
            attn_bwd: f(self.attn_bwd)?,
            q_bwd: f(self.q_bwd)?,
            kv_bwd: f(self.kv_bwd)?,
        })
    }

    /// Apply `f` to every kernel, in declaration order.
    pub fn map<U>(self, mut f: impl FnMut(T) -> U) -> LayerKernels<U> {
        let mapped = self.try_map(|kernel| Ok::<U, std::convert::Infallible>(f(kernel)));
        match mapped {
            Ok(kernels) => kernels,
            Err(never) => match never {},
        }
    }

    /// Pair every kernel with `other`'s of the same name.
    pub fn zip<U>(self, other: LayerKernels<U>) -> LayerKernels<(T, U)> {
        let mut other = other.into_array().into_iter();
        self.map(|kernel| (kernel, other.next().expect("both sets have every kernel")))
    }

    pub fn as_ref(&self) -> LayerKernels<&T> {
        LayerKernels {
            attn_fwd: &self.attn_fwd,
            wo_fwd: &self.wo_fwd,
            ffn_fwd: &self.ffn_fwd,
            ffn_bwd_w2: &self.ffn_bwd_w2,
            ffn_bwd_w13: &self.ffn_bwd_w13,
            wo_bwd: &self.wo_bwd,
            attn_bwd: &self.attn_bwd,
            q_bwd: &self.q_bwd,
            kv_bwd: &self.kv_bwd,
        }
    }

    /// The kernels in declaration order: the forward ones, then the backward ones.
    pub fn into_array(self) -> [T; KERNELS_PER_LAYER] {
        [
            self.attn_fwd,
            self.wo_fwd,
            self.ffn_fwd,
            self.ffn_bwd_w2,
            self.ffn_bwd_w13,
            self.wo_bwd,
            self.attn_bwd,
            self.q_bwd,
            self.kv_bwd,
        ]
    }

    /// The kernels in declaration order.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.as_ref().into_array().into_iter()
    }
}

impl LayerKernels<KernelSpec> {
    /// Build every kernel of [`LAYER_KERNELS`] for `config` at sequence length
    /// `seq`. `baked` supplies weight values by slot name (`wq`, `wk`, ...) for
    /// `WeightMode::Baked`.
    pub fn build(
        config: &ModelConfig,
        seq: usize,
        opts: KernelOptions,
        baked: Baked,
    ) -> Result<LayerKernels<KernelSpec>> {
        LAYER_KERNELS.try_map(|decl| (decl.build)(config, seq, opts, baked))
    }
}

/// What a compile plan needs to know about the kernel set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelCounts {
    /// Kernels compiled once per layer shape (all of them).
    pub kernels: usize,
    /// Those that read weights: a `Baked` one is compiled again after every update.
    pub reading_weights: usize,
    /// Successful compiles the set may take at start: every kernel once, a
    /// kernel with a split as its parts when the device refuses it whole
    /// (the refused compile is not counted, as the ANE backend's budget
    /// does not count it).
    pub most_compiles: usize,
}

/// The counts of [`LAYER_KERNELS`], from which a compile plan is made.
pub fn kernel_counts() -> KernelCounts {
    KernelCounts {
        kernels: LAYER_KERNELS.iter().count(),
        reading_weights: LAYER_KERNELS
            .iter()
            .filter(|decl| decl.reads_weights)
            .count(),
        most_compiles: LAYER_KERNELS
            .iter()
            .map(|decl| decl.split.map_or(1, |split| split.parts.len().max(1)))
            .sum(),
    }
}

/// Weight values by slot name for `WeightMode::Baked` (`None`: not baked).
pub type Baked<'a> = &'a dyn Fn(&str) -> Option<Vec<f32>>;

/// `(rows, cols)` of the tensor a layer kernel's weight or vector slot
/// `name` holds in `config` (as the parameter is stored; vectors `(n, 1)`),
/// for anything that makes baked values; `None` for another name.
pub fn slot_shape(config: &ModelConfig, name: &str) -> Option<(usize, usize)> {
    let (d, q, kv, f) = (
        config.dim,
        config.q_dim(),
        config.kv_dim(),
        config.hidden_dim,
    );
    Some(match name {
        "wq" => (q, d),
        "wk" | "wv" => (kv, d),
        "wo" => (d, q),
        "w1" | "w3" => (f, d),
        "w2" => (d, f),
        "bq" => (q, 1),
        "bk" | "bv" => (kv, 1),
        "q_norm" | "k_norm" => (config.head_dim, 1),
        _ => return None,
    })
}

/// Attention forward: QKV projections (plus their biases with `qkv_bias`),
/// QK-norm per head (with `qk_norm`; `q_lin`, `k_lin` are then saved for its
/// backward), RoPE, causal softmax attention per head.
pub fn attn_fwd(
    config: &ModelConfig,
    seq: usize,
    opts: KernelOptions,
    baked: Baked,
) -> Result<KernelSpec> {
    let (dim, q_dim, kv_dim) = (config.dim, config.q_dim(), config.kv_dim());
    let mut kernel = KernelBuilder::new("attn_fwd", opts, seq).with_baked(baked);
    kernel.act("xn", dim);
    let wq = kernel.weight_forward("wq", q_dim, dim);
    let wk = kernel.weight_forward("wk", kv_dim, dim);
    let wv = kernel.weight_forward("wv", kv_dim, dim);
    let biases = config.qkv_bias.then(|| {
        [
            kernel.vector("bq", q_dim),
            kernel.vector("bk", kv_dim),
            kernel.vector("bv", kv_dim),
        ]
    });
    let norms = config.qk_norm.then(|| {
        [
            kernel.vector("q_norm", config.head_dim),
            kernel.vector("k_norm", config.head_dim),
        ]
    });
    let deltas = opts.deltas;
    let delta_acts = [
        (deltas.q, "q_delta", q_dim),
        (deltas.k, "k_delta", kv_dim),
        (deltas.v, "v_delta", kv_dim),
    ]
    .map(|(on, name, channels)| on.then(|| kernel.act(name, channels)));
    let acts = kernel.begin()?;
    let xn = &acts[0];
    let mut qp = kernel.linear(xn, wq)?;
    let mut kp = kernel.linear(xn, wk)?;
    let mut vp = kernel.linear(xn, wv)?;
    if let Some([bq, bk, bv]) = biases {
        let (bq, bk, bv) = (
            kernel.vector_tensor(bq),
            kernel.vector_tensor(bk),
            kernel.vector_tensor(bv),
        );
        let builder = kernel.b();
        qp = builder.add(&qp, &bq);
        kp = builder.add(&kp, &bk);
        vp = builder.add(&vp, &bv);
    }
    for (projection, delta) in [&mut qp, &mut kp, &mut vp].into_iter().zip(delta_acts) {
        if let Some(index) = delta {
            *projection = kernel.b().add(projection, &acts[index]);
        }
    }
    // With QK-norm the projections' outputs are saved for its backward.
    let mut lin = None;
    if let Some([q_norm, k_norm]) = norms {
        let (q_norm, k_norm) = (kernel.vector_tensor(q_norm), kernel.vector_tensor(k_norm));
        let eps = config.norm_eps;
        let builder = kernel.b();
        let q_normed = head_rmsnorm(builder, &qp, &q_norm, config.n_heads, eps);
        let k_normed = head_rmsnorm(builder, &kp, &k_norm, config.n_kv_heads, eps);
        lin = Some((
            std::mem::replace(&mut qp, q_normed),
            std::mem::replace(&mut kp, k_normed),
        ));
    }
    let (cos, sin) = rope_consts(&mut kernel, config, seq);
    let mask = kernel.causal_mask_table();
    let builder = kernel.b();
    let qh = builder.split_heads(&qp, config.n_heads);
    let kh = builder.split_heads(&kp, config.n_kv_heads);
    let vh = builder.split_heads(&vp, config.n_kv_heads);
    let qr = rope(builder, &qh, &cos, &sin);
    let kr = rope(builder, &kh, &cos, &sin);
    let kx = expand_kv(builder, &kr, config.gqa_ratio());
    let vx = expand_kv(builder, &vh, config.gqa_ratio());
    let scale = 1.0 / (config.head_dim as f32).sqrt();
    let (att, _) = builder.causal_attention(&qr, &kx, &vx, &mask, scale);
    let attn = builder.merge_heads(&att);
    let q_rope = builder.merge_heads(&qr);
    let k_rope = builder.merge_heads(&kr);
    kernel.output("attn", attn);
    kernel.output("q_rope", q_rope);
    kernel.output("k_rope", k_rope);
    kernel.output("v", vp);
    if let Some((q_lin, k_lin)) = lin {
        kernel.output("q_lin", q_lin);
        kernel.output("k_lin", k_lin);
    }
    kernel.finish()
}

/// Attention backward (weight-free): recompute probabilities from `q_rope`,
/// `k_rope`; `dV = P^T dO`, `dP = dO V^T`, `dS = P (dP - rowsum(dP P))`,
/// `dQ = dS K s`, `dK = dS^T Q s`; GQA sums; RoPE backward to pre-RoPE q and k.
/// Where a chip refuses it, [`attn_bwd_split`] computes the same in two kernels.
pub fn attn_bwd(config: &ModelConfig, seq: usize, opts: KernelOptions) -> Result<KernelSpec> {
    let mut kernel = KernelBuilder::new("attn_bwd", opts, seq);
    let acts = attn_bwd_acts(&mut kernel, config)?;
    let (cos, sin) = rope_consts(&mut kernel, config, seq);
    let mask = kernel.causal_mask_table();
    let heads = AttnHeads::new(kernel.b(), config, &acts[0], &acts[1]);
    let builder = kernel.b();
    let (dv, probs, dp) = heads.probs_and_dv(builder, &acts[2], &acts[3], &mask);
    let (dq, dk) = heads.scores_backward(builder, &probs, &dp, &cos, &sin);
    kernel.output("dq", dq);
    kernel.output("dk", dk);
    kernel.output("dv", dv);
    kernel.finish()
}

/// The attention backward in two kernels, as the reference splits it
/// (`sdpaBwd1`/`sdpaBwd2`, ane-reference §5.5.2) for chips whose compiler
/// refuses the fused [`attn_bwd`]: [`attn_bwd_dv`] (probabilities, `dV`,
/// `dP`) then [`attn_bwd_dqk`] (`dS`, `dQ`, `dK`). The probabilities and
/// their gradient, `H*T x T` each, travel between them through memory; the
/// ops and their order are the fused kernel's, so the numbers are its.
pub fn attn_bwd_split(
    config: &ModelConfig,
    seq: usize,
    opts: KernelOptions,
    _: Baked,
) -> Result<Vec<KernelSpec>> {
    Ok(vec![
        attn_bwd_dv(config, seq, opts)?,
        attn_bwd_dqk(config, seq, opts)?,
    ])
}

/// The names of [`attn_bwd_split`]'s kernels, in the order they run.
pub const ATTN_BWD_PARTS: [&str; 2] = ["attn_bwd_dv", "attn_bwd_dqk"];

/// The first half of the split attention backward: from `q_rope`, `k_rope`,
/// `v`, `dattn` (as [`attn_bwd`] reads them) the probabilities `probs` and
/// their gradient `dp` (`H*T x T` each: row `h*T + i` holds query `i` of head
/// `h` over the keys), and `dv` (GQA-summed).
pub fn attn_bwd_dv(config: &ModelConfig, seq: usize, opts: KernelOptions) -> Result<KernelSpec> {
    let mut kernel = KernelBuilder::new(ATTN_BWD_PARTS[0], opts, seq);
    let acts = attn_bwd_acts(&mut kernel, config)?;
    let mask = kernel.causal_mask_table();
    let heads = AttnHeads::new(kernel.b(), config, &acts[0], &acts[1]);
    let builder = kernel.b();
    let (dv, probs, dp) = heads.probs_and_dv(builder, &acts[2], &acts[3], &mask);
    let rows = [1, config.n_heads * seq, 1, seq];
    let probs = builder.reshape(&probs, &rows);
    let dp = builder.reshape(&dp, &rows);
    kernel.output("dv", dv);
    kernel.output("probs", probs);
    kernel.output("dp", dp);
    kernel.finish()
}

/// The second half of the split attention backward: from [`attn_bwd_dv`]'s
/// `probs`, `dp` and the saved `q_rope`, `k_rope`, the gradients `dq`, `dk`
/// (before RoPE, GQA-summed), as [`attn_bwd`] writes them.
pub fn attn_bwd_dqk(config: &ModelConfig, seq: usize, opts: KernelOptions) -> Result<KernelSpec> {
    let mut kernel = KernelBuilder::new(ATTN_BWD_PARTS[1], opts, seq);
    let scores = config.n_heads * seq;
    kernel.act("probs", scores);
    kernel.act("dp", scores);
    kernel.act("q_rope", config.q_dim());
    kernel.act("k_rope", config.kv_dim());
    let acts = kernel.begin()?;
    let (cos, sin) = rope_consts(&mut kernel, config, seq);
    let heads = AttnHeads::new(kernel.b(), config, &acts[2], &acts[3]);
    let builder = kernel.b();
    let square = [1, config.n_heads, seq, seq];
    let probs = builder.reshape(&acts[0], &square);
    let dp = builder.reshape(&acts[1], &square);
    let (dq, dk) = heads.scores_backward(builder, &probs, &dp, &cos, &sin);
    kernel.output("dq", dq);
    kernel.output("dk", dk);
    kernel.finish()
}

/// Declare the inputs of [`attn_bwd`] (and [`attn_bwd_dv`]) and begin.
fn attn_bwd_acts(kernel: &mut KernelBuilder, config: &ModelConfig) -> Result<Vec<Tensor>> {
    let (q_dim, kv_dim) = (config.q_dim(), config.kv_dim());
    kernel.act("q_rope", q_dim);
    kernel.act("k_rope", kv_dim);
    kernel.act("v", kv_dim);
    kernel.act("dattn", q_dim);
    kernel.begin()
}

/// The per-head queries and (GQA-expanded) keys the attention backward
/// works on, `[1, H, T, D]`, and what it needs to know of the config.
struct AttnHeads {
    qh: Tensor,
    kx: Tensor,
    heads: usize,
    kv_heads: usize,
    group: usize,
    scale: f32,
}

impl AttnHeads {
    /// Split `q_rope` `[1, Qd, 1, T]` and `k_rope` `[1, KVd, 1, T]` into heads.
    fn new(b: &mut Builder, config: &ModelConfig, q_rope: &Tensor, k_rope: &Tensor) -> AttnHeads {
        let group = config.gqa_ratio();
        let qh = b.split_heads(q_rope, config.n_heads);
        let kh = b.split_heads(k_rope, config.n_kv_heads);
        let kx = expand_kv(b, &kh, group);
        AttnHeads {
            qh,
            kx,
            heads: config.n_heads,
            kv_heads: config.n_kv_heads,
            group,
            scale: 1.0 / (config.head_dim as f32).sqrt(),
        }
    }

    /// From `v` `[1, KVd, 1, T]` and the output's gradient `dattn`
    /// `[1, Qd, 1, T]`: `dv` `[1, KVd, 1, T]` (`P^T dO`, GQA-summed), the
    /// recomputed probabilities `P` and `dP = dO V^T`, `[1, H, T, T]` each.
    fn probs_and_dv(
        &self,
        b: &mut Builder,
        v: &Tensor,
        dattn: &Tensor,
        mask: &Tensor,
    ) -> (Tensor, Tensor, Tensor) {
        let vh = b.split_heads(v, self.kv_heads);
        let d_out = b.split_heads(dattn, self.heads);
        let vx = expand_kv(b, &vh, self.group);
        let probs = b.causal_probs(&self.qh, &self.kx, mask, self.scale);
        let dv_full = b.matmul(&probs, &d_out, true, false);
        let dp = b.matmul(&d_out, &vx, false, true);
        let dv = reduce_kv(b, &dv_full, self.group);
        (b.merge_heads(&dv), probs, dp)
    }

    /// From `P` and `dP` `[1, H, T, T]`: `dS = P (dP - rowsum(dP P)) s`,
    /// `dQ = dS K`, `dK = dS^T Q` (GQA-summed), both taken back through RoPE
    /// (`cos`, `sin` `[1, 1, T, D]`): `dq` `[1, Qd, 1, T]`, `dk` `[1, KVd, 1, T]`.
    fn scores_backward(
        &self,
        b: &mut Builder,
        probs: &Tensor,
        dp: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> (Tensor, Tensor) {
        let pdp = b.mul(dp, probs);
        let row = b.reduce_sum(&pdp, &[-1], true);
        let centered = b.sub(dp, &row);
        let ds = b.mul(probs, &centered);
        let s = b.scalar(probs.dtype(), self.scale);
        let ds = b.mul(&ds, &s);
        let dq_rope = b.matmul(&ds, &self.kx, false, false);
        let dk_full = b.matmul(&ds, &self.qh, true, false);
        let dk_rope = reduce_kv(b, &dk_full, self.group);
        let dq = rope_backward(b, &dq_rope, cos, sin);
        let dk = rope_backward(b, &dk_rope, cos, sin);
        (b.merge_heads(&dq), b.merge_heads(&dk))
    }
}

/// Output projection forward: `o = Wo attn`.
pub fn wo_fwd(
    config: &ModelConfig,
    seq: usize,
    opts: KernelOptions,
    baked: Baked,
) -> Result<KernelSpec> {
    let mut kernel = KernelBuilder::new("wo_fwd", opts, seq).with_baked(baked);
    kernel.act("attn", config.q_dim());
    let wo = kernel.weight_forward("wo", config.dim, config.q_dim());
    let attn = kernel.begin()?.remove(0);
    let o = kernel.linear(&attn, wo)?;
    kernel.output("o", o);
    kernel.finish()
}

/// Output projection backward: `dattn = Wo^T dx2`.
pub fn wo_bwd(
    config: &ModelConfig,
    seq: usize,
    opts: KernelOptions,
    baked: Baked,
) -> Result<KernelSpec> {
    let mut kernel = KernelBuilder::new("wo_bwd", opts, seq).with_baked(baked);
    kernel.act("dx2", config.dim);
    let wo = kernel.weight_transposed("wo", config.dim, config.q_dim());
    let dx2 = kernel.begin()?.remove(0);
    let da = kernel.linear(&dx2, wo)?;
    kernel.output("dattn", da);
    kernel.finish()
}

/// SwiGLU forward: `h1 = W1 x`, `h3 = W3 x`, `gate = silu(h1) h3`, `ffn = W2 gate`.
pub fn ffn_fwd(
    config: &ModelConfig,
    seq: usize,
    opts: KernelOptions,
    baked: Baked,
) -> Result<KernelSpec> {
    let (dim, hidden) = (config.dim, config.hidden_dim);
    let mut kernel = KernelBuilder::new("ffn_fwd", opts, seq).with_baked(baked);
    kernel.act("x2n", dim);
    let w1 = kernel.weight_forward("w1", hidden, dim);
    let w3 = kernel.weight_forward("w3", hidden, dim);
    let w2 = kernel.weight_forward("w2", dim, hidden);
    let gate_delta = opts.deltas.gate.then(|| kernel.act("gate_delta", hidden));
    let up_delta = opts.deltas.up.then(|| kernel.act("up_delta", hidden));
    let acts = kernel.begin()?;
    let x = &acts[0];
    let mut h1 = kernel.linear(x, w1)?;
    let mut h3 = kernel.linear(x, w3)?;
    if let Some(index) = gate_delta {
        h1 = kernel.b().add(&h1, &acts[index]);
    }
    if let Some(index) = up_delta {
        h3 = kernel.b().add(&h3, &acts[index]);
    }
    let builder = kernel.b();
    let sig = builder.sigmoid(&h1);
    let silu = builder.mul(&h1, &sig);
    let gate = builder.mul(&silu, &h3);
    let ffn = kernel.linear(&gate, w2)?;
    kernel.output("ffn", ffn);
    kernel.output("h1", h1);
    kernel.output("h3", h3);
    kernel.output("gate", gate);
    kernel.finish()
}

/// SwiGLU backward, first half: `dgate = W2^T dffn`.
pub fn ffn_bwd_w2(
    config: &ModelConfig,
    seq: usize,
    opts: KernelOptions,
    baked: Baked,
) -> Result<KernelSpec> {
    let mut kernel = KernelBuilder::new("ffn_bwd_w2", opts, seq).with_baked(baked);
    kernel.act("dffn", config.dim);
    let w2 = kernel.weight_transposed("w2", config.dim, config.hidden_dim);
    let dffn = kernel.begin()?.remove(0);
    let dgate = kernel.linear(&dffn, w2)?;
    kernel.output("dgate", dgate);
    kernel.finish()
}

/// SwiGLU backward, second half: `dh3 = dgate silu(h1)`,
/// `dh1 = dgate h3 sig (1 + h1 (1 - sig))`, `dx2n = W1^T dh1 + W3^T dh3`.
pub fn ffn_bwd_w13(
    config: &ModelConfig,
    seq: usize,
    opts: KernelOptions,
    baked: Baked,
) -> Result<KernelSpec> {
    let (dim, hidden) = (config.dim, config.hidden_dim);
    let mut kernel = KernelBuilder::new("ffn_bwd_w13", opts, seq).with_baked(baked);
    kernel.act("dgate", hidden);
    kernel.act("h1", hidden);
    kernel.act("h3", hidden);
    let w1 = kernel.weight_transposed("w1", hidden, dim);
    let w3 = kernel.weight_transposed("w3", hidden, dim);
    let acts = kernel.begin()?;
    let (dgate, h1, h3) = (&acts[0], &acts[1], &acts[2]);
    let one = kernel.b().scalar(opts.dtype, 1.0);
    let builder = kernel.b();
    let sig = builder.sigmoid(h1);
    let silu = builder.mul(h1, &sig);
    let dh3 = builder.mul(dgate, &silu);
    let dsilu = builder.mul(dgate, h3);
    let one_minus = builder.sub(&one, &sig);
    let h1_om = builder.mul(h1, &one_minus);
    let inner = builder.add(&one, &h1_om);
    let dsig = builder.mul(&sig, &inner);
    let dh1 = builder.mul(&dsilu, &dsig);
    let from_w1 = kernel.linear(&dh1, w1)?;
    let from_w3 = kernel.linear(&dh3, w3)?;
    let dx = kernel.b().add(&from_w1, &from_w3);
    kernel.output("dx2n", dx);
    kernel.output("dh1", dh1);
    kernel.output("dh3", dh3);
    kernel.finish()
}

/// Query projection backward: `dxn = Wq^T dq`. With `qk_norm`, `dq` is the
/// gradient of the normed queries: first the QK-norm backward from the saved
/// `q_lin`, which also gives `dq_lin` (the gradient of `Wq xn + bq`, for the
/// host's `dWq` and `dbq`) and `dq_norm (D, T)` (the norm weight's gradient
/// summed over heads, per position).
pub fn q_bwd(
    config: &ModelConfig,
    seq: usize,
    opts: KernelOptions,
    baked: Baked,
) -> Result<KernelSpec> {
    let mut kernel = KernelBuilder::new("q_bwd", opts, seq).with_baked(baked);
    kernel.act("dq", config.q_dim());
    if config.qk_norm {
        kernel.act("q_lin", config.q_dim());
    }
    let wq = kernel.weight_transposed("wq", config.q_dim(), config.dim);
    let norm = config
        .qk_norm
        .then(|| kernel.vector("q_norm", config.head_dim));
    let acts = kernel.begin()?;
    let normed = norm.map(|norm| {
        let norm = kernel.vector_tensor(norm);
        let (eps, heads) = (config.norm_eps, config.n_heads);
        head_rmsnorm_backward(kernel.b(), &acts[0], &acts[1], &norm, heads, eps)
    });
    let dq = normed.as_ref().map_or(&acts[0], |(dq_lin, _)| dq_lin);
    let dx = kernel.linear(dq, wq)?;
    kernel.output("dxn", dx);
    if let Some((dq_lin, dq_norm)) = normed {
        kernel.output("dq_lin", dq_lin);
        kernel.output("dq_norm", dq_norm);
    }
    kernel.finish()
}

/// Key/value projection backward: `dxn = Wk^T dk + Wv^T dv`. With `qk_norm`,
/// `dk` is the gradient of the normed keys, as in [`q_bwd`]: the QK-norm
/// backward from the saved `k_lin` first, giving `dk_lin` and `dk_norm (D, T)`.
pub fn kv_bwd(
    config: &ModelConfig,
    seq: usize,
    opts: KernelOptions,
    baked: Baked,
) -> Result<KernelSpec> {
    let mut kernel = KernelBuilder::new("kv_bwd", opts, seq).with_baked(baked);
    kernel.act("dk", config.kv_dim());
    kernel.act("dv", config.kv_dim());
    if config.qk_norm {
        kernel.act("k_lin", config.kv_dim());
    }
    let wk = kernel.weight_transposed("wk", config.kv_dim(), config.dim);
    let wv = kernel.weight_transposed("wv", config.kv_dim(), config.dim);
    let norm = config
        .qk_norm
        .then(|| kernel.vector("k_norm", config.head_dim));
    let acts = kernel.begin()?;
    let normed = norm.map(|norm| {
        let norm = kernel.vector_tensor(norm);
        let (eps, heads) = (config.norm_eps, config.n_kv_heads);
        head_rmsnorm_backward(kernel.b(), &acts[0], &acts[2], &norm, heads, eps)
    });
    let dk = normed.as_ref().map_or(&acts[0], |(dk_lin, _)| dk_lin);
    let from_w1 = kernel.linear(dk, wk)?;
    let from_w3 = kernel.linear(&acts[1], wv)?;
    let dx = kernel.b().add(&from_w1, &from_w3);
    kernel.output("dxn", dx);
    if let Some((dk_lin, dk_norm)) = normed {
        kernel.output("dk_lin", dk_lin);
        kernel.output("dk_norm", dk_norm);
    }
    kernel.finish()
}

/// RMSNorm of every head of `x` `[1, H*D, 1, T]` over its `D` channels, times
/// `weight` `[1, D, 1, 1]` (QK-norm), in the ANE's idioms: the mean is a
/// `reduce_sum` (of squares scaled by `1/D`), the reciprocal root `pow(-0.5)`.
fn head_rmsnorm(b: &mut Builder, x: &Tensor, weight: &Tensor, heads: usize, eps: f32) -> Tensor {
    let (channels, seq) = (x.shape()[1], x.shape()[3]);
    let head_dim = channels / heads;
    let xh = b.reshape(x, &[1, heads, head_dim, seq]); // (1, H, D, T)
    let rrms = head_rrms(b, &xh, eps); // (1, H, 1, T)
    let x_hat = b.mul(&xh, &rrms);
    let w = b.reshape(weight, &[1, 1, head_dim, 1]);
    let y = b.mul(&x_hat, &w);
    b.reshape(&y, &[1, channels, 1, seq])
}

/// `1 / sqrt(mean_d x^2 + eps)` of `xh` `(1, H, D, T)` per head and position:
/// `(1, H, 1, T)`. The mean is a `reduce_sum` of the squares of `x / sqrt(D)`:
/// scaled before squaring, fp16 holds it for an RMS up to 256 (the
/// projections QK-norm tames can be large), where squaring first would
/// overflow 65504 at an RMS of 256 / sqrt(D).
fn head_rrms(b: &mut Builder, xh: &Tensor, eps: f32) -> Tensor {
    let (dtype, head_dim) = (xh.dtype(), xh.shape()[2]);
    let inv_sqrt_d = b.scalar(dtype, 1.0 / (head_dim as f32).sqrt());
    let scaled = b.mul(xh, &inv_sqrt_d);
    let sq = b.mul(&scaled, &scaled);
    let mean = b.reduce_sum(&sq, &[2], true);
    let eps = b.scalar(dtype, eps);
    let var = b.add(&mean, &eps);
    let minus_half = b.scalar(dtype, -0.5);
    b.pow(&var, &minus_half)
}

/// Backward of [`head_rmsnorm`] given `dy` `[1, H*D, 1, T]` and its input `x`:
/// `dx = rrms (g - x_hat mean_d(g x_hat))` with `g = w dy`, `x_hat = x rrms`
/// (rrms recomputed from `x`), and the weight's gradient summed over heads,
/// `(sum_h dy x_hat)` `[1, D, 1, T]` (the host sums it over positions).
fn head_rmsnorm_backward(
    b: &mut Builder,
    dy: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    heads: usize,
    eps: f32,
) -> (Tensor, Tensor) {
    let (channels, seq) = (x.shape()[1], x.shape()[3]);
    let head_dim = channels / heads;
    let xh = b.reshape(x, &[1, heads, head_dim, seq]); // (1, H, D, T)
    let dyh = b.reshape(dy, &[1, heads, head_dim, seq]);
    let rrms = head_rrms(b, &xh, eps); // (1, H, 1, T)
    let x_hat = b.mul(&xh, &rrms);
    let w = b.reshape(weight, &[1, 1, head_dim, 1]);
    let g = b.mul(&dyh, &w);
    let gx = b.mul(&g, &x_hat);
    let dot = b.reduce_sum(&gx, &[2], true); // (1, H, 1, T)
    let inv_d = b.scalar(x.dtype(), 1.0 / head_dim as f32);
    let mean = b.mul(&dot, &inv_d);
    let x_mean = b.mul(&x_hat, &mean);
    let centered = b.sub(&g, &x_mean);
    let dxh = b.mul(&centered, &rrms);
    let dx = b.reshape(&dxh, &[1, channels, 1, seq]);
    let dyx = b.mul(&dyh, &x_hat);
    let dw = b.reduce_sum(&dyx, &[1], true); // (1, 1, D, T)
    let dw = b.reshape(&dw, &[1, head_dim, 1, seq]);
    (dx, dw)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The declaration says which kernels read weights; the builders decide
    /// it: both must agree, and every field builds the kernel of its name.
    #[test]
    fn the_kernel_set_declaration_matches_the_built_kernels() {
        let config = ModelConfig::preset("tiny").unwrap();
        let specs = LayerKernels::build(&config, 8, KernelOptions::cpu(), &|_| None).unwrap();
        for (decl, spec) in LAYER_KERNELS.iter().zip(specs.iter()) {
            let reads_weights = spec
                .inputs
                .iter()
                .any(|slot| matches!(slot.role, SlotRole::Weight { .. }));
            assert_eq!(decl.reads_weights, reads_weights, "{}", spec.name);
        }
        let names: Vec<&str> = specs.iter().map(|spec| spec.name.as_str()).collect();
        let declared = LAYER_KERNELS.map(|decl| decl.name).into_array();
        assert_eq!(names, declared);
        assert_eq!(
            declared,
            [
                "attn_fwd",
                "wo_fwd",
                "ffn_fwd",
                "ffn_bwd_w2",
                "ffn_bwd_w13",
                "wo_bwd",
                "attn_bwd",
                "q_bwd",
                "kv_bwd"
            ]
        );
        // attn_bwd's split: two weight-free kernels, one compile more than the whole.
        assert_eq!(
            kernel_counts(),
            KernelCounts {
                kernels: 9,
                reading_weights: 8,
                most_compiles: 10,
            }
        );
        for decl in LAYER_KERNELS.iter() {
            let Some(split) = decl.split else { continue };
            let parts = (split.build)(&config, 8, KernelOptions::cpu(), &|_| None).unwrap();
            let names: Vec<&str> = parts.iter().map(|spec| spec.name.as_str()).collect();
            assert_eq!(names, split.parts, "{}", decl.name);
            for part in &parts {
                assert!(
                    part.inputs
                        .iter()
                        .all(|slot| slot.role == SlotRole::Activation),
                    "{} reads no weights",
                    part.name
                );
            }
        }
        let split: Vec<&str> = LAYER_KERNELS
            .iter()
            .filter_map(|decl| decl.split.map(|_| decl.name))
            .collect();
        assert_eq!(split, ["attn_bwd"]);
        let doubled = LAYER_KERNELS.map(|decl| usize::from(decl.reads_weights) * 2);
        assert_eq!(doubled.iter().sum::<usize>(), 16);
        assert_eq!(doubled.attn_bwd, 0);
    }
}
