//! sd-rs UNet2DConditionModel (SD 1.x, SD 2.x, SDXL base and refiner)
#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]
