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

/// Writes to a temporary file beside `path`, then renames it into place.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.partial",
        path.file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// A PNG with a `parameters` text chunk (tEXt when Latin-1, iTXt otherwise), as AUTOMATIC1111.
pub fn write_png(path: &Path, img: &RgbImage, parameters: &str) -> Result<()> {
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, img.width(), img.height());
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        if parameters.chars().all(|c| (c as u32) < 256) {
            enc.add_text_chunk("parameters".into(), parameters.into())?;
        } else {
            enc.add_itxt_chunk("parameters".into(), parameters.into())?;
        }
        let mut w = enc.write_header()?;
        w.write_image_data(img.as_raw())?;
    }
    write_atomic(path, &buf)
}

/// Saves `latents` as a safetensors file holding one tensor named `latents`.
pub fn save_latents(path: &Path, latents: &Tensor) -> Result<()> {
    let tmp = std::env::temp_dir().join(format!("sd-latents-{}.safetensors", std::process::id()));
    latents.save_safetensors("latents", &tmp)?;
    let bytes = std::fs::read(&tmp)?;
    let _ = std::fs::remove_file(&tmp);
    write_atomic(path, &bytes)
}
