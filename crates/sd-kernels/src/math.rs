//! Branch-free f32 functions for the epilogues, written so that the compiler vectorizes the
//! loops that call them (no table lookups, no data-dependent branches).

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two (`LN2_HI + LN2_LO`), so that `x - n ln2` loses no bits.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 * 2^23: adding it to a float below 2^22 in magnitude leaves the integer nearest to it
/// in the low mantissa bits.
const MAGIC: f32 = 12_582_912.0;

/// `e^r` for `r = x - n ln2` in [-ln2/2, ln2/2] (`n` integral, as f32): a degree-6
/// polynomial in fused multiply-adds (one instruction each where the caller's target has FMA,
/// which halves the dependency chain that bounds the attention's softmax).
#[inline(always)]
fn exp_reduced(x: f32, n: f32) -> f32 {
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let mut p = 1.987_569_1e-4_f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    (p * r).mul_add(r, r) + 1.0
}

/// `e^x` (Cephes-style: `x = n ln2 + r`, a degree-6 polynomial in r, then `2^n` by exponent
/// bits). Relative error below 2e-7 on [-87, 88]; saturates to 0 / a huge value outside.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    let n = x.mul_add(LOG2E, 0.5).floor();
    let e = exp_reduced(x, n);
    // n is an integer in [-126, 128]: 2^n as 2^n1 * 2^n2 with both halves normal numbers.
    // Adding MAGIC places n in the low mantissa bits exactly; reading it back there keeps the
    // loop vectorized (`as i32` saturates lane by lane in scalar code).
    let n = ((n + MAGIC).to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let n1 = n >> 1;
    let n2 = n - n1;
    let s1 = f32::from_bits(((n1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((n2 + 127) as u32) << 23);
    e * s1 * s2
}

/// `exp(x)` for the arguments of a softmax, `x <= 0` (up to 88 is still exact; beyond, the
/// result is wrong). [`exp`]'s polynomial with a cheaper range reduction: `x * log2(e)` is
/// rounded to an integer `n` by adding 1.5 * 2^23 (one fused multiply-add, no floor), and
/// 2^n is one exponent field, since n >= -126 keeps it a normal number. About 17 vector
/// operations against [`exp`]'s 27. Below -87.3 the result is exp(-87.3); NaN stays NaN.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    let x = if x < -87.3 { -87.3 } else { x };
    // t's low mantissa bits hold n = round(x * log2(e)) exactly (|n| < 2^22).
    let t = x.mul_add(LOG2E, MAGIC);
    let e = exp_reduced(x, t - MAGIC);
    // (bits(t) - bits(MAGIC) + 127) << 23, the exponent field of 2^n, in wrapping u32.
    let bias = 127u32.wrapping_sub(MAGIC.to_bits()) << 23;
    e * f32::from_bits((t.to_bits() << 23).wrapping_add(bias))
}

/// The error function, Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7; odd).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    // erf(a) rounds to 1 in f32 from a = 4 on. Clamping there keeps `exp(-a * a)` and the
    // products below away from subnormal numbers, each of which costs a microcode assist
    // (GELU of gates beyond +-13 ran 4x slower).
    let a = if x.abs() > 4.0 { 4.0 } else { x.abs() }; // NaN stays NaN
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let mut p = 1.061_405_4_f32;
    p = p * t - 1.453_152_1;
    p = p * t + 1.421_413_8;
    p = p * t - 0.284_496_74;
    p = p * t + 0.254_829_6;
    let y = 1.0 - p * t * exp_nonpositive(-a * a);
    y.copysign(x)
}

/// The exact (erf) GELU, torch's default: `x/2 (1 + erf(x/sqrt 2))`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// The tanh approximation of GELU: `x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, with
/// `tanh(y) = 1 - 2 / (e^(2y) + 1)`.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    let y = 0.797_884_6 * (x + 0.044_715 * x * x * x);
    let tanh = 1.0 - 2.0 / (exp(2.0 * y) + 1.0);
    0.5 * x * (1.0 + tanh)
}

/// SiLU: `x sigmoid(x)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// CLIP's quick GELU: `x sigmoid(1.702 x)`.
#[inline(always)]
pub fn quick_gelu(x: f32) -> f32 {
    x / (1.0 + exp(-1.702 * x))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn erf64(x: f64) -> f64 {
        // Series for |x| < 3 (converges fast there), complement asymptote beyond.
        if x.abs() > 5.0 {
            return x.signum();
        }
        let mut sum = 0.0f64;
        let mut term = x;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs().max(1e-300) || n < 3.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
            if n > 200.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn exp_nonpositive_relative_error_below_3e_7() {
        let mut worst = 0f64;
        for i in -873_000..=8800 {
            let x = i as f32 * 1e-4;
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            worst = worst.max(((got - want) / want).abs());
        }
        // Measured: 8.3e-8.
        assert!(worst < 3e-7, "exp_nonpositive worst relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-200.0), exp_nonpositive(-87.3));
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), exp_nonpositive(-87.3));
        assert!(exp_nonpositive(-87.3) > 0.0 && exp_nonpositive(-87.3).is_normal());
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }

    #[test]
    fn exp_relative_error_below_3e_7() {
        let mut worst = 0f64;
        for i in -8700..=8800 {
            let x = i as f32 * 0.01;
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
        }
        // Measured: 1.2e-7.
        assert!(worst < 3e-7, "exp worst relative error {worst}");
        assert_eq!(exp(-200.0), exp(-87.3));
        assert!(exp(200.0).is_finite());
    }

    #[test]
    fn erf_and_gelu_absolute_error() {
        let mut worst = 0f64;
        let mut worst_gelu = 0f64;
        for i in -6000..=6000 {
            let x = i as f32 * 0.001;
            let e = erf64(x as f64);
            worst = worst.max((erf(x) as f64 - e).abs());
            let g = 0.5 * x as f64 * (1.0 + erf64(x as f64 / 2f64.sqrt()));
            worst_gelu = worst_gelu.max((gelu(x) as f64 - g).abs());
        }
        // A&S 7.1.26 is 1.5e-7 in exact arithmetic; measured with f32 rounding: 4.7e-7.
        assert!(worst < 6e-7, "erf worst abs error {worst}");
        assert!(worst_gelu < 1e-6, "gelu worst abs error {worst_gelu}");
        assert!(erf(0.0).abs() < 1e-7);
        assert!(erf(10.0) <= 1.0 && erf(-10.0) >= -1.0);
    }

    #[test]
    fn erf_and_gelu_saturate_exactly_beyond_4() {
        // The clamp at 4 must not change a result: erf is 1 in f32 from there on, and GELU is
        // the identity above (torch: gelu(20.) = 20.) and zero below (gelu(-20.) = -0.).
        for i in 0..4000 {
            let x = 4.0 + i as f32 * 0.25;
            assert_eq!(erf(x), 1.0, "erf({x})");
            assert_eq!(erf(-x), -1.0, "erf(-{x})");
            assert_eq!(
                gelu(x * std::f32::consts::SQRT_2),
                x * std::f32::consts::SQRT_2
            );
            assert_eq!(gelu(-x * std::f32::consts::SQRT_2), 0.0);
        }
        assert_eq!(erf(f32::INFINITY), 1.0);
        assert!(erf(f32::NAN).is_nan() && gelu(f32::NAN).is_nan());
    }

    #[test]
    fn silu_matches_f64() {
        for i in -2000..=2000 {
            let x = i as f32 * 0.01;
            let want = x as f64 / (1.0 + (-(x as f64)).exp());
            assert!((silu(x) as f64 - want).abs() <= 1e-6 * want.abs().max(1.0));
        }
    }
}
