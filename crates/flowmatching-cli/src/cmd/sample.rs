//! `flowmatching sample`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use flowmatching::checkpoint::Checkpoint;
use flowmatching::model::Model;
use flowmatching::path::{AffinePath, AsVelocity};
use flowmatching::rng::Rng;
use flowmatching::solver::{
    solve, Adaptive, ErrorNorm, Solution, SolveOptions, SolverKind, Stats, StepControl,
};
use flowmatching::train::RunConfig;
use serde::Serialize;

use crate::cli::{SampleArgs, SolverArg, ToleranceArgs};
use crate::{io, plot};

/// Draws `n` samples from noise seeded by `seed`, integrating from t = 0 to t = 1.
pub fn draw(
    model: &Model,
    config: &RunConfig,
    n: usize,
    solver: SolverKind,
    opts: &SolveOptions,
    seed: u64,
) -> Result<(Vec<f32>, Solution)> {
    let dim = config.model.dim();
    let path = AffinePath::from_config(&config.path)?;
    let field = AsVelocity {
        field: model,
        path: &path,
        prediction: config.prediction,
    };
    let x0 = Tensor::from_vec(Rng::new(seed).normal_vec(n * dim), (n, dim), &Device::Cpu)?;
    let sol = solve(&field, solver.solver().as_ref(), &x0, 0.0, 1.0, opts)?;
    let x: Vec<f32> = sol.x.flatten_all()?.to_vec1()?;
    Ok((x, sol))
}

pub fn solver_kind(s: SolverArg) -> SolverKind {
    match s {
        SolverArg::Euler => SolverKind::Euler,
        SolverArg::Midpoint => SolverKind::Midpoint,
        SolverArg::Heun => SolverKind::Heun,
        SolverArg::Rk4 => SolverKind::Rk4,
        SolverArg::Dopri5 => SolverKind::Dopri5,
    }
}

/// Adaptive control from the tolerance options.
pub fn adaptive(tol: &ToleranceArgs) -> Result<Adaptive> {
    let norm = if tol.per_sample {
        ErrorNorm::PerSample
    } else {
        ErrorNorm::Batch
    };
    Ok(Adaptive::new(tol.rtol, tol.atol)?.with_norm(norm))
}

/// The step control for a solver choice: dopri5 adapts, the others take `steps` equal steps.
pub fn control(kind: SolverKind, steps: usize, tol: &ToleranceArgs) -> Result<StepControl> {
    if kind == SolverKind::Dopri5 {
        return Ok(StepControl::Adaptive(adaptive(tol)?));
    }
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    Ok(StepControl::Constant { steps })
}

/// `samples.npy` -> `samples.<suffix>`.
pub fn beside(out: &Path, suffix: &str) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "samples".into());
    out.with_file_name(format!("{stem}.{suffix}"))
}

#[derive(Serialize)]
struct SampleReport<'a> {
    checkpoint: String,
    solver: SolverKind,
    control: StepControl,
    num_samples: usize,
    seed: u64,
    ema: bool,
    seconds: f64,
    stats: &'a Stats,
    /// Per-sample control only: mean and largest evaluations per sample.
    nfe_per_sample_mean: Option<f64>,
    nfe_per_sample_max: Option<usize>,
}

/// Times at which trajectories are recorded.
const TRAJECTORY_POINTS: usize = 101;

pub fn run(a: &SampleArgs) -> Result<()> {
    if a.num_samples == 0 {
        bail!("--num-samples must be at least 1");
    }
    if a.out.extension().and_then(|e| e.to_str()) != Some("npy") {
        bail!("--out must name a .npy file, got {}", a.out.display());
    }
    let kind = solver_kind(a.solver);
    let control = control(kind, a.steps, &a.tol)?;
    let grid = if a.trajectory {
        (0..TRAJECTORY_POINTS)
            .map(|i| i as f64 / (TRAJECTORY_POINTS - 1) as f64)
            .collect()
    } else {
        vec![]
    };
    let ckpt = Checkpoint::load(&a.checkpoint, &Device::Cpu)?;
    let model = ckpt.model(&Device::Cpu, !a.raw_weights)?;
    let start = Instant::now();
    let opts = SolveOptions {
        control,
        grid,
        keep_trajectory: false,
    };
    let (x, sol) = draw(
        &model,
        &ckpt.meta.config,
        a.num_samples,
        kind,
        &opts,
        a.seed,
    )?;
    let seconds = start.elapsed().as_secs_f64();
    let dim = ckpt.meta.config.model.dim();
    if let Some(parent) = a.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        io::ensure_dir(parent)?;
    }
    io::write_npy(&a.out, &x, &[a.num_samples, dim])?;
    let per = sol.nfe_per_sample.as_ref();
    let report = SampleReport {
        checkpoint: a.checkpoint.display().to_string(),
        solver: kind,
        control,
        num_samples: a.num_samples,
        seed: a.seed,
        ema: !a.raw_weights,
        seconds,
        stats: &sol.stats,
        nfe_per_sample_mean: per.map(|v| v.iter().sum::<usize>() as f64 / v.len() as f64),
        nfe_per_sample_max: per.and_then(|v| v.iter().copied().max()),
    };
    io::write_json(&beside(&a.out, "stats.json"), &report)?;
    if let Some(p) = &a.plot {
        plot::histograms(p, &[&x], dim, plot::window(&x), 100)?;
    }
    if a.trajectory {
        let frames: Vec<Vec<f32>> = sol
            .grid
            .iter()
            .map(|g| g.flatten_all()?.to_vec1())
            .collect::<candle_core::Result<_>>()?;
        let flat: Vec<f32> = frames.concat();
        io::write_npy(
            &beside(&a.out, "trajectory.npy"),
            &flat,
            &[frames.len(), a.num_samples, dim],
        )?;
        plot::trajectories(&beside(&a.out, "trajectory.png"), &frames, dim, 300)?;
    }
    let s = &sol.stats;
    println!(
        "{} samples in {seconds:.2} s with {kind:?}: nfe {}, steps {}, accepted {}, rejected {} -> {}",
        a.num_samples,
        s.nfe,
        s.steps,
        s.accepted,
        s.rejected,
        a.out.display()
    );
    Ok(())
}
