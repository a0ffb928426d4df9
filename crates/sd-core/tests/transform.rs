//! The weight-transform layer: renamed and derived tensors, deltas, and a load report that
//! names the file's own keys.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use sd_core::{Derive, Error, VarBuilder, WeightFiles, WeightMap};

/// A safetensors file with f32 tensors of values 0, 1, 2, ... (and raw I32 ones).
fn write(path: &Path, tensors: &[(&str, &str, &[usize])]) {
    let mut header = serde_json::Map::new();
    let mut data: Vec<u8> = Vec::new();
    for (name, dtype, shape) in tensors {
        let n: usize = shape.iter().product();
        let start = data.len();
        for i in 0..n {
            match *dtype {
                "I32" => data.extend_from_slice(&(i as i32).to_le_bytes()),
                _ => data.extend_from_slice(&(i as f32).to_le_bytes()),
            }
        }
        header.insert(
            (*name).to_owned(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let h = serde_json::Value::Object(header).to_string();
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(h.as_bytes());
    bytes.extend_from_slice(&data);
    std::fs::write(path, bytes).unwrap();
}

fn files(dir: &tempfile::TempDir) -> Arc<WeightFiles> {
    let p = dir.path().join("ck.safetensors");
    write(
        &p,
        &[
            ("fused.in_proj_weight", "F32", &[6, 2]),
            ("proj", "F32", &[2, 3]),
            ("conv", "F32", &[2, 2, 1, 1]),
            ("plain", "F32", &[4]),
            ("ints", "I32", &[4]),
            ("extra", "F32", &[1]),
        ],
    );
    Arc::new(WeightFiles::open(&[p]).unwrap())
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn derived_tensors_and_deltas() {
    let d = tempfile::tempdir().unwrap();
    let mut m = WeightMap::new(files(&d));
    for (i, n) in ["q", "k", "v"].iter().enumerate() {
        m.insert(
            format!("attn.{n}.weight"),
            "fused.in_proj_weight",
            Derive::Rows {
                start: 2 * i,
                len: 2,
            },
        );
    }
    m.insert("proj.weight", "proj", Derive::Transpose);
    m.insert("lin.weight", "conv", Derive::Reshape(vec![2, 2]));
    m.insert("renamed", "plain", Derive::Same);
    m.add_delta(
        "renamed",
        Tensor::new(&[10f32, 10., 10., 10.], &Device::Cpu).unwrap(),
    );
    m.add_delta(
        "renamed",
        Tensor::new(&[1f32, 1., 1., 1.], &Device::Cpu).unwrap(),
    );
    m.own("ints");
    m.own("extra");
    let vb = VarBuilder::from_map(m, DType::F32, &Device::Cpu);
    assert!(vb.contains("attn.k.weight") && !vb.contains("fused.in_proj_weight"));
    assert_eq!(
        vals(&vb.get((2, 2), "attn.k.weight").unwrap()),
        [4., 5., 6., 7.]
    );
    assert_eq!(
        vals(&vb.get((2, 2), "attn.v.weight").unwrap()),
        [8., 9., 10., 11.]
    );
    assert_eq!(
        vals(&vb.get((3, 2), "proj.weight").unwrap()),
        [0., 3., 1., 4., 2., 5.]
    );
    assert_eq!(
        vals(&vb.get((2, 2), "lin.weight").unwrap()),
        [0., 1., 2., 3.]
    );
    assert_eq!(vals(&vb.get(4, "renamed").unwrap()), [11., 12., 13., 14.]);
    let Err(Error::Weights(r)) = vb.finish() else {
        panic!("expected a report of the unused tensors")
    };
    // q is never requested, but its file key is used by k and v: only the owned extras are unused.
    assert_eq!(r.unused, ["extra", "ints"]);
    assert!(r.missing.is_empty() && r.wrong_shape.is_empty() && r.unreadable.is_empty());
}

#[test]
fn the_report_names_the_files_keys() {
    let d = tempfile::tempdir().unwrap();
    let mut m = WeightMap::new(files(&d)).with_label("unet");
    m.insert("a.weight", "proj", Derive::Transpose);
    m.insert("b.weight", "ints", Derive::Same);
    m.insert("c.weight", "plain", Derive::Rows { start: 3, len: 4 });
    m.insert("spare.weightx", "extra", Derive::Same);
    let vb = VarBuilder::from_map(m, DType::F32, &Device::Cpu);
    // Wrong shape (the transpose is [3, 2]), wrong dtype, impossible derivation, missing.
    let a = vb.get((2, 3), "a.weight").unwrap();
    assert_eq!(a.dims(), [2, 3], "a placeholder of the expected shape");
    vb.get(4, "b.weight").unwrap();
    vb.get(4, "c.weight").unwrap();
    vb.get(4, "spare.weight").unwrap();
    let err = vb.finish().unwrap_err();
    let Error::Weights(r) = &err else {
        panic!("{err}")
    };
    assert_eq!(
        r.wrong_shape,
        [("proj (as a.weight)".to_owned(), vec![2, 3], vec![3, 2])]
    );
    assert_eq!(r.unreadable.len(), 2, "{err}");
    assert!(
        r.unreadable[0].0 == "ints (as b.weight)" && r.unreadable[0].1.contains("I32"),
        "{err}"
    );
    assert!(
        r.unreadable[1].0 == "plain (as c.weight)" && r.unreadable[1].1.contains("rows 3..7"),
        "{err}"
    );
    assert_eq!(r.missing.len(), 1);
    assert_eq!(r.missing[0].2.as_deref(), Some("extra (as spare.weightx)"));
    assert_eq!(r.unused, ["extra"]);
    let text = err.to_string();
    assert!(text.contains("ck.safetensors (unet)"), "{text}");
}

#[test]
fn derive_shapes() {
    assert_eq!(
        Derive::Rows { start: 0, len: 2 }.shape(&[6, 4]),
        Ok(vec![2, 4])
    );
    assert!(Derive::Rows { start: 5, len: 2 }.shape(&[6, 4]).is_err());
    assert!(Derive::Rows {
        start: usize::MAX,
        len: 2
    }
    .shape(&[6])
    .is_err());
    assert!(Derive::Rows { start: 0, len: 1 }.shape(&[]).is_err());
    assert!(Derive::Transpose.shape(&[2, 3, 4]).is_err());
    assert_eq!(Derive::Reshape(vec![6]).shape(&[2, 3, 1, 1]), Ok(vec![6]));
    assert!(Derive::Reshape(vec![7]).shape(&[2, 3]).is_err());
    assert!(Derive::Reshape(vec![usize::MAX, 2]).shape(&[2, 3]).is_err());
}
