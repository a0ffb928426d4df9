//! ClipTokenizer against transformers' CLIPTokenizer (refs/clip_tokenizer.safetensors, exported by
//! tools/fixtures/clip_refs.py for the prompts of tools/fixtures/clip_prompts.py).

mod common;

use candle_core::DType;
use common::{copy_without, get, model_dir, refs};
use sd_clip::ClipTokenizer;
use sd_core::testing::fixtures_dir;

fn prompts() -> Vec<String> {
    let p = fixtures_dir().join("refs/tokenizer_prompts.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p).expect("prompts file")).expect("json");
    v["prompts"]
        .as_array()
        .expect("prompts list")
        .iter()
        .map(|p| p.as_str().expect("string").to_owned())
        .collect()
}

/// Compares every prompt's ids, attention mask, dropped count, untruncated content and chunks
/// with the reference `name`; returns the mismatches.
fn check(tok: &ClipTokenizer, name: &str) -> Vec<String> {
    let r = refs("clip_tokenizer.safetensors");
    let ids: Vec<Vec<u32>> = get(&r, &format!("{name}.input_ids"), DType::U32)
        .to_vec2()
        .expect("ids");
    let mask: Vec<Vec<u8>> = get(&r, &format!("{name}.attention_mask"), DType::U8)
        .to_vec2()
        .expect("mask");
    let full_ids: Vec<u32> = get(&r, &format!("{name}.full_ids"), DType::U32)
        .to_vec1()
        .expect("full ids");
    let full_len: Vec<u32> = get(&r, &format!("{name}.full_len"), DType::U32)
        .to_vec1()
        .expect("full len");
    let ps = prompts();
    assert_eq!(ps.len(), ids.len(), "prompt count");
    assert!(ps.len() >= 200, "at least 200 prompts");
    let mut bad = Vec::new();
    let mut offset = 0;
    for (i, p) in ps.iter().enumerate() {
        let n = full_len[i] as usize;
        let full = &full_ids[offset..offset + n];
        offset += n;
        let t = tok.encode(p).expect("encode");
        let m: Vec<u32> = mask[i].iter().map(|&v| v as u32).collect();
        if t.ids != ids[i] || t.attention_mask != m {
            bad.push(format!(
                "{name} prompt {i} {p:?}:\n  got  {:?}\n  want {:?}",
                t.ids, ids[i]
            ));
            continue;
        }
        let content = &full[1..n - 1];
        if t.dropped != n.saturating_sub(tok.model_max_length()) {
            bad.push(format!(
                "{name} prompt {i}: dropped {} for {n} ids",
                t.dropped
            ));
        }
        if tok.tokenize(p).expect("tokenize") != content {
            bad.push(format!("{name} prompt {i}: untruncated content differs"));
        }
        let chunks = tok.encode_chunked(p).expect("chunks");
        let joined: Vec<u32> = chunks
            .iter()
            .flat_map(|c| {
                let used = c.attention_mask.iter().filter(|&&m| m == 1).count();
                c.ids[1..used - 1].to_vec()
            })
            .collect();
        let shapes_ok = chunks.iter().all(|c| {
            c.ids.len() == 77
                && c.ids[0] == tok.bos_id()
                && c.dropped == 0
                && c.ids.contains(&tok.eos_id())
        });
        if joined != content || !shapes_ok || chunks.len() != content.len().div_ceil(75).max(1) {
            bad.push(format!("{name} prompt {i}: chunked encoding differs"));
        }
    }
    assert_eq!(offset, full_ids.len());
    bad
}

fn assert_matches(folder: &std::path::Path, name: &str) {
    let tok = ClipTokenizer::from_folder(folder).expect("tokenizer loads");
    assert_eq!(tok.model_max_length(), 77);
    let bad = check(&tok, name);
    assert!(
        bad.is_empty(),
        "{} of the prompts differ from transformers for {}:\n{}",
        bad.len(),
        folder.display(),
        bad.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn sd1_tokenizer_vocab_merges_pads_with_eos() {
    assert_matches(&model_dir("sd1", "tokenizer"), "sd1_tokenizer");
    // byte-identical folder (the exporter checks transformers gives the same ids)
    assert_matches(&model_dir("sdxl", "tokenizer"), "sd1_tokenizer");
}

#[test]
fn sd2_tokenizer_json_pads_with_bang() {
    assert_matches(&model_dir("sd2", "tokenizer"), "sd2_tokenizer");
    assert_matches(&model_dir("sdxl", "tokenizer_2"), "sd2_tokenizer");
    assert_matches(&model_dir("refiner", "tokenizer_2"), "sd2_tokenizer");
}

#[test]
fn sd2_tokenizer_without_tokenizer_json() {
    let dir = copy_without(&model_dir("sd2", "tokenizer"), &["tokenizer.json"]);
    assert_matches(dir.path(), "sd2_vocab_merges_only");
}
