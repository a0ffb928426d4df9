//! The AMX-BF16 micro-kernel: a 32 x 32 f32 block in four tiles (tmm0-3) from two A tiles
//! (tmm4-5: 16 rows x 32 bf16, loaded with the packed A's row stride) and two B tiles (tmm6-7:
//! 16 k-pairs x 16 columns, one per B panel), 32 steps of K per `tdpbf16ps` round.
//!
//! The tile instructions sit behind the [`Tiles`] trait: [`Hardware`] issues them through
//! `asm!` (their intrinsics are unstable); [`Emulator`] executes the same loads, dot products
//! and stores on arrays, with the same addressing, so the driver code runs on any host.

use super::{AFormat, Micro, TileArgs};
use crate::isa::Isa;
use crate::simd::{bf16_daz, ftz};

/// Rows per A tile / k-pairs per B tile / rows of a C tile.
const TILE_ROWS: usize = 16;
/// K per tile step (16 pairs).
const TILE_K: usize = 32;

/// The tile operations the kernel uses; indices are tile registers (C: 0-3, A: 4-5, B: 6-7).
trait Tiles {
    /// # Safety
    /// `p` covers 16 rows of 64 bytes at `stride` bytes apart.
    unsafe fn load(&mut self, tile: usize, p: *const u8, stride: usize);
    /// # Safety
    /// `p` covers 16 rows of 64 bytes at `stride` bytes apart.
    unsafe fn store(&mut self, tile: usize, p: *mut u8, stride: usize);
    /// # Safety
    /// Tiles configured.
    unsafe fn zero(&mut self, tile: usize);
    /// `C[c] += A[a] . B[b]` in bf16 pairs.
    /// # Safety
    /// Tiles configured.
    unsafe fn dot(&mut self, c: usize, a: usize, b: usize);
}

/// # Safety
/// `t.a` covers 32 rows of `kc` bf16 at `t.a_stride` elements apart; `t.b` two panels of
/// `kc/2` rows of 64 bytes, `t.b_panel_stride` elements apart; `t.c` a 32 x 32 f32 tile with
/// row stride `t.ldc`; `kc` is a multiple of 32; the tiles are configured.
#[inline(always)]
unsafe fn tile<T: Tiles>(tiles: &mut T, t: &TileArgs) {
    debug_assert!(t.kc.is_multiple_of(TILE_K));
    let a_stride = t.a_stride * 2;
    let c_stride = t.ldc * 4;
    let a = t.a;
    let b = t.b;
    let c = t.c as *mut u8;
    // SAFETY: all offsets stay inside the function contract (rows < 32, columns < 32,
    // k < kc), and the tile registers used are 0-7.
    unsafe {
        for ci in 0..4 {
            let ptr = c.add((ci / 2) * TILE_ROWS * c_stride + (ci % 2) * 16 * 4);
            if t.accumulate {
                tiles.load(ci, ptr, c_stride);
            } else {
                tiles.zero(ci);
            }
        }
        for k0 in (0..t.kc).step_by(TILE_K) {
            tiles.load(4, a.add(k0 * 2), a_stride);
            tiles.load(5, a.add(TILE_ROWS * a_stride + k0 * 2), a_stride);
            // A panel's K block of 32 is 16 pair rows of 64 bytes: k0 * 16 columns * 2 bytes.
            tiles.load(6, b.add(k0 * 16 * 2), 64);
            tiles.load(7, b.add((t.b_panel_stride + k0 * 16) * 2), 64);
            tiles.dot(0, 4, 6);
            tiles.dot(1, 4, 7);
            tiles.dot(2, 5, 6);
            tiles.dot(3, 5, 7);
        }
        for ci in 0..4 {
            let ptr = c.add((ci / 2) * TILE_ROWS * c_stride + (ci % 2) * 16 * 4);
            tiles.store(ci, ptr, c_stride);
        }
    }
}

/// Eight 1 KB tile registers in memory, with `tdpbf16ps`'s order of operations, denormals
/// read as zero and flushed on output.
struct Emulator {
    regs: [[u32; 256]; 8],
}

impl Tiles for Emulator {
    unsafe fn load(&mut self, tile: usize, p: *const u8, stride: usize) {
        for r in 0..TILE_ROWS {
            // SAFETY: the caller guarantees 16 rows of 64 readable bytes.
            let row = unsafe { std::ptr::read_unaligned(p.add(r * stride) as *const [u32; 16]) };
            self.regs[tile][r * 16..(r + 1) * 16].copy_from_slice(&row);
        }
    }
    unsafe fn store(&mut self, tile: usize, p: *mut u8, stride: usize) {
        for r in 0..TILE_ROWS {
            let mut row = [0u32; 16];
            row.copy_from_slice(&self.regs[tile][r * 16..(r + 1) * 16]);
            // SAFETY: the caller guarantees 16 rows of 64 writable bytes.
            unsafe { std::ptr::write_unaligned(p.add(r * stride) as *mut [u32; 16], row) };
        }
    }
    unsafe fn zero(&mut self, tile: usize) {
        self.regs[tile] = [0; 256];
    }
    unsafe fn dot(&mut self, c: usize, a: usize, b: usize) {
        let (av, bv) = (self.regs[a], self.regs[b]);
        let cv = &mut self.regs[c];
        for m in 0..TILE_ROWS {
            for k in 0..16 {
                let ap = av[m * 16 + k];
                for n in 0..16 {
                    let bp = bv[k * 16 + n];
                    let mut acc = f32::from_bits(cv[m * 16 + n]);
                    acc = ftz(acc + bf16_daz((ap >> 16) as u16) * bf16_daz((bp >> 16) as u16));
                    acc = ftz(acc + bf16_daz(ap as u16) * bf16_daz(bp as u16));
                    cv[m * 16 + n] = acc.to_bits();
                }
            }
        }
    }
}

fn micro(run: unsafe fn(&TileArgs), begin: Option<unsafe fn()>, end: Option<unsafe fn()>) -> Micro {
    Micro {
        mr: 32,
        nr: 32,
        mc: 64,
        nc: 256,
        kc: 512,
        a_format: AFormat::Bf16Rows,
        run,
        begin,
        end,
        epilogue_isa: if begin.is_some() {
            Isa::Avx512
        } else {
            Isa::Generic
        },
    }
}

/// The kernel on the tile emulator.
pub(crate) fn emulated() -> Micro {
    unsafe fn run(t: &TileArgs) {
        let mut tiles = Emulator {
            regs: [[0; 256]; 8],
        };
        // SAFETY: forwarded contract; the emulator needs no configuration.
        unsafe { tile(&mut tiles, t) }
    }
    micro(run, None, None)
}

#[cfg(target_arch = "x86_64")]
mod hw {
    use super::*;
    use std::arch::asm;

    /// The tile configuration: palette 1, every tile 16 rows x 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    static CONFIG: TileConfig = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    /// Loads the tile configuration (`ldtilecfg`).
    pub(super) unsafe fn configure() {
        // SAFETY: CONFIG is a valid 64-byte palette-1 configuration, 64-byte aligned; the
        // caller checked AMX support and permission.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG as *const TileConfig, options(nostack)) }
    }

    /// Releases the tile state (`tilerelease`).
    pub(super) unsafe fn release() {
        // SAFETY: valid after configure; releases this thread's tile state.
        unsafe { asm!("tilerelease", options(nostack, nomem)) }
    }

    /// The tile registers themselves.
    pub(super) struct Hardware;

    macro_rules! by_tile {
        ($t:expr, $mac:ident) => {
            match $t {
                0 => $mac!("tmm0"),
                1 => $mac!("tmm1"),
                2 => $mac!("tmm2"),
                3 => $mac!("tmm3"),
                4 => $mac!("tmm4"),
                5 => $mac!("tmm5"),
                6 => $mac!("tmm6"),
                _ => $mac!("tmm7"),
            }
        };
    }

    impl Tiles for Hardware {
        #[inline(always)]
        unsafe fn load(&mut self, tile: usize, p: *const u8, stride: usize) {
            macro_rules! ld {
                ($r:literal) => {
                    // SAFETY: the caller guarantees 16 readable rows of 64 bytes.
                    unsafe {
                        asm!(concat!("tileloadd ", $r, ", [{p} + {s}*1]"), p = in(reg) p,
                             s = in(reg) stride, options(nostack, readonly))
                    }
                };
            }
            by_tile!(tile, ld)
        }
        #[inline(always)]
        unsafe fn store(&mut self, tile: usize, p: *mut u8, stride: usize) {
            macro_rules! st {
                ($r:literal) => {
                    // SAFETY: the caller guarantees 16 writable rows of 64 bytes.
                    unsafe {
                        asm!(concat!("tilestored [{p} + {s}*1], ", $r), p = in(reg) p,
                             s = in(reg) stride, options(nostack))
                    }
                };
            }
            by_tile!(tile, st)
        }
        #[inline(always)]
        unsafe fn zero(&mut self, tile: usize) {
            macro_rules! z {
                ($r:literal) => {
                    // SAFETY: tiles are configured (caller contract).
                    unsafe { asm!(concat!("tilezero ", $r), options(nostack, nomem)) }
                };
            }
            by_tile!(tile, z)
        }
        #[inline(always)]
        unsafe fn dot(&mut self, c: usize, a: usize, b: usize) {
            macro_rules! dp {
                ($c:literal, $a:literal, $b:literal) => {
                    // SAFETY: tiles are configured (caller contract).
                    unsafe {
                        asm!(
                            concat!("tdpbf16ps ", $c, ", ", $a, ", ", $b),
                            options(nostack, nomem)
                        )
                    }
                };
            }
            match (c, a, b) {
                (0, 4, 6) => dp!("tmm0", "tmm4", "tmm6"),
                (1, 4, 7) => dp!("tmm1", "tmm4", "tmm7"),
                (2, 5, 6) => dp!("tmm2", "tmm5", "tmm6"),
                _ => dp!("tmm3", "tmm5", "tmm7"),
            }
        }
    }
}

/// The kernel on the AMX tile registers (needs AMX-BF16 and the tile-data permission).
pub(crate) fn native() -> Micro {
    #[cfg(target_arch = "x86_64")]
    {
        unsafe fn run(t: &TileArgs) {
            // SAFETY: forwarded contract; the worker called `configure` first.
            unsafe { tile(&mut hw::Hardware, t) }
        }
        unsafe fn begin() {
            // SAFETY: the driver only selects this kernel when AMX is usable.
            unsafe { hw::configure() }
        }
        unsafe fn end() {
            // SAFETY: paired with begin on the same thread.
            unsafe { hw::release() }
        }
        micro(run, Some(begin), Some(end))
    }
    #[cfg(not(target_arch = "x86_64"))]
    emulated()
}
