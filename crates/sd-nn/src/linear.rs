//! The linear layer (torch.nn.Linear; also 1x1 convolutions) on sd-kernels' packed GEMM.
//!
//! On the CPU with f32 or bf16 weights, the weight is packed once at load into the layout of
//! the process's kernel path ([`sd_kernels::Isa::current`]) and the plain copy is dropped; the
//! bias, an activation (SiLU, GELU, quick-GELU, GEGLU) and a residual add run in the GEMM's
//! epilogue. Elsewhere (CUDA/Metal, f16) the layer keeps candle's ops, with the same results.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Shape, Storage, Tensor, D};
use half::bf16;
use sd_core::{Result, VarBuilder};
use sd_kernels::{AMatrix, BSource, Element, Epilogue, Isa, PackSource, PackedB};

pub use sd_kernels::Activation;

use crate::ops;

/// A linear layer: `act(x W^T + b) (+ residual)`. # Shapes: x `[..., in]` -> `[..., out]`
/// (`out / 2` for a GEGLU projection).
#[derive(Clone)]
pub struct Linear {
    weights: Weights,
    activation: Activation,
    in_dim: usize,
    out_dim: usize,
}

#[derive(Clone)]
enum Weights {
    /// Packed for the CPU kernels (bias widened to f32).
    Packed(Arc<Packed>),
    /// candle tensors, weight `[out, in]`.
    Plain {
        weight: Tensor,
        bias: Option<Tensor>,
    },
}

struct Packed {
    b: PackedB,
    bias: Option<Vec<f32>>,
    dtype: DType,
}

impl std::fmt::Debug for Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = match &self.weights {
            Weights::Packed(p) => format!("packed for {} ({:?})", p.b.isa(), p.dtype),
            Weights::Plain { weight, .. } => format!("plain {:?}", weight.dtype()),
        };
        write!(
            f,
            "Linear({} -> {}, {:?}, {how})",
            self.in_dim, self.out_dim, self.activation
        )
    }
}

impl Linear {
    /// Loads `weight` `[out, in]` and, if `bias`, `bias` `[out]` under `vb`.
    pub fn load(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Self::from_weights(weight, bias, false)
    }

    /// Loads diffusers' `GEGLU.proj` (`weight` `[out, in]`, `bias` `[out]`): the layer returns
    /// `value * gelu(gate)` of the two output halves, `[..., out / 2]`.
    pub fn load_geglu(vb: &VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = Some(vb.get(out_dim, "bias")?);
        Self::from_weights(weight, bias, true)
    }

    /// Loads a 1x1 convolution (`weight` `[out, in, 1, 1]`, `bias` `[out]`) as the linear layer
    /// over channels it is.
    pub fn load_conv1x1(vb: &VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim, 1, 1), "weight")?;
        let weight = if weight.is_contiguous() {
            weight.reshape((out_dim, in_dim))?
        } else {
            // A placeholder of a missing tensor (the load report will name it): keep its shape.
            weight.squeeze(3)?.squeeze(2)?
        };
        let bias = Some(vb.get(out_dim, "bias")?);
        Self::from_weights(weight, bias, false)
    }

    /// A layer from tensors: `weight` `[out, in]`, `bias` `[out]`; `geglu` as [`Self::load_geglu`].
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>, geglu: bool) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        if geglu && out_dim % 2 != 0 {
            return Err(sd_core::Error::invalid_argument(
                "GEGLU projection",
                format!("{out_dim} outputs"),
                "an even number of outputs (value and gate halves)",
            ));
        }
        let activation = if geglu {
            Activation::Geglu
        } else {
            Activation::Identity
        };
        let weights = match pack(&weight, bias.as_ref(), geglu)? {
            Some(p) => Weights::Packed(Arc::new(p)),
            None => Weights::Plain { weight, bias },
        };
        Ok(Self {
            weights,
            activation,
            in_dim,
            out_dim: if geglu { out_dim / 2 } else { out_dim },
        })
    }

    /// The same layer with `activation` applied to its output (fused on the CPU). Not for
    /// GEGLU layers, whose activation is fixed at load.
    pub fn with_activation(mut self, activation: Activation) -> Result<Self> {
        if self.activation == Activation::Geglu || activation == Activation::Geglu {
            return Err(sd_core::Error::invalid_argument(
                "Linear::with_activation",
                format!("{activation:?} on a {:?} layer", self.activation),
                "GEGLU only through Linear::load_geglu",
            ));
        }
        self.activation = activation;
        Ok(self)
    }

    /// Output features.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// # Shapes: x `[..., in]` -> `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, None)
    }

    /// `forward(x) + residual`, the add fused into the product on the CPU.
    /// # Shapes: x `[..., in]`, residual `[..., out]` -> `[..., out]`.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.run(x, Some(residual))
    }

    fn run(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        match &self.weights {
            Weights::Packed(p) if x.device().is_cpu() => {
                let x = if x.dtype() == p.dtype {
                    x.clone()
                } else {
                    x.to_dtype(p.dtype)?
                };
                let x = if rows_of(x.layout()).is_some() {
                    x
                } else {
                    x.contiguous()?
                };
                let op = LinearOp {
                    packed: p,
                    activation: self.activation,
                };
                Ok(match residual {
                    Some(r) => {
                        let r = r.to_dtype(p.dtype)?.contiguous()?;
                        x.apply_op2_no_bwd(&r, &op)?
                    }
                    None => x.apply_op1_no_bwd(&op)?,
                })
            }
            Weights::Packed(_) => Err(sd_core::Error::unsupported(
                "a layer packed for the CPU kernels called with a tensor on another device",
            )),
            Weights::Plain { weight, bias } => {
                let y = ops::linear(x, weight, bias.as_ref())?;
                let y = match self.activation {
                    Activation::Identity => y,
                    Activation::Silu => ops::silu(&y)?,
                    Activation::Gelu => ops::gelu(&y)?,
                    Activation::GeluTanh => {
                        let dtype = y.dtype();
                        y.to_dtype(DType::F32)?.gelu()?.to_dtype(dtype)?
                    }
                    Activation::QuickGelu => {
                        let dtype = y.dtype();
                        let y32 = y.to_dtype(DType::F32)?;
                        (&y32 * candle_nn::ops::sigmoid(&(&y32 * 1.702)?)?)?.to_dtype(dtype)?
                    }
                    Activation::Geglu => {
                        let half = self.out_dim;
                        let hidden = y.narrow(D::Minus1, 0, half)?;
                        let gate = y.narrow(D::Minus1, half, half)?;
                        (hidden * ops::gelu(&gate)?)?
                    }
                };
                Ok(match residual {
                    Some(r) => (y + r)?,
                    None => y,
                })
            }
        }
    }
}

/// Packs a CPU f32/bf16 weight for the kernels; `None` for other devices and dtypes, and for
/// placeholders of missing tensors (not contiguous), which keep the plain path.
fn pack(weight: &Tensor, bias: Option<&Tensor>, geglu: bool) -> Result<Option<Packed>> {
    let dtype = weight.dtype();
    if !weight.device().is_cpu()
        || !matches!(dtype, DType::F32 | DType::BF16)
        || !weight.is_contiguous()
    {
        return Ok(None);
    }
    let (out_dim, in_dim) = weight.dims2()?;
    let kdtype = match dtype {
        DType::BF16 => sd_kernels::DType::Bf16,
        _ => sd_kernels::DType::F32,
    };
    let b = {
        let (storage, layout) = weight.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            return Ok(None);
        };
        let start = layout.start_offset();
        let n = out_dim * in_dim;
        fn packed<T: PackSource>(
            data: &[T],
            out_dim: usize,
            in_dim: usize,
            dtype: sd_kernels::DType,
            geglu: bool,
        ) -> Result<PackedB> {
            PackedB::pack(
                BSource::linear_weight(data, out_dim, in_dim),
                Isa::current(),
                dtype,
                geglu,
            )
            .map_err(kernel_error)
        }
        match cpu {
            CpuStorage::F32(v) => packed(&v[start..start + n], out_dim, in_dim, kdtype, geglu)?,
            CpuStorage::BF16(v) => packed(&v[start..start + n], out_dim, in_dim, kdtype, geglu)?,
            _ => return Ok(None),
        }
    };
    let bias = match bias {
        Some(bt) => Some(bt.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    };
    Ok(Some(Packed { b, bias, dtype }))
}

fn kernel_error(e: sd_kernels::KernelError) -> sd_core::Error {
    sd_core::Error::invalid_argument("linear layer", e.to_string(), "shapes the GEMM accepts")
}

/// `(start offset, rows, row stride)` when the layout is rows of contiguous elements with one
/// row stride (any contiguous tensor, and e.g. a narrow along the last dimension).
fn rows_of(l: &Layout) -> Option<(usize, usize, usize)> {
    let dims = l.dims();
    let strides = l.stride();
    let (&k, lead) = dims.split_last()?;
    if k > 1 && strides[dims.len() - 1] != 1 {
        return None;
    }
    let rows: usize = lead.iter().product();
    // Walk the leading dimensions inwards-out: each one of size > 1 must step over exactly
    // the rows of the dimensions inside it.
    let mut row_stride = None;
    let mut expect = None;
    for (&d, &s) in lead.iter().zip(strides).rev() {
        if d == 1 {
            continue;
        }
        match expect {
            None => row_stride = Some(s),
            Some(e) if e != s => return None,
            Some(_) => {}
        }
        expect = Some(s * d);
    }
    let row_stride = row_stride.unwrap_or(k);
    // Overlapping rows (a broadcast) are not a matrix the GEMM may read.
    (row_stride >= k).then_some((l.start_offset(), rows, row_stride))
}

/// The candle op: x (and the residual) in, `[..., out]` out.
struct LinearOp<'a> {
    packed: &'a Packed,
    activation: Activation,
}

impl LinearOp<'_> {
    fn run<T: Element + candle_core::WithDType>(
        &self,
        x: &[T],
        xl: &Layout,
        residual: Option<(&[T], &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, rows, stride)) = rows_of(xl) else {
            candle_core::bail!("sd-nn linear: input layout {xl:?} is not rows of a matrix")
        };
        let k = self.packed.b.k();
        if xl.dims().last() != Some(&k) {
            candle_core::bail!(
                "sd-nn linear: input {:?} has {} features, the layer takes {k}",
                xl.dims(),
                xl.dims().last().copied().unwrap_or(0)
            )
        }
        let n = self.packed.b.out_columns();
        let mut out_dims = xl.dims().to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = n;
        }
        let res = match residual {
            Some((r, rl)) => {
                if rl.dims() != out_dims.as_slice() || !rl.is_contiguous() {
                    candle_core::bail!(
                        "sd-nn linear: residual {:?} does not match the output {out_dims:?}",
                        rl.dims()
                    )
                }
                Some((&r[rl.start_offset()..], n))
            }
            None => None,
        };
        let mut out = vec![T::zero(); rows * n];
        let epi = Epilogue {
            bias: self.packed.bias.as_deref(),
            scale: 1.0,
            activation: self.activation,
            residual: res,
        };
        let a = AMatrix {
            data: &x[start..],
            rows,
            stride,
        };
        sd_kernels::gemm(a, &self.packed.b, &mut out, n, &epi)
            .map_err(|e| candle_core::Error::Msg(format!("sd-nn linear: {e}")))?;
        Ok((T::to_cpu_storage_owned(out), Shape::from_dims(&out_dims)))
    }
}

impl candle_core::CustomOp1 for LinearOp<'_> {
    fn name(&self) -> &'static str {
        "sd-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        match s {
            CpuStorage::F32(v) => self.run::<f32>(v, l, None),
            CpuStorage::BF16(v) => self.run::<bf16>(v, l, None),
            other => candle_core::bail!("sd-nn linear: unsupported dtype {:?}", other.dtype()),
        }
    }
}

impl candle_core::CustomOp2 for LinearOp<'_> {
    fn name(&self) -> &'static str {
        "sd-linear-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(r)) => self.run::<f32>(x, l1, Some((r, l2))),
            (CpuStorage::BF16(x), CpuStorage::BF16(r)) => self.run::<bf16>(x, l1, Some((r, l2))),
            (a, b) => candle_core::bail!(
                "sd-nn linear: unsupported dtypes {:?} and {:?}",
                a.dtype(),
                b.dtype()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};
    use sd_core::NoiseSource;

    fn plain(w: &Tensor, b: &Tensor) -> Linear {
        Linear {
            weights: Weights::Plain {
                weight: w.clone(),
                bias: Some(b.clone()),
            },
            activation: Activation::Identity,
            in_dim: w.dim(1).unwrap_or(0),
            out_dim: w.dim(0).unwrap_or(0),
        }
    }

    /// The packed layer equals candle's path (the portable fallback) on every activation,
    /// with and without a residual, on contiguous, narrowed and transposed inputs; f32 1e-5
    /// (measured 1.9e-6), bf16 within two bf16 ulps of the value (one rounding each side).
    #[test]
    fn packed_equals_candle_path() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let mut g = sd_core::TorchGenerator::new(21);
        for dtype in [DType::F32, DType::BF16] {
            let w = g
                .randn_tensor(&[64, 40], DType::F32, &dev)?
                .affine(0.2, 0.0)?
                .to_dtype(dtype)?;
            let b = g
                .randn_tensor(&[64], DType::F32, &dev)?
                .affine(0.5, 0.0)?
                .to_dtype(dtype)?;
            let x = g
                .randn_tensor(&[3, 40, 17], DType::F32, &dev)?
                .to_dtype(dtype)?
                .transpose(1, 2)?; // [3, 17, 40] strided
            let r = g
                .randn_tensor(&[3, 17, 64], DType::F32, &dev)?
                .to_dtype(dtype)?;
            for act in [
                Activation::Identity,
                Activation::Silu,
                Activation::Gelu,
                Activation::QuickGelu,
                Activation::GeluTanh,
            ] {
                let fast = Linear::from_weights(w.clone(), Some(b.clone()), false)?
                    .with_activation(act)?;
                assert!(matches!(fast.weights, Weights::Packed(_)));
                let slow = plain(&w, &b).with_activation(act)?;
                for res in [None, Some(&r)] {
                    let (f, s) = match res {
                        Some(r) => (fast.forward_add(&x, r)?, slow.forward_add(&x, r)?),
                        None => (fast.forward(&x)?, slow.forward(&x)?),
                    };
                    assert_eq!(f.dims(), &[3, 17, 64]);
                    let f = f.to_dtype(DType::F32)?;
                    let s = s.to_dtype(DType::F32)?;
                    let diff = (&f - &s)?.abs()?;
                    let tol = match dtype {
                        DType::F32 => (s.abs()? * 0.0)?.affine(1.0, 1e-5)?,
                        _ => s.abs()?.affine(2.0 / 128.0, 2e-2)?,
                    };
                    let over = (diff.ge(&tol)?).to_dtype(DType::F32)?.sum_all()?;
                    assert_eq!(over.to_scalar::<f32>()?, 0.0, "{dtype:?} {act:?} {res:?}");
                }
            }
            // GEGLU against narrow + gelu on the plain projection.
            let geglu = Linear::from_weights(w.clone(), Some(b.clone()), true)?;
            let y = geglu.forward(&x)?.to_dtype(DType::F32)?;
            let h = plain(&w, &b).forward(&x)?.to_dtype(DType::F32)?;
            let want = (h.i((.., .., ..32))? * ops::gelu(&h.i((.., .., 32..))?)?)?;
            // bf16: the reference rounds h, gelu(gate) and the product (3 roundings of 2^-9);
            // the fused path rounds once: allowed 2^-6 of the value.
            let (rel, abs) = if dtype == DType::F32 {
                (0.0, 1e-5)
            } else {
                (1.0 / 64.0, 1e-2)
            };
            let excess = ((y - &want)?.abs()? - want.abs()?.affine(rel, abs)?)?;
            let diff = excess.max_all()?.to_scalar::<f32>()?;
            let tol = 0.0;
            assert!(
                diff < tol,
                "{dtype:?} geglu error exceeds its bound by {diff}"
            );
        }
        Ok(())
    }

    #[test]
    fn row_layouts() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let t = Tensor::zeros((2, 3, 8), DType::F32, &dev)?;
        assert_eq!(rows_of(t.layout()), Some((0, 6, 8)));
        let n = t.narrow(2, 2, 4)?; // rows of 4 at stride 8
        assert_eq!(rows_of(n.layout()), Some((2, 6, 8)));
        let tr = t.transpose(1, 2)?;
        assert_eq!(rows_of(tr.layout()), None);
        let v = Tensor::zeros(5, DType::F32, &dev)?;
        assert_eq!(rows_of(v.layout()), Some((0, 1, 5)));
        Ok(())
    }
}
