//! The ANE compiler's per-process budget: about 119 compiles before it fails
//! (ane-reference §6.3, §8.1), counted here, with a configurable limit. The
//! backend reports it as its [`CompileLimit`](crate::backend::CompileLimit);
//! when a training process must checkpoint and `exec()` a fresh copy of itself
//! is decided from that in `backend::preferences`. This module only counts and
//! checks; `restart` builds the command and execs.

use std::sync::atomic::{AtomicUsize, Ordering};

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
    fn the_process_counter_only_grows() {
        let before = process_compiles();
        record_compile();
        assert!(process_compiles() > before);
    }
}
