//! A real server on 127.0.0.1 (port 0) over the built-in demo model (models/demo), driven by a
//! real HTTP client: API images equal the library's for the same settings and seed, batch seeds
//! are seed + i, progress moves, interrupt stops a job, a full queue answers 503 at once and
//! every request gets an answer, a client that disconnects has its job dropped, bad input gets
//! its 4xx naming the field, auth is enforced. Sizes and steps are tiny to keep CI fast.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use sd_pipeline::core::{LoadOptions, TorchGenerator};
use sd_pipeline::{Flow, GenerateRequest, Infotext, Init, PromptSyntax, StableDiffusion};
use sd_server::{Limits, Model, Server, ServerConfig};
use serde_json::{json, Value};

fn demo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/demo")
}

fn load() -> StableDiffusion {
    StableDiffusion::load(&demo_dir(), &LoadOptions::default()).expect("demo model loads")
}

fn start(config: ServerConfig) -> Server {
    let model = Model::new(load(), "demo", &demo_dir(), 20, 5.0).unwrap();
    Server::start(model, ServerConfig { port: 0, ..config }).unwrap()
}

fn small_limits() -> Limits {
    Limits {
        max_size: 128,
        max_steps: 1000,
        max_batch: 4,
        max_body_bytes: 256 << 10,
    }
}

/// POST JSON; (status, body, Retry-After) whatever the status.
fn post(url: &str, body: &str) -> (u16, Value, Option<String>) {
    post_with(ureq::post(url), body)
}

fn post_with(req: ureq::Request, body: &str) -> (u16, Value, Option<String>) {
    let r = match req
        .set("Content-Type", "application/json")
        .send_string(body)
    {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let status = r.status();
    let retry = r.header("Retry-After").map(str::to_owned);
    let v = r.into_json().unwrap_or(Value::Null);
    (status, v, retry)
}

fn get(url: &str) -> (u16, Value) {
    match ureq::get(url).call() {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(s, r)) => (s, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("transport error: {e}"),
    }
}

/// RGB pixels and `parameters` text of a base64 PNG.
fn decode_png(b64: &str) -> (Vec<u8>, u32, u32, String) {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let text = sd_pipeline::image::png_parameters(&bytes)
        .unwrap()
        .unwrap_or_default();
    let img = sd_pipeline::image::decode_rgb8(&bytes, "png").unwrap();
    let (w, h) = img.dimensions();
    (img.into_raw(), w, h, text)
}

/// The library's image for the same settings as the API request below.
fn library_image(
    sd: &StableDiffusion,
    prompt: &str,
    steps: usize,
    seed: u64,
    init: Init,
) -> Vec<u8> {
    library_image_cfg(sd, prompt, steps, 5.0, seed, init)
}

/// [`library_image`] with a guidance scale.
fn library_image_cfg(
    sd: &StableDiffusion,
    prompt: &str,
    steps: usize,
    cfg: f64,
    seed: u64,
    init: Init,
) -> Vec<u8> {
    let mut req = GenerateRequest::new(prompt);
    req.prompt_syntax = PromptSyntax::A1111;
    req.steps = steps;
    req.guidance_scale = cfg;
    req.init = init;
    library_image_for(sd, &req, seed)
}

/// The library's first image for a request and seed, as RGB8 bytes.
fn library_image_for(sd: &StableDiffusion, req: &GenerateRequest, seed: u64) -> Vec<u8> {
    let out = sd
        .generate(req, &mut TorchGenerator::new(seed), &mut |_| Flow::Continue)
        .unwrap();
    sd_pipeline::image::to_rgb8(&out.images.unwrap()).unwrap()[0]
        .clone()
        .into_raw()
}

#[test]
fn api_images_equal_the_library_and_batch_seeds_are_seed_plus_i() {
    let server = start(ServerConfig::default());
    let url = server.url();
    let prompt = "a (red:1.1) circle on a white background";
    let body = json!({"prompt": prompt, "steps": 4, "seed": 42, "batch_size": 2, "cfg_scale": 5})
        .to_string();
    let (status, v, _) = post(&format!("{url}/sdapi/v1/txt2img"), &body);
    assert_eq!(status, 200, "{v}");
    let images = v["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["seed"], 42);
    assert_eq!(info["all_seeds"], json!([42, 43]));
    assert_eq!(v["parameters"]["prompt"], prompt);

    let sd = load();
    let kind = sd.scheduler_kind().unwrap();
    for (i, b64) in images.iter().enumerate() {
        let seed = 42 + i as u64;
        let (px, w, h, text) = decode_png(b64.as_str().unwrap());
        assert_eq!((w, h), (64, 64));
        assert_eq!(
            px,
            library_image(&sd, prompt, 4, seed, Init::Noise),
            "image {i}"
        );
        let want = Infotext::new(prompt, kind, 4, 5.0, seed, (64, 64), "demo").to_string();
        assert_eq!(text, want);
        assert_eq!(info["infotexts"][i], want);
    }
    // image 1 of the batch is reproducible alone with seed 43
    let alone = json!({"prompt": prompt, "steps": 4, "seed": 43, "cfg_scale": 5}).to_string();
    let (_, v1, _) = post(&format!("{url}/sdapi/v1/txt2img"), &alone);
    assert_eq!(
        decode_png(v1["images"][0].as_str().unwrap()).0,
        decode_png(images[1].as_str().unwrap()).0
    );

    // img2img from image 0 (with a data: prefix) equals the library's img2img
    let init = format!("data:image/png;base64,{}", images[0].as_str().unwrap());
    let body = json!({"prompt": "a blue circle on a white background", "steps": 4, "seed": 5,
        "cfg_scale": 5, "denoising_strength": 0.5, "init_images": [init]})
    .to_string();
    let (status, v2, _) = post(&format!("{url}/sdapi/v1/img2img"), &body);
    assert_eq!(status, 200, "{v2}");
    let rgb = sd_pipeline::image::decode_rgb8(
        &base64::engine::general_purpose::STANDARD
            .decode(images[0].as_str().unwrap())
            .unwrap(),
        "init",
    )
    .unwrap();
    let image =
        sd_pipeline::image::from_rgb8(&rgb, &sd_pipeline::core::candle_core::Device::Cpu).unwrap();
    let want = library_image(
        &sd,
        "a blue circle on a white background",
        4,
        5,
        Init::Image {
            image,
            strength: 0.5,
        },
    );
    let (px, _, _, text) = decode_png(v2["images"][0].as_str().unwrap());
    assert_eq!(px, want);
    assert!(text.contains(", Denoising strength: 0.5, "), "{text}");
    assert_eq!(v2["parameters"]["init_images"], Value::Null);

    // png-info reads the parameters back
    let (s, pi, _) = post(
        &format!("{url}/sdapi/v1/png-info"),
        &json!({"image": images[1]}).to_string(),
    );
    assert_eq!(s, 200, "{pi}");
    assert_eq!(pi["parameters"]["Seed"], "43");
    assert_eq!(pi["parameters"]["Prompt"], prompt);
    server.shutdown();
}

/// Waits until `f` holds, polling, for at most `secs` seconds.
fn wait_until(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn long_job(url: &str) -> std::thread::JoinHandle<(u16, Value, Option<String>)> {
    let url = url.to_owned();
    std::thread::spawn(move || {
        post(
            &format!("{url}/sdapi/v1/txt2img"),
            &json!({"prompt": "a red circle", "steps": 1000, "seed": 1, "n_iter": 2}).to_string(),
        )
    })
}

#[test]
fn progress_moves_interrupt_stops_and_a_disconnected_client_is_dropped() {
    let server = start(ServerConfig {
        queue: 2,
        limits: small_limits(),
        ..ServerConfig::default()
    });
    let url = server.url();
    let (_, idle) = get(&format!("{url}/sdapi/v1/progress"));
    assert_eq!(idle["state"]["job_count"], 0);

    let started = Instant::now();
    let job = long_job(&url);
    let step = |url: &str| {
        let (_, p) = get(&format!("{url}/sdapi/v1/progress"));
        (p["state"]["sampling_step"].as_u64().unwrap_or(0), p)
    };
    assert!(
        wait_until(60, || step(&url).0 >= 1),
        "the job never started"
    );
    let (first, p) = step(&url);
    assert_eq!(p["state"]["job_count"], 2);
    assert_eq!(p["state"]["sampling_steps"], 1000);
    assert!(
        wait_until(60, || step(&url).0 > first),
        "progress did not move"
    );
    let (_, p) = step(&url);
    assert!(p["progress"].as_f64().unwrap() > 0.0, "{p}");

    // A client that gives up while queued: its job leaves the queue.
    let waiting = std::thread::spawn({
        let url = url.clone();
        move || {
            let r = ureq::post(&format!("{url}/sdapi/v1/txt2img"))
                .timeout(Duration::from_millis(1500))
                .send_string(&json!({"prompt": "x", "steps": 3}).to_string());
            assert!(
                r.is_err(),
                "the queued request should time out on the client"
            );
        }
    });
    assert!(wait_until(10, || get(&format!("{url}/health")).1["queued"] == 1));
    waiting.join().unwrap();
    assert!(
        wait_until(10, || get(&format!("{url}/health")).1["queued"] == 0),
        "the disconnected client's job stayed queued"
    );

    // Interrupt: the running job ends within a step, with no image.
    let (s, _, _) = post(&format!("{url}/sdapi/v1/interrupt"), "");
    assert_eq!(s, 200);
    let (status, v, _) = job.join().unwrap();
    assert_eq!(status, 200, "{v}");
    let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["interrupted"], true);
    assert_eq!(v["images"].as_array().unwrap().len(), 0);
    assert!(started.elapsed() < Duration::from_secs(120));
    let (_, h) = get(&format!("{url}/health"));
    assert_eq!(h["running"], false);
    server.shutdown();
}

#[test]
fn skip_moves_on_to_the_next_image() {
    let server = start(ServerConfig {
        limits: small_limits(),
        ..ServerConfig::default()
    });
    let url = server.url();
    let job = long_job(&url);
    let state = |url: &str| get(&format!("{url}/sdapi/v1/progress")).1["state"].clone();
    assert!(wait_until(60, || state(&url)["sampling_step"].as_u64() >= Some(1)));
    assert_eq!(state(&url)["job_no"], 0);
    let (s, _, _) = post(&format!("{url}/sdapi/v1/skip"), "");
    assert_eq!(s, 200);
    // image 0 (1000 steps) is abandoned: image 1 starts long before it could have finished
    assert!(
        wait_until(30, || state(&url)["job_no"] == 1),
        "skip did not move on"
    );
    post(&format!("{url}/sdapi/v1/interrupt"), "");
    let (status, v, _) = job.join().unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["images"].as_array().unwrap().len(), 0);
    server.shutdown();
}

#[test]
fn a_full_queue_answers_503_at_once_and_every_request_is_answered() {
    let server = start(ServerConfig {
        queue: 1,
        limits: small_limits(),
        ..ServerConfig::default()
    });
    let url = Arc::new(server.url());
    let clients: Vec<_> = (0..6)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                let r = post(
                    &format!("{url}/sdapi/v1/txt2img"),
                    &json!({"prompt": "a green square", "steps": 6, "seed": i}).to_string(),
                );
                (r, t.elapsed())
            })
        })
        .collect();
    let (mut ok, mut busy) = (0, 0);
    for c in clients {
        let ((status, v, retry), took) = c.join().unwrap();
        match status {
            200 => {
                ok += 1;
                assert_eq!(v["images"].as_array().unwrap().len(), 1);
            }
            503 => {
                busy += 1;
                assert!(retry.is_some(), "503 without Retry-After");
                assert_eq!(v["error"], "QueueFull");
                assert!(
                    took < Duration::from_secs(5),
                    "the 503 was not immediate: {took:?}"
                );
            }
            s => panic!("unexpected status {s}: {v}"),
        }
    }
    assert!(ok >= 1 && busy >= 1, "ok {ok}, busy {busy}");
    let (s, h) = get(&format!("{url}/health"));
    assert_eq!((s, h["status"].as_str()), (200, Some("ok")));
    assert_eq!(h["queued"], 0);
    let (s, v, _) = post(
        &format!("{url}/sdapi/v1/txt2img"),
        &json!({"prompt": "a blue square", "steps": 2}).to_string(),
    );
    assert_eq!(s, 200, "{v}");
    server.shutdown();
}

#[test]
fn malformed_requests_get_their_4xx_naming_the_field() {
    let server = start(ServerConfig {
        limits: small_limits(),
        ..ServerConfig::default()
    });
    let t2i = format!("{}/sdapi/v1/txt2img", server.url());
    let i2i = format!("{}/sdapi/v1/img2img", server.url());
    let big = "x".repeat(300 << 10);
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        (&t2i, "{not json".into(), 400, None),
        (&t2i, r#"{"steps": "many"}"#.into(), 422, Some("steps")),
        (
            &t2i,
            r#"{"sampler_name": "Euler z"}"#.into(),
            404,
            Some("sampler_name"),
        ),
        (
            &t2i,
            r#"{"sampler_name": "Euler", "scheduler": "Exponential"}"#.into(),
            422,
            Some("scheduler"),
        ),
        (&t2i, r#"{"width": 100}"#.into(), 422, Some("width")),
        (&t2i, r#"{"height": 256}"#.into(), 422, Some("height")),
        (&t2i, r#"{"steps": 1001}"#.into(), 422, Some("steps")),
        (
            &t2i,
            r#"{"batch_size": 3, "n_iter": 2}"#.into(),
            422,
            Some("n_iter"),
        ),
        (&t2i, r#"{"batch_size": 0}"#.into(), 422, Some("batch_size")),
        (&t2i, r#"{"cfg_scale": -1}"#.into(), 422, Some("cfg_scale")),
        (&t2i, r#"{"seed": -5}"#.into(), 422, Some("seed")),
        (
            &t2i,
            r#"{"enable_hr": true}"#.into(),
            422,
            Some("enable_hr"),
        ),
        (&t2i, r#"{"prompt": "a AND b"}"#.into(), 422, Some("prompt")),
        (
            &t2i,
            r#"{"override_settings": {"CLIP_stop_at_last_layers": 0}}"#.into(),
            422,
            Some("override_settings.CLIP_stop_at_last_layers"),
        ),
        (
            &i2i,
            r#"{"init_images": []}"#.into(),
            422,
            Some("init_images"),
        ),
        (
            &i2i,
            r#"{"init_images": ["%%%"]}"#.into(),
            422,
            Some("init_images[0]"),
        ),
        (
            &i2i,
            r#"{"init_images": ["aGVsbG8="]}"#.into(),
            422,
            Some("init_images[0]"),
        ),
        (&i2i, format!(r#"{{"init_images": ["{big}"]}}"#), 413, None),
    ];
    for (url, body, status, field) in cases {
        let (s, v, _) = post(url, &body);
        assert_eq!(s, status, "{body:.60}: {v}");
        assert!(v["error"].is_string() && v["detail"].is_string(), "{v}");
        if let Some(f) = field {
            assert_eq!(v["field"], f, "{body:.60}: {v}");
        }
    }
    let (s, _) = get(&format!("{}/sdapi/v1/nothing", server.url()));
    assert_eq!(s, 404);
    // still healthy, and still generating
    let (s, v, _) = post(
        &t2i,
        &json!({"prompt": "a cyan circle", "steps": 2}).to_string(),
    );
    assert_eq!(s, 200, "{v}");
    server.shutdown();
}

#[test]
fn auth_listings_and_options() {
    let server = start(ServerConfig {
        api_auth: Some(("user".into(), "secret".into())),
        ..ServerConfig::default()
    });
    let url = server.url();
    let samplers = format!("{url}/sdapi/v1/samplers");
    assert_eq!(get(&samplers).0, 401);
    let basic = |cred: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(cred)
        )
    };
    let wrong = ureq::get(&samplers)
        .set("Authorization", &basic("user:nope"))
        .call();
    assert!(matches!(wrong, Err(ureq::Error::Status(401, _))));
    let auth = basic("user:secret");
    let call = |path: &str| -> Value {
        ureq::get(&format!("{url}{path}"))
            .set("Authorization", &auth)
            .call()
            .unwrap()
            .into_json()
            .unwrap()
    };
    let s = call("/sdapi/v1/samplers");
    let names: Vec<&str> = s
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    for n in [
        "Euler a", "Euler", "DPM++ 2M", "DDIM", "PLMS", "LMS", "Heun",
    ] {
        assert!(names.contains(&n), "{names:?}");
    }
    assert_eq!(call("/sdapi/v1/schedulers")[1]["label"], "Karras");
    assert_eq!(call("/sdapi/v1/sd-models")[0]["title"], "demo");
    assert_eq!(call("/sdapi/v1/loras"), json!([]));
    assert_eq!(call("/sdapi/v1/options")["CLIP_stop_at_last_layers"], 1);
    let (s, _, _) = post_with(
        ureq::post(&format!("{url}/sdapi/v1/options")).set("Authorization", &auth),
        r#"{"CLIP_stop_at_last_layers": 2, "sd_model_checkpoint": "demo"}"#,
    );
    assert_eq!(s, 200);
    assert_eq!(call("/sdapi/v1/options")["CLIP_stop_at_last_layers"], 2);
    let (s, v, _) = post_with(
        ureq::post(&format!("{url}/sdapi/v1/options")).set("Authorization", &auth),
        r#"{"sd_model_checkpoint": "other"}"#,
    );
    assert_eq!((s, v["field"].as_str()), (422, Some("sd_model_checkpoint")));
    // generation needs auth too; health does not
    let (s, _, _) = post(&format!("{url}/sdapi/v1/txt2img"), "{}");
    assert_eq!(s, 401);
    assert_eq!(get(&format!("{url}/health")).0, 200);
    server.shutdown();
}

#[test]
fn models_dir_models_load_on_demand_and_stay_loaded() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models");
    let server = start(ServerConfig {
        models_dir: Some(fixtures.clone()),
        ..ServerConfig::default()
    });
    let url = server.url();
    let (_, list) = get(&format!("{url}/sdapi/v1/sd-models"));
    let titles: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles, ["demo", "refiner", "sd1", "sd2", "sdxl"]);

    // per request: the image equals the library's on that model
    let body = json!({"prompt": "a red circle", "steps": 3, "seed": 7, "cfg_scale": 7,
        "width": 64, "height": 64, "override_settings": {"sd_model_checkpoint": "sd1"}});
    let (s, v, _) = post(&format!("{url}/sdapi/v1/txt2img"), &body.to_string());
    assert_eq!(s, 200, "{v}");
    let sd1 = StableDiffusion::load(&fixtures.join("sd1"), &LoadOptions::default()).unwrap();
    let want = library_image_cfg(&sd1, "a red circle", 3, 7.0, 7, Init::Noise);
    assert_eq!(decode_png(v["images"][0].as_str().unwrap()).0, want);
    let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["sd_model_name"], "sd1");
    // the request did not switch the server's model
    assert_eq!(
        get(&format!("{url}/sdapi/v1/options")).1["sd_model_checkpoint"],
        "demo"
    );

    // /options switches it
    let (s, _, _) = post(
        &format!("{url}/sdapi/v1/options"),
        r#"{"sd_model_checkpoint": "sd1"}"#,
    );
    assert_eq!(s, 200);
    assert_eq!(
        get(&format!("{url}/sdapi/v1/options")).1["sd_model_checkpoint"],
        "sd1"
    );
    let (s, v, _) = post(
        &format!("{url}/sdapi/v1/txt2img"),
        &json!({"prompt": "a red circle", "steps": 2}).to_string(),
    );
    assert_eq!(s, 200, "{v}");
    let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["sd_model_name"], "sd1");

    let (s, v, _) = post(
        &format!("{url}/sdapi/v1/txt2img"),
        &json!({"override_settings": {"sd_model_checkpoint": "nope"}}).to_string(),
    );
    assert_eq!(
        (s, v["field"].as_str()),
        (422, Some("override_settings.sd_model_checkpoint")),
        "{v}"
    );
    server.shutdown();
}

/// A prompt's `<lora:NAME:W>` loads NAME.safetensors from `--lora-dir` for that request: the
/// image equals the library's with that LoRA applied, the infotext has A1111's `Lora hashes`,
/// the server's model is left without it, and an unknown name is a 422 naming `prompt`.
#[test]
fn prompt_lora_tags_load_from_the_lora_dir() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let server = start(ServerConfig {
        models_dir: Some(fixtures.join("models")),
        lora_dir: Some(fixtures.join("loras")),
        ..ServerConfig::default()
    });
    let url = server.url();
    let (_, list) = get(&format!("{url}/sdapi/v1/loras"));
    assert_eq!(list.as_array().unwrap().len(), 3, "{list}");
    let body = |prompt: &str| {
        json!({"prompt": prompt, "steps": 3, "seed": 7, "cfg_scale": 7, "width": 32,
            "height": 32, "override_settings": {"sd_model_checkpoint": "sd1"}})
        .to_string()
    };
    let (s, v, _) = post(
        &format!("{url}/sdapi/v1/txt2img"),
        &body("a red fox <lora:sd1_kohya:0.7:0.4>"),
    );
    assert_eq!(s, 200, "{v}");
    let (px, _, _, text) = decode_png(v["images"][0].as_str().unwrap());
    assert!(
        text.contains(", Lora hashes: \"sd1_kohya: da06c1c9875a\", Version: sd-rs "),
        "{text}"
    );
    let sd1 = StableDiffusion::load(&fixtures.join("models/sd1"), &LoadOptions::default()).unwrap();
    let file = Arc::new(
        sd_pipeline::formats::LoraFile::open(&fixtures.join("loras/sd1_kohya.safetensors"))
            .unwrap(),
    );
    let with = sd1
        .with_loras_te_unet(&[(file, 0.7, 0.4)], &sd_pipeline::LoraOptions::default())
        .unwrap();
    let mut req = GenerateRequest::new("a red fox ");
    req.prompt_syntax = PromptSyntax::A1111;
    req.steps = 3;
    req.guidance_scale = 7.0;
    req.width = Some(32);
    req.height = Some(32);
    let lib = |sd: &StableDiffusion| library_image_for(sd, &req, 7);
    assert_eq!(px, lib(&with));
    // the next request without a tag runs the model without the LoRA
    let (s, v, _) = post(&format!("{url}/sdapi/v1/txt2img"), &body("a red fox "));
    assert_eq!(s, 200, "{v}");
    let (px0, _, _, text0) = decode_png(v["images"][0].as_str().unwrap());
    assert_eq!(px0, lib(&sd1));
    assert_ne!(px0, px);
    assert!(!text0.contains("Lora hashes"), "{text0}");

    let (s, v, _) = post(
        &format!("{url}/sdapi/v1/txt2img"),
        &body("a fox <lora:nope:1>"),
    );
    assert_eq!(s, 422, "{v}");
    let msg = v.to_string();
    assert!(msg.contains("prompt") && msg.contains("sd1_kohya"), "{msg}");
}

/// A safetensors file of f32 tensors `(name, shape)` filled with `0.1 * (i + 1)`.
fn write_safetensors(path: &std::path::Path, tensors: &[(&str, &[usize])]) {
    let mut header = serde_json::Map::new();
    let mut data: Vec<u8> = Vec::new();
    for (name, shape) in tensors {
        let n: usize = shape.iter().product();
        let start = data.len();
        for i in 0..n {
            data.extend((0.1f32 * (i as f32 + 1.0)).to_le_bytes());
        }
        header.insert(
            (*name).to_owned(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let header = serde_json::to_vec(&Value::Object(header)).unwrap();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header);
    bytes.extend(data);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn embeddings_dir_embeddings_are_applied_listed_and_refreshed() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let dir = tempfile::tempdir().unwrap();
    for f in ["fox-style", "xl-style"] {
        let name = format!("{f}.safetensors");
        std::fs::copy(
            fixtures.join("embeddings").join(&name),
            dir.path().join(name),
        )
        .unwrap();
    }
    // 16-wide: made for another model than the fixture SD 1.x (8-wide text encoder)
    write_safetensors(
        &dir.path().join("wide.safetensors"),
        &[("emb_params", &[3, 16])],
    );
    std::fs::write(dir.path().join("bad-hands.pt"), b"\x80\x02pickle").unwrap();
    let sd1_dir = fixtures.join("models/sd1");
    let sd1 = StableDiffusion::load(&sd1_dir, &LoadOptions::default()).unwrap();
    let model = Model::new(sd1.clone(), "sd1", &sd1_dir, 20, 7.0).unwrap();
    let server = Server::start(
        model,
        ServerConfig {
            port: 0,
            embeddings_dir: Some(dir.path().to_path_buf()),
            ..ServerConfig::default()
        },
    )
    .unwrap();
    let url = server.url();

    let (s, list) = get(&format!("{url}/sdapi/v1/embeddings"));
    assert_eq!(s, 200, "{list}");
    let entry = |shape: Value, vectors: usize| {
        json!({"step": null, "sd_checkpoint": null, "sd_checkpoint_name": null,
            "shape": shape, "vectors": vectors})
    };
    assert_eq!(
        list,
        json!({
            "loaded": {"fox-style": entry(json!(8), 2)},
            "skipped": {
                // SDXL: clip_l's width + clip_g's (8 + 12), clip_g's vectors, as A1111 lists it
                "xl-style": entry(json!(20), 2),
                "wide": entry(json!(16), 3),
                "bad-hands": entry(Value::Null, 0),
            }
        })
    );

    // The trigger word in the prompt: the library's image with the same file added.
    let body = |prompt: &str| {
        json!({"prompt": prompt, "steps": 3, "seed": 7, "cfg_scale": 7, "width": 32,
            "height": 32})
        .to_string()
    };
    let prompt = "a fox-style circle";
    let (s, v, _) = post(&format!("{url}/sdapi/v1/txt2img"), &body(prompt));
    assert_eq!(s, 200, "{v}");
    let (px, _, _, text) = decode_png(v["images"][0].as_str().unwrap());
    let fox_hash =
        sd_pipeline::prompt_loras::short_sha256(&dir.path().join("fox-style.safetensors")).unwrap();
    assert!(
        text.contains(&format!(
            ", TI hashes: \"fox-style: {fox_hash}\", Version: sd-rs "
        )),
        "{text}"
    );
    let fox = sd_pipeline::formats::EmbeddingFile::open(
        &fixtures.join("embeddings/fox-style.safetensors"),
        None,
    )
    .unwrap();
    let with = sd1.with_embeddings(&[Arc::new(fox)]).unwrap();
    let mut req = GenerateRequest::new(prompt);
    req.prompt_syntax = PromptSyntax::A1111;
    req.steps = 3;
    req.guidance_scale = 7.0;
    req.width = Some(32);
    req.height = Some(32);
    let lib = |sd: &StableDiffusion| library_image_for(sd, &req, 7);
    assert_eq!(
        px,
        lib(&with),
        "the API image differs from the library's with the file"
    );
    assert_ne!(px, lib(&sd1), "the embedding changed nothing");
    // a prompt without the word: no TI hashes
    let (s, v, _) = post(&format!("{url}/sdapi/v1/txt2img"), &body("a red circle"));
    assert_eq!(s, 200, "{v}");
    let (_, _, _, text) = decode_png(v["images"][0].as_str().unwrap());
    assert!(!text.contains("TI hashes"), "{text}");

    // A new file is picked up by /refresh-embeddings.
    write_safetensors(
        &dir.path().join("new-style.safetensors"),
        &[("emb_params", &[8])],
    );
    let (s, v, _) = post(&format!("{url}/sdapi/v1/refresh-embeddings"), "");
    assert_eq!(s, 200, "{v}");
    let (_, list) = get(&format!("{url}/sdapi/v1/embeddings"));
    assert_eq!(list["loaded"]["new-style"], entry(json!(8), 1), "{list}");
    assert_eq!(list["loaded"]["fox-style"], entry(json!(8), 2), "{list}");
    assert_eq!(list["skipped"].as_object().unwrap().len(), 3, "{list}");
    let (s, v, _) = post(&format!("{url}/sdapi/v1/txt2img"), &body(prompt));
    assert_eq!(s, 200, "{v}");
    let (px2, _, _, _) = decode_png(v["images"][0].as_str().unwrap());
    assert_eq!(px2, px, "re-reading the folder changed the fox-style image");
}

#[test]
fn progress_returns_live_previews_of_the_latent_size() {
    let server = start(ServerConfig {
        limits: small_limits(),
        ..ServerConfig::default()
    });
    let url = server.url();
    let (_, o) = get(&format!("{url}/sdapi/v1/options"));
    assert_eq!(o["show_progress_every_n_steps"], 10, "A1111's default");
    let (s, v, _) = post(
        &format!("{url}/sdapi/v1/options"),
        &json!({"show_progress_every_n_steps": -2}).to_string(),
    );
    assert_eq!(
        (s, v["field"].as_str()),
        (422, Some("show_progress_every_n_steps")),
        "{v}"
    );
    let (s, _, _) = post(
        &format!("{url}/sdapi/v1/options"),
        &json!({"show_progress_every_n_steps": 2}).to_string(),
    );
    assert_eq!(s, 200);
    let progress = |query: &str| get(&format!("{url}/sdapi/v1/progress{query}")).1;
    assert!(
        progress("")
            .get("current_image")
            .is_some_and(Value::is_null),
        "idle"
    );

    // 64x48 pixels: one preview pixel per latent (A1111's cheap approximation).
    let job = std::thread::spawn({
        let url = url.clone();
        move || {
            post(
                &format!("{url}/sdapi/v1/txt2img"),
                &json!({"prompt": "a red circle", "steps": 1000, "seed": 1, "width": 64,
                    "height": 48})
                .to_string(),
            )
        }
    });
    let mut preview = None;
    assert!(
        wait_until(60, || {
            preview = progress("?skip_current_image=false")["current_image"]
                .as_str()
                .map(str::to_owned);
            preview.is_some()
        }),
        "no live preview during the run"
    );
    let p = progress("");
    assert!(p["state"]["sampling_step"].as_u64().unwrap() >= 2, "{p}");
    let (px, w, h, text) = decode_png(&preview.unwrap());
    // the latent size: 64x48 / the VAE's factor (4 for the demo model, 8 for SD models)
    let f = load().vae_scale_factor() as u32;
    assert_eq!((w, h), (64 / f, 48 / f));
    assert_eq!(px.len(), (w * h * 3) as usize);
    assert!(text.is_empty(), "a preview has no parameters: {text}");
    assert!(px.iter().any(|&b| b != px[0]), "a flat preview");
    let skipped = progress("?skip_current_image=true");
    assert!(skipped["current_image"].is_null(), "{skipped}");
    assert!(skipped["state"]["sampling_step"].as_u64().unwrap() >= 2);
    let (s, _, _) = post(&format!("{url}/sdapi/v1/interrupt"), "");
    assert_eq!(s, 200);
    let (status, v, _) = job.join().unwrap();
    assert_eq!(status, 200, "{v}");
    assert!(
        progress("")["current_image"].is_null(),
        "a finished job has no preview"
    );
    server.shutdown();
}
