//! Tokenizer and config inputs that used to panic (issue 16) are errors now.

mod common;

use common::{copy_without, model_dir};
use sd_clip::ClipTokenizer;

fn with_max_length(value: &str) -> tempfile::TempDir {
    let dir = copy_without(&model_dir("sd1", "tokenizer"), &[]);
    let cfg = dir.path().join("tokenizer_config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).expect("read")).expect("json");
    json["model_max_length"] = serde_json::from_str(value).expect("value");
    std::fs::write(&cfg, json.to_string()).expect("write");
    dir
}

/// `model_max_length` 2 left no room for content: the chunk length was 0 and
/// `encode_chunked` panicked in `chunks(0)`. It is refused when the folder is read.
/// A field name and how to break it.
type Edit = (&'static str, fn(&mut sd_clip::ClipTextConfig));

#[test]
fn model_max_length_below_three_is_refused() {
    for bad in ["2", "0", "-5", "2.5", "1e300"] {
        let dir = with_max_length(bad);
        let e = ClipTokenizer::from_folder(dir.path())
            .expect_err("no room for a content token")
            .to_string();
        assert!(
            e.contains("tokenizer_config.json")
                && e.contains("model_max_length")
                && e.contains("from 3"),
            "{bad}: {e}"
        );
    }
    // The smallest usable length: one content token per chunk.
    let dir = with_max_length("3");
    let tok = ClipTokenizer::from_folder(dir.path()).expect("3 tokens");
    assert_eq!(tok.chunk_len(), 1);
    let chunks = tok.encode_chunked("a red circle").expect("chunks");
    assert_eq!(chunks.len(), 3, "one chunk per content token");
    for c in &chunks {
        assert_eq!(c.ids.len(), 3);
        assert_eq!((c.ids[0], c.ids[2]), (tok.bos_id(), tok.eos_id()));
    }
    let t = tok.encode("a red circle").expect("encode");
    assert_eq!(t.dropped, 2);
}

/// A hand-built config with zero heads built a model that divided by zero at the first
/// forward; `ClipTextModel::new` validates the config now.
#[test]
fn hand_built_text_config_is_validated() {
    use candle_core::{DType, Device};
    use sd_clip::{ClipTextConfig, ClipTextModel};
    use sd_core::{Error, VarBuilder};

    let base = ClipTextConfig::read(&model_dir("sd1", "text_encoder").join("config.json"))
        .expect("fixture config");
    base.validate().expect("the fixture is valid");
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    let cases: [Edit; 4] = [
        ("ClipTextConfig.num_attention_heads", |c| c.num_heads = 0),
        ("ClipTextConfig.hidden_size", |c| c.hidden_size = 0),
        ("ClipTextConfig.vocab_size", |c| c.vocab_size = usize::MAX),
        ("ClipTextConfig.num_hidden_layers", |c| {
            c.num_layers = usize::MAX
        }),
    ];
    for (field, edit) in cases {
        let mut c = base.clone();
        edit(&mut c);
        match ClipTextModel::new(c, &vb) {
            Err(Error::InvalidArgument { name, .. }) => assert_eq!(name, field),
            Err(e) => panic!("{field}: expected InvalidArgument, got {e}"),
            Ok(_) => panic!("{field}: accepted"),
        }
    }
    ClipTextModel::new(base, &vb).expect("valid config builds");
}
