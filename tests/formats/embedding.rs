//! Textual inversion against diffusers' `load_textual_inversion` (tools/fixtures/embedding_refs.py):
//! an AUTOMATIC1111 `emb_params` file of two vectors under its file stem, a diffusers
//! `{token: tensor}` file under `:TOKEN`, an SDXL `clip_l` + `clip_g` file with a different number
//! of vectors per encoder; errors for wrong widths, families, pickles and unknown layouts.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Tensor;
use sd_rs::core::testing::{fixtures_dir, load_tensors};
use sd_rs::core::{LoadOptions, TorchGenerator};
use sd_rs::formats::{EmbeddingFile, LoraFile};
use sd_rs::pipeline::{Flow, GenerateRequest, LoraOptions, StableDiffusion};

fn folder(f: &str) -> PathBuf {
    fixtures_dir().join("models").join(f)
}

fn emb(name: &str, token: Option<&str>) -> Arc<EmbeddingFile> {
    Arc::new(
        EmbeddingFile::open(&fixtures_dir().join(format!("embeddings/{name}")), token).unwrap(),
    )
}

fn run(sd: &StableDiffusion, prompt: &str) -> Tensor {
    let mut req = GenerateRequest::new(prompt);
    req.negative_prompts = vec!["blurry".into()];
    req.steps = 3;
    req.guidance_scale = 5.0;
    req.height = Some(32);
    req.width = Some(32);
    // diffusers' plain prompts (the references do not use AUTOMATIC1111 syntax).
    req.prompt_syntax = sd_rs::pipeline::PromptSyntax::Plain;
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

// The pipeline tolerance of tests/pipeline_parity.rs; measured here: 1.3e-5 (sd1), 1.8e-5 (sdxl).
const ATOL: f32 = 2e-4;

#[test]
fn sd1_matches_diffusers() {
    let refs = load_tensors(&fixtures_dir().join("refs/embedding_sd1.safetensors")).unwrap();
    let sd = StableDiffusion::load(&folder("sd1"), &LoadOptions::default()).unwrap();
    let with = sd
        .with_embeddings(&[
            emb("fox-style.safetensors", None),
            emb("learned_embeds.safetensors", Some("<cat-toy>")),
        ])
        .unwrap();
    let prompt = "a fox-style painting of a <cat-toy> in the snow";
    // The token ids of diffusers' converted prompt (fox-style -> fox-style fox-style_1).
    let want_ids: Vec<i64> = refs["ids"]
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&v| v as i64)
        .collect();
    let sd_rs::pipeline::clip::PromptEncoder::Sd { tokenizer, .. } = &*with.text else {
        panic!("sd1 has one encoder")
    };
    let ids: Vec<i64> = tokenizer
        .encode(prompt)
        .unwrap()
        .ids
        .iter()
        .map(|&i| i as i64)
        .collect();
    assert_eq!(ids[..want_ids.len()], want_ids[..]);
    assert!(ids.contains(&49408) && ids.contains(&49409) && ids.contains(&49410));
    let latents = run(&with, prompt);
    let d = max_diff(&latents, &refs["latents"]);
    eprintln!("sd1 embeddings: max abs diff {d:e}");
    assert!(d < ATOL, "{d}");
    assert!(
        max_diff(&run(&sd, prompt), &refs["latents"]) > 1e-2,
        "the embeddings matter"
    );
    // A LoRA change keeps the embeddings (they are re-added to the rebuilt encoder).
    let lora =
        Arc::new(LoraFile::open(&fixtures_dir().join("loras/sd1_kohya.safetensors")).unwrap());
    let both = with
        .with_loras(&[(lora, 1.0)], &LoraOptions::default())
        .unwrap();
    let back = both.with_loras(&[], &LoraOptions::default()).unwrap();
    assert_eq!(max_diff(&run(&back, prompt), &latents), 0.0);
}

#[test]
fn sdxl_matches_diffusers() {
    let refs = load_tensors(&fixtures_dir().join("refs/embedding_sdxl.safetensors")).unwrap();
    let sd = StableDiffusion::load(&folder("sdxl"), &LoadOptions::default()).unwrap();
    let with = sd
        .with_embeddings(&[emb("xl-style.safetensors", None)])
        .unwrap();
    let d = max_diff(&run(&with, "a photo of a fox, xl-style"), &refs["latents"]);
    eprintln!("sdxl embeddings: max abs diff {d:e}");
    assert!(d < ATOL, "{d}");
}

#[test]
fn refusals() {
    let sd1 = StableDiffusion::load(&folder("sd1"), &LoadOptions::default()).unwrap();
    let sdxl = StableDiffusion::load(&folder("sdxl"), &LoadOptions::default()).unwrap();
    let err = |r: sd_rs::core::Result<StableDiffusion>| match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    let e = err(sd1.with_embeddings(&[emb("xl-style.safetensors", None)]));
    assert!(e.contains("SDXL embedding"), "{e}");
    let e = err(sdxl.with_embeddings(&[emb("fox-style.safetensors", None)]));
    assert!(e.contains("clip_l") && e.contains("clip_g"), "{e}");
    // Twice the same token.
    let e = err(sd1.with_embeddings(&[
        emb("fox-style.safetensors", None),
        emb("fox-style.safetensors", None),
    ]));
    assert!(e.contains("fox-style"), "{e}");
    let tmp = tempfile::tempdir().unwrap();
    let dev = candle_core::Device::Cpu;
    let write = |name: &str, tensors: &[(&str, Tensor)]| {
        let p = tmp.path().join(name);
        let m: std::collections::HashMap<String, Tensor> = tensors
            .iter()
            .map(|(k, t)| ((*k).to_owned(), t.clone()))
            .collect();
        candle_core::safetensors::save(&m, &p).unwrap();
        p
    };
    // A width that is not the encoder's: both widths named.
    let p = write(
        "wide.safetensors",
        &[(
            "emb_params",
            Tensor::zeros((1, 768), candle_core::DType::F32, &dev).unwrap(),
        )],
    );
    let e = err(sd1.with_embeddings(&[Arc::new(EmbeddingFile::open(&p, None).unwrap())]));
    assert!(e.contains("768-wide") && e.contains("8-wide"), "{e}");
    // Unknown layouts, spaces in tokens, pickles.
    let p = write(
        "odd.safetensors",
        &[
            (
                "a",
                Tensor::zeros(8, candle_core::DType::F32, &dev).unwrap(),
            ),
            (
                "b",
                Tensor::zeros(8, candle_core::DType::F32, &dev).unwrap(),
            ),
        ],
    );
    let e = EmbeddingFile::open(&p, None).unwrap_err().to_string();
    assert!(e.contains("`a`, `b`"), "{e}");
    let p = write(
        "ok.safetensors",
        &[(
            "emb_params",
            Tensor::zeros((1, 8), candle_core::DType::F32, &dev).unwrap(),
        )],
    );
    assert!(EmbeddingFile::open(&p, Some("two words")).is_err());
    let pt = tmp.path().join("bad-hands.pt");
    std::fs::write(&pt, b"PK\x03\x04").unwrap();
    assert!(EmbeddingFile::open(&pt, None)
        .unwrap_err()
        .to_string()
        .contains("pickled"));
    let p = write(
        "scalar.safetensors",
        &[(
            "emb_params",
            Tensor::zeros((2, 2, 2), candle_core::DType::F32, &dev).unwrap(),
        )],
    );
    assert!(EmbeddingFile::open(&p, None)
        .unwrap_err()
        .to_string()
        .contains("[vectors, dim]"));
}
