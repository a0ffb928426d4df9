//! sd-rs UNet2DConditionModel: the denoiser of SD 1.x, SD 2.x, SDXL base and the SDXL refiner,
//! configured from diffusers' `unet/config.json` and checked against diffusers in PyTorch.
//!
//! - [`config`]: the raw `config.json` ([`UNetConfigFile`]) and the resolved [`UNetConfig`].
//! - [`model`]: [`UNet2DConditionModel`] and SDXL's [`AddedCond`].
//! - [`blocks`]: the down, mid and up blocks; [`transformer_2d`]: the spatial transformer.
//! - [`flops`]: the analytic FLOP count of one forward pass (for benchmarks).
//!
//! ```no_run
//! # fn main() -> sd_core::Result<()> {
//! use sd_unet::UNet2DConditionModel;
//! let unet = UNet2DConditionModel::load(
//!     std::path::Path::new("stable-diffusion-v1-5/unet"),
//!     &sd_core::LoadOptions::default(),
//! )?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]

pub mod blocks;
pub mod config;
pub mod flops;
pub mod model;
pub mod transformer_2d;

pub use config::{UNetConfig, UNetConfigFile};
pub use model::{AddedCond, UNet2DConditionModel};
