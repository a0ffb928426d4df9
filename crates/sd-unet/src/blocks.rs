//! The UNet's down, mid and up blocks, from diffusers'
//! [unet_2d_blocks.py](https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/unets/unet_2d_blocks.py):
//! `DownBlock2D` / `CrossAttnDownBlock2D`, `UNetMidBlock2DCrossAttn` and
//! `UpBlock2D` / `CrossAttnUpBlock2D`. A block with cross-attention is the same block with a
//! [`Transformer2DModel`] after each ResNet, so each pair of classes is one struct here.

use candle_core::Tensor;
use sd_core::{Result, VarBuilder};
use sd_nn::{Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D};

use crate::config::{DownBlockConfig, MidBlockConfig, UpBlockConfig};
use crate::transformer_2d::Transformer2DModel;

/// What every block's ResNets share.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResnetShared {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
}

impl ResnetShared {
    fn config(&self, cin: usize, cout: usize, output_scale_factor: f64) -> ResnetBlock2DConfig {
        ResnetBlock2DConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: Some(self.temb_channels),
            groups: self.groups,
            eps: self.eps,
            output_scale_factor,
        }
    }
}

fn load_transformers(
    vb: &VarBuilder,
    n: usize,
    channels: usize,
    groups: usize,
    cfg: Option<&crate::config::TransformerConfig>,
) -> Result<Vec<Transformer2DModel>> {
    match cfg {
        None => Ok(Vec::new()),
        Some(cfg) => (0..n)
            .map(|i| Transformer2DModel::load(&vb.pp("attentions").pp(i), channels, groups, cfg))
            .collect(),
    }
}

/// `DownBlock2D` (no `attentions`) or `CrossAttnDownBlock2D`.
/// Weights: `resnets.{i}`, `attentions.{i}`, `downsamplers.0.conv`.
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    pub(crate) fn load(
        vb: &VarBuilder,
        cfg: &DownBlockConfig,
        shared: ResnetShared,
        downsample_padding: usize,
    ) -> Result<Self> {
        let resnets = (0..cfg.num_layers)
            .map(|i| {
                let cin = if i == 0 {
                    cfg.in_channels
                } else {
                    cfg.out_channels
                };
                let c = shared.config(cin, cfg.out_channels, 1.0);
                ResnetBlock2D::load(&vb.pp("resnets").pp(i), &c)
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = load_transformers(
            vb,
            cfg.num_layers,
            cfg.out_channels,
            shared.groups,
            cfg.transformer.as_ref(),
        )?;
        let downsampler = if cfg.add_downsample {
            Some(Downsample2D::load(
                &vb.pp("downsamplers.0"),
                cfg.out_channels,
                cfg.out_channels,
                downsample_padding,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Returns the output and appends every intermediate state to `skips` (one per ResNet,
    /// plus the downsampled output).
    ///
    /// Channels last. # Shapes: x [B, H, W, Cin], temb [B, T], context [B, L, D] -> [B, H', W', Cout].
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context)?;
            }
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h)?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

/// `UNetMidBlock2DCrossAttn`: ResNet, then (transformer, ResNet).
/// Weights: `resnets.0`, `attentions.0`, `resnets.1`.
#[derive(Debug, Clone)]
pub struct MidBlock {
    resnet_in: ResnetBlock2D,
    attention: Transformer2DModel,
    resnet_out: ResnetBlock2D,
}

impl MidBlock {
    pub(crate) fn load(
        vb: &VarBuilder,
        cfg: &MidBlockConfig,
        shared: ResnetShared,
    ) -> Result<Self> {
        let c = shared.config(cfg.channels, cfg.channels, cfg.output_scale_factor);
        Ok(Self {
            resnet_in: ResnetBlock2D::load(&vb.pp("resnets.0"), &c)?,
            attention: Transformer2DModel::load(
                &vb.pp("attentions.0"),
                cfg.channels,
                shared.groups,
                &cfg.transformer,
            )?,
            resnet_out: ResnetBlock2D::load(&vb.pp("resnets.1"), &c)?,
        })
    }

    /// Channels last. # Shapes: x [B, H, W, C], temb [B, T], context [B, L, D] -> [B, H, W, C].
    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let h = self.resnet_in.forward(x, Some(temb))?;
        let h = self.attention.forward(&h, context)?;
        self.resnet_out.forward(&h, Some(temb))
    }
}

/// `UpBlock2D` (no `attentions`) or `CrossAttnUpBlock2D`.
/// Weights: `resnets.{i}`, `attentions.{i}`, `upsamplers.0.conv`.
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    pub(crate) fn load(vb: &VarBuilder, cfg: &UpBlockConfig, shared: ResnetShared) -> Result<Self> {
        let n = cfg.num_layers;
        let resnets = (0..n)
            .map(|i| {
                let skip = if i + 1 == n {
                    cfg.in_channels
                } else {
                    cfg.out_channels
                };
                let cin = if i == 0 {
                    cfg.prev_output_channels
                } else {
                    cfg.out_channels
                };
                let c = shared.config(cin + skip, cfg.out_channels, 1.0);
                ResnetBlock2D::load(&vb.pp("resnets").pp(i), &c)
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = load_transformers(
            vb,
            n,
            cfg.out_channels,
            shared.groups,
            cfg.transformer.as_ref(),
        )?;
        let upsampler = if cfg.add_upsample {
            Some(Upsample2D::load(
                &vb.pp("upsamplers.0"),
                cfg.out_channels,
                cfg.out_channels,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// Number of skip connections this block consumes (one per ResNet).
    pub fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    /// Consumes the last `num_skips()` entries of `skips` (deepest first), concatenating each
    /// to the channels before its ResNet. The upsampler doubles the size, or resizes to
    /// `upsample_size` when given (latents whose sides are not multiples of 2^levels).
    ///
    /// Channels last. # Shapes: x [B, H, W, Cprev], temb [B, T], context [B, L, D] -> [B, 2H, 2W, Cout].
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| {
                sd_core::Error::invalid_argument(
                    "skips",
                    "too few skip connections",
                    "one per up-block ResNet",
                )
            })?;
            h = Tensor::cat(&[&h, &skip], 3)?;
            h = resnet.forward(&h, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context)?;
            }
        }
        if let Some(up) = &self.upsampler {
            h = up.forward(&h, upsample_size)?;
        }
        Ok(h)
    }
}
