//! Times a whole text-to-image generation on the CPU: the text encoder (prompt and negative
//! prompt), `--steps` UNet evaluations with classifier-free guidance (batch 2) and Euler
//! steps, and the VAE decode, on the real SD 1.5 configs with deterministic random weights.
//!
//! ```text
//! cargo run --release --example pipeline_bench -- --config sd15 --size 512 --steps 20 --dtype f32
//! cargo run --release --example pipeline_bench -- --config sdxl --stage vae --size 1024 --dtype bf16
//! ```
//!
//! `--stage all` (default) runs the three models; `--stage vae` decodes one latent only (with
//! `--config sdxl`, SDXL's VAE: 1024x1024 from 128x128 latents; `--tile` decodes it tiled, as
//! diffusers' `enable_tiling`). The last line is machine-readable:
//! `SUMMARY total_s=<s> unet_s=<s> vae_s=<s> text_s=<s> peak_rss_mib=<VmHWM>`.
//! tools/bench/torch_pipeline.py is the diffusers twin (same flags, same line).
//!
//! `--config sdxl --stage load` builds everything the SDXL ensemble of experts keeps in memory
//! (base and refiner UNets, the VAE, CLIP ViT-L and OpenCLIP ViT-bigG with its projection) in
//! `--dtype` and ends with `SUMMARY load_s=<s> peak_rss_mib=<VmHWM>`: the memory check of
//! docs/performance.md.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use sd_rs::clip::{ClipTextConfig, ClipTextConfigJson, ClipTextModel};
use sd_rs::core::{TorchGenerator, VarBuilder};
use sd_rs::schedulers::{from_config_json, SchedulerKind};
use sd_rs::unet::{UNet2DConditionModel, UNetConfig};
use sd_rs::vae::{AutoencoderKL, TileConfig, VaeConfig, VaeConfigJson};

const SEQ_LEN: usize = 77;

struct Args {
    config: String,
    stage: String,
    size: usize,
    steps: usize,
    dtype: DType,
    tile: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        config: "sd15".into(),
        stage: "all".into(),
        size: 512,
        steps: 20,
        dtype: DType::F32,
        tile: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--config" => a.config = value()?,
            "--stage" => a.stage = value()?,
            "--size" => a.size = value()?.parse()?,
            "--steps" => a.steps = value()?.parse()?,
            "--tile" => a.tile = true,
            "--dtype" => {
                a.dtype = match value()?.as_str() {
                    "f32" => DType::F32,
                    "bf16" => DType::BF16,
                    "f16" => DType::F16,
                    other => bail!("--dtype {other}: expected f32, f16 or bf16"),
                }
            }
            "-h" | "--help" => {
                println!(
                    "pipeline_bench [--config sd15|sdxl] [--stage all|vae|load] [--size PIXELS] \
                     [--steps N] [--dtype f32|bf16|f16] [--tile]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown flag {other}"),
        }
    }
    if !["all", "vae", "load"].contains(&a.stage.as_str()) {
        bail!("--stage {}: expected all, vae or load", a.stage);
    }
    if a.stage == "load" && a.config != "sdxl" {
        bail!("--stage load: expected --config sdxl (the base + refiner ensemble)");
    }
    if a.config != "sd15" && a.stage == "all" {
        bail!(
            "--config {}: only sd15 has the whole pipeline here (use --stage vae)",
            a.config
        );
    }
    if a.size == 0 || !a.size.is_multiple_of(8) {
        bail!("--size {}: expected a positive multiple of 8", a.size);
    }
    Ok(a)
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn vae(name: &str, dtype: DType) -> Result<AutoencoderKL> {
    let (text, file) = match name {
        "sd15" => (
            include_str!("configs/sd15_vae_config.json"),
            "sd15_vae_config.json",
        ),
        _ => (
            include_str!("configs/sdxl_vae_config.json"),
            "sdxl_vae_config.json",
        ),
    };
    let raw: VaeConfigJson = serde_json::from_str(text)?;
    let config = VaeConfig::from_json(raw, Path::new(file))?;
    let vb = VarBuilder::random(2, dtype, &Device::Cpu);
    Ok(AutoencoderKL::from_var_builder(&vb, config)?)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    println!("{}", sd_rs::kernels::isa::describe());
    let dev = Device::Cpu;
    let latent = args.size / 8;
    let mut g = TorchGenerator::new(1);
    let randn = |g: &mut TorchGenerator, shape: &[usize]| -> Result<Tensor> {
        let n = shape.iter().product();
        Ok(Tensor::from_vec(g.randn(n), shape, &dev)?)
    };

    if args.stage == "load" {
        return load_ensemble(args.dtype);
    }
    let mut vae = vae(&args.config, args.dtype)?;
    if args.tile {
        vae.enable_tiling(None::<TileConfig>)?;
    }
    let (mut text_s, mut unet_s) = (0.0, 0.0);
    let latents = if args.stage == "vae" {
        randn(&mut g, &[1, 4, latent, latent])?
    } else {
        let te_json: ClipTextConfigJson =
            serde_json::from_str(include_str!("configs/sd15_text_encoder_config.json"))?;
        let te_config = ClipTextConfig::from_json(&te_json, Path::new("text_encoder/config.json"))?;
        let text_encoder = ClipTextModel::new(te_config, &VarBuilder::random(3, args.dtype, &dev))?;
        let unet_config = UNetConfig::from_json_str(
            include_str!("../crates/sd-unet/tests/data/sd15_unet_config.json"),
            &PathBuf::from("unet/config.json"),
        )?;
        let unet = UNet2DConditionModel::from_config(
            unet_config,
            &VarBuilder::random(0, args.dtype, &dev),
        )?;
        let mut scheduler = from_config_json(
            include_str!("../crates/sd-schedulers/tests/data/sd15_scheduler_config.json"),
            Path::new("scheduler/scheduler_config.json"),
            Some(SchedulerKind::Euler),
        )?;
        println!(
            "models built; {} steps at {}x{}, {:?}",
            args.steps, args.size, args.size, args.dtype
        );

        // 1. Text: the negative and the positive prompt, one batch of 2 (token ids of a
        // typical prompt: bos, 20 words, eos, padding).
        let t = Instant::now();
        let mut ids = vec![49407u32; 2 * SEQ_LEN];
        for (row, seq) in ids.chunks_mut(SEQ_LEN).enumerate() {
            seq[0] = 49406;
            for (i, id) in seq.iter_mut().enumerate().skip(1).take(20 * row) {
                *id = 320 + i as u32;
            }
        }
        let ids = Tensor::from_vec(ids, (2, SEQ_LEN), &dev)?;
        let context = text_encoder.forward(&ids)?.last_hidden_state;
        text_s = t.elapsed().as_secs_f64();

        // 2. Denoising with classifier-free guidance.
        let t = Instant::now();
        scheduler.set_timesteps(args.steps)?;
        let mut x = (randn(&mut g, &[1, 4, latent, latent])? * scheduler.init_noise_sigma())?;
        let timesteps = scheduler.timesteps().to_vec();
        for (i, ts) in timesteps.iter().enumerate() {
            let input = scheduler.scale_model_input(&Tensor::cat(&[&x, &x], 0)?, i)?;
            let eps = unet
                .forward(&input, *ts, &context, None)?
                .to_dtype(DType::F32)?;
            let (uncond, cond) = (eps.narrow(0, 0, 1)?, eps.narrow(0, 1, 1)?);
            let guided = (&uncond + ((cond - &uncond)? * 7.5)?)?;
            x = scheduler.step(&guided, i, &x, &mut g)?.prev_sample;
        }
        unet_s = t.elapsed().as_secs_f64();
        println!(
            "text {text_s:.2} s, {} UNet steps {unet_s:.2} s",
            args.steps
        );
        (x / vae.config().scaling_factor)?
    };

    // 3. Decode.
    let t = Instant::now();
    let image = vae.decode(&latents)?;
    let _ = image.dims();
    let vae_s = t.elapsed().as_secs_f64();
    println!("vae decode {vae_s:.2} s");
    println!(
        "SUMMARY total_s={:.3} unet_s={unet_s:.3} vae_s={vae_s:.3} text_s={text_s:.3} peak_rss_mib={:.0}",
        text_s + unet_s + vae_s,
        peak_rss_mib()
    );
    Ok(())
}

/// Builds the SDXL ensemble's models (random weights, real configs) and reports the peak RSS.
fn load_ensemble(dtype: DType) -> Result<()> {
    let dev = Device::Cpu;
    let t = Instant::now();
    let text_encoder = |json: &str, path: &str, seed: u64| -> Result<ClipTextModel> {
        let raw: ClipTextConfigJson = serde_json::from_str(json)?;
        let config = ClipTextConfig::from_json(&raw, Path::new(path))?;
        Ok(ClipTextModel::new(
            config,
            &VarBuilder::random(seed, dtype, &dev),
        )?)
    };
    let unet = |json: &str, seed: u64| -> Result<UNet2DConditionModel> {
        let config = UNetConfig::from_json_str(json, &PathBuf::from("unet/config.json"))?;
        Ok(UNet2DConditionModel::from_config(
            config,
            &VarBuilder::random(seed, dtype, &dev),
        )?)
    };
    let models = (
        unet(
            include_str!("../crates/sd-unet/tests/data/sdxl_base_unet_config.json"),
            0,
        )?,
        unet(
            include_str!("../crates/sd-unet/tests/data/sdxl_refiner_unet_config.json"),
            1,
        )?,
        vae("sdxl", dtype)?,
        // SDXL's text_encoder has CLIP ViT-L's config, the one of SD 1.5.
        text_encoder(
            include_str!("configs/sd15_text_encoder_config.json"),
            "text_encoder/config.json",
            3,
        )?,
        text_encoder(
            include_str!("configs/sdxl_text_encoder_2_config.json"),
            "text_encoder_2/config.json",
            4,
        )?,
    );
    let load_s = t.elapsed().as_secs_f64();
    println!(
        "loaded base + refiner UNets, VAE, both text encoders ({dtype:?}) in {load_s:.1} s; \
         text_encoder_2 projection: {:?}",
        models.4.config().projection_dim
    );
    println!(
        "SUMMARY load_s={load_s:.3} peak_rss_mib={:.0}",
        peak_rss_mib()
    );
    drop(models);
    Ok(())
}
