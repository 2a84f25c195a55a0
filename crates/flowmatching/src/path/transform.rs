//! Sampling a velocity field trained on one scheduler as if it had been trained on another (Lipman et
//! al. 2024, "Flow matching guide and code", scheduler change; flow_matching's
//! `ScheduleTransformedModel`).
//!
//! Two affine Gaussian paths x_t = sigma_t x0 + alpha_t x1 (the field's) and x_r = sigma'_r x0 +
//! alpha'_r x1 (the wanted one) pass through the same conditional Gaussians up to scale when their
//! signal-to-noise ratios match: with t_r solving alpha_t / sigma_t = alpha'_r / sigma'_r and
//! s_r = alpha'_r / alpha_{t_r} = sigma'_r / sigma_{t_r}, x_r = s_r x_{t_r} for every (x0, x1). So the
//! marginal field of the wanted path is
//!
//! ```text
//! u'_r(x) = (ds/dr / s_r) x + s_r dt/dr u_{t_r}(x / s_r)
//! ```
//!
//! with the same marginals at r = 0 and r = 1: samples keep their distribution, the paths between
//! change. dt/dr and ds/dr come from differentiating alpha_{t_r} s_r = alpha'_r and sigma_{t_r} s_r =
//! sigma'_r, a 2 x 2 system that stays regular at both ends, where the ratio alone is 0 or infinite.

use candle_core::{DType, Tensor};

use super::scheduler::{Scheduler, SchedulerConfig, SchedulerOutput};
use crate::error::Result;
use crate::field::VelocityField;

/// A velocity field on the scheduler `from`, seen on the scheduler `to`.
#[derive(Debug)]
pub struct ScheduleTransformed<F> {
    field: F,
    from: Box<dyn Scheduler>,
    to: Box<dyn Scheduler>,
}

/// Where the wanted path at time r sits on the field's: t_r, s_r and their derivatives in r.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimeMap {
    pub t: f64,
    pub s: f64,
    pub dt: f64,
    pub ds: f64,
}

impl<F: VelocityField> ScheduleTransformed<F> {
    /// `field` is a velocity field on the path of `from`.
    pub fn new(field: F, from: &SchedulerConfig, to: &SchedulerConfig) -> Result<Self> {
        Ok(Self {
            field,
            from: from.build()?,
            to: to.build()?,
        })
    }

    /// t_r (by bisection on the monotone signal-to-noise ratio, compared without dividing), s_r and
    /// the derivatives.
    pub fn map(&self, r: f64) -> TimeMap {
        let b = self.to.at(r);
        // alpha_t / sigma_t < alpha'_r / sigma'_r, cross-multiplied (all four are >= 0).
        let below = |o: SchedulerOutput| o.alpha_t * b.sigma_t < b.alpha_t * o.sigma_t;
        let (mut lo, mut hi) = (0.0f64, 1.0f64);
        for _ in 0..64 {
            let mid = 0.5 * (lo + hi);
            if below(self.from.at(mid)) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let t = 0.5 * (lo + hi);
        let a = self.from.at(t);
        // The better-conditioned of the two equal ratios.
        let s = if a.alpha_t >= a.sigma_t {
            b.alpha_t / a.alpha_t
        } else {
            b.sigma_t / a.sigma_t
        };
        // [alpha' s, alpha; sigma' s, sigma] [dt; ds] = [d alpha'_r; d sigma'_r].
        let det = s * (a.d_alpha_t * a.sigma_t - a.alpha_t * a.d_sigma_t);
        let dt = (b.d_alpha_t * a.sigma_t - a.alpha_t * b.d_sigma_t) / det;
        let ds = s * (a.d_alpha_t * b.d_sigma_t - a.d_sigma_t * b.d_alpha_t) / det;
        TimeMap { t, s, dt, ds }
    }
}

impl<F: VelocityField> VelocityField for ScheduleTransformed<F> {
    fn forward(&self, x: &Tensor, r: &Tensor) -> Result<Tensor> {
        let rv: Vec<f64> = r.to_dtype(DType::F64)?.to_vec1()?;
        let maps: Vec<TimeMap> = rv.iter().map(|&r| self.map(r)).collect();
        let col = |f: &dyn Fn(&TimeMap) -> f64| -> Result<Tensor> {
            let v: Vec<f64> = maps.iter().map(f).collect();
            let mut shape = vec![v.len()];
            shape.extend(std::iter::repeat_n(1, x.rank().saturating_sub(1)));
            Ok(Tensor::from_vec(v, shape, x.device())?.to_dtype(x.dtype())?)
        };
        let s = col(&|m| m.s)?;
        let t = Tensor::from_iter(maps.iter().map(|m| m.t), x.device())?.to_dtype(r.dtype())?;
        let u = self.field.forward(&x.broadcast_div(&s)?, &t)?;
        let a = col(&|m| m.ds / m.s)?;
        let b = col(&|m| m.s * m.dt)?;
        Ok((x.broadcast_mul(&a)? + u.broadcast_mul(&b)?)?)
    }

    fn evals_per_call(&self, r: &[f64]) -> usize {
        let t: Vec<f64> = r.iter().map(|&r| self.map(r).t).collect();
        self.field.evals_per_call(&t)
    }
}
