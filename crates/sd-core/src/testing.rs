//! Helpers for comparing sd-rs outputs with PyTorch references (used by the test suites, and
//! by anyone checking a port of their own).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::weights::WeightFiles;

/// `tests/fixtures` of the sd-rs workspace (found from this crate's manifest directory).
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Every tensor of a safetensors file, in f32 on the CPU.
pub fn load_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let files = WeightFiles::open(&[path.to_path_buf()])?;
    let mut out = HashMap::new();
    let names: Vec<String> = files.names().map(str::to_owned).collect();
    for n in names {
        let t = files.load(&n, DType::F32, &Device::Cpu)?;
        out.insert(n, t);
    }
    Ok(out)
}

/// Largest absolute difference, and largest `|a - e| / (atol + rtol * |e|)` ratio (≤ 1 passes).
pub fn compare(actual: &Tensor, expected: &Tensor, atol: f64, rtol: f64) -> Result<(f64, f64)> {
    if actual.dims() != expected.dims() {
        return Err(Error::invalid_argument(
            "actual",
            format!("shape {:?}", actual.dims()),
            format!("shape {:?}", expected.dims()),
        ));
    }
    let a: Vec<f64> = actual.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let e: Vec<f64> = expected.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let mut max_abs = 0f64;
    let mut worst = 0f64;
    for (x, y) in a.iter().zip(&e) {
        let d = (x - y).abs();
        if d.is_nan() {
            return Ok((f64::NAN, f64::INFINITY));
        }
        max_abs = max_abs.max(d);
        worst = worst.max(d / (atol + rtol * y.abs()));
    }
    Ok((max_abs, worst))
}

/// Panics with a readable message unless every element satisfies
/// `|actual - expected| <= atol + rtol * |expected|` (NaN always fails).
#[track_caller]
pub fn assert_close(actual: &Tensor, expected: &Tensor, atol: f64, rtol: f64, what: &str) {
    match compare(actual, expected, atol, rtol) {
        Ok((max_abs, worst)) => assert!(
            worst <= 1.0,
            "{what}: max abs diff {max_abs:e} exceeds atol {atol:e} + rtol {rtol:e} * |expected| \
             (worst ratio {worst:.2})"
        ),
        Err(e) => panic!("{what}: {e}"),
    }
}
