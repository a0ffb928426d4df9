//! sd-rs AutoencoderKL (encoder, decoder, tiling)
#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]
