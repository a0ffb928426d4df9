//! Multi-head attention: the one attention path of sd-rs, shared by the UNet's transformer
//! blocks and the VAE's mid-block attention. Mirrors diffusers'
//! [`Attention`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/attention_processor.py)
//! with its default processor; the kernel itself is [`scaled_dot_product_attention`].

use candle_core::{DType, Tensor};
use sd_core::{Result, VarBuilder};

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
    /// # Shapes: x [B, L, C] or [B, C, H, W] (then flattened to L = H·W and restored);
    /// context [B, Lk, Ccontext].
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
                "Attention::forward_add on a spatial [B, C, H, W] input",
            ));
        }
        self.run(x, context, Some(residual))
    }

    fn run(&self, x: &Tensor, context: Option<&Tensor>, add: Option<&Tensor>) -> Result<Tensor> {
        let residual = x;
        let spatial = x.dims().len() == 4;
        let (b, c, hgt, wid) = if spatial { x.dims4()? } else { (0, 0, 0, 0) };
        let mut h = match &self.group_norm {
            Some(norm) => norm.forward(x)?,
            None => x.clone(),
        };
        if spatial {
            h = h.reshape((b, c, hgt * wid))?.transpose(1, 2)?;
        } else if self.group_norm.is_some() {
            return Err(sd_core::Error::unsupported(
                "Attention with group_norm on a [B, L, C] input (diffusers applies it across C)",
            ));
        }
        let q = self.to_q.forward(&h)?;
        let ctx = context.unwrap_or(&h);
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        let out = scaled_dot_product_attention(
            &self.split_heads(&q)?,
            &self.split_heads(&k)?,
            &self.split_heads(&v)?,
            self.scale,
            self.upcast,
        )?;
        let (bb, heads, l, d) = out.dims4()?;
        let out = out.transpose(1, 2)?.reshape((bb, l, heads * d))?;
        // Token inputs with a residual connection: the add goes into to_out's epilogue.
        let token_residual = match add {
            Some(r) => Some(r),
            None if self.residual && !spatial => Some(residual),
            None => None,
        };
        let mut out = match token_residual {
            Some(r) => self.to_out.forward_add(&out, r)?,
            None => self.to_out.forward(&out)?,
        };
        if spatial {
            out = out.transpose(1, 2)?.reshape((b, c, hgt, wid))?;
            if self.residual {
                out = (out + residual)?;
            }
        }
        Ok(out)
    }

    /// [B, L, H·d] -> [B, H, L, d] (contiguous).
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, inner) = x.dims3()?;
        Ok(x.reshape((b, l, self.heads, inner / self.heads))?
            .transpose(1, 2)?
            .contiguous()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Chunking heads and query rows (a budget far below one slice) gives the same values.
    #[test]
    fn chunked_attention_equals_unchunked() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 3, 37, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, 3, 29, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (2, 3, 29, 8), &dev)?;
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
        let q = Tensor::randn(0f32, 1.0, (1, 2, 9, 4), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, 2, 9, 4), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, 2, 9, 4), &dev)?;
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
}
