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
    let file_len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    let reader = ::image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    decode_limited(reader, file_len).map_err(|what| {
        Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, what),
        )
    })
}

/// [`read_rgb8`] on the bytes of an image file held in memory (e.g. a base64 upload), with the
/// same limits; `name` names the input in errors (an argument name such as `init_images[0]`).
pub fn decode_rgb8(bytes: &[u8], name: &str) -> Result<RgbImage> {
    let reader = ::image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| {
            Error::invalid_argument(name, format!("{} bytes", bytes.len()), e.to_string())
        })?;
    decode_limited(reader, bytes.len() as u64).map_err(|what| {
        Error::invalid_argument(
            name,
            format!("{} bytes", bytes.len()),
            format!("a PNG or JPEG image ({what})"),
        )
    })
}

/// Decodes with [`MAX_IMAGE_SIDE`] and [`decode_limit`]; the error says what went wrong.
fn decode_limited<R: std::io::BufRead + std::io::Seek>(
    mut reader: ::image::ImageReader<R>,
    file_len: u64,
) -> std::result::Result<RgbImage, String> {
    let mut limits = ::image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(decode_limit(file_len));
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
        format!("cannot read image: {e}{hint}")
    })?;
    Ok(img.to_rgb8())
}

fn png_error(e: impl std::fmt::Display) -> Error {
    Error::invalid_argument(
        "png",
        "an image to encode",
        format!("an encodable image ({e})"),
    )
}

/// An RGB8 image as PNG file bytes, with AUTOMATIC1111's `parameters` text chunk when given
/// (tEXt when the text is Latin-1, iTXt otherwise, as AUTOMATIC1111 writes it).
pub fn encode_png(img: &RgbImage, parameters: Option<&str>) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, img.width(), img.height());
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        if let Some(text) = parameters {
            if text.chars().all(|c| (c as u32) < 256) {
                enc.add_text_chunk("parameters".into(), text.into())
            } else {
                enc.add_itxt_chunk("parameters".into(), text.into())
            }
            .map_err(png_error)?;
        }
        let mut w = enc.write_header().map_err(png_error)?;
        w.write_image_data(img.as_raw()).map_err(png_error)?;
    }
    Ok(buf)
}

/// The `parameters` text of a PNG file's bytes (tEXt, zTXt or iTXt), if it has one.
pub fn png_parameters(bytes: &[u8]) -> Result<Option<String>> {
    let bad = |e: png::DecodingError| {
        Error::invalid_argument(
            "image",
            format!("{} bytes", bytes.len()),
            format!("a PNG file ({e})"),
        )
    };
    let reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .map_err(bad)?;
    let info = reader.info();
    if let Some(t) = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
    {
        return Ok(Some(t.text.clone()));
    }
    for t in &info.compressed_latin1_text {
        if t.keyword == "parameters" {
            return Ok(t.get_text().ok());
        }
    }
    for t in &info.utf8_text {
        if t.keyword == "parameters" {
            return Ok(t.get_text().ok());
        }
    }
    Ok(None)
}
