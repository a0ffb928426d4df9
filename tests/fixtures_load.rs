//! The committed fixture models load through sd-core: every config.json parses, every weight
//! file resolves (plain and fp16 variant), and tensor names, shapes and dtypes equal the list
//! the PyTorch exporter wrote (models/<family>/manifest.json).

use std::collections::BTreeMap;
use std::path::Path;

use sd_rs::core::config::read_json;
use sd_rs::core::testing::fixtures_dir;
use sd_rs::core::{resolve_weight_files, Error, VarBuilder, WeightFiles};

type Manifest = BTreeMap<String, BTreeMap<String, serde_json::Value>>;

const FAMILIES: [&str; 4] = ["sd1", "sd2", "sdxl", "refiner"];

fn stem(component: &str) -> &'static str {
    if component.starts_with("text_encoder") {
        "model"
    } else {
        "diffusion_pytorch_model"
    }
}

#[test]
fn every_fixture_component_matches_the_exporter_manifest() {
    let mut checked = 0;
    for family in FAMILIES {
        let dir = fixtures_dir().join("models").join(family);
        let index: BTreeMap<String, serde_json::Value> =
            read_json(&dir.join("model_index.json")).unwrap();
        let manifest: Manifest = read_json(&dir.join("manifest.json")).unwrap();
        for (component, spec) in &index {
            // Components are `[library, class]` pairs; `null` entries are absent components.
            let Some(spec) = spec.as_array() else {
                continue;
            };
            if spec[0].is_null() || !dir.join(component).join("config.json").is_file() {
                continue;
            }
            let cdir = dir.join(component);
            let _config: serde_json::Value = read_json(&cdir.join("config.json")).unwrap();
            for variant in [None, Some("fp16")] {
                let (files, note) = resolve_weight_files(&cdir, stem(component), variant).unwrap();
                let key = files[0]
                    .strip_prefix(&dir)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                let expected = &manifest[&key];
                if variant.is_some() && !key.contains(".fp16.") {
                    assert!(
                        note.is_some(),
                        "falling back from the fp16 variant is reported"
                    );
                }
                let wf = WeightFiles::open(&files).unwrap();
                let mut names: Vec<&str> = wf.names().collect();
                names.sort();
                let want: Vec<&str> = expected.keys().map(String::as_str).collect();
                assert_eq!(names, want, "{key}: tensor names");
                for (name, info) in expected {
                    let shape: Vec<usize> = serde_json::from_value(info["shape"].clone()).unwrap();
                    assert_eq!(wf.shape(name).unwrap(), shape.as_slice(), "{key}: {name}");
                }
                checked += 1;
            }
        }
    }
    // sd1: 3 components x 2 (fp16 files exist); the others fall back to plain files.
    assert_eq!(checked, 2 * (3 + 3 + 4 + 3));
}

#[test]
fn strict_loading_reports_every_problem_at_once() {
    let dir = fixtures_dir().join("models/sd1/vae");
    let (files, _) = resolve_weight_files(&dir, "diffusion_pytorch_model", None).unwrap();
    let vb =
        VarBuilder::from_paths(&files, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    // One correct tensor, one misspelt, one of the wrong shape; everything else goes unused.
    vb.pp("decoder.conv_in")
        .get((16, 4, 3, 3), "weight")
        .unwrap();
    let missing = vb.pp("decoder.conv_in").get(16, "bais").unwrap();
    assert_eq!(missing.dims(), &[16], "placeholder has the expected shape");
    vb.pp("decoder.conv_out").get((3, 8, 3, 3), "bias").unwrap();
    let Err(Error::Weights(report)) = vb.finish() else {
        panic!("expected a load report")
    };
    assert_eq!(report.missing.len(), 1);
    assert_eq!(report.missing[0].0, "decoder.conv_in.bais");
    assert_eq!(
        report.missing[0].2.as_deref(),
        Some("decoder.conv_in.bias"),
        "nearest-name hint"
    );
    assert_eq!(
        report.wrong_shape,
        vec![("decoder.conv_out.bias".into(), vec![3, 8, 3, 3], vec![3])]
    );
    assert!(report.unused.len() > 10);
    let msg = report.to_string();
    assert!(
        msg.contains("decoder.conv_in.bais") && msg.contains("expected shape [16]"),
        "{msg}"
    );
}

#[test]
fn pickled_only_folder_is_refused_with_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("diffusion_pytorch_model.bin"), b"not read").unwrap();
    let err = resolve_weight_files(tmp.path(), "diffusion_pytorch_model", None).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("pickled") && msg.contains("diffusion_pytorch_model.bin"),
        "{msg}"
    );
}

#[test]
fn corrupt_and_truncated_safetensors_are_reported_with_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("model.safetensors");
    std::fs::write(&bad, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
    let msg = WeightFiles::open(std::slice::from_ref(&bad))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("not a valid safetensors"),
        "{msg}"
    );

    // A real file cut in half: the header is fine, the data is not there.
    let src = fixtures_dir().join("models/sd1/vae/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&src).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let err = WeightFiles::open(std::slice::from_ref(&bad));
    let msg = match err {
        Err(e) => e.to_string(),
        Ok(wf) => {
            let names: Vec<String> = wf.names().map(str::to_owned).collect();
            names
                .iter()
                .find_map(|n| {
                    wf.load(n, candle_core::DType::F32, &candle_core::Device::Cpu)
                        .err()
                })
                .expect("some tensor lies past the end")
                .to_string()
        }
    };
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn missing_folder_is_an_io_error_naming_it() {
    let err = resolve_weight_files(
        Path::new("/nonexistent/unet"),
        "diffusion_pytorch_model",
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/unet"), "{err}");
}
