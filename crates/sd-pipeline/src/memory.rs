//! The memory pre-check: before loading and before generating, an estimate of the memory the
//! work needs, compared with what the machine (or the cgroup the process runs in) has left, so
//! that a run too large fails at once with an error saying what to change, instead of being
//! killed by the OOM killer halfway.
//!
//! - Loading needs the weights at the dtype they are held in (sizes from the safetensors
//!   headers, no tensor read): the UNet's and text encoders' at the load dtype, the VAE's in
//!   f32 when f16 is upcast (`force_upcast`). The files are memory-mapped, and their pages are
//!   page cache the kernel can drop: they are not counted as needed.
//! - Generating needs, on top of the loaded weights, the largest of the UNet step (skip
//!   connections of the down path, a block's working maps at the first level, the transformer's
//!   feed-forward and attention) and the VAE decode (the decoder's largest map at full
//!   resolution, or at the tile size when the decode is tiled, plus the image).
//!
//! The coefficients come from measured peaks (VmHWM) on the demo model and the fixtures; how
//! close the estimate is, is in docs/reliability.md. Available memory is `MemAvailable` from
//! `/proc/meminfo`, or less when a cgroup v2 `memory.max` leaves less (its `memory.current`
//! minus the reclaimable `inactive_file` of `memory.stat`, as the kubelet counts a working
//! set). Where neither can be read (not Linux), the check passes.

use std::path::Path;

use candle_core::DType;
use sd_core::weights::{resolve_weight_files, WeightFiles};
use sd_core::{Error, LoadOptions, Result};
use sd_unet::UNetConfig;
use sd_vae::tiling::Tiling;
use sd_vae::VaeConfig;

use crate::model_index::ModelIndex;
use crate::request::{GenerateRequest, Init, OutputType, PromptEmbeds};
use crate::StableDiffusion;

const MIB: u64 = 1 << 20;

/// Memory the process has besides weights and activations (code, allocator, thread pools'
/// scratch, tokenizer tables): the measured peak of the demo model at 128x128 less its
/// estimated weights and working set, rounded up.
pub const BASE_BYTES: u64 = 64 * MIB;

/// Working maps of one UNet block at its level, in units of that level's feature map
/// (`batch x channels x h x w`): a ResNet's input, norm, activation and conv outputs and the
/// concatenated skip input of the up path; the transformer's GEGLU feed-forward (8x channels out
/// of its first projection, 4x after the gate) dominates.
const UNET_BLOCK_MAPS: u64 = 16;
/// Working maps of one VAE decoder block at full resolution, in units of its largest map (the
/// demo model's decode grows by 4.6 such maps per image area; docs/reliability.md).
const VAE_BLOCK_MAPS: u64 = 5;
/// The blocked attention's scores are per block of query rows (a few MiB); the chunked path
/// (f16, and devices other than the CPU) keeps up to this many bytes of scores, twice (the
/// scores and their softmax).
const SCORE_CHUNK_BYTES: u64 = 256 * MIB;

/// One part of an estimate.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    /// What it is (`unet weights (f32)`, `vae decode at 1024x1024`...).
    pub what: String,
    /// Bytes.
    pub bytes: u64,
}

/// An estimate of the memory a step (loading, generating) needs beyond what the process holds.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MemoryEstimate {
    /// The parts; the need is their sum.
    pub parts: Vec<Part>,
}

impl MemoryEstimate {
    /// The bytes needed.
    pub fn bytes(&self) -> u64 {
        self.parts
            .iter()
            .fold(0u64, |a, p| a.saturating_add(p.bytes))
    }

    fn push(&mut self, what: impl Into<String>, bytes: u64) {
        self.parts.push(Part {
            what: what.into(),
            bytes,
        });
    }
}

/// What the machine has left, and where the number comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct Available {
    /// Bytes the process can still use.
    pub bytes: u64,
    /// `MemAvailable` or the cgroup limit, for the error message.
    pub source: String,
}

/// The memory available now: `MemAvailable`, or the cgroup v2 limit's headroom if lower. `None`
/// where neither can be read.
pub fn available() -> Option<Available> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let cgroup = read("/proc/self/cgroup")
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("0::").map(|p| p.trim().to_owned()))
        })
        .map(|p| format!("/sys/fs/cgroup{}", if p == "/" { "" } else { &p }));
    let cg = |f: &str| cgroup.as_ref().and_then(|d| read(&format!("{d}/{f}")));
    available_from(
        read("/proc/meminfo").as_deref(),
        cg("memory.max").as_deref(),
        cg("memory.current").as_deref(),
        cg("memory.stat").as_deref(),
    )
}

/// [`available`] from the files' texts (tests pass their own): `/proc/meminfo`, and the
/// cgroup's `memory.max`, `memory.current` and `memory.stat`.
pub fn available_from(
    meminfo: Option<&str>,
    cgroup_max: Option<&str>,
    cgroup_current: Option<&str>,
    cgroup_stat: Option<&str>,
) -> Option<Available> {
    let mem = meminfo.and_then(|m| {
        m.lines().find_map(|l| {
            let kb = l.strip_prefix("MemAvailable:")?.trim().strip_suffix("kB")?;
            kb.trim()
                .parse::<u64>()
                .ok()
                .map(|k| k.saturating_mul(1024))
        })
    });
    let cg = (|| {
        let max = cgroup_max?.trim().parse::<u64>().ok()?; // "max" (no limit) does not parse
        let current = cgroup_current?.trim().parse::<u64>().ok()?;
        let inactive_file = cgroup_stat
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("inactive_file ")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
            })
            .unwrap_or(0);
        Some(max.saturating_sub(current.saturating_sub(inactive_file)))
    })();
    match (mem, cg) {
        (Some(m), Some(c)) if c < m => Some(Available {
            bytes: c,
            source: "the cgroup's memory.max less its memory in use".into(),
        }),
        (Some(m), _) => Some(Available {
            bytes: m,
            source: "MemAvailable in /proc/meminfo".into(),
        }),
        (None, Some(c)) => Some(Available {
            bytes: c,
            source: "the cgroup's memory.max less its memory in use".into(),
        }),
        (None, None) => None,
    }
}

fn dtype_bytes(d: DType) -> u64 {
    d.size_in_bytes() as u64
}

/// The dtype a VAE computes in: f16 with `force_upcast` is f32, as [`sd_vae::AutoencoderKL`].
fn vae_dtype(load: DType, force_upcast: bool) -> DType {
    if load == DType::F16 && force_upcast {
        DType::F32
    } else {
        load
    }
}

/// Bytes of the tensors of one component folder's weights at `dtype`, from the headers.
fn component_weights(dir: &Path, stem: &str, variant: Option<&str>, dtype: DType) -> Result<u64> {
    let (paths, _) = resolve_weight_files(dir, stem, variant)?;
    let files = WeightFiles::open(&paths)?;
    let mut n: u64 = 0;
    for name in files.names() {
        let numel = files
            .shape(name)
            .map(|s| s.iter().map(|&d| d as u64).product::<u64>())
            .unwrap_or(0);
        n = n.saturating_add(numel.saturating_mul(dtype_bytes(dtype)));
    }
    Ok(n)
}

/// The memory loading the diffusers folder `dir` with `opts` needs: each component's weights at
/// the dtype it is held in, plus [`BASE_BYTES`]. Reads only `model_index.json`, the VAE config
/// and the safetensors headers.
pub fn estimate_load(dir: &Path, opts: &LoadOptions) -> Result<MemoryEstimate> {
    let index = ModelIndex::read(dir)?;
    let mut est = MemoryEstimate::default();
    est.push("runtime", BASE_BYTES);
    let variant = opts.variant.as_deref();
    for (name, stem) in [
        ("text_encoder", "model"),
        ("text_encoder_2", "model"),
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
    ] {
        if !index.has(name) {
            continue;
        }
        let cdir = dir.join(name);
        let dtype = if name == "vae" {
            let cfg = VaeConfig::from_file(&cdir.join("config.json"))?;
            vae_dtype(opts.dtype, cfg.force_upcast)
        } else {
            opts.dtype
        };
        let bytes = component_weights(&cdir, stem, variant, dtype)?;
        est.push(format!("{name} weights ({dtype:?})"), bytes);
    }
    Ok(est)
}

/// The shapes a generation works on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerateShape {
    /// Images made (prompts x images per prompt).
    pub images: usize,
    /// Whether classifier-free guidance doubles the UNet batch.
    pub guidance: bool,
    /// Image height and width in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// Whether the images are decoded (not latents only).
    pub decode: bool,
    /// Whether an init image is encoded (image-to-image).
    pub encode: bool,
}

/// The memory one generation needs beyond the loaded weights: the larger of the UNet step and
/// the VAE decode (or encode), which never run at the same time, plus the latents.
///
/// `unet_dtype` is the UNet's, `vae` the VAE config with its compute dtype and tiling, `cpu`
/// whether attention takes the blocked CPU path (f32/bf16 on the CPU) or the chunked one.
pub fn estimate_generate(
    unet: &UNetConfig,
    unet_dtype: DType,
    vae: &VaeConfig,
    vae_dtype: DType,
    tiling: Tiling,
    cpu: bool,
    s: &GenerateShape,
) -> MemoryEstimate {
    let mut est = MemoryEstimate::default();
    // In f64: no product of absurd sizes can overflow (the result saturates when converted).
    let f = vae.scale_factor().max(1) as u64;
    let (hh, ww) = (s.height as u64, s.width as u64);
    let (lh, lw) = (hh / f, ww / f);
    let n = s.images.max(1) as f64;
    let batch = if s.guidance { 2.0 * n } else { n };

    // UNet: the skip connections kept for the up path (conv_in's output, each layer's, each
    // downsampler's), the working maps of the largest block, the attention scores.
    let ub = dtype_bytes(unet_dtype) as f64;
    let levels = unet.down_blocks.len().max(1);
    let mut res = vec![(lh, lw)];
    for k in 1..levels {
        let (h, w) = res[k - 1];
        res.push((h.div_ceil(2), w.div_ceil(2)));
    }
    let area = |k: usize| res.get(k).map_or(0.0, |&(h, w)| h as f64 * w as f64);
    let maps = UNET_BLOCK_MAPS as f64;
    let mut skips = unet.block_out_channels.first().map_or(0.0, |&c| c as f64) * area(0);
    let mut block: f64 = 0.0;
    let mut attention: f64 = 0.0;
    for (k, b) in unet.down_blocks.iter().enumerate() {
        let map = b.out_channels as f64 * area(k);
        skips += map * b.num_layers as f64;
        if b.add_downsample {
            skips += b.out_channels as f64 * area(k + 1);
        }
        block = block.max(maps * map + b.in_channels as f64 * area(k));
        if let Some(t) = &b.transformer {
            attention = attention.max(score_bytes(batch, t.num_heads as f64, area(k), cpu));
        }
    }
    for (j, b) in unet.up_blocks.iter().enumerate() {
        let k = levels.saturating_sub(1 + j);
        let concat =
            (b.prev_output_channels.max(b.out_channels) as f64 + b.in_channels as f64) * area(k);
        block = block.max(maps * b.out_channels as f64 * area(k) + concat);
        if let Some(t) = &b.transformer {
            attention = attention.max(score_bytes(batch, t.num_heads as f64, area(k), cpu));
        }
    }
    let unet_bytes = batch * (skips + block) * ub + attention;

    // VAE: the decoder's largest map (an up block's output, before and after its upsampler) at
    // the size decoded at once (the whole image, or one tile), its mid-block attention, and the
    // image in the VAE dtype and in f32 (twice more while tiles are stitched).
    let vb = dtype_bytes(vae_dtype) as f64;
    let tile = tile_pixels(tiling, s.height, s.width, lh, lw);
    let (dh, dw) = match tile {
        Some(t) => (t.min(hh), t.min(ww)),
        None => (hh, ww),
    };
    let rev: Vec<f64> = vae
        .block_out_channels
        .iter()
        .rev()
        .map(|&c| c as f64)
        .collect();
    let mut largest: f64 = 0.0;
    for (i, c) in rev.iter().enumerate() {
        // Up block i works at 1 / 2^(levels - 1 - i) of full size; all but the last end with an
        // upsampler, whose output has the block's channels at the next size.
        let down = (rev.len() as u64).saturating_sub(1 + i as u64).min(63);
        let up = if i + 1 < rev.len() {
            down.saturating_sub(1)
        } else {
            down
        };
        let at = |d: u64| (dh >> d) as f64 * (dw >> d) as f64;
        largest = largest.max(c * at(down)).max(c * at(up));
    }
    let image = n * 3.0 * hh as f64 * ww as f64 * 4.0;
    let vae_bytes = if s.decode || s.encode {
        let stitched = if tile.is_some() { 2.0 * image } else { 0.0 };
        let mid_tokens = (dh / f) as f64 * (dw / f) as f64;
        n * VAE_BLOCK_MAPS as f64 * largest * vb
            + score_bytes(n, 1.0, mid_tokens, cpu)
            + 2.0 * image
            + stitched
    } else {
        0.0
    };

    // The UNet step and the VAE never run at once: the larger counts.
    if vae_bytes > unet_bytes {
        let how = match tile {
            Some(t) => format!("in {t}x{t} tiles"),
            None => "untiled".into(),
        };
        let step = if s.decode { "decode" } else { "encode" };
        est.push(
            format!("vae {step} ({n} x {hh}x{ww} {how}, {vae_dtype:?})"),
            vae_bytes as u64,
        );
    } else {
        est.push(
            format!("unet step ({batch} x {lh}x{lw} latents, {unet_dtype:?})"),
            unet_bytes as u64,
        );
    }
    // Latents, noise, the prediction and its guidance halves, in f32.
    let latents = batch * unet.in_channels as f64 * lh as f64 * lw as f64 * 4.0 * 4.0;
    est.push("latents", latents as u64);
    est
}

/// Attention scores held at once for `batch x heads` slices of `tokens x tokens`.
fn score_bytes(batch: f64, heads: f64, tokens: f64, cpu_blocked: bool) -> f64 {
    if cpu_blocked {
        // Scores per block of query rows per thread: small against the maps.
        return 0.0;
    }
    let all = batch * heads * tokens * tokens * 4.0;
    2.0 * all.min((SCORE_CHUNK_BYTES as f64).max(tokens * 4.0))
}

/// The tile size in pixels when the decode of an `height x width` image is tiled (the VAE's
/// own decision, [`Tiling::tiles_for`], on latents of `lh x lw`).
fn tile_pixels(tiling: Tiling, height: usize, width: usize, lh: u64, lw: u64) -> Option<u64> {
    let (lh, lw) = (usize::try_from(lh).ok()?, usize::try_from(lw).ok()?);
    tiling
        .tiles_for(height, width, lh, lw, |t| t.latent_size)
        .map(|t| t.sample_size as u64)
}

/// The shapes of `req` at `size` (height, width).
pub fn generate_shape(req: &GenerateRequest, size: (usize, usize)) -> GenerateShape {
    let prompts = match &req.prompt_embeds {
        Some(PromptEmbeds { prompt_embeds, .. }) => prompt_embeds.dim(0).unwrap_or(1),
        None => req.prompts.len(),
    };
    GenerateShape {
        images: prompts
            .max(1)
            .saturating_mul(req.num_images_per_prompt.max(1)),
        guidance: req.guidance_scale > 1.0,
        height: size.0,
        width: size.1,
        decode: req.output == OutputType::Image,
        encode: matches!(req.init, Init::Image { .. }),
    }
}

/// [`estimate_generate`] for a loaded model.
pub fn estimate_for(
    sd: &StableDiffusion,
    req: &GenerateRequest,
    size: (usize, usize),
) -> MemoryEstimate {
    let cpu = sd.vae.device().is_cpu();
    let blocked = |d: DType| cpu && d != DType::F16;
    let udt = sd.unet.dtype();
    // One flag for both models: the chunked scores are counted when either computes in f16.
    estimate_generate(
        sd.unet.config(),
        udt,
        sd.vae.config(),
        sd.vae.dtype(),
        sd.vae.tiling(),
        blocked(udt) && blocked(sd.vae.dtype()),
        &generate_shape(req, size),
    )
}

/// `Ok` when `need` fits in `available`; otherwise an error saying how much is needed, how much
/// is available and what to change. `what` names the step ("loading models/x", "generating").
pub fn check(what: &str, need: &MemoryEstimate, available: &Available) -> Result<()> {
    let bytes = need.bytes();
    if bytes <= available.bytes {
        return Ok(());
    }
    let gib = |b: u64| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64);
    let parts: Vec<String> = need
        .parts
        .iter()
        .map(|p| format!("{} {}", p.what, gib(p.bytes)))
        .collect();
    Err(Error::invalid_argument(
        "memory",
        format!(
            "{what}, which needs about {} ({}), with {} available ({})",
            gib(bytes),
            parts.join(", "),
            gib(available.bytes),
            available.source
        ),
        "a run that fits: load in bf16 (--dtype bf16, half of f32), make the image smaller \
         (--width/--height) or fewer images (--num-images), decode in tiles (--vae-tiling); or \
         skip this check (--no-memory-check, `GenerateRequest::memory_check = false`) if the \
         estimate is wrong for this machine",
    ))
}

/// Checks loading `dir` with `opts` against the memory available now (passes where it cannot be
/// read, and for devices other than the CPU).
pub fn check_load(dir: &Path, opts: &LoadOptions) -> Result<()> {
    // Weights on a GPU are in its memory, which this does not read.
    if !opts.device.is_cpu() {
        return Ok(());
    }
    let Some(avail) = available() else {
        return Ok(());
    };
    let need = estimate_load(dir, opts)?;
    log::debug!(
        "memory: loading {} needs ~{} bytes of {}",
        dir.display(),
        need.bytes(),
        avail.bytes
    );
    check(&format!("loading {}", dir.display()), &need, &avail)
}

/// Checks a generation of `req` at `size` against the memory available now (the loaded weights
/// are already in use, so only the generation's own need is compared).
pub(crate) fn check_generate(
    sd: &StableDiffusion,
    req: &GenerateRequest,
    size: (usize, usize),
) -> Result<()> {
    if !sd.vae.device().is_cpu() {
        return Ok(());
    }
    // Counts and sizes past what the pipeline accepts at all are refused by its own checks,
    // which name the field (`num_images_per_prompt`, the noise shape).
    let images = generate_shape(req, size).images;
    let elements = size
        .0
        .checked_mul(size.1)
        .and_then(|a| a.checked_mul(images))
        .and_then(|a| a.checked_mul(64));
    if images > crate::MAX_BATCH || elements.is_none() {
        return Ok(());
    }
    let Some(avail) = available() else {
        return Ok(());
    };
    let need = estimate_for(sd, req, size);
    check(
        &format!("generating {images} image(s) of {}x{}", size.1, size.0),
        &need,
        &avail,
    )
}
