//! DPM-Solver++ (multistep, data prediction): DPM++ 2M, optionally on Karras sigmas.

use candle_core::Tensor;
use sd_core::{NoiseSource, Result};

use crate::config::{DpmSolverType, FinalSigmas, SchedulerConfig};
use crate::ops::{check_index, f32, lin2, same_shape, scale};
use crate::parameterization::{alpha_sigma_of, x0_from_alpha_sigma, PredictionType};
use crate::schedule::{
    dpm_timesteps, interp, karras_sigmas, log_sigmas, sigma_of_alpha, sigma_to_t, BetaSchedule,
    SigmaSchedule,
};
use crate::scheduler::{Scheduler, StepOutput};

/// Mirrors diffusers'
/// [`DPMSolverMultistepScheduler`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/schedulers/scheduling_dpmsolver_multistep.py)
/// with `algorithm_type = "dpmsolver++"` and `solver_order` 1 or 2 (midpoint or heun). The
/// first step after a (re)start is first order, as is the last step with `final_sigmas_type`
/// zero (or under 15 steps with `lower_order_final`).
#[derive(Debug, Clone)]
pub struct DpmSolverMultistep {
    config: SchedulerConfig,
    sched: SigmaSchedule,
    /// The previous step's (index, x0 prediction).
    prev: Option<(usize, Tensor)>,
    /// Steps taken since the last (re)start, capped at the solver order.
    lower_order_nums: usize,
}

impl DpmSolverMultistep {
    /// Builds the scheduler from a resolved config.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        Ok(Self {
            config: config.clone(),
            sched: SigmaSchedule::new(config, config.rescale_betas_zero_snr)?,
            prev: None,
            lower_order_nums: 0,
        })
    }

    /// `(alpha_t, sigma_t, lambda_t = log(alpha_t) - log(sigma_t))` at sigma `sigma`.
    fn lambda(sigma: f32) -> (f32, f32, f32) {
        let (alpha_t, sigma_t) = alpha_sigma_of(sigma);
        (alpha_t, sigma_t, alpha_t.ln() - sigma_t.ln())
    }
}

impl Scheduler for DpmSolverMultistep {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        crate::ops::check_positive_steps(n)?;
        let c = &self.config;
        let sch = &self.sched.schedule;
        let t_train = sch.len();
        // lambda_t = log(sqrt(a)) - log(sqrt(1 - a)); searchsorted on it, flipped, for the clip
        let clipped = sch
            .alphas_cumprod
            .iter()
            .rev()
            .map(|&a| a.sqrt().ln() - (1.0 - a).sqrt().ln())
            .filter(|&l| (l as f64) < c.lambda_min_clipped)
            .count();
        let last_timestep = t_train - clipped;
        let mut timesteps = dpm_timesteps(
            c.timestep_spacing,
            t_train,
            last_timestep,
            n,
            c.steps_offset,
        )?;
        let train = sch.train_sigmas();
        let sigmas: Vec<f64> = if c.use_karras_sigmas {
            let logs = log_sigmas(&train);
            let (Some(&first), Some(&last)) = (train.first(), train.last()) else {
                return Err(sd_core::Error::invalid_argument(
                    "num_train_timesteps",
                    t_train,
                    "at least 1",
                ));
            };
            let s = karras_sigmas(first as f64, last as f64, n);
            let cosine = matches!(c.betas, BetaSchedule::SquaredCosCapV2);
            timesteps = s
                .iter()
                .map(|&x| -> Result<f64> {
                    let t = sigma_to_t(x, &logs)?;
                    Ok(if cosine {
                        t.trunc()
                    } else {
                        t.round_ties_even()
                    })
                })
                .collect::<Result<_>>()?;
            s
        } else {
            timesteps
                .iter()
                .map(|&t| interp(t, &train))
                .collect::<Result<_>>()?
        };
        let last = match c.final_sigmas {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => sigma_of_alpha(sch.alpha_cumprod(0)?),
        };
        self.sched.set(
            timesteps,
            sigmas.iter().map(|&x| x as f32).chain([last]).collect(),
        );
        self.prev = None;
        self.lower_order_nums = 0;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.sched.timesteps
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sched.sigmas_f64)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let len = self.sched.timesteps.len();
        check_index(step_index, len)?;
        same_shape(model_output, sample)?;
        let c = &self.config;
        let prev = self
            .prev
            .take()
            .filter(|p| Some(p.0) == step_index.checked_sub(1));
        if prev.is_none() {
            self.lower_order_nums = 0;
        }
        let lower_order_final = step_index == len - 1
            && (c.euler_at_final
                || (c.lower_order_final && len < 15)
                || c.final_sigmas == FinalSigmas::Zero);
        let dtype = model_output.dtype();
        let (mo, x) = (f32(model_output)?, f32(sample)?);
        let s = &self.sched.sigmas;
        let m0 = x0_from_alpha_sigma(c.prediction_type, &mo, &x, s[step_index])?;
        let (alpha_t, sigma_t, lambda_t) = Self::lambda(s[step_index + 1]);
        let (_, sigma_s0, lambda_s0) = Self::lambda(s[step_index]);
        let h = lambda_t - lambda_s0;
        let em1 = (-h).exp() - 1.0;
        let first = c.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final;
        let x_t = match prev.as_ref().filter(|_| !first) {
            None => lin2(sigma_t / sigma_s0, &x, -(alpha_t * em1), &m0)?,
            Some((_, m1)) => {
                // with solver_order <= 2, diffusers' `lower_order_second` changes nothing
                let (_, _, lambda_s1) = Self::lambda(s[step_index - 1]);
                let r0 = (lambda_s0 - lambda_s1) / h;
                let d1 = scale(&(&m0 - m1)?, 1.0 / r0)?;
                let base = lin2(sigma_t / sigma_s0, &x, -(alpha_t * em1), &m0)?;
                match c.solver_type {
                    DpmSolverType::Midpoint => (base - scale(&d1, 0.5 * (alpha_t * em1))?)?,
                    DpmSolverType::Heun => (base + scale(&d1, alpha_t * (em1 / h + 1.0))?)?,
                }
            }
        };
        if self.lower_order_nums < c.solver_order {
            self.lower_order_nums += 1;
        }
        self.prev = Some((step_index, m0.clone()));
        Ok(StepOutput {
            prev_sample: x_t.to_dtype(dtype)?,
            pred_original_sample: Some(m0.to_dtype(dtype)?),
        })
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.sched.timesteps.len())?;
        crate::ops::same_shape(noise, original)?;
        let (alpha_t, sigma_t) = alpha_sigma_of(self.sched.sigmas[step_index]);
        Ok(lin2(alpha_t, &f32(original)?, sigma_t, &f32(noise)?)?.to_dtype(original.dtype())?)
    }

    fn num_train_timesteps(&self) -> usize {
        self.sched.schedule.len()
    }

    fn prediction_type(&self) -> PredictionType {
        self.config.prediction_type
    }
}
