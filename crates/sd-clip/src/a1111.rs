//! AUTOMATIC1111's text conditioning (`modules/sd_hijack_clip.py` and the default "Original"
//! emphasis of `modules/sd_emphasis.py`), written anew: weighted fragments cut into 75-token
//! chunks (backing off to the last comma, `BREAK` forcing a new chunk), each chunk encoded as
//! bos + 75 + eos, the hidden states multiplied by the weights with their mean restored, the chunks
//! concatenated along the sequence.
//!
//! Differences from A1111, all deliberate:
//! - Tokens come from [`ClipTokenizer`] (transformers' `CLIPTokenizer`), also for the OpenCLIP
//!   encoders, where A1111 uses open_clip's tokenizer: a literal `!` is the pad id 0 here, as in
//!   diffusers (see docs/text-encoders.md).
//! - The mean that the emphasis restores is taken per prompt. A1111 takes it over the whole batch
//!   it encodes at once (all prompts of a batch, all steps of an edited prompt), so one prompt's
//!   conditioning there depends on the others; for one prompt both are the same.
//! - Textual-inversion embeddings are not looked up (sd-rs does not load them yet).

use candle_core::{DType, Tensor};
use sd_core::{Cancel, Error, Result};

use crate::prompt::{Conditioning, PromptEncoder};
use crate::prompt_syntax::parse_prompt_attention;
use crate::tokenizer::ClipTokenizer;

/// A1111's `comma_padding_backtrack` default: a chunk that overflows is cut after its last comma
/// when that comma is at most this many tokens back.
pub const COMMA_BACKTRACK: usize = 20;

/// How prompts are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptSyntax {
    /// diffusers: the text as is, truncated to 75 tokens (the dropped count is reported).
    #[default]
    Plain,
    /// AUTOMATIC1111: attention weights, `BREAK`, 75-token chunks without truncation
    /// ([`PromptEncoder::encode_a1111`]). Prompt editing, alternation and `<lora:...>` tags are
    /// resolved before encoding, by the caller ([`crate::prompt_syntax::A1111Prompt`]).
    A1111,
}

impl std::str::FromStr for PromptSyntax {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "plain" | "diffusers" => Ok(Self::Plain),
            "a1111" | "automatic1111" => Ok(Self::A1111),
            _ => Err(Error::invalid_argument(
                "prompt syntax",
                s,
                "a1111 or plain",
            )),
        }
    }
}

/// One 77-token sequence of a prompt and the weight of each position.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptChunk {
    /// bos, 75 content or padding tokens, eos (`model_max_length` in all).
    pub ids: Vec<u32>,
    /// The attention weight of each position (1 for bos, eos and padding).
    pub multipliers: Vec<f32>,
}

/// Builds the chunks of one prompt (A1111's `tokenize_line`).
struct Chunker<'a> {
    tokenizer: &'a ClipTokenizer,
    chunks: Vec<PromptChunk>,
    ids: Vec<u32>,
    weights: Vec<f32>,
    last_comma: Option<usize>,
}

impl Chunker<'_> {
    /// Pads the current chunk with eos to 75, wraps it in bos/eos, starts a new one. A tokenizer
    /// whose pad token differs from eos (SD 2.x, SDXL's second) gets pad ids after the first eos,
    /// as A1111 does for OpenCLIP.
    fn next_chunk(&mut self) {
        let t = self.tokenizer;
        let n = t.chunk_len();
        let mut ids = Vec::with_capacity(n + 2);
        ids.push(t.bos_id());
        ids.append(&mut self.ids);
        ids.resize(n + 1, t.eos_id());
        ids.push(t.eos_id());
        if t.eos_id() != t.pad_id() {
            if let Some(first) = ids.iter().position(|&i| i == t.eos_id()) {
                ids[first + 1..].fill(t.pad_id());
            }
        }
        let mut multipliers = Vec::with_capacity(n + 2);
        multipliers.push(1.0);
        multipliers.append(&mut self.weights);
        multipliers.resize(n + 2, 1.0);
        self.chunks.push(PromptChunk { ids, multipliers });
        self.last_comma = None;
    }
}

/// A1111's `tokenize_line`: the prompt's attention fragments tokenized one by one, cut into
/// chunks of `chunk_len` (75) tokens. When a chunk is full and the next token is not a comma,
/// the tokens after the chunk's last comma move to the next chunk if that comma is at most
/// [`COMMA_BACKTRACK`] tokens back; `BREAK` ends the chunk (even an empty one). An empty prompt
/// gives one chunk.
pub fn tokenize_line(tokenizer: &ClipTokenizer, prompt: &str) -> Result<Vec<PromptChunk>> {
    let fragments = parse_prompt_attention(prompt)?;
    let comma = tokenizer.inner().token_to_id(",</w>");
    let n = tokenizer.chunk_len();
    let mut c = Chunker {
        tokenizer,
        chunks: Vec::new(),
        ids: Vec::with_capacity(n),
        weights: Vec::with_capacity(n),
        last_comma: None,
    };
    for f in &fragments {
        if f.is_break() {
            c.next_chunk();
            continue;
        }
        for id in tokenizer.tokenize(&f.text)? {
            if Some(id) == comma {
                c.last_comma = Some(c.ids.len());
            } else if let Some(at) = c
                .last_comma
                .filter(|&at| c.ids.len() == n && n - at <= COMMA_BACKTRACK)
            {
                let moved_ids = c.ids.split_off(at + 1);
                let moved_weights = c.weights.split_off(at + 1);
                c.next_chunk();
                c.ids = moved_ids;
                c.weights = moved_weights;
            }
            if c.ids.len() == n {
                c.next_chunk();
            }
            c.ids.push(id);
            c.weights.push(f.weight as f32);
        }
    }
    if !c.ids.is_empty() || c.chunks.is_empty() {
        c.next_chunk();
    }
    Ok(c.chunks)
}

/// A1111's `empty_chunk`: bos, then eos (or pad after the first eos), weights 1.
fn empty_chunk(tokenizer: &ClipTokenizer) -> PromptChunk {
    let mut c = Chunker {
        tokenizer,
        chunks: Vec::new(),
        ids: Vec::new(),
        weights: Vec::new(),
        last_comma: None,
    };
    c.next_chunk();
    c.chunks.remove(0)
}

/// A1111's default ("Original") emphasis on one chunk batch: `z * weights`, then scaled so that
/// each prompt's mean over tokens and channels is what it was. Rows whose weights are all 1 come
/// out unchanged (the ratio of two identical means is exactly 1).
///
/// # Shapes: z [B, T, C], multipliers B × T.
pub fn apply_emphasis(z: &Tensor, multipliers: &[&[f32]]) -> Result<Tensor> {
    if multipliers.iter().all(|m| m.iter().all(|&w| w == 1.0)) {
        return Ok(z.clone());
    }
    let (b, t, _) = z.dims3()?;
    if multipliers.len() != b || multipliers.iter().any(|m| m.len() != t) {
        return Err(Error::invalid_argument(
            "multipliers",
            format!("{} rows", multipliers.len()),
            format!("{b} rows of {t} weights"),
        ));
    }
    let zf = z.to_dtype(DType::F32)?;
    let flat: Vec<f32> = multipliers.iter().flat_map(|m| m.iter().copied()).collect();
    let w = Tensor::from_vec(flat, (b, t, 1), z.device())?;
    let mean = |x: &Tensor| x.mean_keepdim(2)?.mean_keepdim(1);
    let before = mean(&zf)?;
    let weighted = zf.broadcast_mul(&w)?;
    let ratio = (before / mean(&weighted)?)?;
    let r: Vec<f32> = ratio.flatten_all()?.to_vec1()?;
    if let Some(i) = r.iter().position(|x| !x.is_finite()) {
        return Err(Error::invalid_argument(
            "prompt weights",
            format!("weights that bring prompt {i}'s hidden-state mean to 0"),
            "weights that keep a non-zero mean (A1111 would divide by zero here)",
        ));
    }
    Ok(weighted.broadcast_mul(&ratio)?.to_dtype(z.dtype())?)
}

impl PromptEncoder {
    /// [`PromptEncoder::encode`] or [`PromptEncoder::encode_a1111`] as `syntax` says.
    pub fn encode_with_syntax(
        &self,
        prompts: &[String],
        clip_skip: Option<usize>,
        syntax: PromptSyntax,
    ) -> Result<Conditioning> {
        match syntax {
            PromptSyntax::Plain => self.encode(prompts, clip_skip),
            PromptSyntax::A1111 => self.encode_a1111(prompts, clip_skip),
        }
    }

    /// AUTOMATIC1111's conditioning of `prompts` (attention syntax and `BREAK`; editing,
    /// alternation and `<lora:...>` tags must already be resolved, see
    /// [`crate::prompt_syntax::A1111Prompt`]).
    ///
    /// Per encoder: [`tokenize_line`] chunks, prompts with fewer chunks than the longest padded
    /// with [empty chunks](PromptChunk), each chunk batch encoded and its hidden states selected
    /// as [`PromptEncoder::encode`] does (`clip_skip` included), then weighted with
    /// [`apply_emphasis`] (for SDXL separately for each encoder, before the feature
    /// concatenation, as A1111); chunks are concatenated along the sequence. The pooled embedding
    /// is the first chunk's. Encode the prompt and the negative prompt in one call to give them
    /// the same number of chunks (A1111's "pad prompt/negative prompt" pads with the empty
    /// prompt's encoding, which is the empty chunk).
    ///
    /// A prompt without weights or `BREAK` that fits in 75 tokens gives exactly
    /// [`PromptEncoder::encode`]'s result.
    ///
    /// # Shapes: hidden [B, 77 * chunks, D], pooled [B, P] (SDXL, refiner).
    pub fn encode_a1111(
        &self,
        prompts: &[String],
        clip_skip: Option<usize>,
    ) -> Result<Conditioning> {
        self.encode_a1111_with_cancel(prompts, clip_skip, &Cancel::never())
    }

    /// [`PromptEncoder::encode_a1111`], checking `cancel` before each text encoder runs on each
    /// chunk (then [`sd_core::Error::Interrupted`]).
    pub fn encode_a1111_with_cancel(
        &self,
        prompts: &[String],
        clip_skip: Option<usize>,
        cancel: &Cancel,
    ) -> Result<Conditioning> {
        let stages = self.stages(prompts, None)?;
        let mut chunked = Vec::with_capacity(stages.len());
        for s in &stages {
            let per_prompt = s
                .prompts
                .iter()
                .map(|p| tokenize_line(s.tokenizer, p))
                .collect::<Result<Vec<_>>>()?;
            chunked.push((s, empty_chunk(s.tokenizer), per_prompt));
        }
        let n_chunks = chunked
            .iter()
            .flat_map(|(_, _, c)| c.iter().map(Vec::len))
            .max()
            .unwrap_or(1);
        let last = stages
            .last()
            .map(|s| s.model)
            .ok_or_else(|| Error::invalid_argument("encoders", "none", "at least one"))?;
        let mut hidden = Vec::with_capacity(n_chunks);
        let mut pooled = None;
        for c in 0..n_chunks {
            let mut per_encoder = Vec::with_capacity(chunked.len());
            for (s, empty, per_prompt) in &chunked {
                let rows: Vec<&PromptChunk> = per_prompt
                    .iter()
                    .map(|chunks| chunks.get(c).unwrap_or(empty))
                    .collect();
                let ids: Vec<Vec<u32>> = rows.iter().map(|r| r.ids.clone()).collect();
                let ids = Tensor::new(ids, s.model.device())?;
                cancel.check()?;
                let (h, p) = self.select(s.model, &s.model.forward(&ids)?, clip_skip)?;
                if c == 0 {
                    pooled = p.or(pooled);
                }
                let weights: Vec<&[f32]> = rows.iter().map(|r| r.multipliers.as_slice()).collect();
                per_encoder.push(apply_emphasis(&h, &weights)?);
            }
            hidden.push(Self::concat_features(per_encoder, last)?);
        }
        Ok(Conditioning {
            hidden: Tensor::cat(&hidden, 1)?,
            pooled,
            dropped_tokens: vec![0; prompts.len()],
        })
    }
}
