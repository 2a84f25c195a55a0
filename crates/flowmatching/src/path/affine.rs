//! The affine Gaussian probability path over any [`Scheduler`].
//!
//! For noise x0 ~ N(0, I), a data point x1 and a time t (t = 0 noise, t = 1 data):
//!
//! ```text
//! x_t = sigma_t x0 + alpha_t x1                          (sample)
//! u_t(x_t | x1) = d_sigma_t x0 + d_alpha_t x1            (conditional velocity, the CFM target)
//! ```
//!
//! The marginal velocity is u_t(x) = E[u_t(x | x1) | x_t = x]; because x_t is affine in (x0, x1), it is an
//! affine function of any other posterior mean, which gives the conversions between prediction types:
//!
//! ```text
//! from x1 = E[x1 | x]:   v = (d_sigma/sigma) x + (d_alpha - d_sigma alpha / sigma) x1
//! from eps = E[x0 | x]:  v = (d_alpha/alpha) x + (d_sigma - d_alpha sigma / alpha) eps
//! from the score s:      eps = -sigma s   (Gaussian conditional path: grad log p_t(x|x1) = -x0 / sigma)
//! ```
//!
//! Each conversion is `v = a(t) x + b(t) prediction`; [`AffinePath::conversion`] returns (a, b).
//! The x1 form is singular where sigma_t = 0, the noise and score forms where alpha_t = 0 (t = 0 on CondOT).

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::scheduler::{Scheduler, SchedulerConfig, SchedulerOutput};
use crate::error::{Error, Result};
use crate::tensor::column;

/// What a network predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// The velocity u_t (flow matching).
    #[default]
    Velocity,
    /// The data point x1 (denoiser / "x-prediction").
    X1,
    /// The noise x0, called epsilon in DDPM.
    Epsilon,
    /// The score grad_x log p_t(x).
    Score,
}

/// A point on the path and its regression target.
#[derive(Debug, Clone)]
pub struct PathSample {
    /// Times, shape (B,).
    pub t: Tensor,
    /// x_t = sigma_t x0 + alpha_t x1.
    pub x_t: Tensor,
    /// d/dt x_t = d_sigma_t x0 + d_alpha_t x1: the conditional velocity.
    pub dx_t: Tensor,
}

/// One affine Gaussian path; any scheduler makes it concrete.
#[derive(Debug)]
pub struct AffinePath {
    scheduler: Box<dyn Scheduler>,
}

impl AffinePath {
    pub fn new(scheduler: Box<dyn Scheduler>) -> Self {
        Self { scheduler }
    }

    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        Ok(Self::new(config.build()?))
    }

    pub fn scheduler(&self) -> &dyn Scheduler {
        self.scheduler.as_ref()
    }

    /// Scheduler values at time t.
    pub fn at(&self, t: f64) -> SchedulerOutput {
        self.scheduler.at(t)
    }

    /// x_t and the conditional velocity for noise `x0`, data `x1` (same shape, batch first) and per-row times.
    pub fn sample(&self, x0: &Tensor, x1: &Tensor, t: &[f64]) -> Result<PathSample> {
        if x0.shape() != x1.shape() {
            return Err(Error::Data(format!(
                "x0 has shape {:?} but x1 has shape {:?}",
                x0.dims(),
                x1.dims()
            )));
        }
        let out: Vec<SchedulerOutput> = t.iter().map(|&t| self.scheduler.at(t)).collect();
        let col = |f: fn(&SchedulerOutput) -> f64| column(out.iter().map(f), x1);
        let (alpha, sigma) = (col(|o| o.alpha_t)?, col(|o| o.sigma_t)?);
        let (d_alpha, d_sigma) = (col(|o| o.d_alpha_t)?, col(|o| o.d_sigma_t)?);
        let x_t = (x0.broadcast_mul(&sigma)? + x1.broadcast_mul(&alpha)?)?;
        let dx_t = (x0.broadcast_mul(&d_sigma)? + x1.broadcast_mul(&d_alpha)?)?;
        let t = Tensor::from_iter(t.iter().copied(), x1.device())?.to_dtype(x1.dtype())?;
        Ok(PathSample { t, x_t, dx_t })
    }

    /// What a network predicting `prediction` regresses onto at the path sample `s` of (x0, x1, t): the
    /// velocity dx_t, x1, x0 (epsilon), or the velocity converted (the score -x0 / sigma_t).
    pub fn regression_target(
        &self,
        prediction: Prediction,
        x0: &Tensor,
        x1: &Tensor,
        s: &PathSample,
        t: &[f64],
    ) -> Result<Tensor> {
        Ok(match prediction {
            Prediction::Velocity => s.dx_t.clone(),
            Prediction::X1 => x1.clone(),
            Prediction::Epsilon => x0.clone(),
            other => self.from_velocity(other, &s.dx_t, &s.x_t, t)?,
        })
    }

    /// x_t and the regression target for `prediction`, on flat row-major host buffers (rows of `dim`):
    /// the same values as [`AffinePath::sample`] followed by the conversion of the velocity target
    /// (x1 for [`Prediction::X1`], x0 for [`Prediction::Epsilon`], -x0 / sigma_t for [`Prediction::Score`]).
    pub fn sample_rows(
        &self,
        x0: &[f32],
        x1: &[f32],
        t: &[f64],
        dim: usize,
        prediction: Prediction,
    ) -> (Vec<f32>, Vec<f32>) {
        let mut x_t = vec![0.0; x0.len()];
        let mut target = vec![0.0; x0.len()];
        for (i, &ti) in t.iter().enumerate() {
            let o = self.scheduler.at(ti);
            let (al, si, da, ds) = (
                o.alpha_t as f32,
                o.sigma_t as f32,
                o.d_alpha_t as f32,
                o.d_sigma_t as f32,
            );
            let r = i * dim..(i + 1) * dim;
            for (((xt, y), &a), &b) in x_t[r.clone()]
                .iter_mut()
                .zip(&mut target[r.clone()])
                .zip(&x0[r.clone()])
                .zip(&x1[r])
            {
                *xt = a * si + b * al;
                *y = match prediction {
                    Prediction::Velocity => a * ds + b * da,
                    Prediction::X1 => b,
                    Prediction::Epsilon => a,
                    Prediction::Score => -a / si,
                };
            }
        }
        (x_t, target)
    }

    /// Coefficients (a, b) with velocity = a x + b prediction at time t.
    pub fn conversion(&self, from: Prediction, t: f64) -> (f64, f64) {
        let o = self.scheduler.at(t);
        let (al, si, da, ds) = (o.alpha_t, o.sigma_t, o.d_alpha_t, o.d_sigma_t);
        match from {
            Prediction::Velocity => (0.0, 1.0),
            Prediction::X1 => (ds / si, da - ds * al / si),
            Prediction::Epsilon => (da / al, ds - da * si / al),
            Prediction::Score => (da / al, -(ds - da * si / al) * si),
        }
    }

    /// Converts a prediction of kind `from` at (x, t) into the velocity (t per row).
    pub fn to_velocity(
        &self,
        from: Prediction,
        pred: &Tensor,
        x: &Tensor,
        t: &[f64],
    ) -> Result<Tensor> {
        if from == Prediction::Velocity {
            return Ok(pred.clone());
        }
        let (a, b) = self.columns(from, x, t)?;
        Ok((x.broadcast_mul(&a)? + pred.broadcast_mul(&b)?)?)
    }

    /// Converts a velocity at (x, t) into a prediction of kind `to` (t per row).
    pub fn from_velocity(
        &self,
        to: Prediction,
        v: &Tensor,
        x: &Tensor,
        t: &[f64],
    ) -> Result<Tensor> {
        if to == Prediction::Velocity {
            return Ok(v.clone());
        }
        let (a, b) = self.columns(to, x, t)?;
        Ok((v - x.broadcast_mul(&a)?)?.broadcast_div(&b)?)
    }

    fn columns(&self, kind: Prediction, like: &Tensor, t: &[f64]) -> Result<(Tensor, Tensor)> {
        let ab: Vec<(f64, f64)> = t.iter().map(|&t| self.conversion(kind, t)).collect();
        Ok((
            column(ab.iter().map(|p| p.0), like)?,
            column(ab.iter().map(|p| p.1), like)?,
        ))
    }
}

/// A model that predicts `prediction` on `path`, seen as the velocity field of the probability-flow ODE.
/// This is how every objective samples through the same solvers.
pub struct AsVelocity<'a, F: crate::field::VelocityField + ?Sized> {
    pub field: &'a F,
    pub path: &'a AffinePath,
    pub prediction: Prediction,
}

impl<F: crate::field::VelocityField + ?Sized> crate::field::VelocityField for AsVelocity<'_, F> {
    fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let pred = self.field.forward(x, t)?;
        if self.prediction == Prediction::Velocity {
            return Ok(pred);
        }
        let t: Vec<f64> = t.to_dtype(DType::F64)?.to_vec1()?;
        self.path.to_velocity(self.prediction, &pred, x, &t)
    }

    /// v = a(t) x + b(t) pred, so J_v u = a(t) u + b(t) J_pred u.
    fn jvp(&self, x: &Tensor, t: &Tensor, u: &[Tensor]) -> Result<Option<(Tensor, Vec<Tensor>)>> {
        let Some((pred, jp)) = self.field.jvp(x, t, u)? else {
            return Ok(None);
        };
        if self.prediction == Prediction::Velocity {
            return Ok(Some((pred, jp)));
        }
        let tv: Vec<f64> = t.to_dtype(DType::F64)?.to_vec1()?;
        let (a, b) = self.path.columns(self.prediction, x, &tv)?;
        let v = (x.broadcast_mul(&a)? + pred.broadcast_mul(&b)?)?;
        let jv = u
            .iter()
            .zip(jp)
            .map(|(u, j)| Ok((u.broadcast_mul(&a)? + j.broadcast_mul(&b)?)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some((v, jv)))
    }

    fn evals_per_call(&self, t: &[f64]) -> usize {
        self.field.evals_per_call(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::{CondOT, Cosine, Polynomial, VP};
    use candle_core::Device;

    fn paths() -> Vec<AffinePath> {
        vec![
            AffinePath::new(Box::new(CondOT::new(1e-5).unwrap())),
            AffinePath::new(Box::new(VP::default())),
            AffinePath::new(Box::new(Cosine)),
            AffinePath::new(Box::new(Polynomial::new(2.0).unwrap())),
        ]
    }

    fn randn(shape: (usize, usize), seed: u64) -> Tensor {
        let mut rng = crate::rng::Rng::new(seed);
        let v = rng.normal_vec(shape.0 * shape.1);
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    }

    use crate::testing::max_abs_diff as max_abs;

    /// d/dt x_t (by central differences of `sample`) equals the conditional velocity.
    #[test]
    fn target_is_the_time_derivative_of_x_t() {
        let (x0, x1) = (randn((5, 3), 1), randn((5, 3), 2));
        let h = 1e-6;
        for p in paths() {
            let t = [0.1, 0.3, 0.5, 0.7, 0.95];
            let lo: Vec<f64> = t.iter().map(|t| t - h).collect();
            let hi: Vec<f64> = t.iter().map(|t| t + h).collect();
            let fd = ((p.sample(&x0, &x1, &hi).unwrap().x_t
                - p.sample(&x0, &x1, &lo).unwrap().x_t)
                .unwrap()
                / (2.0 * h))
                .unwrap();
            let s = p.sample(&x0, &x1, &t).unwrap();
            assert!(max_abs(&fd, &s.dx_t) < 1e-4, "{p:?}");
        }
    }

    /// Round trips between velocity and every other prediction type, and the conditional identities:
    /// given (x0, x1), the x1-form of the target is x1 and the epsilon-form is x0.
    #[test]
    fn conversions_are_consistent() {
        let (x0, x1) = (randn((4, 2), 3), randn((4, 2), 4));
        let t = [0.2, 0.4, 0.6, 0.8];
        for p in paths() {
            let s = p.sample(&x0, &x1, &t).unwrap();
            let as_x1 = p
                .from_velocity(Prediction::X1, &s.dx_t, &s.x_t, &t)
                .unwrap();
            assert!(max_abs(&as_x1, &x1) < 1e-8, "x1 {p:?}");
            let as_eps = p
                .from_velocity(Prediction::Epsilon, &s.dx_t, &s.x_t, &t)
                .unwrap();
            assert!(max_abs(&as_eps, &x0) < 1e-8, "eps {p:?}");
            let sigma = column(t.iter().map(|&t| p.at(t).sigma_t), &x0).unwrap();
            let score = (x0.broadcast_div(&sigma).unwrap() * -1.0).unwrap();
            let as_score = p
                .from_velocity(Prediction::Score, &s.dx_t, &s.x_t, &t)
                .unwrap();
            assert!(max_abs(&as_score, &score) < 1e-7, "score {p:?}");
            for kind in [
                Prediction::X1,
                Prediction::Epsilon,
                Prediction::Score,
                Prediction::Velocity,
            ] {
                let back = p
                    .to_velocity(
                        kind,
                        &p.from_velocity(kind, &s.dx_t, &s.x_t, &t).unwrap(),
                        &s.x_t,
                        &t,
                    )
                    .unwrap();
                assert!(max_abs(&back, &s.dx_t) < 1e-8, "{kind:?} {p:?}");
            }
        }
    }

    /// The host version gives the tensor version's values for every prediction type.
    #[test]
    fn host_sampling_matches_tensors() {
        let mut rng = crate::rng::Rng::new(8);
        let (x0v, x1v) = (rng.normal_vec(12), rng.normal_vec(12));
        let x0 = Tensor::from_vec(x0v.clone(), (4, 3), &Device::Cpu).unwrap();
        let x1 = Tensor::from_vec(x1v.clone(), (4, 3), &Device::Cpu).unwrap();
        let t = [0.1, 0.4, 0.6, 0.9];
        for p in paths() {
            let s = p.sample(&x0, &x1, &t).unwrap();
            for kind in [
                Prediction::Velocity,
                Prediction::X1,
                Prediction::Epsilon,
                Prediction::Score,
            ] {
                let (xt, y) = p.sample_rows(&x0v, &x1v, &t, 3, kind);
                let want_xt: Vec<f32> = s.x_t.flatten_all().unwrap().to_vec1().unwrap();
                let want_y: Vec<f32> = p
                    .from_velocity(kind, &s.dx_t, &s.x_t, &t)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (a, b) in xt.iter().zip(&want_xt).chain(y.iter().zip(&want_y)) {
                    assert!(
                        (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                        "{kind:?} {p:?}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn ot_target_is_constant_in_time() {
        let p = AffinePath::new(Box::new(CondOT::new(0.01).unwrap()));
        let (x0, x1) = (randn((3, 2), 5), randn((3, 2), 6));
        let a = p.sample(&x0, &x1, &[0.1, 0.1, 0.1]).unwrap().dx_t;
        let b = p.sample(&x0, &x1, &[0.9, 0.9, 0.9]).unwrap().dx_t;
        assert!(max_abs(&a, &b) < 1e-12);
        let expect = (&x1 - (&x0 * 0.99).unwrap()).unwrap();
        assert!(max_abs(&a, &expect) < 1e-12);
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        let p = &paths()[0];
        assert!(p
            .sample(&randn((2, 2), 1), &randn((3, 2), 1), &[0.5, 0.5])
            .is_err());
    }
}
