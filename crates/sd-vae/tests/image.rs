//! The VaeImageProcessor conversions, exact against diffusers (rounding ties included).

mod common;

use candle_core::{DType, Device, Tensor};
use common::inputs;
use sd_vae::image::{from_rgb_images, postprocess, preprocess, to_rgb_images};

#[test]
fn postprocess_matches_diffusers_bytes() {
    let ins = inputs();
    let out = postprocess(&ins["postprocess_in"]).expect("postprocess");
    let got = out.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let want: Vec<u8> = ins["postprocess_out"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(|v| v as u8)
        .collect();
    assert_eq!(out.dims(), &[1, 1, 502, 3]);
    assert_eq!(got, want, "exact bytes, as numpy rounds (half to even)");
}

#[test]
fn preprocess_matches_diffusers() {
    let ins = inputs();
    let px = ins["preprocess_in"].to_dtype(DType::U8).unwrap();
    let got = preprocess(&px).expect("preprocess");
    let want = &ins["preprocess_out"];
    assert_eq!(got.dims(), want.dims());
    let diff = (&got - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0, "bit-identical");
}

#[test]
fn rgb_round_trip() {
    let ins = inputs();
    let px = ins["preprocess_in"].to_dtype(DType::U8).unwrap();
    let bytes = px.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let im = sd_vae::image::RgbImage {
        width: 16,
        height: 16,
        data: bytes.clone(),
    };
    let t = from_rgb_images(&[im.clone(), im], &Device::Cpu).expect("to tensor");
    assert_eq!(t.dims(), &[2, 3, 16, 16]);
    let back = to_rgb_images(&t).expect("to bytes");
    assert_eq!(back.len(), 2);
    assert_eq!(back[1].data, bytes, "u8 -> [-1, 1] -> u8 is lossless");
    let bad = Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(to_rgb_images(&bad).is_err());
}

/// The pipelines return `denormalize`d images in [0, 1] and the CLI writes them with
/// `unit_to_rgb_images`: the two halves of `postprocess`, so the same bytes as diffusers.
#[test]
fn denormalize_then_bytes_is_postprocess() {
    use sd_vae::image::{denormalize, unit_to_rgb_images};
    let ins = inputs();
    let x = &ins["postprocess_in"]; // [1, 3, 1, 502]
    let unit = denormalize(x).expect("denormalize");
    let (min, max) = (
        unit.min_all().unwrap().to_scalar::<f32>().unwrap(),
        unit.max_all().unwrap().to_scalar::<f32>().unwrap(),
    );
    assert!((0.0..=1.0).contains(&min) && (0.0..=1.0).contains(&max));
    let want: Vec<u8> = ins["postprocess_out"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(|v| v as u8)
        .collect();
    let got = sd_vae::image::to_bytes(&unit)
        .expect("bytes")
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    assert_eq!(got, want, "exact diffusers bytes through the two-step path");
    let imgs = unit_to_rgb_images(&unit).expect("rgb");
    assert_eq!(imgs[0].data, want);
}
