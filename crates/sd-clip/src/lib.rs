//! sd-rs CLIP tokenizer and text encoders (SD 1.x, SD 2.x, SDXL)
#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]
