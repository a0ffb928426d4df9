//! sd-rs diffusion schedulers behind one [`Scheduler`] trait: DDPM, DDIM, PNDM, Euler, Euler
//! Ancestral, DPM++ 2M (optionally Karras), Heun and LMS, each matching its diffusers class
//! step for step.
//!
//! The three ideas are kept apart: the noise schedule ([`schedule`]: betas, sigmas, spacing),
//! the model parameterisation ([`parameterization`]: epsilon, v, sample) and one file per solver.
//! Build a scheduler from a `scheduler_config.json` with [`from_config_file`] (optionally as
//! another class, like diffusers' `from_config`), or write your own by implementing
//! [`Scheduler`].
#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]

#[macro_use]
mod macros;

pub mod config;
pub mod ddim;
pub mod ddpm;
pub mod dpm_solver;
pub mod euler;
pub mod euler_ancestral;
pub mod heun;
mod kind;
pub mod lms;
mod ops;
pub mod parameterization;
pub mod pndm;
pub mod schedule;
mod scheduler;

pub use config::{SchedulerConfig, SchedulerConfigFile};
pub use kind::{from_config_file, from_config_json, resolve_config_json, SchedulerKind};
pub use parameterization::PredictionType;
pub use schedule::{BetaSchedule, NoiseSchedule, TimestepSpacing};
pub use scheduler::{Scheduler, StepOutput};
