//! `sd pnginfo FILE` and `--from-png FILE`: the `parameters` text of a PNG (AUTOMATIC1111's or
//! sd-rs's infotext), printed, or read back into the generation settings.

use std::path::Path;

use anyhow::{bail, Context, Result};
use sd_pipeline::parse_infotext;
use serde_json::{Map, Value};

use crate::args::Common;

/// The `parameters` text of the PNG at `path`; a clear error for a file without one.
pub fn parameters(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    match sd_pipeline::image::png_parameters(&bytes)
        .with_context(|| format!("{}: not a readable PNG", path.display()))?
    {
        Some(t) => Ok(t),
        None => bail!(
            "{}: this PNG has no `parameters` text (written by AUTOMATIC1111 and sd-rs; other \
             tools, or an image saved again by an editor, leave it out)",
            path.display()
        ),
    }
}

/// Fills the settings not given on the command line from the PNG at `path` (img2img: also
/// `strength`, from `Denoising strength`). Fields the PNG does not have keep their defaults;
/// fields sd-rs does not use (Model hash, Hires fix, Version, ...) are ignored.
pub fn apply(path: &Path, c: &mut Common, strength: Option<&mut Option<f64>>) -> Result<()> {
    let text = parameters(path)?;
    let m = parse_infotext(&text);
    let file = path.display();
    let field = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_owned);
    fn number<T: std::str::FromStr>(
        m: &Map<String, Value>,
        k: &str,
        file: &str,
    ) -> Result<Option<T>> {
        match m.get(k).and_then(Value::as_str) {
            None => Ok(None),
            Some(v) => match v.trim().parse() {
                Ok(n) => Ok(Some(n)),
                Err(_) => bail!("{file}: `{k}: {v}` in the PNG's parameters is not a number"),
            },
        }
    }
    let file = file.to_string();
    if c.prompt.is_none() {
        c.prompt = Some(field("Prompt").unwrap_or_default());
    }
    if c.negative_prompt.is_none() {
        c.negative_prompt = field("Negative prompt").filter(|n| !n.is_empty());
    }
    c.steps = c.steps.or(number(&m, "Steps", &file)?);
    c.guidance = c.guidance.or(number(&m, "CFG scale", &file)?);
    if c.scheduler.is_none() && c.schedule_type.is_none() {
        c.scheduler = field("Sampler");
        c.schedule_type = field("Schedule type");
    }
    c.seed = c.seed.or(number(&m, "Seed", &file)?);
    if c.width.is_none() && c.height.is_none() {
        if let Some(size) = field("Size") {
            let (w, h) = size
                .split_once('x')
                .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)))
                .with_context(|| format!("{file}: `Size: {size}` is not WIDTHxHEIGHT"))?;
            c.width = Some(w);
            c.height = Some(h);
        }
    }
    // One image of a --num-images run: the same run again, keeping that image.
    if let (Some(size), Some(pos)) = (
        number::<usize>(&m, "Batch size", &file)?,
        number::<usize>(&m, "Batch pos", &file)?,
    ) {
        if size > 1 && c.num_images == 1 {
            if pos >= size {
                bail!("{file}: `Batch pos: {pos}` is not below `Batch size: {size}`");
            }
            c.num_images = size;
            c.batch_pos = Some(pos);
        }
    }
    c.clip_skip = c.clip_skip.or(number(&m, "Clip skip", &file)?);
    c.guidance_rescale = c
        .guidance_rescale
        .or(number(&m, "Guidance rescale", &file)?);
    if let Some(s) = strength {
        *s = s.or(number(&m, "Denoising strength", &file)?);
    }
    if let Some(model) = field("Model") {
        let ours = c.model.as_deref().unwrap_or("sd-rs demo");
        if model != ours {
            log::warn!(
                "{file} was made with the model {model:?}; this run uses {ours:?} (same \
                 settings, another image)"
            );
        }
    }
    Ok(())
}
