//! The VAE's blocks from diffusers'
//! [unet_2d_blocks.py](https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/unets/unet_2d_blocks.py):
//! `DownEncoderBlock2D`, `UpDecoderBlock2D` and `UNetMidBlock2D` (without time embedding),
//! assembled from the shared sd-nn layers.

use candle_core::Tensor;
use sd_core::{Result, VarBuilder};
use sd_nn::{
    Attention, AttentionConfig, Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D,
};

/// Epsilon of every group norm in diffusers' VAE encoder and decoder.
pub(crate) const VAE_NORM_EPS: f64 = 1e-6;

fn resnet(vb: &VarBuilder, cin: usize, cout: usize, groups: usize) -> Result<ResnetBlock2D> {
    ResnetBlock2D::load(
        vb,
        &ResnetBlock2DConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: None,
            groups,
            eps: VAE_NORM_EPS,
            output_scale_factor: 1.0,
        },
    )
}

/// diffusers' `DownEncoderBlock2D`: `resnets.{i}` then, except in the last block,
/// `downsamplers.0` (stride-2 conv with the asymmetric right/bottom pad, `downsample_padding=0`).
#[derive(Debug, Clone)]
pub struct DownEncoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

impl DownEncoderBlock2D {
    /// Loads `num_layers` ResNet blocks (`cin` -> `cout`) and the optional downsampler.
    pub fn load(
        vb: &VarBuilder,
        cin: usize,
        cout: usize,
        num_layers: usize,
        groups: usize,
        add_downsample: bool,
    ) -> Result<Self> {
        let resnets = (0..num_layers)
            .map(|i| {
                let c = if i == 0 { cin } else { cout };
                resnet(&vb.pp("resnets").pp(i), c, cout, groups)
            })
            .collect::<Result<Vec<_>>>()?;
        let downsampler = if add_downsample {
            Some(Downsample2D::load(&vb.pp("downsamplers.0"), cout, cout, 0)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            downsampler,
        })
    }

    /// Channels last. # Shapes: x [B, H, W, cin] -> [B, H/2, W/2, cout] with the downsampler (floor for odd
    /// sizes), [B, H, W, cout] otherwise.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(&h, None)?;
        }
        match &self.downsampler {
            Some(d) => d.forward(&h),
            None => Ok(h),
        }
    }
}

/// diffusers' `UpDecoderBlock2D`: `resnets.{i}` then, except in the last block,
/// `upsamplers.0` (nearest 2x and a 3x3 conv).
#[derive(Debug, Clone)]
pub struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

impl UpDecoderBlock2D {
    /// Loads `num_layers` ResNet blocks (`cin` -> `cout`) and the optional upsampler.
    pub fn load(
        vb: &VarBuilder,
        cin: usize,
        cout: usize,
        num_layers: usize,
        groups: usize,
        add_upsample: bool,
    ) -> Result<Self> {
        let resnets = (0..num_layers)
            .map(|i| {
                let c = if i == 0 { cin } else { cout };
                resnet(&vb.pp("resnets").pp(i), c, cout, groups)
            })
            .collect::<Result<Vec<_>>>()?;
        let upsampler = if add_upsample {
            Some(Upsample2D::load(&vb.pp("upsamplers.0"), cout, cout)?)
        } else {
            None
        };
        Ok(Self { resnets, upsampler })
    }

    /// Channels last. # Shapes: x [B, h, w, cin] -> [B, 2h, 2w, cout] with the upsampler, [B, h, w, cout] otherwise.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(&h, None)?;
        }
        match &self.upsampler {
            Some(u) => u.forward(&h, None),
            None => Ok(h),
        }
    }
}

/// diffusers' `UNetMidBlock2D` as the VAE builds it: `resnets.0`, then `attentions.0` (one head of
/// `channels` dims, group norm, biases, residual) and `resnets.1`.
#[derive(Debug, Clone)]
pub struct MidBlock2D {
    first: ResnetBlock2D,
    attention: Option<Attention>,
    second: ResnetBlock2D,
}

impl MidBlock2D {
    /// Loads the block for `channels` channels; `add_attention` is the config's
    /// `mid_block_add_attention`.
    pub fn load(
        vb: &VarBuilder,
        channels: usize,
        groups: usize,
        add_attention: bool,
    ) -> Result<Self> {
        let attention = if add_attention {
            Some(Attention::load(
                &vb.pp("attentions.0"),
                &AttentionConfig {
                    query_dim: channels,
                    cross_attention_dim: None,
                    heads: 1,
                    dim_head: channels,
                    qkv_bias: true,
                    upcast_attention: true,
                    group_norm: Some((groups, VAE_NORM_EPS)),
                    residual_connection: true,
                },
            )?)
        } else {
            None
        };
        Ok(Self {
            first: resnet(&vb.pp("resnets.0"), channels, channels, groups)?,
            attention,
            second: resnet(&vb.pp("resnets.1"), channels, channels, groups)?,
        })
    }

    /// Channels last. # Shapes: x [B, h, w, C] -> [B, h, w, C].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.first.forward(x, None)?;
        if let Some(a) = &self.attention {
            h = a.forward(&h, None)?;
        }
        self.second.forward(&h, None)
    }
}
