//! What the in-memory compiler receives for one compiled model, as plain data:
//! the MIL bytes, the weights dictionary, and the temp directory pre-populated
//! with `model.mil` and `weights/...` (ane-reference §1.4, §1.5).
//!
//! The reference names that directory after the model's content-derived
//! `hexStringIdentifier`, so two identical kernels share one directory and
//! freeing one deletes the other's files (§8.3 item 15). Here every compiled
//! model is made unique: [`ModelFiles::new`] adds an instance tag to the MIL
//! `buildInfo` (so the identifier, and the directory, differ), and
//! [`ModelDir`] refuses a directory another live model of this process owns.
//! This module builds no Objective-C objects (see `ffi`) and runs nothing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::package::ProgramPackage;
use crate::{Error, Result};

/// The `buildInfo` key carrying the instance tag.
pub const INSTANCE_KEY: &str = "anemone-instance";

/// One entry of the weights dictionary:
/// `key -> { "offset": NSNumber(offset), "data": NSData(data) }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightEntry {
    /// The BLOBFILE path, `@model_path/weights/<file>`.
    pub key: String,
    /// Always 0: the MIL `offset = uint64(..)` addresses the data (§1.4).
    pub offset: i32,
    /// The whole blob file.
    pub data: Vec<u8>,
}

/// The MIL text and weights of one model instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelFiles {
    /// UTF-8 MIL text, tagged (what the descriptor's NSData holds).
    pub mil: String,
    /// Every weight file, in key order; empty (never absent) for weight-free kernels.
    pub weights: Vec<WeightEntry>,
}

static INSTANCES: AtomicU64 = AtomicU64::new(0);

/// A tag unique in this process and, with the pid, among live processes.
pub fn next_instance_tag() -> String {
    let n = INSTANCES.fetch_add(1, Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
}

/// Insert `{"anemone-instance", tag}` first in the `buildInfo` dictionary of
/// `mil`. Text without a `buildInfo` attribute is returned unchanged.
pub fn tag_mil(mil: &str, tag: &str) -> String {
    let Some(at) = mil.find("[buildInfo = ") else {
        return mil.to_string();
    };
    let Some(open) = mil[at..].find("({").map(|i| at + i + 2) else {
        return mil.to_string();
    };
    // Entries are quoted strings in both dialects (see `mil::emit`).
    let (k, v) = (format!("\"{INSTANCE_KEY}\""), format!("\"{tag}\""));
    let empty = mil[open..].starts_with('}');
    let sep = if empty { "" } else { ", " };
    format!("{}{{{k}, {v}}}{sep}{}", &mil[..open], &mil[open..])
}

impl ModelFiles {
    /// The files for one instance of `package`, tagged with `tag`.
    pub fn new(package: &ProgramPackage, tag: &str) -> ModelFiles {
        ModelFiles {
            mil: tag_mil(&package.mil, tag),
            weights: package
                .weights
                .iter()
                .map(|(key, data)| WeightEntry {
                    key: key.clone(),
                    offset: 0,
                    data: data.clone(),
                })
                .collect(),
        }
    }

    /// The package this instance compiles (tagged MIL, same weights): what a
    /// CPU stand-in must execute to run exactly what the ANE was given.
    pub fn package(&self) -> ProgramPackage {
        ProgramPackage {
            mil: self.mil.clone(),
            weights: self
                .weights
                .iter()
                .map(|w| (w.key.clone(), w.data.clone()))
                .collect(),
        }
    }

    /// `(path relative to the model directory, bytes)`: `model.mil` first,
    /// then `weights/<file>` for every key with `@model_path/` stripped.
    pub fn layout(&self) -> Result<Vec<(PathBuf, &[u8])>> {
        let mut files = vec![(PathBuf::from("model.mil"), self.mil.as_bytes())];
        for w in &self.weights {
            files.push((ProgramPackage::relative_path(&w.key)?, w.data.as_slice()));
        }
        Ok(files)
    }
}

/// Directories owned by live models of this process.
static LIVE_DIRS: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

fn live_dirs() -> std::sync::MutexGuard<'static, BTreeSet<PathBuf>> {
    LIVE_DIRS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The temp directories of the models of this process loaded now (all of
/// them should be gone before an `exec()` restart, see `restart`).
pub fn live_model_dirs() -> Vec<PathBuf> {
    live_dirs().iter().cloned().collect()
}

/// A model's temp directory, populated with its files and removed on drop.
#[derive(Debug)]
pub struct ModelDir {
    path: PathBuf,
}

impl ModelDir {
    /// Create `root/<name>/` with `files`' layout, as the reference does before
    /// compiling: `weights/` always (also for weight-free kernels), every file
    /// written in place. Nothing that exists is deleted first (a leftover of a
    /// dead process keeps its other files; the compiler may own some). Fails
    /// if another live model of this process owns that directory.
    pub fn create(root: &Path, name: &str, files: &ModelFiles) -> Result<ModelDir> {
        let err = |msg: String| Error::Backend {
            backend: "ane",
            step: "temp dir",
            msg,
        };
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(err(format!("bad model directory name {name:?}")));
        }
        let path = root.join(name);
        if !live_dirs().insert(path.clone()) {
            return Err(err(format!(
                "{} belongs to another loaded model (identical MIL and weights without an instance tag)",
                path.display()
            )));
        }
        let dir = ModelDir { path };
        let weights = dir.path.join("weights");
        std::fs::create_dir_all(&weights).map_err(|e| Error::io(&weights, e))?;
        for (rel, bytes) in files.layout()? {
            let file = dir.path.join(rel);
            let parent = file.parent().expect("files live inside the directory");
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            std::fs::write(&file, bytes).map_err(|e| Error::io(&file, e))?;
        }
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ModelDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        live_dirs().remove(&self.path);
    }
}

/// A content hash standing in for `hexStringIdentifier` where there is no ANE
/// (FNV-1a 64 over the MIL text and every weight key and file).
pub fn content_identifier(files: &ModelFiles) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(files.mil.as_bytes());
    for w in &files.weights {
        eat(w.key.as_bytes());
        eat(&w.data);
    }
    format!("{h:016X}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mil::{self, Builder, DType, Dialect, TensorType};

    fn package(dialect: Dialect) -> ProgramPackage {
        let mut b = Builder::new(dialect);
        let x = b.input("x", DType::Fp16, &[1, 4, 1, 8]);
        let w = b.blob_const(TensorType::new(DType::Fp16, [4, 4, 1, 1]), "w.bin", 64);
        let y = b.linear_conv1x1(&x, &w);
        b.output(&y);
        let program = b.finish();
        let mut blob = crate::blob::BlobWriter::new();
        blob.add_fp16(&[0.5; 16]);
        ProgramPackage::from_program(&program, [("w.bin".to_string(), blob.finish())])
    }

    #[test]
    fn weights_dictionary_is_keyed_by_blobfile_paths() {
        let p = package(Dialect::Ios18);
        let files = ModelFiles::new(&p, "7-0");
        assert_eq!(files.weights.len(), 1);
        let w = &files.weights[0];
        assert_eq!(w.key, "@model_path/weights/w.bin");
        assert!(
            files
                .mil
                .contains("BLOBFILE(path = string(\"@model_path/weights/w.bin\")")
        );
        assert_eq!(w.offset, 0);
        assert_eq!(w.data, p.weights["@model_path/weights/w.bin"]);
        // A blob file: 64-byte header, 64-byte record, 16 fp16 values.
        assert_eq!(w.data.len(), 64 + 64 + 32);
        // Weight-free: an empty dictionary, not an absent one.
        let free = ProgramPackage {
            mil: p.mil.clone(),
            weights: Default::default(),
        };
        assert_eq!(ModelFiles::new(&free, "t").weights, vec![]);
    }

    #[test]
    fn instance_tags_change_the_text_but_not_the_program() {
        for dialect in [Dialect::Ios18, Dialect::Ios16] {
            let p = package(dialect);
            let a = ModelFiles::new(&p, "1-0");
            let b = ModelFiles::new(&p, "1-1");
            assert_ne!(a.mil, b.mil);
            assert_ne!(content_identifier(&a), content_identifier(&b));
            assert!(a.mil.contains(INSTANCE_KEY), "{}", a.mil);
            // The tag is the first buildInfo entry; the rest is unchanged.
            assert_eq!(
                a.mil
                    .replace(&format!("{{\"{INSTANCE_KEY}\", \"1-0\"}}, "), ""),
                p.mil
            );
            let original = p.program().unwrap();
            assert_eq!(mil::parse(&a.mil).unwrap(), original, "{dialect:?}");
            assert_eq!(a.package().program().unwrap(), original);
        }
        assert_eq!(tag_mil("no header", "x"), "no header");
        assert_eq!(
            tag_mil("[buildInfo = dict<string, string>({})]", "x"),
            "[buildInfo = dict<string, string>({{\"anemone-instance\", \"x\"}})]"
        );
        assert_ne!(next_instance_tag(), next_instance_tag());
    }

    #[test]
    fn model_dirs_hold_the_layout_are_unique_and_removed_on_drop() {
        let root = std::env::temp_dir().join(format!("anemone-modeldir-{}", std::process::id()));
        let p = package(Dialect::Ios18);
        let files = ModelFiles::new(&p, &next_instance_tag());
        let rel: Vec<PathBuf> = files.layout().unwrap().into_iter().map(|f| f.0).collect();
        assert_eq!(
            rel,
            [PathBuf::from("model.mil"), PathBuf::from("weights/w.bin")]
        );
        let name = content_identifier(&files);
        let dir = ModelDir::create(&root, &name, &files).unwrap();
        assert_eq!(dir.path(), root.join(&name));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("model.mil")).unwrap(),
            files.mil
        );
        assert_eq!(
            std::fs::read(dir.path().join("weights/w.bin")).unwrap(),
            files.weights[0].data
        );
        // The prototype's bug: a second model in the same directory. Refused.
        let err = ModelDir::create(&root, &name, &files).unwrap_err();
        assert!(err.to_string().contains("temp dir"), "{err}");
        // A second instance of the same package gets its own directory.
        let other = ModelFiles::new(&p, &next_instance_tag());
        let dir2 = ModelDir::create(&root, &content_identifier(&other), &other).unwrap();
        assert_ne!(dir.path(), dir2.path());
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(!path.exists());
        assert!(
            dir2.path().join("model.mil").exists(),
            "the other model keeps its files"
        );
        // Once released, the name can be used again (e.g. a stale leftover),
        // whose files are overwritten in place, never deleted first.
        std::fs::create_dir_all(path.join("junk")).unwrap();
        std::fs::write(path.join("model.mil"), "stale").unwrap();
        let again = ModelDir::create(&root, &name, &files).unwrap();
        assert!(again.path().join("junk").exists());
        assert_eq!(
            std::fs::read_to_string(again.path().join("model.mil")).unwrap(),
            files.mil
        );
        // weights/ exists for a weight-free kernel too.
        let free = ModelFiles {
            mil: files.mil.clone(),
            weights: Vec::new(),
        };
        let free_dir = ModelDir::create(&root, "weight-free", &free).unwrap();
        assert!(free_dir.path().join("weights").is_dir());
        assert!(live_model_dirs().contains(&free_dir.path().to_path_buf()));
        drop(free_dir);
        assert!(ModelDir::create(&root, "../x", &files).is_err());
        drop((again, dir2));
        let _ = std::fs::remove_dir_all(&root);
    }
}
