//! [`SchedulerKind`]: which algorithm to build, by diffusers class name or CLI short name, and
//! construction from a `scheduler_config.json` (diffusers' `from_config`).

use std::path::Path;

use sd_core::{Error, Result};

use crate::config::{SchedulerConfig, SchedulerConfigFile};
use crate::scheduler::Scheduler;
use crate::{ddim, ddpm, dpm_solver, euler, euler_ancestral, heun, lms, pndm};

/// The supported scheduler algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// `DDPMScheduler` (`ddpm`).
    Ddpm,
    /// `DDIMScheduler` (`ddim`).
    Ddim,
    /// `PNDMScheduler` with `skip_prk_steps` (`pndm`).
    Pndm,
    /// `EulerDiscreteScheduler` (`euler`).
    Euler,
    /// `EulerAncestralDiscreteScheduler` (`euler-a`).
    EulerAncestral,
    /// `DPMSolverMultistepScheduler` as DPM++ 2M (`dpm++2m`, `dpm++2m-karras`).
    DpmSolverMultistep {
        /// `use_karras_sigmas`.
        karras: bool,
    },
    /// `HeunDiscreteScheduler` (`heun`).
    Heun,
    /// `LMSDiscreteScheduler` (`lms`).
    Lms,
}

const NAMES: &[(&str, &str, SchedulerKind)] = &[
    ("DDPMScheduler", "ddpm", SchedulerKind::Ddpm),
    ("DDIMScheduler", "ddim", SchedulerKind::Ddim),
    ("PNDMScheduler", "pndm", SchedulerKind::Pndm),
    ("EulerDiscreteScheduler", "euler", SchedulerKind::Euler),
    (
        "EulerAncestralDiscreteScheduler",
        "euler-a",
        SchedulerKind::EulerAncestral,
    ),
    (
        "DPMSolverMultistepScheduler",
        "dpm++2m",
        SchedulerKind::DpmSolverMultistep { karras: false },
    ),
    (
        "DPMSolverMultistepScheduler",
        "dpm++2m-karras",
        SchedulerKind::DpmSolverMultistep { karras: true },
    ),
    ("HeunDiscreteScheduler", "heun", SchedulerKind::Heun),
    ("LMSDiscreteScheduler", "lms", SchedulerKind::Lms),
];

/// AUTOMATIC1111's sampler names (webui v1.6-v1.10) for the kinds sd-rs has. Newer webuis write
/// the Karras variant as `DPM++ 2M` with `Schedule type: Karras`.
const A1111_NAMES: &[(&str, SchedulerKind)] = &[
    ("Euler a", SchedulerKind::EulerAncestral),
    ("Euler", SchedulerKind::Euler),
    (
        "DPM++ 2M",
        SchedulerKind::DpmSolverMultistep { karras: false },
    ),
    (
        "DPM++ 2M Karras",
        SchedulerKind::DpmSolverMultistep { karras: true },
    ),
    ("DDIM", SchedulerKind::Ddim),
    // A1111's PLMS is diffusers' PNDM without its Runge-Kutta warm-up (`skip_prk_steps`)
    ("PLMS", SchedulerKind::Pndm),
    ("LMS", SchedulerKind::Lms),
    ("Heun", SchedulerKind::Heun),
];

/// A1111 schedule types (`--schedule-type`) sd-rs can honour.
const SCHEDULE_TYPES: &[&str] = &["Automatic", "Karras"];

impl SchedulerKind {
    /// Parses a diffusers class name (`EulerDiscreteScheduler`), a short name (`ddpm`, `ddim`,
    /// `pndm`, `euler`, `euler-a`, `dpm++2m`, `dpm++2m-karras`, `heun`, `lms`) or an
    /// AUTOMATIC1111 sampler name (`Euler a`, `DPM++ 2M Karras`, `PLMS`, ...; any case). An
    /// unknown name is an error listing every accepted one.
    pub fn parse(name: &str) -> Result<Self> {
        Self::from_a1111(name, None)
    }

    /// [`SchedulerKind::parse`] with A1111's separate schedule type (`Automatic`: the sampler's
    /// own; `Karras`: Karras sigmas, which sd-rs has for DPM++ 2M).
    pub fn from_a1111(name: &str, schedule_type: Option<&str>) -> Result<Self> {
        let trimmed = name.trim();
        let kind = NAMES
            .iter()
            .find(|(class, short, _)| *class == trimmed || short.eq_ignore_ascii_case(trimmed))
            .map(|(_, _, k)| *k)
            .or_else(|| {
                A1111_NAMES
                    .iter()
                    .find(|(a, _)| a.eq_ignore_ascii_case(trimmed))
                    .map(|(_, k)| *k)
            })
            .ok_or_else(|| {
                let shorts: Vec<&str> = NAMES.iter().map(|(_, s, _)| *s).collect();
                let a1111: Vec<String> =
                    A1111_NAMES.iter().map(|(a, _)| format!("`{a}`")).collect();
                Error::invalid_argument(
                    "scheduler",
                    name,
                    format!(
                        "one of {}, an AUTOMATIC1111 sampler name ({}) or a diffusers class name \
                         ({})",
                        shorts.join(", "),
                        a1111.join(", "),
                        NAMES
                            .iter()
                            .map(|(c, _, _)| *c)
                            .collect::<std::collections::BTreeSet<_>>()
                            .into_iter()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?;
        match schedule_type.map(str::trim) {
            None => Ok(kind),
            Some(t) if t.eq_ignore_ascii_case("automatic") => Ok(kind),
            Some(t) if t.eq_ignore_ascii_case("karras") => match kind {
                SchedulerKind::DpmSolverMultistep { .. } => {
                    Ok(SchedulerKind::DpmSolverMultistep { karras: true })
                }
                other => Err(Error::invalid_argument(
                    "schedule type",
                    t,
                    format!(
                        "Automatic for {}: sd-rs has Karras sigmas only for DPM++ 2M",
                        other.a1111_name().0
                    ),
                )),
            },
            Some(t) => Err(Error::invalid_argument(
                "schedule type",
                t,
                format!("one of {}", SCHEDULE_TYPES.join(", ")),
            )),
        }
    }

    /// The name AUTOMATIC1111 writes in `Sampler:`, and its `Schedule type:` when not the
    /// sampler's default (`("DPM++ 2M", Some("Karras"))`). DDPM, which A1111 does not offer, is
    /// named `DDPM`.
    pub fn a1111_name(&self) -> (&'static str, Option<&'static str>) {
        match self {
            SchedulerKind::DpmSolverMultistep { karras: true } => ("DPM++ 2M", Some("Karras")),
            SchedulerKind::Ddpm => ("DDPM", None),
            k => (
                A1111_NAMES
                    .iter()
                    .find(|(_, a)| a == k)
                    .map(|(n, _)| *n)
                    .unwrap_or("?"),
                None,
            ),
        }
    }

    /// The diffusers class this kind mirrors.
    pub fn class_name(&self) -> &'static str {
        NAMES
            .iter()
            .find(|(_, _, k)| k == self)
            .map(|(c, _, _)| *c)
            .unwrap_or("?")
    }

    /// The CLI short name (`euler-a`, `dpm++2m-karras`, ...).
    pub fn short_name(&self) -> &'static str {
        NAMES
            .iter()
            .find(|(_, _, k)| k == self)
            .map(|(_, s, _)| *s)
            .unwrap_or("?")
    }

    /// Every supported kind (both DPM++ 2M variants).
    pub fn all() -> Vec<SchedulerKind> {
        NAMES.iter().map(|(_, _, k)| *k).collect()
    }

    /// Builds this scheduler from a resolved config (see [`SchedulerConfigFile::resolve`]).
    pub fn build(config: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
        Ok(match config.kind {
            SchedulerKind::Ddpm => Box::new(ddpm::Ddpm::new(config)?),
            SchedulerKind::Ddim => Box::new(ddim::Ddim::new(config)?),
            SchedulerKind::Pndm => Box::new(pndm::Pndm::new(config)?),
            SchedulerKind::Euler => Box::new(euler::Euler::new(config)?),
            SchedulerKind::EulerAncestral => {
                Box::new(euler_ancestral::EulerAncestral::new(config)?)
            }
            SchedulerKind::DpmSolverMultistep { .. } => {
                Box::new(dpm_solver::DpmSolverMultistep::new(config)?)
            }
            SchedulerKind::Heun => Box::new(heun::Heun::new(config)?),
            SchedulerKind::Lms => Box::new(lms::Lms::new(config)?),
        })
    }
}

/// Reads a `scheduler_config.json` and builds its scheduler: `kind` `None` builds the file's
/// `_class_name`; `Some` builds another class from the same config, as diffusers'
/// `OtherScheduler.from_config(config)` (absent fields take the other class's defaults).
pub fn from_config_file(path: &Path, kind: Option<SchedulerKind>) -> Result<Box<dyn Scheduler>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    from_config_json(&text, path, kind)
}

/// [`from_config_file`] on JSON text; `path_for_errors` names the file in errors.
pub fn from_config_json(
    json: &str,
    path_for_errors: &Path,
    kind: Option<SchedulerKind>,
) -> Result<Box<dyn Scheduler>> {
    let config = resolve_config_json(json, path_for_errors, kind)?;
    SchedulerKind::build(&config)
}

/// Parses and resolves a config without building the scheduler.
pub fn resolve_config_json(
    json: &str,
    path: &Path,
    kind: Option<SchedulerKind>,
) -> Result<SchedulerConfig> {
    let file: SchedulerConfigFile = sd_core::config::parse_json(json, path)?;
    let kind = match kind {
        Some(k) => k,
        None => {
            let class = file.class_name.as_deref().ok_or_else(|| {
                Error::config(
                    path,
                    Some("_class_name"),
                    "missing: cannot tell which scheduler to build",
                )
            })?;
            let found = NAMES
                .iter()
                .find(|(c, _, _)| *c == class)
                .map(|(_, _, k)| *k);
            match found {
                Some(SchedulerKind::DpmSolverMultistep { .. }) => {
                    SchedulerKind::DpmSolverMultistep {
                        karras: file.use_karras_sigmas.unwrap_or(false),
                    }
                }
                Some(k) => k,
                None => {
                    let classes: Vec<&str> = NAMES.iter().map(|(c, _, _)| *c).collect();
                    return Err(Error::config(
                        path,
                        Some("_class_name"),
                        format!(
                            "unknown scheduler class `{class}`, expected one of {}",
                            classes.join(", ")
                        ),
                    ));
                }
            }
        }
    };
    file.resolve(kind, path)
}
