//! The exact marginal velocity field of a finite data set.
//!
//! For data {y_1..y_N} (uniform weights) and an affine Gaussian path, the posterior over which data point
//! produced x_t = x is
//!
//! ```text
//! w_j(x, t) = softmax_j( -|x - alpha_t y_j|^2 / (2 sigma_t^2) )
//! ```
//!
//! and the marginal field is u_t(x) = sum_j w_j u_t(x | y_j) (Lipman et al., eq. 8), i.e. the x1-form
//! conversion applied to the posterior mean E[x1 | x_t = x] = sum_j w_j y_j. It is the minimiser of the
//! CFM loss over all functions, the field every trained model approximates; integrated from noise it
//! reproduces (memorises) the data points. The softmax is computed in log space.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};
use crate::field::VelocityField;
use crate::path::{AffinePath, Prediction};

/// The closed-form marginal field of a finite data set on a given path. A model with no parameters.
#[derive(Debug)]
pub struct EmpiricalField {
    path: AffinePath,
    /// Data, shape (N, D).
    data: Tensor,
    /// |y_j|^2, shape (1, N).
    sq_norms: Tensor,
}

impl EmpiricalField {
    /// `data` has shape (N, ...) with N >= 1; it is flattened to (N, D).
    pub fn new(path: AffinePath, data: &Tensor) -> Result<Self> {
        let n = data.dims().first().copied().unwrap_or(0);
        if n == 0 {
            return Err(Error::Data(
                "the empirical field needs at least one data point".into(),
            ));
        }
        let data = data.flatten_from(1)?;
        let sq_norms = data.sqr()?.sum(1)?.unsqueeze(0)?;
        Ok(Self {
            path,
            data,
            sq_norms,
        })
    }

    pub fn path(&self) -> &AffinePath {
        &self.path
    }

    /// Posterior weights w (shape (B, N)) at per-row times t.
    pub fn posterior(&self, x: &Tensor, t: &[f64]) -> Result<Tensor> {
        let x = x.flatten_from(1)?.to_dtype(self.data.dtype())?;
        let alpha = self.col(t, |p, t| p.at(t).alpha_t)?;
        let inv_var = self.col(t, |p, t| 1.0 / p.at(t).sigma_t.powi(2))?;
        // -|x - a y|^2 / (2 s^2) = (a x.y - a^2 |y|^2 / 2) / s^2 + (terms constant in j)
        let xy = x.matmul(&self.data.t()?)?;
        let logits = (xy.broadcast_mul(&alpha)?
            - self.sq_norms.broadcast_mul(&(alpha.sqr()? * 0.5)?)?)?
        .broadcast_mul(&inv_var)?;
        let max = logits.max_keepdim(D::Minus1)?;
        let e = logits.broadcast_sub(&max)?.exp()?;
        Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
    }

    /// A prediction of the given kind at (x, t): the posterior mean converted with the path.
    pub fn predict(&self, kind: Prediction, x: &Tensor, t: &[f64]) -> Result<Tensor> {
        let x1 = self
            .posterior(x, t)?
            .matmul(&self.data)?
            .reshape(x.shape())?
            .to_dtype(x.dtype())?;
        if kind == Prediction::X1 {
            return Ok(x1);
        }
        let v = self.path.to_velocity(Prediction::X1, &x1, x, t)?;
        self.path.from_velocity(kind, &v, x, t)
    }

    /// The marginal velocity u_t(x) at per-row times.
    pub fn velocity_at(&self, x: &Tensor, t: &[f64]) -> Result<Tensor> {
        self.predict(Prediction::Velocity, x, t)
    }

    fn col(&self, t: &[f64], f: impl Fn(&AffinePath, f64) -> f64) -> Result<Tensor> {
        Ok(
            Tensor::from_iter(t.iter().map(|&t| f(&self.path, t)), self.data.device())?
                .to_dtype(self.data.dtype())?
                .unsqueeze(1)?,
        )
    }
}

impl VelocityField for EmpiricalField {
    fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let t: Vec<f64> = t.to_dtype(DType::F64)?.to_vec1()?;
        self.velocity_at(x, &t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::{CondOT, VP};
    use candle_core::Device;

    fn data() -> Tensor {
        Tensor::new(
            &[[1.0f64, 1.0], [-1.0, 1.0], [2.0, -1.0], [0.0, -2.0]],
            &Device::Cpu,
        )
        .unwrap()
    }

    /// The scheduler change of a field is the marginal field of the new path: the empirical field on
    /// the OT path, seen on the cosine (or VP) path, equals the empirical field computed on that path,
    /// and seeing a path as itself changes nothing.
    #[test]
    fn schedule_transform_gives_the_new_paths_marginal_field() {
        use crate::path::{Cosine, ScheduleTransformed, SchedulerConfig};
        let ot = SchedulerConfig::CondOt { sigma_min: 0.0 };
        let on_ot = EmpiricalField::new(AffinePath::from_config(&ot).unwrap(), &data()).unwrap();
        let x = Tensor::new(&[[0.3f64, -0.2], [1.5, 0.4], [-0.7, 0.9]], &Device::Cpu).unwrap();
        for (to, scheduler) in [
            (SchedulerConfig::Cosine, AffinePath::new(Box::new(Cosine))),
            (
                SchedulerConfig::default_vp(),
                AffinePath::new(Box::new(VP::default())),
            ),
        ] {
            let moved = ScheduleTransformed::new(&on_ot, &ot, &to).unwrap();
            let direct = EmpiricalField::new(scheduler, &data()).unwrap();
            for r in [0.1, 0.5, 0.9] {
                let rt = Tensor::new(&[r, r, r], &Device::Cpu).unwrap();
                let (a, b) = (
                    moved.forward(&x, &rt).unwrap(),
                    direct.forward(&x, &rt).unwrap(),
                );
                let diff = (a - &b).unwrap().abs().unwrap().max_all().unwrap();
                let scale = b
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                let d = diff.to_scalar::<f64>().unwrap();
                assert!(d < 1e-6 * (1.0 + scale), "{to:?} at r = {r}: {d}");
            }
        }
        let same = ScheduleTransformed::new(&on_ot, &ot, &ot).unwrap();
        let m = same.map(0.37);
        assert!((m.t - 0.37).abs() < 1e-12 && (m.s - 1.0).abs() < 1e-12);
        assert!((m.dt - 1.0).abs() < 1e-9 && m.ds.abs() < 1e-9, "{m:?}");
    }

    /// Against a direct evaluation of eq. 8: sum_j N(x; alpha y_j, sigma^2) u(x|y_j) / sum_j N(...).
    #[test]
    fn matches_direct_mixture_formula() {
        let y = [[1.0f64, 1.0], [-1.0, 1.0], [2.0, -1.0], [0.0, -2.0]];
        for path in [
            AffinePath::new(Box::new(CondOT::new(1e-3).unwrap())),
            AffinePath::new(Box::new(VP::default())),
        ] {
            let x = [[0.3f64, -0.2], [1.5, 0.4]];
            let t = [0.3, 0.8];
            let mut expect = vec![];
            for (xi, &ti) in x.iter().zip(&t) {
                let o = path.at(ti);
                let (mut num, mut den) = ([0.0; 2], 0.0);
                for yj in &y {
                    let d2: f64 = (0..2).map(|k| (xi[k] - o.alpha_t * yj[k]).powi(2)).sum();
                    let w = (-d2 / (2.0 * o.sigma_t * o.sigma_t)).exp();
                    for k in 0..2 {
                        // u(x | y) = d_sigma / sigma (x - alpha y) + d_alpha y   (Theorem 3)
                        let u = o.d_sigma_t / o.sigma_t * (xi[k] - o.alpha_t * yj[k])
                            + o.d_alpha_t * yj[k];
                        num[k] += w * u;
                    }
                    den += w;
                }
                expect.push([num[0] / den, num[1] / den]);
            }
            let field = EmpiricalField::new(path, &data()).unwrap();
            let got: Vec<Vec<f64>> = field
                .velocity_at(&Tensor::new(&x, &Device::Cpu).unwrap(), &t)
                .unwrap()
                .to_vec2()
                .unwrap();
            for (g, e) in got.iter().zip(&expect) {
                for k in 0..2 {
                    assert!((g[k] - e[k]).abs() < 1e-9, "{g:?} vs {e:?}");
                }
            }
        }
    }

    #[test]
    fn is_stable_when_sigma_is_tiny() {
        let path = AffinePath::new(Box::new(CondOT::new(1e-5).unwrap()));
        let field = EmpiricalField::new(path, &data()).unwrap();
        let x = Tensor::new(&[[0.9f64, 1.1], [50.0, -30.0]], &Device::Cpu).unwrap();
        let v: Vec<Vec<f64>> = field
            .velocity_at(&x, &[0.999999, 0.999999])
            .unwrap()
            .to_vec2()
            .unwrap();
        assert!(v.iter().flatten().all(|x| x.is_finite()));
    }

    #[test]
    fn empty_data_is_an_error() {
        let path = AffinePath::new(Box::new(CondOT::new(0.0).unwrap()));
        let empty = Tensor::zeros((0, 2), DType::F64, &Device::Cpu).unwrap();
        assert!(EmpiricalField::new(path, &empty).is_err());
    }
}
