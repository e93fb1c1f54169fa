//! Shared test helpers: fixture and scratch paths, the `anemone` binary, the
//! shared data directory and visible skips, `.npy` reading, one tolerance type.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `tests/fixtures/<area>`.
pub fn fixture(area: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(area)
}

/// A fresh, empty directory for one test: `<temp>/anemone-it-<pid>-<name>`
/// (tests run in parallel: give each its own `name`).
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("anemone-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// The `anemone` binary of this build.
pub fn anemone() -> Command {
    Command::new(env!("CARGO_BIN_EXE_anemone"))
}

/// Under `CI=true` (`.ci/run` sets it), where `../shared` is always present.
fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Prefix of the line [`skip`] prints; `.ci/run` counts these lines.
const SKIP_PREFIX: &str = "skipped: ";

/// Say, visibly, that the running test did not check what it is for: a line
/// `skipped: <test>: <why>` on the process's stderr, which the test harness
/// does not capture (a skipped test still reports `ok`; `.ci/run` counts the
/// lines and reports them as skips).
pub fn skip(why: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("unnamed");
    let line = format!("{SKIP_PREFIX}{test}: {why}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// The shared data directory: `$ANEMONE_SHARED_DATA`, else `../shared/data`
/// beside this checkout.
fn shared_dir() -> PathBuf {
    std::env::var_os("ANEMONE_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"))
}

/// A file of the shared data directory, or `None` after a visible [`skip`]
/// where it is absent. Under `CI=true` an absent file fails the test.
pub fn shared_data(name: &str) -> Option<PathBuf> {
    let path = shared_dir().join(name);
    if path.exists() {
        return Some(path);
    }
    let why = format!(
        "{} is absent (set ANEMONE_SHARED_DATA to the directory holding it)",
        path.display()
    );
    assert!(
        !on_ci(),
        "CI=true, where ../shared is always present: {why}"
    );
    skip(&why);
    None
}

fn npy(path: &Path) -> npyz::NpyFile<std::io::BufReader<std::fs::File>> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    npyz::NpyFile::new(std::io::BufReader::new(f)).unwrap()
}

pub fn read_npy_f32(path: &Path) -> Vec<f32> {
    npy(path).into_vec::<f32>().unwrap()
}

pub fn read_npy_f64(path: &Path) -> Vec<f64> {
    npy(path).into_vec::<f64>().unwrap()
}

pub fn read_npy_i32(path: &Path) -> Vec<i32> {
    npy(path).into_vec::<i32>().unwrap()
}

/// Float comparison: `|a - b| <= absolute + relative * max|b|` over the tensor
/// (the scale of a tensor, not of each element, so tiny entries of a large
/// tensor are judged against its magnitude).
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    pub relative: f64,
    pub absolute: f64,
}

impl Tolerance {
    pub fn assert_close(&self, got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let scale = want.iter().fold(0.0f64, |m, &w| m.max((w as f64).abs()));
        let limit = self.absolute + self.relative * scale;
        let (mut worst, mut at) = (0.0f64, 0);
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let err = (g as f64 - w as f64).abs();
            if err.is_nan() || err > worst {
                worst = err;
                at = i;
            }
        }
        assert!(
            worst <= limit,
            "{what}: max error {worst:.3e} at {at} (got {}, want {}) exceeds {limit:.3e} (scale {scale:.3e})",
            got[at],
            want[at]
        );
    }
}

/// The `anemone` binary run with its address space limited to `bytes` where
/// the shell can (`ulimit -v`, Unix): a command that would allocate more
/// fails instead of succeeding slowly. Elsewhere the plain binary.
pub fn anemone_within(bytes: u64) -> Command {
    if !cfg!(unix) {
        return anemone();
    }
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!("ulimit -v {}; exec \"$0\" \"$@\"", bytes / 1024))
        .arg(env!("CARGO_BIN_EXE_anemone"));
    command
}

/// Run `command`, which must fail with exit code 2 (the house style's error
/// exit) and an `error: ` line; returns its stderr.
pub fn fails(command: &mut Command) -> String {
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected exit code 2 from {command:?}\nstderr: {stderr}\nstdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr.contains("error: "), "{stderr}");
    stderr
}

/// Run `command`, which must succeed; returns its stderr.
pub fn succeeds(command: &mut Command) -> String {
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{command:?} failed\nstderr: {stderr}\nstdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// A one-layer model config (`model.json`, vocabulary 64, context 16) and a
/// token file of 4000 random ids for it (`tokens.bin`), in `dir`.
pub fn small_run_inputs(dir: &Path, seed: u64) -> (PathBuf, PathBuf) {
    let config = dir.join("model.json");
    std::fs::write(
        &config,
        r#"{"dim": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "head_dim": 8,
            "hidden_dim": 64, "vocab_size": 64, "seq_len": 16}"#,
    )
    .unwrap();
    let tokens = dir.join("tokens.bin");
    let mut rng = anemone::rng::Rng::new(seed);
    let ids: Vec<u32> = (0..4000).map(|_| rng.below(64) as u32).collect();
    let mut writer = anemone::data::tokens::TokenWriter::create(&tokens, 64).unwrap();
    writer.extend(&ids).unwrap();
    writer.finish().unwrap();
    (config, tokens)
}
