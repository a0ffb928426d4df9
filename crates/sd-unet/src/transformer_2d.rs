//! The UNet's spatial transformer: diffusers'
//! [`Transformer2DModel`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/transformers/transformer_2d.py)
//! with continuous input, made of
//! [`BasicTransformerBlock`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/attention.py)s
//! (self-attention, cross-attention, GEGLU feed-forward, each after a layer norm).

use candle_core::Tensor;
use sd_core::{Result, VarBuilder};
use sd_nn::ops::{gelu, Conv2d, GroupNorm, LayerNorm, Linear};
use sd_nn::{Attention, AttentionConfig};

use crate::config::TransformerConfig;

/// Epsilon of the Transformer2DModel's input group norm (fixed in diffusers).
const GROUP_NORM_EPS: f64 = 1e-6;
/// Epsilon of the BasicTransformerBlock layer norms (diffusers' default `norm_eps`).
const LAYER_NORM_EPS: f64 = 1e-5;
/// Hidden width of the feed-forward, as a multiple of the model width.
const FF_MULT: usize = 4;

/// diffusers' `GEGLU`: `proj` to twice the hidden width, then `hidden * gelu(gate)` (exact gelu).
#[derive(Debug, Clone)]
struct GeGlu {
    proj: Linear,
}

impl GeGlu {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(x)?;
        let half = h.dim(candle_core::D::Minus1)? / 2;
        let hidden = h.narrow(candle_core::D::Minus1, 0, half)?;
        let gate = h.narrow(candle_core::D::Minus1, half, half)?;
        Ok((hidden * gelu(&gate)?)?)
    }
}

/// diffusers' `FeedForward` with `activation_fn="geglu"`: weights `net.0.proj`, `net.2`.
#[derive(Debug, Clone)]
struct FeedForward {
    geglu: GeGlu,
    out: Linear,
}

impl FeedForward {
    fn load(vb: &VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * FF_MULT;
        Ok(Self {
            geglu: GeGlu {
                proj: Linear::load(&vb.pp("net.0.proj"), dim, 2 * inner, true)?,
            },
            out: Linear::load(&vb.pp("net.2"), inner, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.geglu.forward(x)?)
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
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context))?
            + &x)?;
        Ok((self.ff.forward(&self.norm3.forward(&x)?)? + &x)?)
    }
}

/// `proj_in` / `proj_out`: 1x1 convolutions (SD 1.x) or linear layers (SD 2.x, SDXL).
#[derive(Debug, Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn load(vb: &VarBuilder, cin: usize, cout: usize, linear: bool) -> Result<Self> {
        Ok(if linear {
            Projection::Linear(Linear::load(vb, cin, cout, true)?)
        } else {
            Projection::Conv(Conv2d::load(vb, cin, cout, 1, 1, 0)?)
        })
    }
}

/// diffusers' `Transformer2DModel` for continuous input: group norm, `proj_in`, the
/// BasicTransformerBlocks over the H·W tokens, `proj_out`, plus the input.
/// Weights: `norm`, `proj_in`, `transformer_blocks.{i}`, `proj_out`.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
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
            proj_in: Projection::load(&vb.pp("proj_in"), channels, inner, linear)?,
            transformer_blocks,
            proj_out: Projection::load(&vb.pp("proj_out"), inner, channels, linear)?,
        })
    }

    /// # Shapes: x [B, C, H, W], context [B, Lk, cross_attention_dim] -> [B, C, H, W].
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        // [B, C, H, W] -> [B, H·W, C] tokens (projection before or after, as diffusers orders it).
        let to_tokens = |t: &Tensor| -> Result<Tensor> {
            let c = t.dim(1)?;
            Ok(t.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?)
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let from_tokens = |t: &Tensor| -> Result<Tensor> {
            let c = t.dim(2)?;
            Ok(t.transpose(1, 2)?.reshape((b, c, h, w))?)
        };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&from_tokens(&tokens)?)?,
            Projection::Linear(lin) => from_tokens(&lin.forward(&tokens)?)?,
        };
        Ok((out + x)?)
    }
}
