//! Read-only memory maps of whole files: the one place besides
//! `backend/ane/ffi.rs` that allows `unsafe` (ARCHITECTURE.md, invariant 3).
//!
//! Owns opening a file and mapping it for reading. It does not parse anything:
//! the safetensors reader (`model::hf::tensors`) and the llama2.c reader
//! (`model::llama2c`, whose `Mapped` lets the decoder read f32 tensors in
//! place through a checked, safe cast) validate every offset they take from
//! the bytes handed out here.
//!
//! Caveat every caller inherits: a map shows the file as it is on disk, not a
//! copy. We never write a file we map, but another process may. If it
//! rewrites the bytes in place, reads see the new bytes; if it truncates the
//! file, touching the lost pages raises `SIGBUS` and the process dies. Tools
//! that replace model files (ours, `save_pretrained`, `huggingface-cli`) write
//! a new file and rename it over the old one, which leaves an existing map
//! intact, so this only bites when a file is edited in place while we read it.
#![allow(unsafe_code)]

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::{Error, Result};

/// A file mapped read-only for the lifetime of the value.
#[derive(Debug)]
pub struct MappedFile {
    path: PathBuf,
    map: Mmap,
}

impl MappedFile {
    /// Open `path` read-only and map all of it.
    pub fn open(path: &Path) -> Result<MappedFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: `Mmap::map` is unsafe because the mapped bytes may change, or
        // vanish on truncation, if the file is modified while mapped, which
        // would break the `&[u8]` contract of `bytes()`. The caller must
        // guarantee no process modifies the file while this value lives. We
        // never write files we map (this handle is read-only and the map is
        // immutable); other writers are the documented caveat in the module
        // docs: model files are replaced by rename, which keeps the mapped
        // inode intact.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Ok(MappedFile {
            path: path.to_path_buf(),
            map,
        })
    }

    /// The file's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The path it was opened from, for error messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_the_bytes_of_a_file_and_of_an_empty_one() {
        let dir = std::env::temp_dir().join(format!("anemone-mmap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bytes.bin");
        std::fs::write(&path, b"abc\x00\xff").unwrap();
        let map = MappedFile::open(&path).unwrap();
        assert_eq!(map.bytes(), b"abc\x00\xff");
        assert_eq!(map.path(), path);
        let empty = dir.join("empty.bin");
        std::fs::write(&empty, b"").unwrap();
        assert!(MappedFile::open(&empty).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let err =
            MappedFile::open(Path::new("/nonexistent-anemone/model.safetensors")).unwrap_err();
        assert!(
            err.to_string()
                .contains("/nonexistent-anemone/model.safetensors"),
            "{err}"
        );
    }
}
