//! Hand-built configs that used to panic (issue 16): the resolved config's fields are public,
//! so `from_config` validates them and returns an error naming the field.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sd_core::{Error, VarBuilder};
use sd_unet::{UNet2DConditionModel, UNetConfig};

fn sd15() -> UNetConfig {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sd15_unet_config.json");
    UNetConfig::from_file(&p).expect("SD 1.5 config")
}

fn build(config: UNetConfig) -> sd_core::Result<UNet2DConditionModel> {
    UNet2DConditionModel::from_config(config, &VarBuilder::zeros(DType::F32, &Device::Cpu))
}

fn field_of(e: Error) -> String {
    match e {
        Error::InvalidArgument { name, .. } => name,
        other => panic!("expected InvalidArgument, got {other}"),
    }
}

#[test]
fn the_real_configs_validate() {
    for f in [
        "sd15_unet_config.json",
        "sd21_unet_config.json",
        "sdxl_base_unet_config.json",
        "sdxl_refiner_unet_config.json",
    ] {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(f);
        UNetConfig::from_file(&p)
            .expect("resolve")
            .validate()
            .expect(f);
    }
}

/// An empty config indexed `block_out_channels[0]` and panicked.
#[test]
fn empty_config_is_an_error() {
    let mut c = sd15();
    c.block_out_channels.clear();
    c.down_blocks.clear();
    c.up_blocks.clear();
    c.mid_block = None;
    let e = build(c).expect_err("empty");
    assert_eq!(field_of(e), "UNetConfig.block_out_channels.len()");
}

/// Zero heads built a model whose attention divided by zero at the first forward.
#[test]
fn zero_heads_is_an_error() {
    let mut c = sd15();
    if let Some(t) = c.down_blocks[0].transformer.as_mut() {
        t.num_heads = 0;
    }
    let e = build(c).expect_err("zero heads");
    assert_eq!(
        field_of(e),
        "UNetConfig.down_blocks[0].transformer.num_heads"
    );

    let mut c = sd15();
    if let Some(m) = c.mid_block.as_mut() {
        m.transformer.head_dim = 0;
    }
    let e = build(c).expect_err("zero head_dim");
    assert_eq!(field_of(e), "UNetConfig.mid_block.transformer.head_dim");
}

#[test]
fn mismatched_block_lists_are_errors() {
    let mut c = sd15();
    c.up_blocks.pop();
    let e = build(c).expect_err("one up block short");
    assert_eq!(field_of(e), "UNetConfig.up_blocks.len()");

    let mut c = sd15();
    c.up_blocks[0].num_layers += 1;
    let msg = build(c).expect_err("one skip too many").to_string();
    assert!(
        msg.contains("consuming 13 skip connections") && msg.contains("12, the number"),
        "{msg}"
    );

    let mut c = sd15();
    c.norm_num_groups = 0;
    assert_eq!(
        field_of(build(c).expect_err("0 groups")),
        "UNetConfig.norm_num_groups"
    );
}

/// 65 levels overflowed `1 << upsamplers` in `upsampling_factor` (and forward).
#[test]
fn too_many_levels_are_refused_and_the_factor_saturates() {
    let mut c = sd15();
    let block = c.up_blocks[0].clone();
    c.up_blocks = vec![block; 70];
    assert_eq!(c.upsampling_factor(), usize::MAX);
    assert!(c.validate().is_err());

    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sd15_unet_config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p).expect("read")).expect("json");
    json["down_block_types"] = serde_json::json!(vec!["DownBlock2D"; 65]);
    json["up_block_types"] = serde_json::json!(vec!["UpBlock2D"; 65]);
    json["block_out_channels"] = serde_json::json!(vec![32; 65]);
    json["attention_head_dim"] = serde_json::json!(8);
    match UNetConfig::from_json_str(&json.to_string(), Path::new("unet/config.json")) {
        Err(Error::Config { key, reason, .. }) => {
            assert_eq!(key.as_deref(), Some("down_block_types"));
            assert!(
                reason.contains("65 entries") && reason.contains("1 to 16"),
                "{reason}"
            );
        }
        other => panic!("expected a config error, got {other:?}"),
    }
}

/// Sizes that overflowed `4 * block_out_channels[0]` or `layers_per_block + 1` in resolve.
#[test]
fn huge_sizes_in_a_file_are_config_errors() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sd15_unet_config.json");
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p).expect("read")).expect("json");
    for (key, value) in [
        (
            "block_out_channels",
            serde_json::json!([usize::MAX, 640, 1280, 1280]),
        ),
        ("layers_per_block", serde_json::json!(usize::MAX)),
        ("in_channels", serde_json::json!(0)),
        ("sample_size", serde_json::json!(usize::MAX)),
        ("cross_attention_dim", serde_json::json!(0)),
        ("conv_in_kernel", serde_json::json!(1_000_001)),
    ] {
        let mut json = base.clone();
        json[key] = value;
        match UNetConfig::from_json_str(&json.to_string(), Path::new("unet/config.json")) {
            Err(Error::Config { key: k, .. }) => assert_eq!(k.as_deref(), Some(key)),
            other => panic!("{key}: expected a config error, got {other:?}"),
        }
    }
    // A valid config still runs: the checks did not refuse the model they guard.
    let dir = sd_core::testing::fixtures_dir().join("models/sd1/unet");
    let unet = UNet2DConditionModel::load(&dir, &sd_core::LoadOptions::default()).expect("load");
    let cfg = unet.config();
    let x = Tensor::zeros((1, cfg.in_channels, 8, 8), DType::F32, &Device::Cpu).expect("x");
    let ctx =
        Tensor::zeros((1, 3, cfg.cross_attention_dim), DType::F32, &Device::Cpu).expect("ctx");
    let y = unet.forward(&x, 10.0, &ctx, None).expect("forward");
    assert_eq!(y.dims(), &[1, cfg.out_channels, 8, 8]);
}
