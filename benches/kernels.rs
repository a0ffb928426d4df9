//! Criterion bench of sd-kernels' packed GEMM (`y = x W^T + b`, W packed once) on SD 1.5 UNet
//! linear shapes (64x64 latents, batch 2), grouped by kernel path: every path the host has, in
//! f32 and bf16. Throughput is in FLOPs (criterion's "elements"); the host's CPU model and the
//! default path are printed first. The PyTorch twin of these shapes is
//! `tools/bench/torch_ops.py --suite unet-linears` (see docs/performance.md).
//!
//! ```text
//! cargo bench --bench kernels
//! ```

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use sd_rs::kernels::{gemm, isa, AMatrix, BSource, DType, Element, Epilogue, Isa, PackedB};

/// (M, K, N): attention projections at 64x64, the GEGLU projection at 32x32, a 16x16 square
/// layer, cross-attention keys from the 77 text tokens.
const SHAPES: &[(usize, usize, usize)] = &[
    (8192, 320, 320),
    (2048, 640, 5120),
    (512, 1280, 1280),
    (154, 768, 320),
];

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32
                / (1u32 << 24) as f32
                - 0.5
        })
        .collect()
}

fn bench_path<T: Element>(c: &mut Criterion, isa: Isa, dtype: DType, from: fn(f32) -> T) {
    let name = match dtype {
        DType::F32 => "f32",
        DType::Bf16 => "bf16",
    };
    let mut group = c.benchmark_group(format!("linear/{isa}/{name}"));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(3));
    for &(m, k, n) in SHAPES {
        let x: Vec<T> = values(m * k, 1).into_iter().map(from).collect();
        let w: Vec<T> = values(n * k, 2).into_iter().map(from).collect();
        let bias = values(n, 3);
        let packed =
            PackedB::pack(BSource::linear_weight(&w, n, k), isa, dtype, false).expect("pack");
        let mut y: Vec<T> = vec![from(0.0); m * n];
        let epi = Epilogue {
            bias: Some(&bias),
            ..Epilogue::default()
        };
        group.throughput(Throughput::Elements(2 * (m * k * n) as u64));
        group.bench_function(
            BenchmarkId::from_parameter(format!("m{m}-k{k}-n{n}")),
            |b| {
                b.iter(|| {
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
                    )
                    .expect("gemm")
                })
            },
        );
    }
    group.finish();
}

fn kernels(c: &mut Criterion) {
    println!("{}", isa::describe());
    for path in Isa::ALL {
        if let Err(why) = path.supported() {
            println!("SKIPPED linear/{path}: {why}");
            continue;
        }
        bench_path::<f32>(c, path, DType::F32, |x| x);
        bench_path::<bf16>(c, path, DType::Bf16, bf16::from_f32);
    }
}

criterion_group!(benches, kernels);
criterion_main!(benches);
