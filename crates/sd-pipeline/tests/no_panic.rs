//! Requests that used to panic or overflow (issue 16) are errors; the headline case of the
//! issue end to end: SD 1.5's scheduler config (PNDM, leading, steps_offset 1) at 1000 steps.

use candle_core::{DType, Device, Tensor};
use sd_core::testing::fixtures_dir;
use sd_core::{Error, LoadOptions, TorchGenerator};
use sd_pipeline::{Flow, GenerateRequest, Init, StableDiffusion};

fn sd1() -> StableDiffusion {
    StableDiffusion::load(&fixtures_dir().join("models/sd1"), &LoadOptions::default())
        .expect("fixture model")
}

fn run(sd: &StableDiffusion, req: &GenerateRequest) -> sd_core::Result<sd_pipeline::Output> {
    sd.generate(req, &mut TorchGenerator::new(0), &mut |_| Flow::Continue)
}

fn invalid(e: Error) -> (String, String) {
    match e {
        Error::InvalidArgument { name, expected, .. } => (name, expected),
        other => panic!("expected InvalidArgument, got {other}"),
    }
}

#[test]
fn pndm_leading_offset_at_1000_steps_is_an_error() {
    let sd = sd1();
    let mut r = GenerateRequest::new("a red circle");
    r.steps = 1000;
    let (name, expected) = invalid(run(&sd, &r).expect_err("t = 1000"));
    assert_eq!(name, "num_inference_steps");
    assert!(expected.contains("steps_offset 1"), "{expected}");
    // img2img that starts past the first timestep runs, as in diffusers.
    let mut r = GenerateRequest::new("a red circle");
    r.steps = 1000;
    r.init = Init::Image {
        image: Tensor::zeros((1, 3, 64, 64), DType::F32, &Device::Cpu).expect("image"),
        strength: 0.003,
    };
    let out = run(&sd, &r).expect("3 steps near t = 0");
    assert_eq!(out.latents.dims(), &[1, 4, 8, 8]);
}

#[test]
fn absurd_counts_are_errors_not_overflows() {
    let sd = sd1();
    let mut r = GenerateRequest::new("x");
    r.steps = 2;
    r.num_images_per_prompt = usize::MAX;
    assert_eq!(
        invalid(run(&sd, &r).expect_err("images")).0,
        "num_images_per_prompt"
    );

    let mut r = GenerateRequest::new("x");
    r.steps = 2;
    r.clip_skip = Some(usize::MAX);
    assert_eq!(invalid(run(&sd, &r).expect_err("clip_skip")).0, "clip_skip");

    // A width whose latent element count overflows usize.
    let mut r = GenerateRequest::new("x");
    r.steps = 2;
    r.width = Some(usize::MAX - 7);
    assert_eq!(invalid(run(&sd, &r).expect_err("width")).0, "noise shape");
}
