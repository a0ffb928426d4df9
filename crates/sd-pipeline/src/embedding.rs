//! Textual-inversion embeddings on a loaded model, as diffusers' `load_textual_inversion`:
//! the token(s) are added to the tokenizer and the vectors to the text encoder's token
//! embedding; a multi-vector token stands for `tok tok_1 …` in prompts.

use std::sync::Arc;

use sd_clip::{ClipTextModel, ClipTokenizer, PromptEncoder};
use sd_core::{Error, Result};
use sd_formats::EmbeddingFile;

use crate::pipeline::StableDiffusion;

impl StableDiffusion {
    /// The same model with `embeddings` added to those it has. SD 1.x/2.x take single-encoder
    /// files (`emb_params`, `{token: tensor}`); SDXL takes `clip_l` + `clip_g` files (the
    /// refiner `clip_g`). A width that is not the text encoder's is an error naming both.
    pub fn with_embeddings(&self, embeddings: &[Arc<EmbeddingFile>]) -> Result<StableDiffusion> {
        let mut out = self.clone();
        let mut text = (*self.text).clone();
        for e in embeddings {
            apply(&mut text, e)?;
        }
        out.text = Arc::new(text);
        out.embeddings.extend(embeddings.iter().cloned());
        Ok(out)
    }

    /// The embeddings added.
    pub fn embeddings(&self) -> &[Arc<EmbeddingFile>] {
        &self.embeddings
    }
}

/// Adds `e` to the text conditioning (also used to re-apply embeddings after a LoRA change).
pub(crate) fn apply(text: &mut PromptEncoder, e: &EmbeddingFile) -> Result<()> {
    let path = e.path().display();
    match text {
        PromptEncoder::Sd {
            tokenizer,
            text_encoder,
        } => {
            let Some(v) = &e.single else {
                return Err(Error::unsupported(format!(
                    "{path} is an SDXL embedding (clip_l + clip_g); this is an SD 1.x/2.x model"
                )));
            };
            add(tokenizer, text_encoder, e, v, "the text encoder")
        }
        PromptEncoder::Sdxl {
            tokenizer,
            text_encoder,
            tokenizer_2,
            text_encoder_2,
        } => {
            let (Some(l), Some(g)) = (&e.clip_l, &e.clip_g) else {
                return Err(Error::unsupported(format!(
                    "{path} holds one text encoder's vectors; SDXL embeddings have `clip_l` \
                     (768-wide) and `clip_g` (1280-wide)"
                )));
            };
            add(tokenizer, text_encoder, e, l, "text_encoder (clip_l)")?;
            add(tokenizer_2, text_encoder_2, e, g, "text_encoder_2 (clip_g)")
        }
        PromptEncoder::Refiner {
            tokenizer_2,
            text_encoder_2,
        } => {
            let Some(g) = &e.clip_g else {
                return Err(Error::unsupported(format!(
                    "{path} has no `clip_g` vectors for the SDXL refiner's text encoder"
                )));
            };
            add(tokenizer_2, text_encoder_2, e, g, "text_encoder_2 (clip_g)")
        }
    }
}

fn add(
    tokenizer: &mut Arc<ClipTokenizer>,
    te: &mut Arc<ClipTextModel>,
    e: &EmbeddingFile,
    vectors: &candle_core::Tensor,
    which: &str,
) -> Result<()> {
    let (n, d) = vectors.dims2()?;
    let hidden = te.config().hidden_size;
    if d != hidden {
        return Err(Error::unsupported(format!(
            "{}: the embedding is {d}-wide but {which} is {hidden}-wide (SD 1.x: 768, SD 2.x: \
             1024, SDXL: 768 + 1280); it was made for another model",
            e.path().display()
        )));
    }
    let (tok, ids) = tokenizer.with_embedding_tokens(e.token(), n)?;
    let model = te.with_extra_token_embeddings(&ids, vectors)?;
    *tokenizer = Arc::new(tok);
    *te = Arc::new(model);
    Ok(())
}
