//! PromptEncoder against diffusers' encode_prompt (refs/clip_encode_prompt.safetensors, exported
//! by tools/fixtures/clip_refs.py with each fixture pipeline, no classifier-free guidance).

mod common;

use std::sync::Arc;

use candle_core::{DType, Tensor};
use common::{get, refs};
use sd_clip::{ClipTextModel, ClipTokenizer, PromptEncoder};
use sd_core::testing::{assert_close, compare, fixtures_dir};
use sd_core::LoadOptions;

/// tools/fixtures/clip_refs.py ENCODE_PROMPTS (the second is longer than 77 tokens).
fn prompts() -> Vec<String> {
    vec![
        "a photograph of an astronaut riding a horse!!".to_owned(),
        "a red circle on a white background, ".repeat(12),
    ]
}

fn family(name: &str) -> PromptEncoder {
    let dir = fixtures_dir().join("models").join(name);
    let opts = LoadOptions::default();
    match name {
        "sd1" | "sd2" => PromptEncoder::load_sd(&dir, &opts),
        "sdxl" => PromptEncoder::load_sdxl(&dir, &opts),
        _ => PromptEncoder::load_refiner(&dir, &opts),
    }
    .unwrap_or_else(|e| panic!("{name}: {e}"))
}

// measured max abs error over all families and clip_skip values: 3.9e-6 (sd2; values up to ~5)
const ATOL: f64 = 1e-5;
const RTOL: f64 = 1e-5;

fn close(actual: &Tensor, name: &str) -> f64 {
    let r = refs("clip_encode_prompt.safetensors");
    let want = get(&r, name, DType::F32);
    let (abs, _) = compare(actual, &want, ATOL, RTOL).expect("shape");
    assert_close(actual, &want, ATOL, RTOL, name);
    abs
}

#[test]
fn encode_matches_diffusers_encode_prompt() {
    for fam in ["sd1", "sd2", "sdxl", "refiner"] {
        let enc = family(fam);
        for (skip, key) in [(None, "none"), (Some(1), "1")] {
            let c = enc.encode(&prompts(), skip).expect("encode");
            let e = close(&c.hidden, &format!("{fam}.clip_skip_{key}.prompt_embeds"));
            let mut msg = format!("{fam} clip_skip {key}: prompt_embeds {e:.2e}");
            if fam == "sdxl" || fam == "refiner" {
                let pooled = c.pooled.as_ref().expect("pooled for SDXL");
                let e = close(
                    pooled,
                    &format!("{fam}.clip_skip_{key}.pooled_prompt_embeds"),
                );
                msg += &format!(", pooled {e:.2e}");
            } else {
                assert!(c.pooled.is_none());
            }
            println!("{msg}");
            assert_eq!(c.dropped_tokens[0], 0);
            assert!(c.dropped_tokens[1] > 0, "the long prompt is truncated");
        }
    }
}

#[test]
fn sdxl_prompt_2_and_negative() {
    let enc = family("sdxl");
    let p2 = vec!["an oil painting".to_owned(), "a cat!".to_owned()];
    let c = enc
        .encode_pair(&prompts(), Some(&p2), None)
        .expect("encode");
    close(&c.hidden, "sdxl.prompt_2.prompt_embeds");
    close(
        c.pooled.as_ref().expect("pooled"),
        "sdxl.prompt_2.pooled_prompt_embeds",
    );
    // diffusers encodes the negative prompt without clip_skip even when it is set
    let neg = vec!["blurry".to_owned(), "ugly, low quality".to_owned()];
    let c = enc.encode(&neg, None).expect("negative");
    close(&c.hidden, "sdxl.negative.negative_prompt_embeds");
    close(
        c.pooled.as_ref().expect("pooled"),
        "sdxl.negative.negative_pooled_prompt_embeds",
    );
}

#[test]
fn refiner_shares_the_base_text_encoder_2() {
    let dir = fixtures_dir().join("models/sdxl");
    let opts = LoadOptions::default();
    let t2 = Arc::new(ClipTokenizer::from_folder(&dir.join("tokenizer_2")).expect("tok"));
    let e2 = Arc::new(ClipTextModel::load(&dir.join("text_encoder_2"), &opts).expect("enc"));
    let t1 = Arc::new(ClipTokenizer::from_folder(&dir.join("tokenizer")).expect("tok"));
    let e1 = Arc::new(ClipTextModel::load(&dir.join("text_encoder"), &opts).expect("enc"));
    let base = PromptEncoder::sdxl(t1, e1.clone(), t2.clone(), e2.clone()).expect("base");
    let refiner = PromptEncoder::refiner(t2, e2.clone()).expect("refiner");
    assert_eq!(Arc::strong_count(&e2), 3);
    let c = refiner.encode(&prompts(), None).expect("encode");
    // the refiner fixture's text_encoder_2 is byte-identical to the base's
    close(&c.hidden, "refiner.clip_skip_none.prompt_embeds");
    assert!(base.encode(&prompts(), None).is_ok());
    // SDXL needs a projection on its second encoder
    let t1 = Arc::new(ClipTokenizer::from_folder(&dir.join("tokenizer")).expect("tok"));
    assert!(PromptEncoder::refiner(t1, e1).is_err());
}

#[test]
fn clip_skip_out_of_range_is_an_error() {
    // sd1's fixture encoder has 2 layers: clip_skip 2 reads the embeddings, 3 does not exist
    let enc = family("sd1");
    assert!(enc.encode(&prompts(), Some(2)).is_ok());
    let e = enc
        .encode(&prompts(), Some(3))
        .expect_err("too deep")
        .to_string();
    assert!(e.contains("clip_skip") && e.contains("at most 2"), "{e}");
    // sdxl's have 3 layers: hidden_states[-(k + 2)] exists up to k = 2
    let enc = family("sdxl");
    assert!(enc.encode(&prompts(), Some(2)).is_ok());
    let e = enc
        .encode(&prompts(), Some(3))
        .expect_err("too deep")
        .to_string();
    assert!(e.contains("at most 2"), "{e}");
    assert!(enc.encode(&[], None).is_err());
}

#[test]
fn long_prompts_are_encoded_in_chunks() {
    for fam in ["sd1", "sdxl"] {
        let enc = family(fam);
        let short = vec!["a cat".to_owned(), "a dog on a sofa".to_owned()];
        // a prompt that fits gives exactly encode()'s result
        let a = enc.encode(&short, None).expect("encode");
        let b = enc.encode_long(&short, None).expect("long");
        assert_close(&b.hidden, &a.hidden, 0.0, 0.0, "one chunk");
        // a 160-token prompt: three chunks; the batch partner is padded with empty chunks
        let long = vec![" cat".repeat(160), "a dog".to_owned()];
        let c = enc.encode_long(&long, None).expect("long");
        let (b_, t, _) = c.hidden.dims3().expect("3d");
        assert_eq!((b_, t), (2, 3 * 77));
        assert_eq!(c.dropped_tokens, vec![0, 0]);
        // chunk 1 of the long prompt is 75 more "cat" tokens
        let mid = enc
            .encode(&[" cat".repeat(75)], None)
            .expect("encode")
            .hidden;
        let got = c
            .hidden
            .narrow(0, 0, 1)
            .and_then(|h| h.narrow(1, 77, 77))
            .expect("slice");
        assert_close(&got, &mid, 0.0, 0.0, "middle chunk");
        // the short partner's extra chunks are the empty prompt
        let empty = enc.encode(&[String::new()], None).expect("encode").hidden;
        let got = c
            .hidden
            .narrow(0, 1, 1)
            .and_then(|h| h.narrow(1, 154, 77))
            .expect("slice");
        assert_close(&got, &empty, 0.0, 0.0, "padding chunk");
    }
}
