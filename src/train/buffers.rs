//! The arrays of the layer passes, with their shapes: what the forward saves
//! per layer and sequence ([`LayerActs`]), the backward's gradients that
//! weight gradients read ([`DySources`], named by [`Dy`]), and the rest of the
//! backward's arrays ([`BackwardScratch`]). All are made once and reused, so
//! that a step allocates nothing; the backward's are sized at its first pass.
//!
//! Host activations are channel-major `(rows, T)`: `C` channels, `T`
//! positions, `H * D` query and `Hkv * D` key/value rows (`D` per head), `F`
//! hidden. Arrays a feature needs (QK-norm's) are empty when the config does
//! not have it. This module holds arrays; it does not compute.

use crate::model::ModelConfig;
use crate::model::kernels::Deltas;
use crate::model::lora::Target;

/// The forward's saved state of one layer for one sequence.
#[derive(Clone, Default)]
pub struct LayerActs {
    pub x: Vec<f32>,      // (C, T) the layer's input, the residual stream
    pub xn: Vec<f32>,     // (C, T) rmsnorm(x), the attention's input
    pub rrms1: Vec<f32>,  // (T) its reciprocal RMS per position
    pub attn: Vec<f32>,   // (H*D, T) attention output, heads merged
    pub q_rope: Vec<f32>, // (H*D, T) queries after RoPE
    pub k_rope: Vec<f32>, // (Hkv*D, T) keys after RoPE
    pub v: Vec<f32>,      // (Hkv*D, T) values
    pub q_lin: Vec<f32>,  // (H*D, T) with qk_norm: Wq xn (+ bq), QK-norm's input
    pub k_lin: Vec<f32>,  // (Hkv*D, T) with qk_norm: Wk xn (+ bk)
    pub x2: Vec<f32>,     // (C, T) x + Wo attn
    pub x2n: Vec<f32>,    // (C, T) rmsnorm(x2), the FFN's input
    pub rrms2: Vec<f32>,  // (T)
    pub h1: Vec<f32>,     // (F, T) W1 x2n
    pub h3: Vec<f32>,     // (F, T) W3 x2n
}

impl LayerActs {
    pub fn new(config: &ModelConfig, seq: usize) -> LayerActs {
        let (dim, q_dim, kv_dim) = (config.dim, config.q_dim(), config.kv_dim());
        let hidden_dim = config.hidden_dim;
        let qk_norm = usize::from(config.qk_norm);
        LayerActs {
            x: vec![0.0; dim * seq],
            xn: vec![0.0; dim * seq],
            rrms1: vec![0.0; seq],
            attn: vec![0.0; q_dim * seq],
            q_rope: vec![0.0; q_dim * seq],
            k_rope: vec![0.0; kv_dim * seq],
            v: vec![0.0; kv_dim * seq],
            q_lin: vec![0.0; qk_norm * q_dim * seq],
            k_lin: vec![0.0; qk_norm * kv_dim * seq],
            x2: vec![0.0; dim * seq],
            x2n: vec![0.0; dim * seq],
            rrms2: vec![0.0; seq],
            h1: vec![0.0; hidden_dim * seq],
            h3: vec![0.0; hidden_dim * seq],
        }
    }
}

/// A weight product's input `X`, per sequence of its layer.
#[derive(Clone, Copy)]
pub enum Input {
    /// An activation the forward saved.
    Saved(fn(&LayerActs) -> &Vec<f32>),
    /// The FFN's `gate = silu(h1) h3` (W2's input), made again from the
    /// saved `h1` and `h3` by the product's job (`host::swiglu_gate`, the
    /// kernel's ops in its order) rather than kept per layer: `F x T` values
    /// a layer, the largest saved activation with `h1` and `h3`.
    Gate,
}

/// A backward array that weight gradients read as their `dY`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dy {
    Dx,
    Dh1,
    Dh3,
    Dq,
    Dk,
    Dv,
    DqNorm,
    DkNorm,
}

/// The backward's gradients that weight gradients read, one array per
/// sequence of the batch.
#[derive(Default)]
pub struct DySources {
    pub dx: Vec<Vec<f32>>,  // (C, T) gradient of the residual stream
    pub dh1: Vec<Vec<f32>>, // (F, T)
    pub dh3: Vec<Vec<f32>>, // (F, T)
    pub dq: Vec<Vec<f32>>,  // (H*D, T) before RoPE (and QK-norm): of Wq xn + bq
    pub dk: Vec<Vec<f32>>,  // (Hkv*D, T) before RoPE (and QK-norm): of Wk xn + bk
    pub dv: Vec<Vec<f32>>,  // (Hkv*D, T)
    /// With qk_norm: the q and k norm weights' gradients per position, summed over heads.
    pub dq_norm: Vec<Vec<f32>>, // (D, T)
    pub dk_norm: Vec<Vec<f32>>, // (D, T)
}

impl DySources {
    pub fn get(&self, which: Dy) -> &Vec<Vec<f32>> {
        match which {
            Dy::Dx => &self.dx,
            Dy::Dh1 => &self.dh1,
            Dy::Dh3 => &self.dh3,
            Dy::Dq => &self.dq,
            Dy::Dk => &self.dk,
            Dy::Dv => &self.dv,
            Dy::DqNorm => &self.dq_norm,
            Dy::DkNorm => &self.dk_norm,
        }
    }

    pub fn get_mut(&mut self, which: Dy) -> &mut Vec<Vec<f32>> {
        match which {
            Dy::Dx => &mut self.dx,
            Dy::Dh1 => &mut self.dh1,
            Dy::Dh3 => &mut self.dh3,
            Dy::Dq => &mut self.dq,
            Dy::Dk => &mut self.dk,
            Dy::Dv => &mut self.dv,
            Dy::DqNorm => &mut self.dq_norm,
            Dy::DkNorm => &mut self.dk_norm,
        }
    }

    /// Size every array for `batch` sequences of `seq` positions (contents
    /// unspecified: every user overwrites them), and zero `dx`, to which the
    /// classifier's backward adds.
    pub fn resize(&mut self, config: &ModelConfig, batch: usize, seq: usize) {
        let (dim, hidden_dim) = (config.dim, config.hidden_dim);
        let (q_dim, kv_dim) = (config.q_dim(), config.kv_dim());
        resize_each(&mut self.dx, batch, dim * seq);
        for dx in &mut self.dx {
            dx.fill(0.0);
        }
        resize_each(&mut self.dh1, batch, hidden_dim * seq);
        resize_each(&mut self.dh3, batch, hidden_dim * seq);
        resize_each(&mut self.dq, batch, q_dim * seq);
        resize_each(&mut self.dk, batch, kv_dim * seq);
        resize_each(&mut self.dv, batch, kv_dim * seq);
        let norm_len = usize::from(config.qk_norm) * config.head_dim * seq;
        resize_each(&mut self.dq_norm, batch, norm_len);
        resize_each(&mut self.dk_norm, batch, norm_len);
    }
}

/// The rest of a layer's backward, one array per sequence of the batch
/// (contents unspecified between uses: every user overwrites them).
#[derive(Default)]
pub struct BackwardScratch {
    pub dgate: Vec<Vec<f32>>,  // (F, T)
    pub dx2n: Vec<Vec<f32>>,   // (C, T) gradient of the FFN's input
    pub dattn: Vec<Vec<f32>>,  // (H*D, T)
    pub dxn: Vec<Vec<f32>>,    // (C, T) gradient of the attention's input
    pub dxn_kv: Vec<Vec<f32>>, // (C, T) its keys' and values' share
    /// With qk_norm: attention's gradients of the normed queries and keys (before RoPE).
    pub dq_normed: Vec<Vec<f32>>, // (H*D, T)
    pub dk_normed: Vec<Vec<f32>>, // (Hkv*D, T)
}

impl BackwardScratch {
    pub fn resize(&mut self, config: &ModelConfig, batch: usize, seq: usize) {
        let (dim, hidden_dim, q_dim) = (config.dim, config.hidden_dim, config.q_dim());
        resize_each(&mut self.dgate, batch, hidden_dim * seq);
        resize_each(&mut self.dx2n, batch, dim * seq);
        resize_each(&mut self.dattn, batch, q_dim * seq);
        resize_each(&mut self.dxn, batch, dim * seq);
        resize_each(&mut self.dxn_kv, batch, dim * seq);
        let qk_norm = usize::from(config.qk_norm);
        resize_each(&mut self.dq_normed, batch, qk_norm * q_dim * seq);
        resize_each(&mut self.dk_normed, batch, qk_norm * config.kv_dim() * seq);
    }
}

/// The kernels' added inputs of an unmerged LoRA engine
/// (`model::kernels::Deltas`), one array per sequence: the adapters' part of
/// the q, k, v, gate (h1) and up (h3) projections. A projection the kernels
/// take no delta for has no arrays.
#[derive(Default)]
pub struct DeltaArrays {
    pub q: Vec<Vec<f32>>,    // (H*D, T)
    pub k: Vec<Vec<f32>>,    // (Hkv*D, T)
    pub v: Vec<Vec<f32>>,    // (Hkv*D, T)
    pub gate: Vec<Vec<f32>>, // (F, T)
    pub up: Vec<Vec<f32>>,   // (F, T)
}

impl DeltaArrays {
    pub fn new(config: &ModelConfig, deltas: Deltas, batch: usize, seq: usize) -> DeltaArrays {
        let arrays = |on: bool, rows: usize| match on {
            true => vec![vec![0.0; rows * seq]; batch],
            false => Vec::new(),
        };
        let (q_dim, kv_dim, hidden_dim) = (config.q_dim(), config.kv_dim(), config.hidden_dim);
        DeltaArrays {
            q: arrays(deltas.q, q_dim),
            k: arrays(deltas.k, kv_dim),
            v: arrays(deltas.v, kv_dim),
            gate: arrays(deltas.gate, hidden_dim),
            up: arrays(deltas.up, hidden_dim),
        }
    }

    /// The arrays of `target`'s delta (empty when the kernels take none; o
    /// and down have none).
    pub fn of_mut(&mut self, target: Target) -> &mut Vec<Vec<f32>> {
        match target {
            Target::Q => &mut self.q,
            Target::K => &mut self.k,
            Target::V => &mut self.v,
            Target::Gate => &mut self.gate,
            Target::Up => &mut self.up,
            Target::O | Target::Down => panic!("the {target:?} projection takes no delta input"),
        }
    }

    /// Sequence `sequence`'s array of `name` (`q_delta`, ...), the kernels'
    /// input of that name, when the kernels take it.
    pub fn input(&self, name: &str, sequence: usize) -> Option<&[f32]> {
        let arrays = match name {
            "q_delta" => &self.q,
            "k_delta" => &self.k,
            "v_delta" => &self.v,
            "gate_delta" => &self.gate,
            "up_delta" => &self.up,
            _ => return None,
        };
        arrays.get(sequence).map(Vec::as_slice)
    }
}

/// `arrays` as `count` arrays of `len` values each, keeping their allocations.
fn resize_each(arrays: &mut Vec<Vec<f32>>, count: usize, len: usize) {
    arrays.resize_with(count, Vec::new);
    for array in arrays {
        array.resize(len, 0.0);
    }
}
