//! How a backward pass writes the gradients: [`GradSink`] adds to them or,
//! for a step's first micro-batch, writes over them ([`GradWrite`]), and
//! records each parameter's sum of squares once the pass has finished it,
//! for the clip norm ([`crate::train::engine::Engine::grad_norm`]).
//!
//! What the gradients are of is the [`GradTarget`]: every weight (full
//! training), or LoRA adapters on a frozen base, where the sink computes no
//! base gradient at all and each adapted projection's job is its adapter's
//! rank-r products (`model::lora::lora_grads`) instead of `dW = dY X^T`.
//!
//! This module computes weight gradients when asked; when they run (beside
//! which kernel) is the scheduler's business (`schedule`).

use crate::linalg::{gemm, n, t};
use crate::model::host;
use crate::model::lora::{self, Adapters, Target};
use crate::model::{Param, Weights};
use crate::train::adapter_path::AdapterPath;
use crate::train::buffers::{Input, LayerActs};
use crate::train::optim;

/// How `Engine::forward_backward_as` writes the gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradWrite {
    /// Add to them.
    Add,
    /// Write over them: each gradient's first contribution replaces.
    Overwrite,
}

/// What a backward pass computes the gradient of.
pub enum GradTarget<'g> {
    /// Every parameter, into `Weights` of the model's layout.
    Weights(&'g mut Weights),
    /// The adapters alone, the base frozen: the gradient of `path`'s
    /// adapters (whose values the pass reads; their inputs dropped as the
    /// forward dropped them) into `grads`, of the same layout.
    Adapters {
        path: AdapterPath<'g>,
        grads: &'g mut Adapters,
    },
}

/// The gradients of one backward pass, and the sums of squares of those it finished.
pub struct GradSink<'g> {
    target: GradTarget<'g>,
    write: GradWrite,
    /// Positions per sequence: a weight gradient's `dY` is `(O, T)`.
    seq: usize,
    /// One per finished gradient, in the order the pass finished them.
    sums_of_squares: &'g mut Vec<(Param, f64)>,
    /// The adapters' products' `(r, T)` array (empty for full training).
    rank_scratch: Vec<f32>,
    /// A remade input ([`Input::Gate`]) of one sequence.
    input_scratch: Vec<f32>,
    /// An adapter's input with its dropout applied.
    dropped_scratch: Vec<f32>,
}

impl<'g> GradSink<'g> {
    /// Start a pass over `target`. With [`GradWrite::Overwrite`] only the
    /// weight gradients made by sums start from zero: the norm weights' and
    /// biases' ([`Param::is_vector`]) and an untied embedding's (a tied one
    /// is the classifier's, whose first product writes it before the scatter
    /// adds); every other gradient's first product replaces it (an adapter's
    /// too: every adapted projection has its job in every pass).
    pub fn start(
        mut target: GradTarget<'g>,
        write: GradWrite,
        seq: usize,
        sums_of_squares: &'g mut Vec<(Param, f64)>,
    ) -> GradSink<'g> {
        if let (GradTarget::Weights(grads), GradWrite::Overwrite) = (&mut target, write) {
            let tied = grads.config().tied_embeddings;
            for param in grads.layout.params() {
                let summed = param.is_vector() || param == Param::Embedding && !tied;
                if summed {
                    grads.get_mut(param).fill(0.0);
                }
            }
        }
        sums_of_squares.clear();
        GradSink {
            target,
            write,
            seq,
            sums_of_squares,
            rank_scratch: Vec::new(),
            input_scratch: Vec::new(),
            dropped_scratch: Vec::new(),
        }
    }

    /// Whether the pass computes a gradient for `param`: every parameter in
    /// full training; with adapters, the adapted projections alone.
    pub fn computes(&self, param: Param) -> bool {
        match &self.target {
            GradTarget::Weights(_) => true,
            GradTarget::Adapters { path, .. } => {
                Target::of(param).is_some_and(|(layer, target)| path.has(layer, target))
            }
        }
    }

    /// `param`'s gradient in the weights' layout, for the host math that
    /// writes it (norm weights, the classifier, the embedding); `None` when
    /// the base is frozen.
    pub fn base_mut(&mut self, param: Param) -> Option<&mut [f32]> {
        match &mut self.target {
            GradTarget::Weights(grads) => Some(grads.get_mut(param)),
            GradTarget::Adapters { .. } => None,
        }
    }

    /// Whether contribution `index` (0 for the first) of a gradient made by
    /// products adds to it, rather than replacing it.
    pub fn adds(&self, index: usize) -> bool {
        adds(self.write, index)
    }

    /// Records the sum of squares of `param`'s gradient, which the pass has
    /// finished (of its adapter's A and B with adapters; nothing for a
    /// frozen weight).
    pub fn finished(&mut self, param: Param) {
        let sum = match &self.target {
            GradTarget::Weights(grads) => optim::sum_squares(grads.get(param)),
            GradTarget::Adapters { grads, .. } => match Target::of(param) {
                Some((layer, target)) if grads.contains(layer, target) => {
                    optim::sum_squares(grads.a(layer, target))
                        + optim::sum_squares(grads.b(layer, target))
                }
                _ => return,
            },
        };
        self.sums_of_squares.push((param, sum));
    }

    /// The parameters whose gradients the pass has finished, in that order.
    pub fn finished_params(&self) -> impl ExactSizeIterator<Item = Param> + '_ {
        self.sums_of_squares.iter().map(|(param, _)| *param)
    }

    /// The whole gradient, flat (the weights' or the adapters' layout).
    pub fn flat(&self) -> &[f32] {
        match &self.target {
            GradTarget::Weights(grads) => &grads.data,
            GradTarget::Adapters { grads, .. } => &grads.data,
        }
    }

    /// [`GradSink::flat`], writable.
    pub fn flat_mut(&mut self) -> &mut [f32] {
        match &mut self.target {
            GradTarget::Weights(grads) => &mut grads.data,
            GradTarget::Adapters { grads, .. } => &mut grads.data,
        }
    }

    /// `param`'s gradient from `dY_b = dys[b]` and `X_b (I, T)`, the input
    /// `x` of `acts[b]`, of every sequence `b`, summed in batch order; then
    /// its sum of squares. A weight: `dW (O, I) = sum_b dY_b X_b^T`. An
    /// adapted projection with a frozen base: its adapter's `dA`, `dB`
    /// ([`lora::lora_grads`]).
    pub fn weight_grad(&mut self, param: Param, dys: &[Vec<f32>], acts: &[LayerActs], x: Input) {
        let (seq, write) = (self.seq, self.write);
        let sequences = dys.iter().zip(acts).enumerate();
        let scratch = &mut self.input_scratch;
        match &mut self.target {
            GradTarget::Weights(grads) => {
                let dw = grads.get_mut(param);
                for (index, (dy, layer_acts)) in sequences {
                    let x = input(x, layer_acts, scratch);
                    weight_grad(dw, dy, x, seq, adds(write, index));
                }
            }
            GradTarget::Adapters { path, grads } => {
                let (layer, target) = Target::of(param).expect("an adapted projection");
                let adapters = path.adapters;
                let (out, input_len) = target.shape(adapters.model());
                let shape = (out, input_len, adapters.config.rank, seq);
                let scale = adapters.config.scale();
                let (a, b) = (adapters.a(layer, target), adapters.b(layer, target));
                let (da, db) = grads.a_b_mut(layer, target);
                for (index, (dy, layer_acts)) in sequences {
                    let (x, add) = (input(x, layer_acts, scratch), adds(write, index));
                    let x = path.dropped(layer, target, index, x, &mut self.dropped_scratch);
                    let rank_scratch = &mut self.rank_scratch;
                    lora::lora_grads(dy, x, a, b, shape, scale, da, db, add, rank_scratch);
                }
            }
        }
        self.finished(param);
    }

    /// `dw (R) += sum_b sum_t dY_b[r, t]` with `dY_b = dys[b]` `(R, T)`: a
    /// vector's gradient (a bias, a QK-norm weight), zeroed by
    /// [`GradSink::start`] when overwriting. Each row sums its positions in
    /// order in `f64`, the sequences are added in batch order; then its sum
    /// of squares. Only asked for when [`GradSink::computes`] it.
    pub fn row_sum(&mut self, param: Param, dys: &[Vec<f32>]) {
        let seq = self.seq;
        let dw = self
            .base_mut(param)
            .expect("a vector's gradient of full training");
        for dy in dys {
            for (w, row) in dw.iter_mut().zip(dy.chunks_exact(seq)) {
                *w += row.iter().map(|&v| f64::from(v)).sum::<f64>() as f32;
            }
        }
        self.finished(param);
    }
}

/// The values of input `x` of one sequence: saved in `acts`, or made again
/// into `scratch`.
fn input<'a>(x: Input, acts: &'a LayerActs, scratch: &'a mut Vec<f32>) -> &'a [f32] {
    match x {
        Input::Saved(saved) => saved(acts),
        Input::Gate => {
            scratch.resize(acts.h1.len(), 0.0);
            host::swiglu_gate(scratch, &acts.h1, &acts.h3);
            scratch
        }
    }
}

fn adds(write: GradWrite, index: usize) -> bool {
    write == GradWrite::Add || index > 0
}

/// `dw (O, I) += dy (O, T) x^T` with `x (I, T)` (`=` unless `add`): one
/// sequence's contribution to a weight gradient.
fn weight_grad(dw: &mut [f32], dy: &[f32], x: &[f32], seq: usize, add: bool) {
    let (rows, cols) = (dy.len() / seq, x.len() / seq);
    gemm(dw, rows, cols, n(dy, rows, seq), t(x, cols, seq), 1.0, add);
}
