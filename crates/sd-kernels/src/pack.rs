//! `B` packed once (at model load) into the layout the chosen kernel reads.
//!
//! Layouts, all made of panels of `nr` columns, each panel holding the whole (padded) K:
//! - [`BLayout::F32`]: `[panel][k][nr]` f32, for the FMA kernels in f32;
//! - [`BLayout::Bf16`]: `[panel][k][nr]` bf16, widened in registers by the FMA kernels; within
//!   a row the two halves of the panel are interleaved (column `j` and column `j + nr/2` share
//!   a 32-bit word, see [`bf16_slot`]), so that a shift and a mask widen them;
//! - [`BLayout::Bf16Pairs`]: `[panel][k/2][nr][2]` bf16, the (k, k+1) pairs that `vdpbf16ps`
//!   and AMX's `tdpbf16ps` multiply; with `nr = 16` and K padded to 32, each 32-deep K block of a
//!   panel is exactly one AMX B tile (16 rows of 64 bytes).
//!
//! Columns past N and rows past K are zero. For the GEGLU epilogue the value and gate halves
//! are interleaved panel by panel (panel 2p holds value columns `p*nr..`, panel 2p+1 the gate
//! columns `N/2 + p*nr..`), so one output block sees both.

use half::bf16;

use crate::isa::Isa;
use crate::KernelError;

/// The element types the GEMM takes: A, B and C share one of them; accumulation is f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// f32 operands.
    F32,
    /// bf16 operands (f32 accumulation, output rounded to nearest even).
    Bf16,
}

/// How a [`PackedB`] is laid out (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BLayout {
    /// `[panel][k][nr]` f32.
    F32,
    /// `[panel][k][nr]` bf16.
    Bf16,
    /// `[panel][k/2][nr][2]` bf16.
    Bf16Pairs,
}

/// The storage of a packed matrix.
#[derive(Debug, Clone)]
pub(crate) enum BData {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

/// A `K x N` right-hand matrix packed for one kernel path.
#[derive(Debug, Clone)]
pub struct PackedB {
    pub(crate) isa: Isa,
    pub(crate) dtype: DType,
    pub(crate) layout: BLayout,
    /// Columns per panel.
    pub(crate) nr: usize,
    pub(crate) k: usize,
    /// K rounded up to what the kernel steps by (1, 2 or 32).
    pub(crate) kp: usize,
    /// Logical columns of the product (before GEGLU halves them).
    pub(crate) n: usize,
    /// Panels stored (value/gate panels counted separately).
    pub(crate) panels: usize,
    pub(crate) geglu: bool,
    pub(crate) data: BData,
}

/// The packing of one (isa, dtype) pair: layout, panel width, K granularity, and the column
/// count the stored panels are padded to (the micro-tile width: AMX reads two panels).
pub(crate) fn layout_for(isa: Isa, dtype: DType) -> (BLayout, usize, usize, usize) {
    match (isa, dtype) {
        (Isa::Generic | Isa::Avx2, DType::F32) => (BLayout::F32, 16, 1, 16),
        (Isa::Generic | Isa::Avx2, DType::Bf16) => (BLayout::Bf16, 16, 1, 16),
        (Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx, DType::F32) => (BLayout::F32, 32, 1, 32),
        (Isa::Avx512, DType::Bf16) => (BLayout::Bf16, 32, 1, 32),
        (Isa::Avx512Bf16, DType::Bf16) => (BLayout::Bf16Pairs, 32, 2, 32),
        (Isa::Amx, DType::Bf16) => (BLayout::Bf16Pairs, 16, 32, 32),
    }
}

/// Where column `j` of an `nr`-column [`BLayout::Bf16`] panel row is stored: columns `j` and
/// `j + nr/2` (`j < nr/2`) are the low and high halves of word `j`.
#[inline(always)]
pub(crate) fn bf16_slot(j: usize, nr: usize) -> usize {
    let half = nr / 2;
    if j < half {
        2 * j
    } else {
        2 * (j - half) + 1
    }
}

/// A read-only view of the unpacked right-hand matrix: element `(k, n)` is
/// `data[k * stride_k + n * stride_n]`.
#[derive(Debug, Clone, Copy)]
pub struct BSource<'a, T> {
    /// The elements.
    pub data: &'a [T],
    /// K (rows of B).
    pub k: usize,
    /// N (columns of B).
    pub n: usize,
    /// Distance between consecutive k.
    pub stride_k: usize,
    /// Distance between consecutive n.
    pub stride_n: usize,
}

impl<'a, T> BSource<'a, T> {
    /// A torch `nn.Linear` weight `[out = N, in = K]`, row-major: `B = W^T`.
    pub fn linear_weight(data: &'a [T], out_features: usize, in_features: usize) -> Self {
        Self {
            data,
            k: in_features,
            n: out_features,
            stride_k: 1,
            stride_n: in_features,
        }
    }

    fn check(&self) -> Result<(), KernelError> {
        if self.k == 0 || self.n == 0 {
            return Err(KernelError::new(format!(
                "B is {}x{}; expected at least one row and one column",
                self.k, self.n
            )));
        }
        let last = (self.k - 1)
            .checked_mul(self.stride_k)
            .and_then(|a| (self.n - 1).checked_mul(self.stride_n).map(|b| (a, b)))
            .and_then(|(a, b)| a.checked_add(b));
        match last {
            Some(last) if last < self.data.len() => Ok(()),
            _ => Err(KernelError::new(format!(
                "B view {}x{} with strides ({}, {}) needs more than the {} elements given",
                self.k,
                self.n,
                self.stride_k,
                self.stride_n,
                self.data.len()
            ))),
        }
    }
}

/// Something B can be packed from: f32 or bf16.
pub trait PackSource: Copy {
    /// The value as f32 (exact for bf16).
    fn to_f32(self) -> f32;
    /// The value as bf16 bits (rounded to nearest even from f32).
    fn to_bf16_bits(self) -> u16;
}

impl PackSource for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn to_bf16_bits(self) -> u16 {
        bf16::from_f32(self).to_bits()
    }
}

impl PackSource for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn to_bf16_bits(self) -> u16 {
        self.to_bits()
    }
}

impl PackedB {
    /// Packs `src` for the kernels of `isa` computing in `dtype`. With `geglu`, N must be even:
    /// the product's first half is the value, the second the gate (diffusers' `GEGLU`).
    pub fn pack<T: PackSource>(
        src: BSource<'_, T>,
        isa: Isa,
        dtype: DType,
        geglu: bool,
    ) -> Result<PackedB, KernelError> {
        src.check()?;
        if geglu && !src.n.is_multiple_of(2) {
            return Err(KernelError::new(format!(
                "a GEGLU projection needs an even number of columns, got {}",
                src.n
            )));
        }
        let (layout, nr, kstep, col_align) = layout_for(isa, dtype);
        let kp = src.k.div_ceil(kstep) * kstep;
        // Logical column of each stored column (None = zero padding).
        let columns: Vec<Option<usize>> = if geglu {
            let half = src.n / 2;
            let pairs = half.div_ceil(nr);
            let mut cols = Vec::with_capacity(pairs * 2 * nr);
            for p in 0..pairs {
                for base in [0, half] {
                    cols.extend((p * nr..(p + 1) * nr).map(|c| (c < half).then_some(base + c)));
                }
            }
            cols
        } else {
            (0..src.n.div_ceil(col_align) * col_align)
                .map(|c| (c < src.n).then_some(c))
                .collect()
        };
        let panels = columns.len() / nr;
        let at = |k: usize, c: Option<usize>| -> Option<T> {
            match c {
                Some(n) if k < src.k => Some(src.data[k * src.stride_k + n * src.stride_n]),
                _ => None,
            }
        };
        let total = panels * kp * nr;
        let data = match layout {
            BLayout::F32 => {
                let mut out = vec![0f32; total];
                for p in 0..panels {
                    for k in 0..src.k {
                        for j in 0..nr {
                            if let Some(v) = at(k, columns[p * nr + j]) {
                                out[(p * kp + k) * nr + j] = v.to_f32();
                            }
                        }
                    }
                }
                BData::F32(out)
            }
            BLayout::Bf16 => {
                let mut out = vec![0u16; total];
                for p in 0..panels {
                    for k in 0..src.k {
                        for j in 0..nr {
                            if let Some(v) = at(k, columns[p * nr + j]) {
                                out[(p * kp + k) * nr + bf16_slot(j, nr)] = v.to_bf16_bits();
                            }
                        }
                    }
                }
                BData::Bf16(out)
            }
            BLayout::Bf16Pairs => {
                let mut out = vec![0u16; total];
                for p in 0..panels {
                    for k in 0..src.k {
                        for j in 0..nr {
                            if let Some(v) = at(k, columns[p * nr + j]) {
                                out[p * kp * nr + ((k / 2) * nr + j) * 2 + k % 2] =
                                    v.to_bf16_bits();
                            }
                        }
                    }
                }
                BData::Bf16(out)
            }
        };
        Ok(PackedB {
            isa,
            dtype,
            layout,
            nr,
            k: src.k,
            kp,
            n: src.n,
            panels,
            geglu,
            data,
        })
    }

    /// K (the reduced dimension).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns of the output: N, or N/2 for a GEGLU projection.
    pub fn out_columns(&self) -> usize {
        if self.geglu {
            self.n / 2
        } else {
            self.n
        }
    }

    /// The kernel path it was packed for.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// The layout of the packed data.
    pub fn layout(&self) -> BLayout {
        self.layout
    }

    /// The operand type it computes in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Whether the GEGLU epilogue is built in.
    pub fn is_geglu(&self) -> bool {
        self.geglu
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.data {
            BData::F32(v) => v.len() * 4,
            BData::Bf16(v) => v.len() * 2,
        }
    }

    /// Element `(k, n)` of the matrix that was packed (as stored: bf16 layouts hold it
    /// rounded). Not for GEGLU packings (`None`), nor outside `K x N`.
    pub(crate) fn get(&self, k: usize, n: usize) -> Option<f32> {
        if self.geglu || k >= self.k || n >= self.n {
            return None;
        }
        let (p, j) = (n / self.nr, n % self.nr);
        match (&self.data, self.layout) {
            (BData::F32(v), _) => v.get((p * self.kp + k) * self.nr + j).copied(),
            (BData::Bf16(v), BLayout::Bf16) => v
                .get((p * self.kp + k) * self.nr + bf16_slot(j, self.nr))
                .map(|b| bf16::from_bits(*b).to_f32()),
            (BData::Bf16(v), _) => v
                .get(p * self.kp * self.nr + ((k / 2) * self.nr + j) * 2 + k % 2)
                .map(|b| bf16::from_bits(*b).to_f32()),
        }
    }

    /// Stored columns (panels x nr, value and gate panels both counted).
    pub(crate) fn stored_columns(&self) -> usize {
        self.panels * self.nr
    }

    /// The logical output column of stored column `c`, or `None` for padding (and, with
    /// GEGLU, for gate columns, which the epilogue reads next to their value column).
    pub(crate) fn output_column(&self, c: usize) -> Option<usize> {
        if self.geglu {
            let pair = c / (2 * self.nr);
            let within = c % (2 * self.nr);
            let col = pair * self.nr + within;
            (within < self.nr && col < self.n / 2).then_some(col)
        } else {
            (c < self.n).then_some(c)
        }
    }
}
