//! `sd serve` end to end: the binary started on 127.0.0.1 with port 0, a real HTTP client, and
//! the PNG the API returns equal byte for byte to the one `sd txt2img` writes for the same
//! settings and seed (pixels and `parameters` text).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use base64::Engine;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn sd1() -> String {
    root()
        .join("tests/fixtures/models/sd1")
        .to_string_lossy()
        .into_owned()
}

/// Kills the server when the test ends, even on failure.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(args: &[&str]) -> (Serve, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sd"))
        .arg("serve")
        .args(args)
        .args(["--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("sd serve starts");
    let stdout = child.stdout.take().expect("piped");
    let server = Serve(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://127.0.0.1:"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_owned();
    (server, url)
}

/// POSTs JSON and returns the 200 answer; any other status fails with its body.
fn post_json(url: &str, body: serde_json::Value) -> serde_json::Value {
    match ureq::post(url).send_json(body) {
        Ok(r) => r.into_json().unwrap(),
        Err(ureq::Error::Status(s, r)) => panic!("{s}: {}", r.into_string().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn serve_returns_the_png_txt2img_writes() {
    let model = sd1();
    let (_server, url) = serve(&["--model", &model]);
    let body = serde_json::json!({
        "prompt": "a (red:1.2) circle on a white background",
        "negative_prompt": "blurry",
        "steps": 3,
        "seed": 7,
        "cfg_scale": 7.5,
        "sampler_name": "Euler a",
        "width": 64,
        "height": 64,
        "override_settings": {"CLIP_stop_at_last_layers": 2},
    });
    let v = post_json(&format!("{url}/sdapi/v1/txt2img"), body);
    let png = base64::engine::general_purpose::STANDARD
        .decode(v["images"][0].as_str().unwrap())
        .unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cli.png");
    let o = Command::new(env!("CARGO_BIN_EXE_sd"))
        .args([
            "txt2img",
            "--model",
            &model,
            "--prompt",
            "a (red:1.2) circle on a white background",
            "--negative-prompt",
            "blurry",
            "--steps",
            "3",
            "--seed",
            "7",
            "--guidance",
            "7.5",
            "--sampler",
            "Euler a",
            "--clip-skip",
            "2",
            "--width",
            "64",
            "--height",
            "64",
            "--output",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cli = std::fs::read(&out).unwrap();
    assert!(png == cli, "the API's PNG differs from the CLI's");

    let (_, health) = (
        0,
        ureq::get(&format!("{url}/health"))
            .call()
            .unwrap()
            .into_string()
            .unwrap(),
    );
    assert!(health.contains("\"ok\""), "{health}");
}

/// `--embeddings-dir`: the API image of a prompt with an embedding's trigger word is the PNG
/// `sd txt2img --embedding FILE` writes (pixels and `TI hashes`), and `sd txt2img
/// --embeddings-dir` gives it too.
#[test]
fn serve_embeddings_dir_equals_txt2img_embedding() {
    let model = sd1();
    let fixtures = root().join("tests/fixtures/embeddings");
    let dir = tempfile::tempdir().unwrap();
    for f in ["fox-style.safetensors", "xl-style.safetensors"] {
        std::fs::copy(fixtures.join(f), dir.path().join(f)).unwrap();
    }
    let dir_s = dir.path().to_string_lossy().into_owned();
    let (_server, url) = serve(&["--model", &model, "--embeddings-dir", &dir_s]);
    let prompt = "a fox-style circle on a white background";
    let body = serde_json::json!({
        "prompt": prompt, "steps": 3, "seed": 7, "cfg_scale": 7.5, "sampler_name": "Euler a",
        "width": 64, "height": 64,
    });
    let v = post_json(&format!("{url}/sdapi/v1/txt2img"), body);
    let png = base64::engine::general_purpose::STANDARD
        .decode(v["images"][0].as_str().unwrap())
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let fox = dir.path().join("fox-style.safetensors");
    let fox = fox.to_string_lossy();
    for (i, extra) in [["--embedding", &*fox], ["--embeddings-dir", &dir_s]]
        .iter()
        .enumerate()
    {
        let out = tmp.path().join(format!("{i}.png"));
        let o = Command::new(env!("CARGO_BIN_EXE_sd"))
            .args([
                "txt2img", "--model", &model, "--prompt", prompt, "--steps", "3",
            ])
            .args(["--seed", "7", "--guidance", "7.5", "--sampler", "Euler a"])
            .args(["--width", "64", "--height", "64"])
            .args(extra)
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let cli = std::fs::read(&out).unwrap();
        let text = sd_pipeline::image::png_parameters(&cli).unwrap().unwrap();
        assert!(text.contains("TI hashes: \"fox-style: "), "{text}");
        assert!(
            png == cli,
            "the API's PNG differs from `sd txt2img {}`",
            extra.join(" ")
        );
    }
}

fn fixture(name: &str) -> String {
    root()
        .join("tests/fixtures/models")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

#[test]
fn serve_runs_the_sdxl_ensemble_as_txt2img_refiner_does() {
    let (base, refiner) = (fixture("sdxl"), fixture("refiner"));
    let (_server, url) = serve(&["--model", &base, "--refiner", &refiner]);
    let body = serde_json::json!({
        "prompt": "a lighthouse in a storm",
        "negative_prompt": "calm",
        "steps": 10,
        "seed": 41,
        "cfg_scale": 5,
        "width": 64,
        "height": 64,
        "refiner_checkpoint": refiner,
        "refiner_switch_at": 0.8,
    });
    let v = post_json(&format!("{url}/sdapi/v1/txt2img"), body);
    let png = base64::engine::general_purpose::STANDARD
        .decode(v["images"][0].as_str().unwrap())
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ens.png");
    let o = Command::new(env!("CARGO_BIN_EXE_sd"))
        .args([
            "txt2img",
            "--model",
            &base,
            "--refiner",
            &refiner,
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
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        png == std::fs::read(&out).unwrap(),
        "the API's PNG differs from the CLI's"
    );
}

#[test]
fn serve_refuses_a_bad_api_auth() {
    let o = Command::new(env!("CARGO_BIN_EXE_sd"))
        .args([
            "serve",
            "--model",
            &sd1(),
            "--api-auth",
            "nocolon",
            "--port",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("USER:PASS"));
}
