//! One training step over the backend trait, llm.c-style: embedding, then
//! `layer_forward` per layer, the classifier head, then `layer_backward`
//! per layer in reverse and the embedding's gradient. Layer-major: every
//! sequence of the batch passes through layer `l` before layer `l+1`, so each
//! layer's weights are written once per pass.
//!
//! This module owns the [`Engine`] (its arrays, kernels and clocks) and the
//! order of a step; a layer's math is `layer`'s, the head's `classifier`'s,
//! when weight gradients run `schedule`'s, how they are written `grads`'.
//! With data parallel, the backward of an update's last micro-batch runs as
//! parts (`Backward`: a layer each, then its end) between which a
//! [`Collective`] sums the buckets of gradients already final
//! ([`Engine::sum_next_backward`]; the buckets are `buckets`').
//! Activations are `(C, T)` channel-major on the host, the layout of the
//! kernels' `[1, C, 1, T]` tensors.

use std::sync::Arc;

use crate::backend::Backend;
use crate::dist::{Collective, CommTimes, Overlapped};
use crate::model::kernels::{Deltas, kernel_counts};
use crate::model::kernels::{KernelOptions, LayerKernels, WeightMode};
use crate::model::lora::{Adapters, LoraConfig, Target};
use crate::model::{ModelConfig, Param, Weights};
use crate::train::adapter_path::{AdapterPath, LoraLayer, Scratch};
use crate::train::buckets::{GradBuckets, Readiness};
use crate::train::buffers::{BackwardScratch, DeltaArrays, DySources, LayerActs};
use crate::train::classifier::ClassifierHead;
pub use crate::train::grads::GradWrite;
use crate::train::grads::{GradSink, GradTarget};
use crate::train::kernel::{self, CompiledKernel};
use crate::train::layer::{LayerContext, layer_backward, layer_forward};
use crate::train::params::LayerParams;
use crate::train::profile::{Profile, TimedHost};
use crate::train::schedule::{DwPass, DwSchedule};
use crate::{Error, Result};

/// Runs forward and backward passes of a model on a backend.
pub struct Engine {
    backend: Box<dyn Backend>,
    config: ModelConfig,
    seq: usize,
    batch: usize,
    /// The layer kernels: one set every layer runs with its weights as
    /// inputs, or a set per layer with its weights baked in
    /// ([`Engine::for_lora`] on the ANE).
    kernels: Vec<LayerKernels<CompiledKernel>>,
    /// LoRA beside the base rather than merged into it: the kernels take
    /// the adapters' part of q, k, v, gate and up as added inputs, made on
    /// the host with o's and down's (`train::adapter_path`).
    unmerged: Option<Unmerged>,
    /// What the engine chose instead of what was asked, for the user's log.
    notes: Vec<String>,
    /// `[layer][sequence]`: what the forward saved for the backward.
    acts: Vec<Vec<LayerActs>>,
    /// `[sequence]` `(F, T)`: the FFN's gate of the layer running forward
    /// (not saved: the backward makes it again, `buffers::Input::Gate`).
    gate: Vec<Vec<f32>>,
    /// The final norm, the classifier and the loss.
    head: ClassifierHead,
    /// The backward's arrays that weight gradients read, and the rest.
    dy: DySources,
    scratch: BackwardScratch,
    /// When the weight gradients run.
    schedule: DwSchedule,
    /// The host math, timed per phase.
    host: TimedHost,
    /// Squared norms of the parameters' gradients, each taken as the last
    /// pass finished it (see [`Engine::grad_norm`]), with the parameter.
    grad_sq: Vec<(Param, f64)>,
    /// The sum over ranks the next backward pass runs as it finishes its
    /// gradients ([`Engine::sum_next_backward`]), and what the last one cost.
    reduce: Option<(Arc<dyn Collective>, Arc<GradBuckets>)>,
    reduced: Option<CommTimes>,
}

/// The host's side of an unmerged LoRA engine: the kernels' added inputs
/// and the adapter path's work arrays.
struct Unmerged {
    deltas: DeltaArrays,
    scratch: Scratch,
}

impl Engine {
    /// Compile the layer kernels for `config` at window `seq` for `batch` sequences.
    pub fn new(
        backend: Box<dyn Backend>,
        config: &ModelConfig,
        seq: usize,
        batch: usize,
        opts: KernelOptions,
    ) -> Result<Engine> {
        if opts.mode == WeightMode::Baked {
            return Err(Error::Invalid(
                "training needs kernels with runtime weights (packed or inputs); baked weights are for frozen models".into(),
            ));
        }
        Engine::compiled(backend, config, seq, batch, opts, None)
    }

    /// The engine of a LoRA run on the frozen `base`: kernels on the merged
    /// weights `W + s B A` where they serve (the CPU without dropout, as
    /// [`Engine::new`]), else unmerged ([`Engine::unmerged`]): the base
    /// alone in the kernels, baked into a set per layer where the backend
    /// prefers packed weights (the ANE: it never travels, and each kernel
    /// compiles once per run), as inputs otherwise; the adapters' part
    /// added by the host (`train::adapter_path`), dropout included. Baked
    /// sets that would exceed the backend's compiles per process fall back
    /// to the merged packed kernels (said in [`Engine::fallbacks`]) when
    /// there is no dropout, and are an error otherwise.
    pub fn for_lora(
        backend: Box<dyn Backend>,
        base: &Weights,
        lora: &LoraConfig,
        seq: usize,
        batch: usize,
        opts: KernelOptions,
    ) -> Result<Engine> {
        let config = base.config().clone();
        let dropout = lora.dropout > 0.0;
        let mode = match opts.mode {
            WeightMode::Inputs if !dropout && !lora.unmerged => {
                return Engine::new(backend, &config, seq, batch, opts);
            }
            WeightMode::Inputs => WeightMode::Inputs,
            WeightMode::Packed | WeightMode::Baked => WeightMode::Baked,
        };
        let targets = &lora.targets;
        let deltas = Deltas {
            q: targets.contains(&Target::Q),
            k: targets.contains(&Target::K),
            v: targets.contains(&Target::V),
            gate: targets.contains(&Target::Gate),
            up: targets.contains(&Target::Up),
        };
        let unmerged = KernelOptions {
            mode,
            deltas,
            ..opts
        };
        if mode == WeightMode::Baked {
            let needed = kernel_counts().most_compiles * config.n_layers;
            let limit = backend.preferences().compile_limit;
            if let Some(limit) = limit.filter(|l| l.used + needed > l.limit) {
                let why = format!(
                    "baking the base into every layer's kernels needs {needed} compiles, more than \
                     the {} this process has left",
                    limit.limit.saturating_sub(limit.used)
                );
                if dropout {
                    return Err(Error::Invalid(format!(
                        "--lora-dropout {} on the {} backend: {why}; use --lora-dropout 0 (the \
                         adapters then run merged into packed weights) or raise {}",
                        lora.dropout,
                        backend.name(),
                        limit.raised_by
                    )));
                }
                let mut engine = Engine::new(backend, &config, seq, batch, opts)?;
                engine.notes.push(format!(
                    "note: {why}; the adapters run merged into the packed weights instead"
                ));
                return Ok(engine);
            }
        }
        let baked = (mode == WeightMode::Baked).then_some(base);
        let mut engine = Engine::compiled(backend, &config, seq, batch, unmerged, baked)?;
        engine.unmerged = Some(Unmerged {
            deltas: DeltaArrays::new(&config, deltas, batch, seq),
            scratch: Scratch::default(),
        });
        Ok(engine)
    }

    /// Whether the engine runs LoRA adapters beside the base (see
    /// [`Engine::for_lora`]): its passes then take the adapters
    /// ([`Engine::forward_backward_unmerged`], [`Engine::loss_adapted`]).
    pub fn unmerged(&self) -> bool {
        self.unmerged.is_some()
    }

    /// The engine with its kernels compiled: one set, or with `baked`
    /// weights one set per layer with that layer's baked in.
    fn compiled(
        mut backend: Box<dyn Backend>,
        config: &ModelConfig,
        seq: usize,
        batch: usize,
        opts: KernelOptions,
        baked: Option<&Weights>,
    ) -> Result<Engine> {
        config.validate()?;
        if seq == 0 || seq > config.seq_len {
            return Err(Error::Invalid(format!(
                "sequence length {seq} must be between 1 and the model's seq_len {}",
                config.seq_len
            )));
        }
        let kernels = match baked {
            None => vec![kernel::compile(
                backend.as_mut(),
                config,
                seq,
                opts,
                &|_| None,
            )?],
            Some(weights) => (0..config.n_layers)
                .map(|layer| {
                    let params = LayerParams::new(weights, layer);
                    let values = |name: &str| params.by_slot(name).map(<[f32]>::to_vec);
                    kernel::compile(backend.as_mut(), config, seq, opts, &values)
                })
                .collect::<Result<Vec<_>>>()?,
        };
        let acts = (0..config.n_layers)
            .map(|_| (0..batch).map(|_| LayerActs::new(config, seq)).collect())
            .collect();
        Ok(Engine {
            backend,
            config: config.clone(),
            seq,
            batch,
            kernels,
            unmerged: None,
            notes: Vec::new(),
            acts,
            gate: vec![vec![0.0; config.hidden_dim * seq]; batch],
            head: ClassifierHead::new(config, seq, batch),
            dy: DySources::default(),
            scratch: BackwardScratch::default(),
            schedule: DwSchedule::new(config.qk_norm),
            host: TimedHost::default(),
            grad_sq: Vec::new(),
            reduce: None,
            reduced: None,
        })
    }

    /// Wall time per phase since the last call: every kernel by name, `io`, and
    /// the host phases (`embedding`, `rmsnorm`, `classifier`, `loss`,
    /// `dW gemm`). With two or more worker threads the weight gradients run
    /// beside the backward kernels and are also listed as run side by side
    /// (see [`Profile`]).
    pub fn take_profile(&mut self) -> Profile {
        let mut profile = std::mem::take(&mut self.host.profile);
        profile.merge(self.schedule.take_profile());
        for kernel in self.kernels.iter().flat_map(LayerKernels::iter) {
            kernel.take_times(&mut profile);
        }
        profile
    }

    /// The L2 norm of the gradients as the last [`Engine::forward_backward`]
    /// (or `_as`) left them: each parameter's sum of squares is taken
    /// right after its last product or sum of that pass, while it is still in
    /// cache (most of them beside the next backward kernel), instead of in a
    /// pass over every gradient after the step. Each sum is
    /// [`crate::train::optim::sum_squares`]'s, added in a fixed order, so the
    /// value does not depend on the threads; it equals
    /// [`crate::train::optim::global_norm`] of the whole gradient up to rounding.
    pub fn grad_norm(&self) -> f64 {
        self.grad_sq.iter().map(|(_, sq)| sq).sum::<f64>().sqrt()
    }

    /// Sum the next backward pass's gradients over the ranks of `dist`,
    /// bucket by bucket (`buckets`, of the gradient that pass writes: the
    /// weights' or the adapters'), each as soon as the pass has finished it,
    /// while the rest of the backward runs; the pass returns with the sums
    /// in the gradients (and [`Engine::grad_norm`] still of this rank's).
    /// For one pass: an update's last micro-batch, the same on every rank.
    pub fn sum_next_backward(&mut self, dist: Arc<dyn Collective>, buckets: Arc<GradBuckets>) {
        self.reduce = Some((dist, buckets));
        self.reduced = None;
    }

    /// What the sum asked for by [`Engine::sum_next_backward`] cost; `None`
    /// when it did not run (the pass failed before its backward, or did not
    /// run), so that the caller still takes part in the ranks' sums. Forgets
    /// the request either way.
    pub fn take_reduced(&mut self) -> Option<CommTimes> {
        self.reduce = None;
        self.reduced.take()
    }

    /// What the device refused and what runs instead, for the user's log:
    /// one line per kernel compiled as its split (the fused attention
    /// backward a chip's compiler refused, run as the reference's two
    /// kernels), and the merged kernels a LoRA engine chose where baked ones
    /// would exceed the compile limit. Empty when everything ran as asked.
    pub fn fallbacks(&self) -> Vec<String> {
        let mut notes = self.notes.clone();
        let mut seen = std::collections::BTreeSet::new();
        let split = self
            .kernels
            .iter()
            .flat_map(LayerKernels::iter)
            .filter(|kernel| kernel.parts().is_some() && seen.insert(kernel.name().to_string()))
            .filter_map(|kernel| {
                let parts = kernel.parts()?;
                let names: Vec<&str> = parts.iter().map(|part| part.name()).collect();
                Some(format!(
                    "note: the {} backend refused the fused `{}` kernel, so its split runs instead \
                     ({}, the same numbers); the refusal: {}",
                    self.backend.name(),
                    kernel.name(),
                    names.join(" then "),
                    kernel.refused().unwrap_or_default()
                ))
            });
        notes.extend(split);
        notes
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    pub fn seq(&self) -> usize {
        self.seq
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Sequences per classifier group: by default as many as fit in 128 MiB
    /// of logits (at least one). Fewer means less memory.
    pub fn set_classifier_group(&mut self, sequences: usize) {
        self.head.set_group(sequences);
    }

    /// Run the classifier in blocks of about `rows` vocabulary rows
    /// (`Some`), or over the whole vocabulary at once (`None`); by default it
    /// runs in blocks only when one group's logits exceed 128 MiB (see
    /// `train::classifier`). The loss is the same either way.
    pub fn set_classifier_blocks(&mut self, rows: Option<usize>) {
        self.head.set_block_rows(rows);
    }

    fn check_tokens(&self, tokens: &[u32], what: &str) -> Result<()> {
        if tokens.len() != self.batch * self.seq {
            return Err(Error::Invalid(format!(
                "{what}: expected {} tokens (batch {} x seq {}), got {}",
                self.batch * self.seq,
                self.batch,
                self.seq,
                tokens.len()
            )));
        }
        if let Some((position, &token)) = tokens
            .iter()
            .enumerate()
            .find(|(_, token)| **token as usize >= self.config.vocab_size)
        {
            return Err(Error::Invalid(format!(
                "{what}: token id {token} at position {position} is outside the model's vocabulary of {}",
                self.config.vocab_size
            )));
        }
        Ok(())
    }

    /// Forward through every layer, saving activations, and the final norm;
    /// an unmerged engine's with `lora`, the adapters beside the base.
    fn forward(
        &mut self,
        weights: &Weights,
        lora: Option<AdapterPath>,
        inputs: &[u32],
    ) -> Result<()> {
        match (&self.unmerged, &lora) {
            (Some(_), None) => {
                return Err(Error::Invalid(
                    "this engine runs LoRA adapters beside the base: pass them \
                     (Engine::loss_adapted, Engine::forward_backward_unmerged)"
                        .into(),
                ));
            }
            (None, Some(_)) => {
                return Err(Error::Invalid(
                    "this engine's kernels run merged weights: pass W + s B A, not adapters".into(),
                ));
            }
            _ => {}
        }
        let (seq, dim) = (self.seq, self.config.dim);
        let embedding = weights.get(Param::Embedding);
        for (tokens, layer_acts) in inputs.chunks_exact(seq).zip(&mut self.acts[0]) {
            self.host
                .embedding_forward(&mut layer_acts.x, embedding, tokens, dim);
        }
        for kernel in self.kernels.iter().flat_map(LayerKernels::iter) {
            kernel.new_pass();
        }
        let eps = self.config.norm_eps;
        let mut ctx =
            LayerContext::new(self.backend.as_mut(), &self.kernels[0], &mut self.host, eps);
        ctx.lora = lora_layer(&mut self.unmerged, lora);
        for layer in 0..self.config.n_layers {
            ctx.kernels.kernels = of_layer(&self.kernels, layer);
            let (done, rest) = self.acts.split_at_mut(layer + 1);
            let mut out: Vec<&mut Vec<f32>> = match rest.first_mut() {
                Some(next) => next
                    .iter_mut()
                    .map(|layer_acts| &mut layer_acts.x)
                    .collect(),
                None => self.head.x_final.iter_mut().collect(),
            };
            let params = LayerParams::new(weights, layer);
            layer_forward(
                &mut ctx,
                &params,
                &mut done[layer],
                &mut self.gate,
                &mut out,
            )?;
        }
        self.head
            .norm_forward(&mut self.host, weights, self.config.norm_eps);
        Ok(())
    }

    /// Mean cross-entropy over all `batch * seq` positions, forward only.
    pub fn loss(&mut self, weights: &Weights, inputs: &[u32], targets: &[u32]) -> Result<f64> {
        self.loss_of(weights, None, inputs, targets)
    }

    /// [`Engine::loss`] of an unmerged engine: `base` with `adapters`
    /// beside it (no dropout: evaluation).
    pub fn loss_adapted(
        &mut self,
        base: &Weights,
        adapters: &Adapters,
        inputs: &[u32],
        targets: &[u32],
    ) -> Result<f64> {
        self.loss_of(base, Some(AdapterPath::eval(adapters)), inputs, targets)
    }

    fn loss_of(
        &mut self,
        weights: &Weights,
        lora: Option<AdapterPath>,
        inputs: &[u32],
        targets: &[u32],
    ) -> Result<f64> {
        self.check_tokens(inputs, "inputs")?;
        self.check_tokens(targets, "targets")?;
        self.forward(weights, lora, inputs)?;
        let total = self.head.loss(&mut self.host, weights, targets, None);
        Ok(total / (self.batch * self.seq) as f64)
    }

    /// The cross-entropy of every position times its weight in `loss`,
    /// summed, forward only (the masked mean is this over `loss.counted()`).
    pub fn weighted_loss_sum(
        &mut self,
        weights: &Weights,
        inputs: &[u32],
        loss: LossWeights,
    ) -> Result<f64> {
        self.weighted_loss_sum_of(weights, None, inputs, loss)
    }

    /// [`Engine::weighted_loss_sum`] of an unmerged engine: `base` with
    /// `adapters` beside it (no dropout: evaluation).
    pub fn weighted_loss_sum_adapted(
        &mut self,
        base: &Weights,
        adapters: &Adapters,
        inputs: &[u32],
        loss: LossWeights,
    ) -> Result<f64> {
        let lora = Some(AdapterPath::eval(adapters));
        self.weighted_loss_sum_of(base, lora, inputs, loss)
    }

    fn weighted_loss_sum_of(
        &mut self,
        weights: &Weights,
        lora: Option<AdapterPath>,
        inputs: &[u32],
        loss: LossWeights,
    ) -> Result<f64> {
        self.check_tokens(inputs, "inputs")?;
        self.check_tokens(loss.targets, "targets")?;
        self.check_weights(loss.weights)?;
        self.forward(weights, lora, inputs)?;
        let total = self
            .head
            .loss(&mut self.host, weights, loss.targets, loss.weights);
        Ok(total)
    }

    fn check_weights(&self, weights: Option<&[f32]>) -> Result<()> {
        match weights {
            Some(weights) if weights.len() != self.batch * self.seq => {
                Err(Error::Invalid(format!(
                    "loss weights: expected {} (batch {} x seq {}), got {}",
                    self.batch * self.seq,
                    self.batch,
                    self.seq,
                    weights.len()
                )))
            }
            _ => Ok(()),
        }
    }

    /// Logits `(T, V)` of every sequence after a forward pass over `inputs`.
    pub fn logits(&mut self, weights: &Weights, inputs: &[u32]) -> Result<Vec<Vec<f32>>> {
        self.check_tokens(inputs, "inputs")?;
        self.forward(weights, None, inputs)?;
        let (seq, vocab) = (self.seq, self.config.vocab_size);
        let mut out = Vec::new();
        for sequence in 0..self.batch {
            let mut rows = vec![0.0; seq * vocab];
            self.head
                .logits_rows(&mut self.host, weights, sequence, &mut rows);
            out.push(rows);
        }
        Ok(out)
    }

    /// Forward and backward: adds `loss_scale * d(mean loss)/dw` to `grads` and
    /// returns the mean loss (unscaled).
    pub fn forward_backward(
        &mut self,
        weights: &Weights,
        grads: &mut Weights,
        inputs: &[u32],
        targets: &[u32],
        loss_scale: f32,
    ) -> Result<f64> {
        self.forward_backward_as(weights, grads, GradWrite::Add, inputs, targets, loss_scale)
    }

    /// [`Engine::forward_backward`], adding to the gradients or, with
    /// [`GradWrite::Overwrite`] (the first micro-batch of a step), writing
    /// over them, whatever they held: the weight matrices' first products
    /// replace instead of adding (no pass to zero them, no read of the zeros),
    /// and only the gradients made by sums (norm weights, an untied embedding)
    /// are zeroed first. The values equal those of zeroing `grads` and adding.
    pub fn forward_backward_as(
        &mut self,
        weights: &Weights,
        grads: &mut Weights,
        write: GradWrite,
        inputs: &[u32],
        targets: &[u32],
        loss_scale: f32,
    ) -> Result<f64> {
        let positions = self.batch * self.seq;
        let loss = LossWeights {
            targets,
            weights: None,
            divisor: positions as f64,
        };
        self.forward_backward_weighted(weights, grads, write, inputs, loss, loss_scale)
    }

    /// [`Engine::forward_backward_as`] with a weight per target: adds (or
    /// writes) `loss_scale * d(L)/dw` with `L = sum(w ce) / loss.divisor`, and
    /// returns `L` (unscaled). With gradient accumulation the divisor is the
    /// counted targets of the whole step, so that the step's gradient does
    /// not depend on how it is split (transformers' `num_items_in_batch`).
    pub fn forward_backward_weighted(
        &mut self,
        weights: &Weights,
        grads: &mut Weights,
        write: GradWrite,
        inputs: &[u32],
        loss: LossWeights,
        loss_scale: f32,
    ) -> Result<f64> {
        let target = GradTarget::Weights(grads);
        self.forward_backward_into(weights, None, target, write, inputs, loss, loss_scale)
    }

    /// [`Engine::forward_backward_weighted`] for LoRA on a frozen base:
    /// `weights` are the merged `W + s B A` of `adapters` (the kernels run
    /// on them, so `dx` is the adapted model's), and the gradient goes to the
    /// adapters alone (`grads`, their layout; written or added by `write`).
    /// No base gradient is computed: no weight products, no classifier `dE`,
    /// no embedding scatter, no norm, bias or QK-norm sums; each adapted
    /// projection's job in the schedule is its adapter's rank-r products
    /// from the same `dY` and `X` (`model::lora::lora_grads`), run where the
    /// weight's product would have run. [`Engine::grad_norm`] is then the
    /// adapters' gradient's norm.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward_lora(
        &mut self,
        weights: &Weights,
        adapters: &Adapters,
        grads: &mut Adapters,
        write: GradWrite,
        inputs: &[u32],
        loss: LossWeights,
        loss_scale: f32,
    ) -> Result<f64> {
        if adapters.model() != weights.config() || grads.model() != weights.config() {
            return Err(Error::Invalid(
                "forward_backward_lora: the adapters or their gradient are of another model than the weights".into(),
            ));
        }
        if grads.config != adapters.config {
            return Err(Error::Invalid(
                "forward_backward_lora: the gradient's adapters (rank, targets, layers) are not the adapters'".into(),
            ));
        }
        if adapters.config.dropout > 0.0 {
            return Err(Error::Invalid(
                "forward_backward_lora: dropout needs the adapters beside the base, not merged \
                 into it (Engine::for_lora makes such an engine)"
                    .into(),
            ));
        }
        let path = AdapterPath::eval(adapters);
        let target = GradTarget::Adapters { path, grads };
        self.forward_backward_into(weights, None, target, write, inputs, loss, loss_scale)
    }

    /// [`Engine::forward_backward_lora`] of an unmerged engine
    /// ([`Engine::for_lora`]): the kernels run `base`, the adapters of
    /// `path` run beside it on the host with their dropout, and the gradient
    /// goes to them alone (`grads`, their layout).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward_unmerged(
        &mut self,
        base: &Weights,
        path: AdapterPath,
        grads: &mut Adapters,
        write: GradWrite,
        inputs: &[u32],
        loss: LossWeights,
        loss_scale: f32,
    ) -> Result<f64> {
        let adapters = path.adapters;
        if adapters.model() != base.config() || grads.config != adapters.config {
            return Err(Error::Invalid(
                "forward_backward_unmerged: the adapters or their gradient are not of this base"
                    .into(),
            ));
        }
        let target = GradTarget::Adapters { path, grads };
        self.forward_backward_into(base, Some(path), target, write, inputs, loss, loss_scale)
    }

    /// The forward, then the backward into `target`: the head, the layers
    /// in reverse with the weight gradients scheduled beside their kernels,
    /// the embedding's gradient (when the target has one); with a sum asked
    /// for ([`Engine::sum_next_backward`]), the sums of the buckets between
    /// the layers, as they become final.
    #[allow(clippy::too_many_arguments)]
    fn forward_backward_into(
        &mut self,
        weights: &Weights,
        lora: Option<AdapterPath>,
        target: GradTarget,
        write: GradWrite,
        inputs: &[u32],
        loss: LossWeights,
        loss_scale: f32,
    ) -> Result<f64> {
        let reduce = self.reduce.take();
        let targets = loss.targets;
        self.check_tokens(inputs, "inputs")?;
        self.check_tokens(targets, "targets")?;
        self.check_weights(loss.weights)?;
        self.forward(weights, lora, inputs)?;
        let (seq, batch) = (self.seq, self.batch);
        let mut sink = GradSink::start(target, write, seq, &mut self.grad_sq);
        if let Some((_, buckets)) = &reduce
            && buckets.gradient_len() != sink.flat().len()
        {
            return Err(Error::Invalid(format!(
                "the gradient's buckets are of {} values, the pass's gradient has {}",
                buckets.gradient_len(),
                sink.flat().len()
            )));
        }
        self.dy.resize(&self.config, batch, seq);
        self.scratch.resize(&self.config, batch, seq);
        let grad_scale = loss_scale / loss.divisor as f32;
        let host = &mut self.host;
        let total = self.head.backward(
            host,
            weights,
            &mut sink,
            targets,
            loss.weights,
            grad_scale,
            &mut self.dy.dx,
        );
        let pass = self.schedule.pass(&mut self.dy, &self.acts, sink);
        let eps = self.config.norm_eps;
        let mut ctx = LayerContext::new(self.backend.as_mut(), &self.kernels[0], host, eps);
        ctx.lora = lora_layer(&mut self.unmerged, lora);
        let mut backward = Backward {
            ctx,
            kernels: &self.kernels,
            pass: Some(pass),
            sink: None,
            weights,
            acts: &self.acts,
            scratch: &mut self.scratch,
            inputs,
            seq,
            dim: self.config.dim,
            layers_left: self.config.n_layers,
            error: None,
            buckets: reduce.as_ref().map(|(_, b)| (&**b, b.readiness())),
        };
        match &reduce {
            Some((dist, _)) => self.reduced = Some(dist.all_reduce_overlapped(&mut backward)),
            None => while backward.advance() {},
        }
        match backward.error {
            Some(error) => Err(error),
            None => Ok(total / loss.divisor),
        }
    }
}

/// A backward pass after the head as parts of work: each layer's backward,
/// last layer first, then its end (the weight gradients still due, the
/// embedding's). Between parts a collective may sum the buckets of
/// gradients that are final ([`Overlapped`]); without one they just run.
struct Backward<'a, 'g> {
    ctx: LayerContext<'a>,
    /// The layer kernels (one set, or one per layer).
    kernels: &'a [LayerKernels<CompiledKernel>],
    /// The pass until its end; then its gradients alone, in `sink`.
    pass: Option<DwPass<'a, 'g>>,
    sink: Option<GradSink<'g>>,
    weights: &'a Weights,
    acts: &'a [Vec<LayerActs>],
    scratch: &'a mut BackwardScratch,
    inputs: &'a [u32],
    seq: usize,
    dim: usize,
    /// Layers whose backward has not run.
    layers_left: usize,
    /// The error of a part; no part runs after it.
    error: Option<Error>,
    /// With a sum over ranks: the buckets, and which are final.
    buckets: Option<(&'a GradBuckets, Readiness<'a>)>,
}

impl<'g> Backward<'_, 'g> {
    /// The gradients the pass writes.
    fn grads(&self) -> &GradSink<'g> {
        match (&self.pass, &self.sink) {
            (Some(pass), _) => &pass.grads,
            (None, sink) => sink.as_ref().expect("the gradients of an ended pass"),
        }
    }

    fn grads_mut(&mut self) -> &mut GradSink<'g> {
        match (&mut self.pass, &mut self.sink) {
            (Some(pass), _) => &mut pass.grads,
            (None, sink) => sink.as_mut().expect("the gradients of an ended pass"),
        }
    }

    /// The pass's end: the weight gradients still due, then the embedding's.
    fn end(&mut self, pass: DwPass<'_, 'g>) {
        let (mut sink, dy) = pass.finish();
        if let Some(d_embedding) = sink.base_mut(Param::Embedding) {
            for (tokens, dx) in self.inputs.chunks_exact(self.seq).zip(&dy.dx) {
                (self.ctx.host).embedding_backward(d_embedding, dx, tokens, self.dim);
            }
            sink.finished(Param::Embedding);
        }
        self.sink = Some(sink);
    }
}

impl Overlapped for Backward<'_, '_> {
    fn advance(&mut self) -> bool {
        if self.error.is_some() {
            return false;
        }
        let Some(pass) = self.pass.as_mut() else {
            return false;
        };
        if self.layers_left == 0 {
            let pass = self.pass.take().expect("a pass to end");
            self.end(pass);
            if let Some((_, ready)) = &mut self.buckets {
                ready.set_all();
            }
            return true;
        }
        self.layers_left -= 1;
        let layer = self.layers_left;
        self.ctx.kernels.kernels = of_layer(self.kernels, layer);
        let params = LayerParams::new(self.weights, layer);
        let acts = &self.acts[layer];
        let result = layer_backward(&mut self.ctx, &params, acts, self.scratch, pass);
        if let Some((_, ready)) = &mut self.buckets {
            match result {
                Ok(()) => ready.update(pass.grads.finished_params()),
                // The buckets are still summed (whatever they hold), so that
                // no rank waits for this one; the caller reports the error.
                Err(_) => ready.set_all(),
            }
        }
        self.error = result.err();
        true
    }

    fn buckets(&self) -> usize {
        self.buckets
            .as_ref()
            .map_or(0, |(buckets, _)| buckets.count())
    }

    fn bucket_len(&self, bucket: usize) -> usize {
        self.buckets
            .as_ref()
            .map_or(0, |(b, _)| b.bucket_len(bucket))
    }

    fn ready(&self, bucket: usize) -> bool {
        self.buckets
            .as_ref()
            .is_none_or(|(_, ready)| ready.ready(bucket))
    }

    fn gather(&self, bucket: usize, out: &mut [f32]) {
        if let Some((buckets, _)) = &self.buckets {
            buckets.gather(bucket, self.grads().flat(), out);
        }
    }

    fn scatter(&mut self, bucket: usize, sum: &[f32]) {
        if let Some((buckets, _)) = self.buckets {
            buckets.scatter(bucket, sum, self.grads_mut().flat_mut());
        }
    }
}

/// Layer `layer`'s kernels among `kernels`: its own set, or the one set.
fn of_layer(
    kernels: &[LayerKernels<CompiledKernel>],
    layer: usize,
) -> &LayerKernels<CompiledKernel> {
    &kernels[layer.min(kernels.len() - 1)]
}

/// The layer passes' adapter path: `lora` with the unmerged engine's arrays.
fn lora_layer<'e>(
    unmerged: &'e mut Option<Unmerged>,
    lora: Option<AdapterPath<'e>>,
) -> Option<LoraLayer<'e>> {
    let (unmerged, path) = (unmerged.as_mut()?, lora?);
    Some(LoraLayer {
        path,
        deltas: &mut unmerged.deltas,
        scratch: &mut unmerged.scratch,
    })
}

/// The targets of a batch, a loss weight per target (`None`: every one
/// weighs 1; 0 leaves a prompt or padding out) and what the weighted sum is
/// divided by.
#[derive(Clone, Copy)]
pub struct LossWeights<'a> {
    pub targets: &'a [u32],         // (B, T)
    pub weights: Option<&'a [f32]>, // (B, T)
    pub divisor: f64,
}
