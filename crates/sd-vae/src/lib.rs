//! sd-rs AutoencoderKL: the latent autoencoder of SD 1.x, 2.x and SDXL, matching diffusers'
//! [`AutoencoderKL`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/autoencoders/autoencoder_kl.py).
//!
//! - [`AutoencoderKL::encode`] (image -> [`DiagonalGaussian`]) and [`AutoencoderKL::decode`]
//!   (unscaled latents -> image) are diffusers' `encode`/`decode`, tiled as `enable_tiling()`
//!   does when the [`Tiling`] mode asks for it ([`tiling`]).
//! - The pipeline-facing [`AutoencoderKL::latents_from_image`] and
//!   [`AutoencoderKL::image_from_latents`] apply `scaling_factor` (and `shift_factor`) in one
//!   place, honour `force_upcast` and refuse to return NaN/inf images.
//! - [`image`] converts between [-1, 1] tensors and 8-bit RGB as `VaeImageProcessor`.
//!
//! Blocks come from sd-nn (the same ResNet, attention and up/down sampling as the UNet).
#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]

pub mod autoencoder;
pub mod blocks;
pub mod config;
pub mod decoder;
pub mod distribution;
pub mod encoder;
pub mod image;
pub mod tiling;

pub use autoencoder::{AutoencoderKL, VaeOptions};
pub use config::{LatentNormalization, VaeConfig, VaeConfigJson};
pub use distribution::DiagonalGaussian;
pub use tiling::{TileConfig, Tiling, AUTO_TILE_PIXELS};
