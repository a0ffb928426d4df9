//! diffusers' VAE [`Encoder`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/autoencoders/vae.py):
//! image -> `2 * latent_channels` moments (mean and log-variance), before `quant_conv`.

use candle_core::Tensor;
use sd_core::{Result, VarBuilder};
use sd_nn::{Conv2d, GroupNorm};

use crate::blocks::{DownEncoderBlock2D, MidBlock2D, VAE_NORM_EPS};
use crate::config::VaeConfig;

/// Weights under `encoder.`: `conv_in`, `down_blocks.{i}`, `mid_block`, `conv_norm_out`, `conv_out`.
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: MidBlock2D,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    /// Loads the encoder described by `cfg` under `vb` (the `encoder` prefix).
    pub fn load(vb: &VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let last = *ch.last().expect("invariant: config has at least one block");
        let mut down_blocks = Vec::with_capacity(ch.len());
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            down_blocks.push(DownEncoderBlock2D::load(
                &vb.pp("down_blocks").pp(i),
                cin,
                cout,
                cfg.layers_per_block,
                groups,
                i + 1 < ch.len(),
            )?);
            cin = cout;
        }
        Ok(Self {
            conv_in: Conv2d::load(&vb.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?,
            down_blocks,
            mid_block: MidBlock2D::load(
                &vb.pp("mid_block"),
                last,
                groups,
                cfg.mid_block_add_attention,
            )?,
            conv_norm_out: GroupNorm::load(&vb.pp("conv_norm_out"), groups, last, VAE_NORM_EPS)?,
            conv_out: Conv2d::load(&vb.pp("conv_out"), last, 2 * cfg.latent_channels, 3, 1, 1)?,
        })
    }

    /// Channels last. # Shapes: image [B, H, W, in_channels] -> moments [B, H/f, W/f, 2 * latent_channels]
    /// (f = 2^(blocks - 1)).
    pub fn forward(&self, image: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(image)?;
        for b in &self.down_blocks {
            h = b.forward(&h)?;
        }
        let h = self.mid_block.forward(&h)?;
        let h = self.conv_norm_out.forward_silu(&h)?;
        self.conv_out.forward(&h)
    }
}
