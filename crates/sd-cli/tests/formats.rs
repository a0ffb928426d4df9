//! `sd` with the files users download: single-file checkpoints (and their errors).

use std::path::{Path, PathBuf};
use std::process::Command;

use sd_pipeline::formats::testing::assemble_single_file;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn sd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sd"))
        .args(args)
        .env("SD_RS_CACHE", std::env::temp_dir().join("sd-rs-cli-tests"))
        .output()
        .expect("sd runs")
}

fn folder(f: &str) -> String {
    root()
        .join("tests/fixtures/models")
        .join(f)
        .to_string_lossy()
        .into_owned()
}

fn checkpoint(family: &str, dir: &Path) -> String {
    let out = dir.join(format!("{family}.safetensors"));
    let recipe = root().join(format!("tests/fixtures/refs/single_file_{family}.json"));
    assemble_single_file(&recipe, Path::new(&folder(family)), &out).unwrap();
    out.to_string_lossy().into_owned()
}

fn png_pixels(p: &Path) -> Vec<u8> {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(p).unwrap()));
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    buf
}

fn common(out: &str) -> Vec<&str> {
    vec![
        "--prompt",
        "a red fox",
        "--steps",
        "3",
        "--seed",
        "3",
        "--width",
        "32",
        "--height",
        "32",
        "--output",
        out,
    ]
}

/// The single file gives the folder's image exactly (txt2img; SDXL base + single-file refiner).
#[test]
fn single_file_equals_folder() {
    let tmp = tempfile::tempdir().unwrap();
    for family in ["sd2", "sdxl"] {
        let ck = checkpoint(family, tmp.path());
        let a = tmp.path().join(format!("{family}-file.png"));
        let b = tmp.path().join(format!("{family}-folder.png"));
        let (a_s, b_s) = (a.to_string_lossy(), b.to_string_lossy());
        let f = folder(family);
        let mut args = vec!["txt2img", "--model", &ck, "--config", &f];
        args.extend(common(&a_s));
        let o = sd(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let mut args = vec!["txt2img", "--model", &f];
        args.extend(common(&b_s));
        let o = sd(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(png_pixels(&a), png_pixels(&b), "{family}");
    }
    // The ensemble with a single-file refiner.
    let (base, refiner) = (
        checkpoint("sdxl", tmp.path()),
        checkpoint("refiner", tmp.path()),
    );
    let out = tmp.path().join("ensemble.png");
    let out_s = out.to_string_lossy();
    let (fb, fr) = (folder("sdxl"), folder("refiner"));
    let mut args = vec![
        "txt2img",
        "--model",
        &base,
        "--config",
        &fb,
        "--refiner",
        &refiner,
        "--refiner-config",
        &fr,
    ];
    args.extend(common(&out_s));
    let o = sd(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out2 = tmp.path().join("ensemble-folder.png");
    let out2_s = out2.to_string_lossy();
    let mut args = vec!["txt2img", "--model", &fb, "--refiner", &fr];
    args.extend(common(&out2_s));
    let o = sd(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(png_pixels(&out), png_pixels(&out2));
}

#[test]
fn clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.png");
    let out_s = out.to_string_lossy();
    let ckpt = tmp.path().join("model.ckpt");
    std::fs::write(&ckpt, b"PK\x03\x04").unwrap();
    let ckpt_s = ckpt.to_string_lossy();
    let mut args = vec!["txt2img", "--model", &ckpt_s];
    args.extend(common(&out_s));
    let o = sd(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("pickled"), "{err}");
    // --config with a folder model; a missing checkpoint file.
    let f = folder("sd1");
    let mut args = vec!["txt2img", "--model", &f, "--config", &f];
    args.extend(common(&out_s));
    let err = String::from_utf8_lossy(&sd(&args).stderr).into_owned();
    assert!(err.contains("--config applies to single-file"), "{err}");
    let mut args = vec!["txt2img", "--model", "absent.safetensors"];
    args.extend(common(&out_s));
    let err = String::from_utf8_lossy(&sd(&args).stderr).into_owned();
    assert!(err.contains("no such checkpoint file"), "{err}");
    // A config folder of another family.
    let ck = checkpoint("sd1", tmp.path());
    let x = folder("sdxl");
    let mut args = vec!["txt2img", "--model", &ck, "--config", &x];
    args.extend(common(&out_s));
    let err = String::from_utf8_lossy(&sd(&args).stderr).into_owned();
    assert!(err.contains("SD 1.x checkpoint"), "{err}");
    assert!(!out.exists());
}

/// `--lora PATH[:WEIGHT]`, repeatable, on a folder and on a single file: the same image both
/// ways, different from the image without LoRAs; weights parsed; unknown files refused.
#[test]
fn loras_on_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let loras = root().join("tests/fixtures/loras");
    let a = format!("{}:0.7", loras.join("sd1_kohya.safetensors").display());
    let b = loras
        .join("sd1_peft.safetensors")
        .to_string_lossy()
        .into_owned();
    let f = folder("sd1");
    let ck = checkpoint("sd1", tmp.path());
    let outs: Vec<PathBuf> = (0..3)
        .map(|i| tmp.path().join(format!("{i}.png")))
        .collect();
    let names: Vec<String> = outs
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let runs: [Vec<&str>; 3] = [
        vec![
            "txt2img",
            "--model",
            &f,
            "--variant",
            "fp16",
            "--lora",
            &a,
            "--lora",
            &b,
        ],
        vec![
            "txt2img", "--model", &ck, "--config", &f, "--lora", &a, "--lora", &b,
        ],
        vec!["txt2img", "--model", &f, "--variant", "fp16"],
    ];
    for (args, out) in runs.iter().zip(&names) {
        let mut args = args.clone();
        args.extend(common(out));
        let o = sd(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(png_pixels(&outs[0]), png_pixels(&outs[1]));
    assert_ne!(png_pixels(&outs[0]), png_pixels(&outs[2]));

    let out = tmp.path().join("x.png");
    let out_s = out.to_string_lossy();
    let sdxl_lora = loras
        .join("sdxl_kohya.safetensors")
        .to_string_lossy()
        .into_owned();
    for (lora, want) in [
        (format!("{}:inf", b), "finite"),
        (sdxl_lora, "SDXL LoRA"),
        ("absent.safetensors:0.5".to_owned(), "absent.safetensors"),
    ] {
        let mut args = vec!["txt2img", "--model", &f, "--lora", &lora];
        args.extend(common(&out_s));
        let o = sd(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{err}");
    }
}

/// `--embedding PATH[:TOKEN]` with the LoRAs and a single file: the token changes the image;
/// a pickle is refused.
#[test]
fn embeddings_on_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let embs = root().join("tests/fixtures/embeddings");
    let fox = embs
        .join("fox-style.safetensors")
        .to_string_lossy()
        .into_owned();
    let cat = format!(
        "{}:<cat-toy>",
        embs.join("learned_embeds.safetensors").display()
    );
    let lora = root()
        .join("tests/fixtures/loras/sd1_kohya.safetensors")
        .to_string_lossy()
        .into_owned();
    let f = folder("sd1");
    let ck = checkpoint("sd1", tmp.path());
    let outs: Vec<String> = (0..2)
        .map(|i| {
            tmp.path()
                .join(format!("{i}.png"))
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let base = [
        "txt2img",
        "--model",
        &ck,
        "--config",
        &f,
        "--lora",
        &lora,
        "--prompt-syntax",
        "plain",
        "--steps",
        "3",
        "--seed",
        "3",
        "--width",
        "32",
        "--height",
        "32",
    ];
    let mut args = base.to_vec();
    args.extend([
        "--embedding",
        &fox,
        "--embedding",
        &cat,
        "--prompt",
        "a fox-style <cat-toy>",
        "--output",
        &outs[0],
    ]);
    let o = sd(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut args = base.to_vec();
    args.extend(["--prompt", "a fox-style <cat-toy>", "--output", &outs[1]]);
    let o = sd(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_ne!(
        png_pixels(Path::new(&outs[0])),
        png_pixels(Path::new(&outs[1]))
    );
    let pt = tmp.path().join("bad-hands.pt");
    std::fs::write(&pt, b"\x80\x02").unwrap();
    let pt_s = pt.to_string_lossy();
    let x = tmp.path().join("x.png");
    let x_s = x.to_string_lossy();
    let mut args = vec!["txt2img", "--model", &f, "--embedding", &pt_s];
    args.extend(common(&x_s));
    let o = sd(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("pickled"), "{err}");
}
