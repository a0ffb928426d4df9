//! Live previews for `/sdapi/v1/progress`'s `current_image`, as AUTOMATIC1111's "Approx cheap"
//! live preview method (`modules/sd_vae_approx.py`, `cheap_approximation`): a fixed linear map
//! of the 4 latent channels to RGB, one pixel per latent (so the preview is the latent size,
//! 1/8 of the image's sides for SD models, as AUTOMATIC1111's cheap previews are), then
//! `clamp(x * 0.5 + 0.5, 0, 1) * 255` truncated to 8 bits (`single_sample_to_image`).

use sd_pipeline::core::candle_core::{DType, Tensor};
use sd_pipeline::core::{Error, Result};
use sd_pipeline::image::RgbImage;
use sd_pipeline::ModelFamily;

/// `rgb[r] = sum over l of latent[l] * COEFFS[l][r]`: AUTOMATIC1111's coefficients for SD 1.x
/// and 2.x latents.
const SD: [[f32; 3]; 4] = [
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
];

/// The same for SDXL latents (base and refiner).
const SDXL: [[f32; 3]; 4] = [
    [0.3448, 0.4168, 0.4395],
    [-0.1953, -0.0290, 0.0250],
    [0.1074, 0.0886, -0.0163],
    [-0.3730, -0.2499, -0.2088],
];

/// The first image of `latents` (`[N, 4, h, w]`, the model's scaled latents) as an `w` x `h`
/// RGB preview.
pub fn cheap_approximation(latents: &Tensor, family: ModelFamily) -> Result<RgbImage> {
    let coeffs = match family {
        ModelFamily::Sd => &SD,
        ModelFamily::Sdxl | ModelFamily::SdxlRefiner => &SDXL,
    };
    let (_, c, h, w) = latents.dims4()?;
    if c != 4 {
        return Err(Error::unsupported(format!(
            "a live preview of {c}-channel latents (the cheap approximation maps 4 channels)"
        )));
    }
    let planes: Vec<Vec<Vec<f32>>> = latents.get(0)?.to_dtype(DType::F32)?.to_vec3()?;
    let mut img = RgbImage::new(w as u32, h as u32);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let (x, y) = (x as usize, y as usize);
        for (r, out) in px.0.iter_mut().enumerate() {
            let v: f32 = (0..4).map(|l| planes[l][y][x] * coeffs[l][r]).sum();
            // numpy's astype(uint8) truncates
            *out = (255.0 * (v * 0.5 + 0.5).clamp(0.0, 1.0)) as u8;
        }
    }
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sd_pipeline::core::candle_core::Device;

    /// A `[1, 4, 2, 3]` latent with values `(c * 6 + y * 3 + x) / 8 - 1.4`.
    fn ramp() -> Tensor {
        let v: Vec<f32> = (0..24).map(|i| i as f32 / 8.0 - 1.4).collect();
        Tensor::from_vec(v, (1, 4, 2, 3), &Device::Cpu).unwrap()
    }

    fn rows(img: &RgbImage) -> Vec<Vec<[u8; 3]>> {
        (0..img.height())
            .map(|y| (0..img.width()).map(|x| img.get_pixel(x, y).0).collect())
            .collect()
    }

    /// Against AUTOMATIC1111's code run in PyTorch 2.15 on `ramp()`: `torch.einsum("...lxy,lr ->
    /// ...rxy", latent, coeffs)`, `* 0.5 + 0.5`, clamp, `255. *`, `astype(np.uint8)`. The
    /// unrounded values are at least 0.089 away from an integer (66.089), so f32 summation
    /// order cannot change a byte: exact equality.
    #[test]
    fn the_linear_map_matches_automatic1111() {
        let sd = cheap_approximation(&ramp(), ModelFamily::Sd).unwrap();
        assert_eq!((sd.width(), sd.height()), (3, 2));
        assert_eq!(
            rows(&sd),
            vec![
                vec![[36, 39, 28], [39, 46, 30], [41, 52, 33]],
                vec![[43, 59, 36], [45, 66, 39], [48, 72, 41]],
            ]
        );
        let xl = cheap_approximation(&ramp(), ModelFamily::Sdxl).unwrap();
        assert_eq!(
            rows(&xl),
            vec![
                vec![[43, 29, 24], [41, 33, 27], [39, 36, 31]],
                vec![[37, 40, 35], [35, 43, 39], [33, 47, 43]],
            ]
        );
    }

    /// By hand: channel 0 = ±5 gives 5 * (0.298, 0.207, 0.208) = (1.49, 1.035, 1.04) and its
    /// negative; * 0.5 + 0.5 is above 1 (white) or below 0 (black) in every channel.
    #[test]
    fn out_of_range_values_clamp() {
        let v = [5.0f32, -5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let t = Tensor::from_vec(v.to_vec(), (1, 4, 1, 2), &Device::Cpu).unwrap();
        let img = cheap_approximation(&t, ModelFamily::Sd).unwrap();
        assert_eq!(rows(&img), vec![vec![[255, 255, 255], [0, 0, 0]]]);
        let three = Tensor::zeros((1, 3, 2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(cheap_approximation(&three, ModelFamily::Sd).is_err());
    }
}
