//! The implicit-GEMM convolution and the channels-last group norm against f64 references
//! computed from the same (for bf16: bf16-rounded) inputs, on every kernel path: natively
//! where the host has it (skips reported), emulated otherwise. Shapes cover SD's: 3x3 with
//! padding 1, stride 2, the VAE encoder's right/bottom padding, nearest 2x and odd-size
//! resizes, the skip-connection concat, per-image (time-embedding) bias, residual and SiLU,
//! odd and non-square sizes, K not a multiple of the kernel's step (4 input channels).

mod common;
use common::values;
use half::bf16;
use sd_kernels::{
    conv2d, conv2d_winograd, group_norm, pack_conv_weight, winograd_applies, Activation,
    ConvEpilogue, ConvGeometry, ConvInput, DType, Element, GemmOptions, GroupNormParams, Isa,
    WinogradWeight,
};

#[derive(Debug, Clone)]
struct Case {
    batch: usize,
    h: usize,
    w: usize,
    c1: usize,
    c2: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
    pad: [usize; 4],
    resize: Option<(usize, usize)>,
    batch_bias: bool,
    residual: bool,
    silu: bool,
}

impl Case {
    fn geometry(&self) -> ConvGeometry {
        ConvGeometry {
            batch: self.batch,
            in_h: self.h,
            in_w: self.w,
            resize: self.resize,
            kernel: self.kernel,
            stride: self.stride,
            pad: self.pad,
        }
    }
}

fn case(batch: usize, h: usize, w: usize, c1: usize, cout: usize) -> Case {
    Case {
        batch,
        h,
        w,
        c1,
        c2: 0,
        cout,
        kernel: 3,
        stride: 1,
        pad: [1; 4],
        resize: None,
        batch_bias: false,
        residual: false,
        silu: false,
    }
}

fn cases() -> Vec<Case> {
    vec![
        // ResNet conv1 with the time embedding, non-square odd size, batch 2.
        Case {
            batch_bias: true,
            silu: true,
            ..case(2, 9, 7, 40, 48)
        },
        // ResNet conv2 with the residual.
        Case {
            residual: true,
            ..case(2, 6, 5, 48, 48)
        },
        // Downsample2D (padding 1, stride 2), odd and even sides.
        Case {
            stride: 2,
            ..case(1, 9, 8, 32, 36)
        },
        // The VAE encoder's downsampler: pad right and bottom only.
        Case {
            stride: 2,
            pad: [0, 0, 1, 1],
            ..case(2, 8, 7, 16, 16)
        },
        // Upsample2D: nearest 2x, and to an odd size (latents not a multiple of 2^levels).
        Case {
            resize: Some((10, 8)),
            ..case(2, 5, 4, 24, 20)
        },
        Case {
            resize: Some((11, 9)),
            ..case(1, 5, 4, 24, 20)
        },
        // Up-block ResNet: concat of the skip connection, with time embedding.
        Case {
            c2: 16,
            batch_bias: true,
            ..case(2, 4, 6, 24, 33)
        },
        // conv_in: 4 input channels (K = 36); conv_out: 4 outputs.
        case(2, 7, 7, 4, 64),
        // The VAE encoder's conv_in: 3 channels (odd runs: the bf16 pair packing gathers),
        // and a concat of two odd channel counts (even in total, odd runs), batch 2.
        case(2, 6, 5, 3, 16),
        Case {
            c2: 3,
            batch_bias: true,
            ..case(2, 5, 5, 5, 12)
        },
        case(1, 7, 7, 64, 4),
        // Real channel counts at the smallest size (K = 2880 spans several K blocks).
        Case {
            residual: true,
            batch_bias: true,
            ..case(2, 8, 8, 320, 320)
        },
        // 1x1 and a kernel with no padding.
        Case {
            kernel: 1,
            pad: [0; 4],
            ..case(1, 5, 3, 24, 40)
        },
        Case {
            pad: [0; 4],
            ..case(1, 5, 6, 8, 8)
        },
    ]
}

/// The f64 reference on the rounded inputs.
fn reference(
    c: &Case,
    x1: &[f32],
    x2: &[f32],
    w: &[f32],
    bias: &[f32],
    bb: &[f32],
    res: &[f32],
) -> (Vec<f64>, Vec<f64>, (usize, usize)) {
    let (vh, vw) = c.resize.unwrap_or((c.h, c.w));
    let k = c.kernel;
    let oh = (vh + c.pad[0] + c.pad[2] - k) / c.stride + 1;
    let ow = (vw + c.pad[1] + c.pad[3] - k) / c.stride + 1;
    let cin = c.c1 + c.c2;
    let mut out = vec![0f64; c.batch * oh * ow * c.cout];
    let mut mag = vec![0f64; out.len()];
    for b in 0..c.batch {
        for oy in 0..oh {
            for ox in 0..ow {
                for o in 0..c.cout {
                    let mut acc = bias[o] as f64;
                    let mut m = 0f64;
                    if c.batch_bias {
                        acc += bb[b * c.cout + o] as f64;
                    }
                    for ky in 0..k {
                        for kx in 0..k {
                            let iy = (oy * c.stride + ky) as isize - c.pad[0] as isize;
                            let ix = (ox * c.stride + kx) as isize - c.pad[1] as isize;
                            if iy < 0 || ix < 0 || iy >= vh as isize || ix >= vw as isize {
                                continue;
                            }
                            let sy = iy as usize * c.h / vh;
                            let sx = ix as usize * c.w / vw;
                            let pix = (b * c.h + sy) * c.w + sx;
                            for ch in 0..cin {
                                let xv = if ch < c.c1 {
                                    x1[pix * c.c1 + ch]
                                } else {
                                    x2[pix * c.c2 + ch - c.c1]
                                } as f64;
                                let wv = w[((o * cin + ch) * k + ky) * k + kx] as f64;
                                acc += xv * wv;
                                m += (xv * wv).abs();
                            }
                        }
                    }
                    if c.silu {
                        acc /= 1.0 + (-acc).exp();
                    }
                    let idx = ((b * oh + oy) * ow + ox) * c.cout + o;
                    if c.residual {
                        acc += res[idx] as f64;
                    }
                    out[idx] = acc;
                    mag[idx] = m;
                }
            }
        }
    }
    (out, mag, (oh, ow))
}

/// Which convolution a run checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algo {
    Direct,
    Winograd,
}

/// The largest error of one run as a multiple of its allowance.
fn run<T: Element + Copy>(
    c: &Case,
    isa: Isa,
    emulate: bool,
    threads: usize,
    algo: Algo,
    from: fn(f32) -> T,
    to: fn(T) -> f32,
) -> f64 {
    let cin = c.c1 + c.c2;
    let round = |v: Vec<f32>| -> Vec<T> { v.into_iter().map(from).collect() };
    let x1 = round(values(c.batch * c.h * c.w * c.c1, 1));
    let x2 = round(values(c.batch * c.h * c.w * c.c2, 2));
    let w = round(
        values(c.cout * cin * c.kernel * c.kernel, 3)
            .into_iter()
            .map(|v| v * 0.1)
            .collect(),
    );
    let bias = values(c.cout, 4);
    let bb = values(c.batch * c.cout, 5);
    let (vh, vw) = c.resize.unwrap_or((c.h, c.w));
    let oh = (vh + c.pad[0] + c.pad[2] - c.kernel) / c.stride + 1;
    let ow = (vw + c.pad[1] + c.pad[3] - c.kernel) / c.stride + 1;
    let res = round(values(c.batch * oh * ow * c.cout, 6));
    let f = |v: &[T]| -> Vec<f32> { v.iter().map(|x| to(*x)).collect() };
    let (want, mag, _) = reference(c, &f(&x1), &f(&x2), &f(&w), &bias, &bb, &f(&res));

    let dtype = if std::mem::size_of::<T>() == 4 {
        DType::F32
    } else {
        DType::Bf16
    };
    let packed = pack_conv_weight(&w, c.cout, cin, c.kernel, isa, dtype).expect("packs");
    let g = c.geometry();
    assert_eq!(g.out_size().expect("fits"), (oh, ow));
    let mut out = vec![from(0.0); want.len()];
    let epi = ConvEpilogue {
        bias: Some(&bias),
        batch_bias: c.batch_bias.then_some(&bb[..]),
        activation: if c.silu {
            Activation::Silu
        } else {
            Activation::Identity
        },
        residual: c.residual.then_some(&res[..]),
    };
    let input = ConvInput {
        x: &x1,
        channels: c.c1,
        concat: (c.c2 > 0).then_some((&x2[..], c.c2)),
    };
    let opts = GemmOptions {
        threads: Some(threads),
        emulate,
    };
    match algo {
        Algo::Direct => conv2d(&opts, input, &g, &packed, &mut out, &epi).expect("runs"),
        Algo::Winograd => {
            let wino = WinogradWeight::from_conv_weight(&packed, cin).expect("transforms");
            conv2d_winograd(&opts, input, &g, &wino, &mut out, &epi).expect("runs");
        }
    }
    let out_rel = if dtype == DType::Bf16 {
        1.0 / 256.0
    } else {
        0.0
    };
    // Winograd's transformed weights are rounded to the packing's type: for bf16 that is a
    // relative 2^-9 on each, which the transforms (row sums of |A^T|, |G|: 3, 1.5) can grow.
    let weight_rel = match (algo, dtype) {
        (Algo::Winograd, DType::Bf16) => WINOGRAD_BF16_WEIGHT_REL,
        _ => 0.0,
    };
    let mut worst = 0f64;
    for ((got, want), mag) in out.iter().zip(&want).zip(&mag) {
        // f32 accumulation error, plus one rounding of the output for bf16.
        let allowed = (1e-5 + weight_rel) * (mag + 1.0) + out_rel * want.abs();
        worst = worst.max((to(*got) as f64 - want).abs() / allowed);
    }
    worst
}

/// The allowance for bf16 Winograd's rounded transformed weights (and, for the kernels that
/// read A as bf16, its rounded transformed input), relative to sum |x w|: the cases below
/// needed at most 1.16e-3 on the f32-panel kernels and 1.28e-3 on `avx512bf16` (about half of
/// bf16's unit roundoff), so 2.5e-3 leaves a factor of two. f32 Winograd stays within 0.011
/// of the direct convolution's allowance (the direct one within 0.013).
const WINOGRAD_BF16_WEIGHT_REL: f64 = 2.5e-3;

/// Every case with the direct convolution, and the 3x3 stride-1 padding-1 ones with Winograd
/// F(2x2, 3x3) too. `SD_TEST_PRINT_ERRORS=1` prints each run's worst error as a fraction of
/// its allowance.
fn check_path(isa: Isa, emulate: bool) {
    let label = if emulate { "emulated" } else { "native" };
    for (ci, c) in cases().iter().enumerate() {
        let g = c.geometry();
        let mut algos = vec![Algo::Direct];
        if winograd_applies(&g) {
            algos.push(Algo::Winograd);
        }
        for algo in algos {
            for threads in [1, 2] {
                let e32 = run::<f32>(c, isa, emulate, threads, algo, |x| x, |x| x);
                assert!(
                    e32 <= 1.0,
                    "{isa} {label} {algo:?} f32 case {ci} {c:?} threads {threads}: error {e32:.2} x allowed"
                );
                let e16 = run::<bf16>(c, isa, emulate, threads, algo, bf16::from_f32, bf16::to_f32);
                assert!(
                    e16 <= 1.0,
                    "{isa} {label} {algo:?} bf16 case {ci} {c:?} threads {threads}: error {e16:.2} x allowed"
                );
                if std::env::var_os("SD_TEST_PRINT_ERRORS").is_some() {
                    eprintln!("{isa} {label} {algo:?} case {ci} threads {threads}: f32 {e32:.3} bf16 {e16:.3}");
                }
            }
        }
    }
}

fn native(isa: Isa) {
    common::native_or_skip(isa, "convolution", || check_path(isa, false));
}

#[test]
fn conv_native_generic() {
    native(Isa::Generic);
}
#[test]
fn conv_native_avx2() {
    native(Isa::Avx2);
}
#[test]
fn conv_native_avx512() {
    native(Isa::Avx512);
}
#[test]
fn conv_native_avx512bf16() {
    native(Isa::Avx512Bf16);
}
#[test]
fn conv_native_amx() {
    native(Isa::Amx);
}
#[test]
fn conv_emulated_avx512bf16() {
    check_path(Isa::Avx512Bf16, true);
}
#[test]
fn conv_emulated_amx() {
    check_path(Isa::Amx, true);
}

#[test]
fn conv_bad_calls_are_errors() {
    let w = vec![0f32; 8 * 4 * 9];
    let packed = pack_conv_weight(&w, 8, 4, 3, Isa::Generic, DType::F32).expect("packs");
    assert!(pack_conv_weight(&w, 8, 5, 3, Isa::Generic, DType::F32).is_err());
    let g = ConvGeometry {
        batch: 1,
        in_h: 4,
        in_w: 4,
        resize: None,
        kernel: 3,
        stride: 1,
        pad: [1; 4],
    };
    let x = vec![0f32; 4 * 4 * 4];
    let mut out = vec![0f32; 4 * 4 * 8];
    let opts = GemmOptions::default();
    let input = ConvInput {
        x: &x,
        channels: 4,
        concat: None,
    };
    assert!(conv2d(
        &opts,
        input,
        &g,
        &packed,
        &mut out,
        &ConvEpilogue::default()
    )
    .is_ok());
    // Wrong input length, output length, channels, residual and per-image bias.
    let short = ConvInput {
        x: &x[1..],
        ..input
    };
    assert!(conv2d(
        &opts,
        short,
        &g,
        &packed,
        &mut out,
        &ConvEpilogue::default()
    )
    .is_err());
    assert!(conv2d(
        &opts,
        input,
        &g,
        &packed,
        &mut out[1..],
        &ConvEpilogue::default()
    )
    .is_err());
    let three = ConvInput {
        x: &x[..48],
        channels: 3,
        concat: None,
    };
    assert!(conv2d(
        &opts,
        three,
        &g,
        &packed,
        &mut out,
        &ConvEpilogue::default()
    )
    .is_err());
    let r = [0f32; 3];
    let epi = ConvEpilogue {
        residual: Some(&r[..]),
        ..ConvEpilogue::default()
    };
    assert!(conv2d(&opts, input, &g, &packed, &mut out, &epi).is_err());
    let bb = [0f32; 3];
    let epi = ConvEpilogue {
        batch_bias: Some(&bb[..]),
        ..ConvEpilogue::<f32>::default()
    };
    assert!(conv2d(&opts, input, &g, &packed, &mut out, &epi).is_err());
    // Kernel larger than the padded input, zero stride.
    let tiny = ConvGeometry {
        in_h: 1,
        in_w: 1,
        pad: [0; 4],
        ..g
    };
    assert!(tiny.out_size().is_err());
    let zero = ConvGeometry { stride: 0, ..g };
    assert!(zero.out_size().is_err());

    // Winograd: the same checks, and only 3x3 weights and stride-1 padding-1 geometries.
    let wino = WinogradWeight::from_conv_weight(&packed, 4).expect("transforms");
    assert_eq!((wino.in_channels(), wino.out_channels()), (4, 8));
    assert!(WinogradWeight::from_conv_weight(&packed, 3).is_err());
    let point = pack_conv_weight(&w[..32], 8, 4, 1, Isa::Generic, DType::F32).expect("packs");
    assert!(WinogradWeight::from_conv_weight(&point, 4).is_err());
    let none = ConvEpilogue::default();
    assert!(conv2d_winograd(&opts, input, &g, &wino, &mut out, &none).is_ok());
    assert!(conv2d_winograd(&opts, short, &g, &wino, &mut out, &none).is_err());
    assert!(conv2d_winograd(&opts, input, &g, &wino, &mut out[1..], &none).is_err());
    assert!(conv2d_winograd(&opts, three, &g, &wino, &mut out, &none).is_err());
    let epi = ConvEpilogue {
        residual: Some(&r[..]),
        ..ConvEpilogue::default()
    };
    assert!(conv2d_winograd(&opts, input, &g, &wino, &mut out, &epi).is_err());
    let epi = ConvEpilogue {
        batch_bias: Some(&bb[..]),
        ..ConvEpilogue::<f32>::default()
    };
    assert!(conv2d_winograd(&opts, input, &g, &wino, &mut out, &epi).is_err());
    let epi = ConvEpilogue {
        bias: Some(&bb[..]),
        ..ConvEpilogue::<f32>::default()
    };
    assert!(conv2d_winograd(&opts, input, &g, &wino, &mut out, &epi).is_err());
    let strided = ConvGeometry { stride: 2, ..g };
    assert!(!winograd_applies(&strided));
    let mut out2 = vec![0f32; 2 * 2 * 8];
    assert!(conv2d_winograd(&opts, input, &strided, &wino, &mut out2, &none).is_err());
    let unpadded = ConvGeometry { pad: [0; 4], ..g };
    assert!(conv2d_winograd(&opts, input, &unpadded, &wino, &mut out2, &none).is_err());
    let bf = vec![half::bf16::ZERO; x.len()];
    let mut bf_out = vec![half::bf16::ZERO; out.len()];
    let bf_input = ConvInput {
        x: &bf,
        channels: 4,
        concat: None,
    };
    assert!(conv2d_winograd(
        &opts,
        bf_input,
        &g,
        &wino,
        &mut bf_out,
        &ConvEpilogue::default()
    )
    .is_err());
    // Too few tiles, channels: the direct convolution is kept. 256 tiles of 64 channels in
    // f32 take Winograd; in bf16 they do not (its transformed weights would be rounded).
    assert!(!sd_kernels::winograd_pays(&g, &packed));
    let w64 = vec![0f32; 64 * 64 * 9];
    let big = ConvGeometry {
        in_h: 32,
        in_w: 32,
        ..g
    };
    for (dtype, pays) in [(DType::F32, true), (DType::Bf16, false)] {
        let p = pack_conv_weight(&w64, 64, 64, 3, Isa::Generic, dtype).expect("packs");
        assert_eq!(sd_kernels::winograd_pays(&big, &p), pays, "{dtype:?}");
        assert!(!sd_kernels::winograd_pays(&strided, &p));
    }
}

/// Group norm (+ SiLU) against f64 statistics: f32 within 4 f32 roundings of the folded
/// terms' magnitude (measured up to 2.1e-5 absolute in the one-pixel case, where var = 0 and
/// a = gamma / sqrt(eps) is ~300), bf16 within one bf16 rounding of the f32 kernel.
#[test]
fn group_norm_matches_f64_reference() {
    for &(batch, pixels, channels, groups) in &[
        (2, 100, 320, 32),
        (1, 3000, 64, 32),
        (2, 7, 12, 3),
        (1, 1, 32, 32),
    ] {
        for silu in [false, true] {
            let x = values(batch * pixels * channels, 7)
                .into_iter()
                .map(|v| v * 3.0 + 0.5)
                .collect::<Vec<_>>();
            let gamma = values(channels, 8);
            let beta = values(channels, 9);
            let per = channels / groups;
            let mut want = vec![0f64; x.len()];
            // The kernel folds the affine transform into `x * a + (beta - mean * a)` (as
            // torch's CPU kernel does), so its f32 error scales with |x a| + |mean a|.
            let mut scale = vec![0f64; x.len()];
            for b in 0..batch {
                for g in 0..groups {
                    let idx = |p: usize, c: usize| (b * pixels + p) * channels + g * per + c;
                    let n = (pixels * per) as f64;
                    let mut mean = 0f64;
                    for p in 0..pixels {
                        for c in 0..per {
                            mean += x[idx(p, c)] as f64;
                        }
                    }
                    mean /= n;
                    let mut var = 0f64;
                    for p in 0..pixels {
                        for c in 0..per {
                            var += (x[idx(p, c)] as f64 - mean).powi(2);
                        }
                    }
                    var /= n;
                    for p in 0..pixels {
                        for c in 0..per {
                            let ch = g * per + c;
                            let mut y = (x[idx(p, c)] as f64 - mean) / (var + 1e-5).sqrt()
                                * gamma[ch] as f64
                                + beta[ch] as f64;
                            if silu {
                                y /= 1.0 + (-y).exp();
                            }
                            want[idx(p, c)] = y;
                            let a = (gamma[ch] as f64 / (var + 1e-5).sqrt()).abs();
                            scale[idx(p, c)] = (x[idx(p, c)].abs() as f64 + mean.abs()) * a
                                + beta[ch].abs() as f64;
                        }
                    }
                }
            }
            let params = GroupNormParams {
                batch,
                pixels,
                channels,
                groups,
                gamma: &gamma,
                beta: &beta,
                eps: 1e-5,
                silu,
            };
            let mut out = vec![0f32; x.len()];
            group_norm(&params, &x, &mut out).expect("runs");
            for ((g, w), m) in out.iter().zip(&want).zip(&scale) {
                assert!(
                    (*g as f64 - w).abs() <= 4.0 * f32::EPSILON as f64 * (m + 1.0),
                    "{g} vs {w} ({batch}, {pixels}, {channels}, {groups}) silu {silu}"
                );
            }
            let xb: Vec<bf16> = x.iter().map(|v| bf16::from_f32(*v)).collect();
            let mut outb = vec![bf16::ZERO; x.len()];
            group_norm(&params, &xb, &mut outb).expect("runs");
            // The bf16 input differs from x by up to 2^-9 relative: compare against the f32
            // kernel on the rounded input instead, within one output rounding.
            let xr: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
            group_norm(&params, &xr, &mut out).expect("runs");
            for (g, w) in outb.iter().zip(&out) {
                assert!(
                    (g.to_f32() - w).abs() <= w.abs() / 256.0 + 1e-6,
                    "{g} vs {w}"
                );
            }
        }
    }
    let bad = GroupNormParams {
        batch: 1,
        pixels: 2,
        channels: 6,
        groups: 4,
        gamma: &[1.0; 6],
        beta: &[0.0; 6],
        eps: 1e-5,
        silu: false,
    };
    let mut out = vec![0f32; 12];
    assert!(group_norm(&bad, &[0f32; 12], &mut out).is_err());
    let bad = GroupNormParams { groups: 3, ..bad };
    assert!(group_norm(&bad, &[0f32; 12], &mut out).is_ok());
    assert!(group_norm(&bad, &[0f32; 11], &mut out).is_err());
}
