//! The checkpoint-and-`exec()` restart (ane-reference §6.3): when a training
//! process has spent its compile budget it saves a checkpoint and replaces
//! itself with `anemone train --resume <run dir> ...`, which continues exactly
//! (the trainer's resume restores weights, moments, data position and loss
//! scale). Unlike the reference, the program path comes from
//! `std::env::current_exe()`, not `argv[0]`, so a binary found through `PATH`
//! restarts too (§8.3 item 16). Saving the checkpoint is the caller's job, and
//! so is unloading every model before (dropping the backend: `exec()` runs no
//! destructors); [`exec_self`] removes the temp directory of any model still
//! loaded, and says so, so that none outlives the process.

use std::ffi::{OsStr, OsString};
use std::path::Path;

use crate::Error;

/// Options that name where a run starts; a resumed run takes them from its
/// directory, so they are dropped (each takes a value).
const START_OPTIONS: [&str; 4] = ["--resume", "--init", "--config", "--out"];

/// The arguments (without the program) of the process that resumes the run in
/// `run_dir`: `args` (the original `train ...` arguments) minus the options
/// that pick a starting point, plus `--resume <run_dir>`.
pub fn resume_args(args: &[OsString], run_dir: &Path) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len() + 2);
    let mut skip_value = false;
    for (i, arg) in args.iter().enumerate() {
        if skip_value {
            skip_value = false;
            continue;
        }
        let text = arg.to_string_lossy();
        if let Some(name) = START_OPTIONS.iter().find(|o| text.starts_with(*o)) {
            if text.len() == name.len() {
                skip_value = true;
                continue;
            }
            if text.as_bytes()[name.len()] == b'=' {
                continue;
            }
        }
        out.push(arg.clone());
        if i == 0 && text == "train" {
            out.push(OsString::from("--resume"));
            out.push(run_dir.as_os_str().to_owned());
        }
    }
    if !out.iter().any(|a| a == OsStr::new("--resume")) {
        out.push(OsString::from("--resume"));
        out.push(run_dir.as_os_str().to_owned());
    }
    out
}

/// Replace this process with the current executable run with `args`. Returns
/// only on failure. Models still loaded (the caller should have dropped its
/// backend) lose their temp directories first, with a warning.
pub fn exec_self(args: &[OsString]) -> Error {
    let leftover = super::files::live_model_dirs();
    if !leftover.is_empty() {
        eprintln!(
            "warning: {} ANE model(s) still loaded at exec(); removing their temp directories",
            leftover.len()
        );
        for dir in leftover {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return Error::io("current executable", e),
    };
    exec(&exe, args)
}

#[cfg(unix)]
fn exec(exe: &Path, args: &[OsString]) -> Error {
    use std::os::unix::process::CommandExt;
    let e = std::process::Command::new(exe).args(args).exec();
    Error::Backend {
        backend: "ane",
        step: "restart",
        msg: format!("exec {}: {e}", exe.display()),
    }
}

#[cfg(not(unix))]
fn exec(exe: &Path, _args: &[OsString]) -> Error {
    Error::Backend {
        backend: "ane",
        step: "restart",
        msg: format!("exec {}: not supported on this platform", exe.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn resume_args_replace_the_starting_point_and_keep_the_rest() {
        let args = strings(&[
            "train",
            "--config",
            "tiny",
            "--data",
            "tok.bin",
            "--out=runs/a",
            "--backend",
            "ane",
            "--init",
            "old.bin",
            "--steps",
            "500",
        ]);
        let got = resume_args(&args, Path::new("runs/a"));
        assert_eq!(
            got,
            strings(&[
                "train",
                "--resume",
                "runs/a",
                "--data",
                "tok.bin",
                "--backend",
                "ane",
                "--steps",
                "500"
            ])
        );
        // Resuming a resumed run keeps a single --resume.
        let again = resume_args(&got, Path::new("runs/a"));
        assert_eq!(again, got);
        // Not a `train` command line: --resume goes at the end.
        assert_eq!(
            resume_args(&strings(&["--steps", "3"]), Path::new("d")),
            strings(&["--steps", "3", "--resume", "d"])
        );
    }
}
