//! Shared helpers of the sd-vae tests: fixture folders and the PyTorch references.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sd_core::testing::{compare, fixtures_dir, load_tensors};
use sd_core::LoadOptions;
use sd_vae::AutoencoderKL;

/// Every fixture family with the reference file of its VAE weights (sd1 = sd2, sdxl = refiner).
pub const FAMILIES: [(&str, &str); 4] = [
    ("sd1", "vae_sd1"),
    ("sd2", "vae_sd1"),
    ("sdxl", "vae_sdxl"),
    ("refiner", "vae_sdxl"),
];

pub fn vae_dir(family: &str) -> PathBuf {
    fixtures_dir().join("models").join(family).join("vae")
}

pub fn refs(name: &str) -> HashMap<String, Tensor> {
    load_tensors(
        &fixtures_dir()
            .join("refs")
            .join(format!("{name}.safetensors")),
    )
    .expect("reference file readable (run tools/fixtures/export.py --only vae)")
}

pub fn inputs() -> HashMap<String, Tensor> {
    refs("vae_inputs")
}

pub fn load(family: &str, dtype: DType, variant: Option<&str>) -> AutoencoderKL {
    let opts = LoadOptions {
        dtype,
        device: Device::Cpu,
        variant: variant.map(str::to_owned),
    };
    AutoencoderKL::load(&vae_dir(family), &opts).expect("fixture VAE loads")
}

/// Max abs difference, printed so that `cargo test -- --nocapture` shows the measured errors.
pub fn report(what: &str, actual: &Tensor, expected: &Tensor) -> f64 {
    let (max_abs, _) = compare(actual, expected, 1.0, 0.0).expect("same shapes");
    println!("{what}: max abs diff {max_abs:.3e}");
    max_abs
}
