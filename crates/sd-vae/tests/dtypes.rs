//! Half precision (the sd1 fp16 variant in f16, bf16), force_upcast and NaN/inf detection.
//! Run with `--nocapture` to see the measured errors.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::{inputs, load, refs, report, vae_dir};
use sd_core::testing::{assert_close, load_tensors};
use sd_core::{Error, LoadOptions};
use sd_vae::{AutoencoderKL, VaeOptions};

// f32 tolerance, as in parity.rs (measured ~8e-6).
const ATOL32: f64 = 2e-5;

/// f16 compute (the fp16 variant, force_upcast false): measured max abs diff against torch's
/// f16 run 5.0e-3 (encoder, values ~2) and 1.8e-2 (decoder, values ~4); torch's own f16 run is
/// 4.4e-3 / 9.2e-3 away from f32, ours 4.4e-3 / 1.3e-2. Tolerances ~2x the measured values.
#[test]
fn f16_matches_torch_f16() {
    let ins = inputs();
    let r = refs("vae_sd1");
    let vae = load("sd1", DType::F16, Some("fp16"));
    assert_eq!(
        vae.dtype(),
        DType::F16,
        "sd1 has force_upcast false: computes in f16"
    );
    let d = vae.encode(&ins["image_64"]).expect("encode");
    assert_eq!(d.mean.dtype(), DType::F16);
    for (part, t) in [("mean", &d.mean), ("logvar", &d.logvar)] {
        report(
            &format!("f16 enc {part}"),
            t,
            &r[&format!("enc64_f16_{part}")],
        );
        assert_close(
            t,
            &r[&format!("enc64_f16_{part}")],
            1e-2,
            5e-3,
            "f16 encode",
        );
        assert_close(
            t,
            &r[&format!("enc64_{part}")],
            1e-2,
            5e-3,
            "f16 encode vs f32",
        );
    }
    let img = vae.decode(&ins["latents_8"]).expect("decode");
    report("f16 dec", &img, &r["dec8_f16"]);
    report("f16 dec vs f32", &img, &r["dec8"]);
    assert_close(&img, &r["dec8_f16"], 3e-2, 1e-2, "f16 decode");
    assert_close(&img, &r["dec8"], 3e-2, 1e-2, "f16 decode vs f32");
}

/// bf16 (f32 weights rounded to bf16): measured max abs diff against torch's bf16 run 5.5e-2
/// (encoder) and 7.8e-2 (decoder); torch's own bf16 run is 7.3e-2 from f32 on the decoder, ours
/// 8.9e-2. bf16 keeps 8 mantissa bits (relative step 2^-8 = 3.9e-3), compounded over ~30 layers.
#[test]
fn bf16_matches_torch_bf16() {
    let ins = inputs();
    let r = refs("vae_sd1");
    let vae = load("sd1", DType::BF16, None);
    assert_eq!(vae.dtype(), DType::BF16);
    let d = vae.encode(&ins["image_64"]).expect("encode");
    for (part, t) in [("mean", &d.mean), ("logvar", &d.logvar)] {
        report(
            &format!("bf16 enc {part}"),
            t,
            &r[&format!("enc64_bf16_{part}")],
        );
        assert_close(
            t,
            &r[&format!("enc64_bf16_{part}")],
            1e-1,
            2e-2,
            "bf16 encode",
        );
    }
    let img = vae.decode(&ins["latents_8"]).expect("decode");
    report("bf16 dec", &img, &r["dec8_bf16"]);
    report("bf16 dec vs f32", &img, &r["dec8"]);
    assert_close(&img, &r["dec8_bf16"], 1.5e-1, 2e-2, "bf16 decode");
    assert_close(&img, &r["dec8"], 1.5e-1, 2e-2, "bf16 decode vs f32");
}

fn f16_opts() -> LoadOptions {
    LoadOptions {
        dtype: DType::F16,
        device: Device::Cpu,
        variant: None,
    }
}

/// sdxl's config has force_upcast: loaded for f16 it computes in f32, as diffusers' pipelines
/// cast the VAE to f32 before decoding. From an fp16 weight file (the usual download) that is
/// exactly diffusers' `vae.half()` then `upcast_vae()`: measured max abs diff 7.6e-6.
#[test]
fn force_upcast_computes_in_f32() {
    let ins = inputs();
    let r = refs("vae_sdxl");
    // f32 weights file: the weights stay f32 (diffusers would round them to f16 first).
    let vae = AutoencoderKL::load(&vae_dir("sdxl"), &f16_opts()).expect("load");
    assert!(vae.config().force_upcast);
    assert_eq!(vae.dtype(), DType::F32);
    let img = vae.decode(&ins["latents_8"]).expect("decode");
    assert_close(&img, &r["dec8"], ATOL32, 1e-5, "upcast decode, f32 weights");

    // An fp16 weights file, as `variant="fp16"` ships: f16-rounded weights computed in f32.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        vae_dir("sdxl").join("config.json"),
        dir.path().join("config.json"),
    )
    .expect("copy");
    let f32w = load_tensors(&vae_dir("sdxl").join("diffusion_pytorch_model.safetensors"))
        .expect("weights");
    let f16w: HashMap<String, Tensor> = f32w
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F16).expect("to f16")))
        .collect();
    candle_core::safetensors::save(
        &f16w,
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .expect("save");
    let vae = AutoencoderKL::load(dir.path(), &f16_opts()).expect("load fp16 file");
    assert_eq!(vae.dtype(), DType::F32);
    let img = vae.decode(&ins["latents_8"]).expect("decode");
    report("upcast dec (fp16 weights)", &img, &r["dec8_upcast"]);
    assert_close(
        &img,
        &r["dec8_upcast"],
        ATOL32,
        1e-5,
        "upcast decode, fp16 weights",
    );
    let d = vae.encode(&ins["image_64"]).expect("encode");
    assert_close(
        &d.mean,
        &r["enc64_upcast_mean"],
        ATOL32,
        1e-5,
        "upcast encode mean",
    );
    assert_close(
        &d.logvar,
        &r["enc64_upcast_logvar"],
        ATOL32,
        1e-5,
        "upcast encode logvar",
    );

    // The override: compute in f16 although the config asks for the upcast.
    let opts = VaeOptions {
        force_upcast: Some(false),
        ..Default::default()
    };
    let vae = AutoencoderKL::load_with(dir.path(), &f16_opts(), &opts).expect("load");
    assert_eq!(vae.dtype(), DType::F16);
    // bf16 is never upcast (diffusers only upcasts float16).
    let bf = LoadOptions {
        dtype: DType::BF16,
        ..f16_opts()
    };
    assert_eq!(
        AutoencoderKL::load(&vae_dir("sdxl"), &bf)
            .expect("load")
            .dtype(),
        DType::BF16
    );
}

fn non_finite_count(r: sd_core::Result<Tensor>) -> (usize, String) {
    match r {
        Err(e @ Error::NonFinite { count, .. }) => (count, e.to_string()),
        Err(e) => panic!("expected a NonFinite error, got {e}"),
        Ok(_) => panic!("expected a NonFinite error, got an image"),
    }
}

/// Latents that overflow f16 inside the decoder (diffusers' f16 decode of them is NaN too, as
/// the exporter checks): an error that says what to do, not a black image.
#[test]
fn f16_overflow_is_an_error_and_upcast_avoids_it() {
    let ins = inputs();
    let huge = &ins["latents_huge"];
    let vae = load("sd1", DType::F16, Some("fp16"));
    let raw = vae.decode(huge).expect("decode runs");
    let nan = raw.to_dtype(DType::F32).expect("f32");
    assert!(
        nan.flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("vec")
            .iter()
            .any(|v| !v.is_finite()),
        "the f16 decode of latents_huge should overflow, as in PyTorch"
    );
    let scaled = (huge * vae.config().scaling_factor).expect("scale");
    let (count, msg) = non_finite_count(vae.image_from_latents(&scaled));
    assert!(count > 0);
    assert!(
        msg.contains("float16") && msg.contains("f32") && msg.contains("bf16"),
        "{msg}"
    );

    // The same latents with the sdxl VAE (force_upcast) loaded for f16 decode fine.
    let up = AutoencoderKL::load(&vae_dir("sdxl"), &f16_opts()).expect("load");
    let scaled = (huge * up.config().scaling_factor).expect("scale");
    let img = up
        .image_from_latents(&scaled)
        .expect("upcast decode is finite");
    assert_eq!(img.dtype(), DType::F32);
}

#[test]
fn injected_inf_and_nan_are_reported() {
    let ins = inputs();
    let vae = load("sd1", DType::F32, None);
    let mut v = ins["latents_8"]
        .flatten_all()
        .expect("flat")
        .to_vec1::<f32>()
        .expect("vec");
    v[5] = f32::INFINITY;
    let z = Tensor::from_vec(v, (1, 4, 8, 8), &Device::Cpu).expect("tensor");
    let (count, msg) = non_finite_count(vae.image_from_latents(&z));
    assert_eq!(
        count,
        64 * 64 * 3,
        "an inf latent poisons the whole image through the attention"
    );
    assert!(msg.contains("F32"), "{msg}");

    let mut px = ins["image_64"]
        .flatten_all()
        .expect("flat")
        .to_vec1::<f32>()
        .expect("vec");
    px[100] = f32::NAN;
    let image = Tensor::from_vec(px, (1, 3, 64, 64), &Device::Cpu).expect("tensor");
    let mut g = sd_core::TorchGenerator::new(0);
    non_finite_count(vae.latents_from_image(&image, &mut g));
    non_finite_count(vae.latents_from_image_mode(&image));
}
