//! The heavy operations, each behind one function, so that a faster kernel (AMX/AVX-512 conv,
//! fused group norm, flash-style attention, CUDA) drops in here without touching any block.
//!
//! Layers ([`Conv2d`], [`Linear`], [`GroupNorm`], [`LayerNorm`]) load by diffusers tensor
//! names (`weight`, `bias`) and call these functions.

use candle_core::{DType, Module, Tensor, D};
use sd_core::{Result, VarBuilder};

/// candle 0.11's CPU backend has no bf16 matmul (and so no bf16 conv2d): bf16 operands are
/// computed in f32 and the result rounded to bf16 once, which is also what torch's bf16 CPU
/// kernels do (f32 accumulation, bias added before rounding). The weights stay bf16 in memory.
fn lacks_bf16_matmul(x: &Tensor) -> bool {
    x.dtype() == DType::BF16 && x.device().is_cpu()
}

/// 2-D convolution, NCHW, square kernel. # Shapes: x [B, Cin, H, W], weight [Cout, Cin, k, k].
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    if lacks_bf16_matmul(x) {
        let bias = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
        let w = weight.to_dtype(DType::F32)?;
        let y = conv2d(&x.to_dtype(DType::F32)?, &w, bias.as_ref(), stride, padding)?;
        return Ok(y.to_dtype(DType::BF16)?);
    }
    let y = x.conv2d(weight, padding, stride, 1, 1)?;
    Ok(match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?,
        None => y,
    })
}

/// `x @ weight^T + bias` over the last dimension (weight [out, in], as torch.nn.Linear).
///
/// The input is made contiguous and flattened to one 2-D matmul: candle 0.11's batched matmul
/// returns wrong values for batch entries after the first when the input is a transposed view
/// with a broadcast weight (what `candle_nn::Linear` does for non-contiguous inputs, e.g. the
/// VAE attention's `[B, C, H·W] -> [B, H·W, C]` transpose with B > 1).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if lacks_bf16_matmul(x) {
        let bias = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
        let w = weight.to_dtype(DType::F32)?;
        let y = linear(&x.to_dtype(DType::F32)?, &w, bias.as_ref())?;
        return Ok(y.to_dtype(DType::BF16)?);
    }
    let dims = x.dims().to_vec();
    let Some((&k, lead)) = dims.split_last() else {
        return Err(sd_core::Error::invalid_argument(
            "linear input",
            "a 0-dimensional tensor",
            "a tensor with the feature dimension last",
        ));
    };
    let rows: usize = lead.iter().product();
    let y = x.contiguous()?.reshape((rows, k))?.matmul(&weight.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = lead.to_vec();
    out_dims.push(y.dim(1)?);
    Ok(y.reshape(out_dims)?)
}

/// Group normalisation over channels (dim 1), statistics in f32 for half-precision inputs,
/// as torch.nn.GroupNorm. # Shapes: x [B, C, ...].
pub fn group_norm(
    x: &Tensor,
    num_groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let c = x.dim(1)?;
    Ok(candle_nn::GroupNorm::new(weight.clone(), bias.clone(), c, num_groups, eps)?.forward(x)?)
}

/// Layer normalisation over the last dimension, as torch.nn.LayerNorm (f32 statistics).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let mean = x32.mean_keepdim(D::Minus1)?;
    let centered = x32.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(normed
        .to_dtype(dtype)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)?)
}

/// SiLU (x * sigmoid(x)).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::silu(x)?)
}

/// The exact (erf) GELU, as torch's default `F.gelu` (candle's `gelu` is the tanh approximation).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu_erf()?)
}

/// A 2-D convolution layer (torch.nn.Conv2d) with square kernel.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// Loads `weight` `[out, in, k, k]` and `bias` `[out]` under `vb`.
    pub fn load(
        vb: &VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Self {
            weight: vb.get((out_channels, in_channels, kernel, kernel), "weight")?,
            bias: Some(vb.get(out_channels, "bias")?),
            stride,
            padding,
        })
    }

    /// # Shapes: x [B, in, H, W] -> [B, out, H', W'].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv2d(
            x,
            &self.weight,
            self.bias.as_ref(),
            self.stride,
            self.padding,
        )
    }
}

/// A linear layer (torch.nn.Linear).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `weight` `[out, in]` and, if `bias`, `bias` `[out]` under `vb`.
    pub fn load(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        Ok(Self {
            weight: vb.get((out_dim, in_dim), "weight")?,
            bias: if bias {
                Some(vb.get(out_dim, "bias")?)
            } else {
                None
            },
        })
    }

    /// # Shapes: x [..., in] -> [..., out].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear(x, &self.weight, self.bias.as_ref())
    }
}

/// Group normalisation (torch.nn.GroupNorm, affine).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    num_groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Loads `weight` and `bias` `[channels]` under `vb`; `channels` must divide into `num_groups`.
    pub fn load(vb: &VarBuilder, num_groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if num_groups == 0 || !channels.is_multiple_of(num_groups) {
            return Err(sd_core::Error::invalid_argument(
                format!("{} (norm_num_groups)", vb.path("")),
                num_groups,
                format!("a number of groups that divides the {channels} channels"),
            ));
        }
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            num_groups,
            eps,
        })
    }

    /// # Shapes: x [B, C, ...].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        group_norm(x, self.num_groups, &self.weight, &self.bias, self.eps)
    }
}

/// Layer normalisation (torch.nn.LayerNorm, affine, over the last dimension).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads `weight` and `bias` `[dim]` under `vb`.
    pub fn load(vb: &VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }

    /// # Shapes: x [..., dim].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

    /// Regression: candle's batched matmul mis-computes a transposed batched input (batch
    /// entries after the first were off by up to 0.4 here before `linear` flattened to 2-D).
    #[test]
    fn linear_on_transposed_batch_matches_per_entry() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 16, 15), &dev)?.transpose(1, 2)?; // [3, 15, 16], strided
        let w = Tensor::randn(0f32, 0.25, (8, 16), &dev)?;
        let b = Tensor::randn(0f32, 0.1, 8, &dev)?;
        let y = linear(&x, &w, Some(&b))?;
        assert_eq!(y.dims(), &[3, 15, 8]);
        for i in 0..3 {
            let xi = x.i(i)?.contiguous()?;
            let want = xi.matmul(&w.t()?)?.broadcast_add(&b)?;
            let diff = (y.i(i)? - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "batch entry {i}: max abs diff {diff}");
        }
        Ok(())
    }
}
