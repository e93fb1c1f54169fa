//! Where a step's wall time goes: [`Profile`], and [`TimedHost`], the host
//! math of [`crate::model::host`] with each call's time added to its phase, so
//! that the layer code calls the math and the clock stays here.
//!
//! The kernels keep their own clocks (`kernel`), and the weight gradients
//! theirs (`schedule`); the engine merges them. Nothing here decides anything.

use std::time::{Duration, Instant};

use crate::model::host::{self, CrossEntropyScratch};

/// Wall time per phase, summed over the passes since the last
/// [`crate::train::engine::Engine::take_profile`]. Kernel phases are named
/// after the kernel (`attn_fwd`, ...); `io` is writing inputs to and reading
/// outputs from kernel buffers (conversion to the buffer's dtype included).
///
/// `phases` split the wall time: no two run at once. Work that runs beside
/// them (the weight gradients beside the backward kernels, see
/// `schedule::overlapped`) is in `phases` only for the time the step waited
/// for it, and in `side_by_side` for its whole time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Profile {
    pub phases: Vec<(String, Duration)>,
    pub side_by_side: Vec<(String, Duration)>,
}

impl Profile {
    /// Add the time elapsed since `start` to `phase`.
    pub fn add(&mut self, phase: &str, start: Instant) {
        self.add_duration(phase, start.elapsed());
    }

    /// Run `f`, adding its wall time to `phase`.
    pub fn time<R>(&mut self, phase: &str, f: impl FnOnce() -> R) -> R {
        let start = Instant::now();
        let result = f();
        self.add(phase, start);
        result
    }

    pub fn add_duration(&mut self, phase: &str, duration: Duration) {
        add_to(&mut self.phases, phase, duration);
    }

    /// Add `duration` to the time of `phase` run beside the phases.
    pub fn add_side_by_side(&mut self, phase: &str, duration: Duration) {
        add_to(&mut self.side_by_side, phase, duration);
    }

    /// Add every phase of `other` to this profile's.
    pub fn merge(&mut self, other: Profile) {
        for (phase, duration) in other.phases {
            self.add_duration(&phase, duration);
        }
        for (phase, duration) in other.side_by_side {
            self.add_side_by_side(&phase, duration);
        }
    }

    pub fn total(&self) -> Duration {
        self.phases.iter().map(|(_, duration)| *duration).sum()
    }
}

fn add_to(phases: &mut Vec<(String, Duration)>, phase: &str, duration: Duration) {
    match phases.iter_mut().find(|(name, _)| name == phase) {
        Some((_, total)) => *total += duration,
        None => phases.push((phase.to_string(), duration)),
    }
}

/// The host math of a step, each call timed under its phase: `embedding`,
/// `rmsnorm`, `classifier`, `loss`. The methods are those of
/// [`crate::model::host`], with the same arguments.
#[derive(Default)]
pub struct TimedHost {
    pub profile: Profile,
}

impl TimedHost {
    pub fn embedding_forward(
        &mut self,
        x: &mut [f32],
        embedding: &[f32],
        tokens: &[u32],
        dim: usize,
    ) {
        self.profile.time("embedding", || {
            host::embedding_forward(x, embedding, tokens, dim)
        });
    }

    pub fn embedding_backward(
        &mut self,
        d_embedding: &mut [f32],
        dx: &[f32],
        tokens: &[u32],
        dim: usize,
    ) {
        self.profile.time("embedding", || {
            host::embedding_backward(d_embedding, dx, tokens, dim)
        });
    }

    pub fn rmsnorm_forward(
        &mut self,
        y: &mut [f32],
        rrms: &mut [f32],
        x: &[f32],
        weight: &[f32],
        eps: f32,
    ) {
        self.profile
            .time("rmsnorm", || host::rmsnorm_forward(y, rrms, x, weight, eps));
    }

    pub fn rmsnorm_backward(
        &mut self,
        dx: &mut [f32],
        d_weight: Option<&mut [f32]>,
        dy: &[f32],
        x: &[f32],
        weight: &[f32],
        rrms: &[f32],
    ) {
        self.profile.time("rmsnorm", || {
            host::rmsnorm_backward(dx, d_weight, dy, x, weight, rrms)
        });
    }

    /// `classifier_t (C, V) = classifier^T`, the form of
    /// [`TimedHost::classifier_backward`]'s `dx` product.
    pub fn transpose_classifier(
        &mut self,
        classifier: &[f32],
        dim: usize,
        classifier_t: &mut [f32],
    ) {
        let vocab = classifier.len() / dim;
        self.profile.time("classifier", || {
            crate::linalg::transpose_into(classifier, vocab, dim, classifier_t)
        });
    }

    pub fn classifier_forward(
        &mut self,
        logits: &mut [f32],
        x: &[f32],
        classifier: &[f32],
        dim: usize,
    ) {
        self.profile.time("classifier", || {
            host::classifier_forward(logits, x, classifier, dim)
        });
    }

    #[allow(clippy::too_many_arguments)]
    pub fn classifier_backward(
        &mut self,
        dx: &mut [f32],
        d_classifier: Option<&mut [f32]>,
        g: &[f32],
        x: &[f32],
        classifier: &[f32],
        classifier_t: Option<&[f32]>,
        dim: usize,
        add: bool,
    ) {
        self.profile.time("classifier", || {
            host::classifier_backward(dx, d_classifier, g, x, classifier, classifier_t, dim, add)
        });
    }

    pub fn cross_entropy(
        &mut self,
        logits: &mut [f32],
        targets: &[u32],
        grad_scale: Option<f32>,
        scratch: &mut CrossEntropyScratch,
    ) -> f64 {
        self.profile.time("loss", || {
            host::cross_entropy(logits, targets, grad_scale, scratch)
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn classifier_backward_block(
        &mut self,
        dx: &mut [f32],
        add_dx: bool,
        d_classifier: Option<&mut [f32]>,
        g: &[f32],
        x: &[f32],
        classifier: &[f32],
        dim: usize,
        add: bool,
    ) {
        self.profile.time("classifier", || {
            host::classifier_backward_block(dx, add_dx, d_classifier, g, x, classifier, dim, add)
        });
    }

    pub fn cross_entropy_block(
        &mut self,
        logits: &mut [f32],
        first_row: usize,
        targets: &[u32],
        scratch: &mut CrossEntropyScratch,
    ) -> f64 {
        self.profile.time("loss", || {
            host::cross_entropy_block(logits, first_row, targets, scratch)
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn frozen_dx_block(
        &mut self,
        logits: &mut [f32],
        classifier: &[f32],
        dim: usize,
        reference: &mut Vec<f32>,
        dx: &mut [f32],
        first: bool,
        scratch: &CrossEntropyScratch,
        factor: &mut Vec<f32>,
    ) {
        self.profile.time("classifier", || {
            host::frozen_dx_block(
                logits, classifier, dim, reference, dx, first, scratch, factor,
            )
        });
    }

    pub fn frozen_dx_finish(
        &mut self,
        dx: &mut [f32],
        classifier: &[f32],
        dim: usize,
        targets: &[u32],
        grad_scale: f32,
        scratch: &mut CrossEntropyScratch,
    ) {
        self.profile.time("loss", || {
            host::frozen_dx_finish(dx, classifier, dim, targets, grad_scale, scratch)
        });
    }

    pub fn cross_entropy_finish(&mut self, scratch: &mut CrossEntropyScratch) -> f64 {
        self.profile
            .time("loss", || host::cross_entropy_finish(scratch))
    }

    pub fn cross_entropy_block_gradient(
        &mut self,
        logits: &mut [f32],
        first_row: usize,
        targets: &[u32],
        grad_scale: f32,
        scratch: &mut CrossEntropyScratch,
    ) {
        self.profile.time("loss", || {
            host::cross_entropy_block_gradient(logits, first_row, targets, grad_scale, scratch)
        });
    }
}
