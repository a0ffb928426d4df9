//! SDXL's invisible watermark, as diffusers applies it when the `invisible-watermark` package is
//! installed ([`StableDiffusionXLWatermarker`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/pipelines/stable_diffusion_xl/watermark.py)):
//! a fixed 48-bit message ([`WATERMARK_BITS`]) hidden in the U channel of every SDXL image with
//! imwatermark's `dwtDct` method, and read back with it ([`detect`]). Pure Rust on plain slices;
//! the maths is in `dwt_dct.rs`.
//!
//! The pipelines call [`apply_watermark`] between the VAE and the post-processing (see
//! [`crate::StableDiffusion::decode_output`]); docs/watermark.md says when and how to turn it off.

mod dwt_dct;

use candle_core::{DType, Device, Tensor};
use sd_core::{Error, Result};

/// diffusers' `WATERMARK_MESSAGE` (Stability AI's, from generative-models).
pub const WATERMARK_MESSAGE: u64 = 0xB3EC_907B_B19E;

/// The 48 bits of [`WATERMARK_MESSAGE`], most significant first (diffusers' `WATERMARK_BITS`).
pub const WATERMARK_BITS: [u8; 48] = {
    let mut bits = [0u8; 48];
    let mut i = 0;
    while i < 48 {
        bits[i] = ((WATERMARK_MESSAGE >> (47 - i)) & 1) as u8;
        i += 1;
    }
    bits
};

/// diffusers skips images narrower than this (its check is on the width only).
pub const MIN_WIDTH: usize = 256;

/// imwatermark refuses images with fewer pixels than this (256 x 256), to mark and to read.
pub const MIN_PIXELS: usize = 256 * 256;

/// [`detect`] calls an image marked when at least this many of the 48 bits read equal
/// [`WATERMARK_BITS`] (at most 8 wrong). An unmarked image reads bits that match by chance,
/// each with probability about 1/2: 40 or more of 48 then has probability 1.6e-6. PNG's 8-bit
/// rounding costs a marked image a few bits (42 of 48 on the noise reference, 48 of 48 on its
/// floats); smooth images carry the mark poorly even before rounding (39 of 48 on the gradient
/// reference's floats, in the Python package as here).
pub const MIN_MATCHING_BITS: usize = 40;

/// diffusers' `StableDiffusionXLWatermarker.apply_watermark`: marks a batch of decoded images.
///
/// Each image is taken as diffusers does: `255 * (x / 2 + 0.5)` in f32, channels reversed to BGR,
/// imwatermark's `encode(image, "dwtDct")` with [`WATERMARK_BITS`], back to RGB, then
/// `clamp(2 * (x / 255 - 0.5), -1, 1)`. No clamp before marking, as diffusers.
///
/// Images narrower than [`MIN_WIDTH`] come back unchanged (as diffusers). Images at least that
/// wide but with fewer than [`MIN_PIXELS`] pixels (e.g. 256x128) make diffusers fail with
/// imwatermark's "image too small"; here they come back unchanged, with a warning logged.
///
/// # Shapes: images [N, 3, H, W] in [-1, 1] (any float dtype, any device) -> [N, 3, H, W] f32
/// on the same device (or the input itself when skipped).
pub fn apply_watermark(images: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = images.dims4().map_err(|_| {
        Error::invalid_argument(
            "images",
            format!("shape {:?}", images.dims()),
            "[batch, 3, height, width]",
        )
    })?;
    if c != 3 {
        return Err(Error::invalid_argument(
            "images",
            format!("{c} channels"),
            "3 (RGB) channels",
        ));
    }
    if w < MIN_WIDTH {
        return Ok(images.clone());
    }
    if h.saturating_mul(w) < MIN_PIXELS {
        log::warn!(
            "{w}x{h} image not watermarked: the SDXL watermark needs at least {MIN_PIXELS} pixels \
             (diffusers fails with imwatermark's \"image too small\" here)"
        );
        return Ok(images.clone());
    }
    let mut data = images
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let plane = h * w;
    for image in data.chunks_exact_mut(3 * plane) {
        for x in image.iter_mut() {
            *x = 255.0 * (*x / 2.0 + 0.5);
        }
        let (r, rest) = image.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        dwt_dct::encode_planes(b, g, r, h, w, &WATERMARK_BITS);
        for x in image.iter_mut() {
            *x = (2.0 * (*x / 255.0 - 0.5)).clamp(-1.0, 1.0);
        }
    }
    Ok(Tensor::from_vec(data, (n, c, h, w), images.device())?)
}

/// [`check_size`], and three planes of `height x width` values each; the plane size.
fn check_planes(lens: [usize; 3], height: usize, width: usize) -> Result<usize> {
    check_size(height, width)?;
    let n = height * width;
    if lens.iter().any(|&l| l != n) {
        return Err(Error::invalid_argument(
            "planes",
            format!("lengths {}, {}, {}", lens[0], lens[1], lens[2]),
            format!("{n} values each ({height}x{width})"),
        ));
    }
    Ok(n)
}

/// imwatermark's `WatermarkEncoder` with `set_watermark("bits", bits)` and
/// `encode(image, "dwtDct")`, on planar float images with values in 0..255 (what its BGR arrays
/// hold; planes are row-major `height` x `width`), in place.
pub fn encode_dwt_dct(
    [r, g, b]: [&mut [f32]; 3],
    height: usize,
    width: usize,
    bits: &[u8],
) -> Result<()> {
    check_planes([r.len(), g.len(), b.len()], height, width)?;
    if bits.is_empty() {
        return Err(Error::invalid_argument("bits", "none", "at least one bit"));
    }
    dwt_dct::encode_planes(b, g, r, height, width, bits);
    Ok(())
}

/// imwatermark's `WatermarkDecoder("bits", len).decode(image, "dwtDct")` on an 8-bit image, read
/// as imwatermark reads the BGR array `cv2.imread` gives (OpenCV's 8-bit YUV, float64 Haar):
/// `len` bits, each 0 or 1.
pub fn decode_dwt_dct_rgb8(
    pixels: &[u8],
    height: usize,
    width: usize,
    len: usize,
) -> Result<Vec<u8>> {
    check_size(height, width)?;
    let n = height * width;
    if pixels.len() != 3 * n {
        return Err(Error::invalid_argument(
            "pixels",
            format!("{} bytes", pixels.len()),
            format!("{} (RGB, {height}x{width})", 3 * n),
        ));
    }
    let u: Vec<f64> = pixels
        .chunks_exact(3)
        .map(|p| f64::from(dwt_dct::u_from_bgr_u8(p[2], p[1], p[0])))
        .collect();
    Ok(dwt_dct::decode_u_plane(&u, height, width, len))
}

/// [`decode_dwt_dct_rgb8`] on planar float images in 0..255 (imwatermark on a float32 array:
/// OpenCV's float YUV, float32 Haar).
pub fn decode_dwt_dct_f32(
    [r, g, b]: [&[f32]; 3],
    height: usize,
    width: usize,
    len: usize,
) -> Result<Vec<u8>> {
    let n = check_planes([r.len(), g.len(), b.len()], height, width)?;
    let u: Vec<f32> = (0..n)
        .map(|k| dwt_dct::yuv_from_bgr_f32(b[k], g[k], r[k]).1)
        .collect();
    Ok(dwt_dct::decode_u_plane(&u, height, width, len))
}

fn check_size(height: usize, width: usize) -> Result<()> {
    if height.saturating_mul(width) < MIN_PIXELS {
        return Err(Error::invalid_argument(
            "image",
            format!("{width}x{height}"),
            format!("at least {MIN_PIXELS} pixels (256x256), imwatermark's minimum"),
        ));
    }
    Ok(())
}

/// What [`detect`] read from an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    /// The 48 bits read, each 0 or 1.
    pub bits: Vec<u8>,
    /// How many equal [`WATERMARK_BITS`].
    pub matching: usize,
}

impl Detection {
    /// At least [`MIN_MATCHING_BITS`] of the 48 bits match diffusers' message.
    pub fn is_sdxl(&self) -> bool {
        self.matching >= MIN_MATCHING_BITS
    }

    /// The bits as a string of 0s and 1s.
    pub fn bit_string(&self) -> String {
        self.bits
            .iter()
            .map(|&b| if b == 1 { '1' } else { '0' })
            .collect()
    }
}

/// Reads the 48-bit SDXL message from an 8-bit RGB image (e.g. a PNG), as imwatermark's
/// `WatermarkDecoder("bits", 48)` with `dwtDct` does, and counts the bits that match
/// diffusers' message. Images under [`MIN_PIXELS`] are refused (imwatermark raises there too).
pub fn detect(image: &::image::RgbImage) -> Result<Detection> {
    let (w, h) = image.dimensions();
    let bits = decode_dwt_dct_rgb8(image.as_raw(), h as usize, w as usize, WATERMARK_BITS.len())?;
    let matching = bits
        .iter()
        .zip(WATERMARK_BITS)
        .filter(|(a, b)| **a == *b)
        .count();
    Ok(Detection { bits, matching })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_bits_are_diffusers_binary_literal() {
        let text: String = WATERMARK_BITS
            .iter()
            .map(|b| char::from(b'0' + b))
            .collect();
        assert_eq!(text, "101100111110110010010000011110111011000110011110");
    }

    #[test]
    fn chance_of_a_false_detection() {
        // P(Bin(48, 1/2) >= 40), the figure MIN_MATCHING_BITS's docs give
        let mut c = 1f64; // C(48, 0)
        let mut tail = 0f64;
        for k in 0..=48u32 {
            if k as usize >= MIN_MATCHING_BITS {
                tail += c;
            }
            c = c * f64::from(48 - k) / f64::from(k + 1);
        }
        let p = tail / 2f64.powi(48);
        assert!((1.5e-6..1.7e-6).contains(&p), "{p}");
    }

    #[test]
    fn small_images_are_refused_or_skipped() {
        let img = ::image::RgbImage::new(256, 128);
        assert!(detect(&img).is_err());
        let t = Tensor::zeros((1, 3, 128, 256), DType::F32, &Device::Cpu).expect("tensor");
        let out = apply_watermark(&t).expect("skipped");
        assert_eq!(out.dims(), t.dims());
        let mut planes = [vec![0f32; 10], vec![0f32; 10], vec![0f32; 10]];
        let [r, g, b] = &mut planes;
        assert!(encode_dwt_dct([r, g, b], 2, 5, &WATERMARK_BITS).is_err());
    }
}
