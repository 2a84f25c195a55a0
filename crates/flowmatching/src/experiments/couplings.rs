//! Couplings and straighter flows compared on one 2-D data set (and source): independent pairs,
//! minibatch OT (Tong et al. 2023, Pooladian et al. 2023), Sinkhorn, and one round of reflow from the
//! independent model (Liu et al. 2022), all trained alike; each measured on straightness, few-step
//! quality and adaptive NFE, and each coupling's own cost per training step.

use std::time::Instant;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::coupling::Coupling;
use crate::data::DataSource;
use crate::error::{Error, Result};
use crate::eval::summary::{evaluate, EvalReport};
use crate::nn::{MlpConfig, ModelConfig};
use crate::objective::Weighting;
use crate::path::{Prediction, SchedulerConfig};
use crate::reflow;
use crate::rng::Rng;
use crate::train::{RunConfig, TrainConfig, Trainer};

/// The sizes and names of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct CouplingsConfig {
    /// The data's name (for the run configurations and the report).
    pub data: String,
    /// The source's name, when x0 is not drawn from N(0, I).
    pub source: Option<String>,
    pub steps: u64,
    pub batch_size: usize,
    pub hidden: usize,
    pub seed: u64,
    /// Reflow pairs generated from the independent model.
    pub pairs: usize,
    /// Samples per evaluation.
    pub num_samples: usize,
    /// Whether the data is the checkerboard (in-support fractions are reported).
    pub checkerboard: bool,
    /// Batch sizes at which the couplings' own cost is timed (empty: none).
    pub overhead_batches: Vec<usize>,
}

/// One trained variant and its evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Variant {
    pub name: String,
    pub train_seconds: f64,
    /// Reflow only: seconds to generate its pairs.
    pub pair_seconds: Option<f64>,
    pub eval: EvalReport,
}

/// The coupling's own cost per training step at one batch size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Overhead {
    pub batch: usize,
    pub ot_ms: f64,
    pub sinkhorn_ms: f64,
}

/// A whole run, as `results.json` holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    pub data: String,
    pub source: Option<String>,
    pub steps: u64,
    pub batch_size: usize,
    pub hidden: usize,
    pub variants: Vec<Variant>,
    pub coupling_overhead: Vec<Overhead>,
    pub seconds: f64,
}

/// What a caller is told while the study runs.
pub trait Observer {
    /// Training of variant `name` starts.
    fn started(&mut self, _name: &str, _steps: u64) {}
    /// One training step finished.
    fn step(&mut self, _step: u64, _loss: f64) {}
    /// Variant `name` is trained and evaluated; `sets` holds its samples after 1, 2, 4 and 8 Euler
    /// steps and from the adaptive solve.
    fn finished(&mut self, _name: &str, _trainer: &Trainer, _sets: &[Vec<f32>]) -> Result<()> {
        Ok(())
    }
}

/// An observer that is told nothing.
impl Observer for () {}

/// The run configuration of every variant: MLP 3-hidden x4-2 (SiLU), the OT path with sigma_min 0,
/// AdamW at 1e-3 with 200 warm-up steps and cosine decay, clipping at 1, EMA 0.999.
pub fn base_config(c: &CouplingsConfig, coupling: Coupling) -> RunConfig {
    let model = ModelConfig::Mlp(MlpConfig::silu(2, c.hidden, 4));
    let parts = (
        SchedulerConfig::CondOt { sigma_min: 0.0 },
        Prediction::Velocity,
        Weighting::Uniform,
    );
    let train = TrainConfig {
        coupling,
        ..TrainConfig::cosine(c.steps, c.batch_size, 1e-3, 200, c.seed)
    };
    RunConfig {
        source: c.source.clone(),
        ..RunConfig::new(model, parts, train, c.data.clone())
    }
}

/// The couplings compared, by name.
pub const COUPLINGS: [(&str, Coupling); 3] = [
    ("independent", Coupling::Independent),
    ("ot", Coupling::Ot),
    ("sinkhorn", Coupling::Sinkhorn { reg: 0.05 }),
];

/// Trains and evaluates every variant against `reference` (fresh data rows).
pub fn run(
    c: &CouplingsConfig,
    data: &dyn DataSource,
    source: Option<&dyn DataSource>,
    reference: &[f32],
    observer: &mut dyn Observer,
) -> Result<Results> {
    if c.steps == 0 || c.pairs == 0 || c.num_samples == 0 {
        return Err(Error::Config(
            "steps, pairs and samples must be at least 1".into(),
        ));
    }
    if data.dim() != 2 {
        return Err(Error::Data(format!(
            "the couplings study is for 2-D data; {} is {}-dimensional",
            c.data,
            data.dim()
        )));
    }
    let start = Instant::now();
    let mut variants = vec![];
    let mut independent = None;
    for (name, coupling) in COUPLINGS {
        let cfg = base_config(c, coupling);
        let trained = (data, source);
        let (variant, trainer) = train_variant(c, name, cfg, trained, source, reference, observer)?;
        variants.push(variant);
        if coupling == Coupling::Independent {
            independent = Some(trainer);
        }
    }
    // One round of reflow from the independent model.
    let indep = independent.ok_or_else(|| Error::Config("no independent variant".into()))?;
    let t = Instant::now();
    let model = indep.ema_model()?;
    let seed = c.seed.wrapping_add(17);
    let pairs = reflow::pairs(&model, indep.config(), source, c.pairs, 100, seed)?;
    let pair_seconds = t.elapsed().as_secs_f64();
    let described = "reflow pairs of the independent model".to_string();
    let cfg = reflow::next_config(indep.config(), described, c.steps);
    let trained: (&dyn DataSource, _) = (&pairs, None);
    let (mut variant, _) = train_variant(c, "reflow", cfg, trained, source, reference, observer)?;
    variant.pair_seconds = Some(pair_seconds);
    variants.push(variant);
    let coupling_overhead = c
        .overhead_batches
        .iter()
        .map(|&b| overhead(data, source, b))
        .collect::<Result<_>>()?;
    Ok(Results {
        data: c.data.clone(),
        source: c.source.clone(),
        steps: c.steps,
        batch_size: c.batch_size,
        hidden: c.hidden,
        variants,
        coupling_overhead,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Trains `cfg` on `(data, source)` and evaluates its EMA model from the study's source (N(0, I) when
/// there is none).
fn train_variant(
    c: &CouplingsConfig,
    name: &str,
    cfg: RunConfig,
    (data, train_source): (&dyn DataSource, Option<&dyn DataSource>),
    source: Option<&dyn DataSource>,
    reference: &[f32],
    observer: &mut dyn Observer,
) -> Result<(Variant, Trainer)> {
    let mut trainer = Trainer::new(cfg, &Device::Cpu)?;
    observer.started(name, c.steps);
    let t = Instant::now();
    while trainer.step_count() < c.steps {
        let loss = trainer.step_from(data, train_source)?;
        observer.step(trainer.step_count(), loss);
    }
    let train_seconds = t.elapsed().as_secs_f64();
    let model = trainer.ema_model()?;
    let (eval, sets) = evaluate(
        &model,
        trainer.config(),
        source,
        reference,
        c.checkerboard,
        c.num_samples,
        c.seed,
    )?;
    observer.finished(name, &trainer, &sets)?;
    let variant = Variant {
        name: name.into(),
        train_seconds,
        pair_seconds: None,
        eval,
    };
    Ok((variant, trainer))
}

/// The median time of `reps` runs of `f`, in ms.
fn median_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut t = vec![];
    for _ in 0..reps {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// The exact OT and Sinkhorn couplings' cost on one batch of `batch` pairs (median of 3; one run from
/// 4096 on, where the exact assignment is slow).
pub fn overhead(
    data: &dyn DataSource,
    source: Option<&dyn DataSource>,
    batch: usize,
) -> Result<Overhead> {
    let mut rng = Rng::new(5);
    let x1 = data.sample(&mut rng, batch);
    let x0 = match source {
        Some(s) => s.sample(&mut rng, batch),
        None => rng.normal_vec(2 * batch),
    };
    let reps = if batch >= 4096 { 1 } else { 3 };
    let ot_ms = median_ms(reps, || {
        Coupling::Ot.pair(x0.clone(), x1.clone(), 2, &mut rng)?;
        Ok(())
    })?;
    let sinkhorn_ms = median_ms(reps, || {
        Coupling::Sinkhorn { reg: 0.05 }.pair(x0.clone(), x1.clone(), 2, &mut rng)?;
        Ok(())
    })?;
    Ok(Overhead {
        batch,
        ot_ms,
        sinkhorn_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Toy2d;

    /// A tiny study: four variants trained and evaluated; OT pairs straighten the flow against
    /// independent pairs, and reflow's pairs took time to make.
    #[test]
    fn tiny_study_compares_four_variants() {
        let data = Toy2d::from_name("8gaussians").unwrap();
        let c = CouplingsConfig {
            data: "8gaussians".into(),
            source: None,
            steps: 2000,
            batch_size: 64,
            hidden: 32,
            seed: 0,
            pairs: 512,
            num_samples: 300,
            checkerboard: false,
            overhead_batches: vec![64],
        };
        let reference = data.sample(&mut Rng::new(3), c.num_samples);
        let r = run(&c, &data, None, &reference, &mut ()).unwrap();
        let names: Vec<&str> = r.variants.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["independent", "ot", "sinkhorn", "reflow"]);
        let s = |i: usize| r.variants[i].eval.straightness.straightness;
        assert!(s(1) < s(0), "OT {} vs independent {}", s(1), s(0));
        assert!(r.variants[3].pair_seconds.unwrap() > 0.0);
        for v in &r.variants {
            assert_eq!(v.eval.few_step.len(), 4);
            assert!(v.eval.adaptive_nfe > 0 && v.eval.adaptive_energy_distance.is_finite());
        }
        assert_eq!(r.coupling_overhead.len(), 1);
        assert!(r.coupling_overhead[0].ot_ms >= 0.0);
    }
}
