//! A UNet stored as sharded safetensors (`diffusion_pytorch_model-0000N-of-00002.safetensors`
//! plus `diffusion_pytorch_model.safetensors.index.json`, as diffusers' `save_pretrained` writes
//! large models) loads to exactly the same model as the single file.

use candle_core::{DType, Device, Tensor};
use sd_core::testing::{compare, fixtures_dir};
use sd_core::LoadOptions;
use sd_unet::UNet2DConditionModel;

#[test]
fn sharded_weights_load_like_the_single_file() {
    let src = fixtures_dir().join("models/sd1/unet");
    let bytes = std::fs::read(src.join("diffusion_pytorch_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_owned).collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);

    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [first, second].iter().enumerate() {
        let file = format!("diffusion_pytorch_model-0000{}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> = part
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        let data = safetensors::serialize(views, None).unwrap();
        std::fs::write(dir.path().join(&file), data).unwrap();
        for n in part.iter() {
            weight_map.insert(n.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": weight_map });
    std::fs::write(
        dir.path()
            .join("diffusion_pytorch_model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    let opts = LoadOptions::default();
    let single = UNet2DConditionModel::load(&src, &opts).unwrap();
    let sharded = UNet2DConditionModel::load(dir.path(), &opts).unwrap();
    let dev = Device::Cpu;
    let sample = Tensor::arange(0f32, 256.0, &dev)
        .unwrap()
        .reshape((1, 4, 8, 8))
        .unwrap()
        .affine(1.0 / 128.0, -1.0)
        .unwrap();
    let ehs = Tensor::ones((1, 5, 8), DType::F32, &dev).unwrap();
    let a = single.forward(&sample, 500.0, &ehs, None).unwrap();
    let b = sharded.forward(&sample, 500.0, &ehs, None).unwrap();
    let (max_abs, _) = compare(&a, &b, 0.0, 0.0).unwrap();
    assert_eq!(
        max_abs, 0.0,
        "same weights, same computation: identical outputs"
    );
}
