//! The heavy operations, each behind one function, so that a faster kernel (AMX/AVX-512 conv,
//! fused group norm, flash-style attention, CUDA) drops in here without touching any block.
//!
//! Layers ([`Conv2d`], [`Linear`], [`GroupNorm`], [`LayerNorm`]) load by diffusers tensor
//! names (`weight`, `bias`) and call these functions.

use std::sync::Arc;

use candle_core::{DType, Module, Tensor, D};
use sd_core::{Result, VarBuilder};

use crate::cpu::{f32_vec, kernel_dtype, with_cpu_elems, CpuView};

pub use crate::linear::{Activation, Linear};

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

/// Layer normalisation over the last dimension, as torch.nn.LayerNorm: two-pass statistics
/// and the affine transform in f32 (as torch's CPU kernel), the result rounded once to the
/// input dtype. # Shapes: x `[..., D]`, weight and bias `[D]`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let mean = x32.mean_keepdim(D::Minus1)?;
    let centered = x32.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    let y = normed
        .broadcast_mul(&weight.to_dtype(DType::F32)?)?
        .broadcast_add(&bias.to_dtype(DType::F32)?)?;
    Ok(y.to_dtype(dtype)?)
}

/// SiLU (x * sigmoid(x)).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::silu(x)?)
}

/// The exact (erf) GELU, as torch's default `F.gelu` (candle's `gelu` is the tanh approximation).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu_erf()?)
}

/// Extra inputs of a convolution, fused into its epilogue on the CPU.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConvArgs<'a> {
    /// Resize the input to `(height, width)` by nearest neighbour first (`Upsample2D`).
    pub resize: Option<(usize, usize)>,
    /// Added per image and output channel, `[B, Cout]` (the ResNet's time embedding).
    pub batch_bias: Option<&'a Tensor>,
    /// Added to the output, `[B, H', W', Cout]` (the ResNet's shortcut).
    pub residual: Option<&'a Tensor>,
}

/// A 2-D convolution layer (torch.nn.Conv2d, square kernel) on channels-last activations
/// `[B, H, W, C]`.
///
/// On the CPU with f32/bf16 weights the weight is packed once at load for sd-kernels'
/// implicit-GEMM convolution (the plain copy is dropped) and [`ConvArgs`] run in its
/// epilogue; 1x1 convolutions are the [`Linear`] layer over channels they are. Elsewhere
/// (CUDA/Metal, f16) candle's NCHW convolution runs between two permutations.
#[derive(Debug, Clone)]
pub struct Conv2d {
    kind: ConvKind,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    /// Top, left, bottom, right.
    pad: [usize; 4],
}

#[derive(Clone)]
enum ConvKind {
    Packed(Arc<PackedConv>),
    Plain {
        weight: Tensor,
        bias: Option<Tensor>,
    },
    Pointwise(Linear),
}

struct PackedConv {
    b: sd_kernels::PackedB,
    bias: Vec<f32>,
    dtype: DType,
    /// The weight transformed for Winograd F(2x2, 3x3), made on the first call that takes that
    /// path (`None` if the transform failed: the direct convolution stays).
    winograd: std::sync::OnceLock<Option<sd_kernels::WinogradWeight>>,
}

impl std::fmt::Debug for ConvKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConvKind::Packed(p) => write!(f, "packed for {} ({:?})", p.b.isa(), p.dtype),
            ConvKind::Plain { weight, .. } => write!(f, "plain {:?}", weight.dtype()),
            ConvKind::Pointwise(l) => write!(f, "{l:?}"),
        }
    }
}

impl Conv2d {
    /// Loads `weight` `[out, in, k, k]` and `bias` `[out]` under `vb`, with `padding` on
    /// every side.
    pub fn load(
        vb: &VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Self::load_padded(vb, in_channels, out_channels, kernel, stride, [padding; 4])
    }

    /// [`Self::load`] with explicit padding: top, left, bottom, right.
    pub fn load_padded(
        vb: &VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        pad: [usize; 4],
    ) -> Result<Self> {
        if kernel == 0 || stride == 0 {
            return Err(sd_core::Error::invalid_argument(
                vb.path("weight"),
                format!("kernel {kernel}, stride {stride}"),
                "a kernel and a stride of at least 1",
            ));
        }
        let layer = |kind| Self {
            kind,
            in_channels,
            out_channels,
            kernel,
            stride,
            pad,
        };
        if kernel == 1 && stride == 1 && pad == [0; 4] {
            let linear = Linear::load_conv1x1(vb, in_channels, out_channels)?;
            return Ok(layer(ConvKind::Pointwise(linear)));
        }
        let weight = vb.get((out_channels, in_channels, kernel, kernel), "weight")?;
        let bias = vb.get(out_channels, "bias")?;
        let packed = match kernel_dtype(&weight) {
            Some(kdtype) => {
                let isa = sd_kernels::Isa::current();
                let (o, i, k) = (out_channels, in_channels, kernel);
                with_cpu_elems(
                    &weight,
                    |w| sd_kernels::pack_conv_weight(w, o, i, k, isa, kdtype),
                    |w| sd_kernels::pack_conv_weight(w, o, i, k, isa, kdtype),
                )?
                .transpose()
                .map_err(|e| {
                    sd_core::Error::invalid_argument(
                        vb.path("weight"),
                        e.to_string(),
                        "a conv weight",
                    )
                })?
            }
            None => None,
        };
        Ok(layer(match packed {
            Some(b) => ConvKind::Packed(Arc::new(PackedConv {
                b,
                bias: f32_vec(&bias)?,
                dtype: weight.dtype(),
                winograd: std::sync::OnceLock::new(),
            })),
            None => ConvKind::Plain {
                weight,
                bias: Some(bias),
            },
        }))
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// # Shapes: x [B, H, W, in] -> [B, H', W', out].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, &ConvArgs::default())
    }

    /// The convolution with fused extras. # Shapes: x [B, H, W, in], `args.batch_bias`
    /// [B, out], `args.residual` [B, H', W', out] -> [B, H', W', out].
    pub fn forward_with(&self, x: &Tensor, args: &ConvArgs<'_>) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        if c != self.in_channels {
            return Err(sd_core::Error::invalid_argument(
                "convolution input",
                format!("{:?}", x.dims()),
                format!("[B, H, W, {}] (channels last)", self.in_channels),
            ));
        }
        match &self.kind {
            ConvKind::Packed(p) if x.device().is_cpu() => self.run_packed(p, x, (b, h, w), args),
            ConvKind::Packed(_) => Err(sd_core::Error::unsupported(
                "a convolution packed for the CPU kernels called with a tensor on another device",
            )),
            ConvKind::Pointwise(linear) => {
                let x = match args.resize {
                    Some((th, tw)) => nearest_resize_cl(x, th, tw)?,
                    None => x.clone(),
                };
                let y = match args.residual {
                    Some(r) => linear.forward_add(&x, r)?,
                    None => linear.forward(&x)?,
                };
                add_batch_bias(y, args.batch_bias)
            }
            ConvKind::Plain { weight, bias } => {
                let x = match args.resize {
                    Some((th, tw)) => nearest_resize_cl(x, th, tw)?,
                    None => x.clone(),
                };
                let [pt, pl, pb, pr] = self.pad;
                let mut xn = x.permute((0, 3, 1, 2))?;
                let padding = if pt == pl && pt == pb && pt == pr {
                    pt
                } else {
                    xn = xn.pad_with_zeros(3, pl, pr)?.pad_with_zeros(2, pt, pb)?;
                    0
                };
                let y = conv2d(
                    &xn.contiguous()?,
                    weight,
                    bias.as_ref(),
                    self.stride,
                    padding,
                )?;
                let y = add_batch_bias(y.permute((0, 2, 3, 1))?, args.batch_bias)?;
                Ok(match args.residual {
                    Some(r) => (y + r)?,
                    None => y.contiguous()?,
                })
            }
        }
    }

    fn run_packed(
        &self,
        p: &PackedConv,
        x: &Tensor,
        (b, h, w): (usize, usize, usize),
        args: &ConvArgs<'_>,
    ) -> Result<Tensor> {
        let geom = sd_kernels::ConvGeometry {
            batch: b,
            in_h: h,
            in_w: w,
            resize: args.resize,
            kernel: self.kernel,
            stride: self.stride,
            pad: self.pad,
        };
        let (oh, ow) = geom.out_size().map_err(|e| {
            sd_core::Error::invalid_argument("convolution input", e.to_string(), "a larger image")
        })?;
        let x = x.to_dtype(p.dtype)?.contiguous()?;
        let residual = match args.residual {
            Some(r) => Some(r.to_dtype(p.dtype)?.contiguous()?),
            None => None,
        };
        let batch_bias = args.batch_bias.map(f32_vec).transpose()?;
        let xv = CpuView::new(&x)?;
        let rv = residual.as_ref().map(CpuView::new).transpose()?;
        let n = b * oh * ow * self.out_channels;
        let shape = (b, oh, ow, self.out_channels);
        // Winograd where it pays (large images, see `winograd_pays`); its weight is made once.
        let winograd = if sd_kernels::winograd_pays(&geom, &p.b) {
            p.winograd
                .get_or_init(|| {
                    sd_kernels::WinogradWeight::from_conv_weight(&p.b, self.in_channels).ok()
                })
                .as_ref()
        } else {
            None
        };
        /// What one call needs, whatever the element type.
        struct Call<'a> {
            p: &'a PackedConv,
            winograd: Option<&'a sd_kernels::WinogradWeight>,
            geom: &'a sd_kernels::ConvGeometry,
            x: &'a CpuView<'a>,
            in_channels: usize,
            residual: Option<&'a CpuView<'a>>,
            batch_bias: Option<&'a [f32]>,
            n: usize,
        }
        fn run<T: sd_kernels::Element + candle_core::WithDType>(c: &Call<'_>) -> Result<Vec<T>> {
            let mut out = vec![T::ZERO; c.n];
            let epi = sd_kernels::ConvEpilogue {
                bias: Some(&c.p.bias),
                batch_bias: c.batch_bias,
                activation: sd_kernels::Activation::Identity,
                residual: c.residual.map(|r| r.slice::<T>()).transpose()?,
            };
            let input = sd_kernels::ConvInput {
                x: c.x.slice::<T>()?,
                channels: c.in_channels,
                concat: None,
            };
            let opts = Default::default();
            let done = match c.winograd {
                Some(w) => sd_kernels::conv2d_winograd(&opts, input, c.geom, w, &mut out, &epi),
                None => sd_kernels::conv2d(&opts, input, c.geom, &c.p.b, &mut out, &epi),
            };
            done.map_err(|e| {
                sd_core::Error::invalid_argument("convolution", e.to_string(), "matching shapes")
            })?;
            Ok(out)
        }
        let call = Call {
            p,
            winograd,
            geom: &geom,
            x: &xv,
            in_channels: self.in_channels,
            residual: rv.as_ref(),
            batch_bias: batch_bias.as_deref(),
            n,
        };
        let dev = x.device();
        Ok(match p.dtype {
            DType::BF16 => Tensor::from_vec(run::<half::bf16>(&call)?, shape, dev)?,
            _ => Tensor::from_vec(run::<f32>(&call)?, shape, dev)?,
        })
    }
}

/// `y + bias[b]` broadcast over the pixels of channels-last `y` `[B, H, W, C]`.
fn add_batch_bias(y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    Ok(match bias {
        Some(t) => {
            let (b, c) = t.dims2()?;
            y.broadcast_add(&t.to_dtype(y.dtype())?.reshape((b, 1, 1, c))?)?
        }
        None => y,
    })
}

/// torch's `interpolate(mode="nearest")` of channels-last `[B, H, W, C]` to `(th, tw)`:
/// source index `floor(i * in / out)`.
pub fn nearest_resize_cl(x: &Tensor, th: usize, tw: usize) -> Result<Tensor> {
    let (_, h, w, _) = x.dims4()?;
    let dev = x.device();
    let rows: Vec<u32> = (0..th).map(|i| ((i * h) / th) as u32).collect();
    let cols: Vec<u32> = (0..tw).map(|j| ((j * w) / tw) as u32).collect();
    let x = x.index_select(&Tensor::new(rows, dev)?, 1)?;
    Ok(x.index_select(&Tensor::new(cols, dev)?, 2)?)
}

/// Group normalisation (torch.nn.GroupNorm, affine) of channels-last activations: channels
/// are the last dimension, `[B, ..., C]`.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    /// f32 copies for the CPU kernel.
    gamma: Arc<Vec<f32>>,
    beta: Arc<Vec<f32>>,
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
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        Ok(Self {
            gamma: Arc::new(f32_vec(&weight)?),
            beta: Arc::new(f32_vec(&bias)?),
            weight,
            bias,
            num_groups,
            eps,
        })
    }

    /// # Shapes: x [B, ..., C] (channels last).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false)
    }

    /// `silu(forward(x))`, fused on the CPU.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true)
    }

    fn run(&self, x: &Tensor, silu_after: bool) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (Some(&c), Some(&b)) = (dims.last(), dims.first()) else {
            return Err(sd_core::Error::invalid_argument(
                "group norm input",
                format!("{dims:?}"),
                "[B, ..., C]",
            ));
        };
        if dims.len() < 2 || c != self.gamma.len() {
            return Err(sd_core::Error::invalid_argument(
                "group norm input",
                format!("{dims:?}"),
                format!("[B, ..., {}] (channels last)", self.gamma.len()),
            ));
        }
        if kernel_dtype(x).is_none() {
            // candle's NCHW group norm, channels moved to dim 1 and back.
            let rank = dims.len();
            let mut to_first: Vec<usize> = vec![0, rank - 1];
            to_first.extend(1..rank - 1);
            let mut to_last: Vec<usize> = vec![0];
            to_last.extend(2..rank);
            to_last.push(1);
            let y = group_norm(
                &x.permute(to_first)?.contiguous()?,
                self.num_groups,
                &self.weight,
                &self.bias,
                self.eps,
            )?
            .permute(to_last)?
            .contiguous()?;
            return if silu_after { silu(&y) } else { Ok(y) };
        }
        let x = x.contiguous()?;
        let pixels = dims[1..dims.len() - 1].iter().product();
        let params = sd_kernels::GroupNormParams {
            batch: b,
            pixels,
            channels: c,
            groups: self.num_groups,
            gamma: &self.gamma,
            beta: &self.beta,
            eps: self.eps as f32,
            silu: silu_after,
        };
        let xv = CpuView::new(&x)?;
        fn run<T: sd_kernels::Element + candle_core::WithDType>(
            p: &sd_kernels::GroupNormParams<'_>,
            x: &CpuView<'_>,
        ) -> Result<Vec<T>> {
            let xs = x.slice::<T>()?;
            let mut out = vec![T::ZERO; xs.len()];
            sd_kernels::group_norm(p, xs, &mut out).map_err(|e| {
                sd_core::Error::invalid_argument("group norm", e.to_string(), "matching shapes")
            })?;
            Ok(out)
        }
        let dev = x.device();
        Ok(match x.dtype() {
            DType::BF16 => Tensor::from_vec(run::<half::bf16>(&params, &xv)?, dims, dev)?,
            _ => Tensor::from_vec(run::<f32>(&params, &xv)?, dims, dev)?,
        })
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
    use sd_core::NoiseSource;

    /// Regression: candle's batched matmul mis-computes a transposed batched input (batch
    /// entries after the first were off by up to 0.4 here before `linear` flattened to 2-D).
    #[test]
    fn linear_on_transposed_batch_matches_per_entry() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let mut g = sd_core::TorchGenerator::new(21);
        let x = g
            .randn_tensor(&[3, 16, 15], DType::F32, &dev)?
            .transpose(1, 2)?; // [3, 15, 16], strided
        let w = g
            .randn_tensor(&[8, 16], DType::F32, &dev)?
            .affine(0.25, 0.0)?;
        let b = g.randn_tensor(&[8], DType::F32, &dev)?.affine(0.1, 0.0)?;
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
