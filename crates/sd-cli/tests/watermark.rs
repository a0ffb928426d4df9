//! `sd watermark FILE` and `--no-watermark`: SDXL's invisible watermark read back from PNGs that
//! diffusers' watermarker and `sd txt2img` wrote, and absent where it must be.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn sd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sd"))
        .args(args)
        .output()
        .expect("sd runs")
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A tensor of refs/watermark.safetensors as bytes (u8 tensors) or f32 values.
fn reference(key: &str) -> (Vec<u8>, Vec<f32>, Vec<usize>) {
    let bytes = std::fs::read(root().join("tests/fixtures/refs/watermark.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(key).unwrap();
    let shape = t.shape().to_vec();
    match t.dtype() {
        safetensors::Dtype::U8 => (t.data().to_vec(), vec![], shape),
        _ => {
            let f = t
                .data()
                .chunks(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (vec![], f, shape)
        }
    }
}

fn write_png(path: &Path, rgb: &[u8], w: u32, h: u32) {
    let file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut enc = png::Encoder::new(file, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header().unwrap().write_image_data(rgb).unwrap();
}

/// [1, 3, H, W] in [-1, 1] to RGB bytes, as diffusers' postprocess + numpy_to_pil.
fn to_rgb(x: &[f32], h: usize, w: usize) -> Vec<u8> {
    let mut out = vec![0u8; 3 * h * w];
    for c in 0..3 {
        for k in 0..h * w {
            let v = ((x[c * h * w + k] / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round_ties_even();
            out[3 * k + c] = v as u8;
        }
    }
    out
}

const SDXL_HEX: &str = "b3ec907bb19e";

#[test]
fn reads_the_mark_diffusers_put_and_not_one_that_is_absent() {
    let dir = tempfile::tempdir().unwrap();
    // diffusers' watermarker output as a PNG (imwatermark reads 42 of 48 bits from it)
    let (marked, _, shape) = reference("noise_256x256.u8");
    let marked_png = dir.path().join("marked.png");
    write_png(&marked_png, &marked, shape[1] as u32, shape[0] as u32);
    let o = sd(&["watermark", marked_png.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    let text = stdout(&o);
    assert!(text.contains("sdxl watermark: yes"), "{text}");
    assert!(text.contains("matching: 42 of 48"), "{text}");
    // the same noise unmarked
    let (_, input, _) = reference("noise_256x256.input");
    let plain_png = dir.path().join("plain.png");
    write_png(&plain_png, &to_rgb(&input, 256, 256), 256, 256);
    let o = sd(&["watermark", plain_png.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    let text = stdout(&o);
    assert!(text.contains("sdxl watermark: no"), "{text}");
    assert!(!text.contains(&format!("bits: {SDXL_HEX}")), "{text}");
}

#[test]
fn small_and_unreadable_files() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small.png");
    write_png(&small, &[128u8; 3 * 64 * 64], 64, 64);
    let o = sd(&["watermark", small.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    assert!(stdout(&o).contains("sdxl watermark: no"), "{}", stdout(&o));
    let bad = dir.path().join("bad.png");
    std::fs::write(&bad, b"not an image").unwrap();
    let o = sd(&["watermark", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bad.png"), "{err}");
    let o = sd(&[
        "watermark",
        dir.path().join("missing.png").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing.png"));
}

/// The RGB bytes of a PNG.
fn png_pixels(p: &Path) -> Vec<u8> {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(p).unwrap()));
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    buf
}

#[test]
fn txt2img_marks_sdxl_like_diffusers_unless_told_not_to() {
    // refs/watermark_pipeline.safetensors: diffusers with and without its watermarker
    let bytes =
        std::fs::read(root().join("tests/fixtures/refs/watermark_pipeline.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let model = root().join("tests/fixtures/models/sdxl");
    for (key, extra) in [
        ("image", None),
        ("image_no_watermark", Some("--no-watermark")),
    ] {
        let out = dir.path().join(format!("{key}.png"));
        let mut args = vec![
            "txt2img",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a lighthouse in a storm",
            "--negative-prompt",
            "calm",
            "--steps",
            "2",
            "--guidance",
            "5",
            "--width",
            "256",
            "--height",
            "256",
            "--seed",
            "5",
            "--output",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = sd(&args);
        assert!(o.status.success(), "{o:?}");
        let want: Vec<f32> = st
            .tensor(key)
            .unwrap()
            .data()
            .chunks(4)
            .map(|c| (f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * 255.0).round_ties_even())
            .collect();
        let got = png_pixels(&out);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(&a, &b)| (f32::from(a) - b).abs())
            .fold(0f32, f32::max);
        println!("{key}: PNG max diff {worst}");
        // measured: 1 on both (a value within 5.7e-6 of a .5 rounding the other way, as in
        // tests/pipeline_parity.rs)
        assert!(worst <= 1.0, "{key}: PNG off diffusers by {worst}");
    }
}
