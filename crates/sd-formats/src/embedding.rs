//! Textual-inversion embeddings: AUTOMATIC1111's `emb_params` files, diffusers'
//! `{token: tensor}` files (`learned_embeds.safetensors`), multi-vector embeddings (`[n, d]`,
//! used as `tok tok_1 … tok_{n-1}` as diffusers does) and SDXL files with `clip_l` and `clip_g`
//! (for the first and second text encoder). Pickled `.pt`/`.bin` embeddings are refused.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sd_core::{Error, Result, WeightFiles};

use crate::checkpoint::refuse_pickle;

/// A textual-inversion file: the trigger token and its vectors per text encoder.
#[derive(Debug, Clone)]
pub struct EmbeddingFile {
    path: PathBuf,
    token: String,
    /// `[n, d]` for the first text encoder (SD 1.x/2.x's only one, SDXL's CLIP-L).
    pub clip_l: Option<Tensor>,
    /// `[n, d]` for SDXL's second text encoder (OpenCLIP bigG), from `clip_g`.
    pub clip_g: Option<Tensor>,
    /// `[n, d]` of a single-encoder file (`emb_params` or `{token: tensor}`): applied to the text
    /// encoder of matching width.
    pub single: Option<Tensor>,
}

fn as_matrix(t: Tensor, path: &Path, key: &str) -> Result<Tensor> {
    match t.rank() {
        1 => Ok(t.unsqueeze(0)?),
        2 if t.dim(0)? > 0 => Ok(t),
        _ => Err(Error::unsupported(format!(
            "{}: `{key}` has shape {:?}; an embedding is [dim] or [vectors, dim]",
            path.display(),
            t.dims()
        ))),
    }
}

impl EmbeddingFile {
    /// Reads `path`; the trigger token is `token`, else the file stem (what AUTOMATIC1111 users
    /// type; a diffusers `learned_embeds.safetensors` needs its token given).
    pub fn open(path: &Path, token: Option<&str>) -> Result<Self> {
        refuse_pickle(path, "embeddings")?;
        let files = WeightFiles::open(&[path.to_path_buf()])?;
        let mut keys: Vec<&str> = files.names().collect();
        keys.sort();
        let dev = Device::Cpu;
        let load =
            |k: &str| -> Result<Tensor> { as_matrix(files.load(k, DType::F32, &dev)?, path, k) };
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (mut clip_l, mut clip_g, mut single) = (None, None, None);
        match keys.as_slice() {
            ["clip_g", "clip_l"] => {
                clip_l = Some(load("clip_l")?);
                clip_g = Some(load("clip_g")?);
            }
            ["emb_params"] => single = Some(load("emb_params")?),
            // diffusers' `{token: tensor}` (the key is ignored: the trigger is the stem or
            // `:TOKEN`, as in AUTOMATIC1111), or a converted A1111 `string_to_param.*`.
            [k] => single = Some(load(k)?),
            _ => {
                return Err(Error::unsupported(format!(
                "{}: not a textual-inversion file; expected `emb_params`, one `<token>` tensor, \
                     or `clip_l` + `clip_g` (SDXL), found {}",
                path.display(),
                if keys.is_empty() {
                    "no tensors".to_owned()
                } else {
                    keys.iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            )))
            }
        }
        // A1111 users type the file stem; diffusers' token= (here `:TOKEN`) overrides it.
        let token = token.map(str::to_owned).unwrap_or(stem);
        if token.trim().is_empty() || token.contains(char::is_whitespace) {
            return Err(Error::invalid_argument(
                "embedding token",
                format!("{token:?}"),
                "one word without spaces (name it with PATH:TOKEN)",
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            token,
            clip_l,
            clip_g,
            single,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The trigger token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The tokens of `n` vectors as diffusers adds them: `tok`, `tok_1`, … `tok_{n-1}`.
    pub fn tokens(&self, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                if i == 0 {
                    self.token.clone()
                } else {
                    format!("{}_{i}", self.token)
                }
            })
            .collect()
    }
}
