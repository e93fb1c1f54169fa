//! A run directory's bookkeeping: the lock that keeps a second writer out
//! ([`RunLock`]), the check before a new run takes a directory
//! ([`prepare_new`]), and the record in `config.json` of everything needed to
//! continue the run ([`RunRecord`]: its [`TrainConfig`], the data order, the
//! token files with their checksums, where the weights came from).
//!
//! The lock is an OS advisory lock (`File::try_lock`) on `RUN_DIR/.lock`: the
//! OS drops it when the process ends, however it ends, so a lock file left by
//! a killed process does not block the next run. The file holds the holder's
//! pid while it runs and is emptied when the lock is released, so a pid
//! found in a lock that could be taken is a stale lock of a dead process
//! (reported, then taken over).
//!
//! Not here: which options conflict with a record (`train::resume`), the
//! training itself.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::TrainConfig;
use crate::data::tokens::{Order, TokenFile};
use crate::{Error, Result};

/// The lock file of a run directory.
pub const LOCK_FILE: &str = ".lock";
/// The run's record (a superset of its [`TrainConfig`]).
pub const CONFIG_FILE: &str = "config.json";
/// The files a run writes; `--overwrite` removes these and nothing else
/// (`adapters`, a LoRA run's, once its two files are gone and it is empty).
/// The last six are what a run keeps of a Hugging Face base model
/// (`model::hf::files`).
pub const RUN_FILES: [&str; 19] = [
    CONFIG_FILE,
    "metrics.jsonl",
    "checkpoint.bin",
    "lora_checkpoint.bin",
    "base.json",
    "adapters/adapter_config.json",
    "adapters/adapter_model.safetensors",
    "adapters",
    "tokenizer.bin",
    "corpus.txt",
    "tokens.bin",
    "tokens.val.bin",
    "plot.png",
    "hf_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// The exclusive right to write a run directory, held until dropped.
#[derive(Debug)]
pub struct RunLock {
    file: File,
}

impl RunLock {
    /// Lock `dir` (created if needed). Fails at once when another process
    /// holds it, naming that process. Returns the lock and, when the lock
    /// file held the pid of a process that died holding it, that pid.
    pub fn acquire(dir: &Path) -> Result<(RunLock, Option<u32>)> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(LOCK_FILE);
        let io = |e| Error::io(&path, e);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder: Option<u32> = holder.trim().parse().ok();
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(Error::Invalid(format!(
                    "{} is in use by another training ({}holds {})\nhint: wait for it to \
                     finish, or train into another --out",
                    dir.display(),
                    holder.map_or(String::new(), |pid| format!("process {pid} ")),
                    path.display()
                )));
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        write!(file, "{}", std::process::id()).map_err(io)?;
        file.flush().map_err(io)?;
        Ok((RunLock { file }, holder))
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Empty means "released cleanly"; closing the file unlocks it.
        let _ = self.file.set_len(0);
    }
}

/// Make `dir` ready for a new run: it must hold nothing (but its lock and
/// stale temp files) unless `overwrite`, which removes the [`RUN_FILES`] there.
/// Returns the files removed.
pub fn prepare_new(dir: &Path, overwrite: bool) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut present: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name != LOCK_FILE && !(name.starts_with('.') && name.ends_with(".tmp")))
        .collect();
    present.sort();
    if present.is_empty() {
        return Ok(Vec::new());
    }
    if !overwrite {
        let what = if present.iter().any(|n| n == CONFIG_FILE) {
            "already holds a run"
        } else {
            "is not empty"
        };
        return Err(Error::Invalid(format!(
            "{} {what} ({}); refusing to replace it\nhint: continue it with --resume {}, \
             replace it with --overwrite, or choose another --out",
            dir.display(),
            present.join(", "),
            dir.display()
        )));
    }
    let mut removed = Vec::new();
    for name in RUN_FILES {
        let path = dir.join(name);
        if path.is_file() {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            removed.push(path);
        } else if path.is_dir() && std::fs::remove_dir(&path).is_ok() {
            removed.push(path);
        }
    }
    Ok(removed)
}

/// A token file as a run records it: where it was, how many ids, their CRC-32.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFile {
    /// Absolute path when the run started.
    pub path: PathBuf,
    pub tokens: u64,
    /// CRC-32 of the ids' bytes, 8 hex digits.
    pub crc32: String,
}

impl DataFile {
    /// The record of an opened token file.
    pub fn of(file: &TokenFile) -> Result<DataFile> {
        Ok(DataFile {
            path: std::path::absolute(file.path()).unwrap_or_else(|_| file.path().to_path_buf()),
            tokens: file.len() as u64,
            crc32: format!("{:08x}", file.checksum()?),
        })
    }

    /// Whether `file` holds the same tokens.
    pub fn matches(&self, file: &TokenFile) -> Result<bool> {
        Ok(self.tokens == file.len() as u64 && *self == DataFile::of(file)?.with_path(&self.path))
    }

    fn with_path(mut self, path: &Path) -> DataFile {
        self.path = path.to_path_buf();
        self
    }
}

fn random_order() -> Order {
    Order::Random
}

/// A run's `config.json`: its [`TrainConfig`] (the fields at the top level,
/// so a reader of `TrainConfig` reads it too) and what the job needs to
/// continue it. Fields absent from older runs take their old meaning.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    #[serde(flatten)]
    pub config: TrainConfig,
    /// How windows are drawn from `data`.
    #[serde(default = "random_order")]
    pub data_order: Order,
    /// The training token file (`None` in runs from before it was recorded).
    #[serde(default)]
    pub data: Option<DataFile>,
    /// The held-out token file, when one was given.
    #[serde(default)]
    pub val_data: Option<DataFile>,
    /// The held-out fraction of `data`, when no `val_data` was given.
    #[serde(default)]
    pub val_fraction: Option<f64>,
    /// The weights the run started from (`--init`), if not a fresh init.
    #[serde(default)]
    pub init: Option<PathBuf>,
    /// The main job (built-in corpus, samples at the end).
    #[serde(default)]
    pub main_job: bool,
    /// The main job's built-in corpus size in MB.
    #[serde(default)]
    pub corpus_mb: Option<f64>,
    /// Fine-tuning examples (JSONL), instead of token files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sft: Option<super::finetune::SftRecord>,
}

impl RunRecord {
    /// Read `dir/config.json`, validated.
    pub fn read(dir: &Path) -> Result<RunRecord> {
        let path = dir.join(CONFIG_FILE);
        if !path.is_file() {
            return Err(Error::Invalid(format!(
                "{} has no {CONFIG_FILE}: it is not a run directory (is --resume the \
                 directory `anemone train` wrote?)",
                dir.display()
            )));
        }
        let text = crate::memory::read_text(&path)?;
        let record: RunRecord = serde_json::from_str(&text).map_err(|e| {
            Error::format(
                &path,
                format!("line {} column {}", e.line(), e.column()),
                e.to_string(),
            )
        })?;
        record
            .config
            .validate()
            .map_err(|e| Error::format(&path, "config", e.to_string()))?;
        Ok(record)
    }

    /// Write `dir/config.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| Error::Invalid(e.to_string()))?;
        crate::atomic::write_atomic(&dir.join(CONFIG_FILE), &json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overwrite_removes_what_a_run_keeps_of_a_hugging_face_base() {
        use crate::model::hf::files::{BASE_CONFIG, BASE_FILES};
        for name in BASE_FILES.into_iter().chain([BASE_CONFIG]) {
            assert!(RUN_FILES.contains(&name), "{name}");
        }
    }

    fn dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("anemone-rundir-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_second_lock_fails_at_once_and_a_released_one_is_taken() {
        let dir = dir("lock");
        let (first, stale) = RunLock::acquire(&dir).unwrap();
        assert_eq!(stale, None);
        let msg = RunLock::acquire(&dir).unwrap_err().to_string();
        assert!(
            msg.contains("in use by another training")
                && msg.contains(&format!("process {}", std::process::id())),
            "{msg}"
        );
        drop(first);
        let (_again, stale) = RunLock::acquire(&dir).unwrap();
        assert_eq!(stale, None, "a cleanly released lock is not stale");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_lock_file_of_a_dead_process_is_reported_and_taken_over() {
        let dir = dir("stale");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(LOCK_FILE), "4000000").unwrap();
        let (_lock, stale) = RunLock::acquire(&dir).unwrap();
        assert_eq!(stale, Some(4_000_000));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_new_run_refuses_a_used_directory_unless_told_to_overwrite() {
        let dir = dir("new");
        std::fs::create_dir_all(&dir).unwrap();
        assert!(prepare_new(&dir, false).unwrap().is_empty());
        std::fs::write(dir.join(CONFIG_FILE), "{}").unwrap();
        std::fs::write(dir.join("notes.txt"), "mine").unwrap();
        let msg = prepare_new(&dir, false).unwrap_err().to_string();
        assert!(
            msg.contains("already holds a run") && msg.contains("--overwrite"),
            "{msg}"
        );
        assert_eq!(
            prepare_new(&dir, true).unwrap(),
            vec![dir.join(CONFIG_FILE)]
        );
        assert!(dir.join("notes.txt").exists(), "only a run's files go");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
