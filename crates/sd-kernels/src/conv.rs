//! 2-D convolution of channels-last (NHWC) activations as an implicit GEMM on the packed core.
//!
//! Output pixel `(oy, ox)` of one image is row `oy * out_w + ox` of A; its K = `k * k * Cin`
//! elements are the input pixels under the kernel window, tap by tap (`ky`, `kx`), each tap a
//! contiguous run of channels. The packing of each row block gathers them straight from the
//! input (zeros for the padding), so there is no im2col buffer; B is the weight permuted to
//! `[Cout, k, k, Cin]` and packed once ([`pack_conv_weight`]). The same gather fuses:
//! - a nearest-neighbour resize of the input ([`ConvGeometry::resize`]: diffusers'
//!   `Upsample2D`, torch's `interpolate(mode="nearest")`, source index `floor(i * in / out)`);
//! - the channel concatenation of two inputs ([`ConvInput::concat`]: the UNet's skip
//!   connections);
//! - asymmetric zero padding and any stride (the VAE encoder's right/bottom-padded downsampler).
//!
//! The epilogue adds the bias, a per-image bias (the ResNet's projected time embedding), an
//! activation and a residual, as the GEMM's.

use crate::epilogue::{Activation, Element, Epilogue};
use crate::gemm::{gemm_rows, ARows, GemmOptions, RowBias};
use crate::isa::Isa;
use crate::pack::{BSource, DType, PackSource, PackedB};
use crate::KernelError;

/// The shape of a convolution (square kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Images.
    pub batch: usize,
    /// Height of the stored input.
    pub in_h: usize,
    /// Width of the stored input.
    pub in_w: usize,
    /// Resize the input to `(height, width)` by nearest neighbour before the convolution.
    pub resize: Option<(usize, usize)>,
    /// Kernel side.
    pub kernel: usize,
    /// Stride (both directions).
    pub stride: usize,
    /// Zero padding: top, left, bottom, right.
    pub pad: [usize; 4],
}

impl ConvGeometry {
    /// The input size the kernel window slides over (after the resize).
    pub fn virtual_input(&self) -> (usize, usize) {
        self.resize.unwrap_or((self.in_h, self.in_w))
    }

    /// `(out_h, out_w)`, or an error for a window larger than the padded input or a zero
    /// kernel/stride.
    pub fn out_size(&self) -> Result<(usize, usize), KernelError> {
        if self.kernel == 0 || self.stride == 0 {
            return Err(KernelError::new(format!(
                "convolution with kernel {} and stride {}: both must be at least 1",
                self.kernel, self.stride
            )));
        }
        let (vh, vw) = self.virtual_input();
        let [pt, pl, pb, pr] = self.pad;
        let (ph, pw) = (vh + pt + pb, vw + pl + pr);
        if ph < self.kernel || pw < self.kernel {
            return Err(KernelError::new(format!(
                "a {k}x{k} kernel does not fit the padded {ph}x{pw} input",
                k = self.kernel
            )));
        }
        Ok((
            (ph - self.kernel) / self.stride + 1,
            (pw - self.kernel) / self.stride + 1,
        ))
    }
}

/// The input activations: `[batch, in_h, in_w, channels]`, and optionally a second tensor of
/// the same height and width concatenated after it along channels.
#[derive(Debug, Clone, Copy)]
pub struct ConvInput<'a, T> {
    /// The first (or only) input.
    pub x: &'a [T],
    /// Its channels.
    pub channels: usize,
    /// A second input and its channels, concatenated after `x`.
    pub concat: Option<(&'a [T], usize)>,
}

impl<T> ConvInput<'_, T> {
    pub(crate) fn total_channels(&self) -> usize {
        self.channels + self.concat.map_or(0, |(_, c)| c)
    }
}

/// What happens after the product: `act(acc + bias + batch_bias[image]) + residual`.
#[derive(Debug, Clone, Copy)]
pub struct ConvEpilogue<'a, T> {
    /// Per output channel.
    pub bias: Option<&'a [f32]>,
    /// Per image and output channel, `[batch, Cout]`.
    pub batch_bias: Option<&'a [f32]>,
    /// Applied after the biases.
    pub activation: Activation,
    /// Added last, `[batch, out_h, out_w, Cout]`.
    pub residual: Option<&'a [T]>,
}

impl<T> Default for ConvEpilogue<'_, T> {
    fn default() -> Self {
        Self {
            bias: None,
            batch_bias: None,
            activation: Activation::Identity,
            residual: None,
        }
    }
}

/// Packs a torch convolution weight `[Cout, Cin, k, k]` (row-major) as the B of the implicit
/// GEMM: K ordered `(ky, kx, c)`.
pub fn pack_conv_weight<T: PackSource>(
    weight: &[T],
    out_channels: usize,
    in_channels: usize,
    kernel: usize,
    isa: Isa,
    dtype: DType,
) -> Result<PackedB, KernelError> {
    let taps = kernel * kernel;
    let k = taps
        .checked_mul(in_channels)
        .filter(|k| out_channels.checked_mul(*k) == Some(weight.len()))
        .ok_or_else(|| {
            KernelError::new(format!(
                "a [{out_channels}, {in_channels}, {kernel}, {kernel}] convolution weight needs \
                 {} elements, got {}",
                out_channels
                    .saturating_mul(in_channels)
                    .saturating_mul(taps),
                weight.len()
            ))
        })?;
    let mut permuted = Vec::with_capacity(weight.len());
    for o in 0..out_channels {
        let w = &weight[o * k..][..k];
        for t in 0..taps {
            permuted.extend((0..in_channels).map(|c| w[c * taps + t]));
        }
    }
    PackedB::pack(
        BSource::linear_weight(&permuted, out_channels, k),
        isa,
        dtype,
        false,
    )
}

/// The implicit A of the batch: row `m` is output pixel `m % out_pixels` of image
/// `m / out_pixels`.
struct ConvRows<'a, T> {
    x: &'a [T],
    c1: usize,
    x2: Option<&'a [T]>,
    c2: usize,
    in_w: usize,
    /// Pixels of one stored input image.
    in_pixels: usize,
    /// Pixels of one output image.
    out_pixels: usize,
    /// Source row / column of each row / column of the (resized) input.
    src_y: &'a [usize],
    src_x: &'a [usize],
    kernel: usize,
    stride: usize,
    pad_t: usize,
    pad_l: usize,
    out_w: usize,
    rows: usize,
}

impl<T: Element> ARows<T> for ConvRows<'_, T> {
    fn rows(&self) -> usize {
        self.rows
    }

    #[inline]
    fn row<'s>(&'s self, m: usize, buf: &'s mut [T]) -> &'s [T] {
        let cin = self.c1 + self.c2;
        let (image, p) = (m / self.out_pixels, m % self.out_pixels);
        let (oy, ox) = (p / self.out_w, p % self.out_w);
        let k = self.kernel;
        debug_assert_eq!(buf.len(), k * k * cin);
        for ky in 0..k {
            let iy = (oy * self.stride + ky).checked_sub(self.pad_t);
            let sy = iy.and_then(|iy| self.src_y.get(iy).copied());
            for kx in 0..k {
                let seg = &mut buf[(ky * k + kx) * cin..][..cin];
                let ix = (ox * self.stride + kx).checked_sub(self.pad_l);
                let sx = ix.and_then(|ix| self.src_x.get(ix).copied());
                match (sy, sx) {
                    (Some(sy), Some(sx)) => {
                        let pix = image * self.in_pixels + sy * self.in_w + sx;
                        seg[..self.c1].copy_from_slice(&self.x[pix * self.c1..][..self.c1]);
                        if let Some(x2) = self.x2 {
                            seg[self.c1..].copy_from_slice(&x2[pix * self.c2..][..self.c2]);
                        }
                    }
                    _ => seg.fill(T::ZERO),
                }
            }
        }
        buf
    }

    fn runs(&self, k: usize) -> Option<Vec<(usize, usize)>> {
        let cin = self.c1 + self.c2;
        debug_assert_eq!(k, self.kernel * self.kernel * cin);
        let mut runs = Vec::with_capacity(2 * self.kernel * self.kernel);
        for tap in 0..self.kernel * self.kernel {
            runs.push((tap * cin, self.c1));
            if self.x2.is_some() {
                runs.push((tap * cin + self.c1, self.c2));
            }
        }
        Some(runs)
    }

    fn row_runs<'s>(&'s self, m: usize, out: &mut [Option<&'s [T]>]) {
        let (image, p) = (m / self.out_pixels, m % self.out_pixels);
        let (oy, ox) = (p / self.out_w, p % self.out_w);
        let parts = if self.x2.is_some() { 2 } else { 1 };
        for (tap, runs) in out.chunks_exact_mut(parts).enumerate() {
            let (ky, kx) = (tap / self.kernel, tap % self.kernel);
            let sy = (oy * self.stride + ky)
                .checked_sub(self.pad_t)
                .and_then(|iy| self.src_y.get(iy));
            let sx = (ox * self.stride + kx)
                .checked_sub(self.pad_l)
                .and_then(|ix| self.src_x.get(ix));
            let pix = match (sy, sx) {
                (Some(sy), Some(sx)) => Some(image * self.in_pixels + sy * self.in_w + sx),
                _ => None,
            };
            runs[0] = pix.and_then(|p| self.x.get(p * self.c1..));
            if let (Some(run), Some(x2)) = (runs.get_mut(1), self.x2) {
                *run = pix.and_then(|p| x2.get(p * self.c2..));
            }
        }
    }
}

/// `out = epilogue(conv(x, w))`, all channels-last: x `[batch, in_h, in_w, Cin]` (plus the
/// concatenated input), out and residual `[batch, out_h, out_w, Cout]`. `w` comes from
/// [`pack_conv_weight`] with `Cin` = the total input channels.
pub fn conv2d<T: Element>(
    opts: &GemmOptions,
    x: ConvInput<'_, T>,
    g: &ConvGeometry,
    w: &PackedB,
    out: &mut [T],
    epi: &ConvEpilogue<'_, T>,
) -> Result<(), KernelError> {
    let cin = x.total_channels();
    let cout = w.out_columns();
    if w.is_geglu() {
        return Err(KernelError::new(
            "a convolution weight cannot be packed for GEGLU",
        ));
    }
    if g.kernel
        .checked_mul(g.kernel)
        .and_then(|t| t.checked_mul(cin))
        != Some(w.k())
    {
        return Err(KernelError::new(format!(
            "the packed weight has K = {}, but a {k}x{k} kernel over {cin} input channels needs {}",
            w.k(),
            g.kernel.saturating_mul(g.kernel).saturating_mul(cin),
            k = g.kernel
        )));
    }
    let (oh, ow) = check_operands(&x, g, cout, out.len(), epi)?;
    let (vh, vw) = g.virtual_input();
    let src_y: Vec<usize> = (0..vh).map(|i| i * g.in_h / vh).collect();
    let src_x: Vec<usize> = (0..vw).map(|i| i * g.in_w / vw).collect();
    // One product over the whole batch, so that the weights are streamed once (at the
    // 8x8 and 16x16 levels of a UNet they are most of the memory traffic); the per-image
    // bias (the ResNet's time embedding) goes in per row group.
    let rows = ConvRows {
        x: x.x,
        c1: x.channels,
        x2: x.concat.map(|(x2, _)| x2),
        c2: x.concat.map_or(0, |(_, c2)| c2),
        in_w: g.in_w,
        in_pixels: g.in_h * g.in_w,
        out_pixels: oh * ow,
        src_y: &src_y,
        src_x: &src_x,
        kernel: g.kernel,
        stride: g.stride,
        pad_t: g.pad[0],
        pad_l: g.pad[1],
        out_w: ow,
        rows: g.batch * oh * ow,
    };
    let per_image = per_image_bias(epi, cout);
    let gemm_epi = Epilogue {
        bias: if per_image.is_some() { None } else { epi.bias },
        scale: 1.0,
        activation: epi.activation,
        residual: epi.residual.map(|r| (r, cout)),
    };
    let row_bias = per_image.as_deref().map(|table| RowBias {
        table,
        rows_per_group: oh * ow,
    });
    gemm_rows(opts, &rows, w, out, cout, &gemm_epi, row_bias)?;
    Ok(())
}

/// Checks the operands of a convolution with `cout` output channels against its geometry
/// (input and concatenated input, output, residual, per-image bias, bias, a non-empty image)
/// and returns the output size.
pub(crate) fn check_operands<T>(
    x: &ConvInput<'_, T>,
    g: &ConvGeometry,
    cout: usize,
    given_out: usize,
    epi: &ConvEpilogue<'_, T>,
) -> Result<(usize, usize), KernelError> {
    let (oh, ow) = g.out_size()?;
    let in_pixels = g.in_h.checked_mul(g.in_w);
    let len_ok = |len: usize, c: usize| {
        in_pixels
            .and_then(|p| p.checked_mul(c))
            .and_then(|p| p.checked_mul(g.batch))
            == Some(len)
    };
    if !len_ok(x.x.len(), x.channels) {
        return Err(KernelError::new(format!(
            "input has {} elements, expected [{}, {}, {}, {}]",
            x.x.len(),
            g.batch,
            g.in_h,
            g.in_w,
            x.channels
        )));
    }
    if let Some((x2, c2)) = x.concat {
        if !len_ok(x2.len(), c2) {
            return Err(KernelError::new(format!(
                "concatenated input has {} elements, expected [{}, {}, {}, {c2}]",
                x2.len(),
                g.batch,
                g.in_h,
                g.in_w
            )));
        }
    }
    let out_image = oh * ow * cout;
    let out_len = g.batch.checked_mul(out_image);
    if out_len != Some(given_out) {
        return Err(KernelError::new(format!(
            "output has {} elements, expected [{}, {oh}, {ow}, {cout}]",
            given_out, g.batch
        )));
    }
    if let Some(r) = epi.residual {
        if Some(r.len()) != out_len {
            return Err(KernelError::new(format!(
                "residual has {} elements, expected [{}, {oh}, {ow}, {cout}]",
                r.len(),
                g.batch
            )));
        }
    }
    if let Some(bb) = epi.batch_bias {
        if Some(bb.len()) != g.batch.checked_mul(cout) {
            return Err(KernelError::new(format!(
                "per-image bias has {} values, expected [{}, {cout}]",
                bb.len(),
                g.batch
            )));
        }
    }
    let (vh, vw) = g.virtual_input();
    if (vh == 0 || vw == 0 || g.in_h == 0 || g.in_w == 0) && g.batch > 0 {
        return Err(KernelError::new("convolution over an empty image"));
    }
    if let Some(b) = epi.bias {
        if b.len() != cout {
            return Err(KernelError::new(format!(
                "bias has {} values, expected {cout}",
                b.len()
            )));
        }
    }
    Ok((oh, ow))
}

/// The bias of each image, `[batch, Cout]`: the per-image bias plus the bias (`None` without a
/// per-image bias: the bias alone applies).
pub(crate) fn per_image_bias<T>(epi: &ConvEpilogue<'_, T>, cout: usize) -> Option<Vec<f32>> {
    epi.batch_bias.map(|bb| {
        let mut table = bb.to_vec();
        if let Some(b0) = epi.bias {
            for row in table.chunks_exact_mut(cout) {
                row.iter_mut().zip(b0).for_each(|(o, v)| *o += *v);
            }
        }
        table
    })
}
