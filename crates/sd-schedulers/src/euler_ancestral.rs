//! Euler Ancestral: an Euler step to a lower sigma, then fresh noise back up to the target.

use candle_core::Tensor;
use sd_core::{NoiseSource, Result};

use crate::config::SchedulerConfig;
use crate::ops::{check_index, div, f32, same_shape, scale};
use crate::parameterization::{unsupported_prediction, x0_from_sigma, PredictionType};
use crate::schedule::{discrete_sigma_steps, SigmaSchedule};
use crate::scheduler::{Scheduler, StepOutput};

/// Mirrors diffusers'
/// [`EulerAncestralDiscreteScheduler`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/schedulers/scheduling_euler_ancestral_discrete.py).
/// Every step (the last one included) draws one noise tensor.
#[derive(Debug, Clone)]
pub struct EulerAncestral {
    config: SchedulerConfig,
    sched: SigmaSchedule,
}

impl EulerAncestral {
    /// Builds the scheduler from a resolved config (`prediction_type` epsilon or v_prediction).
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        if config.prediction_type == PredictionType::Sample {
            return Err(unsupported_prediction(
                "EulerAncestralDiscreteScheduler",
                config.prediction_type,
            ));
        }
        Ok(Self {
            config: config.clone(),
            sched: SigmaSchedule::new(config, config.rescale_betas_zero_snr)?,
        })
    }
}

impl Scheduler for EulerAncestral {
    sigma_scheduler_methods!();

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        crate::ops::check_positive_steps(n)?;
        let c = &self.config;
        let (timesteps, sigmas) = discrete_sigma_steps(
            &self.sched.schedule,
            c.timestep_spacing,
            n,
            c.steps_offset,
            None,
        )?;
        let mut s: Vec<f32> = sigmas.iter().map(|&x| x as f32).collect();
        s.push(0.0);
        self.sched.set(timesteps, s);
        Ok(())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        check_index(step_index, self.sched.timesteps.len())?;
        same_shape(model_output, sample)?;
        let dtype = model_output.dtype();
        let (mo, x) = (f32(model_output)?, f32(sample)?);
        let sigma = self.sched.sigmas[step_index];
        let x0 = x0_from_sigma(self.config.prediction_type, &mo, &x, sigma)?;
        let (from, to) = (sigma, self.sched.sigmas[step_index + 1]);
        let sigma_up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
        let derivative = div(&(&x - &x0)?, sigma)?;
        let prev = (&x + scale(&derivative, sigma_down - sigma)?)?;
        let z = noise.randn_tensor(
            model_output.dims(),
            model_output.dtype(),
            model_output.device(),
        )?;
        let prev = (prev + scale(&f32(&z)?, sigma_up)?)?;
        Ok(StepOutput {
            prev_sample: prev.to_dtype(dtype)?,
            pred_original_sample: Some(x0.to_dtype(dtype)?),
        })
    }
}
