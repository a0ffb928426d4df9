//! `model_index.json`: which pipeline a folder holds and which components it names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sd_core::config::read_json;
use sd_core::{Error, Result};
use serde::Deserialize;

/// The model families sd-rs runs, detected from `model_index.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// SD 1.x / 2.x (`StableDiffusionPipeline`, one CLIP text encoder).
    Sd,
    /// SDXL base (`StableDiffusionXLPipeline`, two text encoders, pooled embeddings, size
    /// micro-conditioning).
    Sdxl,
    /// SDXL refiner (`StableDiffusionXLImg2ImgPipeline` with `text_encoder_2` only and
    /// aesthetic-score conditioning).
    SdxlRefiner,
}

/// The parsed `model_index.json` of a diffusers folder.
#[derive(Debug, Clone)]
pub struct ModelIndex {
    /// `_class_name`, e.g. `StableDiffusionXLPipeline`.
    pub class_name: String,
    /// Components present (non-null), with their `[library, class]`.
    pub components: BTreeMap<String, (String, String)>,
    /// `force_zeros_for_empty_prompt` (SDXL): zero negative embeddings when no negative prompt.
    pub force_zeros_for_empty_prompt: bool,
    /// `requires_aesthetics_score` (SDXL refiner): 5 time ids with an aesthetic score.
    pub requires_aesthetics_score: bool,
    /// The file, for error messages.
    pub path: PathBuf,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "_class_name")]
    class_name: String,
    #[serde(default)]
    force_zeros_for_empty_prompt: Option<bool>,
    #[serde(default)]
    requires_aesthetics_score: Option<bool>,
    #[serde(flatten)]
    rest: BTreeMap<String, serde_json::Value>,
}

impl ModelIndex {
    /// Reads `dir/model_index.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("model_index.json");
        let raw: Raw = read_json(&path)?;
        let mut components = BTreeMap::new();
        for (name, v) in &raw.rest {
            if name.starts_with('_') {
                continue;
            }
            // Components are [library, class] pairs, [null, null] when absent; other keys are flags.
            if let Some([lib, class]) = v.as_array().map(Vec::as_slice) {
                if let (Some(lib), Some(class)) = (lib.as_str(), class.as_str()) {
                    components.insert(name.clone(), (lib.to_owned(), class.to_owned()));
                }
            }
        }
        Ok(Self {
            class_name: raw.class_name,
            components,
            force_zeros_for_empty_prompt: raw.force_zeros_for_empty_prompt.unwrap_or(true),
            requires_aesthetics_score: raw.requires_aesthetics_score.unwrap_or(false),
            path,
        })
    }

    /// Whether the index names `component` (and it is not null).
    pub fn has(&self, component: &str) -> bool {
        self.components.contains_key(component)
    }

    /// The family this folder holds; an unsupported pipeline class is an error naming it.
    pub fn family(&self) -> Result<ModelFamily> {
        match self.class_name.as_str() {
            "StableDiffusionPipeline" | "StableDiffusionImg2ImgPipeline" => Ok(ModelFamily::Sd),
            "StableDiffusionXLPipeline" | "StableDiffusionXLImg2ImgPipeline" => {
                if self.has("text_encoder") {
                    Ok(ModelFamily::Sdxl)
                } else if self.has("text_encoder_2") {
                    Ok(ModelFamily::SdxlRefiner)
                } else {
                    Err(Error::config(
                        &self.path,
                        Some("text_encoder_2"),
                        "an SDXL pipeline needs text_encoder_2 (and text_encoder for the base)",
                    ))
                }
            }
            other => Err(Error::config(
                &self.path,
                Some("_class_name"),
                format!(
                    "pipeline `{other}` is not supported; expected StableDiffusionPipeline, \
                     StableDiffusionImg2ImgPipeline, StableDiffusionXLPipeline or \
                     StableDiffusionXLImg2ImgPipeline"
                ),
            )),
        }
    }
}
