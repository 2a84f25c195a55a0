//! A 2-D model's flow in numbers: straightness of its trajectories, quality after 1, 2, 4 and 8 Euler
//! steps, and the adaptive solve's NFE and quality (what `flowmatching eval` reports).

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::metrics::{checkerboard_support, energy_distance};
use super::straightness::{straightness, Straightness};
use crate::data::DataSource;
use crate::error::Result;
use crate::nn::Model;
use crate::sample::{initial_points, transport, RunField};
use crate::solver::{Adaptive, SolveOptions, SolverKind};
use crate::train::RunConfig;

/// Quality after a given number of Euler steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FewStep {
    pub euler_steps: usize,
    pub energy_distance: f64,
    /// Checkerboard only: fraction of samples inside the 8 squares.
    pub in_support: Option<f64>,
}

/// What [`evaluate`] measures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub straightness: Straightness,
    pub few_step: Vec<FewStep>,
    /// Dopri5 at rtol = atol = 1e-5.
    pub adaptive_nfe: usize,
    pub adaptive_energy_distance: f64,
    pub num_samples: usize,
}

/// Euler step counts of the few-step table.
pub const EULER_STEPS: [usize; 4] = [1, 2, 4, 8];

/// Evaluates `model` against `reference` rows from `n` start points (noise from `seed`, or draws from
/// the run's `source`); returns the report and the sample sets (Euler 1, 2, 4, 8, adaptive).
pub fn evaluate(
    model: &Model,
    config: &RunConfig,
    source: Option<&dyn DataSource>,
    reference: &[f32],
    checkerboard: bool,
    n: usize,
    seed: u64,
) -> Result<(EvalReport, Vec<Vec<f32>>)> {
    let dim = config.model.dim();
    let x0 = initial_points(config, n, seed, source)?;
    let field = RunField::new(model, config)?;
    let m = n.min(2000);
    let s = straightness(
        &field,
        &Tensor::from_slice(&x0[..dim * m], (m, dim), &Device::Cpu)?,
        100,
    )?;
    let mut few_step = vec![];
    let mut sets = vec![];
    for steps in EULER_STEPS {
        let opts = SolveOptions::constant(steps);
        let (x, _) = transport(model, config, x0.clone(), SolverKind::Euler, &opts)?;
        few_step.push(FewStep {
            euler_steps: steps,
            energy_distance: energy_distance(&x, reference, dim),
            in_support: checkerboard.then(|| checkerboard_support(&x).in_support_fraction),
        });
        sets.push(x);
    }
    let opts = SolveOptions::adaptive(Adaptive::new(1e-5, 1e-5)?);
    let (x, sol) = transport(model, config, x0, SolverKind::Dopri5, &opts)?;
    let report = EvalReport {
        straightness: s,
        few_step,
        adaptive_nfe: sol.stats.nfe,
        adaptive_energy_distance: energy_distance(&x, reference, dim),
        num_samples: n,
    };
    sets.push(x);
    Ok((report, sets))
}
