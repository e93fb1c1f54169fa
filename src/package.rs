//! A program package: what a backend compiles. MIL text plus a map from each
//! `@model_path/weights/<file>` path named by a BLOBFILE to that file's bytes.
//! This is exactly what the ANE's in-memory compiler receives, and exactly what
//! the CPU backend executes. On disk it is a directory with `model.mil` and
//! `weights/<file>`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::mil::verify::{Target, VerifyReport, verify_with_weights};
use crate::mil::{self, Program};
use crate::{Error, Result};

/// Prefix of every BLOBFILE path.
pub const MODEL_PATH_PREFIX: &str = "@model_path/";

/// MIL text plus the weight files it references.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ProgramPackage {
    /// UTF-8 MIL program text.
    pub mil: String,
    /// `@model_path/weights/<file>` -> complete blob file bytes.
    pub weights: BTreeMap<String, Vec<u8>>,
}

/// The BLOBFILE key for a weight file name: `w.bin` -> `@model_path/weights/w.bin`.
pub fn weight_key(file_name: &str) -> String {
    format!("{MODEL_PATH_PREFIX}weights/{file_name}")
}

impl ProgramPackage {
    /// Emit `program` and attach weight files given as (file name, bytes).
    pub fn from_program(
        program: &Program,
        weights: impl IntoIterator<Item = (String, Vec<u8>)>,
    ) -> Self {
        ProgramPackage {
            mil: mil::emit(program),
            weights: weights
                .into_iter()
                .map(|(name, bytes)| (weight_key(&name), bytes))
                .collect(),
        }
    }

    /// Parse the MIL text.
    pub fn program(&self) -> Result<Program> {
        mil::parse(&self.mil)
    }

    /// Parse the MIL text and verify it for `target` together with the weight
    /// files (each BLOBFILE names a file here whose record matches its type).
    pub fn verify(&self, target: Target) -> Result<VerifyReport> {
        Ok(verify_with_weights(&self.program()?, &self.weights, target))
    }

    /// The blob bytes for a BLOBFILE path, with an error naming the path if absent.
    pub fn weight(&self, path: &str) -> Result<&[u8]> {
        self.weights.get(path).map(Vec::as_slice).ok_or_else(|| {
            Error::Blob(format!(
                "BLOBFILE path `{path}` is not in the package (have: {:?})",
                self.weights.keys()
            ))
        })
    }

    /// Where a BLOBFILE path lives relative to a package directory.
    pub fn relative_path(key: &str) -> Result<PathBuf> {
        let rel = key.strip_prefix(MODEL_PATH_PREFIX).ok_or_else(|| {
            Error::Blob(format!(
                "BLOBFILE path `{key}` does not start with `{MODEL_PATH_PREFIX}`"
            ))
        })?;
        let rel = Path::new(rel);
        if rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(Error::Blob(format!(
                "BLOBFILE path `{key}` must stay inside the package directory"
            )));
        }
        Ok(rel.to_path_buf())
    }

    /// Write `model.mil` and `weights/...` into `dir` (created if needed).
    pub fn write_dir(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        crate::atomic::write_atomic(&dir.join("model.mil"), self.mil.as_bytes())?;
        for (key, bytes) in &self.weights {
            let path = dir.join(Self::relative_path(key)?);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            crate::atomic::write_atomic(&path, bytes)?;
        }
        Ok(())
    }

    /// Load a package from a directory holding `model.mil`, or from a `.mil` file
    /// whose BLOBFILEs resolve relative to the file's directory.
    pub fn read(path: &Path) -> Result<Self> {
        let (mil_path, dir) = if path.is_dir() {
            (path.join("model.mil"), path.to_path_buf())
        } else {
            (
                path.to_path_buf(),
                path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            )
        };
        let mil = crate::memory::read_text(&mil_path)?;
        let program =
            mil::parse(&mil).map_err(|e| Error::Invalid(format!("{}: {e}", mil_path.display())))?;
        let mut weights = BTreeMap::new();
        for (_, lit) in program.blob_refs() {
            let key = &lit.as_blob().expect("blob_refs returns blob literals").path;
            if weights.contains_key(key) {
                continue;
            }
            let file = dir.join(Self::relative_path(key)?);
            let bytes = crate::memory::read_file(&file, u64::MAX)?;
            weights.insert(key.clone(), bytes);
        }
        Ok(ProgramPackage { mil, weights })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_strip_the_prefix_and_refuse_escapes() {
        assert_eq!(
            ProgramPackage::relative_path("@model_path/weights/w.bin").unwrap(),
            PathBuf::from("weights/w.bin")
        );
        assert!(ProgramPackage::relative_path("weights/w.bin").is_err());
        assert!(ProgramPackage::relative_path("@model_path/../etc/passwd").is_err());
    }

    #[test]
    fn missing_weight_names_the_path() {
        let p = ProgramPackage::default();
        let err = p.weight("@model_path/weights/w.bin").unwrap_err();
        assert!(err.to_string().contains("@model_path/weights/w.bin"));
    }
}
