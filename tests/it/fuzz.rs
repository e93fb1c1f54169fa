//! The fuzz targets' regression corpus (`tests/fixtures/fuzz/<target>/`):
//! every input a fuzzer found crashing, plus a small minimized corpus per
//! target, replayed through the same target functions (`fuzz/targets.rs`) in
//! this test build, where arithmetic overflow panics. Docs and counts:
//! `docs/robustness.md`.

#[path = "../../fuzz/targets.rs"]
mod targets;

use crate::common::fixture;

#[test]
fn the_regression_corpus_of_every_fuzz_target_runs_without_a_panic() {
    let root = fixture("fuzz");
    let mut replayed = 0;
    for (name, target) in targets::TARGETS {
        let dir = root.join(name);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (every target keeps a corpus)", dir.display()))
            .map(|entry| entry.unwrap().path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "{}: no inputs", dir.display());
        for input in inputs {
            let bytes = std::fs::read(&input).unwrap();
            let outcome = std::panic::catch_unwind(|| target(&bytes));
            assert!(outcome.is_ok(), "{name}: {} panics", input.display());
            replayed += 1;
        }
    }
    assert!(replayed >= targets::TARGETS.len());
}
