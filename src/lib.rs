//! sd-rs: Stable Diffusion inference in Rust.
//!
//! This umbrella crate re-exports the component crates; depend on the individual crates to
//! keep builds small.

pub use sd_clip as clip;
pub use sd_core as core;
pub use sd_formats as formats;
pub use sd_kernels as kernels;
pub use sd_nn as nn;
pub use sd_pipeline as pipeline;
pub use sd_schedulers as schedulers;
pub use sd_unet as unet;
pub use sd_vae as vae;
