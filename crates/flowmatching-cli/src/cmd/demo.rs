//! `flowmatching demo`: the whole pipeline on checkerboard with no arguments and no data to fetch.

use std::time::Instant;

use anyhow::Result;
use candle_core::Device;
use flowmatching::data::{DataSource, Toy2d};
use flowmatching::eval::metrics::{checkerboard_support, energy_distance};
use flowmatching::nn::{MlpConfig, ModelConfig};
use flowmatching::objective::Weighting;
use flowmatching::path::Prediction;
use flowmatching::path::SchedulerConfig;
use flowmatching::rng::Rng;
use flowmatching::sample::transport;
use flowmatching::solver::{SolveOptions, SolverKind};
use flowmatching::train::{RunConfig, TrainConfig, Trainer};
use serde::Serialize;

use crate::cli::DemoArgs;
use crate::outputs::Outputs;
use crate::resolve::initial_points;
use crate::training::{lock_folder, run_loop};
use crate::{io, memory, plot};

/// Solver settings of the demo's sampling.
const SOLVER: SolverKind = SolverKind::Midpoint;
const SOLVER_STEPS: usize = 50;

/// The demo's model and optimiser: a 3-hidden x4-2 SiLU MLP on the CondOT path, AdamW with warm-up and
/// cosine decay.
fn demo_config(steps: u64, seed: u64, hidden: usize, batch: usize, lr: f64) -> RunConfig {
    let model = ModelConfig::Mlp(MlpConfig::silu(2, hidden, 4));
    let parts = (
        SchedulerConfig::CondOt { sigma_min: 1e-5 },
        Prediction::Velocity,
        Weighting::Uniform,
    );
    let train = TrainConfig::cosine(steps, batch, lr, 100, seed);
    RunConfig::new(model, parts, train, "checkerboard")
}

#[derive(Serialize)]
struct Metrics {
    in_support_fraction: f64,
    max_square_deviation: f64,
    energy_distance: f64,
    /// Energy distance between two independent 10,000-point data sets: the floor for this sample size.
    energy_distance_data_vs_data: f64,
    train_seconds: f64,
    train_steps: u64,
    final_loss: f64,
    solver: SolverKind,
    solver_steps: usize,
    nfe: usize,
    sample_seconds: f64,
    num_samples: usize,
    /// The matrix products' arithmetic in training and sampling.
    precision: flowmatching::precision::Precision,
}

pub fn run(a: &DemoArgs) -> Result<()> {
    if a.num_samples < 2 {
        anyhow::bail!("--num-samples must be at least 2");
    }
    let data = Toy2d::Checkerboard;
    let mut config = demo_config(a.steps, a.seed, a.hidden, a.batch_size, a.lr);
    config.train.precision = a.precision;
    config.validate()?;
    let need = memory::training_bytes(&config, true).saturating_add(
        3 * memory::sampling_bytes(&config.model, a.num_samples, a.num_samples, 2, 0, true),
    );
    memory::check(
        need,
        "the demo",
        "lower --num-samples, --batch-size or --hidden",
    )?;
    let mut outs = Outputs::new();
    for name in ["samples.npy", "samples.png", "metrics.json"] {
        outs.declare(&a.out.join(name), "--out")?;
    }
    io::ensure_dir(&a.out)?;
    let _lock = lock_folder(&a.out)?;
    let mut trainer = Trainer::new(config, &Device::Cpu)?;
    crate::training::note_precision(a.precision, trainer.precision());
    eprintln!(
        "demo: training a flow-matching MLP on checkerboard for {} steps ({})",
        a.steps,
        trainer.precision().name()
    );
    let outcome = run_loop(&mut trainer, &mut |t| t.step(&data), &a.out, 0, None)?;
    let mut model = trainer.ema_model()?;
    let precision = model.set_precision(a.precision);
    let start = Instant::now();
    let opts = SolveOptions::constant(SOLVER_STEPS);
    let x0 = initial_points(trainer.config(), a.num_samples, a.seed + 1)?;
    let (x, sol) = transport(&model, trainer.config(), x0, SOLVER, &opts)?;
    let sample_seconds = start.elapsed().as_secs_f64();
    // Fresh data from streams the training never used.
    let reference = data.sample(&mut Rng::new(a.seed).fork(100), a.num_samples);
    let reference2 = data.sample(&mut Rng::new(a.seed).fork(101), a.num_samples);
    let support = checkerboard_support(&x);
    let metrics = Metrics {
        in_support_fraction: support.in_support_fraction,
        max_square_deviation: support.max_square_deviation,
        energy_distance: energy_distance(&x, &reference, 2),
        energy_distance_data_vs_data: energy_distance(&reference2, &reference, 2),
        train_seconds: outcome.seconds,
        train_steps: trainer.step_count(),
        final_loss: outcome.last_loss,
        solver: SOLVER,
        solver_steps: SOLVER_STEPS,
        nfe: sol.stats.nfe,
        sample_seconds,
        num_samples: a.num_samples,
        precision,
    };
    outs.write(
        &a.out.join("samples.npy"),
        &io::npy_bytes(&x, &[a.num_samples, 2])?,
    )?;
    let png = plot::histograms(&[&reference, &x], 2, (-4.6, 4.6), 100)?;
    outs.write(&a.out.join("samples.png"), &png)?;
    outs.write(&a.out.join("metrics.json"), &io::json_bytes(&metrics)?)?;
    outs.commit()?;
    println!("{}", serde_json::to_string_pretty(&metrics)?);
    println!(
        "wrote {0}/samples.npy, {0}/samples.png (data left, samples right), {0}/metrics.json and the checkpoint \
         ({0}/checkpoint.json); sample more with: flowmatching sample --checkpoint {0}",
        a.out.display()
    );
    Ok(())
}
