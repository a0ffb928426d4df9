//! Packing kernel: 12 rows of f32 interleaved into an A panel (`dst[c * 12 + i] = rows[i][c]`),
//! the layout the 12-row FMA kernel broadcasts from. The portable loop in `gemm.rs` is the
//! reference; this one moves 16 columns of 4 rows at a time through registers: four loads,
//! a 4x4 transpose inside each 128-bit lane (eight unpacks), and sixteen 4-float stores,
//! where the portable loop does a scalar load and store per element.

/// Rows per panel.
pub(crate) const ROWS: usize = 12;

/// `dst[c * 12 + i] = rows[i][c]` for `c < k`.
///
/// # Safety
/// AVX-512F is available. (Lengths are checked: `rows` holds 12 slices of at least `k`
/// elements and `dst` at least `12 * k`, or this panics.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn interleave12_avx512(rows: &[&[f32]], k: usize, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(rows.len() == ROWS && rows.iter().all(|r| r.len() >= k) && dst.len() >= ROWS * k);
    let full = k / 16 * 16;
    for c0 in (0..full).step_by(16) {
        for g in 0..3 {
            // SAFETY: rows[4g + j] has at least k >= c0 + 16 elements, and dst at least 12 k
            // >= (c0 + 15) * 12 + 4g + 4 (asserted above): every load and store is in bounds.
            unsafe {
                let r = |j: usize| _mm512_loadu_ps(rows[4 * g + j].as_ptr().add(c0));
                let (a0, a1, a2, a3) = (r(0), r(1), r(2), r(3));
                let t0 = _mm512_unpacklo_ps(a0, a1);
                let t1 = _mm512_unpackhi_ps(a0, a1);
                let t2 = _mm512_unpacklo_ps(a2, a3);
                let t3 = _mm512_unpackhi_ps(a2, a3);
                let pd = _mm512_castps_pd;
                let ps = _mm512_castpd_ps;
                // u[j], lane l: rows 4g..4g+4 at column c0 + 4l + j.
                let u = [
                    ps(_mm512_unpacklo_pd(pd(t0), pd(t2))),
                    ps(_mm512_unpackhi_pd(pd(t0), pd(t2))),
                    ps(_mm512_unpacklo_pd(pd(t1), pd(t3))),
                    ps(_mm512_unpackhi_pd(pd(t1), pd(t3))),
                ];
                let base = dst.as_mut_ptr().add(c0 * ROWS + 4 * g);
                for (j, v) in u.iter().enumerate() {
                    _mm_storeu_ps(base.add(j * ROWS), _mm512_extractf32x4_ps::<0>(*v));
                    _mm_storeu_ps(base.add((4 + j) * ROWS), _mm512_extractf32x4_ps::<1>(*v));
                    _mm_storeu_ps(base.add((8 + j) * ROWS), _mm512_extractf32x4_ps::<2>(*v));
                    _mm_storeu_ps(base.add((12 + j) * ROWS), _mm512_extractf32x4_ps::<3>(*v));
                }
            }
        }
    }
    for c in full..k {
        for (i, row) in rows.iter().enumerate() {
            dst[c * ROWS + i] = row[c];
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Against the definition, for K below, at and around multiples of 16.
    #[test]
    fn interleave12_equals_scalar_definition() {
        if crate::isa::Isa::Avx512.supported().is_err() {
            eprintln!("SKIPPED interleave12_avx512: the CPU lacks AVX-512F");
            return;
        }
        for k in [1, 3, 15, 16, 17, 31, 32, 33, 100, 320] {
            let rows: Vec<Vec<f32>> = (0..ROWS)
                .map(|i| (0..k + 5).map(|c| (i * 1000 + c) as f32).collect())
                .collect();
            let refs: Vec<&[f32]> = rows.iter().map(|r| &r[..k]).collect();
            let mut got = vec![-1f32; ROWS * k + 7];
            // SAFETY: AVX-512F checked above.
            unsafe { interleave12_avx512(&refs, k, &mut got) };
            for c in 0..k {
                for (i, row) in rows.iter().enumerate() {
                    assert_eq!(got[c * ROWS + i], row[c], "k {k} column {c} row {i}");
                }
            }
            assert!(
                got[ROWS * k..].iter().all(|v| *v == -1.0),
                "k {k}: wrote past 12 k"
            );
        }
    }
}
