//! DDPM: the ancestral sampler of the process the model was trained with.

use candle_core::Tensor;
use sd_core::{NoiseSource, Result};

use crate::config::{SchedulerConfig, VarianceType};
use crate::ops::{add_noise_alpha, check_index, f32, lin2, same_shape, scale};
use crate::parameterization::{x0_and_eps_from_alpha, PredictionType};
use crate::schedule::{spaced_timesteps, NoiseSchedule};
use crate::scheduler::{Scheduler, StepOutput};

/// Mirrors diffusers'
/// [`DDPMScheduler`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/schedulers/scheduling_ddpm.py)
/// (`variance_type` fixed_small, fixed_small_log or fixed_large). Each step but the last draws
/// one noise tensor.
#[derive(Debug, Clone)]
pub struct Ddpm {
    config: SchedulerConfig,
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
}

impl Ddpm {
    /// Builds the scheduler from a resolved config.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let schedule = NoiseSchedule::new(
            &config.betas,
            config.num_train_timesteps,
            config.rescale_betas_zero_snr,
        )?;
        Ok(Self {
            config: config.clone(),
            schedule,
            timesteps: Vec::new(),
        })
    }

    /// The training noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    fn alpha_at(&self, t: i64) -> Result<f32> {
        crate::ops::alpha_cumprod_at(&self.schedule, t, 1.0, &self.config)
    }
}

impl Scheduler for Ddpm {
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
        let prev_t = self.timesteps.get(step_index + 1).map_or(-1, |&p| p as i64);
        let a_t = self.alpha_at(t)?;
        let a_prev = self.alpha_at(prev_t)?;
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let cur_alpha = a_t / a_prev;
        let cur_beta = 1.0 - cur_alpha;
        let (mut x0, _) = x0_and_eps_from_alpha(self.config.prediction_type, &mo, &x, a_t)?;
        if let Some(r) = self.config.clip_sample {
            x0 = x0.clamp(-r as f32, r as f32)?;
        }
        let x0_coeff = a_prev.sqrt() * cur_beta / b_t;
        let x_coeff = cur_alpha.sqrt() * b_prev / b_t;
        let mut prev = lin2(x0_coeff, &x0, x_coeff, &x)?;
        if t > 0 {
            let z = noise.randn_tensor(mo.dims(), mo.dtype(), mo.device())?;
            let variance = (b_prev / b_t * cur_beta).max(1e-20);
            let std = match self.config.variance_type {
                VarianceType::FixedSmall => variance.sqrt(),
                VarianceType::FixedSmallLog => (0.5 * variance.ln()).exp(),
                VarianceType::FixedLarge => cur_beta.sqrt(),
            };
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

/// `num_inference_steps` must be in `1..=T` (DDPM/DDIM refuse more steps than training steps).
pub(crate) fn check_steps(n: usize, num_train_timesteps: usize) -> Result<()> {
    if n == 0 || n > num_train_timesteps {
        return Err(sd_core::Error::invalid_argument(
            "num_inference_steps",
            n,
            format!("1..={num_train_timesteps} (num_train_timesteps)"),
        ));
    }
    Ok(())
}
