//! Sample-quality metrics for point sets.

/// Energy distance between two point sets (rows of `dim` values):
///
/// ```text
/// D^2 = 2 E|X - Y| - E|X - X'| - E|Y - Y'|
/// ```
///
/// with the within-set terms as U-statistics (pairs i != j). It is zero when the two distributions are
/// equal and positive otherwise (Szekely and Rizzo). Cost is O(n m); subsample for very large sets.
pub fn energy_distance(x: &[f32], y: &[f32], dim: usize) -> f64 {
    fn mean_dist(a: &[f32], b: &[f32], dim: usize, same: bool) -> f64 {
        let (n, m) = (a.len() / dim, b.len() / dim);
        let mut total = 0.0f64;
        for i in 0..n {
            let ai = &a[i * dim..(i + 1) * dim];
            let start = if same { i + 1 } else { 0 };
            let mut row = 0.0f64;
            for j in start..m {
                let bj = &b[j * dim..(j + 1) * dim];
                let d2: f32 = ai.iter().zip(bj).map(|(p, q)| (p - q) * (p - q)).sum();
                row += (d2 as f64).sqrt();
            }
            total += row;
        }
        if same {
            2.0 * total / (n * (n - 1)) as f64
        } else {
            total / (n * m) as f64
        }
    }
    2.0 * mean_dist(x, y, dim, false) - mean_dist(x, x, dim, true) - mean_dist(y, y, dim, true)
}

/// How well 2-D points cover the checkerboard's 8 squares.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CheckerboardSupport {
    /// Share of points inside the 8 squares.
    pub in_support_fraction: f64,
    /// Largest |share - 1/8| over the squares, shares counted among the points inside the support.
    pub max_square_deviation: f64,
}

/// Support statistics for points of [`crate::data::Toy2d::Checkerboard`] (flat x, y pairs).
pub fn checkerboard_support(points: &[f32]) -> CheckerboardSupport {
    let mut counts = [0usize; 8];
    let mut inside = 0usize;
    let n = points.len() / 2;
    for p in points.chunks_exact(2) {
        let (x, y) = ((p[0] as f64 * 0.45).floor(), (p[1] as f64 * 0.45).floor());
        if (-2.0..2.0).contains(&x) && (-2.0..2.0).contains(&y) && (x + y).rem_euclid(2.0) == 0.0 {
            // columns x in -2..2 (4 of them), and within a column 2 squares: y in {-2, 0} or {-1, 1}.
            let col = (x + 2.0) as usize;
            let row = ((y + 2.0) as usize) / 2;
            counts[col * 2 + row] += 1;
            inside += 1;
        }
    }
    let max_square_deviation = if inside == 0 {
        1.0 - 1.0 / 8.0
    } else {
        counts
            .iter()
            .map(|&c| (c as f64 / inside as f64 - 0.125).abs())
            .fold(0.0, f64::max)
    };
    CheckerboardSupport {
        in_support_fraction: if n == 0 {
            0.0
        } else {
            inside as f64 / n as f64
        },
        max_square_deviation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{DataSource, Toy2d};
    use crate::rng::Rng;

    #[test]
    fn energy_distance_separates_distributions() {
        let a = Toy2d::Moons.sample(&mut Rng::new(1), 1500);
        let b = Toy2d::Moons.sample(&mut Rng::new(2), 1500);
        let c = Toy2d::Circles.sample(&mut Rng::new(3), 1500);
        let same = energy_distance(&a, &b, 2);
        let diff = energy_distance(&a, &c, 2);
        assert!(same.abs() < 0.01, "{same}");
        assert!(diff > 0.1, "{diff}");
    }

    /// Two point masses at distance d: D^2 = 2d - 0 - 0.
    #[test]
    fn energy_distance_of_point_masses() {
        let x = [0.0f32, 0.0, 0.0, 0.0];
        let y = [3.0f32, 4.0, 3.0, 4.0];
        assert!((energy_distance(&x, &y, 2) - 10.0).abs() < 1e-9);
    }

    #[test]
    fn points_off_the_board_are_out_of_support() {
        let s = checkerboard_support(&[
            0.5 / 0.45,
            0.5 / 0.45,
            1.5 / 0.45,
            0.5 / 0.45,
            9.0,
            9.0,
            0.5 / 0.45,
            -1.5 / 0.45,
        ]);
        assert_eq!(s.in_support_fraction, 0.5);
    }
}
