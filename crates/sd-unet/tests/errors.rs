//! Unknown or unsupported config values are config errors naming unet/config.json and the
//! field; weights that do not fit the config are reported with the tensor name and both shapes;
//! inputs of the wrong shape are invalid-argument errors.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sd_core::testing::fixtures_dir;
use sd_core::{Error, LoadOptions};
use sd_unet::{AddedCond, UNet2DConditionModel, UNetConfig};

fn fixture_unet(family: &str) -> PathBuf {
    fixtures_dir().join("models").join(family).join("unet")
}

fn sd1_config() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_unet("sd1").join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A copy of the sd1 fixture UNet folder with `edit` applied to its config.
fn edited_sd1(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = sd1_config();
    edit(&mut cfg);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        fixture_unet("sd1").join("diffusion_pytorch_model.safetensors"),
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    dir
}

fn assert_config_error(err: Error, key: &str, mentions: &str) {
    let msg = err.to_string();
    match err {
        Error::Config {
            path, key: Some(k), ..
        } => {
            assert!(path.ends_with("config.json"), "{msg}");
            assert_eq!(k, key, "{msg}");
            assert!(
                msg.contains(mentions),
                "`{msg}` should mention `{mentions}`"
            );
        }
        other => panic!("expected a config error for `{key}`, got {other:?}"),
    }
}

#[test]
fn unknown_block_type_is_a_config_error_from_load() {
    let dir = edited_sd1(|c| c["down_block_types"][1] = "SimpleCrossAttnDownBlock2D".into());
    let err = UNet2DConditionModel::load(dir.path(), &LoadOptions::default()).unwrap_err();
    assert_config_error(err, "down_block_types", "SimpleCrossAttnDownBlock2D");
}

#[test]
fn unsupported_values_name_their_field() {
    use serde_json::json;
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "up_block_types",
            json!(["UpBlock2D", "AttnUpBlock2D"]),
            "AttnUpBlock2D",
        ),
        (
            "mid_block_type",
            json!("UNetMidBlock2DSimpleCrossAttn"),
            "UNetMidBlock2DSimpleCrossAttn",
        ),
        ("act_fn", json!("mish"), "mish"),
        ("addition_embed_type", json!("image"), "image"),
        ("class_embed_type", json!("timestep"), "timestep"),
        ("time_embedding_type", json!("fourier"), "fourier"),
        ("attention_type", json!("gated"), "gated"),
        (
            "resnet_time_scale_shift",
            json!("scale_shift"),
            "scale_shift",
        ),
        ("num_attention_heads", json!(2), "attention_head_dim"),
        ("encoder_hid_dim_type", json!("text_proj"), "text_proj"),
        ("time_cond_proj_dim", json!(256), "256"),
        ("only_cross_attention", json!(true), "true"),
        (
            "transformer_layers_per_block",
            json!([[1, 2], [1, 1]]),
            "per-layer",
        ),
        ("attention_head_dim", json!([2, 2, 2]), "3 entries"),
        ("attention_head_dim", json!(3), "do not divide"),
        ("block_out_channels", json!([8]), "1 entries"),
        ("norm_num_groups", json!(3), "does not divide"),
        ("addition_time_embed_dim", json!("eight"), "invalid type"),
    ];
    for (key, value, mentions) in cases {
        let mut cfg = sd1_config();
        cfg[key] = value;
        let err =
            UNetConfig::from_json_str(&cfg.to_string(), Path::new("unet/config.json")).unwrap_err();
        assert_config_error(err, key, mentions);
    }
    // text_time needs its two sizes.
    let mut cfg = sd1_config();
    cfg["addition_embed_type"] = "text_time".into();
    let err =
        UNetConfig::from_json_str(&cfg.to_string(), Path::new("unet/config.json")).unwrap_err();
    assert_config_error(err, "addition_time_embed_dim", "text_time");
}

#[test]
fn wrong_shape_weights_are_reported_with_name_and_shapes() {
    // cross_attention_dim 12 instead of 8: every attn2.to_k / to_v weight is [8, 12] in the
    // model but [8, 8] in the file.
    let dir = edited_sd1(|c| c["cross_attention_dim"] = 12.into());
    let err = UNet2DConditionModel::load(dir.path(), &LoadOptions::default()).unwrap_err();
    let msg = err.to_string();
    let Error::Weights(report) = err else {
        panic!("expected a weights error, got {msg}");
    };
    let name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    assert!(
        report
            .wrong_shape
            .iter()
            .any(|(n, want, got)| n == name && want == &[8, 12] && got == &[8, 8]),
        "{msg}"
    );
    assert!(msg.contains(name) && msg.contains("[8, 12]"), "{msg}");
    assert!(
        report.missing.is_empty() && report.unused.is_empty(),
        "{msg}"
    );
}

#[test]
fn wrong_inputs_are_invalid_arguments() {
    let opts = LoadOptions::default();
    let dev = Device::Cpu;
    let sd1 = UNet2DConditionModel::load(&fixture_unet("sd1"), &opts).unwrap();
    let sample = Tensor::zeros((1, 4, 8, 8), DType::F32, &dev).unwrap();
    let ehs = Tensor::zeros((1, 7, 8), DType::F32, &dev).unwrap();
    let bad = [
        sd1.forward(
            &Tensor::zeros((1, 3, 8, 8), DType::F32, &dev).unwrap(),
            1.0,
            &ehs,
            None,
        ),
        sd1.forward(
            &sample,
            1.0,
            &Tensor::zeros((1, 7, 9), DType::F32, &dev).unwrap(),
            None,
        ),
        sd1.forward(
            &sample,
            1.0,
            &Tensor::zeros((2, 7, 8), DType::F32, &dev).unwrap(),
            None,
        ),
        sd1.forward_t(
            &sample,
            &Tensor::zeros(3, DType::F32, &dev).unwrap(),
            &ehs,
            None,
        ),
    ];
    for r in bad {
        assert!(matches!(r, Err(Error::InvalidArgument { .. })), "{r:?}");
    }
    assert!(sd1.forward(&sample, 1.0, &ehs, None).is_ok());

    let xl = UNet2DConditionModel::load(&fixture_unet("sdxl"), &opts).unwrap();
    let ehs = Tensor::zeros((1, 7, 20), DType::F32, &dev).unwrap();
    let added = |pooled: usize, ids: usize| AddedCond {
        text_embeds: Tensor::zeros((1, pooled), DType::F32, &dev).unwrap(),
        time_ids: Tensor::zeros((1, ids), DType::F32, &dev).unwrap(),
    };
    // SDXL needs the added conditioning, with 10 + 6 x 8 = 58 channels.
    for r in [
        xl.forward(&sample, 1.0, &ehs, None),
        xl.forward(&sample, 1.0, &ehs, Some(&added(10, 5))),
    ] {
        assert!(matches!(r, Err(Error::InvalidArgument { .. })), "{r:?}");
    }
    assert!(xl.forward(&sample, 1.0, &ehs, Some(&added(10, 6))).is_ok());
}
