//! AUTOMATIC1111's "infotext": the `parameters` text written into every PNG (prompt, negative
//! prompt, then `Key: value` pairs), so that the image can be reproduced and read back by
//! AUTOMATIC1111's PNG Info. The `sd` CLI and `sd serve` write it with this one type.

use std::fmt;

use sd_schedulers::SchedulerKind;

/// The settings of one generated image, written as AUTOMATIC1111 writes them.
///
/// ```
/// use sd_pipeline::{Infotext, SchedulerKind};
/// let mut t = Infotext::new("a red circle", SchedulerKind::Euler, 20, 5.0, 7, (64, 64), "demo");
/// t.clip_skip = Some(2);
/// assert_eq!(
///     t.to_string(),
///     format!(
///         "a red circle\nSteps: 20, Sampler: Euler, CFG scale: 5, Seed: 7, Size: 64x64, \
///          Model: demo, Clip skip: 2, Version: sd-rs {}",
///         env!("CARGO_PKG_VERSION")
///     )
/// );
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Infotext {
    /// The prompt as given (A1111 syntax kept).
    pub prompt: String,
    /// The negative prompt (empty when none).
    pub negative_prompt: String,
    /// Denoising steps of the full schedule.
    pub steps: usize,
    /// The scheduler actually used (written with its A1111 sampler name and schedule type).
    pub scheduler: SchedulerKind,
    /// Classifier-free guidance scale.
    pub cfg_scale: f64,
    /// The seed of this image.
    pub seed: u64,
    /// (width, height) in pixels.
    pub size: (u32, u32),
    /// The model's name (what was passed as `--model`).
    pub model: String,
    /// A1111's Clip skip (1 = last layer; written when above 1).
    pub clip_skip: Option<u32>,
    /// `guidance_rescale` (written when above 0).
    pub guidance_rescale: f64,
    /// img2img's strength.
    pub denoising_strength: Option<f64>,
    /// The SDXL refiner and the fraction at which it takes over.
    pub refiner: Option<(String, f64)>,
    /// A1111's `Lora hashes` value, `name: hash, ...` (see
    /// [`crate::prompt_loras::lora_hashes`]); written quoted, as A1111 quotes values with `:`.
    pub lora_hashes: Option<String>,
    /// A1111's `TI hashes` value for the textual-inversion embeddings used, `name: hash, ...`.
    pub ti_hashes: Option<String>,
    /// A1111's `Model hash`: the first 10 hex digits of the sha256 of the checkpoint file
    /// ([`crate::prompt_loras::sha256_hex`]); none for a diffusers folder (no one file).
    pub model_hash: Option<String>,
    /// `(Batch size, Batch pos)` for an image of a run that made several from one generator
    /// (diffusers' `num_images_per_prompt`): the run to repeat and which of its images this is.
    pub batch: Option<(usize, usize)>,
}

impl Infotext {
    /// The required fields; the optional ones start unset.
    pub fn new(
        prompt: impl Into<String>,
        scheduler: SchedulerKind,
        steps: usize,
        cfg_scale: f64,
        seed: u64,
        size: (u32, u32),
        model: impl Into<String>,
    ) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            steps,
            scheduler,
            cfg_scale,
            seed,
            size,
            model: model.into(),
            clip_skip: None,
            guidance_rescale: 0.0,
            denoising_strength: None,
            refiner: None,
            lora_hashes: None,
            ti_hashes: None,
            model_hash: None,
            batch: None,
        }
    }
}

/// AUTOMATIC1111's layout (its `create_infotext`): the prompt; `Negative prompt: ...` only when
/// there is one; then the settings in A1111's order, each only when it applies; `Version` last.
impl fmt::Display for Infotext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (sampler, schedule_type) = self.scheduler.a1111_name();
        write!(f, "{}", self.prompt)?;
        if !self.negative_prompt.is_empty() {
            write!(f, "\nNegative prompt: {}", self.negative_prompt)?;
        }
        write!(f, "\nSteps: {}, Sampler: {sampler}, ", self.steps)?;
        if let Some(t) = schedule_type {
            write!(f, "Schedule type: {t}, ")?;
        }
        write!(
            f,
            "CFG scale: {}, Seed: {}, Size: {}x{}",
            self.cfg_scale, self.seed, self.size.0, self.size.1
        )?;
        if let Some(h) = &self.model_hash {
            write!(f, ", Model hash: {h}")?;
        }
        write!(f, ", Model: {}", quote(&self.model))?;
        if let Some((size, pos)) = self.batch.filter(|(n, _)| *n > 1) {
            write!(f, ", Batch size: {size}, Batch pos: {pos}")?;
        }
        if let Some(s) = self.denoising_strength {
            write!(f, ", Denoising strength: {s}")?;
        }
        if let Some(n) = self.clip_skip.filter(|&n| n > 1) {
            write!(f, ", Clip skip: {n}")?;
        }
        if self.guidance_rescale > 0.0 {
            write!(f, ", Guidance rescale: {}", self.guidance_rescale)?;
        }
        if let Some((r, at)) = &self.refiner {
            write!(f, ", Refiner: {}, Refiner switch at: {at}", quote(r))?;
        }
        if let Some(h) = &self.lora_hashes {
            write!(f, ", Lora hashes: {}", quote(h))?;
        }
        if let Some(h) = &self.ti_hashes {
            write!(f, ", TI hashes: {}", quote(h))?;
        }
        write!(f, ", Version: sd-rs {}", env!("CARGO_PKG_VERSION"))
    }
}

/// A1111's `quote`: a value with `,`, `:` or a newline is written as a JSON string, others as
/// they are.
fn quote(v: &str) -> String {
    if v.contains([',', ':', '\n']) {
        serde_json::Value::String(v.to_owned()).to_string()
    } else {
        v.to_owned()
    }
}
