//! Tiled encoding and decoding, as diffusers'
//! [`AutoencoderKL.enable_tiling`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/autoencoders/autoencoder_kl.py)
//! (`_tiled_encode`, `tiled_decode`, `blend_v`, `blend_h`): the input is cut into overlapping
//! tiles that are encoded/decoded one at a time, each tile's top and left edges are blended
//! linearly with its (already blended) neighbours, and the tiles are cropped and stitched.
//!
//! Memory then depends on the tile size, not the image size; the result differs from an untiled
//! pass because every tile sees only its own context (mid-block attention and group norm
//! statistics are per tile).

use candle_core::{DType, Tensor};
use sd_core::{Error, Result};

use crate::config::VaeConfig;

/// Tile sizes, diffusers' `tile_sample_min_size`, `tile_latent_min_size` and
/// `tile_overlap_factor`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TileConfig {
    /// Tile size in image pixels (diffusers: the config's `sample_size`).
    pub sample_size: usize,
    /// Tile size in latents (diffusers: `sample_size / 2^(blocks - 1)`).
    pub latent_size: usize,
    /// Fraction of a tile that overlaps its neighbour (0.25).
    pub overlap_factor: f64,
}

impl TileConfig {
    /// diffusers' defaults for a VAE config: `sample_size`, `sample_size / scale_factor`, 0.25.
    pub fn from_config(cfg: &VaeConfig) -> Self {
        Self {
            sample_size: cfg.sample_size,
            latent_size: cfg.tile_latent_size(),
            overlap_factor: 0.25,
        }
    }

    /// Checks that every step of the tile loops is at least one element.
    pub fn validate(&self) -> Result<()> {
        let ok = self.sample_size > 0
            && self.latent_size > 0
            && (0.0..1.0).contains(&self.overlap_factor)
            && step(self.sample_size, self.overlap_factor) > 0
            && step(self.latent_size, self.overlap_factor) > 0;
        if ok {
            Ok(())
        } else {
            Err(Error::invalid_argument(
                "tile config",
                format!("{self:?}"),
                "positive tile sizes and an overlap factor in [0, 1) that leaves a step of at \
                 least one pixel and one latent",
            ))
        }
    }
}

/// When encode/decode use tiles.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Tiling {
    /// Never tile.
    Off,
    /// Tile whenever the input exceeds one tile, as diffusers after `enable_tiling()`.
    On(TileConfig),
    /// Tile (as `On`) only when the image has more than `above_pixels` pixels (H·W).
    Auto {
        /// The tile sizes.
        tiles: TileConfig,
        /// The image area above which tiling starts.
        above_pixels: usize,
    },
}

/// The default [`Tiling::Auto`] threshold: images above 2 megapixels (e.g. 1536x1536; not
/// 1024x1024 or 1024x2048) are tiled, so that a 2048x2048 decode stays within a few GB.
pub const AUTO_TILE_PIXELS: usize = 2 * 1024 * 1024;

impl Tiling {
    /// The tiles for an `height` x `width` pixel image whose input to the tiled model is
    /// `in_h` x `in_w` elements with tiles of `tile` elements, if tiling applies (also used by
    /// sd-pipeline's memory estimate, so that both take the same decision).
    pub fn tiles_for(
        &self,
        height: usize,
        width: usize,
        in_h: usize,
        in_w: usize,
        tile: impl Fn(&TileConfig) -> usize,
    ) -> Option<TileConfig> {
        let tiles = match self {
            Tiling::Off => return None,
            Tiling::On(t) => t,
            Tiling::Auto {
                tiles,
                above_pixels,
            } => {
                if height.saturating_mul(width) <= *above_pixels {
                    return None;
                }
                tiles
            }
        };
        (in_h > tile(tiles) || in_w > tile(tiles)).then_some(*tiles)
    }
}

/// `int(size * (1 - overlap))`, the stride between tile origins.
fn step(size: usize, overlap: f64) -> usize {
    (size as f64 * (1.0 - overlap)) as usize
}

/// `int(size * overlap)`, the blended band.
fn extent(size: usize, overlap: f64) -> usize {
    (size as f64 * overlap) as usize
}

/// Tiled encoding: tiles of `sample_size` pixels every `int(sample_size * (1 - overlap))`,
/// `encode_tile` maps a tile to its moments; blend band and crop are in latents.
pub(crate) fn tiled_encode(
    x: &Tensor,
    t: &TileConfig,
    encode_tile: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let blend = extent(t.latent_size, t.overlap_factor);
    tiled(
        x,
        t.sample_size,
        step(t.sample_size, t.overlap_factor),
        blend,
        t.latent_size - blend,
        encode_tile,
    )
}

/// Tiled decoding: tiles of `latent_size` latents every `int(latent_size * (1 - overlap))`;
/// blend band and crop are in pixels.
pub(crate) fn tiled_decode(
    z: &Tensor,
    t: &TileConfig,
    decode_tile: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let blend = extent(t.sample_size, t.overlap_factor);
    tiled(
        z,
        t.latent_size,
        step(t.latent_size, t.overlap_factor),
        blend,
        t.sample_size - blend,
        decode_tile,
    )
}

/// The shared tile loop. diffusers blends in place in row-major order, so a tile is blended with
/// the already-blended tile above and to its left; only the previous row is kept here.
fn tiled(
    x: &Tensor,
    tile: usize,
    stride: usize,
    blend: usize,
    limit: usize,
    mut f: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    if stride == 0 || limit == 0 {
        return Err(Error::invalid_argument(
            "tile config",
            format!("a tile of {tile} with stride {stride} and crop {limit}"),
            "a positive stride and crop (see TileConfig::validate)",
        ));
    }
    let (_, _, h, w) = x.dims4()?;
    let mut prev_row: Vec<Tensor> = Vec::new();
    let mut out_rows = Vec::new();
    for i in (0..h).step_by(stride) {
        let mut row: Vec<Tensor> = Vec::new();
        let mut pieces = Vec::new();
        for (jdx, j) in (0..w).step_by(stride).enumerate() {
            let input = x
                .narrow(2, i, tile.min(h - i))?
                .narrow(3, j, tile.min(w - j))?;
            let mut out = f(&input)?;
            if let Some(above) = prev_row.get(jdx).filter(|_| i > 0) {
                out = blend_v(above, &out, blend)?;
            }
            if jdx > 0 {
                out = blend_h(&row[jdx - 1], &out, blend)?;
            }
            let (_, _, oh, ow) = out.dims4()?;
            pieces.push(
                out.narrow(2, 0, limit.min(oh))?
                    .narrow(3, 0, limit.min(ow))?,
            );
            row.push(out);
        }
        out_rows.push(Tensor::cat(&pieces, 3)?);
        prev_row = row;
    }
    Ok(Tensor::cat(&out_rows, 2)?)
}

/// diffusers' `blend_v`: the first `e = min(a.h, b.h, extent)` rows of `b` become
/// `a[a.h - e + y] * (1 - y/e) + b[y] * (y/e)`.
pub fn blend_v(a: &Tensor, b: &Tensor, extent: usize) -> Result<Tensor> {
    blend(a, b, extent, 2)
}

/// diffusers' `blend_h`: as [`blend_v`] along the width.
pub fn blend_h(a: &Tensor, b: &Tensor, extent: usize) -> Result<Tensor> {
    blend(a, b, extent, 3)
}

fn blend(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let (na, nb) = (a.dim(dim)?, b.dim(dim)?);
    let e = extent.min(na).min(nb);
    if e == 0 {
        return Ok(b.clone());
    }
    // Weights as torch sees them: Python doubles (1 - y/e, y/e) used as f32 scalars.
    let wb: Vec<f32> = (0..e).map(|y| (y as f64 / e as f64) as f32).collect();
    let wa: Vec<f32> = (0..e).map(|y| (1.0 - y as f64 / e as f64) as f32).collect();
    let mut shape = [1usize; 4];
    shape[dim] = e;
    let dev = b.device();
    let wa = Tensor::from_vec(wa, &shape[..], dev)?;
    let wb = Tensor::from_vec(wb, &shape[..], dev)?;
    // torch multiplies half-precision tensors by the f32 scalar in f32 and rounds each product.
    let scale = |t: &Tensor, w: &Tensor| -> Result<Tensor> {
        Ok(t.to_dtype(DType::F32)?
            .broadcast_mul(w)?
            .to_dtype(t.dtype())?)
    };
    let head = (scale(&a.narrow(dim, na - e, e)?, &wa)? + scale(&b.narrow(dim, 0, e)?, &wb)?)?;
    if e == nb {
        Ok(head)
    } else {
        Ok(Tensor::cat(&[head, b.narrow(dim, e, nb - e)?], dim)?)
    }
}
