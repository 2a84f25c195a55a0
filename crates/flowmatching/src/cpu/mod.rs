//! CPU kernels behind the engine: matrix products on host buffers, the convolution, GroupNorm (+ SiLU)
//! and nearest 2x upsampling as candle ops with their own backward. Private to the crate: layers pick
//! them when a tensor lives on the CPU ([`supports`]); users reach them only through `nn`.

pub(crate) mod bf16;
pub(crate) mod conv;
pub(crate) mod linalg;
pub(crate) mod norm;
pub(crate) mod upsample;

use candle_core::Tensor;

/// Whether the CPU kernels take `x`: f32 or f64 on the CPU (other dtypes and devices use candle ops).
pub(crate) fn supports(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
}
