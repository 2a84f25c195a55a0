//! Log-likelihoods by the instantaneous change of variables.
//!
//! Along dx/dt = v(x, t), d/dt log p_t(x_t) = -div v(x_t, t) (Chen et al., 2018), so for a data point x1
//!
//! ```text
//! log p_1(x1) = log p_0(x0) - int_0^1 div v(x_t, t) dt,    x0 = x1 integrated back from t = 1 to t = 0.
//! ```
//!
//! We integrate the augmented state [x, c] with dc/dt = div v from t = 1 (c = 0) to t = 0, which gives
//! c(0) = -int_0^1 div v dt, and return log p_0(x0) + c(0), p_0 = N(0, I). The divergence is exact
//! (one backward pass per dimension) or Hutchinson's estimate E[eps^T (dv/dx) eps] with probes drawn once
//! and kept for the whole solve. The solve uses the batch error norm.

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};
use crate::field::VelocityField;
use crate::rng::Rng;
use crate::solver::{solve, Adaptive, ErrorNorm, SolveOptions, SolverKind, Stats, StepControl};

/// How div v is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Divergence {
    /// The trace of the Jacobian: one backward pass per dimension.
    Exact,
    /// Hutchinson's estimator with `probes` probe vectors.
    Hutchinson { probes: usize, probe: Probe },
}

/// Distribution of Hutchinson probes (both have E[eps eps^T] = I).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Entries +-1 with probability 1/2 (lower variance).
    Rademacher,
    /// Standard normal entries.
    Gaussian,
}

/// Settings of a likelihood computation.
#[derive(Debug, Clone, PartialEq)]
pub struct LikelihoodOptions {
    pub divergence: Divergence,
    pub solver: SolverKind,
    pub control: StepControl,
    /// Seed of the Hutchinson probes.
    pub seed: u64,
}

impl Default for LikelihoodOptions {
    fn default() -> Self {
        Self {
            divergence: Divergence::Exact,
            solver: SolverKind::Dopri5,
            control: StepControl::Adaptive(Adaptive::new(1e-5, 1e-5).expect("valid tolerances")),
            seed: 0,
        }
    }
}

/// Per-example log-likelihoods and what they cost.
#[derive(Debug, Clone)]
pub struct LogLikelihood {
    /// log p_1(x) in nats, one per example.
    pub log_p: Vec<f64>,
    /// The noise each example maps to (t = 0).
    pub x0: Tensor,
    pub stats: Stats,
}

impl LogLikelihood {
    /// Mean negative log-likelihood and its standard error.
    pub fn nll(&self) -> (f64, f64) {
        mean_and_se(self.log_p.iter().map(|l| -l))
    }
}

/// Mean and standard error of the mean.
pub fn mean_and_se(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let v: Vec<f64> = values.collect();
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, f64::NAN);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// Bits per dimension of an NLL (nats) of data that a map with constant Jacobian `scale` per dimension
/// took from 8-bit integer space (uniformly dequantized) to model space:
/// bpd = (nll - D ln scale) / (D ln 2). For images scaled to [0, 1], scale = 1/256, giving the familiar
/// (nll + D ln 256) / (D ln 2); for [-1, 1], scale = 2/256.
pub fn bits_per_dim(nll: f64, dim: usize, scale: f64) -> f64 {
    let d = dim as f64;
    (nll - d * scale.ln()) / (d * std::f64::consts::LN_2)
}

/// log N(x; 0, I) per row.
fn standard_normal_log_density(x: &Tensor) -> Result<Vec<f64>> {
    let d = x.dim(1)? as f64;
    let sq: Vec<f64> = x.to_dtype(DType::F64)?.sqr()?.sum(1)?.to_vec1()?;
    Ok(sq
        .into_iter()
        .map(|s| -0.5 * s - 0.5 * d * (2.0 * std::f64::consts::PI).ln())
        .collect())
}

/// The field [v(x, t), div v(x, t)] on the flattened, augmented state.
struct Augmented<'a> {
    field: &'a dyn VelocityField,
    /// Shape of one example (without the batch dimension).
    example: Vec<usize>,
    dim: usize,
    divergence: Divergence,
    /// Hutchinson probes, each (B, D).
    probes: Vec<Tensor>,
}

impl VelocityField for Augmented<'_> {
    fn forward(&self, z: &Tensor, t: &Tensor) -> Result<Tensor> {
        let b = z.dim(0)?;
        let mut shape = vec![b];
        shape.extend(&self.example);
        let xs = z
            .narrow(1, 0, self.dim)?
            .contiguous()?
            .reshape(shape.clone())?;
        if let Some(out) = self.forward_mode(&xs, t, b)? {
            return Ok(out);
        }
        let x = Var::from_tensor(&xs)?;
        let v = self.field.forward(x.as_tensor(), t)?.flatten_from(1)?;
        let grad_of = |s: Tensor| -> Result<Tensor> {
            let grads = s.backward()?;
            let g = grads.get(x.as_tensor()).ok_or_else(|| {
                Error::Config(
                    "the vector field does not depend on x through differentiable operations"
                        .into(),
                )
            })?;
            Ok(g.flatten_from(1)?)
        };
        let div = match self.divergence {
            Divergence::Exact => {
                let mut cols = Vec::with_capacity(self.dim);
                for i in 0..self.dim {
                    cols.push(grad_of(v.narrow(1, i, 1)?.sum_all()?)?.narrow(1, i, 1)?);
                }
                Tensor::cat(&cols, 1)?.sum_keepdim(1)?
            }
            Divergence::Hutchinson { .. } => {
                let mut acc: Option<Tensor> = None;
                for eps in &self.probes {
                    let eps = eps.to_dtype(v.dtype())?;
                    let g = grad_of((&v * &eps)?.sum_all()?)?;
                    let est = (g * &eps)?.sum_keepdim(1)?;
                    acc = Some(match acc {
                        None => est,
                        Some(a) => (a + est)?,
                    });
                }
                (acc.expect("at least one probe") / self.probes.len() as f64)?
            }
        };
        Ok(Tensor::cat(&[v.detach(), div.detach()], 1)?)
    }
}

impl Augmented<'_> {
    /// [v, div v] by forward-mode products when the field provides them (no autograd graph):
    /// exact: div = sum_j (J e_j)_j; Hutchinson: mean over probes of eps . (J eps).
    fn forward_mode(&self, x: &Tensor, t: &Tensor, b: usize) -> Result<Option<Tensor>> {
        let tangents: Vec<Tensor> = match self.divergence {
            Divergence::Exact => (0..self.dim)
                .map(|j| {
                    let mut e = vec![0f32; b * self.dim];
                    (0..b).for_each(|i| e[i * self.dim + j] = 1.0);
                    Ok(Tensor::from_vec(e, x.shape(), x.device())?.to_dtype(x.dtype())?)
                })
                .collect::<Result<_>>()?,
            Divergence::Hutchinson { .. } => self
                .probes
                .iter()
                .map(|p| Ok(p.to_dtype(x.dtype())?.reshape(x.shape())?))
                .collect::<Result<_>>()?,
        };
        let Some((v, jv)) = self.field.jvp(x, t, &tangents)? else {
            return Ok(None);
        };
        let v = v.flatten_from(1)?;
        let div = match self.divergence {
            Divergence::Exact => {
                let cols = jv
                    .iter()
                    .enumerate()
                    .map(|(j, m)| m.flatten_from(1)?.narrow(1, j, 1))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&cols, 1)?.sum_keepdim(1)?
            }
            Divergence::Hutchinson { .. } => {
                let mut acc: Option<Tensor> = None;
                for (m, eps) in jv.iter().zip(&tangents) {
                    let est = (m.flatten_from(1)? * eps.flatten_from(1)?)?.sum_keepdim(1)?;
                    acc = Some(match acc {
                        None => est,
                        Some(a) => (a + est)?,
                    });
                }
                (acc.expect("at least one probe") / jv.len() as f64)?
            }
        };
        Ok(Some(Tensor::cat(&[v, div], 1)?))
    }
}

/// log p_1(x) for each row of `x` (shape (B, ...)) under the flow of `field` (t = 0 noise, t = 1 data).
pub fn log_likelihood(
    field: &dyn VelocityField,
    x: &Tensor,
    opts: &LikelihoodOptions,
) -> Result<LogLikelihood> {
    let ll = likelihood_solve(field, x, opts, true)?;
    ll.ok_or_else(|| Error::Config("the likelihood solve stopped".into()))
}

/// [`log_likelihood`], or `None` when its ODE solve stops early (step limit, step-size underflow).
pub fn log_likelihood_unless_stopped(
    field: &dyn VelocityField,
    x: &Tensor,
    opts: &LikelihoodOptions,
) -> Result<Option<LogLikelihood>> {
    likelihood_solve(field, x, opts, false)
}

/// The likelihood's solve from t = 1 to 0; a stop is an error when `throw`, `None` otherwise.
fn likelihood_solve(
    field: &dyn VelocityField,
    x: &Tensor,
    opts: &LikelihoodOptions,
    throw: bool,
) -> Result<Option<LogLikelihood>> {
    let Some(end) = augmented_solve(field, x, opts, (1.0, 0.0), throw)? else {
        return Ok(None);
    };
    // c(0) = -int_0^1 div v dt.
    let log_p0 = standard_normal_log_density(&end.x.flatten_from(1)?)?;
    Ok(Some(LogLikelihood {
        log_p: log_p0.iter().zip(&end.c).map(|(a, c)| a + c).collect(),
        x0: end.x,
        stats: end.stats,
    }))
}

/// Where the augmented state [x, c], dc/dt = div v, ends.
struct AugmentedEnd {
    /// x at the final time, shaped like the start.
    x: Tensor,
    /// c at the final time (c = 0 at the start), per example.
    c: Vec<f64>,
    stats: Stats,
}

/// Integrates [x, c] with dc/dt = div v from `x` (c = 0) over `(t0, t1)`, with the batch error norm;
/// `None` for a stopped solve when not `throw`.
fn augmented_solve(
    field: &dyn VelocityField,
    x: &Tensor,
    opts: &LikelihoodOptions,
    (t0, t1): (f64, f64),
    throw: bool,
) -> Result<Option<AugmentedEnd>> {
    let b = x.dim(0)?;
    let example: Vec<usize> = x.dims()[1..].to_vec();
    let dim: usize = example.iter().product();
    if b == 0 || dim == 0 {
        return Err(Error::Data(
            "a density solve needs at least one non-empty example".into(),
        ));
    }
    let aug = Augmented {
        field,
        example: example.clone(),
        dim,
        divergence: opts.divergence,
        probes: hutchinson_probes(opts, b, dim, x.device())?,
    };
    let flat = x.flatten_from(1)?;
    let z = Tensor::cat(&[&flat, &flat.narrow(1, 0, 1)?.zeros_like()?], 1)?;
    let control = match opts.control {
        StepControl::Adaptive(a) => StepControl::Adaptive(a.with_norm(ErrorNorm::Batch)),
        c => c,
    };
    let solve_opts = SolveOptions::with_control(control);
    let solve_opts = if throw {
        solve_opts
    } else {
        solve_opts.no_throw()
    };
    let sol = solve(&aug, opts.solver.solver().as_ref(), &z, t0, t1, &solve_opts)?;
    if !sol.status.is_completed() {
        return Ok(None);
    }
    let c: Vec<f64> = sol
        .x
        .narrow(1, dim, 1)?
        .flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1()?;
    let mut shape = vec![b];
    shape.extend(example);
    Ok(Some(AugmentedEnd {
        x: sol.x.narrow(1, 0, dim)?.reshape(shape)?,
        c,
        stats: sol.stats,
    }))
}

/// The Hutchinson probes of a solve over `b` examples of `dim` values (none for the exact divergence),
/// drawn once from the options' seed.
fn hutchinson_probes(
    opts: &LikelihoodOptions,
    b: usize,
    dim: usize,
    device: &candle_core::Device,
) -> Result<Vec<Tensor>> {
    Ok(match opts.divergence {
        Divergence::Exact => vec![],
        Divergence::Hutchinson { probes, probe } => {
            if probes == 0 {
                return Err(Error::Config(
                    "Hutchinson's estimator needs at least one probe".into(),
                ));
            }
            let mut rng = Rng::new(opts.seed).fork(7);
            (0..probes)
                .map(|_| {
                    let v: Vec<f32> = match probe {
                        Probe::Gaussian => rng.normal_vec(b * dim),
                        Probe::Rademacher => (0..b * dim)
                            .map(|_| if rng.below(2) == 0 { -1.0 } else { 1.0 })
                            .collect(),
                    };
                    Ok(Tensor::from_vec(v, (b, dim), device)?)
                })
                .collect::<Result<Vec<_>>>()?
        }
    })
}

/// Samples with their log-density, in one solve: the augmented state [x, c] with dc/dt = div v from
/// t = 0 (x = `x0`, c = 0) to t = 1 gives x1 and log p_1(x1) = log N(x0; 0, I) - c(1). The same
/// numbers as [`log_likelihood`] of the returned x1, without integrating back.
pub fn sample_with_log_prob(
    field: &dyn VelocityField,
    x0: &Tensor,
    opts: &LikelihoodOptions,
) -> Result<SampledWithLogProb> {
    let end = augmented_solve(field, x0, opts, (0.0, 1.0), true)?
        .ok_or_else(|| Error::Config("the sampling solve stopped".into()))?;
    let log_p0 = standard_normal_log_density(&x0.flatten_from(1)?)?;
    Ok(SampledWithLogProb {
        log_p: log_p0.iter().zip(&end.c).map(|(a, c)| a - c).collect(),
        x1: end.x,
        stats: end.stats,
    })
}

/// Samples and their log-densities from [`sample_with_log_prob`].
#[derive(Debug, Clone)]
pub struct SampledWithLogProb {
    /// The samples (t = 1), shaped like the start points.
    pub x1: Tensor,
    /// log p_1(x1) in nats, one per sample.
    pub log_p: Vec<f64>,
    pub stats: Stats,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::column;
    use candle_core::Device;

    /// The joint solve's log-densities are the closed-form density of the Gaussian flow at its samples,
    /// and equal what `log_likelihood` computes for them (which integrates back to the same noise).
    #[test]
    fn joint_log_prob_matches_the_closed_form_and_the_likelihood() {
        let field = GaussianField::new(2, 1e-3);
        let x0 = Tensor::new(&[[0.2f64, -1.0], [1.3, 0.4], [-0.6, 0.9]], &Device::Cpu).unwrap();
        let opts = LikelihoodOptions {
            control: StepControl::Adaptive(Adaptive::new(1e-7, 1e-7).unwrap()),
            ..LikelihoodOptions::default()
        };
        let joint = sample_with_log_prob(&field, &x0, &opts).unwrap();
        let rows: Vec<Vec<f64>> = joint.x1.to_dtype(DType::F64).unwrap().to_vec2().unwrap();
        for (row, lp) in rows.iter().zip(&joint.log_p) {
            let exact = field.log_density(row);
            assert!((lp - exact).abs() < 1e-3, "{lp} vs closed form {exact}");
        }
        let back = log_likelihood(&field, &joint.x1, &opts).unwrap();
        for (a, b) in joint.log_p.iter().zip(&back.log_p) {
            assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        }
    }

    /// The exact marginal field of the CondOT path for data N(m, R diag(s^2) R), R a Householder reflection
    /// (so the Jacobian has off-diagonal entries): u = m + R C(t) R (x - t m) with
    /// c_j = (sigma sigma' + t s_j^2) / (sigma^2 + t^2 s_j^2), sigma = 1 - (1 - sigma_min) t.
    struct GaussianField {
        m: Vec<f64>,
        s: Vec<f64>,
        r: Tensor,
        sigma_min: f64,
    }

    impl GaussianField {
        fn new(d: usize, sigma_min: f64) -> Self {
            let m: Vec<f64> = (0..d).map(|j| 0.5 + 0.3 * j as f64).collect();
            let s: Vec<f64> = (0..d).map(|j| 0.3 + 0.2 * (j % 3) as f64).collect();
            let v: Vec<f64> = (0..d).map(|j| 1.0 + j as f64).collect();
            let n2: f64 = v.iter().map(|x| x * x).sum();
            let r: Vec<f64> = (0..d * d)
                .map(|k| {
                    let (i, j) = (k / d, k % d);
                    (if i == j { 1.0 } else { 0.0 }) - 2.0 * v[i] * v[j] / n2
                })
                .collect();
            Self {
                m,
                s,
                r: Tensor::from_vec(r, (d, d), &Device::Cpu).unwrap(),
                sigma_min,
            }
        }

        fn log_density(&self, x: &[f64]) -> f64 {
            let d = self.m.len();
            let r: Vec<f64> = self.r.flatten_all().unwrap().to_vec1().unwrap();
            let mut out = 0.0;
            for i in 0..d {
                let y: f64 = (0..d).map(|j| r[i * d + j] * (x[j] - self.m[j])).sum();
                let var = self.s[i].powi(2) + self.sigma_min.powi(2);
                out += -0.5 * y * y / var - 0.5 * (2.0 * std::f64::consts::PI * var).ln();
            }
            out
        }

        fn sample(&self, n: usize, rng: &mut Rng) -> Tensor {
            let d = self.m.len();
            let z: Vec<f64> = (0..n * d).map(|k| rng.normal() * self.s[k % d]).collect();
            let z = Tensor::from_vec(z, (n, d), &Device::Cpu)
                .unwrap()
                .matmul(&self.r)
                .unwrap();
            let m = Tensor::from_vec(self.m.clone(), (1, d), &Device::Cpu).unwrap();
            z.broadcast_add(&m).unwrap()
        }
    }

    impl VelocityField for GaussianField {
        fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
            let tv: Vec<f64> = t.to_dtype(DType::F64)?.to_vec1()?;
            let d = self.m.len();
            let m = Tensor::from_vec(self.m.clone(), (1, d), x.device())?;
            let tcol = column(tv.iter().copied(), x)?;
            let centred = (x - m.broadcast_mul(&tcol)?)?;
            let a = 1.0 - self.sigma_min;
            let c: Vec<f64> = tv
                .iter()
                .flat_map(|&t| {
                    let sig = 1.0 - a * t;
                    self.s
                        .iter()
                        .map(move |s| (-sig * a + t * s * s) / (sig * sig + t * t * s * s))
                })
                .collect();
            let c = Tensor::from_vec(c, (tv.len(), d), x.device())?;
            let rotated = centred.matmul(&self.r)?.mul(&c)?.matmul(&self.r)?;
            Ok(rotated.broadcast_add(&m)?)
        }
    }

    fn opts(divergence: Divergence, tol: f64) -> LikelihoodOptions {
        LikelihoodOptions {
            divergence,
            control: StepControl::Adaptive(Adaptive::new(tol, tol).unwrap()),
            ..Default::default()
        }
    }

    #[test]
    fn exact_divergence_matches_the_gaussian_log_density() {
        for d in [2, 8] {
            let field = GaussianField::new(d, 1e-5);
            let x = field.sample(64, &mut Rng::new(d as u64));
            let ll = log_likelihood(&field, &x, &opts(Divergence::Exact, 1e-8)).unwrap();
            let rows: Vec<Vec<f64>> = x.to_vec2().unwrap();
            for (row, got) in rows.iter().zip(&ll.log_p) {
                let want = field.log_density(row);
                assert!((got - want).abs() < 1e-3, "d = {d}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn hutchinson_is_unbiased_within_three_standard_errors() {
        for (d, probe) in [(2, Probe::Rademacher), (8, Probe::Gaussian)] {
            let field = GaussianField::new(d, 1e-5);
            let x = field.sample(400, &mut Rng::new(10 + d as u64));
            let exact = log_likelihood(&field, &x, &opts(Divergence::Exact, 1e-6)).unwrap();
            let est = log_likelihood(
                &field,
                &x,
                &opts(Divergence::Hutchinson { probes: 1, probe }, 1e-6),
            )
            .unwrap();
            let (m, se) = mean_and_se(est.log_p.iter().zip(&exact.log_p).map(|(a, b)| a - b));
            assert!(se > 0.0, "the estimator should be noisy here");
            assert!(m.abs() < 3.0 * se, "d = {d}: bias {m} +- {se}");
            let rows: Vec<Vec<f64>> = x.to_vec2().unwrap();
            let (nll, se) = est.nll();
            let truth = -rows.iter().map(|r| field.log_density(r)).sum::<f64>() / rows.len() as f64;
            assert!(
                (nll - truth).abs() < 3.0 * se + 1e-3,
                "d = {d}: NLL {nll} +- {se} vs {truth}"
            );
        }
    }

    /// The forward-mode path (fused MLP engine) gives the autograd path's log-likelihoods.
    #[test]
    fn forward_mode_matches_autograd() {
        use crate::nn::{Activation, MlpConfig, ModelConfig, TimeEmbedding};
        let cfg = MlpConfig {
            dim: 3,
            hidden: 16,
            depth: 2,
            time_embedding: TimeEmbedding::Input,
            activation: Activation::Silu,
        };
        let (model, _) = ModelConfig::Mlp(cfg)
            .build(&mut Rng::new(5), &Device::Cpu, DType::F32)
            .unwrap();
        let fast = model.frozen().unwrap();
        assert!(matches!(fast, crate::nn::Model::FastMlp(_)));
        let x = Tensor::from_vec(Rng::new(6).normal_vec(60), (20, 3), &Device::Cpu).unwrap();
        for div in [
            Divergence::Exact,
            Divergence::Hutchinson {
                probes: 2,
                probe: Probe::Gaussian,
            },
        ] {
            let a = log_likelihood(&model, &x, &opts(div, 1e-5)).unwrap();
            let b = log_likelihood(&fast, &x, &opts(div, 1e-5)).unwrap();
            for (p, q) in a.log_p.iter().zip(&b.log_p) {
                assert!((p - q).abs() < 1e-3, "{div:?}: {p} vs {q}");
            }
        }
    }

    #[test]
    fn bits_per_dim_formula() {
        // A uniform density on [0, 1]^D has NLL 0 and is 8 bits per dimension in 8-bit space.
        assert!((bits_per_dim(0.0, 784, 1.0 / 256.0) - 8.0).abs() < 1e-12);
        assert!(
            (bits_per_dim(784.0 * std::f64::consts::LN_2, 784, 1.0 / 256.0) - 9.0).abs() < 1e-12
        );
    }
}
