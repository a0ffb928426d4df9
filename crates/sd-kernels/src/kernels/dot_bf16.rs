//! The AVX512-BF16 micro-kernel: 12 rows x 32 columns; each K pair step broadcasts one
//! (k, k+1) bf16 pair of A per row and multiplies it into two vectors of 16 B column pairs with
//! `vdpbf16ps` (32 multiply-adds per instruction). A is packed `[tile][k/2][12][2]`, B
//! `[panel][k/2][32][2]`. The emulated instance runs the same code on 16-lane arrays.

use super::{prefetch, AFormat, Micro, TileArgs};
use crate::isa::Isa;
use crate::simd::{Bf16DotVec, Emu};

const MR: usize = 12;
const NV: usize = 2;
/// Pair steps between the B line being prefetched into L1 and the one being read: 2 KiB, as
/// in the FMA kernel (see `fma::PREFETCH_B_STEPS`).
const PREFETCH_B_PAIR_STEPS: usize = 16;

/// # Safety
/// `t.a` holds `kc/2 * MR` pairs, `t.b` `kc/2 * NV*LANES` pairs, `t.c` an `MR x NV*LANES` tile
/// with row stride `t.ldc`; `kc` is even; the vector ISA is available.
#[inline(always)]
unsafe fn tile<V: Bf16DotVec>(t: &TileArgs) {
    let nr = NV * V::LANES;
    let a = t.a as *const u32;
    let b = t.b as *const u16;
    debug_assert!(t.kc.is_multiple_of(2));
    // SAFETY: offsets stay inside the function contract: rows < MR, vectors < NV,
    // pair steps < kc/2.
    unsafe {
        let mut acc = [[V::zero(); NV]; MR];
        if t.accumulate {
            for (i, row) in acc.iter_mut().enumerate() {
                for (v, x) in row.iter_mut().enumerate() {
                    *x = V::load(t.c.add(i * t.ldc + v * V::LANES));
                }
            }
        }
        for kk in 0..t.kc / 2 {
            let bk = b.add(kk * nr * 2);
            // Two lines per pair step (32 columns x 2 x bf16); wrapping, never dereferenced.
            let ahead = (bk as *const u8).wrapping_add(PREFETCH_B_PAIR_STEPS * nr * 4);
            prefetch(ahead);
            prefetch(ahead.wrapping_add(64));
            let b0 = V::load_pairs(bk);
            let b1 = V::load_pairs(bk.add(2 * V::LANES));
            let ak = a.add(kk * MR);
            for (i, row) in acc.iter_mut().enumerate() {
                let av = V::splat_pair(std::ptr::read_unaligned(ak.add(i)));
                row[0] = V::dot_pairs(row[0], av, b0);
                row[1] = V::dot_pairs(row[1], av, b1);
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                x.store(t.c.add(i * t.ldc + v * V::LANES));
            }
        }
    }
}

fn micro(run: unsafe fn(&TileArgs), epilogue_isa: Isa) -> Micro {
    Micro {
        mr: MR,
        nr: NV * 16,
        mc: 96,
        nc: 256,
        kc: 256,
        a_format: AFormat::Bf16PairPanels,
        run,
        begin: None,
        end: None,
        epilogue_isa,
    }
}

/// The kernel on 16-lane arrays with `vdpbf16ps`'s rounding and denormal rules.
pub(crate) fn emulated() -> Micro {
    unsafe fn run(t: &TileArgs) {
        // SAFETY: forwarded contract; Emu needs no ISA.
        unsafe { tile::<Emu<16>>(t) }
    }
    micro(run, Isa::Generic)
}

/// The native kernel (needs AVX512-BF16).
pub(crate) fn native() -> Micro {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
        unsafe fn run(t: &TileArgs) {
            // SAFETY: forwarded contract; AVX512-BF16 enabled on this function.
            unsafe { tile::<crate::simd::Avx512Vec>(t) }
        }
        micro(run, Isa::Avx512)
    }
    #[cfg(not(target_arch = "x86_64"))]
    emulated()
}
