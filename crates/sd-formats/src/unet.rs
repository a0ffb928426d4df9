//! LDM/SGM UNet names (`input_blocks` / `middle_block` / `output_blocks`) to diffusers'
//! `UNet2DConditionModel` names, as diffusers' `convert_ldm_unet_checkpoint`.
//!
//! With `lpb` = `layers_per_block`, LDM numbers the blocks flat: `input_blocks.i` (i >= 1) is
//! down block `(i-1) / (lpb+1)`, layer `(i-1) % (lpb+1)` (the layer `lpb` being the
//! downsampler `…0.op`); `output_blocks.i` is up block `i / (lpb+1)`, layer `i % (lpb+1)`, with
//! the upsampler at `.1.conv` or `.2.conv`. Inside, `.0` is the ResNet and `.1` the transformer,
//! whose inner names equal diffusers'.

use std::sync::Arc;

use sd_core::{Derive, Error, Result, WeightFiles, WeightMap};

/// LDM ResNet names to diffusers' `ResnetBlock2D` names (the rest is unchanged).
pub(crate) fn resnet_rename(rest: &str) -> String {
    const RENAMES: &[(&str, &str)] = &[
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("emb_layers.1.", "time_emb_proj."),
        ("skip_connection.", "conv_shortcut."),
    ];
    for (from, to) in RENAMES {
        if let Some(tail) = rest.strip_prefix(from) {
            return format!("{to}{tail}");
        }
    }
    rest.to_owned()
}

/// Splits `"12.1.rest"` into (12, 1, "rest").
fn two_indices(s: &str) -> Option<(usize, usize, &str)> {
    let (i, s) = s.split_once('.')?;
    let (j, rest) = s.split_once('.')?;
    Some((i.parse().ok()?, j.parse().ok()?, rest))
}

/// The diffusers name of the LDM UNet name `name` (without the prefix), if it has one.
pub fn diffusers_name(name: &str, lpb: usize) -> Option<String> {
    let group = lpb + 1;
    const FIXED: &[(&str, &str)] = &[
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ];
    for (from, to) in FIXED {
        if let Some(tail) = name.strip_prefix(from) {
            return Some(format!("{to}{tail}"));
        }
    }
    if let Some(s) = name.strip_prefix("input_blocks.") {
        let (i, j, rest) = two_indices(s)?;
        let i = i.checked_sub(1)?;
        let (b, l) = (i / group, i % group);
        return match j {
            0 => match rest.strip_prefix("op.") {
                Some(tail) => Some(format!("down_blocks.{b}.downsamplers.0.conv.{tail}")),
                None => Some(format!(
                    "down_blocks.{b}.resnets.{l}.{}",
                    resnet_rename(rest)
                )),
            },
            1 => Some(format!("down_blocks.{b}.attentions.{l}.{rest}")),
            _ => None,
        };
    }
    if let Some(s) = name.strip_prefix("middle_block.") {
        let (i, rest) = s.split_once('.')?;
        return match i {
            "0" => Some(format!("mid_block.resnets.0.{}", resnet_rename(rest))),
            "1" => Some(format!("mid_block.attentions.0.{rest}")),
            "2" => Some(format!("mid_block.resnets.1.{}", resnet_rename(rest))),
            _ => None,
        };
    }
    if let Some(s) = name.strip_prefix("output_blocks.") {
        let (i, j, rest) = two_indices(s)?;
        let (b, l) = (i / group, i % group);
        return match (j, rest.strip_prefix("conv.")) {
            (0, _) => Some(format!("up_blocks.{b}.resnets.{l}.{}", resnet_rename(rest))),
            (1 | 2, Some(tail)) => Some(format!("up_blocks.{b}.upsamplers.0.conv.{tail}")),
            (1, None) => Some(format!("up_blocks.{b}.attentions.{l}.{rest}")),
            _ => None,
        };
    }
    None
}

/// The UNet view of an LDM/SGM checkpoint: every `prefix…` tensor is owned (so one that maps to
/// nothing is reported as unused under its file name); EMA copies (`model_ema.…`) are not.
pub(crate) fn map(files: Arc<WeightFiles>, prefix: &str, lpb: usize) -> Result<WeightMap> {
    if lpb == 0 {
        return Err(Error::invalid_argument(
            "layers_per_block",
            lpb,
            "at least 1 (the UNet config's value)",
        ));
    }
    let mut keys: Vec<String> = files
        .names()
        .filter(|k| k.starts_with(prefix))
        .map(str::to_owned)
        .collect();
    keys.sort();
    let mut m = WeightMap::new(files);
    for key in keys {
        let rest = &key[prefix.len()..];
        match diffusers_name(rest, lpb) {
            Some(name) => m.insert(name, key, Derive::Same),
            None => m.own(key),
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The examples of diffusers' conversion (docs of `convert_ldm_unet_checkpoint`), lpb = 2.
    #[test]
    fn sd_names() {
        let cases = [
            ("time_embed.0.weight", "time_embedding.linear_1.weight"),
            ("label_emb.0.2.bias", "add_embedding.linear_2.bias"),
            ("input_blocks.0.0.weight", "conv_in.weight"),
            (
                "input_blocks.1.0.in_layers.0.weight",
                "down_blocks.0.resnets.0.norm1.weight",
            ),
            (
                "input_blocks.2.1.proj_in.weight",
                "down_blocks.0.attentions.1.proj_in.weight",
            ),
            (
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "input_blocks.4.0.skip_connection.bias",
                "down_blocks.1.resnets.0.conv_shortcut.bias",
            ),
            (
                "input_blocks.4.0.emb_layers.1.weight",
                "down_blocks.1.resnets.0.time_emb_proj.weight",
            ),
            (
                "input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",
                "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "middle_block.1.norm.bias",
                "mid_block.attentions.0.norm.bias",
            ),
            (
                "middle_block.2.out_layers.3.weight",
                "mid_block.resnets.1.conv2.weight",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "output_blocks.5.1.proj_out.bias",
                "up_blocks.1.attentions.2.proj_out.bias",
            ),
            (
                "output_blocks.11.0.out_layers.0.weight",
                "up_blocks.3.resnets.2.norm2.weight",
            ),
            ("out.0.weight", "conv_norm_out.weight"),
            ("out.2.bias", "conv_out.bias"),
        ];
        for (ldm, want) in cases {
            assert_eq!(diffusers_name(ldm, 2).as_deref(), Some(want), "{ldm}");
        }
        assert_eq!(diffusers_name("input_blocks.1.7.x", 2), None);
        assert_eq!(diffusers_name("middle_block.3.x", 2), None);
        assert_eq!(diffusers_name("nonsense", 2), None);
        assert_eq!(diffusers_name("input_blocks.x.0.y", 2), None);
    }
}
