//! 3x3, stride-1, padding-1 convolutions by Winograd's minimal filtering F(2x2, 3x3) (Lavin and
//! Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).
//!
//! Each 2x2 block of output pixels (a tile) comes from the 4x4 input window under it:
//! `Y = A^T [ (G g G^T) * (B^T d B) ] A`, the product elementwise per transformed position and
//! summed over input channels. Summing over channels at each of the 16 positions is a GEMM
//! (tiles x Cin times Cin x Cout), so a convolution becomes 16 products on the packed core with
//! 16 multiplies per tile and channel pair instead of 36: 2.25x fewer multiply-adds than the
//! direct convolution, for two cheap linear transforms of the activations.
//!
//! F(2x2, 3x3) is the variant whose error stays near the direct convolution's: its transforms
//! hold only 0, +-1 and +-1/2 (the larger tiles' points 2, 4, 1/4 ... amplify rounding; in a
//! numpy check on a 320-channel layer against f64, F(4x4, 3x3) had 35x the direct error,
//! F(2x2, 3x3) 1.8x).
//!
//! The tiles are processed in blocks of whole tile rows, at most 32 MiB (`BLOCK_BYTES`) of
//! transformed data: the input transform writes each position's tiles as the kernel's A panels
//! (`[16][tiles / MR][Cin][MR]`, read in place by the GEMM), the products accumulate in f32
//! (`[16][tiles][Cout]`), and the output transform applies the epilogue (biases, activation,
//! residual). The input transform reads the same fused inputs as the direct convolution (a
//! nearest-neighbour resize, a concatenated second input).

use std::ops::Range;

use crate::conv::{check_operands, per_image_bias, ConvEpilogue, ConvGeometry, ConvInput};
use crate::epilogue::{apply_row, Element, Epilogue};
use crate::gemm::{
    default_threads, f32_panel_rows, gemm_rows, gemm_rows_in_place, GemmOptions, PanelRows,
};
use crate::isa::Isa;
use crate::pack::{BData, BLayout, BSource, DType, PackedB};
use crate::KernelError;

/// Positions of a transformed tile.
const POS: usize = 16;

/// The positions of one lane of the input transform's buffer, plus one row of padding.
const LANE_POS: usize = POS + 1;

/// Channels transformed at a time (a few vector registers' worth, on the stack).
const CHUNK: usize = 64;

/// The panel height used when the kernel packs A itself (any works: see [`PanelRows`]).
const DEFAULT_MR: usize = 12;

/// Tiles below which the direct convolution is kept (see [`winograd_pays`]).
const MIN_TILES: usize = 256;

/// Weight elements (Cin x Cout) per tile below which Winograd is used (see [`winograd_pays`]).
const TRANSFORM_PER_TILE: usize = 4096;

/// Input channels below which the direct convolution is kept (a product with K this short
/// spends more on its transforms than it saves).
const MIN_CHANNELS: usize = 32;

/// Bytes of transformed input and output a block of tiles may hold.
const BLOCK_BYTES: usize = 32 << 20;

/// `G`, the weight transform of F(2x2, 3x3).
const G: [[f64; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];

/// The weights of a 3x3 convolution transformed for F(2x2, 3x3): `U_p = (G g G^T)[p]` for the
/// 16 positions, each packed as the B (`Cin x Cout`) of one product.
#[derive(Debug, Clone)]
pub struct WinogradWeight {
    u: Vec<PackedB>,
    cin: usize,
    cout: usize,
}

impl WinogradWeight {
    /// Transforms a 3x3 weight packed by [`crate::pack_conv_weight`] (K ordered `(ky, kx, c)`
    /// over `in_channels`), for the same kernel path and dtype. The transform runs in f64 and
    /// is rounded once to the packing's type.
    pub fn from_conv_weight(w: &PackedB, in_channels: usize) -> Result<Self, KernelError> {
        if w.geglu || in_channels == 0 || Some(w.k) != in_channels.checked_mul(9) {
            return Err(KernelError::new(format!(
                "a Winograd weight needs a 3x3 convolution weight over {in_channels} channels \
                 (K = {}), got K = {}{}",
                in_channels.saturating_mul(9),
                w.k,
                if w.geglu { " packed for GEGLU" } else { "" }
            )));
        }
        if let (BLayout::F32, BData::F32(src)) = (w.layout, &w.data) {
            return Ok(Self::from_f32_panels(w, src, in_channels));
        }
        Self::from_any_layout(w, in_channels)
    }

    /// The transform of any packing, element by element in f64 (the reference of
    /// [`Self::from_f32_panels`], and the path of bf16 packings).
    fn from_any_layout(w: &PackedB, in_channels: usize) -> Result<Self, KernelError> {
        let (cin, cout) = (in_channels, w.n);
        let mut taps = vec![[0f64; 9]; cin * cout];
        for (i, g) in taps.iter_mut().enumerate() {
            let (o, c) = (i / cin, i % cin);
            for (t, v) in g.iter_mut().enumerate() {
                *v = f64::from(w.get(t * cin + c, o).unwrap_or(0.0));
            }
        }
        let mut plane = vec![0f32; cout * cin];
        let mut u = Vec::with_capacity(POS);
        for p in 0..POS {
            let (gr, gc) = (G[p / 4], G[p % 4]);
            for (dst, g) in plane.iter_mut().zip(&taps) {
                let mut s = 0f64;
                for ky in 0..3 {
                    for kx in 0..3 {
                        s += gr[ky] * gc[kx] * g[ky * 3 + kx];
                    }
                }
                *dst = s as f32;
            }
            // `plane` is [Cout][Cin], the layout of a linear weight.
            u.push(PackedB::pack(
                BSource::linear_weight(&plane, cout, cin),
                w.isa,
                w.dtype,
                false,
            )?);
        }
        Ok(Self { u, cin, cout })
    }

    /// The transform of an f32 packing, panel to panel: for each panel and input channel the
    /// nine taps are nine contiguous vectors of the panel's output channels, and so is each
    /// position of the result, in the same layout (`G g G^T` as rows then columns, in f32).
    /// A single use of the convolution pays for it: it is memory-bound, not a GEMM.
    fn from_f32_panels(w: &PackedB, src: &[f32], cin: usize) -> Self {
        let (nr, kp, panels) = (w.nr, w.kp, w.panels);
        let mut planes: Vec<Vec<f32>> = (0..POS).map(|_| vec![0f32; panels * cin * nr]).collect();
        // t[r][kx] = (G g)[r][kx], one vector of nr output channels each.
        let mut t = vec![[[0f32; 3]; 4]; nr];
        for p in 0..panels {
            for c in 0..cin {
                let tap = |i: usize| &src[(p * kp + i * cin + c) * nr..][..nr];
                let (g0, g1, g2) = (
                    [tap(0), tap(1), tap(2)],
                    [tap(3), tap(4), tap(5)],
                    [tap(6), tap(7), tap(8)],
                );
                for (j, tj) in t.iter_mut().enumerate() {
                    for kx in 0..3 {
                        let (a, b, e) = (g0[kx][j], g1[kx][j], g2[kx][j]);
                        tj[0][kx] = a;
                        tj[1][kx] = 0.5 * (a + b + e);
                        tj[2][kx] = 0.5 * (a - b + e);
                        tj[3][kx] = e;
                    }
                }
                let at = (p * cin + c) * nr;
                for r in 0..4 {
                    let [p0, p1, p2, p3] = &mut planes[4 * r..4 * r + 4] else {
                        unreachable!("four positions per row")
                    };
                    let dst = [
                        &mut p0[at..at + nr],
                        &mut p1[at..at + nr],
                        &mut p2[at..at + nr],
                        &mut p3[at..at + nr],
                    ];
                    for (j, tj) in t.iter().enumerate() {
                        let [a, b, e] = tj[r];
                        dst[0][j] = a;
                        dst[1][j] = 0.5 * (a + b + e);
                        dst[2][j] = 0.5 * (a - b + e);
                        dst[3][j] = e;
                    }
                }
            }
        }
        let u = planes
            .into_iter()
            .map(|plane| PackedB {
                isa: w.isa,
                dtype: w.dtype,
                layout: BLayout::F32,
                nr,
                k: cin,
                kp: cin,
                n: w.n,
                panels,
                geglu: false,
                data: BData::F32(plane),
            })
            .collect();
        Self { u, cin, cout: w.n }
    }

    /// Input channels.
    pub fn in_channels(&self) -> usize {
        self.cin
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.cout
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.u.iter().map(PackedB::bytes).sum()
    }
}

/// Whether [`conv2d_winograd`] computes this convolution (a 3x3 kernel, stride 1, padding 1 on
/// every side).
pub fn winograd_applies(g: &ConvGeometry) -> bool {
    g.kernel == 3 && g.stride == 1 && g.pad == [1; 4]
}

/// Whether [`conv2d_winograd`] is expected to beat the direct [`crate::conv2d`] for this
/// geometry and 3x3 weight (packed by [`crate::pack_conv_weight`]): it applies; the weight is
/// f32 on a kernel that reads A as f32 panels (the transformed input is written in them); and
/// there are enough tiles for each of its 16 products to be a real GEMM (on the small images
/// of a UNet's inner levels the direct convolution streams the weights once instead of 16
/// transformed copies).
///
/// `SD_WINOGRAD=0` (or `off`) in the environment turns it off: every convolution is then
/// direct (at most a few f32 ulps apart, see the module docs).
pub fn winograd_pays(g: &ConvGeometry, w: &PackedB) -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let enabled = *ENABLED.get_or_init(|| {
        !matches!(
            std::env::var("SD_WINOGRAD").as_deref().map(str::trim),
            Ok("0" | "off" | "false")
        )
    });
    let (vh, vw) = g.virtual_input();
    let tiles = g
        .batch
        .saturating_mul(vh.div_ceil(2))
        .saturating_mul(vw.div_ceil(2));
    let cin = w.k / 9;
    // The transformed weight is 16/9 of the direct one and is kept next to it: only where it
    // serves enough tiles (a UNet's outer levels; not its 1280-channel layers at 24x24).
    let weight_tiles = cin.saturating_mul(w.n) / TRANSFORM_PER_TILE;
    enabled
        && winograd_applies(g)
        && w.k == 9 * cin
        && cin >= MIN_CHANNELS
        && tiles >= MIN_TILES.max(weight_tiles)
        && !w.geglu
        && w.dtype == DType::F32
        && f32_panel_rows(w, false).is_some()
}

/// Tile rows: global tile row `r` is row `r % tiles_y` of image `r / tiles_y`.
#[derive(Clone, Copy)]
struct Tiling {
    tiles_y: usize,
    tiles_x: usize,
    oh: usize,
    ow: usize,
}

impl Tiling {
    /// The first output row (over the whole batch, `image * oh + y`) of tile row `r`; tile
    /// rows `a..b` cover output rows `first_row(a)..first_row(b)`.
    fn first_row(&self, r: usize) -> usize {
        (r / self.tiles_y) * self.oh + (2 * (r % self.tiles_y)).min(self.oh)
    }
}

/// Where the input pixels come from (the resize maps virtual rows/columns to stored ones).
struct Source<'a, T> {
    x: ConvInput<'a, T>,
    in_h: usize,
    in_w: usize,
    src_y: Vec<usize>,
    src_x: Vec<usize>,
}

impl<T: Element> Source<'_, T> {
    /// Input channels `c0..c0+len` of virtual pixel `(y, x)` of `image`, if inside the image
    /// (`None` is padding). The range lies within one of the two inputs.
    #[inline]
    fn pixel(&self, image: usize, y: isize, x: isize, part: usize) -> Option<&[T]> {
        let sy = *self.src_y.get(usize::try_from(y).ok()?)?;
        let sx = *self.src_x.get(usize::try_from(x).ok()?)?;
        let pix = (image * self.in_h + sy) * self.in_w + sx;
        match part {
            0 => self
                .x
                .x
                .get(pix * self.x.channels..(pix + 1) * self.x.channels),
            _ => {
                let (x2, c2) = self.x.concat?;
                x2.get(pix * c2..(pix + 1) * c2)
            }
        }
    }
}

/// `out = epilogue(conv3x3(x, w))` by F(2x2, 3x3): the same operands, geometry (a 3x3 kernel,
/// stride 1, padding 1, optional resize) and epilogue as [`crate::conv2d`], with the weights of
/// [`WinogradWeight::from_conv_weight`].
pub fn conv2d_winograd<T: Element>(
    opts: &GemmOptions,
    x: ConvInput<'_, T>,
    g: &ConvGeometry,
    w: &WinogradWeight,
    out: &mut [T],
    epi: &ConvEpilogue<'_, T>,
) -> Result<(), KernelError> {
    blocked(opts, x, g, w, out, epi, BLOCK_BYTES)
}

/// [`conv2d_winograd`] with blocks of at most `block_bytes` of transformed data (at least one
/// tile row).
fn blocked<T: Element>(
    opts: &GemmOptions,
    x: ConvInput<'_, T>,
    g: &ConvGeometry,
    w: &WinogradWeight,
    out: &mut [T],
    epi: &ConvEpilogue<'_, T>,
    block_bytes: usize,
) -> Result<(), KernelError> {
    if !winograd_applies(g) {
        return Err(KernelError::new(format!(
            "Winograd F(2x2, 3x3) computes 3x3 convolutions of stride 1 and padding 1, got \
             kernel {}, stride {}, padding {:?}",
            g.kernel, g.stride, g.pad
        )));
    }
    let cin = x.total_channels();
    if cin != w.cin {
        return Err(KernelError::new(format!(
            "the Winograd weight has {} input channels, the input {cin}",
            w.cin
        )));
    }
    let cout = w.cout;
    let (oh, ow) = check_operands(&x, g, cout, out.len(), epi)?;
    if g.batch == 0 {
        return Ok(());
    }
    let (vh, vw) = g.virtual_input();
    if T::DTYPE != w.u[0].dtype {
        return Err(KernelError::new(format!(
            "operands are {:?} but the Winograd weight was packed for {:?}",
            T::DTYPE,
            w.u[0].dtype
        )));
    }
    let src = Source {
        x,
        in_h: g.in_h,
        in_w: g.in_w,
        src_y: (0..vh).map(|i| i * g.in_h / vh).collect(),
        src_x: (0..vw).map(|i| i * g.in_w / vw).collect(),
    };
    let tiling = Tiling {
        tiles_y: oh.div_ceil(2),
        tiles_x: ow.div_ceil(2),
        oh,
        ow,
    };
    let per_image = per_image_bias(epi, cout);
    let threads = opts.threads.unwrap_or_else(default_threads).max(1);
    // The transformed input is written as the kernel's A panels, read in place.
    let mr = f32_panel_rows(&w.u[0], opts.emulate).unwrap_or(DEFAULT_MR);
    let tile_rows = g.batch * tiling.tiles_y;
    let row_bytes = tiling.tiles_x * POS * (cin + cout) * std::mem::size_of::<f32>();
    let rows_per_block = (block_bytes / row_bytes.max(1)).clamp(1, tile_rows);
    let max_tiles = rows_per_block * tiling.tiles_x;
    let max_groups = max_tiles.div_ceil(mr);
    // This thread's buffers from its previous call (fresh pages cost a fault each): every
    // element read below is written first, except the padding lanes of the last panel, which
    // only feed rows that are never stored.
    let (mut v, mut m) = BUFFERS.take();
    v.resize(v.len().max(POS * max_groups * cin * mr), 0.0);
    m.resize(m.len().max(POS * max_groups * mr * cout), 0.0);
    let out_row = ow * cout;
    // The products accumulate in M directly when every stored column is an output channel.
    let in_place =
        w.u[0].stored_columns() == cout && f32_panel_rows(&w.u[0], opts.emulate).is_some();
    let mut r0 = 0;
    while r0 < tile_rows {
        let r1 = (r0 + rows_per_block).min(tile_rows);
        let tiles = (r1 - r0) * tiling.tiles_x;
        let groups = tiles.div_ceil(mr);
        let v = &mut v[..POS * groups * cin * mr];
        // Each position's products, rows padded to whole panels (written in place).
        let tiles_pad = groups * mr;
        let m = &mut m[..POS * tiles_pad * cout];
        // The input transform, split over threads by whole panels of tiles.
        let first_tile = r0 * tiling.tiles_x;
        let parts = split_rows(0..groups, threads);
        let mut per_part: Vec<Vec<&mut [f32]>> = parts.iter().map(|_| Vec::new()).collect();
        for plane in v.chunks_exact_mut(groups * cin * mr) {
            let mut rest = plane;
            for (part, mine) in parts.iter().zip(per_part.iter_mut()) {
                let (head, tail) = rest.split_at_mut(part.len() * cin * mr);
                mine.push(head);
                rest = tail;
            }
        }
        let job = |part: &Range<usize>, planes: &mut [&mut [f32]]| {
            let t0 = part.start * mr;
            let t1 = (part.end * mr).min(tiles);
            let ctx = InputCtx {
                src: &src,
                tiling: &tiling,
                cin,
                mr,
            };
            transform_input_dispatch(&ctx, first_tile + t0..first_tile + t1, planes)
        };
        if parts.len() == 1 {
            job(&parts[0], &mut per_part[0]);
        } else {
            std::thread::scope(|s| {
                for (part, planes) in parts.iter().zip(per_part.iter_mut()) {
                    let job = &job;
                    s.spawn(move || job(part, planes));
                }
            });
        }
        // The 16 products, one per position: M_p = V_p U_p, f32 whatever the operands.
        for (p, (u, mp)) in
            w.u.iter()
                .zip(m.chunks_exact_mut(tiles_pad * cout))
                .enumerate()
        {
            let a = PanelRows::<T> {
                data: &v[p * groups * cin * mr..(p + 1) * groups * cin * mr],
                rows: tiles,
                k: cin,
                mr,
                operand: std::marker::PhantomData,
            };
            if in_place {
                gemm_rows_in_place(opts, &a, u, mp, cout)?;
            } else {
                gemm_rows(opts, &a, u, mp, cout, &Epilogue::<f32>::default(), None)?;
            }
        }
        // The output transform and epilogue, split over threads by tile rows, each writing
        // a contiguous range of output rows.
        let (o0, o1) = (tiling.first_row(r0), tiling.first_row(r1));
        let out_block = &mut out[o0 * out_row..o1 * out_row];
        let ctx = OutputCtx {
            tiling: &tiling,
            cout,
            epi,
            per_image: per_image.as_deref(),
            m,
            tiles: tiles_pad,
            r0,
        };
        let split = split_rows(r0..r1, threads);
        if split.len() == 1 {
            transform_output_dispatch(&ctx, r0..r1, out_block);
        } else {
            std::thread::scope(|s| {
                let mut rest = &mut *out_block;
                for rows in split {
                    let len = (tiling.first_row(rows.end) - tiling.first_row(rows.start)) * out_row;
                    let (mine, tail) = rest.split_at_mut(len);
                    rest = tail;
                    let ctx = &ctx;
                    s.spawn(move || transform_output_dispatch(ctx, rows, mine));
                }
            });
        }
        r0 = r1;
    }
    BUFFERS.set((v, m));
    Ok(())
}

thread_local! {
    /// The transformed input and the products, kept per calling thread between calls.
    static BUFFERS: std::cell::Cell<(Vec<f32>, Vec<f32>)> = const {
        std::cell::Cell::new((Vec::new(), Vec::new()))
    };
}

/// `rows` cut into at most `threads` contiguous ranges.
fn split_rows(rows: Range<usize>, threads: usize) -> Vec<Range<usize>> {
    let n = rows.len();
    let parts = threads.min(n).max(1);
    let per = n.div_ceil(parts);
    (0..parts)
        .map(|t| rows.start + (t * per).min(n)..rows.start + ((t + 1) * per).min(n))
        .filter(|r| !r.is_empty())
        .collect()
}

/// One copy of each transform per vector width (the loops are written for auto-vectorization).
macro_rules! dispatch {
    ($name:ident => $body:ident ($($arg:ident: $ty:ty),*)) => {
        fn $name<T: Element>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                unsafe fn avx512<T: Element>($($arg: $ty),*) {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<T: Element>($($arg: $ty),*) {
                    $body($($arg),*)
                }
                match Isa::current() {
                    // SAFETY: the process's ISA says AVX-512F is available.
                    Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above for AVX2 and FMA.
                    Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    Isa::Generic => {}
                }
            }
            $body($($arg),*)
        }
    };
}

/// What the input transform reads.
struct InputCtx<'a, 'x, T> {
    src: &'a Source<'x, T>,
    tiling: &'a Tiling,
    cin: usize,
    mr: usize,
}

dispatch!(transform_input_dispatch => transform_input(
    ctx: &InputCtx<'_, '_, T>, tiles: Range<usize>, planes: &mut [&mut [f32]]));

/// `B^T d B` of tiles `tiles` (global indices, the first a multiple of MR within its block),
/// into `planes[p]`, position `p`'s panels of those tiles (`[tile / mr][Cin][mr]`). A panel's
/// MR tiles are transformed together, CHUNK channels at a time, then interleaved into it.
#[inline(always)]
fn transform_input<T: Element>(
    ctx: &InputCtx<'_, '_, T>,
    tiles: Range<usize>,
    planes: &mut [&mut [f32]],
) {
    let InputCtx {
        src,
        tiling,
        cin,
        mr,
    } = *ctx;
    let parts = [
        (0, src.x.channels),
        (src.x.channels, src.x.concat.map_or(0, |(_, c)| c)),
    ];
    let mut d = [[0f32; CHUNK]; POS];
    // The transformed chunk of each tile of the panel: [lane][position][channel], a lane
    // LANE floats apart (not a multiple of 4 KiB, so the lanes do not share L1 sets).
    let mut lanes = vec![[[0f32; CHUNK]; LANE_POS]; mr];
    let first = tiles.start;
    let mut windows: Vec<[Option<&[T]>; POS]> = Vec::with_capacity(mr);
    let mut t0 = first;
    while t0 < tiles.end {
        let t1 = (t0 + mr).min(tiles.end);
        let group = (t0 - first) / mr;
        for (part, &(c_off, c_len)) in parts.iter().enumerate() {
            if c_len == 0 {
                continue;
            }
            windows.clear();
            for t in t0..t1 {
                let (r, tx) = (t / tiling.tiles_x, t % tiling.tiles_x);
                let (image, ty) = (r / tiling.tiles_y, r % tiling.tiles_y);
                let (y0, x0) = (2 * ty as isize - 1, 2 * tx as isize - 1);
                windows.push(std::array::from_fn(|q| {
                    src.pixel(image, y0 + (q / 4) as isize, x0 + (q % 4) as isize, part)
                }));
            }
            let mut c0 = 0;
            while c0 < c_len {
                let n = CHUNK.min(c_len - c0);
                for (window, out) in windows.iter().zip(lanes.iter_mut()) {
                    for (dq, px) in d.iter_mut().zip(window) {
                        match px {
                            Some(px) => T::to_f32_slice(&px[c0..c0 + n], &mut dq[..n]),
                            None => dq[..n].fill(0.0),
                        }
                    }
                    let out: &mut [[f32; CHUNK]; POS] = (&mut out[..POS])
                        .try_into()
                        .expect("a lane holds the 16 positions");
                    input_tile(&d, out);
                }
                let live = windows.len();
                for (p, plane) in planes.iter_mut().enumerate() {
                    let base = (group * cin + c_off + c0) * mr;
                    interleave_lanes(&lanes, live, p, n, &mut plane[base..base + n * mr]);
                }
                c0 += n;
            }
        }
        t0 = t1;
    }
}

/// `dst[c * mr + lane] = lanes[lane][p][c]` for `c < n` and the first `live` lanes (the
/// others, past the last tile, are left as they are).
#[inline(always)]
fn interleave_lanes(
    lanes: &[[[f32; CHUNK]; LANE_POS]],
    live: usize,
    p: usize,
    n: usize,
    dst: &mut [f32],
) {
    #[inline(always)]
    fn fixed<const MR: usize>(
        lanes: &[[[f32; CHUNK]; LANE_POS]],
        p: usize,
        n: usize,
        dst: &mut [f32],
    ) {
        let rows: [&[f32; CHUNK]; MR] = std::array::from_fn(|l| &lanes[l][p]);
        for (c, out) in dst.chunks_exact_mut(MR).take(n).enumerate() {
            for (o, row) in out.iter_mut().zip(&rows) {
                *o = row[c];
            }
        }
    }
    let mr = lanes.len();
    match (mr, live == mr) {
        (12, true) => fixed::<12>(lanes, p, n, dst),
        (6, true) => fixed::<6>(lanes, p, n, dst),
        (4, true) => fixed::<4>(lanes, p, n, dst),
        _ => {
            for (c, out) in dst.chunks_exact_mut(mr).take(n).enumerate() {
                for (o, lane) in out.iter_mut().zip(lanes).take(live) {
                    *o = lane[p][c];
                }
            }
        }
    }
}

/// `B^T d B` for CHUNK channels at once; `d` and `v` are 4x4 row-major over positions. With
/// `B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`.
#[inline(always)]
fn input_tile(d: &[[f32; CHUNK]; POS], v: &mut [[f32; CHUNK]; POS]) {
    #[inline(always)]
    fn bt(
        a: &[f32; CHUNK],
        b: &[f32; CHUNK],
        c: &[f32; CHUNK],
        e: &[f32; CHUNK],
    ) -> [[f32; CHUNK]; 4] {
        let mut o = [[0f32; CHUNK]; 4];
        for l in 0..CHUNK {
            o[0][l] = a[l] - c[l];
            o[1][l] = b[l] + c[l];
            o[2][l] = c[l] - b[l];
            o[3][l] = b[l] - e[l];
        }
        o
    }
    // Columns of each row, then rows of each column.
    let mut t = [[0f32; CHUNK]; POS];
    for r in 0..4 {
        let o = bt(&d[4 * r], &d[4 * r + 1], &d[4 * r + 2], &d[4 * r + 3]);
        t[4 * r..4 * r + 4].copy_from_slice(&o);
    }
    for c in 0..4 {
        let o = bt(&t[c], &t[4 + c], &t[8 + c], &t[12 + c]);
        for (r, row) in o.iter().enumerate() {
            v[4 * r + c] = *row;
        }
    }
}

/// What the output transform reads.
struct OutputCtx<'a, 'e, T> {
    tiling: &'a Tiling,
    cout: usize,
    epi: &'a ConvEpilogue<'e, T>,
    per_image: Option<&'a [f32]>,
    /// The products of the block, `[16][tile][Cout]` from tile row `r0`.
    m: &'a [f32],
    /// Rows of each position's products (the tiles padded to whole panels).
    tiles: usize,
    r0: usize,
}

dispatch!(transform_output_dispatch => transform_output(
    ctx: &OutputCtx<'_, '_, T>, rows: Range<usize>, out: &mut [T]));

/// `A^T M A` of the tiles of tile rows `rows` and the epilogue, into `out` (the output rows
/// those tile rows cover, whole).
#[inline(always)]
fn transform_output<T: Element>(ctx: &OutputCtx<'_, '_, T>, rows: Range<usize>, out: &mut [T]) {
    let OutputCtx {
        tiling,
        cout,
        epi,
        per_image,
        m,
        tiles,
        r0,
    } = *ctx;
    let (ow, oh) = (tiling.ow, tiling.oh);
    let out_row = ow * cout;
    let base_row = tiling.first_row(rows.start);
    let mut y = vec![0f32; 4 * cout];
    let mut tmp = vec![0f32; cout];
    let mut yq = [[0f32; CHUNK]; 4];
    for r in rows {
        let (image, ty) = (r / tiling.tiles_y, r % tiling.tiles_y);
        let gemm_epi = Epilogue {
            bias: match per_image {
                Some(table) => Some(&table[image * cout..(image + 1) * cout]),
                None => epi.bias,
            },
            scale: 1.0,
            activation: epi.activation,
            residual: None,
        };
        for tx in 0..tiling.tiles_x {
            let t = (r - r0) * tiling.tiles_x + tx;
            let mut c0 = 0;
            while c0 < cout {
                let n = CHUNK.min(cout - c0);
                let mq: [&[f32]; POS] =
                    std::array::from_fn(|p| &m[(p * tiles + t) * cout + c0..][..n]);
                output_tile(&mq, n, &mut yq);
                for (q, yv) in yq.iter().enumerate() {
                    y[q * cout + c0..][..n].copy_from_slice(&yv[..n]);
                }
                c0 += n;
            }
            for q in 0..4 {
                let (oy, ox) = (2 * ty + q / 2, 2 * tx + q % 2);
                if oy >= oh || ox >= ow {
                    continue;
                }
                let global_row = image * oh + oy;
                let at = (global_row - base_row) * out_row + ox * cout;
                let residual = epi.residual.map(|res| {
                    let rat = global_row * out_row + ox * cout;
                    &res[rat..rat + cout]
                });
                apply_row(
                    &y[q * cout..(q + 1) * cout],
                    None,
                    0,
                    0,
                    &gemm_epi,
                    residual,
                    &mut tmp,
                    &mut out[at..at + cout],
                );
            }
        }
    }
}

/// `A^T m A` for `n <= CHUNK` channels at once (`m` the 16 positions' products, `y` row-major
/// 2x2), with
/// `A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]`.
#[inline(always)]
fn output_tile(m: &[&[f32]; POS], n: usize, y: &mut [[f32; CHUNK]; 4]) {
    let mut s = [[0f32; CHUNK]; 8];
    for r in 0..4 {
        let (a, b, c, d) = (
            &m[4 * r][..n],
            &m[4 * r + 1][..n],
            &m[4 * r + 2][..n],
            &m[4 * r + 3][..n],
        );
        for l in 0..n {
            s[2 * r][l] = a[l] + b[l] + c[l];
            s[2 * r + 1][l] = b[l] - c[l] - d[l];
        }
    }
    for j in 0..2 {
        for l in 0..CHUNK {
            y[j][l] = s[j][l] + s[2 + j][l] + s[4 + j][l];
            y[2 + j][l] = s[2 + j][l] - s[4 + j][l] - s[6 + j][l];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::conv2d;

    /// The panel-to-panel f32 transform equals the f64 one within an f32 rounding of each
    /// transformed weight's magnitude (their sums have at most three terms and two halvings).
    #[test]
    fn f32_panel_transform_equals_reference() {
        let (cin, cout) = (7, 45);
        let w: Vec<f32> = (0..cout * cin * 9)
            .map(|i| ((i as u32).wrapping_mul(2654435761) >> 8) as f32 / (1u32 << 24) as f32 - 0.5)
            .collect();
        for isa in [Isa::Generic, Isa::Avx512] {
            let packed = crate::pack_conv_weight(&w, cout, cin, 3, isa, DType::F32).expect("packs");
            let fast = WinogradWeight::from_conv_weight(&packed, cin).expect("transforms");
            let slow = WinogradWeight::from_any_layout(&packed, cin).expect("transforms");
            for (f, s) in fast.u.iter().zip(&slow.u) {
                assert_eq!(
                    (f.k, f.kp, f.n, f.nr, f.panels),
                    (s.k, s.kp, s.n, s.nr, s.panels)
                );
                let (BData::F32(a), BData::F32(b)) = (&f.data, &s.data) else {
                    panic!("f32 packings")
                };
                for (x, y) in a.iter().zip(b) {
                    assert!(
                        (x - y).abs() <= 4.0 * f32::EPSILON * y.abs().max(1.0),
                        "{x} vs {y}"
                    );
                }
            }
        }
    }

    /// Blocks of one tile row (the last one partial, odd sizes) give the single block's
    /// output, and so does the direct convolution (within f32 rounding).
    #[test]
    fn blocks_of_one_tile_row_equal_one_block() {
        let (b, h, wd, cin, cout) = (2, 7, 9, 33, 40);
        let val = |n: usize, s: u32| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    ((i as u32).wrapping_mul(2654435761).wrapping_add(s) >> 8) as f32
                        / (1u32 << 24) as f32
                        - 0.5
                })
                .collect()
        };
        let x = val(b * h * wd * cin, 1);
        let w = val(cout * cin * 9, 2);
        let bias = val(cout, 3);
        let res = val(b * h * wd * cout, 4);
        let packed =
            crate::pack_conv_weight(&w, cout, cin, 3, Isa::Generic, DType::F32).expect("packs");
        let wino = WinogradWeight::from_conv_weight(&packed, cin).expect("transforms");
        let g = ConvGeometry {
            batch: b,
            in_h: h,
            in_w: wd,
            resize: None,
            kernel: 3,
            stride: 1,
            pad: [1; 4],
        };
        let epi = ConvEpilogue {
            bias: Some(&bias),
            residual: Some(&res[..]),
            ..ConvEpilogue::default()
        };
        let input = ConvInput {
            x: &x,
            channels: cin,
            concat: None,
        };
        let opts = GemmOptions {
            threads: Some(2),
            emulate: false,
        };
        let mut one = vec![0f32; res.len()];
        let mut rows = vec![0f32; res.len()];
        let mut direct = vec![0f32; res.len()];
        blocked(&opts, input, &g, &wino, &mut one, &epi, usize::MAX).expect("runs");
        blocked(&opts, input, &g, &wino, &mut rows, &epi, 1).expect("runs");
        conv2d(&opts, input, &g, &packed, &mut direct, &epi).expect("runs");
        assert_eq!(one, rows);
        let worst = one
            .iter()
            .zip(&direct)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "Winograd vs direct: {worst:e}");
    }
}
