//! Arguments into library configurations, in one place: training settings, solver and step control, the evaluation
//! classifier, the start points of a run with a source distribution, and output names.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use candle_core::Device;
use flowmatching::eval::classifier::Classifier;
use flowmatching::optim::{AdamWConfig, LrDecay};
use flowmatching::solver::{Adaptive, ErrorNorm, SolverKind, StepControl};
use flowmatching::train::{RunConfig, TrainConfig};

use crate::cli::{LrDecayArg, SolverArg, ToleranceArgs, TrainArgs};
use crate::io;

/// `train`'s optimisation settings (every data kind).
pub fn train_config(a: &TrainArgs) -> Result<TrainConfig> {
    if a.grad_clip < 0.0 || !a.grad_clip.is_finite() {
        bail!(
            "--grad-clip must be 0 (off) or positive, got {}",
            a.grad_clip
        );
    }
    Ok(TrainConfig {
        steps: a.steps,
        batch_size: a.batch_size,
        optimizer: AdamWConfig {
            lr: a.lr,
            weight_decay: a.weight_decay,
            ..Default::default()
        },
        warmup_steps: a.warmup,
        lr_decay: match a.lr_decay {
            LrDecayArg::Constant => LrDecay::Constant,
            LrDecayArg::Cosine => LrDecay::Cosine,
        },
        grad_clip: (a.grad_clip > 0.0).then_some(a.grad_clip),
        ema_decay: a.ema_decay,
        seed: a.seed,
        label_dropout: a.label_dropout,
        coupling: a.coupling.coupling(a.sinkhorn_reg),
        time_sampling: a.time_sampling,
        masking: Default::default(),
        crop_frames: None,
        precision: a.precision,
    })
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

/// The evaluation classifier at `path`, checked to take images of `shape`.
pub(crate) fn load_classifier(
    path: &Path,
    shape: [usize; 3],
    device: &Device,
) -> Result<Classifier> {
    let clf = Classifier::load(path, device)?;
    let c = clf.config();
    if [c.channels, c.height, c.width] != shape {
        bail!(
            "the classifier takes {}x{}x{} images but the images here are {shape:?}",
            c.channels,
            c.height,
            c.width
        );
    }
    Ok(clf)
}

/// The points integration starts from for a run: N(0, I) noise from `seed`, or draws from the run's
/// source distribution when it was trained from one (`train --source`).
pub fn initial_points(config: &RunConfig, n: usize, seed: u64) -> Result<Vec<f32>> {
    let source = config.source.as_deref().map(io::open_data).transpose()?;
    Ok(flowmatching::sample::initial_points(
        config,
        n,
        seed,
        source.as_deref(),
    )?)
}

/// The CUDA set-up: `FLOWMATCHING_CUDA_EVENTS=1` keeps cudarc's event tracking and
/// `FLOWMATCHING_CUDA_POOL_RELEASE=1` the memory pool's release threshold (for A/B benchmarks).
pub fn cuda_options() -> flowmatching::device::CudaOptions {
    let on = |name: &str| std::env::var(name).as_deref() == Ok("1");
    flowmatching::device::CudaOptions {
        event_tracking: on("FLOWMATCHING_CUDA_EVENTS"),
        release_pool: on("FLOWMATCHING_CUDA_POOL_RELEASE"),
    }
}
