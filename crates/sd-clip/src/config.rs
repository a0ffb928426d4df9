//! The text encoder's `config.json`: a serde mirror of transformers'
//! [`CLIPTextConfig`](https://github.com/huggingface/transformers/blob/main/src/transformers/models/clip/configuration_clip.py)
//! and the resolved [`ClipTextConfig`] the model is built from.

use std::collections::BTreeMap;
use std::path::Path;

use sd_core::config::unknown_keys;
use sd_core::{Error, Result};
use serde::Deserialize;

/// Keys every transformers `PretrainedConfig` may carry that do not change a CLIP text encoder's
/// outputs: accepted silently.
const GENERIC_KEYS: &[&str] = &[
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "dropout",
    "initializer_range",
    "initializer_factor",
    "attention_dropout",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "use_return_dict",
    "tie_word_embeddings",
    "is_decoder",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
    "gradient_checkpointing",
    "chunk_size_feed_forward",
    "tokenizer_class",
    "prefix",
    "task_specific_params",
    "finetuning_task",
    "pruned_heads",
    "add_cross_attention",
    "decoder_start_token_id",
    "sep_token_id",
    "use_bfloat16",
    "torchscript",
];

/// `eos_token_id`: one id, or a list (which the CLIP text model cannot pool with).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(i64),
    /// Several ids.
    Many(Vec<i64>),
}

/// `config.json` of a transformers `CLIPTextModel` / `CLIPTextModelWithProjection`, field for
/// field, with transformers 5.24's defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfigJson {
    /// Vocabulary size (49408).
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    /// Width of the hidden states.
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    /// Width of the MLP.
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    /// Output width of `text_projection` (used by `CLIPTextModelWithProjection` only).
    #[serde(default = "d_projection")]
    pub projection_dim: Option<usize>,
    /// Encoder layers.
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// Learned positions (77).
    #[serde(default = "d_positions")]
    pub max_position_embeddings: usize,
    /// MLP activation: `quick_gelu` (SD 1.x, SDXL's first encoder) or `gelu` (OpenCLIP).
    #[serde(default = "d_act")]
    pub hidden_act: String,
    /// LayerNorm epsilon.
    #[serde(default = "d_eps")]
    pub layer_norm_eps: Option<f64>,
    /// Padding id (unused by the forward pass).
    #[serde(default = "d_pad")]
    pub pad_token_id: Option<i64>,
    /// Start id (unused by the forward pass).
    #[serde(default = "d_bos")]
    pub bos_token_id: Option<i64>,
    /// Decides the pooling rule: 2 (configs written before transformers PR #24773) pools at the
    /// argmax of the ids, any other value at the first position of this id.
    #[serde(default = "d_eos")]
    pub eos_token_id: Option<TokenIds>,
    /// transformers class names; `CLIPTextModelWithProjection` adds `text_projection`.
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    /// Every other key.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn d_vocab() -> usize {
    49408
}
fn d_hidden() -> usize {
    512
}
fn d_intermediate() -> usize {
    2048
}
fn d_projection() -> Option<usize> {
    Some(512)
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    8
}
fn d_positions() -> usize {
    77
}
fn d_act() -> String {
    "quick_gelu".to_owned()
}
fn d_eps() -> Option<f64> {
    Some(1e-5)
}
fn d_pad() -> Option<i64> {
    Some(1)
}
fn d_bos() -> Option<i64> {
    Some(49406)
}
fn d_eos() -> Option<TokenIds> {
    Some(TokenIds::One(49407))
}

/// The MLP activation (transformers' `ACT2FN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (`quick_gelu`).
    QuickGelu,
    /// The exact erf GELU (`gelu`).
    Gelu,
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
}

/// Which position `pooled_output` is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EosPooling {
    /// `eos_token_id == 2` (legacy configs, e.g. SD 1.5, SD 2.x): the argmax of the ids, which is
    /// the first `<|endoftext|>` (49407, the largest id) when the sequence has one.
    ArgmaxId,
    /// The first position holding this id (0 when absent, as torch's argmax over all-false).
    FirstId(u32),
}

/// A validated text-encoder config with resolved names.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width `D`.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Encoder layers.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Maximum sequence length.
    pub max_position_embeddings: usize,
    /// MLP activation.
    pub activation: Activation,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// The pooling rule.
    pub pooling: EosPooling,
    /// `Some(P)` when the model has `text_projection` (`CLIPTextModelWithProjection`); `None` when
    /// the architecture is not stated and must be read from the weights.
    pub projection_dim: Option<usize>,
    /// Whether `architectures` names `CLIPTextModelWithProjection` (`None`: not stated).
    pub with_projection: Option<bool>,
}

impl ClipTextConfig {
    /// Validates `json` read from `path` (used in errors); unknown keys are logged.
    pub fn from_json(json: &ClipTextConfigJson, path: &Path) -> Result<Self> {
        let err = |key: &str, reason: String| Error::config(path, Some(key), reason);
        let unknown: Vec<String> = unknown_keys(&json.extra)
            .into_iter()
            .filter(|k| !GENERIC_KEYS.contains(&k.as_str()))
            .collect();
        if !unknown.is_empty() {
            log::warn!(
                "{}: ignoring keys unknown to CLIPTextConfig: {}",
                path.display(),
                unknown.join(", ")
            );
        }
        let activation = match json.hidden_act.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            other => {
                return Err(err(
                    "hidden_act",
                    format!(
                        "`{other}` is not supported; expected `quick_gelu`, `gelu`, `gelu_new` or \
                         `gelu_pytorch_tanh`"
                    ),
                ))
            }
        };
        for (key, v) in [
            ("hidden_size", json.hidden_size),
            ("intermediate_size", json.intermediate_size),
            ("num_attention_heads", json.num_attention_heads),
            ("max_position_embeddings", json.max_position_embeddings),
            ("vocab_size", json.vocab_size),
        ] {
            if v == 0 {
                return Err(err(key, "is 0, expected a positive number".to_owned()));
            }
        }
        if !json.hidden_size.is_multiple_of(json.num_attention_heads) {
            return Err(err(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    json.num_attention_heads, json.hidden_size
                ),
            ));
        }
        let pooling = match &json.eos_token_id {
            Some(TokenIds::One(2)) => EosPooling::ArgmaxId,
            Some(TokenIds::One(id)) => match u32::try_from(*id) {
                Ok(id) => EosPooling::FirstId(id),
                Err(_) => return Err(err("eos_token_id", format!("{id} is not a token id"))),
            },
            Some(TokenIds::Many(ids)) => {
                return Err(err(
                    "eos_token_id",
                    format!("is a list {ids:?}; the CLIP text model pools at one eos id"),
                ))
            }
            None => {
                return Err(err(
                    "eos_token_id",
                    "is null; the CLIP text model needs it to pool".to_owned(),
                ))
            }
        };
        let with_projection = json
            .architectures
            .as_ref()
            .map(|a| a.iter().any(|name| name == "CLIPTextModelWithProjection"));
        let projection_dim = match (with_projection, json.projection_dim) {
            (Some(false), _) => None,
            (_, Some(0)) | (Some(true), None) => {
                return Err(err(
                    "projection_dim",
                    "must be a positive number for CLIPTextModelWithProjection".to_owned(),
                ))
            }
            (_, p) => p,
        };
        Ok(Self {
            vocab_size: json.vocab_size,
            hidden_size: json.hidden_size,
            intermediate_size: json.intermediate_size,
            num_layers: json.num_hidden_layers,
            num_heads: json.num_attention_heads,
            max_position_embeddings: json.max_position_embeddings,
            activation,
            layer_norm_eps: json.layer_norm_eps.unwrap_or(1e-5),
            pooling,
            projection_dim,
            with_projection,
        })
    }

    /// Reads and validates `config.json`.
    pub fn read(path: &Path) -> Result<Self> {
        let json: ClipTextConfigJson = sd_core::config::read_json(path)?;
        Self::from_json(&json, path)
    }
}
