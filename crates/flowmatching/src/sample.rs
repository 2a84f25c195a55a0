//! Drawing samples from a trained model: the rows of x0 (N(0, I) noise, or draws from the run's source
//! distribution) integrated along dx/dt = v(x, t) from t = 0 to t = 1, with the model's prediction
//! converted to a velocity on the run's path ([`AsVelocity`]) and, for class-conditional models,
//! classifier-free guidance ([`Guided`]).

use candle_core::{Device, Tensor};

use crate::data::DataSource;
use crate::error::{Error, Result};
use crate::field::VelocityField;
use crate::guidance::Guided;
use crate::nn::Model;
use crate::path::{AffinePath, AsVelocity, ScheduleTransformed, SchedulerConfig};
use crate::rng::Rng;
use crate::solver::{solve, Solution, SolveOptions, SolverKind, Stats, Status};
use crate::train::RunConfig;

/// The points integration starts from: `n` rows of N(0, I) noise from `seed`, or, for a run trained
/// from a source distribution (`config.source`), `n` draws from `source`, which must then be given.
pub fn initial_points(
    config: &RunConfig,
    n: usize,
    seed: u64,
    source: Option<&dyn DataSource>,
) -> Result<Vec<f32>> {
    let dim = config.model.dim();
    match (&config.source, source) {
        (None, _) => Ok(Rng::new(seed).normal_vec(n * dim)),
        (Some(spec), None) => Err(Error::Config(format!(
            "the run was trained from the source {spec}; sampling needs that source"
        ))),
        (Some(spec), Some(source)) => {
            if source.dim() != dim {
                return Err(Error::Data(format!(
                    "the run's source {spec} is not {dim}-dimensional"
                )));
            }
            Ok(source.sample(&mut Rng::new(seed), n))
        }
    }
}

/// A run's network as the velocity field its samples integrate: the network's prediction converted to
/// a velocity on the run's path (the probability-flow ODE of every objective).
pub struct RunField<'a> {
    inner: &'a dyn VelocityField,
    path: AffinePath,
    prediction: crate::path::Prediction,
}

impl<'a> RunField<'a> {
    /// The run's field, seen on the scheduler `on` when given (see [`ScheduleTransformed`]).
    pub fn on(
        inner: &'a dyn VelocityField,
        config: &RunConfig,
        on: Option<&SchedulerConfig>,
    ) -> Result<Box<dyn VelocityField + 'a>> {
        let field = Self::new(inner, config)?;
        Ok(match on {
            Some(s) => Box::new(ScheduleTransformed::new(field, &config.path, s)?),
            None => Box::new(field),
        })
    }

    /// `inner` (the model, or the model under guidance) on the path of `config`.
    pub fn new(inner: &'a dyn VelocityField, config: &RunConfig) -> Result<Self> {
        Ok(Self {
            inner,
            path: AffinePath::from_config(&config.path)?,
            prediction: config.prediction,
        })
    }

    fn as_velocity(&self) -> AsVelocity<'_, dyn VelocityField + 'a> {
        AsVelocity {
            field: self.inner,
            path: &self.path,
            prediction: self.prediction,
        }
    }
}

impl VelocityField for RunField<'_> {
    fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.as_velocity().forward(x, t)
    }

    fn jvp(&self, x: &Tensor, t: &Tensor, u: &[Tensor]) -> Result<Option<(Tensor, Vec<Tensor>)>> {
        self.as_velocity().jvp(x, t, u)
    }

    fn evals_per_call(&self, t: &[f64]) -> usize {
        self.inner.evals_per_call(t)
    }
}

/// Integrates the rows of `x0` (row-major, the model's dimension) from t = 0 to t = 1 on the CPU;
/// returns the end points and the solution (statistics, status, grid states).
pub fn transport(
    model: &Model,
    config: &RunConfig,
    x0: Vec<f32>,
    solver: SolverKind,
    opts: &SolveOptions,
) -> Result<(Vec<f32>, Solution)> {
    transport_on(model, config, None, x0, solver, opts)
}

/// [`transport`] along the paths of scheduler `on` instead of the run's own (the same end
/// distribution; see [`ScheduleTransformed`]); `None` is the run's scheduler.
pub fn transport_on(
    model: &Model,
    config: &RunConfig,
    on: Option<&SchedulerConfig>,
    x0: Vec<f32>,
    solver: SolverKind,
    opts: &SolveOptions,
) -> Result<(Vec<f32>, Solution)> {
    let dim = config.model.dim();
    let field = RunField::on(model, config, on)?;
    let n = x0.len() / dim;
    let x0 = Tensor::from_vec(x0, (n, dim), &Device::Cpu)?;
    let sol = solve(&field, solver.solver().as_ref(), &x0, 0.0, 1.0, opts)?;
    let x: Vec<f32> = sol.x.flatten_all()?.to_vec1()?;
    Ok((x, sol))
}

/// Class labels and guidance weight for a class-conditional model.
#[derive(Debug, Clone, PartialEq)]
pub struct Conditioning {
    /// One label per sample.
    pub labels: Vec<u32>,
    /// Classifier-free guidance weight w (0: unconditional, 1: conditional).
    pub guidance: f64,
    /// Guidance only for t in [lo, hi], the conditional field elsewhere (None: at every t).
    pub interval: Option<(f64, f64)>,
}

impl Conditioning {
    /// `n` labels in equal consecutive blocks over the `k` classes (row r of a k-row grid is class r).
    pub fn blocks(n: usize, k: usize, guidance: f64) -> Self {
        Self {
            labels: (0..n).map(|i| (i * k / n) as u32).collect(),
            guidance,
            interval: None,
        }
    }
}

/// Samples drawn batch by batch.
#[derive(Debug, Clone)]
pub struct Batched {
    /// The end points, row-major, in the order of the start points.
    pub x: Vec<f32>,
    /// The statistics of the costliest batch (NFE counts network calls per batch, 2 per guided call).
    pub stats: Stats,
    /// [`Status::Completed`] when every batch finished; otherwise the stop of the batch that stopped,
    /// after which no further batch is drawn and `x` holds only the batches drawn (the solve options
    /// must have [`SolveOptions::throw`] unset for this; with it set, the stop is an error).
    pub status: Status,
}

/// Integrates the rows of `x0` in batches of `batch` rows on `device`. The start points are given
/// for all rows at once, so the samples do not depend on the batch size (for constant steps).
/// `on_batch` is told the rows of each finished batch (for progress).
#[allow(clippy::too_many_arguments)]
pub fn draw_batched(
    model: &Model,
    config: &RunConfig,
    x0: &[f32],
    solver: SolverKind,
    opts: &SolveOptions,
    cond: Option<&Conditioning>,
    on: Option<&SchedulerConfig>,
    device: &Device,
    batch: usize,
    on_batch: &mut dyn FnMut(usize),
) -> Result<Batched> {
    let dim = config.model.dim();
    let n = x0.len() / dim;
    if let Some(c) = cond {
        if c.labels.len() != n {
            return Err(Error::Config(format!(
                "{} labels for {n} samples",
                c.labels.len()
            )));
        }
    }
    let batch = batch.max(1);
    let mut out = Vec::with_capacity(n * dim);
    let mut worst = Stats::default();
    let mut status = Status::Completed;
    for (i, chunk) in x0.chunks(batch * dim).enumerate() {
        let rows = chunk.len() / dim;
        let x = Tensor::from_slice(chunk, (rows, dim), device)?;
        let guided;
        let inner: &dyn VelocityField = match cond {
            Some(c) => {
                let start = i * batch;
                let g = Guided::new(model, &c.labels[start..start + rows], c.guidance)?;
                guided = match c.interval {
                    Some((lo, hi)) => g.with_interval(lo, hi)?,
                    None => g,
                };
                &guided
            }
            None => model,
        };
        let field = RunField::on(inner, config, on)?;
        let sol = solve(&field, solver.solver().as_ref(), &x, 0.0, 1.0, opts)?;
        out.extend(sol.x.flatten_all()?.to_vec1::<f32>()?);
        if sol.stats.nfe >= worst.nfe {
            worst = sol.stats;
        }
        on_batch(rows);
        if !sol.status.is_completed() {
            status = sol.status;
            break;
        }
    }
    Ok(Batched {
        x: out,
        stats: worst,
        status,
    })
}
