//! `anemone bench train-step`: time whole training steps (forward, backward,
//! weight gradients, global-norm clip and AdamW) of a model preset on random
//! tokens, with a per-phase breakdown from the engine and the machine's GEMM
//! peak measured in the same run. With a [`LoraConfig`] (`--lora`), LoRA
//! steps instead: the forward on the merged weights, the frozen-base
//! backward (`Engine::forward_backward_lora`), AdamW on the adapters and the
//! merge (`LoraStep`), on random base weights rounded to bf16 (the values of
//! a bf16 checkpoint, so that the step keeps its base copy as it would).
//!
//! FLOP convention (shared with `scripts/bench_pytorch.py` and
//! `docs/performance.md`): training FLOPs = 3 x forward FLOPs; forward per
//! sequence = `2 T (linear weights)` + per layer `4 T^2 (n_heads head_dim)`
//! (QK^T and AV, full square, no causal halving), where the linear weights are
//! wq, wk, wv, wo, w1, w2, w3 of every layer plus the classifier `V x D`.
//! Embedding gathers, norms and elementwise work are not counted. LoRA
//! ([`lora_train_flops`]): 2 x forward FLOPs (the forward and the backward's
//! `dx`; no weight gradients) plus the adapters' gradient products,
//! `4 r (in + out)` per adapted projection and token (`U = A X`,
//! `V = B^T dY`, `dB`, `dA`); not counted, on either side: the adapters' own
//! forward and `dx` products (PyTorch's `B (A x)`; anemone merges instead),
//! anemone's merge `W + s B A` and the optimizer.
//!
//! This module does not decide what "fast enough" is: it measures.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Repeat, Stats, gflops, time_ms};
use crate::Result;
use crate::backend::Backend;
use crate::dist::{Collective, CommTimes};
use crate::energy::{self, Energy};
use crate::linalg::{gemm, n};
use crate::model::kernels::KernelOptions;
use crate::model::lora::{Adapters, LoraConfig};
use crate::model::{ModelConfig, Weights};
use crate::rng::Rng;
use crate::train::adapter_path::DropoutKey;
use crate::train::buckets::GradBuckets;
use crate::train::engine::{Engine, GradWrite, LossWeights};
use crate::train::lora::LoraStep;
use crate::train::optim::{self, AdamState, AdamW};
use crate::train::profile::Profile;

/// What to run.
#[derive(Clone, Debug)]
pub struct TrainStepOptions {
    pub config_name: String,
    pub config: ModelConfig,
    pub seq: usize,
    pub batch: usize,
    pub warmup: usize,
    pub steps: usize,
    pub kernels: KernelOptions,
    /// Also time every CPU plan step (`--ops`); adds a little overhead.
    pub ops: bool,
    /// Time LoRA steps with these adapters (`--lora`) instead of full training.
    pub lora: Option<LoraConfig>,
    /// With two or more ranks: sum the gradients bucket by bucket during the
    /// backward (as `train` does), or in one all-reduce after it (`--no-overlap`).
    pub overlap: bool,
}

/// One phase of the breakdown: total over the timed steps divided by steps.
#[derive(Clone, Debug, Serialize)]
pub struct Phase {
    pub name: String,
    pub ms_per_step: f64,
    pub fraction: f64,
}

/// Result of a train-step benchmark; printed as a table and written as JSON.
#[derive(Clone, Debug, Serialize)]
pub struct TrainStepReport {
    pub config: String,
    /// `full`, or `lora r=16 q,k,v,o,gate,up,down (24 of 24 layers)`.
    pub training: String,
    pub backend: String,
    /// The CPU's name (`/proc/cpuinfo`, or sysctl on macOS), if known.
    pub cpu: Option<String>,
    /// The vector unit of the GEMM kernels (`math::simd_level`).
    pub simd: String,
    pub threads: usize,
    pub seq: usize,
    pub batch: usize,
    pub steps: usize,
    pub ms_median: f64,
    pub ms_min: f64,
    pub ms_max: f64,
    pub tokens_per_s: f64,
    pub gflop_per_step: f64,
    pub gflops: f64,
    /// Median fp32 GEMM throughput measured in this run with the same threads.
    pub gemm_peak_gflops: f64,
    pub fraction_of_gemm_peak: f64,
    pub peak_rss_mb: Option<f64>,
    pub phases: Vec<Phase>,
    /// Work run beside the phases (the weight gradients beside the backward
    /// kernels): its whole time, which `phases` count only as far as the step
    /// waited for it. Fractions are of the step, so they may add up past 1.
    pub side_by_side: Vec<Phase>,
    /// CPU plan steps by `op -> result type`, longest first (with `ops`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ops: Vec<OpPhase>,
    pub losses: Vec<f64>,
    /// Joules of the timed steps per rail, per step and tokens per joule
    /// ("unavailable" where the counters are missing, e.g. off macOS).
    pub energy: Energy,
    /// Data-parallel ranks (1 without `mpirun`); `batch` is each rank's.
    pub ranks: usize,
    /// With two or more ranks: the sum of the gradients over the ranks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<CommReport>,
}

/// What the gradients' sum over the ranks cost per step.
#[derive(Clone, Debug, Serialize)]
pub struct CommReport {
    /// `overlapped` (bucket by bucket during the backward) or `flat` (one
    /// all-reduce of the whole buffer after it).
    pub mode: String,
    /// All-reduces per step.
    pub buckets: usize,
    /// The time the step spent on the sum and not on its work (the phase
    /// `all-reduce`): copies, starting, polling and waiting, the slower
    /// rank included. The whole all-reduce when flat.
    pub exposed_ms_per_step: f64,
    /// `exposed_ms_per_step` as a share of the step.
    pub fraction: f64,
    /// From the first bucket's start to the last one's end (seen at the
    /// polls between layers: an upper bound); equals the exposed time when flat.
    pub in_flight_ms_per_step: f64,
    /// The buffer summed: 4 bytes per parameter.
    pub buffer_bytes: u64,
    /// What each rank sends in a ring all-reduce: `buffer * 2(N-1)/N`.
    pub ring_bytes_per_rank: u64,
}

/// One CPU plan step label of the op profile, per timed step.
#[derive(Clone, Debug, Serialize)]
pub struct OpPhase {
    pub label: String,
    pub ms_per_step: f64,
    pub calls_per_step: f64,
}

/// Training FLOPs of one step of `batch` sequences of `seq` tokens.
pub fn train_flops(c: &ModelConfig, seq: usize, batch: usize) -> f64 {
    c.train_flops_per_token(seq) * (seq * batch) as f64
}

/// FLOPs of one LoRA step (see the module docs): 2 x forward, plus
/// `4 r (in + out)` per adapted projection and token.
pub fn lora_train_flops(c: &ModelConfig, lora: &LoraConfig, seq: usize, batch: usize) -> f64 {
    let widths: usize = (lora.entries().into_iter())
        .map(|(_, target)| {
            let (out, input) = target.shape(c);
            out + input
        })
        .sum();
    let per_token = 2.0 * c.train_flops_per_token(seq) / 3.0 + (4 * lora.rank * widths) as f64;
    per_token * (seq * batch) as f64
}

/// `full`, or the adapters: rank, targets, layers.
fn training_name(c: &ModelConfig, lora: Option<&LoraConfig>) -> String {
    let Some(lora) = lora else {
        return "full".into();
    };
    let targets: Vec<&str> = lora.targets.iter().map(|target| target.name()).collect();
    let layers = lora.layers.len();
    let targets = targets.join(",");
    format!(
        "lora r={} {targets} ({layers} of {} layers)",
        lora.rank, c.n_layers
    )
}

/// What the benchmarked steps train, with the arrays that takes.
enum Trained {
    /// Every weight, with its gradient and AdamW moments.
    Full {
        weights: Weights,
        grads: Weights,
        adam: AdamState,
    },
    /// LoRA adapters on a frozen base: no gradient or moments of the base.
    Lora {
        step: Box<LoraStep>,
        adapters: Adapters,
        adam: AdamState,
    },
}

impl Trained {
    /// Random weights of `opts.config` (rounded to bf16 for LoRA), and
    /// adapters of `opts.lora` with a random B too (as after some training:
    /// every product nonzero); with the engine that runs them on `backend`
    /// (a LoRA run's: `Engine::for_lora`'s choice).
    fn new(backend: Box<dyn Backend>, opts: &TrainStepOptions) -> Result<(Trained, Engine)> {
        let (c, seq, batch) = (&opts.config, opts.seq, opts.batch);
        let mut weights = Weights::init(c, 1);
        let Some(lora) = opts.lora.as_ref() else {
            let engine = Engine::new(backend, c, seq, batch, opts.kernels)?;
            let trained = Trained::Full {
                grads: Weights::zeros(c),
                adam: AdamState::new(weights.data.len()),
                weights,
            };
            return Ok((trained, engine));
        };
        for value in &mut weights.data {
            *value = half::bf16::from_f32(*value).to_f32();
        }
        let mut rng = Rng::new(5);
        let mut adapters = Adapters::init(c, lora, &mut rng)?;
        for (layer, target) in lora.entries() {
            for value in adapters.b_mut(layer, target) {
                *value = 0.01 * rng.normal();
            }
        }
        let engine = Engine::for_lora(backend, &weights, lora, seq, batch, opts.kernels)?;
        let trained = Trained::Lora {
            step: Box::new(LoraStep::new(weights, &adapters, &engine)?),
            adam: AdamState::new(adapters.data.len()),
            adapters,
        };
        Ok((trained, engine))
    }

    /// One forward and backward over every position, written over the gradient.
    fn forward_backward(
        &mut self,
        engine: &mut Engine,
        inputs: &[u32],
        targets: &[u32],
        loss_scale: f32,
    ) -> Result<f64> {
        let write = GradWrite::Overwrite;
        match self {
            Trained::Full { weights, grads, .. } => {
                engine.forward_backward_as(weights, grads, write, inputs, targets, loss_scale)
            }
            Trained::Lora { step, adapters, .. } => {
                let divisor = targets.len() as f64;
                let loss = LossWeights {
                    targets,
                    weights: None,
                    divisor,
                };
                let key = DropoutKey {
                    seed: 0,
                    step: 0,
                    micro: 0,
                    first_sequence: 0,
                };
                step.forward_backward(engine, adapters, write, inputs, loss, loss_scale, key)
            }
        }
    }

    /// The buckets of the gradient, for its sum overlapped with the backward.
    fn buckets(&self) -> GradBuckets {
        match self {
            Trained::Full { grads, .. } => GradBuckets::of_weights(&grads.layout),
            Trained::Lora { step, .. } => GradBuckets::of_adapters(step.grads()),
        }
    }

    /// The gradient, flat (what data parallelism sums).
    fn grads_mut(&mut self) -> &mut [f32] {
        match self {
            Trained::Full { grads, .. } => &mut grads.data,
            Trained::Lora { step, .. } => &mut step.grads_mut().data,
        }
    }

    /// AdamW (phase `optimizer`) and, for LoRA, the merge (phase `merge`):
    /// what `LoraStep::update` does, timed apart.
    fn update(&mut self, opt: &AdamW, lr: f32, clip: f32, profile: &mut Profile) {
        let start = Instant::now();
        match self {
            Trained::Full {
                weights,
                grads,
                adam,
            } => {
                opt.step(weights, &grads.data, adam, lr, clip);
                profile.add("optimizer", start);
            }
            Trained::Lora {
                step,
                adapters,
                adam,
            } => {
                opt.step_matrices(&mut adapters.data, &step.grads().data, adam, lr, clip);
                profile.add("optimizer", start);
                let start = Instant::now();
                step.merge(adapters);
                profile.add("merge", start);
            }
        }
    }
}

/// One all-reduce of the whole flat gradient, timed: all exposed.
fn flat_sum(dist: &dyn Collective, grads: &mut [f32]) -> CommTimes {
    let start = Instant::now();
    dist.all_reduce_sum(grads);
    let spent = start.elapsed();
    CommTimes {
        exposed: spent,
        in_flight: spent,
        values: grads.len() as u64,
        buckets: 1,
    }
}

/// Median fp32 GEMM GFLOP/s on a training-like shape (2048 x 768 x 512), with
/// the current rayon threads.
pub fn gemm_peak_gflops(reps: usize) -> Result<f64> {
    let (m, k, nn) = (2048, 768, 512);
    let mut rng = Rng::new(7);
    let a: Vec<f32> = (0..m * k).map(|_| rng.next_f32() - 0.5).collect();
    let b: Vec<f32> = (0..k * nn).map(|_| rng.next_f32() - 0.5).collect();
    let mut c = vec![0.0f32; m * nn];
    let stats = time_ms(Repeat::new(2, reps), || {
        gemm(&mut c, m, nn, n(&a, m, k), n(&b, k, nn), 1.0, false);
        Ok(())
    })?;
    Ok(gflops(2.0 * (m * k * nn) as f64, stats.median_ms))
}

/// Peak resident set size of this process in MB (Linux `VmHWM`), if known.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Run the benchmark: `warmup` untimed steps, then `steps` timed ones.
/// `progress` is told each finished step (index, seconds).
pub fn run(
    backend: Box<dyn Backend>,
    opts: &TrainStepOptions,
    progress: &mut dyn FnMut(usize, f64),
) -> Result<TrainStepReport> {
    run_on(backend, opts, crate::dist::single(), progress)
}

/// [`run`] as one rank of `dist`: each rank's step on `batch` sequences of
/// its own, its gradients summed over the ranks as in training (bucket by
/// bucket during the backward, or with `opts.overlap` off one all-reduce
/// after it; the time the step spent on it is the phase `all-reduce`)
/// before the norm and AdamW.
pub fn run_on(
    backend: Box<dyn Backend>,
    opts: &TrainStepOptions,
    dist: Arc<dyn Collective>,
    progress: &mut dyn FnMut(usize, f64),
) -> Result<TrainStepReport> {
    if opts.steps == 0 {
        return Err(crate::Error::Invalid(
            "train-step needs at least one timed step (--steps 1 or more)".into(),
        ));
    }
    let c = &opts.config;
    let backend_name = backend.name().to_string();
    let (mut trained, mut engine) = Trained::new(backend, opts)?;
    for note in engine.fallbacks() {
        eprintln!("{note}");
    }
    let adamw = AdamW::default();
    let n_tokens = opts.seq * opts.batch;
    let mut rng = Rng::new(42 + dist.rank() as u64);
    let ranks = dist.size();
    let mut inputs = vec![0u32; n_tokens];
    let mut targets = vec![0u32; n_tokens];
    let mut times = Vec::new();
    let mut losses = Vec::new();
    let mut profile = Profile::default();
    let mut untimed = Profile::default();
    let mut span = None;
    let buckets = (ranks > 1 && opts.overlap).then(|| Arc::new(trained.buckets()));
    let mut comm = CommTimes::default();
    for step in 0..opts.warmup + opts.steps {
        for tok in inputs.iter_mut().chain(targets.iter_mut()) {
            *tok = rng.below(c.vocab_size as u64) as u32;
        }
        if step == opts.warmup {
            span = Some(energy::start());
            engine.take_profile();
            if opts.ops {
                crate::backend::cpu::profile::take();
                crate::backend::cpu::profile::set_enabled(true);
            }
        }
        let timed = step >= opts.warmup;
        let step_profile = if timed { &mut profile } else { &mut untimed };
        let start = Instant::now();
        if let Some(buckets) = &buckets {
            engine.sum_next_backward(dist.clone(), buckets.clone());
        }
        let loss = trained.forward_backward(&mut engine, &inputs, &targets, 1.0 / ranks as f32)?;
        let mut norm = engine.grad_norm();
        if ranks > 1 {
            let times = match engine.take_reduced() {
                Some(times) => times,
                None => flat_sum(dist.as_ref(), trained.grads_mut()),
            };
            norm = optim::global_norm(trained.grads_mut());
            step_profile.add_duration("all-reduce", times.exposed);
            if timed {
                comm.in_flight += times.in_flight;
                comm.buckets = times.buckets;
            }
        }
        let clip = optim::clip_factor(norm, 1.0);
        trained.update(&adamw, 3e-4, clip, step_profile);
        let elapsed = start.elapsed().as_secs_f64();
        if timed {
            times.push(elapsed);
            losses.push(loss);
        }
        progress(step, elapsed);
    }
    let steps_run = opts.steps as u64;
    let energy = span.map_or_else(Energy::default, |span| {
        span.finish(steps_run, steps_run * n_tokens as u64)
    });
    let ops: Vec<OpPhase> = if opts.ops {
        crate::backend::cpu::profile::set_enabled(false);
        crate::backend::cpu::profile::take()
            .into_iter()
            .map(|t| OpPhase {
                label: t.label,
                ms_per_step: t.total.as_secs_f64() * 1e3 / opts.steps as f64,
                calls_per_step: t.calls as f64 / opts.steps as f64,
            })
            .collect()
    } else {
        Vec::new()
    };
    let engine_profile = engine.take_profile();
    for (name, d) in engine_profile.phases {
        profile.add_duration(&name, d);
    }
    for (name, d) in engine_profile.side_by_side {
        profile.add_side_by_side(&name, d);
    }
    let flops = match &opts.lora {
        Some(lora) => lora_train_flops(c, lora, opts.seq, opts.batch),
        None => train_flops(c, opts.seq, opts.batch),
    };
    let ms: Vec<f64> = times.iter().map(|s| s * 1e3).collect();
    let stats = Stats::from_ms(&ms);
    let med = stats.median_ms / 1e3;
    let peak = gemm_peak_gflops(9)?;
    let total: Duration = times.iter().map(|s| Duration::from_secs_f64(*s)).sum();
    let steps = opts.steps.max(1) as f64;
    let per_step = |list: &[(String, Duration)]| -> Vec<Phase> {
        list.iter()
            .map(|(name, d)| Phase {
                name: name.to_string(),
                ms_per_step: d.as_secs_f64() * 1e3 / steps,
                fraction: d.as_secs_f64() / total.as_secs_f64(),
            })
            .collect()
    };
    let mut phases = per_step(&profile.phases);
    let buffer_bytes = 4 * trained.grads_mut().len() as u64;
    let comm = phases
        .iter()
        .find(|phase| phase.name == "all-reduce")
        .map(|phase| CommReport {
            mode: if buckets.is_some() {
                "overlapped"
            } else {
                "flat"
            }
            .into(),
            buckets: comm.buckets,
            exposed_ms_per_step: phase.ms_per_step,
            fraction: phase.fraction,
            in_flight_ms_per_step: comm.in_flight.as_secs_f64() * 1e3 / steps,
            buffer_bytes,
            ring_bytes_per_rank: buffer_bytes * 2 * (ranks as u64 - 1) / ranks as u64,
        });
    let side_by_side = per_step(&profile.side_by_side);
    let accounted: f64 = phases.iter().map(|p| p.ms_per_step).sum();
    let step_ms = total.as_secs_f64() * 1e3 / steps;
    phases.push(Phase {
        name: "other".into(),
        ms_per_step: (step_ms - accounted).max(0.0),
        fraction: ((step_ms - accounted) / step_ms).max(0.0),
    });
    let gflops = flops / med / 1e9;
    Ok(TrainStepReport {
        config: opts.config_name.clone(),
        training: training_name(c, opts.lora.as_ref()),
        backend: backend_name,
        cpu: crate::doctor::chip_name(),
        simd: crate::math::simd_level().into(),
        threads: rayon::current_num_threads(),
        seq: opts.seq,
        batch: opts.batch,
        steps: opts.steps,
        ms_median: stats.median_ms,
        ms_min: stats.min_ms,
        ms_max: stats.max_ms,
        // The whole job's: every rank's tokens.
        tokens_per_s: (n_tokens * ranks) as f64 / med,
        gflop_per_step: flops / 1e9,
        gflops,
        gemm_peak_gflops: peak,
        fraction_of_gemm_peak: gflops / peak,
        peak_rss_mb: peak_rss_mb(),
        phases,
        side_by_side,
        ops,
        losses,
        energy,
        ranks,
        comm,
    })
}

/// The report as an aligned text table.
pub fn format_report(r: &TrainStepReport) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "train-step {} ({}) on {} ({} threads), seq {} batch {}{}, {} timed steps\n",
        r.config,
        r.training,
        r.backend,
        r.threads,
        r.seq,
        r.batch,
        match r.ranks {
            1 => String::new(),
            ranks => format!(" on each of {ranks} ranks"),
        },
        r.steps
    ));
    out.push_str(&format!(
        "  machine      {} ({})\n",
        r.cpu.as_deref().unwrap_or("unknown CPU"),
        r.simd
    ));
    out.push_str(&format!(
        "  ms/step      {:>9.1}  (min {:.1}, max {:.1})\n",
        r.ms_median, r.ms_min, r.ms_max
    ));
    out.push_str(&format!("  tokens/s     {:>9.0}\n", r.tokens_per_s));
    if let Some(comm) = &r.comm {
        out.push_str(&format!(
            "  all-reduce   {:>9.1}  ms/step exposed ({:.1} % of the step), {:.1} ms in flight, \
             {} in {} all-reduce(s) over {} ranks: {:.1} MB summed, {:.1} MB sent per rank \
             (ring)\n",
            comm.exposed_ms_per_step,
            100.0 * comm.fraction,
            comm.in_flight_ms_per_step,
            comm.mode,
            comm.buckets,
            r.ranks,
            comm.buffer_bytes as f64 / 1e6,
            comm.ring_bytes_per_rank as f64 / 1e6
        ));
    }
    out.push_str(&format!("  energy       {}\n", r.energy.summary()));
    out.push_str(&format!(
        "  GFLOP/s      {:>9.1}  ({:.2} GFLOP/step)\n",
        r.gflops, r.gflop_per_step
    ));
    out.push_str(&format!(
        "  GEMM peak    {:>9.1}  GFLOP/s measured now; step reaches {:.0} %\n",
        r.gemm_peak_gflops,
        100.0 * r.fraction_of_gemm_peak
    ));
    if let Some(rss) = r.peak_rss_mb {
        out.push_str(&format!("  peak RSS     {rss:>9.0}  MB\n"));
    }
    let push_phases = |out: &mut String, phases: &[Phase]| {
        for p in phases {
            out.push_str(&format!(
                "  {:<20} {:>8.2}  {:>5.1} %\n",
                p.name,
                p.ms_per_step,
                100.0 * p.fraction
            ));
        }
    };
    out.push_str("  phase                 ms/step   share\n");
    push_phases(&mut out, &r.phases);
    if !r.side_by_side.is_empty() {
        out.push_str("  side by side (whole time; above only as waited for)\n");
        push_phases(&mut out, &r.side_by_side);
    }
    if !r.ops.is_empty() {
        let shown = r.ops.len().min(30);
        out.push_str(&format!(
            "  CPU plan steps (top {shown} of {}): ms/step  calls/step  op -> result\n",
            r.ops.len()
        ));
        for o in &r.ops[..shown] {
            out.push_str(&format!(
                "  {:>8.2} {:>6.0}  {}\n",
                o.ms_per_step, o.calls_per_step, o.label
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_match_the_hand_count_for_layer768() {
        // Per token forward: linear 4*768^2 + 3*768*2048 + 256*768 = 7,274,496 weights
        // -> 2 * 512 * 7,274,496 = 7,449,083,904; attention 4 * 512^2 * 768 = 805,306,368.
        // Training = 3 x (7,449,083,904 + 805,306,368) = 24,763,170,816.
        let c = ModelConfig::preset("layer768").unwrap();
        assert_eq!(train_flops(&c, 512, 1), 24_763_170_816.0);
        assert_eq!(train_flops(&c, 512, 2), 2.0 * 24_763_170_816.0);
    }

    #[test]
    fn flops_match_the_hand_count_for_smollm2_135m() {
        // GQA (3 KV heads of 64): per layer 576^2 (wq) + 2 * 192 * 576 (wk, wv) + 576^2
        // (wo) + 3 * 1536 * 576 = 3,538,944 weights; the tied classifier 49152 * 576.
        // 3 x (2 * 512 * (30 * 3,538,944 + 28,311,552) + 30 * 4 * 512^2 * 576)
        // = 467,480,346,624 (docs/performance.md; scripts/bench_pytorch.py's `train_flops`).
        let c = ModelConfig::preset("smollm2-135m").unwrap();
        assert_eq!(train_flops(&c, 512, 1), 467_480_346_624.0);
    }

    #[test]
    fn lora_flops_match_the_hand_count_for_smollm2_135m() {
        // 2/3 of the training count above: 311,653,564,416. Adapters of rank
        // 16 on all seven projections, in + out per layer: q 576 + 576, k and
        // v 576 + 192, o 576 + 576, gate and up 576 + 1536, down 1536 + 576
        // = 10,176; 4 x 16 x 30 x 10,176 x 512 = 10,003,415,040.
        use crate::model::lora::Target;
        let c = ModelConfig::preset("smollm2-135m").unwrap();
        let lora = LoraConfig::new(16, 32.0, 0.0, &Target::ALL, None, c.n_layers).unwrap();
        assert_eq!(lora_train_flops(&c, &lora, 512, 1), 321_656_979_456.0);
    }
}
