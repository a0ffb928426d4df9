//! What other tools write, read into diffusers' names: single-file LDM/SGM checkpoints
//! ([`checkpoint`]), with the configs of each released family shipped inside the crate
//! ([`configs`]), LoRA files ([`lora`]) and textual-inversion embeddings ([`embedding`]).
//!
//! Every converter here produces an [`sd_core::WeightMap`]: the models never learn that other
//! layouts exist, and the strict load report names the file's own keys.
#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]

pub mod checkpoint;
mod clip;
pub mod configs;
pub mod embedding;
pub mod lora;
pub mod testing;
pub mod unet;
pub mod vae;

pub use checkpoint::{refuse_pickle, Checkpoint, Family, TextEncoderKind};
pub use configs::{config_folder, ShippedConfig};
pub use embedding::EmbeddingFile;
pub use lora::{LoraFile, LoraFormat, LoraTarget};
