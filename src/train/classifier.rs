//! The model's head over the batch: the final RMSNorm, the classifier and the
//! cross-entropy, forward and backward. The logits are vocabulary-major,
//! `(V, P)`, for a group of sequences side by side (`P` = sequences x `T`), so
//! that all three classifier products run in faer's fast layouts; groups are
//! as wide as [`LOGITS_FLOATS`] allows.
//!
//! This module owns the head's arrays and their math; the layers, the
//! embedding and when anything runs are the engine's.

use crate::model::host::CrossEntropyScratch;
use crate::model::{ModelConfig, Param, Weights};
use crate::train::grads::GradSink;
use crate::train::profile::TimedHost;

/// Logits of at most this many values (128 MiB) go through the classifier at
/// once: sequences are grouped up to it, because wider products run faster,
/// and wider groups measured no faster (`docs/performance.md`).
pub const LOGITS_FLOATS: usize = 1 << 25;

/// The head's arrays, made once (the backward's at its first pass).
pub struct ClassifierHead {
    dim: usize,
    vocab: usize,
    seq: usize,
    batch: usize,
    /// Sequences whose positions go through the classifier together.
    group: usize,
    pub x_final: Vec<Vec<f32>>, // (C, T) per sequence: the last layer's output
    xn: Vec<Vec<f32>>,          // (C, T) per sequence: its final norm
    rrms: Vec<Vec<f32>>,        // (T) per sequence
    logits: Vec<f32>,           // (V, group*T): a group's logits, then their gradient
    x_group: Vec<f32>,          // (C, group*T): a group's `xn` side by side
    dx_group: Vec<f32>,         // (C, group*T): their gradient
    dxn: Vec<f32>,              // (C, T): one sequence's share of it
    classifier_t: Vec<f32>,     // (C, V): E^T, made when there are several groups
    stats: CrossEntropyScratch,
}

impl ClassifierHead {
    pub fn new(config: &ModelConfig, seq: usize, batch: usize) -> ClassifierHead {
        let (dim, vocab) = (config.dim, config.vocab_size);
        let group = (LOGITS_FLOATS / (vocab * seq)).clamp(1, batch);
        ClassifierHead {
            dim,
            vocab,
            seq,
            batch,
            group,
            x_final: vec![vec![0.0; dim * seq]; batch],
            xn: vec![vec![0.0; dim * seq]; batch],
            rrms: vec![vec![0.0; seq]; batch],
            logits: vec![0.0; group * seq * vocab],
            x_group: Vec::new(),
            dx_group: Vec::new(),
            dxn: Vec::new(),
            classifier_t: Vec::new(),
            stats: CrossEntropyScratch::default(),
        }
    }

    /// Sequences per classifier group (at least one, at most the batch).
    pub fn set_group(&mut self, sequences: usize) {
        self.group = sequences.clamp(1, self.batch);
        self.logits = vec![0.0; self.group * self.seq * self.vocab];
    }

    /// The groups of sequences that go through the classifier together, as
    /// ranges `first..end`.
    fn groups(&self) -> impl Iterator<Item = (usize, usize)> + use<> {
        let (group, batch) = (self.group, self.batch);
        (0..batch)
            .step_by(group)
            .map(move |first| (first, (first + group).min(batch)))
    }

    /// The final RMSNorm of every sequence's `x_final`.
    pub fn norm_forward(&mut self, host: &mut TimedHost, weights: &Weights, eps: f32) {
        let rms_final = weights.get(Param::RmsFinal);
        for ((xn, rrms), x) in self.xn.iter_mut().zip(&mut self.rrms).zip(&self.x_final) {
            host.rmsnorm_forward(xn, rrms, x, rms_final, eps);
        }
    }

    /// Logits `(V, P)` of sequences `first..end` side by side into `self.logits`.
    fn classify(&mut self, host: &mut TimedHost, weights: &Weights, first: usize, end: usize) {
        let positions = (end - first) * self.seq;
        let x = gather(&mut self.x_group, &self.xn[first..end], self.dim, self.seq);
        let logits = &mut self.logits[..self.vocab * positions];
        host.classifier_forward(logits, x, weights.classifier(), self.dim);
    }

    /// Logits `(V, T)` of one sequence of the batch.
    pub fn logits_of(
        &mut self,
        host: &mut TimedHost,
        weights: &Weights,
        sequence: usize,
    ) -> &[f32] {
        self.classify(host, weights, sequence, sequence + 1);
        &self.logits[..self.vocab * self.seq]
    }

    /// Cross-entropy summed over every position of the batch, forward only.
    pub fn loss(&mut self, host: &mut TimedHost, weights: &Weights, targets: &[u32]) -> f64 {
        let seq = self.seq;
        let mut total = 0.0;
        for (first, end) in self.groups() {
            self.classify(host, weights, first, end);
            let logits = &mut self.logits[..self.vocab * (end - first) * seq];
            let targets = &targets[first * seq..end * seq];
            total += host.cross_entropy(logits, targets, None, &mut self.stats);
        }
        total
    }

    /// Forward and backward of the head: returns the cross-entropy summed over
    /// every position, writes the classifier's and the final norm's
    /// gradients of `grad_scale` times that sum, and adds the gradient of
    /// each sequence's `x_final` to `dx`.
    pub fn backward(
        &mut self,
        host: &mut TimedHost,
        weights: &Weights,
        grads: &mut GradSink,
        targets: &[u32],
        grad_scale: f32,
        dx: &mut [Vec<f32>],
    ) -> f64 {
        // With several groups, E^T once per step: the classifier's dx product
        // then has a row-major left operand (faer's fast form) for all of them.
        if self.several_groups() {
            self.classifier_t.resize(self.dim * self.vocab, 0.0);
            host.transpose_classifier(weights.classifier(), self.dim, &mut self.classifier_t);
        }
        self.dxn.resize(self.dim * self.seq, 0.0);
        let mut total = 0.0;
        for (first, end) in self.groups() {
            self.classify(host, weights, first, end);
            let positions = (end - first) * self.seq;
            let logits = &mut self.logits[..self.vocab * positions];
            let targets = &targets[first * self.seq..end * self.seq];
            total += host.cross_entropy(logits, targets, Some(grad_scale), &mut self.stats);
            self.group_backward(host, weights, grads, first, end, dx);
        }
        grads.finished(Param::RmsFinal);
        if !weights.config().tied_embeddings {
            grads.finished(Param::Classifier);
        }
        total
    }

    fn several_groups(&self) -> bool {
        self.batch.div_ceil(self.group) > 1
    }

    /// The backward of group `first..end` from its logits' gradient: the
    /// classifier's products, then each sequence's final norm into `dx`.
    fn group_backward(
        &mut self,
        host: &mut TimedHost,
        weights: &Weights,
        grads: &mut GradSink,
        first: usize,
        end: usize,
        dx: &mut [Vec<f32>],
    ) {
        let (dim, seq, several) = (self.dim, self.seq, self.several_groups());
        let positions = (end - first) * seq;
        let logits = &self.logits[..self.vocab * positions];
        // The group's activations, as `classify` gathered them.
        let x = match &self.xn[first..end] {
            [one] => one.as_slice(),
            _ => &self.x_group[..dim * positions],
        };
        let dx_group = if end - first == 1 {
            &mut self.dxn
        } else {
            self.dx_group.resize(dim * positions, 0.0);
            &mut self.dx_group
        };
        let add = grads.adds(first);
        let d_classifier = grads.get_mut(weights.layout.classifier());
        let classifier_t = several.then_some(self.classifier_t.as_slice());
        let classifier = weights.classifier();
        host.classifier_backward(
            dx_group,
            d_classifier,
            logits,
            x,
            classifier,
            classifier_t,
            dim,
            add,
        );
        let rms_final = weights.get(Param::RmsFinal);
        let sequences = (dx[first..end].iter_mut())
            .zip(&self.x_final[first..end])
            .zip(&self.rrms[first..end]);
        for (index, ((dx, x_final), rrms)) in sequences.enumerate() {
            if end - first > 1 {
                // This sequence's columns of the group's gradient.
                let column = index * seq;
                for (channel, row) in self.dxn.chunks_exact_mut(seq).enumerate() {
                    row.copy_from_slice(&self.dx_group[channel * positions + column..][..seq]);
                }
            }
            let d_rms_final = grads.get_mut(Param::RmsFinal);
            host.rmsnorm_backward(dx, d_rms_final, &self.dxn, x_final, rms_final, rrms);
        }
    }
}

/// `x (C, P)` of the sequences `seqs` (each `(C, T)`) side by side: column
/// `k T + t` is position `t` of `seqs[k]`. One sequence is used in place.
fn gather<'a>(buf: &'a mut Vec<f32>, seqs: &'a [Vec<f32>], dim: usize, seq: usize) -> &'a [f32] {
    if let [one] = seqs {
        return one;
    }
    let positions = seqs.len() * seq;
    buf.resize(dim * positions, 0.0);
    for (index, sequence) in seqs.iter().enumerate() {
        for (channel, row) in sequence.chunks_exact(seq).enumerate() {
            buf[channel * positions + index * seq..][..seq].copy_from_slice(row);
        }
    }
    buf
}
