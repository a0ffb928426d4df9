//! The memory pre-check: the estimator's arithmetic on known shapes (the real SD 1.5 configs),
//! the weights from the safetensors headers, the check's decision with injected available
//! memory (nothing here depends on this machine's RAM), and, ignored by default, the estimate
//! against measured peaks (VmHWM) in a fresh process per case.

use std::path::{Path, PathBuf};

use sd_pipeline::core::testing::fixtures_dir;
use sd_pipeline::core::{candle_core::DType, LoadOptions};
use sd_pipeline::memory::{
    available_from, check, estimate_for, estimate_generate, estimate_load, Available,
    GenerateShape, MemoryEstimate, Part, BASE_BYTES,
};
use sd_pipeline::unet::UNetConfig;
use sd_pipeline::vae::{TileConfig, Tiling, VaeConfig};
use sd_pipeline::{Flow, GenerateRequest, StableDiffusion};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn sd15() -> (UNetConfig, VaeConfig) {
    let unet =
        UNetConfig::from_file(&root().join("crates/sd-unet/tests/data/sd15_unet_config.json"))
            .unwrap();
    let vae = VaeConfig::from_file(&root().join("examples/configs/sd15_vae_config.json")).unwrap();
    (unet, vae)
}

fn shape(images: usize, h: usize, w: usize) -> GenerateShape {
    GenerateShape {
        images,
        guidance: true,
        height: h,
        width: w,
        decode: true,
        encode: false,
    }
}

#[test]
fn sd15_estimates_by_hand() {
    let (unet, vae) = sd15();
    // 512x512, one image with guidance (UNet batch 2), f32, CPU (blocked attention: no scores).
    // Latents 64x64; level areas 4096, 1024, 256, 64.
    // Skips per batch entry: conv_in 320*4096 = 1_310_720; down 0: 2 * 320*4096 = 2_621_440,
    // its downsampler 320*1024 = 327_680; down 1: 2 * 640*1024 = 1_310_720, 640*256 = 163_840;
    // down 2: 2 * 1280*256 = 655_360, 1280*64 = 81_920; down 3: 2 * 1280*64 = 163_840.
    // Sum 6_635_520.
    // Largest block: up 3 at 64x64, 16 maps of 320 channels + its concatenated input
    // (640 + 320) channels: 16*1_310_720 + 960*4096 = 24_903_680.
    // UNet: 2 * (6_635_520 + 24_903_680) * 4 bytes = 252_313_600.
    // VAE decoder (128, 256, 512, 512 reversed): the largest map is up block 2's upsampled
    // output, 256 channels at 512x512 = 67_108_864; 5 such maps in f32 = 1_342_177_280, plus
    // the image twice (3*512*512*4 = 3_145_728 each): 1_348_468_736. The VAE is the larger.
    // Latents: 2 * 4 * 64*64 * 4 bytes * 4 = 524_288.
    let est = estimate_generate(
        &unet,
        DType::F32,
        &vae,
        DType::F32,
        Tiling::Off,
        true,
        &shape(1, 512, 512),
    );
    let bytes: Vec<u64> = est.parts.iter().map(|p| p.bytes).collect();
    assert_eq!(bytes, vec![1_348_468_736, 524_288], "{est:?}");
    assert!(est.parts[0].what.starts_with("vae decode"), "{est:?}");

    // Latents only (no decode): the UNet step is what counts.
    let mut s = shape(1, 512, 512);
    s.decode = false;
    let est = estimate_generate(&unet, DType::F32, &vae, DType::F32, Tiling::Off, true, &s);
    assert_eq!(est.parts[0].bytes, 252_313_600, "{est:?}");
    // bf16 halves the UNet's maps.
    let half = estimate_generate(&unet, DType::BF16, &vae, DType::F32, Tiling::Off, true, &s);
    assert_eq!(half.parts[0].bytes, 252_313_600 / 2);
    // The chunked attention path (f16) adds twice the 256 MiB score budget.
    let f16 = estimate_generate(&unet, DType::F16, &vae, DType::F32, Tiling::Off, false, &s);
    assert_eq!(f16.parts[0].bytes, 252_313_600 / 2 + 2 * (256 << 20));

    // Tiling: 1024x1024 decoded in 512x512 tiles (sample_size 512) needs the 512x512 working
    // set (1_342_177_280) plus the image (3*1024*1024*4 = 12_582_912) twice, and twice more
    // while stitched: 1_392_508_928, above the UNet's 4 * 252_313_600 at 128x128 latents.
    let tiles = Tiling::On(TileConfig::from_config(&vae));
    let tiled = estimate_generate(
        &unet,
        DType::F32,
        &vae,
        DType::F32,
        tiles,
        true,
        &shape(1, 1024, 1024),
    );
    assert_eq!(tiled.parts[0].bytes, 1_392_508_928, "{tiled:?}");
    // At 2048x2048 tiled, the UNet step (16 * 252_313_600 at 256x256 latents) is the larger;
    // untiled, the decode's working set grows with the area: 16 * 1_342_177_280 plus the image
    // (3*2048*2048*4 = 50_331_648) twice.
    let tiled = estimate_generate(
        &unet,
        DType::F32,
        &vae,
        DType::F32,
        tiles,
        true,
        &shape(1, 2048, 2048),
    );
    assert_eq!(tiled.parts[0].bytes, 16 * 252_313_600, "{tiled:?}");
    assert!(tiled.parts[0].what.starts_with("unet step"), "{tiled:?}");
    let untiled = estimate_generate(
        &unet,
        DType::F32,
        &vae,
        DType::F32,
        Tiling::Off,
        true,
        &shape(1, 2048, 2048),
    );
    assert_eq!(untiled.parts[0].bytes, 16 * 1_342_177_280 + 2 * 50_331_648);
    // Auto tiling starts above 2 megapixels, as sd-vae's.
    let auto = Tiling::Auto {
        tiles: TileConfig::from_config(&vae),
        above_pixels: 2 * 1024 * 1024,
    };
    let e = |h, w| {
        estimate_generate(
            &unet,
            DType::F32,
            &vae,
            DType::F32,
            auto,
            true,
            &shape(1, h, w),
        )
    };
    assert_eq!(e(2048, 2048), tiled);
    assert_eq!(
        e(1024, 1024),
        estimate_generate(
            &unet,
            DType::F32,
            &vae,
            DType::F32,
            Tiling::Off,
            true,
            &shape(1, 1024, 1024)
        )
    );

    // Images scale every part linearly.
    let four = estimate_generate(
        &unet,
        DType::F32,
        &vae,
        DType::F32,
        Tiling::Off,
        true,
        &shape(4, 512, 512),
    );
    assert_eq!(four.parts[0].bytes, 4 * 1_342_177_280 + 4 * 2 * 3_145_728);
}

#[test]
fn absurd_shapes_saturate_instead_of_overflowing() {
    let (unet, vae) = sd15();
    let s = GenerateShape {
        images: usize::MAX,
        ..shape(1, usize::MAX, usize::MAX)
    };
    for tiling in [Tiling::Off, Tiling::On(TileConfig::from_config(&vae))] {
        for cpu in [true, false] {
            let e = estimate_generate(&unet, DType::F32, &vae, DType::F32, tiling, cpu, &s);
            assert!(e.bytes() >= u64::MAX / 2, "{e:?}");
        }
    }
}

/// The data bytes of a safetensors file: its size less the 8-byte length and the header.
fn data_bytes(p: &Path) -> u64 {
    let b = std::fs::read(p).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap());
    b.len() as u64 - 8 - n
}

#[test]
fn load_estimate_is_the_weights_at_the_held_dtype() {
    let dir = fixtures_dir().join("models/sd1");
    let f32_files = [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ];
    let f32_bytes: u64 = f32_files.iter().map(|f| data_bytes(&dir.join(f))).sum();
    let est = estimate_load(&dir, &LoadOptions::default()).unwrap();
    assert_eq!(est.bytes(), BASE_BYTES + f32_bytes, "{est:?}");
    // bf16 from the f32 files: half (this VAE has force_upcast false).
    let bf16 = LoadOptions {
        dtype: DType::BF16,
        ..LoadOptions::default()
    };
    assert_eq!(
        estimate_load(&dir, &bf16).unwrap().bytes(),
        BASE_BYTES + f32_bytes / 2
    );
    // The fp16 variant loaded as f16: the fp16 files' bytes.
    let f16 = LoadOptions {
        dtype: DType::F16,
        variant: Some("fp16".into()),
        ..LoadOptions::default()
    };
    let f16_bytes: u64 = f32_files
        .iter()
        .map(|f| data_bytes(&dir.join(f.replace(".safetensors", ".fp16.safetensors"))))
        .sum();
    assert_eq!(
        estimate_load(&dir, &f16).unwrap().bytes(),
        BASE_BYTES + f16_bytes
    );
    // The SDXL fixture's VAE has force_upcast: in f16 its weights are held in f32.
    let xl = fixtures_dir().join("models/sdxl");
    let est = estimate_load(
        &xl,
        &LoadOptions {
            dtype: DType::F16,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let vae = est
        .parts
        .iter()
        .find(|p| p.what.starts_with("vae"))
        .unwrap();
    assert_eq!(
        vae.bytes,
        data_bytes(&xl.join("vae/diffusion_pytorch_model.safetensors"))
    );
    assert!(vae.what.contains("F32"), "{vae:?}");
}

#[test]
fn available_memory_is_the_lower_of_meminfo_and_the_cgroup() {
    let meminfo =
        "MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    8000000 kB\n";
    let gib = 1u64 << 30;
    let a = available_from(Some(meminfo), None, None, None).unwrap();
    assert_eq!(a.bytes, 8_000_000 * 1024);
    assert!(a.source.contains("MemAvailable"));
    // No cgroup limit ("max"): meminfo.
    let a = available_from(Some(meminfo), Some("max\n"), Some("123\n"), None).unwrap();
    assert_eq!(a.bytes, 8_000_000 * 1024);
    // A 4 GiB limit with 3 GiB charged, 1 GiB of it reclaimable file cache: 2 GiB left.
    let stat = format!("anon 1000\nfile 5\ninactive_file {gib}\nactive_file 7\n");
    let a = available_from(
        Some(meminfo),
        Some(&format!("{}\n", 4 * gib)),
        Some(&format!("{}\n", 3 * gib)),
        Some(&stat),
    )
    .unwrap();
    assert_eq!(a.bytes, 2 * gib);
    assert!(a.source.contains("cgroup"));
    // A cgroup over its limit leaves 0, not an underflow.
    let a = available_from(Some(meminfo), Some("100"), Some("200"), None).unwrap();
    assert_eq!(a.bytes, 0);
    // Unreadable: no decision.
    assert!(available_from(None, None, None, None).is_none());
    assert!(available_from(Some("garbage"), Some("max"), None, None).is_none());
}

#[test]
fn the_check_refuses_what_does_not_fit_and_says_what_to_change() {
    let need = MemoryEstimate {
        parts: vec![
            Part {
                what: "unet weights (F32)".into(),
                bytes: 3 << 30,
            },
            Part {
                what: "vae decode".into(),
                bytes: 1 << 30,
            },
        ],
    };
    let avail = |bytes| Available {
        bytes,
        source: "MemAvailable in /proc/meminfo".into(),
    };
    assert!(check("loading x", &need, &avail(4 << 30)).is_ok());
    let err = check("loading x", &need, &avail((4 << 30) - 1))
        .unwrap_err()
        .to_string();
    for want in [
        "4.00 GiB",
        "4.00 GiB available",
        "unet weights (F32) 3.00 GiB",
        "MemAvailable",
        "bf16",
        "--vae-tiling",
        "--num-images",
        "--width",
        "--no-memory-check",
    ] {
        assert!(err.contains(want), "{want:?} in {err}");
    }
    let err = check("generating", &need, &avail(1 << 29))
        .unwrap_err()
        .to_string();
    assert!(err.contains("0.50 GiB available"), "{err}");
}

#[test]
fn a_generation_too_large_is_refused_before_it_runs_and_the_check_can_be_off() {
    let sd =
        StableDiffusion::load(&fixtures_dir().join("models/sd1"), &LoadOptions::default()).unwrap();
    // 65536x65536 with 1024 images: far beyond any machine (petabytes), refused at once.
    let mut req = GenerateRequest::new("a");
    req.steps = 1;
    req.height = Some(65536);
    req.width = Some(65536);
    req.num_images_per_prompt = 1024;
    let need = estimate_for(&sd, &req, (65536, 65536));
    assert!(need.bytes() > 1 << 44, "{need:?}");
    if sd_pipeline::memory::available().is_some() {
        let t = std::time::Instant::now();
        let err = sd
            .generate(
                &req,
                &mut sd_pipeline::core::TorchGenerator::new(0),
                &mut |_| Flow::Continue,
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("needs about") && err.contains("available"),
            "{err}"
        );
        eprintln!("the refusal: {err}");
        assert!(t.elapsed().as_secs() < 5, "refused before the work");
    }
    // Off: the run goes on (a small one, to show the flag is read).
    let mut small = GenerateRequest::new("a");
    small.steps = 1;
    small.memory_check = false;
    small.height = Some(64);
    small.width = Some(64);
    sd.generate(
        &small,
        &mut sd_pipeline::core::TorchGenerator::new(0),
        &mut |_| Flow::Continue,
    )
    .unwrap();
}

/// One measured case: model folder, dtype, size, images, tiled decode, latents only.
struct Case {
    model: &'static str,
    dtype: &'static str,
    size: usize,
    images: usize,
    tiled: bool,
    latents: bool,
}

const fn case(model: &'static str, dtype: &'static str, size: usize) -> Case {
    Case {
        model,
        dtype,
        size,
        images: 1,
        tiled: false,
        latents: false,
    }
}

const CASES: &[Case] = &[
    case("demo", "f32", 128),
    case("demo", "f32", 256),
    case("demo", "bf16", 256),
    Case {
        images: 2,
        ..case("demo", "f32", 256)
    },
    Case {
        latents: true,
        ..case("demo", "f32", 256)
    },
    Case {
        tiled: true,
        ..case("demo", "f32", 256)
    },
    case("sd1", "f32", 256),
    case("sdxl", "f32", 256),
    case("demo", "f32", 512),
];

fn model_dir(name: &str) -> PathBuf {
    match name {
        "demo" => root().join("models/demo"),
        other => fixtures_dir().join("models").join(other),
    }
}

fn status_kb(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// Run by `measure_peaks` in a fresh process: one case, then its numbers on one line.
#[test]
#[ignore = "run by measure_peaks"]
fn probe_one() {
    let Ok(i) = std::env::var("SD_MEM_PROBE") else {
        return;
    };
    let c = &CASES[i.parse::<usize>().unwrap()];
    let dir = model_dir(c.model);
    let opts = LoadOptions {
        dtype: if c.dtype == "bf16" {
            DType::BF16
        } else {
            DType::F32
        },
        ..LoadOptions::default()
    };
    let load = estimate_load(&dir, &opts).unwrap();
    let mut sd = StableDiffusion::load(&dir, &opts).unwrap();
    if c.tiled {
        let t = Tiling::On(TileConfig::from_config(sd.vae.config()));
        sd.vae = std::sync::Arc::new(sd.vae.with_tiling(t).unwrap());
    }
    let mut req = GenerateRequest::new("a red circle");
    req.steps = 1;
    if c.latents {
        req.output = sd_pipeline::OutputType::Latents;
    }
    req.height = Some(c.size);
    req.width = Some(c.size);
    req.num_images_per_prompt = c.images;
    req.memory_check = false;
    let gen = estimate_for(&sd, &req, (c.size, c.size));
    sd.generate(
        &req,
        &mut sd_pipeline::core::TorchGenerator::new(0),
        &mut |_| Flow::Continue,
    )
    .unwrap();
    println!(
        "PROBE {} {} {} {} {} {} est={} hwm={} rssfile={} parts={:?}",
        c.model,
        c.dtype,
        c.size,
        c.images,
        c.tiled,
        if c.latents { "latents" } else { "images" },
        load.bytes() + gen.bytes(),
        status_kb("VmHWM:") * 1024,
        status_kb("RssFile:") * 1024,
        gen.parts
            .iter()
            .map(|p| (&p.what, p.bytes))
            .collect::<Vec<_>>()
    );
}

/// The estimate against the real peak, each case in its own process (VmHWM is per process).
/// `cargo test -p sd-pipeline --test memory measure_peaks -- --ignored --nocapture`
#[test]
#[ignore = "measures this machine; prints the table of docs/reliability.md"]
fn measure_peaks() {
    let exe = std::env::current_exe().unwrap();
    println!("| model | dtype | size | images | tiled | output | estimate MiB | VmHWM MiB | of which mapped files MiB | estimate / VmHWM |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for i in 0..CASES.len() {
        let out = std::process::Command::new(&exe)
            .args([
                "--ignored",
                "--exact",
                "probe_one",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("SD_MEM_PROBE", i.to_string())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(line) = text.lines().find_map(|l| l.find("PROBE ").map(|i| &l[i..])) else {
            panic!("case {i}: {text}{}", String::from_utf8_lossy(&out.stderr));
        };
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |k: &str| -> f64 {
            f.iter()
                .find_map(|x| x.strip_prefix(k))
                .unwrap()
                .parse::<f64>()
                .unwrap()
        };
        let (est, hwm, file) = (num("est="), num("hwm="), num("rssfile="));
        let mib = |b: f64| b / (1u64 << 20) as f64;
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.2} |",
            f[1],
            f[2],
            f[3],
            f[4],
            f[5],
            f[6],
            mib(est),
            mib(hwm),
            mib(file),
            est / hwm
        );
        eprintln!("{line}");
    }
}
