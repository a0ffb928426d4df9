//! sd-rs pipelines: text-to-image, image-to-image and the SDXL base + refiner ensemble.
//!
//! Thin by design: [`StableDiffusion`] loads a diffusers folder (or a Hugging Face hub id, see
//! [`hub`], or a single-file checkpoint, [`StableDiffusion::load_single_file`]) into the component crates and runs diffusers' pipeline steps, each a public method
//! (`encode_prompt`, `prepare_latents`, `denoise`, `decode_latents`); all model maths lives in
//! sd-clip, sd-unet, sd-vae and sd-schedulers, which are re-exported.
//!
//! ```no_run
//! use sd_pipeline::{GenerateRequest, StableDiffusion, Flow};
//! use sd_pipeline::core::{LoadOptions, TorchGenerator};
//! # fn main() -> sd_pipeline::core::Result<()> {
//! let sd = StableDiffusion::load(std::path::Path::new("models/demo"), &LoadOptions::default())?;
//! let mut req = GenerateRequest::new("a red circle on a white background");
//! req.steps = 20;
//! let mut seed = TorchGenerator::new(42); // same draws as torch.Generator("cpu").manual_seed(42)
//! let out = sd.generate(&req, &mut seed, &mut |_| Flow::Continue)?;
//! let images = sd_pipeline::image::to_rgb8(out.images.as_ref().expect("asked for images"))?;
//! images[0].save("out.png").expect("writable");
//! # Ok(()) }
//! ```
#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]

mod embedding;
mod ensemble;
pub mod hub;
pub mod image;
mod infotext;
mod infotext_parse;
mod lora;
pub mod memory;
pub mod model_index;
mod pipeline;
pub mod prompt_loras;
pub mod request;
mod single_file;
pub mod watermark;

pub use embedding::{ti_hashes, EmbeddingsDir, SkippedEmbedding};
pub use ensemble::Ensemble;
pub use infotext::Infotext;
pub use infotext_parse::parse_infotext;
pub use lora::LoraOptions;
pub use model_index::{ModelFamily, ModelIndex};
pub use pipeline::{text_encoder_2, Conditioning, Output, ScheduledConditioning, StableDiffusion};
pub use request::{
    Flow, GenerateRequest, Init, MicroConditioning, OutputType, PromptEmbeds, PromptSyntax,
    SchedulerKind, StepInfo, MAX_BATCH,
};
pub use single_file::SingleFileOptions;

pub use sd_clip as clip;
pub use sd_core as core;
pub use sd_formats as formats;
pub use sd_schedulers as schedulers;
pub use sd_unet as unet;
pub use sd_vae as vae;

/// The pipeline is shared across threads (`sd serve` runs it on a worker thread while the HTTP
/// side reads its model info): this fails to compile if a component stops being `Send + Sync`.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<StableDiffusion>();
    assert_send_sync::<GenerateRequest>();
};
