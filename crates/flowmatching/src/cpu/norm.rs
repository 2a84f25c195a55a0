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

use super::linalg::{exp_f32, multiversion, slice, with_slice, zeroed_by_chunks};
use super::supports;
use crate::error::{Error, Result};

/// The variance offset, as in PyTorch's GroupNorm.
pub(crate) const EPS: f64 = 1e-5;

/// GroupNorm of x (N, C, H, W) with `groups` groups and per-channel gamma, beta (C), then SiLU if `silu`.
pub(crate) fn group_norm(
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

/// One group of one image: its values (channels x pixels) and its channels' affine parameters.
struct Group<'a, T> {
    x: &'a [T],
    gamma: &'a [T],
    beta: &'a [T],
    hw: usize,
    silu: bool,
}

/// Sum of f(v) over a slice, in 16 independent lanes (so the loop vectorises) added up in f64.
#[inline(always)]
fn lane_sum<T: WithDType>(v: &[T], f: impl Fn(T) -> T) -> f64 {
    const L: usize = 16;
    let mut acc = [T::zero(); L];
    let mut chunks = v.chunks_exact(L);
    for c in &mut chunks {
        for l in 0..L {
            acc[l] += f(c[l]);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&x| f(x).to_f64()).sum();
    acc.iter().map(|a| a.to_f64()).sum::<f64>() + tail
}

/// Mean and 1 / sqrt(var + eps) of a group's values (two passes).
#[inline(always)]
fn moments<T: WithDType>(v: &[T]) -> (f64, f64) {
    let m = v.len() as f64;
    let mean = lane_sum(v, |x| x) / m;
    let mt = T::from_f64(mean);
    let var = lane_sum(v, |x| (x - mt) * (x - mt)) / m;
    (mean, 1.0 / (var + EPS).sqrt())
}

/// y for one group (see the module documentation).
#[inline(always)]
fn forward_group<T: Real>(g: &Group<T>, y: &mut [T]) {
    let (mean, rstd) = moments(g.x);
    for ((yc, xc), (gamma, beta)) in y
        .chunks_mut(g.hw)
        .zip(g.x.chunks(g.hw))
        .zip(g.gamma.iter().zip(g.beta))
    {
        // z = gamma (x - mean) rstd + beta = a x + c
        let a = gamma.to_f64() * rstd;
        let (a, c) = (T::from_f64(a), T::from_f64(beta.to_f64() - a * mean));
        if g.silu {
            yc.iter_mut().zip(xc).for_each(|(yo, &xi)| {
                let z = a * xi + c;
                *yo = z * z.sigmoid();
            });
        } else {
            yc.iter_mut().zip(xc).for_each(|(yo, &xi)| *yo = a * xi + c);
        }
    }
}

/// dx for one group from its output gradient dy, and its channels' dgamma and dbeta.
#[inline(always)]
fn backward_group<T: Real>(
    g: &Group<T>,
    dy: &[T],
    dx: &mut [T],
    dgamma: &mut [f64],
    dbeta: &mut [f64],
) {
    const L: usize = 16;
    let (mean, rstd) = moments(g.x);
    let (m, r) = (T::from_f64(mean), T::from_f64(rstd));
    let (mut sum_d, mut sum_dxhat) = (0.0, 0.0);
    // Pass 1, per channel: dz (into dx, times gamma: d), sum dz xhat and sum dz.
    for k in 0..g.gamma.len() {
        let (gamma, beta) = (g.gamma[k], g.beta[k]);
        let span = k * g.hw..(k + 1) * g.hw;
        let (dc, xc, gc) = (&mut dx[span.clone()], &g.x[span.clone()], &dy[span]);
        // (dz, xhat) at one value
        let grad = |xi: T, gi: T| -> (T, T) {
            let xhat = (xi - m) * r;
            if g.silu {
                let z = xhat * gamma + beta;
                let s = z.sigmoid();
                (gi * s * (T::one() + z * (T::one() - s)), xhat)
            } else {
                (gi, xhat)
            }
        };
        let (mut sg, mut sb) = ([T::zero(); L], [T::zero(); L]);
        let n = dc.len() / L * L;
        for ((d, x), gr) in dc[..n]
            .chunks_exact_mut(L)
            .zip(xc[..n].chunks_exact(L))
            .zip(gc[..n].chunks_exact(L))
        {
            for l in 0..L {
                let (dz, xhat) = grad(x[l], gr[l]);
                sg[l] += dz * xhat;
                sb[l] += dz;
                d[l] = dz * gamma;
            }
        }
        let (mut tg, mut tb) = (0.0, 0.0);
        for i in n..dc.len() {
            let (dz, xhat) = grad(xc[i], gc[i]);
            tg += (dz * xhat).to_f64();
            tb += dz.to_f64();
            dc[i] = dz * gamma;
        }
        dgamma[k] = sg.iter().map(|v| v.to_f64()).sum::<f64>() + tg;
        dbeta[k] = sb.iter().map(|v| v.to_f64()).sum::<f64>() + tb;
        sum_d += dbeta[k] * gamma.to_f64();
        sum_dxhat += dgamma[k] * gamma.to_f64();
    }
    // Pass 2: dx = rstd (d - mean(d) - xhat mean(d xhat)).
    let count = g.x.len() as f64;
    let (mean_d, mean_dxhat) = (T::from_f64(sum_d / count), T::from_f64(sum_dxhat / count));
    for (o, &xi) in dx.iter_mut().zip(g.x) {
        let xhat = (xi - m) * r;
        *o = r * (*o - mean_d - xhat * mean_dxhat);
    }
}

/// The element types the op runs on. Elementwise maths stays in the tensor's type, sums go through
/// 16 lanes into f64; f32 runs compiled for the CPU's vector width.
trait Real: WithDType {
    fn sigmoid(self) -> Self;
    fn forward_group(g: &Group<Self>, y: &mut [Self]);
    fn backward_group(
        g: &Group<Self>,
        dy: &[Self],
        dx: &mut [Self],
        dg: &mut [f64],
        db: &mut [f64],
    );
}

multiversion! {
    fn forward_group_f32(g: &Group<f32>, y: &mut [f32]) {
        forward_group(g, y)
    }
}

multiversion! {
    fn backward_group_f32(g: &Group<f32>, dy: &[f32], dx: &mut [f32], dg: &mut [f64], db: &mut [f64]) {
        backward_group(g, dy, dx, dg, db)
    }
}

impl Real for f32 {
    #[inline(always)]
    fn sigmoid(self) -> f32 {
        1.0 / (1.0 + exp_f32(-self))
    }
    fn forward_group(g: &Group<f32>, y: &mut [f32]) {
        forward_group_f32(g, y)
    }
    fn backward_group(g: &Group<f32>, dy: &[f32], dx: &mut [f32], dg: &mut [f64], db: &mut [f64]) {
        backward_group_f32(g, dy, dx, dg, db)
    }
}

impl Real for f64 {
    fn sigmoid(self) -> f64 {
        1.0 / (1.0 + (-self).exp())
    }
    fn forward_group(g: &Group<f64>, y: &mut [f64]) {
        forward_group(g, y)
    }
    fn backward_group(g: &Group<f64>, dy: &[f64], dx: &mut [f64], dg: &mut [f64], db: &mut [f64]) {
        backward_group(g, dy, dx, dg, db)
    }
}

impl GroupNorm {
    /// (channels per group, pixels per channel) of an (N, C, H, W) shape.
    fn sizes(&self, shape: &Shape) -> candle_core::Result<(usize, usize)> {
        let (_, c, h, w) = shape.dims4()?;
        Ok((c / self.groups, h * w))
    }

    /// Group i (image i / G, group i % G) of x.
    fn group<'a, T>(
        &self,
        i: usize,
        xg: &'a [T],
        gamma: &'a [T],
        beta: &'a [T],
        hw: usize,
    ) -> Group<'a, T> {
        let cg = xg.len() / hw;
        let c0 = (i % self.groups) * cg;
        Group {
            x: xg,
            gamma: &gamma[c0..c0 + cg],
            beta: &beta[c0..c0 + cg],
            hw,
            silu: self.silu,
        }
    }

    fn forward<T: Real>(&self, shape: &Shape, x: &[T], gamma: &[T], beta: &[T]) -> Vec<T> {
        let (cg, hw) = self.sizes(shape).expect("checked 4-D");
        let m = cg * hw;
        zeroed_by_chunks(x.len(), m, |i, yg| {
            let xg = &x[i * m..(i + 1) * m];
            T::forward_group(&self.group(i, xg, gamma, beta, hw), yg)
        })
        .0
    }

    /// [`GroupNorm::backward`] from tensors (dx as a tensor; dgamma and dbeta in f64).
    fn backward_tensors<T: Real>(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Tensor, Vec<f64>, Vec<f64>)> {
        let xs = x.shape();
        let (dx, dg, db) = with_slice(x, |x| {
            with_slice(gamma, |gamma| {
                with_slice(beta, |beta| {
                    with_slice(dy, |dy| self.backward::<T>(xs, x, gamma, beta, dy))
                })
            })
        })????;
        Ok((Tensor::from_vec(dx, x.shape(), x.device())?, dg, db))
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
        // Per group: its channels' (dgamma, dbeta) contributions, summed over images after (in image
        // order, so the result does not depend on the threads' timing).
        let m = cg * hw;
        let (dx, parts) = zeroed_by_chunks(x.len(), m, |i, dxg| {
            let (xg, dyg) = (&x[i * m..(i + 1) * m], &dy[i * m..(i + 1) * m]);
            let (mut dg, mut db) = (vec![0.0; cg], vec![0.0; cg]);
            T::backward_group(
                &self.group(i, xg, gamma, beta, hw),
                dyg,
                dxg,
                &mut dg,
                &mut db,
            );
            (dg, db)
        });
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
        let (dx, dgamma, dbeta) = match x.dtype() {
            candle_core::DType::F32 => self.backward_tensors::<f32>(x, gamma, beta, dy)?,
            candle_core::DType::F64 => self.backward_tensors::<f64>(x, gamma, beta, dy)?,
            d => candle_core::bail!("the CPU GroupNorm takes f32 or f64, got {d:?}"),
        };
        let affine =
            |v: Vec<f64>| Tensor::from_vec(v, gamma.shape(), x.device())?.to_dtype(x.dtype());
        Ok((Some(dx), Some(affine(dgamma)?), Some(affine(dbeta)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// GroupNorm written with candle ops (the reference), then SiLU if asked.
    fn reference(x: &Tensor, gamma: &Tensor, beta: &Tensor, groups: usize, silu: bool) -> Tensor {
        let y = crate::nn::layers::group_norm_ops(x, gamma, beta, groups).unwrap();
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

    /// The f32 kernels (fast exponential, lane sums, vector code) against the f64 reference, on a group
    /// large enough to run the vector loops and their tails (4 x 37 values per channel).
    #[test]
    fn f32_matches_the_f64_reference() {
        let dev = Device::Cpu;
        let x = Var::randn(0.5f64, 2.0, (2, 4, 4, 37), &dev).unwrap();
        let gamma = Var::randn(1f64, 0.5, 4, &dev).unwrap();
        let beta = Var::randn(0f64, 0.5, 4, &dev).unwrap();
        let r = Tensor::randn(0f64, 1.0, (2, 4, 4, 37), &dev).unwrap();
        let f32s =
            |t: &Tensor| Var::from_tensor(&t.to_dtype(candle_core::DType::F32).unwrap()).unwrap();
        let (x32, g32, b32) = (f32s(&x), f32s(&gamma), f32s(&beta));
        let r32 = r.to_dtype(candle_core::DType::F32).unwrap();
        for silu in [false, true] {
            let ours = group_norm(&x32, &g32, &b32, 2, silu).unwrap();
            let want = reference(&x, &gamma, &beta, 2, silu);
            let d = crate::testing::max_abs_diff(
                &ours.to_dtype(candle_core::DType::F64).unwrap(),
                &want,
            );
            assert!(d < 1e-5, "silu {silu}: value differs by {d}");
            let go = (ours * &r32)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gw = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (v, w) in [(&x32, &x), (&g32, &gamma), (&b32, &beta)] {
                let a = go
                    .get(v.as_tensor())
                    .unwrap()
                    .to_dtype(candle_core::DType::F64)
                    .unwrap();
                let e = gw.get(w.as_tensor()).unwrap();
                let scale = 1.0
                    + e.abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap();
                let d = crate::testing::max_abs_diff(&a, e) / scale;
                assert!(d < 1e-4, "silu {silu}: gradient differs by {d} (relative)");
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
