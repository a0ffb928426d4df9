//! Output files: numbered PNGs with AUTOMATIC1111-style "parameters" text, latents files;
//! written atomically, never overwriting unless asked.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sd_pipeline::core::candle_core::Tensor;
use sd_pipeline::image::RgbImage;

/// `out.png` for one image; `out-0.png`, `out-1.png`, ... for several.
pub fn paths(output: &Path, n: usize) -> Vec<PathBuf> {
    if n == 1 {
        return vec![output.to_path_buf()];
    }
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let ext = output
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    (0..n)
        .map(|i| output.with_file_name(format!("{stem}-{i}.{ext}")))
        .collect()
}

/// Fails if any path exists (unless `overwrite`) or its folder does not.
pub fn check_writable(paths: &[PathBuf], overwrite: bool) -> Result<()> {
    for p in paths {
        if p.exists() && !overwrite {
            bail!(
                "{} already exists; pass --overwrite to replace it",
                p.display()
            );
        }
        let dir = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.is_dir() {
            bail!(
                "{}: the folder {} does not exist",
                p.display(),
                dir.display()
            );
        }
    }
    Ok(())
}

/// Writes `path` atomically: `fill` writes a temporary file in the same folder (so the rename
/// cannot cross file systems), which is flushed to disk and then renamed into place. A crash or
/// Ctrl-C leaves either the old file or the complete new one, never a truncated file (at worst
/// a hidden `.NAME.*.partial` beside it); an error removes the temporary file. Without
/// `overwrite`, an existing file is never replaced, even one created while sd was running.
fn write_atomic(
    path: &Path,
    overwrite: bool,
    fill: impl FnOnce(&Path, &mut std::fs::File) -> Result<()>,
) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".partial")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let tmp_path = tmp.path().to_path_buf();
    fill(&tmp_path, tmp.as_file_mut())
        .with_context(|| format!("writing {}", tmp_path.display()))?;
    tmp.as_file()
        .sync_all()
        .with_context(|| format!("flushing {}", tmp_path.display()))?;
    let persisted = if overwrite {
        tmp.persist(path)
    } else {
        tmp.persist_noclobber(path)
    };
    persisted.map_err(|e| {
        anyhow::anyhow!(
            "moving {} to {}: {}{}",
            tmp_path.display(),
            path.display(),
            e.error,
            if overwrite {
                ""
            } else {
                " (pass --overwrite to replace an existing file)"
            }
        )
    })?;
    Ok(())
}

/// A PNG with a `parameters` text chunk (tEXt when Latin-1, iTXt otherwise), as AUTOMATIC1111.
pub fn write_png(path: &Path, img: &RgbImage, parameters: &str, overwrite: bool) -> Result<()> {
    let buf = sd_pipeline::image::encode_png(img, Some(parameters))?;
    write_atomic(path, overwrite, |_, f| Ok(f.write_all(&buf)?))
}

/// Saves `latents` as a safetensors file holding one tensor named `latents`.
pub fn save_latents(path: &Path, latents: &Tensor, overwrite: bool) -> Result<()> {
    write_atomic(path, overwrite, |tmp, _| {
        Ok(latents.save_safetensors("latents", tmp)?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn atomic_write_leaves_only_the_complete_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.png");
        write_atomic(&p, false, |_, f| Ok(f.write_all(b"first")?)).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"first");
        assert_eq!(names(dir.path()), ["out.png"]);

        // Without overwrite an existing file is kept, and the temporary file removed.
        let e = write_atomic(&p, false, |_, f| Ok(f.write_all(b"second")?)).unwrap_err();
        assert!(format!("{e:#}").contains("--overwrite"), "{e:#}");
        assert_eq!(std::fs::read(&p).unwrap(), b"first");
        assert_eq!(names(dir.path()), ["out.png"]);

        write_atomic(&p, true, |_, f| Ok(f.write_all(b"second")?)).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");

        // A failure half-way leaves the old file and no temporary file.
        let e = write_atomic(&p, true, |_, f| {
            f.write_all(b"half")?;
            anyhow::bail!("encoder failed")
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("encoder failed"));
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        assert_eq!(names(dir.path()), ["out.png"]);
    }

    #[test]
    fn latents_are_written_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.safetensors");
        let t = Tensor::arange(0f32, 8., &sd_pipeline::core::candle_core::Device::Cpu)
            .unwrap()
            .reshape((1, 2, 2, 2))
            .unwrap();
        save_latents(&p, &t, false).unwrap();
        assert_eq!(names(dir.path()), ["l.safetensors"]);
        let back = sd_pipeline::core::candle_core::safetensors::load(
            &p,
            &sd_pipeline::core::candle_core::Device::Cpu,
        )
        .unwrap();
        let v: Vec<f32> = back["latents"].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, (0..8).map(|i| i as f32).collect::<Vec<_>>());
    }
}
