//! From an AUTOMATIC1111 request body to a validated [`Plan`]: every check that can fail on the
//! request's fault runs here, on the HTTP side, before the job is queued (so bad input gets its
//! 4xx at once and never reaches the worker).

use std::sync::Arc;

use axum::http::StatusCode;
use base64::Engine;
use sd_pipeline::core::candle_core::{Device, Tensor};
use sd_pipeline::image::RgbImage;
use sd_pipeline::{GenerateRequest, Infotext, Init, OutputType, PromptSyntax, SchedulerKind};
use serde_json::Value;

use crate::api::GenerationRequest;
use crate::error::ApiError;
use crate::{Limits, Model, Models};

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `/sdapi/v1/txt2img`.
    Txt2Img,
    /// `/sdapi/v1/img2img`.
    Img2Img,
}

/// A validated request, ready for the worker.
#[derive(Debug)]
pub struct Plan {
    /// The model to run.
    pub model: Arc<Model>,
    /// txt2img or img2img.
    pub mode: Mode,
    /// The pipeline request for one image (the worker sets `init` per image).
    pub request: GenerateRequest,
    /// img2img: the init images as `[1, 3, H, W]` tensors at the output size.
    pub init_images: Vec<Tensor>,
    /// img2img strength.
    pub strength: f64,
    /// One seed per image: seed + i.
    pub seeds: Vec<u64>,
    /// The infotext of image 0 (the worker sets the seed and size of each).
    pub infotext: Infotext,
    /// The request echoed in the response's `parameters`.
    pub echo: Value,
    /// Whether to return the images.
    pub send_images: bool,
    /// img2img `include_init_images`: the init images as sent, appended to `images`.
    pub include_init: Vec<String>,
    /// A1111's Clip skip (1 = last layer).
    pub clip_skip: u32,
    /// The sampler name as A1111 writes it in `info`.
    pub sampler_name: String,
    /// Images per batch and batches, as asked.
    pub batch_size: usize,
    /// The SDXL ensemble: the fraction of the steps the base runs before the refiner.
    pub refiner_switch_at: Option<f64>,
    /// The prompt's `<lora:...>` tags, resolved in `--lora-dir` (applied by the worker).
    pub loras: Vec<sd_pipeline::prompt_loras::PromptLora>,
}

/// Server-wide settings a request may override (`/sdapi/v1/options`).
#[derive(Debug, Clone)]
pub struct Options {
    /// `CLIP_stop_at_last_layers` (1 = last layer).
    pub clip_stop_at_last_layers: u32,
    /// `show_progress_every_n_steps`: a new live preview every N steps (AUTOMATIC1111's
    /// default 10); -1: after each image; 0: none.
    pub show_progress_every_n_steps: i64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            clip_stop_at_last_layers: 1,
            show_progress_every_n_steps: 10,
        }
    }
}

fn int_field(name: &str, v: i64, min: i64, max: i64) -> Result<usize, ApiError> {
    if v < min || v > max {
        return Err(ApiError::invalid(
            name,
            format!("{name} = {v}: expected {min} to {max}"),
        ));
    }
    usize::try_from(v).map_err(|_| ApiError::invalid(name, format!("{name} = {v}")))
}

/// The bytes of a base64 image, with or without a `data:image/...;base64,` prefix.
pub fn base64_image(s: &str, field: &str) -> Result<Vec<u8>, ApiError> {
    let data = match s.split_once(',') {
        Some((head, rest)) if head.starts_with("data:") => rest,
        _ => s,
    };
    let clean: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(clean.as_bytes())
        .map_err(|e| ApiError::invalid(field, format!("{field}: not base64 ({e})")))
}

/// A seed that is not the same twice in a process.
fn random_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x = t
        ^ COUNTER
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .rotate_left(17)
        ^ u64::from(std::process::id()).rotate_left(32);
    // splitmix64 finaliser: spreads the clock's low bits
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (x ^ (x >> 31)) % (1 << 32)
}

/// The scheduler of a request: `sampler_name` (or `sampler_index`) and `scheduler` as
/// AUTOMATIC1111 names them; neither gives the model's own. An unknown sampler is a 404, as
/// AUTOMATIC1111 answers it.
pub fn scheduler_of(
    req: &GenerationRequest,
    own: SchedulerKind,
) -> Result<SchedulerKind, ApiError> {
    let (field, name) = match (&req.sampler_name, &req.sampler_index) {
        (Some(n), _) if !n.trim().is_empty() => ("sampler_name", n.as_str()),
        (_, Some(n)) if !n.trim().is_empty() => ("sampler_index", n.as_str()),
        _ => ("scheduler", own.short_name()),
    };
    let schedule = req.scheduler.as_deref().filter(|s| !s.trim().is_empty());
    // The kind alone first, so that an unknown sampler is told apart from a bad schedule type.
    SchedulerKind::from_a1111(name, None).map_err(|e| ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "HTTPException",
        field: Some(field.to_owned()),
        detail: format!("Sampler not found: {e}"),
        retry_after: None,
    })?;
    SchedulerKind::from_a1111(name, schedule)
        .map_err(|e| ApiError::invalid("scheduler", e.to_string()))
}

/// Validates `req` against the model and the server's limits.
pub fn plan(
    models: &Models,
    limits: &Limits,
    options: &Options,
    mut req: GenerationRequest,
    mode: Mode,
    lora_dir: Option<&sd_pipeline::prompt_loras::LoraDir>,
) -> Result<Plan, ApiError> {
    // The model first: the defaults below are its own.
    let model = match req.override_settings.get("sd_model_checkpoint") {
        None | Some(Value::Null) => models.current(),
        Some(v) => models.get(
            v.as_str().unwrap_or_default(),
            "override_settings.sd_model_checkpoint",
        )?,
    };
    let model = &model;
    if let Some((field, why)) = req.unsupported() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "NotImplementedError",
            format!("{field}: {why}"),
        )
        .with_field(field));
    }
    let steps = match req.steps {
        Some(s) => int_field("steps", s, 1, limits.max_steps as i64)?,
        None => model.default_steps.min(limits.max_steps),
    };
    let cfg = req.cfg_scale.unwrap_or(model.default_cfg);
    if !(cfg.is_finite() && (0.0..=100.0).contains(&cfg)) {
        return Err(ApiError::invalid(
            "cfg_scale",
            format!("cfg_scale = {cfg}: expected a number from 0 to 100"),
        ));
    }
    let max_batch = limits.max_batch as i64;
    let batch_size = int_field("batch_size", req.batch_size, 1, max_batch)?;
    let n_iter = int_field("n_iter", req.n_iter, 1, max_batch)?;
    if batch_size * n_iter > limits.max_batch {
        return Err(ApiError::invalid(
            "n_iter",
            format!(
                "batch_size * n_iter = {}: this server makes at most {} images per request \
                 (--max-batch)",
                batch_size * n_iter,
                limits.max_batch
            ),
        ));
    }
    // AUTOMATIC1111 asks for multiples of 8; the VAE needs multiples of its own factor.
    let vae = model.sd.vae_scale_factor().max(1);
    let f = if 8usize.is_multiple_of(vae) {
        8
    } else if vae.is_multiple_of(8) {
        vae
    } else {
        8 * vae
    };
    let side = |name: &str, v: Option<i64>| -> Result<Option<usize>, ApiError> {
        let Some(v) = v else { return Ok(None) };
        let u = int_field(name, v, f as i64, limits.max_size as i64)?;
        if !u.is_multiple_of(f) {
            return Err(ApiError::invalid(
                name,
                format!("{name} = {v}: expected a multiple of {f}"),
            ));
        }
        Ok(Some(u))
    };
    let (mut width, mut height) = (side("width", req.width)?, side("height", req.height)?);

    let scheduler = scheduler_of(&req, model.scheduler)?;
    let clip_skip = match req.override_settings.get("CLIP_stop_at_last_layers") {
        None | Some(Value::Null) => options.clip_stop_at_last_layers,
        Some(v) => match v.as_i64() {
            Some(n) => int_field("override_settings.CLIP_stop_at_last_layers", n, 1, 12)? as u32,
            None => {
                return Err(ApiError::invalid(
                    "override_settings.CLIP_stop_at_last_layers",
                    format!("{v}: expected an integer from 1 to 12"),
                ))
            }
        },
    };
    let refiner_switch_at = match req.refiner_checkpoint.as_deref().map(str::trim) {
        None | Some("") | Some("None") => None,
        Some(name) => {
            let Some((_, loaded)) = &model.refiner else {
                return Err(ApiError::invalid(
                    "refiner_checkpoint",
                    format!("{name:?}: this server has no refiner loaded (sd serve --refiner)"),
                ));
            };
            if name != loaded {
                return Err(ApiError::invalid(
                    "refiner_checkpoint",
                    format!("{name:?}: the loaded refiner is {loaded:?}"),
                ));
            }
            let f = req.refiner_switch_at.unwrap_or(0.8);
            if !(f > 0.0 && f < 1.0) {
                return Err(ApiError::invalid(
                    "refiner_switch_at",
                    format!(
                        "refiner_switch_at = {f}: expected a fraction strictly between 0 and 1"
                    ),
                ));
            }
            Some(f)
        }
    };
    // Prompt syntax errors are the request's: catch them before queueing.
    sd_pipeline::clip::prompt_syntax::A1111Prompt::parse(&req.prompt, steps)
        .map_err(|e| ApiError::from(e).with_field("prompt"))?;
    let loras = sd_pipeline::prompt_loras::prompt_loras(&req.prompt, lora_dir)
        .map_err(|e| ApiError::from(e).with_field("prompt"))?;

    let seed = match req.seed {
        -1 => random_seed(),
        s if s < 0 => {
            return Err(ApiError::invalid(
                "seed",
                format!("seed = {s}: expected -1 (random) or a seed >= 0"),
            ))
        }
        s => s as u64,
    };
    let count = batch_size * n_iter;
    let seeds: Vec<u64> = (0..count as u64).map(|i| seed.wrapping_add(i)).collect();

    let mut init_images = Vec::new();
    let mut strength = 0.0;
    if mode == Mode::Img2Img {
        strength = req.denoising_strength.unwrap_or(0.75);
        if !(strength > 0.0 && strength <= 1.0) {
            return Err(ApiError::invalid(
                "denoising_strength",
                format!("denoising_strength = {strength}: expected a value in (0, 1]"),
            ));
        }
        if req.init_images.is_empty() {
            return Err(ApiError::invalid(
                "init_images",
                "img2img needs at least one init image (base64 PNG or JPEG)",
            ));
        }
        if req.init_images.len() > limits.max_batch {
            return Err(ApiError::invalid(
                "init_images",
                format!(
                    "{} images: at most {}",
                    req.init_images.len(),
                    limits.max_batch
                ),
            ));
        }
        let mut decoded: Vec<RgbImage> = Vec::new();
        for (i, s) in req.init_images.iter().enumerate() {
            let field = format!("init_images[{i}]");
            let bytes = base64_image(s, &field)?;
            let img = sd_pipeline::image::decode_rgb8(&bytes, &field)?;
            decoded.push(img);
        }
        // Without a size the output takes the first image's (which must then fit).
        let (w0, h0) = decoded[0].dimensions();
        if width.is_none() && height.is_none() {
            width =
                side("width", Some(i64::from(w0))).map_err(|e| e.with_field("init_images[0]"))?;
            height =
                side("height", Some(i64::from(h0))).map_err(|e| e.with_field("init_images[0]"))?;
        }
        let (w, h) = model.size(width, height);
        for img in &decoded {
            let img = if img.dimensions() == (w as u32, h as u32) {
                img.clone()
            } else {
                // A1111's resize mode 0, "just resize" (Lanczos).
                image::imageops::resize(
                    img,
                    w as u32,
                    h as u32,
                    image::imageops::FilterType::Lanczos3,
                )
            };
            init_images.push(sd_pipeline::image::from_rgb8(&img, &Device::Cpu)?);
        }
    }
    let (w, h) = model.size(width, height);

    let mut request = GenerateRequest::new(req.prompt.clone());
    if !req.negative_prompt.is_empty() {
        request.negative_prompts = vec![req.negative_prompt.clone()];
    }
    request.prompt_syntax = PromptSyntax::A1111;
    request.steps = steps;
    request.guidance_scale = cfg;
    request.scheduler = Some(scheduler);
    request.clip_skip = Some(clip_skip as usize - 1).filter(|&k| k > 0);
    request.width = Some(w);
    request.height = Some(h);
    request.num_images_per_prompt = 1;
    request.output = OutputType::Latents;
    request.init = Init::Noise;

    let mut info = Infotext::new(
        req.prompt.clone(),
        scheduler,
        steps,
        cfg,
        seeds[0],
        (w as u32, h as u32),
        model.name.clone(),
    );
    info.negative_prompt = req.negative_prompt.clone();
    info.clip_skip = Some(clip_skip);
    if mode == Mode::Img2Img {
        info.denoising_strength = Some(strength);
    }
    if let (Some(f), Some((_, name))) = (refiner_switch_at, &model.refiner) {
        info.refiner = Some((name.clone(), f));
    }
    info.lora_hashes = sd_pipeline::prompt_loras::lora_hashes(&loras);
    // The --embeddings-dir embeddings the prompts use (the model has them all).
    let used = model
        .embeddings
        .used_by(&[req.prompt.as_str(), req.negative_prompt.as_str()]);
    info.ti_hashes = sd_pipeline::ti_hashes(&used)?;

    let include_init = if mode == Mode::Img2Img && req.include_init_images {
        req.init_images.clone()
    } else {
        Vec::new()
    };
    let send_images = req.send_images;
    let sampler_name = scheduler.a1111_name().0.to_owned();
    // A1111 echoes the request without the (large) init images unless asked for them.
    if !req.include_init_images {
        req.init_images.clear();
    }
    let mut echo = serde_json::to_value(&req)
        .map_err(|e| ApiError::internal(format!("echoing the request: {e}")))?;
    if let Some(o) = echo.as_object_mut() {
        if mode == Mode::Txt2Img {
            for k in [
                "init_images",
                "denoising_strength",
                "mask",
                "include_init_images",
                "resize_mode",
            ] {
                o.remove(k);
            }
        } else if !req.include_init_images {
            o.insert("init_images".into(), Value::Null);
        }
    }
    Ok(Plan {
        model: model.clone(),
        mode,
        request,
        init_images,
        strength,
        seeds,
        infotext: info,
        echo,
        send_images,
        include_init,
        clip_skip,
        sampler_name,
        batch_size,
        refiner_switch_at,
        loras,
    })
}
