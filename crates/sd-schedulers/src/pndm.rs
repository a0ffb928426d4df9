//! PNDM in its PLMS form (`skip_prk_steps`): Stable Diffusion 1.x's default sampler, a
//! fourth-order linear multistep method on the noise predictions.

use candle_core::Tensor;
use sd_core::{NoiseSource, Result};

use crate::config::SchedulerConfig;
use crate::ops::{add_noise_alpha, check_index, div, f32, lin2, same_shape, scale};
use crate::parameterization::{unsupported_prediction, PredictionType};
use crate::schedule::{spaced_timesteps, NoiseSchedule};
use crate::scheduler::{Scheduler, StepOutput};

/// Mirrors diffusers'
/// [`PNDMScheduler`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/schedulers/scheduling_pndm.py)
/// with `skip_prk_steps: true` (as every Stable Diffusion config sets it). Its `N + 1`
/// timesteps repeat the second one: step 1 re-evaluates step 0's target with a second-order
/// (Heun-like) correction. History restarts when a step index does not follow the previous one.
#[derive(Debug, Clone)]
pub struct Pndm {
    config: SchedulerConfig,
    schedule: NoiseSchedule,
    final_alpha_cumprod: f32,
    num_inference_steps: usize,
    timesteps: Vec<f64>,
    // history since `begin`: the last four model outputs, and step 0's sample
    ets: Vec<Tensor>,
    cur_sample: Option<Tensor>,
    begin: usize,
    last: Option<usize>,
}

impl Pndm {
    /// Builds the scheduler from a resolved config (`prediction_type` epsilon or v_prediction).
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        if config.prediction_type == PredictionType::Sample {
            return Err(unsupported_prediction(
                "PNDMScheduler",
                config.prediction_type,
            ));
        }
        let schedule = NoiseSchedule::new(&config.betas, config.num_train_timesteps, false)?;
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            schedule.alpha_cumprod(0)?
        };
        Ok(Self {
            config: config.clone(),
            schedule,
            final_alpha_cumprod,
            num_inference_steps: 0,
            timesteps: Vec::new(),
            ets: Vec::new(),
            cur_sample: None,
            begin: 0,
            last: None,
        })
    }

    fn alpha_at(&self, t: i64) -> Result<f32> {
        crate::ops::alpha_cumprod_at(&self.schedule, t, self.final_alpha_cumprod, &self.config)
    }

    /// `_get_prev_sample`: the DDIM-like transfer from `t` to `prev_t` with noise estimate `eps`.
    fn prev_sample(&self, x: &Tensor, t: i64, prev_t: i64, eps: &Tensor) -> Result<Tensor> {
        let a_t = self.alpha_at(t)?;
        let a_prev = self.alpha_at(prev_t)?;
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let eps = match self.config.prediction_type {
            PredictionType::VPrediction => lin2(a_t.sqrt(), eps, b_t.sqrt(), x)?,
            _ => eps.clone(),
        };
        let x_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        Ok((scale(x, x_coeff)? - div(&scale(&eps, a_prev - a_t)?, denom)?)?)
    }
}

impl Scheduler for Pndm {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        crate::ddpm::check_steps(n, self.schedule.len())?;
        let (t, c) = (self.schedule.len(), &self.config);
        // ascending `_timesteps` (each spacing gives the same values as DDIM's, ascending)
        let asc: Vec<f64> = spaced_timesteps(c.timestep_spacing, t, n, c.steps_offset, true)?
            .into_iter()
            .rev()
            .collect();
        // plms: _timesteps[:-1], _timesteps[-2:-1], _timesteps[-1:], reversed
        let Some((&last, rest)) = asc.split_last() else {
            return Err(sd_core::Error::invalid_argument(
                "num_inference_steps",
                n,
                "a step count that gives at least one timestep",
            ));
        };
        let mut plms: Vec<f64> = rest.to_vec();
        plms.extend(rest.last().copied());
        plms.push(last);
        plms.reverse();
        self.timesteps = plms;
        self.num_inference_steps = n;
        self.ets.clear();
        self.cur_sample = None;
        self.last = None;
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        check_index(step_index, self.timesteps.len())?;
        same_shape(model_output, sample)?;
        let dtype = model_output.dtype();
        let (mo, mut x) = (f32(model_output)?, f32(sample)?);
        if self.last.is_none() || self.last != step_index.checked_sub(1) {
            self.ets.clear();
            self.cur_sample = None;
            self.begin = step_index;
        }
        self.last = Some(step_index);
        let counter = step_index - self.begin;
        let ratio = (self.schedule.len() / self.num_inference_steps) as i64;
        let mut t = self.timesteps[step_index] as i64;
        let mut prev_t = t - ratio;
        if counter != 1 {
            if self.ets.len() > 3 {
                self.ets.remove(0);
            }
            self.ets.push(mo.clone());
        } else {
            prev_t = t;
            t += ratio;
        }
        let e = &self.ets;
        let n = e.len();
        let eps = if n == 1 && counter == 0 {
            self.cur_sample = Some(x.clone());
            mo
        } else if n == 1 && counter == 1 {
            if let Some(s) = self.cur_sample.take() {
                x = s;
            }
            div(&(mo + &e[0])?, 2.0)?
        } else if n == 2 {
            div(&(scale(&e[1], 3.0)? - &e[0])?, 2.0)?
        } else if n == 3 {
            let s = ((scale(&e[2], 23.0)? - scale(&e[1], 16.0)?)? + scale(&e[0], 5.0)?)?;
            div(&s, 12.0)?
        } else {
            let s = (((scale(&e[3], 55.0)? - scale(&e[2], 59.0)?)? + scale(&e[1], 37.0)?)?
                - scale(&e[0], 9.0)?)?;
            scale(&s, (1.0f64 / 24.0) as f32)?
        };
        let prev = self.prev_sample(&x, t, prev_t, &eps)?;
        Ok(StepOutput {
            prev_sample: prev.to_dtype(dtype)?,
            pred_original_sample: None,
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
