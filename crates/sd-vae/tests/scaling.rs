//! The latent normalisation variants of the config (SD's plain scaling is covered by parity.rs
//! against diffusers; shift_factor and latents_mean/std are checked here against the formulas
//! of diffusers' pipelines, since no fixture VAE sets them).

mod common;

use candle_core::{DType, Device, Tensor};
use common::vae_dir;
use sd_core::testing::assert_close;
use sd_core::LoadOptions;
use sd_vae::{AutoencoderKL, LatentNormalization};

fn with_config(edit: impl FnOnce(&mut serde_json::Value)) -> (tempfile::TempDir, AutoencoderKL) {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = vae_dir("sd1");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).expect("read"))
            .expect("json");
    edit(&mut cfg);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).expect("write");
    std::fs::copy(
        src.join("diffusion_pytorch_model.safetensors"),
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .expect("copy");
    let vae = AutoencoderKL::load(dir.path(), &LoadOptions::default()).expect("load");
    (dir, vae)
}

fn z() -> Tensor {
    let v: Vec<f32> = (0..2 * 4 * 3 * 2)
        .map(|i| (i as f32 * 0.37).sin() * 3.0)
        .collect();
    Tensor::from_vec(v, (2, 4, 3, 2), &Device::Cpu).expect("z")
}

#[test]
fn shift_factor_is_subtracted_before_scaling() {
    let (_d, vae) = with_config(|c| {
        c["scaling_factor"] = 0.3611.into();
        c["shift_factor"] = 0.1159.into();
    });
    assert_eq!(vae.config().shift_factor, Some(0.1159));
    let z = z();
    let scaled = vae.scale_latents(&z).expect("scale");
    let want = ((&z - 0.1159).expect("sub") * 0.3611).expect("mul");
    assert_close(&scaled, &want, 1e-6, 1e-6, "(z - shift) * scale");
    let back = vae.unscale_latents(&scaled).expect("unscale");
    assert_close(&back, &z, 1e-5, 1e-6, "latents / scale + shift");
}

#[test]
fn latents_mean_and_std_are_per_channel() {
    let (_d, vae) = with_config(|c| {
        c["latents_mean"] = serde_json::json!([0.1, -0.2, 0.3, 0.0]);
        c["latents_std"] = serde_json::json!([1.0, 2.0, 0.5, 4.0]);
    });
    assert!(matches!(
        vae.config().latent_normalization,
        LatentNormalization::PerChannel { .. }
    ));
    let z = z();
    let scaled = vae.scale_latents(&z).expect("scale");
    let mean = Tensor::new(&[0.1f32, -0.2, 0.3, 0.0], &Device::Cpu)
        .unwrap()
        .reshape((1, 4, 1, 1))
        .unwrap();
    let std = Tensor::new(&[1.0f32, 2.0, 0.5, 4.0], &Device::Cpu)
        .unwrap()
        .reshape((1, 4, 1, 1))
        .unwrap();
    let want = (z.broadcast_sub(&mean).unwrap() * 0.18215)
        .unwrap()
        .broadcast_div(&std)
        .unwrap();
    assert_close(&scaled, &want, 1e-6, 1e-6, "(z - mean) * scale / std");
    let back = vae.unscale_latents(&scaled).expect("unscale");
    assert_close(&back, &z, 1e-5, 1e-6, "latents * std / scale + mean");
    assert_eq!(back.dtype(), DType::F32);
}

#[test]
fn latents_mean_of_the_wrong_length_is_a_config_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = vae_dir("sd1");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).expect("read"))
            .expect("json");
    cfg["latents_mean"] = serde_json::json!([0.1, 0.2]);
    cfg["latents_std"] = serde_json::json!([1.0, 1.0]);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).expect("write");
    let e = AutoencoderKL::load(dir.path(), &LoadOptions::default()).expect_err("must fail");
    let msg = e.to_string();
    assert!(
        msg.contains("latents_mean") && msg.contains("one per latent channel (4)"),
        "{msg}"
    );
}
