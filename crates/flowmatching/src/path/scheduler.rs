//! Schedulers: the time functions of an affine Gaussian probability path.
//!
//! A scheduler returns, for a time t in [0, 1] (t = 0 noise, t = 1 data), the coefficients of
//!
//! ```text
//! x_t = sigma_t x0 + alpha_t x1,    d/dt x_t = d_sigma_t x0 + d_alpha_t x1
//! ```
//!
//! with x0 ~ N(0, I) and x1 a data point. [`crate::path::AffinePath`] turns any scheduler into
//! samples, regression targets and conversions between prediction types.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The scheduler's values at one time: alpha_t, sigma_t and their time derivatives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SchedulerOutput {
    pub alpha_t: f64,
    pub sigma_t: f64,
    pub d_alpha_t: f64,
    pub d_sigma_t: f64,
}

/// A probability-path schedule: alpha_t and sigma_t with their derivatives.
pub trait Scheduler: Send + Sync + std::fmt::Debug {
    /// Values at time `t` (t = 0 noise, t = 1 data).
    fn at(&self, t: f64) -> SchedulerOutput;
}

/// The conditional optimal-transport path of Lipman et al. (their eq. 20):
/// mu_t = t x1, sigma_t = 1 - (1 - sigma_min) t, so the conditional target is x1 - (1 - sigma_min) x0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CondOT {
    pub sigma_min: f64,
}

impl CondOT {
    /// `sigma_min` must lie in [0, 1); 1e-5 is the paper's default and 0 gives rectified flow.
    pub fn new(sigma_min: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&sigma_min) {
            return Err(Error::Config(format!(
                "sigma_min must lie in [0, 1), got {sigma_min}"
            )));
        }
        Ok(Self { sigma_min })
    }
}

impl Scheduler for CondOT {
    fn at(&self, t: f64) -> SchedulerOutput {
        SchedulerOutput {
            alpha_t: t,
            sigma_t: 1.0 - (1.0 - self.sigma_min) * t,
            d_alpha_t: 1.0,
            d_sigma_t: -(1.0 - self.sigma_min),
        }
    }
}

/// The variance-preserving diffusion path written as in the flow-matching paper (their eq. 19):
///
/// ```text
/// beta(s) = beta_min + s (beta_max - beta_min),  T(s) = int_0^s beta = beta_min s + (beta_max - beta_min) s^2 / 2
/// a(s) = exp(-T(s) / 2),  mu_t = a(1 - t) x1,  sigma_t = sqrt(1 - a(1 - t)^2)
/// ```
///
/// The diffusion time s = 1 - t runs the other way from ours. At t = 1, sigma_t = 0 and its derivative is
/// -infinity; to keep every quantity finite the schedule is evaluated at s = max(1 - t, [`VP::S_MIN`]),
/// which leaves sigma_t at about 1e-3 at the data end (the same role as sigma_min on the OT path).
/// The path never reaches pure noise: at t = 0, alpha_t = exp(-T(1)/2), about 6.6e-3 with the defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VP {
    pub beta_min: f64,
    pub beta_max: f64,
}

impl VP {
    /// The usual schedule of Song et al. and the flow-matching paper: beta_min = 0.1, beta_max = 20.
    pub const BETA_MIN: f64 = 0.1;
    pub const BETA_MAX: f64 = 20.0;
}

impl Default for VP {
    fn default() -> Self {
        Self {
            beta_min: Self::BETA_MIN,
            beta_max: Self::BETA_MAX,
        }
    }
}

impl VP {
    /// Smallest diffusion time s = 1 - t at which the schedule is evaluated.
    pub const S_MIN: f64 = 1e-5;

    pub fn new(beta_min: f64, beta_max: f64) -> Result<Self> {
        if !(beta_min > 0.0 && beta_max >= beta_min && beta_max.is_finite()) {
            return Err(Error::Config(format!(
                "VP path needs 0 < beta_min <= beta_max, got beta_min {beta_min}, beta_max {beta_max}"
            )));
        }
        Ok(Self { beta_min, beta_max })
    }

    /// beta(s) at diffusion time s.
    pub fn beta(&self, s: f64) -> f64 {
        self.beta_min + s * (self.beta_max - self.beta_min)
    }

    /// T(s) = integral of beta from 0 to s.
    pub fn big_t(&self, s: f64) -> f64 {
        self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s * s
    }
}

impl Scheduler for VP {
    fn at(&self, t: f64) -> SchedulerOutput {
        let s = (1.0 - t).max(Self::S_MIN);
        let big_t = self.big_t(s);
        let a = (-0.5 * big_t).exp();
        // 1 - a^2 = -expm1(-T), accurate for small T.
        let sigma = (-(-big_t).exp_m1()).sqrt();
        // d a / dt = -d a / ds = beta(s) a / 2;  d sigma / dt = -a (d a / dt) / sigma.
        let d_alpha = 0.5 * self.beta(s) * a;
        let d_sigma = -a * d_alpha / sigma;
        SchedulerOutput {
            alpha_t: a,
            sigma_t: sigma,
            d_alpha_t: d_alpha,
            d_sigma_t: d_sigma,
        }
    }
}

/// The cosine schedule: alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Cosine;

impl Scheduler for Cosine {
    fn at(&self, t: f64) -> SchedulerOutput {
        let w = std::f64::consts::FRAC_PI_2;
        SchedulerOutput {
            alpha_t: (w * t).sin(),
            sigma_t: (w * t).cos(),
            d_alpha_t: w * (w * t).cos(),
            d_sigma_t: -w * (w * t).sin(),
        }
    }
}

/// The polynomial convex schedule: alpha_t = t^n, sigma_t = 1 - t^n (n = 1 is CondOT with sigma_min 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Polynomial {
    pub n: f64,
}

impl Polynomial {
    pub fn new(n: f64) -> Result<Self> {
        if !(n > 0.0 && n.is_finite()) {
            return Err(Error::Config(format!(
                "polynomial exponent must be positive, got {n}"
            )));
        }
        Ok(Self { n })
    }
}

impl Scheduler for Polynomial {
    fn at(&self, t: f64) -> SchedulerOutput {
        let tn = t.powf(self.n);
        let d = if t == 0.0 && self.n < 1.0 {
            f64::INFINITY
        } else {
            self.n * t.powf(self.n - 1.0)
        };
        SchedulerOutput {
            alpha_t: tn,
            sigma_t: 1.0 - tn,
            d_alpha_t: d,
            d_sigma_t: -d,
        }
    }
}

/// A serialisable choice of scheduler, as stored in configs and checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SchedulerConfig {
    CondOt { sigma_min: f64 },
    Vp { beta_min: f64, beta_max: f64 },
    Cosine,
    Polynomial { n: f64 },
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig::CondOt { sigma_min: 1e-5 }
    }
}

impl SchedulerConfig {
    /// The VP path with the default betas ([`VP::BETA_MIN`], [`VP::BETA_MAX`]).
    pub fn default_vp() -> Self {
        SchedulerConfig::Vp {
            beta_min: VP::BETA_MIN,
            beta_max: VP::BETA_MAX,
        }
    }

    /// Builds the scheduler, checking its parameters.
    pub fn build(&self) -> Result<Box<dyn Scheduler>> {
        Ok(match *self {
            SchedulerConfig::CondOt { sigma_min } => Box::new(CondOT::new(sigma_min)?),
            SchedulerConfig::Vp { beta_min, beta_max } => Box::new(VP::new(beta_min, beta_max)?),
            SchedulerConfig::Cosine => Box::new(Cosine),
            SchedulerConfig::Polynomial { n } => Box::new(Polynomial::new(n)?),
        })
    }

    /// Parses a name as used on the command line: `ot`, `vp`, `cosine`, `poly` (defaults for parameters).
    pub fn from_name(name: &str, sigma_min: f64) -> Result<Self> {
        match name {
            "ot" | "cond-ot" | "condot" => Ok(SchedulerConfig::CondOt { sigma_min }),
            "vp" | "diffusion" => Ok(SchedulerConfig::default_vp()),
            "cosine" => Ok(SchedulerConfig::Cosine),
            "poly" | "polynomial" => Ok(SchedulerConfig::Polynomial { n: 2.0 }),
            other => Err(Error::Config(format!(
                "unknown path '{other}': expected one of ot, vp, cosine, poly"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Box<dyn Scheduler>> {
        vec![
            Box::new(CondOT::new(1e-5).unwrap()),
            Box::new(CondOT::new(0.0).unwrap()),
            Box::new(VP::default()),
            Box::new(Cosine),
            Box::new(Polynomial::new(2.0).unwrap()),
            Box::new(Polynomial::new(3.5).unwrap()),
        ]
    }

    #[test]
    fn derivatives_match_finite_differences() {
        let h = 1e-6;
        for s in all() {
            for i in 1..40 {
                let t = i as f64 / 40.0;
                let (lo, hi) = (s.at(t - h), s.at(t + h));
                let fd_alpha = (hi.alpha_t - lo.alpha_t) / (2.0 * h);
                let fd_sigma = (hi.sigma_t - lo.sigma_t) / (2.0 * h);
                let o = s.at(t);
                let tol = |x: f64| 1e-5 * (1.0 + x.abs());
                assert!(
                    (o.d_alpha_t - fd_alpha).abs() < tol(fd_alpha),
                    "{s:?} d_alpha at {t}"
                );
                assert!(
                    (o.d_sigma_t - fd_sigma).abs() < tol(fd_sigma),
                    "{s:?} d_sigma at {t}"
                );
            }
        }
    }

    #[test]
    fn endpoints() {
        let ot = CondOT::new(1e-5).unwrap();
        assert_eq!(ot.at(0.0).sigma_t, 1.0);
        assert_eq!(ot.at(0.0).alpha_t, 0.0);
        assert!((ot.at(1.0).sigma_t - 1e-5).abs() < 1e-15);
        assert_eq!(ot.at(1.0).alpha_t, 1.0);
        let c = Cosine.at(1.0);
        assert!((c.alpha_t - 1.0).abs() < 1e-12 && c.sigma_t.abs() < 1e-12);
    }

    /// VP values against an independent computation in the original (s = 1 - t) form of Song et al.:
    /// mean coefficient exp(-1/4 s^2 (b1 - b0) - 1/2 s b0), variance 1 - exp(-1/2 s^2 (b1 - b0) - s b0).
    #[test]
    fn vp_matches_closed_form() {
        let vp = VP::default();
        for &t in &[0.0, 0.1, 0.37, 0.5, 0.8, 0.99] {
            let s: f64 = 1.0 - t;
            let log_mean = -0.25 * s * s * (20.0 - 0.1) - 0.5 * s * 0.1;
            let mean = log_mean.exp();
            let std = (1.0 - (2.0 * log_mean).exp()).sqrt();
            let o = vp.at(t);
            assert!((o.alpha_t - mean).abs() < 1e-12, "alpha at {t}");
            assert!((o.sigma_t - std).abs() < 1e-12, "sigma at {t}");
            // variance preserving
            assert!((o.alpha_t.powi(2) + o.sigma_t.powi(2) - 1.0).abs() < 1e-12);
        }
        // Known value at t = 0: alpha = exp(-T(1)/2), T(1) = 0.1 + 19.9 / 2.
        assert!((vp.at(0.0).alpha_t - (-0.5f64 * 10.05).exp()).abs() < 1e-15);
    }

    #[test]
    fn vp_is_finite_at_the_data_end() {
        let o = VP::default().at(1.0);
        for v in [o.alpha_t, o.sigma_t, o.d_alpha_t, o.d_sigma_t] {
            assert!(v.is_finite());
        }
        assert!(o.sigma_t > 0.0 && o.sigma_t < 2e-3);
    }

    #[test]
    fn bad_parameters_are_rejected() {
        assert!(CondOT::new(1.0).is_err());
        assert!(CondOT::new(-0.1).is_err());
        assert!(VP::new(0.0, 20.0).is_err());
        assert!(Polynomial::new(0.0).is_err());
        assert!(SchedulerConfig::from_name("nope", 0.0).is_err());
    }
}
