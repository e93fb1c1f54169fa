//! One LoRA fine-tuning step: the base stays frozen (read, never written,
//! no gradient, no optimizer state), the adapters are what trains. The
//! engine's forward runs on the merged weights `W + s B A` (made again after
//! each optimizer step, so the kernels keep their runtime weights and compile
//! once), so its backward's `dx` is the adapted model's; its frozen-base
//! backward (`Engine::forward_backward_lora`) computes the adapters'
//! gradients alone, from each adapted projection's `dY` and `X`. AdamW then
//! updates the adapters alone (`AdamW::step_matrices`).
//!
//! The step owns the merged weights and keeps the base values of the adapted
//! matrices only (the rest of the merged weights are the base), so a run
//! holds one copy of the model; those values are kept in bf16 when that is
//! exact (every value of a bf16 checkpoint), else in f32 ([`BaseValues`]).
//!
//! What it deliberately does not own: batches and their loss weights
//! (`data::sft`), the optimizer's schedule and the run loop.

use std::path::Path;

use half::bf16;
use serde::{Deserialize, Serialize};

use crate::linalg::{gemm, n};
use crate::model::checkpoint;
use crate::model::lora::{Adapters, LoraConfig, Target};
use crate::model::{ModelConfig, Param, Weights};
use crate::train::adapter_path::{AdapterPath, DropoutKey};
use crate::train::engine::{Engine, GradWrite, LossWeights};
use crate::train::optim::{self, AdamState, AdamW};
use crate::{Error, Result};

/// The arrays of a LoRA step: the weights the engine runs and the
/// adapters' gradient.
pub struct LoraStep {
    weights: StepWeights,
    grads: Adapters, // the adapters' gradient
}

/// What the engine's kernels run.
enum StepWeights {
    /// The merged weights and the base values of the adapted matrices.
    Merged {
        merged: Weights,                // the base's layout: W + s B A
        base: Vec<(Param, BaseValues)>, // W of every adapted matrix
    },
    /// The base alone, for an unmerged engine (`Engine::for_lora`): the
    /// adapters run beside it.
    Unmerged(Weights),
}

/// The base values of one adapted matrix, as compact as is exact: bf16 when
/// every value is a bf16 (its low 16 bits zero: a bf16 checkpoint's
/// matrices, widened on loading), else f32. Half the memory for the usual
/// checkpoints, and the merge restores the base bit for bit either way.
enum BaseValues {
    Bf16(Vec<bf16>),
    F32(Vec<f32>),
}

impl BaseValues {
    fn keep(values: &[f32]) -> BaseValues {
        if values.iter().all(|value| value.to_bits() & 0xffff == 0) {
            BaseValues::Bf16(values.iter().map(|&value| bf16::from_f32(value)).collect())
        } else {
            BaseValues::F32(values.to_vec())
        }
    }

    /// Write the values (widened, exactly) over `dst`.
    fn restore(&self, dst: &mut [f32]) {
        match self {
            BaseValues::Bf16(values) => {
                for (dst, value) in dst.iter_mut().zip(values) {
                    *dst = value.to_f32();
                }
            }
            BaseValues::F32(values) => dst.copy_from_slice(values),
        }
    }
}

impl LoraStep {
    /// The step's arrays for `base` (taken over) and `adapters`, for
    /// `engine`: merged into the base, or beside it for an unmerged engine.
    pub fn new(base: Weights, adapters: &Adapters, engine: &Engine) -> Result<LoraStep> {
        if adapters.model() != base.config() {
            return Err(Error::Invalid(
                "lora: the adapters were made for another model than the base".into(),
            ));
        }
        let mut grads = adapters.clone();
        grads.data.fill(0.0);
        if engine.unmerged() {
            return Ok(LoraStep {
                weights: StepWeights::Unmerged(base),
                grads,
            });
        }
        if adapters.config.dropout != 0.0 {
            return Err(Error::Invalid(format!(
                "lora: dropout {} needs an engine with the adapters beside the base \
                 (Engine::for_lora), not merged into it",
                adapters.config.dropout
            )));
        }
        let kept = adapters
            .config
            .entries()
            .into_iter()
            .map(|(layer, target): (usize, Target)| {
                let param = target.param(layer);
                (param, BaseValues::keep(base.get(param)))
            })
            .collect();
        let mut step = LoraStep {
            weights: StepWeights::Merged {
                merged: base,
                base: kept,
            },
            grads,
        };
        step.merge(adapters);
        Ok(step)
    }

    /// Merge `adapters` into the base again (after they changed): each
    /// adapted matrix restored to its base, then `W += s B A` by one product
    /// accumulated into it (no `s B A` array, no second pass over it).
    /// Nothing for an unmerged step.
    pub fn merge(&mut self, adapters: &Adapters) {
        let StepWeights::Merged { merged, base } = &mut self.weights else {
            return;
        };
        let (rank, scale) = (adapters.config.rank, adapters.config.scale());
        for (param, values) in base.iter() {
            let (layer, target) = Target::of(*param).expect("an adapted projection");
            let (out, input) = target.shape(adapters.model());
            let w = merged.get_mut(*param);
            values.restore(w);
            let b = n(adapters.b(layer, target), out, rank);
            let a = n(adapters.a(layer, target), rank, input);
            gemm(w, out, input, b, a, scale, true);
        }
    }

    /// The weights the engine's kernels run: merged, or the base of an
    /// unmerged step.
    pub fn weights(&self) -> &Weights {
        match &self.weights {
            StepWeights::Merged { merged, .. } => merged,
            StepWeights::Unmerged(base) => base,
        }
    }

    /// Whether the adapters run beside the base (an unmerged engine's step).
    pub fn unmerged(&self) -> bool {
        matches!(self.weights, StepWeights::Unmerged(_))
    }

    /// Forward and backward of one micro-batch with the base frozen:
    /// `loss_scale` times the gradient of `sum(w ce) / loss.divisor` into
    /// the adapters' gradient (written over on the step's first
    /// micro-batch, `GradWrite::Overwrite`, else added); returns the loss.
    /// `key` draws the adapters' dropout masks (an unmerged step's).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward(
        &mut self,
        engine: &mut Engine,
        adapters: &Adapters,
        write: GradWrite,
        inputs: &[u32],
        loss: LossWeights,
        loss_scale: f32,
        key: DropoutKey,
    ) -> Result<f64> {
        let grads = &mut self.grads;
        match &self.weights {
            StepWeights::Merged { merged, .. } => engine
                .forward_backward_lora(merged, adapters, grads, write, inputs, loss, loss_scale),
            StepWeights::Unmerged(base) => {
                let path = AdapterPath::new(adapters, key);
                engine.forward_backward_unmerged(base, path, grads, write, inputs, loss, loss_scale)
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// bf16 values are kept in bf16 and restored bit for bit; one value
    /// with more bits keeps the whole matrix in f32.
    #[test]
    fn base_values_are_kept_in_bf16_only_when_exact() {
        let exact = [
            1.0f32,
            -0.0,
            3.140625,
            f32::from_bits(0x3f81_0000),
            1e-30f32,
        ];
        let exact = exact.map(|v| bf16::from_f32(v).to_f32());
        let kept = BaseValues::keep(&exact);
        assert!(matches!(kept, BaseValues::Bf16(_)));
        let mut restored = [7.0; 5];
        kept.restore(&mut restored);
        assert_eq!(restored.map(f32::to_bits), exact.map(f32::to_bits));
        let wider = [1.0f32, 0.1];
        let kept = BaseValues::keep(&wider);
        assert!(matches!(kept, BaseValues::F32(_)));
        let mut restored = [0.0; 2];
        kept.restore(&mut restored);
        assert_eq!(restored, wider);
    }
}
