//! Writes images marked by sd-rs' SDXL watermark encoder, as floats on diffusers' [-1, 1] scale,
//! for the Python decoder to read (tools/fixtures/watermark_check.py; docs/watermark.md):
//!
//! ```text
//! cargo run -p sd-pipeline --example watermark_floats -- OUT.safetensors
//! tools/fixtures/.venv-ref/bin/python tools/fixtures/watermark_check.py OUT.safetensors
//! ```
//!
//! Tensors written: `noise_256x256` and `gradient_320x256` (the inputs of
//! tests/fixtures/refs/watermark.safetensors marked by `apply_watermark`), and `sdxl_512x512`
//! (the sdxl fixture pipeline's image, 512x512, 2 steps, seed 1, marked by `generate`), and
//! `noise_1024x1024` (uniform noise in [-1, 1] from a fixed hash, marked), which is also written as
//! OUT.png the way `sd txt2img` writes its PNGs.

use std::collections::HashMap;

use anyhow::{Context, Result};
use sd_core::testing::{fixtures_dir, load_tensors};
use sd_core::{LoadOptions, TorchGenerator};
use sd_pipeline::watermark::apply_watermark;
use sd_pipeline::{Flow, GenerateRequest, StableDiffusion};

fn main() -> Result<()> {
    let out = std::env::args()
        .nth(1)
        .context("usage: watermark_floats OUT.safetensors")?;
    let refs = load_tensors(&fixtures_dir().join("refs/watermark.safetensors"))?;
    let mut marked = HashMap::new();
    for name in ["noise_256x256", "gradient_320x256"] {
        let input = refs
            .get(&format!("{name}.input"))
            .with_context(|| format!("{name}.input missing from the reference"))?;
        marked.insert(name.to_owned(), apply_watermark(input)?);
    }
    let sd = StableDiffusion::load(&fixtures_dir().join("models/sdxl"), &LoadOptions::default())?;
    let mut req = GenerateRequest::new("a lighthouse in a storm");
    req.steps = 2;
    req.guidance_scale = 5.0;
    req.height = Some(512);
    req.width = Some(512);
    let images = sd
        .generate(&req, &mut TorchGenerator::new(1), &mut |_| Flow::Continue)?
        .images
        .context("no images")?;
    // [0, 1] back to diffusers' [-1, 1] (what its apply_watermark returns, clamped there too)
    marked.insert("sdxl_512x512".to_owned(), images.affine(2.0, -1.0)?);
    // a textured 1024x1024 image (uniform noise in [-1, 1], as the 256x256 reference case):
    // marked, and also written as the PNG `sd txt2img` would write (same rounding, same
    // encoder) next to OUT
    let n = 3 * 1024 * 1024;
    let values: Vec<f32> = (0..n as u64)
        .map(|k| {
            let h = k.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29) >> 40;
            (h as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    let noise =
        candle_core::Tensor::from_vec(values, (1, 3, 1024, 1024), &candle_core::Device::Cpu)?;
    let textured = apply_watermark(&noise)?;
    let png = std::path::Path::new(&out).with_extension("png");
    let rgb = sd_pipeline::image::to_rgb8(&textured.affine(0.5, 0.5)?.clamp(0f32, 1f32)?)?;
    std::fs::write(&png, sd_pipeline::image::encode_png(&rgb[0], None)?)?;
    marked.insert("noise_1024x1024".to_owned(), textured);
    candle_core::safetensors::save(&marked, &out)?;
    println!("{out}\n{}", png.display());
    Ok(())
}
