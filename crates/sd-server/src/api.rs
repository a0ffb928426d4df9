//! The request body of `/sdapi/v1/txt2img` and `/sdapi/v1/img2img`, field for field as
//! AUTOMATIC1111 1.10 names them (`StableDiffusionProcessingTxt2Img` / `...Img2Img` plus the
//! API's own fields). Unknown fields are ignored, as AUTOMATIC1111's pydantic models do; fields
//! sd-rs cannot honour are refused when they ask for something (see [`GenerationRequest::unsupported`]).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One txt2img or img2img request; absent fields take the defaults noted.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationRequest {
    /// The prompt, in AUTOMATIC1111's syntax.
    pub prompt: String,
    /// The negative prompt.
    pub negative_prompt: String,
    /// Style names (not supported: must be empty).
    pub styles: Vec<String>,
    /// -1: random; image i of the request uses seed + i.
    pub seed: i64,
    /// Variation seed (ignored unless `subseed_strength` > 0, which is refused).
    pub subseed: i64,
    /// Variation strength (only 0 is supported).
    pub subseed_strength: f64,
    /// AUTOMATIC1111 sampler name (`Euler a`, `DPM++ 2M`, `DPM++ 2M Karras`, ...). Absent: the
    /// model's own scheduler.
    pub sampler_name: Option<String>,
    /// Older clients' sampler field, used when `sampler_name` is absent.
    pub sampler_index: Option<String>,
    /// Schedule type (`Automatic`, `Karras`).
    pub scheduler: Option<String>,
    /// Images per batch (this server runs them one after another: same images).
    pub batch_size: i64,
    /// Batches.
    pub n_iter: i64,
    /// Denoising steps (absent: the model's default).
    pub steps: Option<i64>,
    /// Guidance scale (absent: the model's default).
    pub cfg_scale: Option<f64>,
    /// Width in pixels, a multiple of 8 (absent: the model's native size, or the init image's).
    pub width: Option<i64>,
    /// Height in pixels, a multiple of 8.
    pub height: Option<i64>,
    /// Not supported (true is refused).
    pub restore_faces: Option<bool>,
    /// Not supported (true is refused).
    pub tiling: Option<bool>,
    /// Per-request settings: `CLIP_stop_at_last_layers` (Clip skip), `sd_model_checkpoint`
    /// (must name the loaded model); others are ignored.
    pub override_settings: Map<String, Value>,
    /// Accepted and ignored (overrides never outlive the request here).
    pub override_settings_restore_afterwards: bool,
    /// SDXL refiner: must name the refiner `sd serve --refiner` loaded; absent or empty: the
    /// base alone.
    pub refiner_checkpoint: Option<String>,
    /// The fraction of the steps the base runs before the refiner takes over (default 0.8).
    pub refiner_switch_at: Option<f64>,
    /// Return the images (default true).
    pub send_images: bool,
    /// Accepted and ignored: the server keeps no files.
    pub save_images: bool,
    /// img2img strength (default 0.75).
    pub denoising_strength: Option<f64>,
    /// Hires fix (not supported: true is refused).
    pub enable_hr: bool,
    /// Scripts (not supported: must be absent or empty).
    pub script_name: Option<String>,
    /// img2img: base64 images, with or without a `data:image/...;base64,` prefix; image i of the
    /// request starts from `init_images[i % len]`.
    pub init_images: Vec<String>,
    /// Inpainting mask (not supported: must be absent).
    pub mask: Option<String>,
    /// img2img: return the init images after the results.
    pub include_init_images: bool,
    /// img2img resize mode (only 0, "just resize", is supported).
    pub resize_mode: i64,
}

impl Default for GenerationRequest {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            styles: Vec::new(),
            seed: -1,
            subseed: -1,
            subseed_strength: 0.0,
            sampler_name: None,
            sampler_index: None,
            scheduler: None,
            batch_size: 1,
            n_iter: 1,
            steps: None,
            cfg_scale: None,
            width: None,
            height: None,
            restore_faces: None,
            tiling: None,
            override_settings: Map::new(),
            override_settings_restore_afterwards: true,
            refiner_checkpoint: None,
            refiner_switch_at: None,
            send_images: true,
            save_images: false,
            denoising_strength: None,
            enable_hr: false,
            script_name: None,
            init_images: Vec::new(),
            mask: None,
            include_init_images: false,
            resize_mode: 0,
        }
    }
}

impl GenerationRequest {
    /// The first field that asks for something sd-rs does not do, with why.
    pub fn unsupported(&self) -> Option<(&'static str, &'static str)> {
        if !self.styles.is_empty() {
            return Some((
                "styles",
                "styles are not supported; put the text in the prompt",
            ));
        }
        if self.subseed_strength != 0.0 {
            return Some(("subseed_strength", "variation seeds are not supported"));
        }
        if self.restore_faces == Some(true) {
            return Some(("restore_faces", "face restoration is not supported"));
        }
        if self.tiling == Some(true) {
            return Some(("tiling", "tiling is not supported"));
        }
        if self.enable_hr {
            return Some(("enable_hr", "hires fix is not supported"));
        }
        if self.script_name.as_deref().is_some_and(|s| !s.is_empty()) {
            return Some(("script_name", "scripts are not supported"));
        }
        if self.mask.as_deref().is_some_and(|s| !s.is_empty()) {
            return Some(("mask", "inpainting is not supported"));
        }
        if self.resize_mode != 0 {
            return Some(("resize_mode", "only 0 (just resize) is supported"));
        }
        None
    }
}

/// Body of `POST /sdapi/v1/png-info`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PngInfoRequest {
    /// A base64 PNG, with or without a `data:` prefix.
    pub image: String,
}
