//! diffusers' [`AutoencoderKL`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/autoencoders/autoencoder_kl.py):
//! loading, `encode`/`decode` (optionally tiled), and the pipeline-facing helpers that apply
//! the latent scaling in exactly one place and guard against float16 overflow.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sd_core::{component_var_builder, Cancel, Error, LoadOptions, NoiseSource, Result, VarBuilder};
use sd_nn::Conv2d;

use crate::config::{LatentNormalization, VaeConfig};
use crate::decoder::Decoder;
use crate::distribution::DiagonalGaussian;
use crate::encoder::Encoder;
use crate::tiling::{tiled_decode, tiled_encode, TileConfig, Tiling, AUTO_TILE_PIXELS};

/// Runtime choices of a VAE beyond [`LoadOptions`] (never part of the model config).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VaeOptions {
    /// Compute in float32 when loaded in float16: `None` follows the config's `force_upcast`
    /// (diffusers' behaviour), `Some(b)` overrides it (e.g. `Some(false)` for a VAE fixed for
    /// fp16 whose config still says `true`).
    pub force_upcast: Option<bool>,
    /// When to tile; `None` is [`Tiling::Auto`] with the config's tile sizes and
    /// [`AUTO_TILE_PIXELS`].
    pub tiling: Option<Tiling>,
}

/// The latent autoencoder of Stable Diffusion: weights `encoder.*`, `quant_conv`,
/// `post_quant_conv`, `decoder.*`, exactly as diffusers names them.
///
/// The model computes in [`AutoencoderKL::dtype`]: the requested dtype, except float16 with
/// `force_upcast`, which computes in float32 (as diffusers' pipelines upcast the VAE).
/// `Clone` is cheap: clones share the weight tensors.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: VaeConfig,
    dtype: DType,
    device: Device,
    tiling: Tiling,
}

impl AutoencoderKL {
    /// Loads a diffusers `vae/` folder: `config.json` and
    /// `diffusion_pytorch_model[.<variant>].safetensors` (memory-mapped, strict: every missing,
    /// unused or wrongly-shaped tensor is reported at once). f32, f16 and bf16 are supported.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        Self::load_with(dir, opts, &VaeOptions::default())
    }

    /// As [`AutoencoderKL::load`], with upcast and tiling choices.
    pub fn load_with(dir: &Path, opts: &LoadOptions, vae_opts: &VaeOptions) -> Result<Self> {
        let config = VaeConfig::from_file(&dir.join("config.json"))?;
        let upcast = vae_opts.force_upcast.unwrap_or(config.force_upcast);
        let dtype = compute_dtype(opts.dtype, upcast)?;
        if dtype != opts.dtype {
            log::info!(
                "{}: force_upcast is set, so the VAE loaded for {:?} computes in f32 (as diffusers)",
                dir.display(),
                opts.dtype
            );
        }
        let load_opts = LoadOptions {
            dtype,
            ..opts.clone()
        };
        let vb = component_var_builder(dir, "diffusion_pytorch_model", &load_opts)?;
        let mut vae = Self::from_var_builder(&vb, config)?;
        vb.finish()?;
        if let Some(t) = vae_opts.tiling {
            vae.set_tiling(t)?;
        }
        Ok(vae)
    }

    /// Builds the model from any [`VarBuilder`] (its dtype is the compute dtype); the caller
    /// calls [`VarBuilder::finish`]. Tiling starts as [`Tiling::Auto`] with the config's tile sizes
    /// (or [`Tiling::Off`] when `sample_size` is too small to give a tile).
    ///
    /// The config is checked first ([`VaeConfig::validate`]).
    pub fn from_var_builder(vb: &VarBuilder, config: VaeConfig) -> Result<Self> {
        config.validate()?;
        let lc = config.latent_channels;
        let quant_conv = if config.use_quant_conv {
            Some(Conv2d::load(&vb.pp("quant_conv"), 2 * lc, 2 * lc, 1, 1, 0)?)
        } else {
            None
        };
        let post_quant_conv = if config.use_post_quant_conv {
            Some(Conv2d::load(&vb.pp("post_quant_conv"), lc, lc, 1, 1, 0)?)
        } else {
            None
        };
        let tiles = TileConfig::from_config(&config);
        let tiling = if tiles.validate().is_ok() {
            Tiling::Auto {
                tiles,
                above_pixels: AUTO_TILE_PIXELS,
            }
        } else {
            log::warn!(
                "{}: sample_size {} gives no usable tile size; automatic tiling is off",
                config.path.display(),
                config.sample_size
            );
            Tiling::Off
        };
        Ok(Self {
            encoder: Encoder::load(&vb.pp("encoder"), &config)?,
            decoder: Decoder::load(&vb.pp("decoder"), &config)?,
            quant_conv,
            post_quant_conv,
            config,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            tiling,
        })
    }

    /// The resolved config (scaling factor, shift, force_upcast, channels, sample size...).
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The dtype the model computes in (f32 for an f16 load with `force_upcast`).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The spatial downsampling factor (8 for SD): image size = latent size x this.
    pub fn scale_factor(&self) -> usize {
        self.config.scale_factor()
    }

    /// The current tiling mode.
    pub fn tiling(&self) -> Tiling {
        self.tiling
    }

    /// Sets the tiling mode (tile sizes are validated).
    pub fn set_tiling(&mut self, tiling: Tiling) -> Result<()> {
        match &tiling {
            Tiling::Off => {}
            Tiling::On(t) | Tiling::Auto { tiles: t, .. } => t.validate()?,
        }
        self.tiling = tiling;
        Ok(())
    }

    /// This model with another tiling mode. Cloning shares the weights (tensors are
    /// reference-counted), so a pipeline holding an `Arc<AutoencoderKL>` can derive a tiled
    /// copy cheaply.
    pub fn with_tiling(&self, tiling: Tiling) -> Result<Self> {
        let mut vae = self.clone();
        vae.set_tiling(tiling)?;
        Ok(vae)
    }

    /// diffusers' `enable_tiling()`: tile whenever the input exceeds one tile, with `tiles`
    /// or, when `None`, the config's sizes (`sample_size`, `sample_size / 8`, overlap 0.25).
    pub fn enable_tiling(&mut self, tiles: Option<TileConfig>) -> Result<()> {
        let t = tiles.unwrap_or_else(|| TileConfig::from_config(&self.config));
        self.set_tiling(Tiling::On(t))
    }

    /// diffusers' `disable_tiling()`: never tile (not even automatically).
    pub fn disable_tiling(&mut self) {
        self.tiling = Tiling::Off;
    }

    /// Encodes images to the latent posterior (after `quant_conv`), tiled when the tiling mode
    /// asks for it. The image is converted to [`AutoencoderKL::dtype`].
    ///
    /// # Shapes: image [B, in_channels, H, W] in [-1, 1], H and W multiples of
    /// [`AutoencoderKL::scale_factor`] -> mean and logvar [B, latent_channels, H/8, W/8].
    pub fn encode(&self, image: &Tensor) -> Result<DiagonalGaussian> {
        let (h, w) = self.check_image(image)?;
        let x = image.to_device(&self.device)?.to_dtype(self.dtype)?;
        let tiles = self.tiling.tiles_for(h, w, h, w, |t| t.sample_size);
        let moments = match tiles {
            Some(t) => tiled_encode(&x, &t, |tile| self.encode_moments(tile))?,
            None => self.encode_moments(&x)?,
        };
        DiagonalGaussian::from_moments(&moments)
    }

    /// Decodes unscaled latents (`post_quant_conv`, then the decoder), tiled when the tiling
    /// mode asks for it; the result is in [`AutoencoderKL::dtype`], roughly in [-1, 1].
    ///
    /// # Shapes: z [B, latent_channels, h, w] -> image [B, out_channels, 8h, 8w].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.decode_with_cancel(z, &Cancel::never())
    }

    /// [`AutoencoderKL::decode`], checking `cancel` before each tile and between the decoder's
    /// blocks: a cancelled decode returns [`Error::Interrupted`] (no partial image).
    pub fn decode_with_cancel(&self, z: &Tensor, cancel: &Cancel) -> Result<Tensor> {
        let (h, w) = self.check_latents(z)?;
        let z = z.to_device(&self.device)?.to_dtype(self.dtype)?;
        let f = self.scale_factor();
        let tiles = self.tiling.tiles_for(h * f, w * f, h, w, |t| t.latent_size);
        match tiles {
            Some(t) => tiled_decode(&z, &t, |tile| self.decode_untiled(tile, cancel)),
            None => self.decode_untiled(&z, cancel),
        }
    }

    /// The encoder and `quant_conv`, channels last inside (converted once each way).
    fn encode_moments(&self, x: &Tensor) -> Result<Tensor> {
        let h = self
            .encoder
            .forward(&x.permute((0, 2, 3, 1))?.contiguous()?)?;
        let h = match &self.quant_conv {
            Some(q) => q.forward(&h)?,
            None => h,
        };
        Ok(h.permute((0, 3, 1, 2))?.contiguous()?)
    }

    /// `post_quant_conv` and the decoder, channels last inside (converted once each way).
    fn decode_untiled(&self, z: &Tensor, cancel: &Cancel) -> Result<Tensor> {
        cancel.check()?;
        let z = z.permute((0, 2, 3, 1))?.contiguous()?;
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(&z)?,
            None => z,
        };
        let image = self.decoder.forward_with_cancel(&z, cancel)?;
        Ok(image.permute((0, 3, 1, 2))?.contiguous()?)
    }

    /// Latents for the diffusion model from images, sampled as diffusers' img2img does
    /// (`retrieve_latents(vae.encode(image), generator)`, i.e. `latent_dist.sample(generator)`),
    /// then scaled by [`AutoencoderKL::scale_latents`]. Errors if the latents hold NaN/inf.
    ///
    /// # Shapes: image [B, 3, H, W] in [-1, 1] -> latents [B, latent_channels, H/8, W/8], f32.
    pub fn latents_from_image(
        &self,
        image: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let z = self.encode(image)?.sample(noise)?;
        self.checked_scaled(&z)
    }

    /// The deterministic variant of [`AutoencoderKL::latents_from_image`]: the posterior's mode
    /// (`retrieve_latents(..., sample_mode="argmax")`), scaled.
    pub fn latents_from_image_mode(&self, image: &Tensor) -> Result<Tensor> {
        let z = self.encode(image)?.mean;
        self.checked_scaled(&z)
    }

    fn checked_scaled(&self, z: &Tensor) -> Result<Tensor> {
        let bad = count_non_finite(z)?;
        if bad > 0 {
            return Err(self.non_finite("the encoded latents", bad));
        }
        self.scale_latents(z)
    }

    /// Images from the diffusion model's latents: [`AutoencoderKL::unscale_latents`], then
    /// [`AutoencoderKL::decode`] (in f32 when `force_upcast` applies). Returns an
    /// [`Error::NonFinite`] instead of an image when the decoder overflowed (NaN/inf), which
    /// would otherwise become a black picture.
    ///
    /// # Shapes: latents [B, latent_channels, h, w] -> image [B, 3, 8h, 8w] in ~[-1, 1], f32.
    pub fn image_from_latents(&self, latents: &Tensor) -> Result<Tensor> {
        self.image_from_latents_with_cancel(latents, &Cancel::never())
    }

    /// [`AutoencoderKL::image_from_latents`] with [`AutoencoderKL::decode_with_cancel`].
    pub fn image_from_latents_with_cancel(
        &self,
        latents: &Tensor,
        cancel: &Cancel,
    ) -> Result<Tensor> {
        let z = self.unscale_latents(latents)?;
        let image = self.decode_with_cancel(&z, cancel)?.to_dtype(DType::F32)?;
        let bad = count_non_finite(&image)?;
        if bad > 0 {
            return Err(self.non_finite("the decoded image", bad));
        }
        Ok(image)
    }

    /// The one place latents are normalised for the diffusion model, computed in f32:
    /// `(z - shift_factor) * scaling_factor`, or `(z - latents_mean) * scaling_factor / latents_std`
    /// when the config sets both (diffusers' SDXL pipelines).
    /// # Shapes: z [B, C, h, w] -> [B, C, h, w] f32.
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let z = z.to_dtype(DType::F32)?;
        Ok(match &self.config.latent_normalization {
            LatentNormalization::Scale {
                scaling_factor,
                shift_factor,
            } => {
                let z = match shift_factor {
                    Some(s) => (z - *s)?,
                    None => z,
                };
                (z * *scaling_factor)?
            }
            LatentNormalization::PerChannel {
                scaling_factor,
                mean,
                std,
            } => {
                let dev = z.device();
                let (mean, std) = (Self::channel_vec(mean, dev)?, Self::channel_vec(std, dev)?);
                (z.broadcast_sub(&mean)? * *scaling_factor)?.broadcast_div(&std)?
            }
        })
    }

    /// The inverse of [`AutoencoderKL::scale_latents`], in f32: `latents / scaling_factor +
    /// shift_factor`, or `latents * latents_std / scaling_factor + latents_mean`.
    /// # Shapes: latents [B, C, h, w] -> [B, C, h, w] f32.
    pub fn unscale_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let x = latents.to_dtype(DType::F32)?;
        Ok(match &self.config.latent_normalization {
            LatentNormalization::Scale {
                scaling_factor,
                shift_factor,
            } => {
                let z = div_scalar(&x, *scaling_factor)?;
                match shift_factor {
                    Some(s) => (z + *s)?,
                    None => z,
                }
            }
            LatentNormalization::PerChannel {
                scaling_factor,
                mean,
                std,
            } => {
                let dev = x.device();
                let (mean, std) = (Self::channel_vec(mean, dev)?, Self::channel_vec(std, dev)?);
                div_scalar(&x.broadcast_mul(&std)?, *scaling_factor)?.broadcast_add(&mean)?
            }
        })
    }

    /// A per-channel constant as an f32 tensor [1, C, 1, 1] on `device`.
    fn channel_vec(v: &[f64], device: &Device) -> Result<Tensor> {
        let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        let n = v.len();
        Ok(Tensor::from_vec(v, (1, n, 1, 1), device)?)
    }

    fn non_finite(&self, what: &str, count: usize) -> Error {
        let hint = match self.dtype {
            DType::F16 => format!(
                "the VAE overflowed in float16 (`{}`). Load it in f32 or bf16, set `force_upcast` \
                 (VaeOptions or the config), or use a VAE fine-tuned for fp16 such as \
                 madebyollin/sdxl-vae-fp16-fix",
                self.config.path.display()
            ),
            _ => "the latents are out of range for the VAE (check the denoising run: NaN/inf \
                  latents, wrong scaling factor or a diverging scheduler)"
                .to_string(),
        };
        Error::NonFinite {
            what: format!("{what} (VAE computing in {:?})", self.dtype),
            count,
            hint,
        }
    }

    fn check_image(&self, image: &Tensor) -> Result<(usize, usize)> {
        let f = self.scale_factor();
        let c = self.config.in_channels;
        match *image.dims() {
            [_, ch, h, w] if ch == c && h.is_multiple_of(f) && w.is_multiple_of(f) && h > 0 && w > 0 => Ok((h, w)),
            [_, ch, h, w] if ch == c => Err(Error::invalid_argument(
                "image",
                format!("{h}x{w} pixels (shape {:?})", image.dims()),
                format!(
                    "height and width that are positive multiples of {f} (the VAE's downsampling factor)"
                ),
            )),
            _ => Err(Error::invalid_argument(
                "image",
                format!("shape {:?}", image.dims()),
                format!("[batch, {c}, height, width] (channels first, {c} channels)"),
            )),
        }
    }

    fn check_latents(&self, z: &Tensor) -> Result<(usize, usize)> {
        let c = self.config.latent_channels;
        match *z.dims() {
            [_, ch, h, w] if ch == c && h > 0 && w > 0 => Ok((h, w)),
            _ => Err(Error::invalid_argument(
                "latents",
                format!("shape {:?}", z.dims()),
                format!("[batch, {c}, height / 8, width / 8] ({c} latent channels)"),
            )),
        }
    }
}

/// The compute dtype for a requested dtype: f16 with upcast computes in f32.
fn compute_dtype(requested: DType, upcast: bool) -> Result<DType> {
    match requested {
        DType::F16 if upcast => Ok(DType::F32),
        DType::F32 | DType::F16 | DType::BF16 => Ok(requested),
        other => Err(Error::unsupported(format!(
            "AutoencoderKL in {other:?}; sd-rs runs the VAE in f32, f16 or bf16"
        ))),
    }
}

/// `x / s` as torch computes a tensor divided by a Python float (a true division by `s` in f32,
/// not a multiplication by `1/s`).
fn div_scalar(x: &Tensor, s: f64) -> Result<Tensor> {
    let s = Tensor::new(s as f32, x.device())?.to_dtype(x.dtype())?;
    Ok(x.broadcast_div(&s)?)
}

/// Number of NaN or infinite values.
pub(crate) fn count_non_finite(x: &Tensor) -> Result<usize> {
    let x = x.to_dtype(DType::F32)?;
    let nan = x.ne(&x)?.to_dtype(DType::U32)?.sum_all()?;
    let inf = x
        .abs()?
        .ge(f32::INFINITY)?
        .to_dtype(DType::U32)?
        .sum_all()?;
    Ok((nan + inf)?.to_scalar::<u32>()? as usize)
}
