//! Euler: the first-order ODE solver on sigmas (Karras et al. 2022, algorithm 2 without churn).

use candle_core::Tensor;
use sd_core::{NoiseSource, Result};

use crate::config::{FinalSigmas, SchedulerConfig};
use crate::ops::{check_index, div, f32, same_shape, scale};
use crate::parameterization::x0_from_sigma;
use crate::schedule::{discrete_sigma_steps, sigma_of_alpha, SigmaSchedule};
use crate::scheduler::{Scheduler, StepOutput};

/// Mirrors diffusers'
/// [`EulerDiscreteScheduler`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/schedulers/scheduling_euler_discrete.py)
/// (SDXL's default) with `s_churn = 0`: `x += (x - x0) / sigma * (sigma_next - sigma)`.
#[derive(Debug, Clone)]
pub struct Euler {
    config: SchedulerConfig,
    sched: SigmaSchedule,
}

impl Euler {
    /// Builds the scheduler from a resolved config.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        Ok(Self {
            config: config.clone(),
            sched: SigmaSchedule::new(config, config.rescale_betas_zero_snr)?,
        })
    }
}

impl Scheduler for Euler {
    sigma_scheduler_methods!();

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        crate::ops::check_positive_steps(n)?;
        let c = &self.config;
        let karras = c.use_karras_sigmas.then_some((c.sigma_min, c.sigma_max));
        let (timesteps, sigmas) = discrete_sigma_steps(
            &self.sched.schedule,
            c.timestep_spacing,
            n,
            c.steps_offset,
            karras,
        )?;
        let last = match c.final_sigmas {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => sigma_of_alpha(self.sched.schedule.alpha_cumprod(0)?),
        };
        let mut s: Vec<f32> = sigmas.iter().map(|&x| x as f32).collect();
        s.push(last);
        self.sched.set(timesteps, s);
        Ok(())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        check_index(step_index, self.sched.timesteps.len())?;
        same_shape(model_output, sample)?;
        let dtype = model_output.dtype();
        let (mo, x) = (f32(model_output)?, f32(sample)?);
        let sigma = self.sched.sigmas[step_index];
        let x0 = x0_from_sigma(self.config.prediction_type, &mo, &x, sigma)?;
        let derivative = div(&(&x - &x0)?, sigma)?;
        let dt = self.sched.sigmas[step_index + 1] - sigma;
        let prev = (&x + scale(&derivative, dt)?)?;
        Ok(StepOutput {
            prev_sample: prev.to_dtype(dtype)?,
            pred_original_sample: Some(x0.to_dtype(dtype)?),
        })
    }
}
