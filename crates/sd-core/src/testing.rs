//! Helpers for comparing sd-rs outputs with PyTorch references (used by the test suites, and
//! by anyone checking a port of their own).

use std::alloc::{GlobalAlloc, Layout, System};
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

/// The number of cases each property test runs: `PROPTEST_CASES` when set (the longer runs of
/// docs/reliability.md), otherwise `ci_default` (bounded so that CI stays within seconds).
pub fn proptest_cases(ci_default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ci_default)
}

/// The seed property tests use in CI: fixed, so that a CI failure reproduces, unless
/// `PROPTEST_CASES` or `PROPTEST_RNG_SEED` is set (a longer run then explores new cases with a
/// random seed, or the given one).
pub fn proptest_fixed_seed() -> Option<u64> {
    let set = |k: &str| std::env::var_os(k).is_some();
    (!set("PROPTEST_CASES") && !set("PROPTEST_RNG_SEED")).then_some(0x5d_2016)
}

/// A global allocator for test binaries that records the largest single allocation made by
/// each thread, so that a property test can check that no input makes a loader allocate in
/// proportion to a number it read (instead of to the input's size):
///
/// ```ignore
/// #[global_allocator]
/// static ALLOC: sd_core::testing::TrackingAllocator = sd_core::testing::TrackingAllocator;
/// sd_core::testing::take_largest_allocation(); // reset
/// // ... load something ...
/// assert!(sd_core::testing::take_largest_allocation() <= bound);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct TrackingAllocator;

thread_local! {
    static LARGEST_ALLOCATION: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn note_allocation(size: usize) {
    let _ = LARGEST_ALLOCATION.try_with(|m| {
        if size > m.get() {
            m.set(size)
        }
    });
}

/// The largest single allocation (bytes) this thread made since the previous call, resetting
/// it (0 unless the binary uses [`TrackingAllocator`]).
pub fn take_largest_allocation() -> usize {
    LARGEST_ALLOCATION.try_with(|m| m.replace(0)).unwrap_or(0)
}

// SAFETY: every method forwards to the system allocator with the caller's arguments; the
// bookkeeping only touches a thread-local `Cell<usize>` (const-initialised, no destructor), so
// it never allocates or re-enters the allocator.
unsafe impl GlobalAlloc for TrackingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation(layout.size());
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation(layout.size());
        // SAFETY: as `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation(new_size);
        // SAFETY: `ptr` came from `System` with `layout`; the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Values a config property test substitutes for a field: wrong types, zero, negative, huge and
/// fractional numbers, empty and nested lists, objects (see [`edit_json`]).
pub fn odd_json_values() -> Vec<serde_json::Value> {
    use serde_json::json;
    vec![
        json!(null),
        json!(true),
        json!(false),
        json!(0),
        json!(1),
        json!(2),
        json!(3),
        json!(-1),
        json!(7),
        json!(65),
        json!(0.5),
        json!(1e308),
        json!(-1e308),
        json!(100_000_000),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(""),
        json!("linear"),
        json!("x"),
        json!([]),
        json!([0]),
        json!([1, 2]),
        json!([u64::MAX]),
        json!([[1]]),
        json!(["a", "b"]),
        json!({}),
        json!({"a": 1}),
    ]
}

/// `base` (a JSON object) with each `(key, value)` edit applied: `Some(v)` sets the key, `None`
/// removes it (the field then takes its default).
pub fn edit_json(
    base: &serde_json::Value,
    edits: &[(String, Option<serde_json::Value>)],
) -> serde_json::Value {
    let mut v = base.clone();
    if let Some(obj) = v.as_object_mut() {
        for (key, value) in edits {
            match value {
                Some(x) => {
                    obj.insert(key.clone(), x.clone());
                }
                None => {
                    obj.remove(key);
                }
            }
        }
    }
    v
}
