//! Single-file checkpoints in the original LDM (SD 1.x/2.x) and SGM (SDXL) layout: one
//! safetensors file holding the UNet (`model.diffusion_model.`), the VAE (`first_stage_model.`)
//! and the text encoder(s) (`cond_stage_model.` / `conditioner.embedders.N.`), as model sites
//! distribute them. [`Checkpoint::open`] memory-maps the file and detects the family; the
//! `*_map` methods give each component's tensors under diffusers/transformers names.
//!
//! Mirrors diffusers' `from_single_file` (`loaders/single_file_utils.py`:
//! `infer_diffusers_model_type`, `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
//! `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sd_core::{Error, Result, WeightFiles, WeightMap};

use crate::{clip, unet, vae};

/// The UNet's prefix in LDM/SGM checkpoints.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// The VAE's prefix.
pub const VAE_PREFIX: &str = "first_stage_model.";

/// The model families a single-file checkpoint can hold (and sd-rs runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// SD 1.x: CLIP ViT-L at `cond_stage_model.transformer.`.
    Sd1,
    /// SD 2.x: OpenCLIP ViT-H at `cond_stage_model.model.` (its last layer unused).
    Sd2,
    /// SDXL base: CLIP ViT-L at `conditioner.embedders.0.transformer.` and OpenCLIP bigG at
    /// `conditioner.embedders.1.model.`.
    Sdxl,
    /// SDXL refiner: OpenCLIP bigG only, at `conditioner.embedders.0.model.`.
    SdxlRefiner,
}

impl Family {
    /// A short name (`sd1`, `sd2`, `sdxl`, `sdxl-refiner`), as the shipped config folders.
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "sd1",
            Family::Sd2 => "sd2",
            Family::Sdxl => "sdxl",
            Family::SdxlRefiner => "sdxl-refiner",
        }
    }

    /// A human name for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Family::Sd1 => "SD 1.x",
            Family::Sd2 => "SD 2.x",
            Family::Sdxl => "SDXL base",
            Family::SdxlRefiner => "SDXL refiner",
        }
    }

    /// The diffusers component names of the text encoders, with the file prefix and kind of
    /// each.
    pub fn text_encoders(self) -> &'static [(&'static str, &'static str, TextEncoderKind)] {
        use TextEncoderKind::{Clip, OpenClip};
        match self {
            Family::Sd1 => &[("text_encoder", "cond_stage_model.transformer.", Clip)],
            Family::Sd2 => &[("text_encoder", "cond_stage_model.model.", OpenClip)],
            Family::Sdxl => &[
                ("text_encoder", "conditioner.embedders.0.transformer.", Clip),
                ("text_encoder_2", "conditioner.embedders.1.model.", OpenClip),
            ],
            Family::SdxlRefiner => {
                &[("text_encoder_2", "conditioner.embedders.0.model.", OpenClip)]
            }
        }
    }
}

/// How a text encoder is stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEncoderKind {
    /// transformers' CLIPTextModel names under the prefix (`text_model.…`).
    Clip,
    /// open_clip names (`transformer.resblocks.N.attn.in_proj_weight`, `text_projection`, …).
    OpenClip,
}

/// A memory-mapped single-file checkpoint and its detected family.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    files: Arc<WeightFiles>,
    family: Family,
    path: PathBuf,
}

/// Extensions of pickled PyTorch files, refused without being opened further.
const PICKLE_EXTENSIONS: &[&str] = &["ckpt", "pt", "pth", "bin", "pkl"];

/// Refuses pickled files (by extension, and by content: a zip archive or a pickle stream),
/// which sd-rs never unpickles because unpickling can run arbitrary code.
pub fn refuse_pickle(path: &Path, what: &str) -> Result<()> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let refuse = |found: &str| {
        Err(Error::unsupported(format!(
            "{}: {found}, a pickled PyTorch file; sd-rs loads {what} from .safetensors only, \
             because unpickling can run arbitrary code. Convert it once in Python (load it with \
             torch.load(weights_only=True) and save it with safetensors.torch.save_file), or \
             download the .safetensors version",
            path.display()
        )))
    };
    if PICKLE_EXTENSIONS.contains(&ext.as_str()) {
        return refuse(&format!("a .{ext} file"));
    }
    let mut head = [0u8; 4];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| Error::io(path, e))?;
    if n >= 4 && &head == b"PK\x03\x04" {
        return refuse("a zip archive (torch.save's format)");
    }
    if n >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]) {
        return refuse("a pickle stream");
    }
    Ok(())
}

impl Checkpoint {
    /// Opens `path` (a `.safetensors` single-file checkpoint) and detects its family.
    ///
    /// Pickled files (`.ckpt`, `.pt`, `.bin`, …) are refused unopened. Inpainting and other
    /// UNets whose input is not 4 latent channels are refused with a message naming them.
    pub fn open(path: &Path) -> Result<Self> {
        refuse_pickle(path, "checkpoints")?;
        let files = WeightFiles::open(&[path.to_path_buf()])?;
        let family = detect(&files, path)?;
        Ok(Self {
            files: Arc::new(files),
            family,
            path: path.to_path_buf(),
        })
    }

    /// The detected family.
    pub fn family(&self) -> Family {
        self.family
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The memory-mapped file.
    pub fn files(&self) -> &Arc<WeightFiles> {
        &self.files
    }

    /// The UNet's tensors under diffusers' `UNet2DConditionModel` names; `layers_per_block`
    /// comes from the UNet config (2 for every released SD model).
    pub fn unet_map(&self, layers_per_block: usize) -> Result<WeightMap> {
        unet::map(self.files.clone(), UNET_PREFIX, layers_per_block).map(|m| m.with_label("unet"))
    }

    /// The VAE's tensors under diffusers' `AutoencoderKL` names.
    pub fn vae_map(&self) -> Result<WeightMap> {
        Ok(vae::map(self.files.clone(), VAE_PREFIX).with_label("vae"))
    }

    /// The text encoder `component` (`text_encoder` or `text_encoder_2`) under transformers'
    /// names, for a model of `num_layers` layers; `with_projection` keeps OpenCLIP's
    /// `text_projection` (SDXL's `CLIPTextModelWithProjection`).
    ///
    /// SD 2.x files hold 24 OpenCLIP layers and diffusers' text encoder uses 23 (SD 2 takes
    /// the penultimate layer): the file's layer `num_layers` and its `text_projection` are
    /// dropped, as diffusers' `SD_2_TEXT_ENCODER_KEYS_TO_IGNORE`.
    pub fn text_encoder_map(
        &self,
        component: &str,
        num_layers: usize,
        with_projection: bool,
    ) -> Result<WeightMap> {
        let Some(&(_, prefix, kind)) = self
            .family
            .text_encoders()
            .iter()
            .find(|(c, _, _)| *c == component)
        else {
            return Err(Error::invalid_argument(
                "text encoder component",
                component,
                format!(
                    "one of the {} text encoders ({})",
                    self.family.describe(),
                    self.family
                        .text_encoders()
                        .iter()
                        .map(|(c, _, _)| *c)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        };
        let map = match kind {
            TextEncoderKind::Clip => clip::clip_map(self.files.clone(), prefix),
            TextEncoderKind::OpenClip => {
                let drop_last = self.family == Family::Sd2;
                clip::open_clip_map(
                    self.files.clone(),
                    prefix,
                    num_layers,
                    drop_last,
                    with_projection && !drop_last,
                )?
            }
        };
        Ok(map.with_label(component))
    }

    /// SD 2.x: whether the UNet was trained for v-prediction, by the weight statistic ComfyUI
    /// uses (`comfy/supported_models.py`, SD20): the population standard deviation of
    /// `output_blocks.11.1.transformer_blocks.0.norm1.bias` is above 0.09 for the 768-pixel
    /// v-prediction models (2.0-v, 2.1) and below for the 512-pixel epsilon ones (2.0-base,
    /// 2.1-base). `None` when the tensor is absent (not a full-size SD 2 UNet) or unreadable.
    pub fn sd2_v_prediction_statistic(&self) -> Option<bool> {
        let key = format!("{UNET_PREFIX}output_blocks.11.1.transformer_blocks.0.norm1.bias");
        let t = self
            .files
            .load(&key, candle_core::DType::F32, &candle_core::Device::Cpu)
            .ok()?;
        let v = t.flatten_all().ok()?.to_vec1::<f32>().ok()?;
        if v.is_empty() {
            return None;
        }
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        Some(var.sqrt() > 0.09)
    }
}

/// Detects the family from the keys, as diffusers' `infer_diffusers_model_type`, but by the
/// text encoders' prefixes rather than by real-model widths (the same answer on released
/// checkpoints, and it also holds for the tiny test models).
fn detect(files: &WeightFiles, path: &Path) -> Result<Family> {
    let has = |prefix: &str| files.names().any(|k| k.starts_with(prefix));
    if !has(UNET_PREFIX) {
        let diffusers_like = files.names().any(|k| k.starts_with("down_blocks."));
        let hint = if diffusers_like {
            "its keys look like a diffusers UNet file (`down_blocks.…`): load the diffusers \
             folder it belongs to instead"
        } else if files
            .names()
            .any(|k| k.starts_with("lora_") || k.contains("lora_A") || k.contains("lora_down"))
        {
            "it looks like a LoRA file: pass it with --lora"
        } else {
            "expected a single-file Stable Diffusion checkpoint"
        };
        return Err(Error::unsupported(format!(
            "{}: no `{UNET_PREFIX}…` tensors; {hint}",
            path.display()
        )));
    }
    let in_key = format!("{UNET_PREFIX}input_blocks.0.0.weight");
    if let Some(shape) = files.shape(&in_key) {
        let channels = shape.get(1).copied().unwrap_or(0);
        if channels != 4 {
            let what = match channels {
                9 => {
                    "an inpainting checkpoint (9 UNet input channels: latents, mask, masked image)"
                }
                8 => "an instruct-pix2pix style checkpoint (8 UNet input channels)",
                _ => "a UNet with an unusual number of input channels",
            };
            return Err(Error::unsupported(format!(
                "{}: {what}; sd-rs runs text-to-image UNets with 4 input channels (inpainting \
                 is not supported yet)",
                path.display()
            )));
        }
    }
    let family = if has("conditioner.embedders.1.model.") {
        Family::Sdxl
    } else if has("conditioner.embedders.0.model.") {
        Family::SdxlRefiner
    } else if has("cond_stage_model.model.") {
        Family::Sd2
    } else if has("cond_stage_model.transformer.") {
        Family::Sd1
    } else {
        return Err(Error::unsupported(format!(
            "{}: a UNet without a text encoder (no `cond_stage_model.…` or \
             `conditioner.embedders.…` tensors); sd-rs needs a full checkpoint",
            path.display()
        )));
    };
    for (component, prefix, _) in family.text_encoders() {
        if !has(prefix) {
            return Err(Error::unsupported(format!(
                "{}: looks like {} but has no `{prefix}…` tensors for its {component}",
                path.display(),
                family.describe()
            )));
        }
    }
    if !has(VAE_PREFIX) {
        return Err(Error::unsupported(format!(
            "{}: no VAE (`{VAE_PREFIX}…` tensors); sd-rs needs a full checkpoint",
            path.display()
        )));
    }
    Ok(family)
}
