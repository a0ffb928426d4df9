//! Whole-slice bf16 <-> f32 conversion, vectorized (the `half` crate converts slices one
//! element at a time). f32 -> bf16 rounds to nearest even and maps NaN to the canonical quiet
//! NaN `0x7FC0`, as torch's `c10::BFloat16` does.

use half::bf16;

use crate::isa::Isa;

#[inline(always)]
pub(crate) fn round_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        0x7fc0
    } else {
        rounded
    }
}

#[inline(always)]
fn to_f32_body(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((s.to_bits() as u32) << 16);
    }
}

#[inline(always)]
fn to_bf16_body(src: &[f32], dst: &mut [bf16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = bf16::from_bits(round_bits(*s));
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;

    #[target_feature(enable = "avx2")]
    pub(super) fn to_f32_avx2(src: &[bf16], dst: &mut [f32]) {
        to_f32_body(src, dst)
    }
    #[target_feature(enable = "avx2")]
    pub(super) fn to_bf16_avx2(src: &[f32], dst: &mut [bf16]) {
        to_bf16_body(src, dst)
    }
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) fn to_f32_avx512(src: &[bf16], dst: &mut [f32]) {
        to_f32_body(src, dst)
    }
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) fn to_bf16_avx512(src: &[f32], dst: &mut [bf16]) {
        to_bf16_body(src, dst)
    }
}

/// Widens `src` into `dst` (the first `min(len)` elements).
pub fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
    bf16_to_f32_on(Isa::current(), src, dst)
}

/// Rounds `src` into `dst` (the first `min(len)` elements), nearest even.
pub fn f32_to_bf16(src: &[f32], dst: &mut [bf16]) {
    f32_to_bf16_on(Isa::current(), src, dst)
}

/// [`bf16_to_f32`] on a given path (falls back to the best supported one below it).
pub fn bf16_to_f32_on(isa: Isa, src: &[bf16], dst: &mut [f32]) {
    let isa = Isa::best_up_to(isa);
    #[cfg(target_arch = "x86_64")]
    {
        if isa >= Isa::Avx512 {
            // SAFETY: best_up_to returned a path the host supports, which includes AVX-512F/BW.
            return unsafe { x86::to_f32_avx512(src, dst) };
        }
        if isa >= Isa::Avx2 {
            // SAFETY: the host supports AVX2 (best_up_to).
            return unsafe { x86::to_f32_avx2(src, dst) };
        }
    }
    let _ = isa;
    to_f32_body(src, dst)
}

/// [`f32_to_bf16`] on a given path (falls back to the best supported one below it).
pub fn f32_to_bf16_on(isa: Isa, src: &[f32], dst: &mut [bf16]) {
    let isa = Isa::best_up_to(isa);
    #[cfg(target_arch = "x86_64")]
    {
        if isa >= Isa::Avx512 {
            // SAFETY: the host supports AVX-512F/BW (best_up_to).
            return unsafe { x86::to_bf16_avx512(src, dst) };
        }
        if isa >= Isa::Avx2 {
            // SAFETY: the host supports AVX2 (best_up_to).
            return unsafe { x86::to_bf16_avx2(src, dst) };
        }
    }
    let _ = isa;
    to_bf16_body(src, dst)
}

/// A new f32 vector from bf16.
pub fn bf16_slice_to_f32_vec(src: &[bf16]) -> Vec<f32> {
    let mut out = vec![0f32; src.len()];
    bf16_to_f32(src, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_matches_half_and_torch_on_every_path() {
        // Ties, carries into the exponent, infinities, NaN, denormals, odd lengths.
        let mut xs: Vec<f32> = vec![
            1.0,
            f32::from_bits(0x3f80_8000), // tie, even below: stays
            f32::from_bits(0x3f81_8000), // tie, odd below: rounds up
            f32::from_bits(0x3f80_8001),
            f32::from_bits(0x7f7f_ffff), // max: rounds to inf, as torch
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -0.0,
            1e-40,
            -3.75e-39,
        ];
        xs.extend((0..1000).map(|i| ((i as f32) * 0.7311).sin() * 10f32.powi(i % 7 - 3)));
        for isa in Isa::ALL {
            for len in [0, 1, 7, 15, 16, 17, 33, xs.len()] {
                let mut got = vec![bf16::ZERO; len];
                f32_to_bf16_on(isa, &xs[..len], &mut got);
                for (x, g) in xs.iter().zip(&got) {
                    let want = if x.is_nan() {
                        0x7fc0
                    } else {
                        bf16::from_f32(*x).to_bits()
                    };
                    assert_eq!(g.to_bits(), want, "{isa}: {x:e}");
                }
                let mut back = vec![0f32; len];
                bf16_to_f32_on(isa, &got, &mut back);
                for (b, g) in back.iter().zip(&got) {
                    assert_eq!(b.to_bits(), g.to_f32().to_bits());
                }
            }
        }
    }
}
