//! sd-rs pipelines: text-to-image, image-to-image and the SDXL base + refiner ensemble
#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]
