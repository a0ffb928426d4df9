//! The heavy operations of the text encoder, each behind one function (a faster kernel, or the
//! shared attention of sd-nn, drops in here without touching the model).

use candle_core::{DType, Device, Tensor, D};
use sd_core::Result;

use crate::config::Activation;

/// `x @ weight^T (+ bias)` over the last dimension, as `torch.nn.Linear`.
///
/// # Shapes: x `[..., in]`, weight `[out, in]`, bias `[out]` -> `[..., out]`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let inner = *dims.last().unwrap_or(&1);
    let rows: usize = dims.iter().product::<usize>() / inner.max(1);
    let y = x.reshape((rows, inner))?.matmul(&weight.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = dims;
    if let Some(last) = out_dims.last_mut() {
        *last = weight.dim(0)?;
    }
    Ok(y.reshape(out_dims)?)
}

/// Layer normalisation over the last dimension, as `torch.nn.LayerNorm`: two-pass statistics
/// and the affine transform in f32, the result in the input dtype.
///
/// # Shapes: x `[..., D]`, weight and bias `[D]`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    let y = normed
        .broadcast_mul(&weight.to_dtype(DType::F32)?)?
        .broadcast_add(&bias.to_dtype(DType::F32)?)?;
    Ok(y.to_dtype(dtype)?)
}

/// The MLP activation, computed in f32 for half-precision inputs. `Gelu` is the exact erf GELU
/// (candle's `Tensor::gelu` is the tanh approximation, ~1e-3 away).
pub fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let y = match act {
        Activation::QuickGelu => (&x32 * candle_nn::ops::sigmoid(&(&x32 * 1.702)?)?)?,
        Activation::Gelu => x32.gelu_erf()?,
        Activation::GeluTanh => x32.gelu()?,
    };
    Ok(y.to_dtype(dtype)?)
}

/// The additive causal mask: 0 on and below the diagonal, -inf above. # Shapes: [T, T] (f32).
pub fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(values, (t, t), device)?)
}

/// `softmax(q k^T * scale + mask) v` per head; scores and softmax in f32 (as transformers'
/// attention: `softmax(..., dtype=float32)`), the product with `v` in the input dtype.
///
/// # Shapes: q, k, v [B, H, T, d]; mask [T, T] (f32, additive) -> [B, H, T, d].
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let q32 = q.to_dtype(DType::F32)?;
    let k32 = k.to_dtype(DType::F32)?;
    let scores = (q32.matmul(&k32.t()?)? * scale)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
    Ok(probs.matmul(&v.contiguous()?)?)
}
