//! The UNet's spatial transformer: diffusers'
//! [`Transformer2DModel`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/transformers/transformer_2d.py)
//! with continuous input, made of
//! [`BasicTransformerBlock`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/attention.py)s
//! (self-attention, cross-attention, GEGLU feed-forward, each after a layer norm).

use candle_core::Tensor;
use sd_core::{Result, VarBuilder};
use sd_nn::ops::{GroupNorm, LayerNorm, Linear};
use sd_nn::{Attention, AttentionConfig};

use crate::config::TransformerConfig;

/// Epsilon of the Transformer2DModel's input group norm (fixed in diffusers).
const GROUP_NORM_EPS: f64 = 1e-6;
/// Epsilon of the BasicTransformerBlock layer norms (diffusers' default `norm_eps`).
const LAYER_NORM_EPS: f64 = 1e-5;
/// Hidden width of the feed-forward, as a multiple of the model width.
const FF_MULT: usize = 4;

/// diffusers' `FeedForward` with `activation_fn="geglu"`: weights `net.0.proj` (the GEGLU
/// projection: `hidden * gelu(gate)` of its two halves, fused into the product) and `net.2`.
#[derive(Debug, Clone)]
struct FeedForward {
    geglu: Linear,
    out: Linear,
}

impl FeedForward {
    fn load(vb: &VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * FF_MULT;
        Ok(Self {
            geglu: Linear::load_geglu(&vb.pp("net.0.proj"), dim, 2 * inner)?,
            out: Linear::load(&vb.pp("net.2"), inner, dim, true)?,
        })
    }

    /// `ff(x) + residual`, the add fused into `net.2`.
    fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.out.forward_add(&self.geglu.forward(x)?, residual)
    }
}

/// diffusers' `BasicTransformerBlock` (layer-norm variant): `x += attn1(norm1(x))`,
/// `x += attn2(norm2(x), context)`, `x += ff(norm3(x))`.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    /// Loads the block under `vb`; `dim` is heads × head_dim.
    pub fn load(vb: &VarBuilder, dim: usize, cfg: &TransformerConfig) -> Result<Self> {
        let attn = |cross: Option<usize>| AttentionConfig {
            query_dim: dim,
            cross_attention_dim: cross,
            heads: cfg.num_heads,
            dim_head: cfg.head_dim,
            qkv_bias: false,
            upcast_attention: cfg.upcast_attention,
            group_norm: None,
            residual_connection: false,
        };
        Ok(Self {
            norm1: LayerNorm::load(&vb.pp("norm1"), dim, LAYER_NORM_EPS)?,
            attn1: Attention::load(&vb.pp("attn1"), &attn(None))?,
            norm2: LayerNorm::load(&vb.pp("norm2"), dim, LAYER_NORM_EPS)?,
            attn2: Attention::load(&vb.pp("attn2"), &attn(Some(cfg.cross_attention_dim)))?,
            norm3: LayerNorm::load(&vb.pp("norm3"), dim, LAYER_NORM_EPS)?,
            ff: FeedForward::load(&vb.pp("ff"), dim)?,
        })
    }

    /// # Shapes: x [B, L, dim], context [B, Lk, cross_attention_dim] -> [B, L, dim].
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = self.attn1.forward_add(&self.norm1.forward(x)?, None, x)?;
        let x = self
            .attn2
            .forward_add(&self.norm2.forward(&x)?, Some(context), &x)?;
        self.ff.forward_add(&self.norm3.forward(&x)?, &x)
    }
}

/// `proj_in` / `proj_out`: 1x1 convolutions (SD 1.x) or linear layers (SD 2.x, SDXL); both
/// are the same linear map over channels, applied here to the tokens.
fn load_projection(vb: &VarBuilder, cin: usize, cout: usize, linear: bool) -> Result<Linear> {
    if linear {
        Linear::load(vb, cin, cout, true)
    } else {
        Linear::load_conv1x1(vb, cin, cout)
    }
}

/// diffusers' `Transformer2DModel` for continuous input: group norm, `proj_in`, the
/// BasicTransformerBlocks over the H·W tokens, `proj_out`, plus the input.
/// Weights: `norm`, `proj_in`, `transformer_blocks.{i}`, `proj_out`.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Linear,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
}

impl Transformer2DModel {
    /// Loads the model under `vb` for `channels` input (and output) channels.
    pub fn load(
        vb: &VarBuilder,
        channels: usize,
        groups: usize,
        cfg: &TransformerConfig,
    ) -> Result<Self> {
        let inner = cfg.num_heads * cfg.head_dim;
        let linear = cfg.use_linear_projection;
        let transformer_blocks = (0..cfg.depth)
            .map(|i| BasicTransformerBlock::load(&vb.pp("transformer_blocks").pp(i), inner, cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::load(&vb.pp("norm"), groups, channels, GROUP_NORM_EPS)?,
            proj_in: load_projection(&vb.pp("proj_in"), channels, inner, linear)?,
            transformer_blocks,
            proj_out: load_projection(&vb.pp("proj_out"), inner, channels, linear)?,
        })
    }

    /// Channels last: the pixels are the tokens, so no transposition is needed, and the
    /// input is added back in `proj_out`'s epilogue.
    /// # Shapes: x [B, H, W, C], context [B, Lk, cross_attention_dim] -> [B, H, W, C].
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let x_tokens = x.reshape((b, h * w, c))?;
        // A 1x1 convolution (SD 1.x) is the same linear map over channels as a linear layer.
        let mut tokens = self.proj_in.forward(&self.norm.forward(&x_tokens)?)?;
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let out = self.proj_out.forward_add(&tokens, &x_tokens)?;
        Ok(out.reshape((b, h, w, c))?)
    }
}
