//! The GEMM driver: `C[M, N] = epilogue(A[M, K] . B[K, N])` with B packed ([`PackedB`]).
//!
//! Blocking (BLIS-style, brgemm-like epilogue): for each block of `MC` rows, A is packed once
//! into the kernel's format; for each block of `NC` packed columns, K is walked in `KC` steps,
//! every `MR x NR` micro-tile accumulating in an f32 scratch block that stays in L2; after the
//! last K step the epilogue turns the scratch rows into C. The threads split M (or, for short
//! M, the columns) statically, one contiguous range each, with no per-tile scheduling.

use std::ops::Range;

use crate::epilogue::{apply_row, Activation, Element, Epilogue};
use crate::isa::Isa;
use crate::kernels::{AFormat, Micro, TileArgs};
use crate::pack::{BData, PackedB};
use crate::KernelError;

/// Multiply-adds below which one thread does the whole product (a thread start costs about as
/// much as 50 us of work).
const MIN_PARALLEL_MACS: usize = 1 << 22;

/// How to run a GEMM.
#[derive(Debug, Clone, Copy, Default)]
pub struct GemmOptions {
    /// Threads; `None` = [`default_threads`].
    pub threads: Option<usize>,
    /// Run the kernel of B's path on portable vector types / the AMX tile emulator (same
    /// packing and addressing), for testing a path the host lacks. Slow.
    pub emulate: bool,
}

/// The threads the kernels use by default: `SD_NUM_THREADS`, else the available cores.
pub fn default_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| {
        std::env::var("SD_NUM_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|n| *n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    })
}

/// The left-hand matrix: `rows` rows of `k` elements, `stride` elements apart.
#[derive(Debug, Clone, Copy)]
pub struct AMatrix<'a, T> {
    /// The elements.
    pub data: &'a [T],
    /// M.
    pub rows: usize,
    /// Elements between row starts (at least K).
    pub stride: usize,
}

/// `C = epilogue(A . B)` with the default options. C has `rows` rows of
/// [`PackedB::out_columns`] elements, `ldc` apart.
pub fn gemm<T: Element>(
    a: AMatrix<'_, T>,
    b: &PackedB,
    c: &mut [T],
    ldc: usize,
    epi: &Epilogue<'_, T>,
) -> Result<(), KernelError> {
    gemm_with(&GemmOptions::default(), a, b, c, ldc, epi)
}

fn need(
    len: usize,
    rows: usize,
    stride: usize,
    cols: usize,
    what: &str,
) -> Result<(), KernelError> {
    if rows == 0 {
        return Ok(());
    }
    if stride < cols {
        return Err(KernelError::new(format!(
            "{what}: row stride {stride} is below its {cols} columns"
        )));
    }
    let needed = (rows - 1)
        .checked_mul(stride)
        .and_then(|x| x.checked_add(cols));
    match needed {
        Some(n) if n <= len => Ok(()),
        _ => Err(KernelError::new(format!(
            "{what}: {rows} rows of {cols} (stride {stride}) need more than the {len} elements given"
        ))),
    }
}

/// [`gemm`] with explicit options.
pub fn gemm_with<T: Element>(
    opts: &GemmOptions,
    a: AMatrix<'_, T>,
    b: &PackedB,
    c: &mut [T],
    ldc: usize,
    epi: &Epilogue<'_, T>,
) -> Result<(), KernelError> {
    need(a.data.len(), a.rows, a.stride, b.k, "A")?;
    gemm_rows(opts, &a, b, c, ldc, epi, None)
}

/// A bias per group of consecutive rows (a convolution's per-image time embedding): group `g`
/// (rows `g * rows_per_group ..`) adds `table[g * N .. (g + 1) * N]` in place of the
/// epilogue's bias.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowBias<'a> {
    pub table: &'a [f32],
    pub rows_per_group: usize,
}

/// The rows of the left-hand matrix as the packing reads them, one row of K at a time: a
/// strided matrix ([`AMatrix`]) or rows gathered on the fly (the implicit-GEMM convolution).
pub(crate) trait ARows<T>: Sync {
    /// M.
    fn rows(&self) -> usize;
    /// Row `m` (`m < rows`): `buf.len()` (= K) elements, borrowed or gathered into `buf`.
    fn row<'s>(&'s self, m: usize, buf: &'s mut [T]) -> &'s [T];
    /// When every row is made of the same contiguous runs (a convolution: one per tap and
    /// input), the runs as `(k0, len)` in K order, covering `0..k`; the packing then takes
    /// the runs from where they lie instead of gathering each row first.
    fn runs(&self, k: usize) -> Option<Vec<(usize, usize)>> {
        let _ = k;
        None
    }
    /// The runs of row `m` into `out` (one entry per run of [`ARows::runs`]): each where it
    /// lies (at least the run's length), or `None` for zeros (padding). Only called when
    /// [`ARows::runs`] gives runs.
    fn row_runs<'s>(&'s self, m: usize, out: &mut [Option<&'s [T]>]) {
        let _ = m;
        out.fill(None);
    }
    /// Rows already packed as f32 panels of `mr` rows (`[row / mr][k][mr]`, the last panel
    /// padded to `mr` rows), with their `mr`: a kernel that reads [`AFormat::F32Panels`] with
    /// that MR reads them in place instead of packing.
    fn prepacked(&self) -> Option<(&[f32], usize)> {
        None
    }
}

/// The MR of the kernel that runs `b`, when it reads A as f32 panels ([`ARows::prepacked`]).
pub(crate) fn f32_panel_rows(b: &PackedB, emulate: bool) -> Option<usize> {
    let micro = Micro::select(b.isa, b.dtype, emulate);
    (micro.a_format == AFormat::F32Panels).then_some(micro.mr)
}

/// A left-hand matrix of `rows x k` already in the f32 panel format of a kernel with `mr` rows
/// ([`ARows::prepacked`]); `T` is the operand type of the product it enters.
pub(crate) struct PanelRows<'a, T> {
    pub data: &'a [f32],
    pub rows: usize,
    pub k: usize,
    pub mr: usize,
    pub operand: std::marker::PhantomData<T>,
}

impl<T: Element> ARows<T> for PanelRows<'_, T> {
    fn rows(&self) -> usize {
        self.rows
    }
    /// Gathered from the panels (used only by a kernel that cannot read them in place).
    fn row<'s>(&'s self, m: usize, buf: &'s mut [T]) -> &'s [T] {
        let panel = &self.data[(m / self.mr) * self.k * self.mr..][..self.k * self.mr];
        let lane = m % self.mr;
        let mut chunk = [0f32; 64];
        for (i, dst) in buf.chunks_mut(64).enumerate() {
            for (j, c) in chunk.iter_mut().take(dst.len()).enumerate() {
                *c = panel[(i * 64 + j) * self.mr + lane];
            }
            T::from_f32_slice(&chunk[..dst.len()], dst);
        }
        buf
    }
    fn prepacked(&self) -> Option<(&[f32], usize)> {
        Some((self.data, self.mr))
    }
}

impl<T: Element> ARows<T> for AMatrix<'_, T> {
    fn rows(&self) -> usize {
        self.rows
    }
    #[inline]
    fn row<'s>(&'s self, m: usize, buf: &'s mut [T]) -> &'s [T] {
        &self.data[m * self.stride..][..buf.len()]
    }
}

/// The driver over any row source whose rows are valid (checked by the caller).
///
/// The output (and residual) type `O` may differ from the operands' `T`: attention keeps its
/// scores in f32 whatever the operands.
pub(crate) fn gemm_rows<T: Element, O: Element, A: ARows<T>>(
    opts: &GemmOptions,
    a: &A,
    b: &PackedB,
    c: &mut [O],
    ldc: usize,
    epi: &Epilogue<'_, O>,
    row_bias: Option<RowBias<'_>>,
) -> Result<(), KernelError> {
    gemm_core(opts, a, b, c, ldc, epi, row_bias, false)
}

/// `C = A . B` in f32 with the kernel accumulating in C itself: no scratch block and no
/// epilogue pass. C must hold every stored column of B (N a multiple of the panel width) and
/// the rows up to a multiple of the kernel's MR (`rows.div_ceil(mr) * mr` rows of `ldc`): the
/// last micro-tile writes them whole.
pub(crate) fn gemm_rows_in_place<T: Element, A: ARows<T>>(
    opts: &GemmOptions,
    a: &A,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
) -> Result<(), KernelError> {
    let mr = Micro::select(b.isa, b.dtype, opts.emulate).mr;
    let stored = b.stored_columns();
    let rows = a.rows().div_ceil(mr) * mr;
    if b.geglu || stored != b.n || ldc < stored {
        return Err(KernelError::new(format!(
            "an in-place product needs N ({}) to be a whole number of {}-column panels and \
             the row stride ({ldc}) to hold them, without GEGLU",
            b.n, b.nr
        )));
    }
    need(
        c.len(),
        rows,
        ldc,
        stored,
        "C (rows padded to the kernel's MR)",
    )?;
    gemm_core(opts, a, b, c, ldc, &Epilogue::default(), None, true)
}

#[allow(clippy::too_many_arguments)]
fn gemm_core<T: Element, O: Element, A: ARows<T>>(
    opts: &GemmOptions,
    a: &A,
    b: &PackedB,
    c: &mut [O],
    ldc: usize,
    epi: &Epilogue<'_, O>,
    row_bias: Option<RowBias<'_>>,
    in_place: bool,
) -> Result<(), KernelError> {
    debug_assert!(!in_place || O::DTYPE == crate::DType::F32);
    if T::DTYPE != b.dtype {
        return Err(KernelError::new(format!(
            "operands are {:?} but B was packed for {:?}",
            T::DTYPE,
            b.dtype
        )));
    }
    let n_out = b.out_columns();
    let m = a.rows();
    need(c.len(), m, ldc, n_out, "C")?;
    if let Some((r, ldr)) = epi.residual {
        need(r.len(), m, ldr, n_out, "residual")?;
    }
    if let Some(bias) = epi.bias {
        if bias.len() != b.n {
            return Err(KernelError::new(format!(
                "bias has {} values, expected {}",
                bias.len(),
                b.n
            )));
        }
    }
    if let Some(rb) = row_bias {
        let groups = a.rows().div_ceil(rb.rows_per_group.max(1));
        if rb.rows_per_group == 0 || Some(rb.table.len()) != groups.checked_mul(b.n) {
            return Err(KernelError::new(format!(
                "row-group bias has {} values, expected {groups} groups of {}",
                rb.table.len(),
                b.n
            )));
        }
    }
    if (epi.activation == Activation::Geglu) != b.geglu {
        return Err(KernelError::new(
            "the GEGLU activation needs B packed with geglu (and only then)",
        ));
    }
    if !opts.emulate {
        b.isa.supported().map_err(|why| {
            KernelError::new(format!("B was packed for the {} path, but {why}", b.isa))
        })?;
    }
    if m == 0 {
        return Ok(());
    }
    let micro = Micro::select(b.isa, b.dtype, opts.emulate);
    let threads = opts.threads.unwrap_or_else(default_threads).max(1);
    let macs = m.saturating_mul(b.k).saturating_mul(b.n);
    let threads = if macs < MIN_PARALLEL_MACS { 1 } else { threads };

    let stored = b.stored_columns();
    // Column ranges must keep micro-tiles and GEGLU value/gate pairs whole.
    let col_unit = if b.geglu { 2 * b.nr } else { micro.nr }.max(micro.nr);
    let parts = partition(m, stored, threads, micro.mr, col_unit);
    let c_ptr = SendPtr(c.as_mut_ptr());
    let job = |rows: Range<usize>, cols: Range<usize>| {
        // SAFETY: the parts are disjoint (rows x columns) and inside C (checked above), so no
        // two workers write the same element.
        unsafe {
            worker(
                &micro, a, b, c_ptr, ldc, epi, row_bias, rows, cols, in_place,
            )
        }
    };
    if parts.len() == 1 {
        let (rows, cols) = parts[0].clone();
        job(rows, cols);
    } else {
        std::thread::scope(|s| {
            let mut it = parts.iter().cloned();
            let first = it.next();
            for (rows, cols) in it {
                let job = &job;
                s.spawn(move || job(rows, cols));
            }
            if let Some((rows, cols)) = first {
                job(rows, cols);
            }
        });
    }
    Ok(())
}

/// Splits the work into at most `threads` (rows, stored columns) parts. Each thread reads the
/// whole of the operand that is not split, so the split goes along the larger one: rows (in
/// multiples of `mr`) when M >= N, columns (in multiples of `col_unit`) otherwise, or when
/// there are too few column units to share.
fn partition(
    m: usize,
    cols: usize,
    threads: usize,
    mr: usize,
    col_unit: usize,
) -> Vec<(Range<usize>, Range<usize>)> {
    if threads <= 1 {
        return vec![(0..m, 0..cols)];
    }
    let row_tiles = m.div_ceil(mr);
    let col_units = cols.div_ceil(col_unit);
    let by_rows = if col_units < threads * 2 {
        true
    } else if row_tiles < threads * 2 {
        false
    } else {
        m >= cols
    };
    if by_rows {
        let per = row_tiles.div_ceil(threads);
        (0..threads)
            .map(|t| (t * per * mr).min(m)..((t + 1) * per * mr).min(m))
            .filter(|r| !r.is_empty())
            .map(|r| (r, 0..cols))
            .collect()
    } else {
        let units = cols.div_ceil(col_unit);
        let per = units.div_ceil(threads);
        (0..threads)
            .map(|t| (t * per * col_unit).min(cols)..((t + 1) * per * col_unit).min(cols))
            .filter(|r| !r.is_empty())
            .map(|r| (0..m, r))
            .collect()
    }
}

#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: workers write disjoint parts of C through it (see `gemm_with`).
unsafe impl<T: Send> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SendPtr<T> {}

/// Packed A of one row block: f32 panels, bf16 pair panels (one word per `(k, k+1)` pair, the
/// low half `k`, as the kernel reads it) or bf16 rows.
pub(crate) enum ABuf {
    F32(Vec<f32>),
    Pairs(Vec<u32>),
    U16(Vec<u16>),
}

impl Default for ABuf {
    fn default() -> Self {
        ABuf::F32(Vec::new())
    }
}

impl ABuf {
    pub(crate) fn new(format: AFormat) -> Self {
        match format {
            AFormat::F32Panels => ABuf::F32(Vec::new()),
            AFormat::Bf16PairPanels => ABuf::Pairs(Vec::new()),
            AFormat::Bf16Rows => ABuf::U16(Vec::new()),
        }
    }

    /// The packed data and its element size in bytes (pair words count as two bf16 halves, the
    /// unit of [`a_offset`]).
    pub(crate) fn base(&self) -> (*const u8, usize) {
        match self {
            ABuf::F32(v) => (v.as_ptr() as *const u8, 4),
            ABuf::Pairs(v) => (v.as_ptr() as *const u8, 2),
            ABuf::U16(v) => (v.as_ptr() as *const u8, 2),
        }
    }
}

/// Elements (of [`ABuf::base`]'s size) from the start of a packed A block to row `ir` (a
/// multiple of MR) at K offset `pc`, for rows padded to `kp`.
#[inline(always)]
pub(crate) fn a_offset(format: AFormat, mr: usize, kp: usize, ir: usize, pc: usize) -> usize {
    match format {
        AFormat::Bf16Rows => ir * kp + pc,
        _ => ir * kp + pc * mr,
    }
}

/// Packs rows `m0..m0+mc` of A for the kernel (rows up to a multiple of `mr` and K up to `kp`
/// are zero).
///
/// The panel formats are built one tile of `mr` rows at a time: the rows are converted into
/// `tile` (row-major, one word per f32 or per bf16 pair), then interleaved word by word into
/// the panel, so that every store of the panel is sequential.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pack_a<T: Element, A: ARows<T>>(
    a: &A,
    k: usize,
    kp: usize,
    m0: usize,
    mc: usize,
    micro: &Micro,
    buf: &mut ABuf,
    tile: &mut TileBuf,
    gather: &mut [T],
) {
    let mr = micro.mr;
    let tiles = mc.div_ceil(mr);
    let len = tiles * mr * kp;
    match (micro.a_format, buf) {
        (AFormat::F32Panels, ABuf::F32(out)) => {
            // Every element of `out` and of `words` is written below: no clearing.
            out.truncate(len);
            out.resize(len, 0.0);
            debug_assert!(mr <= MAX_MR && k > 0);
            // f32 rows are interleaved from where they are: the operand, the runs of a
            // convolution's rows (taps), or the gather buffer; bf16 rows are widened into
            // `words` first.
            let widened = T::as_f32(&[]).is_none();
            let runs = a.runs(k);
            if let (true, Some(runs)) = (widened, &runs) {
                // bf16 runs are widened straight into the tile's rows.
                let words = &mut tile.f32;
                words.truncate(mr * k);
                words.resize(mr * k, 0.0);
                let mut found = vec![None; runs.len()];
                for (t, panel) in out.chunks_exact_mut(mr * kp).enumerate() {
                    let rows = mr.min(mc - t * mr);
                    for (i, row) in words.chunks_exact_mut(k).take(rows).enumerate() {
                        row_run_slices(a, m0 + t * mr + i, runs, &mut found);
                        for (&(k0, run_len), x) in runs.iter().zip(&found) {
                            let dst = &mut row[k0..k0 + run_len];
                            match x {
                                Some(x) => T::to_f32_slice(x, dst),
                                None => dst.fill(0.0),
                            }
                        }
                    }
                    let mut refs: [&[f32]; MAX_MR] = [&[]; MAX_MR];
                    for (d, row) in refs.iter_mut().zip(words.chunks_exact(k)).take(rows) {
                        *d = row;
                    }
                    interleave_rows(&refs[..mr], rows, k, panel, micro.epilogue_isa);
                }
                return;
            }
            // f32 runs are interleaved from where they lie (bf16 returned above).
            if let Some(runs) = runs {
                let zeros = &mut tile.zeros;
                let longest = runs.iter().map(|r| r.1).max().unwrap_or(0);
                if zeros.len() < longest {
                    zeros.resize(longest, 0.0);
                }
                // The runs of the tile's rows, row-major: each row's position is derived once.
                let n_runs = runs.len();
                let mut found = vec![None; mr * n_runs];
                for (t, panel) in out.chunks_exact_mut(mr * kp).enumerate() {
                    let rows = mr.min(mc - t * mr);
                    for (i, row_runs) in found.chunks_exact_mut(n_runs).take(rows).enumerate() {
                        row_run_slices(a, m0 + t * mr + i, &runs, row_runs);
                    }
                    for (r, &(k0, run_len)) in runs.iter().enumerate() {
                        let mut refs: [&[f32]; MAX_MR] = [&[]; MAX_MR];
                        for (i, d) in refs.iter_mut().take(rows).enumerate() {
                            *d = found[i * n_runs + r]
                                .and_then(T::as_f32)
                                .unwrap_or(&zeros[..run_len]);
                        }
                        let dst = &mut panel[k0 * mr..(k0 + run_len) * mr];
                        interleave_rows(&refs[..mr], rows, run_len, dst, micro.epilogue_isa);
                    }
                    panel[k * mr..].fill(0.0);
                }
                return;
            }
            let words = &mut tile.f32;
            words.truncate(mr * k);
            words.resize(mr * k, 0.0);
            for (t, panel) in out.chunks_exact_mut(mr * kp).enumerate() {
                let rows = mr.min(mc - t * mr);
                let mut refs: [&[f32]; MAX_MR] = [&[]; MAX_MR];
                let mut wide_rows = words.chunks_exact_mut(k);
                for (i, (r, g)) in refs
                    .iter_mut()
                    .zip(gather.chunks_exact_mut(k))
                    .take(rows)
                    .enumerate()
                {
                    let row = a.row(m0 + t * mr + i, g);
                    *r = match (T::as_f32(row), widened) {
                        (Some(f), false) => f,
                        _ => {
                            let dst = wide_rows.next().unwrap_or_default();
                            T::to_f32_slice(row, dst);
                            dst
                        }
                    };
                }
                interleave_rows(&refs[..mr], rows, k, panel, micro.epilogue_isa);
            }
        }
        (AFormat::Bf16PairPanels, ABuf::Pairs(out)) => {
            // kp is even for this format (the kernel steps K by pairs).
            debug_assert!(kp.is_multiple_of(2));
            let pairs = kp / 2;
            // Every element of `out` and of `words` is written below: no clearing.
            out.truncate(len / 2);
            out.resize(len / 2, 0);
            let words = &mut tile.pairs;
            words.truncate(mr * pairs);
            words.resize(mr * pairs, 0);
            // A convolution's runs are paired where they lie when no pair straddles two runs
            // (even channel counts); otherwise each row is gathered first.
            let runs = a
                .runs(k)
                .filter(|runs| runs.iter().all(|&(k0, l)| k0 % 2 == 0 && l % 2 == 0));
            let mut found = vec![None; runs.as_ref().map_or(0, |r| r.len())];
            for (t, panel) in out.chunks_exact_mut(mr * pairs).enumerate() {
                let rows = mr.min(mc - t * mr);
                for (i, dst) in words.chunks_exact_mut(pairs).enumerate() {
                    if i >= rows {
                        dst.fill(0);
                        continue;
                    }
                    let Some(runs) = &runs else {
                        let row = a.row(m0 + t * mr + i, &mut gather[..k]);
                        pair_words(row, dst);
                        continue;
                    };
                    row_run_slices(a, m0 + t * mr + i, runs, &mut found);
                    for (&(k0, run_len), x) in runs.iter().zip(&found) {
                        let d = &mut dst[k0 / 2..(k0 + run_len) / 2];
                        match x {
                            Some(x) => pair_words(x, d),
                            None => d.fill(0),
                        }
                    }
                    dst[k / 2..].fill(0);
                }
                interleave(words, mr, pairs, panel);
            }
        }
        (AFormat::Bf16Rows, ABuf::U16(out)) => {
            out.clear();
            out.resize(len, 0);
            let runs = a.runs(k);
            let mut found = vec![None; runs.as_ref().map_or(0, |r| r.len())];
            for r in 0..mc {
                let dst = &mut out[r * kp..][..k];
                let Some(runs) = &runs else {
                    let row = a.row(m0 + r, &mut gather[..k]);
                    for (o, v) in dst.iter_mut().zip(row) {
                        *o = bf16_bits(*v);
                    }
                    continue;
                };
                // The runs of a convolution row, copied from where they lie (padding runs
                // stay zero).
                row_run_slices(a, m0 + r, runs, &mut found);
                for (&(k0, run_len), x) in runs.iter().zip(&found) {
                    if let Some(x) = *x {
                        for (o, v) in dst[k0..k0 + run_len].iter_mut().zip(x) {
                            *o = bf16_bits(*v);
                        }
                    }
                }
            }
        }
        (_, buf) => {
            // The buffer kind follows the format (see `worker`); rebuild if it ever does not.
            *buf = ABuf::new(micro.a_format);
            pack_a(a, k, kp, m0, mc, micro, buf, tile, gather)
        }
    }
}

/// The runs of row `m` ([`ARows::row_runs`]), each cut to its length from `runs`: `None` is
/// zeros (padding).
fn row_run_slices<'s, T, A: ARows<T>>(
    a: &'s A,
    m: usize,
    runs: &[(usize, usize)],
    out: &mut [Option<&'s [T]>],
) {
    a.row_runs(m, out);
    for (x, &(_, len)) in out.iter_mut().zip(runs) {
        debug_assert!(
            x.is_none_or(|x| x.len() >= len),
            "a run shorter than its length"
        );
        *x = x.and_then(|x| x.get(..len));
    }
}

/// Row-major scratch for one tile of A being packed.
#[derive(Default)]
pub(crate) struct TileBuf {
    f32: Vec<f32>,
    pairs: Vec<u32>,
    /// Zeros, for the padding runs of a convolution's rows.
    zeros: Vec<f32>,
}

/// The largest MR of the kernels.
const MAX_MR: usize = 16;

/// Interleaves the first `live` of `rows` (MR row slices of at least `k` words) into a panel
/// of `dst.len() / MR` groups of MR words: group `c < k` holds word `c` of each row (zero for
/// rows from `live` on), the groups from `k` on (K padding) are zero. `isa` is the path the
/// kernel runs natively (whole 12-row tiles go through registers on AVX-512).
fn interleave_rows(rows: &[&[f32]], live: usize, k: usize, dst: &mut [f32], isa: Isa) {
    #[inline(always)]
    fn fixed<const MR: usize>(rows: &[&[f32]], live: usize, k: usize, dst: &mut [f32]) {
        const EMPTY: &[f32] = &[];
        let mut r: [&[f32]; MR] = [EMPTY; MR];
        for (d, s) in r.iter_mut().zip(rows).take(live) {
            *d = &s[..k];
        }
        let (body, pad) = dst.split_at_mut(k * MR);
        if live == MR {
            for (c, group) in body.chunks_exact_mut(MR).enumerate() {
                for (d, row) in group.iter_mut().zip(&r) {
                    *d = row[c];
                }
            }
        } else {
            for (c, group) in body.chunks_exact_mut(MR).enumerate() {
                for (i, d) in group.iter_mut().enumerate() {
                    *d = if i < live { r[i][c] } else { 0.0 };
                }
            }
        }
        pad.fill(0.0);
    }
    let mr = rows.len();
    debug_assert!(live <= mr && dst.len() >= k * mr && dst.len().is_multiple_of(mr));
    #[cfg(target_arch = "x86_64")]
    if mr == crate::kernels::interleave::ROWS
        && live == mr
        && matches!(isa, Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx)
    {
        let (body, pad) = dst.split_at_mut(k * mr);
        // SAFETY: the kernel of this ISA runs natively (its micro-kernel was selected for it,
        // not emulated), so AVX-512F is available.
        unsafe { crate::kernels::interleave::interleave12_avx512(rows, k, body) };
        pad.fill(0.0);
        return;
    }
    let _ = isa;
    match mr {
        12 => fixed::<12>(rows, live, k, dst),
        6 => fixed::<6>(rows, live, k, dst),
        4 => fixed::<4>(rows, live, k, dst),
        _ => {
            let (body, pad) = dst.split_at_mut(k * mr);
            for (c, group) in body.chunks_exact_mut(mr).enumerate() {
                for (i, d) in group.iter_mut().enumerate() {
                    *d = if i < live { rows[i][c] } else { 0.0 };
                }
            }
            pad.fill(0.0);
        }
    }
}

/// `dst[c * rows + r] = src[r * cols + c]`: `rows` rows of `cols` words become `cols` groups of
/// `rows` words (the panel order). `rows` is the kernel's MR.
fn interleave<W: Copy + Default>(src: &[W], rows: usize, cols: usize, dst: &mut [W]) {
    /// The same with MR known at compile time, so that a group is stored in one sequence.
    #[inline(always)]
    fn fixed<W: Copy + Default, const MR: usize>(src: &[W], cols: usize, dst: &mut [W]) {
        let rows: [&[W]; MR] = std::array::from_fn(|r| &src[r * cols..][..cols]);
        for (c, group) in dst.chunks_exact_mut(MR).take(cols).enumerate() {
            for (d, row) in group.iter_mut().zip(&rows) {
                *d = row[c];
            }
        }
    }
    debug_assert!(src.len() >= rows * cols && dst.len() >= rows * cols);
    match rows {
        12 => fixed::<W, 12>(src, cols, dst),
        6 => fixed::<W, 6>(src, cols, dst),
        4 => fixed::<W, 4>(src, cols, dst),
        _ => {
            for (c, group) in dst.chunks_exact_mut(rows).take(cols).enumerate() {
                for (r, d) in group.iter_mut().enumerate() {
                    *d = src[r * cols + c];
                }
            }
        }
    }
}

/// Consecutive `(k, k+1)` bf16 pairs of a row as words (low half `k`); words past the row's
/// end are zero, and so is the high half of a last odd element.
fn pair_words<T: Element>(row: &[T], dst: &mut [u32]) {
    let full = row.len() / 2;
    for (d, p) in dst.iter_mut().zip(row.chunks_exact(2)) {
        *d = u32::from(bf16_bits(p[0])) | (u32::from(bf16_bits(p[1])) << 16);
    }
    let mut rest = full;
    if let Some(last) = row.chunks_exact(2).remainder().first() {
        if let Some(d) = dst.get_mut(full) {
            *d = u32::from(bf16_bits(*last));
        }
        rest += 1;
    }
    if let Some(tail) = dst.get_mut(rest..) {
        tail.fill(0);
    }
}

/// The bf16 bits of an operand (only called for bf16 formats, where T is bf16 and this is
/// its bit pattern).
#[inline(always)]
fn bf16_bits<T: Element>(v: T) -> u16 {
    v.to_bf16_bits()
}

/// One thread's part: rows `rows` x stored columns `cols`.
///
/// # Safety
/// No other thread writes C's elements of this part; C covers `a.rows` rows of the output
/// columns with stride `ldc` (checked by `gemm_with`).
#[allow(clippy::too_many_arguments)]
unsafe fn worker<T: Element, O: Element, A: ARows<T>>(
    micro: &Micro,
    a: &A,
    b: &PackedB,
    c: SendPtr<O>,
    ldc: usize,
    epi: &Epilogue<'_, O>,
    row_bias: Option<RowBias<'_>>,
    rows: Range<usize>,
    cols: Range<usize>,
    in_place: bool,
) {
    let (mr, nr) = (micro.mr, micro.nr);
    let kp = b.kp;
    let nc_max = micro.nc;
    let mc_max = micro.mc;
    // The buffers of this thread's previous call, if any (attention calls the driver once per
    // block of queries): every element read below is written first, so none is cleared.
    let mut bufs = WORKER_BUFS.take();
    let WorkerBufs {
        ref mut abuf,
        ref mut scratch,
        ref mut tile,
        ref mut tmp,
    } = bufs;
    if !matches!(
        (&*abuf, micro.a_format),
        (ABuf::F32(_), AFormat::F32Panels)
            | (ABuf::Pairs(_), AFormat::Bf16PairPanels)
            | (ABuf::U16(_), AFormat::Bf16Rows)
    ) {
        *abuf = ABuf::new(micro.a_format);
    }
    let scratch_len = mc_max.div_ceil(mr) * mr * nc_max;
    if scratch.len() < scratch_len {
        scratch.resize(scratch_len, 0.0);
    }
    if tmp.len() < nc_max {
        tmp.resize(nc_max, 0.0);
    }
    // One gathered row per row of a micro-tile (the f32 panels are interleaved from them).
    let mut gather = vec![T::ZERO; b.k * mr];
    let (b_base, b_elem) = match &b.data {
        BData::F32(v) => (v.as_ptr() as *const u8, 4),
        BData::Bf16(v) => (v.as_ptr() as *const u8, 2),
    };
    if let Some(begin) = micro.begin {
        // SAFETY: the kernel was selected natively, so its ISA is available.
        unsafe { begin() };
    }
    // Panels the kernel reads in place: its format and MR, and whole panels for every row.
    let prepacked = a.prepacked().and_then(|(data, pmr)| {
        let whole = a.rows().div_ceil(mr) * mr * kp;
        (micro.a_format == AFormat::F32Panels && pmr == mr && kp == b.k && data.len() >= whole)
            .then_some(data)
    });
    debug_assert!(rows.start.is_multiple_of(mr) && mc_max.is_multiple_of(mr));
    let mut m0 = rows.start;
    while m0 < rows.end {
        let mc = mc_max.min(rows.end - m0);
        let mc_pad = mc.div_ceil(mr) * mr;
        let (a_base, a_elem) = match prepacked {
            // SAFETY: m0 is a multiple of MR (row ranges and MC are), so the block's panels
            // start at m0 * kp, inside the data (checked above).
            Some(data) => (unsafe { data.as_ptr().add(m0 * kp) } as *const u8, 4),
            None => {
                pack_a(a, b.k, kp, m0, mc, micro, abuf, tile, &mut gather);
                abuf.base()
            }
        };
        let mut c0 = cols.start;
        while c0 < cols.end {
            let nc = nc_max.min(cols.end - c0);
            debug_assert!(nc.is_multiple_of(nr) && c0.is_multiple_of(b.nr));
            let mut pc = 0;
            while pc < kp {
                let kc = micro.kc.min(kp - pc);
                for jr in (0..nc).step_by(nr) {
                    let panel = (c0 + jr) / b.nr;
                    let b_off = (panel * kp + pc) * b.nr;
                    debug_assert!(b_off + kc * b.nr <= b.panels * kp * b.nr);
                    for ir in (0..mc_pad).step_by(mr) {
                        let a_off = a_offset(micro.a_format, mr, kp, ir, pc);
                        let args = TileArgs {
                            kc,
                            // SAFETY: offsets inside the packed buffers (sizes above).
                            a: unsafe { a_base.add(a_off * a_elem) },
                            a_stride: kp,
                            // SAFETY: b_off is inside the packed B (debug-checked above).
                            b: unsafe { b_base.add(b_off * b_elem) },
                            b_panel_stride: kp * b.nr,
                            c: if in_place {
                                // SAFETY: in place, C holds the padded rows and every stored
                                // column (checked by `gemm_rows_in_place`), and O is f32.
                                unsafe { (c.0 as *mut f32).add((m0 + ir) * ldc + c0 + jr) }
                            } else {
                                // SAFETY: the tile lies inside the scratch block.
                                unsafe { scratch.as_mut_ptr().add(ir * nc_max + jr) }
                            },
                            ldc: if in_place { ldc } else { nc_max },
                            accumulate: pc > 0,
                        };
                        // SAFETY: the tile arguments satisfy the kernel's contract.
                        unsafe { (micro.run)(&args) };
                    }
                }
                pc += kc;
            }
            if in_place {
                c0 += nc;
                continue;
            }
            // SAFETY: forwarded: this part's rows and columns of C are ours alone.
            let block = ScratchBlock {
                scratch,
                lds: nc_max,
                mc,
                cols: c0..c0 + nc,
                b,
                epi,
                row_bias,
                c,
                ldc,
                m0,
            };
            unsafe { epilogue_block(micro.epilogue_isa, &block, tmp) };
            c0 += nc;
        }
        m0 += mc;
    }
    if let Some(end) = micro.end {
        // SAFETY: paired with begin on this thread.
        unsafe { end() };
    }
    WORKER_BUFS.set(bufs);
}

/// A worker's buffers, kept per thread between calls.
#[derive(Default)]
struct WorkerBufs {
    abuf: ABuf,
    scratch: Vec<f32>,
    tile: TileBuf,
    tmp: Vec<f32>,
}

thread_local! {
    static WORKER_BUFS: std::cell::Cell<WorkerBufs> = std::cell::Cell::new(WorkerBufs::default());
}

/// A finished f32 accumulator block and where its rows go: scratch rows `0..mc` (stride
/// `lds`) hold stored columns `cols` of C's rows `m0..m0+mc`.
struct ScratchBlock<'s, 'e, O> {
    scratch: &'s [f32],
    lds: usize,
    mc: usize,
    cols: Range<usize>,
    b: &'s PackedB,
    epi: &'s Epilogue<'e, O>,
    row_bias: Option<RowBias<'e>>,
    c: SendPtr<O>,
    ldc: usize,
    m0: usize,
}

/// The epilogue of a scratch block, compiled for the kernel's vector width.
///
/// # Safety
/// As [`worker`]: C's rows `m0..m0+mc` at the output columns of `cols` belong to the caller.
unsafe fn epilogue_block<O: Element>(isa: Isa, block: &ScratchBlock<'_, '_, O>, tmp: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        /// One `#[target_feature]` copy of the epilogue body per vector width.
        macro_rules! compiled_for {
            ($name:ident, $features:literal) => {
                #[target_feature(enable = $features)]
                unsafe fn $name<O: Element>(block: &ScratchBlock<'_, '_, O>, tmp: &mut [f32]) {
                    // SAFETY: forwarded contract.
                    unsafe { epilogue_body(block, tmp) }
                }
            };
        }
        compiled_for!(avx512, "avx512f,avx512bw,avx512vl,avx2,fma");
        compiled_for!(avx2, "avx2,fma");
        match isa {
            // SAFETY: the kernel that produced the block ran natively on this ISA.
            Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => return unsafe { avx512(block, tmp) },
            // SAFETY: as above.
            Isa::Avx2 => return unsafe { avx2(block, tmp) },
            Isa::Generic => {}
        }
    }
    let _ = isa;
    // SAFETY: forwarded contract.
    unsafe { epilogue_body(block, tmp) }
}

#[inline(always)]
unsafe fn epilogue_body<O: Element>(block: &ScratchBlock<'_, '_, O>, tmp: &mut [f32]) {
    let ScratchBlock {
        scratch,
        lds,
        mc,
        ref cols,
        b,
        epi,
        row_bias,
        c,
        ldc,
        m0,
    } = *block;
    let n_out = b.out_columns();
    let mut group_epi = *epi;
    for r in 0..mc {
        let srow = &scratch[r * lds..][..cols.len()];
        let out_row = m0 + r;
        let epi = match row_bias {
            Some(rb) => {
                let g = out_row / rb.rows_per_group;
                group_epi.bias = Some(&rb.table[g * b.n..(g + 1) * b.n]);
                &group_epi
            }
            None => epi,
        };
        let residual_row = epi.residual.map(|(data, ldr)| &data[out_row * ldr..]);
        if b.geglu {
            // Stored columns come as (value panel, gate panel) pairs.
            let pair = 2 * b.nr;
            let mut s = cols.start;
            while s < cols.end {
                if let Some(col0) = b.output_column(s) {
                    let w = b.nr.min(n_out - col0);
                    let off = s - cols.start;
                    // SAFETY: row `out_row`, columns col0..col0+w belong to this part.
                    let out =
                        unsafe { std::slice::from_raw_parts_mut(c.0.add(out_row * ldc + col0), w) };
                    apply_row(
                        &srow[off..off + w],
                        Some(&srow[off + b.nr..off + b.nr + w]),
                        col0,
                        n_out + col0,
                        epi,
                        residual_row.map(|rr| &rr[col0..col0 + w]),
                        tmp,
                        out,
                    );
                }
                s += pair;
            }
        } else {
            let col0 = cols.start;
            if col0 >= n_out {
                continue;
            }
            let w = cols.len().min(n_out - col0);
            // SAFETY: row `out_row`, columns col0..col0+w belong to this part.
            let out = unsafe { std::slice::from_raw_parts_mut(c.0.add(out_row * ldc + col0), w) };
            apply_row(
                &srow[..w],
                None,
                col0,
                0,
                epi,
                residual_row.map(|rr| &rr[col0..col0 + w]),
                tmp,
                out,
            );
        }
    }
}
