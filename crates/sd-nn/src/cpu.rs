//! Borrowing the elements of CPU tensors for sd-kernels, and making tensors from its outputs.

use candle_core::{CpuStorage, DType, Storage, Tensor, WithDType};
use sd_core::Result;

/// A contiguous CPU tensor's elements, borrowed for as long as the view lives.
pub(crate) struct CpuView<'a> {
    /// candle's storage read guard (a parking_lot guard, held boxed).
    guard: Box<dyn std::ops::Deref<Target = Storage> + 'a>,
    start: usize,
    len: usize,
}

impl<'a> CpuView<'a> {
    /// Borrows `t`, which must be contiguous and on the CPU.
    pub(crate) fn new(t: &'a Tensor) -> Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        if !layout.is_contiguous() || !matches!(&*guard, Storage::Cpu(_)) {
            return Err(sd_core::Error::unsupported(
                "a CPU kernel called on a non-contiguous or non-CPU tensor",
            ));
        }
        Ok(Self {
            start: layout.start_offset(),
            len: t.elem_count(),
            guard: Box::new(guard),
        })
    }

    /// The elements as `T` (the tensor's own dtype).
    pub(crate) fn slice<T: WithDType>(&self) -> Result<&[T]> {
        let Storage::Cpu(cpu) = &**self.guard else {
            return Err(sd_core::Error::unsupported(
                "a CPU kernel on a non-CPU tensor",
            ));
        };
        let all: &[T] = <T as WithDType>::cpu_storage_as_slice(cpu)?;
        all.get(self.start..self.start + self.len).ok_or_else(|| {
            sd_core::Error::unsupported("a tensor whose storage is shorter than its layout")
        })
    }
}

/// Whether the CPU kernels take tensors of this dtype on this device.
pub(crate) fn kernel_dtype(t: &Tensor) -> Option<sd_kernels::DType> {
    if !t.device().is_cpu() {
        return None;
    }
    match t.dtype() {
        DType::F32 => Some(sd_kernels::DType::F32),
        DType::BF16 => Some(sd_kernels::DType::Bf16),
        _ => None,
    }
}

/// A CPU tensor's values as f32 (small vectors: biases, norm parameters).
pub(crate) fn f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// The storage of packed weights: its elements, whatever their dtype.
pub(crate) fn with_cpu_elems<R>(
    t: &Tensor,
    f32_fn: impl FnOnce(&[f32]) -> R,
    bf16_fn: impl FnOnce(&[half::bf16]) -> R,
) -> Result<Option<R>> {
    let (storage, layout) = t.storage_and_layout();
    if !layout.is_contiguous() {
        return Ok(None);
    }
    let Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let (start, n) = (layout.start_offset(), t.elem_count());
    Ok(match cpu {
        CpuStorage::F32(v) => v.get(start..start + n).map(f32_fn),
        CpuStorage::BF16(v) => v.get(start..start + n).map(bf16_fn),
        _ => None,
    })
}
