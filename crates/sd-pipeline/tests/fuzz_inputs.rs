//! Property tests of the pipeline's file inputs (issue 16): PNG (8/16-bit, grey, alpha,
//! palette) and JPEG images, truncated, with damaged bytes or with huge dimensions declared in a
//! header whose checksum is valid, and `model_index.json` files with wrong types and missing
//! values. The property: an `Err` naming the file or a correct result, never a panic, never an
//! allocation out of proportion to the file's size. `PROPTEST_CASES` sets the number of cases
//! (see docs/reliability.md).

use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::Device;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError};
use sd_core::testing::{
    proptest_cases, proptest_fixed_seed, take_largest_allocation, TrackingAllocator,
};
use sd_pipeline::image::{decode_limit, from_rgb8, read_rgb8, MAX_IMAGE_SIDE};
use sd_pipeline::ModelIndex;

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator;

fn config() -> Config {
    let mut c = Config {
        cases: proptest_cases(128),
        failure_persistence: None,
        ..Config::default()
    };
    if let Some(seed) = proptest_fixed_seed() {
        c.rng_seed = RngSeed::Fixed(seed);
    }
    c
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Grey8,
    GreyAlpha8,
    Rgb8,
    Rgba8,
    Grey16,
    Rgb16,
    Rgba16,
    Palette { bits: u8, alpha: bool },
    Jpeg { grey: bool },
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Grey8),
        Just(Kind::GreyAlpha8),
        Just(Kind::Rgb8),
        Just(Kind::Rgba8),
        Just(Kind::Grey16),
        Just(Kind::Rgb16),
        Just(Kind::Rgba16),
        (
            prop_oneof![Just(1u8), Just(2), Just(4), Just(8)],
            any::<bool>()
        )
            .prop_map(|(bits, alpha)| Kind::Palette { bits, alpha }),
        any::<bool>().prop_map(|grey| Kind::Jpeg { grey }),
    ]
}

#[derive(Debug, Clone)]
enum Damage {
    None,
    /// Keep this fraction (per mille) of the bytes.
    Truncate(u32),
    /// Overwrite one byte.
    Byte {
        at: u32,
        value: u8,
    },
    /// Declare other dimensions in the header (PNG: IHDR with a valid CRC; JPEG: SOF).
    Dims {
        w: u32,
        h: u32,
    },
}

fn damage() -> impl Strategy<Value = Damage> {
    let side = prop_oneof![
        Just(0u32),
        1..64u32,
        Just(MAX_IMAGE_SIDE),
        Just(65_535),
        Just(u32::MAX)
    ];
    prop_oneof![
        Just(Damage::None),
        (0..1000u32).prop_map(Damage::Truncate),
        (any::<u32>(), any::<u8>()).prop_map(|(at, value)| Damage::Byte { at, value }),
        (side.clone(), side).prop_map(|(w, h)| Damage::Dims { w, h }),
    ]
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// An encoded image of `kind`, `w` x `h`, with deterministic pixel values.
fn encode(kind: Kind, w: u32, h: u32, seed: u8) -> Vec<u8> {
    let px = |i: usize| seed.wrapping_add((i * 37 % 251) as u8);
    let n = (w * h) as usize;
    let mut out = Vec::new();
    let png = |color: png::ColorType,
               depth: png::BitDepth,
               data: &[u8],
               palette: Option<(Vec<u8>, Option<Vec<u8>>)>| {
        let mut buf = Vec::new();
        {
            let mut e = png::Encoder::new(&mut buf, w, h);
            e.set_color(color);
            e.set_depth(depth);
            if let Some((p, trns)) = palette {
                e.set_palette(p);
                if let Some(t) = trns {
                    e.set_trns(t);
                }
            }
            let mut wr = e.write_header().expect("png header");
            wr.write_image_data(data).expect("png data");
        }
        buf
    };
    use png::{BitDepth as D, ColorType as C};
    let bytes = |count: usize| (0..count).map(px).collect::<Vec<u8>>();
    match kind {
        Kind::Grey8 => out = png(C::Grayscale, D::Eight, &bytes(n), None),
        Kind::GreyAlpha8 => out = png(C::GrayscaleAlpha, D::Eight, &bytes(2 * n), None),
        Kind::Rgb8 => out = png(C::Rgb, D::Eight, &bytes(3 * n), None),
        Kind::Rgba8 => out = png(C::Rgba, D::Eight, &bytes(4 * n), None),
        Kind::Grey16 => out = png(C::Grayscale, D::Sixteen, &bytes(2 * n), None),
        Kind::Rgb16 => out = png(C::Rgb, D::Sixteen, &bytes(6 * n), None),
        Kind::Rgba16 => out = png(C::Rgba, D::Sixteen, &bytes(8 * n), None),
        Kind::Palette { bits, alpha } => {
            let colours = 1usize << bits;
            let row = (w as usize * bits as usize).div_ceil(8);
            let data = bytes(row * h as usize);
            let palette = bytes(3 * colours);
            let trns = alpha.then(|| bytes(colours));
            let depth = match bits {
                1 => D::One,
                2 => D::Two,
                4 => D::Four,
                _ => D::Eight,
            };
            out = png(C::Indexed, depth, &data, Some((palette, trns)));
        }
        Kind::Jpeg { grey } => {
            let img = if grey {
                image::DynamicImage::ImageLuma8(
                    image::GrayImage::from_raw(w, h, bytes(n)).expect("grey"),
                )
            } else {
                image::DynamicImage::ImageRgb8(
                    image::RgbImage::from_raw(w, h, bytes(3 * n)).expect("rgb"),
                )
            };
            img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Jpeg)
                .expect("jpeg");
        }
    }
    out
}

fn apply(kind: Kind, bytes: &mut Vec<u8>, damage: &Damage) {
    match damage {
        Damage::None => {}
        Damage::Truncate(keep) => bytes.truncate(bytes.len() * *keep as usize / 1000),
        Damage::Byte { at, value } => {
            let i = *at as usize % bytes.len();
            bytes[i] = *value;
        }
        Damage::Dims { w, h } => match kind {
            Kind::Jpeg { .. } => {
                // SOF0/SOF2: FF C0|C2, length (2), precision (1), height (2), width (2)
                if let Some(i) = bytes
                    .windows(2)
                    .position(|m| m[0] == 0xFF && (m[1] == 0xC0 || m[1] == 0xC2))
                {
                    let (h16, w16) = ((*h).min(65_535) as u16, (*w).min(65_535) as u16);
                    bytes[i + 5..i + 7].copy_from_slice(&h16.to_be_bytes());
                    bytes[i + 7..i + 9].copy_from_slice(&w16.to_be_bytes());
                }
            }
            _ => {
                // IHDR data at 16..29, its CRC at 29..33 (over the type and data, 12..29)
                bytes[16..20].copy_from_slice(&w.to_be_bytes());
                bytes[20..24].copy_from_slice(&h.to_be_bytes());
                let crc = crc32(&bytes[12..29]);
                bytes[29..33].copy_from_slice(&crc.to_be_bytes());
            }
        },
    }
}

fn ext(kind: Kind) -> &'static str {
    match kind {
        Kind::Jpeg { .. } => "jpg",
        _ => "png",
    }
}

fn write(name: &str, bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join(name);
    std::fs::write(&p, bytes).expect("write");
    (dir, p)
}

fn check_read(path: &Path, len: usize) -> Result<Option<image::RgbImage>, TestCaseError> {
    take_largest_allocation();
    let r = read_rgb8(path);
    let largest = take_largest_allocation();
    // The decoder is held to decode_limit; RGB conversion of grey images triples it.
    let bound = 3 * decode_limit(len as u64) as usize + (1 << 20);
    prop_assert!(
        largest <= bound,
        "allocated {largest} bytes for a {len}-byte file"
    );
    match r {
        Ok(img) => Ok(Some(img)),
        Err(e) => {
            let msg = e.to_string();
            prop_assert!(
                msg.contains(&*path.to_string_lossy()),
                "names the file: {msg}"
            );
            prop_assert!(msg.contains("cannot read image"), "{msg}");
            Ok(None)
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn images_read_or_fail_cleanly(
        kind in kind(),
        w in 1..24u32,
        h in 1..24u32,
        seed in any::<u8>(),
        damage in damage(),
    ) {
        let mut bytes = encode(kind, w, h, seed);
        let intact = bytes.clone();
        apply(kind, &mut bytes, &damage);
        let (_dir, p) = write(&format!("in.{}", ext(kind)), &bytes);
        let got = check_read(&p, bytes.len())?;
        if bytes == intact {
            // Undamaged: the declared size, and the exact pixels for lossless grey/RGB PNGs.
            let img = got.as_ref().expect("an intact image reads");
            prop_assert_eq!(img.dimensions(), (w, h));
            if let Kind::Rgb8 = kind {
                let want: Vec<u8> = (0..(3 * w * h) as usize)
                    .map(|i| seed.wrapping_add((i * 37 % 251) as u8))
                    .collect();
                prop_assert_eq!(img.as_raw(), &want);
            }
            if let Kind::Grey8 = kind {
                let g = seed.wrapping_add(0);
                prop_assert_eq!(img.get_pixel(0, 0).0, [g, g, g]);
            }
        }
        if let Some(img) = got {
            prop_assert!(img.width() <= MAX_IMAGE_SIDE && img.height() <= MAX_IMAGE_SIDE);
            let t = from_rgb8(&img, &Device::Cpu).expect("any RGB image converts");
            prop_assert_eq!(t.dims(), &[1, 3, img.height() as usize, img.width() as usize]);
        }
    }

    #[test]
    fn random_bytes_are_not_images(bytes in prop::collection::vec(any::<u8>(), 0..256), png in any::<bool>()) {
        let mut data = if png { b"\x89PNG\r\n\x1a\n".to_vec() } else { vec![0xFF, 0xD8, 0xFF] };
        data.extend_from_slice(&bytes);
        let (_dir, p) = write(if png { "x.png" } else { "x.jpg" }, &data);
        check_read(&p, data.len())?;
    }

    #[test]
    fn model_index_files_fail_cleanly(
        class in prop_oneof![
            Just(serde_json::json!("StableDiffusionPipeline")),
            Just(serde_json::json!("StableDiffusionXLPipeline")),
            Just(serde_json::json!("StableDiffusionXLImg2ImgPipeline")),
            Just(serde_json::json!("FluxPipeline")),
            Just(serde_json::Value::Null),
            Just(serde_json::json!(7)),
            Just(serde_json::json!(["a"])),
        ],
        entries in prop::collection::vec((
            prop_oneof![
                Just("unet"), Just("vae"), Just("text_encoder"), Just("text_encoder_2"),
                Just("scheduler"), Just("force_zeros_for_empty_prompt"),
                Just("requires_aesthetics_score"), Just("_diffusers_version"), Just("other"),
            ],
            prop_oneof![
                Just(serde_json::json!(["diffusers", "UNet2DConditionModel"])),
                Just(serde_json::json!([null, null])),
                Just(serde_json::json!(["diffusers"])),
                Just(serde_json::json!([1, 2])),
                Just(serde_json::json!(true)),
                Just(serde_json::json!("yes")),
                Just(serde_json::json!({})),
                Just(serde_json::json!(1e308)),
            ],
        ), 0..8),
        drop_class in any::<bool>(),
        truncate in prop::option::of(0..200usize),
    ) {
        let mut obj = serde_json::Map::new();
        let class_is_sd = class == "StableDiffusionPipeline";
        if !drop_class {
            obj.insert("_class_name".into(), class);
        }
        for (k, v) in entries {
            obj.insert(k.into(), v);
        }
        let is_sd = !drop_class && class_is_sd && truncate.is_none();
        let mut text = serde_json::Value::Object(obj).to_string();
        if let Some(t) = truncate {
            text.truncate(t.min(text.len()));
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("model_index.json"), &text).expect("write");
        match ModelIndex::read(dir.path()) {
            Ok(index) => {
                // Components are exactly the [library, class] string pairs.
                for (name, (lib, class)) in &index.components {
                    prop_assert!(!name.starts_with('_'));
                    prop_assert_eq!((lib.as_str(), class.as_str()), ("diffusers", "UNet2DConditionModel"));
                }
                match index.family() {
                    Ok(f) => prop_assert!(!is_sd || f == sd_pipeline::ModelFamily::Sd),
                    Err(e) => {
                        prop_assert!(!is_sd, "an SD index has a family: {}", e);
                        prop_assert!(e.to_string().contains("model_index.json"), "{}", e);
                    }
                }
            }
            Err(e) => prop_assert!(e.to_string().contains("model_index.json"), "{}", e),
        }
    }
}

/// A 1x1 PNG whose header (with a valid CRC) declares 8000 x 8000: 192 MB decoded, under the
/// image crate's default 512 MiB limit, so the decoder used to allocate it before finding the
/// data missing. The limit scaled to the file's size refuses it before any allocation.
#[test]
fn huge_declared_png_is_refused_before_allocating() {
    let mut bytes = encode(Kind::Rgb8, 1, 1, 7);
    apply(Kind::Rgb8, &mut bytes, &Damage::Dims { w: 8000, h: 8000 });
    let (_dir, p) = write("bomb.png", &bytes);
    take_largest_allocation();
    let e = read_rgb8(&p)
        .expect_err("8000 x 8000 from a few bytes")
        .to_string();
    let largest = take_largest_allocation();
    assert!(largest < 32 << 20, "allocated {largest} bytes");
    assert!(e.contains("bomb.png") && e.contains("MiB for this"), "{e}");
}
