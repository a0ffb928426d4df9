//! ClipTextModel against transformers' CLIPTextModel / CLIPTextModelWithProjection
//! (refs/clip_text_encoders.safetensors, exported by tools/fixtures/clip_refs.py).

mod common;

use candle_core::DType;
use common::{get, model_dir, refs};
use sd_clip::{ClipTextModel, EosPooling};
use sd_core::testing::{assert_close, compare};
use sd_core::LoadOptions;

const COMPONENTS: &[(&str, &str)] = &[
    ("sd1", "text_encoder"),
    ("sd2", "text_encoder"),
    ("sdxl", "text_encoder"),
    ("sdxl", "text_encoder_2"),
    ("refiner", "text_encoder_2"),
];

/// Runs `model` on the reference ids of `prefix` and compares every output; returns the largest
/// absolute error and the largest error / tolerance ratio seen.
fn check(model: &ClipTextModel, prefix: &str, atol: f64, rtol: f64, hidden: bool) -> (f64, f64) {
    let r = refs("clip_text_encoders.safetensors");
    let ids = get(&r, &format!("{prefix}.input_ids"), DType::U32);
    let out = model.forward(&ids).expect("forward");
    let mut worst = (0f64, 0f64);
    let mut cmp = |actual: &candle_core::Tensor, name: &str| {
        let want = get(&r, &format!("{prefix}.{name}"), DType::F32);
        let actual = actual.to_dtype(DType::F32).expect("f32");
        let (abs, ratio) = compare(&actual, &want, atol, rtol).expect("shapes");
        worst = (worst.0.max(abs), worst.1.max(ratio));
        assert_close(&actual, &want, atol, rtol, &format!("{prefix}.{name}"));
    };
    cmp(&out.last_hidden_state, "last_hidden_state");
    cmp(&out.pooled_output, "pooled_output");
    if hidden {
        assert_eq!(out.hidden_states.len(), model.config().num_layers + 1);
        for (i, h) in out.hidden_states.iter().enumerate() {
            cmp(h, &format!("hidden_states.{i}"));
        }
    }
    let has_embeds = r.shape(&format!("{prefix}.text_embeds")).is_some();
    assert_eq!(
        out.text_embeds.is_some(),
        has_embeds,
        "{prefix}: text_embeds presence"
    );
    if let Some(e) = &out.text_embeds {
        cmp(e, "text_embeds");
    }
    worst
}

#[test]
fn f32_matches_transformers() {
    for (fam, comp) in COMPONENTS {
        let model = ClipTextModel::load(&model_dir(fam, comp), &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{fam}/{comp}: {e}"));
        // measured max abs error 2.1e-6 (sdxl text_encoder_2, values up to 5.3)
        let e1 = check(&model, &format!("{fam}.{comp}"), 1e-5, 1e-5, true);
        // ids without eos, 8 long: the two pooling rules pick different positions.
        // measured max abs error 1.9e-6
        let e2 = check(&model, &format!("{fam}.{comp}.noeos"), 1e-5, 1e-5, false);
        println!(
            "{fam}/{comp} f32: max abs {:.2e} / ratio {:.2} (batch of 2), {:.2e} / {:.2} (no eos)",
            e1.0, e1.1, e2.0, e2.1
        );
    }
}

#[test]
fn pooling_rules_follow_the_config() {
    let sd1 = ClipTextModel::load(&model_dir("sd1", "text_encoder"), &LoadOptions::default())
        .expect("sd1");
    assert_eq!(sd1.config().pooling, EosPooling::ArgmaxId);
    let xl = ClipTextModel::load(
        &model_dir("sdxl", "text_encoder_2"),
        &LoadOptions::default(),
    )
    .expect("sdxl");
    assert_eq!(xl.config().pooling, EosPooling::FirstId(49407));
    assert_eq!(xl.config().projection_dim, Some(10));
    assert_eq!(sd1.config().projection_dim, None);
    let ids = [320u32, 1929, 49406, 5000, 320, 7, 320, 1125];
    assert_eq!(sd_clip::model::eos_position(&ids, EosPooling::ArgmaxId), 2);
    assert_eq!(
        sd_clip::model::eos_position(&ids, EosPooling::FirstId(49407)),
        0
    );
}

#[test]
fn half_precision_loading() {
    // sd1 ships model.fp16.safetensors: weights stored in f16, computed in f16.
    let fp16 = LoadOptions {
        dtype: DType::F16,
        variant: Some("fp16".to_owned()),
        ..Default::default()
    };
    let model =
        ClipTextModel::load(&model_dir("sd1", "text_encoder"), &fp16).expect("fp16 variant");
    assert_eq!(model.dtype(), DType::F16);
    // measured max abs error vs the f32 reference 5.6e-3 (values up to 4)
    let e = check(&model, "sd1.text_encoder", 1e-2, 1e-2, true);
    println!(
        "sd1 fp16 variant in f16: max abs {:.2e} / ratio {:.2}",
        e.0, e.1
    );
    for (fam, comp) in COMPONENTS {
        let bf16 = LoadOptions {
            dtype: DType::BF16,
            ..Default::default()
        };
        let model = ClipTextModel::load(&model_dir(fam, comp), &bf16).expect("bf16");
        // measured max abs error vs the f32 reference 5.9e-2 (sd2; values up to 5.3), worst
        // ratio 0.39 of this tolerance
        let e = check(&model, &format!("{fam}.{comp}"), 1e-1, 5e-2, true);
        println!("{fam}/{comp} bf16: max abs {:.2e} / ratio {:.2}", e.0, e.1);
    }
}
