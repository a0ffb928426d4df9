//! Property tests of safetensors loading (issue 16): well-formed files round-trip exactly, and
//! truncated files, wrong header sizes, wrong or overlapping offsets, absurd shapes, unknown
//! dtypes and random bytes give an `Err` with a message, never a panic, and never an allocation
//! out of proportion to the file's size. `PROPTEST_CASES` sets the number of cases (see
//! docs/reliability.md).

use std::path::PathBuf;

use candle_core::{DType, Device};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError};
use sd_core::testing::{
    proptest_cases, proptest_fixed_seed, take_largest_allocation, TrackingAllocator,
};
use sd_core::weights::WeightFiles;
use sd_core::VarBuilder;

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator;

const DTYPES: &[(&str, usize)] = &[
    ("F32", 4),
    ("F16", 2),
    ("BF16", 2),
    ("F64", 8),
    ("I64", 8),
    ("U32", 4),
    ("U8", 1),
    ("I8", 1),
    ("I32", 4),
    ("BOOL", 1),
    ("F8_E4M3", 1),
    ("U64", 8),
];

#[derive(Debug, Clone)]
struct Spec {
    name: String,
    dtype: usize,
    shape: Vec<u64>,
}

/// How a well-formed file is damaged.
#[derive(Debug, Clone)]
enum Damage {
    None,
    /// Keep this fraction (per mille) of the bytes.
    Truncate(u32),
    /// Replace the 8-byte header size.
    HeaderLen(u64),
    /// Replace one tensor's start or end offset.
    Offset {
        tensor: usize,
        end: bool,
        value: u64,
    },
    /// Give one tensor the offsets of another (overlapping ranges).
    Overlap {
        a: usize,
        b: usize,
    },
    /// Replace one tensor's shape.
    Shape {
        tensor: usize,
        shape: Vec<u64>,
    },
    /// Replace one tensor's dtype string.
    Dtype {
        tensor: usize,
        dtype: String,
    },
    /// Overwrite one header byte.
    Byte {
        at: u32,
        value: u8,
    },
}

fn interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0),
        Just(u64::MAX),
        Just(u64::MAX - 7),
        Just(1 << 63),
        Just(1 << 40),
        0..4096u64,
        any::<u64>(),
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        "[a-z]{1,5}(\\.[a-z0-9]{1,3}){0,2}",
        0..DTYPES.len(),
        prop::collection::vec(0..5u64, 0..4),
    )
        .prop_map(|(name, dtype, shape)| Spec { name, dtype, shape })
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        Just(Damage::None),
        (0..1000u32).prop_map(Damage::Truncate),
        interesting_u64().prop_map(Damage::HeaderLen),
        (0..4usize, any::<bool>(), interesting_u64())
            .prop_map(|(tensor, end, value)| Damage::Offset { tensor, end, value }),
        (0..4usize, 0..4usize).prop_map(|(a, b)| Damage::Overlap { a, b }),
        (0..4usize, prop::collection::vec(interesting_u64(), 0..4))
            .prop_map(|(tensor, shape)| Damage::Shape { tensor, shape }),
        (0..4usize, "[A-Z0-9_]{0,8}").prop_map(|(tensor, dtype)| Damage::Dtype { tensor, dtype }),
        (any::<u32>(), any::<u8>()).prop_map(|(at, value)| Damage::Byte { at, value }),
    ]
}

/// A safetensors file of `specs` (duplicate names dropped) with `damage` applied, and the f32
/// values written for each F32 tensor when the file is intact.
fn build(specs: &[Spec], damage: &Damage, seed: u8) -> (Vec<u8>, Vec<(String, Vec<f32>)>) {
    let mut seen = std::collections::HashSet::new();
    let specs: Vec<&Spec> = specs.iter().filter(|s| seen.insert(&s.name)).collect();
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    let mut f32s = Vec::new();
    let mut offsets = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let (dtype, size) = DTYPES[s.dtype];
        let n: u64 = s.shape.iter().product();
        let start = data.len() as u64;
        let mut values = Vec::new();
        for k in 0..n as usize * size {
            data.push(seed.wrapping_add((i * 31 + k * 7) as u8));
        }
        if dtype == "F32" {
            for c in data[start as usize..].chunks_exact(4) {
                values.push(f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            }
            f32s.push((s.name.clone(), values));
        }
        offsets.push((start, data.len() as u64));
        header.insert(
            s.name.clone(),
            serde_json::json!({"dtype": dtype, "shape": s.shape, "data_offsets": [start, data.len() as u64]}),
        );
    }
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    let pick = |i: usize| names.get(i % names.len().max(1)).cloned();
    match damage {
        Damage::Offset { tensor, end, value } => {
            if let Some(n) = pick(*tensor) {
                header[&n]["data_offsets"][usize::from(*end)] = (*value).into();
            }
        }
        Damage::Overlap { a, b } => {
            if let (Some(na), Some(nb)) = (pick(*a), pick(*b)) {
                let o = header[&nb]["data_offsets"].clone();
                header[&na]["data_offsets"] = o;
            }
        }
        Damage::Shape { tensor, shape } => {
            if let Some(n) = pick(*tensor) {
                header[&n]["shape"] = serde_json::json!(shape);
            }
        }
        Damage::Dtype { tensor, dtype } => {
            if let Some(n) = pick(*tensor) {
                header[&n]["dtype"] = dtype.clone().into();
            }
        }
        _ => {}
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&h);
    bytes.extend_from_slice(&data);
    match damage {
        Damage::Truncate(keep) => bytes.truncate(bytes.len() * *keep as usize / 1000),
        Damage::HeaderLen(v) => bytes[..8].copy_from_slice(&v.to_le_bytes()),
        Damage::Byte { at, value } => {
            let end = 8 + h.len();
            let i = 8 + *at as usize % (end - 8);
            bytes[i] = *value;
        }
        _ => {}
    }
    (bytes, f32s)
}

fn write(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("model.safetensors");
    std::fs::write(&p, bytes).expect("write");
    (dir, p)
}

/// Opens and reads everything the way the models do; panics propagate to proptest.
fn exercise(bytes: &[u8]) -> Result<Option<WeightFiles>, TestCaseError> {
    let (_dir, p) = write(bytes);
    take_largest_allocation();
    let files = match WeightFiles::open(std::slice::from_ref(&p)) {
        Ok(f) => f,
        Err(e) => {
            let msg = e.to_string();
            prop_assert!(
                msg.contains("model.safetensors"),
                "error names the file: {msg}"
            );
            prop_assert!(msg.len() > 30, "a message that explains: {msg}");
            check_allocations(bytes.len())?;
            return Ok(None);
        }
    };
    let names: Vec<String> = files.names().map(str::to_owned).collect();
    for n in &names {
        let shape = files.shape(n).expect("listed").to_vec();
        for dtype in [DType::F32, DType::F16] {
            match files.load(n, dtype, &Device::Cpu) {
                Ok(t) => {
                    prop_assert_eq!(t.dims(), &shape[..]);
                    prop_assert!(t.elem_count() <= bytes.len(), "no more elements than bytes");
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }
    let vb = VarBuilder::from_paths(std::slice::from_ref(&p), DType::F32, &Device::Cpu)
        .expect("opened once already");
    for n in &names {
        let shape = files.shape(n).expect("listed").to_vec();
        let _ = vb.get(shape, n);
        let _ = vb.get(vec![3usize, 1], &format!("{n}.other"));
    }
    if let Err(e) = vb.finish() {
        prop_assert!(e.to_string().contains("model.safetensors"));
    }
    check_allocations(bytes.len())?;
    Ok(Some(files))
}

/// No single allocation beyond a small multiple of the file (f16 -> f32 conversion doubles a
/// tensor; the header is parsed twice) plus a fixed allowance.
fn check_allocations(file_len: usize) -> Result<(), TestCaseError> {
    let largest = take_largest_allocation();
    let bound = 8 * file_len + (1 << 20);
    prop_assert!(
        largest <= bound,
        "allocated {largest} bytes at once for a {file_len}-byte file"
    );
    Ok(())
}

fn config() -> Config {
    let mut c = Config {
        cases: proptest_cases(256),
        failure_persistence: None,
        ..Config::default()
    };
    if let Some(seed) = proptest_fixed_seed() {
        c.rng_seed = RngSeed::Fixed(seed);
    }
    c
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn damaged_files_fail_cleanly(
        specs in prop::collection::vec(spec(), 0..4),
        damage in damage(),
        seed in any::<u8>(),
    ) {
        let (bytes, f32s) = build(&specs, &damage, seed);
        let files = exercise(&bytes)?;
        if matches!(damage, Damage::None) {
            // An intact file opens and every F32 tensor reads back exactly as written.
            let files = files.expect("an intact file opens");
            for (name, values) in f32s {
                let t = files.load(&name, DType::F32, &Device::Cpu).expect("intact tensor");
                let got: Vec<f32> = t.flatten_all().expect("flat").to_vec1().expect("values");
                let (a, b): (Vec<u32>, Vec<u32>) = (
                    got.iter().map(|v| v.to_bits()).collect(),
                    values.iter().map(|v| v.to_bits()).collect(),
                );
                prop_assert_eq!(a, b, "tensor {}", name);
            }
        }
    }

    #[test]
    fn random_bytes_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        prop_assert!(exercise(&bytes)?.is_none() || bytes.len() >= 10);
    }

    #[test]
    fn random_headers_fail_cleanly(
        header in prop::collection::vec(any::<u8>(), 0..256),
        body in prop::collection::vec(any::<u8>(), 0..64),
        claimed in prop_oneof![Just(None), interesting_u64().prop_map(Some)],
    ) {
        let len = claimed.unwrap_or(header.len() as u64);
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(&body);
        exercise(&bytes)?;
    }
}

/// The overflow case found by reading the safetensors crate: 8 contiguous U8 tensors of
/// 2^61 - 1 bytes each pass its per-tensor checks, and its `buffer_end + 8 + header` then
/// overflows (a panic at safetensors-0.8.0/src/tensor.rs:420 in debug builds, checked by
/// calling the crate directly). The pre-check refuses the file first.
#[test]
fn offsets_summing_past_u64_max_are_refused_before_the_crate_sees_them() {
    let size: u64 = (1 << 61) - 1;
    let parts: Vec<String> = (0..8u64)
        .map(|i| {
            format!(
                r#""t{i}":{{"dtype":"U8","shape":[{size}],"data_offsets":[{},{}]}}"#,
                i * size,
                (i + 1) * size
            )
        })
        .collect();
    let header = format!("{{{}}}", parts.join(","));
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    let (_dir, p) = write(&bytes);
    let e = WeightFiles::open(&[p])
        .expect_err("offsets past the end")
        .to_string();
    assert!(e.contains("spans bytes"), "{e}");
    assert!(e.contains("of a 0-byte data section"), "{e}");
}

#[test]
fn a_tensor_in_two_shards_is_an_error() {
    let one = {
        let h = r#"{"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#;
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(h.as_bytes());
        b.extend_from_slice(&[1, 2]);
        b
    };
    let (_d1, p1) = write(&one);
    let (_d2, p2) = write(&one);
    let e = WeightFiles::open(&[p1, p2])
        .expect_err("duplicate")
        .to_string();
    assert!(e.contains("tensor `w` is also in"), "{e}");
}

#[test]
fn shard_index_paths_must_stay_in_the_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dir.path().join("model.safetensors.index.json");
    for bad in ["../outside.safetensors", "/etc/passwd", ""] {
        std::fs::write(
            &index,
            serde_json::json!({"weight_map": {"w": bad}}).to_string(),
        )
        .expect("write");
        let e = sd_core::resolve_weight_files(dir.path(), "model", None)
            .expect_err(bad)
            .to_string();
        assert!(
            e.contains("weight_map.w") && e.contains("not a file name"),
            "{bad}: {e}"
        );
    }
}

/// Found by `damaged_files_fail_cleanly`: a zero-sized tensor passes the safetensors size check
/// whatever its other dimensions, and candle's stride computation then overflowed.
#[test]
fn zero_sized_tensor_with_huge_dims_is_refused() {
    let header = format!(
        r#"{{"a":{{"dtype":"F32","shape":[0,{m},{m}],"data_offsets":[0,0]}}}}"#,
        m = u64::MAX
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    let (_dir, p) = write(&bytes);
    let e = WeightFiles::open(&[p])
        .expect_err("overflowing dims")
        .to_string();
    assert!(
        e.contains("tensor `a` has shape [0, 18446744073709551615"),
        "{e}"
    );
    assert!(e.contains("overflow"), "{e}");
}
