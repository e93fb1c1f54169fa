//! [`Batches`] over a token file: `batch` windows per call from a
//! [`Batcher`](crate::data::tokens::Batcher), with its position saved in checkpoints.

use super::Batches;
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
        serde_json::to_value(self.batcher.state()).expect("batcher state serializes")
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        let state: BatcherState = serde_json::from_value(state.clone())
            .map_err(|e| Error::Invalid(format!("checkpoint data position: {e}")))?;
        self.batcher.restore(state)
    }

    fn rewind(&mut self) {
        self.batcher
            .restore(self.start)
            .expect("the initial state always fits");
    }
}
