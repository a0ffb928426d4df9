//! sd-rs building blocks shared by the UNet and the VAE (ResNet blocks, attention, up/down sampling, timestep embeddings)
#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]
