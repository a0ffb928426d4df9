//! [`UNet2DConditionModel`]: diffusers'
//! [`UNet2DConditionModel`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/unets/unet_2d_condition.py),
//! the denoiser of SD 1.x, SD 2.x, SDXL and the SDXL refiner.

use std::path::Path;

use candle_core::{DType, Tensor};
use sd_core::{component_var_builder, Error, LoadOptions, Result, VarBuilder};
use sd_nn::ops::{Conv2d, GroupNorm};
use sd_nn::{timestep_embedding, TimestepEmbedding};

use crate::blocks::{DownBlock, MidBlock, ResnetShared, UpBlock};
use crate::config::UNetConfig;

/// SDXL's added conditioning (`added_cond_kwargs` in diffusers).
///
/// # Shapes: text_embeds [B, P] (the pooled text embedding), time_ids [B, N] (N = 6 for SDXL
/// base: original size, crop top-left, target size; N = 5 for the refiner: original size, crop,
/// aesthetic score). `P + N × addition_time_embed_dim` must equal the config's
/// `projection_class_embeddings_input_dim`.
#[derive(Debug, Clone)]
pub struct AddedCond {
    /// Pooled text embeddings, [B, P].
    pub text_embeds: Tensor,
    /// Size/crop/aesthetic conditioning, [B, N].
    pub time_ids: Tensor,
}

/// The conditional UNet. Build it with [`UNet2DConditionModel::load`] from a diffusers `unet/`
/// folder, or with [`UNet2DConditionModel::from_config`] from any [`VarBuilder`].
///
/// Weight names are diffusers' (`conv_in`, `time_embedding`, `add_embedding`, `down_blocks`,
/// `mid_block`, `up_blocks`, `conv_norm_out`, `conv_out`).
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    dtype: DType,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TimestepEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DConditionModel {
    /// Loads a diffusers `unet/` folder: `config.json` plus `diffusion_pytorch_model.safetensors`
    /// (or the `opts.variant` file such as `.fp16`, or sharded files with an
    /// `*.safetensors.index.json`), memory-mapped and converted to `opts.dtype`.
    ///
    /// Loading is strict: every missing, unused or wrongly-shaped tensor is reported at once.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let config = UNetConfig::from_file(&dir.join("config.json"))?;
        let vb = component_var_builder(dir, "diffusion_pytorch_model", opts)?;
        let model = Self::from_config(config, &vb)?;
        vb.finish()?;
        Ok(model)
    }

    /// Builds the model from a resolved config, taking its weights from `vb` (call
    /// [`VarBuilder::finish`] afterwards to get the load report).
    ///
    /// The config is checked first ([`UNetConfig::validate`]): a hand-built config that cannot
    /// give a working model is an [`Error::InvalidArgument`] naming the field.
    pub fn from_config(config: UNetConfig, vb: &VarBuilder) -> Result<Self> {
        config.validate()?;
        let c0 = *config
            .block_out_channels
            .first()
            .expect("invariant: validate() requires at least one block");
        let temb = config.time_embed_dim;
        let shared = ResnetShared {
            temb_channels: temb,
            groups: config.norm_num_groups,
            eps: config.norm_eps,
        };
        let kin = config.conv_in_kernel;
        let kout = config.conv_out_kernel;
        let conv_in = Conv2d::load(&vb.pp("conv_in"), config.in_channels, c0, kin, 1, kin / 2)?;
        let time_embedding = TimestepEmbedding::load(&vb.pp("time_embedding"), c0, temb)?;
        let add_embedding = match &config.text_time {
            Some(tt) => Some(TimestepEmbedding::load(
                &vb.pp("add_embedding"),
                tt.projection_class_embeddings_input_dim,
                temb,
            )?),
            None => None,
        };
        let down_blocks = config
            .down_blocks
            .iter()
            .enumerate()
            .map(|(i, b)| {
                DownBlock::load(
                    &vb.pp("down_blocks").pp(i),
                    b,
                    shared,
                    config.downsample_padding,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let mid_block = match &config.mid_block {
            Some(m) => Some(MidBlock::load(&vb.pp("mid_block"), m, shared)?),
            None => None,
        };
        let up_blocks = config
            .up_blocks
            .iter()
            .enumerate()
            .map(|(i, b)| UpBlock::load(&vb.pp("up_blocks").pp(i), b, shared))
            .collect::<Result<Vec<_>>>()?;
        let conv_norm_out = GroupNorm::load(
            &vb.pp("conv_norm_out"),
            config.norm_num_groups,
            c0,
            config.norm_eps,
        )?;
        let conv_out = Conv2d::load(
            &vb.pp("conv_out"),
            c0,
            config.out_channels,
            kout,
            1,
            kout / 2,
        )?;
        Ok(Self {
            dtype: vb.dtype(),
            config,
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
        })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The dtype of the weights, the computation and the output.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// One denoising step's prediction (noise, v or sample, depending on how the model was
    /// trained), with the same timestep for every batch entry.
    ///
    /// Inputs are converted to the model dtype; the output is in the model dtype.
    ///
    /// # Shapes: sample [B, in_channels, H, W], encoder_hidden_states [B, L,
    /// cross_attention_dim], `added` as in [`AddedCond`] -> [B, out_channels, H, W].
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<Tensor> {
        // diffusers turns a Python float into a float64 tensor, then embeds it in f32.
        let t = Tensor::new(&[timestep as f32], sample.device())?;
        self.forward_t(sample, &t, encoder_hidden_states, added)
    }

    /// As [`UNet2DConditionModel::forward`], with per-sample timesteps.
    ///
    /// # Shapes: timesteps `[B]` or `[1]` (broadcast), any float or integer dtype.
    pub fn forward_t(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, c, h, w) = sample.dims4().map_err(|_| {
            Error::invalid_argument(
                "sample",
                format!("shape {:?}", sample.dims()),
                "[batch, channels, height, width]",
            )
        })?;
        if c != cfg.in_channels {
            return Err(Error::invalid_argument(
                "sample",
                format!("{c} channels"),
                format!("{} (in_channels of the config)", cfg.in_channels),
            ));
        }
        let ehs_ok = matches!(encoder_hidden_states.dims(), [eb, _, d] if *eb == b && *d == cfg.cross_attention_dim);
        if !ehs_ok {
            return Err(Error::invalid_argument(
                "encoder_hidden_states",
                format!("shape {:?}", encoder_hidden_states.dims()),
                format!("[{b}, sequence length, {}]", cfg.cross_attention_dim),
            ));
        }
        let timesteps = match timesteps.dims() {
            [] => timesteps.reshape(1)?.broadcast_as(b)?,
            [1] => timesteps.broadcast_as(b)?,
            [n] if *n == b => timesteps.clone(),
            d => {
                return Err(Error::invalid_argument(
                    "timesteps",
                    format!("shape {d:?}"),
                    format!("[{b}] or [1]"),
                ))
            }
        };

        let mut x = sample.to_dtype(self.dtype)?;
        let context = encoder_hidden_states.to_dtype(self.dtype)?;
        if cfg.center_input_sample {
            x = ((x * 2.0)? - 1.0)?;
        }

        // Time embedding: sinusoids in f32, cast to the model dtype, then the MLP.
        let c0 = *cfg
            .block_out_channels
            .first()
            .expect("invariant: the config was validated at construction");
        let t_emb = timestep_embedding(&timesteps, c0, cfg.flip_sin_to_cos, cfg.freq_shift)?
            .to_dtype(self.dtype)?;
        let mut emb = self.time_embedding.forward(&t_emb)?;
        if let Some(aug) = self.added_embedding(b, added)? {
            emb = (emb + aug)?;
        }

        // Channels last from here to the end: converted once at each boundary of the model.
        let x = x.permute((0, 2, 3, 1))?.contiguous()?;
        // Down path; every intermediate state is kept for the skip connections.
        let mut x = self.conv_in.forward(&x)?;
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            x = block.forward(&x, &emb, &context, &mut skips)?;
        }
        if let Some(mid) = &self.mid_block {
            x = mid.forward(&x, &emb, &context)?;
        }

        // Up path. When a side is not a multiple of 2^levels, each upsampler resizes to the
        // size of the skip connection it will meet instead of doubling.
        let factor = cfg.upsampling_factor();
        let forward_size = !h.is_multiple_of(factor) || !w.is_multiple_of(factor);
        let n_up = self.up_blocks.len();
        for (i, block) in self.up_blocks.iter().enumerate() {
            let size = if forward_size && i + 1 < n_up {
                let idx = skips.len().checked_sub(block.num_skips() + 1);
                match idx.and_then(|i| skips.get(i)) {
                    Some(s) => {
                        let (_, sh, sw, _) = s.dims4()?;
                        Some((sh, sw))
                    }
                    None => None,
                }
            } else {
                None
            };
            x = block.forward(&x, &emb, &context, &mut skips, size)?;
        }

        let x = self.conv_norm_out.forward_silu(&x)?;
        let out = self.conv_out.forward(&x)?;
        Ok(out.permute((0, 3, 1, 2))?.contiguous()?)
    }

    /// SDXL's `text_time` embedding: sinusoids of every time id (f32), flattened per sample and
    /// appended to the pooled text embedding, then `add_embedding`.
    fn added_embedding(&self, b: usize, added: Option<&AddedCond>) -> Result<Option<Tensor>> {
        let (Some(tt), Some(add_embedding)) = (&self.config.text_time, &self.add_embedding) else {
            if added.is_some() {
                return Err(Error::invalid_argument(
                    "added",
                    "text_embeds/time_ids",
                    "None: this UNet has no addition_embed_type",
                ));
            }
            return Ok(None);
        };
        let added = added.ok_or_else(|| {
            Error::invalid_argument(
                "added",
                "None",
                "text_embeds and time_ids (addition_embed_type is \"text_time\")",
            )
        })?;
        let (tb, p) = added.text_embeds.dims2().map_err(|_| {
            Error::invalid_argument(
                "added.text_embeds",
                format!("shape {:?}", added.text_embeds.dims()),
                format!("[{b}, pooled channels]"),
            )
        })?;
        let (ib, n) = added.time_ids.dims2().map_err(|_| {
            Error::invalid_argument(
                "added.time_ids",
                format!("shape {:?}", added.time_ids.dims()),
                format!("[{b}, number of time ids]"),
            )
        })?;
        let dim = tt.addition_time_embed_dim;
        let want = tt.projection_class_embeddings_input_dim;
        if tb != b || ib != b || p + n * dim != want {
            return Err(Error::invalid_argument(
                "added",
                format!(
                    "text_embeds {:?} and time_ids {:?}",
                    added.text_embeds.dims(),
                    added.time_ids.dims()
                ),
                format!(
                    "batch {b} and pooled channels + time ids × {dim} = {want} \
                     (projection_class_embeddings_input_dim)"
                ),
            ));
        }
        let time_embeds = timestep_embedding(
            &added.time_ids.flatten_all()?,
            dim,
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )?
        .reshape((b, n * dim))?;
        let text = added.text_embeds.to_dtype(DType::F32)?;
        let add_embeds = Tensor::cat(&[&text, &time_embeds], 1)?.to_dtype(self.dtype)?;
        Ok(Some(add_embedding.forward(&add_embeds)?))
    }
}
