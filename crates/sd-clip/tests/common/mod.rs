//! Shared helpers of the sd-clip integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sd_core::testing::fixtures_dir;
use sd_core::WeightFiles;

/// `tests/fixtures/models/<family>/<component>`.
pub fn model_dir(family: &str, component: &str) -> PathBuf {
    fixtures_dir().join("models").join(family).join(component)
}

/// A reference file under `tests/fixtures/refs`.
pub fn refs(name: &str) -> WeightFiles {
    let p = fixtures_dir().join("refs").join(name);
    WeightFiles::open(&[p]).expect("reference file readable")
}

pub fn get(refs: &WeightFiles, name: &str, dtype: DType) -> Tensor {
    refs.load(name, dtype, &Device::Cpu)
        .unwrap_or_else(|e| panic!("reference `{name}`: {e}"))
}

/// A copy of a fixture folder without the named files (in a temporary directory).
pub fn copy_without(src: &Path, skip: &[&str]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    for e in std::fs::read_dir(src).expect("fixture folder") {
        let e = e.expect("dir entry");
        let name = e.file_name().to_string_lossy().into_owned();
        if !skip.contains(&name.as_str()) {
            std::fs::copy(e.path(), tmp.path().join(&name)).expect("copy");
        }
    }
    tmp
}
