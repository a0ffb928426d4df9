//! Group normalisation of channels-last activations (`[batch, pixels, channels]`), with an
//! optional SiLU fused into the same pass.
//!
//! As torch.nn.GroupNorm: per image and group, the mean and the biased variance over the
//! group's channels at every pixel; `y = (x - mean) / sqrt(var + eps) * gamma + beta`. The
//! statistics are accumulated in f64 from per-channel f32 partial sums (two passes: mean,
//! then the centred sum of squares), the affine transform folded into one scale and shift per
//! channel, and the result rounded once to the element type.

use crate::epilogue::Element;
use crate::isa::Isa;
use crate::math;
use crate::KernelError;

/// The shape and parameters of a group norm.
#[derive(Debug, Clone, Copy)]
pub struct GroupNormParams<'a> {
    /// Images.
    pub batch: usize,
    /// Pixels per image (H x W, or tokens).
    pub pixels: usize,
    /// Channels (the innermost dimension).
    pub channels: usize,
    /// Groups; divides `channels`.
    pub groups: usize,
    /// Per-channel scale.
    pub gamma: &'a [f32],
    /// Per-channel shift.
    pub beta: &'a [f32],
    /// Added to the variance.
    pub eps: f32,
    /// Apply SiLU to the result.
    pub silu: bool,
}

/// Pixels per partial sum: each chunk's per-channel sums are formed in f32, then added in f64.
const CHUNK: usize = 64;

/// `out = group_norm(x)` (then SiLU if asked); `x` and `out` are `[batch, pixels, channels]`.
pub fn group_norm<T: Element>(
    p: &GroupNormParams<'_>,
    x: &[T],
    out: &mut [T],
) -> Result<(), KernelError> {
    let c = p.channels;
    if p.groups == 0 || c == 0 || !c.is_multiple_of(p.groups) {
        return Err(KernelError::new(format!(
            "group norm: {} groups do not divide {c} channels",
            p.groups
        )));
    }
    if p.gamma.len() != c || p.beta.len() != c {
        return Err(KernelError::new(format!(
            "group norm: {} scales and {} shifts for {c} channels",
            p.gamma.len(),
            p.beta.len()
        )));
    }
    let image = p.pixels.checked_mul(c);
    let total = image.and_then(|i| i.checked_mul(p.batch));
    if total != Some(x.len()) || x.len() != out.len() {
        return Err(KernelError::new(format!(
            "group norm: input {} and output {} elements, expected [{}, {}, {c}]",
            x.len(),
            out.len(),
            p.batch,
            p.pixels
        )));
    }
    if x.is_empty() {
        return Ok(());
    }
    let image = p.pixels * c;
    let threads = crate::default_threads()
        .min(p.batch * p.pixels.div_ceil(1024))
        .max(1);
    // Each image's pixels are split among the threads for both the statistics and the
    // normalisation; the per-thread statistics are combined in f64 in a fixed order.
    let per = p.pixels.div_ceil(threads);
    let ranges: Vec<_> = (0..threads)
        .map(|t| (t * per).min(p.pixels) * c..((t + 1) * per).min(p.pixels) * c)
        .collect();
    for (xi, oi) in x.chunks(image).zip(out.chunks_mut(image)) {
        let sums = partial_sums(xi, c, &ranges, None);
        let mean = group_means(p, &sums);
        let sq = partial_sums(xi, c, &ranges, Some(&mean));
        let var = group_means(p, &sq);
        let (scale, shift) = affine(p, &mean, &var);
        if ranges.len() == 1 {
            apply_dispatch(p, xi, oi, &scale, &shift);
            continue;
        }
        std::thread::scope(|s| {
            let mut rest = &mut oi[..];
            for r in &ranges {
                let (mine, tail) = rest.split_at_mut(r.len());
                rest = tail;
                let xr = &xi[r.clone()];
                let (scale, shift) = (&scale, &shift);
                s.spawn(move || apply_dispatch(p, xr, mine, scale, shift));
            }
        });
    }
    Ok(())
}

/// [`channel_sums`] of each element range of `x`, on one thread per range (inline for one).
fn partial_sums<T: Element>(
    x: &[T],
    c: usize,
    ranges: &[std::ops::Range<usize>],
    centre: Option<&[f64]>,
) -> Vec<Vec<f64>> {
    if let [r] = ranges {
        return vec![sums_dispatch(&x[r.clone()], c, centre)];
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = ranges
            .iter()
            .map(|r| {
                let xr = &x[r.clone()];
                s.spawn(move || sums_dispatch(xr, c, centre))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

/// Per-channel sums over the pixels of `x` (`[pixels, c]`): of `x`, or of `(x - mean[group])^2`
/// when `centre` gives the group means.
fn channel_sums<T: Element>(x: &[T], c: usize, centre: Option<&[f64]>) -> Vec<f64> {
    let mut total = vec![0f64; c];
    let mut part = vec![0f32; c];
    let mut row = vec![0f32; c];
    let centre_c: Option<Vec<f32>> = centre.map(|m| {
        let per = c / m.len();
        (0..c).map(|ch| m[ch / per] as f32).collect()
    });
    for chunk in x.chunks(CHUNK * c) {
        part.fill(0.0);
        for px in chunk.chunks_exact(c) {
            T::to_f32_slice(px, &mut row);
            match &centre_c {
                None => part.iter_mut().zip(&row).for_each(|(s, v)| *s += *v),
                Some(m) => part
                    .iter_mut()
                    .zip(row.iter().zip(m))
                    .for_each(|(s, (v, m))| *s += (*v - *m) * (*v - *m)),
            }
        }
        total
            .iter_mut()
            .zip(&part)
            .for_each(|(t, s)| *t += *s as f64);
    }
    total
}

/// Group means of per-channel sums (summed over the threads' parts first).
fn group_means(p: &GroupNormParams<'_>, parts: &[Vec<f64>]) -> Vec<f64> {
    let per = p.channels / p.groups;
    let n = (per * p.pixels) as f64;
    (0..p.groups)
        .map(|g| {
            let mut s = 0f64;
            for part in parts {
                s += part[g * per..(g + 1) * per].iter().sum::<f64>();
            }
            s / n
        })
        .collect()
}

/// Per-channel `scale = gamma / sqrt(var + eps)` and `shift = beta - mean * scale`.
fn affine(p: &GroupNormParams<'_>, mean: &[f64], var: &[f64]) -> (Vec<f32>, Vec<f32>) {
    let per = p.channels / p.groups;
    let mut scale = vec![0f32; p.channels];
    let mut shift = vec![0f32; p.channels];
    for ch in 0..p.channels {
        let g = ch / per;
        let rstd = 1.0 / (var[g] + p.eps as f64).sqrt();
        let a = p.gamma[ch] as f64 * rstd;
        scale[ch] = a as f32;
        shift[ch] = (p.beta[ch] as f64 - mean[g] * a) as f32;
    }
    (scale, shift)
}

/// `out = x * scale + shift` (then SiLU) pixel by pixel.
#[inline(always)]
fn apply<T: Element>(
    p: &GroupNormParams<'_>,
    x: &[T],
    out: &mut [T],
    scale: &[f32],
    shift: &[f32],
) {
    let c = p.channels;
    let mut row = vec![0f32; c];
    for (px, o) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
        T::to_f32_slice(px, &mut row);
        for ((v, a), b) in row.iter_mut().zip(scale).zip(shift) {
            *v = *v * *a + *b;
        }
        if p.silu {
            row.iter_mut().for_each(|v| *v = math::silu(*v));
        }
        T::from_f32_slice(&row, o);
    }
}

/// [`channel_sums`] compiled for the host's vector width.
fn sums_dispatch<T: Element>(x: &[T], c: usize, centre: Option<&[f64]>) -> Vec<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
        unsafe fn avx512<T: Element>(x: &[T], c: usize, centre: Option<&[f64]>) -> Vec<f64> {
            channel_sums(x, c, centre)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<T: Element>(x: &[T], c: usize, centre: Option<&[f64]>) -> Vec<f64> {
            channel_sums(x, c, centre)
        }
        match Isa::current() {
            // SAFETY: the process's ISA says the features are available.
            Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => return unsafe { avx512(x, c, centre) },
            // SAFETY: as above.
            Isa::Avx2 => return unsafe { avx2(x, c, centre) },
            Isa::Generic => {}
        }
    }
    channel_sums(x, c, centre)
}

/// [`apply`] compiled for the host's vector width.
fn apply_dispatch<T: Element>(
    p: &GroupNormParams<'_>,
    x: &[T],
    out: &mut [T],
    scale: &[f32],
    shift: &[f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
        unsafe fn avx512<T: Element>(
            p: &GroupNormParams<'_>,
            x: &[T],
            out: &mut [T],
            scale: &[f32],
            shift: &[f32],
        ) {
            apply(p, x, out, scale, shift)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<T: Element>(
            p: &GroupNormParams<'_>,
            x: &[T],
            out: &mut [T],
            scale: &[f32],
            shift: &[f32],
        ) {
            apply(p, x, out, scale, shift)
        }
        match Isa::current() {
            // SAFETY: the process's ISA says the features are available.
            Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => {
                return unsafe { avx512(p, x, out, scale, shift) }
            }
            // SAFETY: as above.
            Isa::Avx2 => return unsafe { avx2(p, x, out, scale, shift) },
            Isa::Generic => {}
        }
    }
    apply(p, x, out, scale, shift)
}
