//! What a backend prefers of the code that drives it, as data
//! ([`Preferences`], from [`Backend::preferences`](super::Backend::preferences)):
//! how kernels should take their weights ([`WeightMode`]) and whether the device
//! limits compiles per process ([`CompileLimit`]); and the decision a training
//! run draws from them, when to checkpoint and restart ([`CompilePlan`]).
//!
//! Callers ask the backend instead of comparing its name. This module knows
//! no device: the ANE backend fills in its limit, the CPU backend has none.

use crate::{Error, Result};

/// Where kernel weights come from (one choice per kernel build).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightMode {
    /// BLOBFILE constants and 1x1 convs: frozen weights, inference; changing
    /// the weights means recompiling.
    Baked,
    /// Appended along the spatial axis of the kernel's single input (the
    /// ANE's dynamic-weight trick: compile once, one input and one output).
    Packed,
    /// One function input per tensor (cheapest on the CPU backend).
    Inputs,
}

/// What a backend prefers of the code that builds and runs its kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preferences {
    /// How the training kernels should take their weights.
    pub weight_mode: WeightMode,
    /// The device's compiles per process, where it limits them.
    pub compile_limit: Option<CompileLimit>,
}

impl Default for Preferences {
    /// A backend without device constraints: weights as inputs, compiles free.
    fn default() -> Self {
        Preferences {
            weight_mode: WeightMode::Inputs,
            compile_limit: None,
        }
    }
}

/// A limit on compiles per process (the ANE compiler fails after ~119).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompileLimit {
    /// The most compiles one process may do.
    pub limit: usize,
    /// Compiles this process has done so far.
    pub used: usize,
    /// How a user raises the limit (for error messages).
    pub raised_by: &'static str,
}

/// How many compiles a training run needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompilePlan {
    /// Compiles before the first update (every kernel once).
    pub at_start: usize,
    /// Compiles after every update (Baked kernels whose weights changed).
    pub per_update: usize,
}

/// What a training process should do about its compile limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartDecision {
    /// The limit is never reached (kernels compile once).
    Never,
    /// Run this many updates, then checkpoint and `exec()` a resuming process.
    After(u64),
}

impl CompilePlan {
    /// `kernels` compiled at start, of which `weight_kernels` hold weights.
    /// Packed and Inputs kernels are compiled once per process; Baked kernels
    /// are recompiled whenever their weights change.
    pub fn new(mode: WeightMode, kernels: usize, weight_kernels: usize) -> CompilePlan {
        CompilePlan {
            at_start: kernels,
            per_update: match mode {
                WeightMode::Baked => weight_kernels,
                WeightMode::Packed | WeightMode::Inputs => 0,
            },
        }
    }

    /// When a process under `limit` must restart. Errors when even a fresh
    /// process could not run one update.
    pub fn decide(&self, limit: CompileLimit) -> Result<RestartDecision> {
        let needed = self.at_start + self.per_update;
        if needed > limit.limit {
            return Err(Error::Invalid(format!(
                "one update needs {needed} compiles but the backend allows {} per process \
                 (raise {})",
                limit.limit, limit.raised_by
            )));
        }
        if self.per_update == 0 {
            return Ok(if limit.used + self.at_start <= limit.limit {
                RestartDecision::Never
            } else {
                RestartDecision::After(0)
            });
        }
        let left = limit.limit.saturating_sub(limit.used + self.at_start);
        Ok(RestartDecision::After((left / self.per_update) as u64))
    }
}

impl Preferences {
    /// Updates a training process may run before it must checkpoint and
    /// `exec()` a resuming copy of itself, for kernels compiled as `plan`
    /// says: `None` when its compiles never run out.
    pub fn updates_before_restart(&self, plan: CompilePlan) -> Result<Option<u64>> {
        let Some(limit) = self.compile_limit else {
            return Ok(None);
        };
        Ok(match plan.decide(limit)? {
            RestartDecision::Never => None,
            RestartDecision::After(n) => Some(n),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(limit: usize, used: usize) -> CompileLimit {
        CompileLimit {
            limit,
            used,
            raised_by: "THE_VARIABLE",
        }
    }

    #[test]
    fn packed_and_inputs_kernels_compile_once_and_never_restart() {
        for mode in [WeightMode::Packed, WeightMode::Inputs] {
            let plan = CompilePlan::new(mode, 9, 7);
            assert_eq!(
                plan,
                CompilePlan {
                    at_start: 9,
                    per_update: 0
                }
            );
            assert_eq!(plan.decide(limit(100, 0)).unwrap(), RestartDecision::Never);
            assert_eq!(plan.decide(limit(100, 91)).unwrap(), RestartDecision::Never);
            // A process that already spent its budget (e.g. after a doctor run) restarts first.
            assert_eq!(
                plan.decide(limit(100, 92)).unwrap(),
                RestartDecision::After(0)
            );
        }
    }

    #[test]
    fn baked_kernels_restart_when_the_next_recompile_would_exceed_the_budget() {
        // 9 kernels, 8 with weights (attn_bwd has none): 100 - 9 = 91 left,
        // 91 / 8 = 11 updates (88 recompiles, 97 compiles in all; a 12th needs 105).
        let plan = CompilePlan::new(WeightMode::Baked, 9, 8);
        assert_eq!(
            plan.decide(limit(100, 0)).unwrap(),
            RestartDecision::After(11)
        );
        assert_eq!(
            plan.decide(limit(100, 20)).unwrap(),
            RestartDecision::After(8)
        );
        assert_eq!(
            plan.decide(limit(100, 99)).unwrap(),
            RestartDecision::After(0)
        );
        // The reference's static pipeline: restart when compile_count + needed > MAX.
        assert_eq!(
            plan.decide(limit(17, 0)).unwrap(),
            RestartDecision::After(1)
        );
        // A budget too small for a single update cannot be fixed by restarting.
        let e = plan.decide(limit(16, 0)).unwrap_err().to_string();
        assert!(
            e.contains("17 compiles") && e.contains("THE_VARIABLE"),
            "{e}"
        );
    }

    #[test]
    fn only_a_limited_backend_ever_restarts() {
        let plan = CompilePlan::new(WeightMode::Baked, 9, 8);
        let free = Preferences::default();
        assert_eq!(free.updates_before_restart(plan).unwrap(), None);
        let limited = Preferences {
            weight_mode: WeightMode::Baked,
            compile_limit: Some(limit(100, 0)),
        };
        assert_eq!(limited.updates_before_restart(plan).unwrap(), Some(11));
        let packed = CompilePlan::new(WeightMode::Packed, 9, 8);
        assert_eq!(limited.updates_before_restart(packed).unwrap(), None);
    }
}
