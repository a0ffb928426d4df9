//! LMS: linear multistep (Adams-Bashforth style, up to order 4) on the sigma ODE.

use candle_core::Tensor;
use sd_core::{NoiseSource, Result};

use crate::config::SchedulerConfig;
use crate::ops::{check_index, div, f32, same_shape, scale};
use crate::parameterization::x0_from_sigma;
use crate::schedule::{discrete_sigma_steps, SigmaSchedule};
use crate::scheduler::{Scheduler, StepOutput};

/// Highest LMS order (diffusers' default `order=4` argument of `step`).
const MAX_ORDER: usize = 4;

/// Mirrors diffusers'
/// [`LMSDiscreteScheduler`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/schedulers/scheduling_lms_discrete.py).
/// The coefficients integrate the Lagrange basis polynomials through the last sigmas exactly
/// (diffusers uses `scipy.integrate.quad`, exact for these cubic polynomials). As in diffusers,
/// the order at index `i` is `min(i + 1, 4)` even when fewer derivatives are stored (a start
/// part-way through the schedule).
#[derive(Debug, Clone)]
pub struct Lms {
    config: SchedulerConfig,
    sched: SigmaSchedule,
    derivatives: Vec<Tensor>,
    last: Option<usize>,
}

impl Lms {
    /// Builds the scheduler from a resolved config.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        Ok(Self {
            config: config.clone(),
            sched: SigmaSchedule::new(config, false)?,
            derivatives: Vec::new(),
            last: None,
        })
    }

    /// `get_lms_coefficient`: the integral from `sigmas[t]` to `sigmas[t + 1]` of the Lagrange
    /// basis polynomial of node `t - current` over the nodes `t, t - 1, .., t - order + 1`.
    fn coefficient(&self, order: usize, t: usize, current: usize) -> f64 {
        let s = |i: usize| self.sched.sigmas[i] as f64;
        let basis = |tau: f64| {
            (0..order)
                .filter(|&k| k != current)
                .map(|k| (tau - s(t - k)) / (s(t - current) - s(t - k)))
                .product::<f64>()
        };
        // 3-point Gauss-Legendre: exact for polynomials up to degree 5 (the basis has degree <= 3)
        let (a, b) = (s(t), s(t + 1));
        let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
        let x = (3.0f64 / 5.0).sqrt();
        half * (5.0 / 9.0 * basis(mid - half * x)
            + 8.0 / 9.0 * basis(mid)
            + 5.0 / 9.0 * basis(mid + half * x))
    }
}

impl Scheduler for Lms {
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
        self.sched
            .set(t, s.iter().map(|&x| x as f32).chain([0.0]).collect());
        self.derivatives.clear();
        self.last = None;
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
        if self.last.is_none() || self.last != step_index.checked_sub(1) {
            self.derivatives.clear();
        }
        self.last = Some(step_index);
        let dtype = model_output.dtype();
        let (mo, x) = (f32(model_output)?, f32(sample)?);
        let sigma = self.sched.sigmas[step_index];
        let x0 = x0_from_sigma(self.config.prediction_type, &mo, &x, sigma)?;
        self.derivatives.push(div(&(&x - &x0)?, sigma)?);
        if self.derivatives.len() > MAX_ORDER {
            self.derivatives.remove(0);
        }
        let order = (step_index + 1).min(MAX_ORDER);
        let mut acc: Option<Tensor> = None;
        for (current, d) in (0..order).zip(self.derivatives.iter().rev()) {
            let term = scale(d, self.coefficient(order, step_index, current) as f32)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
        let prev = match acc {
            Some(a) => (&x + a)?,
            None => x,
        };
        Ok(StepOutput {
            prev_sample: prev.to_dtype(dtype)?,
            pred_original_sample: Some(x0.to_dtype(dtype)?),
        })
    }
}
