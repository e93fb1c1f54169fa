//! One LoRA fine-tuning step: the base stays frozen (read, never written,
//! no optimizer state), the adapters are what trains. The engine runs on the
//! merged weights `W + s B A` (made again after each optimizer step, so the
//! kernels keep their runtime weights and compile once) and gives the merged
//! weights' gradient `dW`, from which `dA = s B^T dW` and `dB = s dW A^T`
//! exactly (`Adapters::grads_from_dw`); AdamW then updates the adapters
//! alone (`AdamW::step_matrices`).
//!
//! The step owns the merged weights and keeps the base values of the adapted
//! matrices only (the rest of the merged weights are the base), so a run
//! holds one copy of the model.
//!
//! What it deliberately does not own: batches and their loss weights
//! (`data::sft`), the optimizer's schedule and the run loop.

use crate::model::lora::{Adapters, Target};
use crate::model::{Param, Weights};
use crate::train::engine::{Engine, GradWrite, LossWeights};
use crate::train::optim::{self, AdamState, AdamW};
use crate::{Error, Result};

/// The arrays of a LoRA step: the merged weights, the base values of the
/// adapted matrices, and the gradients.
pub struct LoraStep {
    merged: Weights,              // the base's layout: W + s B A
    base: Vec<(Param, Vec<f32>)>, // W of every adapted matrix
    dw: Weights,                  // the base's layout: d(loss)/d(merged)
    grads: Adapters,              // the adapters' gradient
}

impl LoraStep {
    /// The step's arrays for `base` (taken over) with `adapters` merged in.
    pub fn new(base: Weights, adapters: &Adapters) -> Result<LoraStep> {
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
        let kept = adapters
            .config
            .entries()
            .into_iter()
            .map(|(layer, target): (usize, Target)| {
                let param = target.param(layer);
                (param, base.get(param).to_vec())
            })
            .collect();
        let mut grads = adapters.clone();
        grads.data.fill(0.0);
        let mut step = LoraStep {
            dw: Weights::zeros(base.config()),
            merged: base,
            base: kept,
            grads,
        };
        step.merge(adapters);
        Ok(step)
    }

    /// Merge `adapters` into the base again (after they changed).
    pub fn merge(&mut self, adapters: &Adapters) {
        for (param, values) in &self.base {
            self.merged.get_mut(*param).copy_from_slice(values);
        }
        adapters.fuse_into(&mut self.merged);
    }

    /// The merged weights, as the engine sees them.
    pub fn merged(&self) -> &Weights {
        &self.merged
    }

    /// Forward and backward of one micro-batch on the merged weights:
    /// `loss_scale` times the gradient of `sum(w ce) / loss.divisor` into
    /// the adapters' gradient (written over on the step's first
    /// micro-batch, `GradWrite::Overwrite`, else added); returns the loss.
    pub fn forward_backward(
        &mut self,
        engine: &mut Engine,
        adapters: &Adapters,
        write: GradWrite,
        inputs: &[u32],
        loss: LossWeights,
        loss_scale: f32,
    ) -> Result<f64> {
        let (merged, dw) = (&self.merged, &mut self.dw);
        let value =
            engine.forward_backward_weighted(merged, dw, write, inputs, loss, loss_scale)?;
        // dW accumulates over the micro-batches and the map to the adapters
        // is linear, so the map of the sum is the sum of the gradients.
        self.grads = adapters.grads_from_dw(&self.dw);
        Ok(value)
    }

    /// The adapters' gradient from the micro-batches so far.
    pub fn grads(&self) -> &Adapters {
        &self.grads
    }

    /// The adapters' gradient, to be summed over data-parallel ranks.
    pub fn grads_mut(&mut self) -> &mut Adapters {
        &mut self.grads
    }

    /// The L2 norm of the adapters' gradient.
    pub fn grad_norm(&self) -> f64 {
        optim::global_norm(&self.grads.data)
    }

    /// AdamW on the adapters alone from their gradient (`grad_scale` undoes
    /// a loss scale and clips), then the merged weights made again.
    pub fn update(
        &mut self,
        adapters: &mut Adapters,
        opt: &AdamW,
        state: &mut AdamState,
        lr: f32,
        grad_scale: f32,
    ) {
        opt.step_matrices(&mut adapters.data, &self.grads.data, state, lr, grad_scale);
        self.merge(adapters);
    }
}
