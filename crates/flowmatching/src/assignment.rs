//! Dense linear assignment: the permutation sigma minimising sum_i C[i, sigma(i)] of a square cost
//! matrix, with the dual potentials that certify it.
//!
//! The solver is the auction algorithm with epsilon scaling ([`solve`]). Its duals (u, v) satisfy
//! C[i, j] - u_i - v_j >= -eps for every (i, j) with equality on the assignment, so by linear-programming
//! duality no assignment costs less than sum_i u_i + sum_j v_j - n eps = cost - n eps: the assignment is
//! optimal up to n eps, eps = [`EPS_FINAL`] max |C|. [`Assignment::certify`] checks exactly that on the
//! costs.

use crate::error::{Error, Result};

/// No row or column.
const NONE: usize = usize::MAX;

/// An optimal assignment and its dual potentials.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// Row i is assigned column `col_of_row[i]`.
    pub col_of_row: Vec<usize>,
    /// Row potentials u.
    pub u: Vec<f64>,
    /// Column potentials v.
    pub v: Vec<f64>,
    /// sum_i C[i, col_of_row[i]].
    pub cost: f64,
}

impl Assignment {
    /// Checks optimality through the duals: `col_of_row` is a permutation, every reduced cost
    /// C[i, j] - u_i - v_j is >= -tol and those of the assignment are within tol of 0, where
    /// tol = `rel` * max |C|. Returns the most negative reduced cost found.
    pub fn certify(&self, c: &[f64], rel: f64) -> Result<f64> {
        let n = self.col_of_row.len();
        if c.len() != n * n {
            return Err(Error::Data(
                "cost matrix and assignment sizes differ".into(),
            ));
        }
        let mut seen = vec![false; n];
        for &j in &self.col_of_row {
            if j >= n || std::mem::replace(&mut seen[j], true) {
                return Err(Error::Data("the assignment is not a permutation".into()));
            }
        }
        let scale = c
            .iter()
            .fold(0f64, |m, x| m.max(x.abs()))
            .max(f64::MIN_POSITIVE);
        let tol = rel * scale;
        let mut lowest = f64::INFINITY;
        for i in 0..n {
            for j in 0..n {
                let r = c[i * n + j] - self.u[i] - self.v[j];
                lowest = lowest.min(r);
                if r < -tol || (j == self.col_of_row[i] && r.abs() > tol) {
                    return Err(Error::Data(format!(
                        "not optimal: reduced cost {r:e} at ({i}, {j}) (tolerance {tol:e})"
                    )));
                }
            }
        }
        Ok(lowest)
    }
}

/// Relative accuracy of [`solve`]: the assignment's cost is within n * EPS_FINAL * max |C| of the
/// optimum, and every reduced cost of the returned duals is >= -EPS_FINAL * max |C|.
pub const EPS_FINAL: f64 = 1e-11;

/// The auction algorithm with epsilon scaling (Bertsekas 1988, "The auction algorithm: a distributed
/// relaxation method for the assignment problem"; Bertsekas & Castanon 1989 for the scaling).
///
/// Each unassigned row i bids for its best column j1 (the smallest C_ij + p_j): it takes j1 and
/// raises p_j1 by the gap to its second best plus eps; the previous owner becomes unassigned. A phase
/// ends when every row holds a column; then every row's column is within eps of its best
/// (eps-complementary slackness), so the assignment costs at most n eps more than the optimum. eps
/// starts at a fraction of the cost range and shrinks by `THETA` per phase, the prices carried over,
/// down to `EPS_FINAL` max |C|. The coarse phases run on an f32 copy of the costs (half the memory
/// traffic of a bid, and bids are bound by it), the fine ones on the f64 costs.
///
/// Duals: v_j = -p_j and u_i = C[i, sigma(i)] - v_sigma(i); then every reduced cost C_ij - u_i - v_j
/// is >= -eps, those of the assignment 0 ([`Assignment::certify`] checks it).
pub fn solve(c: &[f64], n: usize) -> Result<Assignment> {
    check_costs(c, n)?;
    let cmax = c
        .iter()
        .fold(0f64, |m, x| m.max(x.abs()))
        .max(f64::MIN_POSITIVE);
    let cmin = c.iter().fold(f64::INFINITY, |m, &x| m.min(x));
    let range = (c.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x)) - cmin).max(cmax * 1e-6);
    let eps_final = EPS_FINAL * cmax;
    // Below this eps, f32 sums C_ij + p_j (prices grow to about the range) no longer resolve it.
    let eps_f32 = range * 1e-5;
    let mut state = Auction::new(n);
    let mut eps = range / 8.0;
    if eps > eps_f32 {
        let c32: Vec<f32> = c.iter().map(|&v| (v - cmin) as f32).collect();
        let mut p32 = vec![0f32; n];
        while eps > eps_f32 {
            state.phase(&c32, &mut p32, eps as f32);
            eps /= THETA;
        }
        state.p = p32.iter().map(|&v| v as f64 - cmin).collect();
    }
    let mut p = std::mem::take(&mut state.p);
    loop {
        let e = eps.max(eps_final);
        state.phase(c, &mut p, e);
        if e <= eps_final {
            break;
        }
        eps /= THETA;
    }
    let x = state.x;
    let v: Vec<f64> = p.iter().map(|&pj| -pj).collect();
    let u: Vec<f64> = (0..n).map(|i| c[i * n + x[i]] - v[x[i]]).collect();
    let cost = (0..n).map(|i| c[i * n + x[i]]).sum();
    Ok(Assignment {
        col_of_row: x,
        u,
        v,
        cost,
    })
}

/// Factor by which the auction's eps shrinks per phase.
const THETA: f64 = 6.0;

/// The auction's assignment (row -> column and back) and its queue of unassigned rows.
struct Auction {
    n: usize,
    x: Vec<usize>,
    owner: Vec<usize>,
    queue: std::collections::VecDeque<usize>,
    /// Prices carried from the f32 phases to the f64 ones.
    p: Vec<f64>,
}

impl Auction {
    fn new(n: usize) -> Self {
        Self {
            n,
            x: vec![NONE; n],
            owner: vec![NONE; n],
            queue: std::collections::VecDeque::with_capacity(n),
            p: vec![],
        }
    }

    /// One phase at `eps`: every row unassigned, then bids until every row holds a column.
    fn phase<T: Cost>(&mut self, c: &[T], p: &mut [T], eps: T) {
        let n = self.n;
        self.owner.iter_mut().for_each(|o| *o = NONE);
        self.queue.clear();
        self.queue.extend(0..n);
        while let Some(i) = self.queue.pop_front() {
            let (w1, j1, w2) = T::two_smallest(&c[i * n..(i + 1) * n], p);
            let gap = if w2 < T::INFINITY { w2 - w1 } else { T::ZERO };
            p[j1] = p[j1] + gap + eps;
            let previous = std::mem::replace(&mut self.owner[j1], i);
            self.x[i] = j1;
            if previous != NONE {
                self.queue.push_back(previous);
            }
        }
    }
}

/// The cost types the auction runs on: f32 (coarse phases) and f64.
trait Cost: Copy + PartialOrd + std::ops::Add<Output = Self> + std::ops::Sub<Output = Self> {
    const ZERO: Self;
    const INFINITY: Self;
    /// The smallest and second smallest of row[j] + p[j], and where the smallest is: (w1, j1, w2).
    fn two_smallest(row: &[Self], p: &[Self]) -> (Self, usize, Self);
}

/// The scalar scan (one well-predicted comparison per column).
fn two_smallest_scalar<T: Cost>(row: &[T], p: &[T]) -> (T, usize, T) {
    let (mut w1, mut j1, mut w2) = (T::INFINITY, 0usize, T::INFINITY);
    for (j, (&cij, &pj)) in row.iter().zip(p).enumerate() {
        let w = cij + pj;
        if w < w2 {
            if w < w1 {
                (w2, w1, j1) = (w1, w, j);
            } else {
                w2 = w;
            }
        }
    }
    (w1, j1, w2)
}

/// Folds per-lane (smallest, second smallest) pairs into the row's two smallest values.
fn fold_lanes<T: Cost>(pairs: impl Iterator<Item = (T, T)>) -> (T, T) {
    let (mut w1, mut w2) = (T::INFINITY, T::INFINITY);
    for (m1, m2) in pairs {
        if m1 < w1 {
            w2 = if w1 < m2 { w1 } else { m2 };
            w1 = m1;
        } else if m1 < w2 {
            w2 = m1;
        }
    }
    (w1, w2)
}

impl Cost for f64 {
    const ZERO: f64 = 0.0;
    const INFINITY: f64 = f64::INFINITY;
    fn two_smallest(row: &[f64], p: &[f64]) -> (f64, usize, f64) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            let p = &p[..row.len()];
            // SAFETY: the CPU has AVX2; row and p have the same length.
            let (w1, w2) = unsafe { simd::two_smallest_f64(row, p) };
            // SAFETY: as above.
            let j1 = unsafe { simd::position_f64(row, p, w1) };
            return (w1, j1, w2);
        }
        two_smallest_scalar(row, p)
    }
}

impl Cost for f32 {
    const ZERO: f32 = 0.0;
    const INFINITY: f32 = f32::INFINITY;
    fn two_smallest(row: &[f32], p: &[f32]) -> (f32, usize, f32) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            let p = &p[..row.len()];
            // SAFETY: the CPU has AVX2; row and p have the same length.
            let (w1, w2) = unsafe { simd::two_smallest_f32(row, p) };
            // SAFETY: as above.
            let j1 = unsafe { simd::position_f32(row, p, w1) };
            return (w1, j1, w2);
        }
        two_smallest_scalar(row, p)
    }
}

/// AVX2 scans of row + p: per lane m2 = min(m2, max(m1, w)), m1 = min(m1, w), in two independent
/// chains; the tail and the lanes folded in scalar code.
#[cfg(target_arch = "x86_64")]
mod simd {
    use super::fold_lanes;
    use std::arch::x86_64::*;

    /// The first j with row[j] + p[j] == w (the smallest value, found by the scan before).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn position_f64(row: &[f64], p: &[f64], w: f64) -> usize {
        let n = row.len().min(p.len());
        let target = _mm256_set1_pd(w);
        let mut k = 0;
        while k + 4 <= n {
            // SAFETY: k + 4 <= n, the length of both slices.
            let v = unsafe {
                _mm256_add_pd(
                    _mm256_loadu_pd(row.as_ptr().add(k)),
                    _mm256_loadu_pd(p.as_ptr().add(k)),
                )
            };
            let hits = _mm256_movemask_pd(_mm256_cmp_pd::<_CMP_EQ_OQ>(v, target));
            if hits != 0 {
                return k + hits.trailing_zeros() as usize;
            }
            k += 4;
        }
        (k..n).find(|&j| row[j] + p[j] == w).unwrap_or(0)
    }

    /// [`position_f64`] for f32.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn position_f32(row: &[f32], p: &[f32], w: f32) -> usize {
        let n = row.len().min(p.len());
        let target = _mm256_set1_ps(w);
        let mut k = 0;
        while k + 8 <= n {
            // SAFETY: k + 8 <= n, the length of both slices.
            let v = unsafe {
                _mm256_add_ps(
                    _mm256_loadu_ps(row.as_ptr().add(k)),
                    _mm256_loadu_ps(p.as_ptr().add(k)),
                )
            };
            let hits = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(v, target));
            if hits != 0 {
                return k + hits.trailing_zeros() as usize;
            }
            k += 8;
        }
        (k..n).find(|&j| row[j] + p[j] == w).unwrap_or(0)
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn two_smallest_f64(row: &[f64], p: &[f64]) -> (f64, f64) {
        let n = row.len().min(p.len());
        let full = n / 8 * 8;
        let inf = _mm256_set1_pd(f64::INFINITY);
        let (mut a1, mut a2, mut b1, mut b2) = (inf, inf, inf, inf);
        let (r, q) = (row.as_ptr(), p.as_ptr());
        let mut k = 0;
        while k < full {
            // SAFETY: k + 8 <= full <= n, the length of both slices.
            let (wa, wb) = unsafe {
                (
                    _mm256_add_pd(_mm256_loadu_pd(r.add(k)), _mm256_loadu_pd(q.add(k))),
                    _mm256_add_pd(_mm256_loadu_pd(r.add(k + 4)), _mm256_loadu_pd(q.add(k + 4))),
                )
            };
            a2 = _mm256_min_pd(a2, _mm256_max_pd(a1, wa));
            a1 = _mm256_min_pd(a1, wa);
            b2 = _mm256_min_pd(b2, _mm256_max_pd(b1, wb));
            b1 = _mm256_min_pd(b1, wb);
            k += 8;
        }
        let mut l = [[0f64; 4]; 4];
        for (dst, v) in l.iter_mut().zip([a1, a2, b1, b2]) {
            // SAFETY: dst holds four f64.
            unsafe { _mm256_storeu_pd(dst.as_mut_ptr(), v) };
        }
        let tail = (full..n).map(|j| (row[j] + p[j], f64::INFINITY));
        fold_lanes(
            (0..4)
                .flat_map(|k| [(l[0][k], l[1][k]), (l[2][k], l[3][k])])
                .chain(tail),
        )
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn two_smallest_f32(row: &[f32], p: &[f32]) -> (f32, f32) {
        let n = row.len().min(p.len());
        let full = n / 16 * 16;
        let inf = _mm256_set1_ps(f32::INFINITY);
        let (mut a1, mut a2, mut b1, mut b2) = (inf, inf, inf, inf);
        let (r, q) = (row.as_ptr(), p.as_ptr());
        let mut k = 0;
        while k < full {
            // SAFETY: k + 16 <= full <= n, the length of both slices.
            let (wa, wb) = unsafe {
                (
                    _mm256_add_ps(_mm256_loadu_ps(r.add(k)), _mm256_loadu_ps(q.add(k))),
                    _mm256_add_ps(_mm256_loadu_ps(r.add(k + 8)), _mm256_loadu_ps(q.add(k + 8))),
                )
            };
            a2 = _mm256_min_ps(a2, _mm256_max_ps(a1, wa));
            a1 = _mm256_min_ps(a1, wa);
            b2 = _mm256_min_ps(b2, _mm256_max_ps(b1, wb));
            b1 = _mm256_min_ps(b1, wb);
            k += 16;
        }
        let mut l = [[0f32; 8]; 4];
        for (dst, v) in l.iter_mut().zip([a1, a2, b1, b2]) {
            // SAFETY: dst holds eight f32.
            unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), v) };
        }
        let tail = (full..n).map(|j| (row[j] + p[j], f32::INFINITY));
        fold_lanes(
            (0..8)
                .flat_map(|k| [(l[0][k], l[1][k]), (l[2][k], l[3][k])])
                .chain(tail),
        )
    }
}

fn check_costs(c: &[f64], n: usize) -> Result<()> {
    if n == 0 || c.len() != n * n {
        return Err(Error::Data(format!(
            "assignment needs a non-empty square cost matrix, got {} values for n = {n}",
            c.len()
        )));
    }
    if let Some(k) = c.iter().position(|x| !x.is_finite()) {
        return Err(Error::Data(format!(
            "assignment cost ({}, {}) is not finite",
            k / n,
            k % n
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Every permutation of a small matrix, for the brute-force optimum.
    fn brute_force(c: &[f64], n: usize) -> f64 {
        fn go(c: &[f64], n: usize, i: usize, used: &mut Vec<bool>, acc: f64, best: &mut f64) {
            if i == n {
                *best = best.min(acc);
                return;
            }
            for j in 0..n {
                if !used[j] {
                    used[j] = true;
                    go(c, n, i + 1, used, acc + c[i * n + j], best);
                    used[j] = false;
                }
            }
        }
        let mut best = f64::INFINITY;
        go(c, n, 0, &mut vec![false; n], 0.0, &mut best);
        best
    }

    /// The certificate's tolerance for the auction's duals (reduced costs >= -EPS_FINAL max |C|).
    const TOL: f64 = 2.0 * EPS_FINAL;

    #[test]
    fn small_problems_match_brute_force_and_are_certified() {
        let mut rng = Rng::new(3);
        for n in 1..=7 {
            for trial in 0..40 {
                // Integers in 0..4 force many ties; uniform reals give none.
                let c: Vec<f64> = (0..n * n)
                    .map(|_| {
                        if trial % 2 == 0 {
                            rng.below(4) as f64
                        } else {
                            rng.uniform()
                        }
                    })
                    .collect();
                let a = solve(&c, n).unwrap();
                a.certify(&c, TOL).unwrap();
                let best = brute_force(&c, n);
                assert!(
                    a.cost - best <= 1e-9,
                    "n {n} trial {trial}: {} vs {best}",
                    a.cost
                );
            }
        }
    }

    #[test]
    fn large_geometric_problems_are_certified() {
        let mut rng = Rng::new(4);
        for (n, dim) in [(300, 2), (200, 50)] {
            let a: Vec<f64> = (0..n * dim).map(|_| rng.normal()).collect();
            let b: Vec<f64> = (0..n * dim).map(|_| 8.0 * rng.uniform() - 4.0).collect();
            let c: Vec<f64> = (0..n * n)
                .map(|k| {
                    let (i, j) = (k / n, k % n);
                    (0..dim)
                        .map(|d| (a[i * dim + d] - b[j * dim + d]).powi(2))
                        .sum()
                })
                .collect();
            let s = solve(&c, n).unwrap();
            s.certify(&c, TOL).unwrap();
            // The dual bound sum u + sum v is within n eps of the cost: no assignment is cheaper.
            let dual: f64 = s.u.iter().sum::<f64>() + s.v.iter().sum::<f64>();
            let cmax = c.iter().fold(0f64, |m, &x| m.max(x));
            assert!(
                (s.cost - dual).abs() <= n as f64 * TOL * cmax,
                "{dual} {}",
                s.cost
            );
        }
    }

    #[test]
    fn constant_and_degenerate_costs() {
        let n = 50;
        let a = solve(&vec![1.0; n * n], n).unwrap();
        a.certify(&vec![1.0; n * n], TOL).unwrap();
        assert_eq!(a.cost, n as f64);
        assert!(solve(&[], 0).is_err());
        assert!(solve(&[1.0, f64::NAN, 0.0, 1.0], 2).is_err());
        let bad = Assignment {
            col_of_row: vec![1, 0],
            u: vec![0.0; 2],
            v: vec![0.0; 2],
            cost: 2.0,
        };
        assert!(bad.certify(&[0.0, 1.0, 1.0, 0.0], 1e-12).is_err());
    }
}
