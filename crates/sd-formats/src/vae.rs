//! LDM VAE names to diffusers' `AutoencoderKL` names, as diffusers'
//! `convert_ldm_vae_checkpoint`: `down.i.block.j` -> `down_blocks.i.resnets.j`, the decoder's
//! `up.i` numbered in reverse (`up.(n-1-i)` -> `up_blocks.i`), `mid.block_1/2` and `mid.attn_1`,
//! `norm_out` -> `conv_norm_out`, `nin_shortcut` -> `conv_shortcut`; the mid attention's 1x1
//! convolutions `q`, `k`, `v`, `proj_out` become linear `to_q`, `to_k`, `to_v`, `to_out.0`
//! (weights squeezed to `[C, C]`).

use std::sync::Arc;

use sd_core::{Derive, WeightFiles, WeightMap};

fn block_rest(rest: &str) -> String {
    match rest.strip_prefix("nin_shortcut.") {
        Some(t) => format!("conv_shortcut.{t}"),
        None => rest.to_owned(),
    }
}

/// The diffusers name of an LDM VAE name (without the prefix); `up_blocks` is the number of
/// decoder up blocks (for the reversed numbering). The flag says the tensor is a 1x1 conv
/// weight to squeeze.
pub fn diffusers_name(name: &str, up_blocks: usize) -> Option<(String, bool)> {
    for (from, to) in [
        ("quant_conv.", "quant_conv."),
        ("post_quant_conv.", "post_quant_conv."),
    ] {
        if let Some(t) = name.strip_prefix(from) {
            return Some((format!("{to}{t}"), false));
        }
    }
    let (side, rest) = name.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let plain = |s: String| Some((format!("{side}.{s}"), false));
    for fixed in ["conv_in.", "conv_out."] {
        if rest.starts_with(fixed) {
            return plain(rest.to_owned());
        }
    }
    if let Some(t) = rest.strip_prefix("norm_out.") {
        return plain(format!("conv_norm_out.{t}"));
    }
    if let Some(t) = rest.strip_prefix("mid.block_1.") {
        return plain(format!("mid_block.resnets.0.{}", block_rest(t)));
    }
    if let Some(t) = rest.strip_prefix("mid.block_2.") {
        return plain(format!("mid_block.resnets.1.{}", block_rest(t)));
    }
    if let Some(t) = rest.strip_prefix("mid.attn_1.") {
        let (part, param) = t.split_once('.')?;
        let to = match part {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        let squeeze = part != "norm" && param == "weight";
        return Some((
            format!("{side}.mid_block.attentions.0.{to}.{param}"),
            squeeze,
        ));
    }
    let (blocks, to_blocks, reverse) = match side {
        "encoder" => ("down.", "down_blocks", false),
        _ => ("up.", "up_blocks", true),
    };
    let t = rest.strip_prefix(blocks)?;
    let (i, t) = t.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let b = if reverse {
        up_blocks.checked_sub(1)?.checked_sub(i)?
    } else {
        i
    };
    if let Some(t) = t.strip_prefix("block.") {
        let (j, t) = t.split_once('.')?;
        let j: usize = j.parse().ok()?;
        return plain(format!("{to_blocks}.{b}.resnets.{j}.{}", block_rest(t)));
    }
    let sampler = if reverse {
        ("upsample.conv.", "upsamplers")
    } else {
        ("downsample.conv.", "downsamplers")
    };
    let t = t.strip_prefix(sampler.0)?;
    plain(format!("{to_blocks}.{b}.{}.0.conv.{t}", sampler.1))
}

/// The VAE view: every `prefix…` tensor is owned.
pub(crate) fn map(files: Arc<WeightFiles>, prefix: &str) -> WeightMap {
    let mut keys: Vec<String> = files
        .names()
        .filter(|k| k.starts_with(prefix))
        .map(str::to_owned)
        .collect();
    keys.sort();
    // The number of decoder up blocks, from the file itself.
    let up_blocks = keys
        .iter()
        .filter_map(|k| k[prefix.len()..].strip_prefix("decoder.up."))
        .filter_map(|t| t.split_once('.').and_then(|(i, _)| i.parse::<usize>().ok()))
        .max()
        .map_or(0, |m| m + 1);
    let mut m = WeightMap::new(files.clone());
    for key in keys {
        match diffusers_name(&key[prefix.len()..], up_blocks) {
            Some((name, squeeze)) => {
                let derive = match files.shape(&key) {
                    Some([o, i, 1, 1]) if squeeze => Derive::Reshape(vec![*o, *i]),
                    _ => Derive::Same,
                };
                m.insert(name, key, derive);
            }
            None => m.own(key),
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let cases = [
            (
                "encoder.down.0.block.1.norm1.weight",
                "encoder.down_blocks.0.resnets.1.norm1.weight",
                false,
            ),
            (
                "encoder.down.1.block.0.nin_shortcut.bias",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.bias",
                false,
            ),
            (
                "encoder.down.2.downsample.conv.weight",
                "encoder.down_blocks.2.downsamplers.0.conv.weight",
                false,
            ),
            (
                "decoder.up.3.block.0.conv1.weight",
                "decoder.up_blocks.0.resnets.0.conv1.weight",
                false,
            ),
            (
                "decoder.up.1.upsample.conv.bias",
                "decoder.up_blocks.2.upsamplers.0.conv.bias",
                false,
            ),
            (
                "decoder.mid.attn_1.q.weight",
                "decoder.mid_block.attentions.0.to_q.weight",
                true,
            ),
            (
                "encoder.mid.attn_1.proj_out.bias",
                "encoder.mid_block.attentions.0.to_out.0.bias",
                false,
            ),
            (
                "encoder.mid.attn_1.norm.weight",
                "encoder.mid_block.attentions.0.group_norm.weight",
                false,
            ),
            (
                "encoder.mid.block_2.conv2.weight",
                "encoder.mid_block.resnets.1.conv2.weight",
                false,
            ),
            ("decoder.norm_out.bias", "decoder.conv_norm_out.bias", false),
            ("post_quant_conv.weight", "post_quant_conv.weight", false),
        ];
        for (ldm, want, sq) in cases {
            assert_eq!(diffusers_name(ldm, 4), Some((want.to_owned(), sq)), "{ldm}");
        }
        assert_eq!(diffusers_name("decoder.up.4.block.0.x", 4), None);
        assert_eq!(diffusers_name("other.conv_in.weight", 4), None);
    }
}
