//! diffusers' VAE [`Decoder`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/autoencoders/vae.py):
//! latents (after `post_quant_conv`) -> image.

use candle_core::Tensor;
use sd_core::{Cancel, Result, VarBuilder};
use sd_nn::{Conv2d, GroupNorm};

use crate::blocks::{MidBlock2D, UpDecoderBlock2D, VAE_NORM_EPS};
use crate::config::VaeConfig;

/// Weights under `decoder.`: `conv_in`, `mid_block`, `up_blocks.{i}` (channels reversed, one more
/// ResNet per block than the encoder), `conv_norm_out`, `conv_out`.
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    /// Loads the decoder described by `cfg` under `vb` (the `decoder` prefix).
    pub fn load(vb: &VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let groups = cfg.norm_num_groups;
        let top = rev[0];
        let mut up_blocks = Vec::with_capacity(rev.len());
        let mut cin = top;
        for (i, &cout) in rev.iter().enumerate() {
            up_blocks.push(UpDecoderBlock2D::load(
                &vb.pp("up_blocks").pp(i),
                cin,
                cout,
                cfg.layers_per_block + 1,
                groups,
                i + 1 < rev.len(),
            )?);
            cin = cout;
        }
        let first = cfg.block_out_channels[0];
        Ok(Self {
            conv_in: Conv2d::load(&vb.pp("conv_in"), cfg.latent_channels, top, 3, 1, 1)?,
            mid_block: MidBlock2D::load(
                &vb.pp("mid_block"),
                top,
                groups,
                cfg.mid_block_add_attention,
            )?,
            up_blocks,
            conv_norm_out: GroupNorm::load(&vb.pp("conv_norm_out"), groups, first, VAE_NORM_EPS)?,
            conv_out: Conv2d::load(&vb.pp("conv_out"), first, cfg.out_channels, 3, 1, 1)?,
        })
    }

    /// Channels last. # Shapes: z [B, h, w, latent_channels] -> image [B, h·f, w·f, out_channels].
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        self.forward_with_cancel(z, &Cancel::never())
    }

    /// [`Decoder::forward`], checking `cancel` before the mid block and each up block (then
    /// [`sd_core::Error::Interrupted`]).
    pub fn forward_with_cancel(&self, z: &Tensor, cancel: &Cancel) -> Result<Tensor> {
        let h = self.conv_in.forward(z)?;
        cancel.check()?;
        let mut h = self.mid_block.forward(&h)?;
        for b in &self.up_blocks {
            cancel.check()?;
            h = b.forward(&h)?;
        }
        let h = self.conv_norm_out.forward_silu(&h)?;
        self.conv_out.forward(&h)
    }
}
