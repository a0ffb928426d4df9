//! The `sd` binary end to end on the sd1 fixture: same image as diffusers for the same seed,
//! parameters readable back from the PNG, latents files, numbered outputs, and clear errors that
//! leave existing files alone.

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

fn sd1() -> String {
    root()
        .join("tests/fixtures/models/sd1")
        .to_string_lossy()
        .into_owned()
}

/// Pixels and the `parameters` text of a PNG.
fn read_png(p: &Path) -> (Vec<u8>, u32, u32, String) {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(p).unwrap()));
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    let meta = reader.info();
    let text = meta
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .map(|t| t.text.clone())
        .or_else(|| {
            meta.utf8_text
                .iter()
                .find(|t| t.keyword == "parameters")
                .map(|t| t.get_text().unwrap())
        })
        .unwrap_or_default();
    (buf, info.width, info.height, text)
}

fn reference(name: &str, key: &str) -> Vec<f32> {
    let path = root().join(format!("tests/fixtures/refs/pipeline_{name}.safetensors"));
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(key).unwrap();
    match t.dtype() {
        safetensors::Dtype::U8 => t.data().iter().map(|&v| v as f32).collect(),
        safetensors::Dtype::F32 => t
            .data()
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        d => panic!("unexpected dtype {d:?}"),
    }
}

#[test]
fn txt2img_matches_diffusers_and_records_parameters() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.png");
    let lat = tmp.path().join("lat.safetensors");
    let o = sd(&[
        "txt2img",
        "--model",
        &sd1(),
        "--prompt",
        "a red circle on a white background",
        "--negative-prompt",
        "blurry, dark",
        "--steps",
        "5",
        "--guidance",
        "7.5",
        "--seed",
        "42",
        "--width",
        "64",
        "--height",
        "64",
        "--output",
        out.to_str().unwrap(),
        "--save-latents",
        lat.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (px, w, h, text) = read_png(&out);
    assert_eq!((w, h), (64, 64));
    let want = reference("sd1_txt2img_pndm", "image_u8");
    let max = px
        .iter()
        .zip(&want)
        .map(|(a, b)| (*a as f32 - b).abs())
        .fold(0f32, f32::max);
    assert!(max <= 2.0, "uint8 image differs from diffusers by {max}");
    assert!(
        text.starts_with("a red circle on a white background\nNegative prompt: blurry, dark\n"),
        "{text}"
    );
    assert!(
        text.contains("Steps: 5") && text.contains("Seed: 42") && text.contains("Size: 64x64"),
        "{text}"
    );
    // the fixture's own PNDMScheduler, by AUTOMATIC1111's name
    assert!(text.contains("Sampler: PLMS, CFG scale: 7.5"), "{text}");

    // The saved latents equal diffusers' output_type="latent".
    let bytes = std::fs::read(&lat).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("latents").unwrap();
    assert_eq!(t.shape(), &[1, 4, 8, 8]);
    let ours: Vec<f32> = t
        .data()
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let want = reference("sd1_txt2img_pndm", "latents");
    let max = ours
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max <= 1e-3, "latents differ by {max}");
}

#[test]
fn several_images_are_numbered_and_existing_files_are_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("img.png");
    let args = [
        "txt2img",
        "--model",
        &sd1(),
        "--prompt",
        "x",
        "--steps",
        "2",
        "--seed",
        "1",
        "--num-images",
        "2",
        "--output",
        out.to_str().unwrap(),
    ];
    let o = sd(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a = tmp.path().join("img-0.png");
    let b = tmp.path().join("img-1.png");
    assert!(a.is_file() && b.is_file());
    let before = std::fs::read(&a).unwrap();
    let o = sd(&args);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("already exists") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&a).unwrap(),
        before,
        "existing file untouched"
    );
}

#[test]
fn bad_arguments_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.png");
    let o = sd(&[
        "txt2img",
        "--model",
        &sd1(),
        "--prompt",
        "x",
        "--width",
        "60",
        "--steps",
        "1",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("width") && err.contains("multiple of 8"),
        "{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("stack backtrace"),
        "{err}"
    );
    assert!(!out.exists());

    let o = sd(&[
        "txt2img",
        "--model",
        "/nonexistent/model",
        "--prompt",
        "x",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/model"));

    let o = sd(&[
        "img2img",
        "--model",
        &sd1(),
        "--prompt",
        "x",
        "--image",
        "/nonexistent.png",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent.png"));

    let o = sd(&[
        "txt2img",
        "--model",
        &sd1(),
        "--prompt",
        "x",
        "--scheduler",
        "warp-drive",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("warp-drive"));
}

#[test]
fn a1111_prompts_samplers_and_clip_skip() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("a.png");
    let sd1_path = sd1();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "txt2img",
            "--model",
            &sd1_path,
            "--steps",
            "2",
            "--seed",
            "3",
            "--overwrite",
            "--output",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        sd(&args)
    };
    let o = run(&[
        "--prompt",
        "a (red:1.3) circle, [white] background <hypernet:detail:0.6> BREAK sharp",
        "--sampler",
        "DPM++ 2M",
        "--schedule-type",
        "Karras",
        "--clip-skip",
        "2",
        "--guidance-rescale",
        "0.7",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("<hypernet:detail:0.6> taken out of the prompt, not applied"),
        "{err}"
    );
    let (_, _, _, text) = read_png(&out);
    assert!(
        text.contains("Sampler: DPM++ 2M, Schedule type: Karras, CFG scale:")
            && text.contains("Clip skip: 2")
            && text.contains("Guidance rescale: 0.7"),
        "{text}"
    );

    let o = run(&["--prompt", "x", "--sampler", "Euler a"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(read_png(&out).3.contains("Sampler: Euler a, CFG"));

    // an unknown sampler lists the known ones
    let o = run(&["--prompt", "x", "--sampler", "DPM++ SDE Karras"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("DPM++ SDE Karras") && err.contains("`Euler a`"),
        "{err}"
    );

    // prompt editing and alternation run (tests/prompt_schedule_parity.rs checks the maths);
    // plain syntax takes them as text
    let o = run(&["--prompt", "a [cat:dog:1] [here|there]"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&[
        "--prompt",
        "a [cat:dog:1] AND here",
        "--prompt-syntax",
        "plain",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&["--prompt", "a cat AND a dog"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("AND"));
    let o = run(&["--prompt", "x", "--clip-skip", "0"]);
    assert!(!o.status.success());
}

/// `<lora:NAME:W>` in the prompt loads NAME.safetensors from --lora-dir: the same image as
/// `--lora FILE:W` (the tag is taken out of the text), A1111's `Lora hashes` in the PNG, the
/// TE/UNet form applied as two strengths, clear errors for an unknown name or no folder.
#[test]
fn prompt_lora_tags_are_the_explicit_loras() {
    let tmp = tempfile::tempdir().unwrap();
    let sd1_path = sd1();
    let loras = root().join("tests/fixtures/loras");
    let kohya = loras.join("sd1_kohya.safetensors");
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut args = vec![
            "txt2img",
            "--model",
            &sd1_path,
            "--steps",
            "3",
            "--seed",
            "7",
            "--width",
            "32",
            "--height",
            "32",
            "--output",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = sd(&args);
        (o, out)
    };
    let ok = |(o, out): (std::process::Output, PathBuf)| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        read_png(&out)
    };
    let lora_dir = loras.to_str().unwrap();
    let tag = ok(run(
        "tag.png",
        &[
            "--prompt",
            "a red fox, <lora:sd1_kohya:0.7> snow",
            "--lora-dir",
            lora_dir,
        ],
    ));
    let flag = format!("{}:0.7", kohya.display());
    let explicit = ok(run(
        "flag.png",
        &["--prompt", "a red fox,  snow", "--lora", &flag],
    ));
    let none = ok(run("none.png", &["--prompt", "a red fox,  snow"]));
    let split = ok(run(
        "split.png",
        &[
            "--prompt",
            "a red fox, <lora:sd1_kohya:0.7:0.2> snow",
            "--lora-dir",
            lora_dir,
        ],
    ));
    assert_eq!(tag.0, explicit.0, "tag and --lora give other pixels");
    assert_ne!(tag.0, none.0, "the LoRA changes the image");
    assert_ne!(split.0, tag.0, "the UNet weight is used");
    // the prompt is written as given; the hash is `sha256sum`'s first 12 hex digits
    assert!(
        tag.3.starts_with("a red fox, <lora:sd1_kohya:0.7> snow\n")
            && tag
                .3
                .contains(", Lora hashes: \"sd1_kohya: da06c1c9875a\", Version: sd-rs "),
        "{}",
        tag.3
    );
    assert!(!explicit.3.contains("Lora hashes"), "{}", explicit.3);

    let (o, _) = run(
        "x.png",
        &["--prompt", "<lora:missing:1> x", "--lora-dir", lora_dir],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("missing") && err.contains("sd1_kohya, sd1_peft, sdxl_kohya"),
        "{err}"
    );
    let (o, _) = run("x.png", &["--prompt", "<lora:sd1_kohya:1> x"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--lora-dir"));
    // plain syntax: the tag is text, nothing is loaded
    let (o, _) = run(
        "plain.png",
        &["--prompt", "<lora:missing:1> x", "--prompt-syntax", "plain"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// An image of a `--num-images` run (one generator, as diffusers) says which run and which
/// image it is (`Batch size`, `Batch pos`); `--from-png` repeats that run and keeps that image.
#[test]
fn from_png_regenerates_one_image_of_a_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let sd1_path = sd1();
    let out = tmp.path().join("batch.png");
    let o = sd(&[
        "txt2img",
        "--model",
        &sd1_path,
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        "3",
        "--prompt",
        "a fox",
        "--seed",
        "5",
        "--num-images",
        "2",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let second = tmp.path().join("batch-1.png");
    let (px_1, _, _, text_1) = read_png(&second);
    let (px_0, _, _, text_0) = read_png(&tmp.path().join("batch-0.png"));
    assert!(
        text_0.contains(", Batch size: 2, Batch pos: 0,"),
        "{text_0}"
    );
    assert!(
        text_1.contains(", Batch size: 2, Batch pos: 1,"),
        "{text_1}"
    );
    assert!(px_0 != px_1);
    let again = tmp.path().join("again.png");
    let o = sd(&[
        "txt2img",
        "--model",
        &sd1_path,
        "--from-png",
        second.to_str().unwrap(),
        "--output",
        again.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (px, _, _, text) = read_png(&again);
    assert_eq!(text, text_1);
    assert!(px == px_1, "--from-png of batch image 1 gave other pixels");
    assert!(!tmp.path().join("again-0.png").exists());
}

/// `sd pnginfo` prints a PNG's parameters; `--from-png` regenerates the same pixels from a PNG
/// sd-rs wrote, flags override the PNG, and an AUTOMATIC1111-written text sets what it says.
#[test]
fn pnginfo_and_from_png_regenerate() {
    let tmp = tempfile::tempdir().unwrap();
    let sd1_path = sd1();
    let a = tmp.path().join("a.png");
    let base = [
        "txt2img", "--model", &sd1_path, "--width", "32", "--height", "48",
    ];
    let run = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let o = sd(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    run(&[
        "--prompt",
        "a (red:1.2) fox, [day:night:0.5]",
        "--negative-prompt",
        "blurry",
        "--steps",
        "4",
        "--guidance",
        "6.5",
        "--sampler",
        "DPM++ 2M Karras",
        "--clip-skip",
        "2",
        "--seed",
        "11",
        "--output",
        a.to_str().unwrap(),
    ]);
    let (px_a, _, _, text_a) = read_png(&a);
    let o = sd(&["pnginfo", a.to_str().unwrap()]);
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout), format!("{text_a}\n"));

    // same model, no other flags: the same image and the same parameters
    let b = tmp.path().join("b.png");
    let o = sd(&[
        "txt2img",
        "--model",
        &sd1_path,
        "--from-png",
        a.to_str().unwrap(),
        "--output",
        b.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (px_b, w, h, text_b) = read_png(&b);
    assert_eq!((w, h), (32, 48));
    assert_eq!(text_b, text_a);
    assert!(px_a == px_b, "--from-png gave other pixels");
    // a flag overrides the PNG
    let c = tmp.path().join("c.png");
    run(&[
        "--from-png",
        a.to_str().unwrap(),
        "--seed",
        "12",
        "--output",
        c.to_str().unwrap(),
    ]);
    let (px_c, _, _, text_c) = read_png(&c);
    assert!(
        text_c.contains("Seed: 12,") && text_c.contains("Steps: 4,"),
        "{text_c}"
    );
    assert!(px_c != px_a);

    // a PNG with AUTOMATIC1111's parameters (hires fix, hashes, version: read and ignored)
    let a1111 = tmp.path().join("a1111.png");
    let text = "a red fox, <lora:sd1_kohya:0.5>\nNegative prompt: (worst quality:1.4)\n\
                Steps: 3, Sampler: Euler a, Schedule type: Automatic, CFG scale: 5.5, \
                Seed: 77, Size: 48x32, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, \
                Denoising strength: 0.45, Clip skip: 2, Hires upscale: 2, Hires steps: 15, \
                Hires upscaler: Latent, Lora hashes: \"sd1_kohya: da06c1c9875a\", \
                TI hashes: \"easynegative: c74b4e810b03\", Version: v1.10.1";
    {
        let f = std::fs::File::create(&a1111).unwrap();
        let mut enc = png::Encoder::new(std::io::BufWriter::new(f), 1, 1);
        enc.set_color(png::ColorType::Rgb);
        enc.add_text_chunk("parameters".into(), text.into())
            .unwrap();
        enc.write_header()
            .unwrap()
            .write_image_data(&[0, 0, 0])
            .unwrap();
    }
    let d = tmp.path().join("d.png");
    let lora_dir = root().join("tests/fixtures/loras");
    let o = sd(&[
        "txt2img",
        "--model",
        &sd1_path,
        "--from-png",
        a1111.to_str().unwrap(),
        "--lora-dir",
        lora_dir.to_str().unwrap(),
        "--output",
        d.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("v1-5-pruned-emaonly"), "{err}");
    let (_, w, h, text_d) = read_png(&d);
    assert_eq!((w, h), (48, 32));
    assert!(
        text_d.starts_with(
            "a red fox, <lora:sd1_kohya:0.5>\nNegative prompt: (worst quality:1.4)\n\
             Steps: 3, Sampler: Euler a, CFG scale: 5.5, Seed: 77, Size: 48x32, Model: "
        ) && text_d.contains("Clip skip: 2")
            && text_d.contains("Lora hashes: \"sd1_kohya: da06c1c9875a\""),
        "{text_d}"
    );

    // errors: a PNG without parameters, a file that is no PNG
    let plain = tmp.path().join("plain.png");
    {
        let f = std::fs::File::create(&plain).unwrap();
        let mut enc = png::Encoder::new(std::io::BufWriter::new(f), 1, 1);
        enc.set_color(png::ColorType::Rgb);
        enc.write_header()
            .unwrap()
            .write_image_data(&[0, 0, 0])
            .unwrap();
    }
    let o = sd(&["pnginfo", plain.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no `parameters` text"));
    let o = sd(&[
        "pnginfo",
        lora_dir.join("sd1_kohya.safetensors").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a readable PNG"));
}

fn max_u8_diff(png: &Path, case: &str) -> f32 {
    let (px, _, _, _) = read_png(png);
    let want = reference(case, "image_u8");
    assert_eq!(px.len(), want.len(), "{case}: image size");
    px.iter()
        .zip(&want)
        .map(|(a, b)| (*a as f32 - b).abs())
        .fold(0f32, f32::max)
}

#[test]
fn refiner_ensemble_and_img2img_match_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = root().join("tests/fixtures");
    let ens = tmp.path().join("ens.png");
    let o = sd(&[
        "txt2img",
        "--model",
        fx.join("models/sdxl").to_str().unwrap(),
        "--refiner",
        fx.join("models/refiner").to_str().unwrap(),
        "--high-noise-frac",
        "0.8",
        "--prompt",
        "a lighthouse in a storm",
        "--negative-prompt",
        "calm",
        "--steps",
        "10",
        "--guidance",
        "5",
        "--seed",
        "41",
        "--width",
        "64",
        "--height",
        "64",
        "--output",
        ens.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(max_u8_diff(&ens, "sdxl_ensemble") <= 1.0);

    let i2i = tmp.path().join("i2i.png");
    let o = sd(&[
        "img2img",
        "--model",
        fx.join("models/refiner").to_str().unwrap(),
        "--image",
        fx.join("refs/pipeline_init.png").to_str().unwrap(),
        "--strength",
        "0.3",
        "--prompt",
        "a sharp detailed photo",
        "--negative-prompt",
        "blur",
        "--steps",
        "10",
        "--guidance",
        "5",
        "--seed",
        "31",
        "--output",
        i2i.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(max_u8_diff(&i2i, "refiner_img2img") <= 1.0);
    let (_, _, _, text) = read_png(&i2i);
    assert!(text.contains("Denoising strength: 0.3"), "{text}");
}

/// `sd info` names the CPU and the kernel path, and `SD_CPU_ISA` sets the path (the highest the
/// host has up to that name).
#[test]
fn info_prints_the_kernel_path_and_honours_the_cap() {
    let out = sd(&["info"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("kernel path: "), "{text}");
    assert!(text.contains("generic: yes"), "{text}");
    let capped = Command::new(env!("CARGO_BIN_EXE_sd"))
        .arg("info")
        .env("SD_CPU_ISA", "generic")
        .output()
        .expect("sd runs");
    let text = String::from_utf8_lossy(&capped.stdout);
    assert!(text.contains("kernel path: generic "), "{text}");
}

/// An I/O error is reported once: the library's message already carries its cause, and the
/// printer does not repeat it.
#[test]
fn a_missing_file_is_named_once() {
    let o = sd(&["watermark", "/nonexistent/sd-rs-test.png"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("/nonexistent/sd-rs-test.png"), "{err}");
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
}
