//! Where the components' weights come from. Every UNet and text encoder is built from a
//! [`WeightMap`] (a diffusers folder's own files seen as they are, or a single-file checkpoint
//! through sd-formats' key conversion), kept as the component's base weights so that LoRAs can
//! be merged in later without reading the files again.
//!
//! Single-file LDM/SGM checkpoints (`model.safetensors` as model sites distribute them) load as
//! diffusers' `from_single_file`: the family is detected from the keys, the configs come from the
//! family's shipped configs (offline) or from a diffusers folder / hub id given as `config`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sd_clip::{ClipTextConfig, ClipTextModel};
use sd_core::{Error, LoadOptions, Result, VarBuilder, WeightFiles, WeightMap};
use sd_formats::{Checkpoint, Family, ShippedConfig};
use sd_schedulers::PredictionType;
use sd_unet::{UNet2DConditionModel, UNetConfig};
use sd_vae::{AutoencoderKL, VaeConfig};

use crate::model_index::{ModelFamily, ModelIndex};
use crate::pipeline::StableDiffusion;

/// Where a model's weights come from.
pub(crate) enum Weights<'a> {
    /// The diffusers folder's own component files.
    Folder,
    /// A single-file checkpoint.
    SingleFile(&'a Checkpoint),
}

/// Options of a single-file load.
#[derive(Debug, Clone, Default)]
pub struct SingleFileOptions {
    /// A diffusers folder whose configs, tokenizers and scheduler config are used (as
    /// diffusers' `from_single_file(..., config=...)`); `None` uses the configs shipped for the
    /// detected family. A hub id is resolved by the caller ([`crate::hub::resolve_config`]).
    pub config: Option<PathBuf>,
    /// Overrides the prediction type (`epsilon` / `v_prediction`), which the file does not
    /// record. Without it: the config's; for SD 2.x with the shipped configs, see
    /// [`StableDiffusion::load_single_file`].
    pub prediction_type: Option<PredictionType>,
}

/// The weights of one component as a [`WeightMap`] (so that LoRA deltas can be merged into it
/// later), with the config folder and load options it was built with.
#[derive(Debug, Clone)]
pub(crate) struct ComponentSource {
    /// The base weights (no deltas).
    pub map: WeightMap,
    /// The component's config folder.
    pub dir: PathBuf,
    /// How it was loaded.
    pub opts: LoadOptions,
}

fn load_with<T>(
    map: WeightMap,
    opts: &LoadOptions,
    build: impl FnOnce(&VarBuilder) -> Result<T>,
) -> Result<T> {
    let vb = VarBuilder::from_map(map, opts.dtype, &opts.device);
    let model = build(&vb)?;
    vb.finish()?;
    Ok(model)
}

/// A diffusers component folder's own weight files, seen through an identity [`WeightMap`].
fn folder_map(dir: &Path, stem: &str, opts: &LoadOptions) -> Result<WeightMap> {
    let (files, note) = sd_core::resolve_weight_files(dir, stem, opts.variant.as_deref())?;
    if let Some(note) = note {
        log::warn!("{note}");
    }
    Ok(WeightMap::identity(Arc::new(WeightFiles::open(&files)?)))
}

/// The text encoder `name` (config in `dir`): its weight source and the model.
pub(crate) fn text_encoder(
    weights: &Weights<'_>,
    dir: &Path,
    name: &str,
    opts: &LoadOptions,
) -> Result<(ComponentSource, ClipTextModel)> {
    let config = ClipTextConfig::read(&dir.join("config.json"))?;
    let map = match weights {
        Weights::Folder => folder_map(dir, "model", opts)?,
        Weights::SingleFile(ck) => {
            // SDXL's second encoder is CLIPTextModelWithProjection (its config says so).
            let with_projection = config.with_projection.unwrap_or(name == "text_encoder_2");
            ck.text_encoder_map(name, config.num_layers, with_projection)?
        }
    };
    let source = ComponentSource {
        map,
        dir: dir.to_path_buf(),
        opts: opts.clone(),
    };
    let model = text_encoder_from(&source, None)?;
    Ok((source, model))
}

/// Builds the text encoder of `source`, with `map` (the source's map plus deltas) if given.
pub(crate) fn text_encoder_from(
    source: &ComponentSource,
    map: Option<WeightMap>,
) -> Result<ClipTextModel> {
    let config = ClipTextConfig::read(&source.dir.join("config.json"))?;
    let map = map.unwrap_or_else(|| source.map.clone());
    load_with(map, &source.opts, |vb| ClipTextModel::new(config, vb))
}

/// The UNet (config in `dir`): its weight source and the model.
pub(crate) fn unet(
    weights: &Weights<'_>,
    dir: &Path,
    opts: &LoadOptions,
) -> Result<(ComponentSource, UNet2DConditionModel)> {
    let map = match weights {
        Weights::Folder => folder_map(dir, "diffusion_pytorch_model", opts)?,
        Weights::SingleFile(ck) => {
            let config = UNetConfig::from_file(&dir.join("config.json"))?;
            ck.unet_map(layers_per_block(&config))?
        }
    };
    let source = ComponentSource {
        map,
        dir: dir.to_path_buf(),
        opts: opts.clone(),
    };
    let model = unet_from(&source, None)?;
    Ok((source, model))
}

/// LDM numbers the UNet blocks flat, (layers_per_block + 1) entries per level.
pub(crate) fn layers_per_block(config: &UNetConfig) -> usize {
    config.down_blocks.first().map_or(0, |b| b.num_layers)
}

/// Builds the UNet of `source`, with `map` (the source's map plus deltas) if given.
pub(crate) fn unet_from(
    source: &ComponentSource,
    map: Option<WeightMap>,
) -> Result<UNet2DConditionModel> {
    let config = UNetConfig::from_file(&source.dir.join("config.json"))?;
    let map = map.unwrap_or_else(|| source.map.clone());
    load_with(map, &source.opts, |vb| {
        UNet2DConditionModel::from_config(config, vb)
    })
}

/// The VAE from the checkpoint, with the config in `dir`; f16 with `force_upcast` computes in
/// f32, as [`AutoencoderKL::load`].
pub(crate) fn vae(ck: &Checkpoint, dir: &Path, opts: &LoadOptions) -> Result<AutoencoderKL> {
    let config = VaeConfig::from_file(&dir.join("config.json"))?;
    let dtype = match opts.dtype {
        candle_core::DType::F16 if config.force_upcast => candle_core::DType::F32,
        d => d,
    };
    let vae_opts = LoadOptions {
        dtype,
        ..opts.clone()
    };
    load_with(ck.vae_map()?, &vae_opts, |vb| {
        AutoencoderKL::from_var_builder(vb, config)
    })
}

fn expected_family(f: Family) -> ModelFamily {
    match f {
        Family::Sd1 | Family::Sd2 => ModelFamily::Sd,
        Family::Sdxl => ModelFamily::Sdxl,
        Family::SdxlRefiner => ModelFamily::SdxlRefiner,
    }
}

/// The config folder for `ck`: `opts.config`, or the shipped one. For SD 2.x without a
/// config or an explicit prediction type, the weight statistic decides (see
/// [`Checkpoint::sd2_v_prediction_statistic`]); without the statistic, 2.1 (v-prediction).
fn config_dir(ck: &Checkpoint, opts: &SingleFileOptions) -> Result<PathBuf> {
    if let Some(dir) = &opts.config {
        let index = ModelIndex::read(dir)?;
        let have = index.family()?;
        let want = expected_family(ck.family());
        if have != want {
            return Err(Error::config(
                &index.path,
                Some("_class_name"),
                format!(
                    "describes a {have:?} pipeline, but {} is a {} checkpoint",
                    ck.path().display(),
                    ck.family().describe()
                ),
            ));
        }
        return Ok(dir.clone());
    }
    let shipped = match ck.family() {
        Family::Sd2 => {
            let v = match opts.prediction_type {
                Some(p) => p == PredictionType::VPrediction,
                None => match ck.sd2_v_prediction_statistic() {
                    Some(v) => {
                        log::info!(
                            "{}: SD 2.x weights look like {} (norm1.bias statistic); pass \
                             --prediction-type to override",
                            ck.path().display(),
                            if v {
                                "2.x 768-v (v-prediction)"
                            } else {
                                "2.x-base (epsilon)"
                            }
                        );
                        v
                    }
                    None => {
                        log::warn!(
                            "{}: cannot tell SD 2.x v-prediction from epsilon; using 2.1's \
                             v-prediction (pass --prediction-type epsilon for 2.x-base models)",
                            ck.path().display()
                        );
                        true
                    }
                },
            };
            if v {
                ShippedConfig::Sd2V
            } else {
                ShippedConfig::Sd2Base
            }
        }
        f => ShippedConfig::for_family(f),
    };
    sd_formats::config_folder(shipped)
}

impl StableDiffusion {
    /// Loads a single-file checkpoint (`.safetensors` in the LDM/SGM layout), as diffusers'
    /// `from_single_file`: SD 1.x, SD 2.x, SDXL base or refiner, detected from the keys.
    ///
    /// Configs come from `sf.config` (a diffusers folder) or from those shipped for the family
    /// (SD 1.5, SD 2.1 / 2.1-base, SDXL 1.0 base and refiner). SD 2.x files do not say whether
    /// they predict v or epsilon: `sf.prediction_type` decides; otherwise, with the shipped
    /// configs, the weight statistic ComfyUI uses (v-prediction when the standard deviation of
    /// `output_blocks.11.1.transformer_blocks.0.norm1.bias` exceeds 0.09, the 2.x-base config
    /// with epsilon and 512 px otherwise); with `sf.config`, that config's scheduler.
    ///
    /// Pickled `.ckpt`/`.pt` files are refused (never unpickled); inpainting checkpoints are
    /// refused with a message saying so. Loading is strict, and the report names the file's keys.
    pub fn load_single_file(
        path: &Path,
        opts: &LoadOptions,
        sf: &SingleFileOptions,
    ) -> Result<Self> {
        Self::load_single_file_sharing(path, opts, sf, None)
    }

    /// [`StableDiffusion::load_single_file`] for an SDXL refiner checkpoint, sharing the base's
    /// `text_encoder_2` and VAE (as [`StableDiffusion::load_refiner`]).
    pub fn load_single_file_refiner(
        path: &Path,
        base: &StableDiffusion,
        opts: &LoadOptions,
        sf: &SingleFileOptions,
    ) -> Result<Self> {
        Self::load_single_file_sharing(path, opts, sf, Some(base))
    }

    fn load_single_file_sharing(
        path: &Path,
        opts: &LoadOptions,
        sf: &SingleFileOptions,
        base: Option<&StableDiffusion>,
    ) -> Result<Self> {
        let ck = Checkpoint::open(path)?;
        let dir = config_dir(&ck, sf)?;
        let mut sd = Self::load_from(&dir, &Weights::SingleFile(&ck), opts, base)?;
        if sf.prediction_type.is_some() {
            sd.set_prediction_type(sf.prediction_type);
        }
        Ok(sd)
    }
}
