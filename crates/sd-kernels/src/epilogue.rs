//! What happens to an f32 accumulator row on its way to C: `act((acc + bias) * scale) +
//! residual`, then the store (bf16 rounded to nearest even). GEGLU reads the value and gate
//! halves that [`crate::PackedB`] interleaved panel by panel.

use crate::convert;
use crate::math;

/// The activation applied in the epilogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// None.
    #[default]
    Identity,
    /// `x sigmoid(x)`.
    Silu,
    /// The exact (erf) GELU.
    Gelu,
    /// CLIP's `x sigmoid(1.702 x)`.
    QuickGelu,
    /// The tanh approximation of GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// diffusers' GEGLU: `value * gelu(gate)` over the two halves of the projection; needs B
    /// packed with `geglu = true`.
    Geglu,
}

/// An element type C can be stored as.
pub trait Element: crate::PackSource + Send + Sync + 'static {
    /// The operand type.
    const DTYPE: crate::DType;
    /// Zero (padding of gathered rows).
    const ZERO: Self;
    /// Widens a slice into f32.
    fn to_f32_slice(src: &[Self], dst: &mut [f32]);
    /// Stores f32 values (rounded to nearest even for bf16).
    fn from_f32_slice(src: &[f32], dst: &mut [Self]);
    /// The slice itself when the elements are f32 (then widening is a no-op).
    fn as_f32(src: &[Self]) -> Option<&[f32]> {
        let _ = src;
        None
    }
    /// The same, writable.
    fn as_f32_mut(dst: &mut [Self]) -> Option<&mut [f32]> {
        let _ = dst;
        None
    }
}

impl Element for f32 {
    const DTYPE: crate::DType = crate::DType::F32;
    const ZERO: f32 = 0.0;
    fn to_f32_slice(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn from_f32_slice(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn as_f32(src: &[f32]) -> Option<&[f32]> {
        Some(src)
    }
    fn as_f32_mut(dst: &mut [f32]) -> Option<&mut [f32]> {
        Some(dst)
    }
}

impl Element for half::bf16 {
    const DTYPE: crate::DType = crate::DType::Bf16;
    const ZERO: half::bf16 = half::bf16::ZERO;
    fn to_f32_slice(src: &[half::bf16], dst: &mut [f32]) {
        convert::bf16_to_f32(src, dst);
    }
    fn from_f32_slice(src: &[f32], dst: &mut [half::bf16]) {
        convert::f32_to_bf16(src, dst);
    }
}

/// The fused operations after the product.
#[derive(Debug, Clone, Copy)]
pub struct Epilogue<'a, T> {
    /// Added to each row (f32, N values; 2 x N/2 for GEGLU, in the projection's order).
    pub bias: Option<&'a [f32]>,
    /// Multiplies `acc + bias`.
    pub scale: f32,
    /// Applied after the scale.
    pub activation: Activation,
    /// Added last: `(data, row stride)`, the same shape as C.
    pub residual: Option<(&'a [T], usize)>,
}

impl<T> Default for Epilogue<'_, T> {
    fn default() -> Self {
        Self {
            bias: None,
            scale: 1.0,
            activation: Activation::Identity,
            residual: None,
        }
    }
}

/// Applies the activation in place (not GEGLU).
#[inline(always)]
fn activate(v: &mut [f32], act: Activation) {
    match act {
        Activation::Identity | Activation::Geglu => {}
        Activation::Silu => v.iter_mut().for_each(|x| *x = math::silu(*x)),
        Activation::Gelu => v.iter_mut().for_each(|x| *x = math::gelu(*x)),
        Activation::QuickGelu => v.iter_mut().for_each(|x| *x = math::quick_gelu(*x)),
        Activation::GeluTanh => v.iter_mut().for_each(|x| *x = math::gelu_tanh(*x)),
    }
}

/// One output row segment: `acc` holds the accumulators of `width` consecutive output columns
/// starting at `col0` (for GEGLU: `gate` the matching gate accumulators); writes `out`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn apply_row<T: Element>(
    acc: &[f32],
    gate: Option<&[f32]>,
    col0: usize,
    gate_col0: usize,
    epi: &Epilogue<'_, T>,
    residual: Option<&[T]>,
    tmp: &mut [f32],
    out: &mut [T],
) {
    let w = out.len();
    // f32 out with at most a bias and a residual: one pass, in the order of the general path
    // ((acc + bias) + residual), straight into C.
    if gate.is_none() && epi.scale == 1.0 && epi.activation == Activation::Identity {
        let res = residual.map(|r| T::as_f32(&r[..w]));
        if let (Some(o), None | Some(Some(_))) = (T::as_f32_mut(out), res) {
            let acc = &acc[..w];
            match (epi.bias.map(|b| &b[col0..col0 + w]), res.flatten()) {
                (Some(b), Some(r)) => {
                    for (((o, a), b), r) in o.iter_mut().zip(acc).zip(b).zip(r) {
                        *o = (*a + *b) + *r;
                    }
                }
                (Some(b), None) => {
                    for ((o, a), b) in o.iter_mut().zip(acc).zip(b) {
                        *o = *a + *b;
                    }
                }
                (None, Some(r)) => {
                    for ((o, a), r) in o.iter_mut().zip(acc).zip(r) {
                        *o = *a + *r;
                    }
                }
                (None, None) => o.copy_from_slice(acc),
            }
            return;
        }
    }
    let tmp = &mut tmp[..w];
    tmp.copy_from_slice(&acc[..w]);
    if let Some(bias) = epi.bias {
        for (t, b) in tmp.iter_mut().zip(&bias[col0..col0 + w]) {
            *t += *b;
        }
    }
    if epi.scale != 1.0 {
        tmp.iter_mut().for_each(|t| *t *= epi.scale);
    }
    if let Some(gate) = gate {
        // Zipped slices of one length and the bias branch outside the loop: this loop
        // vectorizes (indexing with a per-element branch left it scalar).
        let gate = &gate[..w];
        let scale = epi.scale;
        match epi.bias {
            Some(b) => {
                for ((t, g), b) in tmp.iter_mut().zip(gate).zip(&b[gate_col0..gate_col0 + w]) {
                    *t *= math::gelu((*g + *b) * scale);
                }
            }
            None => {
                for (t, g) in tmp.iter_mut().zip(gate) {
                    *t *= math::gelu(*g * scale);
                }
            }
        }
    } else {
        activate(tmp, epi.activation);
    }
    if let Some(res) = residual {
        // Widen the residual through `out` (same length) to keep one scratch buffer.
        let mut widened = [0f32; 64];
        for (chunk_t, chunk_r) in tmp.chunks_mut(64).zip(res[..w].chunks(64)) {
            let wv = &mut widened[..chunk_t.len()];
            T::to_f32_slice(chunk_r, wv);
            for (t, r) in chunk_t.iter_mut().zip(wv.iter()) {
                *t += *r;
            }
        }
    }
    T::from_f32_slice(tmp, out);
}
