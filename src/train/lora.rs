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

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::model::checkpoint;
use crate::model::lora::{Adapters, LoraConfig, Target};
use crate::model::{ModelConfig, Param, Weights};
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

/// A LoRA run's checkpoint in its directory: adapters, AdamW moments and the
/// trainer's state (the base is not in it: the run records where it is and
/// its fingerprint, `model::hf::adapter::BaseRecord`).
pub const CHECKPOINT_FILE: &str = "lora_checkpoint.bin";
/// The run's adapters in PEFT's layout, written with each checkpoint.
pub const ADAPTERS_DIR: &str = "adapters";
/// The magic of [`CHECKPOINT_FILE`] (the container of `model::checkpoint`).
const MAGIC: &[u8; 8] = b"ANEMLORA";

#[derive(Serialize, Deserialize)]
struct Header {
    model: ModelConfig,
    lora: LoraConfig,
    n_values: u64,
    adam_t: u64,
    state: serde_json::Value,
}

/// A loaded LoRA checkpoint.
pub struct LoraCheckpoint {
    pub adapters: Adapters,
    /// AdamW moments `(m, v)` and step count `t`.
    pub moments: (Vec<f32>, Vec<f32>, u64),
    /// Trainer state (opaque here).
    pub state: serde_json::Value,
}

/// Save `adapters`, their AdamW moments and the trainer's `state` atomically.
pub fn save_checkpoint(
    path: &Path,
    adapters: &Adapters,
    moments: (&[f32], &[f32], u64),
    state: &serde_json::Value,
) -> Result<()> {
    let header = Header {
        model: adapters.model().clone(),
        lora: adapters.config.clone(),
        n_values: adapters.data.len() as u64,
        adam_t: moments.2,
        state: state.clone(),
    };
    let json = serde_json::to_vec(&header).map_err(|e| Error::Invalid(e.to_string()))?;
    let arrays = [adapters.data.as_slice(), moments.0, moments.1];
    checkpoint::write_container(path, MAGIC, &json, &arrays)
}

/// Load a checkpoint written by [`save_checkpoint`], every field checked.
pub fn load_checkpoint(path: &Path) -> Result<LoraCheckpoint> {
    let bytes = crate::memory::read_file(path, u64::MAX)?;
    let mut adapters = None;
    let sizes = |header: &Header| {
        header
            .model
            .validate()
            .map_err(|e| Error::format(path, "header.model", e.to_string()))?;
        let zeros = Adapters::zeros(&header.model, &header.lora)
            .map_err(|e| Error::format(path, "header.lora", e.to_string()))?;
        if zeros.data.len() as u64 != header.n_values {
            return Err(Error::format(
                path,
                "header.n_values",
                format!(
                    "{} does not match the {} values of the adapters header.lora describes",
                    header.n_values,
                    zeros.data.len()
                ),
            ));
        }
        let n = zeros.data.len();
        adapters = Some(zeros);
        Ok((n, 3))
    };
    let what = "an anemone LoRA checkpoint";
    let (header, mut arrays): (Header, _) =
        checkpoint::read_container(&bytes, path, MAGIC, what, sizes)?;
    let mut adapters = adapters.expect("sized by the header");
    let (v, m) = (arrays.pop().expect("3"), arrays.pop().expect("3"));
    adapters.data = arrays.pop().expect("3");
    if let Some(index) = adapters.data.iter().position(|v| !v.is_finite()) {
        return Err(Error::format(
            path,
            "adapters",
            format!("value {index} is not finite; use an earlier checkpoint"),
        ));
    }
    Ok(LoraCheckpoint {
        adapters,
        moments: (m, v, header.adam_t),
        state: header.state,
    })
}
