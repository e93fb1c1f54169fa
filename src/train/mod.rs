//! Training: one step over the backend trait ([`engine`], with the layer pair
//! in `layer`, the classifier head in `classifier`, the weight-gradient
//! scheduler in `schedule`, kernel calls in [`kernel`] and `stages`), the
//! optimizer, schedules and loss scaling ([`optim`]), the run loop here:
//! gradient accumulation, clipping, evaluation, metrics, checkpoints and exact
//! resume; and whole jobs with their run policy ([`job`]: the main job,
//! defaults, resuming, restarts for the compile budget; [`options`]: what a
//! job can be told; [`run_dir`]: the lock, the record and the checks of a run
//! directory; `resume`: which flags a resumed run accepts).
//!
//! A run directory holds `config.json` (this run's [`TrainConfig`], and in a
//! job's run the record of its data, [`run_dir::RunRecord`]),
//! `metrics.jsonl` (one JSON object per step), `checkpoint.bin` (latest),
//! `.lock` and whatever the caller adds (tokenizer, samples).

pub mod adapter_path;
pub mod buckets;
mod buffers;
mod classifier;
pub mod engine;
pub mod finetune;
mod grads;
pub mod job;
pub mod kernel;
mod layer;
pub mod lora;
pub mod optim;
pub mod options;
mod params;
pub mod profile;
mod resume;
pub mod run_dir;
mod schedule;
pub mod source;
mod stages;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::dist::Collective;
use crate::model::lora::{Adapters, LoraConfig};
use crate::model::{ModelConfig, Weights, checkpoint};
use crate::{Error, Result};
use adapter_path::DropoutKey;
use buckets::GradBuckets;
use engine::{Engine, GradWrite, LossWeights};
use lora::LoraStep;
use optim::{AdamState, AdamW, LossScaler, ScaleEvent, Schedule};

/// Everything that defines a training run (saved as `config.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub model: ModelConfig,
    /// Preset name, if the model came from one.
    pub preset: Option<String>,
    /// Optimizer updates to run in total.
    pub steps: u64,
    pub batch: usize,
    pub seq: usize,
    /// Micro-batches per update.
    pub accum: usize,
    pub lr: f32,
    pub warmup: u64,
    pub schedule: Schedule,
    pub optimizer: AdamW,
    /// Global-norm clip (0 disables).
    pub grad_clip: f32,
    pub seed: u64,
    /// Evaluate held-out loss every N updates (0: only at the end).
    pub eval_every: u64,
    /// Held-out batches per evaluation.
    pub eval_batches: usize,
    /// Save a checkpoint every N updates (0: only at the end).
    pub checkpoint_every: u64,
    /// Kernels run in fp16 (loss scaling on) or fp32.
    pub fp16: bool,
    /// LoRA: adapters of this shape train, the base model stays frozen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
}

/// A source of training or held-out windows whose position can be saved and restored.
pub trait Batches {
    /// Fill `inputs` and `targets` (`batch * seq` ids each; targets are inputs shifted by one).
    fn next_batch(&mut self, inputs: &mut [u32], targets: &mut [u32]) -> Result<()>;
    /// The loss weight of each target of the last batch (`None`: every
    /// target weighs 1); 0 leaves a prompt or padding out of the loss.
    fn weights(&self) -> Option<&[f32]> {
        None
    }
    /// Position/RNG state for checkpoints.
    fn state(&self) -> serde_json::Value;
    /// Restore a state returned by [`Batches::state`].
    fn restore(&mut self, state: &serde_json::Value) -> Result<()>;
    /// Rewind to the beginning (held-out sets are evaluated from the start each time).
    fn rewind(&mut self);
}

/// One row of `metrics.jsonl`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub step: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_loss: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f32>,
    pub lr: f32,
    pub grad_norm: f32,
    pub loss_scale: f32,
    pub skipped: bool,
    pub tokens_per_s: f32,
    pub elapsed_s: f64,
    /// Joules of the update per rail, per step and tokens per joule ("unavailable" off macOS).
    #[serde(default)]
    pub energy: crate::energy::Energy,
}

/// Trainer state saved in checkpoints besides weights and moments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct State {
    step: u64,
    scaler: LossScaler,
    data: serde_json::Value,
    elapsed_s: f64,
    best_val_loss: Option<f32>,
    /// Data-parallel ranks whose shares made each update (1 without MPI);
    /// a run resumes with as many.
    #[serde(default = "one_rank", skip_serializing_if = "is_one_rank")]
    ranks: usize,
}

fn one_rank() -> usize {
    1
}

fn is_one_rank(ranks: &usize) -> bool {
    *ranks == 1
}

/// Progress reports from the loop (the CLI draws bars or prints lines).
pub trait Observer {
    fn on_step(&mut self, metrics: &Metrics, total_steps: u64);
    fn on_eval(&mut self, _step: u64, _val_loss: f32) {}
    fn on_message(&mut self, _message: &str) {}
}

/// An observer that does nothing (tests).
pub struct Quiet;

impl Observer for Quiet {
    fn on_step(&mut self, _: &Metrics, _: u64) {}
}

/// What a run trains.
enum Params {
    /// Every weight, with a gradient of the same layout.
    Full { weights: Weights, grads: Weights },
    /// LoRA adapters on a frozen base, which the step holds merged with them;
    /// `base` names it in the adapters' config.
    Lora {
        step: Box<LoraStep>,
        adapters: Adapters,
        base: String,
    },
}

impl Params {
    /// The weights the engine runs (a LoRA run's base with its adapters merged).
    fn weights(&self) -> &Weights {
        match self {
            Params::Full { weights, .. } => weights,
            Params::Lora { step, .. } => step.weights(),
        }
    }

    /// The values AdamW updates.
    fn trained(&self) -> &[f32] {
        match self {
            Params::Full { weights, .. } => &weights.data,
            Params::Lora { adapters, .. } => &adapters.data,
        }
    }

    /// With two or more ranks and `overlap`, the gradient's buckets (see
    /// [`Trainer::set_overlap`]).
    fn overlap(&self, dist: &dyn Collective, overlap: bool) -> Option<Arc<GradBuckets>> {
        let buckets = || match self {
            Params::Full { grads, .. } => GradBuckets::of_weights(&grads.layout),
            Params::Lora { step, .. } => GradBuckets::of_adapters(step.grads()),
        };
        (overlap && dist.size() > 1).then(|| Arc::new(buckets()))
    }

    /// Their gradient.
    fn grads_mut(&mut self) -> &mut [f32] {
        match self {
            Params::Full { grads, .. } => &mut grads.data,
            Params::Lora { step, .. } => &mut step.grads_mut().data,
        }
    }
}

/// A training run: weights, optimizer state, engine, data and run directory.
///
/// Data parallel (`dist` of `size` ranks): each call to a [`Batches`] source
/// yields a global batch of `batch * size` sequences, the same as one
/// process with `--batch` times `size`; rank `r` computes sequences
/// `r*batch..(r+1)*batch` of it, the gradients and losses are summed over the
/// ranks (the gradients bucket by bucket during the last backward, or in one
/// all-reduce of the flat buffer: [`Trainer::set_overlap`]) before the norm, the
/// loss-scale check, clipping and AdamW, which every rank applies alike. Only
/// rank 0 writes the run directory.
pub struct Trainer {
    pub config: TrainConfig,
    params: Params,
    adam: AdamState,
    engine: Engine,
    state: State,
    run_dir: PathBuf,
    dist: Arc<dyn Collective>,
    /// With two or more ranks: the gradient's buckets when its sum overlaps
    /// the backward (the default), `None` for one all-reduce after it.
    overlap: Option<Arc<GradBuckets>>,
}

impl Trainer {
    /// Start a run in `run_dir` from `weights` (fresh init or imported).
    pub fn new(
        config: TrainConfig,
        weights: Weights,
        engine: Engine,
        run_dir: &Path,
    ) -> Result<Trainer> {
        Trainer::new_on(config, weights, engine, run_dir, crate::dist::single())
    }

    /// [`Trainer::new`] as one rank of `dist`.
    pub fn new_on(
        config: TrainConfig,
        weights: Weights,
        engine: Engine,
        run_dir: &Path,
        dist: Arc<dyn Collective>,
    ) -> Result<Trainer> {
        if config.lora.is_some() {
            return Err(Error::Invalid(
                "a LoRA config needs adapters: start the run with Trainer::new_lora_on".into(),
            ));
        }
        let grads = Weights::zeros(&config.model);
        Trainer::create(
            config,
            Params::Full { weights, grads },
            engine,
            run_dir,
            dist,
        )
    }

    /// A new LoRA run: `adapters` (of `config.lora`) train on `base`, which
    /// stays frozen; `base_name` is written as the adapters' base model.
    pub fn new_lora_on(
        config: TrainConfig,
        base: Weights,
        adapters: Adapters,
        base_name: &str,
        engine: Engine,
        run_dir: &Path,
        dist: Arc<dyn Collective>,
    ) -> Result<Trainer> {
        if config.lora.as_ref() != Some(&adapters.config) {
            return Err(Error::Invalid(
                "the adapters are not of the run's LoRA config".into(),
            ));
        }
        let params = Params::Lora {
            step: Box::new(LoraStep::new(base, &adapters, &engine)?),
            adapters,
            base: base_name.to_string(),
        };
        Trainer::create(config, params, engine, run_dir, dist)
    }

    fn create(
        config: TrainConfig,
        params: Params,
        engine: Engine,
        run_dir: &Path,
        dist: Arc<dyn Collective>,
    ) -> Result<Trainer> {
        config.validate()?;
        if params.weights().config() != &config.model {
            return Err(Error::Invalid(
                "initial weights do not match the model config (dim, layers, heads or vocab differ)".into(),
            ));
        }
        if dist.rank() == 0 {
            std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
            crate::atomic::remove_stale_temps(run_dir);
            let json =
                serde_json::to_vec_pretty(&config).map_err(|e| Error::Invalid(e.to_string()))?;
            crate::atomic::write_atomic(&run_dir.join("config.json"), &json)?;
            let _ = std::fs::remove_file(run_dir.join("metrics.jsonl"));
        }
        let scaler = if config.fp16 {
            LossScaler::dynamic()
        } else {
            LossScaler::disabled()
        };
        let overlap = params.overlap(&*dist, crate::dist::overlap_from_env()?);
        Ok(Trainer {
            adam: AdamState::new(params.trained().len()),
            overlap,
            config,
            params,
            engine,
            state: State {
                step: 0,
                scaler,
                data: serde_json::Value::Null,
                elapsed_s: 0.0,
                best_val_loss: None,
                ranks: dist.size(),
            },
            run_dir: run_dir.to_path_buf(),
            dist,
        })
    }

    /// Resume the run in `run_dir` from its `checkpoint.bin` and `config.json`;
    /// `data` is restored to the saved position. `steps` may extend the run.
    pub fn resume(
        run_dir: &Path,
        engine: Engine,
        data: &mut dyn Batches,
        steps: Option<u64>,
    ) -> Result<Trainer> {
        Trainer::resume_on(run_dir, engine, data, steps, crate::dist::single())
    }

    /// [`Trainer::resume`] as one rank of `dist`: every rank reads the same
    /// checkpoint (a shared or copied run directory), which must have been
    /// made by as many ranks; rank 0 alone tidies the directory. A LoRA run
    /// (`config.lora`) loads its base from `base` (checked by the caller
    /// against the run's record) and its adapters from its own checkpoint.
    pub fn resume_on(
        run_dir: &Path,
        engine: Engine,
        data: &mut dyn Batches,
        steps: Option<u64>,
        dist: Arc<dyn Collective>,
    ) -> Result<Trainer> {
        Trainer::resume_with_base(run_dir, None, engine, data, steps, dist)
    }

    /// [`Trainer::resume_on`] of a LoRA run on its frozen `base`, named `base_name`.
    pub fn resume_with_base(
        run_dir: &Path,
        base: Option<(Weights, String)>,
        engine: Engine,
        data: &mut dyn Batches,
        steps: Option<u64>,
        dist: Arc<dyn Collective>,
    ) -> Result<Trainer> {
        if dist.rank() == 0 {
            crate::atomic::remove_stale_temps(run_dir);
        }
        let mut config = TrainConfig::read(&run_dir.join("config.json"))?;
        if let Some(steps) = steps {
            config.steps = steps;
            config.validate()?;
        }
        let (params, moments, state, ckpt_path) = match (&config.lora, base) {
            (None, _) => {
                let ckpt_path = run_dir.join("checkpoint.bin");
                let ckpt = checkpoint::load(&ckpt_path)?;
                if ckpt.weights.config() != &config.model {
                    return Err(Error::format(
                        &ckpt_path,
                        "header.config",
                        "does not match the run's config.json",
                    ));
                }
                let moments = ckpt.moments.ok_or_else(|| Error::format(&ckpt_path, "optimizer", "checkpoint has no optimizer state; cannot resume exactly (use --init to start a new run from it)"))?;
                let grads = Weights::zeros(&config.model);
                let params = Params::Full {
                    weights: ckpt.weights,
                    grads,
                };
                (params, moments, ckpt.state, ckpt_path)
            }
            (Some(lora), Some((base, base_name))) => {
                let ckpt_path = run_dir.join(lora::CHECKPOINT_FILE);
                let ckpt = lora::load_checkpoint(&ckpt_path)?;
                if &ckpt.adapters.config != lora || ckpt.adapters.model() != &config.model {
                    return Err(Error::format(
                        &ckpt_path,
                        "header",
                        "its adapters do not match the run's config.json",
                    ));
                }
                let params = Params::Lora {
                    step: Box::new(LoraStep::new(base, &ckpt.adapters, &engine)?),
                    adapters: ckpt.adapters,
                    base: base_name,
                };
                (params, ckpt.moments, ckpt.state, ckpt_path)
            }
            (Some(_), None) => {
                return Err(Error::Invalid(format!(
                    "{} is a LoRA run: resuming it needs its base model",
                    run_dir.display()
                )));
            }
        };
        if params.weights().config() != &config.model {
            return Err(Error::Invalid(format!(
                "the base model is not the one {} was trained on (its shape differs)",
                run_dir.display()
            )));
        }
        let state = Trainer::resumed_state(run_dir, &config, state, &ckpt_path, data, &*dist)?;
        let (m, v, t) = moments;
        let overlap = params.overlap(&*dist, crate::dist::overlap_from_env()?);
        Ok(Trainer {
            overlap,
            config,
            params,
            adam: AdamState { m, v, t },
            engine,
            state,
            run_dir: run_dir.to_path_buf(),
            dist,
        })
    }

    /// The trainer state of a checkpoint, checked against the run and the
    /// ranks; `data` restored to its position, and the metrics rows written
    /// after the checkpoint dropped (a crash after saving).
    fn resumed_state(
        run_dir: &Path,
        config: &TrainConfig,
        state: serde_json::Value,
        ckpt_path: &Path,
        data: &mut dyn Batches,
        dist: &dyn Collective,
    ) -> Result<State> {
        let state: State = serde_json::from_value(state)
            .map_err(|e| Error::format(ckpt_path, "header.state", e.to_string()))?;
        if state.step > config.steps {
            return Err(Error::out_of_range(
                "--steps",
                config.steps,
                &format!(
                    "at least the {} updates {} has done",
                    state.step,
                    run_dir.display()
                ),
            ));
        }
        if state.ranks != dist.size() {
            return Err(Error::Invalid(format!(
                "{} was trained by {} rank(s) and is resumed by {}: the global batch would \
                 change\nhint: resume it with the same mpirun line (mpirun -np {})",
                run_dir.display(),
                state.ranks,
                dist.size(),
                state.ranks
            )));
        }
        data.restore(&state.data)?;
        let metrics_path = run_dir.join("metrics.jsonl");
        if dist.rank() == 0
            && let Ok(text) = std::fs::read_to_string(&metrics_path)
        {
            let kept: String = text
                .lines()
                .filter(|l| serde_json::from_str::<Metrics>(l).is_ok_and(|m| m.step <= state.step))
                .map(|l| format!("{l}\n"))
                .collect();
            crate::atomic::write_atomic(&metrics_path, kept.as_bytes())?;
        }
        Ok(state)
    }

    /// Updates completed so far.
    pub fn step(&self) -> u64 {
        self.state.step
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The file [`Trainer::save`] writes: `checkpoint.bin`, or a LoRA run's
    /// [`lora::CHECKPOINT_FILE`].
    pub fn checkpoint_path(&self) -> PathBuf {
        match self.params {
            Params::Full { .. } => self.run_dir.join("checkpoint.bin"),
            Params::Lora { .. } => self.run_dir.join(lora::CHECKPOINT_FILE),
        }
    }

    /// The data-parallel ranks of this run (a single process without MPI).
    pub fn collective(&self) -> &dyn Collective {
        self.dist.as_ref()
    }

    /// With two or more ranks: sum the gradients layer by layer during the
    /// backward of each update's last micro-batch (`true`, the default
    /// unless `ANEMONE_ALLREDUCE=flat`), or in one all-reduce after it. The
    /// sums are the same either way (bit for bit with two ranks).
    pub fn set_overlap(&mut self, overlap: bool) {
        self.overlap = self.params.overlap(&*self.dist, overlap);
    }

    /// The weights the engine runs: the trained weights, or a LoRA run's
    /// base with its adapters merged.
    pub fn weights(&self) -> &Weights {
        self.params.weights()
    }

    /// A LoRA run's adapters.
    pub fn adapters(&self) -> Option<&Adapters> {
        match &self.params {
            Params::Lora { adapters, .. } => Some(adapters),
            Params::Full { .. } => None,
        }
    }

    /// This rank's share of a global batch of `global.len()` tokens (or
    /// loss weights): the contiguous share of sequences `rank*batch..(rank+1)*batch`.
    fn share<'a, T>(&self, global: &'a [T]) -> &'a [T] {
        let n = global.len() / self.dist.size();
        &global[self.dist.rank() * n..][..n]
    }

    /// Mean held-out loss over `eval_batches` global batches from the start
    /// of `val` (each rank evaluates its share; the sums are all-reduced).
    /// With loss weights (fine-tuning examples) it is the mean over the
    /// counted targets of all the batches.
    pub fn evaluate(&mut self, val: &mut dyn Batches) -> Result<f32> {
        let ranks = self.dist.size();
        let n = self.engine.batch() * self.engine.seq() * ranks;
        let (mut inputs, mut targets) = (vec![0u32; n], vec![0u32; n]);
        val.rewind();
        // [sum of the batches' mean losses, weighted loss sum, counted targets]
        let mut sums = [0.0; 3];
        for _ in 0..self.config.eval_batches {
            val.next_batch(&mut inputs, &mut targets)?;
            let (inputs, targets) = (self.share(&inputs), self.share(&targets));
            let weights = self.params.weights();
            // An unmerged engine runs the adapters beside the base.
            let adapters = match &self.params {
                Params::Lora { step, adapters, .. } if step.unmerged() => Some(adapters),
                _ => None,
            };
            let loss_weights = val.weights().map(|w| self.share(w));
            let engine = &mut self.engine;
            match loss_weights {
                None => {
                    sums[0] += match adapters {
                        Some(adapters) => {
                            engine.loss_adapted(weights, adapters, inputs, targets)?
                        }
                        None => engine.loss(weights, inputs, targets)?,
                    }
                }
                Some(w) => {
                    let loss = LossWeights {
                        targets,
                        weights: Some(w),
                        divisor: 1.0,
                    };
                    sums[1] += match adapters {
                        Some(adapters) => {
                            engine.weighted_loss_sum_adapted(weights, adapters, inputs, loss)?
                        }
                        None => engine.weighted_loss_sum(weights, inputs, loss)?,
                    };
                    sums[2] += w.iter().filter(|&&w| w > 0.0).count() as f64;
                }
            }
        }
        self.dist.all_reduce_sum_f64(&mut sums);
        if val.weights().is_some() {
            return Ok((sums[1] / sums[2].max(1.0)) as f32);
        }
        Ok((sums[0] / ranks as f64 / self.config.eval_batches as f64) as f32)
    }

    /// Save `checkpoint.bin` (atomically) with the data position of `data`
    /// (a LoRA run: its adapters and moments in [`lora::CHECKPOINT_FILE`],
    /// then the adapters in PEFT's layout in [`lora::ADAPTERS_DIR`]): rank 0
    /// alone, once every rank holds the same values (one all-gather of their
    /// digests when there are two or more).
    pub fn save(&mut self, data: &dyn Batches) -> Result<()> {
        if self.dist.size() > 1 {
            let bytes: &[u8] = bytemuck::cast_slice(self.params.trained());
            crate::dist::agree(
                self.dist.as_ref(),
                &format!("weights after update {}", self.state.step),
                crate::dist::digest(bytes),
                "the ranks' sums of the gradients differed; this is a bug (please report it); \
                 the previous checkpoint is kept",
            )?;
        }
        if self.dist.rank() != 0 {
            return Ok(());
        }
        self.state.data = data.state();
        let state = serde_json::to_value(&self.state).map_err(|e| Error::Invalid(e.to_string()))?;
        let moments = (&self.adam.m[..], &self.adam.v[..], self.adam.t);
        match &self.params {
            Params::Full { weights, .. } => checkpoint::save(
                &self.run_dir.join("checkpoint.bin"),
                weights,
                Some(moments),
                &state,
            ),
            Params::Lora { adapters, base, .. } => {
                let path = self.run_dir.join(lora::CHECKPOINT_FILE);
                lora::save_checkpoint(&path, adapters, moments, &state)?;
                let dir = self.run_dir.join(lora::ADAPTERS_DIR);
                crate::model::hf::adapter::write_adapters(adapters, &dir, Some(base))
            }
        }
    }

    /// The error that ends a run whose last `skipped` updates all had
    /// non-finite gradients: it cannot make progress.
    fn no_progress(&self, skipped: u64, loss: f64, lr: f32) -> Error {
        Error::Invalid(format!(
            "training cannot make progress: the last {skipped} updates (to step {}) all had \
             non-finite gradients and were skipped (loss {loss}, learning rate {lr:e}); the \
             last checkpoint in {} is from before them\nhint: lower --lr (this run's peak \
             is {:e}) or --grad-clip, and check the data and the initial weights",
            self.state.step,
            self.run_dir.display(),
            self.config.lr
        ))
    }

    /// One update's gradients, summed over the ranks, in `self.grads`: this
    /// rank's share of `accum` global batches; with two or more ranks the
    /// gradients summed bucket by bucket during the last micro-batch's
    /// backward (by default; [`Trainer::set_overlap`]), then an all-reduce
    /// of the loss and a failure flag per rank (so a rank whose step failed
    /// stops every rank, named), or without overlap one all-reduce of the
    /// flat gradient buffer after them. Returns the mean loss and the norm
    /// of the scaled gradients, summed over the ranks.
    fn gradients(
        &mut self,
        data: &mut dyn Batches,
        inputs: &mut [u32],
        targets: &mut [u32],
        scale: f32,
    ) -> Result<(f64, f64)> {
        let ranks = self.dist.size();
        let local = self.local_gradients(data, inputs, targets, scale);
        if ranks == 1 {
            let norm = match &self.params {
                Params::Full { .. } => self.engine.grad_norm(),
                Params::Lora { step, .. } => step.grad_norm(),
            };
            return Ok((local?, norm));
        }
        if let Some(buckets) = &self.overlap
            && self.engine.take_reduced().is_none()
        {
            // This rank failed before its last backward summed the buckets:
            // it still takes part in the same sums, so that no rank waits
            // for it, and the flags below stop every rank.
            let grads = self.params.grads_mut();
            let mut as_they_are = buckets::Finished { buckets, grads };
            self.dist.all_reduce_overlapped(&mut as_they_are);
        }
        let mut stats = vec![0.0; 1 + ranks];
        stats[0] = *local.as_ref().unwrap_or(&0.0);
        stats[1 + self.dist.rank()] = if local.is_err() { 1.0 } else { 0.0 };
        self.dist.all_reduce_sum_f64(&mut stats);
        local?;
        if let Some(failed) = crate::dist::failed_ranks(&stats[1..]) {
            return Err(Error::Invalid(format!(
                "{failed} of {ranks} failed in update {} (its error is in its own output); \
                 rank {} stops too; the last checkpoint in {} is intact",
                self.state.step + 1,
                self.dist.rank(),
                self.run_dir.display()
            )));
        }
        if self.overlap.is_none() {
            self.dist.all_reduce_sum(self.params.grads_mut());
        }
        let norm = optim::global_norm(self.params.grads_mut());
        Ok((stats[0] / ranks as f64, norm))
    }

    /// This rank's gradients of one update (before any sum over ranks), each
    /// micro-batch's loss scale divided by `accum` and the number of ranks
    /// so that the sum over ranks is the global batch's mean. Returns this
    /// rank's mean loss (with loss weights: its share of the global mean
    /// times the ranks, so that the mean over ranks is the global mean).
    ///
    /// With loss weights (fine-tuning examples) every micro-batch's loss is
    /// divided by the targets counted in all the update's global batches
    /// (fetched first; every rank sees them all), so that the update's
    /// gradient does not depend on how it is split over micro-batches and
    /// ranks (transformers' `num_items_in_batch`).
    fn local_gradients(
        &mut self,
        data: &mut dyn Batches,
        inputs: &mut [u32],
        targets: &mut [u32],
        scale: f32,
    ) -> Result<f64> {
        let accum = self.config.accum;
        let ranks = self.dist.size();
        let mut micro = Vec::with_capacity(accum);
        for _ in 0..accum {
            data.next_batch(inputs, targets)?;
            let weights = data.weights().map(<[f32]>::to_vec);
            micro.push((inputs.to_vec(), targets.to_vec(), weights));
        }
        let counted: usize = micro
            .iter()
            .filter_map(|(_, _, w)| w.as_ref())
            .map(|w| w.iter().filter(|&&w| w > 0.0).count())
            .sum();
        let micro_scale = scale / (accum * ranks) as f32;
        let positions = (inputs.len() / ranks) as f64;
        let mut loss = 0.0;
        for (index, (inputs, targets, weights)) in micro.iter().enumerate() {
            // The first micro-batch writes the gradients (no zeroing pass),
            // the others add to them.
            let write = if index == 0 {
                GradWrite::Overwrite
            } else {
                GradWrite::Add
            };
            if let Some(buckets) = &self.overlap
                && index + 1 == accum
            {
                self.engine
                    .sum_next_backward(self.dist.clone(), buckets.clone());
            }
            let (inputs, targets) = (self.share(inputs), self.share(targets));
            let (loss_weights, micro_scale) = match weights {
                Some(w) => {
                    let divisor = counted.max(1) as f64;
                    let weights = Some(self.share(w));
                    (
                        LossWeights {
                            targets,
                            weights,
                            divisor,
                        },
                        scale,
                    )
                }
                None => {
                    let divisor = positions;
                    (
                        LossWeights {
                            targets,
                            weights: None,
                            divisor,
                        },
                        micro_scale,
                    )
                }
            };
            loss += self.micro_step(write, index, inputs, loss_weights, micro_scale)?;
        }
        match micro[0].2 {
            Some(_) => Ok(loss * ranks as f64),
            None => Ok(loss / accum as f64),
        }
    }

    /// Forward and backward of micro-batch `micro` of the update into the
    /// gradients.
    fn micro_step(
        &mut self,
        write: GradWrite,
        micro: usize,
        inputs: &[u32],
        loss: LossWeights,
        scale: f32,
    ) -> Result<f64> {
        // LoRA dropout's masks: of this update, micro-batch and sequences
        // of the global batch (the same on any number of ranks).
        let key = DropoutKey {
            seed: self.config.seed,
            step: self.state.step,
            micro: micro as u64,
            first_sequence: (self.dist.rank() * self.engine.batch()) as u64,
        };
        let engine = &mut self.engine;
        match &mut self.params {
            Params::Full { weights, grads } => {
                engine.forward_backward_weighted(weights, grads, write, inputs, loss, scale)
            }
            Params::Lora { step, adapters, .. } => {
                step.forward_backward(engine, adapters, write, inputs, loss, scale, key)
            }
        }
    }

    /// AdamW on what the run trains, from its gradient times `factor`.
    fn apply(&mut self, lr: f32, factor: f32) {
        let opt = &self.config.optimizer;
        match &mut self.params {
            Params::Full { weights, grads } => {
                opt.step(weights, &grads.data, &mut self.adam, lr, factor)
            }
            Params::Lora { step, adapters, .. } => {
                step.update(adapters, opt, &mut self.adam, lr, factor)
            }
        }
    }

    /// Run updates until `config.steps`, or until `stop_after` more updates
    /// (for tests of interrupted runs). Saves a checkpoint at the end.
    pub fn train(
        &mut self,
        data: &mut dyn Batches,
        mut val: Option<&mut dyn Batches>,
        observer: &mut dyn Observer,
        stop_after: Option<u64>,
    ) -> Result<()> {
        let cfg = self.config.clone();
        let n = cfg.batch * cfg.seq * self.dist.size();
        let (mut inputs, mut targets) = (vec![0u32; n], vec![0u32; n]);
        let metrics_path = self.run_dir.join("metrics.jsonl");
        let mut metrics_file = match self.dist.rank() {
            0 => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&metrics_path)
                    .map_err(|e| Error::io(&metrics_path, e))?,
            ),
            _ => None,
        };
        let end = match stop_after {
            Some(k) => (self.state.step + k).min(cfg.steps),
            None => cfg.steps,
        };
        let tokens_per_update = (n * cfg.accum) as f64;
        let mut skipped_in_a_row = 0;
        while self.state.step < end {
            let started = Instant::now();
            let energy = crate::energy::start();
            let scale = self.state.scaler.scale;
            // The norm, taken by the engine as each gradient was finished
            // (finite exactly when every gradient is; over the summed buffer
            // with two or more ranks); unscaling and clipping ride in AdamW's
            // pass as one factor.
            let (loss, scaled_norm) = self.gradients(data, &mut inputs, &mut targets, scale)?;
            let event = self.state.scaler.update(scaled_norm);
            let lr =
                optim::learning_rate(cfg.schedule, cfg.lr, self.state.step, cfg.warmup, cfg.steps);
            let mut grad_norm = f64::NAN;
            if event != ScaleEvent::Skip {
                grad_norm = scaled_norm / f64::from(scale);
                let factor = optim::clip_factor(grad_norm, cfg.grad_clip) / scale;
                self.apply(lr, factor);
                skipped_in_a_row = 0;
            } else {
                observer.on_message(&format!(
                    "step {}: non-finite gradients, update skipped, loss scale now {}",
                    self.state.step + 1,
                    self.state.scaler.scale
                ));
                skipped_in_a_row += 1;
                if skipped_in_a_row >= MAX_SKIPPED_UPDATES {
                    return Err(self.no_progress(skipped_in_a_row, loss, lr));
                }
            }
            self.state.step += 1;
            let seconds = started.elapsed().as_secs_f64();
            self.state.elapsed_s += seconds;
            let mut row = Metrics {
                step: self.state.step,
                train_loss: Some(loss as f32),
                val_loss: None,
                lr,
                grad_norm: grad_norm as f32,
                loss_scale: scale,
                skipped: event == ScaleEvent::Skip,
                tokens_per_s: (tokens_per_update / seconds) as f32,
                elapsed_s: self.state.elapsed_s,
                energy: energy.finish(1, tokens_per_update as u64),
            };
            let last = self.state.step == cfg.steps;
            if let Some(val) = val.as_deref_mut()
                && ((cfg.eval_every > 0 && self.state.step.is_multiple_of(cfg.eval_every)) || last)
            {
                let v = self.evaluate(val)?;
                row.val_loss = Some(v);
                self.state.best_val_loss = Some(self.state.best_val_loss.map_or(v, |b| b.min(v)));
                observer.on_eval(self.state.step, v);
            }
            if let Some(file) = metrics_file.as_mut() {
                let line =
                    serde_json::to_string(&row).map_err(|e| Error::Invalid(e.to_string()))?;
                writeln!(file, "{line}").map_err(|e| Error::io(&metrics_path, e))?;
            }
            observer.on_step(&row, cfg.steps);
            if cfg.checkpoint_every > 0
                && self.state.step.is_multiple_of(cfg.checkpoint_every)
                && self.state.step < end
            {
                self.save(data)?;
            }
        }
        self.save(data)
    }
}

impl TrainConfig {
    /// Check every field against its range; messages name the flag that sets
    /// it and the range (`--lr 1e30 is out of range: expected a number in (0, 1]`).
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        if let Some(lora) = &self.lora {
            lora.check()?;
            if let Some(&layer) = lora.layers.iter().find(|&&l| l >= self.model.n_layers) {
                return Err(Error::Invalid(format!(
                    "LoRA layer {layer} is not in the model, which has {} layers",
                    self.model.n_layers
                )));
            }
        }
        let counts = [
            ("--steps", self.steps, 1, MAX_STEPS),
            ("--batch", self.batch as u64, 1, MAX_BATCH),
            ("--accum", self.accum as u64, 1, MAX_BATCH),
            ("--seq", self.seq as u64, 1, self.model.seq_len as u64),
            ("--warmup", self.warmup, 0, MAX_STEPS),
            ("--eval-batches", self.eval_batches as u64, 1, MAX_BATCH),
        ];
        for (flag, value, min, max) in counts {
            if !(min..=max).contains(&value) {
                let why = if flag == "--seq" {
                    " (the model's seq_len)"
                } else {
                    ""
                };
                return Err(Error::out_of_range(
                    flag,
                    value,
                    &format!("an integer in {min}..={max}{why}"),
                ));
            }
        }
        let numbers = [
            (
                "--lr",
                self.lr,
                "a number in (0, 1]",
                self.lr > 0.0 && self.lr <= 1.0,
            ),
            (
                "--weight-decay",
                self.optimizer.weight_decay,
                "a number in [0, 10]",
                (0.0..=10.0).contains(&self.optimizer.weight_decay),
            ),
            (
                "--grad-clip",
                self.grad_clip,
                "a finite number >= 0 (0 disables clipping)",
                self.grad_clip >= 0.0 && self.grad_clip.is_finite(),
            ),
        ];
        for (flag, value, allowed, ok) in numbers {
            if !ok {
                return Err(Error::out_of_range(flag, value, allowed));
            }
        }
        let adam = &self.optimizer;
        if !((0.0..1.0).contains(&adam.beta1)
            && (0.0..1.0).contains(&adam.beta2)
            && adam.eps > 0.0
            && adam.eps.is_finite())
        {
            return Err(Error::Invalid(format!(
                "optimizer: beta1 {} and beta2 {} must be in [0, 1) and eps {} a positive number",
                adam.beta1, adam.beta2, adam.eps
            )));
        }
        Ok(())
    }

    /// Parse and validate a run's `config.json`; `path` names it in errors.
    pub fn parse_json(text: &str, path: &Path) -> Result<TrainConfig> {
        let config: TrainConfig = serde_json::from_str(text).map_err(|e| {
            Error::format(
                path,
                format!("line {} column {}", e.line(), e.column()),
                e.to_string(),
            )
        })?;
        config
            .validate()
            .map_err(|e| Error::format(path, "config", e.to_string()))?;
        Ok(config)
    }

    /// [`TrainConfig::parse_json`] of the file at `path`.
    pub fn read(path: &Path) -> Result<TrainConfig> {
        TrainConfig::parse_json(&crate::memory::read_text(path)?, path)
    }
}

/// Most updates a run may ask for.
pub const MAX_STEPS: u64 = 1_000_000_000;
/// Most sequences per micro-batch, micro-batches per update, held-out batches.
pub const MAX_BATCH: u64 = 1 << 20;
/// Consecutive skipped updates (non-finite gradients) after which a run stops:
/// more than the dynamic loss scale's halvings from its start to 1.
pub const MAX_SKIPPED_UPDATES: u64 = 25;

#[cfg(test)]
mod tests {
    /// No function in `src/train/` is longer than 120 lines (issue 19): the
    /// step reads a screen at a time. A function runs from its `fn` line to
    /// the first line that is its indentation and `}` (rustfmt's layout).
    #[test]
    fn no_function_in_train_is_longer_than_120_lines() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/train");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|ext| ext != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            for (start, line) in lines.iter().enumerate() {
                let body = line.trim_start();
                let indent = line.len() - body.len();
                let signature = ["fn ", "pub fn ", "const fn ", "pub const fn "]
                    .iter()
                    .any(|prefix| body.starts_with(prefix));
                if !signature || line.ends_with('}') || line.ends_with(';') {
                    continue;
                }
                let closing = format!("{}}}", " ".repeat(indent));
                let length = lines[start..]
                    .iter()
                    .position(|line| *line == closing)
                    .map(|end| end + 1)
                    .unwrap_or_else(|| panic!("{}:{}: no end", path.display(), start + 1));
                assert!(
                    length <= 120,
                    "{}:{}: a function of {length} lines",
                    path.display(),
                    start + 1
                );
                checked += 1;
            }
        }
        assert!(checked > 50, "only {checked} functions found");
    }
}
