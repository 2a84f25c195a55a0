//! `flowmatching eval`: straightness and few-step quality of a trained 2-D (or any point) model.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use flowmatching::checkpoint::Checkpoint;
use flowmatching::metrics::{checkerboard_support, energy_distance};
use flowmatching::model::Model;
use flowmatching::path::{AffinePath, AsVelocity};
use flowmatching::rng::Rng;
use flowmatching::solver::{Adaptive, SolveOptions, SolverKind};
use flowmatching::straightness::{straightness, Straightness};
use flowmatching::train::RunConfig;
use serde::{Deserialize, Serialize};

use crate::cli::EvalArgs;
use crate::cmd::sample::{initial_points, transport};
use crate::{io, plot};

/// Quality after a given number of Euler steps.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FewStep {
    pub euler_steps: usize,
    pub energy_distance: f64,
    /// Checkerboard only: fraction of samples inside the 8 squares.
    pub in_support: Option<f64>,
}

/// What `eval` measures.
#[derive(Debug, Clone, Serialize, Deserialize)]
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

/// Evaluates `model` against `reference` rows; returns the report and the sample sets (Euler 1, 2, 4, 8,
/// adaptive) for plotting.
pub fn evaluate(
    model: &Model,
    config: &RunConfig,
    reference: &[f32],
    checkerboard: bool,
    n: usize,
    seed: u64,
) -> Result<(EvalReport, Vec<Vec<f32>>)> {
    let dim = config.model.dim();
    let x0 = initial_points(config, n, seed)?;
    let path = AffinePath::from_config(&config.path)?;
    let field = AsVelocity {
        field: model,
        path: &path,
        prediction: config.prediction,
    };
    let s = straightness(
        &field,
        &Tensor::from_slice(&x0[..dim * n.min(2000)], (n.min(2000), dim), &Device::Cpu)?,
        100,
    )?;
    let mut few_step = vec![];
    let mut sets = vec![];
    for steps in EULER_STEPS {
        let (x, _) = transport(
            model,
            config,
            x0.clone(),
            SolverKind::Euler,
            &SolveOptions::constant(steps),
        )?;
        few_step.push(FewStep {
            euler_steps: steps,
            energy_distance: energy_distance(&x, reference, dim),
            in_support: checkerboard.then(|| checkerboard_support(&x).in_support_fraction),
        });
        sets.push(x);
    }
    let (x, sol) = transport(
        model,
        config,
        x0,
        SolverKind::Dopri5,
        &SolveOptions::adaptive(Adaptive::new(1e-5, 1e-5)?),
    )?;
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

/// `n` reference points from a data spec (fresh draws from a built-in set).
pub fn reference(spec: &str, n: usize, seed: u64) -> Result<Vec<f32>> {
    let data = io::open_data(spec)?;
    Ok(data.sample(&mut Rng::new(seed).fork(300), n))
}

pub fn run(a: &EvalArgs) -> Result<()> {
    if a.num_samples < 2 {
        bail!("--num-samples must be at least 2");
    }
    let ckpt = Checkpoint::load(&a.checkpoint, &Device::Cpu)?;
    let config = &ckpt.meta.config;
    let spec = a.data.clone().unwrap_or_else(|| config.data.clone());
    let refs = reference(&spec, a.num_samples, a.seed)?;
    let model = ckpt.model(&Device::Cpu, true)?;
    let (report, sets) = evaluate(
        &model,
        config,
        &refs,
        spec == "checkerboard",
        a.num_samples,
        a.seed,
    )?;
    if let Some(out) = &a.out {
        io::write_json(out, &report)?;
    }
    if let Some(p) = &a.plot {
        let mut all: Vec<&[f32]> = vec![&refs];
        all.extend(sets.iter().map(Vec::as_slice));
        plot::histograms(p, &all, config.model.dim(), plot::window(&refs), 80)?;
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
