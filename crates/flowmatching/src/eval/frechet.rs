//! The Frechet distance between Gaussians fitted to two feature sets (the "FID" recipe, here with our own
//! classifier's features):
//!
//! ```text
//! FD = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})
//! ```
//!
//! Tr((S_1 S_2)^{1/2}) is computed as the sum of square roots of the eigenvalues of the symmetric matrix
//! S_1^{1/2} S_2 S_1^{1/2}, which has the same eigenvalues as S_1 S_2. Eigen-decompositions use the cyclic
//! Jacobi method in f64 (exact enough for the 128 x 128 matrices used here).

use crate::error::{Error, Result};
use crate::rng::Rng;

/// Mean and covariance (unbiased, n - 1) of `n` rows of `dim` values, in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct GaussianStats {
    pub dim: usize,
    pub mean: Vec<f64>,
    /// Row-major dim x dim.
    pub cov: Vec<f64>,
}

impl GaussianStats {
    pub fn of(rows: &[f32], dim: usize) -> Result<Self> {
        if dim == 0 || !rows.len().is_multiple_of(dim) {
            return Err(Error::Data(format!(
                "{} values do not form rows of {dim}",
                rows.len()
            )));
        }
        let n = rows.len() / dim;
        if n < 2 {
            return Err(Error::Data("a covariance needs at least 2 rows".into()));
        }
        let mut mean = vec![0f64; dim];
        for r in rows.chunks(dim) {
            for (m, &v) in mean.iter_mut().zip(r) {
                *m += v as f64;
            }
        }
        mean.iter_mut().for_each(|m| *m /= n as f64);
        let mut cov = vec![0f64; dim * dim];
        let mut c = vec![0f64; dim];
        for r in rows.chunks(dim) {
            for (ci, (&v, m)) in c.iter_mut().zip(r.iter().zip(&mean)) {
                *ci = v as f64 - m;
            }
            for i in 0..dim {
                let ci = c[i];
                let row = &mut cov[i * dim..(i + 1) * dim];
                for (o, &cj) in row.iter_mut().zip(&c).skip(i) {
                    *o += ci * cj;
                }
            }
        }
        for i in 0..dim {
            for j in i..dim {
                let v = cov[i * dim + j] / (n - 1) as f64;
                cov[i * dim + j] = v;
                cov[j * dim + i] = v;
            }
        }
        Ok(Self { dim, mean, cov })
    }

    /// `n` draws from N(mean, cov), as f32 rows, through a Cholesky factor of cov + eps I: eps starts at
    /// 1e-6 of the mean variance and grows tenfold until the factor exists (rank-deficient covariances,
    /// e.g. fewer rows than dimensions).
    pub fn sample(&self, rng: &mut Rng, n: usize) -> Result<Vec<f32>> {
        let d = self.dim;
        let mean_var = (0..d).map(|i| self.cov[i * d + i]).sum::<f64>() / d as f64;
        let mut eps = 1e-6 * mean_var.max(1e-12);
        let l = loop {
            let mut a = self.cov.clone();
            (0..d).for_each(|i| a[i * d + i] += eps);
            match cholesky(&a, d) {
                Ok(l) => break l,
                Err(e) if eps > mean_var => return Err(e),
                Err(_) => eps *= 10.0,
            }
        };
        let mut out = Vec::with_capacity(n * d);
        let mut z = vec![0f64; d];
        for _ in 0..n {
            z.iter_mut().for_each(|v| *v = rng.normal());
            for i in 0..d {
                let s: f64 = l[i * d..i * d + i + 1]
                    .iter()
                    .zip(&z)
                    .map(|(a, b)| a * b)
                    .sum();
                out.push((self.mean[i] + s) as f32);
            }
        }
        Ok(out)
    }
}

/// The Frechet distance between two fitted Gaussians.
pub fn frechet_distance(a: &GaussianStats, b: &GaussianStats) -> Result<f64> {
    if a.dim != b.dim {
        return Err(Error::Data(format!(
            "feature dimensions differ: {} vs {}",
            a.dim, b.dim
        )));
    }
    let d = a.dim;
    let mean_term: f64 = a
        .mean
        .iter()
        .zip(&b.mean)
        .map(|(x, y)| (x - y).powi(2))
        .sum();
    let trace = |m: &[f64]| (0..d).map(|i| m[i * d + i]).sum::<f64>();
    // S_1^{1/2} = V diag(sqrt(lambda)) V^T.
    let (vals, vecs) = symmetric_eigen(&a.cov, d);
    let mut root = vec![0f64; d * d];
    for k in 0..d {
        let s = vals[k].max(0.0).sqrt();
        for i in 0..d {
            let vik = vecs[i * d + k] * s;
            for j in 0..d {
                root[i * d + j] += vik * vecs[j * d + k];
            }
        }
    }
    let m = matmul(&matmul(&root, &b.cov, d), &root, d);
    let (mu, _) = symmetric_eigen(&m, d);
    let cross: f64 = mu.iter().map(|v| v.max(0.0).sqrt()).sum();
    Ok(mean_term + trace(&a.cov) + trace(&b.cov) - 2.0 * cross)
}

fn matmul(a: &[f64], b: &[f64], d: usize) -> Vec<f64> {
    let mut c = vec![0f64; d * d];
    for i in 0..d {
        for k in 0..d {
            let aik = a[i * d + k];
            for j in 0..d {
                c[i * d + j] += aik * b[k * d + j];
            }
        }
    }
    c
}

/// Lower-triangular L with L L^T = a (a symmetric positive definite).
fn cholesky(a: &[f64], d: usize) -> Result<Vec<f64>> {
    let mut l = vec![0f64; d * d];
    for i in 0..d {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i * d + k] * l[j * d + k]).sum();
            if i == j {
                let v = a[i * d + i] - s;
                if v <= 0.0 {
                    return Err(Error::Data("covariance is not positive definite".into()));
                }
                l[i * d + i] = v.sqrt();
            } else {
                l[i * d + j] = (a[i * d + j] - s) / l[j * d + j];
            }
        }
    }
    Ok(l)
}

/// Eigenvalues and eigenvectors (columns of the row-major matrix) of a symmetric matrix, by cyclic
/// Jacobi rotations until the off-diagonal mass is negligible.
pub fn symmetric_eigen(a: &[f64], d: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = a.to_vec();
    let mut v = vec![0f64; d * d];
    (0..d).for_each(|i| v[i * d + i] = 1.0);
    let norm: f64 = a.iter().map(|x| x * x).sum::<f64>().max(f64::MIN_POSITIVE);
    for _sweep in 0..100 {
        let off: f64 = (0..d)
            .flat_map(|i| (0..d).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * d + j].powi(2))
            .sum();
        if off <= 1e-24 * norm {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                let apq = a[p * d + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * d + q] - a[p * d + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..d {
                    let (akp, akq) = (a[k * d + p], a[k * d + q]);
                    a[k * d + p] = c * akp - s * akq;
                    a[k * d + q] = s * akp + c * akq;
                }
                for k in 0..d {
                    let (apk, aqk) = (a[p * d + k], a[q * d + k]);
                    a[p * d + k] = c * apk - s * aqk;
                    a[q * d + k] = s * apk + c * aqk;
                }
                for k in 0..d {
                    let (vkp, vkq) = (v[k * d + p], v[k * d + q]);
                    v[k * d + p] = c * vkp - s * vkq;
                    v[k * d + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..d).map(|i| a[i * d + i]).collect(), v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(mean: Vec<f64>, cov: Vec<f64>) -> GaussianStats {
        GaussianStats {
            dim: mean.len(),
            mean,
            cov,
        }
    }

    #[test]
    fn eigen_reconstructs_the_matrix() {
        let a = [4.0, 1.0, 0.5, 1.0, 3.0, 0.2, 0.5, 0.2, 1.0];
        let (vals, v) = symmetric_eigen(&a, 3);
        for i in 0..3 {
            for j in 0..3 {
                let r: f64 = (0..3).map(|k| v[i * 3 + k] * vals[k] * v[j * 3 + k]).sum();
                assert!((r - a[i * 3 + j]).abs() < 1e-10);
            }
        }
    }

    /// For 2 x 2 matrices tr(M^{1/2}) = sqrt(tr M + 2 sqrt(det M)), an independent closed form, and the
    /// covariances below do not commute.
    #[test]
    fn matches_the_two_by_two_closed_form() {
        let s1 = vec![2.0, 0.6, 0.6, 1.0];
        let s2 = vec![1.5, -0.4, -0.4, 0.7];
        let m = matmul(&s1, &s2, 2);
        let (tr, det) = (m[0] + m[3], m[0] * m[3] - m[1] * m[2]);
        let cross = (tr + 2.0 * det.sqrt()).sqrt();
        let want = 1.0 + 4.0 + (2.0 + 1.0) + (1.5 + 0.7) - 2.0 * cross;
        let got = frechet_distance(&stats(vec![0.0, 0.0], s1), &stats(vec![1.0, 2.0], s2)).unwrap();
        assert!((got - want).abs() < 1e-10, "{got} vs {want}");
    }

    #[test]
    fn zero_for_equal_and_symmetric() {
        let mut rng = Rng::new(0);
        let x: Vec<f32> = (0..4000).map(|_| rng.normal() as f32).collect();
        let y: Vec<f32> = (0..4000).map(|_| 2.0 * rng.normal() as f32 + 0.5).collect();
        let (a, b) = (
            GaussianStats::of(&x, 4).unwrap(),
            GaussianStats::of(&y, 4).unwrap(),
        );
        assert!(frechet_distance(&a, &a).unwrap().abs() < 1e-9);
        let (ab, ba) = (
            frechet_distance(&a, &b).unwrap(),
            frechet_distance(&b, &a).unwrap(),
        );
        assert!((ab - ba).abs() < 1e-9);
        // N(0, I) vs N(0.5, 4 I) in 4-D: 4 * 0.25 + 4 * (1 + 4 - 2 * 2) = 5, up to sampling error.
        assert!((ab - 5.0).abs() < 0.5, "{ab}");
    }

    #[test]
    fn gaussian_samples_have_the_fitted_moments() {
        let g = stats(vec![1.0, -1.0], vec![1.0, 0.8, 0.8, 1.0]);
        let x = g.sample(&mut Rng::new(3), 20_000).unwrap();
        let back = GaussianStats::of(&x, 2).unwrap();
        assert!((back.mean[0] - 1.0).abs() < 0.03 && (back.mean[1] + 1.0).abs() < 0.03);
        assert!((back.cov[1] - 0.8).abs() < 0.03, "{:?}", back.cov);
        assert!(GaussianStats::of(&x[..3], 2).is_err());
        // Fewer rows than dimensions: a singular covariance still gives draws.
        let few = GaussianStats::of(&x[..6], 2).unwrap();
        let wide = GaussianStats::of(&[1.0, 2.0, 3.0, 4.0, 5.0, 7.0], 3).unwrap();
        assert_eq!(few.sample(&mut Rng::new(0), 3).unwrap().len(), 6);
        assert!(wide
            .sample(&mut Rng::new(0), 4)
            .unwrap()
            .iter()
            .all(|v| v.is_finite()));
    }
}
