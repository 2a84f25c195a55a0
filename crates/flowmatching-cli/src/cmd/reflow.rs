//! `flowmatching reflow`: one round of rectified flow (Liu et al. 2022). Pairs (x0, x1 = ODE solution
//! of the trained model from x0) are generated once, then a fresh model of the same architecture is
//! trained on those fixed pairs with independent coupling. Run it on its own output for more rounds.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Device;
use flowmatching::checkpoint::{self, Checkpoint};
use flowmatching::coupling::Coupling;
use flowmatching::data::PairedDataset;
use flowmatching::solver::{SolveOptions, SolverKind};
use flowmatching::train::{RunConfig, Trainer};

use crate::cli::ReflowArgs;
use crate::cmd::sample::{initial_points, transport};
use crate::cmd::train::{self, run_loop};
use crate::io;

/// The pairs of one reflow round: `n` starting points and where `ckpt`'s model carries them
/// (midpoint with `steps` steps).
pub fn pairs(ckpt: &Checkpoint, n: usize, steps: usize, seed: u64) -> Result<PairedDataset> {
    let config = &ckpt.meta.config;
    let model = ckpt.model(&Device::Cpu, true)?;
    let x0 = initial_points(config, n, seed)?;
    let (x1, _) = transport(
        &model,
        config,
        x0.clone(),
        SolverKind::Midpoint,
        &SolveOptions::constant(steps),
    )?;
    Ok(PairedDataset::new(
        x0,
        x1,
        config.model.dim(),
        "reflow pairs",
    )?)
}

/// The next round's config: same model and path, fixed pairs, independent coupling, a new seed.
pub fn next_config(config: &RunConfig, from: &Path, steps: u64) -> RunConfig {
    let mut c = config.clone();
    c.train.coupling = Coupling::Independent;
    c.train.steps = steps;
    c.train.seed = c.train.seed.wrapping_add(1);
    c.data = format!("reflow pairs of {}", from.display());
    c
}

pub fn run(a: &ReflowArgs) -> Result<()> {
    if a.pairs == 0 || a.solver_steps == 0 {
        bail!("--pairs and --solver-steps must be at least 1");
    }
    if a.out.join(checkpoint::META_FILE).exists() {
        bail!(
            "{} already holds a checkpoint; choose another --out",
            a.out.display()
        );
    }
    let ckpt = Checkpoint::load(&a.checkpoint, &Device::Cpu)?;
    if ckpt.meta.config.model.num_classes() > 0 {
        bail!("reflow of class-conditional models is not supported yet");
    }
    let steps = a.steps.unwrap_or(ckpt.meta.config.train.steps);
    let config = next_config(&ckpt.meta.config, &a.checkpoint, steps);
    let start = Instant::now();
    let data = pairs(&ckpt, a.pairs, a.solver_steps, a.seed)?;
    eprintln!(
        "{} pairs from {} in {:.1} s; training a new model for {steps} steps",
        a.pairs,
        a.checkpoint.display(),
        start.elapsed().as_secs_f64()
    );
    io::ensure_dir(&a.out)?;
    let mut trainer = Trainer::new(config, &Device::Cpu)?;
    let o = run_loop(&mut trainer, &data, None, &a.out, 0, None)?;
    train::report_done(&trainer, &o, &a.out);
    Ok(())
}
