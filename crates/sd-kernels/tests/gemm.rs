//! The packed GEMM on every path against an f64 reference computed from the same (for bf16:
//! bf16-rounded) inputs: M tails, real SD 1.5 / SDXL linear shapes, strided A, every epilogue.
//! Paths the host lacks run on the emulator (same packing and addressing); their native run is
//! reported as skipped with the reason.

mod common;
use common::values;
use half::bf16;
use sd_kernels::{
    gemm_with, AMatrix, Activation, BSource, DType, Element, Epilogue, GemmOptions, Isa, PackedB,
};

fn erf64(x: f64) -> f64 {
    // erf by its Taylor series (|x| <= 3) or 1 - erfc asymptote; 1e-15 where used here.
    if x.abs() > 6.0 {
        return x.signum();
    }
    if x.abs() > 3.0 {
        // Continued fraction for erfc.
        let a = x.abs();
        let mut f = 0.0;
        for n in (1..60).rev() {
            f = n as f64 / 2.0 / (a + f);
        }
        let erfc = (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f);
        return x.signum() * (1.0 - erfc);
    }
    let (mut sum, mut term, mut n) = (0.0, x, 0.0f64);
    while n < 200.0 {
        let t = term / (2.0 * n + 1.0);
        sum += t;
        if t.abs() < 1e-18 {
            break;
        }
        n += 1.0;
        term *= -x * x / n;
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

fn act64(x: f64, act: Activation) -> f64 {
    match act {
        Activation::Identity | Activation::Geglu => x,
        Activation::Silu => x / (1.0 + (-x).exp()),
        Activation::Gelu => 0.5 * x * (1.0 + erf64(x / 2f64.sqrt())),
        Activation::QuickGelu => x / (1.0 + (-1.702 * x).exp()),
        Activation::GeluTanh => {
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
        }
    }
}

struct Case {
    m: usize,
    k: usize,
    n: usize,
    lda_pad: usize,
    act: Activation,
    bias: bool,
    residual: bool,
    scale: f32,
}

/// Runs one case and returns (max error / allowed error) over C.
fn run<T: Element + Copy>(
    case: &Case,
    isa: Isa,
    emulate: bool,
    threads: usize,
    from: impl Fn(f32) -> T,
    to: impl Fn(T) -> f32,
) -> f64 {
    let Case { m, k, n, .. } = *case;
    let geglu = case.act == Activation::Geglu;
    let lda = k + case.lda_pad;
    let a: Vec<T> = values(m * lda, 1).into_iter().map(&from).collect();
    let w: Vec<T> = values(n * k, 2)
        .into_iter()
        .map(|x| from(x * 0.2))
        .collect();
    let bias: Vec<f32> = values(n, 3);
    let n_out = if geglu { n / 2 } else { n };
    let ldc = n_out + 3;
    let residual: Vec<T> = values(m * ldc, 4).into_iter().map(&from).collect();
    let packed =
        PackedB::pack(BSource::linear_weight(&w, n, k), isa, T::DTYPE, geglu).expect("pack");
    let mut c: Vec<T> = vec![from(0.0); m * ldc];
    let epi = Epilogue {
        bias: case.bias.then_some(&bias[..]),
        scale: case.scale,
        activation: case.act,
        residual: case.residual.then_some((&residual[..], ldc)),
    };
    let opts = GemmOptions {
        threads: Some(threads),
        emulate,
    };
    gemm_with(
        &opts,
        AMatrix {
            data: &a,
            rows: m,
            stride: lda,
        },
        &packed,
        &mut c,
        ldc,
        &epi,
    )
    .expect("gemm");
    let is_bf16 = T::DTYPE == DType::Bf16;
    let mut worst = 0f64;
    for i in 0..m {
        let lin = |j: usize| -> (f64, f64) {
            let mut s = 0f64;
            let mut mag = 0f64;
            for kk in 0..k {
                let p = to(a[i * lda + kk]) as f64 * to(w[j * k + kk]) as f64;
                s += p;
                mag += p.abs();
            }
            if case.bias {
                s += bias[j] as f64;
                mag += (bias[j] as f64).abs();
            }
            (s * case.scale as f64, mag * case.scale.abs() as f64)
        };
        for j in 0..n_out {
            let (v, mag) = lin(j);
            let (want, mag) = if geglu {
                let (g, gmag) = lin(j + n_out);
                (
                    v * act64(g, Activation::Gelu),
                    mag * g.abs() + gmag * v.abs() + mag,
                )
            } else {
                (act64(v, case.act), mag)
            };
            let want = want
                + if case.residual {
                    to(residual[i * ldc + j]) as f64
                } else {
                    0.0
                };
            let got = to(c[i * ldc + j]) as f64;
            // f32: accumulation error grows with sum|a b| (measured up to ~3e-7 of it on these
            // shapes; allowed 2e-6), plus the 1.5e-7 of the erf approximation.
            // bf16: the output rounding (2^-9 relative) dominates; allowed 2^-8 |want|.
            let allowed = if is_bf16 {
                want.abs() * 2f64.powi(-8) + 2e-6 * mag + 1e-6
            } else {
                2e-6 * mag + 1e-6 * want.abs() + 1e-6
            };
            worst = worst.max((got - want).abs() / allowed);
        }
        // Columns past N stay untouched.
        for j in n_out..ldc {
            assert_eq!(to(c[i * ldc + j]), 0.0, "row {i} col {j} written past N");
        }
    }
    worst
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    // M tails around every MR (4, 6, 12, 32) on a small real-width layer.
    for m in [1, 15, 17, 33, 8 * 16 + 3] {
        v.push(Case {
            m,
            k: 320,
            n: 320,
            lda_pad: 0,
            act: Activation::Identity,
            bias: true,
            residual: false,
            scale: 1.0,
        });
    }
    // Real SD 1.5 / SDXL linear shapes (K, N), strided A, every epilogue.
    v.push(Case {
        m: 37,
        k: 320,
        n: 2560,
        lda_pad: 0,
        act: Activation::Geglu,
        bias: true,
        residual: false,
        scale: 1.0,
    });
    v.push(Case {
        m: 29,
        k: 1280,
        n: 320,
        lda_pad: 5,
        act: Activation::Identity,
        bias: true,
        residual: true,
        scale: 1.0,
    });
    v.push(Case {
        m: 77,
        k: 768,
        n: 640,
        lda_pad: 0,
        act: Activation::Identity,
        bias: false,
        residual: false,
        scale: 1.0,
    });
    v.push(Case {
        m: 19,
        k: 2048,
        n: 640,
        lda_pad: 3,
        act: Activation::Identity,
        bias: false,
        residual: false,
        scale: 0.125,
    });
    v.push(Case {
        m: 2,
        k: 320,
        n: 1280,
        lda_pad: 0,
        act: Activation::Silu,
        bias: true,
        residual: false,
        scale: 1.0,
    });
    v.push(Case {
        m: 21,
        k: 768,
        n: 3072,
        lda_pad: 0,
        act: Activation::QuickGelu,
        bias: true,
        residual: false,
        scale: 1.0,
    });
    v.push(Case {
        m: 23,
        k: 1024,
        n: 4096,
        lda_pad: 1,
        act: Activation::Gelu,
        bias: true,
        residual: true,
        scale: 1.0,
    });
    // Odd K and N (pads inside packing), GEGLU whose half is not a multiple of any panel.
    v.push(Case {
        m: 9,
        k: 45,
        n: 50,
        lda_pad: 2,
        act: Activation::Geglu,
        bias: true,
        residual: true,
        scale: 0.5,
    });
    v.push(Case {
        m: 13,
        k: 3,
        n: 7,
        lda_pad: 0,
        act: Activation::Identity,
        bias: true,
        residual: true,
        scale: 1.0,
    });
    v
}

fn check_path(isa: Isa, emulate: bool) {
    let label = if emulate { "emulated" } else { "native" };
    for (ci, case) in cases().iter().enumerate() {
        for threads in [1, 2] {
            let e32 = run::<f32>(case, isa, emulate, threads, |x| x, |x| x);
            assert!(
                e32 <= 1.0,
                "{isa} {label} f32 case {ci} threads {threads}: error {e32:.2} x allowed"
            );
            let e16 = run::<bf16>(case, isa, emulate, threads, bf16::from_f32, bf16::to_f32);
            assert!(
                e16 <= 1.0,
                "{isa} {label} bf16 case {ci} threads {threads}: error {e16:.2} x allowed"
            );
        }
    }
}

fn native(isa: Isa) {
    common::native_or_skip(isa, "GEMM", || check_path(isa, false));
}

#[test]
fn native_generic() {
    native(Isa::Generic);
}
#[test]
fn native_avx2() {
    native(Isa::Avx2);
}
#[test]
fn native_avx512() {
    native(Isa::Avx512);
}
#[test]
fn native_avx512bf16() {
    native(Isa::Avx512Bf16);
}
#[test]
fn native_amx() {
    native(Isa::Amx);
}
#[test]
fn emulated_avx512() {
    check_path(Isa::Avx512, true);
}
#[test]
fn emulated_avx512bf16() {
    check_path(Isa::Avx512Bf16, true);
}
#[test]
fn emulated_amx() {
    check_path(Isa::Amx, true);
}

#[test]
fn large_m_split_across_threads_equals_one_thread() {
    // M large enough for the row split; the threaded result must equal the single-thread one
    // bit for bit (each element is computed by the same kernel in the same order).
    let isa = Isa::current();
    let (m, k, n) = (300, 320, 640);
    let a = values(m * k, 7);
    let w = values(n * k, 8);
    let packed =
        PackedB::pack(BSource::linear_weight(&w, n, k), isa, DType::F32, false).expect("pack");
    let mut outs = Vec::new();
    for threads in [1, 2, 3] {
        let mut c = vec![0f32; m * n];
        let opts = GemmOptions {
            threads: Some(threads),
            emulate: false,
        };
        gemm_with(
            &opts,
            AMatrix {
                data: &a,
                rows: m,
                stride: k,
            },
            &packed,
            &mut c,
            n,
            &Epilogue::default(),
        )
        .expect("gemm");
        outs.push(c);
    }
    assert_eq!(outs[0], outs[1]);
    assert_eq!(outs[0], outs[2]);
}

#[test]
fn bad_calls_are_errors() {
    let w = values(6, 1);
    let packed = PackedB::pack(
        BSource::linear_weight(&w, 3, 2),
        Isa::Generic,
        DType::F32,
        false,
    )
    .expect("pack");
    let a = values(4, 2);
    let mut c = vec![0f32; 6];
    let opts = GemmOptions::default();
    // A too short for 3 rows of 2.
    let e = gemm_with(
        &opts,
        AMatrix {
            data: &a,
            rows: 3,
            stride: 2,
        },
        &packed,
        &mut c,
        3,
        &Epilogue::default(),
    );
    assert!(e.unwrap_err().to_string().contains("A: 3 rows"));
    // Bias of the wrong length.
    let bias = [0f32; 2];
    let epi = Epilogue {
        bias: Some(&bias[..]),
        ..Epilogue::default()
    };
    let e = gemm_with(
        &opts,
        AMatrix {
            data: &a,
            rows: 2,
            stride: 2,
        },
        &packed,
        &mut c,
        3,
        &epi,
    );
    assert!(e
        .unwrap_err()
        .to_string()
        .contains("bias has 2 values, expected 3"));
    // dtype mismatch.
    let a16: Vec<bf16> = a.iter().map(|x| bf16::from_f32(*x)).collect();
    let mut c16 = vec![bf16::ZERO; 6];
    let e = gemm_with(
        &opts,
        AMatrix {
            data: &a16,
            rows: 2,
            stride: 2,
        },
        &packed,
        &mut c16,
        3,
        &Epilogue::default(),
    );
    assert!(e.is_err());
    // GEGLU activation without GEGLU packing, odd GEGLU width, empty B.
    let epi = Epilogue {
        activation: Activation::Geglu,
        ..Epilogue::default()
    };
    assert!(gemm_with(
        &opts,
        AMatrix {
            data: &a,
            rows: 2,
            stride: 2
        },
        &packed,
        &mut c,
        3,
        &epi
    )
    .is_err());
    assert!(PackedB::pack(
        BSource::linear_weight(&w, 3, 2),
        Isa::Generic,
        DType::F32,
        true
    )
    .is_err());
    assert!(PackedB::pack(
        BSource::linear_weight(&w[..0], 0, 2),
        Isa::Generic,
        DType::F32,
        false
    )
    .is_err());
    assert!(PackedB::pack(
        BSource::linear_weight(&w, 4, 2),
        Isa::Generic,
        DType::F32,
        false
    )
    .is_err());
    // Zero rows is a no-op.
    gemm_with(
        &opts,
        AMatrix {
            data: &a[..0],
            rows: 0,
            stride: 2,
        },
        &packed,
        &mut c[..0],
        3,
        &Epilogue::default(),
    )
    .expect("empty");
}
