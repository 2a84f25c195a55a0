//! The flow-matching paper's ablation (Lipman et al., Table 1 and Figures 4, 7 and 10): DDPM, score
//! matching, ScoreFlow, FM on the diffusion path and FM on the OT path train the same network with the
//! same optimizer, steps, batch and seed; every model is sampled through the same probability-flow ODE
//! (its prediction converted to a velocity on its path) and measured alike.
//!
//! On 2-D data the network is an MLP and quality is the energy distance to fresh data; on images it is
//! the unconditional `tiny` U-Net, quality is FD (the evaluation classifier's features) and the
//! likelihood is in bits/dim.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::DataSource;
use crate::error::{Error, Result};
use crate::eval::classifier::Classifier;
use crate::eval::frechet::{frechet_distance, GaussianStats};
use crate::eval::metrics::{checkerboard_support, energy_distance};
use crate::likelihood::{
    bits_per_dim, log_likelihood_unless_stopped, Divergence, LikelihoodOptions, Probe,
};
use crate::nn::{MlpConfig, Model, ModelConfig, UNetConfig};
use crate::objective::Objective;
use crate::path::{AffinePath, Prediction, SchedulerConfig};
use crate::rng::Rng;
use crate::sample::{draw_batched, initial_points, RunField};
use crate::solver::{Adaptive, SolveOptions, SolverKind, StepControl};
use crate::train::{RunConfig, TrainConfig, Trainer};

/// Fixed-NFE budgets of the Figure 4 and Table 1 analogues.
pub const NFES: [usize; 4] = [4, 8, 16, 32];
/// Adaptive tolerance of the paper's NFE measurements (Dopri5, rtol = atol).
pub const TOL: f64 = 1e-5;
/// Default cap on adaptive steps in evaluations (a score model can need very many).
pub const MAX_STEPS: usize = 2000;

/// The least step cap of Figure 7's tight-tolerance reference solves (they are few samples).
pub const REFERENCE_STEPS: usize = 500;

/// How big a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// A smoke run.
    Quick,
    /// The checked-in report's size.
    Default,
    /// Images on a 2-core CPU in about two hours (2-D data: the default preset).
    Cpu,
}

/// Sizes of a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sizes {
    /// MLP width, or the U-Net's base channels on images.
    pub hidden: usize,
    pub batch: usize,
    pub steps: u64,
    /// Adaptive NFE is measured this many times during training.
    pub checkpoints: u64,
    pub samples: usize,
    pub nfe_samples: usize,
    pub nll_points: usize,
    pub error_points: usize,
    /// Images integrated together (images only; 0 for 2-D data: all at once).
    #[serde(default)]
    pub eval_batch: usize,
    /// Cap on the steps of every adaptive solve (a solve that hits it is reported as capped).
    #[serde(default = "default_max_steps")]
    pub max_adaptive_steps: usize,
}

fn default_max_steps() -> usize {
    MAX_STEPS
}

impl Sizes {
    /// The sizes of a preset, for images or 2-D points.
    pub fn preset(preset: Preset, images: bool) -> Self {
        let base =
            |hidden, batch, steps, checkpoints, samples, nfe, nll, err, eval_batch, cap| Sizes {
                hidden,
                batch,
                steps,
                checkpoints,
                samples,
                nfe_samples: nfe,
                nll_points: nll,
                error_points: err,
                eval_batch,
                max_adaptive_steps: cap,
            };
        match (images, preset) {
            (true, Preset::Quick) => base(32, 64, 500, 5, 1000, 100, 100, 100, 500, 500),
            // Sized for a GPU: the tiny U-Net steps in ~80 ms on an H100 at batch 128, so 5 x 600
            // steps are ~4 minutes of training.
            (true, Preset::Default) => base(32, 128, 600, 4, 1000, 100, 100, 100, 1000, 500),
            // Sized by measurement on a 2-core AMD EPYC: the 16-channel `tiny` layout steps in 0.33 s
            // at batch 64 and evaluates an image in 1.4 ms. With FD on 2,000 samples one objective took
            // 37 minutes; at 1,000 samples the whole run took 7,303 s (2026-12-03): 4-7 minutes of
            // training and 12-24 minutes of measurement per objective, the score objectives' adaptive
            // solves (~500 NFE) the longest.
            (true, Preset::Cpu) => base(16, 64, 800, 4, 1000, 32, 32, 32, 500, 100),
            (false, Preset::Quick) => base(128, 512, 3000, 6, 3000, 500, 1000, 500, 0, MAX_STEPS),
            (false, Preset::Default | Preset::Cpu) => base(
                256, 1024, 20_000, 10, 10_000, 2000, 5000, 2000, 0, MAX_STEPS,
            ),
        }
    }

    /// Caps every evaluation size at `n` samples.
    pub fn cap_samples(&mut self, n: usize) {
        for v in [
            &mut self.samples,
            &mut self.nfe_samples,
            &mut self.nll_points,
            &mut self.error_points,
        ] {
            *v = (*v).min(n);
        }
    }
}

/// Quality at one fixed budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FixedNfe {
    pub solver: SolverKind,
    pub nfe: usize,
    /// Energy distance (2-D) or FD (images); see [`Results::metric`].
    #[serde(alias = "energy_distance")]
    pub distance: f64,
    pub in_support_fraction: Option<f64>,
}

/// Per solver (Euler, midpoint, RK4): (NFE, mean distance to a tight-tolerance solution).
pub type ErrorCurves = Vec<(SolverKind, Vec<(usize, f64)>)>;

/// Everything measured for one objective.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectiveResult {
    pub objective: Objective,
    pub name: String,
    pub final_loss: f64,
    pub train_seconds: f64,
    /// Wall time of the objective: training, the Figure 10 solves and the final measurements (summed
    /// over the runs of an interrupted ablation).
    #[serde(default)]
    pub seconds: f64,
    pub adaptive_nfe: Option<usize>,
    #[serde(alias = "adaptive_energy_distance")]
    pub adaptive_distance: Option<f64>,
    pub adaptive_in_support_fraction: Option<f64>,
    pub nll_nats: Option<f64>,
    pub nll_standard_error: Option<f64>,
    /// Images: the NLL of dequantized held-out images in bits/dim.
    #[serde(default)]
    pub nll_bits_per_dim: Option<f64>,
    pub fixed: Vec<FixedNfe>,
    /// (training step, adaptive NFE) during training; None where the solve hit the step cap.
    pub nfe_during_training: Vec<(u64, Option<usize>)>,
    /// (training step, mean loss since the previous point).
    pub loss_curve: Vec<(u64, f64)>,
    /// Per solver: (NFE, mean distance to a tight-tolerance solution).
    pub numerical_error: ErrorCurves,
}

/// A whole run, as `results.json` holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    pub command: String,
    pub data: String,
    /// The quality measure: "energy distance" (2-D) or "FD" (images).
    #[serde(default = "energy_distance_name")]
    pub metric: String,
    /// The network, in words.
    #[serde(default)]
    pub model: Option<String>,
    pub seed: u64,
    pub seconds: f64,
    pub sizes: Sizes,
    /// Images: FD of as many real training images as samples (the floor of this sample size), and of
    /// draws from a Gaussian with the training images' mean and covariance (the ceiling).
    #[serde(default)]
    pub fd_floor: Option<f64>,
    #[serde(default)]
    pub fd_gaussian: Option<f64>,
    pub results: Vec<ObjectiveResult>,
}

/// The metric's name on 2-D data.
pub fn energy_distance_name() -> String {
    "energy distance".into()
}

/// The training configuration of one objective: AdamW at 1e-3 with 100 warm-up steps and cosine decay,
/// clipping at 1, EMA 0.999, the same for every objective.
pub fn run_config(
    obj: Objective,
    s: &Sizes,
    seed: u64,
    data: &str,
    model: ModelConfig,
) -> RunConfig {
    let train = TrainConfig::cosine(s.steps, s.batch, 1e-3, 100, seed);
    RunConfig::new(model, obj.parts(), train, data)
}

/// The MLP of the 2-D ablation (width `hidden`), or the unconditional `tiny` U-Net (base channels
/// `hidden`) on images.
pub fn network(hidden: usize, image: Option<[usize; 3]>) -> ModelConfig {
    match image {
        None => ModelConfig::Mlp(MlpConfig::silu(2, hidden, 4)),
        Some([c, h, w]) => {
            let mut u = UNetConfig::tiny(c, h, w, 0);
            u.base_channels = hidden;
            ModelConfig::UNet(u)
        }
    }
}

/// The network in words, for reports.
pub fn describe(model: &ModelConfig) -> String {
    match model {
        ModelConfig::Mlp(m) => format!("MLP (3-{}x{}-2, SiLU)", m.hidden, m.depth),
        ModelConfig::UNet(u) => format!(
            "unconditional U-Net (`tiny` layout, {} base channels, channel multipliers {:?}, attention at {:?})",
            u.base_channels, u.channel_mults, u.attention_resolutions
        ),
        ModelConfig::Transformer(c) => format!(
            "transformer ({} blocks of width {}, {} heads, MLP width {}{})",
            c.depth,
            c.width,
            c.heads,
            c.ffn_dim,
            if c.skips { ", U-Net skips" } else { "" }
        ),
    }
}

/// Dopri5's controller at rtol = atol = `tol`, capped at `max_steps`.
pub fn adaptive(tol: f64, max_steps: usize) -> Result<StepControl> {
    let mut a = Adaptive::new(tol, tol)?;
    a.max_steps = max_steps;
    Ok(StepControl::Adaptive(a))
}

/// Sample quality against the data.
pub enum Quality {
    /// Energy distance to fresh 2-D points (and the checkerboard's in-support share).
    Energy {
        reference: Vec<f32>,
        checkerboard: bool,
    },
    /// FD of the classifier's features against the reference images' statistics.
    Fd {
        classifier: Box<Classifier>,
        reference: GaussianStats,
        shape: [usize; 3],
    },
}

/// Where and how samples are drawn and judged.
pub struct Evaluator {
    pub device: Device,
    /// Cap on adaptive steps.
    pub max_steps: usize,
    /// Samples integrated together (all at once when 0).
    pub batch: usize,
    pub quality: Quality,
}

impl Evaluator {
    /// `n` samples from noise seeded by `seed` and their NFE; None if the adaptive solve hit its cap.
    pub fn draw(
        &self,
        model: &Model,
        cfg: &RunConfig,
        n: usize,
        kind: SolverKind,
        control: StepControl,
        seed: u64,
    ) -> Result<Option<(Vec<f32>, usize)>> {
        let opts = SolveOptions::with_control(control).no_throw();
        let batch = if self.batch == 0 { n } else { self.batch };
        let x0 = initial_points(cfg, n, seed, None)?;
        let drawn = draw_batched(
            model,
            cfg,
            &x0,
            kind,
            &opts,
            None,
            None,
            &self.device,
            batch,
            &mut |_| {},
        )?;
        Ok(drawn
            .status
            .is_completed()
            .then_some((drawn.x, drawn.stats.nfe)))
    }

    /// Samples at constant steps, which always finish.
    fn draw_fixed(
        &self,
        model: &Model,
        cfg: &RunConfig,
        n: usize,
        kind: SolverKind,
        steps: usize,
        seed: u64,
    ) -> Result<(Vec<f32>, usize)> {
        self.draw(model, cfg, n, kind, StepControl::Constant { steps }, seed)?
            .ok_or_else(|| {
                Error::Data("a fixed-step solve stopped: the state is not finite".into())
            })
    }

    /// Energy distance (2-D) or FD (images) of samples `x`.
    pub fn distance(&self, x: &[f32]) -> Result<f64> {
        match &self.quality {
            Quality::Energy { reference, .. } => Ok(energy_distance(x, reference, 2)),
            Quality::Fd {
                classifier,
                reference,
                ..
            } => {
                let x: Vec<f32> = x.iter().map(|v| v.clamp(-1.0, 1.0)).collect();
                frechet_distance(&classifier.feature_stats(&x, &self.device)?, reference)
            }
        }
    }

    /// The checkerboard's in-support share (None elsewhere).
    pub fn support(&self, x: &[f32]) -> Option<f64> {
        match &self.quality {
            Quality::Energy {
                checkerboard: true, ..
            } => Some(checkerboard_support(x).in_support_fraction),
            _ => None,
        }
    }
}

/// One objective's training record up to a Figure 10 point. With the trainer saved at the same step it
/// is enough to continue the objective exactly where an interrupted run stopped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// The training step of the record (the trainer's step count).
    pub step: u64,
    pub last_loss: f64,
    /// Training time so far (evaluations excluded).
    pub train_seconds: f64,
    /// Wall time so far (evaluations included).
    #[serde(default)]
    pub seconds: f64,
    pub loss_curve: Vec<(u64, f64)>,
    pub nfe_curve: Vec<(u64, Option<usize>)>,
}

/// What a caller is told while the ablation runs (progress, checkpoints, pictures), and where an
/// interrupted run's state comes back from.
pub trait Observer {
    /// The result of `objective` if an earlier run of the same ablation finished it (None: train it).
    fn finished_before(&mut self, _objective: Objective) -> Result<Option<ObjectiveResult>> {
        Ok(None)
    }
    /// The trainer and record an earlier run of the same ablation saved at `objective`'s last Figure 10
    /// point ([`Observer::progress`]); None starts the objective afresh.
    fn resume(
        &mut self,
        _objective: Objective,
        _config: &RunConfig,
    ) -> Result<Option<(Trainer, Progress)>> {
        Ok(None)
    }
    /// Training of `objective` reached a Figure 10 point: the place to save `trainer` and `progress`.
    fn progress(
        &mut self,
        _objective: Objective,
        _trainer: &Trainer,
        _progress: &Progress,
    ) -> Result<()> {
        Ok(())
    }
    /// Training of `objective` starts (or continues from `from`).
    fn started(&mut self, _objective: Objective, _from: u64, _steps: u64) {}
    /// One training step finished.
    fn step(&mut self, _step: u64, _loss: f64) {}
    /// `objective` is trained and measured; `row` holds its Figure 4 samples (midpoint at each budget
    /// of [`NFES`], then the adaptive samples when they finished).
    fn finished(
        &mut self,
        _trainer: &Trainer,
        _row: &[Vec<f32>],
        _result: &ObjectiveResult,
    ) -> Result<()> {
        Ok(())
    }
}

/// An observer that is told nothing.
impl Observer for () {}

/// One ablation: the data, the sizes, the evaluation, and the held-out points for the likelihood.
pub struct Ablation<'a> {
    pub data: &'a dyn DataSource,
    /// The data's name, for the run configurations.
    pub data_name: String,
    pub sizes: Sizes,
    pub seed: u64,
    pub eval: Evaluator,
    /// Held-out rows for the likelihood: 2-D points, or dequantized images in [-1, 1].
    pub held_out: Vec<f32>,
    /// (C, H, W) of image data (None: 2-D points).
    pub image: Option<[usize; 3]>,
}

impl Ablation<'_> {
    /// The network every objective trains.
    pub fn network(&self) -> ModelConfig {
        network(self.sizes.hidden, self.image)
    }

    /// Trains and measures every objective in [`Objective::ALL`] order.
    pub fn run(&self, observer: &mut dyn Observer) -> Result<Vec<ObjectiveResult>> {
        Objective::ALL
            .iter()
            .map(|&obj| self.run_objective(obj, observer))
            .collect()
    }

    /// Trains one objective, measuring the adaptive NFE on a fixed batch of noise at evenly spaced
    /// steps (Figure 10), then measures the final EMA model. An objective the observer has a result
    /// for is not run again; one it has a saved trainer for continues from it.
    pub fn run_objective(
        &self,
        obj: Objective,
        observer: &mut dyn Observer,
    ) -> Result<ObjectiveResult> {
        if let Some(done) = observer.finished_before(obj)? {
            return Ok(done);
        }
        let s = &self.sizes;
        let cfg = run_config(obj, s, self.seed, &self.data_name, self.network());
        let (mut trainer, mut progress) = match observer.resume(obj, &cfg)? {
            Some((trainer, progress)) => {
                if trainer.step_count() != progress.step || trainer.config() != &cfg {
                    return Err(Error::Data(format!(
                        "{}: the saved trainer (step {}) does not continue the saved record (step {}) \
                         of this configuration",
                        obj.name(),
                        trainer.step_count(),
                        progress.step
                    )));
                }
                (trainer, progress)
            }
            None => (
                Trainer::new(cfg.clone(), &self.eval.device)?,
                Progress::default(),
            ),
        };
        observer.started(obj, progress.step, s.steps);
        let (wall, carried) = (std::time::Instant::now(), progress.seconds);
        let every = (s.steps / s.checkpoints.max(1)).max(1);
        let mut t0 = std::time::Instant::now();
        let (mut acc, mut count) = (0.0, 0u64);
        while trainer.step_count() < s.steps {
            progress.last_loss = trainer.step(self.data)?;
            acc += progress.last_loss;
            count += 1;
            let step = trainer.step_count();
            observer.step(step, progress.last_loss);
            if step % every == 0 || step == s.steps {
                progress.train_seconds += t0.elapsed().as_secs_f64();
                progress.loss_curve.push((step, acc / count as f64));
                (acc, count) = (0.0, 0);
                let model = trainer.ema_model()?;
                let control = adaptive(TOL, s.max_adaptive_steps)?;
                let r = self.eval.draw(
                    &model,
                    &cfg,
                    s.nfe_samples,
                    SolverKind::Dopri5,
                    control,
                    self.seed + 7,
                )?;
                progress.nfe_curve.push((step, r.map(|r| r.1)));
                progress.step = step;
                progress.seconds = carried + wall.elapsed().as_secs_f64();
                observer.progress(obj, &trainer, &progress)?;
                t0 = std::time::Instant::now();
            }
        }
        let model = trainer.ema_model()?;
        // The last Figure 10 point solved this very model: if that hit the step cap, so would the
        // larger solve (at many times the cost), so it is reported as capped without running it.
        let adaptive_fits = progress.nfe_curve.last().is_none_or(|(_, n)| n.is_some());
        let (mut result, row) = self.measure(obj, &model, &cfg, adaptive_fits)?;
        result.final_loss = progress.last_loss;
        result.train_seconds = progress.train_seconds;
        result.seconds = carried + wall.elapsed().as_secs_f64();
        result.nfe_during_training = progress.nfe_curve;
        result.loss_curve = progress.loss_curve;
        observer.finished(&trainer, &row, &result)?;
        Ok(result)
    }

    /// The Table 1 and Figure 7 measurements of a trained model (training fields left empty), and its
    /// Figure 4 row: midpoint samples at each budget from the same noise, then the adaptive ones.
    /// `try_adaptive` false skips the adaptive sampling solve (reported as capped).
    pub fn measure(
        &self,
        obj: Objective,
        model: &Model,
        cfg: &RunConfig,
        try_adaptive: bool,
    ) -> Result<(ObjectiveResult, Vec<Vec<f32>>)> {
        let s = &self.sizes;
        let seed = self.seed + 1;
        let adaptive_run = match try_adaptive {
            true => self.eval.draw(
                model,
                cfg,
                s.samples,
                SolverKind::Dopri5,
                adaptive(TOL, s.max_adaptive_steps)?,
                seed,
            )?,
            false => None,
        };
        let (mut fixed, mut row) = (vec![], vec![]);
        for kind in [SolverKind::Euler, SolverKind::Midpoint] {
            for nfe in NFES {
                let (x, used) =
                    self.eval
                        .draw_fixed(model, cfg, s.samples, kind, nfe / kind.stages(), seed)?;
                fixed.push(FixedNfe {
                    solver: kind,
                    nfe: used,
                    distance: self.eval.distance(&x)?,
                    in_support_fraction: self.eval.support(&x),
                });
                if kind == SolverKind::Midpoint {
                    row.push(x);
                }
            }
        }
        let numerical_error =
            numerical_error(&self.eval, model, cfg, s.error_points, self.seed + 2)?;
        let nll = self.held_out_nll(model, cfg)?;
        let dim = self.held_out_dim();
        let (distance, support) = match &adaptive_run {
            Some((x, _)) => (Some(self.eval.distance(x)?), self.eval.support(x)),
            None => (None, None),
        };
        let adaptive_nfe = adaptive_run.as_ref().map(|r| r.1);
        if let Some((x, _)) = adaptive_run {
            row.push(x);
        }
        let result = ObjectiveResult {
            objective: obj,
            name: obj.name().to_string(),
            final_loss: f64::NAN,
            train_seconds: 0.0,
            seconds: 0.0,
            adaptive_nfe,
            adaptive_distance: distance,
            adaptive_in_support_fraction: support,
            nll_nats: nll.map(|n| n.0),
            nll_standard_error: nll.map(|n| n.1),
            nll_bits_per_dim: self
                .image
                .and(nll)
                .map(|n| bits_per_dim(n.0, dim, 2.0 / 256.0)),
            fixed,
            nfe_during_training: vec![],
            loss_curve: vec![],
            numerical_error,
        };
        Ok((result, row))
    }

    fn held_out_dim(&self) -> usize {
        self.image.map_or(2, |s| s.iter().product())
    }

    /// The mean NLL (nats) and its standard error on the held-out rows: the exact divergence in 2-D,
    /// Hutchinson with one Rademacher probe on images; None when the solve hit the step cap.
    fn held_out_nll(&self, model: &Model, cfg: &RunConfig) -> Result<Option<(f64, f64)>> {
        let dim = self.held_out_dim();
        let n = self.held_out.len() / dim;
        let x = Tensor::from_vec(self.held_out.clone(), (n, dim), &self.eval.device)?;
        let field = RunField::new(model, cfg)?;
        let opts = LikelihoodOptions {
            divergence: match self.image {
                None => Divergence::Exact,
                Some(_) => Divergence::Hutchinson {
                    probes: 1,
                    probe: Probe::Rademacher,
                },
            },
            solver: SolverKind::Dopri5,
            control: adaptive(TOL, self.sizes.max_adaptive_steps)?,
            seed: self.seed,
        };
        Ok(log_likelihood_unless_stopped(&field, &x, &opts)?.map(|ll| ll.nll()))
    }
}

/// Figure 7: per solver, (NFE, mean Euclidean distance of fixed-step samples to a Dopri5 solution at
/// 1e-7 from the same noise). The reference may take [`REFERENCE_STEPS`] steps even where sampling
/// solves are capped lower; the curves are empty when it hits that cap too.
pub fn numerical_error(
    eval: &Evaluator,
    model: &Model,
    cfg: &RunConfig,
    n: usize,
    seed: u64,
) -> Result<ErrorCurves> {
    let dim = cfg.model.dim();
    let control = adaptive(1e-7, eval.max_steps.max(REFERENCE_STEPS))?;
    let Some((reference, _)) = eval.draw(model, cfg, n, SolverKind::Dopri5, control, seed)? else {
        return Ok(vec![]);
    };
    let mut out = vec![];
    for kind in [SolverKind::Euler, SolverKind::Midpoint, SolverKind::Rk4] {
        let mut curve = vec![];
        for nfe in [4, 8, 16, 32, 64, 128] {
            let steps = nfe / kind.stages();
            if steps == 0 {
                continue;
            }
            let (x, used) = eval.draw_fixed(model, cfg, n, kind, steps, seed)?;
            let err = x
                .chunks_exact(dim)
                .zip(reference.chunks_exact(dim))
                .map(|(p, q)| {
                    p.iter()
                        .zip(q)
                        .map(|(a, b)| ((a - b) as f64).powi(2))
                        .sum::<f64>()
                        .sqrt()
                })
                .sum::<f64>()
                / n as f64;
            curve.push((used, err));
        }
        out.push((kind, curve));
    }
    Ok(out)
}

/// Figures 2 and 3 (2-D): the conditional paths x_t = sigma_t x0 + alpha_t x1 of the same `n` pairs
/// (noise from `seed`, data `x1`) on the OT path (sigma_min 1e-5) and the VP path, at each of `times`.
pub fn conditional_paths(
    x1: &[f32],
    seed: u64,
    times: &[f64],
) -> Result<[(String, Vec<Vec<f32>>); 2]> {
    let n = x1.len() / 2;
    let x0 = Rng::new(seed).fork(400).normal_vec(2 * n);
    let frames = |sched: SchedulerConfig| -> Result<Vec<Vec<f32>>> {
        let path = AffinePath::from_config(&sched)?;
        Ok(times
            .iter()
            .map(|&t| {
                path.sample_rows(&x0, x1, &vec![t; n], 2, Prediction::Velocity)
                    .0
            })
            .collect())
    };
    Ok([
        (
            "ot".into(),
            frames(SchedulerConfig::CondOt { sigma_min: 1e-5 })?,
        ),
        ("vp".into(), frames(SchedulerConfig::default_vp())?),
    ])
}

/// Figure 3 (2-D): a trained model's marginal paths from `n` noise points (seeded), at each of `times`
/// (Dopri5 at [`TOL`]).
pub fn marginal_paths(
    model: &Model,
    cfg: &RunConfig,
    n: usize,
    seed: u64,
    times: &[f64],
) -> Result<Vec<Vec<f32>>> {
    let opts = SolveOptions::with_control(adaptive(TOL, MAX_STEPS)?).grid(times.to_vec());
    let x0 = initial_points(cfg, n, seed, None)?;
    let (_, sol) = crate::sample::transport(model, cfg, x0, SolverKind::Dopri5, &opts)?;
    sol.grid
        .iter()
        .map(|g| Ok(g.flatten_all()?.to_vec1()?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Toy2d;

    /// A small 2-D ablation of 8 Gaussians (MLP of `hidden` units, samples capped at `samples`).
    fn small_2d(data: &Toy2d, sizes: Sizes) -> Ablation<'_> {
        Ablation {
            data,
            data_name: "8gaussians".into(),
            sizes,
            seed: 0,
            eval: Evaluator {
                device: Device::Cpu,
                max_steps: sizes.max_adaptive_steps,
                batch: 0,
                quality: Quality::Energy {
                    reference: data.sample(&mut Rng::new(1), sizes.samples),
                    checkerboard: false,
                },
            },
            held_out: data.sample(&mut Rng::new(2), sizes.nll_points),
            image: None,
        }
    }

    /// Keeps what a command-line observer keeps on disk (checkpoints in `dir`, records and results
    /// in memory) and fails once at `stop`'s Figure 10 point, as a Ctrl-C would.
    struct Interrupting {
        dir: std::path::PathBuf,
        stop: Option<(Objective, u64)>,
        records: Vec<(Objective, Progress)>,
        results: Vec<ObjectiveResult>,
    }

    impl Observer for Interrupting {
        fn finished_before(&mut self, obj: Objective) -> Result<Option<ObjectiveResult>> {
            Ok(self.results.iter().find(|r| r.objective == obj).cloned())
        }

        fn resume(&mut self, obj: Objective, _: &RunConfig) -> Result<Option<(Trainer, Progress)>> {
            let Some((_, p)) = self.records.iter().find(|(o, _)| *o == obj) else {
                return Ok(None);
            };
            let ck = crate::checkpoint::Checkpoint::load(&self.dir.join(obj.name()), &Device::Cpu)?;
            Ok(Some((ck.into_trainer(&Device::Cpu)?, p.clone())))
        }

        fn progress(&mut self, obj: Objective, trainer: &Trainer, p: &Progress) -> Result<()> {
            crate::checkpoint::save(trainer, &self.dir.join(obj.name()), None)?;
            self.records.retain(|(o, _)| *o != obj);
            self.records.push((obj, p.clone()));
            if self.stop == Some((obj, p.step)) {
                self.stop = None;
                return Err(Error::Data("interrupted".into()));
            }
            Ok(())
        }

        fn finished(&mut self, _: &Trainer, _: &[Vec<f32>], r: &ObjectiveResult) -> Result<()> {
            self.results.push(r.clone());
            Ok(())
        }
    }

    /// An ablation interrupted in its second objective and resumed gives exactly the results of one
    /// that ran through: the finished objective is not trained again, the interrupted one continues
    /// from its saved trainer and record.
    #[test]
    fn interrupted_ablation_resumes_exactly() {
        let data = Toy2d::from_name("8gaussians").unwrap();
        let mut sizes = Sizes::preset(Preset::Quick, false);
        (sizes.hidden, sizes.batch, sizes.steps, sizes.checkpoints) = (16, 64, 60, 3);
        sizes.cap_samples(64);
        sizes.max_adaptive_steps = 100;
        let ablation = small_2d(&data, sizes);
        let untimed = |mut r: Vec<ObjectiveResult>| {
            r.iter_mut()
                .for_each(|r| (r.train_seconds, r.seconds) = (0.0, 0.0));
            r
        };
        let straight = untimed(ablation.run(&mut ()).unwrap());

        let dir = std::env::temp_dir().join(format!("fm-ablate-resume-{}", std::process::id()));
        let second = Objective::ALL[1];
        let mut obs = Interrupting {
            dir: dir.clone(),
            stop: Some((second, 40)),
            records: vec![],
            results: vec![],
        };
        let err = ablation.run(&mut obs).unwrap_err();
        assert!(err.to_string().contains("interrupted"), "{err}");
        assert_eq!(obs.results.len(), 1, "the first objective finished");
        let resumed = untimed(ablation.run(&mut obs).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            obs.results.len(),
            5,
            "the first objective was not measured again"
        );
        assert_eq!(resumed, straight);
    }

    /// A tiny 2-D ablation end to end: every objective trains, every cell is measured, and the numbers
    /// are what they must be (budgets exact, FM-OT learns the data better than chance, the error of
    /// fixed steps falls with the NFE).
    #[test]
    fn tiny_ablation_measures_every_objective() {
        let data = Toy2d::from_name("8gaussians").unwrap();
        let mut sizes = Sizes::preset(Preset::Quick, false);
        sizes.hidden = 32;
        sizes.batch = 128;
        sizes.steps = 3000;
        sizes.checkpoints = 2;
        sizes.cap_samples(200);
        sizes.max_adaptive_steps = 200;
        let reference = data.sample(&mut Rng::new(1), sizes.samples);
        let ablation = small_2d(&data, sizes);
        let results = ablation.run(&mut ()).unwrap();
        assert_eq!(results.len(), 5);
        for r in &results {
            assert_eq!(r.nfe_during_training.len(), 2, "{}", r.name);
            assert_eq!(r.fixed.len(), 2 * NFES.len());
            for f in &r.fixed {
                assert!(NFES.contains(&f.nfe), "{} spent {} NFE", r.name, f.nfe);
                assert!(f.distance.is_finite());
            }
            assert!(r.final_loss.is_finite());
        }
        let ot = results
            .iter()
            .find(|r| r.objective == Objective::FmOt)
            .unwrap();
        // Noise itself is far from 8 Gaussians at radius ~2.8; a trained FM-OT model is close.
        let noise = Rng::new(9).normal_vec(2 * sizes.samples);
        let chance = energy_distance(&noise, &reference, 2);
        let at32 = ot
            .fixed
            .iter()
            .find(|f| f.solver == SolverKind::Midpoint && f.nfe == 32);
        assert!(at32.unwrap().distance < 0.5 * chance, "{ot:?} vs {chance}");
        assert!(ot.adaptive_nfe.is_some() && ot.nll_nats.unwrap().is_finite());
        let (_, midpoint) = ot
            .numerical_error
            .iter()
            .find(|(k, _)| *k == SolverKind::Midpoint)
            .unwrap();
        assert!(midpoint.last().unwrap().1 < midpoint[0].1, "{midpoint:?}");
        // Doubling the NFE halves Euler's error (first order) and quarters the midpoint's (second),
        // once the steps are small: from 32 to 64 NFE.
        let ratio = |kind: SolverKind| {
            let (_, c) = ot.numerical_error.iter().find(|(k, _)| *k == kind).unwrap();
            c[3].1 / c[4].1
        };
        assert!(
            (1.6..2.5).contains(&ratio(SolverKind::Euler)),
            "{}",
            ratio(SolverKind::Euler)
        );
        assert!(
            (3.0..5.5).contains(&ratio(SolverKind::Midpoint)),
            "{}",
            ratio(SolverKind::Midpoint)
        );
    }
}
