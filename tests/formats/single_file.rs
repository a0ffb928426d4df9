//! Single-file checkpoints: each fixture folder rewritten in the LDM/SGM layout (by the recipe
//! of tools/fixtures/single_file.py, which checked that diffusers' own `from_single_file` gives
//! the folder's weights exactly) must reproduce the folder's outputs exactly: the same
//! latents and images, bit for bit, because the same weights go through the same code.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use sd_rs::core::testing::fixtures_dir;
use sd_rs::core::{LoadOptions, TorchGenerator};
use sd_rs::formats::testing::assemble_single_file;
use sd_rs::formats::{Checkpoint, Family};
use sd_rs::pipeline::{Flow, GenerateRequest, Init, SingleFileOptions, StableDiffusion};

fn folder(f: &str) -> PathBuf {
    fixtures_dir().join("models").join(f)
}

/// Writes the family's single-file checkpoint into `dir`.
fn checkpoint(family: &str, dir: &Path) -> PathBuf {
    let out = dir.join(format!("{family}.safetensors"));
    let recipe = fixtures_dir().join(format!("refs/single_file_{family}.json"));
    assemble_single_file(&recipe, &folder(family), &out).unwrap();
    out
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn run(sd: &StableDiffusion, img2img: bool) -> (Tensor, Tensor) {
    let mut req = GenerateRequest::new("a red fox in the snow");
    req.negative_prompts = vec!["blurry".into()];
    req.steps = 3;
    req.guidance_scale = 5.0;
    req.height = Some(32);
    req.width = Some(32);
    if img2img {
        let img = sd_rs::pipeline::image::read_rgb8(&fixtures_dir().join("refs/pipeline_init.png"))
            .unwrap();
        req.height = None;
        req.width = None;
        req.init = Init::Image {
            image: sd_rs::pipeline::image::from_rgb8(&img, &Device::Cpu).unwrap(),
            strength: 0.6,
        };
    }
    let mut g = TorchGenerator::new(7);
    let out = sd.generate(&req, &mut g, &mut |_| Flow::Continue).unwrap();
    (out.latents, out.images.unwrap())
}

#[test]
fn every_family_reproduces_its_folder_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    for (family, detected, variant) in [
        ("sd1", Family::Sd1, Some("fp16")), // the sd1 file is f16, from the folder's fp16 variant
        ("sd2", Family::Sd2, None),
        ("sdxl", Family::Sdxl, None),
        ("refiner", Family::SdxlRefiner, None),
    ] {
        let path = checkpoint(family, tmp.path());
        assert_eq!(
            Checkpoint::open(&path).unwrap().family(),
            detected,
            "{family}"
        );
        let opts = LoadOptions::default();
        let sf = SingleFileOptions {
            config: Some(folder(family)),
            prediction_type: None,
        };
        let single = StableDiffusion::load_single_file(&path, &opts, &sf)
            .unwrap_or_else(|e| panic!("{family}: {e}"));
        let folder_opts = LoadOptions {
            variant: variant.map(str::to_owned),
            ..LoadOptions::default()
        };
        let reference = StableDiffusion::load(&folder(family), &folder_opts).unwrap();
        let img2img = family == "refiner";
        let (la, ia) = run(&single, img2img);
        let (lb, ib) = run(&reference, img2img);
        // Same weights, same code: bit-identical.
        assert_eq!(max_diff(&la, &lb), 0.0, "{family} latents");
        assert_eq!(max_diff(&ia, &ib), 0.0, "{family} images");
    }
}

/// The refiner checkpoint as the ensemble's second expert, sharing the base's text_encoder_2 and
/// VAE (both loaded from single files).
#[test]
fn refiner_file_shares_the_base() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = LoadOptions::default();
    let sf = |f: &str| SingleFileOptions {
        config: Some(folder(f)),
        prediction_type: None,
    };
    let base =
        StableDiffusion::load_single_file(&checkpoint("sdxl", tmp.path()), &opts, &sf("sdxl"))
            .unwrap();
    let refiner = StableDiffusion::load_single_file_refiner(
        &checkpoint("refiner", tmp.path()),
        &base,
        &opts,
        &sf("refiner"),
    )
    .unwrap();
    assert!(std::sync::Arc::ptr_eq(&base.vae, &refiner.vae));
}

/// `prediction_type` overrides the config's scheduler (SD 2 files do not record it).
#[test]
fn prediction_type_override() {
    use sd_rs::schedulers::PredictionType;
    let tmp = tempfile::tempdir().unwrap();
    let path = checkpoint("sd2", tmp.path());
    let opts = LoadOptions::default();
    let mut sf = SingleFileOptions {
        config: Some(folder("sd2")),
        prediction_type: None,
    };
    let sd = StableDiffusion::load_single_file(&path, &opts, &sf).unwrap();
    assert_eq!(sd.prediction_type().unwrap(), PredictionType::VPrediction);
    sf.prediction_type = Some(PredictionType::Epsilon);
    let sd = StableDiffusion::load_single_file(&path, &opts, &sf).unwrap();
    assert_eq!(sd.prediction_type().unwrap(), PredictionType::Epsilon);
    // And the scheduler it builds predicts epsilon: a different step from the same inputs.
    let (la, _) = run(&sd, false);
    sf.prediction_type = None;
    let (lb, _) = run(
        &StableDiffusion::load_single_file(&path, &opts, &sf).unwrap(),
        false,
    );
    assert!(max_diff(&la, &lb) > 1e-3);
}

/// The shipped configs are the released models': the UNets build exactly diffusers' parameter
/// lists of SD 1.5 / 2.1 / SDXL / refiner (tests/fixtures/refs/unet_params_*.txt), and the text
/// encoders, VAEs, tokenizers and schedulers load.
#[test]
fn shipped_configs_are_the_released_models() {
    use sd_rs::clip::{ClipTextConfig, ClipTokenizer};
    use sd_rs::core::VarBuilder;
    use sd_rs::formats::{config_folder, ShippedConfig};
    use sd_rs::unet::{UNet2DConditionModel, UNetConfig};
    let dt = candle_core::DType::F32;
    for (which, params, te) in [
        (
            ShippedConfig::Sd1,
            "sd15",
            vec![("text_encoder", 768, 12, false)],
        ),
        (
            ShippedConfig::Sd2V,
            "sd21",
            vec![("text_encoder", 1024, 23, false)],
        ),
        (
            ShippedConfig::Sd2Base,
            "sd21",
            vec![("text_encoder", 1024, 23, false)],
        ),
        (
            ShippedConfig::Sdxl,
            "sdxl",
            vec![
                ("text_encoder", 768, 12, false),
                ("text_encoder_2", 1280, 32, true),
            ],
        ),
        (
            ShippedConfig::SdxlRefiner,
            "refiner",
            vec![("text_encoder_2", 1280, 32, true)],
        ),
    ] {
        let dir = config_folder(which).unwrap();
        let cfg = UNetConfig::from_file(&dir.join("unet/config.json")).unwrap();
        let vb = VarBuilder::zeros(dt, &Device::Cpu);
        UNet2DConditionModel::from_config(cfg, &vb).unwrap();
        let mut ours: Vec<(String, Vec<usize>)> = vb.requested();
        ours.sort();
        let text =
            std::fs::read_to_string(fixtures_dir().join(format!("refs/unet_params_{params}.txt")))
                .unwrap();
        let mut want: Vec<(String, Vec<usize>)> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let (n, s) = l.split_once(' ').unwrap();
                (
                    n.to_owned(),
                    s.split(',').map(|d| d.parse().unwrap()).collect(),
                )
            })
            .collect();
        want.sort();
        assert_eq!(ours, want, "{which:?}");
        for (name, hidden, layers, projection) in te {
            let c = ClipTextConfig::read(&dir.join(name).join("config.json")).unwrap();
            assert_eq!(
                (c.hidden_size, c.num_layers),
                (hidden, layers),
                "{which:?} {name}"
            );
            assert_eq!(
                c.with_projection.unwrap_or(false),
                projection,
                "{which:?} {name}"
            );
            let tok =
                ClipTokenizer::from_folder(&dir.join(name.replace("text_encoder", "tokenizer")))
                    .unwrap();
            assert!(tok.encode("a photo of a cat").is_ok());
        }
        let vae = sd_rs::vae::VaeConfig::from_file(&dir.join("vae/config.json")).unwrap();
        let sdxl = matches!(which, ShippedConfig::Sdxl | ShippedConfig::SdxlRefiner);
        assert_eq!(vae.scaling_factor, if sdxl { 0.13025 } else { 0.18215 });
        let sched = std::fs::read_to_string(dir.join("scheduler/scheduler_config.json")).unwrap();
        let p = sd_rs::schedulers::resolve_config_json(&sched, &dir, None)
            .unwrap()
            .prediction_type;
        let v = which == ShippedConfig::Sd2V;
        assert_eq!(
            p == sd_rs::schedulers::PredictionType::VPrediction,
            v,
            "{which:?}"
        );
    }
}

/// Without --config the tiny fixture does not fit the shipped SD 1.5 config: the load report
/// names the file's own keys with the diffusers names they were converted to.
#[test]
fn load_report_names_the_files_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let path = checkpoint("sd1", tmp.path());
    let err = StableDiffusion::load_single_file(
        &path,
        &LoadOptions::default(),
        &SingleFileOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("`cond_stage_model.transformer.text_model.embeddings.token_embedding.weight (as text_model.embeddings.token_embedding.weight)` has shape [49408, 8], expected [49408, 768]"),
        "{err}"
    );
    assert!(err.contains("sd1.safetensors (text_encoder)"), "{err}");
}
