//! Micro-kernels: each computes one `MR x NR` f32 accumulator tile over `kc` steps of K from a
//! packed A panel and a packed B panel, starting from zero or from the tile already in the
//! scratch buffer. One kernel family per file; [`Micro::select`] picks the instance for an
//! (ISA, dtype) pair, natively or emulated.

pub(crate) mod amx;
pub(crate) mod dot_bf16;
pub(crate) mod fma;
#[cfg(target_arch = "x86_64")]
pub(crate) mod fma_asm;
pub(crate) mod interleave;

use crate::isa::Isa;
use crate::pack::DType;

/// Asks for the cache line at `p` in L1 (a hint: nothing elsewhere than x86-64).
#[inline(always)]
pub(crate) fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint that never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// How the driver packs A for a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AFormat {
    /// `[tile][k][mr]` f32 (bf16 inputs widened).
    F32Panels,
    /// `[tile][k/2][mr][2]` bf16 pairs.
    Bf16PairPanels,
    /// Row-major `[row][kp]` bf16, read by AMX tile loads with a row stride.
    Bf16Rows,
}

/// The arguments of one micro-kernel call.
pub(crate) struct TileArgs {
    /// Steps of K (a multiple of the kernel's K granularity).
    pub kc: usize,
    /// Packed A at this tile and K offset (f32 or u16 per [`AFormat`]).
    pub a: *const u8,
    /// Row stride of A in elements ([`AFormat::Bf16Rows`] only).
    pub a_stride: usize,
    /// Packed B at this panel and K offset.
    pub b: *const u8,
    /// Elements between consecutive B panels (AMX reads two).
    pub b_panel_stride: usize,
    /// The f32 accumulator tile.
    pub c: *mut f32,
    /// Row stride of `c` in f32.
    pub ldc: usize,
    /// Start from the values in `c` (else from zero).
    pub accumulate: bool,
}

/// A micro-kernel instance and its blocking.
#[derive(Clone, Copy)]
pub(crate) struct Micro {
    pub mr: usize,
    pub nr: usize,
    pub mc: usize,
    pub nc: usize,
    pub kc: usize,
    pub a_format: AFormat,
    /// # Safety
    /// The pointers of [`TileArgs`] cover the tile; the ISA is available (or emulated).
    pub run: unsafe fn(&TileArgs),
    /// Called once per worker before the first tile and after the last (AMX tile config).
    pub begin: Option<unsafe fn()>,
    pub end: Option<unsafe fn()>,
    /// Epilogue instance compiled for the ISA's vector width.
    pub epilogue_isa: Isa,
}

impl Micro {
    /// The kernel for `isa` and `dtype`. `emulate` runs the same blocking, packing and
    /// addressing with portable vector types / a tile emulator, for hosts that lack the ISA.
    pub(crate) fn select(isa: Isa, dtype: DType, emulate: bool) -> Micro {
        match (isa, dtype) {
            (Isa::Generic, _) => fma::generic(dtype),
            (Isa::Avx2, _) if emulate => fma::generic(dtype),
            (Isa::Avx2, _) => fma::avx2(dtype),
            (Isa::Avx512, _) | (Isa::Avx512Bf16 | Isa::Amx, DType::F32) => {
                if emulate {
                    fma::avx512_emulated(dtype)
                } else {
                    fma::avx512(dtype)
                }
            }
            (Isa::Avx512Bf16, DType::Bf16) => {
                if emulate {
                    dot_bf16::emulated()
                } else {
                    dot_bf16::native()
                }
            }
            (Isa::Amx, DType::Bf16) => {
                if emulate {
                    amx::emulated()
                } else {
                    amx::native()
                }
            }
        }
    }
}
