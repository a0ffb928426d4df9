//! f32 parity with diffusers' AutoencoderKL on every fixture family (references exported by
//! tools/fixtures/vae_refs.py). Run with `--nocapture` to see the measured errors.

mod common;

use candle_core::DType;
use common::{inputs, load, refs, report, FAMILIES};
use sd_core::testing::assert_close;
use sd_core::TorchGenerator;

// Measured max abs diff against PyTorch (f32, outputs up to ~5.3): encoder 2.5e-6, decoder
// 7.7e-6, samples 5.2e-6 (the reference itself has ~1e-5 of f32 noise on the decoder).
const ATOL: f64 = 2e-5;
const RTOL: f64 = 1e-5;

#[test]
fn encoder_posterior_matches_diffusers() {
    let ins = inputs();
    for (family, refname) in FAMILIES {
        let r = refs(refname);
        let vae = load(family, DType::F32, None);
        for (input, key) in [("image_64", "enc64"), ("image_b2", "encb2")] {
            let dist = vae.encode(&ins[input]).expect("encode");
            for (part, t) in [("mean", &dist.mean), ("logvar", &dist.logvar)] {
                let want = &r[&format!("{key}_{part}")];
                report(&format!("{family} {key} {part}"), t, want);
                assert_close(t, want, ATOL, RTOL, &format!("{family} {key} {part}"));
            }
        }
    }
}

#[test]
fn decoder_matches_diffusers() {
    let ins = inputs();
    for (family, refname) in FAMILIES {
        let r = refs(refname);
        let vae = load(family, DType::F32, None);
        for (input, key) in [("latents_8", "dec8"), ("latents_b2", "decb2")] {
            let img = vae.decode(&ins[input]).expect("decode");
            report(&format!("{family} {key}"), &img, &r[key]);
            assert_close(&img, &r[key], ATOL, RTOL, &format!("{family} {key}"));
        }
    }
}

#[test]
fn sampling_matches_torch_generator() {
    let ins = inputs();
    for (family, refname) in FAMILIES {
        let r = refs(refname);
        let vae = load(family, DType::F32, None);
        let dist = vae.encode(&ins["image_64"]).expect("encode");
        let s = dist.sample(&mut TorchGenerator::new(7)).expect("sample");
        report(&format!("{family} sample seed 7"), &s, &r["sample64_seed7"]);
        assert_close(&s, &r["sample64_seed7"], ATOL, RTOL, "sample seed 7");
        let dist = vae.encode(&ins["image_b2"]).expect("encode");
        let s = dist.sample(&mut TorchGenerator::new(1234)).expect("sample");
        report(
            &format!("{family} sample b2 seed 1234"),
            &s,
            &r["sampleb2_seed1234"],
        );
        assert_close(
            &s,
            &r["sampleb2_seed1234"],
            ATOL,
            RTOL,
            "sample b2 seed 1234",
        );
        // The pipeline helper: sample * scaling_factor, as diffusers' img2img prepare_latents.
        let l = vae
            .latents_from_image(&ins["image_64"], &mut TorchGenerator::new(7))
            .expect("latents_from_image");
        report(
            &format!("{family} init latents"),
            &l,
            &r["init_latents64_seed7"],
        );
        assert_close(&l, &r["init_latents64_seed7"], ATOL, RTOL, "init latents");
        // The deterministic variant is the scaled mean.
        let m = vae.latents_from_image_mode(&ins["image_64"]).expect("mode");
        let want = (&r["enc64_mean"] * vae.config().scaling_factor).expect("scale");
        assert_close(&m, &want, ATOL, RTOL, "mode latents");
    }
}

/// The pipeline helper: latents / scaling_factor, then decode, in f32.
#[test]
fn image_from_latents_unscales_then_decodes() {
    let ins = inputs();
    for (family, refname) in FAMILIES {
        let r = refs(refname);
        let vae = load(family, DType::F32, None);
        let sf = vae.config().scaling_factor;
        let latents = (&ins["latents_8"] * sf).expect("scale");
        let img = vae.image_from_latents(&latents).expect("image");
        assert_eq!(img.dtype(), DType::F32);
        // (z * sf) / sf is z within an ulp; measured max abs diff 7.7e-6.
        assert_close(
            &img,
            &r["dec8"],
            ATOL,
            RTOL,
            &format!("{family} image_from_latents"),
        );
        // scale/unscale are inverse (up to rounding).
        let back = vae
            .scale_latents(&vae.unscale_latents(&latents).expect("unscale"))
            .expect("scale");
        assert_close(&back, &latents, 1e-6, 1e-6, "scale(unscale(x)) == x");
    }
}
