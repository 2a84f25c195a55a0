//! Couplings: how noise (or source) samples x0 are paired with data samples x1 in a minibatch before the
//! path is built (Tong et al. 2023, "Improving and generalizing flow-based generative models with
//! minibatch optimal transport"; Pooladian et al. 2023).
//!
//! - independent: x0 and x1 as drawn (the CFM default);
//! - exact OT: the permutation sigma minimising sum_i ||x0_i - x1_sigma(i)||^2 (for two equal-size
//!   minibatches with uniform weights, the optimal transport plan is such a permutation), solved by
//!   the auction algorithm with epsilon scaling ([`crate::assignment`]), whose dual potentials
//!   certify the optimum (to 1e-11 of the largest cost per pair). Every sample is used exactly once. Minibatches of unequal sizes
//!   (or non-uniform weights) have plans that are not permutations; they are refused;
//! - entropic OT: the Sinkhorn plan P = argmin <P, C> - reg H(P) on the cost normalised by its maximum,
//!   then n distinct pairs (i, j) drawn from P without replacement (torchcfm's `sample_plan` draws with
//!   replacement and can return the same pair twice).

use serde::{Deserialize, Serialize};

use crate::assignment::{self, Assignment};
use crate::cpu::linalg;
use crate::error::{Error, Result};
use crate::rng::Rng;

/// How minibatch pairs are formed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Coupling {
    #[default]
    Independent,
    /// Exact minibatch OT (squared Euclidean cost).
    Ot,
    /// Entropic OT with regularisation `reg` (relative to the largest cost), pairs sampled from the plan.
    Sinkhorn { reg: f64 },
}

impl Coupling {
    pub fn validate(&self) -> Result<()> {
        if let Coupling::Sinkhorn { reg } = self {
            if !(*reg > 0.0 && reg.is_finite()) {
                return Err(Error::Config(format!(
                    "Sinkhorn regularisation must be positive, got {reg}"
                )));
            }
        }
        Ok(())
    }

    /// Pairs `x0` with `x1` (both n x dim, row-major), returning the pairs in matching row order.
    pub fn pair(
        &self,
        x0: Vec<f32>,
        x1: Vec<f32>,
        dim: usize,
        rng: &mut Rng,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        match self {
            Coupling::Independent => Ok((x0, x1)),
            Coupling::Ot => {
                let sigma = exact_ot(&x0, &x1, dim)?;
                Ok((x0, gather(&x1, dim, &sigma)))
            }
            Coupling::Sinkhorn { reg } => {
                let n = x0.len() / dim;
                let plan = sinkhorn_plan(&x0, &x1, dim, *reg)?;
                let (rows, cols) = sample_pairs(&plan, n, n, rng);
                Ok((gather(&x0, dim, &rows), gather(&x1, dim, &cols)))
            }
        }
    }
}

fn gather(x: &[f32], dim: usize, idx: &[usize]) -> Vec<f32> {
    idx.iter()
        .flat_map(|&i| x[i * dim..(i + 1) * dim].iter().copied())
        .collect()
}

/// Squared Euclidean costs C_ij = ||a_i - b_j||^2 (row-major n x m, f64), as one matrix product:
/// |a_i|^2 + |b_j|^2 - 2 a_i . b_j (clamped at 0 against rounding).
pub fn squared_costs(a: &[f32], b: &[f32], dim: usize) -> Vec<f64> {
    let (n, m) = (a.len() / dim, b.len() / dim);
    let norms = |x: &[f32]| -> Vec<f64> {
        x.chunks(dim)
            .map(|r| r.iter().map(|&v| (v as f64) * (v as f64)).sum())
            .collect()
    };
    let (na, nb) = (norms(a), norms(b));
    let a64: Vec<f64> = a.iter().map(|&v| v as f64).collect();
    let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
    let mut ab = vec![0f64; n * m];
    // Threads only where the product is worth splitting (2-D batches are a few microseconds).
    let par = if n * m * dim >= 1 << 22 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    linalg::matmul(
        &mut ab,
        (n, m, dim),
        false,
        linalg::View::rows(&a64, dim),
        linalg::View::transposed(&b64, dim),
        par,
    );
    for (k, c) in ab.iter_mut().enumerate() {
        *c = (na[k / m] + nb[k % m] - 2.0 * *c).max(0.0);
    }
    ab
}

/// The optimal assignment of x0's rows to x1's: x0 row i goes with x1 row `sigma[i]`.
pub fn exact_ot(x0: &[f32], x1: &[f32], dim: usize) -> Result<Vec<usize>> {
    Ok(exact_ot_certified(x0, x1, dim)?.col_of_row)
}

/// [`exact_ot`] with the dual potentials of the squared-Euclidean assignment.
pub fn exact_ot_certified(x0: &[f32], x1: &[f32], dim: usize) -> Result<Assignment> {
    let n = x0.len() / dim;
    if x1.len() != x0.len() || n == 0 {
        return Err(Error::Data(format!(
            "exact OT pairs two minibatches of the same size (with uniform weights its plan is a \
             permutation); got {} and {} rows. Use equal batch sizes, or --coupling sinkhorn",
            n,
            x1.len() / dim
        )));
    }
    assignment::solve(&squared_costs(x0, x1, dim), n)
}

/// The entropic OT plan between uniform weights (Sinkhorn on C / max C; log domain below reg 0.002),
/// row-major n x m.
pub fn sinkhorn_plan(x0: &[f32], x1: &[f32], dim: usize, reg: f64) -> Result<Vec<f64>> {
    let (n, m) = (x0.len() / dim, x1.len() / dim);
    if n == 0 || m == 0 {
        return Err(Error::Data("Sinkhorn needs non-empty minibatches".into()));
    }
    let mut c = squared_costs(x0, x1, dim);
    let max = c.iter().copied().fold(0.0, f64::max).max(f64::MIN_POSITIVE);
    c.iter_mut().for_each(|v| *v /= max * reg);
    if reg >= 0.002 {
        // exp(-C / reg) >= exp(-500) stays a normal f64: plain scaling iterations (u, v) are exact enough
        // and much faster than the log domain.
        let k: Vec<f64> = c.iter().map(|v| (-v).exp()).collect();
        let (mut u, mut v) = (vec![1.0 / n as f64; n], vec![1.0 / m as f64; m]);
        for _ in 0..5000 {
            for i in 0..n {
                let s: f64 = k[i * m..(i + 1) * m]
                    .iter()
                    .zip(&v)
                    .map(|(a, b)| a * b)
                    .sum();
                u[i] = 1.0 / (n as f64 * s.max(f64::MIN_POSITIVE));
            }
            let mut col = vec![0f64; m];
            for i in 0..n {
                for (cj, kij) in col.iter_mut().zip(&k[i * m..(i + 1) * m]) {
                    *cj += kij * u[i];
                }
            }
            let mut err = 0f64;
            for j in 0..m {
                let vj = 1.0 / (m as f64 * col[j].max(f64::MIN_POSITIVE));
                err = err.max(((vj - v[j]) / vj).abs());
                v[j] = vj;
            }
            if err < 1e-9 {
                break;
            }
        }
        return Ok((0..n * m).map(|q| u[q / m] * k[q] * v[q % m]).collect());
    }
    let (la, lb) = (-(n as f64).ln(), -(m as f64).ln());
    let (mut f, mut g) = (vec![0f64; n], vec![0f64; m]);
    let lse = |it: &mut dyn Iterator<Item = f64>| {
        let v: Vec<f64> = it.collect();
        let mx = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        mx + v.iter().map(|x| (x - mx).exp()).sum::<f64>().ln()
    };
    for _ in 0..2000 {
        for i in 0..n {
            f[i] = la - lse(&mut (0..m).map(|j| g[j] - c[i * m + j]));
        }
        let mut err = 0f64;
        for j in 0..m {
            let gj = lb - lse(&mut (0..n).map(|i| f[i] - c[i * m + j]));
            err = err.max((gj - g[j]).abs());
            g[j] = gj;
        }
        if err < 1e-9 {
            break;
        }
    }
    Ok((0..n * m)
        .map(|k| (f[k / m] + g[k % m] - c[k]).exp())
        .collect())
}

/// `count` distinct index pairs drawn from a plan (n x m weights) without replacement: the `count`
/// largest keys ln(u_k) / p_k, u_k ~ U(0, 1) (Efraimidis & Spirakis 2006, "Weighted random sampling
/// with a reservoir"), which draws pairs one after another with probability proportional to their
/// weight among those not yet drawn. Pairs of zero weight are never drawn; when fewer than `count`
/// pairs have weight, each of them is drawn once.
fn sample_pairs(plan: &[f64], n: usize, count: usize, rng: &mut Rng) -> (Vec<usize>, Vec<usize>) {
    let m = plan.len() / n;
    let mut keys: Vec<(f64, usize)> = plan
        .iter()
        .enumerate()
        .filter(|(_, &p)| p > 0.0)
        .map(|(k, &p)| (rng.uniform().max(f64::MIN_POSITIVE).ln() / p, k))
        .collect();
    let take = count.min(keys.len());
    if take > 0 && take < keys.len() {
        keys.select_nth_unstable_by(take - 1, |a, b| b.0.total_cmp(&a.0));
    }
    keys[..take].iter().map(|&(_, k)| (k / m, k % m)).unzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rows of a JSON array of arrays of numbers.
    fn json_rows(v: &serde_json::Value) -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
            })
            .collect()
    }

    /// POT's ot.emd on fixed points (tests/fixtures/pot_emd.json, made by make_pot_emd.py): the same
    /// permutation, the same cost, every sample used once, the duals certifying the optimum; on the
    /// larger problems (200 points in 2-D, 64 in 16-D) POT's cost, certified.
    #[test]
    fn exact_ot_matches_pot() {
        let text = include_str!("../tests/fixtures/pot_emd.json");
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        let tol = 2.0 * assignment::EPS_FINAL;
        for case in v["larger"].as_array().unwrap() {
            let (x0, x1) = (json_rows(&case["x0"]), json_rows(&case["x1"]));
            let n = case["x0"].as_array().unwrap().len();
            let dim = x0.len() / n;
            let a = exact_ot_certified(&x0, &x1, dim).unwrap();
            a.certify(&squared_costs(&x0, &x1, dim), tol).unwrap();
            let (ours, pot) = (a.cost / n as f64, case["cost"].as_f64().unwrap());
            assert!((ours - pot).abs() <= 1e-9 * pot, "{ours} vs POT {pot}");
        }
        let (x0, x1) = (json_rows(&v["x0"]), json_rows(&v["x1"]));
        let want: Vec<usize> = v["assignment"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let sigma = exact_ot(&x0, &x1, 2).unwrap();
        assert_eq!(sigma, want);
        exact_ot_certified(&x0, &x1, 2)
            .unwrap()
            .certify(&squared_costs(&x0, &x1, 2), tol)
            .unwrap();
        let mut seen = sigma.clone();
        seen.sort();
        assert_eq!(seen, (0..want.len()).collect::<Vec<_>>());
        let c = squared_costs(&x0, &x1, 2);
        let n = want.len();
        let cost: f64 = sigma
            .iter()
            .enumerate()
            .map(|(i, &j)| c[i * n + j])
            .sum::<f64>()
            / n as f64;
        assert!((cost - v["cost"].as_f64().unwrap()).abs() < 1e-5, "{cost}");
        // Pairing direction: x0 row i keeps its place, x1 rows are permuted onto it.
        let (a, b) = Coupling::Ot
            .pair(x0.clone(), x1.clone(), 2, &mut Rng::new(0))
            .unwrap();
        assert_eq!(a, x0);
        assert_eq!(&b[..2], &x1[2 * want[0]..2 * want[0] + 2]);
    }

    /// Pairing a set with a shifted copy of itself (a shift makes the identity optimal) recovers it.
    #[test]
    fn ot_undoes_a_shuffle() {
        let mut rng = Rng::new(1);
        let x1: Vec<f32> = rng.normal_vec(2 * 64);
        let mut perm: Vec<usize> = (0..64).collect();
        for i in (1..64).rev() {
            perm.swap(i, rng.below(i + 1));
        }
        let x0: Vec<f32> = perm
            .iter()
            .flat_map(|&i| x1[2 * i..2 * i + 2].iter().map(|v| v + 0.01))
            .collect();
        assert_eq!(exact_ot(&x0, &x1, 2).unwrap(), perm);
    }

    #[test]
    fn sinkhorn_has_uniform_marginals_and_sharpens_to_ot() {
        let mut rng = Rng::new(2);
        let (x0, x1) = (rng.normal_vec(2 * 16), rng.normal_vec(2 * 16));
        let p = sinkhorn_plan(&x0, &x1, 2, 0.05).unwrap();
        for i in 0..16 {
            let r: f64 = p[i * 16..(i + 1) * 16].iter().sum();
            let c: f64 = (0..16).map(|k| p[k * 16 + i]).sum();
            assert!((r - 1.0 / 16.0).abs() < 1e-6 && (c - 1.0 / 16.0).abs() < 1e-6);
        }
        // At a small regularisation the plan's mass sits on the OT permutation.
        let sigma = exact_ot(&x0, &x1, 2).unwrap();
        let sharp = sinkhorn_plan(&x0, &x1, 2, 0.0005).unwrap();
        let on: f64 = sigma
            .iter()
            .enumerate()
            .map(|(i, &j)| sharp[i * 16 + j])
            .sum();
        assert!(on > 0.9, "{on}");
        let (a, b) = Coupling::Sinkhorn { reg: 0.05 }
            .pair(x0, x1, 2, &mut rng)
            .unwrap();
        assert_eq!((a.len(), b.len()), (32, 32));
        assert!(Coupling::Sinkhorn { reg: 0.0 }.validate().is_err());
    }

    /// Pairs drawn from a plan are distinct, follow its weights, and never have zero weight.
    #[test]
    fn plan_sampling_is_without_replacement() {
        let mut rng = Rng::new(5);
        // A 3 x 3 plan with one zero entry and one heavy entry.
        let plan = [0.5, 0.1, 0.1, 0.0, 0.1, 0.05, 0.05, 0.05, 0.05];
        let mut heavy = 0;
        for _ in 0..2000 {
            let (r, c) = sample_pairs(&plan, 3, 3, &mut rng);
            let mut pairs: Vec<(usize, usize)> = r.into_iter().zip(c).collect();
            assert!(!pairs.contains(&(1, 0)), "a zero-weight pair was drawn");
            heavy += pairs.contains(&(0, 0)) as usize;
            pairs.sort();
            pairs.dedup();
            assert_eq!(pairs.len(), 3, "a pair was drawn twice");
        }
        // The heavy pair (half the mass) is among three draws far more often than a light one.
        assert!(heavy > 1700, "{heavy}");
        let (r, _) = sample_pairs(&[1.0, 0.0, 0.0, 0.0], 2, 3, &mut rng);
        assert_eq!(r, vec![0]);
    }
}
