//! Classical explicit Runge-Kutta methods with constant steps.

use candle_core::Tensor;

use super::{axpy, combine, first_stage as first, shift, Dense, Rhs, Solver, Step};
use crate::error::Result;

/// Forward Euler: x + h v(x, t).
#[derive(Debug, Clone, Copy, Default)]
pub struct Euler;

/// Explicit midpoint: x + h v(x + h/2 v(x, t), t + h/2).
#[derive(Debug, Clone, Copy, Default)]
pub struct Midpoint;

/// Heun's method (explicit trapezoid): k1 = v(x, t), k2 = v(x + h k1, t + h), x + h (k1 + k2) / 2.
#[derive(Debug, Clone, Copy, Default)]
pub struct Heun;

/// The classical fourth-order Runge-Kutta method.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rk4;

fn done(x0: &Tensor, x: Tensor) -> Step {
    Step {
        dense: Some(Dense::Linear {
            x0: x0.clone(),
            x1: x.clone(),
        }),
        x,
        error: None,
        f_last: None,
    }
}

impl Solver for Euler {
    fn order(&self) -> usize {
        1
    }
    fn step(
        &self,
        rhs: &mut Rhs,
        t: &[f64],
        x: &Tensor,
        h: &[f64],
        f0: Option<Tensor>,
    ) -> Result<Step> {
        let k1 = first(rhs, t, x, f0)?;
        Ok(done(x, axpy(x, h, &k1)?))
    }
}

impl Solver for Midpoint {
    fn order(&self) -> usize {
        2
    }
    fn step(
        &self,
        rhs: &mut Rhs,
        t: &[f64],
        x: &Tensor,
        h: &[f64],
        f0: Option<Tensor>,
    ) -> Result<Step> {
        let k1 = first(rhs, t, x, f0)?;
        let k2 = rhs.eval(&shift(t, h, 0.5), &combine(x, h, &[(0.5, &k1)])?)?;
        Ok(done(x, axpy(x, h, &k2)?))
    }
}

impl Solver for Heun {
    fn order(&self) -> usize {
        2
    }
    fn step(
        &self,
        rhs: &mut Rhs,
        t: &[f64],
        x: &Tensor,
        h: &[f64],
        f0: Option<Tensor>,
    ) -> Result<Step> {
        let k1 = first(rhs, t, x, f0)?;
        let k2 = rhs.eval(&shift(t, h, 1.0), &axpy(x, h, &k1)?)?;
        Ok(done(x, combine(x, h, &[(0.5, &k1), (0.5, &k2)])?))
    }
}

impl Solver for Rk4 {
    fn order(&self) -> usize {
        4
    }
    fn step(
        &self,
        rhs: &mut Rhs,
        t: &[f64],
        x: &Tensor,
        h: &[f64],
        f0: Option<Tensor>,
    ) -> Result<Step> {
        let k1 = first(rhs, t, x, f0)?;
        let k2 = rhs.eval(&shift(t, h, 0.5), &combine(x, h, &[(0.5, &k1)])?)?;
        let k3 = rhs.eval(&shift(t, h, 0.5), &combine(x, h, &[(0.5, &k2)])?)?;
        let k4 = rhs.eval(&shift(t, h, 1.0), &combine(x, h, &[(1.0, &k3)])?)?;
        let x1 = combine(
            x,
            h,
            &[
                (1.0 / 6.0, &k1),
                (1.0 / 3.0, &k2),
                (1.0 / 3.0, &k3),
                (1.0 / 6.0, &k4),
            ],
        )?;
        Ok(done(x, x1))
    }
}
