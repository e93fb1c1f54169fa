//! The memory this machine offers, checked before every allocation whose
//! size comes from input (a model file's shape, a flag, a program's tensor
//! types), and file reads bounded by it, so a hostile or corrupt input is an
//! error that says how much it would need, never an abort halfway through
//! allocating.
//!
//! How much is available: `ANEMONE_MEMORY_LIMIT` when set (bytes, or a number
//! with a `K`, `M`, `G` or `T` suffix: `512M`), else `MemAvailable` of
//! `/proc/meminfo` on Linux, else a fixed [`FALLBACK_BYTES`] (16 GiB) on
//! systems without `/proc` (macOS): there the check still stops absurd sizes,
//! and the variable sets the real figure.
//!
//! Sizes here are saturating (`u64::MAX` when a product overflows), never
//! wrapping: a size too large to represent is refused like any other too large.
//! This module does not decide what an allocation is for; callers name it.

use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// Environment variable that sets the memory budget (overrides the OS figure).
pub const LIMIT_ENV: &str = "ANEMONE_MEMORY_LIMIT";

/// The budget where the OS does not say (no `/proc/meminfo`).
pub const FALLBACK_BYTES: u64 = 16 << 30;

/// Files that are not regular files (`/dev/zero`, pipes) are read up to this
/// many bytes at most, whatever their kind allows.
pub const STREAM_LIMIT: u64 = 64 << 20;

/// Files that are text or JSON (MIL programs, configs, `tokenizer.json`) are
/// refused beyond this size before reading.
pub const TEXT_FILE_LIMIT: u64 = 1 << 30;

/// Bytes of memory this process may use for one large allocation.
pub fn available() -> u64 {
    if let Some(limit) = std::env::var(LIMIT_ENV).ok().and_then(|v| parse_size(&v)) {
        return limit;
    }
    meminfo_available().unwrap_or(FALLBACK_BYTES)
}

/// `MemAvailable` from `/proc/meminfo`, in bytes.
fn meminfo_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// `"512M"` -> 536870912; plain numbers are bytes.
fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last()? {
        (i, 'K' | 'k') => (&text[..i], 10),
        (i, 'M' | 'm') => (&text[..i], 20),
        (i, 'G' | 'g') => (&text[..i], 30),
        (i, 'T' | 't') => (&text[..i], 40),
        _ => (text, 0),
    };
    digits.trim().parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// The product of `factors`, saturating at `u64::MAX` (which [`check`] refuses).
pub fn size(factors: &[usize]) -> u64 {
    factors
        .iter()
        .fold(1u64, |acc, &f| acc.saturating_mul(f as u64))
}

/// Refuse to allocate `needed` bytes for `what` when they exceed [`available`].
/// `hint` names the flag or field that sets the size (empty for none).
pub fn check(what: &str, needed: u64, hint: &str) -> Result<()> {
    let available = available();
    if needed <= available {
        return Ok(());
    }
    Err(Error::Memory {
        what: what.to_string(),
        needed,
        available,
        hint: if hint.is_empty() {
            String::new()
        } else {
            format!("\nhint: {hint}")
        },
    })
}

/// `1536` -> `"1.5 KB"`; decimal units, as disks and `free -h --si` print them.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["bytes", "KB", "MB", "GB", "TB", "PB", "EB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Read the whole of `path`, refusing files larger than `limit` bytes or than
/// the memory available, before reading them. Files that are not regular
/// files (`/dev/zero`, pipes) have no size to check: at most `limit` bytes
/// (and at most [`STREAM_LIMIT`]) are read, and more is an error.
pub fn read_file(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let io = |e| Error::io(path, e);
    let file = std::fs::File::open(path).map_err(io)?;
    let metadata = file.metadata().map_err(io)?;
    if metadata.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: is a directory, not a file",
            path.display()
        )));
    }
    let regular = metadata.is_file();
    if regular {
        let len = metadata.len();
        if len > limit {
            return Err(Error::format(
                path,
                "size",
                format!(
                    "{} is more than the {} this kind of file may have",
                    human(len),
                    human(limit)
                ),
            ));
        }
        check(&format!("reading {}", path.display()), len, "")?;
    }
    let limit = if regular {
        limit
    } else {
        limit.min(STREAM_LIMIT)
    };
    let mut bytes = Vec::with_capacity(if regular { metadata.len() as usize } else { 0 });
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(Error::format(
            path,
            "size",
            format!(
                "not a regular file, and it gave more than {} (the most this kind of file may have)",
                human(limit)
            ),
        ));
    }
    Ok(bytes)
}

/// [`read_file`] of a UTF-8 text file (at most [`TEXT_FILE_LIMIT`] bytes).
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = read_file(path, TEXT_FILE_LIMIT)?;
    String::from_utf8(bytes).map_err(|e| {
        Error::format(
            path,
            "text",
            format!("not valid UTF-8 at byte {}", e.utf8_error().valid_up_to()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes_and_products_saturate() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("3g"), Some(3 << 30));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(size(&[1 << 40, 1 << 40]), u64::MAX);
        assert_eq!(size(&[3, 4]), 12);
        assert_eq!(human(640_000_000_000), "640.0 GB");
        assert_eq!(human(12), "12 bytes");
    }

    #[test]
    fn a_huge_request_is_refused_with_the_size() {
        let err = check("the KV cache", u64::MAX, "lower --max-tokens").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("the KV cache needs 18.4 EB of memory"),
            "{msg}"
        );
        assert!(msg.ends_with("\nhint: lower --max-tokens"), "{msg}");
    }

    #[test]
    fn reads_of_endless_files_stop_at_the_limit() {
        let path = Path::new("/dev/zero");
        if !path.exists() {
            return;
        }
        let msg = read_file(path, 1 << 16).unwrap_err().to_string();
        assert!(
            msg.contains("/dev/zero") && msg.contains("65.5 KB"),
            "{msg}"
        );
    }
}
