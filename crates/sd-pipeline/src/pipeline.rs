//! [`StableDiffusion`]: a loaded model folder, and the generation steps of diffusers'
//! `StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline`, `StableDiffusionXLPipeline`
//! and `StableDiffusionXLImg2ImgPipeline`, each a public method.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use sd_clip::prompt_syntax::{prompt_schedule, A1111Prompt, ScheduledPrompt};
use sd_clip::{ClipTextModel, ClipTokenizer, PromptEncoder, PromptSyntax};
use sd_core::{Error, LoadOptions, NoiseSource, Result};
use sd_schedulers::{PredictionType, Scheduler, SchedulerKind};
use sd_unet::{AddedCond, UNet2DConditionModel};
use sd_vae::AutoencoderKL;

use crate::model_index::{ModelFamily, ModelIndex};
use crate::request::{Flow, GenerateRequest, Init, OutputType, StepInfo, MAX_BATCH};
use crate::single_file::{self, ComponentSource, Weights};
use sd_formats::LoraFile;

/// A loaded diffusers model folder: text conditioning, UNet, VAE and scheduler config.
/// Components are held in `Arc`s so pipelines can share them (the SDXL refiner shares the
/// base's `text_encoder_2` and VAE).
#[derive(Clone)]
pub struct StableDiffusion {
    /// Which family the folder holds.
    pub family: ModelFamily,
    /// Tokenizers and text encoders, as the family uses them.
    pub text: Arc<PromptEncoder>,
    /// The denoiser.
    pub unet: Arc<UNet2DConditionModel>,
    /// The autoencoder.
    pub vae: Arc<AutoencoderKL>,
    /// `model_index.json`.
    pub index: ModelIndex,
    scheduler_config: PathBuf,
    /// Overrides the scheduler config's `prediction_type` (single-file SD 2.x checkpoints).
    prediction_type: Option<PredictionType>,
    /// The base weights of the UNet and text encoders, kept memory-mapped so that LoRAs can be
    /// applied and removed without reading the files again.
    pub(crate) sources: Arc<Sources>,
    /// The LoRAs applied (file, strength), in order.
    pub(crate) loras: Vec<(Arc<LoraFile>, f64)>,
    /// The textual-inversion embeddings added, in order.
    pub(crate) embeddings: Vec<Arc<sd_formats::EmbeddingFile>>,
    /// `text` without the embeddings (LoRA changes rebuild from it).
    pub(crate) text_plain: Arc<PromptEncoder>,
    device: Device,
}

/// The base weights of the components LoRAs can change.
#[derive(Debug, Default)]
pub(crate) struct Sources {
    /// The UNet's.
    pub unet: Option<ComponentSource>,
    /// The text encoders this model loaded (not those shared from a base), by component name.
    pub text: std::collections::BTreeMap<String, ComponentSource>,
}

impl std::fmt::Debug for StableDiffusion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StableDiffusion")
            .field("family", &self.family)
            .field("index", &self.index.path)
            .finish()
    }
}

/// The final images or latents of a run.
#[derive(Debug)]
pub struct Output {
    /// Final latents `[N, C, h, w]` (always returned).
    pub latents: Tensor,
    /// Decoded images `[N, 3, H, W]` in [0, 1] (f32), unless latents were asked for.
    pub images: Option<Tensor>,
    /// True when the step callback stopped the run early.
    pub interrupted: bool,
}

/// Text conditioning ready for the UNet: classifier-free-guidance batch already built
/// (`[negative; positive]` when guidance is on) and repeated per image.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// `[N or 2N, 77, D]`.
    pub hidden: Tensor,
    /// SDXL: `[N or 2N, P]`.
    pub pooled: Option<Tensor>,
    /// Tokens dropped by truncation, per prompt (the pipeline logs a warning).
    pub dropped_tokens: Vec<usize>,
    /// AUTOMATIC1111 prompt editing and alternation: the conditioning per range of steps (empty
    /// when it never changes; then `hidden` and `pooled` apply to every step, otherwise they
    /// are the first entry's). See [`Conditioning::at_step`].
    pub schedule: Vec<ScheduledConditioning>,
}

/// The conditioning used up to and including step `end_at_step` (0-based model evaluations of
/// a run, as A1111's `reconstruct_cond_batch` compares its step counter with a schedule's
/// `end_at_step`), with the same batch layout as [`Conditioning::hidden`].
#[derive(Debug, Clone)]
pub struct ScheduledConditioning {
    /// The last step this entry applies to.
    pub end_at_step: usize,
    /// `[N or 2N, 77 * chunks, D]`.
    pub hidden: Tensor,
    /// SDXL: `[N or 2N, P]`.
    pub pooled: Option<Tensor>,
}

impl Conditioning {
    /// The hidden states and pooled embeddings for the model evaluation `step` (0-based): the
    /// first schedule entry with `end_at_step >= step`, as A1111 picks it; past the last entry
    /// (second-order schedulers evaluate the model more often than `steps`) the last one.
    pub fn at_step(&self, step: usize) -> (&Tensor, Option<&Tensor>) {
        match self
            .schedule
            .iter()
            .find(|e| step <= e.end_at_step)
            .or(self.schedule.last())
        {
            Some(e) => (&e.hidden, e.pooled.as_ref()),
            None => (&self.hidden, self.pooled.as_ref()),
        }
    }
}

fn component(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    if p.is_dir() {
        Ok(p)
    } else {
        Err(Error::io(
            &p,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("component folder `{name}` named by model_index.json is missing"),
            ),
        ))
    }
}

impl StableDiffusion {
    /// Loads every component of the diffusers folder `dir`.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        Self::load_sharing(dir, opts, None)
    }

    /// Loads the folder `dir`, taking `text_encoder_2` and the VAE from `base` instead of
    /// loading them again (the SDXL refiner of the ensemble of experts, as the diffusers
    /// example passes `text_encoder_2=base.text_encoder_2, vae=base.vae`).
    pub fn load_refiner(dir: &Path, base: &StableDiffusion, opts: &LoadOptions) -> Result<Self> {
        Self::load_sharing(dir, opts, Some(base))
    }

    fn load_sharing(
        dir: &Path,
        opts: &LoadOptions,
        base: Option<&StableDiffusion>,
    ) -> Result<Self> {
        Self::load_from(dir, &Weights::Folder, opts, base)
    }

    /// Loads a model whose configs, tokenizers and scheduler config are in the diffusers folder
    /// `dir` and whose weights come from `weights` (that folder, or a single-file checkpoint).
    pub(crate) fn load_from(
        dir: &Path,
        weights: &Weights<'_>,
        opts: &LoadOptions,
        base: Option<&StableDiffusion>,
    ) -> Result<Self> {
        let index = ModelIndex::read(dir)?;
        let family = index.family()?;
        for required in ["unet", "vae", "scheduler"] {
            if !index.has(required) {
                return Err(Error::config(
                    &index.path,
                    Some(required),
                    "missing: sd-rs needs unet, vae, scheduler and the text encoder(s)",
                ));
            }
        }
        let sources = std::cell::RefCell::new(Sources::default());
        let load_te = |name: &str| -> Result<Arc<ClipTextModel>> {
            let cdir = component(dir, name)?;
            let (source, model) = single_file::text_encoder(weights, &cdir, name, opts)?;
            sources.borrow_mut().text.insert(name.to_owned(), source);
            Ok(Arc::new(model))
        };
        let load_tok = |name: &str| -> Result<Arc<ClipTokenizer>> {
            Ok(Arc::new(ClipTokenizer::from_folder(&component(
                dir, name,
            )?)?))
        };
        let shared_te2 = base.and_then(|b| text_encoder_2(&b.text));
        let te2 = |name: &str| -> Result<Arc<ClipTextModel>> {
            match &shared_te2 {
                Some(te) => Ok(te.clone()),
                None => load_te(name),
            }
        };
        let text = match family {
            ModelFamily::Sd => PromptEncoder::sd(load_tok("tokenizer")?, load_te("text_encoder")?)?,
            ModelFamily::Sdxl => PromptEncoder::sdxl(
                load_tok("tokenizer")?,
                load_te("text_encoder")?,
                load_tok("tokenizer_2")?,
                te2("text_encoder_2")?,
            )?,
            ModelFamily::SdxlRefiner => {
                PromptEncoder::refiner(load_tok("tokenizer_2")?, te2("text_encoder_2")?)?
            }
        };
        let (unet_source, unet) = single_file::unet(weights, &component(dir, "unet")?, opts)?;
        let unet = Arc::new(unet);
        let mut sources = sources.into_inner();
        sources.unet = Some(unet_source);
        let vae = match base {
            Some(b) => b.vae.clone(),
            None => {
                let vae_dir = component(dir, "vae")?;
                Arc::new(match weights {
                    Weights::Folder => AutoencoderKL::load(&vae_dir, opts)?,
                    Weights::SingleFile(ck) => single_file::vae(ck, &vae_dir, opts)?,
                })
            }
        };
        let scheduler_config = component(dir, "scheduler")?.join("scheduler_config.json");
        let text = Arc::new(text);
        let sd = Self {
            family,
            text_plain: text.clone(),
            text,
            unet,
            vae,
            index,
            scheduler_config,
            prediction_type: None,
            sources: Arc::new(sources),
            loras: Vec::new(),
            embeddings: Vec::new(),
            device: opts.device.clone(),
        };
        sd.check_consistency()?;
        Ok(sd)
    }

    /// Components must agree: the text width the UNet attends to, latent channels.
    fn check_consistency(&self) -> Result<()> {
        let ucfg = self.unet.config();
        let text_dim = text_width(&self.text);
        if ucfg.cross_attention_dim != text_dim {
            return Err(Error::config(
                self.index.path.with_file_name("unet/config.json"),
                Some("cross_attention_dim"),
                format!(
                    "is {}, but the text encoder(s) produce {text_dim}-wide embeddings",
                    ucfg.cross_attention_dim
                ),
            ));
        }
        let lc = self.vae.config().latent_channels;
        if ucfg.in_channels != lc {
            return Err(Error::config(
                self.index.path.with_file_name("unet/config.json"),
                Some("in_channels"),
                format!(
                    "is {}, but the VAE has {lc} latent channels",
                    ucfg.in_channels
                ),
            ));
        }
        Ok(())
    }

    /// A fresh scheduler: the model's own (`scheduler/scheduler_config.json`), or `kind` built
    /// from the same config as diffusers' `from_config`.
    pub fn scheduler(&self, kind: Option<SchedulerKind>) -> Result<Box<dyn Scheduler>> {
        match self.prediction_type {
            None => sd_schedulers::from_config_file(&self.scheduler_config, kind),
            Some(p) => {
                let json = self.scheduler_json(p)?;
                sd_schedulers::from_config_json(&json, &self.scheduler_config, kind)
            }
        }
    }

    /// The model's prediction type: the override, or the scheduler config's.
    pub fn prediction_type(&self) -> Result<PredictionType> {
        match self.prediction_type {
            Some(p) => Ok(p),
            None => {
                let json = std::fs::read_to_string(&self.scheduler_config)
                    .map_err(|e| Error::io(&self.scheduler_config, e))?;
                Ok(
                    sd_schedulers::resolve_config_json(&json, &self.scheduler_config, None)?
                        .prediction_type,
                )
            }
        }
    }

    /// Sets the prediction type every scheduler of this model is built with, overriding the
    /// scheduler config's `prediction_type` (`None` restores the config's).
    pub fn set_prediction_type(&mut self, p: Option<PredictionType>) {
        self.prediction_type = p;
    }

    fn scheduler_json(&self, p: PredictionType) -> Result<String> {
        let path = &self.scheduler_config;
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut v: serde_json::Value = sd_core::config::parse_json(&text, path)?;
        if let Some(obj) = v.as_object_mut() {
            obj.insert("prediction_type".to_owned(), p.as_str().into());
        }
        Ok(v.to_string())
    }

    /// The kind of the model's own scheduler (`scheduler/scheduler_config.json`'s `_class_name`):
    /// what [`StableDiffusion::scheduler`] builds without a kind, and what an infotext names.
    pub fn scheduler_kind(&self) -> Result<SchedulerKind> {
        let path = &self.scheduler_config;
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Ok(sd_schedulers::resolve_config_json(&text, path, None)?.kind)
    }

    /// The image size the model was trained at: the UNet's `sample_size` times the VAE factor
    /// (height, width); what [`StableDiffusion::resolve_size`] uses without a size.
    pub fn native_size(&self) -> (usize, usize) {
        let f = self.vae_scale_factor();
        let (h, w) = self.unet.config().sample_size.unwrap_or((64, 64));
        (h * f, w * f)
    }

    /// The dtype the model computes in (the UNet's).
    pub fn dtype(&self) -> DType {
        self.unet.dtype()
    }

    /// Pixels per latent (8 for every SD family).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.scale_factor()
    }

    /// Step 1: prompts to conditioning, as diffusers' `encode_prompt` (negative prompts, the
    /// SDXL zero negatives, classifier-free-guidance batch, `num_images_per_prompt`).
    /// A1111 prompt editing and alternation are scheduled over `req.steps` model evaluations;
    /// see [`StableDiffusion::encode_prompt_scheduled`] for second-order schedulers.
    pub fn encode_prompt(&self, req: &GenerateRequest) -> Result<Conditioning> {
        self.encode_prompt_scheduled(req, req.steps)
    }

    /// [`StableDiffusion::encode_prompt`] with A1111 prompt editing and alternation scheduled
    /// over `evaluations` model evaluations: A1111 counts `2 * steps - 1` for its second-order
    /// samplers (Heun), the length of diffusers' Heun timesteps; `generate` passes that.
    pub fn encode_prompt_scheduled(
        &self,
        req: &GenerateRequest,
        evaluations: usize,
    ) -> Result<Conditioning> {
        let cfg = req.guidance_scale > 1.0;
        let sdxl = self.family != ModelFamily::Sd;
        let n = req.num_images_per_prompt;
        let prompts = match &req.prompt_embeds {
            Some(e) => e.prompt_embeds.dim(0)?,
            None => req.prompts.len(),
        };
        if n == 0 || prompts.saturating_mul(n) > MAX_BATCH {
            return Err(Error::invalid_argument(
                "num_images_per_prompt",
                n,
                format!("1 or more, with at most {MAX_BATCH} images in all ({prompts} prompts)"),
            ));
        }
        let layers = text_layers(&self.text);
        if let Some(k) = req.clip_skip.filter(|&k| k > layers) {
            return Err(Error::invalid_argument(
                "clip_skip",
                k,
                format!("at most {layers}, the text encoder's number of layers"),
            ));
        }
        let (parts, dropped) = match &req.prompt_embeds {
            Some(e) => {
                let b = e.prompt_embeds.dim(0)?;
                let (mut neg, mut neg_pooled) = (
                    e.negative_prompt_embeds.clone(),
                    e.negative_pooled_prompt_embeds.clone(),
                );
                let need_pooled = sdxl && neg_pooled.is_none();
                if cfg && (neg.is_none() || need_pooled) {
                    let (n, np) =
                        self.negatives(req, b, &e.prompt_embeds, e.pooled_prompt_embeds.as_ref())?;
                    neg = neg.or(Some(n));
                    neg_pooled = neg_pooled.or(np);
                }
                let part = (
                    e.prompt_embeds.clone(),
                    e.pooled_prompt_embeds.clone(),
                    neg,
                    neg_pooled,
                );
                (vec![(req.steps, part)], vec![0; b])
            }
            None => {
                if req.prompts.is_empty() {
                    return Err(Error::invalid_argument(
                        "prompts",
                        "none",
                        "at least one prompt",
                    ));
                }
                if req.prompt_syntax == PromptSyntax::A1111 {
                    let parts = self.encode_a1111(req, cfg, evaluations)?;
                    (parts, vec![0; req.prompts.len()])
                } else {
                    req.cancel.check()?;
                    let p = self.text.encode(&req.prompts, req.clip_skip)?;
                    req.cancel.check()?;
                    let (neg, neg_pooled) = if cfg {
                        let (n, np) =
                            self.negatives(req, req.prompts.len(), &p.hidden, p.pooled.as_ref())?;
                        (Some(n), np)
                    } else {
                        (None, None)
                    };
                    let part = (p.hidden, p.pooled, neg, neg_pooled);
                    (vec![(req.steps, part)], p.dropped_tokens)
                }
            }
        };
        for (i, d) in dropped.iter().enumerate() {
            if *d > 0 {
                log::warn!(
                    "prompt {i}: {d} tokens beyond the 77-token limit were dropped (CLIP truncates)"
                );
            }
        }
        let mut schedule = Vec::with_capacity(parts.len());
        for (end_at_step, part) in parts {
            let (hidden, pooled) = self.guidance_batch(part, cfg, n)?;
            schedule.push(ScheduledConditioning {
                end_at_step,
                hidden,
                pooled,
            });
        }
        let first = schedule
            .first()
            .cloned()
            .ok_or_else(|| Error::invalid_argument("prompts", "none", "at least one prompt"))?;
        if schedule.len() == 1 {
            schedule.clear();
        }
        Ok(Conditioning {
            hidden: first.hidden,
            pooled: first.pooled,
            dropped_tokens: dropped,
            schedule,
        })
    }

    /// The classifier-free-guidance batch `[negative; positive]` of one encoding, each prompt
    /// repeated `n` times, in the model's dtype.
    fn guidance_batch(
        &self,
        (pos, pos_pooled, neg, neg_pooled): Encoded,
        cfg: bool,
        n: usize,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let sdxl = self.family != ModelFamily::Sd;
        let rep3 = |t: Tensor| -> Result<Tensor> { Ok(t.repeat_interleave_batch(n)?) };
        let pos = rep3(pos)?;
        let pos_pooled = pos_pooled.map(rep3).transpose()?;
        let (hidden, pooled) = if cfg {
            let neg = neg.ok_or_else(|| {
                Error::invalid_argument(
                    "negative_prompt_embeds",
                    "none",
                    "embeddings when guidance_scale > 1",
                )
            })?;
            let hidden = Tensor::cat(&[rep3(neg)?, pos], 0)?;
            let pooled = match (neg_pooled, pos_pooled) {
                (Some(np), Some(pp)) => Some(Tensor::cat(&[rep3(np)?, pp], 0)?),
                (None, None) => None,
                _ => {
                    return Err(Error::invalid_argument(
                        "pooled_prompt_embeds",
                        "given for only one of prompt / negative prompt",
                        "both or neither",
                    ))
                }
            };
            (hidden, pooled)
        } else {
            (pos, pos_pooled)
        };
        if sdxl && pooled.is_none() {
            return Err(Error::invalid_argument(
                "pooled_prompt_embeds",
                "none",
                "pooled embeddings for SDXL",
            ));
        }
        Ok((hidden.to_dtype(self.dtype())?, pooled))
    }

    /// Negative conditioning for `b` prompts, as diffusers' `encode_prompt`: zeros for SDXL
    /// without a negative prompt when the model asks for it (`force_zeros_for_empty_prompt`),
    /// otherwise the negative prompts (none: `""`; one: for every prompt) encoded without
    /// `clip_skip`.
    fn negatives(
        &self,
        req: &GenerateRequest,
        b: usize,
        like: &Tensor,
        like_pooled: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let sdxl = self.family != ModelFamily::Sd;
        if sdxl && req.negative_prompts.is_empty() && self.index.force_zeros_for_empty_prompt {
            return Ok((
                like.zeros_like()?,
                like_pooled.map(Tensor::zeros_like).transpose()?,
            ));
        }
        let c = self.text.encode(&negative_texts(req, b)?, None)?;
        Ok((c.hidden, c.pooled))
    }

    /// Step 1 with [`PromptSyntax::A1111`], as AUTOMATIC1111 conditions: `<lora:...>` tags taken
    /// out of the prompts (logged unless a LoRA of that name is applied, see
    /// [`crate::prompt_loras`]), `AND` refused; prompt editing and
    /// alternation resolved into one schedule per prompt and negative prompt
    /// (`get_learned_conditioning`); every distinct text of all schedules encoded once, in one
    /// batch so that all get the same number of 77-token chunks; `clip_skip` applies to all;
    /// SDXL without a negative prompt still gets zeros when the model asks for them (A1111 does
    /// the same). Returns one encoding per step at which any schedule changes, as
    /// `reconstruct_cond_batch` would assemble the batch for the steps up to it.
    fn encode_a1111(
        &self,
        req: &GenerateRequest,
        cfg: bool,
        steps: usize,
    ) -> Result<Vec<(usize, Encoded)>> {
        let b = req.prompts.len();
        let mut rows: Vec<Vec<ScheduledPrompt>> = Vec::with_capacity(2 * b);
        for p in &req.prompts {
            let parsed = A1111Prompt::parse(p, steps)?;
            for t in &parsed.extra_networks {
                let applied = matches!(t.lora(), Some(Ok(l)) if self.loras.iter().any(|(f, _)| {
                    f.path().file_stem().is_some_and(|s| s.to_string_lossy() == l.name)
                }));
                if !applied {
                    log::warn!(
                        "<{}:{}> taken out of the prompt, not applied: LoRA tags are loaded by \
                         sd_pipeline::prompt_loras (--lora-dir); other extra networks are not \
                         supported",
                        t.kind,
                        t.args.join(":")
                    );
                }
            }
            rows.push(parsed.schedule);
        }
        let zero_negatives = self.family != ModelFamily::Sd
            && req.negative_prompts.is_empty()
            && self.index.force_zeros_for_empty_prompt;
        if cfg && !zero_negatives {
            // A1111 reads negative prompts with editing but neither AND nor extra networks
            for n in negative_texts(req, b)? {
                rows.push(prompt_schedule(&n, steps)?);
            }
        }
        let mut texts: Vec<String> = Vec::new();
        let rows: Vec<Vec<(usize, u32)>> = rows
            .into_iter()
            .map(|schedule| {
                schedule
                    .into_iter()
                    .map(|e| {
                        let i = match texts.iter().position(|t| *t == e.prompt) {
                            Some(i) => i,
                            None => {
                                texts.push(e.prompt);
                                texts.len() - 1
                            }
                        };
                        (e.end_at_step, i as u32)
                    })
                    .collect()
            })
            .collect();
        let c = self
            .text
            .encode_a1111_with_cancel(&texts, req.clip_skip, &req.cancel)?;
        let ends: std::collections::BTreeSet<usize> =
            rows.iter().flatten().map(|(end, _)| *end).collect();
        let mut parts = Vec::with_capacity(ends.len());
        for end in ends {
            // each row's entry for the steps up to `end`: its first one ending at or after it
            let pick = |range: std::ops::Range<usize>| -> Result<Option<(Tensor, Option<Tensor>)>> {
                let Some(rows) = rows.get(range) else {
                    return Ok(None);
                };
                let ids: Vec<u32> = rows
                    .iter()
                    .filter_map(|r| r.iter().find(|(e, _)| *e >= end).or(r.last()))
                    .map(|(_, i)| *i)
                    .collect();
                let ids = Tensor::new(ids, c.hidden.device())?;
                let pooled = c
                    .pooled
                    .as_ref()
                    .map(|p| p.index_select(&ids, 0))
                    .transpose()?;
                Ok(Some((c.hidden.index_select(&ids, 0)?, pooled)))
            };
            let (pos, pos_pooled) = pick(0..b)?
                .ok_or_else(|| Error::invalid_argument("prompts", "none", "at least one prompt"))?;
            let (neg, neg_pooled) = match (cfg, zero_negatives) {
                (false, _) => (None, None),
                (true, true) => (
                    Some(pos.zeros_like()?),
                    pos_pooled.as_ref().map(Tensor::zeros_like).transpose()?,
                ),
                (true, false) => match pick(b..2 * b)? {
                    Some((n, np)) => (Some(n), np),
                    None => (None, None),
                },
            };
            parts.push((end, (pos, pos_pooled, neg, neg_pooled)));
        }
        Ok(parts)
    }

    /// The image size of a request, validated (multiples of the VAE factor) with UNet defaults.
    pub fn resolve_size(&self, req: &GenerateRequest) -> Result<(usize, usize)> {
        let f = self.vae_scale_factor();
        let default = self.native_size();
        let from_init = match &req.init {
            Init::Image { image, .. } => Some((image.dim(2)?, image.dim(3)?)),
            Init::Latents(l) | Init::Continue { latents: l, .. } => {
                Some((l.dim(2)? * f, l.dim(3)? * f))
            }
            Init::Noise => None,
        };
        let (h, w) = match from_init {
            Some(hw) => hw,
            None => (
                req.height.unwrap_or(default.0),
                req.width.unwrap_or(default.1),
            ),
        };
        for (name, v) in [("height", h), ("width", w)] {
            if v == 0 || !v.is_multiple_of(f) {
                return Err(Error::invalid_argument(
                    name,
                    v,
                    format!("a positive multiple of {f}"),
                ));
            }
        }
        Ok((h, w))
    }

    /// Runs the whole generation: encode the prompts, prepare the latents, denoise, decode.
    /// `noise` supplies every random draw, in diffusers' order (a [`sd_core::TorchGenerator`]
    /// seeded like `torch.Generator("cpu").manual_seed(seed)` reproduces diffusers).
    pub fn generate(
        &self,
        req: &GenerateRequest,
        noise: &mut dyn NoiseSource,
        on_step: &mut dyn FnMut(StepInfo<'_>) -> Flow,
    ) -> Result<Output> {
        let mut scheduler = self.scheduler(req.scheduler)?;
        self.generate_with(req, scheduler.as_mut(), noise, on_step)
    }

    /// [`StableDiffusion::generate`] with a scheduler of the caller's (any implementation of
    /// [`Scheduler`], including one written outside sd-rs); `req.scheduler` is ignored.
    pub fn generate_with(
        &self,
        req: &GenerateRequest,
        scheduler: &mut dyn Scheduler,
        noise: &mut dyn NoiseSource,
        on_step: &mut dyn FnMut(StepInfo<'_>) -> Flow,
    ) -> Result<Output> {
        if req.steps == 0 {
            return Err(Error::invalid_argument("steps", 0, "at least 1"));
        }
        if req.num_images_per_prompt == 0 {
            return Err(Error::invalid_argument(
                "num_images_per_prompt",
                0,
                "at least 1",
            ));
        }
        let (height, width) = self.resolve_size(req)?;
        if req.memory_check {
            crate::memory::check_generate(self, req, (height, width))?;
        }
        scheduler.set_timesteps(req.steps)?;
        let evaluations = match scheduler.order() {
            1 => req.steps,
            _ => scheduler.timesteps().len(),
        };
        let cond = self.encode_prompt_scheduled(req, evaluations)?;
        let (start, end) = self.step_range(scheduler, req)?;
        let latents = self.prepare_latents(req, scheduler, start, (height, width), &cond, noise)?;
        let added = self.added_conditioning(req, (height, width), &cond)?;
        let (latents, interrupted) = self.denoise(
            scheduler,
            latents,
            &cond,
            added.as_ref(),
            req,
            start..end,
            noise,
            on_step,
        )?;
        let images = match req.output {
            OutputType::Latents => None,
            // cancelled while denoising: no image (a Flow::Stop still decodes the partial one)
            OutputType::Image if interrupted && req.cancel.is_cancelled() => None,
            OutputType::Image => {
                Some(self.decode_output_with_cancel(&latents, req.watermark, &req.cancel)?)
            }
        };
        Ok(Output {
            latents,
            images,
            interrupted,
        })
    }

    /// The step indices this request runs: image-to-image starts part-way through
    /// (`strength`, `denoising_start`), the SDXL base may stop early (`denoising_end`).
    pub fn step_range(&self, s: &dyn Scheduler, req: &GenerateRequest) -> Result<(usize, usize)> {
        let start = match &req.init {
            Init::Image { strength, .. } => {
                if !(*strength > 0.0 && *strength <= 1.0) {
                    return Err(Error::invalid_argument(
                        "strength",
                        strength,
                        "a value in (0, 1]",
                    ));
                }
                s.start_index_for_strength(req.steps, *strength)?
            }
            Init::Continue {
                denoising_start, ..
            } => {
                check_fraction("denoising_start", *denoising_start)?;
                s.start_index_for_denoising_start(*denoising_start)?
            }
            _ => 0,
        };
        let end = match req.denoising_end {
            Some(f) => {
                check_fraction("denoising_end", f)?;
                s.end_index_for_denoising_end(f)?
            }
            None => s.timesteps().len(),
        };
        if start >= end {
            return Err(Error::invalid_argument(
                "strength / denoising_start / denoising_end",
                format!("steps {start}..{end} of {}", s.timesteps().len()),
                "at least one denoising step; raise steps or strength",
            ));
        }
        Ok((start, end))
    }

    /// Step 2: initial latents, as diffusers' `prepare_latents` (txt2img: noise times
    /// `init_noise_sigma`; img2img: VAE-encoded image sampled with `noise`, scaled, then noised to
    /// the start step; ensemble: the given latents untouched).
    pub fn prepare_latents(
        &self,
        req: &GenerateRequest,
        s: &dyn Scheduler,
        start: usize,
        (height, width): (usize, usize),
        cond: &Conditioning,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let f = self.vae_scale_factor();
        let batch = cond.hidden.dim(0)? / if req.guidance_scale > 1.0 { 2 } else { 1 };
        let c = self.unet.config().in_channels;
        let shape = [batch, c, height / f, width / f];
        let dtype = self.dtype();
        match &req.init {
            Init::Noise => {
                let n = noise.randn_tensor(&shape, dtype, &self.device)?;
                Ok((n * s.init_noise_sigma())?)
            }
            Init::Latents(l) => {
                check_shape("latents", l, &shape)?;
                Ok((l.to_dtype(dtype)?.to_device(&self.device)? * s.init_noise_sigma())?)
            }
            Init::Continue { latents, .. } => {
                let l = expand_batch("latents", latents, batch)?;
                check_shape("latents", &l, &shape)?;
                Ok(l.to_dtype(dtype)?.to_device(&self.device)?)
            }
            Init::Image { image, .. } => {
                let image = image.to_device(&self.device)?;
                if image.dim(1)? != 3 {
                    return Err(Error::invalid_argument(
                        "image",
                        format!("{:?}", image.dims()),
                        "[N, 3, H, W] RGB",
                    ));
                }
                let init = self
                    .vae
                    .latents_from_image(&image, noise)?
                    .to_dtype(dtype)?;
                let init = expand_batch("image", &init, batch)?;
                let eps = noise.randn_tensor(init.dims(), dtype, &self.device)?;
                s.add_noise(&init, &eps, start)
            }
        }
    }

    /// SDXL `added_cond_kwargs`: pooled text embeddings and the time ids (size and crop
    /// micro-conditioning; the refiner's aesthetic score), CFG batch included.
    pub fn added_conditioning(
        &self,
        req: &GenerateRequest,
        (height, width): (usize, usize),
        cond: &Conditioning,
    ) -> Result<Option<AddedCond>> {
        let Some(pooled) = &cond.pooled else {
            return Ok(None);
        };
        if self.family == ModelFamily::Sd {
            return Ok(None);
        }
        let m = &req.micro;
        let orig = m.original_size.unwrap_or((height, width));
        let target = m.target_size.unwrap_or((height, width));
        let crop = m.crops_coords_top_left;
        let (pos, neg): (Vec<f64>, Vec<f64>) = if self.index.requires_aesthetics_score {
            let nsize = m.negative_original_size.unwrap_or(orig);
            let ncrop = m.negative_crops_coords_top_left.unwrap_or(crop);
            (
                vec![
                    orig.0 as f64,
                    orig.1 as f64,
                    crop.0 as f64,
                    crop.1 as f64,
                    m.aesthetic_score,
                ],
                vec![
                    nsize.0 as f64,
                    nsize.1 as f64,
                    ncrop.0 as f64,
                    ncrop.1 as f64,
                    m.negative_aesthetic_score,
                ],
            )
        } else {
            let nsize = m.negative_original_size.unwrap_or(orig);
            let ncrop = m.negative_crops_coords_top_left.unwrap_or(crop);
            let ntarget = m.negative_target_size.unwrap_or(target);
            let ids = |o: (usize, usize), c: (usize, usize), t: (usize, usize)| {
                [o.0, o.1, c.0, c.1, t.0, t.1].map(|v| v as f64).to_vec()
            };
            (ids(orig, crop, target), ids(nsize, ncrop, ntarget))
        };
        let ucfg = self.unet.config();
        let expected = match &ucfg.text_time {
            Some(tt) if tt.addition_time_embed_dim > 0 => {
                tt.projection_class_embeddings_input_dim
                    .saturating_sub(pooled.dim(1)?)
                    / tt.addition_time_embed_dim
            }
            _ => pos.len(),
        };
        if expected != pos.len() {
            return Err(Error::config(
                self.index.path.clone(),
                Some("requires_aesthetics_score"),
                format!(
                    "the UNet expects {expected} time ids but this pipeline builds {}; \
                     requires_aesthetics_score must be true for the refiner and false for the base",
                    pos.len()
                ),
            ));
        }
        let rows = pooled.dim(0)?;
        let cfg = req.guidance_scale > 1.0;
        let half = if cfg { rows / 2 } else { rows };
        let mut data = Vec::with_capacity(rows * pos.len());
        for r in 0..rows {
            let src = if cfg && r < half { &neg } else { &pos };
            data.extend(src.iter().map(|v| *v as f32));
        }
        let time_ids =
            Tensor::from_vec(data, (rows, pos.len()), &self.device)?.to_dtype(self.dtype())?;
        Ok(Some(AddedCond {
            text_embeds: pooled.to_dtype(self.dtype())?,
            time_ids,
        }))
    }

    /// Step 3: the denoising loop over step indices `steps`, with classifier-free guidance and
    /// `guidance_rescale`; `on_step` sees the latents after every step and may stop the run.
    ///
    /// A scheduled `cond` (prompt editing, alternation) is looked up per model evaluation, as
    /// A1111's step counter counts: from 0 at the first step of an image-to-image run (A1111's
    /// img2img starts its counter where it starts sampling), at the step index otherwise (so the
    /// refiner of the ensemble continues the base's count). For SDXL the pooled embedding in
    /// `added` switches with the hidden states.
    #[allow(clippy::too_many_arguments)]
    pub fn denoise(
        &self,
        scheduler: &mut dyn Scheduler,
        mut latents: Tensor,
        cond: &Conditioning,
        added: Option<&AddedCond>,
        req: &GenerateRequest,
        steps: std::ops::Range<usize>,
        noise: &mut dyn NoiseSource,
        on_step: &mut dyn FnMut(StepInfo<'_>) -> Flow,
    ) -> Result<(Tensor, bool)> {
        let cfg = req.guidance_scale > 1.0;
        let total = steps.len();
        let first = steps.start;
        for (k, i) in steps.enumerate() {
            if req.cancel.is_cancelled() {
                return Ok((latents, true));
            }
            let t = *scheduler.timesteps().get(i).ok_or_else(|| {
                Error::invalid_argument(
                    "step index",
                    i,
                    format!("below {}", scheduler.timesteps().len()),
                )
            })?;
            let input = if cfg {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = scheduler.scale_model_input(&input, i)?;
            let position = match req.init {
                Init::Image { .. } => i - first,
                _ => i,
            };
            let (hidden, pooled) = cond.at_step(position);
            let switched;
            let added = match (added, pooled) {
                (Some(a), Some(p)) if !cond.schedule.is_empty() => {
                    switched = AddedCond {
                        text_embeds: p.to_dtype(a.text_embeds.dtype())?,
                        time_ids: a.time_ids.clone(),
                    };
                    Some(&switched)
                }
                _ => added,
            };
            let pred = self.unet.forward(&input, t, hidden, added)?;
            let pred = if cfg {
                let n = latents.dim(0)?;
                let uncond = pred.narrow(0, 0, n)?;
                let text = pred.narrow(0, n, n)?;
                let guided = (&uncond + ((&text - &uncond)? * req.guidance_scale)?)?;
                if req.guidance_rescale > 0.0 {
                    rescale_noise_cfg(&guided, &text, req.guidance_rescale)?
                } else {
                    guided
                }
            } else {
                pred
            };
            let out = scheduler.step(&pred, i, &latents, noise)?;
            latents = out.prev_sample;
            let info = StepInfo {
                step: k,
                total,
                timestep: t,
                latents: &latents,
                pred_original: out.pred_original_sample.as_ref(),
            };
            if on_step(info) == Flow::Stop {
                return Ok((latents, true));
            }
        }
        Ok((latents, false))
    }

    /// Step 4: latents to images `[N, 3, H, W]` in [0, 1] (f32), as diffusers' VAE decode and
    /// `VaeImageProcessor.postprocess` (NaN/inf is an error, never a black image). Never
    /// watermarked: use it for previews; a run's final images go through
    /// [`StableDiffusion::decode_output`].
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let image = self.vae.image_from_latents(latents)?;
        sd_vae::image::denormalize(&image)
    }

    /// Step 4 as a run ends: [`StableDiffusion::decode_latents`] with SDXL's invisible watermark
    /// applied between the VAE and the post-processing when `watermark` is set and the model is
    /// an SDXL base or refiner, as diffusers' SDXL pipelines do with `invisible-watermark`
    /// installed ([`crate::watermark::apply_watermark`]; images narrower than 256 pixels are
    /// left alone). SD 1.x and 2.x images are never marked. [`StableDiffusion::generate`] calls
    /// it with [`GenerateRequest::watermark`].
    ///
    /// # Shapes: latents [N, C, h, w] -> [N, 3, H, W] f32 in [0, 1].
    pub fn decode_output(&self, latents: &Tensor, watermark: bool) -> Result<Tensor> {
        self.decode_output_with_cancel(latents, watermark, &sd_core::Cancel::never())
    }

    /// [`StableDiffusion::decode_output`], stopped by `cancel` between the VAE decoder's blocks
    /// and tiles with [`Error::Interrupted`] (no image).
    pub fn decode_output_with_cancel(
        &self,
        latents: &Tensor,
        watermark: bool,
        cancel: &sd_core::Cancel,
    ) -> Result<Tensor> {
        let image = self.vae.image_from_latents_with_cancel(latents, cancel)?;
        if watermark && self.family != ModelFamily::Sd {
            sd_vae::image::denormalize(&crate::watermark::apply_watermark(&image)?)
        } else {
            sd_vae::image::denormalize(&image)
        }
    }
}

/// One prompt encoding: positive hidden states and pooled embeddings, and the negatives when
/// guidance is on, before the CFG batch is built.
type Encoded = (Tensor, Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// The negative prompts for `b` prompts: none gives `""`, one is used for every prompt.
fn negative_texts(req: &GenerateRequest, b: usize) -> Result<Vec<String>> {
    Ok(match req.negative_prompts.len() {
        0 => vec![String::new(); b],
        1 => vec![req.negative_prompts[0].clone(); b],
        k if k == b => req.negative_prompts.clone(),
        k => {
            return Err(Error::invalid_argument(
                "negative_prompts",
                format!("{k} prompts"),
                format!("0, 1 or {b} (one per prompt)"),
            ))
        }
    })
}

/// The shared `text_encoder_2` of an SDXL base or refiner.
pub fn text_encoder_2(text: &PromptEncoder) -> Option<Arc<ClipTextModel>> {
    match text {
        PromptEncoder::Sdxl { text_encoder_2, .. }
        | PromptEncoder::Refiner { text_encoder_2, .. } => Some(text_encoder_2.clone()),
        PromptEncoder::Sd { .. } => None,
    }
}

/// The fewest layers among the text encoders (`clip_skip` cannot skip more).
fn text_layers(text: &PromptEncoder) -> usize {
    match text {
        PromptEncoder::Sd { text_encoder, .. } => text_encoder.config().num_layers,
        PromptEncoder::Sdxl {
            text_encoder,
            text_encoder_2,
            ..
        } => text_encoder
            .config()
            .num_layers
            .min(text_encoder_2.config().num_layers),
        PromptEncoder::Refiner { text_encoder_2, .. } => text_encoder_2.config().num_layers,
    }
}

/// Width of the embeddings the text side hands the UNet (SDXL: both encoders concatenated).
fn text_width(text: &PromptEncoder) -> usize {
    match text {
        PromptEncoder::Sd { text_encoder, .. } => text_encoder.config().hidden_size,
        PromptEncoder::Sdxl {
            text_encoder,
            text_encoder_2,
            ..
        } => text_encoder.config().hidden_size + text_encoder_2.config().hidden_size,
        PromptEncoder::Refiner { text_encoder_2, .. } => text_encoder_2.config().hidden_size,
    }
}

/// diffusers' `rescale_noise_cfg`: match the guided prediction's per-sample std to the text
/// prediction's (unbiased std over all but the batch axis), mixed by `phi`.
fn rescale_noise_cfg(guided: &Tensor, text: &Tensor, phi: f64) -> Result<Tensor> {
    let std = |t: &Tensor| -> Result<Tensor> {
        let flat = t.to_dtype(DType::F32)?.flatten_from(1)?;
        let n = flat.dim(1)? as f64;
        let mean = flat.mean_keepdim(D::Minus1)?;
        let var = (flat.broadcast_sub(&mean)?.sqr()?.sum_keepdim(D::Minus1)? / (n - 1.0).max(1.0))?;
        Ok(var.sqrt()?)
    };
    let ratio = (std(text)? / std(guided)?)?;
    let shape: Vec<usize> = std::iter::once(guided.dim(0)?)
        .chain(std::iter::repeat_n(1, guided.rank() - 1))
        .collect();
    let ratio = ratio.reshape(shape)?.to_dtype(guided.dtype())?;
    let rescaled = guided.broadcast_mul(&ratio)?;
    Ok(((rescaled * phi)? + (guided * (1.0 - phi))?)?)
}

fn check_fraction(name: &str, f: f64) -> Result<()> {
    if f > 0.0 && f < 1.0 {
        Ok(())
    } else {
        Err(Error::invalid_argument(
            name,
            f,
            "a fraction strictly between 0 and 1",
        ))
    }
}

fn check_shape(name: &str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.dims() == want {
        Ok(())
    } else {
        Err(Error::invalid_argument(
            name,
            format!("shape {:?}", t.dims()),
            format!("shape {want:?}"),
        ))
    }
}

/// Repeats a batch of 1 (or of k dividing `batch`) to `batch` entries, as diffusers duplicates
/// the init image latents for several images per prompt.
fn expand_batch(name: &str, t: &Tensor, batch: usize) -> Result<Tensor> {
    let b = t.dim(0)?;
    if b == batch {
        Ok(t.clone())
    } else if b > 0 && batch.is_multiple_of(b) {
        Ok(Tensor::cat(&vec![t.clone(); batch / b], 0)?)
    } else {
        Err(Error::invalid_argument(
            name,
            format!("a batch of {b}"),
            format!("1 or a divisor of {batch}"),
        ))
    }
}

trait RepeatBatch {
    fn repeat_interleave_batch(&self, n: usize) -> candle_core::Result<Tensor>;
}

impl RepeatBatch for Tensor {
    /// `[B, ...]` -> `[B·n, ...]` with each entry repeated n times in a row (diffusers'
    /// `repeat(1, n, 1).view(B * n, ...)`).
    fn repeat_interleave_batch(&self, n: usize) -> candle_core::Result<Tensor> {
        if n == 1 {
            return Ok(self.clone());
        }
        let b = self.dim(0)?;
        let mut parts = Vec::with_capacity(b.saturating_mul(n).min(MAX_BATCH));
        for i in 0..b {
            let row = self.narrow(0, i, 1)?;
            for _ in 0..n {
                parts.push(row.clone());
            }
        }
        Tensor::cat(&parts, 0)
    }
}
