//! `sd`: Stable Diffusion text-to-image and image-to-image from the command line.
//! Argument parsing, progress and files only; every model step is in sd-pipeline.

mod args;
mod demo;
mod from_png;
mod output;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use sd_pipeline::core::candle_core::{DType, Device, Tensor};
use sd_pipeline::core::{LoadOptions, TorchGenerator};
use sd_pipeline::formats::{EmbeddingFile, LoraFile};
use sd_pipeline::hub::{resolve_config, resolve_model, HubConfig};
use sd_pipeline::prompt_loras::{lora_hashes, prompt_loras, LoraDir};
use sd_pipeline::schedulers::PredictionType;
use sd_pipeline::{
    Ensemble, Flow, GenerateRequest, Infotext, Init, LoraOptions, PromptSyntax, SchedulerKind,
    SingleFileOptions, StableDiffusion, StepInfo,
};

use args::{Cli, Command, Common, DTypeArg, PredictionTypeArg, PromptSyntaxArg};

/// Prints the library's warnings (dropped prompt tokens, variant fallback, unknown config keys)
/// to stderr; `SD_LOG=debug` shows more.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            let level = if r.level() == log::Level::Warn {
                "warning".to_owned()
            } else {
                r.level().as_str().to_lowercase()
            };
            eprintln!("{level}: {}", r.args());
        }
    }
    fn flush(&self) {}
}

fn main() -> ExitCode {
    let level = match std::env::var("SD_LOG").as_deref() {
        Ok("debug") => log::LevelFilter::Debug,
        Ok("info") => log::LevelFilter::Info,
        Ok("off") => log::LevelFilter::Off,
        _ => log::LevelFilter::Warn,
    };
    if log::set_logger(&StderrLogger).is_ok() {
        log::set_max_level(level);
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined with `: `, as anyhow's `{:#}`, except that a cause already
/// written out by the message before it (the library errors print their I/O or tensor source
/// themselves) is not repeated.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.is_empty() {
            out = text;
        } else if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Txt2img(mut c) => {
            if let Some(p) = c.from_png.clone() {
                from_png::apply(&p, &mut c, None)?;
            }
            generate(&c, None)
        }
        Command::Img2img(mut i) => {
            if let Some(p) = i.common.from_png.clone() {
                from_png::apply(&p, &mut i.common, Some(&mut i.strength))?;
            }
            generate(&i.common, Some((&i.image, i.strength.unwrap_or(0.8))))
        }
        Command::Pnginfo { file } => {
            println!("{}", from_png::parameters(&file)?);
            Ok(())
        }
        Command::Serve(s) => serve(&s),
        Command::Watermark(w) => watermark(&w.file),
        Command::Info => {
            println!("sd {}", env!("CARGO_PKG_VERSION"));
            println!("{}", sd_kernels::isa::describe());
            Ok(())
        }
    }
}

fn dtype(d: DTypeArg) -> DType {
    match d {
        DTypeArg::F32 => DType::F32,
        DTypeArg::F16 => DType::F16,
        DTypeArg::Bf16 => DType::BF16,
    }
}

/// `sd serve`: load the model, then serve until Ctrl-C.
fn serve(s: &args::Serve) -> Result<()> {
    let opts = LoadOptions {
        dtype: dtype(s.dtype),
        device: device(&s.device)?,
        variant: s.variant.clone(),
    };
    let (dir, name, is_demo) = match &s.model {
        Some(m) => (
            resolve_model(m, s.variant.as_deref(), &HubConfig::from_env())?,
            m.clone(),
            false,
        ),
        None => (demo::path()?, "sd-rs demo".to_owned(), true),
    };
    let api_auth = match &s.api_auth {
        None => None,
        Some(a) => match a.split_once(':') {
            Some((u, p)) if !u.is_empty() => Some((u.to_owned(), p.to_owned())),
            _ => bail!("--api-auth {a}: expected USER:PASS"),
        },
    };
    if s.max_size < 8 || s.max_steps == 0 || s.max_batch == 0 {
        bail!("--max-size must be at least 8, --max-steps and --max-batch at least 1");
    }
    eprintln!("loading {} ...", dir.display());
    if !s.no_memory_check {
        sd_pipeline::memory::check_load(&dir, &opts)?;
    }
    let sd =
        StableDiffusion::load(&dir, &opts).with_context(|| format!("loading {}", dir.display()))?;
    let defaults = if is_demo {
        demo::DEFAULTS
    } else {
        default_settings(&sd)
    };
    let mut model = sd_server::Model::new(sd, name, &dir, defaults.steps, defaults.guidance)?;
    if let Some(r) = &s.refiner {
        let rdir = resolve_model(r, s.variant.as_deref(), &HubConfig::from_env())?;
        eprintln!("loading refiner {} ...", rdir.display());
        let refiner = StableDiffusion::load_refiner(&rdir, &model.sd, &opts)
            .with_context(|| format!("loading refiner {}", rdir.display()))?;
        model = model.with_refiner(refiner, r.clone())?;
    }
    let config = sd_server::ServerConfig {
        host: s.host.clone(),
        port: s.port,
        queue: s.queue,
        api_auth,
        limits: sd_server::Limits {
            max_size: s.max_size,
            max_steps: s.max_steps,
            max_batch: s.max_batch,
            max_body_bytes: s.max_body_mb.saturating_mul(1 << 20),
        },
        models_dir: s.models_dir.clone(),
        load_options: opts.clone(),
        lora_dir: s.lora_dir.clone(),
        embeddings_dir: s.embeddings_dir.clone(),
        watermark: !s.no_watermark,
    };
    let server = sd_server::Server::start(model, config)?;
    println!(
        "sd serve: listening on {} (AUTOMATIC1111 API at /sdapi/v1; Ctrl-C stops)",
        server.url()
    );
    use std::io::Write;
    std::io::stdout().flush().ok();
    server.wait_for_ctrl_c();
    Ok(())
}

/// `sd watermark FILE`: the 48 bits of SDXL's invisible watermark as hex, and whether they are
/// diffusers' mark (exit 0 either way; an error only when the image cannot be read).
fn watermark(file: &Path) -> Result<()> {
    use sd_pipeline::watermark::{
        detect, MIN_MATCHING_BITS, MIN_PIXELS, WATERMARK_BITS, WATERMARK_MESSAGE,
    };
    let img = sd_pipeline::image::read_rgb8(file)?;
    let (w, h) = img.dimensions();
    if (w as usize).saturating_mul(h as usize) < MIN_PIXELS {
        println!("bits: none ({w}x{h} is under the watermark's 256x256 minimum)");
        println!("sdxl watermark: no (too small to carry it)");
        return Ok(());
    }
    let d = detect(&img).with_context(|| format!("reading the watermark of {}", file.display()))?;
    let read = d
        .bits
        .iter()
        .fold(0u64, |acc, &b| (acc << 1) | u64::from(b & 1));
    println!("bits: {read:012x}");
    println!(
        "matching: {} of {} (SDXL mark {WATERMARK_MESSAGE:012x})",
        d.matching,
        WATERMARK_BITS.len()
    );
    if d.is_sdxl() {
        println!("sdxl watermark: yes");
    } else {
        println!("sdxl watermark: no (needs {MIN_MATCHING_BITS} or more matching bits)");
    }
    Ok(())
}

fn device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let n: usize = s
                .strip_prefix("cuda:")
                .unwrap_or("0")
                .parse()
                .context("--device cuda:N needs a number")?;
            Device::new_cuda(n).with_context(|| format!("--device {s}: this build has no CUDA support or no such GPU (rebuild with --features cuda)"))
        }
        "metal" => Device::new_metal(0).context(
            "--device metal: this build has no Metal support (rebuild with --features metal)",
        ),
        other => bail!("--device {other}: expected cpu, cuda:N or metal"),
    }
}

fn generate(c: &Common, img2img: Option<(&PathBuf, f64)>) -> Result<()> {
    let opts = LoadOptions {
        dtype: dtype(c.dtype),
        device: device(&c.device)?,
        variant: c.variant.clone(),
    };
    let hub = HubConfig::from_env();
    let sf = SingleFileOptions {
        config: c
            .config
            .as_deref()
            .map(|m| resolve_config(m, &hub))
            .transpose()?,
        prediction_type: c.prediction_type.map(|p| match p {
            PredictionTypeArg::Epsilon => PredictionType::Epsilon,
            PredictionTypeArg::VPrediction => PredictionType::VPrediction,
        }),
    };
    let (model, model_name, is_demo) = match &c.model {
        Some(m) => (
            ModelSource::resolve(m, c.variant.as_deref(), &hub)?,
            m.clone(),
            false,
        ),
        None => (
            ModelSource::Folder(demo::path()?),
            "sd-rs demo".to_owned(),
            true,
        ),
    };
    if sf.config.is_some() && !matches!(model, ModelSource::File(_)) {
        bail!("--config applies to single-file checkpoints; --model is a diffusers folder with its own configs");
    }
    let clip_skip = c.clip_skip.map(|n| n as usize - 1).filter(|&k| k > 0);
    if let Some(f) = c.guidance_rescale {
        if !(f.is_finite() && f >= 0.0) {
            bail!("--guidance-rescale {f}: expected a number >= 0 (0 = off)");
        }
    }
    if c.num_images == 0 || c.num_images > sd_pipeline::MAX_BATCH {
        bail!(
            "--num-images {}: expected 1 to {}",
            c.num_images,
            sd_pipeline::MAX_BATCH
        );
    }
    // Refuse to overwrite before spending minutes on generation.
    let outputs = output::paths(
        &c.output,
        if c.batch_pos.is_some() {
            1
        } else {
            c.num_images
        },
    );
    output::check_writable(&outputs, c.overwrite)?;
    if let Some(p) = &c.save_latents {
        output::check_writable(std::slice::from_ref(p), c.overwrite)?;
    }

    // LoRAs: --lora files, then the prompt's <lora:...> tags (A1111 syntax only).
    let mut loras = c
        .loras
        .iter()
        .map(|spec| parse_lora(spec).map(|(f, w)| (f, w, w)))
        .collect::<Result<Vec<_>>>()?;
    let prompt = c.prompt.clone().context("--prompt is required")?;
    let tag_loras = match c.prompt_syntax {
        PromptSyntaxArg::A1111 => {
            prompt_loras(&prompt, c.lora_dir.as_deref().map(LoraDir::new).as_ref())
                .context("--prompt")?
        }
        PromptSyntaxArg::Plain => Vec::new(),
    };
    loras.extend(
        tag_loras
            .iter()
            .map(|l| (l.file.clone(), l.te_weight, l.unet_weight)),
    );
    if let (ModelSource::Folder(dir), false) = (&model, c.no_memory_check) {
        sd_pipeline::memory::check_load(dir, &opts)?;
    }
    let mut sd = model.load(&opts, &sf, None)?;
    if c.vae_tiling {
        let tiles = sd_pipeline::vae::Tiling::On(sd_pipeline::vae::TileConfig::from_config(
            sd.vae.config(),
        ));
        sd.vae = std::sync::Arc::new(sd.vae.with_tiling(tiles)?);
    }
    if !loras.is_empty() {
        let lora_opts = LoraOptions {
            lenient: c.lora_lenient,
        };
        sd = sd
            .with_loras_te_unet(&loras, &lora_opts)
            .context("applying the LoRAs")?;
    }
    let mut embeddings = c
        .embeddings
        .iter()
        .map(|spec| parse_embedding(spec))
        .collect::<Result<Vec<_>>>()?;
    if !embeddings.is_empty() {
        sd = sd
            .with_embeddings(&embeddings)
            .context("adding the embeddings")?;
    }
    if let Some(dir) = &c.embeddings_dir {
        let (with, found) = sd
            .with_embeddings_dir(dir)
            .with_context(|| format!("--embeddings-dir {}", dir.display()))?;
        sd = with;
        for s in &found.skipped {
            log::warn!("--embeddings-dir: {} skipped: {}", s.name, s.reason);
        }
        // As AUTOMATIC1111, the infotext names the folder's embeddings the prompts use.
        let negative = c.negative_prompt.as_deref().unwrap_or_default();
        embeddings.extend(found.used_by(&[prompt.as_str(), negative]));
    }
    let scheduler = match (&c.scheduler, &c.schedule_type) {
        (Some(name), t) => Some(SchedulerKind::from_a1111(name, t.as_deref())?),
        (None, Some(t)) => {
            let own = sd.scheduler_kind()?;
            Some(SchedulerKind::from_a1111(own.short_name(), Some(t))?)
        }
        (None, None) => None,
    };
    let mut req = GenerateRequest::new(prompt.clone());
    req.negative_prompts = c.negative_prompt.iter().cloned().collect();
    let defaults = if is_demo {
        demo::DEFAULTS
    } else {
        default_settings(&sd)
    };
    req.steps = c.steps.unwrap_or(defaults.steps);
    req.guidance_scale = c.guidance.unwrap_or(defaults.guidance);
    req.scheduler = scheduler;
    req.prompt_syntax = match c.prompt_syntax {
        PromptSyntaxArg::A1111 => PromptSyntax::A1111,
        PromptSyntaxArg::Plain => PromptSyntax::Plain,
    };
    req.clip_skip = clip_skip;
    req.guidance_rescale = c.guidance_rescale.unwrap_or(0.0);
    if clip_skip.is_some() && sd.family != sd_pipeline::ModelFamily::Sd {
        log::warn!(
            "--clip-skip {} on SDXL: AUTOMATIC1111 ignores Clip skip for SDXL by default; sd-rs \
             goes {} layer(s) further back than SDXL's penultimate layer, as diffusers does",
            c.clip_skip.unwrap_or(1),
            clip_skip.unwrap_or(0)
        );
    }
    req.height = c.height;
    req.width = c.width;
    req.num_images_per_prompt = c.num_images;
    req.watermark = !c.no_watermark;
    req.memory_check = !c.no_memory_check;
    let seed = c.seed.unwrap_or_else(random_seed);
    if c.seed.is_none() {
        eprintln!("seed: {seed}");
    }
    if let Some(p) = &c.init_latents {
        req.init = Init::Latents(read_latents(p, &opts.device)?);
    }
    if let Some((image, strength)) = img2img {
        if c.init_latents.is_some() {
            bail!("--init-latents and img2img's --image cannot be combined");
        }
        let rgb = sd_pipeline::image::read_rgb8(image)?;
        req.init = Init::Image {
            image: sd_pipeline::image::from_rgb8(&rgb, &opts.device)?,
            strength,
        };
    }
    let mut noise = TorchGenerator::new(seed);
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed_precise}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut on_step = |s: StepInfo<'_>| {
        bar.set_length(s.total as u64);
        bar.set_position(s.step as u64 + 1);
        Flow::Continue
    };

    let (out, refiner_note) = match &c.refiner {
        None => {
            bar.set_message("denoising");
            (sd.generate(&req, &mut noise, &mut on_step)?, None)
        }
        Some(r) => {
            let f = c.high_noise_frac;
            if !(f > 0.0 && f < 1.0) {
                bail!("--high-noise-frac {f}: expected a fraction strictly between 0 and 1");
            }
            // The refiner has its own --refiner-config; the prediction type is the base's.
            let rsf = SingleFileOptions {
                config: c
                    .refiner_config
                    .as_deref()
                    .map(|m| resolve_config(m, &hub))
                    .transpose()?,
                prediction_type: None,
            };
            let refiner = ModelSource::resolve(r, c.variant.as_deref(), &hub)?
                .load(&opts, &rsf, Some(&sd))
                .context("loading the refiner")?;
            let ensemble = Ensemble::new(&sd, &refiner, f)?;
            // The bar restarts when the refiner takes over (each run reports its own steps).
            bar.set_message("base, then refiner");
            (
                ensemble.generate(&req, &mut noise, &mut on_step)?,
                Some((r.clone(), f)),
            )
        }
    };
    bar.finish_and_clear();

    if let Some(p) = &c.save_latents {
        output::save_latents(p, &out.latents, c.overwrite)?;
    }
    let images = out
        .images
        .as_ref()
        .context("the pipeline returned no images")?;
    let images = sd_pipeline::image::to_rgb8(images)?;
    let first = images.first().context("the pipeline returned no images")?;
    let (h, w) = (first.height(), first.width());
    let used = match scheduler {
        Some(k) => k,
        None => sd.scheduler_kind()?,
    };
    let mut info = Infotext::new(
        prompt,
        used,
        req.steps,
        req.guidance_scale,
        seed,
        (w, h),
        model_name,
    );
    info.negative_prompt = c.negative_prompt.clone().unwrap_or_default();
    info.clip_skip = c.clip_skip;
    info.guidance_rescale = req.guidance_rescale;
    info.denoising_strength = img2img.map(|(_, strength)| strength);
    info.refiner = refiner_note;
    info.lora_hashes = lora_hashes(&tag_loras);
    info.ti_hashes = sd_pipeline::ti_hashes(&embeddings)?;
    if let ModelSource::File(p) = &model {
        info.model_hash = Some(sd_pipeline::prompt_loras::sha256_hex(p)?[..10].to_owned());
    }
    let n = images.len();
    let keep: Vec<usize> = match c.batch_pos {
        Some(p) => vec![p.min(n.saturating_sub(1))],
        None => (0..n).collect(),
    };
    for (i, path) in keep.into_iter().zip(&outputs) {
        info.batch = (n > 1).then_some((n, i));
        output::write_png(path, &images[i], &info.to_string(), c.overwrite)?;
        println!("{}", path.display());
    }
    Ok(())
}

/// `PATH[:WEIGHT]`: the weight is what follows the last `:` when it is a number.
fn parse_lora(spec: &str) -> Result<(std::sync::Arc<LoraFile>, f64)> {
    let (path, weight) = match spec.rsplit_once(':') {
        Some((p, w)) if !p.is_empty() => match w.parse::<f64>() {
            Ok(w) if w.is_finite() => (p, w),
            Ok(_) => bail!("--lora {spec}: the weight must be a finite number"),
            Err(_) => (spec, 1.0),
        },
        _ => (spec, 1.0),
    };
    let file = LoraFile::open(Path::new(path)).with_context(|| format!("--lora {spec}"))?;
    Ok((std::sync::Arc::new(file), weight))
}

/// `PATH[:TOKEN]`: an existing file as a whole, else the part after the last `:` is the token.
fn parse_embedding(spec: &str) -> Result<std::sync::Arc<EmbeddingFile>> {
    let (path, token) = match spec.rsplit_once(':') {
        Some((p, t)) if !Path::new(spec).is_file() && !p.is_empty() && !t.is_empty() => {
            (p, Some(t))
        }
        _ => (spec, None),
    };
    let file = EmbeddingFile::open(Path::new(path), token)
        .with_context(|| format!("--embedding {spec}"))?;
    Ok(std::sync::Arc::new(file))
}

/// What --model / --refiner name.
enum ModelSource {
    /// A diffusers folder (local, or a hub snapshot).
    Folder(PathBuf),
    /// A single-file checkpoint.
    File(PathBuf),
}

impl ModelSource {
    fn resolve(m: &str, variant: Option<&str>, hub: &HubConfig) -> Result<Self> {
        let p = Path::new(m);
        if p.is_file() {
            return Ok(Self::File(p.to_path_buf()));
        }
        let ext = p
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        if matches!(
            ext.as_deref(),
            Some("safetensors" | "ckpt" | "pt" | "pth" | "bin")
        ) {
            bail!("{m}: no such checkpoint file");
        }
        Ok(Self::Folder(resolve_model(m, variant, hub)?))
    }

    /// Loads the model (as the SDXL refiner of `base` when given).
    fn load(
        &self,
        opts: &LoadOptions,
        sf: &SingleFileOptions,
        base: Option<&StableDiffusion>,
    ) -> Result<StableDiffusion> {
        match self {
            Self::Folder(dir) => {
                let mut sd = match base {
                    None => StableDiffusion::load(dir, opts),
                    Some(b) => StableDiffusion::load_refiner(dir, b, opts),
                }
                .with_context(|| format!("loading {}", dir.display()))?;
                if sf.prediction_type.is_some() {
                    sd.set_prediction_type(sf.prediction_type);
                }
                Ok(sd)
            }
            Self::File(file) => match base {
                None => StableDiffusion::load_single_file(file, opts, sf),
                Some(b) => StableDiffusion::load_single_file_refiner(file, b, opts, sf),
            }
            .with_context(|| format!("loading {}", file.display())),
        }
    }
}

/// diffusers' call defaults: 50 steps; guidance 7.5 (SD) or 5.0 (SDXL).
fn default_settings(sd: &StableDiffusion) -> demo::Defaults {
    match sd.family {
        sd_pipeline::ModelFamily::Sd => demo::Defaults {
            steps: 50,
            guidance: 7.5,
        },
        _ => demo::Defaults {
            steps: 50,
            guidance: 5.0,
        },
    }
}

fn random_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    (t as u64 ^ (std::process::id() as u64).rotate_left(32)) % (1 << 32)
}

/// The `latents` tensor of a safetensors file, read through sd-core's checked loader (offsets
/// and sizes are checked against the file before anything is allocated).
fn read_latents(path: &Path, device: &Device) -> Result<Tensor> {
    let files = sd_pipeline::core::weights::WeightFiles::open(&[path.to_path_buf()])
        .with_context(|| format!("reading --init-latents {}", path.display()))?;
    if files.shape("latents").is_none() {
        bail!("{}: no tensor named `latents`", path.display());
    }
    let t = files
        .load("latents", DType::F32, device)
        .with_context(|| format!("reading --init-latents {}", path.display()))?;
    if t.rank() != 4 {
        bail!(
            "{}: `latents` has shape {:?}, expected [N, C, H/8, W/8]",
            path.display(),
            t.dims()
        );
    }
    Ok(t)
}
