//! `vae/config.json`: the raw serde mirror of diffusers'
//! [`AutoencoderKL`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/autoencoders/autoencoder_kl.py)
//! config ([`VaeConfigJson`], field for field with diffusers' defaults) and the resolved,
//! validated [`VaeConfig`] the model is built from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use sd_core::config::{read_json, unknown_keys, OneOrMany};
use sd_core::{Error, Result};

/// `vae/config.json` exactly as diffusers writes it (unknown keys land in `extra`).
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfigJson {
    /// Image channels in (3).
    #[serde(default = "three")]
    pub in_channels: usize,
    /// Image channels out (3).
    #[serde(default = "three")]
    pub out_channels: usize,
    /// One entry per encoder block; only `DownEncoderBlock2D` is supported.
    #[serde(default = "default_down")]
    pub down_block_types: Vec<String>,
    /// One entry per decoder block; only `UpDecoderBlock2D` is supported.
    #[serde(default = "default_up")]
    pub up_block_types: Vec<String>,
    /// Channels of each encoder block (the decoder uses them reversed).
    #[serde(default = "default_channels")]
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per encoder block (the decoder has one more).
    #[serde(default = "one")]
    pub layers_per_block: usize,
    /// Activation; only `silu` (alias `swish`) is supported.
    #[serde(default = "silu")]
    pub act_fn: String,
    /// Latent channels (4 for SD).
    #[serde(default = "four")]
    pub latent_channels: usize,
    /// Groups of every group norm.
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    /// Training image size; sets the default tile size of tiled encoding/decoding.
    #[serde(default = "default_sample_size")]
    pub sample_size: OneOrMany<usize>,
    /// Latents are multiplied by this after encoding (0.18215 for SD 1.x/2.x, 0.13025 for SDXL).
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    /// Subtracted from the latents before scaling (newer VAEs; `null` for SD).
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Per-channel latent mean (SDXL pipelines use it when set together with `latents_std`).
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    /// Per-channel latent std (see `latents_mean`).
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// Run the VAE in float32 when the pipeline runs in float16 (SDXL's VAE overflows in f16).
    #[serde(default = "yes")]
    pub force_upcast: bool,
    /// Whether `quant_conv` exists (1x1 conv after the encoder).
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    /// Whether `post_quant_conv` exists (1x1 conv before the decoder).
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    /// Whether the encoder and decoder mid blocks have an attention layer.
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    /// Keys sd-rs does not know (reported with a warning; `_`-prefixed metadata is ignored).
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn one() -> usize {
    1
}
fn thirty_two() -> usize {
    32
}
fn yes() -> bool {
    true
}
fn silu() -> String {
    "silu".into()
}
fn default_down() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn default_up() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn default_channels() -> Vec<usize> {
    vec![64]
}
fn default_sample_size() -> OneOrMany<usize> {
    OneOrMany::One(32)
}
fn default_scaling() -> f64 {
    0.18215
}

/// How latents are normalised for the diffusion model (applied by
/// [`AutoencoderKL::latents_from_image`](crate::AutoencoderKL::latents_from_image) and undone by
/// [`AutoencoderKL::image_from_latents`](crate::AutoencoderKL::image_from_latents)).
#[derive(Debug, Clone, PartialEq)]
pub enum LatentNormalization {
    /// `scaled = (z - shift) * scaling_factor`; SD 1.x/2.x/SDXL have no shift.
    Scale {
        /// `scaling_factor`.
        scaling_factor: f64,
        /// `shift_factor`, when the config sets it.
        shift_factor: Option<f64>,
    },
    /// `scaled = (z - mean[c]) * scaling_factor / std[c]` (diffusers' SDXL pipelines, when the
    /// config sets both `latents_mean` and `latents_std`).
    PerChannel {
        /// `scaling_factor`.
        scaling_factor: f64,
        /// `latents_mean`, one per latent channel.
        mean: Vec<f64>,
        /// `latents_std`, one per latent channel.
        std: Vec<f64>,
    },
}

/// The validated config an [`AutoencoderKL`](crate::AutoencoderKL) is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    /// Image channels in.
    pub in_channels: usize,
    /// Image channels out.
    pub out_channels: usize,
    /// Channels of each encoder block (the decoder uses them reversed).
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per encoder block (the decoder has one more).
    pub layers_per_block: usize,
    /// Latent channels.
    pub latent_channels: usize,
    /// Groups of every group norm.
    pub norm_num_groups: usize,
    /// Training image size (height; diffusers uses the first entry of a list).
    pub sample_size: usize,
    /// `scaling_factor` of the config.
    pub scaling_factor: f64,
    /// `shift_factor` of the config.
    pub shift_factor: Option<f64>,
    /// The latent normalisation the pipeline-facing helpers apply.
    pub latent_normalization: LatentNormalization,
    /// Decode/encode in float32 when loaded in float16.
    pub force_upcast: bool,
    /// Whether `quant_conv` exists.
    pub use_quant_conv: bool,
    /// Whether `post_quant_conv` exists.
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks have attention.
    pub mid_block_add_attention: bool,
    /// The file this config came from (for error messages).
    pub path: PathBuf,
}

impl VaeConfig {
    /// Reads and validates `path` (a `vae/config.json`); unknown keys are logged as warnings.
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: VaeConfigJson = read_json(path)?;
        Self::from_json(raw, path)
    }

    /// Validates a parsed config that came from `path`.
    pub fn from_json(raw: VaeConfigJson, path: &Path) -> Result<Self> {
        let unknown = unknown_keys(&raw.extra);
        if !unknown.is_empty() {
            log::warn!(
                "{}: ignoring unknown AutoencoderKL config keys {unknown:?}",
                path.display()
            );
        }
        Self::try_from((raw, path.to_path_buf()))
    }

    /// The spatial downsampling factor, `2^(len(block_out_channels) - 1)` (8 for SD; saturating
    /// for a config [`VaeConfig::validate`] refuses).
    pub fn scale_factor(&self) -> usize {
        let shift = self.block_out_channels.len().saturating_sub(1);
        u32::try_from(shift)
            .ok()
            .and_then(|s| 1usize.checked_shl(s))
            .unwrap_or(usize::MAX)
    }

    /// diffusers' default `tile_latent_min_size`: `int(sample_size / scale_factor)`.
    pub fn tile_latent_size(&self) -> usize {
        self.sample_size / self.scale_factor()
    }

    /// Checks that a model can be built from this config and run without index or arithmetic
    /// failures (the fields are public, so a config can be built by hand):
    /// 1 to [`MAX_BLOCKS`] blocks of 1 to [`MAX_CHANNELS`] channels, each divisible by
    /// `norm_num_groups`; positive channel and layer counts within bounds; a positive finite
    /// `scaling_factor`; per-channel latent statistics with one finite value per latent channel
    /// (positive std). [`crate::AutoencoderKL::from_var_builder`] calls it; errors are
    /// [`Error::Config`] naming [`VaeConfig::path`] and the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, reason: String| Error::config(&self.path, Some(key), reason);
        let n = self.block_out_channels.len();
        if n == 0 || n > MAX_BLOCKS {
            return Err(bad(
                "block_out_channels",
                format!("has {n} entries, expected 1 to {MAX_BLOCKS} blocks"),
            ));
        }
        if let Some((i, c)) = self
            .block_out_channels
            .iter()
            .enumerate()
            .find(|(_, c)| !(1..=MAX_CHANNELS).contains(*c))
        {
            return Err(bad(
                "block_out_channels",
                format!("entry {i} is {c}, expected a channel count from 1 to {MAX_CHANNELS}"),
            ));
        }
        let groups = self.norm_num_groups;
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| groups == 0 || !c.is_multiple_of(groups))
        {
            return Err(bad(
                "norm_num_groups",
                format!("{groups} does not divide the {c} channels of a block"),
            ));
        }
        for (key, v, max) in [
            ("in_channels", self.in_channels, MAX_CHANNELS),
            ("out_channels", self.out_channels, MAX_CHANNELS),
            ("latent_channels", self.latent_channels, MAX_CHANNELS),
            ("layers_per_block", self.layers_per_block, MAX_LAYERS),
        ] {
            if v == 0 || v > max {
                return Err(bad(key, format!("is {v}, expected 1 to {max}")));
            }
        }
        // 0 is accepted (no automatic tiling), as diffusers loads such a config.
        if self.sample_size > MAX_SAMPLE_SIZE {
            return Err(bad(
                "sample_size",
                format!(
                    "is {}, expected at most {MAX_SAMPLE_SIZE}",
                    self.sample_size
                ),
            ));
        }
        let scaling_factor = match &self.latent_normalization {
            LatentNormalization::Scale { scaling_factor, .. }
            | LatentNormalization::PerChannel { scaling_factor, .. } => *scaling_factor,
        };
        for s in [self.scaling_factor, scaling_factor] {
            if !(s.is_finite() && s > 0.0) {
                return Err(bad(
                    "scaling_factor",
                    format!("{s} is not a positive number"),
                ));
            }
        }
        if let Some(s) = self.shift_factor.filter(|s| !s.is_finite()) {
            return Err(bad("shift_factor", format!("{s} is not a finite number")));
        }
        if let LatentNormalization::PerChannel { mean, std, .. } = &self.latent_normalization {
            for (key, v) in [("latents_mean", mean), ("latents_std", std)] {
                if v.len() != self.latent_channels {
                    return Err(bad(
                        key,
                        format!(
                            "has {} entries, expected one per latent channel ({})",
                            v.len(),
                            self.latent_channels
                        ),
                    ));
                }
            }
            if mean.iter().any(|m| !m.is_finite()) {
                return Err(bad("latents_mean", "expected finite values".into()));
            }
            if std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
                return Err(bad("latents_std", "expected positive values".into()));
            }
        }
        Ok(())
    }
}

/// Most blocks (resolution levels) of a VAE: each halves the image.
pub const MAX_BLOCKS: usize = 16;
/// Most channels of a VAE layer (SD: 512).
pub const MAX_CHANNELS: usize = 1 << 16;
/// Most ResNets per block (SD: 2).
pub const MAX_LAYERS: usize = 64;
/// Largest `sample_size` (it only sets the default tile size; SD: 512, SDXL: 1024).
pub const MAX_SAMPLE_SIZE: usize = 1 << 20;

impl TryFrom<(VaeConfigJson, PathBuf)> for VaeConfig {
    type Error = Error;

    fn try_from((raw, path): (VaeConfigJson, PathBuf)) -> Result<Self> {
        let bad = |key: &str, reason: String| Error::config(&path, Some(key), reason);
        let n = raw.block_out_channels.len();
        if n == 0 || n > MAX_BLOCKS {
            return Err(bad(
                "block_out_channels",
                format!("has {n} entries, expected 1 to {MAX_BLOCKS} blocks"),
            ));
        }
        for (key, types, want) in [
            (
                "down_block_types",
                &raw.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &raw.up_block_types, "UpDecoderBlock2D"),
        ] {
            if types.len() != n {
                return Err(bad(
                    key,
                    format!(
                        "has {} entries, expected one per block_out_channels entry ({n})",
                        types.len()
                    ),
                ));
            }
            if let Some(t) = types.iter().find(|t| t.as_str() != want) {
                return Err(bad(
                    key,
                    format!("block type `{t}` is not supported; sd-rs supports `{want}` only"),
                ));
            }
        }
        if raw.act_fn != "silu" && raw.act_fn != "swish" {
            return Err(bad(
                "act_fn",
                format!("`{}` is not supported; expected `silu`", raw.act_fn),
            ));
        }
        let sample_size = match &raw.sample_size {
            OneOrMany::One(s) => *s,
            OneOrMany::Many(v) => *v.first().ok_or_else(|| {
                bad(
                    "sample_size",
                    "is an empty list, expected a size or [height, width]".into(),
                )
            })?,
        };
        let latent_normalization = match (&raw.latents_mean, &raw.latents_std) {
            (Some(mean), Some(std)) => LatentNormalization::PerChannel {
                scaling_factor: raw.scaling_factor,
                mean: mean.clone(),
                std: std.clone(),
            },
            _ => LatentNormalization::Scale {
                scaling_factor: raw.scaling_factor,
                shift_factor: raw.shift_factor,
            },
        };
        let config = Self {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            block_out_channels: raw.block_out_channels,
            layers_per_block: raw.layers_per_block,
            latent_channels: raw.latent_channels,
            norm_num_groups: raw.norm_num_groups,
            sample_size,
            scaling_factor: raw.scaling_factor,
            shift_factor: raw.shift_factor,
            latent_normalization,
            force_upcast: raw.force_upcast,
            use_quant_conv: raw.use_quant_conv,
            use_post_quant_conv: raw.use_post_quant_conv,
            mid_block_add_attention: raw.mid_block_add_attention,
            path,
        };
        config.validate()?;
        Ok(config)
    }
}
