//! The SDXL base + refiner "ensemble of experts" (diffusers' SDXL docs, "Base + refiner
//! model"): the base denoises the high-noise part of the schedule and returns latents
//! (`denoising_end`), the refiner continues from them (`denoising_start`) and decodes.

use sd_core::{Error, NoiseSource, Result};

use crate::pipeline::{Output, StableDiffusion};
use crate::request::{Flow, GenerateRequest, Init, OutputType, StepInfo};

/// A base and its refiner (load the refiner with [`StableDiffusion::load_refiner`] so that they
/// share `text_encoder_2` and the VAE).
///
/// ```no_run
/// # fn main() -> sd_pipeline::core::Result<()> {
/// use sd_pipeline::{Ensemble, Flow, GenerateRequest, StableDiffusion};
/// use sd_pipeline::core::{LoadOptions, TorchGenerator};
/// let opts = LoadOptions::default();
/// let base = StableDiffusion::load("sdxl-base".as_ref(), &opts)?;
/// let refiner = StableDiffusion::load_refiner("sdxl-refiner".as_ref(), &base, &opts)?;
/// let ensemble = Ensemble::new(&base, &refiner, 0.8)?;
/// let req = GenerateRequest::new("a lighthouse in a storm");
/// let out = ensemble.generate(&req, &mut TorchGenerator::new(42), &mut |_| Flow::Continue)?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Ensemble<'a> {
    base: &'a StableDiffusion,
    refiner: &'a StableDiffusion,
    high_noise_frac: f64,
}

impl<'a> Ensemble<'a> {
    /// `high_noise_frac` in (0, 1) is the fraction of the steps the base runs (diffusers'
    /// `denoising_end` / `denoising_start`, 0.8 in its example). The refiner must take the
    /// base's latent channels.
    pub fn new(
        base: &'a StableDiffusion,
        refiner: &'a StableDiffusion,
        high_noise_frac: f64,
    ) -> Result<Self> {
        if !(high_noise_frac > 0.0 && high_noise_frac < 1.0) {
            return Err(Error::invalid_argument(
                "high_noise_frac",
                high_noise_frac,
                "a fraction strictly between 0 and 1",
            ));
        }
        let (rc, bc) = (
            refiner.unet.config().in_channels,
            base.unet.config().in_channels,
        );
        if rc != bc {
            return Err(Error::invalid_argument(
                "refiner",
                format!("a UNet taking {rc} latent channels"),
                format!("the {bc} channels the base produces"),
            ));
        }
        Ok(Self {
            base,
            refiner,
            high_noise_frac,
        })
    }

    /// The fraction of the steps the base runs.
    pub fn high_noise_frac(&self) -> f64 {
        self.high_noise_frac
    }

    /// Runs the base on `req` up to `high_noise_frac`, then the refiner on the same prompts,
    /// steps and images per prompt from the base's latents. `on_step` sees both runs (each with
    /// its own `step` and `total`) and may stop either; a stop during the base returns the
    /// base's latents, undecoded, with `interrupted` set. `req.init` and `req.denoising_end`
    /// are the base's.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        noise: &mut dyn NoiseSource,
        on_step: &mut dyn FnMut(StepInfo<'_>) -> Flow,
    ) -> Result<Output> {
        let f = self.high_noise_frac;
        let mut base_req = req.clone();
        base_req.denoising_end = Some(f);
        base_req.output = OutputType::Latents;
        let base_out = self.base.generate(&base_req, noise, on_step)?;
        if base_out.interrupted {
            return Ok(base_out);
        }
        let mut ref_req = req.clone();
        ref_req.init = Init::Continue {
            latents: base_out.latents,
            denoising_start: f,
        };
        ref_req.denoising_end = None;
        self.refiner.generate(&ref_req, noise, on_step)
    }
}
