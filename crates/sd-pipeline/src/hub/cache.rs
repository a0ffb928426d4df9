//! The Hugging Face cache layout, as huggingface_hub writes it:
//! `models--{org}--{name}/blobs/{etag}` (the bytes, written once complete),
//! `snapshots/{commit}/{path}` (relative symlinks into `blobs/`), `refs/{revision}` (the commit
//! a branch or tag pointed to). A snapshot is complete when every file the loader needs is
//! there: a download interrupted halfway leaves `blobs/{etag}.incomplete` and no snapshot link.

use std::path::{Component, Path, PathBuf};

use sd_core::{Error, Result};

use super::HubConfig;
use crate::model_index::ModelIndex;

/// The components whose weights the loader reads.
pub(super) const WEIGHT_COMPONENTS: [&str; 4] = ["unet", "vae", "text_encoder", "text_encoder_2"];

/// The weight file stem diffusers (`diffusion_pytorch_model`) or transformers (`model`) uses.
pub(super) fn weight_stem(component: &str) -> &'static str {
    if component.starts_with("text_encoder") {
        "model"
    } else {
        "diffusion_pytorch_model"
    }
}

pub(super) fn repo_dir(model: &str, hub: &HubConfig) -> PathBuf {
    hub.cache_dir
        .join(format!("models--{}", model.replace('/', "--")))
}

/// A path from the hub (a file name, a revision) that stays inside the folder it is joined to.
pub(super) fn safe_relative(what: &str, p: &str) -> Result<()> {
    let ok = !p.is_empty()
        && !p.contains('\\')
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_argument(
            what,
            format!("{p:?}"),
            "a relative path without `..`",
        ))
    }
}

/// `snapshots/{sha}` of `repo`; `sha` comes from the hub, so it must be a plain name.
pub(super) fn snapshot_dir(repo: &Path, sha: &str) -> Result<PathBuf> {
    if sha.is_empty() || sha.len() > 128 || !sha.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(Error::invalid_argument(
            "commit sha (the hub's `sha` / X-Repo-Commit)",
            format!("{sha:?}"),
            "1 to 128 letters and digits",
        ));
    }
    Ok(repo.join("snapshots").join(sha))
}

/// Records that `revision` points to `sha` (`refs/{revision}`), unless `revision` is the commit
/// itself (huggingface_hub writes no ref then).
pub(super) fn write_ref(repo: &Path, revision: &str, sha: &str) -> Result<()> {
    if revision == sha {
        return Ok(());
    }
    safe_relative("revision", revision)?;
    let path = repo.join("refs").join(revision);
    let tmp = path.with_extension("tmp-sd-rs");
    let write = || -> std::io::Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&tmp, sha)?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| Error::io(&path, e))
}

/// The snapshot folder `hub.revision` points to in the cache (`refs/{revision}`, or the
/// revision itself when it names a cached commit), if it holds a model_index.json. Whether it
/// is complete is [`missing_files`]' question.
pub fn cached_snapshot(model: &str, hub: &HubConfig) -> Result<Option<PathBuf>> {
    let repo = repo_dir(model, hub);
    safe_relative("revision", &hub.revision)?;
    let sha = match std::fs::read_to_string(repo.join("refs").join(&hub.revision)) {
        Ok(s) => s.trim().to_owned(),
        Err(_) if is_commit(&hub.revision) => hub.revision.clone(),
        Err(_) => return Ok(None),
    };
    let Ok(dir) = snapshot_dir(&repo, &sha) else {
        return Ok(None);
    };
    Ok(dir.join("model_index.json").is_file().then_some(dir))
}

/// The files the loader needs that the snapshot (or folder) `dir` lacks, judged file by file:
/// `model_index.json`; each tokenizer's `vocab.json` and `merges.txt`; the scheduler config; and
/// for the UNet, the VAE and the text encoders their `config.json` and (with `weights`) a weight
/// file: `variant`'s or the plain one, single or sharded with every shard its index names. A
/// dangling snapshot link counts as missing.
pub fn missing_files(dir: &Path, variant: Option<&str>, weights: bool) -> Result<Vec<String>> {
    if !dir.join("model_index.json").is_file() {
        return Ok(vec!["model_index.json".to_owned()]);
    }
    let index = ModelIndex::read(dir)?;
    let mut missing = Vec::new();
    let need = |missing: &mut Vec<String>, f: String| {
        if !dir.join(&f).is_file() {
            missing.push(f);
        }
    };
    for (name, (_, class)) in &index.components {
        if class.contains("Tokenizer") {
            need(&mut missing, format!("{name}/vocab.json"));
            need(&mut missing, format!("{name}/merges.txt"));
        } else if class.contains("Scheduler") {
            need(&mut missing, format!("{name}/scheduler_config.json"));
        } else if WEIGHT_COMPONENTS.contains(&name.as_str()) {
            need(&mut missing, format!("{name}/config.json"));
            if weights && !has_weights(&dir.join(name), variant)? {
                let v = variant.map(|v| format!(".{v}")).unwrap_or_default();
                missing.push(format!("{name}/{}{v}.safetensors", weight_stem(name)));
            }
        }
    }
    Ok(missing)
}

/// A full commit hash (40 hex digits), which huggingface_hub looks up without a ref.
fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

/// Whether `component_dir` holds a complete weight file for `variant` (or the plain one).
fn has_weights(component_dir: &Path, variant: Option<&str>) -> Result<bool> {
    let tags: Vec<String> = variant
        .map(|v| format!(".{v}"))
        .into_iter()
        .chain(std::iter::once(String::new()))
        .collect();
    for stem in ["diffusion_pytorch_model", "model"] {
        for tag in &tags {
            if component_dir
                .join(format!("{stem}{tag}.safetensors"))
                .is_file()
            {
                return Ok(true);
            }
            let index = component_dir.join(format!("{stem}.safetensors.index{tag}.json"));
            if index.is_file() && shards_present(component_dir, &index)? {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

fn shards_present(component_dir: &Path, index: &Path) -> Result<bool> {
    let v: serde_json::Value = sd_core::config::read_json(index)?;
    let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(Error::config(
            index,
            Some("weight_map"),
            "missing or not an object",
        ));
    };
    Ok(map.values().all(|f| {
        f.as_str()
            .is_some_and(|f| safe_relative("shard", f).is_ok() && component_dir.join(f).is_file())
    }))
}

/// Links `snapshots/{sha}/{file}` to `blobs/{etag}` (a relative symlink, as huggingface_hub;
/// a copy where symlinks are unavailable), replacing a dangling link.
pub(super) fn link_blob(pointer: &Path, blob: &Path, file: &str) -> Result<()> {
    let io = |e| Error::io(pointer, e);
    if let Some(parent) = pointer.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    if pointer.symlink_metadata().is_ok() {
        std::fs::remove_file(pointer).map_err(io)?;
    }
    #[cfg(unix)]
    {
        // From snapshots/{sha}/{dirs of file}/ back up to the repo folder.
        let ups = 2 + file.matches('/').count();
        let mut target = PathBuf::new();
        for _ in 0..ups {
            target.push("..");
        }
        target.push("blobs");
        if let Some(name) = blob.file_name() {
            target.push(name);
        }
        std::os::unix::fs::symlink(&target, pointer).map_err(io)
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        std::fs::copy(blob, pointer).map(|_| ()).map_err(io)
    }
}
