//! Atomic file writes: write a sibling temp file, flush it, rename it over the
//! target. A crash leaves either the old file or the new one, never a torn one.
//! Commands that write an output check first that it is none of their inputs
//! ([`refuse_input_as_output`]).
//!
//! A process killed while writing (`kill -9`, power loss) leaves its temp
//! file, `.<name>.<pid>.tmp`. Such files of processes that no longer run are
//! removed by the next write of the same target, and by [`remove_stale_temps`]
//! (a training run calls it on its directory when it starts). Whether a
//! process runs is read from `/proc/<pid>` on Linux and from `kill -0`
//! elsewhere on Unix; where neither answers, a temp file is kept.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Write `bytes` to `path` atomically (temp file in the same directory + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Stream into a temp file beside `path` with `fill`, then fsync and rename it
/// over `path`. For large files (checkpoints) that should not be built in memory.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a file path", path.display())))?;
    let tmp = temp_path(dir, &file_name.to_string_lossy());
    remove_stale_temps_of(dir, Some(&file_name.to_string_lossy()));
    let result = (|| {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
        fill(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Refuse to write `out` (given as `out_flag`) when it is one of the `inputs`
/// (each `(flag, path)`): the same file by another name included (symbolic
/// links, `./`), so a command never replaces what it is reading.
pub fn refuse_input_as_output(out_flag: &str, out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let Ok(out_real) = std::fs::canonicalize(out) else {
        return Ok(()); // a file that does not exist yet is no input
    };
    for (flag, input) in inputs {
        if std::fs::canonicalize(input).is_ok_and(|real| real == out_real) {
            return Err(Error::Invalid(format!(
                "{out_flag} {} is the {flag} file this command reads; refusing to overwrite \
                 it\nhint: write to another file",
                out.display()
            )));
        }
    }
    Ok(())
}

/// The temp file this process writes `dir/name` through: `.<name>.<pid>.tmp`.
pub fn temp_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.{}.tmp", std::process::id()))
}

/// The target name and pid of a temp file name `.<name>.<pid>.tmp`.
fn parse_temp_name(file_name: &str) -> Option<(&str, u32)> {
    let inner = file_name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (name, pid) = inner.rsplit_once('.')?;
    let pid = pid.parse().ok().filter(|_| !name.is_empty())?;
    Some((name, pid))
}

/// Whether process `pid` runs: `Some(false)` only when the OS says it does not.
pub fn process_alive(pid: u32) -> Option<bool> {
    if pid == std::process::id() {
        return Some(true);
    }
    let proc_dir = Path::new("/proc");
    if proc_dir.join("self").exists() {
        return Some(proc_dir.join(pid.to_string()).exists());
    }
    if cfg!(unix) {
        // `kill -0` fails for a process that does not exist (and for one we may
        // not signal, which then counts as alive).
        let out = std::process::Command::new("kill")
            .args(["-0", &pid.to_string()])
            .stderr(std::process::Stdio::piped())
            .output()
            .ok()?;
        let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
        return Some(out.status.success() || !stderr.contains("no such process"));
    }
    None
}

/// Remove the temp files in `dir` left by processes that no longer run;
/// returns the paths removed.
pub fn remove_stale_temps(dir: &Path) -> Vec<PathBuf> {
    remove_stale_temps_of(dir, None)
}

/// [`remove_stale_temps`], only for the target `name` when given.
fn remove_stale_temps_of(dir: &Path, name: Option<&str>) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some((target, pid)) = parse_temp_name(&file_name) else {
            continue;
        };
        if name.is_some_and(|n| n != target) || process_alive(pid) != Some(false) {
            continue;
        }
        if std::fs::remove_file(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_leaves_no_temp_file() {
        let dir = std::env::temp_dir().join(format!("anemone-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.bin");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "temp file left behind: {names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn temp_files_of_dead_processes_are_removed_and_live_ones_kept() {
        assert_eq!(
            parse_temp_name(".checkpoint.bin.123.tmp"),
            Some(("checkpoint.bin", 123))
        );
        assert_eq!(parse_temp_name(".x.tmp"), None);
        assert_eq!(parse_temp_name("checkpoint.bin"), None);
        if process_alive(u32::MAX - 1) != Some(false) {
            return; // no way to tell here
        }
        let dir = std::env::temp_dir().join(format!("anemone-stale-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dead = dir.join(format!(".out.bin.{}.tmp", u32::MAX - 1));
        let alive = temp_path(&dir, "other.bin");
        std::fs::write(&dead, b"torn").unwrap();
        std::fs::write(&alive, b"in progress").unwrap();
        write_atomic(&dir.join("out.bin"), b"new").unwrap();
        assert!(!dead.exists(), "the next write of out.bin removes it");
        assert!(alive.exists(), "a running process's temp file stays");
        std::fs::write(&dead, b"torn").unwrap();
        assert_eq!(remove_stale_temps(&dir), vec![dead.clone()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_directory_is_an_error_naming_the_path() {
        let err = write_atomic(Path::new("/nonexistent-dir-anemone/x.bin"), b"x").unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent-dir-anemone/x.bin"),
            "{err}"
        );
    }
}
