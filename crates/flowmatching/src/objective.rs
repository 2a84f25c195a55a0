//! Training objectives on one footing: a probability path, what the network predicts, and a loss weight
//! lambda(t). Every objective regresses the network's output onto a closed-form per-example target on its
//! path, and every objective samples through the same probability-flow ODE: its prediction is converted to
//! a velocity by [`crate::path::AffinePath::to_velocity`].
//!
//! In our convention (t = 0 noise, t = 1 data; x_t = sigma_t x0 + alpha_t x1), with D the dimension:
//!
//! ```text
//! FM-OT          E || v(x_t, t) - (x1 - (1 - sigma_min) x0) ||^2 / D        CondOT path, lambda = 1
//! FM-diffusion   E || v(x_t, t) - (d_sigma_t x0 + d_alpha_t x1) ||^2 / D   VP path, lambda = 1
//! DDPM           E || eps(x_t, t) - x0 ||^2 / D                             VP path, lambda = 1
//! score matching E sigma_t^2 || s(x_t, t) + x0 / sigma_t ||^2 / D           VP path, lambda = sigma_t^2
//! ScoreFlow      E beta(1 - t) || s(x_t, t) + x0 / sigma_t ||^2 / D         VP path, lambda = beta(1 - t)
//! ```
//!
//! The VP path's beta and alpha are written in diffusion time s = 1 - t, hence beta(1 - t).
//! The score target -x0 / sigma_t diverges as sigma_t -> 0 at the data end (the flow-matching paper's
//! point about target scale). We keep each objective as defined and guard only the end point: the VP
//! schedule is evaluated at s >= 1e-5 (the epsilon of Song et al.'s VP SDE training), so sigma_t >= about 1e-3 and the largest score
//! target is about 1000 |x0|. Gradient-norm clipping, the same for all objectives, bounds the steps.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::path::Prediction;
use crate::path::{SchedulerConfig, VP};

/// The per-time loss weight lambda(t).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Weighting {
    /// lambda = 1.
    #[default]
    Uniform,
    /// lambda = sigma_t^2 (original denoising score matching).
    SigmaSquared,
    /// lambda = beta(1 - t) (ScoreFlow's likelihood weighting; VP path only).
    Beta,
}

impl Weighting {
    /// lambda at each time for the path `path`.
    pub fn weights(&self, path: &SchedulerConfig, t: &[f64]) -> Result<Option<Vec<f64>>> {
        match self {
            Weighting::Uniform => Ok(None),
            Weighting::SigmaSquared => {
                let s = path.build()?;
                Ok(Some(t.iter().map(|&t| s.at(t).sigma_t.powi(2)).collect()))
            }
            Weighting::Beta => {
                let SchedulerConfig::Vp { beta_min, beta_max } = *path else {
                    return Err(Error::Config(
                        "the beta(1 - t) weighting needs the VP path".into(),
                    ));
                };
                let vp = VP::new(beta_min, beta_max)?;
                Ok(Some(
                    t.iter()
                        .map(|&t| vp.beta((1.0 - t).max(VP::S_MIN)))
                        .collect(),
                ))
            }
        }
    }
}

/// The five objectives of the flow-matching paper's ablation (its Table 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    FmOt,
    FmDiffusion,
    Ddpm,
    ScoreMatching,
    ScoreFlow,
}

impl Objective {
    pub const ALL: [Objective; 5] = [
        Objective::Ddpm,
        Objective::ScoreMatching,
        Objective::ScoreFlow,
        Objective::FmDiffusion,
        Objective::FmOt,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Objective::FmOt => "FM-OT",
            Objective::FmDiffusion => "FM-diffusion",
            Objective::Ddpm => "DDPM",
            Objective::ScoreMatching => "score matching",
            Objective::ScoreFlow => "ScoreFlow",
        }
    }

    /// Path, prediction and weighting.
    pub fn parts(&self) -> (SchedulerConfig, Prediction, Weighting) {
        let vp = SchedulerConfig::default_vp();
        match self {
            Objective::FmOt => (
                SchedulerConfig::CondOt { sigma_min: 1e-5 },
                Prediction::Velocity,
                Weighting::Uniform,
            ),
            Objective::FmDiffusion => (vp, Prediction::Velocity, Weighting::Uniform),
            Objective::Ddpm => (vp, Prediction::Epsilon, Weighting::Uniform),
            Objective::ScoreMatching => (vp, Prediction::Score, Weighting::SigmaSquared),
            Objective::ScoreFlow => (vp, Prediction::Score, Weighting::Beta),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::empirical::EmpiricalField;
    use crate::path::AffinePath;
    use candle_core::{Device, Tensor};

    /// For the exact optimum of a finite data set, the optimal noise, score and x1 predictions all convert
    /// back to the same (marginal) velocity on the VP path: the objectives share one probability-flow ODE.
    #[test]
    fn optimal_predictions_convert_to_the_same_velocity() {
        let data = Tensor::new(&[[1.0f64, 0.5], [-1.0, 1.5], [0.3, -2.0]], &Device::Cpu).unwrap();
        let vp = SchedulerConfig::default_vp();
        let field = EmpiricalField::new(AffinePath::from_config(&vp).unwrap(), &data).unwrap();
        let path = AffinePath::from_config(&vp).unwrap();
        let x = Tensor::new(
            &[[0.2f64, -0.1], [1.0, 1.0], [-0.5, 0.7], [2.0, -1.0]],
            &Device::Cpu,
        )
        .unwrap();
        let t = [0.1, 0.4, 0.7, 0.95];
        let v = field.predict(Prediction::Velocity, &x, &t).unwrap();
        for kind in [Prediction::Epsilon, Prediction::Score, Prediction::X1] {
            let p = field.predict(kind, &x, &t).unwrap();
            let back = path.to_velocity(kind, &p, &x, &t).unwrap();
            let d = crate::testing::max_abs_diff(&back, &v);
            assert!(d < 1e-8, "{kind:?}: {d}");
        }
    }

    #[test]
    fn weights() {
        let vp = SchedulerConfig::default_vp();
        let w = Weighting::Beta.weights(&vp, &[0.0, 1.0]).unwrap().unwrap();
        assert!((w[0] - 20.0).abs() < 1e-12 && (w[1] - 0.1).abs() < 1e-3);
        let s = Weighting::SigmaSquared
            .weights(&vp, &[0.5])
            .unwrap()
            .unwrap();
        let o = VP::default();
        assert!((s[0] - crate::path::Scheduler::at(&o, 0.5).sigma_t.powi(2)).abs() < 1e-15);
        assert!(Weighting::Beta
            .weights(&SchedulerConfig::CondOt { sigma_min: 0.0 }, &[0.5])
            .is_err());
        assert!(Weighting::Uniform.weights(&vp, &[0.5]).unwrap().is_none());
    }
}
