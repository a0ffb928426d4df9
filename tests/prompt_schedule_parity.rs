//! AUTOMATIC1111 prompt editing `[from:to:when]` and alternation `[a|b]` change the conditioning
//! during sampling: every case of tools/fixtures/prompt_schedule_refs.py (SD 1.x with a batch of
//! two, SDXL with pooled embeddings, the SDXL base + refiner ensemble) against diffusers runs
//! whose step-end callback swaps the prompt embeddings as A1111's `reconstruct_cond_batch` picks
//! them, compared after every step, at the final latents and on the uint8 image.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::Tensor;
use sd_rs::core::testing::{compare, fixtures_dir, load_tensors};
use sd_rs::core::{LoadOptions, TorchGenerator};
use sd_rs::pipeline::clip::prompt_syntax::prompt_schedule;
use sd_rs::pipeline::{
    Ensemble, Flow, GenerateRequest, PromptSyntax, SchedulerKind, StableDiffusion,
};

#[derive(serde::Deserialize, Debug)]
struct Case {
    name: String,
    family: String,
    task: String,
    scheduler: Option<String>,
    prompt: String,
    negative_prompt: String,
    prompt_schedule: Vec<(usize, String)>,
    negative_schedule: Vec<(usize, String)>,
    steps: usize,
    guidance: f64,
    seed: u64,
    height: usize,
    width: usize,
    num_images: usize,
    high_noise_frac: Option<f64>,
}

fn model(f: &str) -> PathBuf {
    fixtures_dir().join("models").join(f)
}

// The bounds of tests/pipeline_parity.rs (same models, same f32 maths). Measured worst here:
// 8.0e-5 on the latents (sd1_edit_alternate, DPM++ 2M Karras), 1 on the uint8 image.
const LATENT_ATOL: f64 = 2e-4;
const U8_MAX_DIFF: f64 = 1.0;

fn cases() -> Vec<Case> {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures_dir().join("refs/schedule_cases.json")).unwrap(),
    )
    .unwrap()
}

fn request(c: &Case, prompt: &str, negative: &str) -> GenerateRequest {
    let mut r = GenerateRequest::new(prompt);
    r.negative_prompts = vec![negative.to_owned()];
    r.prompt_syntax = PromptSyntax::A1111;
    r.steps = c.steps;
    r.guidance_scale = c.guidance;
    r.height = Some(c.height);
    r.width = Some(c.width);
    r.num_images_per_prompt = c.num_images;
    r.scheduler = c
        .scheduler
        .as_deref()
        .map(|s| SchedulerKind::parse(s).unwrap());
    r
}

/// The final latents, the latents after every step and the images.
fn run(c: &Case, req: &GenerateRequest) -> (Tensor, Vec<Tensor>, Tensor) {
    let opts = LoadOptions::default();
    let sd = StableDiffusion::load(&model(&c.family), &opts).unwrap();
    let mut g = TorchGenerator::new(c.seed);
    let mut steps = Vec::new();
    let mut record = |s: sd_rs::pipeline::StepInfo<'_>| {
        steps.push(s.latents.clone());
        Flow::Continue
    };
    let out = match c.task.as_str() {
        "txt2img" => sd.generate(req, &mut g, &mut record).unwrap(),
        "ensemble" => {
            let refiner = StableDiffusion::load_refiner(&model("refiner"), &sd, &opts).unwrap();
            Ensemble::new(&sd, &refiner, c.high_noise_frac.unwrap())
                .unwrap()
                .generate(req, &mut g, &mut record)
                .unwrap()
        }
        other => panic!("unknown task {other}"),
    };
    (out.latents, steps, out.images.unwrap())
}

#[test]
fn the_exported_schedules_are_sd_clips() {
    for c in cases() {
        for (text, want) in [
            (&c.prompt, &c.prompt_schedule),
            (&c.negative_prompt, &c.negative_schedule),
        ] {
            let got: Vec<(usize, String)> = prompt_schedule(text, c.steps)
                .unwrap()
                .into_iter()
                .map(|e| (e.end_at_step, e.prompt))
                .collect();
            assert_eq!(&got, want, "{}: {text}", c.name);
        }
    }
}

#[test]
fn scheduled_prompts_match_diffusers_with_swapped_embeddings() {
    let cases = cases();
    assert_eq!(cases.len(), 3);
    let mut failures = Vec::new();
    for c in &cases {
        let refs: HashMap<String, Tensor> =
            load_tensors(&fixtures_dir().join(format!("refs/schedule_{}.safetensors", c.name)))
                .unwrap();
        let (latents, steps, images) = run(c, &request(c, &c.prompt, &c.negative_prompt));
        let n_ref = refs.keys().filter(|k| k.starts_with("step_")).count();
        assert_eq!(steps.len(), n_ref, "{}: number of steps", c.name);
        let mut worst_step = 0f64;
        for (i, s) in steps.iter().enumerate() {
            let (d, _) = compare(s, &refs[&format!("step_{i:02}")], LATENT_ATOL, 0.0).unwrap();
            worst_step = worst_step.max(d);
        }
        let (d_lat, _) = compare(&latents, &refs["latents"], LATENT_ATOL, 0.0).unwrap();
        let ours = (images.permute((0, 2, 3, 1)).unwrap() * 255.0)
            .unwrap()
            .round()
            .unwrap();
        let (d_img, _) = compare(&ours, &refs["image_u8"], U8_MAX_DIFF, 0.0).unwrap();
        println!(
            "{:<24} max |Δ| per-step latents {worst_step:.2e}, final latents {d_lat:.2e}, uint8 image {d_img}",
            c.name
        );
        if !(worst_step <= LATENT_ATOL && d_lat <= LATENT_ATOL && d_img <= U8_MAX_DIFF) {
            failures.push(c.name.clone());
        }
        // the switching is visible: the first entries alone give other latents
        let (fixed, _, _) = run(
            c,
            &request(c, &c.prompt_schedule[0].1, &c.negative_schedule[0].1),
        );
        let (d_fixed, _) = compare(&fixed, &refs["latents"], 0.0, 0.0).unwrap();
        println!("{:<24} without switching: {d_fixed:.2e}", c.name);
        assert!(d_fixed > 100.0 * LATENT_ATOL, "{}: {d_fixed}", c.name);
    }
    assert!(failures.is_empty(), "cases off diffusers: {failures:?}");
}
