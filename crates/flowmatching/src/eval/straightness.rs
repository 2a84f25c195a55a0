//! How straight a model's flow is (Liu et al. 2022, rectified flow): along the model's own trajectories
//! x_t from x_0 to x_1,
//!
//! ```text
//! S = E_{x0} (1/K) sum_k || (x_1 - x_0) - v(x_{t_k}, t_k) ||^2       (0 for straight paths at constant speed)
//! curvature = E_{x0} [ length(x_.) / ||x_1 - x_0|| - 1 ]              (0 for straight paths)
//! ```
//!
//! The trajectory is a fine RK4 solve (K steps); x_1 is its end point, so S measures how much the
//! velocity turns along the path rather than the solver's error.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::field::VelocityField;
use crate::solver::{solve, Rk4, SolveOptions};
use crate::tensor::time_tensor;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Straightness {
    /// Mean over samples and times of ||(x1 - x0) - v(x_t, t)||^2.
    pub straightness: f64,
    /// Mean relative excess length of the trajectories over their chords.
    pub curvature: f64,
    /// Network evaluations used.
    pub nfe: usize,
}

/// Straightness and curvature of `field`'s trajectories from the rows of `x0`, with `steps` RK4 steps.
pub fn straightness(field: &dyn VelocityField, x0: &Tensor, steps: usize) -> Result<Straightness> {
    let steps = steps.max(1);
    let times: Vec<f64> = (0..=steps).map(|k| k as f64 / steps as f64).collect();
    let opts = SolveOptions::constant(steps).grid(times.clone());
    let sol = solve(field, &Rk4, x0, 0.0, 1.0, &opts)?;
    let xs = &sol.grid;
    let x1 = &xs[steps];
    let chord = (x1 - x0)?;
    let n = x0.dim(0)?;
    let mut s_total = 0f64;
    let mut length = Tensor::zeros(n, DType::F64, x0.device())?;
    for k in 0..steps {
        let t = time_tensor(times[k], n, x0.dtype(), x0.device())?;
        let v = field.forward(&xs[k], &t)?.detach();
        let dev = (&chord - v)?.sqr()?.flatten_from(1)?.sum(1)?;
        s_total += dev.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?;
        let seg = (&xs[k + 1] - &xs[k])?
            .sqr()?
            .flatten_from(1)?
            .sum(1)?
            .sqrt()?;
        length = (length + seg.to_dtype(DType::F64)?)?;
    }
    let chord_len = chord
        .sqr()?
        .flatten_from(1)?
        .sum(1)?
        .sqrt()?
        .to_dtype(DType::F64)?
        .clamp(1e-12, f64::MAX)?;
    let curvature = ((length / chord_len)? - 1.0)?
        .mean_all()?
        .to_scalar::<f64>()?;
    Ok(Straightness {
        straightness: s_total / steps as f64,
        curvature,
        nfe: sol.stats.nfe + steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A constant field has straight paths: both measures are zero.
    struct Constant;
    impl VelocityField for Constant {
        fn forward(&self, x: &Tensor, _t: &Tensor) -> Result<Tensor> {
            Ok((x.ones_like()? * 2.0)?)
        }
    }

    /// Rotation v = (-y, x): circles, speed |x|; from (1, 0) over t in [0, 1] the arc has length 1 and the
    /// chord 2 sin(1/2), so the curvature is 1 / (2 sin(1/2)) - 1; x1 - x0 = (cos 1 - 1, sin 1), and
    /// ||(x1 - x0) - v(x_t)||^2 averaged over t is 1 + |x1 - x0|^2 - 2 (x1 - x0) . mean_t v.
    struct Rotation;
    impl VelocityField for Rotation {
        fn forward(&self, x: &Tensor, _t: &Tensor) -> Result<Tensor> {
            let a = x.narrow(1, 0, 1)?;
            let b = x.narrow(1, 1, 1)?;
            Ok(Tensor::cat(&[&b.neg()?, &a], 1)?)
        }
    }

    #[test]
    fn constant_field_is_straight_and_rotation_matches_closed_form() {
        let x0 = Tensor::new(&[[1.0f64, 0.0], [0.5, 0.5]], &Device::Cpu).unwrap();
        let s = straightness(&Constant, &x0, 10).unwrap();
        assert!(s.straightness < 1e-20 && s.curvature.abs() < 1e-12, "{s:?}");

        let x0 = Tensor::new(&[[1.0f64, 0.0]], &Device::Cpu).unwrap();
        let k = 2000;
        let s = straightness(&Rotation, &x0, k).unwrap();
        let want_curv = 1.0 / (2.0 * 0.5f64.sin()) - 1.0;
        assert!(
            (s.curvature - want_curv).abs() < 1e-6,
            "{} vs {want_curv}",
            s.curvature
        );
        // mean_t v(t) = mean_t (-sin t, cos t) = (cos 1 - 1, sin 1) = x1 - x0 (left Riemann sum, O(1/K)).
        let d = [1f64.cos() - 1.0, 1f64.sin()];
        let d2 = d[0] * d[0] + d[1] * d[1];
        let want = 1.0 + d2 - 2.0 * d2;
        assert!(
            (s.straightness - want).abs() < 2e-3,
            "{} vs {want}",
            s.straightness
        );
    }
}
