//! Text encoders of single-file checkpoints under transformers' CLIP names.
//!
//! CLIP ViT-L (SD 1.x, SDXL's first encoder) is stored with transformers' names under a prefix
//! (diffusers' `convert_ldm_clip_checkpoint`); very old SD 1 files lack the `text_model.`
//! segment, which is added back (as AUTOMATIC1111 does). OpenCLIP (SD 2.x ViT-H, SDXL bigG) is
//! converted as diffusers' `convert_open_clip_checkpoint`: `resblocks.N` -> `encoder.layers.N`,
//! `ln_1/ln_2` -> `layer_norm1/2`, `mlp.c_fc/c_proj` -> `mlp.fc1/fc2`, `attn` -> `self_attn`, the
//! fused `attn.in_proj_weight/bias` `[3H, …]` split by rows into `q_proj`, `k_proj`, `v_proj`,
//! and `text_projection` transposed (OpenCLIP computes `x @ P`, a linear layer `x W^T`).

use std::sync::Arc;

use sd_core::{Derive, Error, Result, WeightFiles, WeightMap};

/// Tensors that checkpoints carry but no model reads (not owned, so never reported).
const IGNORED: &[&str] = &["position_ids", "logit_scale", "attn_mask"];

fn keys_under(files: &WeightFiles, prefix: &str) -> Vec<String> {
    let mut keys: Vec<String> = files
        .names()
        .filter(|k| k.starts_with(prefix))
        .filter(|k| !IGNORED.iter().any(|i| k.ends_with(i)))
        .map(str::to_owned)
        .collect();
    keys.sort();
    keys
}

/// CLIP ViT-L under `prefix` (transformers' names, with `text_model.` added if absent).
pub(crate) fn clip_map(files: Arc<WeightFiles>, prefix: &str) -> WeightMap {
    let keys = keys_under(&files, prefix);
    let mut m = WeightMap::new(files);
    for key in keys {
        let rest = &key[prefix.len()..];
        let name = if rest.starts_with("text_model.") || rest.starts_with("text_projection.") {
            rest.to_owned()
        } else {
            format!("text_model.{rest}")
        };
        m.insert(name, key, Derive::Same);
    }
    m
}

/// The transformers name of an OpenCLIP layer tensor name (after `resblocks.N.`), with the
/// fused q/k/v flag.
fn layer_name(rest: &str) -> Option<(String, bool)> {
    const RENAMES: &[(&str, &str)] = &[
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
        ("attn.out_proj.", "self_attn.out_proj."),
    ];
    for (from, to) in RENAMES {
        if let Some(t) = rest.strip_prefix(from) {
            return Some((format!("{to}{t}"), false));
        }
    }
    match rest {
        "attn.in_proj_weight" => Some(("weight".to_owned(), true)),
        "attn.in_proj_bias" => Some(("bias".to_owned(), true)),
        _ => None,
    }
}

/// OpenCLIP under `prefix` for a transformers text model of `num_layers` layers. With
/// `drop_last` (SD 2.x) the file's layer `num_layers` is not used and not reported; without
/// `with_projection` neither is `text_projection`.
pub(crate) fn open_clip_map(
    files: Arc<WeightFiles>,
    prefix: &str,
    num_layers: usize,
    drop_last: bool,
    with_projection: bool,
) -> Result<WeightMap> {
    let keys = keys_under(&files, prefix);
    let mut m = WeightMap::new(files.clone());
    for key in keys {
        let rest = &key[prefix.len()..];
        let fixed = match rest {
            "positional_embedding" => Some("text_model.embeddings.position_embedding.weight"),
            "token_embedding.weight" => Some("text_model.embeddings.token_embedding.weight"),
            "ln_final.weight" => Some("text_model.final_layer_norm.weight"),
            "ln_final.bias" => Some("text_model.final_layer_norm.bias"),
            _ => None,
        };
        if let Some(name) = fixed {
            m.insert(name, key, Derive::Same);
            continue;
        }
        if rest == "text_projection" {
            if with_projection {
                m.insert("text_projection.weight", key, Derive::Transpose);
            } else if !drop_last {
                m.own(key);
            }
            continue;
        }
        let Some((n, layer_rest)) = rest
            .strip_prefix("transformer.resblocks.")
            .and_then(|t| t.split_once('.'))
            .and_then(|(n, t)| Some((n.parse::<usize>().ok()?, t)))
        else {
            m.own(key);
            continue;
        };
        if drop_last && n == num_layers {
            continue;
        }
        let base = format!("text_model.encoder.layers.{n}");
        match layer_name(layer_rest) {
            Some((param, true)) => {
                let rows = files
                    .shape(&key)
                    .and_then(|s| s.first().copied())
                    .unwrap_or(0);
                if !rows.is_multiple_of(3) {
                    return Err(Error::unsupported(format!(
                        "{}: `{key}` has {rows} rows; a fused q/k/v projection has 3 x hidden",
                        files
                            .paths()
                            .first()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default()
                    )));
                }
                let h = rows / 3;
                for (i, part) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                    m.insert(
                        format!("{base}.self_attn.{part}.{param}"),
                        key.clone(),
                        Derive::Rows {
                            start: i * h,
                            len: h,
                        },
                    );
                }
            }
            Some((name, false)) => m.insert(format!("{base}.{name}"), key, Derive::Same),
            None => m.own(key),
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names() {
        assert_eq!(
            layer_name("ln_1.weight"),
            Some(("layer_norm1.weight".into(), false))
        );
        assert_eq!(
            layer_name("mlp.c_proj.bias"),
            Some(("mlp.fc2.bias".into(), false))
        );
        assert_eq!(
            layer_name("attn.out_proj.weight"),
            Some(("self_attn.out_proj.weight".into(), false))
        );
        assert_eq!(layer_name("attn.in_proj_bias"), Some(("bias".into(), true)));
        assert_eq!(layer_name("attn.other"), None);
    }
}
