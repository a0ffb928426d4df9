//! Times one kernel-level operation, for people benchmarking kernels.
//!
//! ```text
//! cargo run --release --example op_bench -- --op linear --m 8192 --k 320 --n 320 --dtype bf16 --runs 10 --warmup 2
//! cargo run --release --example op_bench -- --suite unet-linears --dtype f32
//! SD_CPU_ISA=avx2 cargo run --release --example op_bench -- ...   # or --isa avx2
//! ```
//!
//! `--op linear` is `y = x W^T + b` (torch `F.linear`) with W packed once before timing;
//! `--impl candle` times candle's own matmul (+ bias) on the same shapes instead, the path
//! sd-rs used before sd-kernels. `--suite unet-linears` runs every distinct linear shape of
//! the SD 1.5 UNet at 64x64 latents, batch 2, one line each. Last line:
//! `SUMMARY median_s=<s> gflops=<GFLOP/s> isa=<path>` (for a suite: the sums over its shapes).
//! tools/bench/torch_ops.py is the PyTorch twin (same flags, same lines).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use half::bf16;
use sd_rs::kernels::{gemm, isa, AMatrix, BSource, DType, Element, Epilogue, Isa, PackedB};

/// (M, K, N) of every distinct linear (and 1x1 convolution) of the SD 1.5 UNet at 64x64
/// latents, batch 2 (M = 2 * H * W tokens; 154 = 2 x 77 text tokens for cross-attention k/v;
/// 2 = the batch for the time embedding).
const UNET_LINEARS: &[(usize, usize, usize)] = &[
    (8192, 320, 320),
    (154, 768, 320),
    (8192, 320, 2560),
    (8192, 1280, 320),
    (2048, 640, 640),
    (154, 768, 640),
    (2048, 640, 5120),
    (2048, 2560, 640),
    (512, 1280, 1280),
    (154, 768, 1280),
    (512, 1280, 10240),
    (512, 5120, 1280),
    (128, 1280, 1280),
    (128, 1280, 10240),
    (128, 5120, 1280),
    (2, 320, 1280),
    (2, 1280, 1280),
];

struct Args {
    shapes: Vec<(usize, usize, usize)>,
    dtype: DType,
    isa: Isa,
    candle: bool,
    runs: usize,
    warmup: usize,
}

fn parse_args() -> Result<Args> {
    let (mut m, mut k, mut n) = (8192, 320, 320);
    let mut suite = None;
    let mut a = Args {
        shapes: vec![],
        dtype: DType::F32,
        isa: Isa::current(),
        candle: false,
        runs: 10,
        warmup: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--op" => {
                let op = value()?;
                if op != "linear" {
                    bail!("--op {op}: expected linear");
                }
            }
            "--m" => m = value()?.parse()?,
            "--k" => k = value()?.parse()?,
            "--n" => n = value()?.parse()?,
            "--suite" => {
                let s = value()?;
                if s != "unet-linears" {
                    bail!("--suite {s}: expected unet-linears");
                }
                suite = Some(s);
            }
            "--dtype" => {
                a.dtype = match value()?.as_str() {
                    "f32" => DType::F32,
                    "bf16" => DType::Bf16,
                    other => bail!("--dtype {other}: expected f32 or bf16"),
                }
            }
            "--isa" => {
                let v = value()?;
                let want = Isa::from_name(&v).with_context(|| {
                    format!("--isa {v}: expected amx, avx512bf16, avx512, avx2 or generic")
                })?;
                if let Err(why) = want.supported() {
                    bail!("--isa {v}: {why}");
                }
                a.isa = want;
            }
            "--impl" => {
                a.candle = match value()?.as_str() {
                    "kernels" => false,
                    "candle" => true,
                    other => bail!("--impl {other}: expected kernels or candle"),
                }
            }
            "--runs" => a.runs = value()?.parse()?,
            "--warmup" => a.warmup = value()?.parse()?,
            "-h" | "--help" => {
                println!(
                    "op_bench [--op linear --m M --k K --n N | --suite unet-linears] \
                     [--dtype f32|bf16] [--isa NAME] [--impl kernels|candle] [--runs N] [--warmup N]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown flag {other}"),
        }
    }
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    a.shapes = match suite {
        Some(_) => UNET_LINEARS.to_vec(),
        None => vec![(m, k, n)],
    };
    Ok(a)
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32
                / (1u32 << 24) as f32)
                - 0.5
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let h = v.len() / 2;
    if v.len() % 2 == 1 {
        v[h]
    } else {
        (v[h - 1] + v[h]) / 2.0
    }
}

fn time_kernels<T: Element>(
    args: &Args,
    (m, k, n): (usize, usize, usize),
    from: fn(f32) -> T,
) -> Result<f64> {
    let x: Vec<T> = values(m * k, 1).into_iter().map(from).collect();
    let w: Vec<T> = values(n * k, 2).into_iter().map(from).collect();
    let bias = values(n, 3);
    let packed = PackedB::pack(
        BSource::linear_weight(&w, n, k),
        args.isa,
        args.dtype,
        false,
    )?;
    let mut y: Vec<T> = vec![from(0.0); m * n];
    let epi = Epilogue {
        bias: Some(&bias),
        ..Epilogue::default()
    };
    let mut times = Vec::new();
    for i in 0..args.warmup + args.runs {
        let t = Instant::now();
        gemm(
            AMatrix {
                data: &x,
                rows: m,
                stride: k,
            },
            &packed,
            &mut y,
            n,
            &epi,
        )?;
        if i >= args.warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(median(times))
}

fn time_candle(args: &Args, (m, k, n): (usize, usize, usize)) -> Result<f64> {
    use candle_core::{DType as CDType, Device, Tensor};
    let dt = match args.dtype {
        DType::F32 => CDType::F32,
        DType::Bf16 => CDType::BF16,
    };
    let dev = Device::Cpu;
    let x = Tensor::from_vec(values(m * k, 1), (m, k), &dev)?.to_dtype(dt)?;
    let w = Tensor::from_vec(values(n * k, 2), (n, k), &dev)?.to_dtype(dt)?;
    let b = Tensor::from_vec(values(n, 3), n, &dev)?.to_dtype(dt)?;
    let mut times = Vec::new();
    for i in 0..args.warmup + args.runs {
        let t = Instant::now();
        // sd-rs before sd-kernels: candle has no bf16 matmul on the CPU, so bf16 operands
        // (weights included) were widened to f32 on every call and the result rounded back.
        let y = if dt == CDType::BF16 {
            x.to_dtype(CDType::F32)?
                .matmul(&w.to_dtype(CDType::F32)?.t()?)?
                .broadcast_add(&b.to_dtype(CDType::F32)?)?
                .to_dtype(CDType::BF16)?
        } else {
            x.matmul(&w.t()?)?.broadcast_add(&b)?
        };
        let _ = y.dims();
        if i >= args.warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(median(times))
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let path = if args.candle {
        "candle".to_string()
    } else {
        args.isa.to_string()
    };
    println!("{}", isa::describe());
    println!(
        "threads {}, dtype {:?}, impl {}",
        sd_rs::kernels::default_threads(),
        args.dtype,
        if args.candle { "candle" } else { "kernels" }
    );
    let (mut total_s, mut total_gflop) = (0.0, 0.0);
    for &shape in &args.shapes {
        let (m, k, n) = shape;
        let s = if args.candle {
            time_candle(&args, shape)?
        } else {
            match args.dtype {
                DType::F32 => time_kernels::<f32>(&args, shape, |x| x)?,
                DType::Bf16 => time_kernels::<bf16>(&args, shape, bf16::from_f32)?,
            }
        };
        let gflop = 2.0 * (m * k * n) as f64 / 1e9;
        println!(
            "linear m={m} k={k} n={n} median_s={s:.6} gflops={:.1}",
            gflop / s
        );
        total_s += s;
        total_gflop += gflop;
    }
    println!(
        "SUMMARY median_s={total_s:.6} gflops={:.1} isa={path}",
        total_gflop / total_s
    );
    Ok(())
}
