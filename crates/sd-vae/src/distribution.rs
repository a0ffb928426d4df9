//! The encoder's posterior: diffusers'
//! [`DiagonalGaussianDistribution`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/autoencoders/vae.py).

use candle_core::Tensor;
use sd_core::{Error, NoiseSource, Result};

/// A diagonal Gaussian over latents: `mean` and `logvar` (clamped to [-30, 20] as diffusers does).
///
/// # Shapes: mean and logvar [B, latent_channels, h, w].
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    /// The mean (diffusers' `mode()`).
    pub mean: Tensor,
    /// The log-variance, already clamped to [-30, 20].
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Splits encoder moments (after `quant_conv`) into mean (first half of the channels) and
    /// log-variance (second half, clamped). # Shapes: moments [B, 2C, h, w].
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let c2 = moments.dim(1)?;
        if !c2.is_multiple_of(2) || moments.dims().len() != 4 {
            return Err(Error::invalid_argument(
                "moments",
                format!("shape {:?}", moments.dims()),
                "[B, 2 * latent_channels, h, w]",
            ));
        }
        let c = c2 / 2;
        Ok(Self {
            mean: moments.narrow(1, 0, c)?,
            logvar: moments.narrow(1, c, c)?.clamp(-30f32, 20f32)?,
        })
    }

    /// The standard deviation `exp(0.5 * logvar)`.
    pub fn std(&self) -> Result<Tensor> {
        Ok((&self.logvar * 0.5)?.exp()?)
    }

    /// The most likely latents: the mean (diffusers' `mode()`, `retrieve_latents(sample_mode="argmax")`).
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }

    /// `mean + std * noise`, drawing noise of the mean's shape from `noise` (f32 draws converted
    /// to the mean's dtype). With a [`TorchGenerator`](sd_core::TorchGenerator) this equals
    /// diffusers' `latent_dist.sample(generator)` for float32 models (torch draws half-precision
    /// noise with other arithmetic, so f16/bf16 samples differ from torch's in the noise itself).
    pub fn sample(&self, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let eps = noise.randn_tensor(self.mean.dims(), self.mean.dtype(), self.mean.device())?;
        self.sample_with(&eps)
    }

    /// `mean + std * noise` with a caller-supplied standard-normal tensor of the mean's shape.
    pub fn sample_with(&self, noise: &Tensor) -> Result<Tensor> {
        if noise.dims() != self.mean.dims() {
            return Err(Error::invalid_argument(
                "noise",
                format!("shape {:?}", noise.dims()),
                format!("the posterior's shape {:?}", self.mean.dims()),
            ));
        }
        let noise = noise.to_dtype(self.mean.dtype())?;
        Ok((&self.mean + (self.std()? * noise)?)?)
    }
}
