//! An opt-in profile of plan steps: wall time per step label (`op -> type`),
//! summed over every run while enabled. Off by default; when off, a run pays
//! one relaxed atomic load per plan, not per step.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TIMES: Mutex<Option<HashMap<String, (Duration, u64)>>> = Mutex::new(None);

/// Time of one step label over the profiled runs.
#[derive(Clone, Debug, PartialEq)]
pub struct OpTime {
    pub label: String,
    pub total: Duration,
    pub calls: u64,
}

/// Start (or stop) recording step times for every CPU plan in this process.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub(super) fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

pub(super) fn record(label: &str, elapsed: Duration) {
    let mut times = TIMES.lock().unwrap_or_else(|e| e.into_inner());
    let entry = times
        .get_or_insert_with(HashMap::new)
        .entry(label.to_string())
        .or_default();
    entry.0 += elapsed;
    entry.1 += 1;
}

/// The recorded times, longest first, and clear them.
pub fn take() -> Vec<OpTime> {
    let mut times = TIMES.lock().unwrap_or_else(|e| e.into_inner());
    let mut out: Vec<OpTime> = times
        .take()
        .unwrap_or_default()
        .into_iter()
        .map(|(label, (total, calls))| OpTime {
            label,
            total,
            calls,
        })
        .collect();
    out.sort_by(|a, b| b.total.cmp(&a.total).then_with(|| a.label.cmp(&b.label)));
    out
}
