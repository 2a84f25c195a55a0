//! The flow-matching paper's theory (Lipman et al., Theorems 1-3), checked on small finite data sets
//! where the marginal field is known exactly.

use candle_core::{DType, Device, Tensor};
use flowmatching::data::{DataSource, TensorDataset};
use flowmatching::empirical::EmpiricalField;
use flowmatching::field::VelocityField;
use flowmatching::nn::{Activation, MlpConfig, ModelConfig, TimeEmbedding};
use flowmatching::objective::Weighting;
use flowmatching::path::{AffinePath, Prediction};
use flowmatching::path::{CondOT, SchedulerConfig, VP};
use flowmatching::rng::Rng;
use flowmatching::solver::{integrate, Midpoint};
use flowmatching::train::{RunConfig, TrainConfig, Trainer, FORMAT_VERSION};

const POINTS: [[f32; 2]; 4] = [[1.5, 1.0], [-1.0, 2.0], [2.0, -1.5], [-1.5, -1.0]];

fn points() -> Tensor {
    Tensor::new(&POINTS, &Device::Cpu).unwrap()
}

fn mlp(hidden: usize) -> ModelConfig {
    ModelConfig::Mlp(MlpConfig {
        dim: 2,
        hidden,
        depth: 2,
        time_embedding: TimeEmbedding::Input,
        activation: Activation::Silu,
    })
}

/// Per-example squared errors ||a - b||^2 as a vector.
fn row_sq(a: &Tensor, b: &Tensor) -> Vec<f64> {
    (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum(1)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// A hand-written field v(x, t) = 0.5 x - t: a "model" unrelated to the MLP.
struct Affine;
impl VelocityField for Affine {
    fn forward(&self, x: &Tensor, t: &Tensor) -> flowmatching::Result<Tensor> {
        Ok(((x * 0.5)? - t.unsqueeze(1)?.broadcast_as(x.shape())?)?)
    }
}

/// One batch of (x0, x1, t) common random numbers.
fn draw(n: usize, seed: u64) -> (Tensor, Tensor, Vec<f64>) {
    let mut rng = Rng::new(seed);
    let data = TensorDataset::new(POINTS.concat(), 2, "4 points").unwrap();
    let x1 = Tensor::from_vec(data.sample(&mut rng, n), (n, 2), &Device::Cpu).unwrap();
    let x0 = Tensor::from_vec(rng.normal_vec(2 * n), (n, 2), &Device::Cpu).unwrap();
    (x0, x1, rng.uniform_vec(n))
}

/// Theorem 2: L_CFM(theta) - L_FM(theta) does not depend on theta. With common random numbers, the
/// per-example difference of that gap between two unrelated models averages to zero within Monte-Carlo error,
/// on the OT path and on the VP path.
#[test]
fn cfm_and_fm_losses_differ_by_a_constant() {
    for sched in [
        SchedulerConfig::CondOt { sigma_min: 0.05 },
        SchedulerConfig::default_vp(),
    ] {
        let field =
            EmpiricalField::new(AffinePath::from_config(&sched).unwrap(), &points()).unwrap();
        let path = AffinePath::from_config(&sched).unwrap();
        let (a, _) = mlp(16)
            .build(&mut Rng::new(1), &Device::Cpu, DType::F32)
            .unwrap();
        let b = Affine;
        let n = 100_000;
        // keep t away from the VP path's stiff data end so that the Monte-Carlo variance stays moderate
        let (x0, x1, t) = draw(n, 7);
        let t: Vec<f64> = t.iter().map(|t| 0.95 * t).collect();
        let s = path.sample(&x0, &x1, &t).unwrap();
        let marginal = field.velocity_at(&s.x_t, &t).unwrap();
        let gap = |m: &dyn VelocityField| {
            let v = m.forward(&s.x_t, &s.t).unwrap();
            let cfm = row_sq(&v, &s.dx_t);
            let fm = row_sq(&v, &marginal);
            (
                cfm.iter().sum::<f64>() / n as f64 - fm.iter().sum::<f64>() / n as f64,
                cfm,
                fm,
            )
        };
        let (gap_a, cfm_a, fm_a) = gap(&a);
        let (gap_b, cfm_b, fm_b) = gap(&b);
        let d: Vec<f64> = (0..n)
            .map(|i| (cfm_a[i] - fm_a[i]) - (cfm_b[i] - fm_b[i]))
            .collect();
        let mean = d.iter().sum::<f64>() / n as f64;
        let sd = (d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
        let se = sd / (n as f64).sqrt();
        assert!(
            mean.abs() < 4.0 * se,
            "{sched:?}: gaps {gap_a} vs {gap_b}, difference {mean} +- {se}"
        );
        // the constant itself is far from zero: the test is not comparing two zeros
        assert!(gap_a.abs() > 20.0 * se, "{sched:?}: gap {gap_a}");
        // and the two models' losses do differ
        let la = fm_a.iter().sum::<f64>() / n as f64;
        let lb = fm_b.iter().sum::<f64>() / n as f64;
        assert!((la - lb).abs() > 20.0 * se, "{sched:?}: L_FM {la} vs {lb}");
    }
}

/// The exact marginal field of 4 points, integrated from noise, lands on those points (and on each of them).
#[test]
fn empirical_field_transports_noise_onto_the_data() {
    // On the VP path sigma_t ~ sqrt(beta_min (1 - t)) near the data, so the field has a square-root
    // singularity there and fixed steps converge slowly at the very end: a looser tolerance.
    for (path, tol) in [
        (AffinePath::new(Box::new(CondOT::new(1e-4).unwrap())), 1e-3),
        (AffinePath::new(Box::new(VP::default())), 0.05),
    ] {
        let field = EmpiricalField::new(path, &points().to_dtype(DType::F64).unwrap()).unwrap();
        let mut rng = Rng::new(3);
        let x0 = Tensor::from_vec(rng.normal_vec(800), (400, 2), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let sol = integrate(&field, &Midpoint, &x0, 0.0, 1.0, 400, false).unwrap();
        let out: Vec<Vec<f64>> = sol.x.to_vec2().unwrap();
        let mut hits = [0usize; 4];
        for p in &out {
            let (k, d) = POINTS
                .iter()
                .map(|q| ((p[0] - q[0] as f64).powi(2) + (p[1] - q[1] as f64).powi(2)).sqrt())
                .enumerate()
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap();
            assert!(
                d < tol,
                "{:?}: sample {p:?} ended {d} from the nearest data point",
                field.path()
            );
            hits[k] += 1;
        }
        assert!(hits.iter().all(|&h| h > 50), "{hits:?}");
    }
}

/// Training an MLP with the CFM loss on 4 points moves its field towards the exact marginal field
/// (mean squared distance on the path's own distribution of (x_t, t)).
#[test]
fn training_moves_the_model_towards_the_marginal_field() {
    let sched = SchedulerConfig::CondOt { sigma_min: 0.05 };
    let cfg = RunConfig {
        format_version: FORMAT_VERSION,
        model: mlp(64),
        path: sched,
        prediction: Prediction::Velocity,
        weighting: Weighting::Uniform,
        train: TrainConfig {
            steps: 1500,
            batch_size: 256,
            ema_decay: 0.0,
            ..Default::default()
        },
        data: "4 points".into(),
        source: None,
    };
    let data = TensorDataset::new(POINTS.concat(), 2, "4 points").unwrap();
    let field = EmpiricalField::new(AffinePath::from_config(&sched).unwrap(), &points()).unwrap();
    let path = AffinePath::from_config(&sched).unwrap();
    let (x0, x1, t) = draw(4000, 11);
    let s = path.sample(&x0, &x1, &t).unwrap();
    let target = field.velocity_at(&s.x_t, &t).unwrap();
    let distance = |m: &dyn VelocityField| {
        let d = row_sq(&m.forward(&s.x_t, &s.t).unwrap(), &target);
        d.iter().sum::<f64>() / d.len() as f64
    };
    let mut trainer = Trainer::new(cfg, &Device::Cpu).unwrap();
    let before = distance(trainer.model());
    for _ in 0..1500 {
        trainer.step(&data).unwrap();
    }
    let after = distance(trainer.model());
    assert!(
        after < 0.2 * before,
        "E|v - u|^2 went from {before} to {after}"
    );
}
