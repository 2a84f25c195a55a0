//! `flowmatching sample`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use flowmatching::checkpoint::Checkpoint;
use flowmatching::model::Model;
use flowmatching::path::{AffinePath, AsVelocity};
use flowmatching::rng::Rng;
use flowmatching::solver::{integrate, SolverKind, Stats};
use flowmatching::train::RunConfig;
use serde::Serialize;

use crate::cli::{SampleArgs, SolverArg};
use crate::{io, plot};

/// Draws `n` samples from noise seeded by `seed`.
pub fn draw(
    model: &Model,
    config: &RunConfig,
    n: usize,
    solver: SolverKind,
    steps: usize,
    seed: u64,
) -> Result<(Vec<f32>, Stats)> {
    let dim = config.model.dim();
    let path = AffinePath::from_config(&config.path)?;
    let field = AsVelocity {
        field: model,
        path: &path,
        prediction: config.prediction,
    };
    let x0 = Tensor::from_vec(Rng::new(seed).normal_vec(n * dim), (n, dim), &Device::Cpu)?;
    let sol = integrate(
        &field,
        solver.solver().as_ref(),
        &x0,
        0.0,
        1.0,
        steps,
        false,
    )?;
    let x: Vec<f32> = sol.x.flatten_all()?.to_vec1()?;
    Ok((x, sol.stats))
}

pub fn solver_kind(s: SolverArg) -> SolverKind {
    match s {
        SolverArg::Euler => SolverKind::Euler,
        SolverArg::Midpoint => SolverKind::Midpoint,
        SolverArg::Heun => SolverKind::Heun,
        SolverArg::Rk4 => SolverKind::Rk4,
    }
}

/// `samples.npy` -> `samples.stats.json`.
pub fn stats_path(out: &Path) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "samples".into());
    out.with_file_name(format!("{stem}.stats.json"))
}

#[derive(Serialize)]
struct SampleReport<'a> {
    checkpoint: String,
    solver: SolverKind,
    steps: usize,
    num_samples: usize,
    seed: u64,
    ema: bool,
    seconds: f64,
    stats: &'a Stats,
}

pub fn run(a: &SampleArgs) -> Result<()> {
    if a.num_samples == 0 {
        bail!("--num-samples must be at least 1");
    }
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if a.out.extension().and_then(|e| e.to_str()) != Some("npy") {
        bail!("--out must name a .npy file, got {}", a.out.display());
    }
    let ckpt = Checkpoint::load(&a.checkpoint, &Device::Cpu)?;
    let model = ckpt.model(&Device::Cpu, !a.raw_weights)?;
    let start = Instant::now();
    let kind = solver_kind(a.solver);
    let (x, stats) = draw(
        &model,
        &ckpt.meta.config,
        a.num_samples,
        kind,
        a.steps,
        a.seed,
    )?;
    let seconds = start.elapsed().as_secs_f64();
    let dim = ckpt.meta.config.model.dim();
    if let Some(parent) = a.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        io::ensure_dir(parent)?;
    }
    io::write_npy(&a.out, &x, dim)?;
    let report = SampleReport {
        checkpoint: a.checkpoint.display().to_string(),
        solver: kind,
        steps: a.steps,
        num_samples: a.num_samples,
        seed: a.seed,
        ema: !a.raw_weights,
        seconds,
        stats: &stats,
    };
    io::write_json(&stats_path(&a.out), &report)?;
    if let Some(p) = &a.plot {
        plot::histograms(p, &[&x], dim, plot::window(&x), 100)?;
    }
    println!(
        "{} samples in {seconds:.2} s: nfe {}, steps {}, accepted {}, rejected {} -> {}",
        a.num_samples,
        stats.nfe,
        stats.steps,
        stats.accepted,
        stats.rejected,
        a.out.display()
    );
    Ok(())
}
