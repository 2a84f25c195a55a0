//! Host buffers for the CPU kernels (fused MLP, convolution, GroupNorm): strided matrix products (the
//! `gemm` crate's AVX-512 kernels) and access to a tensor's values.

use candle_core::{CpuStorage, Layout, Tensor, WithDType};
use gemm::Parallelism;

use crate::precision::Precision;

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

    /// A general strided view starting at `offset`: element (i, j) at offset + i rs + j cs.
    pub(crate) fn strided(data: &'a [T], offset: usize, rs: usize, cs: usize) -> Self {
        Self {
            data: &data[offset..],
            cs: cs as isize,
            rs: rs as isize,
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

    /// Element (i, j).
    #[inline(always)]
    pub(crate) fn at(&self, i: usize, j: usize) -> T
    where
        T: Copy,
    {
        self.data[i * self.rs as usize + j * self.cs as usize]
    }

    /// The buffer and the strides of a row step and a column step.
    pub(crate) fn parts(&self) -> (&'a [T], usize, usize) {
        (self.data, self.rs as usize, self.cs as usize)
    }

    /// Whether an (m x n) view stays inside the buffer.
    pub(crate) fn fits(&self, m: usize, n: usize) -> bool {
        self.data.len() >= self.extent(m, n)
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

/// [`matmul`] of f32 views in `precision`: bf16 inputs with f32 accumulation where the CPU has the
/// units for it (`precision` resolved by [`Precision::on_this_cpu`]), else f32.
pub(crate) fn matmul_in(
    precision: Precision,
    dst: &mut [f32],
    dims: (usize, usize, usize),
    accumulate: bool,
    lhs: View<f32>,
    rhs: View<f32>,
    par: Parallelism,
) {
    match precision {
        Precision::Bf16 if super::bf16::available() => {
            super::bf16::matmul(dst, dims, accumulate, lhs, rhs, par)
        }
        _ => matmul(dst, dims, accumulate, lhs, rhs, par),
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

/// f on the values of a CPU tensor as T, read in place (copied only if not contiguous or not of type T).
/// Calls may nest (several tensors read at once): each holds a read lock on its tensor's storage, which
/// nothing writes while candle runs an op's forward or backward.
pub(crate) fn with_slice<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> R,
) -> candle_core::Result<R> {
    let t = t.to_dtype(T::DTYPE)?.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(s) => Ok(f(slice(s, layout)?)),
        _ => candle_core::bail!("the CPU kernels need tensors on the CPU"),
    }
}

/// A tensor's values as a contiguous host vector of T (converted from the tensor's dtype if it differs).
pub(crate) fn host<T: WithDType>(t: &Tensor) -> candle_core::Result<Vec<T>> {
    t.flatten_all()?.to_dtype(T::DTYPE)?.to_vec1::<T>()
}

/// f(i, chunk_i) for the chunks of `data` of `size` values each (the last may be shorter), run on candle's
/// CPU thread pool: the pool candle's own elementwise ops run on, so that ops written here and candle's
/// do not keep two sets of threads busy (spinning) on the same cores. Results come back in chunk order.
pub(crate) fn for_each_chunk<T: Send, R: Send>(
    data: &mut [T],
    size: usize,
    f: impl Fn(usize, &mut [T]) -> R + Sync,
) -> Vec<R> {
    // One lock per chunk (never contended: each index is handed out once) lets the pool's shared closure
    // write to disjoint chunks.
    let cells: Vec<std::sync::Mutex<(&mut [T], Option<R>)>> = data
        .chunks_mut(size.max(1))
        .map(|c| std::sync::Mutex::new((c, None)))
        .collect();
    candle_core::utils::barrier_pool().execute_chunked(cells.len(), |range| {
        for i in range {
            let mut cell = cells[i].lock().expect("a chunk's lock is never poisoned");
            let r = f(i, cell.0);
            cell.1 = Some(r);
        }
    });
    cells
        .into_iter()
        .map(|c| {
            c.into_inner()
                .expect("a chunk's lock is never poisoned")
                .1
                .expect("every chunk ran")
        })
        .collect()
}

/// A vector of `len` zeros, then f(i, chunk_i) on its chunks of `size` values as [`for_each_chunk`]
/// runs them. Each chunk is zeroed by the thread that runs f on it, just before: a fresh `vec![0; len]`
/// is zeroed (or page-faulted) by the calling thread alone, a serial pass over every op's output.
pub(crate) fn zeroed_by_chunks<T: WithDType, R: Send>(
    len: usize,
    size: usize,
    f: impl Fn(usize, &mut [T]) -> R + Sync,
) -> (Vec<T>, Vec<R>) {
    let mut v: Vec<T> = Vec::with_capacity(len);
    let results = for_each_chunk(&mut v.spare_capacity_mut()[..len], size, |i, chunk| {
        for x in chunk.iter_mut() {
            x.write(T::zero());
        }
        // SAFETY: every element of the chunk was initialised just above, and MaybeUninit<T> has the
        // layout of T.
        let chunk = unsafe { &mut *(chunk as *mut [std::mem::MaybeUninit<T>] as *mut [T]) };
        f(i, chunk)
    });
    // SAFETY: for_each_chunk ran the closure on every chunk (it panics otherwise, before this line), and
    // the chunks cover the first `len` elements, each initialised above.
    unsafe { v.set_len(len) };
    (v, results)
}

/// e^x for f32, vectorisable: range reduction x = n ln2 + r, a degree-6 polynomial for e^r, 2^n by
/// exponent bits. Relative error about 2e-7 on the clamped range [-87, 88].
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    // max/min rather than clamp: they map NaN to the bound, so the conversion below is always exact
    // (a NaN argument gives a finite value; callers that multiply by their input still propagate it).
    #[allow(clippy::manual_clamp)]
    let x = x.max(-87.0).min(88.0);
    // round(x / ln 2) by the 1.5 * 2^23 trick (round to nearest in the float add)
    let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67
                    + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    // SAFETY: after the bounds above (NaN included), n is a whole number in [-126, 127], so the
    // conversion is exact. (`as i32`
    // would be too, but its NaN and saturation handling stops the loop from vectorising.)
    let n = unsafe { n.to_int_unchecked::<i32>() };
    p * f32::from_bits(((n + 127) << 23) as u32)
}

/// Defines a function compiled three times (AVX-512, AVX2 + FMA, baseline) and dispatched at run time,
/// so that its loops vectorise for the CPU it runs on.
macro_rules! multiversion {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident : $ty:ty),*) $body:block) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn imp($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) { imp($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) { imp($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512dq") {
                    // SAFETY: the CPU supports the enabled features.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { v3($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use multiversion;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every chunk (the last one shorter) is handed to f once, and results come back in chunk order.
    #[test]
    fn for_each_chunk_visits_every_chunk_in_order() {
        let mut data = vec![0usize; 103];
        let out = for_each_chunk(&mut data, 10, |i, c| {
            c.iter_mut().for_each(|v| *v = i + 1);
            (i, c.len())
        });
        assert_eq!(out.len(), 11);
        assert!(out
            .iter()
            .enumerate()
            .all(|(k, &(i, n))| i == k && n == if k < 10 { 10 } else { 3 }));
        assert!(data.iter().enumerate().all(|(j, &v)| v == j / 10 + 1));
    }

    /// Every chunk starts as zeros, sees its own index, and the results come back in order; an empty
    /// length gives an empty vector.
    #[test]
    fn zeroed_by_chunks_starts_from_zeros() {
        let (v, out) = zeroed_by_chunks::<f32, _>(103, 10, |i, c| {
            let was_zero = c.iter().all(|&x| x == 0.0);
            c[0] = i as f32 + 1.0;
            (i, c.len(), was_zero)
        });
        assert_eq!(v.len(), 103);
        assert_eq!(out.len(), 11);
        for (k, &(i, n, was_zero)) in out.iter().enumerate() {
            assert!(i == k && n == if k < 10 { 10 } else { 3 } && was_zero);
        }
        for (j, &x) in v.iter().enumerate() {
            assert_eq!(
                x,
                if j % 10 == 0 {
                    (j / 10 + 1) as f32
                } else {
                    0.0
                }
            );
        }
        let (empty, none) = zeroed_by_chunks::<f64, _>(0, 4, |_, _| ());
        assert!(empty.is_empty() && none.is_empty());
    }

    #[test]
    fn fast_exp_is_accurate() {
        for i in -8700..8800 {
            let x = i as f32 * 0.01;
            let (a, b) = (exp_f32(x), x.exp());
            assert!(((a - b) / b).abs() < 1e-6, "exp({x}) = {a}, want {b}");
        }
        assert!(exp_f32(f32::NAN).is_finite() && exp_f32(1e30) > 1e38 && exp_f32(-1e30) < 1e-37);
    }
}
