//! When the weight gradients run. The backward says which gradient became
//! computable after a stage ([`DwPass::due`] for a matrix's product,
//! [`DwPass::due_sum`] for a vector's sum over positions: a bias, a QK-norm
//! weight; the two kinds of [`DwJob`]); this module decides beside which
//! later backward kernel it runs ([`planned_beside`]), and runs it there on
//! the rayon pool while the kernel runs on the calling thread
//! ([`overlapped`]), as the ANE's dx kernels would overlap the CPU's dW.
//!
//! It also keeps the arrays those gradients read ([`DySources`]) safe: an
//! array is written only after every pending gradient that reads it has run
//! ([`DwPass::take`]), so the plan decides the timing and never the values.
//! What a gradient is (`dW = sum_b dY_b X_b^T`) is `grads`' business; which
//! kernel does what is the layer code's.

use std::time::{Duration, Instant};

use crate::Result;
use crate::model::Param;
use crate::model::kernels::LAYER_KERNELS;
use crate::train::buffers::{Dy, DySources, Input, LayerActs};
use crate::train::grads::GradSink;
use crate::train::profile::Profile;

/// The phase of the weight gradients in the [`Profile`].
const PHASE: &str = "dW gemm";

/// Beside which backward kernel a due gradient of `param` runs: the first
/// kernel of that name after it became due. The plan gives each kernel a share
/// of gradients of about its own size; `dWk` and `dWv` wait for the next
/// layer's `ffn_bwd_w2`, beside which nothing else is due yet. A gradient the
/// plan does not name runs beside the next kernel; one left at the end of the
/// pass runs alone. With QK-norm (`qk_norm`), `dWq` and `dWk` read what
/// `q_bwd` writes, so they become due after it and wait for the next layer's
/// `ffn_bwd_w2` too. The vectors' sums are small and run beside the next kernel.
pub fn planned_beside(param: Param, qk_norm: bool) -> Option<&'static str> {
    match param {
        Param::W2(_) => Some("ffn_bwd_w13"),
        Param::W1(_) => Some("wo_bwd"),
        Param::W3(_) => Some("attn_bwd"),
        Param::Wq(_) | Param::Wk(_) if qk_norm => Some("ffn_bwd_w2"),
        Param::Wo(_) | Param::Wq(_) => Some("q_bwd"),
        Param::Wk(_) | Param::Wv(_) => Some("ffn_bwd_w2"),
        _ => None,
    }
}

/// A gradient the backward has made computable, from the array `dy` (one per
/// sequence `b`) of `param`'s layer.
#[derive(Clone, Copy)]
pub enum DwJob {
    /// A matrix: `dW = sum_b dY_b X_b^T` with `X_b` the input `x` of the
    /// same sequence in `param`'s layer.
    Product { param: Param, dy: Dy, x: Input },
    /// A vector: `dw[r] = sum_b sum_t dY_b[r, t]` (a bias: its projection's
    /// output gradient; a QK-norm weight: its gradient per position).
    RowSum { param: Param, dy: Dy },
}

impl DwJob {
    pub fn param(&self) -> Param {
        match *self {
            DwJob::Product { param, .. } | DwJob::RowSum { param, .. } => param,
        }
    }

    pub fn dy(&self) -> Dy {
        match *self {
            DwJob::Product { dy, .. } | DwJob::RowSum { dy, .. } => dy,
        }
    }
}

/// The scheduler's state kept between passes (so that a pass allocates nothing).
#[derive(Default)]
pub struct DwSchedule {
    /// Whether the model has QK-norm (see [`planned_beside`]).
    qk_norm: bool,
    /// Due and not yet run, in the order they became due.
    pending: Vec<DwJob>,
    /// Those chosen to run now.
    now: Vec<DwJob>,
    /// [`PHASE`]: the time the step waited for the gradients, and their whole time.
    profile: Profile,
}

impl DwSchedule {
    /// A scheduler for a model with (or without) QK-norm.
    pub fn new(qk_norm: bool) -> DwSchedule {
        DwSchedule {
            qk_norm,
            ..DwSchedule::default()
        }
    }

    /// The time of the weight gradients since the last call (see [`Profile`]).
    pub fn take_profile(&mut self) -> Profile {
        std::mem::take(&mut self.profile)
    }

    /// Start a backward pass whose gradients read `dy` and `acts`
    /// (`[layer][sequence]`) and go to `grads`.
    pub fn pass<'s, 'g>(
        &'s mut self,
        dy: &'s mut DySources,
        acts: &'s [Vec<LayerActs>],
        grads: GradSink<'g>,
    ) -> DwPass<'s, 'g> {
        self.pending.clear();
        DwPass {
            schedule: self,
            dy,
            acts,
            grads,
        }
    }
}

/// One backward pass's weight gradients: those due, the arrays they read, and
/// the gradients they go to (which the layer code also writes, between kernels).
pub struct DwPass<'s, 'g> {
    schedule: &'s mut DwSchedule,
    dy: &'s mut DySources,
    acts: &'s [Vec<LayerActs>],
    pub grads: GradSink<'g>,
}

impl<'s, 'g> DwPass<'s, 'g> {
    /// `param`'s gradient can be computed from now on, from the array `dy`
    /// and the activation `x` of its layer (a job only if the pass computes
    /// it: with a frozen base, adapted projections alone, as their
    /// adapters' products).
    pub fn due(&mut self, param: Param, dy: Dy, x: Input) {
        if self.grads.computes(param) {
            self.schedule.pending.push(DwJob::Product { param, dy, x });
        }
    }

    /// `param`'s gradient, a sum over positions of the array `dy`, can be
    /// computed from now on (if the pass computes it: not with a frozen base).
    pub fn due_sum(&mut self, param: Param, dy: Dy) {
        if self.grads.computes(param) {
            self.schedule.pending.push(DwJob::RowSum { param, dy });
        }
    }

    /// Lend out array `which` for writing: first runs (and waits for) every
    /// pending gradient that reads it. Give it back with [`DwPass::put`].
    pub fn take(&mut self, which: Dy) -> Vec<Vec<f32>> {
        self.choose(|grad| grad.dy() == which);
        self.run_chosen();
        std::mem::take(self.dy.get_mut(which))
    }

    /// Give back an array lent out by [`DwPass::take`], now holding new values.
    pub fn put(&mut self, which: Dy, array: Vec<Vec<f32>>) {
        *self.dy.get_mut(which) = array;
    }

    /// Run `stage`, the backward stage that starts with the kernel `name`,
    /// beside the due gradients the plan puts there. The stage reads the
    /// arrays it is given and writes none of them.
    pub fn run(&mut self, name: &str, stage: impl FnOnce(&DySources) -> Result<()>) -> Result<()> {
        self.run_writing(name, [], |dy, []| stage(dy))
    }

    /// [`DwPass::run`] for a stage that also writes the arrays `writes`, which
    /// it is lent (see [`DwPass::take`]) in that order.
    pub fn run_writing<const N: usize>(
        &mut self,
        name: &str,
        writes: [Dy; N],
        stage: impl FnOnce(&DySources, &mut [Vec<Vec<f32>>; N]) -> Result<()>,
    ) -> Result<()> {
        debug_assert!(
            LAYER_KERNELS.iter().any(|decl| decl.name == name),
            "no kernel named {name}"
        );
        let mut written = writes.map(|which| self.take(which));
        let qk_norm = self.schedule.qk_norm;
        self.choose(|grad| {
            planned_beside(grad.param(), qk_norm).is_none_or(|planned| planned == name)
        });
        let DwPass {
            schedule,
            dy,
            acts,
            grads,
        } = self;
        let dy: &DySources = dy;
        let now = &schedule.now;
        let result = if now.is_empty() {
            stage(dy, &mut written)
        } else {
            overlapped(
                &mut schedule.profile,
                || stage(dy, &mut written),
                || run_all(now, grads, dy, acts),
            )
        };
        for (which, array) in writes.into_iter().zip(written) {
            self.put(which, array);
        }
        result
    }

    /// Run every gradient still due (the step waits for them) and end the
    /// pass: the gradients, and the arrays, free to read again.
    pub fn finish(mut self) -> (GradSink<'g>, &'s DySources) {
        self.choose(|_| true);
        self.run_chosen();
        (self.grads, self.dy)
    }

    /// Run the chosen gradients on this thread: the step waits for them.
    fn run_chosen(&mut self) {
        let DwPass {
            schedule,
            dy,
            acts,
            grads,
        } = self;
        let now = &schedule.now;
        if !now.is_empty() {
            schedule
                .profile
                .time(PHASE, || run_all(now, grads, dy, acts));
        }
    }

    /// Move the pending gradients that `run_now` picks, in due order, to `now`.
    fn choose(&mut self, mut run_now: impl FnMut(&DwJob) -> bool) {
        let DwSchedule { pending, now, .. } = &mut *self.schedule;
        now.clear();
        pending.retain(|grad| {
            let chosen = run_now(grad);
            if chosen {
                now.push(*grad);
            }
            !chosen
        });
    }
}

/// Compute `grads_due`, in order.
fn run_all(grads_due: &[DwJob], grads: &mut GradSink, dy: &DySources, acts: &[Vec<LayerActs>]) {
    for grad in grads_due {
        match *grad {
            DwJob::Product {
                param,
                dy: which,
                x,
            } => {
                let layer = param.layer().expect("a weight gradient of a layer");
                grads.weight_grad(param, dy.get(which), &acts[layer], x);
            }
            DwJob::RowSum { param, dy: which } => grads.row_sum(param, dy.get(which)),
        }
    }
}

/// Runs `kernel` on this thread (the backend belongs to it) while `dw`, the
/// weight gradients of a stage already done, runs on the rayon pool: the
/// products of `dW = dY X^T` are independent of the next backward-dx kernel,
/// and two products side by side use two cores better than one product split
/// over both (measured, `docs/performance.md`). The [`PHASE`] phase gets the
/// time the step waits for `dw` after the kernel; its whole time is also kept
/// as run side by side (see [`Profile`]). With one worker thread the two run
/// one after the other: the pool's only worker would be busy with `dw` while
/// the kernel waits for it to run its parallel loops.
fn overlapped(
    profile: &mut Profile,
    kernel: impl FnOnce() -> Result<()>,
    dw: impl FnOnce() + Send,
) -> Result<()> {
    if rayon::current_num_threads() < 2 {
        kernel()?;
        profile.time(PHASE, dw);
        return Ok(());
    }
    let mut dw_time = Duration::ZERO;
    let dw_time_ref = &mut dw_time;
    let mut kernel_done = Instant::now();
    let result = rayon::in_place_scope(|scope| {
        scope.spawn(move |_| {
            let start = Instant::now();
            dw();
            *dw_time_ref = start.elapsed();
        });
        let result = kernel();
        kernel_done = Instant::now();
        result
    });
    profile.add(PHASE, kernel_done);
    profile.add_side_by_side(PHASE, dw_time);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ModelConfig, Weights};
    use crate::train::grads::{GradTarget, GradWrite};

    #[test]
    fn the_plan_names_kernels_of_the_set() {
        let config = ModelConfig::preset("tiny").unwrap();
        let names = LAYER_KERNELS.map(|decl| decl.name).into_array();
        for qk_norm in [false, true] {
            for param in Weights::zeros(&config).layout.params() {
                if let Some(kernel) = planned_beside(param, qk_norm) {
                    assert!(names.contains(&kernel), "{}: {kernel}", param.name());
                }
            }
        }
    }

    /// A gradient planned beside a later kernel still sees the values it was
    /// declared with when its array is written first: the write waits for it.
    #[test]
    fn an_array_is_lent_out_only_after_the_gradients_that_read_it() {
        let config = ModelConfig {
            n_layers: 1,
            ..ModelConfig::preset("tiny").unwrap()
        };
        let seq = 4;
        let mut acts = vec![vec![LayerActs::new(&config, seq)]];
        acts[0][0].h1.fill(1.0);
        let mut dy = DySources::default();
        dy.resize(&config, 1, seq);
        dy.dx[0].fill(2.0);
        let mut grads = Weights::zeros(&config);
        let mut sums_of_squares = Vec::new();
        let mut schedule = DwSchedule::default();
        let target = GradTarget::Weights(&mut grads);
        let sink = GradSink::start(target, GradWrite::Add, seq, &mut sums_of_squares);
        let mut pass = schedule.pass(&mut dy, &acts, sink);
        // dW2 = dx h1^T (a saved input of W2's shape), planned beside
        // `ffn_bwd_w13`: not beside `wo_bwd`.
        pass.due(Param::W2(0), Dy::Dx, Input::Saved(|a| &a.h1));
        pass.run("wo_bwd", |_| Ok(())).unwrap();
        let mut dx = pass.take(Dy::Dx);
        dx[0].fill(0.0);
        pass.put(Dy::Dx, dx);
        pass.finish();
        assert_eq!(sums_of_squares.len(), 1);
        // Each entry sums 2 x 1 over the 4 positions.
        assert!(grads.get(Param::W2(0)).iter().all(|&value| value == 8.0));
        assert!(
            schedule
                .take_profile()
                .phases
                .iter()
                .any(|(phase, _)| phase == PHASE)
        );
    }
}
