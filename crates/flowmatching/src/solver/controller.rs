//! Step-size control: constant steps, or PI control of the local error with Hairer's initial step.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

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
