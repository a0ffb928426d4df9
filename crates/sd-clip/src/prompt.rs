//! Prompt conditioning as each diffusers pipeline's `encode_prompt` computes it:
//! [`StableDiffusionPipeline`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion.py)
//! (SD 1.x/2.x), [`StableDiffusionXLPipeline`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py)
//! and the SDXL refiner (`StableDiffusionXLImg2ImgPipeline` with `text_encoder_2` only).

use std::path::Path;
use std::sync::Arc;

use candle_core::{Tensor, D};
use sd_core::{Error, LoadOptions, Result};

use crate::model::{ClipTextModel, ClipTextOutput};
use crate::tokenizer::ClipTokenizer;

/// One tokenizer/encoder pair and the prompts it encodes.
pub(crate) struct Stage<'a> {
    pub(crate) tokenizer: &'a ClipTokenizer,
    pub(crate) model: &'a ClipTextModel,
    pub(crate) prompts: &'a [String],
}

/// What a pipeline feeds the UNet for a batch of prompts.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// `encoder_hidden_states`. # Shapes: [B, 77, D] (D = 768 for SD 1.x, 1024 for SD 2.x,
    /// 2048 for SDXL, 1280 for the refiner); [B, 77 * chunks, D] from [`PromptEncoder::encode_long`].
    pub hidden: Tensor,
    /// `text_embeds` of `text_encoder_2` (SDXL and refiner `add_text_embeds`). # Shapes: [B, P].
    pub pooled: Option<Tensor>,
    /// Per prompt, the content tokens truncation dropped (the largest count over the tokenizers);
    /// always 0 from [`PromptEncoder::encode_long`].
    pub dropped_tokens: Vec<usize>,
}

/// The tokenizer(s) and text encoder(s) of one model family, held in [`Arc`]s so that an SDXL
/// base and its refiner can share `tokenizer_2` / `text_encoder_2`.
#[derive(Debug, Clone)]
pub enum PromptEncoder {
    /// SD 1.x / 2.x: `text_encoder`'s last hidden state (after the final layer norm).
    Sd {
        /// `tokenizer/`.
        tokenizer: Arc<ClipTokenizer>,
        /// `text_encoder/` (`CLIPTextModel`).
        text_encoder: Arc<ClipTextModel>,
    },
    /// SDXL base: the penultimate hidden states of both encoders, concatenated on the feature
    /// axis; pooled = `text_encoder_2`'s `text_embeds`.
    Sdxl {
        /// `tokenizer/`.
        tokenizer: Arc<ClipTokenizer>,
        /// `text_encoder/` (`CLIPTextModel`).
        text_encoder: Arc<ClipTextModel>,
        /// `tokenizer_2/`.
        tokenizer_2: Arc<ClipTokenizer>,
        /// `text_encoder_2/` (`CLIPTextModelWithProjection`).
        text_encoder_2: Arc<ClipTextModel>,
    },
    /// SDXL refiner: `text_encoder_2` alone (penultimate hidden state, `text_embeds`).
    Refiner {
        /// `tokenizer_2/`.
        tokenizer_2: Arc<ClipTokenizer>,
        /// `text_encoder_2/` (`CLIPTextModelWithProjection`).
        text_encoder_2: Arc<ClipTextModel>,
    },
}

fn load_pair(
    dir: &Path,
    tok: &str,
    enc: &str,
    opts: &LoadOptions,
) -> Result<(Arc<ClipTokenizer>, Arc<ClipTextModel>)> {
    Ok((
        Arc::new(ClipTokenizer::from_folder(&dir.join(tok))?),
        Arc::new(ClipTextModel::load(&dir.join(enc), opts)?),
    ))
}

fn check_fits(tok: &ClipTokenizer, model: &ClipTextModel, what: &str) -> Result<()> {
    let max = model.config().max_position_embeddings;
    if tok.model_max_length() > max {
        return Err(Error::invalid_argument(
            what,
            format!("a tokenizer padding to {} tokens", tok.model_max_length()),
            format!("at most the text encoder's max_position_embeddings ({max})"),
        ));
    }
    Ok(())
}

fn check_projection(model: &ClipTextModel) -> Result<()> {
    if model.config().projection_dim.is_none() {
        return Err(Error::invalid_argument(
            "text_encoder_2",
            "a CLIPTextModel without text_projection",
            "CLIPTextModelWithProjection (SDXL's pooled embedding is its text_embeds)",
        ));
    }
    Ok(())
}

impl PromptEncoder {
    /// SD 1.x / 2.x from a tokenizer and a `CLIPTextModel`.
    pub fn sd(tokenizer: Arc<ClipTokenizer>, text_encoder: Arc<ClipTextModel>) -> Result<Self> {
        check_fits(&tokenizer, &text_encoder, "tokenizer")?;
        Ok(Self::Sd {
            tokenizer,
            text_encoder,
        })
    }

    /// SDXL base from both tokenizer/encoder pairs (`text_encoder_2` needs `text_projection`).
    pub fn sdxl(
        tokenizer: Arc<ClipTokenizer>,
        text_encoder: Arc<ClipTextModel>,
        tokenizer_2: Arc<ClipTokenizer>,
        text_encoder_2: Arc<ClipTextModel>,
    ) -> Result<Self> {
        check_fits(&tokenizer, &text_encoder, "tokenizer")?;
        check_fits(&tokenizer_2, &text_encoder_2, "tokenizer_2")?;
        check_projection(&text_encoder_2)?;
        if tokenizer.model_max_length() != tokenizer_2.model_max_length() {
            return Err(Error::invalid_argument(
                "tokenizer_2",
                format!("model_max_length {}", tokenizer_2.model_max_length()),
                format!("the same as tokenizer's ({})", tokenizer.model_max_length()),
            ));
        }
        Ok(Self::Sdxl {
            tokenizer,
            text_encoder,
            tokenizer_2,
            text_encoder_2,
        })
    }

    /// SDXL refiner from `tokenizer_2` / `text_encoder_2` (which the base may share).
    pub fn refiner(
        tokenizer_2: Arc<ClipTokenizer>,
        text_encoder_2: Arc<ClipTextModel>,
    ) -> Result<Self> {
        check_fits(&tokenizer_2, &text_encoder_2, "tokenizer_2")?;
        check_projection(&text_encoder_2)?;
        Ok(Self::Refiner {
            tokenizer_2,
            text_encoder_2,
        })
    }

    /// Loads `tokenizer/` + `text_encoder/` of a diffusers SD 1.x/2.x folder.
    pub fn load_sd(model_dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let (t, e) = load_pair(model_dir, "tokenizer", "text_encoder", opts)?;
        Self::sd(t, e)
    }

    /// Loads both pairs of a diffusers SDXL base folder.
    pub fn load_sdxl(model_dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let (t, e) = load_pair(model_dir, "tokenizer", "text_encoder", opts)?;
        let (t2, e2) = load_pair(model_dir, "tokenizer_2", "text_encoder_2", opts)?;
        Self::sdxl(t, e, t2, e2)
    }

    /// Loads `tokenizer_2/` + `text_encoder_2/` of a diffusers SDXL refiner folder.
    pub fn load_refiner(model_dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let (t2, e2) = load_pair(model_dir, "tokenizer_2", "text_encoder_2", opts)?;
        Self::refiner(t2, e2)
    }

    /// `encode_prompt` for `prompts` (no classifier-free guidance, one image per prompt).
    ///
    /// `clip_skip` as diffusers defines it: SD uses `final_layer_norm(hidden_states[-(k + 1)])`
    /// (k = 0 is the last hidden state); SDXL and the refiner use `hidden_states[-(k + 2)]` without
    /// the final layer norm. Note that diffusers' SDXL pipeline encodes an explicit negative prompt
    /// without `clip_skip`: pass `None` for it to match.
    ///
    /// # Shapes: hidden [B, 77, D], pooled [B, P] (SDXL, refiner).
    pub fn encode(&self, prompts: &[String], clip_skip: Option<usize>) -> Result<Conditioning> {
        self.encode_pair(prompts, None, clip_skip)
    }

    /// As [`PromptEncoder::encode`], with SDXL's `prompt_2` for `tokenizer_2` / `text_encoder_2`
    /// (`None`: the same prompts). Ignored by SD and the refiner, which have one encoder.
    pub fn encode_pair(
        &self,
        prompts: &[String],
        prompts_2: Option<&[String]>,
        clip_skip: Option<usize>,
    ) -> Result<Conditioning> {
        let stages = self.stages(prompts, prompts_2)?;
        let mut dropped = vec![0; prompts.len()];
        let mut batches = Vec::with_capacity(stages.len());
        for s in &stages {
            let tokens = s
                .prompts
                .iter()
                .map(|p| s.tokenizer.encode(p))
                .collect::<Result<Vec<_>>>()?;
            for (d, t) in dropped.iter_mut().zip(&tokens) {
                *d = (*d).max(t.dropped);
            }
            batches.push((s.model, tokens.into_iter().map(|t| t.ids).collect()));
        }
        let (hidden, pooled) = self.run(&batches, clip_skip)?;
        Ok(Conditioning {
            hidden,
            pooled,
            dropped_tokens: dropped,
        })
    }

    /// Long-prompt conditioning: every prompt is cut into 75-token chunks
    /// ([`ClipTokenizer::encode_chunked`]), each chunk is encoded as [`PromptEncoder::encode`]
    /// encodes a prompt, and the chunks are concatenated along the sequence axis, as
    /// AUTOMATIC1111 and compel do. Prompts with fewer chunks than the longest one (in the batch,
    /// and over SDXL's two tokenizers) get chunks of the empty prompt. The pooled embedding is that
    /// of the first chunk. A prompt that fits in one chunk gives exactly [`PromptEncoder::encode`]'s
    /// result.
    ///
    /// # Shapes: hidden [B, 77 * chunks, D], pooled [B, P].
    pub fn encode_long(
        &self,
        prompts: &[String],
        clip_skip: Option<usize>,
    ) -> Result<Conditioning> {
        let stages = self.stages(prompts, None)?;
        let mut chunked = Vec::with_capacity(stages.len());
        for s in &stages {
            let chunks = s
                .prompts
                .iter()
                .map(|p| s.tokenizer.encode_chunked(p))
                .collect::<Result<Vec<_>>>()?;
            chunked.push((s, s.tokenizer.encode("")?.ids, chunks));
        }
        let n_chunks = chunked
            .iter()
            .flat_map(|(_, _, c)| c.iter().map(Vec::len))
            .max()
            .unwrap_or(1);
        let mut hidden = Vec::with_capacity(n_chunks);
        let mut pooled = None;
        for c in 0..n_chunks {
            let batches: Vec<_> = chunked
                .iter()
                .map(|(s, empty, chunks)| {
                    let ids = chunks
                        .iter()
                        .map(|cs| cs.get(c).map_or_else(|| empty.clone(), |t| t.ids.clone()))
                        .collect();
                    (s.model, ids)
                })
                .collect();
            let (h, p) = self.run(&batches, clip_skip)?;
            hidden.push(h);
            if c == 0 {
                pooled = p;
            }
        }
        Ok(Conditioning {
            hidden: Tensor::cat(&hidden, 1)?,
            pooled,
            dropped_tokens: vec![0; prompts.len()],
        })
    }

    /// The (tokenizer, encoder, prompts) stages of the family, in the pipeline's order.
    pub(crate) fn stages<'a>(
        &'a self,
        prompts: &'a [String],
        prompts_2: Option<&'a [String]>,
    ) -> Result<Vec<Stage<'a>>> {
        let p2 = self.second_prompts(prompts, prompts_2)?;
        let stage =
            |tokenizer: &'a Arc<ClipTokenizer>, model: &'a Arc<ClipTextModel>, prompts| Stage {
                tokenizer,
                model,
                prompts,
            };
        Ok(match self {
            Self::Sd {
                tokenizer,
                text_encoder,
            } => vec![stage(tokenizer, text_encoder, prompts)],
            Self::Sdxl {
                tokenizer,
                text_encoder,
                tokenizer_2,
                text_encoder_2,
            } => vec![
                stage(tokenizer, text_encoder, prompts),
                stage(tokenizer_2, text_encoder_2, p2),
            ],
            Self::Refiner {
                tokenizer_2,
                text_encoder_2,
            } => vec![stage(tokenizer_2, text_encoder_2, p2)],
        })
    }

    /// The prompts for the second encoder (`prompt_2 or prompt`), checked for batch size.
    fn second_prompts<'a>(
        &self,
        prompts: &'a [String],
        prompts_2: Option<&'a [String]>,
    ) -> Result<&'a [String]> {
        if prompts.is_empty() {
            return Err(Error::invalid_argument(
                "prompts",
                "an empty batch",
                "at least one prompt",
            ));
        }
        match prompts_2 {
            Some(p2) if matches!(self, Self::Sdxl { .. }) => {
                if p2.len() != prompts.len() {
                    return Err(Error::invalid_argument(
                        "prompts_2",
                        format!("{} prompts", p2.len()),
                        format!("one per prompt ({})", prompts.len()),
                    ));
                }
                Ok(p2)
            }
            _ => Ok(prompts),
        }
    }

    /// Runs each encoder on its ids and selects the hidden states as the family's pipeline does.
    fn run(
        &self,
        batches: &[(&ClipTextModel, Vec<Vec<u32>>)],
        clip_skip: Option<usize>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let mut hiddens = Vec::with_capacity(batches.len());
        let mut pooled = None;
        for (model, ids) in batches {
            let ids = Tensor::new(ids.clone(), model.device())?;
            let (h, p) = self.select(model, &model.forward(&ids)?, clip_skip)?;
            pooled = p.or(pooled);
            hiddens.push(h);
        }
        let last = batches
            .last()
            .map(|(m, _)| *m)
            .ok_or_else(|| Error::invalid_argument("encoders", "none", "at least one"))?;
        Ok((Self::concat_features(hiddens, last)?, pooled))
    }

    /// The hidden states the family's pipeline takes from one encoder's output (see
    /// [`PromptEncoder::encode`] for `clip_skip`), and its pooled `text_embeds` (SDXL, refiner).
    pub(crate) fn select(
        &self,
        model: &ClipTextModel,
        out: &ClipTextOutput,
        clip_skip: Option<usize>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        match self {
            Self::Sd { .. } => Ok((sd_hidden(model, out, clip_skip)?, None)),
            _ => Ok((xl_hidden(out, clip_skip)?, out.text_embeds.clone())),
        }
    }

    /// The encoders' hidden states concatenated on the feature axis, cast to the last encoder's
    /// dtype and device as the pipelines do.
    pub(crate) fn concat_features(hiddens: Vec<Tensor>, last: &ClipTextModel) -> Result<Tensor> {
        let hiddens = hiddens
            .iter()
            .map(|h| h.to_device(last.device())?.to_dtype(last.dtype()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(if hiddens.len() == 1 {
            hiddens[0].clone()
        } else {
            Tensor::cat(&hiddens, D::Minus1)?
        })
    }
}

/// SD: `last_hidden_state`, or `final_layer_norm(hidden_states[-(k + 1)])` with `clip_skip = k`.
fn sd_hidden(
    model: &ClipTextModel,
    out: &ClipTextOutput,
    clip_skip: Option<usize>,
) -> Result<Tensor> {
    match clip_skip {
        None => Ok(out.last_hidden_state.clone()),
        Some(k) => model.final_layer_norm(pick_from_end(&out.hidden_states, k + 1, k)?),
    }
}

/// SDXL: `hidden_states[-(k + 2)]` (k = `clip_skip`, 0 when unset), no final layer norm.
fn xl_hidden(out: &ClipTextOutput, clip_skip: Option<usize>) -> Result<Tensor> {
    let k = clip_skip.unwrap_or(0);
    Ok(pick_from_end(&out.hidden_states, k + 2, k)?.clone())
}

/// `hidden_states[-from_end]`, or an error naming `clip_skip` when there are too few layers.
fn pick_from_end(hidden: &[Tensor], from_end: usize, clip_skip: usize) -> Result<&Tensor> {
    hidden
        .len()
        .checked_sub(from_end)
        .and_then(|i| hidden.get(i))
        .ok_or_else(|| {
            Error::invalid_argument(
                "clip_skip",
                clip_skip,
                format!(
                    "at most {} for a text encoder with {} layers",
                    hidden.len().saturating_sub(from_end - clip_skip),
                    hidden.len().saturating_sub(1)
                ),
            )
        })
}
