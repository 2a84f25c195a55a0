//! GroupNorm, optionally followed by SiLU, on the CPU as one candle op with its own backward.
//!
//! For image n and group g (its M = (C / G) H W values), with mean mu, variance var (biased) and
//! rstd = 1 / sqrt(var + eps):
//! - forward:  xhat = (x - mu) rstd,  z = gamma_c xhat + beta_c,  y = z (or silu(z) = z sigmoid(z));
//! - backward: dz = dy (or dy silu'(z), silu'(z) = s (1 + z (1 - s)), s = sigmoid(z)),
//!   dbeta_c = sum dz, dgamma_c = sum dz xhat (over images and pixels), and with d = dz gamma_c,
//!   dx = rstd (d - mean_g(d) - xhat mean_g(d xhat)).
//!
//! Built from candle ops the same layer took about a dozen full passes forward, as many backward, and
//! reductions over broadcast dimensions, which candle's CPU backend runs slowly; here each group is read
//! twice forward and three times backward.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::linalg::{host, slice};

/// The variance offset, as in PyTorch's GroupNorm.
pub const EPS: f64 = 1e-5;

/// Whether [`group_norm`] takes `x`: f32 or f64 on the CPU.
pub fn supports(x: &Tensor) -> bool {
    crate::cpuconv::supports(x)
}

/// GroupNorm of x (N, C, H, W) with `groups` groups and per-channel gamma, beta (C), then SiLU if `silu`.
pub fn group_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    silu: bool,
) -> Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    if !supports(x) || groups == 0 || c % groups != 0 || gamma.dims() != [c] || beta.dims() != [c] {
        return Err(Error::Config(format!(
            "GroupNorm of {:?} ({:?}) with {groups} groups and affine {:?}, {:?} is not supported",
            x.dims(),
            x.dtype(),
            gamma.dims(),
            beta.dims()
        )));
    }
    Ok(x.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        GroupNorm { groups, silu },
    )?)
}

struct GroupNorm {
    groups: usize,
    silu: bool,
}

/// Mean and 1 / sqrt(var + eps) of one group's values (accumulated in f64).
fn moments<T: WithDType>(v: &[T]) -> (f64, f64) {
    let m = v.len() as f64;
    let mean = v.iter().map(|x| x.to_f64()).sum::<f64>() / m;
    let var = v.iter().map(|x| (x.to_f64() - mean).powi(2)).sum::<f64>() / m;
    (mean, 1.0 / (var + EPS).sqrt())
}

/// The element types the op runs on, with the sigmoid of each (elementwise maths stays in the tensor's
/// type; sums are accumulated in f64).
trait Real: WithDType {
    fn sigmoid(self) -> Self;
}

impl Real for f32 {
    fn sigmoid(self) -> f32 {
        1.0 / (1.0 + (-self).exp())
    }
}

impl Real for f64 {
    fn sigmoid(self) -> f64 {
        1.0 / (1.0 + (-self).exp())
    }
}

impl GroupNorm {
    /// (channels per group, pixels per channel) of an (N, C, H, W) shape.
    fn sizes(&self, shape: &Shape) -> candle_core::Result<(usize, usize)> {
        let (_, c, h, w) = shape.dims4()?;
        Ok((c / self.groups, h * w))
    }

    fn forward<T: Real>(&self, shape: &Shape, x: &[T], gamma: &[T], beta: &[T]) -> Vec<T> {
        let (cg, hw) = self.sizes(shape).expect("checked 4-D");
        let mut y = vec![T::zero(); x.len()];
        y.par_chunks_mut(cg * hw)
            .zip(x.par_chunks(cg * hw))
            .enumerate()
            .for_each(|(i, (yg, xg))| {
                let (mean, rstd) = moments(xg);
                let c0 = (i % self.groups) * cg;
                for ((yc, xc), ch) in yg.chunks_mut(hw).zip(xg.chunks(hw)).zip(c0..) {
                    // z = gamma (x - mean) rstd + beta = a x + c
                    let a = gamma[ch].to_f64() * rstd;
                    let (a, c) = (T::from_f64(a), T::from_f64(beta[ch].to_f64() - a * mean));
                    if self.silu {
                        yc.iter_mut().zip(xc).for_each(|(yo, &xi)| {
                            let z = a * xi + c;
                            *yo = z * z.sigmoid();
                        });
                    } else {
                        yc.iter_mut().zip(xc).for_each(|(yo, &xi)| *yo = a * xi + c);
                    }
                }
            });
        y
    }

    /// (dx, dgamma, dbeta) from the output gradient.
    fn backward<T: Real>(
        &self,
        shape: &Shape,
        x: &[T],
        gamma: &[T],
        beta: &[T],
        dy: &[T],
    ) -> (Vec<T>, Vec<f64>, Vec<f64>) {
        let (cg, hw) = self.sizes(shape).expect("checked 4-D");
        let mut dx = vec![T::zero(); x.len()];
        // Per group: its channels' (dgamma, dbeta) contributions, summed over images after.
        let parts: Vec<(Vec<f64>, Vec<f64>)> = dx
            .par_chunks_mut(cg * hw)
            .zip(x.par_chunks(cg * hw).zip(dy.par_chunks(cg * hw)))
            .enumerate()
            .map(|(i, (dxg, (xg, dyg)))| {
                let (mean, rstd) = moments(xg);
                let c0 = (i % self.groups) * cg;
                let (mut dgamma, mut dbeta) = (vec![0.0; cg], vec![0.0; cg]);
                // Pass 1: dz, the affine gradients, and the two group means of d = dz gamma.
                let (mut sum_d, mut sum_dxhat) = (0.0, 0.0);
                let (m_t, r_t) = (T::from_f64(mean), T::from_f64(rstd));
                for (k, ch) in (c0..c0 + cg).enumerate() {
                    let (g, b) = (gamma[ch], beta[ch]);
                    let span = k * hw..(k + 1) * hw;
                    let (dxc, xc, dyc) = (&mut dxg[span.clone()], &xg[span.clone()], &dyg[span]);
                    let (mut sg, mut sb) = (0.0, 0.0);
                    for ((o, &xi), &gi) in dxc.iter_mut().zip(xc).zip(dyc) {
                        let xhat = (xi - m_t) * r_t;
                        let dz = if self.silu {
                            let z = xhat * g + b;
                            let s = z.sigmoid();
                            gi * s * (T::one() + z * (T::one() - s))
                        } else {
                            gi
                        };
                        let (dz64, xhat64) = (dz.to_f64(), xhat.to_f64());
                        sg += dz64 * xhat64;
                        sb += dz64;
                        let d = dz * g;
                        *o = d;
                    }
                    dgamma[k] = sg;
                    dbeta[k] = sb;
                    let g64 = g.to_f64();
                    sum_d += sb * g64;
                    sum_dxhat += sg * g64;
                }
                let m = (cg * hw) as f64;
                let (mean_d, mean_dxhat) = (T::from_f64(sum_d / m), T::from_f64(sum_dxhat / m));
                // Pass 2: dx from d (kept in dx) and xhat.
                for (o, &xi) in dxg.iter_mut().zip(xg) {
                    let xhat = (xi - m_t) * r_t;
                    *o = r_t * (*o - mean_d - xhat * mean_dxhat);
                }
                (dgamma, dbeta)
            })
            .collect();
        let c = cg * self.groups;
        let (mut dgamma, mut dbeta) = (vec![0.0; c], vec![0.0; c]);
        for (i, (pg, pb)) in parts.into_iter().enumerate() {
            let c0 = (i % self.groups) * cg;
            for k in 0..cg {
                dgamma[c0 + k] += pg[k];
                dbeta[c0 + k] += pb[k];
            }
        }
        (dx, dgamma, dbeta)
    }
}

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        if self.silu {
            "group-norm-silu-cpu"
        } else {
            "group-norm-cpu"
        }
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = xl.shape();
        let out = match xs {
            CpuStorage::F32(_) => CpuStorage::F32(self.forward::<f32>(
                shape,
                slice(xs, xl)?,
                slice(gs, gl)?,
                slice(bs, bl)?,
            )),
            CpuStorage::F64(_) => CpuStorage::F64(self.forward::<f64>(
                shape,
                slice(xs, xl)?,
                slice(gs, gl)?,
                slice(bs, bl)?,
            )),
            _ => candle_core::bail!("the CPU GroupNorm takes f32 or f64"),
        };
        Ok((out, shape.clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dev = x.device();
        let (dx, dgamma, dbeta) = match x.dtype() {
            candle_core::DType::F32 => {
                let (dx, dg, db) = self.backward::<f32>(
                    x.shape(),
                    &host(x)?,
                    &host(gamma)?,
                    &host(beta)?,
                    &host(dy)?,
                );
                (Tensor::from_vec(dx, x.shape(), dev)?, dg, db)
            }
            candle_core::DType::F64 => {
                let (dx, dg, db) = self.backward::<f64>(
                    x.shape(),
                    &host(x)?,
                    &host(gamma)?,
                    &host(beta)?,
                    &host(dy)?,
                );
                (Tensor::from_vec(dx, x.shape(), dev)?, dg, db)
            }
            d => candle_core::bail!("the CPU GroupNorm takes f32 or f64, got {d:?}"),
        };
        let affine = |v: Vec<f64>| Tensor::from_vec(v, gamma.shape(), dev)?.to_dtype(x.dtype());
        Ok((Some(dx), Some(affine(dgamma)?), Some(affine(dbeta)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// GroupNorm written with candle ops (the reference), then SiLU if asked.
    fn reference(x: &Tensor, gamma: &Tensor, beta: &Tensor, groups: usize, silu: bool) -> Tensor {
        let y = crate::layers::group_norm_ops(x, gamma, beta, groups).unwrap();
        if silu {
            y.silu().unwrap()
        } else {
            y
        }
    }

    /// Values and the gradients of x, gamma and beta against candle's autograd through the reference,
    /// with and without SiLU, one and several channels per group, under a loss weighting every output.
    #[test]
    fn matches_candle_ops_and_their_gradients() {
        let dev = Device::Cpu;
        for (groups, silu) in [(2, false), (2, true), (6, true), (1, false)] {
            let x = Var::randn(0.5f64, 2.0, (3, 6, 4, 5), &dev).unwrap();
            let gamma = Var::randn(1f64, 0.5, 6, &dev).unwrap();
            let beta = Var::randn(0f64, 0.5, 6, &dev).unwrap();
            let r = Tensor::randn(0f64, 1.0, (3, 6, 4, 5), &dev).unwrap();
            let ours = group_norm(&x, &gamma, &beta, groups, silu).unwrap();
            let want = reference(&x, &gamma, &beta, groups, silu);
            assert!(crate::testing::max_abs_diff(&ours, &want) < 1e-10);
            let go = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gw = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [x.as_tensor(), gamma.as_tensor(), beta.as_tensor()] {
                let (a, e) = (go.get(v).unwrap(), gw.get(v).unwrap());
                assert_eq!(a.dims(), e.dims());
                let d = crate::testing::max_abs_diff(a, e);
                assert!(
                    d < 1e-9,
                    "groups {groups} silu {silu}: gradient differs by {d}"
                );
            }
        }
    }

    #[test]
    fn rejects_channels_that_do_not_split_into_groups() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 6, 2, 2), candle_core::DType::F32, &dev).unwrap();
        let g = Tensor::ones(6, candle_core::DType::F32, &dev).unwrap();
        assert!(group_norm(&x, &g, &g, 4, false).is_err());
        assert!(group_norm(&x, &g, &g, 0, true).is_err());
    }
}
