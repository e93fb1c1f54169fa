//! One LoRA fine-tuning step on the full-training engine: the base stays
//! frozen (read, never written, no optimizer state), the adapters are what
//! trains. The engine runs on the merged weights `W + s B A` (made again
//! after each optimizer step, so the kernels keep their runtime weights and
//! compile once) and gives the merged weights' gradient `dW`, from which
//! `dA = s B^T dW` and `dB = s dW A^T` exactly (`Adapters::grads_from_dw`);
//! AdamW then updates the adapters alone (`AdamW::step_matrices`).
//!
//! This is the first engine for LoRA: its numbers are the definition the
//! faster path (base weights baked into the kernels, adapters as kernel
//! inputs, rank-r gradient jobs instead of the base's `dW` GEMMs; see
//! `docs/lora.md`) must reproduce. It costs what full training costs plus
//! the merge and the rank-r products.
//!
//! What it deliberately does not own: batches and their loss weights
//! (`data::sft`), the optimizer's schedule and the run loop.

use crate::model::Weights;
use crate::model::lora::Adapters;
use crate::train::engine::{Engine, GradWrite, LossWeights};
use crate::train::optim::{AdamState, AdamW};
use crate::{Error, Result};

/// The arrays of a LoRA step beside the frozen base: the merged weights and
/// their gradient.
pub struct LoraStep {
    merged: Weights, // the base's layout: W + s B A
    dw: Weights,     // the base's layout: d(loss)/d(merged)
}

impl LoraStep {
    /// The step's arrays for `base` with `adapters` merged in.
    pub fn new(base: &Weights, adapters: &Adapters) -> Result<LoraStep> {
        if adapters.model() != base.config() {
            return Err(Error::Invalid(
                "lora: the adapters were made for another model than the base".into(),
            ));
        }
        if adapters.config.dropout != 0.0 {
            return Err(Error::Invalid(format!(
                "lora: dropout {} is not implemented by the training step yet; use \
                 --lora-dropout 0",
                adapters.config.dropout
            )));
        }
        let mut step = LoraStep {
            merged: base.clone(),
            dw: Weights::zeros(base.config()),
        };
        step.merge(base, adapters);
        Ok(step)
    }

    /// Merge `adapters` into a copy of `base` again (after they changed).
    pub fn merge(&mut self, base: &Weights, adapters: &Adapters) {
        self.merged.data.copy_from_slice(&base.data);
        adapters.fuse_into(&mut self.merged);
    }

    /// The merged weights, as the engine sees them.
    pub fn merged(&self) -> &Weights {
        &self.merged
    }

    /// Forward and backward of one micro-batch on the merged weights:
    /// `loss_scale` times the gradient of `sum(w ce) / loss.divisor` into
    /// the merged weights' gradient (written over on the step's first
    /// micro-batch, `GradWrite::Overwrite`, else added); returns the loss.
    pub fn forward_backward(
        &mut self,
        engine: &mut Engine,
        write: GradWrite,
        inputs: &[u32],
        loss: LossWeights,
        loss_scale: f32,
    ) -> Result<f64> {
        let (merged, dw) = (&self.merged, &mut self.dw);
        engine.forward_backward_weighted(merged, dw, write, inputs, loss, loss_scale)
    }

    /// The adapters' gradient from the micro-batches so far.
    pub fn adapter_grads(&self, adapters: &Adapters) -> Adapters {
        adapters.grads_from_dw(&self.dw)
    }

    /// AdamW on the adapters alone from their gradient (`grad_scale` undoes
    /// a loss scale and clips), then the merged weights made again.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        base: &Weights,
        adapters: &mut Adapters,
        grads: &Adapters,
        opt: &AdamW,
        state: &mut AdamState,
        lr: f32,
        grad_scale: f32,
    ) {
        opt.step_matrices(&mut adapters.data, &grads.data, state, lr, grad_scale);
        self.merge(base, adapters);
    }
}
