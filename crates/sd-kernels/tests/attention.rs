//! Blocked attention against an f64 reference on the same (for bf16: rounded) inputs, on every
//! kernel path (native where the host has it, skips reported; emulated otherwise): the UNet's
//! self-attention (several query blocks, odd lengths, 8 heads of 40), cross-attention with 77
//! keys, the VAE's single head of 64+ channels, CLIP's causal mask, and strided rows (q, k, v
//! read out of one fused projection).

mod common;
use common::values;
use half::bf16;
use sd_kernels::{attention, AttentionParams, AttentionShape, Element, GemmOptions, Isa};

#[derive(Debug, Clone, Copy)]
struct Case {
    batch: usize,
    heads: usize,
    lq: usize,
    lk: usize,
    d: usize,
    causal: bool,
    /// Extra columns per row (strided inputs).
    pad: usize,
    /// Spread of q and k (larger = peakier softmax).
    amp: f32,
    /// Query rows checked: every `check_every`-th (the reference is O(Lq Lk d)).
    check_every: usize,
}

fn cases() -> Vec<Case> {
    let base = Case {
        batch: 2,
        heads: 8,
        lq: 300,
        lk: 300,
        d: 40,
        causal: false,
        pad: 0,
        amp: 1.0,
        check_every: 1,
    };
    vec![
        base,
        Case {
            lk: 77,
            lq: 130,
            ..base
        },
        Case {
            batch: 1,
            heads: 1,
            d: 72,
            lq: 97,
            lk: 97,
            amp: 0.3,
            ..base
        },
        Case {
            batch: 1,
            heads: 2,
            d: 16,
            lq: 77,
            lk: 77,
            causal: true,
            pad: 5,
            amp: 2.0,
            check_every: 1,
        },
        Case {
            heads: 3,
            d: 8,
            lq: 1,
            lk: 5000,
            pad: 3,
            ..base
        },
    ]
}

/// Largest error of a run as a multiple of its allowance.
fn run<T: Element + Copy>(
    c: &Case,
    isa: Isa,
    emulate: bool,
    threads: usize,
    from: fn(f32) -> T,
    to: fn(T) -> f32,
) -> f64 {
    let w = c.heads * c.d;
    let stride = w + c.pad;
    let mk = |rows: usize, seed: u64, amp: f32| -> Vec<T> {
        values(c.batch * rows * stride, seed)
            .into_iter()
            .map(|v| from(v * amp))
            .collect()
    };
    let q = mk(c.lq, 1, c.amp);
    let k = mk(c.lk, 2, c.amp);
    let v = mk(c.lk, 3, 1.0);
    let scale = 1.0 / (c.d as f32).sqrt();
    let mut out = vec![from(0.0); c.batch * c.lq * stride];
    let shape = AttentionShape {
        batch: c.batch,
        heads: c.heads,
        q_len: c.lq,
        kv_len: c.lk,
        head_dim: c.d,
        q_stride: stride,
        k_stride: stride,
        v_stride: stride,
        out_stride: stride,
    };
    let params = AttentionParams {
        scale,
        causal: c.causal,
        isa,
    };
    let opts = GemmOptions {
        threads: Some(threads),
        emulate,
    };
    attention(&opts, &shape, &params, &q, &k, &v, &mut out).expect("runs");
    let bf = std::mem::size_of::<T>() == 2;
    let mut worst = 0f64;
    for b in 0..c.batch {
        for h in 0..c.heads {
            for i in (0..c.lq).step_by(c.check_every) {
                // Element j of head h in row r of an input with `len` rows per image.
                let at = |x: &[T], len: usize, r: usize, j: usize| {
                    to(x[(b * len + r) * stride + h * c.d + j]) as f64
                };
                let seen = if c.causal { i + 1 } else { c.lk };
                let scores: Vec<f64> = (0..seen)
                    .map(|j| {
                        (0..c.d)
                            .map(|e| at(&q, c.lq, i, e) * at(&k, c.lk, j, e))
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = p.iter().sum();
                for e in 0..c.d {
                    let want: f64 = p
                        .iter()
                        .enumerate()
                        .map(|(j, pj)| pj * at(&v, c.lk, j, e))
                        .sum::<f64>()
                        / sum;
                    // Bound: the mean |v| the output averages (~1) times the error sources:
                    // f32 exp/sums (1e-5); for bf16, P rounded to bf16 (2^-9) and the output
                    // rounded to bf16 (2^-9 of |want|).
                    let allowed = if bf { 4e-3 + want.abs() / 256.0 } else { 1e-5 };
                    let got = to(out[(b * c.lq + i) * stride + h * c.d + e]) as f64;
                    worst = worst.max((got - want).abs() / allowed);
                }
            }
        }
    }
    // The padding columns are untouched.
    if c.pad > 0 {
        assert!(out
            .iter()
            .enumerate()
            .all(|(i, x)| i % stride < w || to(*x) == 0.0));
    }
    worst
}

fn check_path(isa: Isa, emulate: bool) {
    let label = if emulate { "emulated" } else { "native" };
    for c in cases() {
        for threads in [1, 2] {
            let e32 = run::<f32>(&c, isa, emulate, threads, |x| x, |x| x);
            assert!(
                e32 <= 1.0,
                "{isa} {label} f32 {c:?} threads {threads}: error {e32:.2} x allowed"
            );
            let e16 = run::<bf16>(&c, isa, emulate, threads, bf16::from_f32, bf16::to_f32);
            assert!(
                e16 <= 1.0,
                "{isa} {label} bf16 {c:?} threads {threads}: error {e16:.2} x allowed"
            );
        }
    }
}

fn native(isa: Isa) {
    common::native_or_skip(isa, "attention", || check_path(isa, false));
}

#[test]
fn attention_native_generic() {
    native(Isa::Generic);
}
#[test]
fn attention_native_avx2() {
    native(Isa::Avx2);
}
#[test]
fn attention_native_avx512() {
    native(Isa::Avx512);
}
#[test]
fn attention_native_avx512bf16() {
    native(Isa::Avx512Bf16);
}
#[test]
fn attention_native_amx() {
    native(Isa::Amx);
}
#[test]
fn attention_emulated_avx512bf16() {
    check_path(Isa::Avx512Bf16, true);
}
#[test]
fn attention_emulated_amx() {
    check_path(Isa::Amx, true);
}

/// The SD 1.5 UNet's self-attention at 64x64 latents (4096 queries and keys, 8 heads of 40)
/// on the host's own path, every 61st query row against the f64 reference (rows in every
/// position of the query blocks and micro-tiles).
#[test]
fn attention_long_sequences_on_the_host_path() {
    let c = Case {
        batch: 1,
        heads: 8,
        lq: 4096,
        lk: 4096,
        d: 40,
        causal: false,
        pad: 0,
        amp: 1.0,
        check_every: 61,
    };
    let isa = Isa::current();
    let e32 = run::<f32>(&c, isa, false, 2, |x| x, |x| x);
    assert!(e32 <= 1.0, "{isa} f32: error {e32:.2} x allowed");
    let e16 = run::<bf16>(&c, isa, false, 2, bf16::from_f32, bf16::to_f32);
    assert!(e16 <= 1.0, "{isa} bf16: error {e16:.2} x allowed");
}

#[test]
fn attention_bad_calls_are_errors() {
    let shape = AttentionShape {
        batch: 1,
        heads: 2,
        q_len: 3,
        kv_len: 4,
        head_dim: 2,
        q_stride: 4,
        k_stride: 4,
        v_stride: 4,
        out_stride: 4,
    };
    let params = AttentionParams {
        scale: 1.0,
        causal: false,
        isa: Isa::Generic,
    };
    let opts = GemmOptions::default();
    let (q, k, v) = (vec![0f32; 12], vec![0f32; 16], vec![0f32; 16]);
    let mut out = vec![0f32; 12];
    assert!(attention(&opts, &shape, &params, &q, &k, &v, &mut out).is_ok());
    assert!(attention(&opts, &shape, &params, &q[1..], &k, &v, &mut out).is_err());
    assert!(attention(&opts, &shape, &params, &q, &k, &v[1..], &mut out).is_err());
    let narrow = AttentionShape {
        q_stride: 3,
        ..shape
    };
    assert!(attention(&opts, &narrow, &params, &q, &k, &v, &mut out).is_err());
    let causal = AttentionParams {
        causal: true,
        ..params
    };
    assert!(attention(&opts, &shape, &causal, &q, &k, &v, &mut out).is_err());
    let empty = AttentionShape { kv_len: 0, ..shape };
    assert!(attention(&opts, &empty, &params, &q, &k, &v, &mut out).is_err());
}
