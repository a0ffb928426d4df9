//! Property tests of `vae/config.json` (issue 16): the fixture config with fields set to wrong
//! types, out-of-range values or removed gives a config error naming the file, or a config
//! that validates and, when small, a model that encodes and decodes (an `Err` at most, never a
//! panic). `PROPTEST_CASES` sets the number of cases (see docs/reliability.md).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError};
use sd_core::testing::{
    edit_json, fixtures_dir, odd_json_values, proptest_cases, proptest_fixed_seed,
};
use sd_core::{Error, VarBuilder};
use sd_vae::{AutoencoderKL, VaeConfig, VaeConfigJson};

fn base() -> serde_json::Value {
    let p = fixtures_dir().join("models/sd1/vae/config.json");
    serde_json::from_str(&std::fs::read_to_string(p).expect("read")).expect("json")
}

fn value() -> impl Strategy<Value = serde_json::Value> {
    // Mostly plausible values (so that many cases resolve and run), some of the wrong type.
    prop_oneof![
        1 => prop::sample::select(odd_json_values()),
        3 => (0..40u64).prop_map(serde_json::Value::from),
        1 => prop::collection::vec(0..40u64, 0..6).prop_map(|v| serde_json::json!(v)),
        1 => prop::collection::vec(-2.0..2.0f64, 0..6).prop_map(|v| serde_json::json!(v)),
        1 => prop::sample::select(vec![
            serde_json::json!(["DownEncoderBlock2D", "DownEncoderBlock2D"]),
            serde_json::json!(["UpDecoderBlock2D"]),
            serde_json::json!("swish"),
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

proptest! {
    #![proptest_config(config())]

    #[test]
    fn vae_configs_resolve_or_fail_cleanly(
        edits in prop::collection::vec(
            (
                prop::sample::select({
                    let mut k: Vec<String> = base().as_object().expect("object").keys().cloned().collect();
                    k.extend(["latents_mean", "latents_std", "shift_factor"].map(String::from));
                    k
                }),
                prop::option::weighted(0.8, value()),
            ),
            1..3,
        ),
    ) {
        let json = edit_json(&base(), &edits).to_string();
        let path = Path::new("vae/config.json");
        let parsed = sd_core::config::parse_json::<VaeConfigJson>(&json, path)
            .and_then(|raw| VaeConfig::from_json(raw, path));
        let config = match parsed {
            Ok(c) => c,
            Err(Error::Config { path, reason, .. }) => {
                prop_assert!(path.ends_with("vae/config.json"));
                prop_assert!(!reason.is_empty());
                return Ok(());
            }
            Err(e) => return Err(TestCaseError::fail(format!("not a config error: {e}"))),
        };
        prop_assert!(config.validate().is_ok());
        let small = config.block_out_channels.len() <= 4
            && config.block_out_channels.iter().all(|&c| c <= 64)
            && config.layers_per_block <= 3
            && config.latent_channels <= 16
            && config.in_channels <= 8
            && config.out_channels <= 8;
        if !small {
            return Ok(());
        }
        let vae = AutoencoderKL::from_var_builder(&VarBuilder::zeros(DType::F32, &Device::Cpu), config.clone())
            .map_err(|e| TestCaseError::fail(format!("a valid config builds: {e}")))?;
        let f = vae.scale_factor();
        let z = Tensor::zeros((1, config.latent_channels, 2, 2), DType::F32, &Device::Cpu).expect("z");
        match vae.image_from_latents(&z) {
            Ok(img) => prop_assert_eq!(img.dims(), &[1, config.out_channels, 2 * f, 2 * f]),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
        let img = Tensor::zeros((1, config.in_channels, f, f), DType::F32, &Device::Cpu).expect("img");
        match vae.latents_from_image_mode(&img) {
            Ok(l) => prop_assert_eq!(l.dims(), &[1, config.latent_channels, 1, 1]),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}
