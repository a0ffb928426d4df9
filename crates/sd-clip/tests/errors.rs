//! Errors name the file, the field or tensor, and what was expected; no prompt text panics.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::{copy_without, model_dir};
use sd_clip::{ClipTextModel, ClipTokenizer};
use sd_core::testing::load_tensors;
use sd_core::LoadOptions;

#[test]
fn missing_tokenizer_files() {
    let dir = copy_without(&model_dir("sd1", "tokenizer"), &["merges.txt"]);
    let e = ClipTokenizer::from_folder(dir.path())
        .expect_err("no merges")
        .to_string();
    assert!(e.contains("merges.txt") && e.contains("not found"), "{e}");

    let dir = copy_without(
        &model_dir("sd1", "tokenizer"),
        &["vocab.json", "merges.txt"],
    );
    let e = ClipTokenizer::from_folder(dir.path())
        .expect_err("empty")
        .to_string();
    assert!(
        e.contains("vocab.json") && e.contains("tokenizer.json"),
        "{e}"
    );

    let e = ClipTokenizer::from_folder(&model_dir("sd1", "no_such_tokenizer"))
        .expect_err("no folder")
        .to_string();
    assert!(e.contains("no_such_tokenizer"), "{e}");

    let dir = copy_without(&model_dir("sd2", "tokenizer"), &[]);
    std::fs::write(dir.path().join("tokenizer.json"), "{ not json").expect("write");
    let e = ClipTokenizer::from_folder(dir.path())
        .expect_err("corrupt")
        .to_string();
    assert!(e.contains("tokenizer.json"), "{e}");

    let dir = copy_without(&model_dir("sd1", "tokenizer"), &[]);
    let cfg = dir.path().join("tokenizer_config.json");
    std::fs::write(&cfg, r#"{"model_max_length": 1}"#).expect("write");
    let e = ClipTokenizer::from_folder(dir.path())
        .expect_err("too short")
        .to_string();
    assert!(
        e.contains("tokenizer_config.json") && e.contains("model_max_length"),
        "{e}"
    );
}

fn edited_config(
    family: &str,
    component: &str,
    key: &str,
    value: serde_json::Value,
) -> tempfile::TempDir {
    let dir = copy_without(&model_dir(family, component), &[]);
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    cfg[key] = value;
    std::fs::write(&path, cfg.to_string()).expect("write");
    dir
}

#[test]
fn config_errors_name_the_field() {
    let dir = edited_config("sd2", "text_encoder", "hidden_act", "swish".into());
    let e = ClipTextModel::load(dir.path(), &LoadOptions::default())
        .expect_err("unknown activation")
        .to_string();
    assert!(
        e.contains("config.json") && e.contains("hidden_act") && e.contains("swish"),
        "{e}"
    );
    assert!(
        e.contains("quick_gelu") && e.contains("gelu"),
        "says what is supported: {e}"
    );

    let dir = edited_config("sd1", "text_encoder", "num_attention_heads", 3.into());
    let e = ClipTextModel::load(dir.path(), &LoadOptions::default())
        .expect_err("heads")
        .to_string();
    assert!(e.contains("num_attention_heads"), "{e}");

    let dir = edited_config("sd1", "text_encoder", "hidden_size", "eight".into());
    let e = ClipTextModel::load(dir.path(), &LoadOptions::default())
        .expect_err("type")
        .to_string();
    assert!(e.contains("hidden_size"), "{e}");
}

#[test]
fn weight_errors_name_file_tensor_and_shape() {
    let dir = copy_without(
        &model_dir("sd1", "text_encoder"),
        &["model.fp16.safetensors"],
    );
    let file = dir.path().join("model.safetensors");
    let mut tensors: HashMap<String, Tensor> = load_tensors(&file).expect("weights");
    tensors
        .remove("encoder.layers.0.mlp.fc1.bias")
        .expect("present");
    tensors.insert(
        "final_layer_norm.weight".to_owned(),
        Tensor::zeros(9, DType::F32, &Device::Cpu).expect("zeros"),
    );
    candle_core::safetensors::save(&tensors, &file).expect("save");
    let e = ClipTextModel::load(dir.path(), &LoadOptions::default())
        .expect_err("broken weights")
        .to_string();
    assert!(e.contains("model.safetensors"), "names the file: {e}");
    assert!(
        e.contains("missing `encoder.layers.0.mlp.fc1.bias` (expected shape [32])"),
        "{e}"
    );
    assert!(
        e.contains("`final_layer_norm.weight` has shape [9], expected [8]"),
        "{e}"
    );

    let dir = copy_without(
        &model_dir("sd1", "text_encoder"),
        &["model.safetensors", "model.fp16.safetensors"],
    );
    let e = ClipTextModel::load(dir.path(), &LoadOptions::default())
        .expect_err("no weights")
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn bad_input_ids_are_errors() {
    let model = ClipTextModel::load(&model_dir("sd1", "text_encoder"), &LoadOptions::default())
        .expect("load");
    let too_long = Tensor::zeros((1, 78), DType::U32, &Device::Cpu).expect("ids");
    assert!(model.forward(&too_long).is_err());
    let out_of_vocab = Tensor::new(&[[49406u32, 49408, 49407]], &Device::Cpu).expect("ids");
    let e = model.forward(&out_of_vocab).expect_err("vocab").to_string();
    assert!(e.contains("49408"), "{e}");
    let flat = Tensor::new(&[1u32, 2, 3], &Device::Cpu).expect("ids");
    assert!(model.forward(&flat).is_err());
    let i64_ids = Tensor::new(&[[49406i64, 320, 49407]], &Device::Cpu).expect("ids");
    assert!(model.forward(&i64_ids).is_ok());
}

/// A deterministic stream of random strings over every kind of code point users might paste.
fn random_prompts(n: usize) -> Vec<String> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let ranges: [(u32, u32); 10] = [
        (0x00, 0x7f),        // ASCII with control characters
        (0x80, 0x2ff),       // Latin-1, extended Latin, modifiers
        (0x300, 0x36f),      // combining marks
        (0x370, 0x10ff),     // Greek .. Georgian
        (0x2000, 0x206f),    // general punctuation, zero-width, bidi controls
        (0x3000, 0x30ff),    // CJK symbols, kana
        (0x4e00, 0x9fff),    // CJK ideographs
        (0xe000, 0xf8ff),    // private use
        (0xfe00, 0xffff),    // variation selectors, specials, BOM, replacement
        (0x1f000, 0x10ffff), // emoji and the rest of the supplementary planes
    ];
    (0..n)
        .map(|i| {
            let len = (next() % if i.is_multiple_of(10) { 3000 } else { 60 }) as usize;
            (0..len)
                .filter_map(|_| {
                    let (lo, hi) = ranges[(next() % ranges.len() as u64) as usize];
                    char::from_u32(lo + (next() % u64::from(hi - lo + 1)) as u32)
                })
                .collect()
        })
        .collect()
}

#[test]
fn no_prompt_text_panics() {
    for (fam, comp) in [("sd1", "tokenizer"), ("sd2", "tokenizer")] {
        let tok = ClipTokenizer::from_folder(&model_dir(fam, comp)).expect("tokenizer");
        for p in random_prompts(300) {
            let t = tok.encode(&p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
            assert_eq!(t.ids.len(), 77);
            assert_eq!(t.ids[0], tok.bos_id());
            let chunks = tok.encode_chunked(&p).expect("chunks");
            let content: usize = chunks
                .iter()
                .map(|c| c.attention_mask.iter().filter(|&&m| m == 1).count() - 2)
                .sum();
            assert_eq!(content, tok.tokenize(&p).expect("tokenize").len());
        }
    }
}
