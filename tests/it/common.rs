//! Shared test helpers: fixture paths, `.npy` reading, one tolerance type.

use std::path::{Path, PathBuf};

/// `tests/fixtures/<area>`.
pub fn fixture(area: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(area)
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
