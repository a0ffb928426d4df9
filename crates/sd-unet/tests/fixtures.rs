//! The fixture UNets (tests/fixtures/models/*/unet) against diffusers' outputs
//! (tests/fixtures/refs/unet_*.safetensors, written by tools/fixtures/unet_refs.py): batch 1,
//! batch 2 with per-sample timesteps (the CFG shape), and a 9x6 latent whose sides are not
//! multiples of 2^levels; then f16/bf16 against the f32 reference.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use sd_core::testing::{assert_close, compare, fixtures_dir, load_tensors};
use sd_core::LoadOptions;
use sd_unet::{AddedCond, UNet2DConditionModel};

const FAMILIES: [&str; 4] = ["sd1", "sd2", "sdxl", "refiner"];
const CASES: [&str; 3] = ["b1", "b2", "rect"];

fn load(family: &str, dtype: DType, variant: Option<&str>) -> UNet2DConditionModel {
    let dir = fixtures_dir().join("models").join(family).join("unet");
    let opts = LoadOptions {
        dtype,
        device: Device::Cpu,
        variant: variant.map(str::to_owned),
    };
    UNet2DConditionModel::load(&dir, &opts).unwrap()
}

fn refs(family: &str) -> HashMap<String, Tensor> {
    load_tensors(&fixtures_dir().join(format!("refs/unet_{family}.safetensors"))).unwrap()
}

/// Runs one reference case; `b1` and `rect` go through `forward` (a scalar timestep, as the
/// exporter passed a Python float), `b2` through `forward_t` (per-sample timesteps).
fn run(unet: &UNet2DConditionModel, r: &HashMap<String, Tensor>, case: &str) -> Tensor {
    let get = |k: &str| r[&format!("{case}.{k}")].clone();
    let added = r
        .contains_key(&format!("{case}.text_embeds"))
        .then(|| AddedCond {
            text_embeds: get("text_embeds"),
            time_ids: get("time_ids"),
        });
    let ts = get("timesteps");
    let out = if case == "b2" {
        unet.forward_t(
            &get("sample"),
            &ts,
            &get("encoder_hidden_states"),
            added.as_ref(),
        )
    } else {
        let t: Vec<f32> = ts.to_vec1().unwrap();
        unet.forward(
            &get("sample"),
            t[0] as f64,
            &get("encoder_hidden_states"),
            added.as_ref(),
        )
    };
    out.unwrap().to_dtype(DType::F32).unwrap()
}

#[test]
fn f32_matches_diffusers() {
    for family in FAMILIES {
        let unet = load(family, DType::F32, None);
        let r = refs(family);
        for case in CASES {
            let out = run(&unet, &r, case);
            let want = &r[&format!("{case}.out")];
            let (max_abs, _) = compare(&out, want, 0.0, 0.0).unwrap();
            eprintln!("{family} {case}: f32 max abs diff {max_abs:e}");
            // Measured: max abs diff <= 2.8e-6 over all families and cases (refiner rect; outputs
            // of order 1-5; PyTorch's own f32-vs-f64 noise floor on these models is ~8e-7).
            assert_close(&out, want, 1e-5, 1e-5, &format!("{family} {case}"));
        }
    }
}

#[test]
fn time_proj_matches_diffusers() {
    let r = load_tensors(&fixtures_dir().join("refs/unet_time_proj.safetensors")).unwrap();
    for dim in [8, 256, 320, 384] {
        let got = sd_nn::timestep_embedding(&r["timesteps"], dim, true, 0.0).unwrap();
        let want = &r[&format!("dim{dim}")];
        let (max_abs, _) = compare(&got, want, 0.0, 0.0).unwrap();
        eprintln!("time_proj dim {dim}: max abs diff {max_abs:e}");
        // Measured: dim 8: 6.0e-8; dims 256/320/384: 3.0e-5 / 6.1e-5 / 3.0e-5. The frequencies are
        // computed as torch does (f32 exponents, identical bit for bit), but torch's vectorised
        // f32 `exp` is not correctly rounded: 2-4 of 128-192 frequencies differ by one ulp from
        // libm's, and at t ~ 1000 one ulp of a frequency moves its sinusoid by up to ~6e-5.
        let atol = if dim == 8 { 1e-6 } else { 1e-4 };
        assert_close(&got, want, atol, 0.0, &format!("time_proj dim {dim}"));
    }
}

#[test]
fn half_precision_stays_close_to_f32() {
    // (family, dtype, weight variant, max abs diff allowed): the f32 reference's outputs are of
    // order 1-5. Measured max abs diffs over the three cases:
    // - f16 (weights and activations): sd1 (fp16 file) 5.8e-3, sd2 7.4e-3, sdxl 5.8e-3,
    //   refiner 5.1e-3 (f16 keeps 11 bits of mantissa);
    // - the fp16 file loaded into f32 (weights rounded only): 2.6e-3;
    // - bf16 (weights and activations): sd1 4.8e-2, sd2 4.5e-2, sdxl 3.8e-2, refiner 5.6e-2
    //   (bf16 keeps 8 bits).
    let cases = [
        ("sd1", DType::F16, Some("fp16"), 1.5e-2),
        ("sd1", DType::F32, Some("fp16"), 5e-3),
        ("sd1", DType::BF16, None, 1e-1),
        ("sd2", DType::F16, None, 1.5e-2),
        ("sd2", DType::BF16, None, 1e-1),
        ("sdxl", DType::F16, None, 1.5e-2),
        ("sdxl", DType::BF16, None, 1e-1),
        ("refiner", DType::F16, None, 1.5e-2),
        ("refiner", DType::BF16, None, 1e-1),
    ];
    for (family, dtype, variant, atol) in cases {
        let unet = load(family, dtype, variant);
        assert_eq!(unet.dtype(), dtype);
        let r = refs(family);
        for case in CASES {
            let out = run(&unet, &r, case);
            let want = &r[&format!("{case}.out")];
            let (max_abs, _) = compare(&out, want, 0.0, 0.0).unwrap();
            eprintln!("{family} {case} {dtype:?} {variant:?}: max abs diff {max_abs:e}");
            assert_close(
                &out,
                want,
                atol,
                0.0,
                &format!("{family} {case} {dtype:?} {variant:?}"),
            );
        }
    }
}
