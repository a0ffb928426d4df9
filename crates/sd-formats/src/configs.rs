//! The diffusers configs of each released family, shipped inside the crate so that a
//! single-file checkpoint loads offline: `model_index.json`, the UNet, VAE, text-encoder and
//! scheduler configs and the tokenizer settings of SD 1.5, SD 2.1 (and 2.x-base), SDXL base 1.0
//! and the SDXL refiner 1.0, as published in their diffusers repositories, plus CLIP's BPE
//! vocabulary (shared by every family). [`config_folder`] writes them once into a cache folder
//! laid out as a diffusers folder without weights, which the pipeline reads like `--config DIR`.

use std::path::{Path, PathBuf};

use sd_core::{Error, Result};

use crate::checkpoint::Family;

macro_rules! shipped {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_bytes!(concat!("../configs/", $path)) as &[u8])),*]
    };
}

/// Every shipped file: (path under `configs/`, bytes).
const FILES: &[(&str, &[u8])] = shipped![
    "clip-bpe/merges.txt",
    "clip-bpe/vocab.json",
    "sd1/model_index.json",
    "sd1/scheduler/scheduler_config.json",
    "sd1/text_encoder/config.json",
    "sd1/tokenizer/special_tokens_map.json",
    "sd1/tokenizer/tokenizer_config.json",
    "sd1/unet/config.json",
    "sd1/vae/config.json",
    "sd2/model_index.json",
    "sd2/scheduler/scheduler_config.json",
    "sd2/text_encoder/config.json",
    "sd2/tokenizer/special_tokens_map.json",
    "sd2/tokenizer/tokenizer_config.json",
    "sd2/unet/config.json",
    "sd2/vae/config.json",
    "sdxl-refiner/model_index.json",
    "sdxl-refiner/scheduler/scheduler_config.json",
    "sdxl-refiner/text_encoder_2/config.json",
    "sdxl-refiner/tokenizer_2/special_tokens_map.json",
    "sdxl-refiner/tokenizer_2/tokenizer_config.json",
    "sdxl-refiner/unet/config.json",
    "sdxl-refiner/vae/config.json",
    "sdxl/model_index.json",
    "sdxl/scheduler/scheduler_config.json",
    "sdxl/text_encoder/config.json",
    "sdxl/text_encoder_2/config.json",
    "sdxl/tokenizer/special_tokens_map.json",
    "sdxl/tokenizer/tokenizer_config.json",
    "sdxl/tokenizer_2/special_tokens_map.json",
    "sdxl/tokenizer_2/tokenizer_config.json",
    "sdxl/unet/config.json",
    "sdxl/vae/config.json",
];

/// Which shipped config a checkpoint gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShippedConfig {
    /// SD 1.5 (`stable-diffusion-v1-5`): PNDM, epsilon, 512 px.
    Sd1,
    /// SD 2.1 (`stabilityai/stable-diffusion-2-1`): DDIM, v-prediction, 768 px.
    Sd2V,
    /// SD 2.1-base (`stabilityai/stable-diffusion-2-1-base`): as 2.1 with epsilon, 512 px.
    Sd2Base,
    /// SDXL base 1.0: Euler, epsilon, 1024 px, VAE scale 0.13025 with `force_upcast`.
    Sdxl,
    /// SDXL refiner 1.0.
    SdxlRefiner,
}

impl ShippedConfig {
    /// The default config for a family (SD 2.x: the 768-pixel v-prediction 2.1, as diffusers).
    pub fn for_family(family: Family) -> Self {
        match family {
            Family::Sd1 => Self::Sd1,
            Family::Sd2 => Self::Sd2V,
            Family::Sdxl => Self::Sdxl,
            Family::SdxlRefiner => Self::SdxlRefiner,
        }
    }

    fn source(self) -> &'static str {
        match self {
            Self::Sd1 => "sd1",
            Self::Sd2V | Self::Sd2Base => "sd2",
            Self::Sdxl => "sdxl",
            Self::SdxlRefiner => "sdxl-refiner",
        }
    }

    fn folder_name(self) -> &'static str {
        match self {
            Self::Sd2Base => "sd2-base",
            other => other.source(),
        }
    }
}

fn cache_root() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("SD_RS_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|p| p.join("sd-rs")))
        .or_else(|| var("HOME").map(|p| p.join(".cache/sd-rs")))
        .unwrap_or_else(|| std::env::temp_dir().join("sd-rs"))
}

/// FNV-1a over every shipped file: the cache folder changes when the configs do.
fn content_hash() -> u64 {
    FILES.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, (p, b)| {
        p.bytes()
            .chain(b.iter().copied())
            .fold(h, |h, x| (h ^ x as u64).wrapping_mul(0x100_0000_01b3))
    })
}

/// The file's bytes for `which`, patched for 2.x-base (epsilon, 512 px).
fn contents(which: ShippedConfig, rel: &str, bytes: &[u8]) -> Result<Vec<u8>> {
    if which != ShippedConfig::Sd2Base {
        return Ok(bytes.to_vec());
    }
    let patch: &[(&str, serde_json::Value)] = match rel {
        "scheduler/scheduler_config.json" => &[("prediction_type", serde_json::json!("epsilon"))],
        "unet/config.json" => &[("sample_size", serde_json::json!(64))],
        "vae/config.json" => &[("sample_size", serde_json::json!(512))],
        _ => return Ok(bytes.to_vec()),
    };
    let mut v: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::config(rel, None, format!("invariant: shipped JSON is valid ({e})")))?;
    if let Some(obj) = v.as_object_mut() {
        for (k, val) in patch {
            obj.insert((*k).to_owned(), val.clone());
        }
    }
    serde_json::to_vec_pretty(&v)
        .map_err(|e| Error::config(rel, None, format!("cannot write the patched config: {e}")))
}

/// The shipped config of `which` as a diffusers folder (configs and tokenizers, no weights),
/// written on first use under `$SD_RS_CACHE` (or `$XDG_CACHE_HOME/sd-rs`, `~/.cache/sd-rs`, the
/// temporary folder) and reused afterwards.
pub fn config_folder(which: ShippedConfig) -> Result<PathBuf> {
    let mut last_err = None;
    for root in [cache_root(), std::env::temp_dir().join("sd-rs")] {
        let dir = root
            .join(format!("configs-{:016x}", content_hash()))
            .join(which.folder_name());
        if dir.join("model_index.json").is_file() {
            return Ok(dir);
        }
        match write_folder(which, &dir) {
            Ok(()) => return Ok(dir),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| {
        Error::unsupported("no writable cache folder for the shipped model configs")
    }))
}

/// Writes into a fresh temporary folder beside `dir`, then renames it into place (another
/// process doing the same at once is harmless).
fn write_folder(which: ShippedConfig, dir: &Path) -> Result<()> {
    let parent = dir
        .parent()
        .ok_or_else(|| Error::invalid_argument("config folder", dir.display(), "a sub-folder"))?;
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let tmp = parent.join(format!(
        ".{}-{}-{}",
        which.folder_name(),
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let src = which.source();
    let write = |rel: &str, bytes: &[u8]| -> Result<()> {
        let p = tmp.join(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
        }
        std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))
    };
    let mut tokenizers = Vec::new();
    for (path, bytes) in FILES {
        let Some(rel) = path.strip_prefix(src).and_then(|r| r.strip_prefix('/')) else {
            continue;
        };
        write(rel, &contents(which, rel, bytes)?)?;
        if let Some((tok, _)) = rel.split_once("/tokenizer_config.json") {
            tokenizers.push(tok.to_owned());
        }
    }
    for tok in tokenizers {
        for (path, bytes) in FILES {
            if let Some(name) = path.strip_prefix("clip-bpe/") {
                write(&format!("{tok}/{name}"), bytes)?;
            }
        }
    }
    match std::fs::rename(&tmp, dir) {
        Ok(()) => Ok(()),
        Err(_) if dir.join("model_index.json").is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(Error::io(dir, e))
        }
    }
}
