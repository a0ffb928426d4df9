//! Timestep embeddings: diffusers' `get_timestep_embedding` / `Timesteps` (sinusoidal) and
//! `TimestepEmbedding` (two linear layers), from
//! [embeddings.py](https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/embeddings.py).

use candle_core::{DType, Tensor};
use sd_core::{Result, VarBuilder};

use crate::linear::{Activation, Linear};

/// Sinusoidal embedding of `timesteps` (any float values), computed in f32.
///
/// `half = dim / 2`, frequencies `exp(-ln(10000) * i / (half - freq_shift))`; the output is
/// `[sin, cos]`, or `[cos, sin]` when `flip_sin_to_cos` (SD's UNet), zero-padded for odd `dim`.
/// # Shapes: timesteps `[B]` -> `[B, dim]` (f32).
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let dev = timesteps.device();
    // The exponents are computed exactly as torch does (in f32, the Python scalars cast to f32
    // first): at t ~ 1000 one ulp of a frequency moves its sinusoid by up to ~6e-5. torch's
    // vectorised `exp` itself is not correctly rounded, so a few frequencies still differ by one
    // ulp (measured against diffusers in sd-unet's tests).
    let neg_ln = -(10000f64.ln()) as f32;
    let denom = (half as f64 - freq_shift) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((neg_ln * i as f32) / denom).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), dev)?;
    let t = timesteps.to_dtype(DType::F32)?.unsqueeze(1)?;
    let args = t.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let mut emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)?
    } else {
        Tensor::cat(&[sin, cos], 1)?
    };
    if dim % 2 == 1 {
        emb = emb.pad_with_zeros(1, 0, 1)?;
    }
    Ok(emb)
}

/// `linear_2(silu(linear_1(x)))`: diffusers' `TimestepEmbedding` (weights `linear_1`, `linear_2`).
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    /// Loads the two layers under `vb`.
    pub fn load(vb: &VarBuilder, in_channels: usize, time_embed_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::load(&vb.pp("linear_1"), in_channels, time_embed_dim, true)?
                .with_activation(Activation::Silu)?,
            linear_2: Linear::load(&vb.pp("linear_2"), time_embed_dim, time_embed_dim, true)?,
        })
    }

    /// # Shapes: x [B, in] -> [B, time_embed_dim].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?)
    }
}
