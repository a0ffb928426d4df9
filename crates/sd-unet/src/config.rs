//! The UNet's `config.json`: [`UNetConfigFile`] mirrors diffusers'
//! [`UNet2DConditionModel`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/unets/unet_2d_condition.py)
//! constructor arguments field for field (with diffusers' defaults), and [`UNetConfig`] is the
//! resolved form the model is built from: one entry per block with its channels, heads and
//! transformer depth already worked out.
//!
//! Values that SD 1.x, SD 2.x, SDXL and the SDXL refiner never use (class embeddings, other
//! block types, fourier time embeddings, ...) are refused with an [`Error::Config`] naming the
//! field, never silently ignored.

use std::path::{Path, PathBuf};

use sd_core::config::{read_json, unknown_keys, OneOrMany};
use sd_core::{Error, Result};

mod file;

pub use file::{TransformerLayers, UNetConfigFile};

/// Down-block kinds of the SD UNets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownBlockType {
    /// ResNets only (diffusers' `DownBlock2D`).
    DownBlock2D,
    /// ResNet + Transformer2DModel pairs (diffusers' `CrossAttnDownBlock2D`).
    CrossAttnDownBlock2D,
}

/// Up-block kinds of the SD UNets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpBlockType {
    /// ResNets only (diffusers' `UpBlock2D`).
    UpBlock2D,
    /// ResNet + Transformer2DModel pairs (diffusers' `CrossAttnUpBlock2D`).
    CrossAttnUpBlock2D,
}

/// The spatial transformers of one block (diffusers' `Transformer2DModel`, continuous input).
#[derive(Debug, Clone, PartialEq)]
pub struct TransformerConfig {
    /// Attention heads (diffusers' `attention_head_dim` when `num_attention_heads` is unset).
    pub num_heads: usize,
    /// Channels per head: the block's channels divided by `num_heads`.
    pub head_dim: usize,
    /// BasicTransformerBlocks per Transformer2DModel (`transformer_layers_per_block`).
    pub depth: usize,
    /// Channels of `encoder_hidden_states`.
    pub cross_attention_dim: usize,
    /// `proj_in`/`proj_out` are linear layers (SD 2.x, SDXL) instead of 1x1 convolutions.
    pub use_linear_projection: bool,
    /// Attention scores in f32 (SD 2.1).
    pub upcast_attention: bool,
}

/// One down block: `num_layers` ResNets (each followed by a transformer when `transformer` is
/// set), then a stride-2 downsampler unless it is the last block.
#[derive(Debug, Clone, PartialEq)]
pub struct DownBlockConfig {
    /// The diffusers class.
    pub kind: DownBlockType,
    /// Channels in.
    pub in_channels: usize,
    /// Channels out.
    pub out_channels: usize,
    /// ResNets in the block (`layers_per_block`).
    pub num_layers: usize,
    /// Ends with `downsamplers.0`.
    pub add_downsample: bool,
    /// The transformers of a cross-attention block.
    pub transformer: Option<TransformerConfig>,
}

/// The mid block (`UNetMidBlock2DCrossAttn`): ResNet, transformer, ResNet.
#[derive(Debug, Clone, PartialEq)]
pub struct MidBlockConfig {
    /// Channels (the last of `block_out_channels`).
    pub channels: usize,
    /// The ResNets' output is divided by this (`mid_block_scale_factor`).
    pub output_scale_factor: f64,
    /// The transformer (depth: the last of `transformer_layers_per_block`).
    pub transformer: TransformerConfig,
}

/// One up block: `num_layers` ResNets fed with the concatenated skip connections (each followed
/// by a transformer when `transformer` is set), then an upsampler unless it is the last block.
#[derive(Debug, Clone, PartialEq)]
pub struct UpBlockConfig {
    /// The diffusers class.
    pub kind: UpBlockType,
    /// Channels of the deepest skip connection consumed (diffusers' `in_channels`).
    pub in_channels: usize,
    /// Channels coming from the previous up block (or the mid block).
    pub prev_output_channels: usize,
    /// Channels out.
    pub out_channels: usize,
    /// ResNets in the block (`layers_per_block + 1`).
    pub num_layers: usize,
    /// Ends with `upsamplers.0`.
    pub add_upsample: bool,
    /// The transformers of a cross-attention block.
    pub transformer: Option<TransformerConfig>,
}

/// SDXL's `addition_embed_type: "text_time"`: pooled text embeddings and sinusoidal embeddings
/// of the time ids (sizes, crop, aesthetic score), added to the time embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct TextTimeConfig {
    /// Sinusoidal channels per time id (`addition_time_embed_dim`).
    pub addition_time_embed_dim: usize,
    /// Input channels of `add_embedding` (`projection_class_embeddings_input_dim`):
    /// pooled-text channels + number of time ids × `addition_time_embed_dim`.
    pub projection_class_embeddings_input_dim: usize,
}

/// A resolved UNet configuration: what [`crate::UNet2DConditionModel`] is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    /// Latent channels in.
    pub in_channels: usize,
    /// Channels out (the prediction).
    pub out_channels: usize,
    /// The latent size the model was trained at, (height, width), when the config gives it.
    pub sample_size: Option<(usize, usize)>,
    /// Map the input from [0, 1] to [-1, 1] first.
    pub center_input_sample: bool,
    /// Sinusoidal embeddings as [cos, sin] instead of [sin, cos].
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the sinusoidal embeddings.
    pub freq_shift: f64,
    /// Channels of each resolution level.
    pub block_out_channels: Vec<usize>,
    /// Channels of the time embedding (`time_embedding_dim`, default 4 × the first block's).
    pub time_embed_dim: usize,
    /// Channels of `encoder_hidden_states` (the same for every block).
    pub cross_attention_dim: usize,
    /// SDXL's added conditioning, when `addition_embed_type` is `"text_time"`.
    pub text_time: Option<TextTimeConfig>,
    /// Groups of every group norm.
    pub norm_num_groups: usize,
    /// Epsilon of the ResNet and output group norms (the transformers' use 1e-6 and 1e-5).
    pub norm_eps: f64,
    /// Kernel of `conv_in`.
    pub conv_in_kernel: usize,
    /// Kernel of `conv_out`.
    pub conv_out_kernel: usize,
    /// Padding of the downsamplers' convolutions.
    pub downsample_padding: usize,
    /// The down blocks, in order.
    pub down_blocks: Vec<DownBlockConfig>,
    /// The mid block (`None` when `mid_block_type` is null).
    pub mid_block: Option<MidBlockConfig>,
    /// The up blocks, in order.
    pub up_blocks: Vec<UpBlockConfig>,
}

impl UNetConfig {
    /// Reads and resolves `config.json`; errors name the file and the field.
    pub fn from_file(path: &Path) -> Result<Self> {
        let file: UNetConfigFile = read_json(path)?;
        file.resolve(path)
    }

    /// Parses and resolves config text; `path` is used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let file: UNetConfigFile = sd_core::config::parse_json(text, path)?;
        file.resolve(path)
    }

    /// Factor by which the deepest level is smaller than the input: 2^(number of upsamplers).
    pub fn upsampling_factor(&self) -> usize {
        1 << self.up_blocks.iter().filter(|b| b.add_upsample).count()
    }
}

/// A [`UNetConfigFile`] with the path it came from, so that errors can name the file.
impl TryFrom<(UNetConfigFile, PathBuf)> for UNetConfig {
    type Error = Error;
    fn try_from((file, path): (UNetConfigFile, PathBuf)) -> Result<Self> {
        file.resolve(&path)
    }
}

impl UNetConfigFile {
    /// Checks every field and works out the per-block structure, as diffusers'
    /// `UNet2DConditionModel.__init__` does. `path` names the file in errors.
    pub fn resolve(&self, path: &Path) -> Result<UNetConfig> {
        let err = |key: &str, reason: String| Error::config(path, Some(key), reason);
        for key in unknown_keys(&self.extra) {
            log::warn!("{}: unknown field `{key}` ignored", path.display());
        }
        self.check_unsupported(path)?;

        let n = self.down_block_types.len();
        if n == 0 {
            return Err(err("down_block_types", "is empty".into()));
        }
        if self.up_block_types.len() != n {
            return Err(err(
                "up_block_types",
                format!(
                    "has {} entries, expected as many as down_block_types ({n})",
                    self.up_block_types.len()
                ),
            ));
        }
        if self.block_out_channels.len() != n {
            return Err(err(
                "block_out_channels",
                format!(
                    "has {} entries, expected one per down block ({n})",
                    self.block_out_channels.len()
                ),
            ));
        }
        let groups = match self.norm_num_groups {
            Some(g) if g > 0 => g,
            _ => {
                return Err(err(
                    "norm_num_groups",
                    "must be a positive number (null, i.e. no output norm, is not supported)"
                        .into(),
                ))
            }
        };
        if let Some(c) = self.block_out_channels.iter().find(|c| **c % groups != 0) {
            return Err(err(
                "norm_num_groups",
                format!("{groups} does not divide block_out_channels entry {c}"),
            ));
        }
        for (key, k) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if k % 2 == 0 {
                return Err(err(key, format!("is {k}, expected an odd kernel size")));
            }
        }

        let layers = self
            .layers_per_block
            .per_block(n, path, "layers_per_block")?;
        let heads = self
            .attention_head_dim
            .per_block(n, path, "attention_head_dim")?;
        let cross = self
            .cross_attention_dim
            .per_block(n, path, "cross_attention_dim")?;
        let cross_attention_dim = cross[0];
        if cross.iter().any(|c| *c != cross_attention_dim) {
            return Err(err(
                "cross_attention_dim",
                format!(
                    "{cross:?}: every block receives the same encoder_hidden_states, so \
                     per-block values must be equal"
                ),
            ));
        }
        let depth = match &self.transformer_layers_per_block {
            TransformerLayers::One(d) => vec![*d; n],
            TransformerLayers::PerBlock(v) if v.len() == n => v.clone(),
            TransformerLayers::PerBlock(v) => {
                return Err(err(
                    "transformer_layers_per_block",
                    format!("has {} entries, expected one per block ({n})", v.len()),
                ))
            }
            TransformerLayers::PerLayer(_) => {
                return Err(err(
                    "transformer_layers_per_block",
                    "per-layer depths (asymmetric UNets) are not supported; expected an \
                     integer or one integer per block"
                        .into(),
                ))
            }
        };
        let upcast = self.upcast_attention.unwrap_or(false);
        let transformer = |i: usize, channels: usize| -> Result<TransformerConfig> {
            let h = heads[i];
            if h == 0 || !channels.is_multiple_of(h) {
                return Err(err(
                    "attention_head_dim",
                    format!(
                        "block {i}: {h} heads (diffusers reads attention_head_dim as the number \
                         of heads) do not divide its {channels} channels"
                    ),
                ));
            }
            Ok(TransformerConfig {
                num_heads: h,
                head_dim: channels / h,
                depth: depth[i],
                cross_attention_dim,
                use_linear_projection: self.use_linear_projection,
                upcast_attention: upcast,
            })
        };

        let boc = &self.block_out_channels;
        let mut down_blocks = Vec::with_capacity(n);
        for (i, name) in self.down_block_types.iter().enumerate() {
            let kind = match name.as_str() {
                "DownBlock2D" => DownBlockType::DownBlock2D,
                "CrossAttnDownBlock2D" => DownBlockType::CrossAttnDownBlock2D,
                other => {
                    return Err(err(
                        "down_block_types",
                        format!(
                            "block {i} is `{other}`; supported: CrossAttnDownBlock2D, DownBlock2D"
                        ),
                    ))
                }
            };
            let out = boc[i];
            down_blocks.push(DownBlockConfig {
                kind,
                in_channels: if i == 0 { boc[0] } else { boc[i - 1] },
                out_channels: out,
                num_layers: layers[i],
                add_downsample: i + 1 < n,
                transformer: match kind {
                    DownBlockType::CrossAttnDownBlock2D => Some(transformer(i, out)?),
                    DownBlockType::DownBlock2D => None,
                },
            });
        }

        let mid_block = match self.mid_block_type.as_deref() {
            None => None,
            Some("UNetMidBlock2DCrossAttn") => Some(MidBlockConfig {
                channels: boc[n - 1],
                output_scale_factor: self.mid_block_scale_factor,
                transformer: transformer(n - 1, boc[n - 1])?,
            }),
            Some(other) => {
                return Err(err(
                    "mid_block_type",
                    format!("`{other}`; supported: UNetMidBlock2DCrossAttn or null"),
                ))
            }
        };

        // Up blocks walk the levels in reverse; per-block values are reversed with them.
        let mut up_blocks = Vec::with_capacity(n);
        for (i, name) in self.up_block_types.iter().enumerate() {
            let kind = match name.as_str() {
                "UpBlock2D" => UpBlockType::UpBlock2D,
                "CrossAttnUpBlock2D" => UpBlockType::CrossAttnUpBlock2D,
                other => {
                    return Err(err(
                        "up_block_types",
                        format!("block {i} is `{other}`; supported: CrossAttnUpBlock2D, UpBlock2D"),
                    ))
                }
            };
            let level = n - 1 - i;
            let out = boc[level];
            up_blocks.push(UpBlockConfig {
                kind,
                in_channels: boc[level.saturating_sub(1)],
                prev_output_channels: if i == 0 { boc[n - 1] } else { boc[level + 1] },
                out_channels: out,
                num_layers: layers[level] + 1,
                add_upsample: i + 1 < n,
                transformer: match kind {
                    UpBlockType::CrossAttnUpBlock2D => Some(transformer(level, out)?),
                    UpBlockType::UpBlock2D => None,
                },
            });
        }

        let text_time = match self.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let time_dim = self.addition_time_embed_dim.ok_or_else(|| {
                    err(
                        "addition_time_embed_dim",
                        "is required with addition_embed_type \"text_time\"".into(),
                    )
                })?;
                let input_dim = self.projection_class_embeddings_input_dim.ok_or_else(|| {
                    err(
                        "projection_class_embeddings_input_dim",
                        "is required with addition_embed_type \"text_time\"".into(),
                    )
                })?;
                Some(TextTimeConfig {
                    addition_time_embed_dim: time_dim,
                    projection_class_embeddings_input_dim: input_dim,
                })
            }
            Some(other) => {
                return Err(err(
                    "addition_embed_type",
                    format!("`{other}`; supported: null or \"text_time\" (SDXL)"),
                ))
            }
        };

        let sample_size = match &self.sample_size {
            None => None,
            Some(OneOrMany::One(s)) => Some((*s, *s)),
            Some(OneOrMany::Many(v)) if v.len() == 2 => Some((v[0], v[1])),
            Some(OneOrMany::Many(v)) => {
                return Err(err(
                    "sample_size",
                    format!(
                        "has {} entries, expected an integer or [height, width]",
                        v.len()
                    ),
                ))
            }
        };

        Ok(UNetConfig {
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            sample_size,
            center_input_sample: self.center_input_sample,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            block_out_channels: boc.clone(),
            time_embed_dim: self.time_embedding_dim.unwrap_or(4 * boc[0]),
            cross_attention_dim,
            text_time,
            norm_num_groups: groups,
            norm_eps: self.norm_eps,
            conv_in_kernel: self.conv_in_kernel,
            conv_out_kernel: self.conv_out_kernel,
            downsample_padding: self.downsample_padding,
            down_blocks,
            mid_block,
            up_blocks,
        })
    }
}
