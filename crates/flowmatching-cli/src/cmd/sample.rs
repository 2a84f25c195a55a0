//! `flowmatching sample`.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Device;
use flowmatching::checkpoint::Checkpoint;
use flowmatching::likelihood::{sample_with_log_prob, Divergence, LikelihoodOptions};
use flowmatching::nn::Model;
use flowmatching::path::SchedulerConfig;
use flowmatching::sample::RunField;
use flowmatching::sample::{transport_on, Conditioning};
use flowmatching::solver::{Solution, SolveOptions, SolverKind, Stats, Status, StepControl};
use flowmatching::timesteps::TimeGrid;
use serde::Serialize;

use crate::cli::{PathArg, SampleArgs};
use crate::outputs::Outputs;
use crate::resolve::{beside, control, initial_points, solver_kind};
use crate::{images, io, memory, plot, sampling};

/// The start points of `--x0`: the rows of a .npy / .csv file, checked against the model's dimension.
fn start_points(file: &Path, dim: usize) -> Result<Vec<f32>> {
    let (rows, cols) = match file.extension().and_then(|e| e.to_str()) {
        Some("npy") => io::read_npy(file)?,
        Some("csv") => io::read_csv(file)?,
        _ => bail!("--x0 must name a .npy or .csv file, got {}", file.display()),
    };
    if cols != dim {
        bail!(
            "the model is {dim}-dimensional but {} has {cols} columns",
            file.display()
        );
    }
    if rows.is_empty() {
        bail!("{} has no rows", file.display());
    }
    if let Some(i) = rows.iter().position(|v| !v.is_finite()) {
        bail!(
            "{} has a non-finite value in row {}",
            file.display(),
            i / dim
        );
    }
    Ok(rows)
}

#[derive(Serialize)]
struct SampleReport<'a> {
    checkpoint: String,
    solver: SolverKind,
    control: StepControl,
    time_grid: TimeGrid,
    /// The scheduler integrated along, when not the model's own (`--as-scheduler`).
    #[serde(skip_serializing_if = "Option::is_none")]
    as_scheduler: Option<PathArg>,
    num_samples: usize,
    /// The file the start points came from (`--x0`); otherwise noise drawn from `seed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    x0: Option<String>,
    seed: u64,
    ema: bool,
    seconds: f64,
    stats: &'a Stats,
    /// Per-sample control only: mean and largest evaluations per sample.
    nfe_per_sample_mean: Option<f64>,
    nfe_per_sample_max: Option<usize>,
}

/// Refuses samples with NaN or Inf (a diverging field, or a guidance weight far out of range).
fn finite(x: &[f32]) -> Result<()> {
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        bail!(
            "sampling produced a non-finite value (at index {i}): the model's field diverges on this \
             solve; nothing was written"
        );
    }
    Ok(())
}

/// Samples and their log-densities in one solve of [x, log p] (exact divergence), on the run's
/// scheduler or on `on`.
fn with_log_prob(
    model: &Model,
    config: &flowmatching::train::RunConfig,
    on: Option<&SchedulerConfig>,
    x0: Vec<f32>,
    solver: SolverKind,
    control: StepControl,
) -> Result<(Vec<f32>, Solution, Vec<f64>)> {
    let dim = config.model.dim();
    let field = RunField::on(model, config, on)?;
    let n = x0.len() / dim;
    let x0 = candle_core::Tensor::from_vec(x0, (n, dim), &Device::Cpu)?;
    let opts = LikelihoodOptions {
        divergence: Divergence::Exact,
        solver,
        control,
        seed: 0,
    };
    let s = sample_with_log_prob(&field, &x0, &opts)?;
    let x = s.x1.flatten_all()?.to_vec1::<f32>()?;
    let sol = Solution {
        x: s.x1,
        grid: vec![],
        trajectory: None,
        stats: s.stats,
        nfe_per_sample: None,
        status: Status::Completed,
    };
    Ok((x, sol, s.log_p))
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
    let device = a.device.device()?;
    let ckpt = Checkpoint::load(&a.checkpoint, &device)?;
    let mut outs = Outputs::new();
    outs.checkpoint(&a.checkpoint);
    if let Some(source) = &ckpt.meta.config.source {
        outs.data(source, "source");
    }
    if let Some(x0) = &a.x0 {
        outs.input(x0, "the --x0 file");
    }
    outs.declare(&a.out, "--out")?;
    outs.declare(&beside(&a.out, "stats.json"), "--out (its statistics)")?;
    let images = ckpt.meta.config.model.image_shape().is_some();
    if images || a.guidance.is_some() || a.class.is_some() {
        if a.x0.is_some() {
            bail!("--x0 is for point models; image sampling starts from noise drawn from --seed");
        }
        if a.plot.is_some() || a.trajectory || a.log_prob {
            bail!("--plot, --trajectory and --log-prob are for point models (for images: --grid, and likelihood --hutchinson)");
        }
        if let Some(g) = &a.grid {
            outs.declare(g, "--grid")?;
        }
        let mut model = ckpt.model(&device, !a.raw_weights)?;
        crate::training::note_precision(a.precision, model.set_precision(a.precision));
        return run_images(a, &ckpt, &model, kind, control, &device, outs);
    }
    if a.grid.is_some() {
        bail!("--grid is for image models; use --plot for points");
    }
    if let Some(p) = &a.plot {
        outs.declare(p, "--plot")?;
    }
    if a.trajectory {
        outs.declare(&beside(&a.out, "trajectory.npy"), "--trajectory")?;
        outs.declare(&beside(&a.out, "trajectory.png"), "--trajectory")?;
    }
    if a.log_prob {
        if ckpt.meta.config.source.is_some() {
            bail!("--log-prob needs the N(0, I) source of the flow; this run was trained from --source");
        }
        if a.trajectory || a.per_sample_used() || a.time_grid != TimeGrid::Uniform {
            bail!("--log-prob solves for the samples and their density together; drop --trajectory, --per-sample and --time-grid");
        }
        outs.declare(&beside(&a.out, "logp.npy"), "--log-prob")?;
    }
    if a.log_prob && a.precision != flowmatching::precision::Precision::F32 {
        bail!("--log-prob integrates the divergence, and likelihoods run in f32: drop --precision bf16");
    }
    let mut model = ckpt.model(&device, !a.raw_weights)?;
    crate::training::note_precision(a.precision, model.set_precision(a.precision));
    let config = &ckpt.meta.config;
    let dim = config.model.dim();
    let frames = if a.trajectory { TRAJECTORY_POINTS } else { 0 };
    let cpu = device.is_cpu();
    let need = |n| memory::sampling_bytes(&config.model, n, n, kind.stages() + 1, frames, cpu);
    let x0 = match &a.x0 {
        Some(file) => start_points(file, dim)?,
        None => {
            memory::check(need(a.num_samples), "sampling", "lower --num-samples")?;
            initial_points(config, a.num_samples, a.seed)?
        }
    };
    let num_samples = x0.len() / dim;
    memory::check(need(num_samples), "sampling", "use fewer rows in --x0")?;
    let start = Instant::now();
    let opts = SolveOptions::with_control(control)
        .grid(grid)
        .time_grid(a.time_grid);
    let on = a.as_scheduler.map(|s| s.scheduler(0.0));
    let (x, sol, log_p) = if a.log_prob {
        with_log_prob(&model, config, on.as_ref(), x0, kind, control)?
    } else {
        let (x, sol) = transport_on(&model, config, on.as_ref(), x0, kind, &opts)?;
        (x, sol, vec![])
    };
    let seconds = start.elapsed().as_secs_f64();
    finite(&x)?;
    outs.write(&a.out, &io::npy_bytes(&x, &[num_samples, dim])?)?;
    if a.log_prob {
        outs.write(
            &beside(&a.out, "logp.npy"),
            &io::npy_bytes(&log_p, &[num_samples])?,
        )?;
    }
    let per = sol.nfe_per_sample.as_ref();
    let report = SampleReport {
        checkpoint: a.checkpoint.display().to_string(),
        solver: kind,
        control,
        time_grid: a.time_grid,
        as_scheduler: a.as_scheduler,
        num_samples,
        x0: a.x0.as_ref().map(|p| p.display().to_string()),
        seed: a.seed,
        ema: !a.raw_weights,
        seconds,
        stats: &sol.stats,
        nfe_per_sample_mean: per.map(|v| v.iter().sum::<usize>() as f64 / v.len() as f64),
        nfe_per_sample_max: per.and_then(|v| v.iter().copied().max()),
    };
    outs.write(&beside(&a.out, "stats.json"), &io::json_bytes(&report)?)?;
    if let Some(p) = &a.plot {
        outs.write(p, &plot::histograms(&[&x], dim, plot::window(&x), 100)?)?;
    }
    if a.trajectory {
        let frames: Vec<Vec<f32>> = sol
            .grid
            .iter()
            .map(|g| g.flatten_all()?.to_vec1())
            .collect::<candle_core::Result<_>>()?;
        let flat: Vec<f32> = frames.concat();
        let npy = io::npy_bytes(&flat, &[frames.len(), num_samples, dim])?;
        outs.write(&beside(&a.out, "trajectory.npy"), &npy)?;
        let png = plot::trajectories(&frames, dim, 300)?;
        outs.write(&beside(&a.out, "trajectory.png"), &png)?;
    }
    outs.commit()?;
    let s = &sol.stats;
    println!(
        "{} samples in {seconds:.2} s with {kind:?}: nfe {}, steps {}, accepted {}, rejected {} -> {}",
        num_samples,
        s.nfe,
        s.steps,
        s.accepted,
        s.rejected,
        a.out.display()
    );
    Ok(())
}

#[derive(Serialize)]
struct ImageSampleReport<'a> {
    checkpoint: String,
    solver: SolverKind,
    control: StepControl,
    time_grid: TimeGrid,
    #[serde(skip_serializing_if = "Option::is_none")]
    as_scheduler: Option<PathArg>,
    num_samples: usize,
    seed: u64,
    ema: bool,
    guidance: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    guidance_interval: Option<(f64, f64)>,
    seconds: f64,
    /// Statistics of the costliest batch (NFE: network calls, 2 per guided call).
    stats: &'a Stats,
    labels: Option<&'a [u32]>,
}

/// Sampling an image model (optionally class-conditional, with guidance): .npy of N x C x H x W, and an
/// optional PNG grid (one row per class for conditional models).
fn run_images(
    a: &SampleArgs,
    ckpt: &Checkpoint,
    model: &Model,
    kind: SolverKind,
    control: StepControl,
    device: &Device,
    mut outs: Outputs,
) -> Result<()> {
    let config = &ckpt.meta.config;
    let k = config.model.num_classes();
    if k == 0 && (a.guidance.is_some() || a.class.is_some() || a.guidance_interval.is_some()) {
        bail!("--guidance, --guidance-interval and --class need a class-conditional model; this checkpoint was trained without labels");
    }
    if a.per_sample_used() {
        bail!("--per-sample is not available for image sampling; use the batch error norm");
    }
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let cond = (k > 0)
        .then(|| -> Result<Conditioning> {
            let w = a.guidance.unwrap_or(1.0);
            let mut cond = match a.class {
                Some(c) if c as usize >= k => bail!(
                    "--class {c} does not exist: the model knows classes 0..{}",
                    k - 1
                ),
                Some(c) => Conditioning {
                    labels: vec![c; a.num_samples],
                    guidance: w,
                    interval: None,
                },
                None => Conditioning::blocks(a.num_samples, k, w),
            };
            cond.interval = a.guidance_interval;
            Ok(cond)
        })
        .transpose()?;
    let stages = kind.stages() + 1;
    let cpu = device.is_cpu();
    let need = memory::sampling_bytes(&config.model, a.num_samples, a.batch, stages, 0, cpu);
    memory::check(need, "sampling", "lower --num-samples or --batch")?;
    let opts = SolveOptions::with_control(control).time_grid(a.time_grid);
    let start = Instant::now();
    let drawn = sampling::draw(
        model,
        config,
        a.num_samples,
        a.seed,
        kind,
        &opts,
        cond.as_ref(),
        a.as_scheduler.map(|s| s.scheduler(0.0)).as_ref(),
        device,
        a.batch,
    )?;
    let (x, stats) = (drawn.x, drawn.stats);
    let seconds = start.elapsed().as_secs_f64();
    let shape = config
        .model
        .image_shape()
        .unwrap_or([1, 1, config.model.dim()]);
    finite(&x)?;
    let npy = io::npy_bytes(&x, &[a.num_samples, shape[0], shape[1], shape[2]])?;
    outs.write(&a.out, &npy)?;
    let report = ImageSampleReport {
        checkpoint: a.checkpoint.display().to_string(),
        solver: kind,
        control,
        time_grid: a.time_grid,
        as_scheduler: a.as_scheduler,
        num_samples: a.num_samples,
        seed: a.seed,
        ema: !a.raw_weights,
        guidance: cond.as_ref().map(|c| c.guidance),
        guidance_interval: a.guidance_interval,
        seconds,
        stats: &stats,
        labels: cond.as_ref().map(|c| c.labels.as_slice()),
    };
    outs.write(&beside(&a.out, "stats.json"), &io::json_bytes(&report)?)?;
    if let Some(g) = &a.grid {
        let cols = if k > 0 && a.class.is_none() {
            a.num_samples.div_ceil(k)
        } else {
            (a.num_samples as f64).sqrt().ceil() as usize
        };
        outs.write(g, &images::grid_png(&x, shape, cols)?)?;
    }
    outs.commit()?;
    println!(
        "{} images in {seconds:.2} s with {kind:?}: nfe {} per batch -> {}",
        a.num_samples,
        stats.nfe,
        a.out.display()
    );
    Ok(())
}
