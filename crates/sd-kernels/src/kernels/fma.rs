//! The FMA micro-kernel: `MR` rows x `NV` vectors of accumulators, one broadcast of A and `NV`
//! loads of B per K step. f32 B panels are loaded as they are; bf16 panels are widened in
//! registers (a shift for one half of a word, a mask for the other), so bf16 weights stay
//! bf16 in memory. Instances: portable (4 x 16),
//! AVX2 (6 x 16), AVX-512 (12 x 32, also emulated with 16-lane arrays; in f32 natively the
//! assembly of `fma_asm.rs`, which computes the same tile in the same order).

use super::{prefetch, AFormat, Micro, TileArgs};
use crate::isa::Isa;
use crate::pack::DType;
use crate::simd::{Emu, F32Vec};

/// An element of a packed B panel.
pub(crate) trait BElem {
    /// The two vectors of columns `0..LANES` and `LANES..2 * LANES` of one K step of a panel
    /// (bf16 panels hold them as interleaved halves, see `pack::bf16_slot`).
    /// # Safety
    /// `p` is valid for `2 * V::LANES` elements; the vector ISA is available.
    unsafe fn load_two<V: F32Vec>(p: *const Self) -> (V, V);
}

impl BElem for f32 {
    #[inline(always)]
    unsafe fn load_two<V: F32Vec>(p: *const f32) -> (V, V) {
        // SAFETY: forwarded caller contract.
        unsafe { (V::load(p), V::load(p.add(V::LANES))) }
    }
}

impl BElem for u16 {
    #[inline(always)]
    unsafe fn load_two<V: F32Vec>(p: *const u16) -> (V, V) {
        // SAFETY: forwarded caller contract.
        unsafe { V::load_bf16_halves(p) }
    }
}

/// How many K steps ahead the kernel prefetches its B panel into L1. The panel (256 steps of
/// 32 f32 = 32 KiB) and the A panel streaming past it do not both stay in a 48 KiB L1, and the
/// hardware prefetchers fill L2, not L1: prefetching 16 steps (2 KiB) ahead made a 640 -> 640
/// convolution at 32x32 about 7-15% faster on one thread (interleaved runs; 8 to 32 steps
/// were alike, prefetching A gained nothing).
pub(crate) const PREFETCH_B_STEPS: usize = 16;

/// The kernel body, instantiated per vector type inside `#[target_feature]` wrappers.
///
/// # Safety
/// `t.a` holds `kc * MR` f32, `t.b` `kc * NV * LANES` elements `B`, `t.c` an `MR x NV*LANES`
/// tile with row stride `t.ldc`; the vector ISA is available.
#[inline(always)]
unsafe fn tile<V: F32Vec, B: BElem, const MR: usize, const NV: usize>(t: &TileArgs) {
    const { assert!(NV.is_multiple_of(2), "B is loaded two vectors at a time") };
    let nr = NV * V::LANES;
    let a = t.a as *const f32;
    let b = t.b as *const B;
    // SAFETY: every pointer offset below stays inside the ranges of the function contract:
    // rows < MR, vectors < NV, k < kc.
    unsafe {
        let mut acc = [[V::zero(); NV]; MR];
        if t.accumulate {
            for (i, row) in acc.iter_mut().enumerate() {
                for (v, x) in row.iter_mut().enumerate() {
                    *x = V::load(t.c.add(i * t.ldc + v * V::LANES));
                }
            }
        }
        let step_bytes = nr * std::mem::size_of::<B>();
        for k in 0..t.kc {
            let bk = b.add(k * nr);
            // Past the panel's end this touches the next panel or nothing: wrapping
            // arithmetic, never dereferenced.
            let ahead = (bk as *const u8).wrapping_add(PREFETCH_B_STEPS * step_bytes);
            for line in (0..step_bytes).step_by(64) {
                prefetch(ahead.wrapping_add(line));
            }
            let mut bv = [V::zero(); NV];
            for (v, pair) in bv.chunks_exact_mut(2).enumerate() {
                (pair[0], pair[1]) = B::load_two::<V>(bk.add(2 * v * V::LANES));
            }
            let ak = a.add(k * MR);
            for (i, row) in acc.iter_mut().enumerate() {
                let av = V::splat(*ak.add(i));
                for (x, bx) in row.iter_mut().zip(bv.iter()) {
                    *x = V::fmadd(av, *bx, *x);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                x.store(t.c.add(i * t.ldc + v * V::LANES));
            }
        }
    }
}

fn micro(mr: usize, nr: usize, run: unsafe fn(&TileArgs), isa: Isa) -> Micro {
    Micro {
        mr,
        nr,
        mc: mr * (96 / mr).max(1),
        nc: 256,
        kc: 256,
        a_format: AFormat::F32Panels,
        run,
        begin: None,
        end: None,
        epilogue_isa: isa,
    }
}

/// The portable kernel: 4 rows x 16 columns of 8-lane arrays.
pub(crate) fn generic(dtype: DType) -> Micro {
    unsafe fn f32_tile(t: &TileArgs) {
        // SAFETY: forwarded contract; Emu needs no ISA.
        unsafe { tile::<Emu<8>, f32, 4, 2>(t) }
    }
    unsafe fn bf16_tile(t: &TileArgs) {
        // SAFETY: forwarded contract; Emu needs no ISA.
        unsafe { tile::<Emu<8>, u16, 4, 2>(t) }
    }
    let run = match dtype {
        DType::F32 => f32_tile as unsafe fn(&TileArgs),
        DType::Bf16 => bf16_tile,
    };
    micro(4, 16, run, Isa::Generic)
}

/// AVX-512's blocking (12 x 32) with 16-lane arrays: runs the AVX-512 kernel's packing and
/// addressing on any host.
pub(crate) fn avx512_emulated(dtype: DType) -> Micro {
    unsafe fn f32_tile(t: &TileArgs) {
        // SAFETY: forwarded contract; Emu needs no ISA.
        unsafe { tile::<Emu<16>, f32, 12, 2>(t) }
    }
    unsafe fn bf16_tile(t: &TileArgs) {
        // SAFETY: forwarded contract; Emu needs no ISA.
        unsafe { tile::<Emu<16>, u16, 12, 2>(t) }
    }
    let run = match dtype {
        DType::F32 => f32_tile as unsafe fn(&TileArgs),
        DType::Bf16 => bf16_tile,
    };
    micro(12, 32, run, Isa::Generic)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use crate::simd::{Avx2Vec, Avx512Vec};

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2_f32(t: &TileArgs) {
        // SAFETY: forwarded contract; AVX2+FMA enabled on this function.
        unsafe { tile::<Avx2Vec, f32, 6, 2>(t) }
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2_bf16(t: &TileArgs) {
        // SAFETY: forwarded contract; AVX2+FMA enabled on this function.
        unsafe { tile::<Avx2Vec, u16, 6, 2>(t) }
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) unsafe fn avx512_bf16(t: &TileArgs) {
        // SAFETY: forwarded contract; AVX-512F enabled on this function.
        unsafe { tile::<Avx512Vec, u16, 12, 2>(t) }
    }
}

/// The AVX2 + FMA kernel, 6 x 16 (12 ymm accumulators).
pub(crate) fn avx2(dtype: DType) -> Micro {
    #[cfg(target_arch = "x86_64")]
    {
        let run = match dtype {
            DType::F32 => x86::avx2_f32 as unsafe fn(&TileArgs),
            DType::Bf16 => x86::avx2_bf16,
        };
        micro(6, 16, run, Isa::Avx2)
    }
    #[cfg(not(target_arch = "x86_64"))]
    generic(dtype)
}

/// The AVX-512F kernel, 12 x 32 (24 zmm accumulators).
pub(crate) fn avx512(dtype: DType) -> Micro {
    #[cfg(target_arch = "x86_64")]
    {
        let run = match dtype {
            // f32 in assembly (embedded broadcasts), bf16 widened by the intrinsics body.
            DType::F32 => super::fma_asm::avx512_f32 as unsafe fn(&TileArgs),
            DType::Bf16 => x86::avx512_bf16,
        };
        micro(12, 32, run, Isa::Avx512)
    }
    #[cfg(not(target_arch = "x86_64"))]
    avx512_emulated(dtype)
}
