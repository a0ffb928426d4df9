//! Resolving a model argument: a local diffusers folder, or a Hugging Face hub id such as
//! `stabilityai/stable-diffusion-xl-base-1.0` looked up in (and, when online, downloaded into)
//! the Hugging Face cache layout (`models--org--name/{blobs,snapshots/<sha>,refs/<revision>}`).
//!
//! Environment, as huggingface_hub reads it, in one place ([`HubConfig::from_vars`]):
//! `HF_ENDPOINT` (mirrors), `HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`; `HF_TOKEN` (else the token file in `HF_HOME`);
//! `HF_HUB_OFFLINE=1` (only the cache is used, nothing is fetched). Only the files the chosen
//! variant needs are downloaded, and a snapshot is used only when every one of them is there.
//!
//! Online, a run asks the hub for the revision's file list (one small request: it also gives
//! the commit the revision points to) and downloads only the files that the commit's snapshot
//! lacks, as huggingface_hub's `snapshot_download` does; a second run downloads nothing. When
//! the hub cannot be reached, a complete cached snapshot is used with a warning.

mod cache;
mod download;

use std::path::{Path, PathBuf};

use sd_core::{Error, Result};

pub use cache::{cached_snapshot, missing_files};

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
    /// The branch, tag or commit to use (`main` by default).
    pub revision: String,
}

impl HubConfig {
    /// Reads `HF_HUB_CACHE`, `HF_HOME`, `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE` from the
    /// process environment (revision `main`).
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// As [`HubConfig::from_env`], reading the variables through `var` (tests pass a map, so
    /// they never change the process environment). Empty values count as unset.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let var = |k: &str| var(k).filter(|v| !v.is_empty());
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
            endpoint: var("HF_ENDPOINT")
                .map(|e| e.trim_end_matches('/').to_owned())
                .unwrap_or_else(|| "https://huggingface.co".to_owned()),
            token,
            offline,
            revision: "main".to_owned(),
        }
    }

    /// The same hub at another revision.
    pub fn with_revision(mut self, revision: impl Into<String>) -> Self {
        self.revision = revision.into();
        self
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
    resolve(model, variant, hub, true)
}

/// A diffusers folder (or hub id) used only for its configs, tokenizers and scheduler config
/// (`sd --config` with a single-file checkpoint): a local folder as is; a hub id from the cache,
/// downloading the config files only (no weights) unless offline.
pub fn resolve_config(model: &str, hub: &HubConfig) -> Result<PathBuf> {
    resolve(model, None, hub, false)
}

fn resolve(model: &str, variant: Option<&str>, hub: &HubConfig, weights: bool) -> Result<PathBuf> {
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
    let repo = cache::repo_dir(model, hub);
    if hub.offline {
        let Some(dir) = cached_snapshot(model, hub)? else {
            return Err(Error::io(
                repo,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "HF_HUB_OFFLINE is set and `{model}` (revision {}) is not in the Hugging \
                         Face cache",
                        hub.revision
                    ),
                ),
            ));
        };
        return complete_or_error(&dir, variant, weights, "HF_HUB_OFFLINE is set and");
    }
    let client = download::Client::new(hub)?;
    let listing = match client.listing(model) {
        Ok(l) => l,
        Err(download::ListingError::Unreachable(e)) => {
            // As huggingface_hub: no connection, fall back to a complete cached snapshot.
            if let Some(dir) = cached_snapshot(model, hub)? {
                if missing_files(&dir, variant, weights)?.is_empty() {
                    log::warn!("{e}; using the cached snapshot {}", dir.display());
                    return Ok(dir);
                }
            }
            return Err(e);
        }
        Err(download::ListingError::Answered(e)) => return Err(e),
    };
    let snapshot = cache::snapshot_dir(&repo, &listing.sha)?;
    client.fetch(model, &listing.sha, "model_index.json", &repo)?;
    let index = crate::model_index::ModelIndex::read(&snapshot)?;
    let comps: Vec<String> = index.components.keys().cloned().collect();
    if let Some(v) = variant.filter(|_| weights) {
        check_variant_exists(model, &listing.siblings, &comps, v)?;
    }
    for f in needed_files(&listing.siblings, &comps, variant) {
        if !weights && f.ends_with(".safetensors") {
            continue;
        }
        client.fetch(model, &listing.sha, &f, &repo)?;
    }
    cache::write_ref(&repo, &hub.revision, &listing.sha)?;
    // Every listed file is in place; the local judgment must agree (a shard index naming a
    // shard the listing lacks, say).
    complete_or_error(&snapshot, variant, weights, "after downloading,")
}

fn complete_or_error(
    dir: &Path,
    variant: Option<&str>,
    weights: bool,
    why: &str,
) -> Result<PathBuf> {
    let missing = missing_files(dir, variant, weights)?;
    if missing.is_empty() {
        return Ok(dir.to_path_buf());
    }
    Err(Error::io(
        dir,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "{why} the cached snapshot lacks {} (an interrupted download? run again online)",
                missing.join(", ")
            ),
        ),
    ))
}

/// diffusers refuses a variant that no weight file of the repository has
/// (`variant_compatible_siblings`); components without it fall back to the plain files.
fn check_variant_exists(
    model: &str,
    siblings: &[String],
    comps: &[String],
    variant: &str,
) -> Result<()> {
    let with_variant = needed_files(siblings, comps, Some(variant));
    let tag = format!(".{variant}");
    if with_variant
        .iter()
        .any(|f| f.ends_with(".safetensors") && f.contains(&tag))
    {
        return Ok(());
    }
    let looked_for: Vec<String> = comps
        .iter()
        .filter(|c| cache::WEIGHT_COMPONENTS.contains(&c.as_str()))
        .map(|c| {
            let stem = cache::weight_stem(c);
            format!("{c}/{stem}.{variant}.safetensors")
        })
        .collect();
    Err(Error::io(
        PathBuf::from(model),
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "variant `{variant}` not found: the repository has none of {} (drop --variant or \
                 pick one the repository has)",
                looked_for.join(", ")
            ),
        ),
    ))
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
