//! LoRA files: kohya/AUTOMATIC1111 (`lora_unet_…`, `lora_te_…`, `lora_te1_…`, `lora_te2_…` with
//! `lora_down`/`lora_up`/`alpha`, SDXL files with the original `input_blocks`/`middle_block`/
//! `output_blocks` names, LoCon convolutions), diffusers/PEFT (`unet.….lora_A/lora_B`, with the
//! `lora_adapter_metadata` header when present) and diffusers' older names (`….processor.to_q_lora.down`,
//! `….lora.down`, `….lora_linear_layer.down`).
//!
//! [`LoraFile::open`] reads and classifies the keys; [`LoraFile::deltas`] resolves every module
//! against a model component's weight names and computes `scale · up @ down` (reshaped to the
//! weight), with `scale = alpha / rank · weight` per module (kohya/A1111's rule; alpha absent or
//! 0 means alpha = rank; PEFT files: `lora_alpha / r` from the metadata, else 1).
//! LyCORIS LoHa / LoKr and CP-decomposed LoCon (`lora_mid`) are refused by name.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use sd_core::{Error, Result, WeightFiles};

use crate::checkpoint::refuse_pickle;

/// The model component a LoRA module belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoraTarget {
    /// The UNet.
    Unet,
    /// The (first) text encoder: `lora_te_` (SD 1.x/2.x), `lora_te1_` (SDXL), `text_encoder.`.
    TextEncoder,
    /// SDXL's second text encoder: `lora_te2_`, `text_encoder_2.`.
    TextEncoder2,
}

impl LoraTarget {
    /// The diffusers component name.
    pub fn component(self) -> &'static str {
        match self {
            LoraTarget::Unet => "unet",
            LoraTarget::TextEncoder => "text_encoder",
            LoraTarget::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// How the file names its modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// kohya / AUTOMATIC1111: flat names, `lora_down`/`lora_up`/`alpha`.
    Kohya,
    /// diffusers / PEFT dotted module paths (`lora_A`/`lora_B`, or the older diffusers names).
    Diffusers,
}

/// One low-rank module of the file.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// Which component.
    pub target: LoraTarget,
    /// The module's name in the file (kohya: the flat name after the prefix; diffusers: the
    /// dotted path after the component).
    pub name: String,
    /// Whether `name` uses the SGM/LDM UNet numbering (`input_blocks_4_1_…`, kohya SDXL).
    pub sgm: bool,
    down: String,
    up: String,
    alpha: Option<f64>,
}

/// A LoRA file, memory-mapped, with its modules classified.
#[derive(Debug, Clone)]
pub struct LoraFile {
    path: PathBuf,
    files: Arc<WeightFiles>,
    format: LoraFormat,
    modules: Vec<LoraModule>,
    unknown: Vec<String>,
    /// PEFT metadata alpha / r per component.
    peft_scale: BTreeMap<LoraTarget, f64>,
    sdxl_names: bool,
    sd_names: bool,
}

/// Deltas for one component: weight name (`….weight`) to the tensor to add.
pub type Deltas = BTreeMap<String, Tensor>;

/// What a module resolves against: the component's weight names and shapes.
pub trait ComponentWeights {
    /// The shape of the weight `name` (e.g. `down_blocks.0.….to_q.weight`), if the model has it.
    fn weight_shape(&self, name: &str) -> Option<Vec<usize>>;
    /// Every weight name ending in `.weight`.
    fn weight_names(&self) -> Vec<String>;
}

impl ComponentWeights for sd_core::WeightMap {
    fn weight_shape(&self, name: &str) -> Option<Vec<usize>> {
        self.mapped_shape(name)
    }
    fn weight_names(&self) -> Vec<String> {
        self.names()
            .filter(|n| n.ends_with(".weight"))
            .map(str::to_owned)
            .collect()
    }
}

fn unsupported(path: &Path, what: &str) -> Error {
    Error::unsupported(format!("{}: {what}", path.display()))
}

/// diffusers' older LoRA names rewritten to PEFT's `lora_A`/`lora_B`, as diffusers'
/// `convert_unet_state_dict_to_peft` / `convert_state_dict_to_peft` do.
fn peft_key(key: &str) -> String {
    let mut k = key.replace(".processor.", ".");
    for (from, to) in [
        (".to_q_lora.down.", ".to_q.lora_A."),
        (".to_q_lora.up.", ".to_q.lora_B."),
        (".to_k_lora.down.", ".to_k.lora_A."),
        (".to_k_lora.up.", ".to_k.lora_B."),
        (".to_v_lora.down.", ".to_v.lora_A."),
        (".to_v_lora.up.", ".to_v.lora_B."),
        (".to_out_lora.down.", ".to_out.0.lora_A."),
        (".to_out_lora.up.", ".to_out.0.lora_B."),
        (".lora_linear_layer.down.", ".lora_A."),
        (".lora_linear_layer.up.", ".lora_B."),
        (".lora.down.", ".lora_A."),
        (".lora.up.", ".lora_B."),
    ] {
        if k.contains(from) {
            k = k.replace(from, to);
            break;
        }
    }
    // Text encoders of the old format name attention projections to_q/…/to_out.
    if k.starts_with("text_encoder") {
        for (from, to) in [
            ("self_attn.to_q.", "self_attn.q_proj."),
            ("self_attn.to_k.", "self_attn.k_proj."),
            ("self_attn.to_v.", "self_attn.v_proj."),
            ("self_attn.to_out.0.", "self_attn.out_proj."),
        ] {
            k = k.replace(from, to);
        }
    }
    k
}

impl LoraFile {
    /// Reads `path` (safetensors only; pickled `.pt`/`.bin`/`.ckpt` refused) and classifies its
    /// keys. LoHa, LoKr and `lora_mid` (CP-decomposed LoCon) files are refused by name; DoRA
    /// magnitudes (`dora_scale`) are dropped with a warning, as diffusers does.
    pub fn open(path: &Path) -> Result<Self> {
        refuse_pickle(path, "LoRAs")?;
        let files = Arc::new(WeightFiles::open(&[path.to_path_buf()])?);
        let mut names: Vec<String> = files.names().map(str::to_owned).collect();
        names.sort();
        for (needle, what) in [
            ("hada_", "a LyCORIS LoHa file (hada_w1_a/…); sd-rs supports LoRA and LoCon (lora_down/lora_up) only"),
            ("lokr_", "a LyCORIS LoKr file (lokr_w1/…); sd-rs supports LoRA and LoCon (lora_down/lora_up) only"),
            (".lora_mid.", "a LoCon file with CP/Tucker decomposition (lora_mid); sd-rs supports lora_down/lora_up pairs only"),
        ] {
            if names.iter().any(|n| n.contains(needle)) {
                return Err(unsupported(path, what));
            }
        }
        let dora = names.iter().filter(|n| n.contains("dora_scale")).count();
        if dora > 0 {
            log::warn!(
                "{}: {dora} DoRA magnitude tensors (dora_scale) ignored; the file is applied as a plain LoRA, as diffusers does",
                path.display()
            );
        }
        names.retain(|n| !n.contains("dora_scale"));
        let kohya = ["lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"];
        let is_kohya = |n: &str| kohya.iter().any(|p| n.starts_with(p));
        let format = if !names.is_empty() && names.iter().all(|n| is_kohya(n)) {
            LoraFormat::Kohya
        } else {
            LoraFormat::Diffusers
        };
        let mut unknown = Vec::new();
        let mut groups: BTreeMap<(LoraTarget, String), [Option<String>; 3]> = BTreeMap::new();
        for key in &names {
            let parsed = match format {
                LoraFormat::Kohya => parse_kohya(key),
                LoraFormat::Diffusers => parse_diffusers(key),
            };
            match parsed {
                Some((target, module, slot)) => {
                    groups.entry((target, module)).or_default()[slot] = Some(key.clone());
                }
                None => unknown.push(key.clone()),
            }
        }
        let mut modules = Vec::new();
        for ((target, name), [down, up, alpha_key]) in groups {
            let (Some(down), Some(up)) = (down, up) else {
                return Err(unsupported(
                    path,
                    &format!("module `{name}` lacks its down or up matrix (lora_down/lora_A, lora_up/lora_B)"),
                ));
            };
            let alpha = match alpha_key {
                Some(k) => Some(scalar(&files, &k)?),
                None => None,
            };
            let sgm = target == LoraTarget::Unet
                && format == LoraFormat::Kohya
                && [
                    "input_blocks_",
                    "middle_block_",
                    "output_blocks_",
                    "time_embed_",
                    "label_emb_",
                    "out_",
                ]
                .iter()
                .any(|p| name.starts_with(p));
            modules.push(LoraModule {
                target,
                name,
                sgm,
                down,
                up,
                alpha,
            });
        }
        if modules.is_empty() {
            return Err(unsupported(
                path,
                "no LoRA modules found (expected kohya lora_unet_…/lora_te…_ lora_down/lora_up keys or diffusers/PEFT lora_A/lora_B keys)",
            ));
        }
        let peft_scale = peft_metadata_scale(path)?;
        let sdxl_names = names
            .iter()
            .any(|n| n.starts_with("lora_te1_") || n.starts_with("lora_te2_"))
            || modules
                .iter()
                .any(|m| m.sgm || m.target == LoraTarget::TextEncoder2);
        let sd_names = names.iter().any(|n| n.starts_with("lora_te_"));
        Ok(Self {
            sdxl_names,
            sd_names,
            path: path.to_path_buf(),
            files,
            format,
            modules,
            unknown,
            peft_scale,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The naming scheme.
    pub fn format(&self) -> LoraFormat {
        self.format
    }

    /// The modules.
    pub fn modules(&self) -> &[LoraModule] {
        &self.modules
    }

    /// Keys that are not part of any LoRA module.
    pub fn unknown_keys(&self) -> &[String] {
        &self.unknown
    }

    /// The file names its modules as only SDXL files do (`lora_te1_`/`lora_te2_`, the second
    /// text encoder, SGM UNet names).
    pub fn has_sdxl_names(&self) -> bool {
        self.sdxl_names
    }

    /// The file names its text encoder as SD 1.x/2.x files do (`lora_te_`).
    pub fn has_sd_names(&self) -> bool {
        self.sd_names
    }

    /// Which components the file touches.
    pub fn targets(&self) -> Vec<LoraTarget> {
        let mut t: Vec<LoraTarget> = self.modules.iter().map(|m| m.target).collect();
        t.sort();
        t.dedup();
        t
    }

    /// The width of the text embeddings the UNet's cross-attention was trained on (the input
    /// width of an `attn2.to_k`/`to_v` down matrix), when the file has one.
    pub fn cross_attention_width(&self) -> Option<usize> {
        self.modules
            .iter()
            .filter(|m| m.target == LoraTarget::Unet)
            .filter(|m| {
                let n = m.name.replace('.', "_");
                n.ends_with("attn2_to_k") || n.ends_with("attn2_to_v")
            })
            .find_map(|m| self.files.shape(&m.down).and_then(|s| s.get(1).copied()))
    }

    /// The deltas of the modules of `target`, resolved against `weights`, each multiplied by
    /// `weight` (the user's strength). `lpb` is the UNet's `layers_per_block` (for SGM names).
    ///
    /// Returns the deltas (weight name -> tensor, f32) and the modules that match no weight
    /// (by their file names); a module whose delta does not fit its weight's shape is an error.
    pub fn deltas(
        &self,
        target: LoraTarget,
        weights: &dyn ComponentWeights,
        lpb: usize,
        weight: f64,
    ) -> Result<(Deltas, Vec<String>)> {
        let mut flat: HashMap<String, String> = HashMap::new();
        for n in weights.weight_names() {
            let module = &n[..n.len() - ".weight".len()];
            let module = module.strip_prefix("text_model.").unwrap_or(module);
            flat.insert(module.replace('.', "_"), n.clone());
        }
        let dev = Device::Cpu;
        let mut out = Deltas::new();
        let mut unmatched = Vec::new();
        for m in self.modules.iter().filter(|m| m.target == target) {
            let resolved = match self.format {
                LoraFormat::Kohya => {
                    let name = if m.sgm {
                        sgm_to_diffusers_flat(&m.name, lpb)
                    } else {
                        Some(m.name.clone())
                    };
                    name.and_then(|n| {
                        let n = n.strip_prefix("text_model_").unwrap_or(&n).to_owned();
                        flat.get(&n).cloned()
                    })
                }
                LoraFormat::Diffusers => {
                    let n = m.name.strip_prefix("text_model.").unwrap_or(&m.name);
                    flat.get(&n.replace('.', "_")).cloned()
                }
            };
            let Some(wname) = resolved else {
                unmatched.push(self.display_name(m));
                continue;
            };
            let Some(shape) = weights.weight_shape(&wname) else {
                unmatched.push(self.display_name(m));
                continue;
            };
            let down = self.files.load(&m.down, DType::F32, &dev)?;
            let up = self.files.load(&m.up, DType::F32, &dev)?;
            let rank = down.dims().first().copied().unwrap_or(0);
            let out_dim = up.dims().first().copied().unwrap_or(0);
            let up_rank: usize = up.dims().iter().skip(1).product();
            let numel: usize = shape.iter().product();
            let down_cols = down.elem_count().checked_div(rank).unwrap_or(0);
            if rank == 0
                || up_rank != rank
                || out_dim.checked_mul(down_cols) != Some(numel)
                || shape.first() != Some(&out_dim)
            {
                return Err(unsupported(
                    &self.path,
                    &format!(
                        "`{}`: down {:?} and up {:?} do not fit `{wname}` of shape {shape:?}; the LoRA was made for another model",
                        self.display_name(m),
                        down.dims(),
                        up.dims()
                    ),
                ));
            }
            let scale = match self.format {
                LoraFormat::Kohya => {
                    let alpha = m.alpha.filter(|&a| a != 0.0).unwrap_or(rank as f64);
                    alpha / rank as f64
                }
                LoraFormat::Diffusers => m
                    .alpha
                    .map(|a| a / rank as f64)
                    .or_else(|| self.peft_scale.get(&target).copied())
                    .unwrap_or(1.0),
            } * weight;
            let delta = up
                .reshape((out_dim, rank))?
                .matmul(&down.reshape((rank, down_cols))?)?
                .affine(scale, 0.0)?
                .reshape(shape)?;
            match out.remove(&wname) {
                Some(prev) => out.insert(wname, (prev + delta)?),
                None => out.insert(wname, delta),
            };
        }
        Ok((out, unmatched))
    }

    fn display_name(&self, m: &LoraModule) -> String {
        match self.format {
            LoraFormat::Kohya => m.down.split('.').next().unwrap_or(&m.down).to_owned(),
            LoraFormat::Diffusers => format!("{}.{}", m.target.component(), m.name),
        }
    }
}

fn scalar(files: &WeightFiles, key: &str) -> Result<f64> {
    let t = files.load(key, DType::F32, &Device::Cpu)?;
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    match v.as_slice() {
        [a] if a.is_finite() => Ok(*a as f64),
        _ => Err(Error::unsupported(format!(
            "`{key}` in {}: an alpha must be one finite number, got {} values",
            files
                .paths()
                .first()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            v.len()
        ))),
    }
}

/// (target, module name, slot 0 down / 1 up / 2 alpha) of a kohya key.
fn parse_kohya(key: &str) -> Option<(LoraTarget, String, usize)> {
    let (name, suffix) = key.split_once('.')?;
    let slot = match suffix {
        "lora_down.weight" => 0,
        "lora_up.weight" => 1,
        "alpha" => 2,
        _ => return None,
    };
    for (prefix, target) in [
        ("lora_unet_", LoraTarget::Unet),
        ("lora_te1_", LoraTarget::TextEncoder),
        ("lora_te2_", LoraTarget::TextEncoder2),
        ("lora_te_", LoraTarget::TextEncoder),
    ] {
        if let Some(rest) = name.strip_prefix(prefix) {
            return Some((target, rest.to_owned(), slot));
        }
    }
    None
}

/// (target, module path, slot) of a diffusers/PEFT key.
fn parse_diffusers(key: &str) -> Option<(LoraTarget, String, usize)> {
    let k = peft_key(key);
    let (target, rest) = if let Some(r) = k.strip_prefix("unet.") {
        (LoraTarget::Unet, r)
    } else if let Some(r) = k.strip_prefix("text_encoder_2.") {
        (LoraTarget::TextEncoder2, r)
    } else if let Some(r) = k.strip_prefix("text_encoder.") {
        (LoraTarget::TextEncoder, r)
    } else {
        return None;
    };
    for (suffix, slot) in [(".lora_A.weight", 0), (".lora_B.weight", 1), (".alpha", 2)] {
        if let Some(m) = rest.strip_suffix(suffix) {
            return Some((target, m.to_owned(), slot));
        }
    }
    None
}

/// The PEFT `lora_adapter_metadata` header: `{component}.lora_alpha / {component}.r`.
fn peft_metadata_scale(path: &Path) -> Result<BTreeMap<LoraTarget, f64>> {
    let mut out = BTreeMap::new();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let Some(len) = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
    else {
        return Ok(out);
    };
    let Some(header) = usize::try_from(len)
        .ok()
        .and_then(|n| bytes.get(8..8usize.checked_add(n)?))
    else {
        return Ok(out);
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(header) else {
        return Ok(out);
    };
    let Some(meta) = v
        .get("__metadata__")
        .and_then(|m| m.get("lora_adapter_metadata"))
        .and_then(|m| m.as_str())
    else {
        return Ok(out);
    };
    let meta: serde_json::Value = serde_json::from_str(meta).map_err(|e| {
        Error::unsupported(format!(
            "{}: lora_adapter_metadata is not JSON: {e}",
            path.display()
        ))
    })?;
    for t in [
        LoraTarget::Unet,
        LoraTarget::TextEncoder,
        LoraTarget::TextEncoder2,
    ] {
        let c = t.component();
        let get = |k: &str| meta.get(format!("{c}.{k}")).and_then(|x| x.as_f64());
        if let (Some(alpha), Some(r)) = (get("lora_alpha"), get("r")) {
            if r > 0.0 {
                out.insert(t, alpha / r);
            }
            let patterns = ["alpha_pattern", "rank_pattern"].iter().any(|p| {
                meta.get(format!("{c}.{p}"))
                    .and_then(|x| x.as_object())
                    .is_some_and(|o| !o.is_empty())
            });
            if patterns {
                log::warn!(
                    "{}: per-module alpha/rank patterns in the metadata are not applied; {c} uses lora_alpha / r",
                    path.display()
                );
            }
        }
    }
    Ok(out)
}

/// A kohya SDXL name in the SGM numbering (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`)
/// as the flat diffusers name (`down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`).
pub fn sgm_to_diffusers_flat(name: &str, lpb: usize) -> Option<String> {
    let parts: Vec<&str> = name.split('_').collect();
    // The structural head: `input_blocks_I_J`, `output_blocks_I_J`, `middle_block_I`, `time_embed_I`,
    // `label_emb_0_I`, `out_I`.
    let (head, rest_at) = match parts.as_slice() {
        ["input" | "output", "blocks", i, j, ..] => (format!("{}_blocks.{i}.{j}", parts[0]), 4),
        ["middle", "block", i, ..] => (format!("middle_block.{i}"), 3),
        ["time", "embed", i, ..] => (format!("time_embed.{i}"), 3),
        ["label", "emb", i, j, ..] => (format!("label_emb.{i}.{j}"), 4),
        ["out", i, ..] => (format!("out.{i}"), 2),
        _ => return None,
    };
    let rest = parts
        .get(rest_at..)
        .map(|r| r.join("_"))
        .unwrap_or_default();
    // The ResNet / sampler sub-layers that carry an index of their own.
    let rest = [
        ("in_layers_0", "in_layers.0"),
        ("in_layers_2", "in_layers.2"),
        ("out_layers_0", "out_layers.0"),
        ("out_layers_3", "out_layers.3"),
        ("emb_layers_1", "emb_layers.1"),
    ]
    .iter()
    .find_map(|(a, b)| (rest == *a).then(|| (*b).to_owned()))
    .unwrap_or(rest);
    let dotted = if rest.is_empty() {
        format!("{head}.weight")
    } else {
        format!("{head}.{rest}.weight")
    };
    let d = crate::unet::diffusers_name(&dotted, lpb)?;
    Some(d.strip_suffix(".weight")?.replace('.', "_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgm_names() {
        let cases = [
            (
                "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
            ),
            ("middle_block_1_proj_in", "mid_block_attentions_0_proj_in"),
            ("output_blocks_2_2_conv", "up_blocks_0_upsamplers_0_conv"),
            (
                "input_blocks_1_0_emb_layers_1",
                "down_blocks_0_resnets_0_time_emb_proj",
            ),
            ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
            (
                "output_blocks_0_0_skip_connection",
                "up_blocks_0_resnets_0_conv_shortcut",
            ),
            (
                "input_blocks_1_0_in_layers_2",
                "down_blocks_0_resnets_0_conv1",
            ),
            ("time_embed_0", "time_embedding_linear_1"),
            ("label_emb_0_2", "add_embedding_linear_2"),
            ("out_2", "conv_out"),
        ];
        for (sgm, want) in cases {
            assert_eq!(
                sgm_to_diffusers_flat(sgm, 2).as_deref(),
                Some(want),
                "{sgm}"
            );
        }
        assert_eq!(sgm_to_diffusers_flat("down_blocks_0_x", 2), None);
    }

    #[test]
    fn old_diffusers_names() {
        assert_eq!(
            peft_key("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight"),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight"
        );
        assert_eq!(
            peft_key("text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight"),
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(
            peft_key(
                "text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_linear_layer.up.weight"
            ),
            "text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_B.weight"
        );
        assert_eq!(
            peft_key("unet.a.to_k.lora.down.weight"),
            "unet.a.to_k.lora_A.weight"
        );
    }
}
