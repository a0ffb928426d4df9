//! The raw `config.json` of the UNet: [`UNetConfigFile`] mirrors diffusers'
//! `UNet2DConditionModel.__init__` arguments, with their defaults; [`UNetConfigFile::resolve`]
//! (in the parent module) turns it into a [`super::UNetConfig`].

use std::collections::BTreeMap;
use std::path::Path;

use sd_core::config::OneOrMany;
use sd_core::{Error, Result};
use serde::Deserialize;

/// `unet/config.json` as diffusers writes it (same field names and defaults).
///
/// Only [`super::UNetConfig`] is used to build a model; this struct exists so that every field of the
/// file is read and checked.
#[derive(Debug, Clone, Deserialize)]
#[allow(missing_docs)] // the fields are diffusers' constructor arguments, documented there
pub struct UNetConfigFile {
    #[serde(default)]
    pub sample_size: Option<OneOrMany<usize>>,
    #[serde(default = "d_4")]
    pub in_channels: usize,
    #[serde(default = "d_4")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_down_block_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid_block_type")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_up_block_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_false_one")]
    pub only_cross_attention: OneOrMany<bool>,
    #[serde(default = "d_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers_per_block")]
    pub layers_per_block: OneOrMany<usize>,
    #[serde(default = "d_1")]
    pub downsample_padding: usize,
    #[serde(default = "d_1f")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_norm_num_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "d_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross_attention_dim")]
    pub cross_attention_dim: OneOrMany<usize>,
    #[serde(default = "d_transformer_layers")]
    pub transformer_layers_per_block: TransformerLayers,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    #[serde(default = "d_attention_head_dim")]
    pub attention_head_dim: OneOrMany<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<OneOrMany<usize>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    /// `null` in the SDXL configs; diffusers treats it as `false`.
    #[serde(default)]
    pub upcast_attention: Option<bool>,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "d_1f")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "d_3")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_3")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default = "d_default")]
    pub attention_type: String,
    #[serde(default)]
    pub class_embeddings_concat: bool,
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    #[serde(default = "d_64")]
    pub addition_embed_type_num_heads: usize,
    /// Keys this struct does not know (reported with `log::warn!`; `_`-prefixed ones ignored).
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// `transformer_layers_per_block`: one depth for every block, or one per block. (diffusers also
/// accepts a list per block with one depth per layer, for asymmetric UNets; that form is parsed
/// and refused.)
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TransformerLayers {
    /// The same depth for every block.
    One(usize),
    /// One depth per block.
    PerBlock(Vec<usize>),
    /// One depth per layer of each block (asymmetric UNets).
    PerLayer(Vec<Vec<usize>>),
}

fn d_4() -> usize {
    4
}
fn d_1() -> usize {
    1
}
fn d_3() -> usize {
    3
}
fn d_64() -> usize {
    64
}
fn d_1f() -> f64 {
    1.0
}
fn d_true() -> bool {
    true
}
fn d_false_one() -> OneOrMany<bool> {
    OneOrMany::One(false)
}
fn d_silu() -> String {
    "silu".into()
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}
fn d_down_block_types() -> Vec<String> {
    let c = "CrossAttnDownBlock2D";
    vec![c.into(), c.into(), c.into(), "DownBlock2D".into()]
}
fn d_mid_block_type() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_up_block_types() -> Vec<String> {
    let c = "CrossAttnUpBlock2D";
    vec!["UpBlock2D".into(), c.into(), c.into(), c.into()]
}
fn d_block_out_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_layers_per_block() -> OneOrMany<usize> {
    OneOrMany::One(2)
}
fn d_norm_num_groups() -> Option<usize> {
    Some(32)
}
fn d_norm_eps() -> f64 {
    1e-5
}
fn d_cross_attention_dim() -> OneOrMany<usize> {
    OneOrMany::One(1280)
}
fn d_transformer_layers() -> TransformerLayers {
    TransformerLayers::One(1)
}
fn d_attention_head_dim() -> OneOrMany<usize> {
    OneOrMany::One(8)
}

impl UNetConfigFile {
    /// Refuses the fields whose non-default values the SD UNets never use.
    pub(super) fn check_unsupported(&self, path: &Path) -> Result<()> {
        let err = |key: &str, reason: String| Err(Error::config(path, Some(key), reason));
        if !matches!(self.act_fn.as_str(), "silu" | "swish") {
            return err("act_fn", format!("`{}`; supported: silu", self.act_fn));
        }
        if self.time_embedding_type != "positional" {
            return err(
                "time_embedding_type",
                format!("`{}`; supported: positional", self.time_embedding_type),
            );
        }
        if self.attention_type != "default" {
            return err(
                "attention_type",
                format!("`{}`; supported: default", self.attention_type),
            );
        }
        if self.resnet_time_scale_shift != "default" {
            return err(
                "resnet_time_scale_shift",
                format!("`{}`; supported: default", self.resnet_time_scale_shift),
            );
        }
        if let Some(v) = &self.class_embed_type {
            return err("class_embed_type", format!("`{v}`; supported: null"));
        }
        if let Some(v) = self.num_class_embeds {
            return err("num_class_embeds", format!("{v}; supported: null"));
        }
        if let Some(v) = &self.encoder_hid_dim_type {
            return err("encoder_hid_dim_type", format!("`{v}`; supported: null"));
        }
        if let Some(v) = self.encoder_hid_dim {
            return err("encoder_hid_dim", format!("{v}; supported: null"));
        }
        if let Some(v) = &self.time_embedding_act_fn {
            return err("time_embedding_act_fn", format!("`{v}`; supported: null"));
        }
        if let Some(v) = &self.timestep_post_act {
            return err("timestep_post_act", format!("`{v}`; supported: null"));
        }
        if let Some(v) = self.time_cond_proj_dim {
            return err("time_cond_proj_dim", format!("{v}; supported: null"));
        }
        if self.num_attention_heads.is_some() {
            return err(
                "num_attention_heads",
                "must be null: diffusers' UNet2DConditionModel refuses it and reads the head \
                 count from attention_head_dim"
                    .into(),
            );
        }
        if self.dual_cross_attention {
            return err("dual_cross_attention", "true; supported: false".into());
        }
        let only_cross = match &self.only_cross_attention {
            OneOrMany::One(b) => *b,
            OneOrMany::Many(v) => v.iter().any(|b| *b),
        };
        if only_cross {
            return err("only_cross_attention", "true; supported: false".into());
        }
        if self.reverse_transformer_layers_per_block.is_some() {
            return err(
                "reverse_transformer_layers_per_block",
                "asymmetric UNets are not supported; expected null".into(),
            );
        }
        Ok(())
    }
}
