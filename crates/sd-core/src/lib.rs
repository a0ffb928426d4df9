//! Shared foundations of sd-rs: the [`Error`] type, strict memory-mapped weight loading
//! ([`weights`]), config reading ([`config`]) and torch-compatible noise ([`noise`]).
#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]

pub mod cancel;
pub mod config;
pub mod error;
pub mod noise;
pub mod testing;
pub mod transform;
pub mod weights;

pub use cancel::Cancel;
pub use candle_core;
pub use error::{Error, LoadReport, Result};
pub use noise::{NoiseSource, RecordedNoise, TorchGenerator};
pub use transform::{Derive, Mapped, WeightMap};
pub use weights::{
    component_var_builder, resolve_weight_files, LoadOptions, VarBuilder, WeightFiles,
};
