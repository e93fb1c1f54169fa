//! [`Batches`] over a token file: `batch` windows per call from a
//! [`Batcher`](crate::data::tokens::Batcher), with its position saved in
//! checkpoints ([`WindowSource`]); and over fine-tuning examples, with loss
//! weights ([`SftSource`]).

use super::Batches;
use crate::data::sft::SftBatcher;
use crate::data::tokens::{Batcher, BatcherState};
use crate::{Error, Result};

/// Batches of windows from a token span.
pub struct WindowSource {
    batcher: Batcher,
    start: BatcherState,
    seq: usize,
}

impl WindowSource {
    pub fn new(batcher: Batcher) -> WindowSource {
        WindowSource {
            start: batcher.state(),
            seq: batcher.seq_len(),
            batcher,
        }
    }
}

impl Batches for WindowSource {
    fn next_batch(&mut self, inputs: &mut [u32], targets: &mut [u32]) -> Result<()> {
        for (i, t) in inputs
            .chunks_exact_mut(self.seq)
            .zip(targets.chunks_exact_mut(self.seq))
        {
            self.batcher.next_window(i, t)?;
        }
        Ok(())
    }

    fn state(&self) -> serde_json::Value {
        position(self.batcher.state())
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        self.batcher.restore(saved_position(state)?)
    }

    fn rewind(&mut self) {
        self.batcher
            .restore(self.start)
            .expect("the initial state always fits");
    }
}

/// Batches of fine-tuning examples (`data::sft`): one example per window,
/// padded, with a loss weight per target (prompts and padding 0), drawn by
/// an [`SftBatcher`] whose position is saved in checkpoints.
pub struct SftSource {
    batcher: SftBatcher,
    start: BatcherState,
    /// The last batch's weights, `(B, T)`.
    weights: Vec<f32>,
}

impl SftSource {
    pub fn new(batcher: SftBatcher) -> SftSource {
        SftSource {
            start: batcher.state(),
            batcher,
            weights: Vec::new(),
        }
    }

    /// The examples longer than a window (cut at it when drawn).
    pub fn too_long(&self) -> usize {
        self.batcher.too_long()
    }

    pub fn examples(&self) -> usize {
        self.batcher.examples().len()
    }
}

impl Batches for SftSource {
    fn next_batch(&mut self, inputs: &mut [u32], targets: &mut [u32]) -> Result<()> {
        let seq = self.batcher.seq_len();
        let batch = self.batcher.next_batch(inputs.len() / seq);
        inputs.copy_from_slice(&batch.inputs);
        targets.copy_from_slice(&batch.targets);
        self.weights = batch.weights;
        Ok(())
    }

    fn weights(&self) -> Option<&[f32]> {
        Some(&self.weights)
    }

    fn state(&self) -> serde_json::Value {
        position(self.batcher.state())
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        self.batcher.restore(saved_position(state)?)
    }

    fn rewind(&mut self) {
        self.batcher
            .restore(self.start)
            .expect("the initial state always fits");
    }
}

/// A batcher's position as a checkpoint stores it.
fn position(state: BatcherState) -> serde_json::Value {
    serde_json::to_value(state).expect("batcher state serializes")
}

/// The position a checkpoint stored with [`position`].
fn saved_position(state: &serde_json::Value) -> Result<BatcherState> {
    serde_json::from_value(state.clone())
        .map_err(|e| Error::Invalid(format!("checkpoint data position: {e}")))
}
