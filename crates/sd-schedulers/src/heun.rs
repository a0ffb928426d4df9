//! Heun: the second-order (trapezoidal) ODE solver on sigmas; two model evaluations per step.

use candle_core::Tensor;
use sd_core::{NoiseSource, Result};

use crate::config::SchedulerConfig;
use crate::ops::{check_index, div, f32, same_shape, scale};
use crate::parameterization::x0_from_sigma;
use crate::schedule::{discrete_sigma_steps, SigmaSchedule};
use crate::scheduler::{Scheduler, StepOutput};

/// Mirrors diffusers'
/// [`HeunDiscreteScheduler`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/schedulers/scheduling_heun_discrete.py):
/// `2N - 1` timesteps (every one but the first twice); even step indices are Euler predictions,
/// odd ones the trapezoidal corrections of the previous index. A step whose previous index was
/// not stepped just before is a prediction (diffusers after `set_begin_index`).
#[derive(Debug, Clone)]
pub struct Heun {
    config: SchedulerConfig,
    sched: SigmaSchedule,
    /// After a prediction at `index`: (index, derivative, dt, sample).
    pending: Option<(usize, Tensor, f32, Tensor)>,
}

impl Heun {
    /// Builds the scheduler from a resolved config.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        Ok(Self {
            config: config.clone(),
            sched: SigmaSchedule::new(config, false)?,
            pending: None,
        })
    }
}

impl Scheduler for Heun {
    sigma_scheduler_methods!();

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        crate::ops::check_positive_steps(n)?;
        let c = &self.config;
        let karras = c.use_karras_sigmas.then_some((None, None));
        let (t, s) = discrete_sigma_steps(
            &self.sched.schedule,
            c.timestep_spacing,
            n,
            c.steps_offset,
            karras,
        )?;
        // sigmas: s0, s1, s1, ..., s_{N-1}, s_{N-1}, 0; timesteps: t0, t1, t1, ..., t_{N-1}, t_{N-1}
        let (Some((&s0, s_rest)), Some((&t0, t_rest))) = (s.split_first(), t.split_first()) else {
            return Err(sd_core::Error::invalid_argument(
                "num_inference_steps",
                n,
                "a step count that gives at least one timestep",
            ));
        };
        let mut sigmas = vec![s0 as f32];
        for &x in s_rest {
            sigmas.extend([x as f32, x as f32]);
        }
        sigmas.push(0.0);
        let mut timesteps = vec![t0];
        for &x in t_rest {
            timesteps.extend([x, x]);
        }
        self.sched.set(timesteps, sigmas);
        self.pending = None;
        Ok(())
    }

    fn order(&self) -> usize {
        2
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
        let s = &self.sched.sigmas;
        let pending = self
            .pending
            .take()
            .filter(|p| Some(p.0) == step_index.checked_sub(1));
        let (x0, prev) = match pending {
            None => {
                let (sigma, next) = (s[step_index], s[step_index + 1]);
                let x0 = self.clip(x0_from_sigma(self.config.prediction_type, &mo, &x, sigma)?)?;
                let derivative = div(&(&x - &x0)?, sigma)?;
                let dt = next - sigma;
                let prev = (&x + scale(&derivative, dt)?)?;
                self.pending = Some((step_index, derivative, dt, x));
                (x0, prev)
            }
            Some((_, d1, dt, x_start)) => {
                let next = s[step_index];
                let x0 = self.clip(x0_from_sigma(self.config.prediction_type, &mo, &x, next)?)?;
                let d2 = div(&(&x - &x0)?, next)?;
                let derivative = div(&(d1 + d2)?, 2.0)?;
                let prev = (&x_start + scale(&derivative, dt)?)?;
                (x0, prev)
            }
        };
        Ok(StepOutput {
            prev_sample: prev.to_dtype(dtype)?,
            pred_original_sample: Some(x0.to_dtype(dtype)?),
        })
    }
}

impl Heun {
    fn clip(&self, x0: Tensor) -> Result<Tensor> {
        Ok(match self.config.clip_sample {
            Some(r) => x0.clamp(-r as f32, r as f32)?,
            None => x0,
        })
    }
}
