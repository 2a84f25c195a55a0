//! Host buffers for the CPU kernels (fused MLP, convolution, GroupNorm): strided matrix products (the
//! `gemm` crate's AVX-512 kernels) and access to a tensor's values.

use candle_core::{CpuStorage, Layout, Tensor, WithDType};
use gemm::Parallelism;

/// A read-only matrix view over a row-major buffer: the matrix itself or its transpose.
#[derive(Clone, Copy)]
pub(crate) struct View<'a, T> {
    data: &'a [T],
    /// Strides of one column step and one row step of the viewed matrix.
    cs: isize,
    rs: isize,
}

impl<'a, T> View<'a, T> {
    /// The row-major matrix with `cols` columns stored in `data`.
    pub(crate) fn rows(data: &'a [T], cols: usize) -> Self {
        Self {
            data,
            cs: 1,
            rs: cols as isize,
        }
    }

    /// The transpose of that matrix.
    pub(crate) fn transposed(data: &'a [T], cols: usize) -> Self {
        Self {
            data,
            cs: cols as isize,
            rs: 1,
        }
    }

    /// Highest index touched by an (m x n) view.
    fn extent(&self, m: usize, n: usize) -> usize {
        (m.max(1) - 1) * self.rs as usize + (n.max(1) - 1) * self.cs as usize + 1
    }
}

/// dst (m x n, row-major) = lhs (m x k) rhs (k x n), added to dst's current values if `accumulate`.
/// `T` is f32 or f64 (the types the kernels exist for).
pub(crate) fn matmul<T: WithDType>(
    dst: &mut [T],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    lhs: View<T>,
    rhs: View<T>,
    par: Parallelism,
) {
    assert!(
        matches!(T::DTYPE, candle_core::DType::F32 | candle_core::DType::F64)
            && dst.len() >= m * n
            && lhs.data.len() >= lhs.extent(m, k)
            && rhs.data.len() >= rhs.extent(k, n)
    );
    // SAFETY: the assertion above keeps every access of the three strided views inside its slice, and
    // T is one of the kernels' types.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs,
            lhs.rs,
            rhs.data.as_ptr(),
            rhs.cs,
            rhs.rs,
            if accumulate { T::one() } else { T::zero() },
            T::one(),
            false,
            false,
            false,
            par,
        );
    }
}

/// The values of a contiguous tensor (each op makes its inputs contiguous before it runs).
pub(crate) fn slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("the CPU kernels need contiguous inputs"),
    }
}

/// A tensor's values as a host vector of T, contiguous.
pub(crate) fn host<T: WithDType>(t: &Tensor) -> candle_core::Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}
