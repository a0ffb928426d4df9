//! The noise schedule: betas, `alphas_cumprod`, sigmas, timestep spacing, Karras sigmas and the
//! sigma-to-timestep interpolation. This is the only copy of these formulas in sd-rs.
//!
//! Values are computed with diffusers' own precision: torch keeps betas and `alphas_cumprod`
//! in float32 (its `cumprod` accumulates in double and rounds each output), numpy does the
//! spacing, interpolation and Karras maths in float64, and the final sigmas and timesteps are
//! rounded to float32. Mirrors the `__init__` and `set_timesteps` code shared by diffusers'
//! schedulers, e.g. [`EulerDiscreteScheduler`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/schedulers/scheduling_euler_discrete.py).

use sd_core::{Error, Result};

/// The largest `num_train_timesteps` sd-rs accepts (real models use 1000). The schedule holds
/// a few values per training step, so a larger count would only allocate memory.
pub const MAX_TRAIN_TIMESTEPS: usize = 1_000_000;

/// The largest `num_inference_steps` sd-rs accepts (DDPM/DDIM/PNDM also refuse more than
/// `num_train_timesteps`). Every step costs a model evaluation; the bound keeps a mistyped
/// step count from allocating the schedule's memory instead of failing.
pub const MAX_INFERENCE_STEPS: usize = 100_000;

/// How the training betas are laid out (`beta_schedule` / `trained_betas` in the config).
#[derive(Debug, Clone, PartialEq)]
pub enum BetaSchedule {
    /// `linear`: `torch.linspace(beta_start, beta_end, T)`.
    Linear {
        /// `beta_start`.
        start: f64,
        /// `beta_end`.
        end: f64,
    },
    /// `scaled_linear`: `torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T) ** 2` (Stable Diffusion).
    ScaledLinear {
        /// `beta_start`.
        start: f64,
        /// `beta_end`.
        end: f64,
    },
    /// `squaredcos_cap_v2`: the cosine `alpha_bar` of Nichol & Dhariwal, in float64, capped at 0.999.
    SquaredCosCapV2,
    /// `trained_betas`: explicit values (their count overrides `num_train_timesteps`).
    Trained(Vec<f64>),
}

/// How inference timesteps are spread over the training range (`timestep_spacing`); see table 2
/// of "Common Diffusion Noise Schedules and Sample Steps are Flawed".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `linspace`: evenly from `T - 1` down to 0.
    Linspace,
    /// `leading`: multiples of `T / N` from 0, plus `steps_offset` (SD 1.x/2.x/XL configs).
    Leading,
    /// `trailing`: evenly from `T - 1` down, ending above 0; always exactly `N` values.
    Trailing,
}

/// The training-time noise schedule shared by every scheduler.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NoiseSchedule {
    /// Betas, float32 as diffusers keeps them. Length `T`.
    pub betas: Vec<f32>,
    /// `cumprod(1 - betas)`, float32. Length `T`.
    pub alphas_cumprod: Vec<f32>,
}

impl NoiseSchedule {
    /// Builds the schedule of `num_train_timesteps` steps. With `rescale_zero_snr`, the betas are
    /// rescaled to zero terminal SNR (Lin et al. 2023, algorithm 1), as `rescale_zero_terminal_snr`.
    pub fn new(
        betas: &BetaSchedule,
        num_train_timesteps: usize,
        rescale_zero_snr: bool,
    ) -> Result<Self> {
        if !matches!(betas, BetaSchedule::Trained(_)) && num_train_timesteps > MAX_TRAIN_TIMESTEPS {
            return Err(Error::invalid_argument(
                "num_train_timesteps",
                num_train_timesteps,
                format!("at most {MAX_TRAIN_TIMESTEPS}"),
            ));
        }
        let mut b: Vec<f32> = match betas {
            BetaSchedule::Linear { start, end } => {
                torch_linspace_f32(*start, *end, num_train_timesteps)
            }
            BetaSchedule::ScaledLinear { start, end } => {
                torch_linspace_f32(start.sqrt(), end.sqrt(), num_train_timesteps)
                    .into_iter()
                    .map(|x| x * x)
                    .collect()
            }
            BetaSchedule::SquaredCosCapV2 => cosine_betas(num_train_timesteps),
            BetaSchedule::Trained(v) => v.iter().map(|&x| x as f32).collect(),
        };
        if b.is_empty() {
            return Err(Error::invalid_argument(
                "num_train_timesteps",
                0,
                "at least one training timestep",
            ));
        }
        if b.len() > MAX_TRAIN_TIMESTEPS {
            return Err(Error::invalid_argument(
                "num_train_timesteps",
                b.len(),
                format!("at most {MAX_TRAIN_TIMESTEPS}"),
            ));
        }
        if rescale_zero_snr {
            b = rescale_zero_terminal_snr(&b);
        }
        let alphas: Vec<f32> = b.iter().map(|&x| 1.0 - x).collect();
        Ok(Self {
            alphas_cumprod: cumprod_f32(&alphas),
            betas: b,
        })
    }

    /// Number of training timesteps `T`.
    pub fn len(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// Always false: a schedule has at least one step.
    pub fn is_empty(&self) -> bool {
        self.alphas_cumprod.is_empty()
    }

    /// `alphas_cumprod[t]`, or an error naming `t` and the schedule's range when `t` is past
    /// either end (diffusers raises torch's `IndexError` there).
    pub fn alpha_cumprod(&self, t: i64) -> Result<f32> {
        usize::try_from(t)
            .ok()
            .and_then(|i| self.alphas_cumprod.get(i))
            .copied()
            .ok_or_else(|| {
                Error::invalid_argument(
                    "timestep",
                    t,
                    format!(
                        "a training timestep in 0..={}",
                        self.alphas_cumprod.len().saturating_sub(1)
                    ),
                )
            })
    }

    /// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in float32, indexed by training timestep
    /// (ascending noise).
    pub fn train_sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod
            .iter()
            .map(|&a| sigma_of_alpha(a))
            .collect()
    }
}

/// `((1 - a) / a) ** 0.5` in float32, as diffusers computes it on torch tensors.
pub fn sigma_of_alpha(a: f32) -> f32 {
    ((1.0 - a) / a).sqrt()
}

/// `torch.linspace(start, end, n, dtype=float32)` by its scalar definition (first half counted
/// up from `start`, second half down from `end`). torch's vectorised kernel rounds a few
/// elements differently (at most 1 ulp), which the reference tests measure.
pub fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    match n {
        0 => return Vec::new(),
        1 => return vec![s],
        _ => {}
    }
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                s + step * i as f32
            } else {
                e - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

/// `numpy.linspace(start, end, n)` in float64 (`start + i * step`, last value exactly `end`;
/// empty for `n = 0`, as numpy).
pub fn np_linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    match n {
        0 => return Vec::new(),
        1 => return vec![start],
        _ => {}
    }
    let step = (end - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    if let Some(last) = v.last_mut() {
        *last = end;
    }
    v
}

/// `numpy.arange(start, 0, -step)` for a positive float step: `start + i * delta` with numpy's
/// `delta = (start - step) - start`, stopping before 0, *without* the point that float error
/// sometimes leaves just below 0.5 (numpy's length `ceil(start / step)` is then one too many:
/// diffusers returns 62 "trailing" timesteps, the last one -1, for N = 61 out of 1000).
fn np_arange_down(start: f64, step: f64) -> Vec<f64> {
    let len = (-start / -step).ceil().max(0.0) as usize;
    let delta = (start - step) - start;
    (0..len)
        .map(|i| start + i as f64 * delta)
        .filter(|&x| x.round_ties_even() >= 1.0)
        .collect()
}

/// The squaredcos_cap_v2 betas: float64 maths on `cos((t + 0.008) / 1.008 * pi / 2) ** 2`,
/// capped at 0.999, then rounded to float32 (as `betas_for_alpha_bar`).
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// torch's CPU `cumprod` for float32: accumulated in float64, each output rounded to float32.
fn cumprod_f32(x: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    x.iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// `rescale_zero_terminal_snr`, in float32 as diffusers computes it.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|&b| 1.0 - b).collect();
    let mut sqrt_bar: Vec<f32> = cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let (Some(&first), Some(&last)) = (sqrt_bar.first(), sqrt_bar.last()) else {
        return Vec::new();
    };
    let scale = first / (first - last);
    for v in &mut sqrt_bar {
        *v = (*v - last) * scale;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.extend(bar.first().map(|b0| 1.0 - b0));
    for w in bar.windows(2) {
        out.push(1.0 - w[1] / w[0]);
    }
    out
}

/// Checks the step counts every spacing divides by: `n` in `1..=MAX_INFERENCE_STEPS`, `t` in
/// `1..=MAX_TRAIN_TIMESTEPS`.
fn check_counts(num_train_timesteps: usize, num_inference_steps: usize) -> Result<()> {
    if !(1..=MAX_TRAIN_TIMESTEPS).contains(&num_train_timesteps) {
        return Err(Error::invalid_argument(
            "num_train_timesteps",
            num_train_timesteps,
            format!("1..={MAX_TRAIN_TIMESTEPS}"),
        ));
    }
    if !(1..=MAX_INFERENCE_STEPS).contains(&num_inference_steps) {
        return Err(Error::invalid_argument(
            "num_inference_steps",
            num_inference_steps,
            format!("1..={MAX_INFERENCE_STEPS}"),
        ));
    }
    Ok(())
}

/// `i * ratio + steps_offset` for `leading` spacing, checked (a config's `steps_offset` can be
/// any integer).
fn leading_timestep(i: usize, ratio: usize, steps_offset: usize) -> Result<f64> {
    i.checked_mul(ratio)
        .and_then(|x| x.checked_add(steps_offset))
        .map(|x| x as f64)
        .ok_or_else(|| {
            Error::invalid_argument(
                "steps_offset",
                steps_offset,
                "a value that keeps `leading` timesteps within the integer range",
            )
        })
}

/// Descending inference timesteps for `num_inference_steps` as DDPM/DDIM (`integer`) and the
/// sigma schedulers (not `integer`: `linspace` keeps fractional float32 values) compute them.
///
/// `num_inference_steps` must be in `1..=`[`MAX_INFERENCE_STEPS`] and `num_train_timesteps` in
/// `1..=`[`MAX_TRAIN_TIMESTEPS`]. `leading` timesteps can reach `num_train_timesteps` or beyond
/// (`steps_offset` is added), exactly as in diffusers; the schedulers that index
/// `alphas_cumprod` with them report an error for such a timestep.
pub fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: usize,
    integer: bool,
) -> Result<Vec<f64>> {
    check_counts(num_train_timesteps, num_inference_steps)?;
    let (t, n) = (num_train_timesteps, num_inference_steps);
    Ok(match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (t - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|x| {
                if integer {
                    x.round_ties_even()
                } else {
                    x as f32 as f64
                }
            })
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = t / n;
            (0..n)
                .rev()
                .map(|i| leading_timestep(i, ratio, steps_offset))
                .collect::<Result<_>>()?
        }
        TimestepSpacing::Trailing => np_arange_down(t as f64, t as f64 / n as f64)
            .into_iter()
            .map(|x| x.round_ties_even() - 1.0)
            .collect(),
    })
}

/// DPMSolverMultistepScheduler's own spacing: `N + 1` points with the last dropped, counted up
/// to `last_timestep` (below `T` when `lambda_min_clipped` clips the tail). The counts are
/// checked as in [`spaced_timesteps`].
pub fn dpm_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    last_timestep: usize,
    num_inference_steps: usize,
    steps_offset: usize,
) -> Result<Vec<f64>> {
    check_counts(num_train_timesteps, num_inference_steps)?;
    let n = num_inference_steps;
    Ok(match spacing {
        TimestepSpacing::Linspace => {
            let v = np_linspace(0.0, last_timestep as f64 - 1.0, n + 1);
            v[1..].iter().rev().map(|x| x.round_ties_even()).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = last_timestep / (n + 1);
            (1..=n)
                .rev()
                .map(|i| leading_timestep(i, ratio, steps_offset))
                .collect::<Result<_>>()?
        }
        TimestepSpacing::Trailing => {
            let step = num_train_timesteps as f64 / n as f64;
            np_arange_down(last_timestep as f64, step)
                .into_iter()
                .map(|x| x.round_ties_even() - 1.0)
                .collect()
        }
    })
}

/// `numpy.interp(x, arange(len(fp)), fp)` for one point (clamped at both ends). An empty `fp`
/// is an error, as numpy's `ValueError`; a NaN `x` gives NaN.
pub fn interp(x: f64, fp: &[f32]) -> Result<f64> {
    let (Some(&first), Some(&last)) = (fp.first(), fp.last()) else {
        return Err(Error::invalid_argument(
            "fp",
            "an empty list",
            "at least one value to interpolate",
        ));
    };
    if x.is_nan() {
        return Ok(f64::NAN);
    }
    if x <= 0.0 {
        return Ok(first as f64);
    }
    if x >= (fp.len() - 1) as f64 {
        return Ok(last as f64);
    }
    // 0 < x < len - 1, so j and j + 1 are in range
    let j = x.floor() as usize;
    let (a, b) = (fp[j] as f64, fp[j + 1] as f64);
    Ok((b - a) * (x - j as f64) + a)
}

/// Karras et al. (2022) sigmas: `rho = 7` interpolation between `sigma_max` and `sigma_min`.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// `_sigma_to_t`: the fractional training timestep whose sigma is `sigma`, interpolating
/// linearly in log-sigma. `log_sigmas` are the float32 logs of the training sigmas (at least
/// two, else an error).
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> Result<f64> {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    if n < 2 {
        return Err(Error::invalid_argument(
            "log_sigmas",
            format!("{n} values"),
            "at least 2 training sigmas to interpolate between",
        ));
    }
    // index of the last training log-sigma <= log_sigma (0 if none), capped at n - 2
    let count = log_sigmas
        .iter()
        .filter(|&&l| log_sigma - l as f64 >= 0.0)
        .count();
    let low = count.saturating_sub(1).min(n - 2);
    let (lo, hi) = (log_sigmas[low] as f64, log_sigmas[low + 1] as f64);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    Ok((1.0 - w) * low as f64 + w * (low + 1) as f64)
}

/// float32 logs of the training sigmas (numpy's `np.log` on a float32 array).
pub fn log_sigmas(train_sigmas: &[f32]) -> Vec<f32> {
    train_sigmas.iter().map(|s| s.ln()).collect()
}

/// Inference timesteps and sigmas of the discrete sigma schedulers (Euler, Euler Ancestral,
/// Heun, LMS), before the final sigma is appended: spaced timesteps, sigmas interpolated from
/// the training sigmas, and with `karras` (`Some((sigma_min, sigma_max))`, each defaulting to
/// the interpolated schedule's ends) Karras sigmas mapped back to fractional timesteps.
/// Values are float64, as numpy computes them; callers round to float32.
pub fn discrete_sigma_steps(
    schedule: &NoiseSchedule,
    spacing: TimestepSpacing,
    num_inference_steps: usize,
    steps_offset: usize,
    karras: Option<(Option<f64>, Option<f64>)>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let train = schedule.train_sigmas();
    let mut timesteps = spaced_timesteps(
        spacing,
        schedule.len(),
        num_inference_steps,
        steps_offset,
        false,
    )?;
    let mut sigmas: Vec<f64> = timesteps
        .iter()
        .map(|&t| interp(t, &train))
        .collect::<Result<_>>()?;
    if let Some((smin, smax)) = karras {
        let logs = log_sigmas(&train);
        let (Some(&last), Some(&first)) = (sigmas.last(), sigmas.first()) else {
            return Err(Error::invalid_argument(
                "num_inference_steps",
                num_inference_steps,
                "a step count that gives at least one timestep",
            ));
        };
        let smin = smin.unwrap_or(last);
        let smax = smax.unwrap_or(first);
        sigmas = karras_sigmas(smin, smax, num_inference_steps);
        timesteps = sigmas
            .iter()
            .map(|&s| sigma_to_t(s, &logs))
            .collect::<Result<_>>()?;
    }
    Ok((timesteps, sigmas))
}

/// `init_noise_sigma` of the sigma schedulers: the largest sigma, or `sqrt(max^2 + 1)` with
/// `leading` spacing (float32, as diffusers computes it on a tensor).
pub fn init_noise_sigma(sigmas: &[f32], spacing: TimestepSpacing) -> f64 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        TimestepSpacing::Leading => (max * max + 1.0).sqrt() as f64,
        _ => max as f64,
    }
}

/// Rounds float64 values to float32 (as `.astype(np.float32)`), kept as f64.
pub fn round_f32(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| x as f32 as f64).collect()
}

/// Timesteps and sigmas of a discrete sigma scheduler, set by `set_timesteps`.
#[derive(Debug, Clone, Default)]
pub(crate) struct SigmaSchedule {
    pub(crate) schedule: NoiseSchedule,
    pub(crate) timesteps: Vec<f64>,
    /// `N + 1` float32 sigmas (the last one final).
    pub(crate) sigmas: Vec<f32>,
    pub(crate) sigmas_f64: Vec<f64>,
}

impl SigmaSchedule {
    pub(crate) fn new(
        config: &crate::config::SchedulerConfig,
        rescale: bool,
    ) -> sd_core::Result<Self> {
        let mut schedule = NoiseSchedule::new(&config.betas, config.num_train_timesteps, rescale)?;
        if rescale {
            // diffusers pins the last alpha_cumprod to 2^-24 so that the last sigma is finite
            if let Some(last) = schedule.alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        Ok(Self {
            schedule,
            ..Default::default()
        })
    }

    pub(crate) fn set(&mut self, timesteps: Vec<f64>, sigmas: Vec<f32>) {
        self.timesteps = round_f32(&timesteps);
        self.sigmas_f64 = sigmas.iter().map(|&s| s as f64).collect();
        self.sigmas = sigmas;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_gives_exactly_n_distinct_timesteps() {
        // Regression: implementations that step with a rounded integer ratio or an inclusive
        // range return N + 1 or N - 1 values for some N.
        for n in 1..=1000 {
            let t = spaced_timesteps(TimestepSpacing::Trailing, 1000, n, 1, true).unwrap();
            assert_eq!(t.len(), n, "N = {n}");
            assert_eq!(t[0], 999.0, "N = {n}");
            assert!(t.windows(2).all(|w| w[0] > w[1]), "N = {n}: {t:?}");
        }
    }
}
