//! diffusers' `Downsample2D` and `Upsample2D` (with convolution), as the UNet and VAE use them
//! (weights `conv`, stored under `downsamplers.0` / `upsamplers.0`).

use candle_core::Tensor;
use sd_core::{Result, VarBuilder};

use crate::ops::Conv2d;

/// Stride-2 3x3 convolution. With `padding == 0` (the VAE encoder) the input is first padded
/// by one on the right and bottom only, as diffusers does.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample2D {
    /// Loads `conv` under `vb`; `padding` is diffusers' `padding` / `downsample_padding` (0 or 1).
    pub fn load(
        vb: &VarBuilder,
        channels: usize,
        out_channels: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(&vb.pp("conv"), channels, out_channels, 3, 2, padding)?,
            pad_right_bottom: padding == 0,
        })
    }

    /// # Shapes: x [B, C, H, W] -> [B, C', ceil(H/2), ceil(W/2)] (padding 1) or floor((H+1-3)/2)+1.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_right_bottom {
            let x = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// Nearest-neighbour 2x upsampling (or to an explicit size) followed by a 3x3 convolution.
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

    /// # Shapes: x [B, C, H, W] -> [B, C', 2H, 2W], or [B, C', h, w] when `size = Some((h, w))`
    /// (the UNet passes the skip connection's size when the latent is not a multiple of 2^n).
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        let up = if th == 2 * h && tw == 2 * w {
            x.upsample_nearest2d(th, tw)?
        } else {
            nearest_resize(x, th, tw)?
        };
        self.conv.forward(&up)
    }
}

/// torch's `interpolate(mode="nearest")` to an arbitrary size: source index floor(i * in / out).
fn nearest_resize(x: &Tensor, th: usize, tw: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let dev = x.device();
    let rows: Vec<u32> = (0..th).map(|i| ((i * h) / th) as u32).collect();
    let cols: Vec<u32> = (0..tw).map(|j| ((j * w) / tw) as u32).collect();
    let x = x.index_select(&Tensor::new(rows, dev)?, 2)?;
    Ok(x.index_select(&Tensor::new(cols, dev)?, 3)?)
}
