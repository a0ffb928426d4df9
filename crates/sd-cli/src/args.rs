//! Command-line arguments of `sd`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Stable Diffusion (SD 1.x, 2.x, SDXL + refiner) text-to-image and image-to-image.
#[derive(Debug, Parser)]
#[command(name = "sd", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate images from a text prompt.
    Txt2img(Common),
    /// Generate images from an input image and a prompt.
    Img2img(Img2Img),
    /// Print the version, the CPU and the kernel path in use (the fastest for this CPU; `SD_CPU_ISA` sets it).
    Info,
    /// Read SDXL's invisible watermark from an image (PNG or JPEG, at least 256x256 pixels):
    /// prints the 48 bits as hex and whether they are the mark diffusers and sd-rs put on SDXL
    /// images (see docs/watermark.md). Exits 0 whether or not the mark is found.
    Watermark(WatermarkArgs),
    /// Print the generation parameters (AUTOMATIC1111's `parameters` text) of a PNG written by
    /// AUTOMATIC1111 or sd-rs.
    Pnginfo {
        /// The PNG file.
        file: PathBuf,
    },
    /// Serve an HTTP API compatible with AUTOMATIC1111's /sdapi/v1 (txt2img, img2img, progress,
    /// interrupt, ...; see docs/server.md). The model stays loaded; one generation runs at a
    /// time, others wait in a bounded queue.
    Serve(Serve),
}

/// `sd serve`'s options.
#[derive(Debug, Args)]
pub struct Serve {
    /// A diffusers folder or a Hugging Face hub id. Without it, the built-in demo model.
    #[arg(long)]
    pub model: Option<String>,
    /// An SDXL refiner (folder or hub id), used by requests whose `refiner_checkpoint` names it
    /// (as given here), from `refiner_switch_at` (default 0.8) of the steps.
    #[arg(long)]
    pub refiner: Option<String>,
    /// Address to listen on. The default answers this machine only; 0.0.0.0 opens it to the
    /// network (use --api-auth then).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port; the URL printed says which).
    #[arg(long, default_value_t = 7860)]
    pub port: u16,
    /// Requests that may wait while one runs; more are answered 503 with Retry-After at once.
    #[arg(long, default_value_t = 4)]
    pub queue: usize,
    /// Require HTTP basic auth, as AUTOMATIC1111's --api-auth USER:PASS.
    #[arg(long)]
    pub api_auth: Option<String>,
    /// Largest width or height a request may ask for, in pixels.
    #[arg(long, default_value_t = 2048)]
    pub max_size: usize,
    /// Most denoising steps a request may ask for.
    #[arg(long, default_value_t = 150)]
    pub max_steps: usize,
    /// Most images per request (batch_size x n_iter).
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Largest request body, in MiB (img2img images are base64 in the body).
    #[arg(long, default_value_t = 64)]
    pub max_body_mb: usize,
    /// Folder of further diffusers models, listed by /sdapi/v1/sd-models; a request (or
    /// /sdapi/v1/options) naming one in sd_model_checkpoint loads it once and keeps it loaded.
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
    /// Folder of LoRA files, listed by /sdapi/v1/loras; a prompt's <lora:NAME:WEIGHT> or
    /// <lora:NAME:TE_WEIGHT:UNET_WEIGHT> tag loads NAME.safetensors from it for that request.
    #[arg(long)]
    pub lora_dir: Option<PathBuf>,
    /// Folder of textual-inversion embeddings (AUTOMATIC1111's --embeddings-dir): each
    /// .safetensors file that fits a model is added to it, triggered by its file stem; all are
    /// listed by /sdapi/v1/embeddings (.pt/.bin pickles and other models' files as skipped).
    #[arg(long)]
    pub embeddings_dir: Option<PathBuf>,
    /// Weight precision.
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    pub dtype: DTypeArg,
    /// cpu, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weight-file variant to prefer, e.g. fp16.
    #[arg(long)]
    pub variant: Option<String>,
    /// Do not put SDXL's invisible watermark on SDXL images (AUTOMATIC1111 never marks; the
    /// default marks them, as `sd txt2img` and diffusers do). See docs/watermark.md.
    #[arg(long)]
    pub no_watermark: bool,
    /// Skip the memory pre-check before loading (generation requests are always checked).
    #[arg(long)]
    pub no_memory_check: bool,
}

/// `sd watermark`'s arguments.
#[derive(Debug, Args)]
pub struct WatermarkArgs {
    /// The image to read.
    pub file: PathBuf,
}

/// img2img's own options.
#[derive(Debug, Args)]
pub struct Img2Img {
    /// The input image (PNG or JPEG); its size must be a multiple of 8.
    #[arg(long)]
    pub image: PathBuf,
    /// How much to change the image, in (0, 1]: the fraction of the schedule that is run.
    /// Default: 0.8, or the PNG's Denoising strength with --from-png.
    #[arg(long)]
    pub strength: Option<f64>,
    /// Everything txt2img takes.
    #[command(flatten)]
    pub common: Common,
}

/// Weight precision.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DTypeArg {
    /// 32-bit float (exact parity with PyTorch f32).
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    Bf16,
}

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PredictionTypeArg {
    /// The added noise (SD 1.x, SD 2.x-base, SDXL).
    Epsilon,
    /// v = alpha * noise - sigma * x0 (SD 2.x 768-v).
    #[value(name = "v_prediction", alias = "v-prediction", alias = "v")]
    VPrediction,
}

/// Prompt syntax.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PromptSyntaxArg {
    /// AUTOMATIC1111's prompt syntax.
    A1111,
    /// diffusers: the text as written.
    Plain,
}

/// Options shared by txt2img and img2img.
#[derive(Debug, Args)]
pub struct Common {
    /// A diffusers folder, a Hugging Face hub id (e.g. stabilityai/stable-diffusion-xl-base-1.0)
    /// or a single-file checkpoint (FILE.safetensors in the original LDM/SGM layout, as model
    /// sites distribute them: SD 1.x, SD 2.x, SDXL base or refiner, detected from the keys).
    /// Without it, the small demo model built into this binary is used (64x64 images of coloured
    /// shapes; see docs/demo-model.md).
    #[arg(long)]
    pub model: Option<String>,
    /// A LoRA to apply, PATH[:WEIGHT] (weight 1.0 by default); repeat for several. kohya/A1111
    /// (lora_unet_/lora_te_/lora_te1_/lora_te2_, LoCon included) and diffusers/PEFT
    /// (lora_A/lora_B) .safetensors files; LoHa/LoKr and pickles are refused. Applied to --model
    /// (not to the refiner).
    #[arg(long = "lora", value_name = "PATH[:WEIGHT]")]
    pub loras: Vec<String>,
    /// Folder where a prompt's <lora:NAME:WEIGHT> or <lora:NAME:TE_WEIGHT:UNET_WEIGHT> tags
    /// find NAME.safetensors (AUTOMATIC1111's models/Lora); the tags are taken out of the text
    /// and the LoRAs applied with those strengths (as --lora, to --model only).
    #[arg(long)]
    pub lora_dir: Option<PathBuf>,
    /// Warn about LoRA keys that match no module of the model and apply the rest (default: an
    /// error listing them).
    #[arg(long)]
    pub lora_lenient: bool,
    /// A textual-inversion embedding, PATH[:TOKEN]; repeat for several. The trigger token is the
    /// file stem unless TOKEN is given (as AUTOMATIC1111; diffusers' token=). AUTOMATIC1111
    /// `emb_params`, diffusers `{token: tensor}`, multi-vector, and SDXL `clip_l` + `clip_g`
    /// .safetensors files; .pt/.bin pickles are refused.
    #[arg(long = "embedding", value_name = "PATH[:TOKEN]")]
    pub embeddings: Vec<String>,
    /// A folder of embeddings, as `sd serve --embeddings-dir` (AUTOMATIC1111's): every
    /// .safetensors file that fits the model, triggered by its file stem; the others (pickles,
    /// other models' widths) are skipped with a note.
    #[arg(long, value_name = "DIR")]
    pub embeddings_dir: Option<PathBuf>,
    /// With a single-file --model (and --refiner): a diffusers folder or hub id whose configs,
    /// tokenizers and scheduler config are used instead of the ones shipped for the detected
    /// family (as diffusers' from_single_file(..., config=...)); only config files are fetched.
    #[arg(long)]
    pub config: Option<String>,
    /// What the UNet predicts, overriding the scheduler config (single-file SD 2.x files do not
    /// record it; by default sd-rs decides from a weight statistic, see docs/formats.md).
    #[arg(long, value_enum)]
    pub prediction_type: Option<PredictionTypeArg>,
    /// The prompt.
    #[arg(long, required_unless_present = "from_png")]
    pub prompt: Option<String>,
    /// Take the settings from the parameters of a PNG written by AUTOMATIC1111 or sd-rs (see
    /// `sd pnginfo`): prompt, negative prompt, steps, sampler and schedule type, CFG scale,
    /// seed, size, clip skip (and img2img's denoising strength). Flags given as well override
    /// them. With the same model, a PNG sd-rs wrote regenerates to the same image.
    #[arg(long, value_name = "FILE")]
    pub from_png: Option<PathBuf>,
    /// What the image should not show.
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Denoising steps (of the whole schedule, also when a refiner finishes it).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale (guidance is off at 1 or below).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Sampler: an AUTOMATIC1111 name ("Euler a", "Euler", "DPM++ 2M", "DPM++ 2M Karras",
    /// "DDIM", "PLMS", "LMS", "Heun"), a short name (ddpm, ddim, pndm, euler, euler-a, dpm++2m,
    /// dpm++2m-karras, heun, lms) or a diffusers class name. Default: the model's own.
    #[arg(long, visible_alias = "sampler")]
    pub scheduler: Option<String>,
    /// AUTOMATIC1111's separate schedule type: Automatic (the sampler's own) or Karras (Karras
    /// sigmas; sd-rs has them for DPM++ 2M).
    #[arg(long)]
    pub schedule_type: Option<String>,
    /// How the prompts are read. a1111: AUTOMATIC1111's syntax, (word:1.3) weights, (word) and
    /// [word], BREAK, no 77-token limit (75-token chunks), prompt editing [from:to:when] and
    /// alternation [a|b]; <lora:NAME:W> tags load LoRAs from --lora-dir; AND is refused. plain:
    /// diffusers, the text as written, truncated at 77 tokens with a warning.
    #[arg(long, value_enum, default_value_t = PromptSyntaxArg::A1111)]
    pub prompt_syntax: PromptSyntaxArg,
    /// AUTOMATIC1111's "Clip skip": 1 uses the text encoder's last layer, 2 the penultimate, ...
    /// It is diffusers' clip_skip plus one (diffusers counts the layers skipped). SDXL already
    /// uses the penultimate layer at 1; AUTOMATIC1111 ignores this setting for SDXL by default,
    /// sd-rs applies it as diffusers does (2 = one layer further back).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub clip_skip: Option<u32>,
    /// Rescale the guided prediction towards the text prediction's standard deviation
    /// (diffusers' guidance_rescale, 0 = off, 0.7 suggested for v-prediction models).
    #[arg(long)]
    pub guidance_rescale: Option<f64>,
    /// Image width in pixels (multiple of 8). Default: the model's native size.
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels (multiple of 8). Default: the model's native size.
    #[arg(long)]
    pub height: Option<usize>,
    /// Seed; the same seed gives the same image as diffusers with
    /// torch.Generator("cpu").manual_seed(seed). Default: a random seed (printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Images to generate.
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,
    /// Write only this image of the `num_images` (set by `--from-png` from a PNG's
    /// `Batch size` / `Batch pos`, to regenerate one image of a batch).
    #[arg(skip)]
    pub batch_pos: Option<usize>,
    /// Start from these latents: a safetensors file with a tensor `latents` [N, C, H/8, W/8]
    /// (unscaled, as diffusers' `latents=`).
    #[arg(long)]
    pub init_latents: Option<PathBuf>,
    /// Also write the final latents (before VAE decoding) to this safetensors file as `latents`.
    #[arg(long)]
    pub save_latents: Option<PathBuf>,
    /// Weight precision.
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    pub dtype: DTypeArg,
    /// cpu, cuda:N or metal (CUDA and Metal need a build with the matching cargo feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weight-file variant to prefer, e.g. fp16 (falls back to the plain files).
    #[arg(long)]
    pub variant: Option<String>,
    /// An SDXL refiner (folder, hub id or single-file checkpoint) that finishes the schedule
    /// after the base.
    #[arg(long)]
    pub refiner: Option<String>,
    /// With a single-file --refiner: a diffusers folder or hub id giving its configs (as
    /// --config for the base).
    #[arg(long)]
    pub refiner_config: Option<String>,
    /// With --refiner: the fraction of the steps the base runs.
    #[arg(long, default_value_t = 0.8)]
    pub high_noise_frac: f64,
    /// Output PNG. Several images are written as numbered files next to it (out-0.png, ...).
    #[arg(long, default_value = "out.png")]
    pub output: PathBuf,
    /// Replace existing output files (otherwise sd refuses to overwrite them).
    #[arg(long)]
    pub overwrite: bool,
    /// Do not put SDXL's invisible watermark on SDXL images (diffusers' add_watermarker=False).
    /// By default SDXL images at least 256 pixels wide carry it, as with diffusers; SD 1.x/2.x
    /// images never do. See docs/watermark.md.
    #[arg(long)]
    pub no_watermark: bool,
    /// Decode (and encode) the image in tiles of the VAE's sample size: memory then depends on
    /// the tile, not the image (seams are blended; the result differs slightly from untiled).
    /// Without it, images above 2 megapixels are tiled anyway.
    #[arg(long)]
    pub vae_tiling: bool,
    /// Skip the memory pre-check (the estimate of the memory loading and generating need,
    /// compared with what the machine has available; docs/reliability.md).
    #[arg(long)]
    pub no_memory_check: bool,
}
