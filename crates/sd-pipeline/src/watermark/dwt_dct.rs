//! The `dwtDct` method of the `invisible-watermark` package (0.2.0, `imwatermark/maxDct.py`,
//! class `EmbedMaxDct`) on image planes, with OpenCV's colour conversions and PyWavelets' Haar
//! transform reproduced operation for operation, so that results match the Python package bit
//! for bit on machines where OpenCV takes its FMA path (any x86-64 with AVX2).
//!
//! The method, despite its name, applies no DCT: the image is converted to YUV (OpenCV's
//! `COLOR_BGR2YUV`), the U plane (cropped to a multiple of 4 pixels) gets one level of the Haar
//! DWT, and in every 4x4 block of the approximation band cA (row-major block order) the
//! coefficient of largest magnitude other than `[0, 0]` is moved to the centre of the lower or
//! upper half of its 36-wide bin (`|v| mod 36` = 9 for a 0 bit, 27 for a 1 bit), the bits of the
//! message repeating over the blocks. The inverse DWT is then taken with the horizontal and
//! vertical detail bands exchanged (as imwatermark does: it transposes every 2x2 block of U,
//! marked or not) and the image converted back to BGR. Scale 36 and block 4 are imwatermark's
//! defaults; the Y channel's scale is 0 there, so only U is marked. Reading takes the same
//! transform and votes per message bit: a block says 1 when `|v| mod 36 > 18`.

/// imwatermark's scale for the U channel (`scales=[0, 36, 36]`).
const SCALE: f64 = 36.0;
/// imwatermark's block size (in cA coefficients).
const BLOCK: usize = 4;

/// `f32` or `f64`, the two precisions PyWavelets computes in (float32 input stays float32;
/// 8-bit input is promoted to float64).
pub(crate) trait Real:
    Copy
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Neg<Output = Self>
{
    /// pywt's Haar filter tap, 0.7071067811865476 rounded to the type.
    const TAP: Self;
    const ZERO: Self;
    fn to_f64(self) -> f64;
    fn abs(self) -> Self;
    fn is_nan(self) -> bool;
}

impl Real for f32 {
    const TAP: f32 = std::f32::consts::FRAC_1_SQRT_2;
    const ZERO: f32 = 0.0;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn abs(self) -> f32 {
        f32::abs(self)
    }
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
}

impl Real for f64 {
    const TAP: f64 = std::f64::consts::FRAC_1_SQRT_2;
    const ZERO: f64 = 0.0;
    fn to_f64(self) -> f64 {
        self
    }
    fn abs(self) -> f64 {
        f64::abs(self)
    }
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
}

// OpenCV's BT.601 YUV constants (imgproc/src/color_yuv.simd.hpp, color.hpp).
const B2Y: f32 = 0.114;
const G2Y: f32 = 0.587;
const R2Y: f32 = 0.299;
const B2U: f32 = 0.492;
const R2V: f32 = 0.877;
const U2B: f32 = 2.032;
const U2G: f32 = -0.395;
const V2G: f32 = -0.581;
const V2R: f32 = 1.140;
/// OpenCV's half of the float range: U and V are offset by 0.5, not 128, for float images.
const HALF_F: f32 = 0.5;

/// `cvtColor(COLOR_BGR2YUV)` of one float pixel, as OpenCV's SIMD path computes it (fused
/// multiply-adds, in this order): `(Y, U, V)`.
pub(crate) fn yuv_from_bgr_f32(b: f32, g: f32, r: f32) -> (f32, f32, f32) {
    let y = b.mul_add(B2Y, g.mul_add(G2Y, r * R2Y));
    let u = (b - y).mul_add(B2U, HALF_F);
    let v = (r - y).mul_add(R2V, HALF_F);
    (y, u, v)
}

/// `cvtColor(COLOR_YUV2BGR)` of one float pixel (OpenCV's SIMD path): `(B, G, R)`. Not an exact
/// inverse of [`yuv_from_bgr_f32`] (0.492 x 2.032 is not 1): every pixel moves a little.
pub(crate) fn bgr_from_yuv_f32(y: f32, u: f32, v: f32) -> (f32, f32, f32) {
    let (cb, cr) = (u - HALF_F, v - HALF_F);
    let b = cb.mul_add(U2B, y);
    let g = cr.mul_add(V2G, cb.mul_add(U2G, y));
    let r = cr.mul_add(V2R, y);
    (b, g, r)
}

/// The U of `cvtColor(COLOR_BGR2YUV)` on 8-bit pixels: OpenCV's fixed point (14 fractional
/// bits, coefficients 1868/9617/4899 for Y and 8061 for U, offset 128, round half up, saturate).
/// Checked against cv2 on all 2^24 colours when the reference was made.
pub(crate) fn u_from_bgr_u8(b: u8, g: u8, r: u8) -> u8 {
    const SHIFT: i32 = 14;
    const ROUND: i32 = 1 << (SHIFT - 1);
    let (b, g, r) = (i32::from(b), i32::from(g), i32::from(r));
    let y = (b * 1868 + g * 9617 + r * 4899 + ROUND) >> SHIFT;
    let u = ((b - y) * 8061 + (128 << SHIFT) + ROUND) >> SHIFT;
    u.clamp(0, 255) as u8
}

/// The four Haar bands of a plane cropped to `rows` x `cols` (both even), each
/// `rows/2 x cols/2`, as `pywt.dwt2(x, 'haar')`: along the rows first, then the columns, each
/// output `0 + tap*x[2k+1] + tap*x[2k]` (the high-pass tap of `x[2k+1]` negated).
pub(crate) struct Haar<T> {
    /// Approximation, pywt's cA.
    pub ca: Vec<T>,
    /// Horizontal detail, pywt's cH.
    pub ch: Vec<T>,
    /// Vertical detail, pywt's cV.
    pub cv: Vec<T>,
    /// Diagonal detail, pywt's cD.
    pub cd: Vec<T>,
    /// Columns of each band.
    pub cols: usize,
}

/// The 2x2 Haar step of pywt on `[[a, b], [c, d]]`: `(cA, cH, cV, cD)`.
fn haar_2x2<T: Real>(a: T, b: T, c: T, d: T) -> (T, T, T, T) {
    let t = T::TAP;
    // along axis 0 (pairs of rows): low and high for the left and right columns
    let (l0, h0) = (t * c + t * a, -t * c + t * a);
    let (l1, h1) = (t * d + t * b, -t * d + t * b);
    // along axis 1 (pairs of columns)
    let ca = t * l1 + t * l0;
    let cv = -t * l1 + t * l0;
    let ch = t * h1 + t * h0;
    let cd = -t * h1 + t * h0;
    (ca, ch, cv, cd)
}

/// `pywt.dwt2(plane[:rows, :cols], 'haar')` of a row-major plane `width` wide.
pub(crate) fn dwt2<T: Real>(plane: &[T], width: usize, rows: usize, cols: usize) -> Haar<T> {
    let (hr, hc) = (rows / 2, cols / 2);
    let n = hr * hc;
    let mut out = Haar {
        ca: Vec::with_capacity(n),
        ch: Vec::with_capacity(n),
        cv: Vec::with_capacity(n),
        cd: Vec::with_capacity(n),
        cols: hc,
    };
    for i in 0..hr {
        let top = &plane[2 * i * width..2 * i * width + cols];
        let bottom = &plane[(2 * i + 1) * width..(2 * i + 1) * width + cols];
        for j in 0..hc {
            let (ca, ch, cv, cd) =
                haar_2x2(top[2 * j], top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1]);
            out.ca.push(ca);
            out.ch.push(ch);
            out.cv.push(cv);
            out.cd.push(cd);
        }
    }
    out
}

/// `pywt.idwt2((cA, (cV, cH, cD)), 'haar')` written into `plane[:rows, :cols]`: imwatermark's
/// reconstruction, with the horizontal and vertical details exchanged. pywt goes along the
/// columns first (`0 + tap*lo ± tap*hi` per output), then along the rows.
pub(crate) fn idwt2_swapped(bands: &Haar<f32>, plane: &mut [f32], width: usize, rows: usize) {
    let t = f32::TAP;
    let z = f32::ZERO;
    let hc = bands.cols;
    for i in 0..rows / 2 {
        for j in 0..hc {
            let k = i * hc + j;
            let (ca, ch, cv, cd) = (bands.ca[k], bands.ch[k], bands.cv[k], bands.cd[k]);
            // along axis 1, pywt's keys: 'a' from ('aa', 'ad'), 'd' from ('da', 'dd'). Passing
            // (cV, cH, cD) puts cH in the 'ad' slot (where cV belongs) and cV in 'da'.
            let (a_l, a_r) = ((z + t * ca) + t * ch, (z + t * ca) + -t * ch);
            let (d_l, d_r) = ((z + t * cv) + t * cd, (z + t * cv) + -t * cd);
            // along axis 0
            let top = 2 * i * width + 2 * j;
            let bottom = top + width;
            plane[top] = (z + t * a_l) + t * d_l;
            plane[top + 1] = (z + t * a_r) + t * d_r;
            plane[bottom] = (z + t * a_l) + -t * d_l;
            plane[bottom + 1] = (z + t * a_r) + -t * d_r;
        }
    }
}

/// The index (1..16) of the first coefficient of largest magnitude in a 4x4 block, `[0, 0]`
/// excluded (numpy's `argmax(abs(block.flatten()[1:])) + 1`: NaN counts as the largest).
fn max_position<T: Real>(block: &[T; 16]) -> usize {
    let mut best = 1;
    let mut best_v = block[1].abs();
    if best_v.is_nan() {
        return best;
    }
    for (k, v) in block.iter().enumerate().skip(2) {
        let a = v.abs();
        if a.is_nan() {
            return k;
        }
        if a > best_v {
            best = k;
            best_v = a;
        }
    }
    best
}

/// The 4x4 blocks of cA in imwatermark's order, as (start index, row stride).
fn blocks(bands_rows: usize, cols: usize) -> impl Iterator<Item = usize> {
    (0..bands_rows / BLOCK)
        .flat_map(move |i| (0..cols / BLOCK).map(move |j| i * BLOCK * cols + j * BLOCK))
}

fn gather<T: Real>(ca: &[T], start: usize, cols: usize) -> [T; 16] {
    std::array::from_fn(|k| ca[start + (k / BLOCK) * cols + k % BLOCK])
}

/// imwatermark's `encode_frame` + `diffuse_dct_matrix` on cA: one bit per 4x4 block.
pub(crate) fn embed(bands: &mut Haar<f32>, bits: &[u8]) {
    let cols = bands.cols;
    let rows = bands.ca.len() / cols.max(1);
    for (num, start) in blocks(rows, cols).enumerate() {
        let block = gather(&bands.ca, start, cols);
        let pos = max_position(&block);
        let bit = f64::from(bits[num % bits.len()] & 1);
        let val = f64::from(block[pos]);
        // numpy's float32 floor division by 36 is the exact floor of the quotient; so is f64's
        // (a float32 divided by 36 is never within f64 rounding of an integer it is not).
        let level = ((val.abs() / SCALE).floor() + 0.25 + 0.5 * bit) * SCALE;
        let new = if val >= 0.0 { level } else { -level };
        bands.ca[start + (pos / BLOCK) * cols + pos % BLOCK] = new as f32;
    }
}

/// imwatermark's `decode_frame` + `infer_dct_matrix`: per message bit, the blocks that voted
/// 1 and all the blocks that voted, over `len` bits.
pub(crate) fn votes<T: Real>(ca: &[T], cols: usize, len: usize) -> Vec<(usize, usize)> {
    let mut votes = vec![(0usize, 0usize); len];
    if len == 0 || cols == 0 {
        return votes;
    }
    let rows = ca.len() / cols;
    for (num, start) in blocks(rows, cols).enumerate() {
        let block = gather(ca, start, cols);
        let val = block[max_position(&block)].abs().to_f64();
        let slot = &mut votes[num % len];
        if val % SCALE > 0.5 * SCALE {
            slot.0 += 1;
        }
        slot.1 += 1;
    }
    votes
}

/// imwatermark's decision: the mean vote times 255 above 127 (no votes: 0, as numpy's NaN).
pub(crate) fn bits_from_votes(votes: &[(usize, usize)]) -> Vec<u8> {
    votes
        .iter()
        .map(|&(ones, all)| u8::from(all > 0 && (ones as f64 / all as f64) * 255.0 > 127.0))
        .collect()
}

/// The rows and columns imwatermark transforms: the image cropped to multiples of 4.
pub(crate) fn region(height: usize, width: usize) -> (usize, usize) {
    (height / 4 * 4, width / 4 * 4)
}

/// `EmbedMaxDct.encode` on planar B, G, R floats in 0..255 (row-major `height` x `width`),
/// in place.
pub(crate) fn encode_planes(
    b: &mut [f32],
    g: &mut [f32],
    r: &mut [f32],
    height: usize,
    width: usize,
    bits: &[u8],
) {
    let n = height * width;
    let (mut y, mut u, mut v) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    for k in 0..n {
        (y[k], u[k], v[k]) = yuv_from_bgr_f32(b[k], g[k], r[k]);
    }
    let (rows, cols) = region(height, width);
    let mut bands = dwt2(&u, width, rows, cols);
    embed(&mut bands, bits);
    idwt2_swapped(&bands, &mut u, width, rows);
    for k in 0..n {
        (b[k], g[k], r[k]) = bgr_from_yuv_f32(y[k], u[k], v[k]);
    }
}

/// `EmbedMaxDct.decode` on a U plane (float or 8-bit promoted to f64): the `len` bits.
pub(crate) fn decode_u_plane<T: Real>(u: &[T], height: usize, width: usize, len: usize) -> Vec<u8> {
    let (rows, cols) = region(height, width);
    let bands = dwt2(u, width, rows, cols);
    bits_from_votes(&votes(&bands.ca, bands.cols, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haar_of_a_block_is_the_orthonormal_transform() {
        // pywt: cA = (a+b+c+d)/2, cH = (a+b-c-d)/2, cV = (a-b+c-d)/2, cD = (a-b-c+d)/2
        let (ca, ch, cv, cd) = haar_2x2(1.0f64, 2.0, 3.0, 5.0);
        for (got, want) in [(ca, 5.5), (ch, -2.5), (cv, -1.5), (cd, 0.5)] {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
    }

    #[test]
    fn swapped_reconstruction_transposes_each_2x2_block() {
        let plane: Vec<f32> = vec![10.0, 20.0, 30.0, 40.0];
        let bands = dwt2(&plane, 2, 2, 2);
        let mut out = vec![0f32; 4];
        idwt2_swapped(&bands, &mut out, 2, 2);
        for (got, want) in out.iter().zip([10.0, 30.0, 20.0, 40.0]) {
            assert!((got - want).abs() < 1e-4, "{out:?}");
        }
    }

    #[test]
    fn embedded_coefficients_land_in_the_middle_of_their_half_bin() {
        // one 4x4 block of cA: a dominant -100 at [1, 2] gets bit 1: |v| -> 2*36 + 27 = 99
        let mut ca = vec![1.0f32; 16];
        ca[6] = -100.0;
        let mut bands = Haar {
            ca,
            ch: vec![0.0; 16],
            cv: vec![0.0; 16],
            cd: vec![0.0; 16],
            cols: 4,
        };
        embed(&mut bands, &[1]);
        assert_eq!(bands.ca[6], -99.0);
        assert_eq!(votes(&bands.ca, 4, 1), vec![(1, 1)]);
        embed(&mut bands, &[0]);
        assert_eq!(bands.ca[6], -81.0);
        assert_eq!(votes(&bands.ca, 4, 1), vec![(0, 1)]);
    }

    #[test]
    fn colour_round_trip_is_close_but_not_exact() {
        let (y, u, v) = yuv_from_bgr_f32(200.0, 100.0, 50.0);
        let (b, g, r) = bgr_from_yuv_f32(y, u, v);
        assert!((b - 200.0).abs() < 0.1 && (g - 100.0).abs() < 0.1 && (r - 50.0).abs() < 0.1);
        // OpenCV's 8-bit U: 0.492 * (B - Y) + 128 with its fixed-point rounding
        assert_eq!(u_from_bgr_u8(255, 0, 0), 239);
        assert_eq!(u_from_bgr_u8(0, 0, 0), 128);
    }
}
