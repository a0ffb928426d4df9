//! The CLIP byte-level BPE tokenizer, as transformers' `CLIPTokenizer` builds it.
//!
//! Mirrors [transformers `CLIPTokenizer`](https://github.com/huggingface/transformers/blob/main/src/transformers/models/clip/tokenization_clip.py)
//! (the `tokenizers`-backed one of transformers 5) called the way diffusers' pipelines call it:
//! `tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sd_core::{config::read_json, Error, Result};
use serde::Deserialize;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// The pre-tokenizer split of `CLIPTokenizer`: special-token text, English contractions, runs of
/// letters, single digits, runs of other non-space characters.
const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The ids of one prompt as the text encoder takes them.
///
/// `ids` and `attention_mask` have `model_max_length` (77) entries: `bos`, at most
/// `model_max_length - 2` content tokens, `eos`, then the tokenizer's pad token (mask 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// Token ids, `[model_max_length]`.
    pub ids: Vec<u32>,
    /// 1 for bos, content and eos, 0 for padding, `[model_max_length]`.
    pub attention_mask: Vec<u32>,
    /// Content tokens lost to truncation (0 when the prompt fits).
    pub dropped: usize,
}

/// A special token as `tokenizer_config.json` / `special_tokens_map.json` write it: a plain string
/// or an `AddedToken` object.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SpecialToken {
    Text(String),
    Full(AddedTokenJson),
}

#[derive(Debug, Clone, Deserialize)]
struct AddedTokenJson {
    content: String,
    #[serde(default)]
    lstrip: bool,
    #[serde(default)]
    rstrip: bool,
    #[serde(default)]
    single_word: bool,
    /// transformers' `AddedToken` defaults to `normalized = not special`, i.e. false here.
    #[serde(default)]
    normalized: bool,
}

impl SpecialToken {
    fn content(&self) -> &str {
        match self {
            SpecialToken::Text(s) => s,
            SpecialToken::Full(t) => &t.content,
        }
    }

    /// The token as transformers registers it: strings become non-normalized special tokens.
    fn added_token(&self) -> AddedToken {
        match self {
            SpecialToken::Text(s) => AddedToken::from(s.clone(), true).normalized(false),
            SpecialToken::Full(t) => t.added_token(),
        }
    }
}

impl AddedTokenJson {
    fn added_token(&self) -> AddedToken {
        AddedToken::from(self.content.clone(), true)
            .lstrip(self.lstrip)
            .rstrip(self.rstrip)
            .single_word(self.single_word)
            .normalized(self.normalized)
    }
}

/// The fields of `tokenizer_config.json` and `special_tokens_map.json` that change the ids.
#[derive(Debug, Clone, Default, Deserialize)]
struct TokenizerConfigJson {
    #[serde(default)]
    model_max_length: Option<f64>,
    #[serde(default)]
    bos_token: Option<SpecialToken>,
    #[serde(default)]
    eos_token: Option<SpecialToken>,
    #[serde(default)]
    pad_token: Option<SpecialToken>,
    #[serde(default)]
    unk_token: Option<SpecialToken>,
    #[serde(default)]
    added_tokens_decoder: Option<BTreeMap<String, AddedTokenJson>>,
}

/// CLIP's tokenizer, loaded from a diffusers `tokenizer/` or `tokenizer_2/` folder.
///
/// Mirrors [transformers `CLIPTokenizer`](https://github.com/huggingface/transformers/blob/main/src/transformers/models/clip/tokenization_clip.py):
/// NFC, whitespace runs to one space, lowercase; split into special-token text, contractions, letter runs, single digits and other symbol runs, then byte-level
/// BPE with the `</w>` end-of-word suffix; `<|startoftext|>` … `<|endoftext|>` around the content,
/// padded with the folder's pad token. SD 1.x pads with `<|endoftext|>`; the OpenCLIP tokenizers of
/// SD 2.x and SDXL pad with `!` (id 0), which transformers registers as a special token, so a
/// literal `!` in a prompt becomes id 0 as well.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    model_max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    /// Textual-inversion tokens of several vectors: `tok` -> the ids of `tok tok_1 …`.
    expansions: std::collections::HashMap<u32, Vec<u32>>,
}

fn config_err(path: &Path, key: &str, reason: impl Into<String>) -> Error {
    Error::config(path, Some(key), reason)
}

fn read_optional(path: &Path) -> Result<Option<TokenizerConfigJson>> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

impl ClipTokenizer {
    /// Loads a tokenizer folder: `tokenizer.json` when present (its added tokens and pipeline),
    /// otherwise `vocab.json` + `merges.txt` with the pipeline transformers' `CLIPTokenizer`
    /// builds and the special tokens of `tokenizer_config.json` / `special_tokens_map.json`.
    ///
    /// Errors name the missing or unreadable file, or the special token the vocabulary lacks.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer folder not found"),
            ));
        }
        let config_path = dir.join("tokenizer_config.json");
        let map_path = dir.join("special_tokens_map.json");
        let config = read_optional(&config_path)?.unwrap_or_default();
        let map = read_optional(&map_path)?.unwrap_or_default();
        // special_tokens_map.json overrides tokenizer_config.json, as in transformers.
        let pick = |a: &Option<SpecialToken>, b: &Option<SpecialToken>, default: &str| {
            a.clone()
                .or_else(|| b.clone())
                .unwrap_or_else(|| SpecialToken::Text(default.to_owned()))
        };
        let bos = pick(&map.bos_token, &config.bos_token, "<|startoftext|>");
        let eos = pick(&map.eos_token, &config.eos_token, "<|endoftext|>");
        let pad = pick(&map.pad_token, &config.pad_token, "<|endoftext|>");
        let unk = pick(&map.unk_token, &config.unk_token, "<|endoftext|>");

        let json_path = dir.join("tokenizer.json");
        let (mut tokenizer, source, mut added) = if json_path.is_file() {
            // tokenizer.json gives the vocabulary, merges and added tokens (with their
            // `normalized` flags); transformers 5's CLIPTokenizer rebuilds the normalizer and
            // pre-tokenizer itself, whatever the file says, and so do we.
            let mut t = Tokenizer::from_file(&json_path).map_err(|e| {
                Error::config(&json_path, None, format!("not a valid tokenizer.json: {e}"))
            })?;
            set_clip_pipeline(&mut t)?;
            (t, json_path, Vec::new())
        } else {
            let t = build_from_vocab(dir, unk.content())?;
            let added: Vec<AddedToken> = config
                .added_tokens_decoder
                .iter()
                .flat_map(|d| d.values().map(AddedTokenJson::added_token))
                .collect();
            (t, dir.join("vocab.json"), added)
        };
        // Named special tokens that are not added tokens yet are registered as transformers does.
        for tok in [&unk, &bos, &eos, &pad] {
            let known = tokenizer
                .get_added_tokens_decoder()
                .values()
                .chain(added.iter())
                .any(|a| a.content == tok.content());
            if !known {
                added.push(tok.added_token());
            }
        }
        tokenizer.add_special_tokens(added).map_err(|e| {
            Error::config(
                &source,
                None,
                format!("cannot register the special tokens: {e}"),
            )
        })?;

        let id = |tok: &SpecialToken, key: &str| -> Result<u32> {
            tokenizer.token_to_id(tok.content()).ok_or_else(|| {
                config_err(
                    &source,
                    key,
                    format!(
                        "special token `{}` is not in the vocabulary of {}",
                        tok.content(),
                        source.display()
                    ),
                )
            })
        };
        let bos_id = id(&bos, "bos_token")?;
        let eos_id = id(&eos, "eos_token")?;
        let pad_id = id(&pad, "pad_token")?;

        let model_max_length = match config.model_max_length {
            None => {
                log::warn!(
                    "{}: no `model_max_length`; using CLIP's 77",
                    config_path.display()
                );
                77
            }
            // bos + at least one content token + eos: with 2, chunks would hold no token
            Some(n) if n.fract() == 0.0 && (3.0..=1e6).contains(&n) => n as usize,
            Some(n) => {
                return Err(config_err(
                    &config_path,
                    "model_max_length",
                    format!(
                        "is {n}, expected a whole number of tokens from 3 (bos, one content \
                         token, eos) to 1000000 (CLIP uses 77)"
                    ),
                ))
            }
        };
        Ok(Self {
            tokenizer,
            model_max_length,
            bos_id,
            eos_id,
            pad_id,
            expansions: Default::default(),
        })
    }

    /// A copy with a textual-inversion token of `vectors` vectors: `token`, `token_1`, …
    /// added as ordinary tokens (transformers' `add_tokens`, as diffusers'
    /// `load_textual_inversion`), `token` in a prompt standing for all of them (diffusers'
    /// `maybe_convert_prompt`). Returns the new ids; a token the tokenizer already has is
    /// refused, as diffusers does.
    pub fn with_embedding_tokens(&self, token: &str, vectors: usize) -> Result<(Self, Vec<u32>)> {
        let names: Vec<String> = (0..vectors)
            .map(|i| {
                if i == 0 {
                    token.to_owned()
                } else {
                    format!("{token}_{i}")
                }
            })
            .collect();
        if let Some(n) = names
            .iter()
            .find(|n| self.tokenizer.token_to_id(n).is_some())
        {
            return Err(Error::invalid_argument(
                "embedding token",
                n,
                "a token the tokenizer does not have yet (name the embedding with PATH:TOKEN)",
            ));
        }
        let mut t = self.clone();
        t.tokenizer
            .add_tokens(names.iter().map(|n| AddedToken::from(n.clone(), false)))
            .map_err(|e| Error::invalid_argument("embedding token", token, e.to_string()))?;
        let ids = names
            .iter()
            .map(|n| {
                t.tokenizer.token_to_id(n).ok_or_else(|| {
                    Error::invalid_argument("embedding token", n, "a token the tokenizer accepts")
                })
            })
            .collect::<Result<Vec<u32>>>()?;
        if let (Some(&first), true) = (ids.first(), ids.len() > 1) {
            t.expansions.insert(first, ids.clone());
        }
        Ok((t, ids))
    }

    /// The padded sequence length (77 for every CLIP tokenizer of SD 1.x/2.x/SDXL).
    pub fn model_max_length(&self) -> usize {
        self.model_max_length
    }

    /// Content tokens one sequence can hold: `model_max_length - 2` (75), bos and eos excluded.
    pub fn chunk_len(&self) -> usize {
        self.model_max_length - 2
    }

    /// Id of `<|startoftext|>`.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Id of `<|endoftext|>`.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Id of the pad token (`<|endoftext|>` for SD 1.x, `!` = 0 for SD 2.x / SDXL's second).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The content tokens of `prompt`, untruncated, without bos/eos.
    pub fn tokenize(&self, prompt: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode_fast(prompt, false)
            .map_err(|e| Error::invalid_argument("prompt", format!("{prompt:?}"), e.to_string()))?;
        if self.expansions.is_empty() {
            return Ok(enc.get_ids().to_vec());
        }
        Ok(enc
            .get_ids()
            .iter()
            .flat_map(|id| match self.expansions.get(id) {
                Some(ids) => ids.clone(),
                None => vec![*id],
            })
            .collect())
    }

    /// `prompt` as the pipelines feed it: bos, the first `model_max_length - 2` content tokens,
    /// eos, padding. [`Tokens::dropped`] counts the content tokens cut off (the pipelines warn).
    pub fn encode(&self, prompt: &str) -> Result<Tokens> {
        let content = self.tokenize(prompt)?;
        let keep = content.len().min(self.chunk_len());
        let mut tokens = self.wrap(&content[..keep]);
        tokens.dropped = content.len() - keep;
        Ok(tokens)
    }

    /// Long-prompt encoding: the content split into chunks of `model_max_length - 2` (75) tokens,
    /// each wrapped in bos/eos and padded to `model_max_length`, as AUTOMATIC1111 and compel do
    /// before encoding the chunks separately and concatenating them along the sequence axis.
    /// Nothing is dropped; an empty prompt gives one chunk.
    pub fn encode_chunked(&self, prompt: &str) -> Result<Vec<Tokens>> {
        let content = self.tokenize(prompt)?;
        if content.is_empty() {
            return Ok(vec![self.wrap(&[])]);
        }
        Ok(content
            .chunks(self.chunk_len())
            .map(|c| self.wrap(c))
            .collect())
    }

    /// bos + `content` (at most `chunk_len` tokens) + eos + padding.
    fn wrap(&self, content: &[u32]) -> Tokens {
        let n = self.model_max_length;
        let mut ids = Vec::with_capacity(n);
        ids.push(self.bos_id);
        ids.extend_from_slice(&content[..content.len().min(n - 2)]);
        ids.push(self.eos_id);
        let used = ids.len();
        ids.resize(n, self.pad_id);
        let mut attention_mask = vec![1; used];
        attention_mask.resize(n, 0);
        Tokens {
            ids,
            attention_mask,
            dropped: 0,
        }
    }

    /// The underlying `tokenizers` tokenizer (for decoding or inspection).
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

/// The pipeline transformers' `CLIPTokenizer.__init__` builds from `vocab.json` + `merges.txt`.
fn build_from_vocab(dir: &Path, unk: &str) -> Result<Tokenizer> {
    let vocab = dir.join("vocab.json");
    let merges = dir.join("merges.txt");
    for f in [&vocab, &merges] {
        if !f.is_file() {
            return Err(Error::io(
                f,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "tokenizer file not found (a CLIP tokenizer folder needs tokenizer.json, or \
                     vocab.json and merges.txt)",
                ),
            ));
        }
    }
    let path_str = |p: &PathBuf| -> Result<String> {
        p.to_str()
            .map(str::to_owned)
            .ok_or_else(|| Error::invalid_argument("tokenizer path", p.display(), "a UTF-8 path"))
    };
    let bpe = BPE::from_file(&path_str(&vocab)?, &path_str(&merges)?)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".to_owned())
        .unk_token(unk.to_owned())
        .build()
        .map_err(|e| {
            Error::config(
                &vocab,
                None,
                format!("cannot build the BPE model from vocab.json and merges.txt: {e}"),
            )
        })?;
    let mut t = Tokenizer::new(bpe);
    set_clip_pipeline(&mut t)?;
    Ok(t)
}

/// The normalizer, pre-tokenizer and decoder of transformers' `CLIPTokenizer.__init__`.
fn set_clip_pipeline(t: &mut Tokenizer) -> Result<()> {
    let pattern_err =
        |e: tokenizers::Error| Error::unsupported(format!("CLIP tokenizer regex rejected: {e}"));
    let normalizer = NormalizerSequence::new(vec![
        NFC.into(),
        Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".to_owned()),
            " ",
        )
        .map_err(pattern_err)?
        .into(),
        Lowercase.into(),
    ]);
    let pre_tokenizer = PreTokenizerSequence::new(vec![
        Split::new(
            SplitPattern::Regex(CLIP_SPLIT_PATTERN.to_owned()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(pattern_err)?
        .into(),
        ByteLevel::new(false, true, true).into(),
    ]);
    t.with_normalizer(Some(normalizer)).map_err(pattern_err)?;
    t.with_pre_tokenizer(Some(pre_tokenizer));
    t.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(())
}
