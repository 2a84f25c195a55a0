//! One round of rectified flow (Liu et al. 2022, "Flow Straight and Fast"): pairs (x0, x1 = the trained
//! model's ODE solution from x0) are generated once, then a fresh model of the same architecture is
//! trained on those fixed pairs with independent coupling.

use crate::coupling::Coupling;
use crate::data::{DataSource, PairedDataset};
use crate::error::Result;
use crate::nn::Model;
use crate::sample::{initial_points, transport};
use crate::solver::{SolveOptions, SolverKind};
use crate::train::RunConfig;

/// The pairs of one reflow round: `n` start points (noise from `seed`, or draws from the run's
/// `source`) and where `model` carries them (midpoint with `steps` steps).
pub fn pairs(
    model: &Model,
    config: &RunConfig,
    source: Option<&dyn DataSource>,
    n: usize,
    steps: usize,
    seed: u64,
) -> Result<PairedDataset> {
    let x0 = initial_points(config, n, seed, source)?;
    let opts = SolveOptions::constant(steps);
    let (x1, _) = transport(model, config, x0.clone(), SolverKind::Midpoint, &opts)?;
    PairedDataset::new(x0, x1, config.model.dim(), "reflow pairs")
}

/// The next round's config: same model and path, `steps` steps on the fixed pairs (described as
/// `data`), independent coupling, a new seed.
pub fn next_config(config: &RunConfig, data: String, steps: u64) -> RunConfig {
    let mut c = config.clone();
    c.train.coupling = Coupling::Independent;
    c.train.steps = steps;
    c.train.seed = c.train.seed.wrapping_add(1);
    c.data = data;
    c
}
