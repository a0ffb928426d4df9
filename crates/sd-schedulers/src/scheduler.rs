//! The [`Scheduler`] trait that the pipeline drives, and the cut points that image-to-image and
//! the SDXL base + refiner ensemble compute from it.

use candle_core::Tensor;
use sd_core::{Error, NoiseSource, Result};

use crate::parameterization::PredictionType;

/// What one [`Scheduler::step`] returns, as diffusers' `SchedulerOutput`s.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// The sample for the next step index (`x_{t-1}`), in the model output's dtype.
    pub prev_sample: Tensor,
    /// The scheduler's estimate of the clean sample `x0`, for previews (`None` for PNDM, which
    /// never forms it).
    pub pred_original_sample: Option<Tensor>,
}

/// A diffusion sampler: the noise schedule, the model parameterisation and a solver, driven one
/// step index at a time. Object safe (`Box<dyn Scheduler>`), and implementable outside sd-rs:
/// only [`set_timesteps`](Scheduler::set_timesteps), [`timesteps`](Scheduler::timesteps),
/// [`step`](Scheduler::step), [`add_noise`](Scheduler::add_noise),
/// [`num_train_timesteps`](Scheduler::num_train_timesteps) and
/// [`prediction_type`](Scheduler::prediction_type) are required.
///
/// The denoising loop is, for each `i` in `start..end` of `timesteps()`:
/// `x_in = scale_model_input(x, i)`, `out = model(x_in, timesteps()[i])`,
/// `x = step(out, i, x, noise).prev_sample`, with `x` initially noise times
/// [`init_noise_sigma`](Scheduler::init_noise_sigma) (or [`add_noise`](Scheduler::add_noise) of
/// an image at `start`). Steps are addressed by index: a scheduler with history (PNDM, DPM++,
/// Heun, LMS) starts afresh whenever `step` is not called with the index after the previous
/// call's, which is what diffusers does after `set_begin_index(start)`.
///
/// # Shapes
/// `sample`, `model_output`, `noise`: the latent shape, e.g. `[B, 4, H/8, W/8]`; any float dtype
/// (the maths runs in float32, results come back in the model output's dtype).
pub trait Scheduler: Send {
    /// Prepares the schedule for `num_inference_steps` denoising steps (and forgets history).
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;

    /// The model timestep of every step index (Heun: `2N - 1` entries, as diffusers; PNDM with
    /// `skip_prk_steps`: `N + 1`). Empty before [`set_timesteps`](Scheduler::set_timesteps).
    fn timesteps(&self) -> &[f64];

    /// The sigma of every step index plus the final one (sigma schedulers), float32 values.
    fn sigmas(&self) -> Option<&[f64]> {
        None
    }

    /// Standard deviation of the initial noise (1 for DDPM/DDIM/PNDM/DPM-Solver; the largest
    /// sigma, or `sqrt(sigma_max^2 + 1)` with `leading` spacing, for Euler/Heun/LMS).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// Scales the denoiser input at `step_index` (sigma schedulers divide by
    /// `sqrt(sigma^2 + 1)`); the identity by default.
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        let _ = step_index;
        Ok(sample.clone())
    }

    /// One denoising step from step index `step_index` to the next. Stochastic schedulers draw
    /// their noise from `noise`, with the model output's shape, in diffusers' order and count.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput>;

    /// Noises a clean sample to the noise level of `timesteps()[step_index]` (image-to-image).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor>;

    /// Model evaluations per step (2 for Heun); image-to-image multiplies its start by this.
    fn order(&self) -> usize {
        1
    }

    /// `num_train_timesteps` of the config (the model's training steps, T).
    fn num_train_timesteps(&self) -> usize;

    /// What the model predicts.
    fn prediction_type(&self) -> PredictionType;

    /// Sets DDIM's `eta` (the stochasticity of its steps). Ignored by schedulers without one,
    /// as diffusers' pipelines only pass `eta` to schedulers that accept it.
    fn set_eta(&mut self, eta: f64) -> Result<()> {
        let _ = eta;
        Ok(())
    }

    /// The first step index of image-to-image at `strength` (in `[0, 1]`), as diffusers'
    /// `StableDiffusionImg2ImgPipeline.get_timesteps`: `t_start * order` with
    /// `t_start = N - min(floor(N * strength), N)`.
    fn start_index_for_strength(&self, num_inference_steps: usize, strength: f64) -> Result<usize> {
        if !(0.0..=1.0).contains(&strength) {
            return Err(Error::invalid_argument(
                "strength",
                strength,
                "a value in [0, 1]",
            ));
        }
        let n = num_inference_steps;
        let init = ((n as f64 * strength) as usize).min(n);
        Ok((n - init) * self.order())
    }

    /// The end (exclusive) step index for SDXL base's `denoising_end` (in `(0, 1)`): the steps
    /// whose timestep is at least `round(T - denoising_end * T)`, as `StableDiffusionXLPipeline`.
    fn end_index_for_denoising_end(&self, denoising_end: f64) -> Result<usize> {
        let cutoff = timestep_cutoff(denoising_end, self.num_train_timesteps(), "denoising_end")?;
        Ok(self.timesteps().iter().filter(|&&t| t >= cutoff).count())
    }

    /// The first step index for `denoising_start` (in `(0, 1)`; the SDXL refiner), as
    /// `StableDiffusionXLImg2ImgPipeline.get_timesteps`: the steps whose timestep is below
    /// `round(T - denoising_start * T)`, one more for a second-order scheduler when that count
    /// is even (so as not to start between the two halves of a Heun step).
    fn start_index_for_denoising_start(&self, denoising_start: f64) -> Result<usize> {
        let cutoff = timestep_cutoff(
            denoising_start,
            self.num_train_timesteps(),
            "denoising_start",
        )?;
        let ts = self.timesteps();
        let mut n = ts.iter().filter(|&&t| t < cutoff).count();
        if self.order() == 2 && n.is_multiple_of(2) {
            n += 1;
        }
        Ok(ts.len().saturating_sub(n))
    }
}

/// `int(round(T - fraction * T))` with Python's round-half-to-even.
fn timestep_cutoff(fraction: f64, num_train_timesteps: usize, name: &str) -> Result<f64> {
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(Error::invalid_argument(
            name,
            fraction,
            "a value strictly between 0 and 1",
        ));
    }
    let t = num_train_timesteps as f64;
    Ok((t - fraction * t).round_ties_even())
}
