//! Where in time a run spends its effort: the distribution training draws t from ([`TimeSampling`]) and
//! the grid a fixed-step solver walks ([`TimeGrid`]).
//!
//! Convention: t = 0 is noise, t = 1 is data. Stable Diffusion 3 (Esser et al. 2024, "Scaling rectified
//! flow transformers for high-resolution image synthesis") and Flux write their formulas for a time
//! that is 1 at noise; every formula below is theirs with t replaced by 1 - t, and says so.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// The distribution of training times t.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TimeSampling {
    /// t ~ U[0, 1] (the flow-matching paper's choice).
    #[default]
    Uniform,
    /// t = sigmoid(m + s n), n ~ N(0, 1): density 1 / (s sqrt(2 pi)) 1 / (t (1 - t))
    /// exp(-(logit t - m)^2 / (2 s^2)). SD3's logit-normal with location m_SD3 is ours with m = -m_SD3
    /// (SD3's t is 1 - ours); SD3 trains with m = 0, s = 1.
    LogitNormal { m: f64, s: f64 },
    /// SD3's mode sampling with heavy tails: t = u + s (cos^2(pi u / 2) - 1 + u), u ~ U[0, 1] (SD3's
    /// f_mode(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u) is its noise level, 1 - ours). s > 0 puts more
    /// weight at middle times, s < 0 at the ends; s must lie in [-1, 2 / (pi - 2)] for the map to be
    /// monotone.
    Mode { s: f64 },
    /// SD3's CosMap: t = 1 / (1 + tan(pi u / 2)), u ~ U[0, 1], of density 2 / (pi (1 - 2 t + 2 t^2))
    /// (symmetric about 1/2, so the same in either time convention).
    CosMap,
}

impl TimeSampling {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        match *self {
            TimeSampling::Uniform | TimeSampling::CosMap => Ok(()),
            TimeSampling::LogitNormal { m, s } => {
                if !(m.is_finite() && s > 0.0 && s.is_finite()) {
                    return bad(format!(
                        "logit-normal time sampling needs a finite location and a positive scale, \
                         got m = {m}, s = {s}"
                    ));
                }
                Ok(())
            }
            TimeSampling::Mode { s } => {
                if !(-1.0..=MODE_MAX_SCALE).contains(&s) {
                    return bad(format!(
                        "mode time sampling needs a scale in [-1, {MODE_MAX_SCALE:.4}] (where the map \
                         is monotone), got {s}"
                    ));
                }
                Ok(())
            }
        }
    }

    /// `n` times drawn from `rng`. Uniform draws exactly as `rng.uniform_vec(n)`.
    pub fn sample(&self, rng: &mut Rng, n: usize) -> Vec<f64> {
        match *self {
            TimeSampling::Uniform => rng.uniform_vec(n),
            TimeSampling::LogitNormal { m, s } => (0..n)
                .map(|_| 1.0 / (1.0 + (-(m + s * rng.normal())).exp()))
                .collect(),
            TimeSampling::Mode { s } => (0..n).map(|_| mode_map(rng.uniform(), s)).collect(),
            TimeSampling::CosMap => (0..n).map(|_| cosmap(rng.uniform())).collect(),
        }
    }

    /// The density of t where it has a closed form (all but mode sampling, whose quantile function
    /// [`mode_map`] is the closed form instead).
    pub fn density(&self, t: f64) -> Option<f64> {
        if !(0.0..=1.0).contains(&t) {
            return Some(0.0);
        }
        match *self {
            TimeSampling::Uniform => Some(1.0),
            TimeSampling::LogitNormal { m, s } => {
                let z = (t / (1.0 - t)).ln();
                let norm = s * (2.0 * std::f64::consts::PI).sqrt() * t * (1.0 - t);
                Some((-(z - m).powi(2) / (2.0 * s * s)).exp() / norm)
            }
            TimeSampling::CosMap => {
                Some(2.0 / (std::f64::consts::PI * (1.0 - 2.0 * t + 2.0 * t * t)))
            }
            TimeSampling::Mode { .. } => None,
        }
    }
}

/// The largest mode-sampling scale for which the map stays monotone: 2 / (pi - 2).
pub const MODE_MAX_SCALE: f64 = 2.0 / (std::f64::consts::PI - 2.0);

/// Mode sampling's quantile function: u + s (cos^2(pi u / 2) - 1 + u), clamped to [0, 1].
pub fn mode_map(u: f64, s: f64) -> f64 {
    let c = (std::f64::consts::FRAC_PI_2 * u).cos();
    (u + s * (c * c - 1.0 + u)).clamp(0.0, 1.0)
}

/// CosMap's quantile function: 1 / (1 + tan(pi u / 2)), clamped to [0, 1].
fn cosmap(u: f64) -> f64 {
    (1.0 / (1.0 + (std::f64::consts::FRAC_PI_2 * u).tan())).clamp(0.0, 1.0)
}

/// The times of a fixed-step solve: step k of N runs from t(k / N) to t((k + 1) / N), with t a
/// monotone map of [0, 1] onto itself.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TimeGrid {
    /// t(u) = u: equal steps.
    #[default]
    Uniform,
    /// The SD3 / Flux timestep shift: t(u) = u / (s - (s - 1) u). Their shift is sigma' = s sigma /
    /// (1 + (s - 1) sigma) of the noise level sigma = 1 - t, which is this map; its inverse
    /// u = s t / (1 + (s - 1) t) is the same formula in our time. s > 1 spends more steps near the
    /// noise (SD3 uses s = 3 at 1024 px), s < 1 near the data.
    Shift { s: f64 },
    /// EDM's grid (Karras et al. 2022, "Elucidating the design space of diffusion-based generative
    /// models"): the noise-to-signal ratio sigma = (1 - t) / t of the OT path spaced evenly in
    /// sigma^(1 / rho) from EDM's sigma_max = 80 to sigma_min = 0.002, its times stretched onto
    /// [0, 1]. In t the steps are small at both ends (t = 1 / (1 + sigma) is flat at large sigma)
    /// and largest in between; with rho = 7 (EDM's), 10 steps run 0, 0.009, 0.027, 0.063, 0.136,
    /// 0.276, 0.504, 0.757, 0.923, 0.985, 1.
    Edm { rho: f64 },
}

/// EDM's sigma range.
const EDM_SIGMA_MAX: f64 = 80.0;
const EDM_SIGMA_MIN: f64 = 0.002;

impl TimeGrid {
    pub fn validate(&self) -> Result<()> {
        match *self {
            TimeGrid::Uniform => Ok(()),
            TimeGrid::Shift { s } if s > 0.0 && s.is_finite() => Ok(()),
            TimeGrid::Edm { rho } if rho > 0.0 && rho.is_finite() => Ok(()),
            TimeGrid::Shift { s } => Err(Error::Config(format!(
                "the time-grid shift must be positive, got {s}"
            ))),
            TimeGrid::Edm { rho } => Err(Error::Config(format!(
                "the EDM grid's rho must be positive, got {rho}"
            ))),
        }
    }

    /// t(u) for u in [0, 1]: 0 at 0, 1 at 1, increasing.
    pub fn at(&self, u: f64) -> f64 {
        let u = u.clamp(0.0, 1.0);
        match *self {
            TimeGrid::Uniform => u,
            TimeGrid::Shift { s } => u / (s - (s - 1.0) * u),
            TimeGrid::Edm { rho } => {
                let t = |u: f64| {
                    let (a, b) = (EDM_SIGMA_MAX.powf(1.0 / rho), EDM_SIGMA_MIN.powf(1.0 / rho));
                    1.0 / (1.0 + (a + u * (b - a)).powf(rho))
                };
                let (t0, t1) = (t(0.0), t(1.0));
                ((t(u) - t0) / (t1 - t0)).clamp(0.0, 1.0)
            }
        }
    }

    /// The N + 1 times of an N-step solve from `t0` to `t1`.
    pub fn times(&self, t0: f64, t1: f64, steps: usize) -> Vec<f64> {
        (0..=steps)
            .map(|k| {
                if k == steps {
                    t1
                } else {
                    t0 + (t1 - t0) * self.at(k as f64 / steps as f64)
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A histogram of 400,000 draws against the closed-form density, bin by bin within 5 standard
    /// errors (and 2% of the density).
    fn matches_density(sampling: TimeSampling) {
        let n = 400_000;
        let bins = 40;
        let mut counts = vec![0usize; bins];
        for t in sampling.sample(&mut Rng::new(11), n) {
            assert!((0.0..=1.0).contains(&t), "{t}");
            counts[((t * bins as f64) as usize).min(bins - 1)] += 1;
        }
        for (k, &c) in counts.iter().enumerate() {
            // The bin's probability by Simpson's rule on 64 panels.
            let (a, w) = (k as f64 / bins as f64, 1.0 / bins as f64);
            let h = w / 64.0;
            let f = |x: f64| sampling.density(x.clamp(1e-12, 1.0 - 1e-12)).unwrap();
            let p: f64 = (0..64)
                .map(|i| {
                    let x = a + i as f64 * h;
                    h / 6.0 * (f(x) + 4.0 * f(x + h / 2.0) + f(x + h))
                })
                .sum();
            let expected = p * n as f64;
            let se = expected.sqrt();
            assert!(
                (c as f64 - expected).abs() <= 5.0 * se + 0.02 * expected,
                "{sampling:?} bin {k}: {c} draws, expected {expected:.0}"
            );
        }
    }

    #[test]
    fn sampled_times_follow_their_densities() {
        matches_density(TimeSampling::Uniform);
        matches_density(TimeSampling::LogitNormal { m: 0.0, s: 1.0 });
        matches_density(TimeSampling::LogitNormal { m: 0.8, s: 0.5 });
        matches_density(TimeSampling::CosMap);
    }

    #[test]
    fn mode_sampling_has_its_quantiles() {
        // The empirical u-quantiles of the draws are mode_map(u).
        let s = 1.29;
        let mut t = TimeSampling::Mode { s }.sample(&mut Rng::new(12), 200_000);
        t.sort_by(f64::total_cmp);
        for u in [0.05, 0.25, 0.5, 0.75, 0.95] {
            let q = t[(u * t.len() as f64) as usize];
            assert!(
                (q - mode_map(u, s)).abs() < 0.01,
                "u {u}: {q} vs {}",
                mode_map(u, s)
            );
        }
        // s = 0 is uniform; the map is monotone up to 2 / (pi - 2) and not beyond.
        assert_eq!(mode_map(0.3, 0.0), 0.3);
        let monotone = |s: f64| {
            (0..1000)
                .all(|i| mode_map((i + 1) as f64 / 1000.0, s) >= mode_map(i as f64 / 1000.0, s))
        };
        assert!(monotone(MODE_MAX_SCALE) && monotone(-1.0));
        assert!(TimeSampling::Mode { s: 2.0 }.validate().is_err());
        assert!(TimeSampling::LogitNormal { m: 0.0, s: 0.0 }
            .validate()
            .is_err());
    }

    #[test]
    fn uniform_sampling_draws_as_before() {
        let (mut a, mut b) = (Rng::new(5), Rng::new(5));
        assert_eq!(TimeSampling::Uniform.sample(&mut a, 9), b.uniform_vec(9));
    }

    #[test]
    fn grids_run_from_0_to_1_and_the_shift_inverts_as_published() {
        for g in [
            TimeGrid::Uniform,
            TimeGrid::Shift { s: 3.0 },
            TimeGrid::Shift { s: 0.5 },
            TimeGrid::Edm { rho: 7.0 },
        ] {
            let t = g.times(0.0, 1.0, 16);
            assert_eq!((t[0], t[16]), (0.0, 1.0), "{g:?}");
            assert!(t.windows(2).all(|w| w[1] > w[0]), "{g:?}: {t:?}");
        }
        // Our map's inverse is SD3's formula in our time: u = s t / (1 + (s - 1) t).
        let s = 3.0;
        for u in [0.1, 0.4, 0.9] {
            let t = TimeGrid::Shift { s }.at(u);
            assert!((s * t / (1.0 + (s - 1.0) * t) - u).abs() < 1e-12);
            // SD3's shift of its noise level sigma = 1 - u gives 1 - t.
            let sigma = 1.0 - u;
            assert!((s * sigma / (1.0 + (s - 1.0) * sigma) - (1.0 - t)).abs() < 1e-12);
        }
        // s > 1: smaller steps near the noise (t = 0).
        let t = TimeGrid::Shift { s: 3.0 }.times(0.0, 1.0, 10);
        assert!(t[1] - t[0] < t[10] - t[9]);
        // EDM with rho = 7: small steps at both ends, the largest in between (as documented).
        let t = TimeGrid::Edm { rho: 7.0 }.times(0.0, 1.0, 10);
        assert!(
            (t[1] - 0.0094).abs() < 1e-4 && (t[6] - 0.5037).abs() < 1e-4,
            "{t:?}"
        );
        assert!(t[1] - t[0] < t[6] - t[5] && t[10] - t[9] < t[6] - t[5]);
        assert!(TimeGrid::Shift { s: 0.0 }.validate().is_err());
    }
}
