//! Test helpers: assembles a single-file checkpoint from a diffusers fixture folder with a recipe
//! written by `tools/fixtures/single_file.py` (`tests/fixtures/refs/single_file_<family>.json`),
//! so the repository holds a few KB of recipe instead of a second copy of the weights.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sd_core::{Error, Result, WeightFiles};

/// Writes to `out` the checkpoint that `recipe` describes, reading tensors from `folder`.
///
/// Recipe entries are `[ldm_key, op, [component/key, ...], arg?]` with `op` one of `same`,
/// `cat0` (concatenate rows), `t` (transpose), `reshape` (arg: shape) and `scalar` (arg: value).
pub fn assemble_single_file(recipe: &Path, folder: &Path, out: &Path) -> Result<()> {
    let v: serde_json::Value = sd_core::config::read_json(recipe)?;
    let bad = |why: &str| Error::config(recipe, None, why.to_owned());
    let variant = v.get("variant").and_then(|x| x.as_str());
    let dtype = match v.get("dtype").and_then(|x| x.as_str()) {
        Some("F16") => DType::F16,
        Some("BF16") => DType::BF16,
        _ => DType::F32,
    };
    let mut files: HashMap<String, WeightFiles> = HashMap::new();
    let dev = Device::Cpu;
    let mut load = |src: &str| -> Result<Tensor> {
        let (comp, key) = src
            .split_once('/')
            .ok_or_else(|| bad("source without a component"))?;
        if !files.contains_key(comp) {
            let stem = if comp.starts_with("text_encoder") {
                "model"
            } else {
                "diffusion_pytorch_model"
            };
            let name = match variant {
                Some(v) => format!("{stem}.{v}.safetensors"),
                None => format!("{stem}.safetensors"),
            };
            files.insert(
                comp.to_owned(),
                WeightFiles::open(&[folder.join(comp).join(name)])?,
            );
        }
        let f = files.get(comp).ok_or_else(|| bad("component not opened"))?;
        f.load(key, DType::F32, &dev)
    };
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let entries = v
        .get("tensors")
        .and_then(|t| t.as_array())
        .ok_or_else(|| bad("no `tensors` list"))?;
    for e in entries {
        let e = e.as_array().ok_or_else(|| bad("an entry is not a list"))?;
        let name = e
            .first()
            .and_then(|x| x.as_str())
            .ok_or_else(|| bad("entry name"))?;
        let op = e
            .get(1)
            .and_then(|x| x.as_str())
            .ok_or_else(|| bad("entry op"))?;
        let srcs: Vec<&str> = e
            .get(2)
            .and_then(|x| x.as_array())
            .map(|a| a.iter().filter_map(|s| s.as_str()).collect())
            .unwrap_or_default();
        let first = || {
            srcs.first()
                .copied()
                .ok_or_else(|| bad("entry without a source"))
        };
        let t = match op {
            "same" => load(first()?)?,
            "t" => load(first()?)?.t()?.contiguous()?,
            "cat0" => {
                let parts = srcs.iter().map(|s| load(s)).collect::<Result<Vec<_>>>()?;
                Tensor::cat(&parts, 0)?
            }
            "reshape" => {
                let shape: Vec<usize> = e
                    .get(3)
                    .and_then(|x| x.as_array())
                    .map(|a| {
                        a.iter()
                            .filter_map(|d| d.as_u64().map(|d| d as usize))
                            .collect()
                    })
                    .ok_or_else(|| bad("reshape without a shape"))?;
                load(first()?)?.reshape(shape)?
            }
            "scalar" => {
                let x = e
                    .get(3)
                    .and_then(|x| x.as_f64())
                    .ok_or_else(|| bad("scalar value"))?;
                Tensor::new(x as f32, &dev)?
            }
            other => return Err(bad(&format!("unknown op `{other}`"))),
        };
        tensors.insert(name.to_owned(), t.to_dtype(dtype)?);
    }
    candle_core::safetensors::save(&tensors, out)?;
    Ok(())
}
