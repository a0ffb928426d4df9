//! AUTOMATIC1111 conditioning (`PromptEncoder::encode_a1111`): chunking as A1111's
//! `tokenize_line`, the "Original" emphasis computed independently here in f64 from the plain
//! encoding, and exact equality with `encode` for prompts without special syntax.

use candle_core::{IndexOp, Tensor};
use sd_clip::{tokenize_line, ClipTokenizer, PromptEncoder, PromptSyntax};
use sd_core::testing::fixtures_dir;
use sd_core::LoadOptions;

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

fn tokenizer(name: &str, folder: &str) -> ClipTokenizer {
    ClipTokenizer::from_folder(&fixtures_dir().join("models").join(name).join(folder))
        .expect("tokenizer")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff")
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn plain_prompts_give_exactly_plain_conditioning() {
    let prompts = strings(&[
        "a photograph of an astronaut riding a horse!!",
        "a red circle, on a white background",
        "",
    ]);
    for fam in ["sd1", "sd2", "sdxl", "refiner"] {
        let enc = family(fam);
        for skip in [None, Some(1)] {
            let plain = enc.encode(&prompts, skip).expect("plain");
            let a = enc
                .encode_with_syntax(&prompts, skip, PromptSyntax::A1111)
                .expect("a1111");
            assert_eq!(
                max_abs_diff(&a.hidden, &plain.hidden),
                0.0,
                "{fam} {skip:?}"
            );
            match (&a.pooled, &plain.pooled) {
                (Some(x), Some(y)) => assert_eq!(max_abs_diff(x, y), 0.0, "{fam} pooled"),
                (None, None) => {}
                _ => panic!("{fam}: pooled differs in presence"),
            }
        }
    }
}

/// A1111's EmphasisOriginal on one encoder's hidden states, in f64: `z * w`, times
/// `mean(z) / mean(z * w)` (mean over tokens and channels).
fn emphasis_reference(z: &[Vec<f32>], w: &[f32]) -> Vec<Vec<f64>> {
    let n = (z.len() * z[0].len()) as f64;
    let m0: f64 = z.iter().flatten().map(|&x| x as f64).sum::<f64>() / n;
    let zw: Vec<Vec<f64>> = z
        .iter()
        .zip(w)
        .map(|(row, &wt)| row.iter().map(|&x| x as f64 * wt as f64).collect())
        .collect();
    let m1: f64 = zw.iter().flatten().sum::<f64>() / n;
    zw.into_iter()
        .map(|row| row.into_iter().map(|x| x * m0 / m1).collect())
        .collect()
}

#[test]
fn weights_scale_hidden_states_and_restore_the_mean() {
    let weighted = "a (red:1.5) circle on a [white] ((background))";
    let plain = "a red circle on a white background";
    for fam in ["sd1", "sd2", "sdxl"] {
        let enc = family(fam);
        let chunks = tokenize_line(&tokenizer(fam, "tokenizer"), weighted).expect("chunks");
        assert_eq!(chunks.len(), 1);
        let w = &chunks[0].multipliers;
        // bos, a, red, circle, on, a, white, background, eos...
        assert_eq!(
            &w[..9],
            &[1.0, 1.0, 1.5, 1.0, 1.0, 1.0, (1.0 / 1.1) as f32, 1.21, 1.0]
        );
        let z = enc.encode(&strings(&[plain]), None).expect("plain").hidden;
        let got = enc
            .encode_a1111(&strings(&[weighted]), None)
            .expect("a1111");
        let z = z.i(0).expect("row").to_vec2::<f32>().expect("vec");
        let got_v = got.hidden.i(0).expect("row").to_vec2::<f32>().expect("vec");
        // SDXL: emphasis per encoder (the CLIP-L channels, then the OpenCLIP ones)
        let splits: Vec<std::ops::Range<usize>> = match &enc {
            PromptEncoder::Sdxl { text_encoder, .. } => {
                let d1 = text_encoder.config().hidden_size;
                vec![0..d1, d1..z[0].len()]
            }
            _ => std::iter::once(0..z[0].len()).collect(),
        };
        let mut max_err = 0f64;
        let mut max_val = 0f64;
        for r in splits {
            let part: Vec<Vec<f32>> = z.iter().map(|row| row[r.clone()].to_vec()).collect();
            let want = emphasis_reference(&part, w);
            for (t, row) in want.iter().enumerate() {
                for (c, &x) in row.iter().enumerate() {
                    max_err = max_err.max((got_v[t][r.start + c] as f64 - x).abs());
                    max_val = max_val.max(x.abs());
                }
            }
            // the weighted part's mean equals the unweighted one's (per encoder)
            let mean_got: f64 = got_v
                .iter()
                .flat_map(|row| row[r.clone()].iter().map(|&x| x as f64))
                .sum::<f64>();
            let mean_plain: f64 = part.iter().flatten().map(|&x| x as f64).sum::<f64>();
            let n = (part.len() * part[0].len()) as f64;
            assert!(
                (mean_got / n - mean_plain / n).abs() < 1e-5,
                "{fam}: mean {} vs {}",
                mean_got / n,
                mean_plain / n
            );
        }
        println!("{fam}: emphasis max abs error {max_err:.2e} (values up to {max_val:.2})");
        // measured: 2.9e-7 (sd1, values up to 2.2), 1.3e-7 (sd2, 2.7), 5.7e-7 (sdxl, 6.2): f32
        // products and means against f64; tolerance ~10x the worst
        assert!(max_err < 5e-6, "{fam}: {max_err}");
        // the weighted tokens really changed
        assert!(
            max_abs_diff(
                &got.hidden,
                &enc.encode(&strings(&[plain]), None).expect("p").hidden
            ) > 1e-2
        );
    }
}

#[test]
fn chunks_back_off_to_the_last_comma() {
    let tok = tokenizer("sd1", "tokenizer");
    let id = |w: &str| tok.tokenize(w).expect("tokenize")[0];
    let (cat, dog, comma) = (id("cat"), id("dog"), id(","));
    let (bos, eos) = (tok.bos_id(), tok.eos_id());
    let chunk = |content: Vec<u32>| -> Vec<u32> {
        let mut v = vec![bos];
        v.extend(&content);
        v.resize(76, eos);
        v.push(eos);
        v
    };
    // the comma 15 tokens back from the end of a full chunk: the tail moves on
    let p = format!("{}, {}", "cat ".repeat(60), "dog ".repeat(20));
    let c = tokenize_line(&tok, &p).expect("chunks");
    let mut first = vec![cat; 60];
    first.push(comma);
    assert_eq!(c.len(), 2);
    assert_eq!(c[0].ids, chunk(first));
    assert_eq!(c[1].ids, chunk(vec![dog; 20]));
    // 25 tokens back: beyond the backtrack of 20, cut at 75 tokens
    let p = format!("{}, {}", "cat ".repeat(50), "dog ".repeat(30));
    let c = tokenize_line(&tok, &p).expect("chunks");
    let mut first = vec![cat; 50];
    first.push(comma);
    first.extend(vec![dog; 24]);
    assert_eq!(c[0].ids, chunk(first));
    assert_eq!(c[1].ids, chunk(vec![dog; 6]));
    // BREAK starts a new chunk, even from an empty one
    let c = tokenize_line(&tok, "cat BREAK dog").expect("chunks");
    assert_eq!(
        c.iter().map(|c| c.ids.clone()).collect::<Vec<_>>(),
        vec![chunk(vec![cat]), chunk(vec![dog])]
    );
    let c = tokenize_line(&tok, "BREAK dog").expect("chunks");
    assert_eq!(c[0].ids, chunk(vec![]));
    assert_eq!(c.len(), 2);
    assert_eq!(tokenize_line(&tok, "").expect("chunks").len(), 1);
    // OpenCLIP tokenizers: pad ids after the first eos
    let tok2 = tokenizer("sd2", "tokenizer");
    let c = tokenize_line(&tok2, "cat").expect("chunks");
    assert_eq!(c[0].ids[2], tok2.eos_id());
    assert!(c[0].ids[3..].iter().all(|&i| i == tok2.pad_id()));
    assert_eq!(c[0].ids, tok2.encode("cat").expect("encode").ids);
}

#[test]
fn chunks_are_padded_and_pooled_from_the_first() {
    for fam in ["sd1", "sdxl"] {
        let enc = family(fam);
        let long = "cat ".repeat(100);
        let c = enc
            .encode_a1111(&strings(&[&long, "dog"]), None)
            .expect("a1111");
        let d = c.hidden.dim(2).expect("dim");
        assert_eq!(c.hidden.dims(), &[2, 154, d]);
        let first = enc
            .encode(&strings(&[&"cat ".repeat(75)]), None)
            .expect("plain");
        let chunk0 = c.hidden.i((0..1, 0..77)).expect("chunk");
        assert_eq!(max_abs_diff(&chunk0, &first.hidden), 0.0, "{fam}");
        let rest = enc
            .encode(&strings(&["cat ".repeat(25).as_str()]), None)
            .expect("p");
        let chunk1 = c.hidden.i((0..1, 77..154)).expect("chunk");
        assert_eq!(max_abs_diff(&chunk1, &rest.hidden), 0.0, "{fam}");
        // the shorter prompt is padded with the empty prompt's encoding
        let empty = enc.encode(&strings(&[""]), None).expect("empty");
        let pad = c.hidden.i((1..2, 77..154)).expect("chunk");
        assert_eq!(max_abs_diff(&pad, &empty.hidden), 0.0, "{fam}");
        if let Some(p) = &c.pooled {
            let want = first.pooled.as_ref().expect("pooled");
            assert_eq!(max_abs_diff(&p.i(0..1).expect("row"), want), 0.0);
        }
    }
}
