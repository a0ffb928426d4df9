//! Hub ids resolve through the Hugging Face cache layout; offline mode never touches the
//! network; only the files a variant needs are selected for download.

use std::path::Path;

use sd_pipeline::core::testing::fixtures_dir;
use sd_pipeline::core::LoadOptions;
use sd_pipeline::hub::{is_hub_id, needed_files, resolve_model, HubConfig};
use sd_pipeline::StableDiffusion;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

fn offline(cache: &Path) -> HubConfig {
    HubConfig {
        cache_dir: cache.to_path_buf(),
        endpoint: "http://127.0.0.1:9".into(),
        token: None,
        offline: true,
        revision: "main".into(),
    }
}

#[test]
fn offline_hub_id_loads_from_the_cache_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("models--test-org--tiny-sd1");
    let sha = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), sha).unwrap();
    let snap = repo.join("snapshots").join(sha);
    copy_dir(&fixtures_dir().join("models/sd1"), &snap);

    let dir = resolve_model("test-org/tiny-sd1", None, &offline(tmp.path())).unwrap();
    assert_eq!(dir, snap);
    let sd = StableDiffusion::load(&dir, &LoadOptions::default()).unwrap();
    assert_eq!(sd.family, sd_pipeline::ModelFamily::Sd);

    // Not cached + offline: an error naming the cache folder and the variable, no network.
    let err = resolve_model("test-org/absent", None, &offline(tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("models--test-org--absent"),
        "{err}"
    );
}

#[test]
fn local_folders_win_and_bad_names_are_errors() {
    let dir = fixtures_dir().join("models/sd1");
    let cfg = offline(Path::new("/nonexistent-cache"));
    assert_eq!(
        resolve_model(dir.to_str().unwrap(), None, &cfg).unwrap(),
        dir
    );
    assert!(is_hub_id("stabilityai/stable-diffusion-xl-base-1.0"));
    assert!(!is_hub_id("./models/demo") && !is_hub_id("/abs/path") && !is_hub_id("a/b/c"));
    let err = resolve_model("./no/such/folder", None, &cfg)
        .unwrap_err()
        .to_string();
    assert!(err.contains("./no/such/folder"), "{err}");
}

#[test]
fn only_the_variant_files_are_selected() {
    let siblings: Vec<String> = [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder/model.fp16.safetensors",
        "text_encoder/pytorch_model.bin",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.bin",
    ]
    .map(String::from)
    .to_vec();
    let comps: Vec<String> = ["scheduler", "text_encoder", "tokenizer", "unet", "vae"]
        .map(String::from)
        .to_vec();
    let fp16 = needed_files(&siblings, &comps, Some("fp16"));
    assert!(fp16.contains(&"text_encoder/model.fp16.safetensors".to_string()));
    assert!(!fp16.contains(&"text_encoder/model.safetensors".to_string()));
    assert!(
        fp16.contains(&"unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors".to_string())
    );
    assert!(!fp16.contains(&"unet/diffusion_pytorch_model-00001-of-00002.safetensors".to_string()));
    assert!(
        fp16.contains(&"vae/diffusion_pytorch_model.safetensors".to_string()),
        "falls back without the variant"
    );
    assert!(
        !fp16.iter().any(|f| f.ends_with(".bin")),
        "never pickled files"
    );
    let plain = needed_files(&siblings, &comps, None);
    assert!(plain.contains(&"unet/diffusion_pytorch_model-00001-of-00002.safetensors".to_string()));
    assert!(!plain.iter().any(|f| f.contains("fp16")));
}
