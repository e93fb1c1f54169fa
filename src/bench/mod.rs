//! Benchmark suites and the harness they share: warm-up then timed repetitions
//! ([`time_ms`]), order statistics of the samples ([`Stats`]: median, min/max,
//! quartiles), throughput ([`gflops`]), aligned text tables ([`Row`],
//! [`table`]) and a JSON report written atomically ([`Report`]).
//!
//! - [`train_step`]: whole training steps with a per-phase breakdown.
//! - [`ane`]: the ANE micro-benchmarks (peak, dispatch, SRAM sweep, conv vs
//!   matmul, INT8 vs FP16), written against the [`Backend`](crate::backend::Backend)
//!   trait so they also run (and are tested) on the CPU backend.
//!
//! Timing convention: every repetition is timed on its own with a monotonic
//! clock and reported as the median with its spread, never the mean alone;
//! one slow repetition (another process, a page fault) moves the max, not the
//! headline. Throughput is `FLOPs / median time`.
//!
//! This module deliberately does not choose devices, parse arguments or print:
//! the CLI (`anemone bench ...`) does. It holds no timed assertions anywhere.

pub mod ane;
pub mod train_step;

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How many untimed warm-up runs precede how many timed repetitions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repeat {
    pub warmup: usize,
    pub reps: usize,
}

impl Repeat {
    pub const fn new(warmup: usize, reps: usize) -> Repeat {
        Repeat { warmup, reps }
    }
}

/// Order statistics of a set of timings, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Number of timed repetitions.
    pub samples: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    /// First and third quartiles (linear interpolation between order statistics).
    pub q1_ms: f64,
    pub q3_ms: f64,
}

impl Stats {
    /// Statistics of `samples_ms`. Panics on an empty slice or a NaN (programmer errors).
    pub fn from_ms(samples_ms: &[f64]) -> Stats {
        assert!(!samples_ms.is_empty(), "Stats::from_ms: no samples");
        let mut sorted = samples_ms.to_vec();
        sorted.sort_by(|a, b| a.partial_cmp(b).expect("timings are not NaN"));
        Stats {
            samples: sorted.len(),
            median_ms: quantile(&sorted, 0.5),
            min_ms: sorted[0],
            max_ms: sorted[sorted.len() - 1],
            q1_ms: quantile(&sorted, 0.25),
            q3_ms: quantile(&sorted, 0.75),
        }
    }

    /// Interquartile range `q3 - q1`.
    pub fn iqr_ms(&self) -> f64 {
        self.q3_ms - self.q1_ms
    }

    /// `min..max` as text with `digits` decimals, in milliseconds.
    pub fn spread(&self, digits: usize) -> String {
        format!("{:.digits$}..{:.digits$}", self.min_ms, self.max_ms)
    }
}

/// The `q`-quantile (0..=1) of ascending `sorted` values, interpolating linearly
/// between the two nearest order statistics (NumPy's default). Panics if empty.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    assert!(!sorted.is_empty(), "quantile of no values");
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Run `f` `repeat.warmup` times untimed, then `repeat.reps` times (at least
/// once) timed one by one; the statistics of the timed runs.
pub fn time_ms(repeat: Repeat, mut f: impl FnMut() -> Result<()>) -> Result<Stats> {
    for _ in 0..repeat.warmup {
        f()?;
    }
    let mut samples = Vec::with_capacity(repeat.reps.max(1));
    for _ in 0..repeat.reps.max(1) {
        let start = Instant::now();
        f()?;
        samples.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(Stats::from_ms(&samples))
}

/// Throughput in GFLOP/s of `flops` done in `ms` milliseconds.
pub fn gflops(flops: f64, ms: f64) -> f64 {
    flops / (ms * 1e6)
}

/// Bytes as MiB (2^20), the unit of the reference's weight-size columns.
pub fn mib(bytes: f64) -> f64 {
    bytes / (1u64 << 20) as f64
}

/// A result row that prints as a line of an aligned table.
pub trait Row {
    /// Column headers, one per cell.
    fn columns() -> &'static [&'static str];
    /// The row's cells as text, in column order.
    fn cells(&self) -> Vec<String>;
}

/// `rows` as an aligned text table: headers, a rule, one line per row. The
/// first column is left-aligned, the rest (numbers) right-aligned.
pub fn table<R: Row>(rows: &[R]) -> String {
    let headers = R::columns();
    let cells: Vec<Vec<String>> = rows.iter().map(Row::cells).collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &cells {
        assert_eq!(
            row.len(),
            headers.len(),
            "row width differs from the header"
        );
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |items: &[String]| -> String {
        let parts: Vec<String> = items
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (s, &w))| {
                if i == 0 {
                    format!("{s:<w$}")
                } else {
                    format!("{s:>w$}")
                }
            })
            .collect();
        parts.join("  ").trim_end().to_string() + "\n"
    };
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    let mut out = line(&header);
    let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
    out += &line(&rule);
    for row in &cells {
        out += &line(row);
    }
    out
}

/// One suite's results with the conditions they were measured under; the JSON
/// written by `--json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report<R> {
    /// Suite name as on the command line (`ane-peak`, ...).
    pub suite: String,
    /// Backend name (`cpu`, `ane`).
    pub backend: String,
    pub repeat: Repeat,
    /// Worker threads available to the backend (rayon's pool).
    pub threads: usize,
    /// anemone version that measured it.
    pub version: String,
    pub rows: Vec<R>,
}

impl<R: Row + Serialize> Report<R> {
    pub fn new(suite: &str, backend: &str, repeat: Repeat, rows: Vec<R>) -> Report<R> {
        Report {
            suite: suite.to_string(),
            backend: backend.to_string(),
            repeat,
            threads: rayon::current_num_threads(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            rows,
        }
    }

    /// The rows as an aligned table.
    pub fn table(&self) -> String {
        table(&self.rows)
    }

    /// The report as a JSON value (for combining suites into one file).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("benchmark rows serialize")
    }
}

/// Write `value` as pretty JSON to `path` atomically.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Invalid(format!("{}: cannot serialize: {e}", path.display())))?;
    text.push('\n');
    crate::atomic::write_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_quartiles_of_an_odd_sample() {
        let s = Stats::from_ms(&[5.0, 1.0, 4.0, 2.0, 3.0]);
        assert_eq!(s.samples, 5);
        assert_eq!((s.median_ms, s.min_ms, s.max_ms), (3.0, 1.0, 5.0));
        assert_eq!((s.q1_ms, s.q3_ms, s.iqr_ms()), (2.0, 4.0, 2.0));
        assert_eq!(s.spread(1), "1.0..5.0");
    }

    #[test]
    fn median_of_an_even_sample_interpolates() {
        // numpy.percentile([10, 1, 3, 7], [25, 50, 75]) = [2.5, 5.0, 7.75]
        let s = Stats::from_ms(&[10.0, 1.0, 3.0, 7.0]);
        assert_eq!(s.median_ms, 5.0);
        assert_eq!((s.q1_ms, s.q3_ms), (2.5, 7.75));
        assert_eq!((s.min_ms, s.max_ms), (1.0, 10.0));
    }

    #[test]
    fn one_outlier_moves_the_max_not_the_median() {
        let s = Stats::from_ms(&[2.0, 2.0, 2.0, 2.0, 1000.0]);
        assert_eq!(s.median_ms, 2.0);
        assert_eq!(s.max_ms, 1000.0);
        assert_eq!(s.iqr_ms(), 0.0);
    }

    #[test]
    fn single_sample_is_every_statistic() {
        let s = Stats::from_ms(&[0.25]);
        assert_eq!(
            (s.median_ms, s.min_ms, s.max_ms, s.q1_ms, s.q3_ms),
            (0.25, 0.25, 0.25, 0.25, 0.25)
        );
    }

    #[test]
    fn quantile_endpoints() {
        let v = [1.0, 2.0, 4.0];
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert_eq!(quantile(&v, 1.0), 4.0);
        assert_eq!(quantile(&v, 0.75), 3.0);
    }

    #[test]
    fn time_ms_runs_warmup_plus_reps_and_propagates_errors() {
        let mut calls = 0;
        let s = time_ms(Repeat::new(2, 3), || {
            calls += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!((calls, s.samples), (5, 3));
        assert!(s.min_ms >= 0.0 && s.min_ms <= s.median_ms && s.median_ms <= s.max_ms);
        let err = time_ms(Repeat::new(0, 3), || Err(Error::Invalid("boom".into())));
        assert!(err.unwrap_err().to_string().contains("boom"));
    }

    #[test]
    fn gflops_and_mib() {
        // 2 * 512 * 512 * 64 FLOPs in 1 ms = 33.554432 GFLOP/s.
        assert!((gflops(2.0 * 512.0 * 512.0 * 64.0, 1.0) - 33.554432).abs() < 1e-12);
        assert_eq!(mib((512 * 512 * 2) as f64), 0.5);
    }

    struct Demo(&'static str, f64);
    impl Row for Demo {
        fn columns() -> &'static [&'static str] {
            &["name", "value"]
        }
        fn cells(&self) -> Vec<String> {
            vec![self.0.to_string(), format!("{:.1}", self.1)]
        }
    }

    #[test]
    fn tables_align_columns() {
        let text = table(&[Demo("a", 1.0), Demo("longer", 123.4)]);
        assert_eq!(
            text,
            "name    value\n------  -----\na         1.0\nlonger  123.4\n"
        );
    }
}
