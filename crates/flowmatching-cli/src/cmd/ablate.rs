//! `flowmatching ablate`: the flow-matching paper's five-way ablation as one command.
//!
//! Trains DDPM, score matching, ScoreFlow, FM on the diffusion path and FM on the OT path with the same
//! network, optimizer, steps, batch and seed, samples every model through the same probability-flow ODE,
//! and writes report.md, results.json and PNG figures (analogues of the paper's Table 1 and Figures 2-4,
//! 7 and 10).
//!
//! On 2-D data the network is an MLP and quality is the energy distance to fresh data; on images
//! (`--data fashion-mnist`, an image folder or a .npy of images) it is the unconditional `tiny` U-Net,
//! quality is FD (the evaluation classifier's features, `--classifier`), the likelihood is in bits/dim
//! (Hutchinson, dequantized held-out images) and the path figures (2 and 3) are left out.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use flowmatching::classifier::Classifier;
use flowmatching::data::DataSource;
use flowmatching::frechet::{frechet_distance, GaussianStats};
use flowmatching::likelihood::{
    bits_per_dim, log_likelihood, Divergence, LikelihoodOptions, Probe,
};
use flowmatching::metrics::{checkerboard_support, energy_distance};
use flowmatching::model::{Activation, MlpConfig, Model, ModelConfig, TimeEmbedding, UNetConfig};
use flowmatching::objective::Objective;
use flowmatching::optim::{AdamWConfig, LrDecay};
use flowmatching::path::AffinePath;
use flowmatching::rng::Rng;
use flowmatching::scheduler::SchedulerConfig;
use flowmatching::solver::{Adaptive, SolveOptions, SolverKind, StepControl};
use flowmatching::train::{RunConfig, TrainConfig, Trainer, FORMAT_VERSION};
use serde::{Deserialize, Serialize};

use crate::cli::{AblateArgs, Preset};
use crate::cmd::{image_eval, likelihood, sample};
use crate::plot::{self, Series};
use crate::{images, io, progress};

/// Sizes of a run.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Sizes {
    hidden: usize,
    batch: usize,
    steps: u64,
    /// Adaptive NFE is measured this many times during training.
    checkpoints: u64,
    samples: usize,
    nfe_samples: usize,
    nll_points: usize,
    error_points: usize,
    /// Images integrated together (images only; 0 for 2-D data: all at once).
    #[serde(default)]
    eval_batch: usize,
    /// Cap on the steps of every adaptive solve (a solve that hits it is reported as capped).
    #[serde(default = "default_max_steps")]
    max_adaptive_steps: usize,
}

fn sizes(preset: Preset, images: bool) -> Sizes {
    if images {
        return match preset {
            Preset::Quick => Sizes {
                hidden: 32,
                batch: 64,
                steps: 500,
                checkpoints: 5,
                samples: 1000,
                nfe_samples: 100,
                nll_points: 100,
                error_points: 100,
                eval_batch: 500,
                max_adaptive_steps: 500,
            },
            // Sized for one call on a lent GPU (the tiny U-Net steps in ~80 ms on an H100 at batch 128:
            // 5 x 600 steps is ~4 minutes of training; not yet run there).
            Preset::Default => Sizes {
                hidden: 32,
                batch: 128,
                steps: 600,
                checkpoints: 4,
                samples: 1000,
                nfe_samples: 100,
                nll_points: 100,
                error_points: 100,
                eval_batch: 1000,
                max_adaptive_steps: 500,
            },
        };
    }
    match preset {
        Preset::Quick => Sizes {
            hidden: 128,
            batch: 512,
            steps: 3000,
            checkpoints: 6,
            samples: 3000,
            nfe_samples: 500,
            nll_points: 1000,
            error_points: 500,
            eval_batch: 0,
            max_adaptive_steps: MAX_STEPS,
        },
        Preset::Default => Sizes {
            hidden: 256,
            batch: 1024,
            steps: 20_000,
            checkpoints: 10,
            samples: 10_000,
            nfe_samples: 2000,
            nll_points: 5000,
            error_points: 2000,
            eval_batch: 0,
            max_adaptive_steps: MAX_STEPS,
        },
    }
}

/// Fixed-NFE budgets of the Figure 4 and Table 1 analogues.
const NFES: [usize; 4] = [4, 8, 16, 32];
/// Adaptive tolerance of the paper's NFE measurements.
const TOL: f64 = 1e-5;
/// Default cap on adaptive steps in evaluations (a score model can need very many).
const MAX_STEPS: usize = 2000;

fn default_max_steps() -> usize {
    MAX_STEPS
}

#[derive(Debug, Serialize, Deserialize)]
struct FixedNfe {
    solver: SolverKind,
    nfe: usize,
    /// Energy distance (2-D) or FD (images); see [`Results::metric`].
    #[serde(alias = "energy_distance")]
    distance: f64,
    in_support_fraction: Option<f64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ObjectiveResult {
    objective: Objective,
    name: String,
    final_loss: f64,
    train_seconds: f64,
    adaptive_nfe: Option<usize>,
    #[serde(alias = "adaptive_energy_distance")]
    adaptive_distance: Option<f64>,
    adaptive_in_support_fraction: Option<f64>,
    nll_nats: Option<f64>,
    nll_standard_error: Option<f64>,
    /// Images: the NLL of dequantized held-out images in bits/dim.
    #[serde(default)]
    nll_bits_per_dim: Option<f64>,
    fixed: Vec<FixedNfe>,
    /// (training step, adaptive NFE) during training; None where the solve hit the step cap.
    nfe_during_training: Vec<(u64, Option<usize>)>,
    /// (training step, smoothed loss).
    loss_curve: Vec<(u64, f64)>,
    /// Per solver: (NFE, mean distance to a tight-tolerance solution).
    numerical_error: ErrorCurves,
}

/// Everything `results.json` holds; `--report-only` rewrites report.md from it.
#[derive(Debug, Serialize, Deserialize)]
struct Results {
    command: String,
    data: String,
    /// The quality measure: "energy distance" (2-D) or "FD" (images).
    #[serde(default = "energy_distance_name")]
    metric: String,
    /// The network, in words (absent in 2-D results written before images were supported).
    #[serde(default)]
    model: Option<String>,
    seed: u64,
    seconds: f64,
    sizes: Sizes,
    results: Vec<ObjectiveResult>,
}

fn energy_distance_name() -> String {
    "energy distance".into()
}

/// Per solver (Euler, midpoint, RK4): (NFE, mean distance to a tight-tolerance solution).
type ErrorCurves = Vec<(SolverKind, Vec<(usize, f64)>)>;

fn run_config(obj: Objective, s: &Sizes, seed: u64, data: &str, model: ModelConfig) -> RunConfig {
    let (path, prediction, weighting) = obj.parts();
    RunConfig {
        format_version: FORMAT_VERSION,
        model,
        path,
        prediction,
        weighting,
        train: TrainConfig {
            steps: s.steps,
            batch_size: s.batch,
            optimizer: AdamWConfig {
                lr: 1e-3,
                ..Default::default()
            },
            warmup_steps: 100,
            lr_decay: LrDecay::Cosine,
            grad_clip: Some(1.0),
            ema_decay: 0.999,
            seed,
            label_dropout: 0.0,
            coupling: Default::default(),
        },
        data: data.into(),
        source: None,
    }
}

/// The MLP of the 2-D ablation, or the unconditional `tiny` U-Net (base channels `s.hidden`) on images.
fn network(s: &Sizes, image: Option<[usize; 3]>) -> ModelConfig {
    match image {
        None => ModelConfig::Mlp(MlpConfig {
            dim: 2,
            hidden: s.hidden,
            depth: 4,
            time_embedding: TimeEmbedding::Input,
            activation: Activation::Silu,
        }),
        Some([c, h, w]) => {
            let mut u = UNetConfig::tiny(c, h, w, 0);
            u.base_channels = s.hidden;
            ModelConfig::UNet(u)
        }
    }
}

fn describe(model: &ModelConfig) -> String {
    match model {
        ModelConfig::Mlp(m) => format!("MLP (3-{}x{}-2, SiLU)", m.hidden, m.depth),
        ModelConfig::UNet(u) => format!(
            "unconditional U-Net (`tiny` layout, {} base channels, channel multipliers {:?}, attention at {:?})",
            u.base_channels, u.channel_mults, u.attention_resolutions
        ),
    }
}

/// Dopri5's controller at rtol = atol = `tol`, capped at `max_steps`.
fn adaptive(tol: f64, max_steps: usize) -> Result<StepControl> {
    let mut a = Adaptive::new(tol, tol)?;
    a.max_steps = max_steps;
    Ok(StepControl::Adaptive(a))
}

/// Where and how samples are drawn and judged.
struct Eval {
    device: Device,
    /// Cap on adaptive steps.
    max_steps: usize,
    /// Samples integrated together (all at once when 0).
    batch: usize,
    quality: Quality,
}

/// Sample quality against the data.
enum Quality {
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

impl Eval {
    /// Samples from `n` noise points (seeded); None if the adaptive solve hit its cap.
    fn draw(
        &self,
        model: &Model,
        cfg: &RunConfig,
        n: usize,
        kind: SolverKind,
        control: StepControl,
        seed: u64,
    ) -> Result<Option<(Vec<f32>, usize)>> {
        let opts = SolveOptions {
            control,
            grid: vec![],
            keep_trajectory: false,
        };
        let batch = if self.batch == 0 { n } else { self.batch };
        match sample::draw_batched(model, cfg, n, kind, &opts, seed, None, &self.device, batch) {
            Ok((x, stats)) => Ok(Some((x, stats.nfe))),
            Err(e)
                if matches!(
                    e.downcast_ref::<flowmatching::Error>(),
                    Some(flowmatching::Error::SolverStopped(_))
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Energy distance (2-D) or FD (images) of samples `x`.
    fn distance(&self, x: &[f32]) -> Result<f64> {
        match &self.quality {
            Quality::Energy { reference, .. } => Ok(energy_distance(x, reference, 2)),
            Quality::Fd {
                classifier,
                reference,
                ..
            } => {
                let x: Vec<f32> = x.iter().map(|v| v.clamp(-1.0, 1.0)).collect();
                let stats = image_eval::stats_of(classifier, &x, &self.device)?;
                Ok(frechet_distance(&stats, reference)?)
            }
        }
    }

    /// The checkerboard's in-support share (None elsewhere).
    fn support(&self, x: &[f32]) -> Option<f64> {
        match &self.quality {
            Quality::Energy {
                checkerboard: true, ..
            } => Some(checkerboard_support(x).in_support_fraction),
            _ => None,
        }
    }

    /// The Figure 4 row of one objective: 2-D histograms, or one image row per budget (the first 10
    /// samples, from the same noise in every row).
    fn picture(&self, path: &Path, row: &[Vec<f32>]) -> Result<()> {
        match &self.quality {
            Quality::Energy { reference, .. } => {
                let sets: Vec<&[f32]> = row.iter().map(Vec::as_slice).collect();
                plot::histograms(path, &sets, 2, plot::window(reference), 60)
            }
            Quality::Fd { shape, .. } => {
                let per: usize = shape.iter().product();
                let k = row.iter().map(|x| x.len() / per).min().unwrap_or(0).min(10);
                let grid: Vec<f32> = row
                    .iter()
                    .flat_map(|x| x[..k * per].iter().map(|v| v.clamp(-1.0, 1.0)))
                    .collect();
                images::write_grid(path, &grid, *shape, k.max(1))
            }
        }
    }
}

pub fn run(a: &AblateArgs) -> Result<()> {
    if a.report_only {
        let path = a.out.join("results.json");
        let text = std::fs::read(&path)
            .map_err(|e| anyhow::anyhow!("--report-only: cannot read {} ({e})", path.display()))?;
        let r: Results = serde_json::from_slice(&text).map_err(|e| {
            anyhow::anyhow!(
                "--report-only: {} is not an ablation's results.json ({e})",
                path.display()
            )
        })?;
        return write_report(&a.out, &r);
    }
    let data_opts = a.images.options();
    let data = io::open_data_with(&a.data, &data_opts)?;
    let image = data.image_shape();
    let mut s = sizes(a.preset, image.is_some());
    if let Some(steps) = a.steps {
        if steps == 0 {
            bail!("--steps must be at least 1");
        }
        s.steps = steps;
    }
    if let Some(n) = a.num_samples {
        if n < 2 {
            bail!("--num-samples must be at least 2");
        }
        for v in [
            &mut s.samples,
            &mut s.nfe_samples,
            &mut s.nll_points,
            &mut s.error_points,
        ] {
            *v = (*v).min(n);
        }
    }
    if let Some(b) = a.base_channels {
        if image.is_none() {
            bail!(
                "--base-channels sets the U-Net of an image ablation; {} is 2-D data",
                a.data
            );
        }
        s.hidden = b;
    }
    if image.is_none() && data.dim() != 2 {
        bail!(
            "ablate works on 2-D points or images; {} is {}-dimensional",
            a.data,
            data.dim()
        );
    }
    let device = a.device.device()?;
    if image.is_none() && !device.is_cpu() {
        bail!("the 2-D ablation runs on the CPU (its MLP engine is CPU-only); drop --device");
    }
    let model_config = network(&s, image);
    model_config.validate()?;
    let quality = match image {
        None => Quality::Energy {
            reference: data.sample(&mut Rng::new(a.seed).fork(300), s.samples),
            checkerboard: a.data == "checkerboard",
        },
        Some(shape) => {
            let Some(path) = &a.classifier else {
                bail!(
                    "an image ablation measures FD with an evaluation classifier: pass --classifier \
                     (made by `flowmatching classifier train`)"
                );
            };
            let classifier = image_eval::load_classifier(path, shape, &device)?;
            let reference = io::open_image_set(&reference_set(&a.data), &data_opts)?;
            let rows =
                &reference.rows()[..s.samples.min(reference.len()) * DataSource::dim(&reference)];
            let reference = image_eval::stats_of(&classifier, rows, &device)?;
            Quality::Fd {
                classifier: Box::new(classifier),
                reference,
                shape,
            }
        }
    };
    if let Some(m) = a.max_adaptive_steps {
        if m == 0 {
            bail!("--max-adaptive-steps must be at least 1");
        }
        s.max_adaptive_steps = m;
    }
    let eval = Eval {
        device: device.clone(),
        max_steps: s.max_adaptive_steps,
        batch: s.eval_batch,
        quality,
    };
    // Held-out points for the likelihood: fresh 2-D draws, or dequantized reference images.
    let (held_out, dim) = match image {
        None => (
            data.sample(&mut Rng::new(a.seed).fork(301), s.nll_points),
            2,
        ),
        Some(_) => likelihood::dequantized_images(
            &reference_set(&a.data),
            &data_opts,
            Some(s.nll_points),
            a.seed,
        )?,
    };
    let nll_points = held_out.len() / dim;
    io::ensure_dir(&a.out)?;
    let every = (s.steps / s.checkpoints).max(1);
    let started = Instant::now();
    let mut results = vec![];
    for obj in Objective::ALL {
        let cfg = run_config(obj, &s, a.seed, &a.data, model_config.clone());
        let mut trainer = Trainer::new(cfg.clone(), &device)?;
        eprintln!("ablate: {} ({} steps)", obj.name(), s.steps);
        let bar = progress::training_bar(s.steps, 0);
        let t0 = Instant::now();
        let (mut loss_curve, mut nfe_curve) = (vec![], vec![]);
        let (mut acc, mut count, mut last) = (0.0, 0u64, f64::NAN);
        let mut train_seconds = 0.0;
        while trainer.step_count() < s.steps {
            last = trainer.step(data.as_ref())?;
            acc += last;
            count += 1;
            let step = trainer.step_count();
            bar.set_position(step);
            if step % every == 0 || step == s.steps {
                train_seconds += t0.elapsed().as_secs_f64();
                bar.set_message(format!("{:.4}", acc / count as f64));
                loss_curve.push((step, acc / count as f64));
                (acc, count) = (0.0, 0);
                let model = trainer.ema_model()?;
                let r = eval.draw(
                    &model,
                    &cfg,
                    s.nfe_samples,
                    SolverKind::Dopri5,
                    adaptive(TOL, s.max_adaptive_steps)?,
                    a.seed + 7,
                )?;
                nfe_curve.push((step, r.map(|r| r.1)));
            }
        }
        bar.finish_and_clear();
        let model = trainer.ema_model()?;
        // Table 1 analogue: adaptive solve.
        let adaptive_run = eval.draw(
            &model,
            &cfg,
            s.samples,
            SolverKind::Dopri5,
            adaptive(TOL, s.max_adaptive_steps)?,
            a.seed + 1,
        )?;
        // Fixed budgets, and the Figure 4 row (midpoint at each budget, then the adaptive samples).
        let mut fixed = vec![];
        let mut row: Vec<Vec<f32>> = vec![];
        for kind in [SolverKind::Euler, SolverKind::Midpoint] {
            for nfe in NFES {
                let steps = nfe / kind.stages();
                let (x, used) = eval
                    .draw(
                        &model,
                        &cfg,
                        s.samples,
                        kind,
                        StepControl::Constant { steps },
                        a.seed + 1,
                    )?
                    .expect("fixed steps always finish");
                fixed.push(FixedNfe {
                    solver: kind,
                    nfe: used,
                    distance: eval.distance(&x)?,
                    in_support_fraction: eval.support(&x),
                });
                if kind == SolverKind::Midpoint {
                    row.push(x);
                }
            }
        }
        if let Some((x, _)) = &adaptive_run {
            row.push(x.clone());
        }
        eval.picture(&a.out.join(format!("samples-{}.png", file_name(obj))), &row)?;
        // Figure 7 analogue: error against a tight-tolerance solution from the same noise.
        let numerical_error = numerical_error(&eval, &model, &cfg, s.error_points, a.seed + 2)?;
        // Likelihood of held-out data: exact divergence in 2-D, Hutchinson (one probe) on images.
        let x = Tensor::from_vec(held_out.clone(), (nll_points, dim), &device)?;
        let path = AffinePath::from_config(&cfg.path)?;
        let field = flowmatching::path::AsVelocity {
            field: &model,
            path: &path,
            prediction: cfg.prediction,
        };
        let lopts = LikelihoodOptions {
            divergence: match image {
                None => Divergence::Exact,
                Some(_) => Divergence::Hutchinson {
                    probes: 1,
                    probe: Probe::Rademacher,
                },
            },
            solver: SolverKind::Dopri5,
            control: adaptive(TOL, s.max_adaptive_steps)?,
            seed: a.seed,
        };
        let nll = match log_likelihood(&field, &x, &lopts) {
            Ok(ll) => Some(ll.nll()),
            Err(flowmatching::Error::SolverStopped(_)) => None,
            Err(e) => return Err(e.into()),
        };
        let (distance, support) = match &adaptive_run {
            Some((x, _)) => (Some(eval.distance(x)?), eval.support(x)),
            None => (None, None),
        };
        results.push(ObjectiveResult {
            objective: obj,
            name: obj.name().to_string(),
            final_loss: last,
            train_seconds,
            adaptive_nfe: adaptive_run.as_ref().map(|r| r.1),
            adaptive_distance: distance,
            adaptive_in_support_fraction: support,
            nll_nats: nll.map(|n| n.0),
            nll_standard_error: nll.map(|n| n.1),
            nll_bits_per_dim: image.and(nll).map(|n| bits_per_dim(n.0, dim, 2.0 / 256.0)),
            fixed,
            nfe_during_training: nfe_curve,
            loss_curve,
            numerical_error,
        });
        flowmatching::checkpoint::save(
            &trainer,
            &a.out.join("checkpoints").join(file_name(obj)),
            Some(last),
        )?;
    }
    if let Quality::Energy { reference, .. } = &eval.quality {
        path_figures(&a.out, reference, a.seed)?;
    }
    figures(&a.out, &results)?;
    let mut command = format!(
        "flowmatching ablate --data {} --out {} --preset {}",
        a.data,
        a.out.display(),
        match a.preset {
            Preset::Quick => "quick",
            Preset::Default => "default",
        }
    );
    for (flag, v) in [
        ("--steps", a.steps.map(|v| v.to_string())),
        ("--num-samples", a.num_samples.map(|v| v.to_string())),
        ("--base-channels", a.base_channels.map(|v| v.to_string())),
        (
            "--max-adaptive-steps",
            a.max_adaptive_steps.map(|v| v.to_string()),
        ),
        ("--seed", (a.seed != 0).then(|| a.seed.to_string())),
        ("--device", (!device.is_cpu()).then(|| "cuda".to_string())),
    ] {
        if let Some(v) = v {
            command += &format!(" {flag} {v}");
        }
    }
    let r = Results {
        command,
        data: a.data.clone(),
        metric: match image {
            None => energy_distance_name(),
            Some(_) => "FD".into(),
        },
        model: Some(describe(&model_config)),
        seed: a.seed,
        seconds: started.elapsed().as_secs_f64(),
        sizes: s,
        results,
    };
    io::write_json(&a.out.join("results.json"), &r)?;
    write_report(&a.out, &r)?;
    eprintln!("wrote {}/report.md ({:.0} s)", a.out.display(), r.seconds);
    Ok(())
}

/// The images FD and the likelihood are measured against: Fashion-MNIST's test half, else the data.
fn reference_set(data: &str) -> String {
    match data {
        "fashion-mnist" | "fashion-mnist:train" => "fashion-mnist:test".into(),
        other => other.into(),
    }
}

fn write_report(out: &Path, r: &Results) -> Result<()> {
    let md = report(r);
    flowmatching::checkpoint::write_atomic(&out.join("report.md"), md.as_bytes())?;
    Ok(())
}

fn file_name(obj: Objective) -> String {
    serde_json::to_value(obj)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

/// Per solver: (NFE, mean Euclidean distance of fixed-step samples to a Dopri5 solution at 1e-7 from the
/// same noise).
fn numerical_error(
    eval: &Eval,
    model: &Model,
    cfg: &RunConfig,
    n: usize,
    seed: u64,
) -> Result<ErrorCurves> {
    let dim = cfg.model.dim();
    let Some((reference, _)) = eval.draw(
        model,
        cfg,
        n,
        SolverKind::Dopri5,
        adaptive(1e-7, eval.max_steps)?,
        seed,
    )?
    else {
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
            let (x, used) = eval
                .draw(model, cfg, n, kind, StepControl::Constant { steps }, seed)?
                .expect("fixed steps finish");
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

/// The Figure 10, Figure 7 and loss-curve plots.
fn figures(out: &Path, results: &[ObjectiveResult]) -> Result<()> {
    let nfe: Vec<Series> = results
        .iter()
        .map(|r| Series {
            label: r.name.clone(),
            points: r
                .nfe_during_training
                .iter()
                .filter_map(|(s, n)| n.map(|n| (*s as f64, n as f64)))
                .collect(),
        })
        .collect();
    plot::line_plot(
        &out.join("nfe-during-training.png"),
        "Adaptive NFE (dopri5, tol 1e-5) during training",
        "training step",
        "NFE",
        &nfe,
        false,
        true,
    )?;
    let err: Vec<Series> = results
        .iter()
        .filter_map(|r| {
            r.numerical_error
                .iter()
                .find(|(k, _)| *k == SolverKind::Midpoint)
                .map(|(_, c)| Series {
                    label: r.name.clone(),
                    points: c.iter().map(|&(n, e)| (n as f64, e)).collect(),
                })
        })
        .collect();
    plot::line_plot(
        &out.join("error-vs-nfe.png"),
        "Midpoint: distance to a tight-tolerance solution",
        "NFE",
        "mean error",
        &err,
        true,
        true,
    )?;
    let loss: Vec<Series> = results
        .iter()
        .map(|r| Series {
            label: r.name.clone(),
            points: r.loss_curve.iter().map(|&(s, l)| (s as f64, l)).collect(),
        })
        .collect();
    plot::line_plot(
        &out.join("loss.png"),
        "Training loss (each objective's own scale)",
        "training step",
        "loss",
        &loss,
        false,
        true,
    )
}

/// The trajectory figures of 2-D data (Figures 2 and 3): conditional and marginal paths.
fn path_figures(out: &Path, reference: &[f32], seed: u64) -> Result<()> {
    // Conditional paths (straight vs curved) for the same (x0, x1) pairs on both paths, and the marginal
    // paths of the two FM models.
    let mut rng = Rng::new(seed).fork(400);
    let n = 150;
    let x0 = rng.normal_vec(2 * n);
    let x1: Vec<f32> = reference[..2 * n].to_vec();
    let times: Vec<f64> = (0..=50).map(|i| i as f64 / 50.0).collect();
    for (name, sched) in [
        ("ot", SchedulerConfig::CondOt { sigma_min: 1e-5 }),
        (
            "vp",
            SchedulerConfig::Vp {
                beta_min: 0.1,
                beta_max: 20.0,
            },
        ),
    ] {
        let path = AffinePath::from_config(&sched)?;
        let frames: Vec<Vec<f32>> = times
            .iter()
            .map(|&t| {
                path.sample_rows(
                    &x0,
                    &x1,
                    &vec![t; n],
                    2,
                    flowmatching::path::Prediction::Velocity,
                )
                .0
            })
            .collect();
        plot::trajectories(
            &out.join(format!("conditional-paths-{name}.png")),
            &frames,
            2,
            n,
        )?;
    }
    for obj in [Objective::FmOt, Objective::FmDiffusion] {
        let ck = flowmatching::checkpoint::Checkpoint::load(
            &out.join("checkpoints").join(file_name(obj)),
            &Device::Cpu,
        )?;
        let model = ck.model(&Device::Cpu, true)?;
        let opts = SolveOptions {
            control: adaptive(TOL, MAX_STEPS)?,
            grid: times.clone(),
            keep_trajectory: false,
        };
        let (_, sol) = sample::draw(
            &model,
            &ck.meta.config,
            n,
            SolverKind::Dopri5,
            &opts,
            seed + 3,
        )?;
        let frames: Vec<Vec<f32>> = sol
            .grid
            .iter()
            .map(|g| g.flatten_all()?.to_vec1())
            .collect::<candle_core::Result<_>>()?;
        plot::trajectories(
            &out.join(format!("marginal-paths-{}.png", file_name(obj))),
            &frames,
            2,
            n,
        )?;
    }
    Ok(())
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "capped".into())
}

fn report(res: &Results) -> String {
    let (s, r) = (&res.sizes, &res.results[..]);
    let checkerboard = res.data == "checkerboard";
    let mut md = String::new();
    md += &format!(
        "# Five objectives, one network: the flow-matching ablation on `{}`\n\n",
        res.data
    );
    md += &format!(
        "Made by `{}` in {:.0} s (seed {}).\n\n",
        res.command, res.seconds, res.seed
    );
    let images = res.metric == "FD";
    md += &format!(
        "Every objective trains the same {model} with AdamW (lr 1e-3, 100 warm-up steps, cosine \
         decay), gradient clipping at 1, EMA 0.999, batch {b}, {st} steps and the same seed; nothing is tuned per \
         objective. Each is sampled through the same probability-flow ODE (its prediction converted to a velocity \
         on its path). {quality}{sup}. The adaptive solver is Dopri5 at rtol = atol = 1e-5, capped at {cap} steps.\n\n",
        model = res
            .model
            .clone()
            .unwrap_or_else(|| format!("MLP (3-{}x4-2, SiLU)", s.hidden)),
        b = s.batch,
        st = s.steps,
        quality = if images {
            format!(
                "Quality is FD: the Frechet distance of the evaluation classifier's features of {} samples to \
                 those of as many reference images (lower is better); the likelihood is in bits/dim of {} \
                 dequantized reference images (Hutchinson, one probe)",
                s.samples, s.nll_points
            )
        } else {
            format!(
                "Quality is the energy distance to {} fresh data points (lower is better; two data sets of \
                 that size give about 0)",
                s.samples
            )
        },
        sup = if checkerboard { ", and the share of samples inside the checkerboard's squares" } else { "" },
        cap = s.max_adaptive_steps,
    );
    let m = if images { "FD" } else { "ED" };
    md += "## Table 1 analogue\n\n";
    md += &format!(
        "| objective | final loss | adaptive NFE | {} (adaptive) |",
        res.metric
    );
    md += if checkerboard {
        " in support (adaptive) |"
    } else {
        ""
    };
    md += if images {
        " bits/dim |"
    } else {
        " NLL (nats) |"
    };
    for n in NFES {
        md += &format!(" {m} @ {n} NFE (midpoint) |");
    }
    md += "\n|---|---|---|---|";
    md += if checkerboard { "---|" } else { "" };
    md += "---|";
    md += &"---|".repeat(NFES.len());
    md += "\n";
    for x in r {
        md += &format!(
            "| {} | {:.4} | {} | {} |",
            x.name,
            x.final_loss,
            x.adaptive_nfe
                .map(|n| n.to_string())
                .unwrap_or("capped".into()),
            opt(x.adaptive_distance, 4)
        );
        if checkerboard {
            md += &format!(" {} |", opt(x.adaptive_in_support_fraction, 3));
        }
        md += &format!(
            " {} |",
            match (x.nll_bits_per_dim, x.nll_nats, x.nll_standard_error) {
                (Some(b), _, _) => format!("{b:.3}"),
                (None, Some(n), Some(se)) => format!("{n:.3} +- {se:.3}"),
                _ => "capped".into(),
            }
        );
        for f in x.fixed.iter().filter(|f| f.solver == SolverKind::Midpoint) {
            md += &format!(" {:.4} |", f.distance);
        }
        md += "\n";
    }
    md += &format!(
        "\nEuler at the same budgets ({}):\n\n| objective |",
        res.metric
    );
    for n in NFES {
        md += &format!(" {n} NFE |");
    }
    md += &format!("\n|---|{}\n", "---|".repeat(NFES.len()));
    for x in r {
        md += &format!("| {} |", x.name);
        for f in x.fixed.iter().filter(|f| f.solver == SolverKind::Euler) {
            md += &format!(" {:.4} |", f.distance);
        }
        md += "\n";
    }
    md += "\n## Figure 4 analogue: samples at 4, 8, 16, 32 NFE (midpoint) and adaptive\n\n";
    md += if images {
        "Rows, top to bottom: 4, 8, 16, 32 NFE with the midpoint solver, then Dopri5 at 1e-5 (absent where \
         capped); each column starts from the same noise.\n\n"
    } else {
        "Columns, left to right: 4, 8, 16, 32 NFE with the midpoint solver, then Dopri5 at 1e-5 (absent where capped).\n\n"
    };
    for x in r {
        md += &format!(
            "**{}**

![{}](samples-{}.png)

",
            x.name,
            x.name,
            file_name(x.objective)
        );
    }
    md += "## Figure 10 analogue: adaptive NFE during training\n\n![adaptive NFE during training](nfe-during-training.png)\n\n";
    md += "| objective |";
    let steps: Vec<u64> = r
        .first()
        .map(|x| x.nfe_during_training.iter().map(|p| p.0).collect())
        .unwrap_or_default();
    for st in &steps {
        md += &format!(" {st} |");
    }
    md += &format!("\n|---|{}\n", "---|".repeat(steps.len()));
    for x in r {
        md += &format!("| {} |", x.name);
        for (_, n) in &x.nfe_during_training {
            md += &format!(" {} |", n.map(|n| n.to_string()).unwrap_or("capped".into()));
        }
        md += "\n";
    }
    md += "\n## Figure 7 analogue: numerical error against NFE\n\nMean distance between fixed-step midpoint \
           samples and a Dopri5 solution at 1e-7 from the same noise.\n\n![error against NFE](error-vs-nfe.png)\n\n";
    if !images {
        md += "## Figures 2 and 3 analogue: conditional and marginal paths\n\n\
               | | OT path | diffusion (VP) path |\n|---|---|---|\n\
               | conditional paths x_t = sigma_t x0 + alpha_t x1 | ![](conditional-paths-ot.png) | ![](conditional-paths-vp.png) |\n\
               | marginal paths of the trained FM model | ![](marginal-paths-fm-ot.png) | ![](marginal-paths-fm-diffusion.png) |\n\n\
               Colour runs from noise (dark) to data (yellow).\n\n";
    }
    md += "![training loss](loss.png)\n\n";
    md += "## Which of the paper's orderings this run reproduces\n\n";
    md += &orderings(r, &res.metric);
    md
}

/// The seed's three claims, checked against this run's numbers.
fn orderings(r: &[ObjectiveResult], metric: &str) -> String {
    let get = |o: Objective| r.iter().find(|x| x.objective == o);
    let mut out = String::new();
    let ot = get(Objective::FmOt);
    // 1. lowest adaptive NFE
    let best_nfe = r
        .iter()
        .filter_map(|x| x.adaptive_nfe.map(|n| (n, x.name.as_str())))
        .min();
    let ot_nfe = ot.and_then(|x| x.adaptive_nfe);
    out += &match (best_nfe, ot_nfe) {
        (Some((n, _)), Some(o)) if o == n => {
            format!("- **Reproduced**: FM-OT needs the fewest adaptive evaluations ({o} NFE).\n")
        }
        (Some((n, name)), Some(o)) => {
            format!("- **Not reproduced**: FM-OT needs {o} adaptive NFE, {name} only {n}.\n")
        }
        _ => "- Not decided: some adaptive solves hit the step cap.\n".into(),
    };
    // 2. cleanest at NFE 4
    let at4 = |x: &ObjectiveResult| {
        x.fixed
            .iter()
            .find(|f| f.solver == SolverKind::Midpoint && f.nfe == 4)
            .map(|f| f.distance)
    };
    let best4 = r
        .iter()
        .filter_map(|x| at4(x).map(|e| (e, x.name.as_str())))
        .min_by(|a, b| a.0.total_cmp(&b.0));
    out += &match (best4, ot.and_then(at4)) {
        (Some((_, "FM-OT")), Some(o)) => {
            format!("- **Reproduced**: FM-OT's samples are the cleanest at 4 NFE (midpoint, {metric} {o:.4}).\n")
        }
        (Some((e, name)), Some(o)) => format!("- **Not reproduced**: at 4 NFE {name} is cleaner ({metric} {e:.4}) than FM-OT ({o:.4}).\n"),
        _ => String::new(),
    };
    // 3. NFE flat over training for FM, drifting for score matching: relative range (max - min) / max of
    //    the adaptive NFE over all measurements during training; reproduced only when every FM curve's range
    //    is under half of every score-matching curve's range (a capped measurement counts as drift).
    let range = |x: &ObjectiveResult| -> Option<f64> {
        let v: Vec<usize> = x
            .nfe_during_training
            .iter()
            .map(|p| p.1)
            .collect::<Option<Vec<_>>>()?;
        let (lo, hi) = (*v.iter().min()? as f64, *v.iter().max()? as f64);
        Some((hi - lo) / hi)
    };
    let describe = |o: Objective| -> (String, Option<f64>) {
        match get(o) {
            Some(x) => match range(x) {
                Some(v) => (format!("{} {:.0}%", x.name, 100.0 * v), Some(v)),
                None => (format!("{} hit the step cap", x.name), None),
            },
            None => (String::new(), None),
        }
    };
    let fm: Vec<_> = [Objective::FmOt, Objective::FmDiffusion]
        .into_iter()
        .map(describe)
        .collect();
    let sm: Vec<_> = [Objective::ScoreMatching, Objective::ScoreFlow]
        .into_iter()
        .map(describe)
        .collect();
    let fm_max = fm
        .iter()
        .map(|x| x.1.unwrap_or(f64::INFINITY))
        .fold(0.0, f64::max);
    let sm_min = sm
        .iter()
        .map(|x| x.1.unwrap_or(f64::INFINITY))
        .fold(f64::INFINITY, f64::min);
    let names =
        |v: &[(String, Option<f64>)]| v.iter().map(|x| x.0.clone()).collect::<Vec<_>>().join(", ");
    out += &format!(
        "- {} that flow matching's adaptive NFE stays flat over training while score matching's drifts: the \
         relative range (max - min) / max of the NFE measured during training is {} for flow matching and {} for \
         the score objectives (reproduced only if every FM range is under half of every score range).\n",
        if fm_max < 0.5 * sm_min { "**Reproduced**:" } else { "**Not reproduced**: the claim" },
        names(&fm),
        names(&sm)
    );
    out
}
