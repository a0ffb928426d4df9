//! The generation worker: one thread, one job at a time, each image of a job a separate pipeline
//! run seeded with seed + i (AUTOMATIC1111's convention: every image reproducible alone).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use base64::Engine;
use sd_pipeline::core::{Cancel, Error, TorchGenerator};
use sd_pipeline::{Flow, Init};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::plan::Mode;
use crate::queue::{Job, Queue};
use crate::Model;

/// Runs jobs until the queue shuts down. A panic inside a generation is caught and answered
/// as a 500, so one bad job never stops the queue.
pub fn run(queue: Arc<Queue>) {
    while let Some(job) = queue.pop() {
        let reply = if job.abandoned.load(Ordering::Relaxed) {
            Err(ApiError::internal("abandoned"))
        } else {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                generate(&job.plan.model, job.clone(), &queue)
            }))
            .unwrap_or_else(|p| {
                let what = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                log::error!("job {}: generation panicked: {what}", job.id);
                Err(ApiError::internal(format!("the generation failed: {what}")))
            })
        };
        if let Err(e) = &reply {
            if e.status.is_server_error() {
                log::warn!("job {}: {e}", job.id);
            }
        }
        queue.finish();
        job.answer(reply);
    }
}

/// One job: its images one after another, then the A1111 response.
fn generate(model: &Model, job: Arc<Job>, queue: &Queue) -> Result<Value, ApiError> {
    let plan = &job.plan;
    // The prompt's <lora:...> tags: the model with them, for this job only.
    let with_loras;
    let sd = if plan.loras.is_empty() {
        &model.sd
    } else {
        let loras: Vec<_> = plan
            .loras
            .iter()
            .map(|l| (l.file.clone(), l.te_weight, l.unet_weight))
            .collect();
        with_loras = model
            .sd
            .with_loras_te_unet(&loras, &sd_pipeline::LoraOptions::default())
            .map_err(|e| ApiError::from(e).with_field("prompt"))?;
        &with_loras
    };
    let mut images = Vec::new();
    let mut infotexts = Vec::new();
    let mut seeds_done = Vec::new();
    for (i, &seed) in plan.seeds.iter().enumerate() {
        if job.stopping() {
            break;
        }
        // A skip stops the image it was asked during, not the next.
        job.skipped.store(false, Ordering::Relaxed);
        queue.clear_skip();
        queue.set_step(i, 0, 0);
        let mut req = plan.request.clone();
        if plan.mode == Mode::Img2Img {
            let k = i % plan.init_images.len().max(1);
            let image = plan
                .init_images
                .get(k)
                .cloned()
                .ok_or_else(|| ApiError::internal("img2img job without init images"))?;
            req.init = Init::Image {
                image,
                strength: plan.strength,
            };
        }
        // /interrupt and /skip reach the prompt encoding, every step and the VAE decode.
        let j = job.clone();
        req.cancel = Cancel::new(move || j.stopping() || j.skipped.load(Ordering::Relaxed));
        let mut noise = TorchGenerator::new(seed);
        let family = model.sd.family;
        let mut on_step = |s: sd_pipeline::StepInfo<'_>| {
            queue.set_step(i, s.step + 1, s.total);
            // the live preview's source: AUTOMATIC1111 previews the denoised estimate
            queue.store_latent(s.pred_original.unwrap_or(s.latents).clone(), family);
            if job.stopping() || job.skipped.load(Ordering::Relaxed) {
                Flow::Stop
            } else {
                Flow::Continue
            }
        };
        let out = match (plan.refiner_switch_at, &model.refiner) {
            (Some(f), Some((refiner, _))) => sd_pipeline::Ensemble::new(sd, refiner, f)
                .and_then(|e| e.generate(&req, &mut noise, &mut on_step)),
            _ => sd.generate(&req, &mut noise, &mut on_step),
        };
        // the server's watermark setting (ServerConfig::watermark) is in the request
        let decoded = out.and_then(|out| {
            if out.interrupted {
                return Err(Error::Interrupted);
            }
            model
                .sd
                .decode_output_with_cancel(&out.latents, req.watermark, &req.cancel)
        });
        if job.stopping() {
            break;
        }
        let decoded = match decoded {
            // skipped (in the prompt encoding, a step or the decode): on to the next image
            Err(Error::Interrupted) => continue,
            r => r?,
        };
        let rgb = sd_pipeline::image::to_rgb8(&decoded)?;
        let img = rgb
            .first()
            .ok_or_else(|| ApiError::internal("the pipeline returned no image"))?;
        let mut info = plan.infotext.clone();
        info.seed = seed;
        info.size = img.dimensions();
        let text = info.to_string();
        if plan.send_images {
            let png = sd_pipeline::image::encode_png(img, Some(&text))?;
            images.push(base64::engine::general_purpose::STANDARD.encode(png));
        }
        infotexts.push(text);
        seeds_done.push(seed);
    }
    let interrupted = job.interrupted.load(Ordering::Relaxed);
    if plan.send_images {
        images.extend(plan.include_init.iter().cloned());
    }
    let r = &plan.request;
    let (w, h) = (r.width.unwrap_or(0), r.height.unwrap_or(0));
    let negative = plan.infotext.negative_prompt.clone();
    let n = plan.seeds.len();
    let strength = if plan.mode == Mode::Img2Img {
        json!(plan.strength)
    } else {
        json!(0)
    };
    let info = json!({
        "prompt": plan.infotext.prompt,
        "all_prompts": vec![plan.infotext.prompt.clone(); n],
        "negative_prompt": negative,
        "all_negative_prompts": vec![negative.clone(); n],
        "seed": plan.seeds.first(),
        "all_seeds": plan.seeds,
        "subseed": plan.seeds.first(),
        "all_subseeds": plan.seeds,
        "subseed_strength": 0,
        "width": w,
        "height": h,
        "sampler_name": plan.sampler_name,
        "cfg_scale": r.guidance_scale,
        "steps": r.steps,
        "batch_size": plan.batch_size,
        "restore_faces": false,
        "face_restoration_model": null,
        "sd_model_name": model.name,
        "sd_model_hash": null,
        "sd_vae_name": null,
        "sd_vae_hash": null,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": strength,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": "",
        "clip_skip": plan.clip_skip,
        "is_using_inpainting_conditioning": false,
        "version": concat!("sd-rs ", env!("CARGO_PKG_VERSION")),
        "images_seeds": seeds_done,
        "interrupted": interrupted,
    });
    let info = serde_json::to_string(&info)
        .map_err(|e| ApiError::internal(format!("writing info: {e}")))?;
    Ok(json!({
        "images": images,
        "parameters": plan.echo,
        "info": info,
    }))
}
