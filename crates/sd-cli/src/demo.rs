//! The demo model built into the binary (models/demo/, embedded by build.rs): used when no
//! --model is given. It is extracted once into a cache folder and loaded from there like any
//! diffusers folder.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/demo_files.rs"));
}

/// Generation defaults of a model.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    /// Denoising steps.
    pub steps: usize,
    /// Guidance scale.
    pub guidance: f64,
}

/// The demo model's defaults (what it was evaluated with; see docs/demo-model.md).
pub const DEFAULTS: Defaults = Defaults {
    steps: 20,
    guidance: 5.0,
};

fn cache_root() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("SD_RS_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|p| p.join("sd-rs")))
        .or_else(|| var("HOME").map(|p| p.join(".cache/sd-rs")))
        .unwrap_or_else(|| std::env::temp_dir().join("sd-rs"))
}

/// The folder of the built-in demo model, extracted on first use.
pub fn path() -> Result<PathBuf> {
    if embedded::FILES.is_empty() {
        bail!("this build of sd has no built-in demo model (models/demo/ was absent when it was compiled); pass --model DIR_OR_HUB_ID");
    }
    let mut last_err = None;
    for root in [cache_root(), std::env::temp_dir().join("sd-rs")] {
        let dir = root.join(format!("demo-{:016x}", embedded::HASH));
        if dir.join("model_index.json").is_file() {
            return Ok(dir);
        }
        match extract(&root, &dir) {
            Ok(()) => return Ok(dir),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no writable cache folder")))
}

/// Writes every file into a fresh temporary folder beside `dir`, then renames it into place
/// (another process extracting at the same time is harmless).
fn extract(root: &std::path::Path, dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let tmp = root.join(format!(".demo-{}-{}", std::process::id(), embedded::HASH));
    for (rel, bytes) in embedded::FILES {
        let p = tmp.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?;
    }
    if std::fs::rename(&tmp, dir).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
        if !dir.join("model_index.json").is_file() {
            bail!("could not move the demo model into {}", dir.display());
        }
    }
    Ok(())
}
