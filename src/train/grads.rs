//! How a backward pass writes the gradients: [`GradSink`] adds to them or,
//! for a step's first micro-batch, writes over them ([`GradWrite`]), and
//! records each parameter's sum of squares once the pass has finished it,
//! for the clip norm ([`crate::train::engine::Engine::grad_norm`]).
//!
//! This module computes weight gradients when asked; when they run (beside
//! which kernel) is the scheduler's business (`schedule`).

use crate::linalg::{gemm, n, t};
use crate::model::{Param, Weights};
use crate::train::buffers::LayerActs;
use crate::train::optim;

/// How `Engine::forward_backward_as` writes the gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradWrite {
    /// Add to them.
    Add,
    /// Write over them: each gradient's first contribution replaces.
    Overwrite,
}

/// The gradients of one backward pass, and the sums of squares of those it finished.
pub struct GradSink<'g> {
    grads: &'g mut Weights,
    write: GradWrite,
    /// Positions per sequence: a weight gradient's `dY` is `(O, T)`.
    seq: usize,
    /// One per finished gradient, in the order the pass finished them.
    sums_of_squares: &'g mut Vec<f64>,
}

impl<'g> GradSink<'g> {
    /// Start a pass over `grads`. With [`GradWrite::Overwrite`] only the
    /// gradients made by sums start from zero: the norm weights' and biases'
    /// ([`Param::is_vector`]) and an untied embedding's (a tied one is the classifier's, whose first product
    /// writes it before the scatter adds); every other gradient's first
    /// product replaces it.
    pub fn start(
        grads: &'g mut Weights,
        write: GradWrite,
        seq: usize,
        sums_of_squares: &'g mut Vec<f64>,
    ) -> GradSink<'g> {
        if write == GradWrite::Overwrite {
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
            grads,
            write,
            seq,
            sums_of_squares,
        }
    }

    pub fn get_mut(&mut self, param: Param) -> &mut [f32] {
        self.grads.get_mut(param)
    }

    /// Whether contribution `index` (0 for the first) of a gradient made by
    /// products adds to it, rather than replacing it.
    pub fn adds(&self, index: usize) -> bool {
        adds(self.write, index)
    }

    /// Records the sum of squares of `param`'s gradient, which the pass has finished.
    pub fn finished(&mut self, param: Param) {
        let sum = optim::sum_squares(self.grads.get(param));
        self.sums_of_squares.push(sum);
    }

    /// `dW (O, I) = sum_b dY_b (O, T) X_b^T` into `param`'s gradient, with
    /// `dY_b = dys[b]` and `X_b (I, T) = x(&acts[b])`, summed in batch order;
    /// then its sum of squares.
    pub fn weight_grad(
        &mut self,
        param: Param,
        dys: &[Vec<f32>],
        acts: &[LayerActs],
        x: fn(&LayerActs) -> &Vec<f32>,
    ) {
        let (seq, write) = (self.seq, self.write);
        let dw = self.grads.get_mut(param);
        for (index, (dy, layer_acts)) in dys.iter().zip(acts).enumerate() {
            weight_grad(dw, dy, x(layer_acts), seq, adds(write, index));
        }
        self.finished(param);
    }

    /// `dw (R) += sum_b sum_t dY_b[r, t]` with `dY_b = dys[b]` `(R, T)`: a
    /// vector's gradient (a bias, a QK-norm weight), zeroed by
    /// [`GradSink::start`] when overwriting. Each row sums its positions in
    /// order in `f64`, the sequences are added in batch order; then its sum of squares.
    pub fn row_sum(&mut self, param: Param, dys: &[Vec<f32>]) {
        let seq = self.seq;
        let dw = self.grads.get_mut(param);
        for dy in dys {
            for (w, row) in dw.iter_mut().zip(dy.chunks_exact(seq)) {
                *w += row.iter().map(|&v| f64::from(v)).sum::<f64>() as f32;
            }
        }
        self.finished(param);
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
