//! Step-size control: constant steps, or PI control of the local error with Hairer's initial step.
//!
//! [`StepControl`] is what a user asks for; [`Controller`] carries it out during a solve: it owns each
//! row's next step size and previous error, picks the first step, proposes every step, and accepts or
//! rejects each attempt (the solve loop only advances the rows it is told to).

use candle_core::{DType, Tensor};

use super::{axpy, Rhs, Step};
use crate::error::{Error, Result};
use crate::timesteps::TimeGrid;

/// How the local error of a step is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorNorm {
    /// RMS over the whole batch: every sample takes the same steps (what torchdiffeq does).
    #[default]
    Batch,
    /// RMS over each sample: every sample has its own step size, so its NFE does not depend on what else
    /// is in its batch. Finished samples leave the batch.
    PerSample,
}

/// PI step-size control with relative and absolute tolerances.
///
/// A step with embedded error estimate e is accepted when
/// `err = sqrt(mean((e / (atol + rtol max(|x0|, |x1|)))^2)) <= 1`. The next step is
/// `h * clamp(safety * err^(-1/q + 0.75 beta) * err_prev^beta, min_factor, max_factor)` after an accepted
/// step (q the solver's order, beta = 0.04 as in Hairer's DOPRI5 by default) and
/// `h * clamp(safety * err^(-1/q), min_factor, 1)` after a rejected one.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Adaptive {
    pub rtol: f64,
    pub atol: f64,
    pub safety: f64,
    pub min_factor: f64,
    pub max_factor: f64,
    /// Proportional gain beta of the PI controller: 0.04 by default, as in Hairer's DOPRI5. 0 gives plain
    /// integral control, as SciPy and torchdiffeq use; on the benchmark's B1 model that took fewer
    /// evaluations (Dopri5 at 1e-5: 38 NFE against 44, 2026-11-26).
    pub beta: f64,
    /// Give up after this many attempted steps (per sample in per-sample mode).
    pub max_steps: usize,
    /// Give up when the step size falls below this.
    pub min_step: f64,
    pub norm: ErrorNorm,
    /// First step size; `None` selects it as Hairer, Norsett and Wanner do (one extra evaluation).
    pub initial_step: Option<f64>,
}

impl Adaptive {
    /// Tolerances with the default controller (safety 0.9, growth bounds 0.2..10, 10^5 steps).
    pub fn new(rtol: f64, atol: f64) -> Result<Self> {
        let a = Self {
            rtol,
            atol,
            safety: 0.9,
            min_factor: 0.2,
            max_factor: 10.0,
            beta: 0.04,
            max_steps: 100_000,
            min_step: 1e-10,
            norm: ErrorNorm::Batch,
            initial_step: None,
        };
        a.validate()?;
        Ok(a)
    }

    pub fn with_norm(mut self, norm: ErrorNorm) -> Self {
        self.norm = norm;
        self
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.rtol > 0.0 && self.rtol.is_finite()) {
            return Err(Error::Config(format!(
                "rtol must be positive, got {}",
                self.rtol
            )));
        }
        if !(self.atol > 0.0 && self.atol.is_finite()) {
            return Err(Error::Config(format!(
                "atol must be positive, got {}",
                self.atol
            )));
        }
        if !(0.0 < self.min_factor
            && self.min_factor <= 1.0
            && self.max_factor >= 1.0
            && self.safety > 0.0)
        {
            return Err(Error::Config(
                "the controller needs 0 < min_factor <= 1 <= max_factor and safety > 0".into(),
            ));
        }
        if self.max_steps == 0 || self.min_step.is_nan() || self.min_step < 0.0 {
            return Err(Error::Config(
                "max_steps must be positive and min_step non-negative".into(),
            ));
        }
        if let Some(h) = self.initial_step {
            if !(h > 0.0 && h.is_finite()) {
                return Err(Error::Config(format!(
                    "the initial step must be positive, got {h}"
                )));
            }
        }
        Ok(())
    }

    /// Per-row scaled RMS norm of `e` with scale atol + rtol max(|a|, |b|).
    pub(crate) fn norm_rows(&self, e: &Tensor, a: &Tensor, b: Option<&Tensor>) -> Result<Vec<f64>> {
        let mag = match b {
            Some(b) => a.abs()?.maximum(&b.abs()?)?,
            None => a.abs()?,
        };
        let sc = ((mag * self.rtol)? + self.atol)?;
        let r = e.div(&sc)?.sqr()?.flatten_from(1)?.mean(1)?.sqrt()?;
        let mut v: Vec<f64> = r.to_dtype(DType::F64)?.to_vec1()?;
        if self.norm == ErrorNorm::Batch {
            pool(&mut v);
        }
        Ok(v)
    }

    /// Factor for the next step after an accepted step.
    pub(crate) fn accept_factor(&self, err: f64, err_prev: f64, order: usize) -> f64 {
        let k = 1.0 / order as f64;
        if err == 0.0 {
            return self.max_factor;
        }
        let f = self.safety * err.powf(-k + 0.75 * self.beta) * err_prev.powf(self.beta);
        f.clamp(self.min_factor, self.max_factor)
    }

    /// Factor for the retry after a rejected step.
    pub(crate) fn reject_factor(&self, err: f64, order: usize) -> f64 {
        if !err.is_finite() {
            return self.min_factor;
        }
        (self.safety * err.powf(-1.0 / order as f64)).clamp(self.min_factor, 1.0)
    }
}

/// Replaces per-row RMS values by the RMS over all rows (equal row sizes make this the batch RMS).
pub(crate) fn pool(v: &mut [f64]) {
    if v.is_empty() {
        return;
    }
    let rms = (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt();
    v.iter_mut().for_each(|x| *x = rms);
}

/// How the steps of a solve are chosen.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepControl {
    /// `steps` equal steps.
    Constant { steps: usize },
    /// Error-controlled steps (needs a solver with an embedded error estimate).
    Adaptive(Adaptive),
}

/// Why the controller stops a solve: the row (position among the active rows), the reason, and the
/// row's step size at that point.
pub(crate) type Stop = (usize, &'static str, f64);

/// Which rows of an attempt are accepted, and their scaled errors; or the stop.
pub(crate) type Verdict = std::result::Result<(Vec<bool>, Vec<f64>), Stop>;

/// The step-size decisions of one solve, with one entry per active row.
pub(crate) enum Controller {
    /// `steps` steps from t0 to t1 placed by `grid`; `index` is the next one.
    Constant {
        t0: f64,
        t1: f64,
        steps: usize,
        index: usize,
        grid: TimeGrid,
    },
    /// Error-controlled steps for a solver of order `order`.
    Adaptive {
        control: Adaptive,
        order: usize,
        /// The next step size of each row (signed in the direction of integration).
        h: Vec<f64>,
        /// The error of each row's last accepted step (at least 1e-4), for the PI term.
        err_prev: Vec<f64>,
    },
}

impl Controller {
    pub(crate) fn new(
        control: StepControl,
        grid: TimeGrid,
        order: usize,
        (t0, t1): (f64, f64),
        n: usize,
    ) -> Self {
        match control {
            StepControl::Constant { steps } => Controller::Constant {
                t0,
                t1,
                steps,
                index: 0,
                grid,
            },
            StepControl::Adaptive(control) => Controller::Adaptive {
                control,
                order,
                h: vec![0.0; n],
                err_prev: vec![1e-4; n],
            },
        }
    }

    /// Before the first step: with adaptive control, evaluates v(x0, t0) and picks each row's first
    /// step (the given one, or Hairer's); returns that evaluation for the first step to reuse.
    pub(crate) fn start(
        &mut self,
        rhs: &mut Rhs,
        x0: &Tensor,
        t0: f64,
        t1: f64,
    ) -> Result<Option<Tensor>> {
        let Controller::Adaptive {
            control, order, h, ..
        } = self
        else {
            return Ok(None);
        };
        let n = h.len();
        let dir = if t1 >= t0 { 1.0 } else { -1.0 };
        let f0 = rhs.eval(&vec![t0; n], x0)?;
        *h = match control.initial_step {
            Some(h) => vec![h.min((t1 - t0).abs()) * dir; n],
            None => initial_step(rhs, control, *order, x0, &f0, t0, t1)?,
        };
        Ok(Some(f0))
    }

    /// The step of each row for the next attempt from times `t`: the next constant step, or the
    /// controller's step cut to end at `t1`. A row that hit the step limit or the minimum step stops
    /// the solve.
    pub(crate) fn propose(
        &self,
        t: &[f64],
        attempts: &[usize],
        t1: f64,
    ) -> std::result::Result<Vec<f64>, Stop> {
        match self {
            Controller::Constant {
                t0,
                t1: end,
                steps,
                index,
                grid,
            } => {
                let at = |i: usize| t0 + (end - t0) * grid.at(i as f64 / *steps as f64);
                let ta = at(*index);
                let tb = if index + 1 == *steps {
                    *end
                } else {
                    at(index + 1)
                };
                Ok(t.iter()
                    .map(|&t| {
                        let (h, remaining) = (tb - ta, end - t);
                        if h.abs() >= remaining.abs() {
                            remaining
                        } else {
                            h
                        }
                    })
                    .collect())
            }
            Controller::Adaptive { control, h, .. } => {
                let mut out = h.clone();
                for (k, h) in out.iter_mut().enumerate() {
                    let remaining = t1 - t[k];
                    if h.abs() >= remaining.abs() {
                        *h = remaining;
                    }
                    if h.abs() < control.min_step {
                        // float32 states carry ~1e-7 relative rounding: an error estimate asked to be
                        // smaller than that is rounding noise and the steps shrink without end.
                        let reason = if control.rtol < 1e-6 && control.atol < 1e-6 {
                            "the step size fell below the minimum step: rtol and atol are below \
                             float32 precision (~1e-7), so the error estimate cannot meet them; use \
                             tolerances of 1e-6 or more"
                        } else {
                            "the step size fell below the minimum step"
                        };
                        return Err((k, reason, *h));
                    }
                    if attempts[k] >= control.max_steps {
                        return Err((k, "the maximum number of steps was reached", *h));
                    }
                }
                Ok(out)
            }
        }
    }

    /// The times every row starts its next constant step from (constant control only).
    pub(crate) fn constant_start(&self) -> Option<f64> {
        match self {
            Controller::Constant {
                t0,
                t1,
                steps,
                index,
                grid,
            } => Some(t0 + (t1 - t0) * grid.at(*index as f64 / *steps as f64)),
            Controller::Adaptive { .. } => None,
        }
    }

    /// Judges an attempted step from `x` to `step.x`: which rows are accepted, and their scaled
    /// errors. Constant steps (of sizes `h`) are always accepted, unless the state stopped being finite.
    pub(crate) fn assess(&self, step: &Step, x: &Tensor, h: &[f64]) -> Result<Verdict> {
        let m = x.dim(0)?;
        match self {
            Controller::Constant { .. } => {
                let largest: f64 = step.x.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar()?;
                if !largest.is_finite() {
                    let h0 = h.first().copied().unwrap_or(0.0);
                    return Ok(Err((0, "the state is no longer finite (NaN or Inf)", h0)));
                }
                Ok(Ok((vec![true; m], vec![0.0; m])))
            }
            Controller::Adaptive { control, .. } => {
                let e = step.error.as_ref().ok_or_else(|| {
                    Error::Config("adaptive steps need a solver with an error estimate".into())
                })?;
                let mut err = control.norm_rows(e, x, Some(&step.x))?;
                err.iter_mut().for_each(|e| {
                    if !e.is_finite() {
                        *e = f64::INFINITY
                    }
                });
                if control.norm == ErrorNorm::Batch {
                    pool(&mut err);
                }
                Ok(Ok((err.iter().map(|&e| e <= 1.0).collect(), err)))
            }
        }
    }

    /// After an attempt with step sizes `h`: the next step of each row (grown after an accepted step,
    /// shrunk after a rejected one) and its memory of the last accepted error.
    pub(crate) fn update(&mut self, h_used: &[f64], accept: &[bool], err: &[f64]) {
        match self {
            Controller::Constant { index, .. } => *index += 1,
            Controller::Adaptive {
                control,
                order,
                h,
                err_prev,
            } => {
                for k in 0..h.len() {
                    if accept[k] {
                        h[k] = h_used[k] * control.accept_factor(err[k], err_prev[k], *order);
                        err_prev[k] = err[k].max(1e-4);
                    } else {
                        h[k] = h_used[k] * control.reject_factor(err[k], *order);
                    }
                }
            }
        }
    }

    /// Keeps the state of the rows `keep` (positions among the active rows).
    pub(crate) fn keep(&mut self, keep: &[usize]) {
        if let Controller::Adaptive { h, err_prev, .. } = self {
            *h = keep.iter().map(|&k| h[k]).collect();
            *err_prev = keep.iter().map(|&k| err_prev[k]).collect();
        }
    }
}

/// Hairer, Norsett and Wanner's starting step (Solving ODEs I, II.4): one extra evaluation.
fn initial_step(
    rhs: &mut Rhs,
    a: &Adaptive,
    order: usize,
    x0: &Tensor,
    f0: &Tensor,
    t0: f64,
    t1: f64,
) -> Result<Vec<f64>> {
    let span = (t1 - t0).abs();
    let dir = if t1 >= t0 { 1.0 } else { -1.0 };
    let order = order as f64;
    let d0 = a.norm_rows(x0, x0, None)?;
    let d1 = a.norm_rows(f0, x0, None)?;
    let h0: Vec<f64> = d0
        .iter()
        .zip(&d1)
        .map(|(&d0, &d1)| {
            if d0 < 1e-5 || d1 < 1e-5 {
                1e-6
            } else {
                0.01 * d0 / d1
            }
        })
        .map(|h: f64| h.min(span))
        .collect();
    let signed: Vec<f64> = h0.iter().map(|h| h * dir).collect();
    let x1 = axpy(x0, &signed, f0)?;
    let t_1: Vec<f64> = signed.iter().map(|h| t0 + h).collect();
    let f1 = rhs.eval(&t_1, &x1)?;
    let diff = a.norm_rows(&(f1 - f0)?, x0, None)?;
    Ok((0..h0.len())
        .map(|i| {
            let d2 = diff[i] / h0[i];
            let dmax = d1[i].max(d2);
            let h1 = if dmax <= 1e-15 {
                (h0[i] * 1e-3).max(1e-6)
            } else {
                (0.01 / dmax).powf(1.0 / order)
            };
            (100.0 * h0[i]).min(h1).min(span) * dir
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factors_are_bounded() {
        let a = Adaptive::new(1e-3, 1e-3).unwrap();
        assert_eq!(a.accept_factor(0.0, 1.0, 5), 10.0);
        assert_eq!(a.accept_factor(1e-30, 1.0, 5), 10.0);
        assert!(a.accept_factor(1.0, 1.0, 5) < 1.0);
        assert_eq!(a.reject_factor(1e30, 5), 0.2);
        assert_eq!(a.reject_factor(f64::NAN, 5), 0.2);
        assert!(a.reject_factor(1.5, 5) <= 1.0);
    }

    #[test]
    fn invalid_tolerances_are_rejected() {
        assert!(Adaptive::new(0.0, 1e-3).is_err());
        assert!(Adaptive::new(1e-3, -1.0).is_err());
        assert!(Adaptive::new(f64::NAN, 1e-3).is_err());
    }
}
