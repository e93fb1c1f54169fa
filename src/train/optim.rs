//! AdamW exactly as `torch.optim.AdamW` defines it (decoupled weight decay
//! applied first, bias corrections, eps added after the bias-corrected square
//! root), no decay on one-dimensional parameters (norm weights, biases:
//! `torch.optim.AdamW` param groups by dimension), warmup + cosine or constant schedules,
//! global-norm clipping, and dynamic loss scaling for fp16 kernels. The update is
//! a pure function of explicit state.

use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::backend::FP16_MATMUL_LIMIT;
use crate::model::Weights;
use crate::{Error, Result};

/// Hyper-parameters of AdamW.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// First and second moments plus the step count `t` (number of updates done).
#[derive(Clone, Debug, PartialEq)]
pub struct AdamState {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub t: u64,
}

impl AdamState {
    pub fn new(n: usize) -> AdamState {
        AdamState {
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }
}

impl AdamW {
    /// One update of `weights` with gradient `grad_scale * grad` (same layout)
    /// at learning rate `lr`. `grad_scale` carries a global-norm clip
    /// ([`clip_factor`]) into the update's one pass over the arrays, instead
    /// of a separate pass that rewrites the gradient; the values are those of
    /// scaling the gradient first, bit for bit.
    pub fn step(
        &self,
        weights: &mut Weights,
        grad: &[f32],
        state: &mut AdamState,
        lr: f32,
        grad_scale: f32,
    ) {
        let ranges: Vec<_> = weights
            .layout
            .params()
            .into_iter()
            .map(|p| {
                let decay = if p.is_vector() {
                    0.0
                } else {
                    self.weight_decay
                };
                (weights.layout.range(p), decay)
            })
            .collect();
        self.step_ranges(&mut weights.data, grad, state, lr, grad_scale, &ranges);
    }

    /// [`AdamW::step`] on a flat vector of matrices (LoRA adapters), every
    /// element with weight decay.
    pub fn step_matrices(
        &self,
        params: &mut [f32],
        grad: &[f32],
        state: &mut AdamState,
        lr: f32,
        grad_scale: f32,
    ) {
        let ranges = [(0..params.len(), self.weight_decay)];
        self.step_ranges(params, grad, state, lr, grad_scale, &ranges);
    }

    /// One update of the `(range, weight decay)` parts of `params`.
    fn step_ranges(
        &self,
        params: &mut [f32],
        grad: &[f32],
        state: &mut AdamState,
        lr: f32,
        grad_scale: f32,
        ranges: &[(std::ops::Range<usize>, f32)],
    ) {
        state.t += 1;
        let t = state.t as i32;
        let bias1 = 1.0 - self.beta1.powi(t);
        let bias2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        let step_size = lr / bias1;
        // One hand-over to the pool for all the parameters' loops (see
        // `math::on_pool`).
        crate::math::on_pool(|| {
            for (range, decay) in ranges {
                let w = &mut params[range.clone()];
                let (m, v, g) = (
                    &mut state.m[range.clone()],
                    &mut state.v[range.clone()],
                    &grad[range.clone()],
                );
                let (beta1, beta2, eps) = (self.beta1, self.beta2, self.eps);
                let (keep, one_minus_b1, one_minus_b2) =
                    (1.0 - lr * decay, 1.0 - beta1, 1.0 - beta2);
                // Square root and two divisions a value: 256-bit registers.
                let update = |(((w, m), v), g): Chunks| {
                    crate::math::simd256(
                        #[inline(always)]
                        || {
                            let each = w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g);
                            for (((w, m), v), &g) in each {
                                let g = g * grad_scale;
                                *w *= keep;
                                *m = beta1 * *m + one_minus_b1 * g;
                                *v = beta2 * *v + one_minus_b2 * g * g;
                                let denom = v.sqrt() / bias2_sqrt + eps;
                                *w -= step_size * *m / denom;
                            }
                        },
                    )
                };
                // Elementwise, so splitting across threads changes no result.
                w.par_chunks_mut(CHUNK)
                    .zip(m.par_chunks_mut(CHUNK))
                    .zip(v.par_chunks_mut(CHUNK))
                    .zip(g.par_chunks(CHUNK))
                    .for_each(update);
            }
        });
    }
}

/// Learning-rate schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Linear warmup, then cosine decay to `min_lr_ratio * lr` at the last step.
    Cosine,
    /// Linear warmup, then constant.
    Constant,
}

impl Schedule {
    /// Every schedule, the default first.
    pub const ALL: [Schedule; 2] = [Schedule::Cosine, Schedule::Constant];

    /// The name `--schedule` takes (and `config.json` holds).
    pub fn name(self) -> &'static str {
        match self {
            Schedule::Cosine => "cosine",
            Schedule::Constant => "constant",
        }
    }

    /// What the schedule does, one line (the CLI's help).
    pub fn about(self) -> &'static str {
        match self {
            Schedule::Cosine => {
                "Linear warmup, then cosine decay to `min_lr_ratio * lr` at the last step"
            }
            Schedule::Constant => "Linear warmup, then constant",
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Schedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let names = Schedule::ALL.map(Schedule::name);
        Schedule::ALL
            .into_iter()
            .find(|schedule| schedule.name() == s)
            .ok_or_else(|| Error::unknown_name("schedule", s, &names))
    }
}

/// Learning rate for update `step` (0-based) of `total` updates.
pub fn learning_rate(schedule: Schedule, lr: f32, step: u64, warmup: u64, total: u64) -> f32 {
    if step < warmup {
        return lr * (step + 1) as f32 / warmup as f32;
    }
    match schedule {
        Schedule::Constant => lr,
        Schedule::Cosine => {
            let min_lr = 0.1 * lr;
            let span = total.saturating_sub(warmup).max(1) as f32;
            let progress = ((step - warmup) as f32 / span).min(1.0);
            min_lr + 0.5 * (lr - min_lr) * (1.0 + (std::f32::consts::PI * progress).cos())
        }
    }
}

/// Matching chunks of weights, first and second moments, and gradient.
type Chunks<'a> = (((&'a mut [f32], &'a mut [f32]), &'a mut [f32]), &'a [f32]);

/// Elements per task of the parallel optimizer loops.
const CHUNK: usize = 1 << 15;

/// Global L2 norm of `grad` (f64 accumulation): [`sum_squares`]'s root.
pub fn global_norm(grad: &[f32]) -> f64 {
    sum_squares(grad).sqrt()
}

/// Sum of the squares of `grad` in f64. Partial sums per fixed-size chunk are
/// added in order, so the result does not depend on the threads. One chunk
/// (a norm weight's gradient, say) is summed right here: no hand-over to the
/// pool, no allocation, the same value.
pub fn sum_squares(grad: &[f32]) -> f64 {
    if grad.len() <= CHUNK {
        return crate::math::simd(
            #[inline(always)]
            || crate::math::sum_squares_f64(grad),
        );
    }
    let partial: Vec<f64> = grad
        .par_chunks(CHUNK)
        .map(|c| {
            crate::math::simd(
                #[inline(always)]
                || crate::math::sum_squares_f64(c),
            )
        })
        .collect();
    partial.iter().sum::<f64>()
}

/// The factor that brings a gradient of global norm `norm` to at most
/// `max_norm`, like `torch.nn.utils.clip_grad_norm_` (`max_norm / (norm +
/// 1e-6)` when the norm exceeds it, else 1; 0 disables clipping). Applied by
/// [`AdamW::step`]'s `grad_scale`.
pub fn clip_factor(norm: f64, max_norm: f32) -> f32 {
    if max_norm > 0.0 && norm > max_norm as f64 {
        (max_norm as f64 / (norm + 1e-6)) as f32
    } else {
        1.0
    }
}

/// The largest loss scale: the largest power of two not above
/// [`FP16_MATMUL_LIMIT`] (32,759), i.e. 2^14 = 16,384. Every gradient the
/// kernels compute carries the scale, and the ANE's matmul outputs overflow
/// to inf near 32,759, half of fp16's largest value: at 2^15 = 32,768 a
/// gradient of magnitude 1 would already be past it (fp16's own range,
/// 65,504, would have allowed 2^15; the old cap, 2^16, was past both).
pub const MAX_LOSS_SCALE: f32 = largest_power_of_two_at_most(FP16_MATMUL_LIMIT);

/// The largest power of two `<= x` (for `x >= 1`).
const fn largest_power_of_two_at_most(x: f32) -> f32 {
    let mut p = 1.0;
    while p * 2.0 <= x {
        p *= 2.0;
    }
    p
}

/// Dynamic loss scaling for fp16 kernels: multiply the loss gradient by
/// `scale`; on inf/NaN gradients halve it and skip the update; after
/// `growth_interval` clean steps double it, up to [`MAX_LOSS_SCALE`] (a
/// scale restored from an older run above it is brought down to it at the
/// next clean step).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f32,
    pub growth_interval: u32,
    pub clean_steps: u32,
    pub enabled: bool,
}

/// What the scaler decided for one step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleEvent {
    /// Gradients finite: apply the update.
    Apply,
    /// Gradients finite and the scale was doubled afterwards (never past
    /// [`MAX_LOSS_SCALE`]).
    ApplyAndGrow,
    /// Non-finite gradients: skip the update; the scale was halved.
    Skip,
}

impl LossScaler {
    /// Enabled scaler starting at 2^12 (fp16 kernels).
    pub fn dynamic() -> LossScaler {
        LossScaler {
            scale: 4096.0,
            growth_interval: 200,
            clean_steps: 0,
            enabled: true,
        }
    }

    /// Disabled scaler (fp32 kernels need none): scale 1, never skips finite steps.
    pub fn disabled() -> LossScaler {
        LossScaler {
            scale: 1.0,
            growth_interval: 0,
            clean_steps: 0,
            enabled: false,
        }
    }

    /// Decide on a step from the global norm of the gradients computed with
    /// the current scale ([`global_norm`], or the engine's `grad_norm`, the
    /// same sums taken per parameter; finite exactly when every gradient is:
    /// squares of `f32` values cannot overflow their `f64` sum).
    /// Non-finite gradients always skip the step (with scaling disabled the
    /// scale stays 1). The caller unscales through [`AdamW::step`]'s
    /// `grad_scale`, `clip_factor(norm / scale, max) / scale`, in the update's
    /// own pass.
    pub fn update(&mut self, scaled_norm: f64) -> ScaleEvent {
        if !scaled_norm.is_finite() {
            if self.enabled {
                self.scale = (self.scale * 0.5).max(1.0);
                self.clean_steps = 0;
            }
            return ScaleEvent::Skip;
        }
        if !self.enabled {
            return ScaleEvent::Apply;
        }
        self.clean_steps += 1;
        let capped = self.scale.min(MAX_LOSS_SCALE);
        if self.clean_steps >= self.growth_interval {
            self.clean_steps = 0;
            self.scale = (capped * 2.0).min(MAX_LOSS_SCALE);
            if self.scale > capped {
                return ScaleEvent::ApplyAndGrow;
            }
        }
        self.scale = capped;
        ScaleEvent::Apply
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ModelConfig, Param};

    #[test]
    fn adamw_matches_hand_derived_first_steps() {
        // One weight 0.5 (a matrix entry, decayed) with gradient 0.2 twice;
        // torch.optim.AdamW(lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        // step 1: w = 0.5*(1-0.01) = 0.495; m=0.02, v=0.002; mhat=0.2, vhat=0.04;
        //         w -= 0.1 * 0.2/(0.2+1e-8) -> 0.395
        // step 2: w = 0.395*0.99 = 0.39105; m=0.038, v=0.0039; bias1=0.19,
        //         sqrt(bias2)=sqrt(0.0975); denom = sqrt(0.0039)/sqrt(0.0975)+1e-8 = 0.2
        //         w -= 0.1/0.19 * 0.038/0.2 = 0.1 -> 0.29105
        let config = ModelConfig::llama(2, 1, 1, 1, 2, 2, 2);
        let mut w = Weights::zeros(&config);
        let i = w.layout.range(Param::Wq(0)).start;
        let n = w.layout.range(Param::RmsAtt(0)).start;
        w.data[i] = 0.5;
        w.data[n] = 0.5;
        let mut grad = vec![0.0; w.data.len()];
        grad[i] = 0.2;
        grad[n] = 0.2;
        let opt = AdamW::default();
        let mut st = AdamState::new(w.data.len());
        opt.step(&mut w, &grad, &mut st, 0.1, 1.0);
        assert!((w.data[i] - 0.395).abs() < 1e-6, "{}", w.data[i]);
        assert!(
            (w.data[n] - 0.4).abs() < 1e-6,
            "norm weights are not decayed"
        );
        opt.step(&mut w, &grad, &mut st, 0.1, 1.0);
        assert!((w.data[i] - 0.29105).abs() < 1e-5, "{}", w.data[i]);
        // A clip factor inside the update equals scaling the gradient first,
        // bit for bit.
        let (mut w2, mut st2) = (w.clone(), st.clone());
        let big: Vec<f32> = grad.iter().map(|g| g * 7.0).collect();
        let scaled: Vec<f32> = big.iter().map(|g| g * 0.3).collect();
        opt.step(&mut w, &big, &mut st, 0.1, 0.3);
        opt.step(&mut w2, &scaled, &mut st2, 0.1, 1.0);
        assert!(
            w.data
                .iter()
                .zip(&w2.data)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        assert!(
            st.m.iter()
                .zip(&st2.m)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
    }

    #[test]
    fn schedules() {
        assert_eq!(learning_rate(Schedule::Cosine, 1.0, 0, 10, 110), 0.1);
        assert_eq!(learning_rate(Schedule::Cosine, 1.0, 9, 10, 110), 1.0);
        assert_eq!(learning_rate(Schedule::Cosine, 1.0, 10, 10, 110), 1.0);
        assert!((learning_rate(Schedule::Cosine, 1.0, 60, 10, 110) - 0.55).abs() < 1e-6);
        assert!((learning_rate(Schedule::Cosine, 1.0, 110, 10, 110) - 0.1).abs() < 1e-6);
        assert_eq!(learning_rate(Schedule::Constant, 0.3, 500, 10, 110), 0.3);
    }

    #[test]
    fn clipping_and_loss_scaling() {
        // |(3, 4)| = 5: the factor 1 / (5 + 1e-6) brings it to norm 1.
        assert_eq!(global_norm(&[3.0, 4.0]), 5.0);
        assert_eq!(clip_factor(5.0, 1.0), (1.0 / (5.0 + 1e-6)) as f32);
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
        assert_eq!(clip_factor(5.0, 0.0), 1.0);
        let mut s = LossScaler {
            growth_interval: 2,
            ..LossScaler::dynamic()
        };
        assert!(global_norm(&[4096.0, f32::INFINITY]).is_infinite());
        assert!(global_norm(&[f32::NAN, 1.0]).is_nan());
        assert!(global_norm(&[f32::MAX; 4]).is_finite());
        assert_eq!(
            s.update(global_norm(&[4096.0, f32::INFINITY])),
            ScaleEvent::Skip
        );
        assert_eq!(s.scale, 2048.0);
        assert_eq!(s.update(2048.0), ScaleEvent::Apply);
        assert_eq!(s.update(0.0), ScaleEvent::ApplyAndGrow);
        assert_eq!(s.scale, 4096.0);
        let mut off = LossScaler::disabled();
        assert_eq!(off.update(f64::NAN), ScaleEvent::Skip);
        assert_eq!(off.scale, 1.0);
    }

    /// The loss scale stops below the ANE's matmul overflow (32,759): the
    /// powers of two are 16,384 <= 32,759 < 32,768, so it grows to 2^14 and
    /// no further (fp16's 65,504 alone would have allowed 2^15; the old cap was 2^16).
    #[test]
    fn the_loss_scale_grows_to_the_power_of_two_below_the_matmul_limit() {
        assert_eq!(FP16_MATMUL_LIMIT, 32_759.0);
        assert_eq!(MAX_LOSS_SCALE, 16_384.0);
        let mut s = LossScaler {
            scale: 4096.0,
            growth_interval: 1,
            ..LossScaler::dynamic()
        };
        assert_eq!(s.update(1.0), ScaleEvent::ApplyAndGrow);
        assert_eq!(s.scale, 8192.0);
        assert_eq!(s.update(1.0), ScaleEvent::ApplyAndGrow);
        assert_eq!(s.scale, 16_384.0);
        // At the cap a clean interval no longer grows it.
        assert_eq!(s.update(1.0), ScaleEvent::Apply);
        assert_eq!(s.scale, 16_384.0);
        // Overflow still halves it, and it grows back to the cap.
        assert_eq!(s.update(f64::INFINITY), ScaleEvent::Skip);
        assert_eq!(s.scale, 8192.0);
        assert_eq!(s.update(1.0), ScaleEvent::ApplyAndGrow);
        assert_eq!(s.scale, 16_384.0);
        // A scale saved by an older run (which grew to 65,536) comes down to
        // the cap at its next clean step, growth interval or not.
        let mut old = LossScaler {
            scale: 65_536.0,
            growth_interval: 200,
            ..LossScaler::dynamic()
        };
        assert_eq!(old.update(1.0), ScaleEvent::Apply);
        assert_eq!(old.scale, 16_384.0);
        let mut old = LossScaler {
            scale: 32_768.0,
            growth_interval: 1,
            ..LossScaler::dynamic()
        };
        assert_eq!(old.update(1.0), ScaleEvent::Apply);
        assert_eq!(old.scale, 16_384.0);
    }
}
