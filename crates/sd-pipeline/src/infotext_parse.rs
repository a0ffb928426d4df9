//! Reading an infotext back (`sd pnginfo`, `--from-png`, `/sdapi/v1/png-info`), as AUTOMATIC1111's
//! `parse_generation_parameters`: the prompt lines, `Negative prompt:` lines, then the last line
//! of `Key: value` pairs (values may be quoted); `Size: WxH` also gives `Size-1` and `Size-2`.

use serde_json::{Map, Value};

/// The fields of an infotext, as AUTOMATIC1111's PNG Info returns them (every value a string,
/// except `Size-1`/`Size-2` which are numbers).
pub fn parse_infotext(text: &str) -> Map<String, Value> {
    let mut out = Map::new();
    let mut lines: Vec<&str> = text.trim().lines().collect();
    let last = match lines.last() {
        Some(l) if l.matches(": ").count() >= 3 || l.starts_with("Steps: ") => {
            let l = *l;
            lines.pop();
            l
        }
        _ => "",
    };
    let (mut prompt, mut negative, mut in_negative) = (Vec::new(), Vec::new(), false);
    for line in lines {
        if let Some(rest) = line.strip_prefix("Negative prompt:") {
            in_negative = true;
            negative.push(rest.trim_start());
        } else if in_negative {
            negative.push(line);
        } else {
            prompt.push(line);
        }
    }
    out.insert("Prompt".into(), Value::String(prompt.join("\n")));
    out.insert("Negative prompt".into(), Value::String(negative.join("\n")));
    for (k, v) in pairs(last) {
        if k == "Size" {
            if let Some((w, h)) = v.split_once('x') {
                if let (Ok(w), Ok(h)) = (w.trim().parse::<u64>(), h.trim().parse::<u64>()) {
                    out.insert("Size-1".into(), Value::from(w));
                    out.insert("Size-2".into(), Value::from(h));
                }
            }
        }
        out.insert(k, Value::String(v));
    }
    out
}

/// `Key: value, Key: "quoted, value", ...`.
fn pairs(line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once(": ") else {
            break;
        };
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            // quoted: up to the closing quote not preceded by a backslash
            let mut end = None;
            let mut escaped = false;
            for (i, c) in q.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => {
                        end = Some(i);
                        break;
                    }
                    _ => escaped = false,
                }
            }
            match end {
                // A1111 writes quoted values with json.dumps and reads them with json.loads
                Some(e) => (
                    serde_json::from_str::<String>(&format!("\"{}\"", &q[..e]))
                        .unwrap_or_else(|_| q[..e].replace("\\\"", "\"")),
                    &q[e + 1..],
                ),
                None => (q.to_owned(), ""),
            }
        } else {
            match after.split_once(", ") {
                Some((v, n)) => (v.to_owned(), n),
                None => (after.to_owned(), ""),
            }
        };
        out.push((key.trim().to_owned(), value.trim().to_owned()));
        rest = next.trim_start_matches(',').trim();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_what_the_cli_writes() {
        let t = "a (red:1.2) circle\nsecond line\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, Seed: 7, Size: 64x32, Model: demo, Lora hashes: \"a: 1, b: 2\"";
        let m = parse_infotext(t);
        assert_eq!(m["Prompt"], "a (red:1.2) circle\nsecond line");
        assert_eq!(m["Negative prompt"], "blurry");
        assert_eq!(m["Steps"], "20");
        assert_eq!(m["Sampler"], "DPM++ 2M");
        assert_eq!(m["Schedule type"], "Karras");
        assert_eq!(m["Size-1"], 64);
        assert_eq!(m["Size-2"], 32);
        assert_eq!(m["Lora hashes"], "a: 1, b: 2");
        assert_eq!(m["Model"], "demo");
    }

    /// What AUTOMATIC1111 v1.10 writes for a hires-fix run with a LoRA and an embedding (written
    /// by hand after its `create_infotext`): fields sd-rs does not use are read all the same.
    #[test]
    fn reads_an_a1111_infotext() {
        let t =
            "masterpiece, best quality, (1girl:1.2), <lora:add_detail:0.6>, looking at viewer\n\
                 BREAK city background, [day:night:0.5]\n\
                 Negative prompt: (worst quality, low quality:1.4), easynegative\n\
                 Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, \
                 Seed: 1234567890, Size: 512x768, Model hash: 6ce0161689, \
                 Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, \
                 VAE: vae-ft-mse-840000-ema-pruned.safetensors, Denoising strength: 0.45, \
                 Clip skip: 2, Hires upscale: 2, Hires steps: 15, \
                 Hires upscaler: R-ESRGAN 4x+ Anime6B, \
                 Lora hashes: \"add_detail: 7c6bad76eb54\", \
                 TI hashes: \"easynegative: c74b4e810b03\", Emphasis: Original, \
                 Hires prompt: \"a \\\"quoted\\\" word,\\nnew line\", Version: v1.10.1";
        let m = parse_infotext(t);
        assert_eq!(
            m["Prompt"],
            "masterpiece, best quality, (1girl:1.2), <lora:add_detail:0.6>, looking at viewer\n\
             BREAK city background, [day:night:0.5]"
        );
        assert_eq!(
            m["Negative prompt"],
            "(worst quality, low quality:1.4), easynegative"
        );
        for (k, v) in [
            ("Steps", "28"),
            ("Sampler", "DPM++ 2M"),
            ("Schedule type", "Karras"),
            ("CFG scale", "6.5"),
            ("Seed", "1234567890"),
            ("Size", "512x768"),
            ("Model hash", "6ce0161689"),
            ("Model", "v1-5-pruned-emaonly"),
            ("Denoising strength", "0.45"),
            ("Clip skip", "2"),
            ("Hires upscaler", "R-ESRGAN 4x+ Anime6B"),
            ("Lora hashes", "add_detail: 7c6bad76eb54"),
            ("TI hashes", "easynegative: c74b4e810b03"),
            ("Hires prompt", "a \"quoted\" word,\nnew line"),
            ("Version", "v1.10.1"),
        ] {
            assert_eq!(m[k], v, "{k}");
        }
        assert_eq!(m["Size-1"], 512);
        assert_eq!(m["Size-2"], 768);
    }

    #[test]
    fn reads_back_what_infotext_writes() {
        use crate::{Infotext, SchedulerKind};
        let mut i = Infotext::new(
            "a, b: c",
            SchedulerKind::DpmSolverMultistep { karras: true },
            20,
            7.5,
            42,
            (64, 32),
            "m",
        );
        i.negative_prompt = "blurry".into();
        i.clip_skip = Some(2);
        i.lora_hashes = Some("x: 0123456789ab, y: ba9876543210".into());
        let m = parse_infotext(&i.to_string());
        assert_eq!(m["Prompt"], "a, b: c");
        assert_eq!(m["Negative prompt"], "blurry");
        assert_eq!(m["Sampler"], "DPM++ 2M");
        assert_eq!(m["Schedule type"], "Karras");
        assert_eq!(m["CFG scale"], "7.5");
        assert_eq!(m["Clip skip"], "2");
        assert_eq!(m["Lora hashes"], "x: 0123456789ab, y: ba9876543210");
    }

    #[test]
    fn writes_a1111s_optional_fields_only_when_they_apply() {
        use crate::{Infotext, SchedulerKind};
        let mut i = Infotext::new("p", SchedulerKind::Euler, 4, 7.0, 1, (64, 64), "C:\\m.ckpt");
        let plain = i.to_string();
        // No negative prompt: no `Negative prompt:` line (A1111 omits it).
        assert!(
            plain.starts_with("p\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64")
        );
        assert!(!plain.contains("Negative prompt") && !plain.contains("Batch"));
        assert!(plain.ends_with(&format!(", Version: sd-rs {}", env!("CARGO_PKG_VERSION"))));
        i.model_hash = Some("6ce0161689".into());
        i.batch = Some((3, 2));
        i.denoising_strength = Some(0.6);
        i.ti_hashes = Some("bad-hands: 0123456789ab".into());
        let text = i.to_string();
        assert!(text.contains(
            "Size: 64x64, Model hash: 6ce0161689, Model: \"C:\\\\m.ckpt\", Batch size: 3, \
             Batch pos: 2, Denoising strength: 0.6"
        ));
        let m = parse_infotext(&text);
        assert_eq!(m["Model"], "C:\\m.ckpt");
        assert_eq!(m["Batch pos"], "2");
        assert_eq!(m["TI hashes"], "bad-hands: 0123456789ab");
        assert_eq!(m["Version"], format!("sd-rs {}", env!("CARGO_PKG_VERSION")));
        // A batch of one writes no batch fields.
        i.batch = Some((1, 0));
        assert!(!i.to_string().contains("Batch"));
    }
}
