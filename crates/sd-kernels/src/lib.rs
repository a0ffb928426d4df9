//! CPU kernels for sd-rs on plain slices: ISA detection and run-time dispatch ([`isa`]), a
//! GEMM whose right-hand side is packed once ([`PackedB`], [`gemm`]) with fused epilogues
//! (bias, scale, SiLU / GELU / quick-GELU / GEGLU, residual add, bf16 rounding), convolutions
//! on it (implicit GEMM, [`conv2d`]; Winograd F(2x2, 3x3) for large images,
//! [`conv2d_winograd`]), and vectorized bf16 <-> f32 conversion ([`convert`]).
//!
//! This crate knows no model and no tensor library: sd-nn glues it to candle.
//!
//! ```
//! use sd_kernels::{gemm, AMatrix, BSource, DType, Epilogue, Isa, PackedB};
//! // y = x W^T + b for a torch Linear with W [3, 2].
//! let w = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
//! let packed = PackedB::pack(BSource::linear_weight(&w, 3, 2), Isa::current(), DType::F32, false)?;
//! let x = [1.0f32, 1.0];
//! let bias = [0.5f32, 0.5, 0.5];
//! let mut y = [0f32; 3];
//! let epi = Epilogue { bias: Some(&bias), ..Epilogue::default() };
//! gemm(AMatrix { data: &x, rows: 1, stride: 2 }, &packed, &mut y, 3, &epi)?;
//! assert_eq!(y, [3.5, 7.5, 11.5]);
//! # Ok::<(), sd_kernels::KernelError>(())
//! ```
#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]

mod attention;
mod conv;
pub mod convert;
mod epilogue;
mod gemm;
pub mod isa;
mod kernels;
pub mod math;
mod norm;
mod pack;
mod simd;
mod winograd;

pub use attention::{attention, AttentionParams, AttentionShape};
pub use conv::{conv2d, pack_conv_weight, ConvEpilogue, ConvGeometry, ConvInput};
pub use epilogue::{Activation, Element, Epilogue};
pub use gemm::{default_threads, gemm, gemm_with, AMatrix, GemmOptions};
pub use isa::Isa;
pub use norm::{group_norm, GroupNormParams};
pub use pack::{BLayout, BSource, DType, PackSource, PackedB};
pub use winograd::{conv2d_winograd, winograd_applies, winograd_pays, WinogradWeight};

/// A kernel call that cannot run: shapes, lengths or types that do not fit, or a path the host
/// lacks. The message says what was given and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelError(String);

impl KernelError {
    pub(crate) fn new(msg: impl Into<String>) -> Self {
        KernelError(msg.into())
    }
}

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KernelError {}
