//! What a caller asks the pipeline for: [`GenerateRequest`] and its parts.

use candle_core::Tensor;

pub use sd_clip::PromptSyntax;
pub use sd_schedulers::SchedulerKind;

/// Where the denoising starts.
#[derive(Debug, Clone, Default)]
pub enum Init {
    /// Text-to-image from seeded noise (diffusers' default).
    #[default]
    Noise,
    /// Text-to-image from caller-supplied initial latents `[N, C, H/8, W/8]`, unscaled, as
    /// diffusers' `latents=` argument (they are multiplied by `init_noise_sigma`).
    Latents(Tensor),
    /// Image-to-image: an image `[1 or N, 3, H, W]` in [-1, 1], noised to `strength` (0, 1].
    Image {
        /// The input image in [-1, 1].
        image: Tensor,
        /// How much of the schedule to run: 1.0 ignores the image's content.
        strength: f64,
    },
    /// Continue from latents another pipeline returned (the SDXL refiner in the ensemble of
    /// experts): no noise is added, the schedule starts at `denoising_start`.
    Continue {
        /// Latents `[N, C, h, w]` as the base returned them (`output_type="latent"`).
        latents: Tensor,
        /// The fraction of the schedule already done, e.g. 0.8.
        denoising_start: f64,
    },
}

/// SDXL size and crop micro-conditioning, and the refiner's aesthetic scores. `None` sizes
/// default to the generated (height, width), as in diffusers.
#[derive(Debug, Clone)]
pub struct MicroConditioning {
    /// `original_size` (height, width).
    pub original_size: Option<(usize, usize)>,
    /// `crops_coords_top_left` (top, left).
    pub crops_coords_top_left: (usize, usize),
    /// `target_size` (height, width).
    pub target_size: Option<(usize, usize)>,
    /// `negative_original_size`; defaults to `original_size`.
    pub negative_original_size: Option<(usize, usize)>,
    /// `negative_crops_coords_top_left`; defaults to `crops_coords_top_left`.
    pub negative_crops_coords_top_left: Option<(usize, usize)>,
    /// `negative_target_size`; defaults to `target_size`.
    pub negative_target_size: Option<(usize, usize)>,
    /// Refiner: `aesthetic_score` (6.0).
    pub aesthetic_score: f64,
    /// Refiner: `negative_aesthetic_score` (2.5).
    pub negative_aesthetic_score: f64,
}

impl Default for MicroConditioning {
    fn default() -> Self {
        Self {
            original_size: None,
            crops_coords_top_left: (0, 0),
            target_size: None,
            negative_original_size: None,
            negative_crops_coords_top_left: None,
            negative_target_size: None,
            aesthetic_score: 6.0,
            negative_aesthetic_score: 2.5,
        }
    }
}

/// Prompt embeddings computed beforehand (diffusers' `prompt_embeds=` and friends), already
/// for every prompt of the batch (before `num_images_per_prompt` repetition).
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// `[B, 77, D]`.
    pub prompt_embeds: Tensor,
    /// `[B, 77, D]`; required when guidance is on.
    pub negative_prompt_embeds: Option<Tensor>,
    /// SDXL: `[B, P]`.
    pub pooled_prompt_embeds: Option<Tensor>,
    /// SDXL: `[B, P]`.
    pub negative_pooled_prompt_embeds: Option<Tensor>,
}

/// What to return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputType {
    /// Decoded RGB images.
    #[default]
    Image,
    /// The final latents, not decoded (diffusers' `output_type="latent"`).
    Latents,
}

/// The most images one call generates (prompts × `num_images_per_prompt`): a bound that keeps a
/// mistyped count from sizing buffers (memory itself is checked elsewhere).
pub const MAX_BATCH: usize = 1024;

/// One generation call. [`GenerateRequest::new`] gives diffusers' defaults.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// One prompt per batch entry.
    pub prompts: Vec<String>,
    /// Negative prompts: none, one for all, or one per prompt.
    pub negative_prompts: Vec<String>,
    /// Precomputed embeddings instead of prompts.
    pub prompt_embeds: Option<PromptEmbeds>,
    /// How the prompts are read: diffusers' plain text (the default) or AUTOMATIC1111's syntax
    /// (weights, `BREAK`, long prompts in 75-token chunks; `<lora:...>` tags are taken out of the
    /// text, the LoRAs are applied to the model with [`crate::prompt_loras`]; prompt editing
    /// and alternation change the conditioning during sampling; `AND` is refused).
    pub prompt_syntax: PromptSyntax,
    /// Number of denoising steps of the full schedule.
    pub steps: usize,
    /// Classifier-free guidance scale; guidance is skipped when ≤ 1.
    pub guidance_scale: f64,
    /// `guidance_rescale` (0 = off), from "Common Diffusion Noise Schedules and Sample Steps are Flawed".
    pub guidance_rescale: f64,
    /// Image height in pixels (multiple of 8); default from the UNet's sample_size.
    pub height: Option<usize>,
    /// Image width in pixels (multiple of 8); default from the UNet's sample_size.
    pub width: Option<usize>,
    /// Images per prompt.
    pub num_images_per_prompt: usize,
    /// Skip this many final CLIP layers (diffusers' `clip_skip`).
    pub clip_skip: Option<usize>,
    /// The scheduler to use instead of the model's own.
    pub scheduler: Option<SchedulerKind>,
    /// Where to start.
    pub init: Init,
    /// Stop at this fraction of the schedule (SDXL base in the ensemble: 0.8).
    pub denoising_end: Option<f64>,
    /// SDXL micro-conditioning.
    pub micro: MicroConditioning,
    /// Images or latents.
    pub output: OutputType,
    /// SDXL's invisible watermark on the decoded images (diffusers' `add_watermarker`, on by
    /// default there when `invisible-watermark` is installed; see docs/watermark.md). Only SDXL
    /// base and refiner images at least 256 pixels wide are marked; SD 1.x/2.x never are. In
    /// the base + refiner ensemble only the refiner's decoded output is marked.
    pub watermark: bool,
    /// Refuse the run before it starts when its estimated memory exceeds what the machine has
    /// available ([`crate::memory`]); on by default.
    pub memory_check: bool,
    /// Stops the run from outside (a server's `/interrupt`): checked before each text encoder
    /// runs on each prompt chunk, before each denoising step, and between the VAE decoder's
    /// blocks and tiles. A cancel while denoising ends the run with the latents so far,
    /// [`crate::Output::interrupted`] set and no images (unlike [`Flow::Stop`], which decodes
    /// them); during the prompt encoding or the decode the run returns
    /// [`sd_core::Error::Interrupted`]. Never by default.
    pub cancel: sd_core::Cancel,
}

impl GenerateRequest {
    /// A request for one prompt with diffusers' defaults (50 steps, guidance 7.5; the SDXL
    /// pipelines default to 5.0, set it yourself).
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompts: vec![prompt.into()],
            negative_prompts: vec![],
            prompt_embeds: None,
            prompt_syntax: PromptSyntax::Plain,
            steps: 50,
            guidance_scale: 7.5,
            guidance_rescale: 0.0,
            height: None,
            width: None,
            num_images_per_prompt: 1,
            clip_skip: None,
            scheduler: None,
            init: Init::Noise,
            denoising_end: None,
            micro: MicroConditioning::default(),
            output: OutputType::Image,
            watermark: true,
            memory_check: true,
            cancel: sd_core::Cancel::never(),
        }
    }
}

/// Passed to the step callback after every denoising step.
#[derive(Debug)]
pub struct StepInfo<'a> {
    /// Index of the step just done within this run (0-based).
    pub step: usize,
    /// Number of steps this run will do.
    pub total: usize,
    /// The model timestep of the step.
    pub timestep: f64,
    /// The latents after the step.
    pub latents: &'a Tensor,
    /// The scheduler's estimate of the final latents (x0), when it forms one: decode it with
    /// [`crate::StableDiffusion::decode_latents`] for a preview.
    pub pred_original: Option<&'a Tensor>,
}

/// What the step callback returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on.
    Continue,
    /// Stop now: the run ends early and returns the latents so far, with
    /// [`crate::Output::interrupted`] set (as diffusers' `interrupt`).
    Stop,
}
