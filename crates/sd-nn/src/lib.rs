//! Building blocks shared by the UNet and the VAE, written once: the heavy operations behind
//! one function each ([`ops`]), attention ([`attention`]), the residual block ([`resnet`]),
//! down/up sampling ([`sampling`]) and timestep embeddings ([`embeddings`]).
//!
//! Layers load by diffusers tensor names through [`sd_core::VarBuilder`], so a block's weight
//! path (e.g. `down_blocks.0.resnets.1.conv2.weight`) follows from its position.
#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]

pub mod attention;
mod cpu;
pub mod embeddings;
pub mod linear;
pub mod ops;
pub mod resnet;
pub mod sampling;

pub use attention::{
    attention_heads_last, causal_attention, scaled_dot_product_attention, Attention,
    AttentionConfig,
};
pub use embeddings::{timestep_embedding, TimestepEmbedding};
pub use linear::{Activation, Linear};
pub use ops::{Conv2d, ConvArgs, GroupNorm, LayerNorm};
pub use resnet::{ResnetBlock2D, ResnetBlock2DConfig};
pub use sampling::{Downsample2D, Upsample2D};
