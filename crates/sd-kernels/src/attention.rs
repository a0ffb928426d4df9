//! Scaled dot-product attention over blocks of queries, on the packed GEMM micro-kernels,
//! reading the heads straight out of the projections' `[B, L, heads * d]` layout and writing the
//! output in that layout (no head split or merge copies).
//!
//! The products are computed transposed, so that the softmax runs down columns and its result
//! is already the packed operand of the next product. Per (image, head), `K` (keys x d) and
//! `V^T` (d x keys) are packed once as left-hand operands. Per block of queries (whole
//! micro-tile widths): `S^T = K Q^T` (f32 scores, keys down, queries across; each micro-tile is
//! written where the softmax reads it), the exact softmax of each column in f32 (max of
//! `scale * s`, `exp(scale * s - max)`, sum) in place (an f32 block is then `P^T` in the
//! kernel's B layout as it stands; for bf16 the unnormalised probabilities are rounded into the
//! bf16 layout), `O^T = V^T P^T` accumulated in f32, and each query's row divided by its sum once,
//! as torch's CPU flash-attention kernel does. Only one block of scores per thread exists at a
//! time (`keys x QB` f32, sized to stay in L2), never the `Lq x Lk` matrix. Work (image, head,
//! query block) is split across threads.

use crate::convert;
use crate::epilogue::Element;
use crate::gemm::{a_offset, pack_a, ABuf, AMatrix, ARows, GemmOptions, TileBuf};
use crate::isa::Isa;
use crate::kernels::{Micro, TileArgs};
use crate::math;
use crate::pack::{layout_for, BLayout, DType};
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
    let micro = Micro::select(params.isa, T::DTYPE, opts.emulate);
    let (layout, b_nr, kstep, _) = layout_for(params.isa, T::DTYPE);
    let geo = Geometry::new(&s, &micro, layout, b_nr, kstep);

    // 1. K and V^T of every (image, head), packed once as left-hand operands.
    let pack_slice = |i: usize| -> Result<SliceOperands, KernelError> {
        let (b, h) = (i / s.heads, i % s.heads);
        let keys = AMatrix {
            data: &k[b * s.kv_len * s.k_stride + h * s.head_dim..],
            rows: s.kv_len,
            stride: s.k_stride,
        };
        let values = Columns {
            data: &v[b * s.kv_len * s.v_stride + h * s.head_dim..],
            rows: s.head_dim,
            stride: s.v_stride,
        };
        let mut tile = TileBuf::default();
        let mut gather = vec![T::ZERO; s.head_dim.max(s.kv_len) * micro.mr];
        let mut kbuf = ABuf::new(micro.a_format);
        pack_a(
            &keys,
            s.head_dim,
            geo.dp,
            0,
            s.kv_len,
            &micro,
            &mut kbuf,
            &mut tile,
            &mut gather,
        );
        let mut vbuf = ABuf::new(micro.a_format);
        pack_a(
            &values,
            s.kv_len,
            geo.kp_keys,
            0,
            s.head_dim,
            &micro,
            &mut vbuf,
            &mut tile,
            &mut gather,
        );
        Ok(SliceOperands { k: kbuf, vt: vbuf })
    };
    let packed: Vec<SliceOperands> = parallel_map(slices, threads, pack_slice)?;

    // 2. Blocks of query columns.
    let blocks = s.q_len.div_ceil(geo.qb);
    let items = slices * blocks;
    let out_ptr = SendPtr(out.as_mut_ptr());
    let out_len = out.len();
    let run = |range: std::ops::Range<usize>| {
        let mut bufs = BlockBufs::<T>::new(&geo);
        if let Some(begin) = micro.begin {
            // SAFETY: the kernel was selected natively (or is an emulator without a begin).
            unsafe { begin() };
        }
        for item in range {
            let (slice, blk) = (item / blocks, item % blocks);
            let (b, h) = (slice / s.heads, slice % s.heads);
            let r0 = blk * geo.qb;
            let rows = geo.qb.min(s.q_len - r0);
            let q_rows = &q[(b * s.q_len + r0) * s.q_stride + h * s.head_dim..];
            // SAFETY: the block's buffers and the packed operands have the sizes of `geo`.
            unsafe {
                query_block(
                    &geo,
                    &micro,
                    params,
                    &packed[slice],
                    q_rows,
                    rows,
                    r0,
                    &mut bufs,
                )
            };
            for c in 0..rows {
                let off = (b * s.q_len + r0 + c) * s.out_stride + h * s.head_dim;
                let row = bufs.output_row(&geo, c);
                debug_assert!(off + s.head_dim <= out_len);
                // SAFETY: each (image, row, head) block of `out` belongs to exactly one work
                // item, and the extent was checked against `out.len()` above.
                unsafe {
                    std::ptr::copy_nonoverlapping(row.as_ptr(), out_ptr.get().add(off), s.head_dim);
                }
            }
        }
        if let Some(end) = micro.end {
            // SAFETY: paired with `begin` on this thread.
            unsafe { end() };
        }
    };
    if threads == 1 {
        run(0..items);
        return Ok(());
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
                .map_err(|_| KernelError::new("an attention worker panicked"))
        })
    })
}

/// The sizes of one attention call's blocks.
struct Geometry {
    q_stride: usize,
    kv_len: usize,
    head_dim: usize,
    /// Queries per block: whole micro-tile widths (`nr`).
    qb: usize,
    /// Micro-tile width (`Micro::nr`).
    nr: usize,
    /// Columns per B panel of the layout (AMX: half a micro-tile).
    b_nr: usize,
    layout: BLayout,
    /// `head_dim` padded to the kernel's K granularity (K of the scores product).
    dp: usize,
    /// `kv_len` padded to the K granularity (K of the output product).
    kp_keys: usize,
    /// `kv_len` padded to whole micro-tile heights (rows of the scores block).
    keys_pad: usize,
    /// `head_dim` padded to whole micro-tile heights (rows of the output block).
    dims_pad: usize,
}

impl Geometry {
    fn new(s: &AttentionShape, micro: &Micro, layout: BLayout, b_nr: usize, kstep: usize) -> Self {
        let nr = micro.nr;
        // The f32 and bf16 layouts have one panel per micro-tile (P^T is written per panel).
        debug_assert!(nr <= MAX_NR && (layout == BLayout::Bf16Pairs || b_nr == nr));
        debug_assert!(nr.is_multiple_of(b_nr));
        let keys_pad = s.kv_len.div_ceil(micro.mr) * micro.mr;
        let fit = SCORE_BLOCK_BYTES / (keys_pad * 4) / nr * nr;
        let qb = fit
            .clamp(nr, MAX_QUERY_BLOCK)
            .min(s.q_len.div_ceil(nr) * nr);
        Geometry {
            q_stride: s.q_stride,
            kv_len: s.kv_len,
            head_dim: s.head_dim,
            qb,
            nr,
            b_nr,
            layout,
            dp: s.head_dim.div_ceil(kstep) * kstep,
            kp_keys: s.kv_len.div_ceil(kstep) * kstep,
            keys_pad,
            dims_pad: s.head_dim.div_ceil(micro.mr) * micro.mr,
        }
    }

    /// Index of element `(k, col)` of a right-hand operand with `kp` rows in the B layout.
    #[inline(always)]
    fn b_index(&self, kp: usize, k: usize, col: usize) -> usize {
        let (p, c) = (col / self.b_nr, col % self.b_nr);
        match self.layout {
            BLayout::F32 => (p * kp + k) * self.b_nr + c,
            BLayout::Bf16 => (p * kp + k) * self.b_nr + crate::pack::bf16_slot(c, self.b_nr),
            BLayout::Bf16Pairs => p * kp * self.b_nr + ((k / 2) * self.b_nr + c) * 2 + k % 2,
        }
    }
}

/// The largest block of queries (columns of the scores).
const MAX_QUERY_BLOCK: usize = 256;

/// One (image, head)'s keys (`kv_len x head_dim`) and values transposed (`head_dim x kv_len`),
/// packed in the kernel's A format.
struct SliceOperands {
    k: ABuf,
    vt: ABuf,
}

/// The columns of a strided matrix as rows: row `m` holds element `m` of each of the
/// `buf.len()` rows of `data` (the values of one channel, for `V^T`).
struct Columns<'a, T> {
    data: &'a [T],
    rows: usize,
    stride: usize,
}

impl<T: Element> ARows<T> for Columns<'_, T> {
    fn rows(&self) -> usize {
        self.rows
    }
    fn row<'s>(&'s self, m: usize, buf: &'s mut [T]) -> &'s [T] {
        for (i, x) in buf.iter_mut().enumerate() {
            *x = self.data[i * self.stride + m];
        }
        buf
    }
}

/// One thread's buffers for a block of queries.
struct BlockBufs<T> {
    /// `Q^T` in the B layout (`dp` rows, `qb` columns): f32 or bf16 bits.
    qt_f32: Vec<f32>,
    qt_bf16: Vec<u16>,
    /// The scores `S^T`, then the probabilities (f32): per micro-tile column block,
    /// `keys_pad` rows of `nr` f32. In the f32 layout this is also `P^T` as the kernel reads it.
    st: Vec<f32>,
    /// `P^T` in a bf16 layout (`kp_keys` rows, `qb` columns).
    pt: Vec<half::bf16>,
    /// The output block `O^T`: `dims_pad` rows of `nr`, for one column block at a time;
    /// kept for all column blocks (`qb / nr` of them).
    ot: Vec<f32>,
    /// Softmax sums per query.
    sums: Vec<f32>,
    /// One output row (f32, then as T).
    row_f32: Vec<f32>,
    row: Vec<T>,
}

impl<T: Element> BlockBufs<T> {
    fn new(g: &Geometry) -> Self {
        let bf16 = T::DTYPE == DType::Bf16;
        BlockBufs {
            qt_f32: if bf16 {
                Vec::new()
            } else {
                vec![0.0; g.dp * g.qb]
            },
            qt_bf16: if bf16 {
                vec![0; g.dp * g.qb]
            } else {
                Vec::new()
            },
            st: vec![0.0; g.keys_pad * g.qb],
            pt: if bf16 {
                vec![half::bf16::ZERO; g.kp_keys * g.qb]
            } else {
                Vec::new()
            },
            ot: vec![0.0; g.dims_pad * g.qb],
            sums: vec![0.0; g.qb],
            row_f32: vec![0.0; g.head_dim],
            row: vec![T::ZERO; g.head_dim],
        }
    }

    /// Output row of query `c` of the last block: `O[c] / sum[c]`, rounded to T.
    fn output_row(&mut self, g: &Geometry, c: usize) -> &[T] {
        let (blk, col) = (c / g.nr, c % g.nr);
        let ot = &self.ot[blk * g.dims_pad * g.nr..];
        let inv = 1.0 / self.sums[c];
        for (j, x) in self.row_f32.iter_mut().enumerate() {
            *x = ot[j * g.nr + col] * inv;
        }
        T::from_f32_slice(&self.row_f32, &mut self.row);
        &self.row
    }
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

/// One block of `rows` queries (`q` at the block's first row, head offset applied) against
/// all keys of one (image, head): `S^T = K Q^T`, the softmax down each column, `O^T = V^T P^T`.
///
/// # Safety
/// `bufs` and `ops` were made for `g`; `q` holds `rows` rows of `head_dim` at `g.q_stride`
/// (checked by `attention`); the kernel's ISA is available (or the kernel is emulated).
#[allow(clippy::too_many_arguments)]
unsafe fn query_block<T: Element>(
    g: &Geometry,
    micro: &Micro,
    params: &AttentionParams,
    ops: &SliceOperands,
    q: &[T],
    rows: usize,
    r0: usize,
    bufs: &mut BlockBufs<T>,
) {
    let nr = g.nr;
    let col_blocks = rows.div_ceil(nr);

    // Q^T in the B layout; columns past `rows` and rows past `head_dim` are zero.
    let bf16 = T::DTYPE == DType::Bf16;
    if bf16 {
        bufs.qt_bf16.fill(0);
    } else {
        bufs.qt_f32.fill(0.0);
    }
    for c in 0..rows {
        let src = &q[c * g.q_stride..][..g.head_dim];
        for (j, x) in src.iter().enumerate() {
            let at = g.b_index(g.dp, j, c);
            if bf16 {
                bufs.qt_bf16[at] = x.to_bf16_bits();
            } else {
                bufs.qt_f32[at] = x.to_f32();
            }
        }
    }
    let (qt_base, qt_elem) = if bf16 {
        (bufs.qt_bf16.as_ptr() as *const u8, 2)
    } else {
        (bufs.qt_f32.as_ptr() as *const u8, 4)
    };
    let (k_base, k_elem) = ops.k.base();
    let (vt_base, vt_elem) = ops.vt.base();

    for cb in 0..col_blocks {
        let st = &mut bufs.st[cb * g.keys_pad * nr..][..g.keys_pad * nr];
        // S^T for these nr queries: one micro-tile per MR keys, written in place.
        let panel = cb * nr / g.b_nr;
        let keys = Operand {
            base: k_base,
            elem: k_elem,
            kp: g.dp,
        };
        // SAFETY: Q^T holds `qb / b_nr` panels of `dp` rows; S^T's block `keys_pad` rows of nr.
        let queries = Operand {
            base: unsafe { qt_base.add(panel * g.dp * g.b_nr * qt_elem) },
            elem: qt_elem,
            kp: g.dp,
        };
        // SAFETY: the packed keys cover `keys_pad` rows of `dp` (see `attention`).
        unsafe {
            product(
                micro,
                &keys,
                &queries,
                g.b_nr,
                g.keys_pad,
                st.as_mut_ptr(),
                nr,
            )
        };
        let causal = params.causal.then_some(r0 + cb * nr);
        let sums = &mut bufs.sums[cb * nr..][..nr];
        let pt = bf16.then_some(&mut bufs.pt[..]);
        probabilities_dispatch(g, cb, st, params.scale, causal, sums, pt);
        // P^T as the output product reads it: the f32 block itself, or its bf16 rounding.
        let (pt_base, pt_elem, pt_rows, pt_panel) = if bf16 {
            (bufs.pt.as_ptr() as *const u8, 2, g.kp_keys, panel)
        } else {
            (st.as_ptr() as *const u8, 4, g.keys_pad, 0)
        };
        // O^T for these queries, `dims_pad` rows of nr.
        let ot = &mut bufs.ot[cb * g.dims_pad * nr..][..g.dims_pad * nr];
        let values = Operand {
            base: vt_base,
            elem: vt_elem,
            kp: g.kp_keys,
        };
        // SAFETY: P^T's panel of this block starts there and holds `pt_rows` >= kp_keys rows.
        let probs = Operand {
            base: unsafe { pt_base.add(pt_panel * pt_rows * g.b_nr * pt_elem) },
            elem: pt_elem,
            kp: pt_rows,
        };
        // SAFETY: the packed V^T covers `dims_pad` rows of `kp_keys`.
        unsafe {
            product(
                micro,
                &values,
                &probs,
                g.b_nr,
                g.dims_pad,
                ot.as_mut_ptr(),
                nr,
            )
        };
    }
}

/// A packed operand of [`product`]: its data, element size in bytes (bf16 halves for pair
/// words) and padded K (A: the row length; B: the rows of each panel).
struct Operand {
    base: *const u8,
    elem: usize,
    kp: usize,
}

/// `C = A B` for `rows` rows of packed A (whole micro-tiles, `a.kp` deep) and one micro-tile
/// width of packed B starting at `b.base` (panels of `b_nr` columns, `b.kp` rows each), into
/// `c` (`rows` rows of `ldc`), K walked in the kernel's steps. Only `a.kp` rows of B are read.
///
/// # Safety
/// A holds `rows` rows of `a.kp`; B holds the micro-tile's panels of `b.kp >= a.kp` rows; `c`
/// holds `rows x ldc` f32 with `ldc >= micro.nr`; the kernel's ISA is available (or emulated).
unsafe fn product(
    micro: &Micro,
    a: &Operand,
    b: &Operand,
    b_nr: usize,
    rows: usize,
    c: *mut f32,
    ldc: usize,
) {
    debug_assert!(b.kp >= a.kp && rows.is_multiple_of(micro.mr));
    let mut pc = 0;
    while pc < a.kp {
        let kc = micro.kc.min(a.kp - pc);
        for ir in (0..rows).step_by(micro.mr) {
            let args = TileArgs {
                kc,
                // SAFETY: row ir at K offset pc is inside A (contract).
                a: unsafe {
                    a.base
                        .add(a_offset(micro.a_format, micro.mr, a.kp, ir, pc) * a.elem)
                },
                a_stride: a.kp,
                // SAFETY: row pc of the first panel is inside B (contract).
                b: unsafe { b.base.add(pc * b_nr * b.elem) },
                b_panel_stride: b.kp * b_nr,
                // SAFETY: rows ir..ir+mr of C (contract).
                c: unsafe { c.add(ir * ldc) },
                ldc,
                accumulate: pc > 0,
            };
            // SAFETY: the tile arguments satisfy the kernel's contract.
            unsafe { (micro.run)(&args) };
        }
        pc += kc;
    }
}

/// The probabilities of column block `cb` (`g.nr` queries): the softmax down each column of
/// `s` (`kv_len` valid rows of `nr` scores), in place: each score becomes
/// `exp(scale * s - max)` with `max` the column's largest `scale * s`; `sums` gets the columns'
/// f32 sums. With `causal = Some(q0)`, column `c` is query `q0 + c` and the keys after it become
/// 0. With `pt`, the probabilities are also rounded to bf16 into `P^T`'s layout (rows from
/// `kv_len` to `kp_keys` zero).
#[inline(always)]
fn probabilities(
    g: &Geometry,
    cb: usize,
    s: &mut [f32],
    scale: f32,
    causal: Option<usize>,
    sums: &mut [f32],
    pt: Option<&mut [half::bf16]>,
) {
    let w = g.nr;
    debug_assert!(w <= MAX_NR && sums.len() == w);
    let s = &mut s[..g.kv_len * w];
    // The columns in groups whose width is known at compile time, so that the group's maxima
    // and sums live in registers and each row is a few whole vectors (two zmm for 32).
    let mut c0 = 0;
    while c0 + 32 <= w {
        softmax_columns::<32>(s, w, c0, scale, causal, &mut sums[c0..c0 + 32]);
        c0 += 32;
    }
    while c0 + 16 <= w {
        softmax_columns::<16>(s, w, c0, scale, causal, &mut sums[c0..c0 + 16]);
        c0 += 16;
    }
    while c0 < w {
        softmax_columns::<1>(s, w, c0, scale, causal, &mut sums[c0..c0 + 1]);
        c0 += 1;
    }
    let Some(pt) = pt else { return };
    let zero = [0f32; MAX_NR];
    let row = |key: usize| -> &[f32] {
        if key < g.kv_len {
            &s[key * w..][..w]
        } else {
            &zero[..w]
        }
    };
    match g.layout {
        BLayout::F32 => {
            // One panel per column block (b_nr == nr): the rows are contiguous.
            let panel = &mut pt[cb * g.kp_keys * w..][..g.kp_keys * w];
            let (live, pad) = panel.split_at_mut(g.kv_len * w);
            convert::f32_to_bf16(s, live);
            pad.fill(half::bf16::ZERO);
        }
        BLayout::Bf16 => {
            // As above, each row's halves interleaved (`pack::bf16_slot`; b_nr == nr == w).
            let panel = &mut pt[cb * g.kp_keys * w..][..g.kp_keys * w];
            let (live, pad) = panel.split_at_mut(g.kv_len * w);
            let mut rounded = [half::bf16::ZERO; MAX_NR];
            let rounded = &mut rounded[..w];
            for (src, dst) in s.chunks_exact(w).zip(live.chunks_exact_mut(w)) {
                convert::f32_to_bf16(src, rounded);
                let (lo, hi) = rounded.split_at(w / 2);
                for ((pair, l), h) in dst.chunks_exact_mut(2).zip(lo).zip(hi) {
                    pair[0] = *l;
                    pair[1] = *h;
                }
            }
            pad.fill(half::bf16::ZERO);
        }
        BLayout::Bf16Pairs => {
            let b_nr = g.b_nr;
            for kk in 0..g.kp_keys / 2 {
                let (r0, r1) = (row(2 * kk), row(2 * kk + 1));
                for sub in 0..w / b_nr {
                    let panel = cb * w / b_nr + sub;
                    let dst = &mut pt[(panel * g.kp_keys + 2 * kk) * b_nr..][..2 * b_nr];
                    for (cc, pair) in dst.chunks_exact_mut(2).enumerate() {
                        pair[0] = half::bf16::from_bits(convert::round_bits(r0[sub * b_nr + cc]));
                        pair[1] = half::bf16::from_bits(convert::round_bits(r1[sub * b_nr + cc]));
                    }
                }
            }
        }
    }
}

/// The softmax of columns `c0..c0 + W` of `s` (`kv_len` rows of `w` scores), in place; `sums`
/// gets their sums. See [`probabilities`].
#[inline(always)]
fn softmax_columns<const W: usize>(
    s: &mut [f32],
    w: usize,
    c0: usize,
    scale: f32,
    causal: Option<usize>,
    sums: &mut [f32],
) {
    let mut max = [f32::NEG_INFINITY; W];
    let mut sum = [0f32; W];
    let rows = s.len() / w;
    match causal {
        None => {
            for key in 0..rows {
                let Ok(row) = <&[f32; W]>::try_from(&s[key * w + c0..][..W]) else {
                    continue;
                };
                // A select (vmaxps); `f32::max` (its NaN rule) left the vectorizer scalar
                // pieces. A NaN score still gives NaN probabilities (below).
                for (m, x) in max.iter_mut().zip(row) {
                    let v = *x * scale;
                    *m = if v > *m { v } else { *m };
                }
            }
            for key in 0..rows {
                let row: &mut [f32] = &mut s[key * w + c0..][..W];
                for ((x, m), t) in row.iter_mut().zip(max.iter()).zip(sum.iter_mut()) {
                    // At most an ulp of `m` above 0 (fused): in exp_nonpositive's domain.
                    let e = math::exp_nonpositive(x.mul_add(scale, -*m));
                    *x = e;
                    *t += e;
                }
            }
        }
        Some(q0) => {
            // Column c is query q0 + c: it sees keys 0..=q0 + c.
            for key in 0..rows {
                let row = &s[key * w + c0..][..W];
                for (c, (m, x)) in max.iter_mut().zip(row).enumerate() {
                    let v = *x * scale;
                    if key <= q0 + c0 + c && v > *m {
                        *m = v;
                    }
                }
            }
            for key in 0..rows {
                let row = &mut s[key * w + c0..][..W];
                for (c, ((x, m), t)) in row
                    .iter_mut()
                    .zip(max.iter())
                    .zip(sum.iter_mut())
                    .enumerate()
                {
                    let e = if key <= q0 + c0 + c {
                        math::exp_nonpositive(x.mul_add(scale, -*m))
                    } else {
                        0.0
                    };
                    *x = e;
                    *t += e;
                }
            }
        }
    }
    sums.copy_from_slice(&sum);
}

/// The widest micro-tile (columns) of the kernels.
const MAX_NR: usize = 32;

/// [`probabilities`] compiled for the host's vector width, with the block width known at
/// compile time.
fn probabilities_dispatch(
    g: &Geometry,
    cb: usize,
    s: &mut [f32],
    scale: f32,
    causal: Option<usize>,
    sums: &mut [f32],
    pt: Option<&mut [half::bf16]>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
        unsafe fn avx512(
            g: &Geometry,
            cb: usize,
            s: &mut [f32],
            scale: f32,
            causal: Option<usize>,
            sums: &mut [f32],
            pt: Option<&mut [half::bf16]>,
        ) {
            probabilities(g, cb, s, scale, causal, sums, pt)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(
            g: &Geometry,
            cb: usize,
            s: &mut [f32],
            scale: f32,
            causal: Option<usize>,
            sums: &mut [f32],
            pt: Option<&mut [half::bf16]>,
        ) {
            probabilities(g, cb, s, scale, causal, sums, pt)
        }
        match Isa::current() {
            // SAFETY: the process's ISA says the features are available.
            Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => {
                return unsafe { avx512(g, cb, s, scale, causal, sums, pt) }
            }
            // SAFETY: as above.
            Isa::Avx2 => return unsafe { avx2(g, cb, s, scale, causal, sums, pt) },
            Isa::Generic => {}
        }
    }
    probabilities(g, cb, s, scale, causal, sums, pt)
}
