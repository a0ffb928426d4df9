//! Property tests of `unet/config.json` (issue 16): the SD 1.x and SDXL fixture configs with
//! fields set to wrong types, out-of-range values or removed give a config error naming the file,
//! or a config that validates and, when small, builds a model that runs on matching inputs (an
//! `Err` at most, never a panic). `PROPTEST_CASES` sets the number of cases (see
//! docs/reliability.md).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError};
use sd_core::testing::{
    edit_json, fixtures_dir, odd_json_values, proptest_cases, proptest_fixed_seed,
};
use sd_core::{Error, VarBuilder};
use sd_unet::{AddedCond, UNet2DConditionModel, UNetConfig};

fn base(family: &str) -> serde_json::Value {
    let p = fixtures_dir().join(format!("models/{family}/unet/config.json"));
    serde_json::from_str(&std::fs::read_to_string(p).expect("read")).expect("json")
}

fn value() -> impl Strategy<Value = serde_json::Value> {
    // Mostly plausible values (so that many cases resolve and run), some of the wrong type.
    prop_oneof![
        1 => prop::sample::select(odd_json_values()),
        3 => (0..40u64).prop_map(serde_json::Value::from),
        1 => prop::collection::vec(0..40u64, 0..5).prop_map(|v| serde_json::json!(v)),
        1 => prop::sample::select(vec![
            serde_json::json!(["CrossAttnDownBlock2D", "DownBlock2D"]),
            serde_json::json!(["UpBlock2D", "CrossAttnUpBlock2D"]),
            serde_json::json!("text_time"),
            serde_json::json!("UNetMidBlock2DCrossAttn"),
        ]),
    ]
}

fn config() -> Config {
    let mut c = Config {
        cases: proptest_cases(128),
        failure_persistence: None,
        ..Config::default()
    };
    if let Some(seed) = proptest_fixed_seed() {
        c.rng_seed = RngSeed::Fixed(seed);
    }
    c
}

/// Small enough to build and run in a test case.
fn small(c: &UNetConfig) -> bool {
    let t_small = |t: &Option<sd_unet::config::TransformerConfig>| {
        t.as_ref()
            .is_none_or(|t| t.depth <= 2 && t.num_heads * t.head_dim <= 64)
    };
    c.block_out_channels.len() <= 4
        && c.block_out_channels.iter().all(|&x| x <= 64)
        && c.down_blocks
            .iter()
            .all(|b| b.num_layers <= 3 && t_small(&b.transformer))
        && c.up_blocks
            .iter()
            .all(|b| b.num_layers <= 4 && t_small(&b.transformer))
        && c.time_embed_dim <= 256
        && c.cross_attention_dim <= 64
        && c.in_channels <= 16
        && c.out_channels <= 16
        && c.conv_in_kernel <= 7
        && c.conv_out_kernel <= 7
        && c.text_time.as_ref().is_none_or(|t| {
            t.projection_class_embeddings_input_dim <= 256 && t.addition_time_embed_dim <= 64
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn unet_configs_resolve_or_fail_cleanly(
        family in prop::sample::select(vec!["sd1", "sdxl"]),
        edits in prop::collection::vec(
            (
                prop::sample::select(base("sdxl").as_object().expect("object").keys().cloned().collect::<Vec<_>>()),
                prop::option::weighted(0.8, value()),
            ),
            1..3,
        ),
    ) {
        let json = edit_json(&base(family), &edits).to_string();
        let config = match UNetConfig::from_json_str(&json, Path::new("unet/config.json")) {
            Ok(c) => c,
            Err(Error::Config { path, key, reason }) => {
                prop_assert!(path.ends_with("unet/config.json"));
                prop_assert!(!reason.is_empty(), "{:?}", key);
                return Ok(());
            }
            Err(e) => return Err(TestCaseError::fail(format!("not a config error: {e}"))),
        };
        prop_assert!(config.validate().is_ok(), "a resolved config validates: {:?}", config.validate());
        if !small(&config) {
            return Ok(());
        }
        let unet = UNet2DConditionModel::from_config(
            config.clone(),
            &VarBuilder::zeros(DType::F32, &Device::Cpu),
        )
        .map_err(|e| TestCaseError::fail(format!("a valid config builds: {e}")))?;
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, config.in_channels, 8, 8), DType::F32, &dev).expect("x");
        let ctx = Tensor::zeros((1, 3, config.cross_attention_dim), DType::F32, &dev).expect("ctx");
        let added = config.text_time.as_ref().and_then(|t| {
            let pooled = t.projection_class_embeddings_input_dim.checked_sub(6 * t.addition_time_embed_dim)?;
            Some(AddedCond {
                text_embeds: Tensor::zeros((1, pooled), DType::F32, &dev).ok()?,
                time_ids: Tensor::zeros((1, 6), DType::F32, &dev).ok()?,
            })
        });
        match unet.forward(&x, 500.0, &ctx, added.as_ref()) {
            Ok(y) => prop_assert_eq!(y.dims(), &[1, config.out_channels, 8, 8]),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}
