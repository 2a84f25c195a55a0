//! ODE solvers for dx/dt = v(x, t), kept apart from the vector field as in diffrax.
//!
//! A [`Solver`] knows how to take one step; [`integrate`] drives it over a time grid and returns the final
//! state with [`Stats`]. NFE counts calls of the vector field (network evaluations), never steps.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::VelocityField;
use crate::path::time_tensor;

/// What a solve cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    /// Number of function evaluations (network calls).
    pub nfe: usize,
    /// Steps attempted.
    pub steps: usize,
    /// Steps accepted.
    pub accepted: usize,
    /// Steps rejected by the step-size controller (always 0 for fixed steps).
    pub rejected: usize,
}

/// The right-hand side v(x, t) with an evaluation counter.
pub struct Rhs<'a> {
    field: &'a dyn VelocityField,
    /// Evaluations so far.
    pub nfe: usize,
}

impl<'a> Rhs<'a> {
    pub fn new(field: &'a dyn VelocityField) -> Self {
        Self { field, nfe: 0 }
    }

    /// v(x, t) at one time for the whole batch.
    pub fn eval(&mut self, t: f64, x: &Tensor) -> Result<Tensor> {
        self.nfe += 1;
        let tt = time_tensor(t, x.dim(0)?, x.dtype(), x.device())?;
        // Sampling needs no gradients: detaching drops the autograd graph that a model with trainable
        // parameters records, which would otherwise chain every step of the solve together in memory.
        Ok(self.field.forward(x, &tt)?.detach())
    }
}

/// A one-step method.
pub trait Solver {
    /// Order of accuracy (global error O(h^order)).
    fn order(&self) -> usize;
    /// Field evaluations per step.
    fn stages(&self) -> usize;
    /// Advances `x` from `t` to `t + h` (h may be negative).
    fn step(&self, rhs: &mut Rhs, t: f64, x: &Tensor, h: f64) -> Result<Tensor>;
}

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

fn axpy(x: &Tensor, h: f64, k: &Tensor) -> Result<Tensor> {
    Ok((x + (k * h)?)?)
}

impl Solver for Euler {
    fn order(&self) -> usize {
        1
    }
    fn stages(&self) -> usize {
        1
    }
    fn step(&self, rhs: &mut Rhs, t: f64, x: &Tensor, h: f64) -> Result<Tensor> {
        axpy(x, h, &rhs.eval(t, x)?)
    }
}

impl Solver for Midpoint {
    fn order(&self) -> usize {
        2
    }
    fn stages(&self) -> usize {
        2
    }
    fn step(&self, rhs: &mut Rhs, t: f64, x: &Tensor, h: f64) -> Result<Tensor> {
        let k1 = rhs.eval(t, x)?;
        let k2 = rhs.eval(t + 0.5 * h, &axpy(x, 0.5 * h, &k1)?)?;
        axpy(x, h, &k2)
    }
}

impl Solver for Heun {
    fn order(&self) -> usize {
        2
    }
    fn stages(&self) -> usize {
        2
    }
    fn step(&self, rhs: &mut Rhs, t: f64, x: &Tensor, h: f64) -> Result<Tensor> {
        let k1 = rhs.eval(t, x)?;
        let k2 = rhs.eval(t + h, &axpy(x, h, &k1)?)?;
        axpy(x, 0.5 * h, &(k1 + k2)?)
    }
}

impl Solver for Rk4 {
    fn order(&self) -> usize {
        4
    }
    fn stages(&self) -> usize {
        4
    }
    fn step(&self, rhs: &mut Rhs, t: f64, x: &Tensor, h: f64) -> Result<Tensor> {
        let k1 = rhs.eval(t, x)?;
        let k2 = rhs.eval(t + 0.5 * h, &axpy(x, 0.5 * h, &k1)?)?;
        let k3 = rhs.eval(t + 0.5 * h, &axpy(x, 0.5 * h, &k2)?)?;
        let k4 = rhs.eval(t + h, &axpy(x, h, &k3)?)?;
        let sum = (k1 + ((k2 + k3)? * 2.0)? + k4)?;
        axpy(x, h / 6.0, &sum)
    }
}

/// The fixed-step solvers by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SolverKind {
    Euler,
    Midpoint,
    Heun,
    Rk4,
}

impl SolverKind {
    pub fn solver(&self) -> Box<dyn Solver> {
        match self {
            SolverKind::Euler => Box::new(Euler),
            SolverKind::Midpoint => Box::new(Midpoint),
            SolverKind::Heun => Box::new(Heun),
            SolverKind::Rk4 => Box::new(Rk4),
        }
    }
}

/// The result of a solve.
#[derive(Debug, Clone)]
pub struct Solution {
    /// State at the final time.
    pub x: Tensor,
    /// States at every step boundary (including the start), if asked for.
    pub trajectory: Option<Vec<Tensor>>,
    pub stats: Stats,
}

/// Integrates dx/dt = v(x, t) from `t0` to `t1` (either direction) in `steps` equal steps.
pub fn integrate(
    field: &dyn VelocityField,
    solver: &dyn Solver,
    x0: &Tensor,
    t0: f64,
    t1: f64,
    steps: usize,
    keep_trajectory: bool,
) -> Result<Solution> {
    if steps == 0 {
        return Err(Error::Config(
            "the number of solver steps must be at least 1".into(),
        ));
    }
    if !(t0.is_finite() && t1.is_finite()) {
        return Err(Error::Config(format!(
            "integration bounds must be finite, got {t0} -> {t1}"
        )));
    }
    let mut rhs = Rhs::new(field);
    let h = (t1 - t0) / steps as f64;
    let mut x = x0.clone();
    let mut trajectory = keep_trajectory.then(|| vec![x.clone()]);
    for i in 0..steps {
        // t from the index, not by accumulation, so the last step ends exactly at t1.
        let t = t0 + (t1 - t0) * i as f64 / steps as f64;
        x = solver.step(&mut rhs, t, &x, h)?;
        if let Some(tr) = trajectory.as_mut() {
            tr.push(x.clone());
        }
    }
    let stats = Stats {
        nfe: rhs.nfe,
        steps,
        accepted: steps,
        rejected: 0,
    };
    Ok(Solution {
        x,
        trajectory,
        stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// dx/dt = a x + t: a linear ODE with the closed-form solution below.
    struct Linear(f64);
    impl VelocityField for Linear {
        fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
            Ok(((x * self.0)? + t.unsqueeze(1)?.broadcast_as(x.shape())?)?)
        }
    }

    fn exact(a: f64, x0: f64, t: f64) -> f64 {
        // x(t) = (x0 + 1/a^2) e^{a t} - t/a - 1/a^2
        (x0 + 1.0 / (a * a)) * (a * t).exp() - t / a - 1.0 / (a * a)
    }

    fn error(kind: SolverKind, steps: usize) -> f64 {
        let x0 = Tensor::new(&[[0.5f64]], &Device::Cpu).unwrap();
        let sol = integrate(
            &Linear(-1.3),
            kind.solver().as_ref(),
            &x0,
            0.0,
            1.0,
            steps,
            false,
        )
        .unwrap();
        let got: f64 = sol.x.flatten_all().unwrap().to_vec1::<f64>().unwrap()[0];
        (got - exact(-1.3, 0.5, 1.0)).abs()
    }

    #[test]
    fn convergence_orders_by_step_halving() {
        for (kind, order) in [
            (SolverKind::Euler, 1.0),
            (SolverKind::Midpoint, 2.0),
            (SolverKind::Heun, 2.0),
            (SolverKind::Rk4, 4.0),
        ] {
            let slope = (error(kind, 16) / error(kind, 32)).log2();
            assert!(
                (slope - order).abs() < 0.3,
                "{kind:?}: measured order {slope}"
            );
        }
    }

    #[test]
    fn nfe_counts_field_calls() {
        let x0 = Tensor::zeros((3, 1), DType::F64, &Device::Cpu).unwrap();
        for (kind, per_step) in [
            (SolverKind::Euler, 1),
            (SolverKind::Midpoint, 2),
            (SolverKind::Heun, 2),
            (SolverKind::Rk4, 4),
        ] {
            let s =
                integrate(&Linear(1.0), kind.solver().as_ref(), &x0, 0.0, 1.0, 7, true).unwrap();
            assert_eq!(s.stats.nfe, 7 * per_step);
            assert_eq!(s.trajectory.unwrap().len(), 8);
        }
    }

    #[test]
    fn reverse_integration_returns_to_the_start() {
        let x0 = Tensor::new(&[[0.5f64], [-2.0]], &Device::Cpu).unwrap();
        let fwd = integrate(&Linear(0.7), &Rk4, &x0, 0.0, 1.0, 50, false).unwrap();
        let back = integrate(&Linear(0.7), &Rk4, &fwd.x, 1.0, 0.0, 50, false).unwrap();
        let d: f64 = (back.x - x0)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < 1e-8);
    }

    #[test]
    fn zero_steps_is_an_error() {
        let x0 = Tensor::zeros((1, 1), DType::F64, &Device::Cpu).unwrap();
        assert!(integrate(&Linear(1.0), &Euler, &x0, 0.0, 1.0, 0, false).is_err());
    }
}
