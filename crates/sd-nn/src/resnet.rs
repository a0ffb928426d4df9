//! diffusers' [`ResnetBlock2D`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/resnet.py)
//! with the "default" time-embedding norm: the residual block of both the UNet and the VAE.

use candle_core::Tensor;
use sd_core::{Result, VarBuilder};

use crate::ops::{silu, Conv2d, ConvArgs, GroupNorm, Linear};

/// Construction parameters of a [`ResnetBlock2D`].
#[derive(Debug, Clone)]
pub struct ResnetBlock2DConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels (a 1x1 `conv_shortcut` is used when they differ from the input's).
    pub out_channels: usize,
    /// Channels of the time embedding (`time_emb_proj`); `None` in the VAE.
    pub temb_channels: Option<usize>,
    /// Groups of both group norms.
    pub groups: usize,
    /// Epsilon of both group norms.
    pub eps: f64,
    /// The output is divided by this (1.0 in SD's UNet and VAE).
    pub output_scale_factor: f64,
}

/// Residual block: norm1, SiLU, conv1, (+ time embedding), norm2, SiLU, conv2, + shortcut.
/// Weights: `norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut`.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    /// Loads the block under `vb`.
    pub fn load(vb: &VarBuilder, cfg: &ResnetBlock2DConfig) -> Result<Self> {
        let (cin, cout) = (cfg.in_channels, cfg.out_channels);
        Ok(Self {
            norm1: GroupNorm::load(&vb.pp("norm1"), cfg.groups, cin, cfg.eps)?,
            conv1: Conv2d::load(&vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: match cfg.temb_channels {
                Some(t) => Some(Linear::load(&vb.pp("time_emb_proj"), t, cout, true)?),
                None => None,
            },
            norm2: GroupNorm::load(&vb.pp("norm2"), cfg.groups, cout, cfg.eps)?,
            conv2: Conv2d::load(&vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut: if cin != cout {
                Some(Conv2d::load(&vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// Channels last. # Shapes: x [B, H, W, Cin], temb [B, T] -> [B, H, W, Cout].
    ///
    /// On the CPU the SiLUs run inside the group norms, the projected time embedding is a
    /// per-image bias of conv1's epilogue and the shortcut the residual of conv2's.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let t = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => Some(proj.forward(&silu(t)?)?),
            _ => None,
        };
        let h = self.conv1.forward_with(
            &self.norm1.forward_silu(x)?,
            &ConvArgs {
                batch_bias: t.as_ref(),
                ..ConvArgs::default()
            },
        )?;
        let h = self.norm2.forward_silu(&h)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        if self.output_scale_factor == 1.0 {
            return self.conv2.forward_with(
                &h,
                &ConvArgs {
                    residual: Some(&shortcut),
                    ..ConvArgs::default()
                },
            );
        }
        let out = (shortcut + self.conv2.forward(&h)?)?;
        Ok((out / self.output_scale_factor)?)
    }
}
