//! The few vector operations the micro-kernels need, behind one trait, so that a kernel is
//! written once and instantiated per ISA: [`Emu`] (plain arrays: the portable path, and the
//! emulator that runs the AVX-512 kernels' exact blocking on any host), AVX2 and AVX-512.
//!
//! Every method is `#[inline(always)]`: inlined into a `#[target_feature]` kernel, the
//! intrinsics compile to single instructions.

/// A vector of `LANES` f32.
pub(crate) trait F32Vec: Copy {
    const LANES: usize;
    /// # Safety
    /// The ISA of the implementation must be available.
    unsafe fn zero() -> Self;
    /// # Safety
    /// As [`F32Vec::zero`].
    unsafe fn splat(x: f32) -> Self;
    /// # Safety
    /// `p` is valid for reading `LANES` f32 (any alignment).
    unsafe fn load(p: *const f32) -> Self;
    /// Loads `LANES` 32-bit words of two bf16 each (raw bits, the low half first in memory)
    /// and widens them exactly: the low halves into the first vector, the high halves into
    /// the second (a shift and a mask, no shuffle).
    /// # Safety
    /// `p` is valid for reading `2 * LANES` u16.
    unsafe fn load_bf16_halves(p: *const u16) -> (Self, Self);
    /// # Safety
    /// `p` is valid for writing `LANES` f32.
    unsafe fn store(self, p: *mut f32);
    /// `a * b + c` (fused where the ISA has FMA).
    /// # Safety
    /// As [`F32Vec::zero`].
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self;
}

/// A vector that can also accumulate bf16 pair dot products, as `vdpbf16ps`: with `a` and
/// `b` holding `LANES` (lo, hi) bf16 pairs, lane `l` gains `a.hi[l] * b.hi[l]`, then
/// `a.lo[l] * b.lo[l]` (denormal inputs and outputs flushed to zero).
pub(crate) trait Bf16DotVec: F32Vec {
    /// `LANES` bf16 pairs.
    type Pairs: Copy;
    /// # Safety
    /// `p` is valid for reading `2 * LANES` u16; the ISA must be available.
    unsafe fn load_pairs(p: *const u16) -> Self::Pairs;
    /// One pair (`lo` in the low 16 bits) in every lane.
    /// # Safety
    /// The ISA must be available.
    unsafe fn splat_pair(pair: u32) -> Self::Pairs;
    /// # Safety
    /// The ISA must be available.
    unsafe fn dot_pairs(acc: Self, a: Self::Pairs, b: Self::Pairs) -> Self;
}

/// Widens a bf16 bit pattern to f32 (exact).
#[inline(always)]
pub(crate) fn bf16_bits_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Portable vector: `L` f32 in an array. Also the emulator of the AVX-512 kernels.
#[derive(Clone, Copy)]
pub(crate) struct Emu<const L: usize>(pub [f32; L]);

impl<const L: usize> F32Vec for Emu<L> {
    const LANES: usize = L;
    #[inline(always)]
    unsafe fn zero() -> Self {
        Emu([0.0; L])
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Emu([x; L])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller guarantees L readable f32.
        Emu(unsafe { std::ptr::read_unaligned(p as *const [f32; L]) })
    }
    #[inline(always)]
    unsafe fn load_bf16_halves(p: *const u16) -> (Self, Self) {
        let (mut lo, mut hi) = ([0f32; L], [0f32; L]);
        for (i, (l, h)) in lo.iter_mut().zip(hi.iter_mut()).enumerate() {
            // SAFETY: the caller guarantees 2 * L readable u16.
            let (a, b) = unsafe {
                (
                    p.add(2 * i).read_unaligned(),
                    p.add(2 * i + 1).read_unaligned(),
                )
            };
            *l = bf16_bits_to_f32(a);
            *h = bf16_bits_to_f32(b);
        }
        (Emu(lo), Emu(hi))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees L writable f32.
        unsafe { std::ptr::write_unaligned(p as *mut [f32; L], self.0) }
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
        let mut out = c.0;
        for ((o, x), y) in out.iter_mut().zip(a.0).zip(b.0) {
            *o += x * y;
        }
        Emu(out)
    }
}

/// Denormal inputs read as zero, as `vdpbf16ps` and `tdpbf16ps` do.
#[inline(always)]
pub(crate) fn bf16_daz(bits: u16) -> f32 {
    if bits & 0x7f80 == 0 {
        0.0
    } else {
        bf16_bits_to_f32(bits)
    }
}

/// Denormal outputs flushed to zero (sign kept), as the bf16 dot instructions do.
#[inline(always)]
pub(crate) fn ftz(x: f32) -> f32 {
    if x.to_bits() & 0x7f80_0000 == 0 {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

impl<const L: usize> Bf16DotVec for Emu<L> {
    type Pairs = [u32; L];
    #[inline(always)]
    unsafe fn load_pairs(p: *const u16) -> [u32; L] {
        // SAFETY: the caller guarantees 2 * L readable u16, i.e. L (unaligned) pairs.
        let raw = unsafe { std::ptr::read_unaligned(p as *const [[u16; 2]; L]) };
        raw.map(|[lo, hi]| lo as u32 | (hi as u32) << 16)
    }
    #[inline(always)]
    unsafe fn splat_pair(pair: u32) -> [u32; L] {
        [pair; L]
    }
    #[inline(always)]
    unsafe fn dot_pairs(acc: Self, a: [u32; L], b: [u32; L]) -> Self {
        let mut out = acc.0;
        for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
            let hi = bf16_daz((x >> 16) as u16) * bf16_daz((y >> 16) as u16);
            let lo = bf16_daz(x as u16) * bf16_daz(y as u16);
            *o = ftz(ftz(*o + hi) + lo);
        }
        Emu(out)
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2Vec, Avx512Vec};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Bf16DotVec, F32Vec};
    use std::arch::x86_64::*;

    /// 8 f32 in a ymm register (AVX2 + FMA).
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2Vec(__m256);

    impl F32Vec for Avx2Vec {
        const LANES: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> Self {
            // SAFETY: AVX is available (caller contract).
            Avx2Vec(unsafe { _mm256_setzero_ps() })
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            // SAFETY: AVX is available (caller contract).
            Avx2Vec(unsafe { _mm256_set1_ps(x) })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: 8 readable f32 (caller contract); unaligned load.
            Avx2Vec(unsafe { _mm256_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn load_bf16_halves(p: *const u16) -> (Self, Self) {
            // SAFETY: 16 readable u16 (caller contract); AVX2 available.
            unsafe {
                let w = _mm256_loadu_si256(p as *const __m256i);
                let lo = _mm256_slli_epi32::<16>(w);
                let hi = _mm256_and_si256(w, _mm256_set1_epi32(0xffff_0000_u32 as i32));
                (
                    Avx2Vec(_mm256_castsi256_ps(lo)),
                    Avx2Vec(_mm256_castsi256_ps(hi)),
                )
            }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: 8 writable f32 (caller contract).
            unsafe { _mm256_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
            // SAFETY: FMA is available (caller contract).
            Avx2Vec(unsafe { _mm256_fmadd_ps(a.0, b.0, c.0) })
        }
    }

    /// 16 f32 in a zmm register (AVX-512F; `dot_pairs` needs AVX512-BF16).
    #[derive(Clone, Copy)]
    pub(crate) struct Avx512Vec(__m512);

    impl F32Vec for Avx512Vec {
        const LANES: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> Self {
            // SAFETY: AVX-512F is available (caller contract).
            Avx512Vec(unsafe { _mm512_setzero_ps() })
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            // SAFETY: AVX-512F is available (caller contract).
            Avx512Vec(unsafe { _mm512_set1_ps(x) })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: 16 readable f32 (caller contract); unaligned load.
            Avx512Vec(unsafe { _mm512_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn load_bf16_halves(p: *const u16) -> (Self, Self) {
            // SAFETY: 32 readable u16 (caller contract); AVX-512F available.
            unsafe {
                let w = _mm512_loadu_si512(p as *const _);
                let lo = _mm512_slli_epi32::<16>(w);
                let hi = _mm512_and_si512(w, _mm512_set1_epi32(0xffff_0000_u32 as i32));
                (
                    Avx512Vec(_mm512_castsi512_ps(lo)),
                    Avx512Vec(_mm512_castsi512_ps(hi)),
                )
            }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: 16 writable f32 (caller contract).
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
            // SAFETY: AVX-512F is available (caller contract).
            Avx512Vec(unsafe { _mm512_fmadd_ps(a.0, b.0, c.0) })
        }
    }

    impl Bf16DotVec for Avx512Vec {
        type Pairs = __m512bh;
        #[inline(always)]
        unsafe fn load_pairs(p: *const u16) -> __m512bh {
            // SAFETY: 32 readable u16 (caller contract); the transmute reinterprets 512 bits
            // as the 32 bf16 that vdpbf16ps reads.
            unsafe { std::mem::transmute(_mm512_loadu_si512(p as *const _)) }
        }
        #[inline(always)]
        unsafe fn splat_pair(pair: u32) -> __m512bh {
            // SAFETY: AVX-512F available (caller contract); 512 bits reinterpreted as bf16.
            unsafe { std::mem::transmute(_mm512_set1_epi32(pair as i32)) }
        }
        #[inline(always)]
        unsafe fn dot_pairs(acc: Self, a: __m512bh, b: __m512bh) -> Self {
            // SAFETY: AVX512-BF16 available (caller contract).
            Avx512Vec(unsafe { _mm512_dpbf16_ps(acc.0, a, b) })
        }
    }
}
