//! The AVX-512 f32 micro-kernel (12 x 32, 24 zmm accumulators) in assembly: each A value is
//! broadcast by the multiply-add itself (`{1to16}` memory operand), which the intrinsics
//! version cannot express (the compiler loads each broadcast once into a register and reuses
//! it for both B vectors: a separate shuffle per row). The portable `fma::tile` computes the
//! same tile in the same order and is its reference (the gemm and conv tests run both).
//! Measured here (interleaved runs, 2 threads, medians of 30): 8192 x 320 x 320 166.6 -> 175.0
//! GFLOP/s, 2048 x 640 x 640 190.2 -> 203.5, 512 x 1280 x 1280 208.2 -> 214.4.

use std::arch::asm;

use super::TileArgs;

// The asm prefetches 2048 bytes ahead: 16 steps of 32 f32.
const _: () = assert!(super::fma::PREFETCH_B_STEPS * 32 * 4 == 2048);

/// One tile: `C (+)= A . B` over `t.kc` steps (`t.accumulate`: starting from C), prefetching
/// B [`super::fma::PREFETCH_B_STEPS`] steps (2 KiB) ahead into L1 as the intrinsics kernels do.
///
/// # Safety
/// As [`super::fma`]'s kernels: `t.a` holds `kc * 12` f32, `t.b` `kc * 32` f32, `t.c` a
/// 12 x 32 tile with row stride `t.ldc`; AVX-512F is available.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn avx512_f32(t: &TileArgs) {
    debug_assert!(t.ldc >= 32);
    // SAFETY: the asm reads `kc` steps of 48 bytes of A and 128 bytes of B from the given
    // pointers and reads/writes 12 rows of 128 bytes of C, `ldc` floats apart: the ranges of
    // the function contract. Prefetches never fault. It clobbers only the listed registers.
    unsafe {
        asm!(
                "test {acc}, {acc}",
                "jz 20f",
                "mov {cp}, {c}",
                "vmovups zmm0, [{cp}]", "vmovups zmm1, [{cp} + 64]", "add {cp}, {ldc}",
                "vmovups zmm2, [{cp}]", "vmovups zmm3, [{cp} + 64]", "add {cp}, {ldc}",
                "vmovups zmm4, [{cp}]", "vmovups zmm5, [{cp} + 64]", "add {cp}, {ldc}",
                "vmovups zmm6, [{cp}]", "vmovups zmm7, [{cp} + 64]", "add {cp}, {ldc}",
                "vmovups zmm8, [{cp}]", "vmovups zmm9, [{cp} + 64]", "add {cp}, {ldc}",
                "vmovups zmm10, [{cp}]", "vmovups zmm11, [{cp} + 64]", "add {cp}, {ldc}",
                "vmovups zmm12, [{cp}]", "vmovups zmm13, [{cp} + 64]", "add {cp}, {ldc}",
                "vmovups zmm14, [{cp}]", "vmovups zmm15, [{cp} + 64]", "add {cp}, {ldc}",
                "vmovups zmm16, [{cp}]", "vmovups zmm17, [{cp} + 64]", "add {cp}, {ldc}",
                "vmovups zmm18, [{cp}]", "vmovups zmm19, [{cp} + 64]", "add {cp}, {ldc}",
                "vmovups zmm20, [{cp}]", "vmovups zmm21, [{cp} + 64]", "add {cp}, {ldc}",
                "vmovups zmm22, [{cp}]", "vmovups zmm23, [{cp} + 64]", "add {cp}, {ldc}",
                "jmp 21f",
                "20:",
                "vpxord zmm0, zmm0, zmm0",
                "vpxord zmm1, zmm1, zmm1",
                "vpxord zmm2, zmm2, zmm2",
                "vpxord zmm3, zmm3, zmm3",
                "vpxord zmm4, zmm4, zmm4",
                "vpxord zmm5, zmm5, zmm5",
                "vpxord zmm6, zmm6, zmm6",
                "vpxord zmm7, zmm7, zmm7",
                "vpxord zmm8, zmm8, zmm8",
                "vpxord zmm9, zmm9, zmm9",
                "vpxord zmm10, zmm10, zmm10",
                "vpxord zmm11, zmm11, zmm11",
                "vpxord zmm12, zmm12, zmm12",
                "vpxord zmm13, zmm13, zmm13",
                "vpxord zmm14, zmm14, zmm14",
                "vpxord zmm15, zmm15, zmm15",
                "vpxord zmm16, zmm16, zmm16",
                "vpxord zmm17, zmm17, zmm17",
                "vpxord zmm18, zmm18, zmm18",
                "vpxord zmm19, zmm19, zmm19",
                "vpxord zmm20, zmm20, zmm20",
                "vpxord zmm21, zmm21, zmm21",
                "vpxord zmm22, zmm22, zmm22",
                "vpxord zmm23, zmm23, zmm23",
                "21:",
                "test {k}, {k}",
                "jz 23f",
                "22:",
                "prefetcht0 [{b} + 2048]", "prefetcht0 [{b} + 2112]",
                "vmovups zmm28, [{b}]", "vmovups zmm29, [{b} + 64]",
                "vfmadd231ps zmm0, zmm28, dword ptr [{a} + 0]{{1to16}}", "vfmadd231ps zmm1, zmm29, dword ptr [{a} + 0]{{1to16}}",
                "vfmadd231ps zmm2, zmm28, dword ptr [{a} + 4]{{1to16}}", "vfmadd231ps zmm3, zmm29, dword ptr [{a} + 4]{{1to16}}",
                "vfmadd231ps zmm4, zmm28, dword ptr [{a} + 8]{{1to16}}", "vfmadd231ps zmm5, zmm29, dword ptr [{a} + 8]{{1to16}}",
                "vfmadd231ps zmm6, zmm28, dword ptr [{a} + 12]{{1to16}}", "vfmadd231ps zmm7, zmm29, dword ptr [{a} + 12]{{1to16}}",
                "vfmadd231ps zmm8, zmm28, dword ptr [{a} + 16]{{1to16}}", "vfmadd231ps zmm9, zmm29, dword ptr [{a} + 16]{{1to16}}",
                "vfmadd231ps zmm10, zmm28, dword ptr [{a} + 20]{{1to16}}", "vfmadd231ps zmm11, zmm29, dword ptr [{a} + 20]{{1to16}}",
                "vfmadd231ps zmm12, zmm28, dword ptr [{a} + 24]{{1to16}}", "vfmadd231ps zmm13, zmm29, dword ptr [{a} + 24]{{1to16}}",
                "vfmadd231ps zmm14, zmm28, dword ptr [{a} + 28]{{1to16}}", "vfmadd231ps zmm15, zmm29, dword ptr [{a} + 28]{{1to16}}",
                "vfmadd231ps zmm16, zmm28, dword ptr [{a} + 32]{{1to16}}", "vfmadd231ps zmm17, zmm29, dword ptr [{a} + 32]{{1to16}}",
                "vfmadd231ps zmm18, zmm28, dword ptr [{a} + 36]{{1to16}}", "vfmadd231ps zmm19, zmm29, dword ptr [{a} + 36]{{1to16}}",
                "vfmadd231ps zmm20, zmm28, dword ptr [{a} + 40]{{1to16}}", "vfmadd231ps zmm21, zmm29, dword ptr [{a} + 40]{{1to16}}",
                "vfmadd231ps zmm22, zmm28, dword ptr [{a} + 44]{{1to16}}", "vfmadd231ps zmm23, zmm29, dword ptr [{a} + 44]{{1to16}}",
                "add {a}, 48", "add {b}, 128",
                "dec {k}",
                "jnz 22b",
                "23:",
                "mov {cp}, {c}",
                "vmovups [{cp}], zmm0", "vmovups [{cp} + 64], zmm1", "add {cp}, {ldc}",
                "vmovups [{cp}], zmm2", "vmovups [{cp} + 64], zmm3", "add {cp}, {ldc}",
                "vmovups [{cp}], zmm4", "vmovups [{cp} + 64], zmm5", "add {cp}, {ldc}",
                "vmovups [{cp}], zmm6", "vmovups [{cp} + 64], zmm7", "add {cp}, {ldc}",
                "vmovups [{cp}], zmm8", "vmovups [{cp} + 64], zmm9", "add {cp}, {ldc}",
                "vmovups [{cp}], zmm10", "vmovups [{cp} + 64], zmm11", "add {cp}, {ldc}",
                "vmovups [{cp}], zmm12", "vmovups [{cp} + 64], zmm13", "add {cp}, {ldc}",
                "vmovups [{cp}], zmm14", "vmovups [{cp} + 64], zmm15", "add {cp}, {ldc}",
                "vmovups [{cp}], zmm16", "vmovups [{cp} + 64], zmm17", "add {cp}, {ldc}",
                "vmovups [{cp}], zmm18", "vmovups [{cp} + 64], zmm19", "add {cp}, {ldc}",
                "vmovups [{cp}], zmm20", "vmovups [{cp} + 64], zmm21", "add {cp}, {ldc}",
                "vmovups [{cp}], zmm22", "vmovups [{cp} + 64], zmm23", "add {cp}, {ldc}",
                a = inout(reg) t.a => _,
                b = inout(reg) t.b => _,
                k = inout(reg) t.kc => _,
                c = in(reg) t.c,
                cp = out(reg) _,
                ldc = in(reg) t.ldc * 4,
                acc = in(reg) usize::from(t.accumulate),
                out("zmm0") _,
                out("zmm1") _,
                out("zmm2") _,
                out("zmm3") _,
                out("zmm4") _,
                out("zmm5") _,
                out("zmm6") _,
                out("zmm7") _,
                out("zmm8") _,
                out("zmm9") _,
                out("zmm10") _,
                out("zmm11") _,
                out("zmm12") _,
                out("zmm13") _,
                out("zmm14") _,
                out("zmm15") _,
                out("zmm16") _,
                out("zmm17") _,
                out("zmm18") _,
                out("zmm19") _,
                out("zmm20") _,
                out("zmm21") _,
                out("zmm22") _,
                out("zmm23") _,
                out("zmm28") _,
                out("zmm29") _,
                options(nostack),
        );
    }
}
