//! The solve loop: a solver, a step control and a vector field in; the state and [`Stats`] out.

use candle_core::{DType, Device, Tensor};

use super::controller::{pool, Adaptive, ErrorNorm, StepControl};
use super::{Dense, Rhs, Solver, Stats};
use crate::error::{Error, Result};
use crate::model::VelocityField;
use crate::path::column;

/// What to solve for besides the final state.
#[derive(Debug, Clone, PartialEq)]
pub struct SolveOptions {
    pub control: StepControl,
    /// Times at which to report the state (between t0 and t1, in the direction of integration). Adaptive
    /// solves use the solver's dense output, so the grid does not change the steps taken.
    pub grid: Vec<f64>,
    /// Keep the state after every accepted step (not available with per-sample error control).
    pub keep_trajectory: bool,
}

impl SolveOptions {
    pub fn constant(steps: usize) -> Self {
        Self {
            control: StepControl::Constant { steps },
            grid: vec![],
            keep_trajectory: false,
        }
    }

    pub fn adaptive(a: Adaptive) -> Self {
        Self {
            control: StepControl::Adaptive(a),
            grid: vec![],
            keep_trajectory: false,
        }
    }
}

/// The result of a solve.
#[derive(Debug, Clone)]
pub struct Solution {
    /// State at the final time (for a stopped solve: each sample where it stopped).
    pub x: Tensor,
    /// The state at each time of [`SolveOptions::grid`], in the same order.
    pub grid: Vec<Tensor>,
    /// (t, state) after every accepted step, the start included, if asked for.
    pub trajectory: Option<Vec<(f64, Tensor)>>,
    /// Batched calls of the field, and the step counts (with per-sample control: the largest over samples).
    pub stats: Stats,
    /// With per-sample control: each sample's own number of evaluations.
    pub nfe_per_sample: Option<Vec<usize>>,
}

/// A solve that stopped early (step limit, step size underflow, non-finite state), with its last state.
#[derive(Debug)]
pub struct SolveError {
    pub reason: String,
    /// Time, step size and attempted steps of the sample that stopped the solve.
    pub t: f64,
    pub h: f64,
    pub steps: usize,
    /// Every sample's last state (each at the time it had reached) and the statistics so far.
    pub partial: Solution,
    /// The time each sample had reached.
    pub t_reached: Vec<f64>,
}

impl std::fmt::Display for SolveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the ODE solve stopped at t = {:.6} with step size h = {:.3e} after {} steps: {}",
            self.t, self.h, self.steps, self.reason
        )
    }
}

/// Integrates dx/dt = v(x, t) from `t0` to `t1` (either direction) in `steps` equal steps.
pub fn integrate(
    field: &dyn VelocityField,
    solver: &dyn Solver,
    x0: &Tensor,
    t0: f64,
    t1: f64,
    steps: usize,
    keep_trajectory: bool,
) -> Result<Solution> {
    let opts = SolveOptions {
        keep_trajectory,
        ..SolveOptions::constant(steps)
    };
    solve(field, solver, x0, t0, t1, &opts)
}

/// Rows gathered for one output (grid time or final state), to be put back into batch order.
#[derive(Default)]
struct Gathered {
    ids: Vec<u32>,
    parts: Vec<Tensor>,
}

impl Gathered {
    fn push(&mut self, ids: &[u32], rows: Tensor) {
        self.ids.extend_from_slice(ids);
        self.parts.push(rows);
    }

    /// The rows in batch order (all `n` must be present).
    fn assemble(&self, n: usize, device: &Device) -> Result<Option<Tensor>> {
        if self.ids.len() != n || self.parts.is_empty() {
            return Ok(None);
        }
        let all = if self.parts.len() == 1 {
            self.parts[0].clone()
        } else {
            Tensor::cat(&self.parts, 0)?
        };
        if self.ids.iter().enumerate().all(|(i, &id)| i == id as usize) {
            return Ok(Some(all));
        }
        let mut inverse = vec![0u32; n];
        for (pos, &id) in self.ids.iter().enumerate() {
            inverse[id as usize] = pos as u32;
        }
        Ok(Some(all.index_select(&Tensor::new(inverse, device)?, 0)?))
    }
}

/// Solves dx/dt = v(x, t) from `t0` to `t1` with the given solver and step control.
///
/// Errors: invalid options, a field that fails, and [`Error::SolverStopped`] (holding the last state)
/// when the step limit or the minimum step size is hit or the state stops being finite.
pub fn solve(
    field: &dyn VelocityField,
    solver: &dyn Solver,
    x0: &Tensor,
    t0: f64,
    t1: f64,
    opts: &SolveOptions,
) -> Result<Solution> {
    if !(t0.is_finite() && t1.is_finite()) {
        return Err(Error::Config(format!(
            "integration bounds must be finite, got {t0} -> {t1}"
        )));
    }
    let (lo, hi) = (t0.min(t1), t0.max(t1));
    if let Some(g) = opts.grid.iter().find(|g| !(lo..=hi).contains(*g)) {
        return Err(Error::Config(format!(
            "output time {g} lies outside [{lo}, {hi}]"
        )));
    }
    let dir = if t1 >= t0 { 1.0 } else { -1.0 };
    if opts.grid.windows(2).any(|w| (w[1] - w[0]) * dir < 0.0) {
        return Err(Error::Config(
            "output times must be ordered in the direction of integration".into(),
        ));
    }
    let n = x0.dim(0)?;
    match opts.control {
        StepControl::Constant { steps } => {
            if steps == 0 {
                return Err(Error::Config(
                    "the number of solver steps must be at least 1".into(),
                ));
            }
        }
        StepControl::Adaptive(a) => {
            a.validate()?;
            if !solver.embedded() {
                return Err(Error::Config(
                    "adaptive steps need a solver with an error estimate (dopri5); use constant steps otherwise"
                        .into(),
                ));
            }
            if opts.keep_trajectory && a.norm == ErrorNorm::PerSample {
                return Err(Error::Config(
                    "a trajectory needs a common time grid: use the batch error norm or output times".into(),
                ));
            }
        }
    }
    Driver {
        solver,
        opts,
        dir,
        t0,
        t1,
        n,
        device: x0.device().clone(),
    }
    .run(field, x0)
}

struct Driver<'a> {
    solver: &'a dyn Solver,
    opts: &'a SolveOptions,
    dir: f64,
    t0: f64,
    t1: f64,
    n: usize,
    device: Device,
}

/// The rows still being integrated and their per-row state.
struct Active {
    ids: Vec<u32>,
    x: Tensor,
    t: Vec<f64>,
    h: Vec<f64>,
    err_prev: Vec<f64>,
    f0: Option<Tensor>,
    attempts: Vec<usize>,
    accepted: Vec<usize>,
    rejected: Vec<usize>,
}

impl Driver<'_> {
    fn run(&self, field: &dyn VelocityField, x0: &Tensor) -> Result<Solution> {
        let mut rhs = Rhs::new(field);
        let n = self.n;
        let mut finals = Gathered::default();
        let mut grid: Vec<Gathered> = self.opts.grid.iter().map(|_| Gathered::default()).collect();
        let all_ids: Vec<u32> = (0..n as u32).collect();
        for (g, out) in self.opts.grid.iter().zip(grid.iter_mut()) {
            if *g == self.t0 {
                out.push(&all_ids, x0.clone());
            }
        }
        let mut trajectory = self
            .opts
            .keep_trajectory
            .then(|| vec![(self.t0, x0.clone())]);
        let mut nfe_rows = vec![0usize; n];
        let adaptive = match self.opts.control {
            StepControl::Adaptive(a) => Some(a),
            StepControl::Constant { .. } => None,
        };
        let mut act = Active {
            ids: all_ids.clone(),
            x: x0.clone(),
            t: vec![self.t0; n],
            h: vec![0.0; n],
            err_prev: vec![1e-4; n],
            f0: None,
            attempts: vec![0; n],
            accepted: vec![0; n],
            rejected: vec![0; n],
        };
        let steps_fixed = match self.opts.control {
            StepControl::Constant { steps } => steps,
            StepControl::Adaptive(_) => 0,
        };
        if self.t0 == self.t1 {
            finals.push(&act.ids, act.x.clone());
            for out in grid.iter_mut().filter(|g| g.ids.is_empty()) {
                out.push(&all_ids, x0.clone());
            }
            return self.finish(finals, grid, trajectory, rhs.nfe, &act, nfe_rows, adaptive);
        }
        if let Some(a) = adaptive {
            let before = rhs.nfe;
            let f0 = rhs.eval(&act.t, &act.x)?;
            act.h = match a.initial_step {
                Some(h) => vec![h.min((self.t1 - self.t0).abs()) * self.dir; n],
                None => self.initial_step(&mut rhs, &a, &act.x, &f0)?,
            };
            act.f0 = Some(f0);
            nfe_rows.iter_mut().for_each(|c| *c += rhs.nfe - before);
        }
        let mut fixed_index = 0usize;
        while !act.ids.is_empty() {
            // Step sizes for this attempt.
            if adaptive.is_none() {
                let i = fixed_index as f64;
                let ta = self.t0 + (self.t1 - self.t0) * i / steps_fixed as f64;
                let tb = if fixed_index + 1 == steps_fixed {
                    self.t1
                } else {
                    self.t0 + (self.t1 - self.t0) * (i + 1.0) / steps_fixed as f64
                };
                act.t.iter_mut().for_each(|t| *t = ta);
                act.h.iter_mut().for_each(|h| *h = tb - ta);
            }
            for k in 0..act.ids.len() {
                let remaining = self.t1 - act.t[k];
                if act.h[k].abs() >= remaining.abs() {
                    act.h[k] = remaining;
                }
                if let Some(a) = adaptive {
                    if act.h[k].abs() < a.min_step {
                        return Err(self.stopped(
                            k,
                            "the step size fell below the minimum step",
                            act,
                            finals,
                            rhs.nfe,
                            nfe_rows,
                            x0,
                        ));
                    }
                    if act.attempts[k] >= a.max_steps {
                        return Err(self.stopped(
                            k,
                            "the maximum number of steps was reached",
                            act,
                            finals,
                            rhs.nfe,
                            nfe_rows,
                            x0,
                        ));
                    }
                }
            }
            let before = rhs.nfe;
            let f0_old = act.f0.take();
            let step = self
                .solver
                .step(&mut rhs, &act.t, &act.x, &act.h, f0_old.clone())?;
            let used = rhs.nfe - before;
            for &id in &act.ids {
                nfe_rows[id as usize] += used;
            }
            act.attempts.iter_mut().for_each(|s| *s += 1);
            let m = act.ids.len();
            let (accept, err) = match adaptive {
                None => (vec![true; m], vec![0.0; m]),
                Some(a) => {
                    let e = step
                        .error
                        .as_ref()
                        .expect("embedded solver gives an error estimate");
                    let mut err = a.norm_rows(e, &act.x, Some(&step.x))?;
                    err.iter_mut().for_each(|e| {
                        if !e.is_finite() {
                            *e = f64::INFINITY
                        }
                    });
                    if a.norm == ErrorNorm::Batch {
                        pool(&mut err);
                    }
                    (err.iter().map(|&e| e <= 1.0).collect::<Vec<_>>(), err)
                }
            };
            if adaptive.is_none() {
                let finite: f64 = step.x.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar()?;
                if !finite.is_finite() {
                    return Err(self.stopped(
                        0,
                        "the state is no longer finite (NaN or Inf)",
                        act,
                        finals,
                        rhs.nfe,
                        nfe_rows,
                        x0,
                    ));
                }
            }
            // Times reached by the accepted rows; grid outputs by dense interpolation.
            let t_new: Vec<f64> = (0..m)
                .map(|k| {
                    if !accept[k] {
                        act.t[k]
                    } else if (self.t1 - (act.t[k] + act.h[k])) * self.dir
                        <= 1e-12 * self.t1.abs().max(1.0)
                    {
                        self.t1
                    } else {
                        act.t[k] + act.h[k]
                    }
                })
                .collect();
            if let Some(dense) = step.dense.as_ref() {
                for (g, out) in self.opts.grid.iter().zip(grid.iter_mut()) {
                    let rows: Vec<usize> = (0..m)
                        .filter(|&k| {
                            accept[k]
                                && (g - act.t[k]) * self.dir > 0.0
                                && (g - t_new[k]) * self.dir <= 0.0
                        })
                        .collect();
                    if rows.is_empty() {
                        continue;
                    }
                    let theta: Vec<f64> = rows
                        .iter()
                        .map(|&k| (g - act.t[k]) / (t_new[k] - act.t[k]))
                        .collect();
                    let sel = Tensor::new(
                        rows.iter().map(|&k| k as u32).collect::<Vec<_>>(),
                        &self.device,
                    )?;
                    let values = if rows.len() == m {
                        dense.at(&theta)?
                    } else {
                        dense_rows(dense, &sel, &theta)?
                    };
                    let ids: Vec<u32> = rows.iter().map(|&k| act.ids[k]).collect();
                    out.push(&ids, values);
                }
            }
            // Next state: accepted rows move, rejected rows stay.
            let all_accepted = accept.iter().all(|&a| a);
            let f_last = step.f_last;
            if all_accepted {
                act.x = step.x;
                act.f0 = f_last;
            } else {
                let mask = column(accept.iter().map(|&a| if a { 1.0 } else { 0.0 }), &act.x)?
                    .to_dtype(DType::U8)?
                    .broadcast_as(act.x.shape())?;
                act.x = mask.where_cond(&step.x, &act.x)?;
                // A rejected row keeps its first stage; an accepted row starts from f_last.
                act.f0 = match (f_last, f0_old) {
                    (Some(last), Some(old)) => Some(mask.where_cond(&last, &old)?),
                    (None, old) if accept.iter().all(|&a| !a) => old,
                    _ => None,
                };
            }
            for k in 0..m {
                match adaptive {
                    Some(a) if accept[k] => {
                        act.h[k] *= a.accept_factor(err[k], act.err_prev[k], self.solver.order());
                        act.err_prev[k] = err[k].max(1e-4);
                        act.accepted[k] += 1;
                    }
                    Some(a) => {
                        act.h[k] *= a.reject_factor(err[k], self.solver.order());
                        act.rejected[k] += 1;
                    }
                    None => act.accepted[k] += 1,
                }
                act.t[k] = t_new[k];
            }
            fixed_index += 1;
            if let Some(tr) = trajectory.as_mut() {
                if all_accepted {
                    tr.push((act.t[0], act.x.clone()));
                }
            }
            // Retire finished rows.
            let done: Vec<usize> = (0..m).filter(|&k| act.t[k] == self.t1).collect();
            if !done.is_empty() {
                if done.len() == m {
                    finals.push(&act.ids, act.x.clone());
                    act.ids.clear();
                } else {
                    let sel = Tensor::new(
                        done.iter().map(|&k| k as u32).collect::<Vec<_>>(),
                        &self.device,
                    )?;
                    let ids: Vec<u32> = done.iter().map(|&k| act.ids[k]).collect();
                    finals.push(&ids, act.x.index_select(&sel, 0)?);
                    let keep: Vec<usize> = (0..m).filter(|&k| act.t[k] != self.t1).collect();
                    act = compact(act, &keep, &self.device)?;
                }
            }
        }
        self.finish(finals, grid, trajectory, rhs.nfe, &act, nfe_rows, adaptive)
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        finals: Gathered,
        grid: Vec<Gathered>,
        trajectory: Option<Vec<(f64, Tensor)>>,
        nfe: usize,
        act: &Active,
        nfe_rows: Vec<usize>,
        adaptive: Option<Adaptive>,
    ) -> Result<Solution> {
        let x = finals
            .assemble(self.n, &self.device)?
            .expect("every row finished");
        let grid = grid
            .iter()
            .map(|g| {
                Ok(g.assemble(self.n, &self.device)?
                    .expect("every grid time was passed"))
            })
            .collect::<Result<Vec<_>>>()?;
        let per_sample = matches!(adaptive, Some(a) if a.norm == ErrorNorm::PerSample);
        Ok(Solution {
            x,
            grid,
            trajectory,
            stats: self.stats_of(nfe, act),
            nfe_per_sample: per_sample.then_some(nfe_rows),
        })
    }

    fn stats_of(&self, nfe: usize, act: &Active) -> Stats {
        let max = |v: &[usize]| v.iter().copied().max().unwrap_or(0);
        Stats {
            nfe,
            steps: max(&act.attempts),
            accepted: max(&act.accepted),
            rejected: max(&act.rejected),
        }
    }

    /// The error for a solve that cannot continue, with every sample's last state.
    #[allow(clippy::too_many_arguments)]
    fn stopped(
        &self,
        k: usize,
        reason: &str,
        act: Active,
        mut finals: Gathered,
        nfe: usize,
        nfe_rows: Vec<usize>,
        x0: &Tensor,
    ) -> Error {
        let mut t_reached = vec![self.t1; self.n];
        for (j, &id) in act.ids.iter().enumerate() {
            t_reached[id as usize] = act.t[j];
        }
        let stats = self.stats_of(nfe, &act);
        finals.push(&act.ids, act.x.clone());
        let x = finals
            .assemble(self.n, &self.device)
            .ok()
            .flatten()
            .unwrap_or_else(|| x0.clone());
        let partial = Solution {
            x,
            grid: vec![],
            trajectory: None,
            stats,
            nfe_per_sample: Some(nfe_rows),
        };
        Error::SolverStopped(Box::new(SolveError {
            reason: reason.to_string(),
            t: act.t.get(k).copied().unwrap_or(self.t0),
            h: act.h.get(k).copied().unwrap_or(0.0),
            steps: act.attempts.get(k).copied().unwrap_or(0),
            partial,
            t_reached,
        }))
    }

    /// Hairer, Norsett and Wanner's starting step (Solving ODEs I, II.4): one extra evaluation.
    fn initial_step(
        &self,
        rhs: &mut Rhs,
        a: &Adaptive,
        x0: &Tensor,
        f0: &Tensor,
    ) -> Result<Vec<f64>> {
        let span = (self.t1 - self.t0).abs();
        let order = self.solver.order() as f64;
        let d0 = a.norm_rows(x0, x0, None)?;
        let d1 = a.norm_rows(f0, x0, None)?;
        let h0: Vec<f64> = d0
            .iter()
            .zip(&d1)
            .map(|(&d0, &d1)| {
                if d0 < 1e-5 || d1 < 1e-5 {
                    1e-6
                } else {
                    0.01 * d0 / d1
                }
            })
            .map(|h: f64| h.min(span))
            .collect();
        let signed: Vec<f64> = h0.iter().map(|h| h * self.dir).collect();
        let x1 = super::axpy(x0, &signed, f0)?;
        let t1: Vec<f64> = signed.iter().map(|h| self.t0 + h).collect();
        let f1 = rhs.eval(&t1, &x1)?;
        let diff = a.norm_rows(&(f1 - f0)?, x0, None)?;
        Ok((0..h0.len())
            .map(|i| {
                let d2 = diff[i] / h0[i];
                let dmax = d1[i].max(d2);
                let h1 = if dmax <= 1e-15 {
                    (h0[i] * 1e-3).max(1e-6)
                } else {
                    (0.01 / dmax).powf(1.0 / order)
                };
                (100.0 * h0[i]).min(h1).min(span) * self.dir
            })
            .collect())
    }
}

fn dense_rows(dense: &Dense, sel: &Tensor, theta: &[f64]) -> Result<Tensor> {
    dense.rows(sel)?.at(theta)
}

/// Keeps the rows `keep` (positions in the active set).
fn compact(act: Active, keep: &[usize], device: &Device) -> Result<Active> {
    let sel = Tensor::new(keep.iter().map(|&k| k as u32).collect::<Vec<_>>(), device)?;
    let pick_f = |v: &[f64]| keep.iter().map(|&k| v[k]).collect::<Vec<_>>();
    let pick_u = |v: &[usize]| keep.iter().map(|&k| v[k]).collect::<Vec<_>>();
    Ok(Active {
        ids: keep.iter().map(|&k| act.ids[k]).collect(),
        x: act.x.index_select(&sel, 0)?,
        t: pick_f(&act.t),
        h: pick_f(&act.h),
        err_prev: pick_f(&act.err_prev),
        f0: act.f0.map(|f| f.index_select(&sel, 0)).transpose()?,
        attempts: pick_u(&act.attempts),
        accepted: pick_u(&act.accepted),
        rejected: pick_u(&act.rejected),
    })
}
