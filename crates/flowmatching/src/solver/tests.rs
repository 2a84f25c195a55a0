//! Solver tests against analytic solutions and SciPy's RK45.

use std::cell::Cell;

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::error::Error;

/// dx/dt = a x + t: linear, with the closed-form solution `exact`.
struct Linear(f64);
impl VelocityField for Linear {
    fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        Ok(((x * self.0)? + t.unsqueeze(1)?.broadcast_as(x.shape())?)?)
    }
}

fn exact(a: f64, x0: f64, t: f64) -> f64 {
    (x0 + 1.0 / (a * a)) * (a * t).exp() - t / a - 1.0 / (a * a)
}

/// Counts its own calls, independently of the solver's bookkeeping.
struct Counted<F>(F, Cell<usize>);
impl<F: VelocityField> VelocityField for Counted<F> {
    fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.1.set(self.1.get() + 1);
        self.0.forward(x, t)
    }
}

/// The forced Van der Pol oscillator of the SciPy fixture.
struct VanDerPol(f64);
impl VelocityField for VanDerPol {
    fn forward(&self, z: &Tensor, t: &Tensor) -> Result<Tensor> {
        let x = z.narrow(1, 0, 1)?;
        let y = z.narrow(1, 1, 1)?;
        let force = (t.unsqueeze(1)?.cos()? * 0.5)?;
        let dy = ((((x.sqr()? * -1.0)? + 1.0)? * &y)? * self.0)?;
        let dy = ((dy - &x)? + force)?;
        Ok(Tensor::cat(&[&y, &dy], 1)?)
    }
}

fn scalar(x: &Tensor) -> f64 {
    x.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0]
}

fn x0() -> Tensor {
    Tensor::new(&[[0.5f64]], &Device::Cpu).unwrap()
}

fn fixed_error(kind: SolverKind, steps: usize) -> f64 {
    let sol = integrate(
        &Linear(-1.3),
        kind.solver().as_ref(),
        &x0(),
        0.0,
        1.0,
        steps,
        false,
    )
    .unwrap();
    (scalar(&sol.x) - exact(-1.3, 0.5, 1.0)).abs()
}

#[test]
fn convergence_orders_by_step_halving() {
    for (kind, order, n) in [
        (SolverKind::Euler, 1.0, 32),
        (SolverKind::Midpoint, 2.0, 32),
        (SolverKind::Heun, 2.0, 32),
        (SolverKind::Rk4, 4.0, 16),
        (SolverKind::Dopri5, 5.0, 8),
    ] {
        let slope = (fixed_error(kind, n) / fixed_error(kind, 2 * n)).log2();
        assert!(
            (slope - order).abs() < 0.3,
            "{kind:?}: measured order {slope}"
        );
    }
}

#[test]
fn nfe_counts_field_calls_for_constant_steps() {
    let x = Tensor::zeros((3, 1), DType::F64, &Device::Cpu).unwrap();
    for (kind, per_step, extra) in [
        (SolverKind::Euler, 1, 0),
        (SolverKind::Midpoint, 2, 0),
        (SolverKind::Heun, 2, 0),
        (SolverKind::Rk4, 4, 0),
        (SolverKind::Dopri5, 6, 1), // first-same-as-last: 6 per step plus the very first stage
    ] {
        let f = Counted(Linear(1.0), Cell::new(0));
        let s = integrate(&f, kind.solver().as_ref(), &x, 0.0, 1.0, 7, true).unwrap();
        assert_eq!(s.stats.nfe, 7 * per_step + extra, "{kind:?}");
        assert_eq!(s.stats.nfe, f.1.get(), "{kind:?}");
        assert_eq!(
            (s.stats.steps, s.stats.accepted, s.stats.rejected),
            (7, 7, 0)
        );
        assert_eq!(s.trajectory.unwrap().len(), 8);
    }
}

#[test]
fn adaptive_error_falls_with_the_tolerance_and_nfe_is_exact() {
    let mut last = f64::INFINITY;
    for tol in [1e-3, 1e-5, 1e-7, 1e-9] {
        let f = Counted(Linear(-1.3), Cell::new(0));
        let opts = SolveOptions::adaptive(Adaptive::new(tol, tol).unwrap());
        let s = solve(&f, &Dopri5, &x0(), 0.0, 1.0, &opts).unwrap();
        let err = (scalar(&s.x) - exact(-1.3, 0.5, 1.0)).abs();
        assert!(
            err < last,
            "tol {tol}: error {err} did not fall below {last}"
        );
        assert!(err < 50.0 * tol, "tol {tol}: error {err}");
        last = err;
        assert_eq!(s.stats.nfe, f.1.get());
        // 1 first stage + 1 for the initial step selection + 6 per attempted step
        assert_eq!(s.stats.nfe, 2 + 6 * s.stats.steps);
        assert_eq!(s.stats.steps, s.stats.accepted + s.stats.rejected);
    }
}

#[test]
fn matches_scipy_rk45() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("../../tests/fixtures/scipy_rk45.json")).unwrap();
    let mu = fixture["mu"].as_f64().unwrap();
    for case in fixture["cases"].as_array().unwrap() {
        let v = |k: &str| {
            case[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect::<Vec<_>>()
        };
        let tol = case["tol"].as_f64().unwrap();
        let y0 = Tensor::new(v("y0"), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let opts = SolveOptions::adaptive(Adaptive::new(tol, tol).unwrap());
        let s = solve(
            &VanDerPol(mu),
            &Dopri5,
            &y0,
            0.0,
            case["t1"].as_f64().unwrap(),
            &opts,
        )
        .unwrap();
        let ours: Vec<f64> = s.x.flatten_all().unwrap().to_vec1().unwrap();
        let (reference, scipy) = (v("reference_y1"), v("scipy_y1"));
        let err = |y: &[f64]| {
            y.iter()
                .zip(&reference)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max)
        };
        let (ours_err, scipy_err) = (err(&ours), err(&scipy));
        assert!(
            ours_err < 3.0 * scipy_err.max(tol),
            "tol {tol}: our error {ours_err}, SciPy's {scipy_err}"
        );
        let nfev = case["scipy_nfev"].as_f64().unwrap();
        let ratio = s.stats.nfe as f64 / nfev;
        assert!(
            (0.75..=1.25).contains(&ratio),
            "tol {tol}: NFE {} vs SciPy {nfev}",
            s.stats.nfe
        );
    }
}

#[test]
fn reverse_integration_returns_to_the_start() {
    let x = Tensor::new(&[[0.5f64], [-2.0]], &Device::Cpu).unwrap();
    let fwd = integrate(&Linear(0.7), &Rk4, &x, 0.0, 1.0, 50, false).unwrap();
    let back = integrate(&Linear(0.7), &Rk4, &fwd.x, 1.0, 0.0, 50, false).unwrap();
    let d = crate::testing::max_abs_diff(&back.x, &x);
    assert!(d < 1e-8);
    let opts = SolveOptions::adaptive(Adaptive::new(1e-9, 1e-9).unwrap());
    let fwd = solve(&Linear(0.7), &Dopri5, &x, 0.0, 1.0, &opts).unwrap();
    let back = solve(&Linear(0.7), &Dopri5, &fwd.x, 1.0, 0.0, &opts).unwrap();
    let d = crate::testing::max_abs_diff(&back.x, &x);
    assert!(d < 1e-7, "{d}");
}

/// Dense output at a grid: accurate, and the grid does not change the steps taken.
#[test]
fn grid_output_uses_dense_output() {
    let grid = vec![0.0, 0.13, 0.5, 0.77, 1.0];
    let a = Adaptive::new(1e-6, 1e-6).unwrap();
    let plain = solve(
        &Linear(-1.3),
        &Dopri5,
        &x0(),
        0.0,
        1.0,
        &SolveOptions::adaptive(a),
    )
    .unwrap();
    let opts = SolveOptions {
        grid: grid.clone(),
        ..SolveOptions::adaptive(a)
    };
    let s = solve(&Linear(-1.3), &Dopri5, &x0(), 0.0, 1.0, &opts).unwrap();
    assert_eq!(s.stats, plain.stats);
    for (g, x) in grid.iter().zip(&s.grid) {
        let e = (scalar(x) - exact(-1.3, 0.5, *g)).abs();
        assert!(e < 1e-5, "t = {g}: dense-output error {e}");
    }
    // constant steps: grid times on step boundaries are exact step values
    let opts = SolveOptions {
        grid: vec![0.25, 0.5],
        ..SolveOptions::constant(4)
    };
    let s = solve(&Linear(-1.3), &Rk4, &x0(), 0.0, 1.0, &opts).unwrap();
    let two = integrate(&Linear(-1.3), &Rk4, &x0(), 0.0, 0.5, 2, false).unwrap();
    assert_eq!(scalar(&s.grid[1]), scalar(&two.x));
}

/// Per-sample error control: a sample's steps and result do not depend on the rest of its batch.
#[test]
fn per_sample_control_is_independent_of_the_batch() {
    let a = Adaptive::new(1e-6, 1e-6)
        .unwrap()
        .with_norm(ErrorNorm::PerSample);
    let easy = Tensor::new(&[[0.1f64, 0.0]], &Device::Cpu).unwrap();
    let both = Tensor::new(&[[0.1f64, 0.0], [3.0, 2.0]], &Device::Cpu).unwrap();
    let field = VanDerPol(5.0);
    let alone = solve(&field, &Dopri5, &easy, 0.0, 3.0, &SolveOptions::adaptive(a)).unwrap();
    let mixed = solve(&field, &Dopri5, &both, 0.0, 3.0, &SolveOptions::adaptive(a)).unwrap();
    let (na, nm) = (alone.nfe_per_sample.unwrap(), mixed.nfe_per_sample.unwrap());
    assert_eq!(na[0], nm[0]);
    assert!(
        nm[1] > nm[0],
        "the hard sample needs more evaluations: {nm:?}"
    );
    let xa: Vec<f64> = alone.x.flatten_all().unwrap().to_vec1().unwrap();
    let xm: Vec<Vec<f64>> = mixed.x.to_vec2().unwrap();
    assert!((xa[0] - xm[0][0]).abs() < 1e-12 && (xa[1] - xm[0][1]).abs() < 1e-12);
    // the batch norm makes the easy sample pay for the hard one
    let batch = solve(
        &field,
        &Dopri5,
        &both,
        0.0,
        3.0,
        &SolveOptions::adaptive(a.with_norm(ErrorNorm::Batch)),
    )
    .unwrap();
    assert!(batch.stats.steps > alone.stats.steps);
}

#[test]
fn step_limit_reports_where_it_stopped_and_keeps_the_state() {
    let mut a = Adaptive::new(1e-10, 1e-10).unwrap();
    a.max_steps = 5;
    let x0 = Tensor::new(&[[2.0f64, 0.0]], &Device::Cpu).unwrap();
    let opts = SolveOptions::adaptive(a);
    let err = solve(&VanDerPol(1.5), &Dopri5, &x0, 0.0, 3.0, &opts).unwrap_err();
    let Error::SolverStopped(stop) = err else {
        panic!("wrong error {err}")
    };
    let msg = stop.to_string();
    assert!(
        msg.contains("maximum number of steps") && msg.contains("t = ") && msg.contains("h = "),
        "{msg}"
    );
    assert_eq!(stop.steps, 5);
    assert!(stop.t > 0.0 && stop.t < 3.0);
    // Without `throw`, the same stop comes back in the solution, with every sample's last state.
    let sol = solve(&VanDerPol(1.5), &Dopri5, &x0, 0.0, 3.0, &opts.no_throw()).unwrap();
    assert_eq!(sol.status, Status::Stopped(stop));
    assert_eq!(sol.x.dims(), &[1, 2]);
    let xs: Vec<f64> = sol.x.flatten_all().unwrap().to_vec1().unwrap();
    assert!(xs[0] != 2.0, "the partial state has moved");
}

#[test]
fn bad_options_are_rejected() {
    let x = x0();
    assert!(integrate(&Linear(1.0), &Euler, &x, 0.0, 1.0, 0, false).is_err());
    let a = SolveOptions::adaptive(Adaptive::new(1e-3, 1e-3).unwrap());
    assert!(
        solve(&Linear(1.0), &Rk4, &x, 0.0, 1.0, &a).is_err(),
        "RK4 has no error estimate"
    );
    let bad_grid = SolveOptions {
        grid: vec![1.5],
        ..a.clone()
    };
    assert!(solve(&Linear(1.0), &Dopri5, &x, 0.0, 1.0, &bad_grid).is_err());
    assert!(solve(&Linear(1.0), &Dopri5, &x, 0.0, f64::NAN, &a).is_err());
}

/// A time grid places the fixed steps: the trajectory's times are the grid's, in either direction,
/// and Euler on dx/dt = a x + t with the grid's steps matches x_{k+1} = x_k + h_k (a x_k + t_k).
#[test]
fn time_grids_place_the_fixed_steps() {
    use crate::timesteps::TimeGrid;
    let grid = TimeGrid::Shift { s: 3.0 };
    let opts = SolveOptions::constant(8).trajectory().time_grid(grid);
    let s = solve(&Linear(-1.3), &Euler, &x0(), 0.0, 1.0, &opts).unwrap();
    let times: Vec<f64> = s.trajectory.unwrap().iter().map(|(t, _)| *t).collect();
    let want = grid.times(0.0, 1.0, 8);
    for (a, b) in times.iter().zip(&want) {
        assert!((a - b).abs() < 1e-12, "{times:?} vs {want:?}");
    }
    let euler = want
        .windows(2)
        .fold(0.5, |x, w| x + (w[1] - w[0]) * (-1.3 * x + w[0]));
    assert!((scalar(&s.x) - euler).abs() < 1e-12);
    let back = SolveOptions::constant(8).trajectory().time_grid(grid);
    let r = solve(&Linear(-1.3), &Euler, &x0(), 1.0, 0.0, &back).unwrap();
    let rt: Vec<f64> = r.trajectory.unwrap().iter().map(|(t, _)| *t).collect();
    assert!((rt[1] - grid.times(1.0, 0.0, 8)[1]).abs() < 1e-12, "{rt:?}");
    // Adaptive steps choose their own times.
    let a = Adaptive::new(1e-6, 1e-6).unwrap();
    let bad = SolveOptions::adaptive(a).time_grid(grid);
    assert!(solve(&Linear(-1.3), &Dopri5, &x0(), 0.0, 1.0, &bad).is_err());
}
