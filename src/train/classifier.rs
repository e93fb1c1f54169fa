//! The model's head over the batch: the final RMSNorm, the classifier and the
//! cross-entropy, forward and backward. The logits are vocabulary-major,
//! `(V, P)`, for a group of sequences side by side (`P` = sequences x `T`), so
//! that all three classifier products run in faer's fast layouts; groups are
//! as wide as [`LOGITS_FLOATS`] allows.
//!
//! When one sequence's logits alone exceed [`LOGITS_FLOATS`] (vocabularies of
//! 128K-152K tokens at long windows), the classifier runs in blocks of
//! vocabulary rows instead: each block's logits `(R, P)` are made, reduced to
//! the cross-entropy's running statistics (per-chunk maxima and sums) and
//! dropped; after the last block the loss is known, and the backward makes
//! each block's logits again, turns them into their gradient and runs the
//! block's two products (`dE` of the block's rows, its share of `dx`). No
//! `(V, T)` array exists; the price is a second forward product of the
//! classifier. A frozen classifier (LoRA: no `dE`) skips it: each block's
//! exponentials go into `dx` in the same pass, scaled to the positions'
//! running maxima (`host::frozen_dx_block`), and `dx` is finished once the
//! sums are known. The loss equals the whole-vocabulary path's bit for bit
//! (the same chunked statistics, merged in the same order); `dx` sums the
//! blocks' products, which differs from one product by rounding only.
//! Vocabularies whose logits fit keep the whole-vocabulary path and its
//! numbers.
//!
//! This module owns the head's arrays and their math; the layers, the
//! embedding and when anything runs are the engine's.

use crate::model::host::{self, CrossEntropyScratch};
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
    /// Whether (and how) the classifier runs in blocks of vocabulary rows.
    blocks: Blocks,
    pub x_final: Vec<Vec<f32>>, // (C, T) per sequence: the last layer's output
    xn: Vec<Vec<f32>>,          // (C, T) per sequence: its final norm
    rrms: Vec<Vec<f32>>,        // (T) per sequence
    logits: Vec<f32>, // (V or R, group*T): a group's logits (a block's), then their gradient
    x_group: Vec<f32>, // (C, group*T): a group's `xn` side by side
    dx_group: Vec<f32>, // (C, group*T): their gradient
    dxn: Vec<f32>,    // (C, T): one sequence's share of it
    classifier_t: Vec<f32>, // (C, V): E^T, made when there are several groups
    stats: CrossEntropyScratch,
}

impl ClassifierHead {
    pub fn new(config: &ModelConfig, seq: usize, batch: usize) -> ClassifierHead {
        let (dim, vocab) = (config.dim, config.vocab_size);
        let group = (LOGITS_FLOATS / (vocab * seq)).clamp(1, batch);
        let blocks = Blocks::needed(vocab, group * seq);
        let held_rows = blocks.rows(vocab, group * seq);
        ClassifierHead {
            dim,
            vocab,
            seq,
            batch,
            group,
            blocks,
            x_final: vec![vec![0.0; dim * seq]; batch],
            xn: vec![vec![0.0; dim * seq]; batch],
            rrms: vec![vec![0.0; seq]; batch],
            logits: vec![0.0; group * seq * held_rows],
            x_group: Vec::new(),
            dx_group: Vec::new(),
            dxn: Vec::new(),
            classifier_t: Vec::new(),
            stats: CrossEntropyScratch::default(),
        }
    }

    /// Sequences per classifier group (at least one, at most the batch);
    /// blocks of the vocabulary when their logits do not fit [`LOGITS_FLOATS`].
    pub fn set_group(&mut self, sequences: usize) {
        self.group = sequences.clamp(1, self.batch);
        self.set_blocks(Blocks::needed(self.vocab, self.group * self.seq));
    }

    /// Run the classifier in blocks of `rows` vocabulary rows (`Some`), or
    /// over the whole vocabulary at once (`None`).
    pub fn set_block_rows(&mut self, rows: Option<usize>) {
        self.set_blocks(rows.map_or(Blocks::Whole, |rows| Blocks::Rows(rows.max(1))));
    }

    fn set_blocks(&mut self, blocks: Blocks) {
        self.blocks = blocks;
        let positions = self.group * self.seq;
        self.logits = vec![0.0; positions * blocks.rows(self.vocab, positions)];
    }

    /// The vocabulary rows of each block for `positions` positions, with the
    /// logits array grown to hold them (a last, smaller group may take more rows).
    fn rows_per_block(&mut self, positions: usize) -> usize {
        let rows = self.blocks.rows(self.vocab, positions);
        if self.logits.len() < rows * positions {
            self.logits.resize(rows * positions, 0.0);
        }
        rows
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

    /// Logits of one sequence of the batch as rows `(T, V)` into `out`.
    pub fn logits_rows(
        &mut self,
        host: &mut TimedHost,
        weights: &Weights,
        sequence: usize,
        out: &mut [f32],
    ) {
        let (vocab, seq, dim) = (self.vocab, self.seq, self.dim);
        if self.blocks == Blocks::Whole {
            self.classify(host, weights, sequence, sequence + 1);
            crate::linalg::transpose_into(&self.logits[..vocab * seq], vocab, seq, out);
            return;
        }
        let rows = self.rows_per_block(seq);
        let classifier = weights.classifier();
        for first_row in (0..vocab).step_by(rows) {
            let end_row = (first_row + rows).min(vocab);
            let logits = &mut self.logits[..(end_row - first_row) * seq];
            let block = &classifier[first_row * dim..end_row * dim];
            host.classifier_forward(logits, &self.xn[sequence], block, dim);
            for (row, values) in logits.chunks_exact(seq).enumerate() {
                for (position, &value) in values.iter().enumerate() {
                    out[position * vocab + first_row + row] = value;
                }
            }
        }
    }

    /// Cross-entropy summed over every position of the batch, each times its
    /// weight in `target_weights` (`(B, T)`; `None`: 1), forward only.
    pub fn loss(
        &mut self,
        host: &mut TimedHost,
        weights: &Weights,
        targets: &[u32],
        target_weights: Option<&[f32]>,
    ) -> f64 {
        let seq = self.seq;
        let mut total = 0.0;
        for (first, end) in self.groups() {
            let targets = &targets[first * seq..end * seq];
            (self.stats).set_weights(target_weights.map(|w| &w[first * seq..end * seq]));
            if self.blocks != Blocks::Whole {
                total += self.blocked_loss(host, weights, first, end, targets);
                continue;
            }
            self.classify(host, weights, first, end);
            let logits = &mut self.logits[..self.vocab * (end - first) * seq];
            total += host.cross_entropy(logits, targets, None, &mut self.stats);
        }
        total
    }

    /// The cross-entropy of group `first..end` summed over its positions,
    /// its logits made block by block (the statistics stay for the backward).
    fn blocked_loss(
        &mut self,
        host: &mut TimedHost,
        weights: &Weights,
        first: usize,
        end: usize,
        targets: &[u32],
    ) -> f64 {
        let (dim, seq, vocab) = (self.dim, self.seq, self.vocab);
        let positions = (end - first) * seq;
        let rows = self.rows_per_block(positions);
        let x = gather(&mut self.x_group, &self.xn[first..end], dim, seq);
        host::cross_entropy_begin(vocab, positions, rows, &mut self.stats);
        let classifier = weights.classifier();
        let mut target_sum = 0.0;
        for first_row in (0..vocab).step_by(rows) {
            let end_row = (first_row + rows).min(vocab);
            let logits = &mut self.logits[..(end_row - first_row) * positions];
            let block = &classifier[first_row * dim..end_row * dim];
            host.classifier_forward(logits, x, block, dim);
            target_sum += host.cross_entropy_block(logits, first_row, targets, &mut self.stats);
        }
        host.cross_entropy_finish(&mut self.stats) - target_sum
    }

    /// Forward and backward of the head: returns the cross-entropy summed over
    /// every position (each times its weight in `target_weights`, `(B, T)`,
    /// when given), writes the classifier's and the final norm's
    /// gradients of `grad_scale` times that sum (unless the base is frozen:
    /// then no `dE` product), and adds the gradient of each sequence's
    /// `x_final` to `dx`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        host: &mut TimedHost,
        weights: &Weights,
        grads: &mut GradSink,
        targets: &[u32],
        target_weights: Option<&[f32]>,
        grad_scale: f32,
        dx: &mut [Vec<f32>],
    ) -> f64 {
        // With several groups, E^T once per step: the classifier's dx product
        // then has a row-major left operand (faer's fast form) for all of them.
        if self.several_groups() && self.blocks == Blocks::Whole {
            self.classifier_t.resize(self.dim * self.vocab, 0.0);
            host.transpose_classifier(weights.classifier(), self.dim, &mut self.classifier_t);
        }
        self.dxn.resize(self.dim * self.seq, 0.0);
        let mut total = 0.0;
        for (first, end) in self.groups() {
            let positions = first * self.seq..end * self.seq;
            (self.stats).set_weights(target_weights.map(|w| &w[positions.clone()]));
            let targets = &targets[positions];
            let frozen = grads.base_mut(weights.layout.classifier()).is_none();
            if self.blocks != Blocks::Whole && frozen {
                total += self.blocked_frozen(host, weights, first, end, targets, grad_scale);
            } else if self.blocks != Blocks::Whole {
                total += self.blocked_loss(host, weights, first, end, targets);
                self.blocked_products(host, weights, grads, first, end, targets, grad_scale);
            } else {
                self.classify(host, weights, first, end);
                let positions = (end - first) * self.seq;
                let logits = &mut self.logits[..self.vocab * positions];
                total += host.cross_entropy(logits, targets, Some(grad_scale), &mut self.stats);
                self.group_products(host, weights, grads, first, end);
            }
            self.group_norm_backward(host, weights, grads, first, end, dx);
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

    /// The classifier's products of group `first..end` from its logits'
    /// gradient: `dE`, and the group's `dxn` (in `dxn` for one sequence, else
    /// in `dx_group`).
    fn group_products(
        &mut self,
        host: &mut TimedHost,
        weights: &Weights,
        grads: &mut GradSink,
        first: usize,
        end: usize,
    ) {
        let (dim, seq, several) = (self.dim, self.seq, self.several_groups());
        let positions = (end - first) * seq;
        let logits = &self.logits[..self.vocab * positions];
        let (x, dx_group) = group_arrays(
            &self.xn[first..end],
            &self.x_group,
            &mut self.dxn,
            &mut self.dx_group,
            dim * positions,
        );
        let add = grads.adds(first);
        let d_classifier = grads.base_mut(weights.layout.classifier());
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
    }

    /// [`ClassifierHead::group_products`] block by block, after
    /// [`ClassifierHead::blocked_loss`]: each block's logits made again,
    /// turned into their gradient, and its products.
    #[allow(clippy::too_many_arguments)]
    fn blocked_products(
        &mut self,
        host: &mut TimedHost,
        weights: &Weights,
        grads: &mut GradSink,
        first: usize,
        end: usize,
        targets: &[u32],
        grad_scale: f32,
    ) {
        let (dim, seq, vocab) = (self.dim, self.seq, self.vocab);
        let positions = (end - first) * seq;
        let rows = self.rows_per_block(positions);
        let (x, dx_group) = group_arrays(
            &self.xn[first..end],
            &self.x_group,
            &mut self.dxn,
            &mut self.dx_group,
            dim * positions,
        );
        let add = grads.adds(first);
        let mut d_classifier = grads.base_mut(weights.layout.classifier());
        let classifier = weights.classifier();
        for (index, first_row) in (0..vocab).step_by(rows).enumerate() {
            let end_row = (first_row + rows).min(vocab);
            let logits = &mut self.logits[..(end_row - first_row) * positions];
            let block = first_row * dim..end_row * dim;
            host.classifier_forward(logits, x, &classifier[block.clone()], dim);
            host.cross_entropy_block_gradient(
                logits,
                first_row,
                targets,
                grad_scale,
                &mut self.stats,
            );
            let d_block = d_classifier.as_deref_mut().map(|d| &mut d[block.clone()]);
            let e_block = &classifier[block];
            host.classifier_backward_block(
                dx_group,
                index > 0,
                d_block,
                logits,
                x,
                e_block,
                dim,
                add,
            );
        }
    }

    /// [`ClassifierHead::blocked_loss`] and the group's `dxn` of a frozen
    /// classifier in one pass over the blocks (`host::frozen_dx_block`): no
    /// `dE`, so no block's logits are made again.
    fn blocked_frozen(
        &mut self,
        host: &mut TimedHost,
        weights: &Weights,
        first: usize,
        end: usize,
        targets: &[u32],
        grad_scale: f32,
    ) -> f64 {
        let (dim, seq, vocab) = (self.dim, self.seq, self.vocab);
        let positions = (end - first) * seq;
        let rows = self.rows_per_block(positions);
        let (x, dx_group) = group_arrays(
            &self.xn[first..end],
            &self.x_group,
            &mut self.dxn,
            &mut self.dx_group,
            dim * positions,
        );
        host::cross_entropy_begin(vocab, positions, rows, &mut self.stats);
        let classifier = weights.classifier();
        let (mut reference, mut factor) = (Vec::new(), Vec::new());
        let mut target_sum = 0.0;
        for (index, first_row) in (0..vocab).step_by(rows).enumerate() {
            let end_row = (first_row + rows).min(vocab);
            let logits = &mut self.logits[..(end_row - first_row) * positions];
            let block = &classifier[first_row * dim..end_row * dim];
            host.classifier_forward(logits, x, block, dim);
            target_sum += host.cross_entropy_block(logits, first_row, targets, &mut self.stats);
            let (first_block, stats) = (index == 0, &self.stats);
            host.frozen_dx_block(
                logits,
                block,
                dim,
                &mut reference,
                dx_group,
                first_block,
                stats,
                &mut factor,
            );
        }
        let total = host.cross_entropy_finish(&mut self.stats) - target_sum;
        host.frozen_dx_finish(
            dx_group,
            classifier,
            dim,
            targets,
            grad_scale,
            &mut self.stats,
        );
        total
    }

    /// Each sequence's final norm backward of group `first..end` into `dx`,
    /// from the group's `dxn` that the products left.
    fn group_norm_backward(
        &mut self,
        host: &mut TimedHost,
        weights: &Weights,
        grads: &mut GradSink,
        first: usize,
        end: usize,
        dx: &mut [Vec<f32>],
    ) {
        let seq = self.seq;
        let positions = (end - first) * seq;
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
            let d_rms_final = grads.base_mut(Param::RmsFinal);
            host.rmsnorm_backward(dx, d_rms_final, &self.dxn, x_final, rms_final, rrms);
        }
    }
}

/// How the classifier covers the vocabulary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Blocks {
    /// All rows at once (the logits fit [`LOGITS_FLOATS`]).
    Whole,
    /// Blocks of as many rows as fit [`LOGITS_FLOATS`], each a multiple of
    /// the cross-entropy's chunk rows, so that the loss is the whole path's
    /// bit for bit.
    Fitting,
    /// Blocks of this many rows (tests, tuning).
    Rows(usize),
}

impl Blocks {
    /// Blocks only where `positions` positions' logits exceed [`LOGITS_FLOATS`].
    fn needed(vocab: usize, positions: usize) -> Blocks {
        if vocab * positions > LOGITS_FLOATS {
            Blocks::Fitting
        } else {
            Blocks::Whole
        }
    }

    /// The rows per block (at most the vocabulary) for `positions` positions.
    fn rows(self, vocab: usize, positions: usize) -> usize {
        let rows = match self {
            Blocks::Whole => vocab,
            Blocks::Fitting => {
                let chunk = host::cross_entropy_rows(positions, vocab);
                (LOGITS_FLOATS / positions / chunk).max(1) * chunk
            }
            Blocks::Rows(rows) => rows,
        };
        rows.min(vocab)
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

/// A group's activations, as `classify` gathered them (a single sequence's
/// own array, else the gathered `x_group`), and the array its input gradient
/// goes to (`dxn` for one sequence, else `dx_group` sized to `len`).
fn group_arrays<'a>(
    xn: &'a [Vec<f32>],
    x_group: &'a [f32],
    dxn: &'a mut Vec<f32>,
    dx_group: &'a mut Vec<f32>,
    len: usize,
) -> (&'a [f32], &'a mut Vec<f32>) {
    match xn {
        [one] => (one.as_slice(), dxn),
        _ => {
            dx_group.resize(len, 0.0);
            (&x_group[..len], dx_group)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 151,936-token vocabulary at a 512-token window runs in blocks whose
    /// logits fit [`LOGITS_FLOATS`]; a 32,000-token one at 1,024 does not need them.
    #[test]
    fn large_vocabularies_run_in_blocks_that_fit() {
        let qwen = ModelConfig::preset("qwen2.5-0.5b").unwrap();
        let head = ClassifierHead::new(&qwen, 512, 1);
        assert_eq!(head.blocks, Blocks::Fitting);
        assert!(head.logits.len() <= LOGITS_FLOATS);
        let rows = head.blocks.rows(qwen.vocab_size, 512);
        assert_eq!(rows % host::cross_entropy_rows(512, qwen.vocab_size), 0);
        assert!(rows < qwen.vocab_size);
        let stories = ModelConfig::preset("stories110m").unwrap();
        let head = ClassifierHead::new(&stories, 1024, 4);
        assert_eq!((head.blocks, head.group), (Blocks::Whole, 1));
    }
}
