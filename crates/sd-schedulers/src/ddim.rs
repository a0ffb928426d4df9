//! DDIM: deterministic (eta = 0) or partly stochastic implicit sampling.

use candle_core::Tensor;
use sd_core::{Error, NoiseSource, Result};

use crate::config::SchedulerConfig;
use crate::ddpm::check_steps;
use crate::ops::{add_noise_alpha, check_index, f32, same_shape, scale};
use crate::parameterization::{x0_and_eps_from_alpha, PredictionType};
use crate::schedule::{spaced_timesteps, NoiseSchedule};
use crate::scheduler::{Scheduler, StepOutput};

/// Mirrors diffusers'
/// [`DDIMScheduler`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/schedulers/scheduling_ddim.py).
/// With `eta > 0` (see [`Scheduler::set_eta`]) each step draws one noise tensor.
#[derive(Debug, Clone)]
pub struct Ddim {
    config: SchedulerConfig,
    schedule: NoiseSchedule,
    final_alpha_cumprod: f32,
    timesteps: Vec<f64>,
    eta: f32,
}

impl Ddim {
    /// Builds the scheduler from a resolved config (eta 0).
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let schedule = NoiseSchedule::new(
            &config.betas,
            config.num_train_timesteps,
            config.rescale_betas_zero_snr,
        )?;
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            schedule.alpha_cumprod(0)?
        };
        Ok(Self {
            config: config.clone(),
            schedule,
            final_alpha_cumprod,
            timesteps: Vec::new(),
            eta: 0.0,
        })
    }

    fn alpha_at(&self, t: i64) -> Result<f32> {
        crate::ops::alpha_cumprod_at(&self.schedule, t, self.final_alpha_cumprod, &self.config)
    }
}

impl Scheduler for Ddim {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(n, self.schedule.len())?;
        let c = &self.config;
        self.timesteps = spaced_timesteps(
            c.timestep_spacing,
            self.schedule.len(),
            n,
            c.steps_offset,
            true,
        )?;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn set_eta(&mut self, eta: f64) -> Result<()> {
        if !(eta >= 0.0 && eta.is_finite()) {
            return Err(Error::invalid_argument("eta", eta, "a finite value >= 0"));
        }
        self.eta = eta as f32;
        Ok(())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        check_index(step_index, self.timesteps.len())?;
        same_shape(model_output, sample)?;
        let dtype = model_output.dtype();
        let (mo, x) = (f32(model_output)?, f32(sample)?);
        let t = self.timesteps[step_index] as i64;
        // diffusers steps back by T // N whatever the spacing
        let prev_t = t - (self.schedule.len() / self.timesteps.len()) as i64;
        let a_t = self.alpha_at(t)?;
        let a_prev = self.alpha_at(prev_t)?;
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let (mut x0, eps) = x0_and_eps_from_alpha(self.config.prediction_type, &mo, &x, a_t)?;
        if let Some(r) = self.config.clip_sample {
            x0 = x0.clamp(-r as f32, r as f32)?;
        }
        let variance = b_prev / b_t * (1.0 - a_t / a_prev);
        let std = self.eta * variance.sqrt();
        let dir_coeff = (1.0 - a_prev - std * std).sqrt();
        let mut prev = (scale(&x0, a_prev.sqrt())? + scale(&eps, dir_coeff)?)?;
        if self.eta > 0.0 {
            let z = noise.randn_tensor(mo.dims(), mo.dtype(), mo.device())?;
            prev = (prev + scale(&z, std)?)?;
        }
        Ok(StepOutput {
            prev_sample: prev.to_dtype(dtype)?,
            pred_original_sample: Some(x0.to_dtype(dtype)?),
        })
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        add_noise_alpha(
            original,
            noise,
            self.alpha_at(self.timesteps[step_index] as i64)?,
        )
    }

    fn num_train_timesteps(&self) -> usize {
        self.schedule.len()
    }

    fn prediction_type(&self) -> PredictionType {
        self.config.prediction_type
    }
}
