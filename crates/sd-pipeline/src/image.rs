//! Images in and out: RGB8 images <-> float tensors, as diffusers' `VaeImageProcessor`.

use candle_core::{DType, Device, Tensor};
use sd_core::{Error, Result};

pub use ::image::RgbImage;

/// `[N, 3, H, W]` floats in [0, 1] to RGB8 images, rounding half to even as numpy's
/// `(x * 255).round()` does.
pub fn to_rgb8(images: &Tensor) -> Result<Vec<RgbImage>> {
    let (n, c, h, w) = images.dims4()?;
    if c != 3 {
        return Err(Error::invalid_argument(
            "images",
            format!("{c} channels"),
            "3 (RGB)",
        ));
    }
    let data: Vec<f32> = images
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1))?
        .flatten_all()?
        .to_vec1()?;
    let per = h * w * 3;
    (0..n)
        .map(|i| {
            let px: Vec<u8> = data[i * per..(i + 1) * per]
                .iter()
                .map(|v| (v.clamp(0.0, 1.0) * 255.0).round_ties_even() as u8)
                .collect();
            RgbImage::from_raw(w as u32, h as u32, px).ok_or_else(|| {
                Error::invalid_argument("images", "a buffer of the wrong size", "H*W*3 bytes")
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

/// Reads an image file (PNG or JPEG) as RGB8; errors name the file.
pub fn read_rgb8(path: &std::path::Path) -> Result<RgbImage> {
    let img = ::image::open(path).map_err(|e| {
        Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("cannot read image: {e}"),
            ),
        )
    })?;
    Ok(img.to_rgb8())
}
