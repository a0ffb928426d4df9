//! Hand-built configs that used to panic (issue 16): `VaeConfig`'s fields are public, so
//! `from_var_builder` validates them and returns an error naming the field.

mod common;

use candle_core::{DType, Device};
use sd_core::{Error, VarBuilder};
use sd_vae::{AutoencoderKL, VaeConfig};

/// A field name and how to break it.
type Edit = (&'static str, fn(&mut VaeConfig));

fn sd1() -> VaeConfig {
    VaeConfig::from_file(&common::vae_dir("sd1").join("config.json")).expect("fixture config")
}

fn build(c: VaeConfig) -> sd_core::Result<AutoencoderKL> {
    AutoencoderKL::from_var_builder(&VarBuilder::zeros(DType::F32, &Device::Cpu), c)
}

fn key_of(e: Error) -> String {
    match e {
        Error::Config { key: Some(k), .. } => k,
        other => panic!("expected a config error naming a field, got {other}"),
    }
}

/// An empty block list panicked in `scale_factor` (`len - 1`) and in the encoder
/// (`expect` on the last block).
#[test]
fn empty_block_list_is_an_error() {
    let mut c = sd1();
    c.block_out_channels.clear();
    assert_eq!(c.scale_factor(), 1);
    assert_eq!(
        key_of(build(c).expect_err("no blocks")),
        "block_out_channels"
    );
}

#[test]
fn zero_and_huge_sizes_are_errors() {
    let cases: [Edit; 7] = [
        ("norm_num_groups", |c| c.norm_num_groups = 0),
        ("latent_channels", |c| c.latent_channels = 0),
        ("layers_per_block", |c| c.layers_per_block = usize::MAX),
        ("block_out_channels", |c| c.block_out_channels[0] = 0),
        ("block_out_channels", |c| c.block_out_channels = vec![8; 70]),
        ("scaling_factor", |c| c.scaling_factor = f64::NAN),
        ("sample_size", |c| c.sample_size = usize::MAX),
    ];
    for (key, edit) in cases {
        let mut c = sd1();
        edit(&mut c);
        assert_eq!(key_of(build(c).expect_err(key)), key);
    }
    // 70 levels: the factor saturates instead of overflowing the shift.
    let mut c = sd1();
    c.block_out_channels = vec![8; 70];
    assert_eq!(c.scale_factor(), usize::MAX);
    assert_eq!(c.tile_latent_size(), 0);
    // The fixture itself still builds.
    build(sd1()).expect("valid config");
}
