//! The real config.json files of SD 1.5, SD 2.1 (768-v), SDXL base 1.0 and the SDXL refiner 1.0
//! (tests/data) parse and build a model whose parameter names, shapes and count equal those of
//! diffusers' UNet2DConditionModel built from the same file in PyTorch
//! (tests/fixtures/refs/unet_params_*.txt, written by tools/fixtures/unet_refs.py), and whose
//! analytic FLOP count equals torch's FlopCounterMode.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use sd_core::testing::fixtures_dir;
use sd_core::VarBuilder;
use sd_unet::{flops::forward_flops, UNet2DConditionModel, UNetConfig};

const CONFIGS: [(&str, &str); 4] = [
    ("sd15", "sd15_unet_config.json"),
    ("sd21", "sd21_unet_config.json"),
    ("sdxl", "sdxl_base_unet_config.json"),
    ("refiner", "sdxl_refiner_unet_config.json"),
];

fn data(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(file)
}

struct Expected {
    params: BTreeMap<String, Vec<usize>>,
    total: u64,
    flops: u64,
    flop_shape: BTreeMap<String, usize>,
}

fn expected(name: &str) -> Expected {
    let path = fixtures_dir().join(format!("refs/unet_params_{name}.txt"));
    let text = std::fs::read_to_string(&path).unwrap();
    let mut e = Expected {
        params: BTreeMap::new(),
        total: 0,
        flops: 0,
        flop_shape: BTreeMap::new(),
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# total ") {
            e.total = rest.parse().unwrap();
        } else if let Some(rest) = line.strip_prefix("# flops ") {
            let parts: Vec<&str> = rest.split(' ').collect();
            for kv in &parts[..parts.len() - 1] {
                let (k, v) = kv.split_once('=').unwrap();
                e.flop_shape.insert(k.to_owned(), v.parse().unwrap());
            }
            e.flops = parts[parts.len() - 1].parse().unwrap();
        } else if !line.starts_with('#') {
            let (n, s) = line.split_once(' ').unwrap();
            let shape = s.split(',').map(|d| d.parse().unwrap()).collect();
            e.params.insert(n.to_owned(), shape);
        }
    }
    e
}

#[test]
fn real_configs_build_the_same_parameters_as_diffusers() {
    for (name, file) in CONFIGS {
        let config = UNetConfig::from_file(&data(file)).unwrap();
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let model = UNet2DConditionModel::from_config(config, &vb).unwrap();
        let mut got = BTreeMap::new();
        for (n, s) in vb.requested() {
            assert!(
                got.insert(n.clone(), s).is_none(),
                "{name}: `{n}` requested twice"
            );
        }
        let want = expected(name);
        let missing: Vec<_> = want
            .params
            .keys()
            .filter(|k| !got.contains_key(*k))
            .collect();
        let extra: Vec<_> = got
            .keys()
            .filter(|k| !want.params.contains_key(*k))
            .collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{name}: missing {missing:?}, not in diffusers {extra:?}"
        );
        for (n, s) in &want.params {
            assert_eq!(&got[n], s, "{name}: shape of `{n}`");
        }
        let total: u64 = got
            .values()
            .map(|s| s.iter().product::<usize>() as u64)
            .sum();
        assert_eq!(total, want.total, "{name}: parameter count");
        if name == "sd15" {
            assert_eq!(total, 859_520_964, "SD 1.5's UNet has ~859.5M parameters");
        }
        let fs = &want.flop_shape;
        let flops = forward_flops(
            model.config(),
            fs["batch"],
            fs["height"],
            fs["width"],
            fs["seq"],
        );
        assert_eq!(flops, want.flops, "{name}: FLOPs of one forward pass");
    }
}

#[test]
fn real_configs_resolve_heads_depths_and_added_embedding() {
    let sd15 = UNetConfig::from_file(&data("sd15_unet_config.json")).unwrap();
    // attention_head_dim: 8 is the number of heads when num_attention_heads is unset.
    let t = sd15.down_blocks[0].transformer.as_ref().unwrap();
    assert_eq!((t.num_heads, t.head_dim, t.depth), (8, 40, 1));
    assert!(!t.use_linear_projection && !t.upcast_attention);
    assert_eq!(sd15.upsampling_factor(), 8);
    assert_eq!(sd15.sample_size, Some((64, 64)));

    let sd21 = UNetConfig::from_file(&data("sd21_unet_config.json")).unwrap();
    let heads: Vec<_> = sd21
        .down_blocks
        .iter()
        .filter_map(|b| b.transformer.as_ref().map(|t| (t.num_heads, t.head_dim)))
        .collect();
    assert_eq!(heads, [(5, 64), (10, 64), (20, 64)]);
    let mid = &sd21.mid_block.as_ref().unwrap().transformer;
    assert_eq!((mid.num_heads, mid.head_dim), (20, 64));
    assert!(mid.upcast_attention && mid.use_linear_projection);

    let xl = UNetConfig::from_file(&data("sdxl_base_unet_config.json")).unwrap();
    let depths: Vec<_> = xl
        .down_blocks
        .iter()
        .map(|b| b.transformer.as_ref().map(|t| t.depth))
        .collect();
    assert_eq!(depths, [None, Some(2), Some(10)]);
    // The mid block takes the last depth; up blocks take the reversed list.
    assert_eq!(xl.mid_block.as_ref().unwrap().transformer.depth, 10);
    let up: Vec<_> = xl
        .up_blocks
        .iter()
        .map(|b| b.transformer.as_ref().map(|t| t.depth))
        .collect();
    assert_eq!(up, [Some(10), Some(2), None]);
    let tt = xl.text_time.as_ref().unwrap();
    assert_eq!(
        (
            tt.addition_time_embed_dim,
            tt.projection_class_embeddings_input_dim
        ),
        (256, 2816)
    );
    assert!(!xl.mid_block.as_ref().unwrap().transformer.upcast_attention);

    let refiner = UNetConfig::from_file(&data("sdxl_refiner_unet_config.json")).unwrap();
    assert_eq!(refiner.time_embed_dim, 1536);
    assert_eq!(
        refiner
            .text_time
            .as_ref()
            .unwrap()
            .projection_class_embeddings_input_dim,
        1280 + 5 * 256
    );
}
