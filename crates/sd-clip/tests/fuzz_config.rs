//! Property tests of the text encoder's `config.json` and the tokenizer's
//! `tokenizer_config.json` (issue 16): fields set to wrong types, out-of-range values or removed
//! give a config error naming the file, or a config that validates and, when small, a model
//! that runs / a tokenizer whose sequences have `model_max_length` ids; never a panic.
//! `PROPTEST_CASES` sets the number of cases (see docs/reliability.md).

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::model_dir;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError};
use sd_clip::{ClipTextConfig, ClipTextConfigJson, ClipTextModel, ClipTokenizer};
use sd_core::testing::{edit_json, odd_json_values, proptest_cases, proptest_fixed_seed};
use sd_core::{Error, VarBuilder};

fn read(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).expect("read")).expect("json")
}

fn value() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        prop::sample::select(odd_json_values()),
        (0..100u64).prop_map(serde_json::Value::from),
        prop::sample::select(vec![
            serde_json::json!("gelu"),
            serde_json::json!("quick_gelu"),
            serde_json::json!(["CLIPTextModelWithProjection"]),
            serde_json::json!("<|endoftext|>"),
            serde_json::json!("!"),
            serde_json::json!({"content": "<|startoftext|>", "lstrip": true}),
            serde_json::json!({"content": 5}),
            serde_json::json!({"49407": {"content": "<|endoftext|>", "special": true}}),
        ]),
    ]
}

fn config(cases: u32) -> Config {
    let mut c = Config {
        cases: proptest_cases(cases),
        failure_persistence: None,
        ..Config::default()
    };
    if let Some(seed) = proptest_fixed_seed() {
        c.rng_seed = RngSeed::Fixed(seed);
    }
    c
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn text_encoder_configs_resolve_or_fail_cleanly(
        edits in prop::collection::vec(
            (
                prop::sample::select({
                    let p = model_dir("sd1", "text_encoder").join("config.json");
                    let mut k: Vec<String> = read(&p).as_object().expect("object").keys().cloned().collect();
                    k.push("architectures".into());
                    k
                }),
                prop::option::weighted(0.8, value()),
            ),
            1..4,
        ),
    ) {
        let base = read(&model_dir("sd1", "text_encoder").join("config.json"));
        let json = edit_json(&base, &edits).to_string();
        let path = Path::new("text_encoder/config.json");
        let parsed = sd_core::config::parse_json::<ClipTextConfigJson>(&json, path)
            .and_then(|j| ClipTextConfig::from_json(&j, path));
        let config = match parsed {
            Ok(c) => c,
            Err(Error::Config { path, reason, .. }) => {
                prop_assert!(path.ends_with("text_encoder/config.json"));
                prop_assert!(!reason.is_empty());
                return Ok(());
            }
            Err(e) => return Err(TestCaseError::fail(format!("not a config error: {e}"))),
        };
        prop_assert!(config.validate().is_ok());
        let small = config.hidden_size <= 64
            && config.intermediate_size <= 256
            && config.num_layers <= 4
            && config.vocab_size <= 50_000
            && config.projection_dim.unwrap_or(0) <= 64;
        if !small {
            return Ok(());
        }
        let model = ClipTextModel::new(config.clone(), &VarBuilder::zeros(DType::F32, &Device::Cpu))
            .map_err(|e| TestCaseError::fail(format!("a valid config builds: {e}")))?;
        let t = config.max_position_embeddings.min(5);
        let ids: Vec<u32> = (0..t as u32).map(|i| i % config.vocab_size as u32).collect();
        let ids = Tensor::new(ids, &Device::Cpu).expect("ids").unsqueeze(0).expect("batch");
        match model.forward(&ids) {
            Ok(out) => {
                prop_assert_eq!(out.last_hidden_state.dims(), &[1, t, config.hidden_size]);
                prop_assert_eq!(out.hidden_states.len(), config.num_layers + 1);
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}

proptest! {
    // Each case builds a BPE tokenizer from the real CLIP vocabulary (~0.1 s).
    #![proptest_config(config(24))]

    #[test]
    fn tokenizer_configs_load_or_fail_cleanly(
        edits in prop::collection::vec(
            (
                prop::sample::select(vec![
                    "model_max_length", "bos_token", "eos_token", "pad_token", "unk_token",
                    "added_tokens_decoder",
                ]).prop_map(String::from),
                prop::option::weighted(0.8, value()),
            ),
            1..3,
        ),
        prompt in "[a-z !,()\\[\\]:0-9]{0,200}",
    ) {
        let src = model_dir("sd1", "tokenizer");
        let dir = tempfile::tempdir().expect("tempdir");
        for f in ["vocab.json", "merges.txt", "special_tokens_map.json"] {
            std::os::unix::fs::symlink(src.join(f), dir.path().join(f)).expect("link");
        }
        let json = edit_json(&read(&src.join("tokenizer_config.json")), &edits).to_string();
        std::fs::write(dir.path().join("tokenizer_config.json"), json).expect("write");
        let tok = match ClipTokenizer::from_folder(dir.path()) {
            Ok(t) => t,
            Err(e) => {
                prop_assert!(e.to_string().contains("tokenizer"), "{}", e);
                return Ok(());
            }
        };
        let n = tok.model_max_length();
        prop_assert!(n >= 3);
        let t = tok.encode(&prompt).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(t.ids.len(), n);
        prop_assert_eq!(t.attention_mask.len(), n);
        let chunks = tok.encode_chunked(&prompt).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(!chunks.is_empty());
        let content: usize = chunks.iter().map(|c| c.attention_mask.iter().sum::<u32>() as usize - 2).sum();
        prop_assert_eq!(content, tok.tokenize(&prompt).expect("tokens").len());
    }
}
