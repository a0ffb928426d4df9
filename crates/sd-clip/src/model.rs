//! The CLIP text transformer: transformers'
//! [`CLIPTextModel`](https://github.com/huggingface/transformers/blob/main/src/transformers/models/clip/modeling_clip.py)
//! and `CLIPTextModelWithProjection`.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sd_core::{component_var_builder, Error, LoadOptions, Result, VarBuilder};

use sd_nn::{attention_heads_last, Activation, LayerNorm, Linear};

use crate::config::{self, ClipTextConfig, EosPooling};

/// One pre-norm encoder layer (`CLIPEncoderLayer`): causal self-attention, then the MLP, on
/// sd-nn's layers (the activation and both residual adds fused into the products).
#[derive(Debug, Clone)]
struct EncoderLayer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm1: LayerNorm,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    fn load(vb: &VarBuilder, c: &ClipTextConfig) -> Result<Self> {
        let d = c.hidden_size;
        let attn = vb.pp("self_attn");
        let mlp = vb.pp("mlp");
        let act = match c.activation {
            config::Activation::QuickGelu => Activation::QuickGelu,
            config::Activation::Gelu => Activation::Gelu,
            config::Activation::GeluTanh => Activation::GeluTanh,
        };
        Ok(Self {
            q_proj: Linear::load(&attn.pp("q_proj"), d, d, true)?,
            k_proj: Linear::load(&attn.pp("k_proj"), d, d, true)?,
            v_proj: Linear::load(&attn.pp("v_proj"), d, d, true)?,
            out_proj: Linear::load(&attn.pp("out_proj"), d, d, true)?,
            layer_norm1: LayerNorm::load(&vb.pp("layer_norm1"), d, c.layer_norm_eps)?,
            layer_norm2: LayerNorm::load(&vb.pp("layer_norm2"), d, c.layer_norm_eps)?,
            fc1: Linear::load(&mlp.pp("fc1"), d, c.intermediate_size, true)?
                .with_activation(act)?,
            fc2: Linear::load(&mlp.pp("fc2"), c.intermediate_size, d, true)?,
        })
    }

    /// # Shapes: x [B, T, D] -> [B, T, D].
    fn forward(&self, x: &Tensor, c: &ClipTextConfig) -> Result<Tensor> {
        let (_, _, d) = x.dims3()?;
        let heads = c.num_heads;
        let head_dim = d / heads;
        let h = self.layer_norm1.forward(x)?;
        let (q, k, v) = (
            self.q_proj.forward(&h)?,
            self.k_proj.forward(&h)?,
            self.v_proj.forward(&h)?,
        );
        let scale = (head_dim as f64).powf(-0.5);
        let attn = attention_heads_last(&q, &k, &v, heads, scale, false, true)?;
        let x = self.out_proj.forward_add(&attn, x)?;
        let h = self.layer_norm2.forward(&x)?;
        self.fc2.forward_add(&self.fc1.forward(&h)?, &x)
    }
}

/// Outputs of [`ClipTextModel::forward`], as transformers returns them with
/// `output_hidden_states=True`.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// The last layer's output after `final_layer_norm`. # Shapes: [B, T, D].
    pub last_hidden_state: Tensor,
    /// The embeddings, then every layer's output (without the final layer norm):
    /// `num_layers + 1` tensors of [B, T, D]; `hidden_states[-2]` is what SDXL uses.
    pub hidden_states: Vec<Tensor>,
    /// `last_hidden_state` at the eos position of each sequence (see [`EosPooling`]). # Shapes: [B, D].
    pub pooled_output: Tensor,
    /// `text_projection(pooled_output)` for `CLIPTextModelWithProjection`. # Shapes: [B, P].
    pub text_embeds: Option<Tensor>,
}

/// transformers' `CLIPTextModel`, or `CLIPTextModelWithProjection` when the config's
/// `architectures` (or, when absent, the weights) include `text_projection`.
///
/// Weights are read by transformers' names, with or without the `text_model.` prefix
/// (transformers 4 writes it for both classes, transformers 5 drops it for `CLIPTextModel`).
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    config: ClipTextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    dtype: DType,
    device: Device,
}

impl ClipTextModel {
    /// Loads `dir/config.json` and `dir/model[.<variant>].safetensors` (strict: every missing,
    /// unused or wrongly-shaped tensor is reported at once, naming the file and expected shape).
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let config = ClipTextConfig::read(&dir.join("config.json"))?;
        let vb = component_var_builder(dir, "model", opts)?;
        let model = Self::new(config, &vb)?;
        vb.finish()?;
        Ok(model)
    }

    /// Builds the model from `vb` (rooted where transformers' state dict is); the caller calls
    /// [`VarBuilder::finish`].
    pub fn new(mut config: ClipTextConfig, vb: &VarBuilder) -> Result<Self> {
        config.validate()?;
        let with_projection = config
            .with_projection
            .unwrap_or_else(|| vb.contains("text_projection.weight"));
        let root = if with_projection || vb.contains("text_model.embeddings.token_embedding.weight")
        {
            vb.pp("text_model")
        } else {
            vb.clone()
        };
        let d = config.hidden_size;
        let emb = root.pp("embeddings");
        let token_embedding = emb
            .pp("token_embedding")
            .get((config.vocab_size, d), "weight")?;
        let position_embedding = emb
            .pp("position_embedding")
            .get((config.max_position_embeddings, d), "weight")?;
        let layers = (0..config.num_layers)
            .map(|i| EncoderLayer::load(&root.pp("encoder.layers").pp(i), &config))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm =
            LayerNorm::load(&root.pp("final_layer_norm"), d, config.layer_norm_eps)?;
        let text_projection = if with_projection {
            let p = config.projection_dim.unwrap_or(d);
            config.projection_dim = Some(p);
            Some(Linear::load(&vb.pp("text_projection"), d, p, false)?)
        } else {
            config.projection_dim = None;
            None
        };
        config.with_projection = Some(with_projection);
        Ok(Self {
            config,
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// A copy with `rows` `[n, hidden]` appended to the token embedding for the new token ids
    /// `ids` (textual inversion; the ids must continue the vocabulary: `vocab_size..+n`).
    pub fn with_extra_token_embeddings(&self, ids: &[u32], rows: &Tensor) -> Result<Self> {
        let (n, d) = rows.dims2()?;
        let hidden = self.config.hidden_size;
        if d != hidden {
            return Err(Error::invalid_argument(
                "embedding width",
                d,
                format!("{hidden}, the text encoder's hidden size"),
            ));
        }
        let vocab = self.token_embedding.dim(0)?;
        let expected: Vec<u32> = (vocab..vocab + n).map(|i| i as u32).collect();
        if ids != expected.as_slice() {
            return Err(Error::invalid_argument(
                "embedding token ids",
                format!("{ids:?}"),
                format!("{expected:?}, the rows after the {vocab}-token vocabulary"),
            ));
        }
        let rows = rows.to_dtype(self.dtype)?.to_device(&self.device)?;
        let mut out = self.clone();
        out.token_embedding = Tensor::cat(&[&self.token_embedding, &rows], 0)?;
        out.config.vocab_size = vocab + n;
        Ok(out)
    }

    /// The resolved config (`projection_dim` is `Some` exactly when `text_projection` exists).
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// The dtype the model computes in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `final_layer_norm`, as diffusers applies it to an earlier hidden state for `clip_skip`.
    /// # Shapes: [B, T, D] -> [B, T, D].
    pub fn final_layer_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.final_layer_norm.forward(x)
    }

    /// Runs the encoder with the causal mask and no padding mask (as the SD pipelines call it).
    ///
    /// # Shapes: input_ids [B, T] (any integer dtype), 1 <= T <= max_position_embeddings.
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        let (b, t) = input_ids.dims2().map_err(|_| {
            Error::invalid_argument(
                "input_ids",
                format!("shape {:?}", input_ids.dims()),
                "[batch, sequence]",
            )
        })?;
        let max_t = self.config.max_position_embeddings;
        if t == 0 || t > max_t || b == 0 {
            return Err(Error::invalid_argument(
                "input_ids",
                format!("shape {:?}", input_ids.dims()),
                format!("a non-empty batch of 1 to {max_t} tokens"),
            ));
        }
        let ids_host: Vec<Vec<u32>> = input_ids
            .to_device(&Device::Cpu)?
            .to_dtype(DType::U32)?
            .to_vec2()?;
        let vocab = self.config.vocab_size;
        if let Some(bad) = ids_host.iter().flatten().find(|&&i| i as usize >= vocab) {
            return Err(Error::invalid_argument(
                "input_ids",
                format!("token id {bad}"),
                format!("ids below vocab_size {vocab}"),
            ));
        }
        let ids = Tensor::new(ids_host.concat(), &self.device)?;
        let d = self.config.hidden_size;
        let tokens = self
            .token_embedding
            .index_select(&ids, 0)?
            .reshape((b, t, d))?;
        let positions = self.position_embedding.narrow(0, 0, t)?;
        let mut x = tokens.broadcast_add(&positions)?;
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        hidden_states.push(x.clone());
        for layer in &self.layers {
            x = layer.forward(&x, &self.config)?;
            hidden_states.push(x.clone());
        }
        let last_hidden_state = self.final_layer_norm(&x)?;
        let rows: Vec<u32> = ids_host
            .iter()
            .enumerate()
            .map(|(i, seq)| (i * t + eos_position(seq, self.config.pooling)) as u32)
            .collect();
        let rows = Tensor::new(rows, &self.device)?;
        let pooled_output = last_hidden_state
            .reshape((b * t, d))?
            .index_select(&rows, 0)?;
        let text_embeds = match &self.text_projection {
            Some(proj) => Some(proj.forward(&pooled_output)?),
            None => None,
        };
        Ok(ClipTextOutput {
            last_hidden_state,
            hidden_states,
            pooled_output,
            text_embeds,
        })
    }
}

/// The position `pooled_output` is read from, as transformers computes it (torch's argmax
/// returns the first maximum).
pub fn eos_position(ids: &[u32], rule: EosPooling) -> usize {
    match rule {
        EosPooling::ArgmaxId => {
            let mut best = 0;
            for (i, &id) in ids.iter().enumerate() {
                if id > ids[best] {
                    best = i;
                }
            }
            best
        }
        EosPooling::FirstId(eos) => ids.iter().position(|&id| id == eos).unwrap_or(0),
    }
}
