//! diffusers' `Downsample2D` and `Upsample2D` (with convolution), as the UNet and VAE use them
//! (weights `conv`, stored under `downsamplers.0` / `upsamplers.0`).

use candle_core::Tensor;
use sd_core::{Result, VarBuilder};

use crate::ops::{Conv2d, ConvArgs};

/// Stride-2 3x3 convolution. With `padding == 0` (the VAE encoder) the input is padded by one
/// on the right and bottom only, as diffusers does.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
}

impl Downsample2D {
    /// Loads `conv` under `vb`; `padding` is diffusers' `padding` / `downsample_padding` (0 or 1).
    pub fn load(
        vb: &VarBuilder,
        channels: usize,
        out_channels: usize,
        padding: usize,
    ) -> Result<Self> {
        let pad = if padding == 0 {
            [0, 0, 1, 1]
        } else {
            [padding; 4]
        };
        Ok(Self {
            conv: Conv2d::load_padded(&vb.pp("conv"), channels, out_channels, 3, 2, pad)?,
        })
    }

    /// Channels last. # Shapes: x [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C'] (padding 1) or
    /// [B, floor((H+1-3)/2)+1, ..., C'] (padding 0).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(x)
    }
}

/// Nearest-neighbour 2x upsampling (or to an explicit size) followed by a 3x3 convolution; on
/// the CPU the resize happens inside the convolution's input gather.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    /// Loads `conv` under `vb`.
    pub fn load(vb: &VarBuilder, channels: usize, out_channels: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(&vb.pp("conv"), channels, out_channels, 3, 1, 1)?,
        })
    }

    /// Channels last. # Shapes: x [B, H, W, C] -> [B, 2H, 2W, C'], or [B, h, w, C'] when
    /// `size = Some((h, w))` (the UNet passes the skip connection's size when the latent is not
    /// a multiple of 2^n).
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, h, w, _) = x.dims4()?;
        let resize = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward_with(
            x,
            &ConvArgs {
                resize: Some(resize),
                ..ConvArgs::default()
            },
        )
    }
}
