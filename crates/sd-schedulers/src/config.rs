//! `scheduler_config.json`: a serde mirror of the file ([`SchedulerConfigFile`]) and the resolved
//! config a scheduler is built from ([`SchedulerConfig`]), with each class's own defaults.
//!
//! diffusers' defaults differ per class (e.g. `timestep_spacing` is `leading` for DDIM/DDPM/PNDM
//! and `linspace` for the sigma schedulers; Heun's betas default to 0.00085..0.012), and
//! `from_config` onto another class fills the fields the file lacks with the *target* class's
//! defaults, so resolution takes the target [`SchedulerKind`].

use std::collections::BTreeMap;
use std::path::Path;

use sd_core::{Error, Result};
use serde::Deserialize;

use crate::kind::SchedulerKind;
use crate::parameterization::PredictionType;
use crate::schedule::{BetaSchedule, TimestepSpacing};

/// One `scheduler_config.json`, field for field (every field optional: absent fields take the
/// target class's default when resolved). Covers the fields of the real SD 1.5, SD 2.x and SDXL
/// configs and of the eight supported classes; other keys are collected in `extra`.
#[allow(missing_docs)] // the fields are diffusers' config fields, documented in `SchedulerConfig`
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SchedulerConfigFile {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<String>,
    pub timestep_spacing: Option<String>,
    pub steps_offset: Option<usize>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub set_alpha_to_one: Option<bool>,
    pub skip_prk_steps: Option<bool>,
    pub thresholding: Option<bool>,
    pub dynamic_thresholding_ratio: Option<f64>,
    pub sample_max_value: Option<f64>,
    pub variance_type: Option<String>,
    pub interpolation_type: Option<String>,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub timestep_type: Option<String>,
    pub final_sigmas_type: Option<String>,
    pub solver_order: Option<usize>,
    pub algorithm_type: Option<String>,
    pub solver_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    /// `-Infinity` in diffusers' files (read as `null`, i.e. no clipping).
    pub lambda_min_clipped: Option<f64>,
    pub use_dynamic_shifting: Option<bool>,
    /// Only used with flow sigmas / dynamic shifting (refused), so accepted and ignored:
    /// diffusers 0.3x+ writes `flow_shift: 1.0` into every DPM-Solver config.
    pub flow_shift: Option<f64>,
    /// As `flow_shift` (diffusers writes `"exponential"`).
    pub time_shift_type: Option<String>,
    /// Keys this struct does not know (reported with `log::warn!`; `_`-prefixed ones ignored).
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// DDPM's `variance_type` (the posterior variance added at each step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarianceType {
    /// `fixed_small`: the posterior variance, clamped at 1e-20.
    FixedSmall,
    /// `fixed_small_log`: the same, through exp(0.5 log(.)) (a standard deviation).
    FixedSmallLog,
    /// `fixed_large`: `beta_t`.
    FixedLarge,
}

/// The final sigma of sigma schedules (`final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigmas {
    /// `zero`: the schedule ends at sigma 0 (a clean sample).
    Zero,
    /// `sigma_min`: it ends at the smallest training sigma.
    SigmaMin,
}

/// DPMSolverMultistepScheduler's `solver_type` for second-order steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpmSolverType {
    /// `midpoint` (the default; DPM++ 2M).
    Midpoint,
    /// `heun`.
    Heun,
}

/// A resolved scheduler config: every field present, with honest types. Fields that a class
/// does not use are ignored by it (as diffusers' `from_config` ignores them).
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// The class the config was resolved for.
    pub kind: SchedulerKind,
    /// `num_train_timesteps` (T): training steps of the model.
    pub num_train_timesteps: usize,
    /// `beta_schedule` with `beta_start`/`beta_end`, or `trained_betas`.
    pub betas: BetaSchedule,
    /// `rescale_betas_zero_snr` (DDPM, DDIM, Euler, Euler Ancestral, DPM-Solver).
    pub rescale_betas_zero_snr: bool,
    /// `prediction_type`.
    pub prediction_type: PredictionType,
    /// `timestep_spacing`.
    pub timestep_spacing: TimestepSpacing,
    /// `steps_offset`, added to `leading` timesteps.
    pub steps_offset: usize,
    /// `clip_sample` with `clip_sample_range`: clamp x0 to +-range (DDPM, DDIM, Heun).
    pub clip_sample: Option<f64>,
    /// `set_alpha_to_one`: the alpha past the last step is 1 (else `alphas_cumprod[0]`).
    pub set_alpha_to_one: bool,
    /// `skip_prk_steps` (PNDM): only PLMS steps (the only mode sd-rs implements).
    pub skip_prk_steps: bool,
    /// DDPM's `variance_type`.
    pub variance_type: VarianceType,
    /// `use_karras_sigmas` (Euler, DPM-Solver, Heun, LMS).
    pub use_karras_sigmas: bool,
    /// `sigma_min` (Euler's Karras sigmas; `None`: the schedule's own).
    pub sigma_min: Option<f64>,
    /// `sigma_max` (Euler's Karras sigmas; `None`: the schedule's own).
    pub sigma_max: Option<f64>,
    /// `final_sigmas_type` (Euler, DPM-Solver).
    pub final_sigmas: FinalSigmas,
    /// `solver_order` (DPM-Solver: 1 or 2).
    pub solver_order: usize,
    /// `solver_type` (DPM-Solver).
    pub solver_type: DpmSolverType,
    /// `lower_order_final` (DPM-Solver: first order on the last steps under 15 steps).
    pub lower_order_final: bool,
    /// `euler_at_final` (DPM-Solver).
    pub euler_at_final: bool,
    /// `lambda_min_clipped` (DPM-Solver; `-inf`: no clipping).
    pub lambda_min_clipped: f64,
}

fn bad(path: &Path, key: &str, reason: impl Into<String>) -> Error {
    Error::config(path, Some(key), reason)
}

fn choose<T: Copy>(path: &Path, key: &str, value: &str, options: &[(&str, T)]) -> Result<T> {
    options
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<String> = options.iter().map(|(n, _)| format!("`{n}`")).collect();
            bad(
                path,
                key,
                format!(
                    "unknown value `{value}`, expected one of {}",
                    names.join(", ")
                ),
            )
        })
}

fn reject_true(path: &Path, key: &str, value: Option<bool>) -> Result<()> {
    if value == Some(true) {
        return Err(bad(
            path,
            key,
            "`true` is not supported by sd-rs (only `false`)",
        ));
    }
    Ok(())
}

impl SchedulerConfigFile {
    /// Resolves the file for `kind`, applying that class's defaults to absent fields. Values the
    /// class cannot take (or sd-rs does not implement) are an [`Error::Config`] naming `path` and
    /// the field.
    pub fn resolve(&self, kind: SchedulerKind, path: &Path) -> Result<SchedulerConfig> {
        use SchedulerKind as K;
        for key in sd_core::config::unknown_keys(&self.extra) {
            log::warn!(
                "{}: unknown scheduler config field `{key}` ignored",
                path.display()
            );
        }
        let is_heun = matches!(kind, K::Heun);
        let alpha_based = matches!(kind, K::Ddpm | K::Ddim | K::Pndm);
        let (def_start, def_end) = if is_heun {
            (0.00085, 0.012)
        } else {
            (0.0001, 0.02)
        };
        let start = self.beta_start.unwrap_or(def_start);
        let end = self.beta_end.unwrap_or(def_end);
        let betas = match &self.trained_betas {
            Some(v) if !v.is_empty() => BetaSchedule::Trained(v.clone()),
            _ => {
                let name = self.beta_schedule.as_deref().unwrap_or("linear");
                match name {
                    "linear" => BetaSchedule::Linear { start, end },
                    "scaled_linear" => BetaSchedule::ScaledLinear { start, end },
                    "squaredcos_cap_v2" => BetaSchedule::SquaredCosCapV2,
                    other => {
                        return Err(bad(
                            path,
                            "beta_schedule",
                            format!("unknown value `{other}`, expected `linear`, `scaled_linear` or `squaredcos_cap_v2`"),
                        ))
                    }
                }
            }
        };
        let num_train_timesteps = match &betas {
            BetaSchedule::Trained(v) => v.len(),
            _ => self.num_train_timesteps.unwrap_or(1000),
        };
        let max_t = crate::schedule::MAX_TRAIN_TIMESTEPS;
        if !(2..=max_t).contains(&num_train_timesteps) {
            return Err(bad(
                path,
                "num_train_timesteps",
                format!("got {num_train_timesteps}, expected 2 to {max_t}"),
            ));
        }
        // PNDM, Heun and LMS do not take `rescale_betas_zero_snr` (diffusers ignores it there).
        let takes_rescale = !matches!(kind, K::Pndm | K::Heun | K::Lms);
        let rescale_betas_zero_snr = takes_rescale && self.rescale_betas_zero_snr.unwrap_or(false);
        if !takes_rescale && self.rescale_betas_zero_snr == Some(true) {
            log::warn!(
                "{}: `rescale_betas_zero_snr` is ignored by {} (as in diffusers)",
                path.display(),
                kind.class_name()
            );
        }

        use PredictionType as P;
        let prediction_type = choose(
            path,
            "prediction_type",
            self.prediction_type.as_deref().unwrap_or("epsilon"),
            &[
                ("epsilon", P::Epsilon),
                ("v_prediction", P::VPrediction),
                ("sample", P::Sample),
            ],
        )?;
        let default_spacing = if alpha_based { "leading" } else { "linspace" };
        use TimestepSpacing as S;
        let timestep_spacing = choose(
            path,
            "timestep_spacing",
            self.timestep_spacing.as_deref().unwrap_or(default_spacing),
            &[
                ("linspace", S::Linspace),
                ("leading", S::Leading),
                ("trailing", S::Trailing),
            ],
        )?;

        // DDPM/DDIM/PNDM index alphas_cumprod with `leading` timesteps, which start at
        // steps_offset: from T on, no step count can work (diffusers fails at the first step).
        let steps_offset = self.steps_offset.unwrap_or(0);
        if alpha_based && timestep_spacing == S::Leading && steps_offset >= num_train_timesteps {
            return Err(bad(
                path,
                "steps_offset",
                format!(
                    "is {steps_offset}; with \"leading\" spacing {} indexes the training \
                     schedule at steps_offset and above, so it must be below num_train_timesteps \
                     ({num_train_timesteps})",
                    kind.class_name()
                ),
            ));
        }

        let default_clip = matches!(kind, K::Ddpm | K::Ddim);
        let clip_range = self.clip_sample_range.unwrap_or(1.0);
        let takes_clip = matches!(kind, K::Ddpm | K::Ddim | K::Heun);
        let clip_sample =
            (takes_clip && self.clip_sample.unwrap_or(default_clip)).then_some(clip_range);

        if matches!(kind, K::Ddpm | K::Ddim | K::DpmSolverMultistep { .. }) {
            reject_true(path, "thresholding", self.thresholding)?;
        }
        if !alpha_based {
            reject_true(path, "use_exponential_sigmas", self.use_exponential_sigmas)?;
            reject_true(path, "use_beta_sigmas", self.use_beta_sigmas)?;
        }
        if matches!(kind, K::DpmSolverMultistep { .. }) {
            reject_true(path, "use_lu_lambdas", self.use_lu_lambdas)?;
            reject_true(path, "use_flow_sigmas", self.use_flow_sigmas)?;
            reject_true(path, "use_dynamic_shifting", self.use_dynamic_shifting)?;
            if let Some(v) = &self.variance_type {
                return Err(bad(path, "variance_type", format!("`{v}` is not supported by sd-rs for DPMSolverMultistepScheduler (only null)")));
            }
        }
        if matches!(kind, K::Euler) {
            if let Some(t) = self
                .interpolation_type
                .as_deref()
                .filter(|t| *t != "linear")
            {
                return Err(bad(
                    path,
                    "interpolation_type",
                    format!("`{t}` is not supported by sd-rs (only `linear`)"),
                ));
            }
            if let Some(t) = self.timestep_type.as_deref().filter(|t| *t != "discrete") {
                return Err(bad(
                    path,
                    "timestep_type",
                    format!("`{t}` is not supported by sd-rs (only `discrete`)"),
                ));
            }
        }
        use VarianceType as V;
        let variance_type = if matches!(kind, K::Ddpm) {
            choose(
                path,
                "variance_type",
                self.variance_type.as_deref().unwrap_or("fixed_small"),
                &[
                    ("fixed_small", V::FixedSmall),
                    ("fixed_small_log", V::FixedSmallLog),
                    ("fixed_large", V::FixedLarge),
                ],
            )?
        } else {
            V::FixedSmall
        };
        let final_sigmas = choose(
            path,
            "final_sigmas_type",
            self.final_sigmas_type.as_deref().unwrap_or("zero"),
            &[
                ("zero", FinalSigmas::Zero),
                ("sigma_min", FinalSigmas::SigmaMin),
            ],
        )?;
        let solver_type = choose(
            path,
            "solver_type",
            self.solver_type.as_deref().unwrap_or("midpoint"),
            &[
                ("midpoint", DpmSolverType::Midpoint),
                ("heun", DpmSolverType::Heun),
            ],
        )?;
        let solver_order = self.solver_order.unwrap_or(2);
        if matches!(kind, K::DpmSolverMultistep { .. }) {
            if !(1..=2).contains(&solver_order) {
                return Err(bad(
                    path,
                    "solver_order",
                    format!("got {solver_order}, sd-rs supports 1 or 2"),
                ));
            }
            let algo = self.algorithm_type.as_deref().unwrap_or("dpmsolver++");
            if algo != "dpmsolver++" {
                return Err(bad(
                    path,
                    "algorithm_type",
                    format!("`{algo}` is not supported by sd-rs (only `dpmsolver++`)"),
                ));
            }
        }
        let use_karras_sigmas = match kind {
            K::DpmSolverMultistep { karras } => karras,
            K::Euler | K::Heun | K::Lms => self.use_karras_sigmas.unwrap_or(false),
            _ => false,
        };
        if matches!(kind, K::Pndm) && !self.skip_prk_steps.unwrap_or(false) {
            return Err(bad(path, "skip_prk_steps", "PNDM's Runge-Kutta warm-up (`false`, the class default) is not supported by sd-rs; set it to `true` as the Stable Diffusion configs do"));
        }
        let default_alpha_one = matches!(kind, K::Ddim);
        Ok(SchedulerConfig {
            kind,
            num_train_timesteps,
            betas,
            rescale_betas_zero_snr,
            prediction_type,
            timestep_spacing,
            steps_offset,
            clip_sample,
            set_alpha_to_one: self.set_alpha_to_one.unwrap_or(default_alpha_one),
            skip_prk_steps: self.skip_prk_steps.unwrap_or(false),
            variance_type,
            use_karras_sigmas,
            sigma_min: self.sigma_min.filter(|_| matches!(kind, K::Euler)),
            sigma_max: self.sigma_max.filter(|_| matches!(kind, K::Euler)),
            final_sigmas,
            solver_order,
            solver_type,
            lower_order_final: self.lower_order_final.unwrap_or(true),
            euler_at_final: self.euler_at_final.unwrap_or(false),
            lambda_min_clipped: self.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY),
        })
    }
}
