//! `GenerateRequest::cancel` reaches the prompt encoding, every denoising step and the VAE
//! decode: a cancel at any check ends the run there (encoding and decode: `Error::Interrupted`;
//! a step: the latents so far, `interrupted`, no image), and a run never cancelled gives the
//! same pixels as one without a cancel. Deterministic: the cancel answers true from its N-th
//! check on. The demo model (models/demo), 3 steps at 32x32.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::DType;
use sd_core::{Cancel, Error, LoadOptions, TorchGenerator};
use sd_pipeline::{Flow, GenerateRequest, Output, PromptSyntax, StableDiffusion};

fn counting(fire_at: usize) -> (Cancel, Arc<AtomicUsize>) {
    let n = Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    (
        Cancel::new(move || c.fetch_add(1, Ordering::Relaxed) >= fire_at),
        n,
    )
}

fn request(cancel: Cancel) -> GenerateRequest {
    // BREAK: two 75-token chunks, so the encoding checks between chunks too
    let mut req = GenerateRequest::new("a red circle BREAK on a white background");
    req.prompt_syntax = PromptSyntax::A1111;
    req.negative_prompts = vec!["blurry".into()];
    req.steps = 3;
    req.guidance_scale = 5.0;
    req.width = Some(32);
    req.height = Some(32);
    req.cancel = cancel;
    req
}

/// The run, and the number of checks made before each step callback.
fn run(
    sd: &StableDiffusion,
    cancel: Cancel,
    checks: &AtomicUsize,
) -> (sd_core::Result<Output>, Vec<usize>) {
    let seen = Mutex::new(Vec::new());
    let out = sd.generate(&request(cancel), &mut TorchGenerator::new(3), &mut |_| {
        seen.lock().unwrap().push(checks.load(Ordering::Relaxed));
        Flow::Continue
    });
    (out, seen.into_inner().unwrap())
}

fn pixels(o: &Output) -> Vec<u32> {
    let img = o.images.as_ref().expect("images");
    img.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

#[test]
fn a_cancel_stops_the_run_in_the_encoding_a_step_or_the_decode() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/demo");
    let sd = StableDiffusion::load(&dir, &LoadOptions::default()).unwrap();
    let plain = sd
        .generate(
            &request(Cancel::never()),
            &mut TorchGenerator::new(3),
            &mut |_| Flow::Continue,
        )
        .unwrap();

    // Never cancelled: the same pixels, and where the checks fall.
    let (never, checks) = counting(usize::MAX);
    let (out, before_step) = run(&sd, never, &checks);
    let out = out.unwrap();
    assert_eq!(
        pixels(&out),
        pixels(&plain),
        "a cancel that never fires changed the image"
    );
    let total = checks.load(Ordering::Relaxed);
    // 2 chunks x (prompt, negative) in one batch: one check per chunk for the one encoder
    let encoding = 2;
    // before_step[k]: checks made when step k's callback runs = encoding + k + 1
    assert_eq!(before_step, vec![encoding + 1, encoding + 2, encoding + 3]);
    let up_blocks = sd.vae.config().block_out_channels.len();
    assert_eq!(
        total,
        encoding + 3 + 2 + up_blocks,
        "decode: tile, mid, each up block"
    );

    for fire_at in 0..total {
        let (cancel, checks) = counting(fire_at);
        let (out, steps) = run(&sd, cancel, &checks);
        match out {
            Err(Error::Interrupted) if fire_at < encoding => assert!(steps.is_empty()),
            Ok(o) if (encoding..encoding + 3).contains(&fire_at) => {
                // stopped before step fire_at - encoding: the steps before it ran
                assert!(o.interrupted && o.images.is_none(), "cancel at {fire_at}");
                assert_eq!(steps.len(), fire_at - encoding, "cancel at {fire_at}");
            }
            Err(Error::Interrupted) if fire_at >= encoding + 3 => {
                assert_eq!(
                    steps.len(),
                    3,
                    "cancel at {fire_at}: the decode was reached"
                );
            }
            other => panic!(
                "cancel at check {fire_at}: {:?}",
                other.map(|o| o.interrupted)
            ),
        }
    }
}
