//! Images in and out: RGB8 images <-> float tensors, through sd-vae's conversions (diffusers'
//! `VaeImageProcessor`), and image files read with limits checked against the file's size.

use candle_core::{Device, Tensor};
use sd_core::{Error, Result};

pub use ::image::RgbImage;

/// The largest width or height of an input image (SDXL works at 1024).
pub const MAX_IMAGE_SIDE: u32 = 16384;

/// `[N, 3, H, W]` floats in [0, 1] (what the pipeline returns) to RGB8 images, with
/// [`sd_vae::image::unit_to_rgb_images`]: `(x * 255).round()` half to even, as numpy.
pub fn to_rgb8(images: &Tensor) -> Result<Vec<RgbImage>> {
    sd_vae::image::unit_to_rgb_images(images)?
        .into_iter()
        .map(|im| {
            let (w, h) = (im.width, im.height);
            let dims = u32::try_from(w).ok().zip(u32::try_from(h).ok());
            dims.and_then(|(w, h)| RgbImage::from_raw(w, h, im.data))
                .ok_or_else(|| {
                    Error::invalid_argument(
                        "images",
                        format!("{w}x{h}"),
                        "an image whose size fits in u32 and its RGB buffer",
                    )
                })
        })
        .collect()
}

/// An RGB8 image to a `[1, 3, H, W]` tensor in [-1, 1] (diffusers' `preprocess` + `normalize`,
/// via [`sd_vae::image::preprocess`]).
pub fn from_rgb8(image: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = image.dimensions();
    let pixels = Tensor::from_vec(
        image.as_raw().clone(),
        (1, h as usize, w as usize, 3),
        device,
    )?;
    sd_vae::image::preprocess(&pixels)
}

/// The decoder's memory limit for a file of `file_len` bytes: 16 MiB, plus 4096 bytes per byte of
/// file (PNG's deflate stops near 1032:1, then palette and low bit depths expand), at most
/// 512 MiB. A header that declares more (a decompression bomb, or a truncated file with huge
/// dimensions) is refused before anything is allocated for it.
pub fn decode_limit(file_len: u64) -> u64 {
    (16u64 << 20)
        .saturating_add(file_len.saturating_mul(4096))
        .min(512u64 << 20)
}

/// Reads an image file (PNG or JPEG, any bit depth, palette or alpha) as RGB8; errors name the
/// file. Sides above [`MAX_IMAGE_SIDE`] and decoded sizes above [`decode_limit`] of the file's
/// size are refused before decoding.
pub fn read_rgb8(path: &std::path::Path) -> Result<RgbImage> {
    let bad = |what: String| {
        Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, what),
        )
    };
    let file_len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    let mut limits = ::image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(decode_limit(file_len));
    let mut reader = ::image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    reader.limits(limits);
    let img = reader.decode().map_err(|e| {
        let hint = match e {
            ::image::ImageError::Limits(_) => format!(
                " (sd-rs reads images up to {MAX_IMAGE_SIDE} pixels a side, decoding at most \
                 {} MiB for this {file_len}-byte file)",
                decode_limit(file_len) >> 20
            ),
            _ => String::new(),
        };
        bad(format!("cannot read image: {e}{hint}"))
    })?;
    Ok(img.to_rgb8())
}
