//! Nearest-neighbour 2x upsampling of (N, C, H, W): `y[n, c, 2i + a, 2j + b] = x[n, c, i, j]` for
//! a, b in {0, 1}; its gradient sums each 2x2 block of dy.
//!
//! Not candle's `upsample_nearest2d`, whose backward candle runs as a grouped convolution (one kernel per
//! channel on a GPU). Elsewhere than the CPU it is a broadcast copy, whose backward is one sum; on the CPU
//! candle runs that sum over strided dimensions element by element (about 6% of the tiny U-Net's step),
//! so there it is one op with its own backward: a copy of rows forward, one pass over dy backward.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, WithDType};

use super::linalg::{slice, with_slice, zeroed_by_chunks};
use crate::error::Result;

/// Nearest-neighbour 2x upsampling of x (N, C, H, W) to (N, C, 2H, 2W).
pub(crate) fn upsample2x(x: &Tensor) -> Result<Tensor> {
    x.dims4()?;
    if super::supports(x) && x.elem_count() > 0 {
        return Ok(x.contiguous()?.apply_op1(Upsample2x)?);
    }
    upsample2x_broadcast(x)
}

/// The same as a broadcast copy of candle ops (any device; the reference in tests).
pub(crate) fn upsample2x_broadcast(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    Ok(x.reshape((n, c, h, 1, w, 1))?
        .broadcast_as((n, c, h, 2, w, 2))?
        .contiguous()?
        .reshape((n, c, 2 * h, 2 * w))?)
}

/// About this many output values per parallel chunk (whole planes).
const CHUNK: usize = 1 << 16;

struct Upsample2x;

impl Upsample2x {
    /// y (planes x 2H x 2W) from x (planes x H x W).
    fn forward<T: WithDType>(x: &[T], h: usize, w: usize) -> Vec<T> {
        let plane = h * w;
        let per = (CHUNK / (4 * plane)).max(1);
        let (y, _) = zeroed_by_chunks(4 * x.len(), per * 4 * plane, |i, chunk| {
            for (p, yp) in chunk.chunks_exact_mut(4 * plane).enumerate() {
                let xp = &x[(i * per + p) * plane..][..plane];
                for (row, out) in xp.chunks_exact(w).zip(yp.chunks_exact_mut(4 * w)) {
                    let (top, bottom) = out.split_at_mut(2 * w);
                    for (pair, &v) in top.chunks_exact_mut(2).zip(row) {
                        pair[0] = v;
                        pair[1] = v;
                    }
                    bottom.copy_from_slice(top);
                }
            }
        });
        y
    }

    /// dx (planes x H x W) from dy (planes x 2H x 2W): the sum of each 2x2 block.
    fn backward<T: WithDType>(dy: &[T], h: usize, w: usize) -> Vec<T> {
        let plane = h * w;
        let per = (CHUNK / (4 * plane)).max(1);
        let (dx, _) = zeroed_by_chunks(dy.len() / 4, per * plane, |i, chunk| {
            for (p, dxp) in chunk.chunks_exact_mut(plane).enumerate() {
                let dyp = &dy[(i * per + p) * 4 * plane..][..4 * plane];
                for (out, rows) in dxp.chunks_exact_mut(w).zip(dyp.chunks_exact(4 * w)) {
                    let (top, bottom) = rows.split_at(2 * w);
                    for ((o, t), b) in out
                        .iter_mut()
                        .zip(top.chunks_exact(2))
                        .zip(bottom.chunks_exact(2))
                    {
                        *o = (t[0] + t[1]) + (b[0] + b[1]);
                    }
                }
            }
        });
        dx
    }
}

impl CustomOp1 for Upsample2x {
    fn name(&self) -> &'static str {
        "upsample-nearest-2x-cpu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let y = match s {
            CpuStorage::F32(_) => CpuStorage::F32(Self::forward::<f32>(slice(s, l)?, h, w)),
            CpuStorage::F64(_) => CpuStorage::F64(Self::forward::<f64>(slice(s, l)?, h, w)),
            _ => candle_core::bail!("the CPU upsampling takes f32 or f64"),
        };
        Ok((y, Shape::from((n, c, 2 * h, 2 * w))))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (_, _, h, w) = x.dims4()?;
        let dx = match x.dtype() {
            DType::F32 => Tensor::from_vec(
                with_slice(dy, |dy| Self::backward::<f32>(dy, h, w))?,
                x.shape(),
                x.device(),
            ),
            DType::F64 => Tensor::from_vec(
                with_slice(dy, |dy| Self::backward::<f64>(dy, h, w))?,
                x.shape(),
                x.device(),
            ),
            d => candle_core::bail!("the CPU upsampling takes f32 or f64, got {d:?}"),
        }?;
        Ok(Some(dx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Both forms equal candle's nearest upsampling, and their gradients are the 2x2 block sums of the
    /// output gradient, in f64 and f32, on shapes with one plane per parallel chunk and many.
    #[test]
    fn matches_candle_and_block_sums() {
        let dev = Device::Cpu;
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            for (n, c, h, w) in [(2, 3, 4, 5), (1, 2, 130, 140), (3, 70, 7, 6)] {
                let x = Var::from_tensor(
                    &Tensor::randn(0f64, 1.0, (n, c, h, w), &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap(),
                )
                .unwrap();
                let r = Tensor::randn(0f64, 1.0, (n, c, 2 * h, 2 * w), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let want = x.upsample_nearest2d(2 * h, 2 * w).unwrap();
                let block_sums = r
                    .reshape((n, c, h, 2, w, 2))
                    .unwrap()
                    .sum(5)
                    .unwrap()
                    .sum(3)
                    .unwrap();
                for ours in [upsample2x(&x).unwrap(), upsample2x_broadcast(&x).unwrap()] {
                    assert_eq!(crate::testing::max_abs_diff(&ours, &want), 0.0);
                    let g = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    let g = g.get(x.as_tensor()).unwrap();
                    assert!(crate::testing::max_abs_diff(g, &block_sums) < tol);
                }
            }
        }
    }

    #[test]
    fn only_four_dimensional_input() {
        let x = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(upsample2x(&x).is_err());
        let empty = Tensor::zeros((0, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(upsample2x(&empty).unwrap().dims(), &[0, 3, 8, 8]);
    }
}
