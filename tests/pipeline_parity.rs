//! End-to-end parity with diffusers: every case of tools/fixtures/pipeline_refs.py (SD 1.x and
//! 2.x txt2img and img2img, SDXL txt2img, the refiner's img2img, the base + refiner ensemble;
//! PNDM, DDIM, DPM++ 2M Karras, Euler, Euler Ancestral) run through StableDiffusion with the
//! same seed, compared at the initial latents, after every step, at the final latents and on
//! the uint8 image.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use sd_rs::core::testing::{compare, fixtures_dir, load_tensors};
use sd_rs::core::{LoadOptions, TorchGenerator};
use sd_rs::pipeline::{Flow, GenerateRequest, Init, OutputType, SchedulerKind, StableDiffusion};

#[derive(serde::Deserialize, Debug)]
struct Case {
    name: String,
    family: String,
    task: String,
    scheduler: Option<String>,
    prompt: String,
    negative_prompt: String,
    steps: usize,
    guidance: f64,
    #[serde(default)]
    guidance_rescale: f64,
    seed: u64,
    height: Option<usize>,
    width: Option<usize>,
    num_images: usize,
    strength: Option<f64>,
    high_noise_frac: Option<f64>,
}

fn model(f: &str) -> PathBuf {
    fixtures_dir().join("models").join(f)
}

// Tolerances. The issue asks for 1e-3 max abs on the latents and 2/255 on the image; measured
// worst cases (torch 2.15 vs candle 0.11, f32, this machine) are far below, so the bounds are
// tightened to a few times the measurement.
const LATENT_ATOL: f64 = 2e-4; // measured worst: 4.9e-5 (sdxl_ensemble, 10 steps)
const U8_MAX_DIFF: f64 = 1.0; // measured worst: 1 (a value rounding the other way)

fn request(c: &Case) -> GenerateRequest {
    let mut r = GenerateRequest::new(c.prompt.clone());
    if !c.negative_prompt.is_empty() {
        r.negative_prompts = vec![c.negative_prompt.clone()];
    }
    r.steps = c.steps;
    r.guidance_scale = c.guidance;
    r.guidance_rescale = c.guidance_rescale;
    r.height = c.height;
    r.width = c.width;
    r.num_images_per_prompt = c.num_images;
    r.scheduler = c
        .scheduler
        .as_deref()
        .map(|s| SchedulerKind::parse(s).unwrap());
    r
}

fn init_image() -> Tensor {
    let img =
        sd_rs::pipeline::image::read_rgb8(&fixtures_dir().join("refs/pipeline_init.png")).unwrap();
    sd_rs::pipeline::image::from_rgb8(&img, &Device::Cpu).unwrap()
}

fn run_case(c: &Case) -> (Vec<Tensor>, Tensor, Tensor) {
    let opts = LoadOptions::default();
    let sd = StableDiffusion::load(&model(&c.family), &opts).unwrap();
    let mut req = request(c);
    let mut g = TorchGenerator::new(c.seed);
    let mut steps = Vec::new();
    let mut record = |s: sd_rs::pipeline::StepInfo<'_>| {
        steps.push(s.latents.clone());
        Flow::Continue
    };
    let out = match c.task.as_str() {
        "txt2img" => sd.generate(&req, &mut g, &mut record).unwrap(),
        "img2img" => {
            req.init = Init::Image {
                image: init_image(),
                strength: c.strength.unwrap(),
            };
            sd.generate(&req, &mut g, &mut record).unwrap()
        }
        "ensemble" => {
            let f = c.high_noise_frac.unwrap();
            let refiner = StableDiffusion::load_refiner(&model("refiner"), &sd, &opts).unwrap();
            let mut base_req = req.clone();
            base_req.denoising_end = Some(f);
            base_req.output = OutputType::Latents;
            let base = sd.generate(&base_req, &mut g, &mut record).unwrap();
            req.init = Init::Continue {
                latents: base.latents,
                denoising_start: f,
            };
            refiner.generate(&req, &mut g, &mut record).unwrap()
        }
        other => panic!("unknown task {other}"),
    };
    let images = out.images.unwrap();
    (steps, out.latents, images)
}

#[test]
fn pipelines_match_diffusers() {
    let cases: Vec<Case> = serde_json::from_str(
        &std::fs::read_to_string(fixtures_dir().join("refs/pipeline_cases.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cases.len(), 9);
    let mut failures = Vec::new();
    for c in &cases {
        let refs: HashMap<String, Tensor> =
            load_tensors(&fixtures_dir().join(format!("refs/pipeline_{}.safetensors", c.name)))
                .unwrap();
        let (steps, latents, images) = run_case(c);
        let n_ref = refs.keys().filter(|k| k.starts_with("step_")).count();
        assert_eq!(steps.len(), n_ref, "{}: number of steps", c.name);
        let mut worst_step = 0f64;
        let mut per_step = Vec::new();
        for (i, s) in steps.iter().enumerate() {
            let (d, _) = compare(s, &refs[&format!("step_{i:02}")], LATENT_ATOL, 0.0).unwrap();
            per_step.push(format!("{d:.1e}"));
            worst_step = worst_step.max(d);
        }
        println!("  per step: {}", per_step.join(" "));
        let (d_lat, _) = compare(&latents, &refs["latents"], LATENT_ATOL, 0.0).unwrap();
        let ours = (images.permute((0, 2, 3, 1)).unwrap() * 255.0)
            .unwrap()
            .round()
            .unwrap();
        let (d_img, _) = compare(&ours, &refs["image_u8"], U8_MAX_DIFF, 0.0).unwrap();
        println!("{:<36} max |Δ| per-step latents {worst_step:.2e}, final latents {d_lat:.2e}, uint8 image {d_img}", c.name);
        if !(worst_step <= LATENT_ATOL && d_lat <= LATENT_ATOL && d_img <= U8_MAX_DIFF) {
            failures.push(c.name.clone());
        }
    }
    assert!(failures.is_empty(), "cases off diffusers: {failures:?}");
}

#[test]
fn refiner_shares_the_base_text_encoder_2_and_vae() {
    let opts = LoadOptions::default();
    let base = StableDiffusion::load(&model("sdxl"), &opts).unwrap();
    let refiner = StableDiffusion::load_refiner(&model("refiner"), &base, &opts).unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&base.vae, &refiner.vae),
        "one VAE in memory"
    );
    let (a, b) = (
        sd_rs::pipeline::text_encoder_2(&base.text).unwrap(),
        sd_rs::pipeline::text_encoder_2(&refiner.text).unwrap(),
    );
    assert!(
        std::sync::Arc::ptr_eq(&a, &b),
        "one text_encoder_2 in memory"
    );
}

#[test]
fn precomputed_embeddings_give_the_same_images() {
    let sd = StableDiffusion::load(&model("sd1"), &LoadOptions::default()).unwrap();
    let refs =
        load_tensors(&fixtures_dir().join("refs/pipeline_sd1_txt2img_pndm.safetensors")).unwrap();
    let pos = sd
        .text
        .encode(&["a red circle on a white background".to_string()], None)
        .unwrap();
    let neg = sd.text.encode(&["blurry, dark".to_string()], None).unwrap();
    for with_negative_embeds in [true, false] {
        let mut req = GenerateRequest::new("");
        req.prompts.clear();
        req.steps = 5;
        req.prompt_embeds = Some(sd_rs::pipeline::PromptEmbeds {
            prompt_embeds: pos.hidden.clone(),
            negative_prompt_embeds: with_negative_embeds.then(|| neg.hidden.clone()),
            pooled_prompt_embeds: None,
            negative_pooled_prompt_embeds: None,
        });
        if !with_negative_embeds {
            // diffusers encodes the negative prompt itself when only prompt_embeds are given
            req.negative_prompts = vec!["blurry, dark".into()];
        }
        let out = sd
            .generate(&req, &mut TorchGenerator::new(42), &mut |_| Flow::Continue)
            .unwrap();
        let (d, _) = compare(&out.latents, &refs["latents"], LATENT_ATOL, 0.0).unwrap();
        assert!(
            d <= LATENT_ATOL,
            "negative embeds given: {with_negative_embeds}: {d}"
        );
    }
}
