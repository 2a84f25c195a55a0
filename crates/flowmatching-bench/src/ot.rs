//! The `ot` workload: one exact minibatch OT coupling (squared Euclidean cost matrix and assignment)
//! of --batch points in --dim dimensions, x0 ~ N(0, I) and x1 ~ U(-4, 4)^dim, or the points of
//! --points (bench/run.py writes them so that POT and SciPy solve the same problem).

use std::path::Path;

use anyhow::{bail, Context, Result};
use flowmatching::coupling::{exact_ot_certified, squared_costs};
use flowmatching::rng::Rng;
use serde::Serialize;

use crate::args::BenchArgs;

#[derive(Serialize)]
struct OtTiming {
    workload: String,
    #[serde(rename = "impl")]
    impl_: &'static str,
    device: &'static str,
    median_ms: f64,
    times_ms: Vec<f64>,
    /// The plan's cost: the mean squared distance of the pairs.
    cost: f64,
    /// Whether the dual potentials certify the assignment optimal (reduced costs >= 0, = 0 on it).
    certified: bool,
    nfe: Option<usize>,
    gflops: Option<f64>,
    threads: usize,
}

/// x0 then x1 (2 x n x dim little-endian float32 values) from `path`.
fn read_points(path: &Path, n: usize, dim: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() != 2 * n * dim * 4 {
        bail!(
            "{} holds {} bytes, not 2 x {n} x {dim} float32 values",
            path.display(),
            bytes.len()
        );
    }
    let v: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let (a, b) = v.split_at(n * dim);
    Ok((a.to_vec(), b.to_vec()))
}

pub fn run(a: &BenchArgs) -> Result<()> {
    let (n, dim) = (a.batch, a.dim);
    if n == 0 || dim == 0 {
        bail!("--batch and --dim must be at least 1");
    }
    let (x0, x1) = match &a.points {
        Some(p) => read_points(p, n, dim)?,
        None => {
            let mut rng = Rng::new(0);
            let x0 = rng.normal_vec(n * dim);
            let x1 = (0..n * dim)
                .map(|_| (8.0 * rng.uniform() - 4.0) as f32)
                .collect();
            (x0, x1)
        }
    };
    let mut times = vec![];
    let mut solution = None;
    for k in 0..a.warmup + a.iters {
        let start = std::time::Instant::now();
        let s = exact_ot_certified(&x0, &x1, dim)?;
        if k >= a.warmup {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        solution = Some(s);
    }
    let s = solution.expect("at least one iteration");
    let tol = 2.0 * flowmatching::assignment::EPS_FINAL;
    let certified = s.certify(&squared_costs(&x0, &x1, dim), tol).is_ok();
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let t = OtTiming {
        workload: format!("ot-n{n}-d{dim}"),
        impl_: "flowmatching",
        device: "cpu",
        median_ms: sorted[sorted.len() / 2],
        times_ms: times,
        cost: s.cost / n as f64,
        certified,
        nfe: None,
        gflops: None,
        threads: rayon::current_num_threads(),
    };
    println!("{}", serde_json::to_string(&t)?);
    Ok(())
}
