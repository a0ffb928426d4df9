//! Conversions between the VAE's [-1, 1] float images and 8-bit RGB, as diffusers'
//! [`VaeImageProcessor`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/image_processor.py)
//! (`postprocess(output_type="pil")` and `preprocess` of a PIL image, without resizing).

use candle_core::{DType, Device, Tensor};
use sd_core::{Error, Result};

/// Float images in [-1, 1] to bytes, as diffusers' `postprocess`: [`denormalize`], then
/// [`to_bytes`] (`* 255` and round half to even, numpy's `round`), in f32 arithmetic.
///
/// # Shapes: image [B, C, H, W] (any float dtype) -> u8 [B, H, W, C] (channels last, as PIL).
pub fn postprocess(image: &Tensor) -> Result<Tensor> {
    to_bytes(&denormalize(image)?)
}

/// diffusers' `VaeImageProcessor.denormalize`: `(x * 0.5 + 0.5).clamp(0, 1)` in f32 (each
/// operation rounded as torch rounds it). The pipelines return images in this range.
///
/// # Shapes: image [B, C, H, W] (any float dtype) -> [B, C, H, W] f32 in [0, 1].
pub fn denormalize(image: &Tensor) -> Result<Tensor> {
    let x = image.to_dtype(DType::F32)?;
    Ok(x.affine(0.5, 0.5)?.clamp(0f32, 1f32)?)
}

/// Images in [0, 1] to bytes, as diffusers' `numpy_to_pil`: `(x * 255).round()` (half to even)
/// after clamping to [0, 1]; NaN becomes 0, as numpy's cast does on x86.
///
/// # Shapes: image [B, C, H, W] (any float dtype) -> u8 [B, H, W, C] (channels last, as PIL).
pub fn to_bytes(image: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = image.dims4().map_err(|_| {
        Error::invalid_argument(
            "image",
            format!("shape {:?}", image.dims()),
            "[batch, channels, height, width]",
        )
    })?;
    let hwc = image
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let bytes: Vec<u8> = hwc.into_iter().map(unit_to_byte).collect();
    Ok(Tensor::from_vec(bytes, (b, h, w, c), image.device())?)
}

/// One value of [`to_bytes`].
fn unit_to_byte(x: f32) -> u8 {
    (x.clamp(0.0, 1.0) * 255.0).round_ties_even() as u8
}

/// Bytes to float images in [-1, 1], as diffusers' `preprocess` of a PIL image:
/// `x / 255` then `2 * x - 1`, in f32.
///
/// # Shapes: pixels u8 [B, H, W, C] or [H, W, C] (channels last) -> [B, C, H, W] f32.
pub fn preprocess(pixels: &Tensor) -> Result<Tensor> {
    let pixels = match pixels.dims().len() {
        3 => pixels.unsqueeze(0)?,
        4 => pixels.clone(),
        _ => {
            return Err(Error::invalid_argument(
                "pixels",
                format!("shape {:?}", pixels.dims()),
                "[batch, height, width, channels] or [height, width, channels]",
            ))
        }
    };
    if pixels.dtype() != DType::U8 {
        return Err(Error::invalid_argument(
            "pixels",
            format!("dtype {:?}", pixels.dtype()),
            "u8 pixel values",
        ));
    }
    let dims = pixels.dims4()?;
    let v: Vec<f32> = pixels
        .flatten_all()?
        .to_vec1::<u8>()?
        .into_iter()
        .map(|p| (p as f32 / 255.0) * 2.0 - 1.0)
        .collect();
    Ok(Tensor::from_vec(v, dims, pixels.device())?
        .permute((0, 3, 1, 2))?
        .contiguous()?)
}

/// An 8-bit RGB image, rows top to bottom, `data.len() == width * height * 3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Interleaved RGB bytes, row-major.
    pub data: Vec<u8>,
}

/// [`postprocess`] into one [`RgbImage`] per batch entry. # Shapes: image [B, 3, H, W] in
/// [-1, 1].
pub fn to_rgb_images(image: &Tensor) -> Result<Vec<RgbImage>> {
    check_rgb(image)?;
    rgb_images(&postprocess(image)?)
}

/// [`to_bytes`] into one [`RgbImage`] per batch entry, for images already in [0, 1] (what the
/// pipelines return). # Shapes: image [B, 3, H, W] in [0, 1].
pub fn unit_to_rgb_images(image: &Tensor) -> Result<Vec<RgbImage>> {
    check_rgb(image)?;
    rgb_images(&to_bytes(image)?)
}

fn check_rgb(image: &Tensor) -> Result<()> {
    let c = image.dims4()?.1;
    if c != 3 {
        return Err(Error::invalid_argument(
            "image",
            format!("{c} channels (shape {:?})", image.dims()),
            "3 (RGB) channels",
        ));
    }
    Ok(())
}

/// Splits u8 `[B, H, W, 3]` into images.
fn rgb_images(bytes: &Tensor) -> Result<Vec<RgbImage>> {
    let (b, h, w, _) = bytes.dims4()?;
    let bytes = bytes.flatten_all()?.to_vec1::<u8>()?;
    let n = h * w * 3;
    Ok((0..b)
        .map(|i| RgbImage {
            width: w,
            height: h,
            data: bytes[i * n..(i + 1) * n].to_vec(),
        })
        .collect())
}

/// [`preprocess`] of same-sized [`RgbImage`]s into one batch on `device`.
/// # Shapes: -> [B, 3, H, W] f32 in [-1, 1].
pub fn from_rgb_images(images: &[RgbImage], device: &Device) -> Result<Tensor> {
    let first = images
        .first()
        .ok_or_else(|| Error::invalid_argument("images", "an empty list", "at least one image"))?;
    let (w, h) = (first.width, first.height);
    let mut data = Vec::with_capacity(images.len() * w * h * 3);
    for (i, im) in images.iter().enumerate() {
        if im.width != w || im.height != h || im.data.len() != w * h * 3 {
            return Err(Error::invalid_argument(
                format!("images[{i}]"),
                format!("{}x{} with {} bytes", im.width, im.height, im.data.len()),
                format!(
                    "{w}x{h} (the first image's size) with {} RGB bytes",
                    w * h * 3
                ),
            ));
        }
        data.extend_from_slice(&im.data);
    }
    preprocess(&Tensor::from_vec(data, (images.len(), h, w, 3), device)?)
}
