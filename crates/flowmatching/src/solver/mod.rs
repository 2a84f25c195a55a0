//! ODE solvers for dx/dt = v(x, t), kept apart from the vector field and the step-size control, as in
//! diffrax.
//!
//! - a [`Solver`] takes one step (and, if it has an embedded pair, estimates its error):
//!   [`Euler`], [`Midpoint`], [`Heun`], [`Rk4`], [`Dopri5`];
//! - a [`StepControl`] chooses the steps: constant, or PI control of the local error ([`Adaptive`]);
//! - [`solve`] drives both and returns the state with [`Stats`] and a [`Status`]; NFE counts calls of the vector field
//!   (network evaluations), never steps.
//!
//! Times may run either way: t0 = 0 -> t1 = 1 samples (noise to data), t0 = 1 -> t1 = 0 encodes.

mod controller;
mod dopri5;
mod explicit;
mod solve;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

pub use crate::error::SolveStop;
pub use controller::{Adaptive, ErrorNorm, StepControl};
pub use dopri5::Dopri5;
pub use explicit::{Euler, Heun, Midpoint, Rk4};
pub use solve::{integrate, solve, Solution, SolveOptions, Status};

use crate::error::Result;
use crate::field::VelocityField;
use crate::tensor::column;

/// What a solve cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Number of function evaluations: calls of the vector field on the batch (network calls).
    pub nfe: usize,
    /// Steps attempted (accepted + rejected).
    pub steps: usize,
    /// Steps accepted.
    pub accepted: usize,
    /// Steps rejected by the step-size controller (always 0 for constant steps).
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

    /// v(x, t) with one time per row of x.
    pub fn eval(&mut self, t: &[f64], x: &Tensor) -> Result<Tensor> {
        self.nfe += self.field.evals_per_call(t);
        let tt = Tensor::from_iter(t.iter().copied(), x.device())?.to_dtype(x.dtype())?;
        // Sampling needs no gradients: detaching drops any autograd graph the field recorded, which
        // would otherwise chain every step of the solve together in memory.
        Ok(self.field.forward(x, &tt)?.detach())
    }
}

/// The result of one step.
pub struct Step {
    /// State at t + h.
    pub x: Tensor,
    /// Embedded local error estimate (solvers with an embedded pair only).
    pub error: Option<Tensor>,
    /// v at (x, t + h), when the method computes it anyway (first-same-as-last).
    pub f_last: Option<Tensor>,
    /// Dense output over the step (solvers that provide one).
    pub dense: Option<Dense>,
}

/// Interpolation over one step: x(t + theta h) for theta in [0, 1].
pub enum Dense {
    /// Straight line between the end points (fixed-step methods; exact at step boundaries).
    Linear { x0: Tensor, x1: Tensor },
    /// Dormand-Prince's fourth-order continuous extension:
    /// x = r1 + theta (r2 + (1 - theta) (r3 + theta (r4 + (1 - theta) r5))).
    Quartic([Tensor; 5]),
}

impl Dense {
    /// The interpolated state at one theta per row.
    pub fn at(&self, theta: &[f64]) -> Result<Tensor> {
        match self {
            Dense::Linear { x0, x1 } => {
                let th = column(theta.iter().copied(), x0)?;
                Ok((x0 + (x1 - x0)?.broadcast_mul(&th)?)?)
            }
            Dense::Quartic([r1, r2, r3, r4, r5]) => {
                let th = column(theta.iter().copied(), r1)?;
                let om = column(theta.iter().map(|t| 1.0 - t), r1)?;
                let inner = (r4 + r5.broadcast_mul(&om)?)?.broadcast_mul(&th)?;
                let inner = (r3 + inner)?.broadcast_mul(&om)?;
                let inner = (r2 + inner)?.broadcast_mul(&th)?;
                Ok((r1 + inner)?)
            }
        }
    }

    /// The rows `ids` of this interpolant.
    fn rows(&self, ids: &Tensor) -> Result<Dense> {
        Ok(match self {
            Dense::Linear { x0, x1 } => Dense::Linear {
                x0: x0.index_select(ids, 0)?,
                x1: x1.index_select(ids, 0)?,
            },
            Dense::Quartic(r) => {
                let pick = |t: &Tensor| t.index_select(ids, 0);
                Dense::Quartic([
                    pick(&r[0])?,
                    pick(&r[1])?,
                    pick(&r[2])?,
                    pick(&r[3])?,
                    pick(&r[4])?,
                ])
            }
        })
    }
}

/// A one-step method. `t` and `h` hold one value per row of `x` (rows may sit at different times).
pub trait Solver {
    /// Order of accuracy (global error O(h^order)).
    fn order(&self) -> usize;
    /// Whether [`Step::error`] is provided (needed for adaptive steps).
    fn embedded(&self) -> bool {
        false
    }
    /// Advances `x` from `t` to `t + h`. `f0` is v(x, t) if the caller already has it (first-same-as-last
    /// reuse); otherwise the solver evaluates it.
    fn step(
        &self,
        rhs: &mut Rhs,
        t: &[f64],
        x: &Tensor,
        h: &[f64],
        f0: Option<Tensor>,
    ) -> Result<Step>;
}

/// The solvers by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SolverKind {
    Euler,
    Midpoint,
    Heun,
    Rk4,
    Dopri5,
}

impl SolverKind {
    /// Field evaluations per constant step (Dopri5: 6 with first-same-as-last reuse).
    pub fn stages(&self) -> usize {
        match self {
            SolverKind::Euler => 1,
            SolverKind::Midpoint | SolverKind::Heun => 2,
            SolverKind::Rk4 => 4,
            SolverKind::Dopri5 => 6,
        }
    }

    pub fn solver(&self) -> Box<dyn Solver> {
        match self {
            SolverKind::Euler => Box::new(Euler),
            SolverKind::Midpoint => Box::new(Midpoint),
            SolverKind::Heun => Box::new(Heun),
            SolverKind::Rk4 => Box::new(Rk4),
            SolverKind::Dopri5 => Box::new(Dopri5),
        }
    }
}

/// v(x, t) at the start of a step: the caller's first-same-as-last value, or a fresh evaluation.
pub(crate) fn first_stage(
    rhs: &mut Rhs,
    t: &[f64],
    x: &Tensor,
    f0: Option<Tensor>,
) -> Result<Tensor> {
    match f0 {
        Some(f) => Ok(f),
        None => rhs.eval(t, x),
    }
}

/// x + h k with one h per row.
pub(crate) fn axpy(x: &Tensor, h: &[f64], k: &Tensor) -> Result<Tensor> {
    Ok((x + k.broadcast_mul(&column(h.iter().copied(), k)?)?)?)
}

/// x + sum_j (h a_j) k_j with one h per row.
pub(crate) fn combine(x: &Tensor, h: &[f64], terms: &[(f64, &Tensor)]) -> Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for &(a, k) in terms {
        if a == 0.0 {
            continue;
        }
        let term = (k * a)?;
        acc = Some(match acc {
            None => term,
            Some(s) => (s + term)?,
        });
    }
    match acc {
        None => Ok(x.clone()),
        Some(s) => axpy(x, h, &s),
    }
}

/// Shifts every time by its row's h times c.
pub(crate) fn shift(t: &[f64], h: &[f64], c: f64) -> Vec<f64> {
    t.iter().zip(h).map(|(t, h)| t + c * h).collect()
}

#[cfg(test)]
mod tests;
