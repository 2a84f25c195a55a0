//! The solve loop: a solver, a step controller and a vector field in; the state, [`Stats`] and a
//! [`Status`] out, as diffrax's `diffeqsolve` does.

use candle_core::{DType, Device, Tensor};

use super::controller::{Adaptive, Controller, ErrorNorm, StepControl, Stop};
use super::{Dense, Rhs, Solver, Stats};
use crate::error::{Error, Result, SolveStop};
use crate::field::VelocityField;
use crate::tensor::column;
use crate::timesteps::TimeGrid;

/// What to solve for besides the final state.
#[derive(Debug, Clone, PartialEq)]
pub struct SolveOptions {
    pub control: StepControl,
    /// Times at which to report the state (between t0 and t1, in the direction of integration). Adaptive
    /// solves use the solver's dense output, so the grid does not change the steps taken.
    pub grid: Vec<f64>,
    /// Keep the state after every accepted step (not available with per-sample error control).
    pub keep_trajectory: bool,
    /// A solve that stops early is an [`Error::SolverStopped`] (true, the default) or a [`Solution`]
    /// whose [`Status`] says where it stopped (false), as diffrax's `throw`.
    pub throw: bool,
    /// Where the steps of a fixed-step solve fall (equal steps by default).
    pub time_grid: TimeGrid,
}

impl SolveOptions {
    /// `steps` equal steps.
    pub fn constant(steps: usize) -> Self {
        Self::with_control(StepControl::Constant { steps })
    }

    /// Error-controlled steps.
    pub fn adaptive(a: Adaptive) -> Self {
        Self::with_control(StepControl::Adaptive(a))
    }

    /// The final state only, under `control`; a stop is an error.
    pub fn with_control(control: StepControl) -> Self {
        Self {
            control,
            grid: vec![],
            keep_trajectory: false,
            throw: true,
            time_grid: TimeGrid::Uniform,
        }
    }

    /// Fixed steps placed by `grid` (uniform, the SD3 shift, EDM's) instead of equal ones.
    pub fn time_grid(mut self, grid: TimeGrid) -> Self {
        self.time_grid = grid;
        self
    }

    /// Also the states at the times `grid`.
    pub fn grid(mut self, grid: Vec<f64>) -> Self {
        self.grid = grid;
        self
    }

    /// Also the state after every accepted step.
    pub fn trajectory(mut self) -> Self {
        self.keep_trajectory = true;
        self
    }

    /// A stop is reported in [`Solution::status`] instead of as an error.
    pub fn no_throw(mut self) -> Self {
        self.throw = false;
        self
    }
}

/// How a solve ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Every sample reached the final time.
    Completed,
    /// The solve stopped early; [`Solution::x`] holds each sample where it stopped.
    Stopped(SolveStop),
}

impl Status {
    pub fn is_completed(&self) -> bool {
        matches!(self, Status::Completed)
    }
}

/// The result of a solve.
#[derive(Debug, Clone)]
pub struct Solution {
    /// State at the final time (for a stopped solve: each sample where it stopped).
    pub x: Tensor,
    /// The state at each time of [`SolveOptions::grid`], in the same order (empty for a stopped solve).
    pub grid: Vec<Tensor>,
    /// (t, state) after every accepted step, the start included, if asked for.
    pub trajectory: Option<Vec<(f64, Tensor)>>,
    /// Batched calls of the field, and the step counts (with per-sample control: the largest over samples).
    pub stats: Stats,
    /// With per-sample control (and for a stopped solve): each sample's own number of evaluations.
    pub nfe_per_sample: Option<Vec<usize>>,
    pub status: Status,
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
    let opts = match keep_trajectory {
        true => SolveOptions::constant(steps).trajectory(),
        false => SolveOptions::constant(steps),
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
/// Errors: invalid options, a field that fails, and, when [`SolveOptions::throw`] is set,
/// [`Error::SolverStopped`] when the step limit or the minimum step size is hit or the state stops
/// being finite (unset: the solution's [`Status`] says so and holds the last state).
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
    opts.time_grid.validate()?;
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
            if opts.time_grid != TimeGrid::Uniform {
                return Err(Error::Config(
                    "a time grid places fixed steps; adaptive steps choose their own".into(),
                ));
            }
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
    let sol = Driver {
        solver,
        opts,
        dir,
        t0,
        t1,
        n,
        device: x0.device().clone(),
    }
    .run(field, x0)?;
    match (&sol.status, opts.throw) {
        (Status::Stopped(stop), true) => Err(Error::SolverStopped(stop.clone())),
        _ => Ok(sol),
    }
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
    f0: Option<Tensor>,
    attempts: Vec<usize>,
    accepted: Vec<usize>,
    rejected: Vec<usize>,
}

/// What the solve collects as it goes.
struct Outputs {
    finals: Gathered,
    grid: Vec<Gathered>,
    trajectory: Option<Vec<(f64, Tensor)>>,
    nfe_rows: Vec<usize>,
}

impl Driver<'_> {
    fn run(&self, field: &dyn VelocityField, x0: &Tensor) -> Result<Solution> {
        let mut rhs = Rhs::new(field);
        let n = self.n;
        let all_ids: Vec<u32> = (0..n as u32).collect();
        let mut out = Outputs {
            finals: Gathered::default(),
            grid: self.opts.grid.iter().map(|_| Gathered::default()).collect(),
            trajectory: self
                .opts
                .keep_trajectory
                .then(|| vec![(self.t0, x0.clone())]),
            nfe_rows: vec![0usize; n],
        };
        for (g, gathered) in self.opts.grid.iter().zip(out.grid.iter_mut()) {
            if *g == self.t0 {
                gathered.push(&all_ids, x0.clone());
            }
        }
        let mut act = Active {
            ids: all_ids.clone(),
            x: x0.clone(),
            t: vec![self.t0; n],
            f0: None,
            attempts: vec![0; n],
            accepted: vec![0; n],
            rejected: vec![0; n],
        };
        let mut control = Controller::new(
            self.opts.control,
            self.opts.time_grid,
            self.solver.order(),
            (self.t0, self.t1),
            n,
        );
        if self.t0 == self.t1 {
            out.finals.push(&act.ids, act.x.clone());
            for g in out.grid.iter_mut().filter(|g| g.ids.is_empty()) {
                g.push(&all_ids, x0.clone());
            }
            return self.finish(out, rhs.nfe, &act);
        }
        act.f0 = control.start(&mut rhs, &act.x, self.t0, self.t1)?;
        out.nfe_rows.iter_mut().for_each(|c| *c += rhs.nfe);
        while !act.ids.is_empty() {
            if let Some(ta) = control.constant_start() {
                act.t.iter_mut().for_each(|t| *t = ta);
            }
            let h = match control.propose(&act.t, &act.attempts, self.t1) {
                Ok(h) => h,
                Err(stop) => return self.stopped(stop, act, out, rhs.nfe, x0),
            };
            let before = rhs.nfe;
            let f0_old = act.f0.take();
            let step = self
                .solver
                .step(&mut rhs, &act.t, &act.x, &h, f0_old.clone())?;
            let used = rhs.nfe - before;
            for &id in &act.ids {
                out.nfe_rows[id as usize] += used;
            }
            act.attempts.iter_mut().for_each(|s| *s += 1);
            let (accept, err) = match control.assess(&step, &act.x, &h)? {
                Ok(verdict) => verdict,
                Err(stop) => return self.stopped(stop, act, out, rhs.nfe, x0),
            };
            let t_new = self.times_reached(&act.t, &h, &accept);
            if let Some(dense) = step.dense.as_ref() {
                self.interpolate_grid(dense, &act, &t_new, &accept, &mut out.grid)?;
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
            control.update(&h, &accept, &err);
            for (k, &ok) in accept.iter().enumerate() {
                if ok {
                    act.accepted[k] += 1;
                } else {
                    act.rejected[k] += 1;
                }
            }
            act.t = t_new;
            if let Some(tr) = out.trajectory.as_mut() {
                if all_accepted {
                    tr.push((act.t[0], act.x.clone()));
                }
            }
            act = self.retire(act, &mut control, &mut out.finals)?;
        }
        self.finish(out, rhs.nfe, &act)
    }

    /// The time each row has reached after an attempt with steps `h`: t + h for accepted rows (t1
    /// when within rounding of it), t for rejected ones.
    fn times_reached(&self, t: &[f64], h: &[f64], accept: &[bool]) -> Vec<f64> {
        (0..t.len())
            .map(|k| {
                if !accept[k] {
                    t[k]
                } else if (self.t1 - (t[k] + h[k])) * self.dir <= 1e-12 * self.t1.abs().max(1.0) {
                    self.t1
                } else {
                    t[k] + h[k]
                }
            })
            .collect()
    }

    /// The grid times passed by the accepted rows in this step, by dense interpolation.
    fn interpolate_grid(
        &self,
        dense: &Dense,
        act: &Active,
        t_new: &[f64],
        accept: &[bool],
        grid: &mut [Gathered],
    ) -> Result<()> {
        let m = act.ids.len();
        for (g, out) in self.opts.grid.iter().zip(grid.iter_mut()) {
            let rows: Vec<usize> = (0..m)
                .filter(|&k| {
                    accept[k] && (g - act.t[k]) * self.dir > 0.0 && (g - t_new[k]) * self.dir <= 0.0
                })
                .collect();
            if rows.is_empty() {
                continue;
            }
            let theta: Vec<f64> = rows
                .iter()
                .map(|&k| (g - act.t[k]) / (t_new[k] - act.t[k]))
                .collect();
            let values = if rows.len() == m {
                dense.at(&theta)?
            } else {
                let sel = Tensor::new(
                    rows.iter().map(|&k| k as u32).collect::<Vec<_>>(),
                    &self.device,
                )?;
                dense.rows(&sel)?.at(&theta)?
            };
            let ids: Vec<u32> = rows.iter().map(|&k| act.ids[k]).collect();
            out.push(&ids, values);
        }
        Ok(())
    }

    /// Moves the rows that reached t1 into the final states and drops them from the active set.
    fn retire(
        &self,
        act: Active,
        control: &mut Controller,
        finals: &mut Gathered,
    ) -> Result<Active> {
        let m = act.ids.len();
        let done: Vec<usize> = (0..m).filter(|&k| act.t[k] == self.t1).collect();
        if done.is_empty() {
            return Ok(act);
        }
        if done.len() == m {
            finals.push(&act.ids, act.x.clone());
            return Ok(Active { ids: vec![], ..act });
        }
        let sel = Tensor::new(
            done.iter().map(|&k| k as u32).collect::<Vec<_>>(),
            &self.device,
        )?;
        let ids: Vec<u32> = done.iter().map(|&k| act.ids[k]).collect();
        finals.push(&ids, act.x.index_select(&sel, 0)?);
        let keep: Vec<usize> = (0..m).filter(|&k| act.t[k] != self.t1).collect();
        control.keep(&keep);
        compact(act, &keep, &self.device)
    }

    fn finish(&self, out: Outputs, nfe: usize, act: &Active) -> Result<Solution> {
        let x = out
            .finals
            .assemble(self.n, &self.device)?
            .ok_or_else(|| Error::Config("a solve ended with unfinished rows".into()))?;
        let grid = out
            .grid
            .iter()
            .map(|g| {
                g.assemble(self.n, &self.device)?.ok_or_else(|| {
                    Error::Config("a solve ended without passing an output time".into())
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let per_sample =
            matches!(self.opts.control, StepControl::Adaptive(a) if a.norm == ErrorNorm::PerSample);
        Ok(Solution {
            x,
            grid,
            trajectory: out.trajectory,
            stats: self.stats_of(nfe, act),
            nfe_per_sample: per_sample.then_some(out.nfe_rows),
            status: Status::Completed,
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

    /// The solution of a solve that cannot continue: every sample's last state, and where it stopped.
    fn stopped(
        &self,
        (k, reason, h): Stop,
        act: Active,
        mut out: Outputs,
        nfe: usize,
        x0: &Tensor,
    ) -> Result<Solution> {
        let mut t_reached = vec![self.t1; self.n];
        for (j, &id) in act.ids.iter().enumerate() {
            t_reached[id as usize] = act.t[j];
        }
        let stats = self.stats_of(nfe, &act);
        out.finals.push(&act.ids, act.x.clone());
        let x = out
            .finals
            .assemble(self.n, &self.device)
            .ok()
            .flatten()
            .unwrap_or_else(|| x0.clone());
        Ok(Solution {
            x,
            grid: vec![],
            trajectory: None,
            stats,
            nfe_per_sample: Some(out.nfe_rows),
            status: Status::Stopped(SolveStop {
                reason: reason.to_string(),
                t: act.t.get(k).copied().unwrap_or(self.t0),
                h,
                steps: act.attempts.get(k).copied().unwrap_or(0),
                t_reached,
            }),
        })
    }
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
        f0: act.f0.map(|f| f.index_select(&sel, 0)).transpose()?,
        attempts: pick_u(&act.attempts),
        accepted: pick_u(&act.accepted),
        rejected: pick_u(&act.rejected),
    })
}
