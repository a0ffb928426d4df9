//! The demo model built into the binary (issue 8): used when no --model is given.

use std::path::PathBuf;

use anyhow::{bail, Result};

/// Generation defaults of a model.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    /// Denoising steps.
    pub steps: usize,
    /// Guidance scale.
    pub guidance: f64,
}

/// The demo model's defaults.
pub const DEFAULTS: Defaults = Defaults {
    steps: 20,
    guidance: 5.0,
};

/// The folder of the built-in demo model.
pub fn path() -> Result<PathBuf> {
    bail!("this build has no built-in demo model yet; pass --model DIR_OR_HUB_ID")
}
