//! The ANE compiler's per-process budget: about 119 compiles before it fails
//! (ane-reference §6.3, §8.1), counted here, with a configurable limit and the
//! decision of when a training process must checkpoint and `exec()` a fresh
//! copy of itself. Packed and Inputs kernels are compiled once per process;
//! Baked kernels are recompiled whenever their weights change. This module
//! only counts and decides; `restart` builds the command and execs.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::model::kernels::{self, WeightMode};
use crate::{Error, Result};

/// Compiles per process after which the reference saw the compiler fail.
pub const OBSERVED_COMPILE_LIMIT: usize = 119;
/// The default budget: the reference's margin below the observed limit.
pub const DEFAULT_COMPILE_BUDGET: usize = 100;
/// Environment variable overriding the budget.
pub const BUDGET_ENV: &str = "ANEMONE_ANE_COMPILE_BUDGET";

static PROCESS_COMPILES: AtomicUsize = AtomicUsize::new(0);

/// Successful ANE compiles in this process so far.
pub fn process_compiles() -> usize {
    PROCESS_COMPILES.load(Ordering::Relaxed)
}

/// Count one successful compile.
pub fn record_compile() {
    PROCESS_COMPILES.fetch_add(1, Ordering::Relaxed);
}

/// The most compiles one process may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompileBudget {
    pub limit: usize,
}

impl Default for CompileBudget {
    fn default() -> Self {
        CompileBudget {
            limit: DEFAULT_COMPILE_BUDGET,
        }
    }
}

impl CompileBudget {
    /// The budget from `value` (the [`BUDGET_ENV`] variable), or the default.
    pub fn parse(value: Option<&str>) -> Result<CompileBudget> {
        match value {
            None => Ok(CompileBudget::default()),
            Some(v) => match v.trim().parse::<usize>() {
                Ok(limit) if limit > 0 => Ok(CompileBudget { limit }),
                _ => Err(Error::Invalid(format!(
                    "{BUDGET_ENV}={v:?}: expected a positive number of compiles (default {DEFAULT_COMPILE_BUDGET}, observed limit ~{OBSERVED_COMPILE_LIMIT})"
                ))),
            },
        }
    }

    /// The budget from the environment.
    pub fn from_env() -> Result<CompileBudget> {
        Self::parse(std::env::var(BUDGET_ENV).ok().as_deref())
    }

    /// Refuse `needed` more compiles when `used` have been done.
    pub fn check(&self, used: usize, needed: usize) -> Result<()> {
        if used + needed > self.limit {
            return Err(Error::Backend {
                backend: "ane",
                step: "compile budget",
                msg: format!(
                    "{used} compiles done in this process and {needed} more needed exceed the budget of {} \
                     (the compiler fails after ~{OBSERVED_COMPILE_LIMIT}); checkpoint and restart the process, \
                     or raise {BUDGET_ENV}",
                    self.limit
                ),
            });
        }
        Ok(())
    }
}

/// How many compiles a training run needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompilePlan {
    /// Compiles before the first update (every kernel once).
    pub at_start: usize,
    /// Compiles after every update (Baked kernels whose weights changed).
    pub per_update: usize,
}

/// What a training process should do about its compile budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartDecision {
    /// The budget never runs out (kernels compile once).
    Never,
    /// Run this many updates, then checkpoint and `exec()` a resuming process.
    After(u64),
}

impl CompilePlan {
    /// `kernels` compiled at start, of which `weight_kernels` hold weights.
    pub fn new(mode: WeightMode, kernels: usize, weight_kernels: usize) -> CompilePlan {
        CompilePlan {
            at_start: kernels,
            per_update: match mode {
                WeightMode::Baked => weight_kernels,
                WeightMode::Packed | WeightMode::Inputs => 0,
            },
        }
    }

    /// The plan of a training run: the layer's kernel set
    /// ([`kernels::kernel_counts`]) in weight mode `mode`.
    pub fn for_layer_kernels(mode: WeightMode) -> CompilePlan {
        let counts = kernels::kernel_counts();
        CompilePlan::new(mode, counts.kernels, counts.reading_weights)
    }

    /// When a process that has done `used` compiles must restart. Errors when
    /// even a fresh process could not run one update.
    pub fn decide(&self, budget: CompileBudget, used: usize) -> Result<RestartDecision> {
        budget.check(0, self.at_start + self.per_update)?;
        if self.per_update == 0 {
            return Ok(if used + self.at_start <= budget.limit {
                RestartDecision::Never
            } else {
                RestartDecision::After(0)
            });
        }
        let left = budget.limit.saturating_sub(used + self.at_start);
        Ok(RestartDecision::After((left / self.per_update) as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_parses_checks_and_names_the_variable() {
        assert_eq!(CompileBudget::parse(None).unwrap().limit, 100);
        assert_eq!(CompileBudget::parse(Some(" 40 ")).unwrap().limit, 40);
        for bad in ["0", "-3", "many"] {
            let e = CompileBudget::parse(Some(bad)).unwrap_err().to_string();
            assert!(e.contains(BUDGET_ENV), "{e}");
        }
        let b = CompileBudget { limit: 10 };
        assert!(b.check(1, 9).is_ok());
        let e = b.check(2, 9).unwrap_err().to_string();
        assert!(
            e.starts_with("ane backend: compile budget: 2 compiles"),
            "{e}"
        );
    }

    #[test]
    fn packed_and_inputs_kernels_compile_once_and_never_restart() {
        let budget = CompileBudget::default();
        for mode in [WeightMode::Packed, WeightMode::Inputs] {
            let plan = CompilePlan::new(mode, 9, 7);
            assert_eq!(CompilePlan::for_layer_kernels(mode), plan);
            assert_eq!(
                plan,
                CompilePlan {
                    at_start: 9,
                    per_update: 0
                }
            );
            assert_eq!(plan.decide(budget, 0).unwrap(), RestartDecision::Never);
            assert_eq!(plan.decide(budget, 91).unwrap(), RestartDecision::Never);
            // A process that already spent its budget (e.g. after a doctor run) restarts first.
            assert_eq!(plan.decide(budget, 92).unwrap(), RestartDecision::After(0));
        }
    }

    #[test]
    fn baked_kernels_restart_when_the_next_recompile_would_exceed_the_budget() {
        // 9 kernels, 8 with weights (attn_bwd has none): 100 - 9 = 91 left,
        // 91 / 8 = 11 updates (88 recompiles, 97 compiles in all; a 12th needs 105).
        let plan = CompilePlan::new(WeightMode::Baked, 9, 8);
        assert_eq!(CompilePlan::for_layer_kernels(WeightMode::Baked), plan);
        let budget = CompileBudget::default();
        assert_eq!(plan.decide(budget, 0).unwrap(), RestartDecision::After(11));
        assert_eq!(plan.decide(budget, 20).unwrap(), RestartDecision::After(8));
        assert_eq!(plan.decide(budget, 99).unwrap(), RestartDecision::After(0));
        // The reference's static pipeline: restart when compile_count + needed > MAX.
        let tiny = CompileBudget { limit: 17 };
        assert_eq!(plan.decide(tiny, 0).unwrap(), RestartDecision::After(1));
        // A budget too small for a single update cannot be fixed by restarting.
        assert!(plan.decide(CompileBudget { limit: 16 }, 0).is_err());
    }

    #[test]
    fn the_process_counter_only_grows() {
        let before = process_compiles();
        record_compile();
        assert!(process_compiles() > before);
    }
}
