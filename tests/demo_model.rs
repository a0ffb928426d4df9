//! The demo model (models/demo/, trained by tools/demo-model/) generates what the prompt says:
//! colour and shape judged by the scorer of tools/demo-model/score.py (ported in
//! tests/common/shapes.rs), over the held-out prompts and several seeds, at the `sd` CLI's
//! defaults (the model's DPM++ 2M scheduler, 20 steps, guidance 5, 64x64).

mod common;

use std::path::PathBuf;

use common::shapes::{score, BACKGROUNDS, COLOURS};
use sd_rs::core::{LoadOptions, TorchGenerator};
use sd_rs::pipeline::{Flow, GenerateRequest, Init, StableDiffusion};

fn demo() -> StableDiffusion {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/demo");
    StableDiffusion::load(&dir, &LoadOptions::default()).unwrap()
}

/// tools/demo-model/data.py's held-out list: every colour x shape once, the background rotating.
fn held_out() -> Vec<(&'static str, &'static str, &'static str)> {
    let shapes = ["circle", "square", "triangle"];
    let mut out = Vec::new();
    for (i, (c, _)) in COLOURS.iter().enumerate() {
        for (j, s) in shapes.iter().enumerate() {
            out.push((*c, *s, BACKGROUNDS[(i + j) % 3].0));
        }
    }
    out
}

fn request(prompts: Vec<String>) -> GenerateRequest {
    let mut r = GenerateRequest::new("");
    r.prompts = prompts;
    r.steps = 20;
    r.guidance_scale = 5.0;
    r
}

fn images(
    sd: &StableDiffusion,
    req: &GenerateRequest,
    seed: u64,
) -> Vec<sd_rs::pipeline::image::RgbImage> {
    let out = sd
        .generate(req, &mut TorchGenerator::new(seed), &mut |_| Flow::Continue)
        .unwrap();
    sd_rs::pipeline::image::to_rgb8(&out.images.unwrap()).unwrap()
}

#[test]
fn demo_model_draws_the_prompted_colour_and_shape() {
    let sd = demo();
    let combos = held_out();
    let prompts: Vec<String> = combos
        .iter()
        .map(|(c, s, b)| format!("a {c} {s} on a {b} background"))
        .collect();
    let seeds = [0u64, 1, 2, 3];
    let (mut colour_ok, mut shape_ok, mut bg_ok, mut n) = (0, 0, 0, 0);
    let mut misses = Vec::new();
    for seed in seeds {
        for (img, (c, s, b)) in images(&sd, &request(prompts.clone()), seed)
            .iter()
            .zip(&combos)
        {
            let r = score(img.as_raw(), img.width() as usize, img.height() as usize);
            n += 1;
            colour_ok += usize::from(r.colour == Some(*c));
            shape_ok += usize::from(r.shape == Some(*s));
            bg_ok += usize::from(r.background == *b);
            if r.colour != Some(*c) || r.shape != Some(*s) {
                misses.push(format!(
                    "seed {seed} '{c} {s} on {b}': got {:?} {:?}",
                    r.colour, r.shape
                ));
            }
        }
    }
    let (colour, shape) = (colour_ok as f64 / n as f64, shape_ok as f64 / n as f64);
    let background = bg_ok as f64 / n as f64;
    println!(
        "demo model, {n} images ({} prompts x {} seeds): colour {colour:.3}, shape {shape:.3}, background {background:.3}",
        combos.len(),
        seeds.len()
    );
    for m in &misses {
        println!("  miss: {m}");
    }
    // Thresholds of issue 8 (measured at this commit: colour 0.986, shape 0.958, 72 images).
    assert!(colour >= 0.90, "colour accuracy {colour:.3} < 0.90");
    assert!(shape >= 0.80, "shape accuracy {shape:.3} < 0.80");
}

#[test]
fn demo_img2img_turns_a_red_circle_blue_in_place() {
    let sd = demo();
    let mut tried = 0;
    let mut passed = 0;
    for seed in [10u64, 11, 12] {
        let red = &images(
            &sd,
            &request(vec!["a red circle on a white background".into()]),
            seed,
        )[0];
        let r0 = score(red.as_raw(), 64, 64);
        if r0.colour != Some("red") || r0.shape != Some("circle") {
            continue; // the txt2img test measures these misses; here we need a red circle to start from
        }
        tried += 1;
        let image = sd_rs::pipeline::image::from_rgb8(red, &candle_core::Device::Cpu).unwrap();
        let mut req = request(vec!["a blue circle on a white background".into()]);
        req.init = Init::Image {
            image,
            strength: 0.7,
        };
        let blue = &images(&sd, &req, seed)[0];
        let r1 = score(blue.as_raw(), 64, 64);
        let centre =
            |b: (usize, usize, usize, usize)| ((b.0 + b.2) as f64 / 2.0, (b.1 + b.3) as f64 / 2.0);
        let (c0, c1) = (centre(r0.bbox.unwrap()), r1.bbox.map(centre));
        let moved = c1.map(|c1| ((c1.0 - c0.0).powi(2) + (c1.1 - c0.1).powi(2)).sqrt());
        println!(
            "seed {seed}: red circle at {c0:?} -> {:?} {:?} at {c1:?} (moved {moved:?} px)",
            r1.colour, r1.shape
        );
        if r1.colour == Some("blue")
            && r1.shape == Some("circle")
            && moved.is_some_and(|m| m <= 6.0)
        {
            passed += 1;
        }
    }
    assert!(tried >= 2, "too few red circles to start from ({tried})");
    assert_eq!(
        passed, tried,
        "img2img recoloured {passed} of {tried} circles in place"
    );
}

/// The demo model gives diffusers' own output (StableDiffusionPipeline at the CLI defaults,
/// tools/demo-model/sample.py) for the same seeds: final latents and images, and img2img.
#[test]
fn demo_model_matches_diffusers() {
    use sd_rs::core::testing::{compare, fixtures_dir, load_tensors};
    let sd = demo();
    let refs = load_tensors(&fixtures_dir().join("refs/demo_pipeline.safetensors")).unwrap();
    let cases = [
        ("a red circle on a white background", 0u64),
        ("a blue triangle on a black background", 1),
        ("a yellow square on a gray background", 2),
    ];
    for (i, (prompt, seed)) in cases.iter().enumerate() {
        let out = sd
            .generate(
                &request(vec![prompt.to_string()]),
                &mut TorchGenerator::new(*seed),
                &mut |_| Flow::Continue,
            )
            .unwrap();
        let (dl, _) = compare(
            &out.latents,
            &refs[&format!("txt2img.{i}.final_latents")],
            1.0,
            0.0,
        )
        .unwrap();
        let (di, _) = compare(
            &out.images.unwrap(),
            &refs[&format!("txt2img.{i}.image")],
            1.0,
            0.0,
        )
        .unwrap();
        println!("'{prompt}' seed {seed}: max |Δ| latents {dl:.2e}, image {di:.2e}");
        // measured: latents <= ~1e-4 and images <= ~1e-4 (f32 weights stored as f16, computed in f32)
        assert!(
            dl <= 1e-3 && di <= 2e-3,
            "{prompt}: latents {dl}, image {di}"
        );
    }
    let mut req = request(vec!["a blue circle on a white background".into()]);
    let init = (refs["img2img.init_image"].clone() * 2.0).unwrap() - 1.0;
    req.init = Init::Image {
        image: init.unwrap(),
        strength: 0.7,
    };
    let out = sd
        .generate(&req, &mut TorchGenerator::new(0), &mut |_| Flow::Continue)
        .unwrap();
    let (di, _) = compare(&out.images.unwrap(), &refs["img2img.image"], 1.0, 0.0).unwrap();
    println!("img2img: max |Δ| image {di:.2e}");
    assert!(di <= 5e-4, "img2img image {di}"); // measured 4.0e-6
}
