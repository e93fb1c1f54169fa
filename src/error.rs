//! The library's one error type. Variants name the op, file or field at fault;
//! messages are lowercase with no trailing period (house style).

use std::path::PathBuf;

/// Every fallible library call returns this.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// MIL text that does not parse. `line` and `col` are 1-based.
    #[error("line {line}, column {col}: {msg}")]
    Parse {
        line: usize,
        col: usize,
        msg: String,
    },

    /// A MIL operation whose operands do not fit the op (shape, dtype, missing
    /// parameter, unknown variable). Names the op kind, its `name` attribute and the operand.
    #[error("op `{op}` (name \"{name}\"): {msg}")]
    Op {
        op: String,
        name: String,
        msg: String,
    },

    /// A program that violates a structural or ANE rule (see `mil::verify`).
    #[error("{0}")]
    Verify(String),

    /// A CoreML weight blob that cannot be read or written.
    #[error("weight blob: {0}")]
    Blob(String),

    /// A file-format problem: names the file, the field and what is wrong.
    #[error("{}: {field}: {msg}", path.display())]
    Format {
        path: PathBuf,
        field: String,
        msg: String,
    },

    /// An I/O error on a named path. The OS error is part of the message and
    /// not a `source()`, so a printed chain (`{:#}`) says it once.
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    /// What `what` would allocate exceeds the memory this machine offers
    /// (`crate::memory`): refused before allocating.
    #[error("{what} needs {} of memory, more than the {} available{hint}", crate::memory::human(*needed), crate::memory::human(*available))]
    Memory {
        what: String,
        needed: u64,
        available: u64,
        /// Empty, or "\nhint: ..." naming the flag or field to change.
        hint: String,
    },

    /// A backend (CPU or ANE) failure at a named step ("compile", "load", "evaluate", ...).
    #[error("{backend} backend: {step}: {msg}")]
    Backend {
        backend: &'static str,
        step: &'static str,
        msg: String,
    },

    /// Invalid user-supplied configuration or argument, with what to do about it.
    #[error("{0}")]
    Invalid(String),
}

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Invalid`] for `given`, which is none of the `names` a
    /// `what` can have: "unknown precision `fp8` (expected one of fp32, fp16)".
    pub fn unknown_name(what: &str, given: &str, names: &[&str]) -> Self {
        Error::Invalid(format!(
            "unknown {what} `{given}` (expected one of {})",
            names.join(", ")
        ))
    }

    /// Shorthand for an [`Error::Io`] on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }

    /// An [`Error::Invalid`] for a numeric flag or field outside its range:
    /// "--lr 1e30 is out of range: expected a number in (0, 1]" (numbers in
    /// their `Debug` spelling, which writes 1e30 rather than thirty zeros).
    pub fn out_of_range(name: &str, value: impl std::fmt::Debug, allowed: &str) -> Self {
        Error::Invalid(format!(
            "{name} {value:?} is out of range: expected {allowed}"
        ))
    }

    /// Shorthand for an [`Error::Format`].
    pub fn format(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Format {
            path: path.into(),
            field: field.into(),
            msg: msg.into(),
        }
    }
}
