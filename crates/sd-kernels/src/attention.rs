//! Scaled dot-product attention over blocks of queries, on the packed GEMM core, reading the
//! heads straight out of the projections' `[B, L, heads * d]` layout and writing the output in
//! that layout (no head split or merge copies).
//!
//! Per (image, head): `K^T` and `V` are packed once; then for each block of query rows,
//! `S = scale * Q K^T` (f32, whatever the operands), the exact softmax of each row in f32
//! (max, `exp(s - max)`, sum), the unnormalised probabilities rounded to the operand type, `P V`
//! accumulated in f32 and divided by the row sum once, as torch's CPU flash-attention kernel
//! does. Only one block of scores per thread exists at a time (`QB x Lk` f32, sized to stay in
//! L2), never the `Lq x Lk` matrix. Work (image, head, query block) is split across threads.

use crate::epilogue::{Element, Epilogue};
use crate::gemm::{gemm_rows, AMatrix, GemmOptions};
use crate::isa::Isa;
use crate::kernels::Micro;
use crate::math;
use crate::pack::{BSource, PackedB};
use crate::KernelError;

/// Shapes and layouts of one attention call. Each of q, k, v and out is `[batch, len, stride]`
/// with head `h` in columns `h * head_dim .. (h + 1) * head_dim` of each row.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Images.
    pub batch: usize,
    /// Heads.
    pub heads: usize,
    /// Query rows per image.
    pub q_len: usize,
    /// Key / value rows per image.
    pub kv_len: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// Elements between consecutive rows of q, k, v and out.
    pub q_stride: usize,
    /// See `q_stride`.
    pub k_stride: usize,
    /// See `q_stride`.
    pub v_stride: usize,
    /// See `q_stride`.
    pub out_stride: usize,
}

/// The computation.
#[derive(Debug, Clone, Copy)]
pub struct AttentionParams {
    /// Multiplies the scores (usually `1 / sqrt(head_dim)`).
    pub scale: f32,
    /// Query `i` sees keys `0..=i` only (CLIP's text encoder).
    pub causal: bool,
    /// The kernel path to pack K and V for.
    pub isa: Isa,
}

/// Bytes of f32 scores one thread holds at a time.
const SCORE_BLOCK_BYTES: usize = 512 << 10;

fn check_len(
    len: usize,
    batch: usize,
    rows: usize,
    stride: usize,
    what: &str,
) -> Result<(), KernelError> {
    let need = batch.checked_mul(rows).and_then(|r| r.checked_mul(stride));
    if need.is_none_or(|n| n > len) {
        return Err(KernelError::new(format!(
            "attention: {what} has {len} elements, expected [{batch}, {rows}, {stride}]"
        )));
    }
    Ok(())
}

/// `out = softmax(scale q k^T) v` per image and head.
pub fn attention<T: Element>(
    opts: &GemmOptions,
    shape: &AttentionShape,
    params: &AttentionParams,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &mut [T],
) -> Result<(), KernelError> {
    let s = *shape;
    let width = s.heads.checked_mul(s.head_dim);
    if s.head_dim == 0 || s.heads == 0 || s.kv_len == 0 {
        return Err(KernelError::new(format!(
            "attention with {} heads of {} channels over {} keys: all must be at least 1",
            s.heads, s.head_dim, s.kv_len
        )));
    }
    if [s.q_stride, s.k_stride, s.v_stride, s.out_stride]
        .iter()
        .any(|st| width.is_none_or(|w| *st < w))
    {
        return Err(KernelError::new(format!(
            "attention: row strides {:?} below heads x head_dim = {} x {}",
            [s.q_stride, s.k_stride, s.v_stride, s.out_stride],
            s.heads,
            s.head_dim
        )));
    }
    if params.causal && s.q_len != s.kv_len {
        return Err(KernelError::new(format!(
            "causal attention needs as many queries as keys, got {} and {}",
            s.q_len, s.kv_len
        )));
    }
    check_len(q.len(), s.batch, s.q_len, s.q_stride, "q")?;
    check_len(k.len(), s.batch, s.kv_len, s.k_stride, "k")?;
    check_len(v.len(), s.batch, s.kv_len, s.v_stride, "v")?;
    check_len(out.len(), s.batch, s.q_len, s.out_stride, "out")?;
    if !opts.emulate {
        params.isa.supported().map_err(|why| {
            KernelError::new(format!("attention on the {} path: {why}", params.isa))
        })?;
    }
    let slices = s.batch * s.heads;
    if slices == 0 || s.q_len == 0 {
        return Ok(());
    }
    let threads = opts
        .threads
        .unwrap_or_else(crate::default_threads)
        .clamp(1, slices * s.q_len);
    let inner = GemmOptions {
        threads: Some(1),
        emulate: opts.emulate,
    };

    // 1. K^T and V of every (image, head), packed once.
    let pack_slice = |i: usize| -> Result<(PackedB, PackedB), KernelError> {
        let (b, h) = (i / s.heads, i % s.heads);
        let kt = BSource {
            data: &k[b * s.kv_len * s.k_stride + h * s.head_dim..],
            k: s.head_dim,
            n: s.kv_len,
            stride_k: 1,
            stride_n: s.k_stride,
        };
        let vs = BSource {
            data: &v[b * s.kv_len * s.v_stride + h * s.head_dim..],
            k: s.kv_len,
            n: s.head_dim,
            stride_k: s.v_stride,
            stride_n: 1,
        };
        Ok((
            PackedB::pack(kt, params.isa, T::DTYPE, false)?,
            PackedB::pack(vs, params.isa, T::DTYPE, false)?,
        ))
    };
    let packed: Vec<(PackedB, PackedB)> = parallel_map(slices, threads, pack_slice)?;

    // 2. Blocks of query rows.
    // Whole micro-tiles of query rows (a block of 32 rows on a 12-row kernel computes 36).
    let mr = Micro::select(params.isa, T::DTYPE, opts.emulate).mr;
    let qb = (SCORE_BLOCK_BYTES / (s.kv_len * 4)).clamp(mr, 256) / mr * mr;
    let blocks = s.q_len.div_ceil(qb);
    let items = slices * blocks;
    let out_ptr = SendPtr(out.as_mut_ptr());
    let out_len = out.len();
    let run = |range: std::ops::Range<usize>| -> Result<(), KernelError> {
        let mut scores = vec![0f32; qb * s.kv_len];
        let mut probs = vec![T::ZERO; qb * s.kv_len];
        let mut acc = vec![0f32; qb * s.head_dim];
        let mut sums = vec![0f32; qb];
        let mut row = vec![T::ZERO; s.head_dim];
        for item in range {
            let (slice, blk) = (item / blocks, item % blocks);
            let (b, h) = (slice / s.heads, slice % s.heads);
            let (kt, vp) = &packed[slice];
            let r0 = blk * qb;
            let rows = qb.min(s.q_len - r0);
            let a = AMatrix {
                data: &q[(b * s.q_len + r0) * s.q_stride + h * s.head_dim..],
                rows,
                stride: s.q_stride,
            };
            let epi = Epilogue {
                scale: params.scale,
                ..Epilogue::default()
            };
            gemm_rows(
                &inner,
                &a,
                kt,
                &mut scores[..rows * s.kv_len],
                s.kv_len,
                &epi,
            )?;
            softmax_dispatch(
                &mut scores[..rows * s.kv_len],
                &mut probs[..rows * s.kv_len],
                &mut sums[..rows],
                s.kv_len,
                params.causal.then_some(r0),
            );
            let p = AMatrix {
                data: &probs[..rows * s.kv_len],
                rows,
                stride: s.kv_len,
            };
            gemm_rows(
                &inner,
                &p,
                vp,
                &mut acc[..rows * s.head_dim],
                s.head_dim,
                &Epilogue::default(),
            )?;
            for (i, (a_row, sum)) in acc
                .chunks_exact_mut(s.head_dim)
                .zip(&sums)
                .take(rows)
                .enumerate()
            {
                let inv = 1.0 / sum;
                a_row.iter_mut().for_each(|x| *x *= inv);
                T::from_f32_slice(a_row, &mut row);
                let off = (b * s.q_len + r0 + i) * s.out_stride + h * s.head_dim;
                debug_assert!(off + s.head_dim <= out_len);
                // SAFETY: each (image, row, head) block of `out` belongs to exactly one work
                // item, and the extent was checked against `out.len()` above.
                unsafe {
                    std::ptr::copy_nonoverlapping(row.as_ptr(), out_ptr.get().add(off), s.head_dim);
                }
            }
        }
        Ok(())
    };
    if threads == 1 {
        return run(0..items);
    }
    let per = items.div_ceil(threads);
    std::thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|t| (t * per).min(items)..((t + 1) * per).min(items))
            .filter(|r| !r.is_empty())
            .map(|r| {
                let run = &run;
                sc.spawn(move || run(r))
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(KernelError::new("an attention worker panicked")))
        })
    })
}

#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
impl<T> SendPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}
// SAFETY: workers write disjoint parts of the output through it (see `attention`).
unsafe impl<T: Send> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SendPtr<T> {}

/// `f(0..n)` on up to `threads` threads, results in order.
fn parallel_map<R: Send>(
    n: usize,
    threads: usize,
    f: impl Fn(usize) -> Result<R, KernelError> + Sync,
) -> Result<Vec<R>, KernelError> {
    let threads = threads.min(n).max(1);
    if threads == 1 {
        return (0..n).map(f).collect();
    }
    let per = n.div_ceil(threads);
    std::thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|t| (t * per).min(n)..((t + 1) * per).min(n))
            .map(|r| {
                let f = &f;
                sc.spawn(move || r.map(f).collect::<Result<Vec<R>, KernelError>>())
            })
            .collect();
        let mut all = Vec::with_capacity(n);
        for h in handles {
            let part = h
                .join()
                .unwrap_or_else(|_| Err(KernelError::new("an attention worker panicked")))?;
            all.extend(part);
        }
        Ok(all)
    })
}

/// Row softmax of `scores` (`rows x lk`): `probs = exp(s - max)` rounded to `T`, `sums` the f32
/// sums of the unrounded exponentials. With `causal = Some(r0)`, row `i` is query `r0 + i` and
/// keys after it are excluded.
#[inline(always)]
fn softmax<T: Element>(
    scores: &mut [f32],
    probs: &mut [T],
    sums: &mut [f32],
    lk: usize,
    causal: Option<usize>,
) {
    for (i, ((srow, prow), sum)) in scores
        .chunks_exact_mut(lk)
        .zip(probs.chunks_exact_mut(lk))
        .zip(sums.iter_mut())
        .enumerate()
    {
        let seen = match causal {
            Some(r0) => (r0 + i + 1).min(lk),
            None => lk,
        };
        let (live, masked) = srow.split_at_mut(seen);
        // Lane-wise partial max and sum, so that both reductions vectorize.
        let mut lanes = [f32::NEG_INFINITY; 16];
        let mut chunks = live.chunks_exact(16);
        for c in &mut chunks {
            for (l, x) in lanes.iter_mut().zip(c) {
                *l = l.max(*x);
            }
        }
        let max = chunks
            .remainder()
            .iter()
            .chain(lanes.iter())
            .fold(f32::NEG_INFINITY, |m, x| m.max(*x));
        for x in live.iter_mut() {
            *x = math::exp(*x - max);
        }
        let mut lanes = [0f32; 16];
        let mut chunks = live.chunks_exact(16);
        for c in &mut chunks {
            for (l, x) in lanes.iter_mut().zip(c) {
                *l += *x;
            }
        }
        let total = lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>();
        masked.fill(0.0);
        *sum = total;
        T::from_f32_slice(srow, prow);
    }
}

/// [`softmax`] compiled for the host's vector width.
fn softmax_dispatch<T: Element>(
    scores: &mut [f32],
    probs: &mut [T],
    sums: &mut [f32],
    lk: usize,
    causal: Option<usize>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
        unsafe fn avx512<T: Element>(
            scores: &mut [f32],
            probs: &mut [T],
            sums: &mut [f32],
            lk: usize,
            causal: Option<usize>,
        ) {
            softmax(scores, probs, sums, lk, causal)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<T: Element>(
            scores: &mut [f32],
            probs: &mut [T],
            sums: &mut [f32],
            lk: usize,
            causal: Option<usize>,
        ) {
            softmax(scores, probs, sums, lk, causal)
        }
        match Isa::current() {
            // SAFETY: the process's ISA says the features are available.
            Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => {
                return unsafe { avx512(scores, probs, sums, lk, causal) }
            }
            // SAFETY: as above.
            Isa::Avx2 => return unsafe { avx2(scores, probs, sums, lk, causal) },
            Isa::Generic => {}
        }
    }
    softmax(scores, probs, sums, lk, causal)
}
