//! Multi-head attention: the one attention path of sd-rs, shared by the UNet's transformer
//! blocks and the VAE's mid-block attention. Mirrors diffusers'
//! [`Attention`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/attention_processor.py)
//! with its default processor; the kernel itself is [`scaled_dot_product_attention`].

use candle_core::{DType, Tensor};
use sd_core::{Result, VarBuilder};

use crate::cpu::{kernel_dtype, CpuView};
use crate::ops::{GroupNorm, Linear};

/// Bytes of attention scores computed at once; larger problems are cut into groups of heads,
/// and a single head that alone exceeds it (the VAE's one-head mid-block attention: 1 GB at
/// 1024x1024, 16 GB at 2048x2048) into blocks of query rows.
const SCORE_CHUNK_BYTES: usize = 256 << 20;

/// `softmax(q k^T * scale) v` per head. # Shapes: q [B, H, Lq, d], k and v [B, H, Lk, d] -> [B, H, Lq, d].
///
/// Scores, softmax and the product with `v` are computed in f32 when the inputs are f16/bf16
/// or when `upcast` is set (diffusers' `upcast_attention`; torch's CPU SDPA also keeps f32
/// internally and rounds the output once); the output has the inputs' dtype. The (B·H) slices are
/// processed in chunks so that the score matrix stays under a fixed budget (~1 GB would be
/// needed at once for SD 1.5 at 64x64 latents), and query rows are chunked when one slice is
/// over budget (each row's softmax is independent, so the result is unchanged). This function
/// is the drop-in point for a fused or flash-style kernel.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    upcast: bool,
) -> Result<Tensor> {
    sdpa_chunked(q, k, v, scale, upcast, false, SCORE_CHUNK_BYTES)
}

/// [`scaled_dot_product_attention`] with a causal mask (query `i` sees keys `0..=i`), as
/// CLIP's text encoder uses it. Query and key lengths must be equal.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    if q.dim(2)? != k.dim(2)? {
        return Err(sd_core::Error::invalid_argument(
            "causal attention",
            format!("{} queries and {} keys", q.dim(2)?, k.dim(2)?),
            "as many queries as keys",
        ));
    }
    sdpa_chunked(q, k, v, scale, false, true, SCORE_CHUNK_BYTES)
}

/// `softmax(q k^T * scale) v` with the heads side by side in the last dimension, the layout
/// the projections produce: no head split or merge copies. On the CPU in f32/bf16 this is
/// sd-kernels' blocked attention (scores and softmax in f32 per block of query rows, never
/// the whole score matrix); elsewhere the heads are split and
/// [`scaled_dot_product_attention`] / [`causal_attention`] run.
///
/// # Shapes: q [B, Lq, heads·d], k and v [B, Lk, heads·d] -> [B, Lq, heads·d].
pub fn attention_heads_last(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    upcast: bool,
    causal: bool,
) -> Result<Tensor> {
    let (b, lq, width) = q.dims3()?;
    let (kb, lk, kw) = k.dims3()?;
    if heads == 0 || width % heads != 0 || kb != b || kw != width || v.dims() != k.dims() {
        return Err(sd_core::Error::invalid_argument(
            "attention inputs",
            format!(
                "q {:?}, k {:?}, v {:?}, {heads} heads",
                q.dims(),
                k.dims(),
                v.dims()
            ),
            "q [B, Lq, heads·d], k and v [B, Lk, heads·d]",
        ));
    }
    let d = width / heads;
    let same_dtype = k.dtype() == q.dtype() && v.dtype() == q.dtype();
    if let (Some(_), true) = (kernel_dtype(q), same_dtype) {
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let shape = sd_kernels::AttentionShape {
            batch: b,
            heads,
            q_len: lq,
            kv_len: lk,
            head_dim: d,
            q_stride: width,
            k_stride: width,
            v_stride: width,
            out_stride: width,
        };
        let params = sd_kernels::AttentionParams {
            scale: scale as f32,
            causal,
            isa: sd_kernels::Isa::current(),
        };
        let (qv, kv, vv) = (CpuView::new(&q)?, CpuView::new(&k)?, CpuView::new(&v)?);
        fn run<T: sd_kernels::Element + candle_core::WithDType>(
            shape: &sd_kernels::AttentionShape,
            params: &sd_kernels::AttentionParams,
            q: &CpuView<'_>,
            k: &CpuView<'_>,
            v: &CpuView<'_>,
        ) -> Result<Vec<T>> {
            let mut out = vec![T::ZERO; shape.batch * shape.q_len * shape.out_stride];
            sd_kernels::attention(
                &Default::default(),
                shape,
                params,
                q.slice()?,
                k.slice()?,
                v.slice()?,
                &mut out,
            )
            .map_err(|e| {
                sd_core::Error::invalid_argument("attention", e.to_string(), "matching shapes")
            })?;
            Ok(out)
        }
        let dev = q.device();
        return Ok(match q.dtype() {
            DType::BF16 => Tensor::from_vec(
                run::<half::bf16>(&shape, &params, &qv, &kv, &vv)?,
                (b, lq, width),
                dev,
            )?,
            _ => Tensor::from_vec(
                run::<f32>(&shape, &params, &qv, &kv, &vv)?,
                (b, lq, width),
                dev,
            )?,
        });
    }
    let split = |x: &Tensor, l: usize| -> Result<Tensor> {
        Ok(x.reshape((b, l, heads, d))?.transpose(1, 2)?.contiguous()?)
    };
    let (qs, ks, vs) = (split(q, lq)?, split(k, lk)?, split(v, lk)?);
    let out = if causal {
        causal_attention(&qs, &ks, &vs, scale)?
    } else {
        scaled_dot_product_attention(&qs, &ks, &vs, scale, upcast)?
    };
    Ok(out.transpose(1, 2)?.reshape((b, lq, width))?)
}

/// The additive causal mask of query rows `r0..r0+rows` over `lk` keys: 0 where key <= query,
/// -inf above. # Shapes: [rows, lk] (f32).
fn causal_mask(r0: usize, rows: usize, lk: usize, device: &candle_core::Device) -> Result<Tensor> {
    let values: Vec<f32> = (r0..r0 + rows)
        .flat_map(|i| (0..lk).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(values, (rows, lk), device)?)
}

fn sdpa_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    upcast: bool,
    causal: bool,
    budget: usize,
) -> Result<Tensor> {
    let (b, h, lq, d) = q.dims4()?;
    let lk = k.dim(2)?;
    let dtype = q.dtype();
    let compute = if upcast || dtype != DType::F32 && dtype != DType::F64 {
        DType::F32
    } else {
        dtype
    };
    let q = q.reshape((b * h, lq, d))?;
    let k = k.reshape((b * h, lk, d))?;
    let v = v.reshape((b * h, lk, d))?;
    let per_slice = lq * lk * 4;
    let chunk = (budget / per_slice.max(1)).clamp(1, b * h);
    let rows = if per_slice > budget {
        (budget / (lk * 4).max(1)).clamp(1, lq)
    } else {
        lq
    };
    let mut outs = Vec::with_capacity((b * h).div_ceil(chunk));
    let mut start = 0;
    while start < b * h {
        let n = chunk.min(b * h - start);
        let ks = k.narrow(0, start, n)?.to_dtype(compute)?;
        let vs = v.narrow(0, start, n)?.to_dtype(compute)?;
        let qn = q.narrow(0, start, n)?;
        let mut blocks = Vec::with_capacity(lq.div_ceil(rows));
        let mut r0 = 0;
        while r0 < lq {
            let nr = rows.min(lq - r0);
            let qs = if nr == lq {
                qn.to_dtype(compute)?
            } else {
                qn.narrow(1, r0, nr)?.contiguous()?.to_dtype(compute)?
            };
            let mut scores = (qs.matmul(&ks.t()?)? * scale)?;
            if causal {
                let mask = causal_mask(r0, nr, lk, scores.device())?.to_dtype(compute)?;
                scores = scores.broadcast_add(&mask)?;
            }
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            blocks.push(probs.matmul(&vs)?.to_dtype(dtype)?);
            r0 += nr;
        }
        outs.push(if blocks.len() == 1 {
            blocks.remove(0)
        } else {
            Tensor::cat(&blocks, 1)?
        });
        start += n;
    }
    let out = if outs.len() == 1 {
        outs.remove(0)
    } else {
        Tensor::cat(&outs, 0)?
    };
    Ok(out.reshape((b, h, lq, d))?)
}

/// Construction parameters of an [`Attention`] layer.
#[derive(Debug, Clone)]
pub struct AttentionConfig {
    /// Channels of the query input (and of the output).
    pub query_dim: usize,
    /// Channels of the context for cross-attention; `None` for self-attention.
    pub cross_attention_dim: Option<usize>,
    /// Number of heads.
    pub heads: usize,
    /// Channels per head.
    pub dim_head: usize,
    /// Whether to_q/to_k/to_v have biases (false in transformer blocks, true in the VAE).
    pub qkv_bias: bool,
    /// Compute scores in f32 (diffusers' `upcast_attention`).
    pub upcast_attention: bool,
    /// Group norm applied to the input first (VAE attention): (groups, eps).
    pub group_norm: Option<(usize, f64)>,
    /// Add the input to the output (VAE attention).
    pub residual_connection: bool,
}

/// diffusers' `Attention` with the default processor: weights `to_q`, `to_k`, `to_v`,
/// `to_out.0` (and `group_norm` when configured).
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    group_norm: Option<GroupNorm>,
    heads: usize,
    scale: f64,
    upcast: bool,
    residual: bool,
}

impl Attention {
    /// Loads the layer's weights under `vb`.
    pub fn load(vb: &VarBuilder, cfg: &AttentionConfig) -> Result<Self> {
        let inner = cfg.heads * cfg.dim_head;
        let ctx = cfg.cross_attention_dim.unwrap_or(cfg.query_dim);
        let group_norm = match cfg.group_norm {
            Some((groups, eps)) => Some(GroupNorm::load(
                &vb.pp("group_norm"),
                groups,
                cfg.query_dim,
                eps,
            )?),
            None => None,
        };
        Ok(Self {
            to_q: Linear::load(&vb.pp("to_q"), cfg.query_dim, inner, cfg.qkv_bias)?,
            to_k: Linear::load(&vb.pp("to_k"), ctx, inner, cfg.qkv_bias)?,
            to_v: Linear::load(&vb.pp("to_v"), ctx, inner, cfg.qkv_bias)?,
            to_out: Linear::load(&vb.pp("to_out.0"), inner, cfg.query_dim, true)?,
            group_norm,
            heads: cfg.heads,
            scale: 1.0 / (cfg.dim_head as f64).sqrt(),
            upcast: cfg.upcast_attention,
            residual: cfg.residual_connection,
        })
    }

    /// Self-attention when `context` is `None`, cross-attention otherwise.
    ///
    /// # Shapes: x [B, L, C] or channels-last [B, H, W, C] (then flattened to L = H·W and
    /// restored); context [B, Lk, Ccontext].
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        self.run(x, context, None)
    }

    /// `forward(x, context) + residual` for token inputs, the add fused into `to_out` (the
    /// transformer blocks' `x = attn(norm(x)) + x`). # Shapes: x, residual [B, L, C].
    pub fn forward_add(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        residual: &Tensor,
    ) -> Result<Tensor> {
        if x.dims().len() != 3 {
            return Err(sd_core::Error::unsupported(
                "Attention::forward_add on a spatial [B, H, W, C] input",
            ));
        }
        self.run(x, context, Some(residual))
    }

    fn run(&self, x: &Tensor, context: Option<&Tensor>, add: Option<&Tensor>) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let tokens = match dims.as_slice() {
            [b, hgt, wid, c] => x.reshape((*b, hgt * wid, *c))?,
            [_, _, _] => x.clone(),
            _ => {
                return Err(sd_core::Error::invalid_argument(
                    "attention input",
                    format!("{dims:?}"),
                    "[B, L, C] or [B, H, W, C]",
                ))
            }
        };
        // Channels last, the group norm (VAE attention) runs over the tokens directly.
        let h = match &self.group_norm {
            Some(norm) => norm.forward(&tokens)?,
            None => tokens.clone(),
        };
        let q = self.to_q.forward(&h)?;
        let ctx = context.unwrap_or(&h);
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        let out = attention_heads_last(&q, &k, &v, self.heads, self.scale, self.upcast, false)?;
        // The residual add goes into to_out's epilogue.
        let residual = match add {
            Some(r) => Some(r),
            None if self.residual => Some(&tokens),
            None => None,
        };
        let out = match residual {
            Some(r) => self.to_out.forward_add(&out, r)?,
            None => self.to_out.forward(&out)?,
        };
        Ok(out.reshape(dims)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use sd_core::NoiseSource;

    /// Chunking heads and query rows (a budget far below one slice) gives the same values.
    #[test]
    fn chunked_attention_equals_unchunked() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let mut g = sd_core::TorchGenerator::new(21);
        let q = g.randn_tensor(&[2, 3, 37, 8], DType::F32, &dev)?;
        let k = g.randn_tensor(&[2, 3, 29, 8], DType::F32, &dev)?;
        let v = g.randn_tensor(&[2, 3, 29, 8], DType::F32, &dev)?;
        let full = sdpa_chunked(&q, &k, &v, 0.3, false, false, usize::MAX)?;
        for budget in [37 * 29 * 4 * 2, 37 * 29 * 4, 29 * 4 * 5, 1] {
            let c = sdpa_chunked(&q, &k, &v, 0.3, false, false, budget)?;
            let diff = (&c - &full)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "budget {budget}: max abs diff {diff}");
        }
        Ok(())
    }

    /// The causal mask follows the query rows through row chunking, and row i of the result
    /// equals attention over keys 0..=i alone.
    #[test]
    fn causal_attention_sees_only_earlier_keys() -> anyhow::Result<()> {
        use candle_core::IndexOp;
        let dev = Device::Cpu;
        let mut g = sd_core::TorchGenerator::new(22);
        let q = g.randn_tensor(&[1, 2, 9, 4], DType::F32, &dev)?;
        let k = g.randn_tensor(&[1, 2, 9, 4], DType::F32, &dev)?;
        let v = g.randn_tensor(&[1, 2, 9, 4], DType::F32, &dev)?;
        let full = sdpa_chunked(&q, &k, &v, 0.5, false, true, usize::MAX)?;
        let chunked = sdpa_chunked(&q, &k, &v, 0.5, false, true, 9 * 4 * 2)?;
        let diff = (&chunked - &full)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "chunked causal diff {diff}");
        for i in [0usize, 4, 8] {
            let qi = q.i((.., .., i..i + 1, ..))?.contiguous()?;
            let ki = k.i((.., .., ..=i, ..))?.contiguous()?;
            let vi = v.i((.., .., ..=i, ..))?.contiguous()?;
            let want = sdpa_chunked(&qi, &ki, &vi, 0.5, false, false, usize::MAX)?;
            let got = full.i((.., .., i..i + 1, ..))?;
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "row {i}: {diff}");
        }
        Ok(())
    }

    /// The CPU kernel (heads side by side) against the chunked candle path on the long
    /// self-attention (4096 x 4096, 8 heads of 40), cross-attention over 77 keys with
    /// `upcast`, the VAE's single head of 512, and CLIP's causal mask: f32 within 2e-5
    /// (measured 1e-6: exp polynomial and summation order), bf16 within a bf16 rounding of
    /// the probabilities and the output (the reference rounds only the output).
    #[test]
    fn kernel_attention_equals_chunked_reference() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let mut g = sd_core::TorchGenerator::new(23);
        // (batch, heads, lq, lk, d, upcast, causal)
        let cases = [
            (1, 8, 4096, 4096, 40, false, false),
            (2, 10, 1024, 77, 64, true, false),
            (1, 1, 256, 256, 512, false, false),
            (2, 12, 77, 77, 64, false, true),
        ];
        for (b, h, lq, lk, d, upcast, causal) in cases {
            let q = g.randn_tensor(&[b, lq, h * d], DType::F32, &dev)?;
            let k = g.randn_tensor(&[b, lk, h * d], DType::F32, &dev)?;
            let v = g.randn_tensor(&[b, lk, h * d], DType::F32, &dev)?;
            let scale = 1.0 / (d as f64).sqrt();
            for dtype in [DType::F32, DType::BF16] {
                let (q, k, v) = (q.to_dtype(dtype)?, k.to_dtype(dtype)?, v.to_dtype(dtype)?);
                let got = attention_heads_last(&q, &k, &v, h, scale, upcast, causal)?;
                let split = |x: &Tensor, l: usize| -> anyhow::Result<Tensor> {
                    Ok(x.reshape((b, l, h, d))?.transpose(1, 2)?.contiguous()?)
                };
                let (qs, ks, vs) = (split(&q, lq)?, split(&k, lk)?, split(&v, lk)?);
                let want = sdpa_chunked(&qs, &ks, &vs, scale, upcast, causal, SCORE_CHUNK_BYTES)?
                    .transpose(1, 2)?
                    .reshape((b, lq, h * d))?
                    .to_dtype(DType::F32)?;
                let (rel, abs) = if dtype == DType::F32 {
                    (0.0, 2e-5)
                } else {
                    (1.0 / 128.0, 1e-2)
                };
                let excess = ((got.to_dtype(DType::F32)? - &want)?.abs()?
                    - want.abs()?.affine(rel, abs)?)?;
                let e = excess.max_all()?.to_scalar::<f32>()?;
                assert!(
                    e <= 0.0,
                    "{dtype:?} b{b} h{h} {lq}x{lk}x{d} causal {causal}: {e}"
                );
            }
        }
        Ok(())
    }
}
