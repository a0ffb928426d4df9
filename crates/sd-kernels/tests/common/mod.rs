//! Helpers shared by the kernel tests.

use sd_kernels::Isa;

/// Deterministic values in [-1, 1).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Runs `check` if the host has `isa`; otherwise says so on stderr, past the test harness's
/// capture (written directly, not with `eprintln!`), so the skip shows in the log.
pub fn native_or_skip(isa: Isa, what: &str, check: impl FnOnce()) {
    match isa.supported() {
        Ok(()) => check(),
        Err(why) => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED native {isa} {what}: {why} (its blocking and addressing run in emulated_{isa})"
            );
        }
    }
}
