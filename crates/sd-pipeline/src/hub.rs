//! Resolving a model argument: a local diffusers folder, or a Hugging Face hub id such as
//! `stabilityai/stable-diffusion-xl-base-1.0` looked up in (and, when online, downloaded into)
//! the Hugging Face cache layout (`models--org--name/snapshots/<sha>/...`).
//!
//! Environment, as huggingface_hub reads it: `HF_ENDPOINT` (mirrors), `HF_HUB_CACHE`, else
//! `HF_HOME/hub`, else `~/.cache/huggingface/hub`; `HF_TOKEN` (else the token file in
//! `HF_HOME`); `HF_HUB_OFFLINE=1` (only the cache is used, nothing is fetched). Only the files
//! the chosen variant needs are downloaded.

use std::path::{Path, PathBuf};

use sd_core::{Error, Result};

/// Where and how to reach the hub; [`HubConfig::from_env`] reads the usual variables.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// The cache folder (`.../huggingface/hub`).
    pub cache_dir: PathBuf,
    /// The hub URL (`https://huggingface.co` or a mirror).
    pub endpoint: String,
    /// An access token for gated or private repositories.
    pub token: Option<String>,
    /// Use the cache only.
    pub offline: bool,
}

impl HubConfig {
    /// Reads `HF_HUB_CACHE`, `HF_HOME`, `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE`.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let home = var("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."));
            var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join(".cache"))
                .join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = var("HF_TOKEN").or_else(|| {
            std::fs::read_to_string(hf_home.join("token"))
                .ok()
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty())
        });
        let offline = var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
            .unwrap_or(false);
        Self {
            cache_dir,
            endpoint: var("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".to_owned()),
            token,
            offline,
        }
    }
}

/// Whether `s` looks like a hub id (`org/name`) rather than a path.
pub fn is_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// A local folder as is; otherwise a hub id resolved through the cache (downloading the needed
/// files unless offline). Returns the diffusers folder to load.
pub fn resolve_model(model: &str, variant: Option<&str>, hub: &HubConfig) -> Result<PathBuf> {
    let p = Path::new(model);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if !is_hub_id(model) {
        return Err(Error::io(
            p,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such model folder (and not a hub id of the form `org/name`)",
            ),
        ));
    }
    if let Some(dir) = cached_snapshot(model, hub)? {
        if hub.offline || snapshot_has_weights(&dir, variant) {
            return Ok(dir);
        }
    } else if hub.offline {
        return Err(Error::io(
            repo_cache_dir(model, hub),
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("HF_HUB_OFFLINE is set and `{model}` is not in the Hugging Face cache"),
            ),
        ));
    }
    download_files(model, variant, hub, true)
}

/// A diffusers folder (or hub id) used only for its configs, tokenizers and scheduler config
/// (`sd --config` with a single-file checkpoint): a local folder as is; a hub id from the cache,
/// downloading the config files only (no weights) unless offline.
pub fn resolve_config(model: &str, hub: &HubConfig) -> Result<PathBuf> {
    let p = Path::new(model);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if !is_hub_id(model) {
        return Err(Error::io(
            p,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such config folder (and not a hub id of the form `org/name`)",
            ),
        ));
    }
    if let Some(dir) = cached_snapshot(model, hub)? {
        return Ok(dir);
    }
    if hub.offline {
        return Err(Error::io(
            repo_cache_dir(model, hub),
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("HF_HUB_OFFLINE is set and `{model}` is not in the Hugging Face cache"),
            ),
        ));
    }
    download_files(model, None, hub, false)
}

fn repo_cache_dir(model: &str, hub: &HubConfig) -> PathBuf {
    hub.cache_dir
        .join(format!("models--{}", model.replace('/', "--")))
}

/// The snapshot folder of `refs/main` in the cache, if it holds a model_index.json.
pub fn cached_snapshot(model: &str, hub: &HubConfig) -> Result<Option<PathBuf>> {
    let repo = repo_cache_dir(model, hub);
    let Ok(sha) = std::fs::read_to_string(repo.join("refs").join("main")) else {
        return Ok(None);
    };
    let dir = repo.join("snapshots").join(sha.trim());
    Ok(dir.join("model_index.json").is_file().then_some(dir))
}

fn snapshot_has_weights(dir: &Path, variant: Option<&str>) -> bool {
    dir.join("unet").read_dir().is_ok_and(|mut it| {
        it.any(|e| {
            e.is_ok_and(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.ends_with(".safetensors") && variant.is_none_or(|v| n.contains(&format!(".{v}.")))
            })
        })
    })
}

/// The files of one diffusers repository that sd-rs needs for `variant`, chosen from the
/// repository's file list.
pub fn needed_files(
    siblings: &[String],
    index_components: &[String],
    variant: Option<&str>,
) -> Vec<String> {
    let has = |f: &str| siblings.iter().any(|s| s == f);
    let mut out = vec!["model_index.json".to_owned()];
    for c in index_components {
        for f in ["config.json", "scheduler_config.json"] {
            let p = format!("{c}/{f}");
            if has(&p) {
                out.push(p);
            }
        }
        for f in [
            "vocab.json",
            "merges.txt",
            "special_tokens_map.json",
            "tokenizer_config.json",
            "tokenizer.json",
        ] {
            let p = format!("{c}/{f}");
            if has(&p) {
                out.push(p);
            }
        }
        for stem in ["diffusion_pytorch_model", "model"] {
            let candidates: Vec<(String, String)> = variant
                .map(|v| {
                    (
                        format!("{c}/{stem}.{v}.safetensors"),
                        format!("{c}/{stem}.safetensors.index.{v}.json"),
                    )
                })
                .into_iter()
                .chain(std::iter::once((
                    format!("{c}/{stem}.safetensors"),
                    format!("{c}/{stem}.safetensors.index.json"),
                )))
                .collect();
            for (single, index) in candidates {
                if has(&single) {
                    out.push(single);
                    break;
                }
                if has(&index) {
                    // Shards: `{stem}-00001-of-0000N.safetensors`, or `{stem}.{variant}-0000...`
                    // when `index` is the variant's.
                    let tag = match index.rsplit('.').nth(1) {
                        Some(v) if index.ends_with(&format!(".index.{v}.json")) => format!(".{v}-"),
                        _ => "-".to_owned(),
                    };
                    let prefix = format!("{c}/{stem}{tag}");
                    out.push(index.clone());
                    out.extend(
                        siblings
                            .iter()
                            .filter(|s| s.starts_with(&prefix) && s.ends_with(".safetensors"))
                            .cloned(),
                    );
                    break;
                }
            }
        }
    }
    out.dedup();
    out
}

fn download_files(
    model: &str,
    variant: Option<&str>,
    hub: &HubConfig,
    weights: bool,
) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;
    let hub_err = |e: hf_hub::api::sync::ApiError| {
        Error::io(
            repo_cache_dir(model, hub),
            std::io::Error::other(format!("downloading `{model}` from {}: {e}", hub.endpoint)),
        )
    };
    let api = ApiBuilder::from_cache(hf_hub::Cache::new(hub.cache_dir.clone()))
        .with_endpoint(hub.endpoint.clone())
        .with_token(hub.token.clone())
        .with_progress(true)
        .build()
        .map_err(hub_err)?;
    let repo = api.model(model.to_owned());
    let info = repo.info().map_err(hub_err)?;
    let siblings: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let index_path = repo.get("model_index.json").map_err(hub_err)?;
    let dir = index_path.parent().map(Path::to_path_buf).ok_or_else(|| {
        Error::io(
            &index_path,
            std::io::Error::other("cached file has no folder"),
        )
    })?;
    let index = crate::model_index::ModelIndex::read(&dir)?;
    let comps: Vec<String> = index.components.keys().cloned().collect();
    for f in needed_files(&siblings, &comps, variant) {
        if !weights && f.ends_with(".safetensors") {
            continue;
        }
        repo.get(&f).map_err(hub_err)?;
    }
    Ok(dir)
}
