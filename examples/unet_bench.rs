//! Times UNet forward passes, for people benchmarking kernels.
//!
//! ```text
//! cargo run --release --example unet_bench -- --config sd15 --latent 64 --batch 2 --dtype f32 --runs 3 --warmup 1
//! cargo run --release --example unet_bench -- --model path/to/unet --dtype bf16
//! ```
//!
//! `--config sd15|sd21|sdxl|refiner` builds the UNet of that real config (the config.json files
//! in crates/sd-unet/tests/data) with deterministic random weights; `--model DIR` loads a
//! diffusers `unet/` folder instead. Prints one line per run and, last, one machine-readable
//! line: `SUMMARY median_s=<s> min_s=<s> gflop=<analytic GFLOP of one forward>
//! peak_rss_mib=<VmHWM>`. tools/bench/torch_unet.py is the PyTorch twin (same flags, same line).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use sd_rs::core::{LoadOptions, TorchGenerator, VarBuilder};
use sd_rs::unet::flops::forward_flops;
use sd_rs::unet::{AddedCond, UNet2DConditionModel, UNetConfig};

const SEQ_LEN: usize = 77;

/// The real configs, as shipped with the weights (test data of sd-unet).
fn real_config(name: &str) -> Result<&'static str> {
    Ok(match name {
        "sd15" => include_str!("../crates/sd-unet/tests/data/sd15_unet_config.json"),
        "sd21" => include_str!("../crates/sd-unet/tests/data/sd21_unet_config.json"),
        "sdxl" => include_str!("../crates/sd-unet/tests/data/sdxl_base_unet_config.json"),
        "refiner" => include_str!("../crates/sd-unet/tests/data/sdxl_refiner_unet_config.json"),
        other => bail!("--config {other}: expected sd15, sd21, sdxl or refiner"),
    })
}

struct Args {
    config: String,
    model: Option<PathBuf>,
    runs: usize,
    warmup: usize,
    latent: usize,
    batch: usize,
    dtype: DType,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        config: "sd15".into(),
        model: None,
        runs: 3,
        warmup: 1,
        latent: 64,
        batch: 2,
        dtype: DType::F32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--config" => a.config = value()?,
            "--model" => a.model = Some(PathBuf::from(value()?)),
            "--runs" => a.runs = value()?.parse()?,
            "--warmup" => a.warmup = value()?.parse()?,
            "--latent" => a.latent = value()?.parse()?,
            "--batch" => a.batch = value()?.parse()?,
            "--dtype" => {
                a.dtype = match value()?.as_str() {
                    "f32" => DType::F32,
                    "f16" => DType::F16,
                    "bf16" => DType::BF16,
                    other => bail!("--dtype {other}: expected f32, f16 or bf16"),
                }
            }
            "-h" | "--help" => {
                println!(
                    "unet_bench [--config sd15|sd21|sdxl|refiner | --model DIR] [--runs N] \
                     [--warmup N] [--latent N] [--batch N] [--dtype f32|f16|bf16]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown flag {other}"),
        }
    }
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    Ok(a)
}

/// Peak resident set size (VmHWM) in MiB, from /proc/self/status (0 where unavailable).
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

fn randn(g: &mut TorchGenerator, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let n = shape.iter().product();
    Ok(Tensor::from_vec(g.randn(n), shape, &Device::Cpu)?.to_dtype(dtype)?)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    println!("{}", sd_rs::kernels::isa::describe());
    let dev = Device::Cpu;
    let t0 = Instant::now();
    let unet = match &args.model {
        Some(dir) => {
            let opts = LoadOptions {
                dtype: args.dtype,
                device: dev.clone(),
                variant: None,
            };
            UNet2DConditionModel::load(dir, &opts)?
        }
        None => {
            let path = PathBuf::from(format!("{}/unet/config.json", args.config));
            let config = UNetConfig::from_json_str(real_config(&args.config)?, &path)?;
            let vb = VarBuilder::random(0, args.dtype, &dev);
            UNet2DConditionModel::from_config(config, &vb)?
        }
    };
    let cfg = unet.config().clone();
    let what = args
        .model
        .as_ref()
        .map_or(args.config.clone(), |p| p.display().to_string());
    println!(
        "model {what} ({:?}, cpu) built in {:.1} s; batch {}, latent {}x{}, {} tokens",
        args.dtype,
        t0.elapsed().as_secs_f64(),
        args.batch,
        args.latent,
        args.latent,
        SEQ_LEN
    );

    let (b, s) = (args.batch, args.latent);
    let mut g = TorchGenerator::new(1);
    let sample = randn(&mut g, &[b, cfg.in_channels, s, s], args.dtype)?;
    let ehs = randn(&mut g, &[b, SEQ_LEN, cfg.cross_attention_dim], args.dtype)?;
    let added = match &cfg.text_time {
        Some(tt) => {
            // Only the shapes matter for timing: 6 time ids (SDXL base) when they fit, else 5.
            let d = tt.addition_time_embed_dim;
            let p = tt.projection_class_embeddings_input_dim;
            let n = if p > 6 * d { 6 } else { 5 };
            let ids: Vec<f32> = (0..b * n).map(|i| [1024.0, 0.0][i % 2]).collect();
            Some(AddedCond {
                text_embeds: randn(&mut g, &[b, p.saturating_sub(n * d)], args.dtype)?,
                time_ids: Tensor::from_vec(ids, (b, n), &dev)?,
            })
        }
        None => None,
    };
    let gflop = forward_flops(&cfg, b, s, s, SEQ_LEN) as f64 / 1e9;

    let mut times = Vec::with_capacity(args.runs);
    for i in 0..args.warmup + args.runs {
        let t = Instant::now();
        let out = unet.forward(&sample, 999.0, &ehs, added.as_ref())?;
        // Force the result (candle's CPU backend is eager, but be explicit).
        let _ = out.dims();
        let dt = t.elapsed().as_secs_f64();
        if i < args.warmup {
            println!("warmup {}: {dt:.3} s", i + 1);
        } else {
            println!(
                "run {}: {dt:.3} s ({:.1} GFLOP/s)",
                i + 1 - args.warmup,
                gflop / dt
            );
            times.push(dt);
        }
    }
    times.sort_by(f64::total_cmp);
    let median = if times.len() % 2 == 1 {
        times[times.len() / 2]
    } else {
        (times[times.len() / 2 - 1] + times[times.len() / 2]) / 2.0
    };
    println!(
        "SUMMARY median_s={median:.4} min_s={:.4} gflop={gflop:.1} peak_rss_mib={:.0}",
        times[0],
        peak_rss_mib()
    );
    Ok(())
}
