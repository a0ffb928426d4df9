//! Clear errors for bad inputs, bad configs and bad weight files.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::{load, vae_dir};
use sd_core::testing::load_tensors;
use sd_core::{Error, LoadOptions};
use sd_vae::{AutoencoderKL, TileConfig};

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32, &Device::Cpu).expect("zeros")
}

fn err_text<T: std::fmt::Debug>(r: sd_core::Result<T>) -> String {
    match r {
        Err(e) => e.to_string(),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

#[test]
fn image_size_must_be_a_multiple_of_the_scale_factor() {
    let vae = load("sd1", DType::F32, None);
    assert_eq!(vae.scale_factor(), 8);
    let msg = err_text(vae.encode(&zeros(&[1, 3, 60, 64])).map(|d| d.mean));
    assert!(
        msg.contains("60x64") && msg.contains("multiples of 8"),
        "{msg}"
    );
    let msg = err_text(vae.encode(&zeros(&[1, 3, 64, 36])).map(|d| d.mean));
    assert!(msg.contains("64x36"), "{msg}");
}

#[test]
fn wrong_channel_counts_are_refused() {
    let vae = load("sd1", DType::F32, None);
    let msg = err_text(vae.encode(&zeros(&[1, 4, 64, 64])).map(|d| d.mean));
    assert!(
        msg.contains("[1, 4, 64, 64]") && msg.contains("3 channels"),
        "{msg}"
    );
    let msg = err_text(vae.encode(&zeros(&[3, 64, 64])).map(|d| d.mean));
    assert!(msg.contains("[3, 64, 64]"), "{msg}");
    let msg = err_text(vae.decode(&zeros(&[1, 3, 8, 8])));
    assert!(
        msg.contains("[1, 3, 8, 8]") && msg.contains("4 latent channels"),
        "{msg}"
    );
    let msg = err_text(vae.image_from_latents(&zeros(&[1, 8, 8])));
    assert!(msg.contains("latents"), "{msg}");
}

/// Copies a fixture VAE folder into a temp dir, letting `edit` change the weights.
fn edited_copy(edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        vae_dir("sd1").join("config.json"),
        dir.path().join("config.json"),
    )
    .expect("copy");
    let mut w =
        load_tensors(&vae_dir("sd1").join("diffusion_pytorch_model.safetensors")).expect("weights");
    edit(&mut w);
    candle_core::safetensors::save(&w, dir.path().join("diffusion_pytorch_model.safetensors"))
        .expect("save");
    dir
}

#[test]
fn missing_and_misshapen_weights_are_named() {
    let dir = edited_copy(|w| {
        w.remove("decoder.mid_block.attentions.0.to_q.weight");
        w.insert("encoder.conv_in.bias".into(), zeros(&[7]));
    });
    let e = AutoencoderKL::load(dir.path(), &LoadOptions::default()).expect_err("must fail");
    let msg = e.to_string();
    assert!(matches!(e, Error::Weights(_)), "{msg}");
    assert!(
        msg.contains(
            "missing `decoder.mid_block.attentions.0.to_q.weight` (expected shape [16, 16])"
        ),
        "{msg}"
    );
    assert!(
        msg.contains("`encoder.conv_in.bias` has shape [7], expected [8]"),
        "{msg}"
    );
}

#[test]
fn config_errors_name_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(vae_dir("sd1").join("config.json")).expect("read");
    let mut cfg: serde_json::Value = serde_json::from_str(&text).expect("json");
    cfg["norm_num_groups"] = 3.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).expect("write");
    let msg = err_text(AutoencoderKL::load(dir.path(), &LoadOptions::default()).map(|_| ()));
    assert!(
        msg.contains("config.json") && msg.contains("norm_num_groups"),
        "{msg}"
    );

    cfg["norm_num_groups"] = 4.into();
    cfg["up_block_types"][1] = "AttnUpDecoderBlock2D".into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).expect("write");
    let msg = err_text(AutoencoderKL::load(dir.path(), &LoadOptions::default()).map(|_| ()));
    assert!(
        msg.contains("up_block_types") && msg.contains("AttnUpDecoderBlock2D"),
        "{msg}"
    );
}

#[test]
fn bad_tile_sizes_are_refused() {
    let mut vae = load("sd1", DType::F32, None);
    let bad = TileConfig {
        sample_size: 1,
        latent_size: 4,
        overlap_factor: 0.25,
    };
    let msg = err_text(vae.enable_tiling(Some(bad)));
    assert!(msg.contains("tile config"), "{msg}");
}

#[test]
fn config_is_resolved() {
    for (family, scale, upcast) in [("sd1", 0.18215, false), ("sdxl", 0.13025, true)] {
        let vae = load(family, DType::F32, None);
        let c = vae.config();
        assert_eq!(c.scaling_factor, scale);
        assert_eq!(c.force_upcast, upcast);
        assert_eq!(c.shift_factor, None);
        assert_eq!(c.latent_channels, 4);
        assert_eq!(c.block_out_channels, vec![8, 8, 16, 16]);
        assert_eq!(c.sample_size, 64);
        assert_eq!(c.scale_factor(), 8);
        assert_eq!(c.tile_latent_size(), 8);
    }
}
