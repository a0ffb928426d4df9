//! Textual-inversion embeddings on a loaded model, as diffusers' `load_textual_inversion`:
//! the token(s) are added to the tokenizer and the vectors to the text encoder's token
//! embedding; a multi-vector token stands for `tok tok_1 …` in prompts.

use std::path::{Path, PathBuf};
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

    /// The same model without its embeddings (e.g. to read an embeddings folder again).
    pub fn without_embeddings(&self) -> StableDiffusion {
        let mut out = self.clone();
        out.text = self.text_plain.clone();
        out.embeddings.clear();
        out
    }

    /// The same model with every embedding of the folder `dir` that fits it, as AUTOMATIC1111
    /// reads its `embeddings/` folder: each `.safetensors` file, triggered by its file stem. A
    /// file that cannot be added (a pickled `.pt`/`.bin`, a width made for another model, a
    /// stem the tokenizer already has, an unreadable file) is listed under `skipped` with the
    /// reason, never an error; only an unreadable folder is.
    pub fn with_embeddings_dir(&self, dir: &Path) -> Result<(StableDiffusion, EmbeddingsDir)> {
        let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && p.extension().is_some_and(|e| {
                        EMBEDDING_EXTENSIONS
                            .iter()
                            .any(|x| e.eq_ignore_ascii_case(x))
                    })
            })
            .collect();
        files.sort();
        let mut text = (*self.text).clone();
        let mut found = EmbeddingsDir::default();
        for path in files {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let skip = |file, reason: Error| SkippedEmbedding {
                name: name.clone(),
                path: path.clone(),
                file,
                reason: reason.to_string(),
            };
            let file = match EmbeddingFile::open(&path, None) {
                Ok(f) => Arc::new(f),
                Err(e) => {
                    found.skipped.push(skip(None, e));
                    continue;
                }
            };
            // On a copy: a file that fails half-way (SDXL's second encoder) leaves no trace.
            let mut with = text.clone();
            match apply(&mut with, &file) {
                Ok(()) => {
                    text = with;
                    found.loaded.push(file);
                }
                Err(e) => found.skipped.push(skip(Some(file), e)),
            }
        }
        let mut out = self.clone();
        out.text = Arc::new(text);
        out.embeddings.extend(found.loaded.iter().cloned());
        Ok((out, found))
    }
}

/// The files [`StableDiffusion::with_embeddings_dir`] reads: safetensors, and the pickled
/// formats AUTOMATIC1111 also reads (listed as skipped: sd-rs never unpickles).
const EMBEDDING_EXTENSIONS: [&str; 3] = ["safetensors", "pt", "bin"];

/// What [`StableDiffusion::with_embeddings_dir`] found in a folder (sorted by file name).
#[derive(Debug, Clone, Default)]
pub struct EmbeddingsDir {
    /// The embeddings added to the model (trigger word: the file stem).
    pub loaded: Vec<Arc<EmbeddingFile>>,
    /// The files not added, and why.
    pub skipped: Vec<SkippedEmbedding>,
}

impl EmbeddingsDir {
    /// The loaded embeddings whose trigger word occurs in one of `texts` (a prompt and its
    /// negative prompt): the tokenizer splits an added token out of any text that contains it.
    pub fn used_by(&self, texts: &[&str]) -> Vec<Arc<EmbeddingFile>> {
        self.loaded
            .iter()
            .filter(|e| texts.iter().any(|t| t.contains(e.token())))
            .cloned()
            .collect()
    }
}

/// A file of an embeddings folder that was not added to the model.
#[derive(Debug, Clone)]
pub struct SkippedEmbedding {
    /// The file stem (its trigger word).
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// The embedding, when the file could be read (e.g. made for another model).
    pub file: Option<Arc<EmbeddingFile>>,
    /// Why it was skipped.
    pub reason: String,
}

/// A1111's `TI hashes` infotext value for `embeddings`: `token: first 12 hex of the file's
/// sha256, ...` (`:` and `,` taken out of the tokens); `None` without embeddings.
pub fn ti_hashes(embeddings: &[Arc<EmbeddingFile>]) -> Result<Option<String>> {
    let mut v = Vec::new();
    for e in embeddings {
        let hash = crate::prompt_loras::short_sha256(e.path())?;
        v.push(format!("{}: {hash}", e.token().replace([':', ','], "")));
    }
    Ok((!v.is_empty()).then(|| v.join(", ")))
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
