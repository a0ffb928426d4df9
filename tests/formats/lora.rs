//! LoRA parity with diffusers' `load_lora_weights` (+ `set_adapters` strengths), f32, on the
//! fixture models: kohya with non-uniform alphas, LoCon convolutions, text encoders; PEFT and
//! diffusers' older names; SDXL with SGM names and both text encoders; several LoRAs at once;
//! apply / remove without reloading; refusals. References: tools/fixtures/lora_refs.py.
//!
//! Scale rule: each module is scaled by its own alpha / rank (kohya, AUTOMATIC1111, ComfyUI).
//! diffusers 0.42 differs on kohya files with non-uniform alphas (its PEFT alpha_pattern keys do
//! not match attention projections or text-encoder MLPs, and modules without an alpha get the
//! most common one): the references are diffusers' pipeline with every LoRA layer's scale set
//! to strength x alpha / rank; `latents_diffusers_scales` keeps diffusers' own result, which
//! sd-rs matches where the alphas leave no ambiguity (the SDXL case).

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Tensor;
use sd_rs::core::testing::{fixtures_dir, load_tensors};
use sd_rs::core::{LoadOptions, TorchGenerator};
use sd_rs::formats::LoraFile;
use sd_rs::pipeline::{Flow, GenerateRequest, LoraOptions, StableDiffusion};

fn folder(f: &str) -> PathBuf {
    fixtures_dir().join("models").join(f)
}

fn lora(name: &str) -> Arc<LoraFile> {
    Arc::new(LoraFile::open(&fixtures_dir().join(format!("loras/{name}.safetensors"))).unwrap())
}

/// The settings of lora_refs.py.
fn run(sd: &StableDiffusion) -> Tensor {
    let mut req = GenerateRequest::new("a red fox in the snow");
    req.negative_prompts = vec!["blurry".into()];
    req.steps = 3;
    req.guidance_scale = 5.0;
    req.height = Some(32);
    req.width = Some(32);
    let mut g = TorchGenerator::new(7);
    sd.generate(&req, &mut g, &mut |_| Flow::Continue)
        .unwrap()
        .latents
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

// diffusers runs the LoRA unmerged (x W^T + s x A^T B^T) and sd-rs merged (x (W + s B A)^T):
// the same maths in another rounding order. Measured worst: 1.4e-5 (sd1_kohya_peft; the LoRAs
// move the latents by ~6).
const ATOL: f32 = 1e-4;

#[test]
fn matches_diffusers() {
    let opts = LoadOptions::default();
    for (case, family, loras) in [
        ("sd1_kohya", "sd1", vec![("sd1_kohya", 1.0)]),
        (
            "sd1_kohya_peft",
            "sd1",
            vec![("sd1_kohya", 0.7), ("sd1_peft", 1.0)],
        ),
        ("sdxl_kohya", "sdxl", vec![("sdxl_kohya", 0.8)]),
    ] {
        let refs =
            load_tensors(&fixtures_dir().join(format!("refs/lora_{case}.safetensors"))).unwrap();
        let sd = StableDiffusion::load(&folder(family), &opts).unwrap();
        let base = run(&sd);
        assert!(max_diff(&base, &refs["base"]) < ATOL, "{case}: base");
        let list: Vec<(Arc<LoraFile>, f64)> = loras.iter().map(|(n, w)| (lora(n), *w)).collect();
        let with = sd.with_loras(&list, &LoraOptions::default()).unwrap();
        let got = run(&with);
        let d = max_diff(&got, &refs["latents"]);
        eprintln!(
            "{case}: max abs diff {d:e} (LoRA moves the latents by {})",
            max_diff(&refs["latents"], &refs["base"])
        );
        assert!(d < ATOL, "{case}: {d}");
        let raw = max_diff(&got, &refs["latents_diffusers_scales"]);
        if case == "sdxl_kohya" {
            assert!(
                raw < ATOL,
                "{case}: diffusers' own scales agree here: {raw}"
            );
        } else {
            assert!(
                raw > 0.1,
                "{case}: diffusers' own scales differ on this file: {raw}"
            );
        }
        // Removing the LoRAs gives the base model back, bit for bit, from the mapped files.
        let back = with.with_loras(&[], &LoraOptions::default()).unwrap();
        assert_eq!(max_diff(&run(&back), &base), 0.0, "{case}: removed");
        assert!(back.loras().is_empty());
    }
}

/// The same LoRA through a single-file checkpoint.
#[test]
fn single_file_with_lora() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("sd1.safetensors");
    sd_rs::formats::testing::assemble_single_file(
        &fixtures_dir().join("refs/single_file_sd1.json"),
        &folder("sd1"),
        &path,
    )
    .unwrap();
    let sf = sd_rs::pipeline::SingleFileOptions {
        config: Some(folder("sd1")),
        prediction_type: None,
    };
    let sd = StableDiffusion::load_single_file(&path, &LoadOptions::default(), &sf).unwrap();
    let l = [(lora("sd1_kohya"), 0.5)];
    let with = sd.with_loras(&l, &LoraOptions::default()).unwrap();
    // The sd1 file holds the folder's fp16-variant weights: the same LoRA on that folder gives
    // the same latents, bit for bit.
    let fp16 = LoadOptions {
        variant: Some("fp16".into()),
        ..LoadOptions::default()
    };
    let folder_sd = StableDiffusion::load(&folder("sd1"), &fp16).unwrap();
    let want = run(&folder_sd.with_loras(&l, &LoraOptions::default()).unwrap());
    assert_eq!(max_diff(&run(&with), &want), 0.0);
    assert!(max_diff(&want, &run(&folder_sd)) > 0.1);
}

#[test]
fn refusals() {
    let opts = LoadOptions::default();
    let sd1 = StableDiffusion::load(&folder("sd1"), &opts).unwrap();
    let sdxl = StableDiffusion::load(&folder("sdxl"), &opts).unwrap();
    let err = |r: sd_rs::core::Result<StableDiffusion>| match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    let e = err(sd1.with_loras(&[(lora("sdxl_kohya"), 1.0)], &LoraOptions::default()));
    assert!(e.contains("SDXL LoRA"), "{e}");
    let e = err(sdxl.with_loras(&[(lora("sd1_kohya"), 1.0)], &LoraOptions::default()));
    assert!(e.contains("SD 1.x/2.x LoRA"), "{e}");
    // Names that carry no family: the cross-attention width tells, or the shapes do.
    let e = err(sdxl.with_loras(&[(lora("sd1_peft"), 1.0)], &LoraOptions::default()));
    assert!(e.contains("made for another model"), "{e}");

    // Unknown keys: listed, or skipped with lenient.
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("odd.safetensors");
    let dev = candle_core::Device::Cpu;
    let mut t = std::collections::HashMap::new();
    t.insert(
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
            .to_owned(),
        Tensor::ones((2, 8), candle_core::DType::F32, &dev).unwrap(),
    );
    t.insert(
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"
            .to_owned(),
        Tensor::ones((8, 2), candle_core::DType::F32, &dev).unwrap(),
    );
    t.insert(
        "lora_unet_down_blocks_7_nothing_here.lora_down.weight".to_owned(),
        Tensor::ones((2, 8), candle_core::DType::F32, &dev).unwrap(),
    );
    t.insert(
        "lora_unet_down_blocks_7_nothing_here.lora_up.weight".to_owned(),
        Tensor::ones((8, 2), candle_core::DType::F32, &dev).unwrap(),
    );
    candle_core::safetensors::save(&t, &p).unwrap();
    let odd = Arc::new(LoraFile::open(&p).unwrap());
    let e = err(sd1.with_loras(&[(odd.clone(), 1.0)], &LoraOptions::default()));
    assert!(
        e.contains("lora_unet_down_blocks_7_nothing_here") && e.contains("lenient"),
        "{e}"
    );
    let lenient = sd1
        .with_loras(&[(odd, 1.0)], &LoraOptions { lenient: true })
        .unwrap();
    assert!(max_diff(&run(&lenient), &run(&sd1)) > 0.0);

    // A delta that does not fit its weight.
    t.clear();
    t.insert(
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
            .to_owned(),
        Tensor::ones((2, 7), candle_core::DType::F32, &dev).unwrap(),
    );
    t.insert(
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"
            .to_owned(),
        Tensor::ones((8, 2), candle_core::DType::F32, &dev).unwrap(),
    );
    candle_core::safetensors::save(&t, &p).unwrap();
    let e = err(sd1.with_loras(
        &[(Arc::new(LoraFile::open(&p).unwrap()), 1.0)],
        &LoraOptions::default(),
    ));
    assert!(e.contains("do not fit") && e.contains("to_q.weight"), "{e}");

    // LoHa / LoKr / pickles by name.
    for (key, what) in [
        ("lora_unet_x.hada_w1_a", "LoHa"),
        ("lora_unet_x.lokr_w1", "LoKr"),
        ("lora_unet_x.lora_mid.weight", "lora_mid"),
    ] {
        t.clear();
        t.insert(
            key.to_owned(),
            Tensor::ones(2, candle_core::DType::F32, &dev).unwrap(),
        );
        candle_core::safetensors::save(&t, &p).unwrap();
        let e = LoraFile::open(&p).unwrap_err().to_string();
        assert!(e.contains(what), "{e}");
    }
    let pt = tmp.path().join("l.pt");
    std::fs::write(&pt, b"\x80\x02").unwrap();
    assert!(LoraFile::open(&pt)
        .unwrap_err()
        .to_string()
        .contains("pickled"));
}
