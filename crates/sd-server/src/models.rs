//! The models a server can serve: the one it started with, and the diffusers folders of
//! `--models-dir`, each loaded on first use (`sd_model_checkpoint` in `override_settings` or
//! `/options`) and then kept loaded.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use sd_pipeline::core::LoadOptions;
use sd_pipeline::StableDiffusion;

use crate::error::ApiError;
use crate::Model;

/// AUTOMATIC1111's API defaults for models without their own (`--models-dir`).
const A1111_STEPS: usize = 50;
const A1111_CFG: f64 = 7.0;

/// The loaded models and the current one.
#[derive(Debug)]
pub struct Models {
    current: Mutex<Arc<Model>>,
    loaded: Mutex<HashMap<PathBuf, Arc<Model>>>,
    /// Held while a model loads, so that two requests never load the same folder twice.
    loading: Mutex<()>,
    dir: Option<PathBuf>,
    opts: LoadOptions,
    embeddings_dir: Option<PathBuf>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `name.safetensors [abcdef1234]` -> `name.safetensors`: clients send the title back.
fn strip_hash(name: &str) -> &str {
    let name = name.trim();
    match name.rsplit_once(" [") {
        Some((head, tail)) if tail.ends_with(']') => head,
        _ => name,
    }
}

impl Models {
    /// The server's models: `first` current, others from `dir` loaded with `opts` on demand,
    /// each with the embeddings of `embeddings_dir` that fit it (`first` already has them).
    pub fn new(
        first: Model,
        dir: Option<PathBuf>,
        opts: LoadOptions,
        embeddings_dir: Option<PathBuf>,
    ) -> Self {
        let first = Arc::new(first);
        let mut loaded = HashMap::new();
        loaded.insert(first.path.clone(), first.clone());
        Self {
            current: Mutex::new(first),
            loaded: Mutex::new(loaded),
            loading: Mutex::new(()),
            dir,
            opts,
            embeddings_dir,
        }
    }

    /// Reads the embeddings folder again for every loaded model (`/refresh-embeddings`); jobs
    /// already queued keep the model they were planned with. Blocking: call it off the async
    /// threads.
    pub fn refresh_embeddings(&self) -> Result<(), ApiError> {
        let Some(dir) = &self.embeddings_dir else {
            return Ok(());
        };
        let _one_at_a_time = lock(&self.loading);
        let old: Vec<Arc<Model>> = lock(&self.loaded).values().cloned().collect();
        let mut new = HashMap::new();
        for m in old {
            let fresh = Arc::new((*m).clone().with_embeddings_dir(dir)?);
            new.insert(m.path.clone(), fresh);
        }
        let mut current = lock(&self.current);
        if let Some(m) = new.get(&current.path) {
            *current = m.clone();
        }
        *lock(&self.loaded) = new;
        Ok(())
    }

    /// The model requests use without `sd_model_checkpoint`.
    pub fn current(&self) -> Arc<Model> {
        lock(&self.current).clone()
    }

    /// Makes `model` the current one.
    pub fn set_current(&self, model: Arc<Model>) {
        *lock(&self.current) = model;
    }

    /// The diffusers folders of `--models-dir` (sorted).
    pub fn available(&self) -> Vec<PathBuf> {
        let Some(dir) = &self.dir else {
            return Vec::new();
        };
        let Ok(rd) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut v: Vec<PathBuf> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.join("model_index.json").is_file())
            .collect();
        v.sort();
        v
    }

    /// Every loaded model.
    pub fn loaded(&self) -> Vec<Arc<Model>> {
        let mut v: Vec<_> = lock(&self.loaded).values().cloned().collect();
        v.sort_by(|a, b| a.path.cmp(&b.path));
        v
    }

    /// The model `name` designates (a loaded model's title or folder, or a folder of
    /// `--models-dir`), loading it once if needed. Blocking: call it off the async threads.
    /// Errors name `field`.
    pub fn get(&self, name: &str, field: &str) -> Result<Arc<Model>, ApiError> {
        let name = strip_hash(name);
        if let Some(m) = lock(&self.loaded).values().find(|m| m.answers_to(name)) {
            return Ok(m.clone());
        }
        let Some(path) = self
            .available()
            .into_iter()
            .find(|p| p.file_name().is_some_and(|f| f.to_string_lossy() == name))
        else {
            let mut known: Vec<String> =
                self.loaded().iter().map(|m| m.title().to_owned()).collect();
            known.extend(
                self.available()
                    .iter()
                    .filter_map(|p| p.file_name().map(|f| f.to_string_lossy().into_owned())),
            );
            known.sort();
            known.dedup();
            return Err(ApiError::invalid(
                field,
                format!(
                    "{name:?}: no such model; this server has {} (see /sdapi/v1/sd-models)",
                    known.join(", ")
                ),
            ));
        };
        let _one_at_a_time = lock(&self.loading);
        if let Some(m) = lock(&self.loaded).get(&path) {
            return Ok(m.clone());
        }
        log::info!("loading {}", path.display());
        let sd = StableDiffusion::load(&path, &self.opts).map_err(|e| {
            ApiError::invalid(
                field,
                format!("{name:?}: cannot load {}: {e}", path.display()),
            )
        })?;
        let title = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut model = Model::new(sd, title, &path, A1111_STEPS, A1111_CFG)?;
        if let Some(dir) = &self.embeddings_dir {
            model = model.with_embeddings_dir(dir)?;
        }
        let model = Arc::new(model);
        lock(&self.loaded).insert(path, model.clone());
        Ok(model)
    }
}
