//! [`UNetConfig::validate`]: the resolved config's fields are public, so a library caller can
//! build one by hand; the model constructor checks it first, so that an empty block list, zero
//! heads or a skip connection count that does not add up is an error instead of an index panic
//! or a division by zero. The bounds are far above every released SD model and keep sizes from
//! overflowing (a 65th down block would overflow the `2^levels` shift).

use sd_core::{Error, Result};

use super::{TransformerConfig, UNetConfig};

/// Most resolution levels (down blocks): each halves the latent, 2^15 is beyond any image.
pub const MAX_LEVELS: usize = 16;
/// Most channels of any layer (SDXL's widest is 2816).
pub const MAX_CHANNELS: usize = 1 << 16;
/// Most ResNets per block and transformer blocks per Transformer2DModel (SDXL: 10).
pub const MAX_LAYERS: usize = 64;
/// Largest convolution kernel of `conv_in` / `conv_out` (SD: 3).
pub const MAX_KERNEL: usize = 31;
/// Largest `sample_size` (SDXL: 128 latents).
pub const MAX_SAMPLE_SIZE: usize = 1 << 16;

/// One problem: the field (a path into the resolved config), what it holds, what was expected.
#[derive(Debug)]
pub(crate) struct Problem {
    pub key: String,
    pub got: String,
    pub expected: String,
}

fn problem(key: impl Into<String>, got: impl ToString, expected: impl Into<String>) -> Problem {
    Problem {
        key: key.into(),
        got: got.to_string(),
        expected: expected.into(),
    }
}

fn in_range(key: &str, v: usize, lo: usize, hi: usize) -> Result<(), Problem> {
    if (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err(problem(key, v, format!("{lo} to {hi}")))
    }
}

fn finite(key: &str, v: f64) -> Result<(), Problem> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(problem(key, v, "a finite number"))
    }
}

fn check_transformer(key: &str, t: &TransformerConfig, channels: usize) -> Result<(), Problem> {
    in_range(&format!("{key}.num_heads"), t.num_heads, 1, MAX_CHANNELS)?;
    in_range(&format!("{key}.head_dim"), t.head_dim, 1, MAX_CHANNELS)?;
    let inner = t.num_heads.saturating_mul(t.head_dim);
    if inner > MAX_CHANNELS {
        return Err(problem(
            format!("{key}.num_heads"),
            format!("{} heads of {} channels", t.num_heads, t.head_dim),
            format!("at most {MAX_CHANNELS} channels in all"),
        ));
    }
    if channels == 0 {
        return Err(problem(key, "a block of 0 channels", "positive channels"));
    }
    in_range(&format!("{key}.depth"), t.depth, 1, MAX_LAYERS)?;
    in_range(
        &format!("{key}.cross_attention_dim"),
        t.cross_attention_dim,
        1,
        MAX_CHANNELS,
    )
}

impl UNetConfig {
    /// Checks that the model can be built from this config and run without index or arithmetic
    /// failures: 1 to [`MAX_LEVELS`] levels with one down block, one up block and one
    /// `block_out_channels` entry each, positive sizes within the bounds of this module, at
    /// least one head and one channel per head, odd kernels, and as many skip connections
    /// consumed by the up blocks as the down blocks produce.
    ///
    /// [`crate::UNet2DConditionModel::from_config`] calls it; configs read from a file are
    /// checked when resolved.
    pub fn validate(&self) -> Result<()> {
        self.check().map_err(|p| {
            Error::invalid_argument(format!("UNetConfig.{}", p.key), p.got, p.expected)
        })
    }

    pub(crate) fn check(&self) -> Result<(), Problem> {
        let n = self.block_out_channels.len();
        in_range("block_out_channels.len()", n, 1, MAX_LEVELS)?;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            in_range(&format!("block_out_channels[{i}]"), c, 1, MAX_CHANNELS)?;
        }
        for (key, len) in [
            ("down_blocks.len()", self.down_blocks.len()),
            ("up_blocks.len()", self.up_blocks.len()),
        ] {
            if len != n {
                return Err(problem(
                    key,
                    len,
                    format!("one per block_out_channels entry ({n})"),
                ));
            }
        }
        in_range("in_channels", self.in_channels, 1, MAX_CHANNELS)?;
        in_range("out_channels", self.out_channels, 1, MAX_CHANNELS)?;
        in_range("time_embed_dim", self.time_embed_dim, 1, 4 * MAX_CHANNELS)?;
        in_range(
            "cross_attention_dim",
            self.cross_attention_dim,
            1,
            MAX_CHANNELS,
        )?;
        in_range("norm_num_groups", self.norm_num_groups, 1, MAX_CHANNELS)?;
        finite("norm_eps", self.norm_eps)?;
        finite("freq_shift", self.freq_shift)?;
        for (key, k) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if k.is_multiple_of(2) || k > MAX_KERNEL {
                return Err(problem(
                    key,
                    k,
                    format!("an odd kernel size up to {MAX_KERNEL}"),
                ));
            }
        }
        in_range("downsample_padding", self.downsample_padding, 0, MAX_KERNEL)?;
        if let Some((h, w)) = self.sample_size {
            in_range("sample_size.0", h, 1, MAX_SAMPLE_SIZE)?;
            in_range("sample_size.1", w, 1, MAX_SAMPLE_SIZE)?;
        }
        if let Some(tt) = &self.text_time {
            let key = "text_time.addition_time_embed_dim";
            in_range(key, tt.addition_time_embed_dim, 1, MAX_CHANNELS)?;
            in_range(
                "text_time.projection_class_embeddings_input_dim",
                tt.projection_class_embeddings_input_dim,
                1,
                MAX_CHANNELS,
            )?;
        }

        // Skip connections: conv_in's output, one per down ResNet, one per downsampler.
        let mut produced = 1usize;
        for (i, b) in self.down_blocks.iter().enumerate() {
            let key = format!("down_blocks[{i}]");
            in_range(
                &format!("{key}.in_channels"),
                b.in_channels,
                1,
                MAX_CHANNELS,
            )?;
            in_range(
                &format!("{key}.out_channels"),
                b.out_channels,
                1,
                MAX_CHANNELS,
            )?;
            in_range(&format!("{key}.num_layers"), b.num_layers, 1, MAX_LAYERS)?;
            if let Some(t) = &b.transformer {
                check_transformer(&format!("{key}.transformer"), t, b.out_channels)?;
            }
            produced += b.num_layers + usize::from(b.add_downsample);
        }
        if let Some(m) = &self.mid_block {
            in_range("mid_block.channels", m.channels, 1, MAX_CHANNELS)?;
            finite("mid_block.output_scale_factor", m.output_scale_factor)?;
            check_transformer("mid_block.transformer", &m.transformer, m.channels)?;
        }
        let mut consumed = 0usize;
        for (i, b) in self.up_blocks.iter().enumerate() {
            let key = format!("up_blocks[{i}]");
            in_range(
                &format!("{key}.in_channels"),
                b.in_channels,
                1,
                MAX_CHANNELS,
            )?;
            in_range(
                &format!("{key}.prev_output_channels"),
                b.prev_output_channels,
                1,
                MAX_CHANNELS,
            )?;
            in_range(
                &format!("{key}.out_channels"),
                b.out_channels,
                1,
                MAX_CHANNELS,
            )?;
            in_range(
                &format!("{key}.num_layers"),
                b.num_layers,
                1,
                MAX_LAYERS + 1,
            )?;
            if let Some(t) = &b.transformer {
                check_transformer(&format!("{key}.transformer"), t, b.out_channels)?;
            }
            consumed += b.num_layers;
        }
        if consumed != produced {
            return Err(problem(
                "up_blocks",
                format!("ResNets consuming {consumed} skip connections"),
                format!(
                    "{produced}, the number the down path produces (conv_in, one per down \
                     ResNet, one per downsampler)"
                ),
            ));
        }
        Ok(())
    }
}
