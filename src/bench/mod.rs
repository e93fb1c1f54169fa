//! Benchmark suites: measured, printed as tables, written as JSON. Never
//! called from tests with timing assertions.

pub mod train_step;
