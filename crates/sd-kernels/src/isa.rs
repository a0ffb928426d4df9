//! Which instruction set the kernels use: detected once per process, capped by `SD_CPU_ISA`.
//!
//! The paths, from the highest: AMX-BF16 tiles, AVX512-BF16 dot products (`vdpbf16ps`),
//! AVX-512F f32 FMA, AVX2+FMA, and the portable Rust path that every other path is tested
//! against. By default the fastest path for the host is used, which is the highest it has
//! except on Intel CPUs without usable AMX (see [`Isa::preferred`]).
//! `SD_CPU_ISA=amx|avx512bf16|avx512|avx2|generic` sets the path to the highest the host has
//! up to that name (a path above what the host has is never chosen), so every lower path can
//! be run on one host.

use std::fmt;
use std::sync::OnceLock;

/// A kernel path. Ordered: a later variant needs everything an earlier one needs (except that
/// [`Isa::Amx`] also needs the kernel's permission to use tile data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain Rust, the reference.
    Generic,
    /// AVX2 + FMA (256-bit f32 FMA).
    Avx2,
    /// AVX-512F (+BW, VL): 512-bit f32 FMA; bf16 widened in registers.
    Avx512,
    /// AVX512-BF16: `vdpbf16ps` for bf16 operands, AVX-512F for f32.
    Avx512Bf16,
    /// AMX-BF16 tiles (`tdpbf16ps`) for bf16 operands, AVX-512F for f32.
    Amx,
}

impl Isa {
    /// Every path, slowest first.
    pub const ALL: [Isa; 5] = [
        Isa::Generic,
        Isa::Avx2,
        Isa::Avx512,
        Isa::Avx512Bf16,
        Isa::Amx,
    ];

    /// The name used by `SD_CPU_ISA` and printed by the tools.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Generic => "generic",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Amx => "amx",
        }
    }

    /// Parses a name of [`Isa::name`].
    pub fn from_name(name: &str) -> Option<Isa> {
        Isa::ALL
            .into_iter()
            .find(|isa| isa.name().eq_ignore_ascii_case(name.trim()))
    }

    /// `Ok` when this host can run the path, else why not (for test reports and error messages).
    pub fn supported(self) -> Result<(), &'static str> {
        // Detected once per process: conversions ask on every call, some on every row.
        static TABLE: OnceLock<[Result<(), &'static str>; 5]> = OnceLock::new();
        TABLE.get_or_init(|| Isa::ALL.map(detect::supported))[self as usize]
    }

    /// The path the kernels use in this process. With `SD_CPU_ISA` set: the best the host
    /// supports up to that cap. Without it: the fastest path for this host ([`Isa::preferred`]).
    /// Decided once; an unknown `SD_CPU_ISA` value is reported once on stderr and ignored.
    pub fn current() -> Isa {
        static CURRENT: OnceLock<Isa> = OnceLock::new();
        *CURRENT.get_or_init(|| match std::env::var("SD_CPU_ISA") {
            Ok(v) if !v.trim().is_empty() => match Isa::from_name(&v) {
                Some(cap) => Isa::best_up_to(cap),
                None => {
                    eprintln!(
                        "warning: SD_CPU_ISA={v:?} is not one of amx, avx512bf16, avx512, \
                         avx2, generic; ignored"
                    );
                    Isa::preferred()
                }
            },
            _ => Isa::preferred(),
        })
    }

    /// The fastest path for this host, which is not always the highest it supports: Intel's
    /// `vdpbf16ps` (Cooper Lake, and Sapphire/Emerald Rapids where AMX is not usable, e.g. in
    /// a VM that hides it) retires at half the rate of its FMAs, so a bf16 product runs
    /// faster on the AVX-512F path (bf16 operands widened in registers) there: measured on a
    /// Xeon (family 6 model 207) 71 against 121 GFLOP/s on one core. On AMD Zen 4 it is the
    /// other way round (201 against 89).
    pub fn preferred() -> Isa {
        let best = Isa::best_up_to(Isa::Amx);
        if best == Isa::Avx512Bf16 && !detect::fast_bf16_dot() {
            Isa::Avx512
        } else {
            best
        }
    }

    /// The best path the host supports that is not above `cap`.
    pub fn best_up_to(cap: Isa) -> Isa {
        Isa::ALL
            .into_iter()
            .rev()
            .find(|isa| *isa <= cap && isa.supported().is_ok())
            .unwrap_or(Isa::Generic)
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One line describing the CPU and the chosen path, for `sd info` and the benches.
pub fn describe() -> String {
    let paths: Vec<String> = Isa::ALL
        .into_iter()
        .map(|isa| match isa.supported() {
            Ok(()) => format!("{isa}: yes"),
            Err(why) => format!("{isa}: no ({why})"),
        })
        .collect();
    format!(
        "cpu: {}; kernel path: {} (SD_CPU_ISA sets it); {}",
        cpu_model_name(),
        Isa::current(),
        paths.join(", ")
    )
}

/// The CPU model name as `lscpu` prints it (from /proc/cpuinfo), or "unknown".
pub fn cpu_model_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

#[cfg(target_arch = "x86_64")]
mod detect {
    use super::Isa;
    use std::sync::OnceLock;

    pub fn supported(isa: Isa) -> Result<(), &'static str> {
        match isa {
            Isa::Generic => Ok(()),
            Isa::Avx2 => {
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    Ok(())
                } else {
                    Err("the CPU lacks AVX2/FMA")
                }
            }
            Isa::Avx512 => {
                supported(Isa::Avx2)?;
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                {
                    Ok(())
                } else {
                    Err("the CPU lacks AVX-512F/BW/VL")
                }
            }
            Isa::Avx512Bf16 => {
                supported(Isa::Avx512)?;
                if is_x86_feature_detected!("avx512bf16") {
                    Ok(())
                } else {
                    Err("the CPU lacks AVX512-BF16")
                }
            }
            Isa::Amx => {
                supported(Isa::Avx512Bf16)?;
                amx_usable()
            }
        }
    }

    /// Whether `vdpbf16ps` beats two f32 FMAs per cycle: not on Intel's cores (see
    /// [`Isa::preferred`]); yes on AMD's (Zen 4) and, by default, on others.
    pub fn fast_bf16_dot() -> bool {
        // SAFETY: CPUID leaf 0 exists on every x86-64 CPU.
        #[allow(unused_unsafe)]
        let leaf0 = unsafe { std::arch::x86_64::__cpuid(0) };
        let vendor: Vec<u8> = [leaf0.ebx, leaf0.edx, leaf0.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        vendor != b"GenuineIntel"
    }

    /// AMX needs the CPU bits (CPUID.7.0:EDX 22 AMX-BF16, 24 AMX-TILE), the OS enabling tile
    /// state in XCR0 (bits 17-18), and on Linux a one-time permission request for tile data,
    /// which a kernel before 5.16 or a sandbox can refuse.
    fn amx_usable() -> Result<(), &'static str> {
        static STATE: OnceLock<Result<(), &'static str>> = OnceLock::new();
        *STATE.get_or_init(|| {
            // SAFETY: CPUID leaf 7 exists on every x86-64 CPU that passed the AVX-512 checks
            // (the intrinsic is safe on newer compilers, unsafe on the 1.89 minimum).
            #[allow(unused_unsafe)]
            let leaf7 = unsafe { std::arch::x86_64::__cpuid_count(7, 0) };
            if leaf7.edx & (1 << 22) == 0 || leaf7.edx & (1 << 24) == 0 {
                return Err("the CPU lacks AMX-BF16/AMX-TILE");
            }
            if !is_x86_feature_detected!("xsave") {
                return Err("the OS does not expose XSAVE");
            }
            // SAFETY: XGETBV with ECX=0 is valid when OSXSAVE is set (checked above via xsave).
            let xcr0 = unsafe { std::arch::x86_64::_xgetbv(0) };
            if xcr0 & (0b11 << 17) != 0b11 << 17 {
                return Err("the OS does not enable AMX tile state (XCR0)");
            }
            request_tile_permission()
        })
    }

    #[cfg(target_os = "linux")]
    fn request_tile_permission() -> Result<(), &'static str> {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) only changes this process's
        // permission to use AMX tile data; it takes no pointers.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err("the kernel refused AMX tile data (arch_prctl)")
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn request_tile_permission() -> Result<(), &'static str> {
        Err("AMX is only enabled on Linux")
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod detect {
    use super::Isa;

    pub fn supported(isa: Isa) -> Result<(), &'static str> {
        match isa {
            Isa::Generic => Ok(()),
            _ => Err("not an x86-64 CPU"),
        }
    }

    pub fn fast_bf16_dot() -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_order() {
        for isa in Isa::ALL {
            assert_eq!(Isa::from_name(isa.name()), Some(isa));
        }
        assert_eq!(Isa::from_name(" AVX2 "), Some(Isa::Avx2));
        assert_eq!(Isa::from_name("sse"), None);
        assert!(Isa::Generic < Isa::Avx2 && Isa::Avx512Bf16 < Isa::Amx);
    }

    #[test]
    fn cap_never_exceeds_request_or_host() {
        assert!(Isa::Generic.supported().is_ok());
        for cap in Isa::ALL {
            let got = Isa::best_up_to(cap);
            assert!(got <= cap);
            assert!(got.supported().is_ok());
        }
        assert_eq!(Isa::best_up_to(Isa::Generic), Isa::Generic);
    }

    #[test]
    fn preferred_is_supported_and_differs_from_the_best_only_for_slow_bf16_dots() {
        let (best, preferred) = (Isa::best_up_to(Isa::Amx), Isa::preferred());
        assert!(preferred.supported().is_ok());
        if best == preferred {
            assert!(best != Isa::Avx512Bf16 || detect::fast_bf16_dot());
        } else {
            assert_eq!((best, preferred), (Isa::Avx512Bf16, Isa::Avx512));
            assert!(!detect::fast_bf16_dot());
        }
    }
}
