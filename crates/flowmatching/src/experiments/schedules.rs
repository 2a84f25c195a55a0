//! Schedules compared on one data set: where training draws its times t (uniform, SD3's logit-normal
//! and mode sampling, Esser et al. 2024), the grid a fixed-step solver walks (uniform, the SD3 / Flux
//! shift, EDM's rho grid, Karras et al. 2022), and classifier-free guidance applied at every t or only
//! in an interval (Kynkaanniemi et al. 2024).
//!
//! Every variant trains the same network (the ablation's: an MLP on 2-D data, the `tiny` U-Net on
//! images) with the same optimizer, steps, batch and seed on the OT path; every trained model is
//! sampled from the same noise with midpoint and Euler at NFE 4, 8, 16 and 32 on every grid. On
//! labelled images one more model is trained class-conditionally (with label dropout) and its
//! guided samples are compared at equal NFE: plain conditional (w = 1, 1 NFE per call), guidance at
//! every t (2 NFE per call) and guidance in the interval only (2 NFE inside it, 1 outside), each at the
//! most midpoint steps its budget allows.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::data::DataSource;
use crate::error::{Error, Result};
use crate::experiments::ablation::{network, Evaluator, Quality, NFES};
use crate::nn::{Model, ModelConfig};
use crate::objective::Objective;
use crate::sample::{draw_batched, initial_points, Conditioning};
use crate::solver::{SolveOptions, SolverKind, StepControl};
use crate::timesteps::{TimeGrid, TimeSampling};
use crate::train::{RunConfig, TrainConfig, Trainer};

/// The training-time distributions compared: uniform, SD3's default logit-normal (m = 0, s = 1) and
/// SD3's mode sampling at its scale 1.29.
pub const TRAININGS: [(&str, TimeSampling); 3] = [
    ("uniform", TimeSampling::Uniform),
    ("logit-normal", TimeSampling::LogitNormal { m: 0.0, s: 1.0 }),
    ("mode", TimeSampling::Mode { s: 1.29 }),
];

/// The sampling grids compared: uniform, the shift s = 3 (SD3 at 1024 px) and EDM's rho = 7.
pub const GRIDS: [(&str, TimeGrid); 3] = [
    ("uniform", TimeGrid::Uniform),
    ("shift:3", TimeGrid::Shift { s: 3.0 }),
    ("edm:7", TimeGrid::Edm { rho: 7.0 }),
];

/// The fixed-step solvers of every cell.
pub const SOLVERS: [SolverKind; 2] = [SolverKind::Midpoint, SolverKind::Euler];

/// The NFE budgets of the guidance comparison.
pub const GUIDED_NFES: [usize; 3] = [8, 16, 32];

/// Name of the class-conditional variant.
pub const CONDITIONAL: &str = "conditional";

/// How big a run is.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sizes {
    /// MLP width, or the U-Net's base channels on images.
    pub hidden: usize,
    pub batch: usize,
    pub steps: u64,
    /// Samples per cell (FD or energy distance).
    pub samples: usize,
    /// Images integrated together (0: all at once).
    pub eval_batch: usize,
}

impl Sizes {
    /// The study's sizes: `quick` for a smoke run, else the checked-in report's (on images the
    /// ablation's `cpu` preset: 800 steps of the 16-channel U-Net at batch 64).
    pub fn preset(quick: bool, images: bool) -> Self {
        let s = |hidden, batch, steps, samples, eval_batch| Sizes {
            hidden,
            batch,
            steps,
            samples,
            eval_batch,
        };
        match (images, quick) {
            (true, true) => s(8, 32, 100, 200, 200),
            (true, false) => s(16, 64, 800, 1000, 500),
            (false, true) => s(64, 256, 1000, 1000, 0),
            (false, false) => s(256, 1024, 10_000, 5000, 0),
        }
    }
}

/// Guidance settings of the conditional variant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GuidanceSetup {
    /// Classifier-free guidance weight w (v_u + w (v_c - v_u)).
    pub w: f64,
    /// Guidance only for t in [lo, hi].
    pub interval: (f64, f64),
    /// Probability of training on the null label.
    pub label_dropout: f64,
}

impl Default for GuidanceSetup {
    /// w = 3, p_uncond = 0.1, and the interval [0.16, 0.78]: the noise levels sigma in (0.28, 5.42]
    /// where Kynkaanniemi et al. guide EDM2, as sigma = (1 - t) / t on the OT path.
    fn default() -> Self {
        Self {
            w: 3.0,
            interval: (0.16, 0.78),
            label_dropout: 0.1,
        }
    }
}

/// Quality of samples drawn with one solver on one grid at one NFE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub grid: String,
    pub solver: SolverKind,
    pub nfe: usize,
    /// Energy distance (2-D) or FD (images).
    pub distance: f64,
}

/// Guided samples at one NFE budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuidedCell {
    /// "conditional" (w = 1), "guided" (w at every t) or "interval".
    pub mode: String,
    /// The budget, and the NFE the midpoint steps actually used (at most the budget).
    pub budget: usize,
    pub nfe: usize,
    pub steps: usize,
    pub fd: f64,
    /// Share of samples the evaluation classifier assigns to the class they were drawn for.
    pub accuracy: f64,
}

/// One trained model and its measurements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Variant {
    pub name: String,
    pub time_sampling: TimeSampling,
    pub conditional: bool,
    pub final_loss: f64,
    pub train_seconds: f64,
    pub seconds: f64,
    /// Unconditional variants: every grid x solver x NFE.
    pub cells: Vec<Cell>,
    /// The conditional variant: every guidance mode x budget.
    pub guided: Vec<GuidedCell>,
}

impl Variant {
    /// The distance of one cell.
    pub fn distance(&self, grid: &str, solver: SolverKind, nfe: usize) -> Option<f64> {
        self.cells
            .iter()
            .find(|c| c.grid == grid && c.solver == solver && c.nfe == nfe)
            .map(|c| c.distance)
    }
}

/// A whole run, as `results.json` holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    /// The command that made it.
    pub command: String,
    pub data: String,
    /// "energy distance" or "FD".
    pub metric: String,
    /// The network in words.
    pub model: String,
    pub sizes: Sizes,
    pub seed: u64,
    pub guidance: Option<GuidanceSetup>,
    /// FD of real training images and of a Gaussian fitted to their pixels (images only).
    pub fd_floor: Option<f64>,
    /// The standard deviation of the distance over independent draws of real data
    /// ([`distance_noise`]); None in results written before it was measured.
    #[serde(default)]
    pub noise: Option<f64>,
    pub fd_gaussian: Option<f64>,
    pub variants: Vec<Variant>,
    pub seconds: f64,
}

/// Labelled samples for a picture: (label, rows).
pub type SampleSet = (String, Vec<f32>);

/// What a caller is told while the study runs, and asked for what an earlier run finished.
pub trait Observer {
    /// A variant an interrupted run finished already (it is not trained again).
    fn finished_before(&mut self, _name: &str) -> Result<Option<Variant>> {
        Ok(None)
    }
    fn started(&mut self, _name: &str, _steps: u64) {}
    fn step(&mut self, _step: u64, _loss: f64) {}
    /// Training is over; the measurements start.
    fn measuring(&mut self, _name: &str) {}
    /// A variant is trained and measured; `sets` holds labelled sample sets for pictures (midpoint at
    /// NFE 8 on each grid, or each guidance mode at the smallest budget, one sample of each class
    /// first).
    fn finished(
        &mut self,
        _trainer: &Trainer,
        _variant: &Variant,
        _sets: &[SampleSet],
    ) -> Result<()> {
        Ok(())
    }
}

/// An observer that is told nothing.
impl Observer for () {}

/// One study: the data, the sizes and the evaluation.
pub struct Schedules<'a> {
    pub data: &'a dyn DataSource,
    pub data_name: String,
    pub sizes: Sizes,
    pub seed: u64,
    pub eval: Evaluator,
    /// (C, H, W) of image data (None: 2-D points).
    pub image: Option<[usize; 3]>,
    /// The guidance comparison (labelled images only; None skips it).
    pub guidance: Option<GuidanceSetup>,
}

impl Schedules<'_> {
    /// The network of a variant: the ablation's, class-conditional for the guidance variant.
    pub fn network(&self, conditional: bool) -> ModelConfig {
        let mut model = network(self.sizes.hidden, self.image);
        if let (true, ModelConfig::UNet(u)) = (conditional, &mut model) {
            u.num_classes = self.data.num_classes();
        }
        model
    }

    /// The run configuration of a variant: FM on the OT path (sigma_min 0), AdamW at 1e-3 with 100
    /// warm-up steps and cosine decay, as in the ablation.
    pub fn run_config(&self, sampling: TimeSampling, conditional: bool) -> RunConfig {
        let s = &self.sizes;
        let mut train = TrainConfig::cosine(s.steps, s.batch, 1e-3, 100, self.seed);
        train.time_sampling = sampling;
        if conditional {
            train.label_dropout = self.guidance.unwrap_or_default().label_dropout;
        }
        let model = self.network(conditional);
        RunConfig::new(model, Objective::FmOt.parts(), train, &self.data_name)
    }

    /// Checks the study can run before anything is trained.
    pub fn validate(&self) -> Result<()> {
        let s = &self.sizes;
        if s.steps == 0 || s.samples < 2 || s.batch == 0 || s.hidden == 0 {
            return Err(Error::Config(
                "the schedules study needs steps >= 1, samples >= 2, a batch and a width".into(),
            ));
        }
        if let Some(g) = &self.guidance {
            if self.data.num_classes() == 0 || self.image.is_none() {
                return Err(Error::Config(
                    "the guidance comparison needs labelled images".into(),
                ));
            }
            if !matches!(self.eval.quality, Quality::Fd { .. }) {
                return Err(Error::Config(
                    "the guidance comparison measures class accuracy with the evaluation classifier"
                        .into(),
                ));
            }
            if !(g.w.is_finite() && (0.0..1.0).contains(&g.label_dropout)) {
                return Err(Error::Config(format!(
                    "guidance needs a finite weight and a label dropout in [0, 1), got w = {}, \
                     p = {}",
                    g.w, g.label_dropout
                )));
            }
        }
        Ok(())
    }

    /// Trains and measures every variant: [`TRAININGS`] in order, then the conditional one.
    pub fn run(&self, observer: &mut dyn Observer) -> Result<Vec<Variant>> {
        self.validate()?;
        let mut out = vec![];
        for (name, sampling) in TRAININGS {
            out.push(self.run_variant(name, sampling, false, observer)?);
        }
        if self.guidance.is_some() {
            let v = self.run_variant(CONDITIONAL, TimeSampling::Uniform, true, observer)?;
            out.push(v);
        }
        Ok(out)
    }

    fn run_variant(
        &self,
        name: &str,
        sampling: TimeSampling,
        conditional: bool,
        observer: &mut dyn Observer,
    ) -> Result<Variant> {
        if let Some(done) = observer.finished_before(name)? {
            return Ok(done);
        }
        let start = Instant::now();
        let cfg = self.run_config(sampling, conditional);
        let mut trainer = Trainer::new(cfg.clone(), &self.eval.device)?;
        observer.started(name, self.sizes.steps);
        let mut final_loss = f64::NAN;
        while trainer.step_count() < self.sizes.steps {
            final_loss = trainer.step(self.data)?;
            observer.step(trainer.step_count(), final_loss);
        }
        let train_seconds = start.elapsed().as_secs_f64();
        observer.measuring(name);
        let model = trainer.ema_model()?;
        let (cells, guided, sets) = match conditional {
            false => {
                let (cells, sets) = self.measure_grids(&model, &cfg)?;
                (cells, vec![], sets)
            }
            true => {
                let (guided, sets) = self.measure_guidance(&model, &cfg)?;
                (vec![], guided, sets)
            }
        };
        let variant = Variant {
            name: name.to_string(),
            time_sampling: sampling,
            conditional,
            final_loss,
            train_seconds,
            seconds: start.elapsed().as_secs_f64(),
            cells,
            guided,
        };
        observer.finished(&trainer, &variant, &sets)?;
        Ok(variant)
    }

    /// Every grid x solver x NFE from the same noise; the midpoint NFE 8 samples of each grid.
    fn measure_grids(&self, model: &Model, cfg: &RunConfig) -> Result<(Vec<Cell>, Vec<SampleSet>)> {
        let x0 = initial_points(cfg, self.sizes.samples, self.seed + 1, None)?;
        let (mut cells, mut sets) = (vec![], vec![]);
        for (grid_name, grid) in GRIDS {
            for kind in SOLVERS {
                for nfe in NFES {
                    let (x, used) =
                        self.draw(model, cfg, &x0, kind, nfe / kind.stages(), grid, None)?;
                    cells.push(Cell {
                        grid: grid_name.to_string(),
                        solver: kind,
                        nfe: used,
                        distance: self.eval.distance(&x)?,
                    });
                    if kind == SolverKind::Midpoint && nfe == 8 {
                        sets.push((format!("{grid_name} grid, midpoint NFE 8"), x));
                    }
                }
            }
        }
        Ok((cells, sets))
    }

    /// Conditional, guided and interval-guided samples at each budget of [`GUIDED_NFES`], labels in
    /// equal blocks over the classes, from the same noise.
    fn measure_guidance(
        &self,
        model: &Model,
        cfg: &RunConfig,
    ) -> Result<(Vec<GuidedCell>, Vec<SampleSet>)> {
        let g = self.guidance.unwrap_or_default();
        let Quality::Fd { classifier, .. } = &self.eval.quality else {
            return Err(Error::Config("guidance needs the FD quality".into()));
        };
        let n = self.sizes.samples;
        let x0 = initial_points(cfg, n, self.seed + 1, None)?;
        let k = model.num_classes();
        let modes = [
            ("conditional", 1.0, None),
            ("guided", g.w, None),
            ("interval", g.w, Some(g.interval)),
        ];
        let (mut cells, mut sets) = (vec![], vec![]);
        for budget in GUIDED_NFES {
            for (mode, w, interval) in modes {
                let cond = Conditioning {
                    interval,
                    ..Conditioning::blocks(n, k, w)
                };
                let steps = self.steps_within(model, cfg, &cond, budget)?;
                let grid = TimeGrid::Uniform;
                let kind = SolverKind::Midpoint;
                let (x, nfe) = self.draw(model, cfg, &x0, kind, steps, grid, Some(&cond))?;
                let accuracy =
                    classifier.accuracy(&clamped(&x), &cond.labels, &self.eval.device)?;
                cells.push(GuidedCell {
                    mode: mode.to_string(),
                    budget,
                    nfe,
                    steps,
                    fd: self.eval.distance(&x)?,
                    accuracy,
                });
                if budget == GUIDED_NFES[0] {
                    // One sample of each class (the first of its block), then the rest.
                    let dim = cfg.model.dim();
                    let firsts: Vec<usize> = (0..k).map(|c| c * n / k).collect();
                    let order = firsts
                        .iter()
                        .copied()
                        .chain((0..n).filter(|i| !firsts.contains(i)));
                    let x: Vec<f32> = order
                        .flat_map(|i| x[i * dim..(i + 1) * dim].to_vec())
                        .collect();
                    sets.push((format!("{mode}, NFE {nfe}"), x));
                }
            }
        }
        Ok((cells, sets))
    }

    /// The most midpoint steps whose NFE (counted by solving one row) stays within `budget`.
    fn steps_within(
        &self,
        model: &Model,
        cfg: &RunConfig,
        cond: &Conditioning,
        budget: usize,
    ) -> Result<usize> {
        let dim = cfg.model.dim();
        let x0 = vec![0.0f32; dim];
        let one = Conditioning {
            labels: cond.labels[..1].to_vec(),
            ..cond.clone()
        };
        let kind = SolverKind::Midpoint;
        let mut steps = 1;
        loop {
            let next = steps + 1;
            let grid = TimeGrid::Uniform;
            let (_, nfe) = self.draw(model, cfg, &x0, kind, next, grid, Some(&one))?;
            if nfe > budget {
                return Ok(steps);
            }
            steps = next;
        }
    }

    /// Samples from the start points `x0` at constant steps on `grid`, and the NFE used.
    #[allow(clippy::too_many_arguments)]
    fn draw(
        &self,
        model: &Model,
        cfg: &RunConfig,
        x0: &[f32],
        kind: SolverKind,
        steps: usize,
        grid: TimeGrid,
        cond: Option<&Conditioning>,
    ) -> Result<(Vec<f32>, usize)> {
        let mut opts = SolveOptions::with_control(StepControl::Constant { steps }).no_throw();
        opts.time_grid = grid;
        let rows = x0.len() / cfg.model.dim();
        let batch = if self.eval.batch == 0 {
            rows
        } else {
            self.eval.batch
        };
        let device = &self.eval.device;
        let drawn = draw_batched(
            model,
            cfg,
            x0,
            kind,
            &opts,
            cond,
            None,
            device,
            batch,
            &mut |_| {},
        )?;
        if !drawn.status.is_completed() {
            return Err(Error::Data(
                "a fixed-step solve stopped: the state is not finite".into(),
            ));
        }
        Ok((drawn.x, drawn.stats.nfe))
    }
}

/// Pixels clamped to [-1, 1], as the classifier saw them in training.
fn clamped(x: &[f32]) -> Vec<f32> {
    x.iter().map(|v| v.clamp(-1.0, 1.0)).collect()
}

/// Which option gives the lowest distance in one column (solver and NFE) of a comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Winner {
    pub solver: SolverKind,
    pub nfe: usize,
    pub best: String,
    pub distance: f64,
    /// The other options within `margin` of the best: the column does not separate them.
    pub within_margin: Vec<String>,
}

/// Per solver and NFE, the training distribution (on the uniform grid) with the lowest distance;
/// options less than `margin` above it are listed as not separated from it.
pub fn best_training(variants: &[Variant], margin: f64) -> Vec<Winner> {
    best_of(margin, |kind, nfe| {
        variants
            .iter()
            .filter(|v| !v.conditional)
            .filter_map(|v| {
                v.distance("uniform", kind, nfe)
                    .map(|d| (v.name.clone(), d))
            })
            .collect()
    })
}

/// Per solver and NFE, the grid (for the uniformly trained model) with the lowest distance.
pub fn best_grid(variants: &[Variant], margin: f64) -> Vec<Winner> {
    let Some(v) = variants.iter().find(|v| v.name == "uniform") else {
        return vec![];
    };
    best_of(margin, |kind, nfe| {
        GRIDS
            .iter()
            .filter_map(|(g, _)| v.distance(g, kind, nfe).map(|d| (g.to_string(), d)))
            .collect()
    })
}

fn best_of(margin: f64, options: impl Fn(SolverKind, usize) -> Vec<(String, f64)>) -> Vec<Winner> {
    let mut out = vec![];
    for kind in SOLVERS {
        for nfe in NFES {
            let mut opts: Vec<(String, f64)> = options(kind, nfe)
                .into_iter()
                .filter(|(_, d)| d.is_finite())
                .collect();
            opts.sort_by(|a, b| a.1.total_cmp(&b.1));
            let Some((best, distance)) = opts.first().cloned() else {
                continue;
            };
            let within_margin = opts[1..]
                .iter()
                .filter(|(_, d)| d - distance < margin)
                .map(|(n, _)| n.clone())
                .collect();
            out.push(Winner {
                solver: kind,
                nfe,
                best,
                distance,
                within_margin,
            });
        }
    }
    out
}

/// The spread of the distance itself: the standard deviation of `distance` over `draws` independent
/// sets of real data (of the size the cells use). Differences between cells below about twice this
/// are not resolved at this sample size.
pub fn distance_noise(
    distance: impl Fn(&[f32]) -> Result<f64>,
    data: &dyn DataSource,
    samples: usize,
    seed: u64,
    draws: usize,
) -> Result<f64> {
    let mut rng = crate::rng::Rng::new(seed).fork(303);
    let d: Vec<f64> = (0..draws.max(2))
        .map(|_| distance(&data.sample(&mut rng, samples)))
        .collect::<Result<_>>()?;
    let mean = d.iter().sum::<f64>() / d.len() as f64;
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (d.len() - 1) as f64;
    Ok(var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Toy2d;
    use crate::rng::Rng;
    use candle_core::Device;

    fn study(data: &dyn DataSource, steps: u64) -> Schedules<'_> {
        let sizes = Sizes {
            steps,
            ..Sizes::preset(true, false)
        };
        Schedules {
            data,
            data_name: "checkerboard".into(),
            sizes,
            seed: 3,
            eval: Evaluator {
                device: Device::Cpu,
                max_steps: 100,
                batch: 0,
                quality: Quality::Energy {
                    reference: data.sample(&mut Rng::new(9), sizes.samples),
                    checkerboard: true,
                },
            },
            image: None,
            guidance: None,
        }
    }

    #[test]
    fn a_small_study_measures_every_cell_and_learns() {
        let data = Toy2d::Checkerboard;
        let s = study(&data, 600);
        let variants = s.run(&mut ()).unwrap();
        assert_eq!(variants.len(), TRAININGS.len());
        let noise = d_noise_ceiling(&s);
        for v in &variants {
            assert_eq!(v.cells.len(), GRIDS.len() * SOLVERS.len() * NFES.len());
            for c in &v.cells {
                // Fixed steps spend exactly their budget.
                assert!(NFES.contains(&c.nfe), "{c:?}");
                assert!(c.distance.is_finite());
            }
            // Trained models beat the noise they start from.
            let d32 = v.distance("uniform", SolverKind::Midpoint, 32).unwrap();
            let d4 = v.distance("uniform", SolverKind::Euler, 4).unwrap();
            assert!(d32 < 0.3 * noise, "{}: {d32} vs noise {noise}", v.name);
            if v.name == "uniform" {
                // Uniform training learns the field at every t: resolving it better helps.
                assert!(d32 < d4, "{}: {d32} vs Euler 4 {d4}", v.name);
            }
        }
        // The time distributions change the models: same seed, different weights, different cells.
        assert_ne!(variants[0].cells, variants[1].cells);
        let winners = best_training(&variants, 0.0);
        assert_eq!(winners.len(), SOLVERS.len() * NFES.len());
        for w in &winners {
            let d = variants
                .iter()
                .map(|v| v.distance("uniform", w.solver, w.nfe).unwrap())
                .fold(f64::INFINITY, f64::min);
            assert_eq!(w.distance, d);
            assert!(
                w.within_margin.is_empty(),
                "a zero margin separates every option"
            );
        }
        // An infinite margin separates nothing.
        for w in best_training(&variants, f64::INFINITY) {
            assert_eq!(w.within_margin.len(), TRAININGS.len() - 1);
        }
        assert_eq!(best_grid(&variants, 0.0).len(), SOLVERS.len() * NFES.len());
        let spread = distance_noise(|x| s.eval.distance(x), &data, s.sizes.samples, 1, 4).unwrap();
        assert!(spread > 0.0 && spread < 0.3 * noise, "{spread} vs {noise}");
    }

    /// The distance of pure noise to the data: a scale the spread of real data must stay far below.
    fn d_noise_ceiling(s: &Schedules) -> f64 {
        s.eval
            .distance(&Rng::new(4).normal_vec(2 * s.sizes.samples))
            .unwrap()
    }

    #[test]
    fn finished_variants_are_not_trained_again() {
        struct Cached(Vec<Variant>, usize);
        impl Observer for Cached {
            fn finished_before(&mut self, name: &str) -> Result<Option<Variant>> {
                Ok(self.0.iter().find(|v| v.name == name).cloned())
            }
            fn started(&mut self, _name: &str, _steps: u64) {
                self.1 += 1;
            }
        }
        let data = Toy2d::Checkerboard;
        let s = study(&data, 5);
        let first = s.run(&mut ()).unwrap();
        let mut cached = Cached(first[..2].to_vec(), 0);
        let again = s.run(&mut cached).unwrap();
        assert_eq!(cached.1, 1, "only the unfinished variant trains");
        let cells = |v: &[Variant]| v.iter().map(|v| v.cells.clone()).collect::<Vec<_>>();
        assert_eq!(
            cells(&again),
            cells(&first),
            "the same seed gives the same numbers"
        );
    }

    #[test]
    fn guidance_needs_labelled_images() {
        let data = Toy2d::Checkerboard;
        let mut s = study(&data, 5);
        s.guidance = Some(GuidanceSetup::default());
        let e = s.run(&mut ()).unwrap_err().to_string();
        assert!(e.contains("labelled images"), "{e}");
    }
}
