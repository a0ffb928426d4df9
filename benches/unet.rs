//! Criterion bench of the UNet forward pass (sd-unet), on the CPU:
//! - the tiny sd1 and sdxl fixture UNets (batch 2, 8x8 latents);
//! - the real SD 1.5 config with deterministic random weights, batch 2, 32x32 latents, in f32
//!   and bf16 (64x64, SD 1.5's native latent size, too with `SD_BENCH_LARGE=1`: ~1.6 TFLOP a
//!   forward, tens of seconds each on 2 cores).
//!
//! Throughput is reported in FLOPs (criterion's "elements"): sd-unet's analytic count, equal
//! to torch's FlopCounterMode for diffusers' model.
//!
//! ```text
//! cargo bench --bench unet                      # fixtures + SD 1.5 at 32x32
//! SD_BENCH_LARGE=1 cargo bench --bench unet     # + SD 1.5 at 64x64
//! ```

use std::path::Path;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sd_rs::core::{LoadOptions, TorchGenerator, VarBuilder};
use sd_rs::unet::flops::forward_flops;
use sd_rs::unet::{AddedCond, UNet2DConditionModel, UNetConfig};

const SEQ_LEN: usize = 77;
const SD15: &str = include_str!("../crates/sd-unet/tests/data/sd15_unet_config.json");

struct Inputs {
    sample: Tensor,
    ehs: Tensor,
    added: Option<AddedCond>,
}

fn inputs(cfg: &UNetConfig, batch: usize, side: usize, dtype: DType) -> Inputs {
    let mut g = TorchGenerator::new(1);
    let mut randn = |shape: &[usize]| {
        let n = shape.iter().product();
        Tensor::from_vec(g.randn(n), shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("bench input")
    };
    let sample = randn(&[batch, cfg.in_channels, side, side]);
    let ehs = randn(&[batch, SEQ_LEN, cfg.cross_attention_dim]);
    let added = cfg.text_time.as_ref().map(|tt| {
        let n = 6;
        let pooled = tt.projection_class_embeddings_input_dim - n * tt.addition_time_embed_dim;
        AddedCond {
            text_embeds: randn(&[batch, pooled]),
            time_ids: Tensor::ones((batch, n), DType::F32, &Device::Cpu).expect("time ids"),
        }
    });
    Inputs { sample, ehs, added }
}

fn bench_case(
    c: &mut Criterion,
    group: &str,
    id: String,
    unet: &UNet2DConditionModel,
    batch: usize,
    side: usize,
) {
    let cfg = unet.config();
    let x = inputs(cfg, batch, side, unet.dtype());
    let flops = forward_flops(cfg, batch, side, side, SEQ_LEN);
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(flops));
    if flops > 1_000_000_000 {
        // Seconds per iteration: the minimum number of samples, no long warm-up.
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(1))
            .measurement_time(Duration::from_secs(1));
    }
    g.bench_function(BenchmarkId::from_parameter(id), |b| {
        b.iter(|| {
            unet.forward(&x.sample, 999.0, &x.ehs, x.added.as_ref())
                .expect("forward")
        })
    });
    g.finish();
}

fn fixtures(c: &mut Criterion) {
    for family in ["sd1", "sdxl"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models")
            .join(family)
            .join("unet");
        let unet = UNet2DConditionModel::load(&dir, &LoadOptions::default()).expect("fixture");
        bench_case(
            c,
            "unet_forward/fixture",
            format!("cpu-f32/{family}/b2-8x8"),
            &unet,
            2,
            8,
        );
    }
}

fn sd15(c: &mut Criterion) {
    let mut sides = vec![32];
    if std::env::var("SD_BENCH_LARGE").is_ok_and(|v| v == "1") {
        sides.push(64);
    }
    for (dtype, name) in [(DType::F32, "f32"), (DType::BF16, "bf16")] {
        let config = UNetConfig::from_json_str(SD15, Path::new("sd15/unet/config.json"))
            .expect("SD 1.5 config");
        let vb = VarBuilder::random(0, dtype, &Device::Cpu);
        let unet = UNet2DConditionModel::from_config(config, &vb).expect("SD 1.5 UNet");
        for &side in &sides {
            bench_case(
                c,
                "unet_forward/sd15-random",
                format!("cpu-{name}/b2-{side}x{side}"),
                &unet,
                2,
                side,
            );
        }
    }
}

criterion_group!(benches, fixtures, sd15);
criterion_main!(benches);
