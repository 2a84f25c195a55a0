//! `flowmatching solvers`: sample quality against NFE for every solver, as a Markdown table.

use anyhow::{bail, Result};
use candle_core::Device;
use flowmatching::checkpoint::Checkpoint;
use flowmatching::eval::metrics::{checkerboard_support, energy_distance};
use flowmatching::sample::transport;
use flowmatching::solver::{Adaptive, SolveOptions, SolverKind, StepControl};
use serde::Serialize;

use crate::cli::SolversArgs;
use crate::outputs::Outputs;
use crate::resolve::initial_points;
use crate::{io, memory};

#[derive(Serialize)]
struct Row {
    solver: SolverKind,
    setting: String,
    nfe: usize,
    energy_distance: f64,
    in_support_fraction: Option<f64>,
    seconds: f64,
}

pub fn run(a: &SolversArgs) -> Result<()> {
    if a.num_samples < 2 {
        bail!("--num-samples must be at least 2");
    }
    let ckpt = Checkpoint::load(&a.checkpoint, &Device::Cpu)?;
    let config = &ckpt.meta.config;
    let mut outs = Outputs::new();
    outs.checkpoint(&a.checkpoint);
    outs.data(&a.data, "--data");
    if let Some(source) = &config.source {
        outs.data(source, "source");
    }
    if let Some(out) = &a.out {
        outs.declare(out, "--out")?;
    }
    let need = 2 * memory::sampling_bytes(&config.model, a.num_samples, a.num_samples, 7, 0, true);
    memory::check(need, "the solver comparison", "lower --num-samples")?;
    let model = ckpt.model(&Device::Cpu, true)?;
    let (reference, dim) = io::points(&a.data, Some(a.num_samples), a.seed + 1)?;
    if dim != config.model.dim() {
        bail!(
            "the model is {}-dimensional but {} has {dim} columns",
            config.model.dim(),
            a.data
        );
    }
    let mut runs: Vec<(SolverKind, String, StepControl)> = vec![];
    for kind in [SolverKind::Euler, SolverKind::Midpoint, SolverKind::Rk4] {
        for nfe in [4, 8, 16, 32] {
            let steps = nfe / kind.stages();
            runs.push((
                kind,
                format!("{steps} steps"),
                StepControl::Constant { steps },
            ));
        }
    }
    for tol in [1e-3, 1e-5] {
        runs.push((
            SolverKind::Dopri5,
            format!("rtol = atol = {tol:e}"),
            StepControl::Adaptive(Adaptive::new(tol, tol)?),
        ));
    }
    let checkerboard = a.data == "checkerboard";
    let mut rows = vec![];
    println!(
        "| solver | setting | NFE | energy distance |{}",
        if checkerboard { " in support |" } else { "" }
    );
    println!(
        "|---|---|---|---|{}",
        if checkerboard { "---|" } else { "" }
    );
    for (kind, setting, control) in runs {
        let start = std::time::Instant::now();
        let opts = SolveOptions::with_control(control);
        let x0 = initial_points(config, a.num_samples, a.seed)?;
        let (x, sol) = transport(&model, config, x0, kind, &opts)?;
        let row = Row {
            solver: kind,
            setting,
            nfe: sol.stats.nfe,
            energy_distance: energy_distance(&x, &reference, dim),
            in_support_fraction: checkerboard.then(|| checkerboard_support(&x).in_support_fraction),
            seconds: start.elapsed().as_secs_f64(),
        };
        let support = row
            .in_support_fraction
            .map(|f| format!(" {f:.4} |"))
            .unwrap_or_default();
        println!(
            "| {:?} | {} | {} | {:.5} |{support}",
            row.solver, row.setting, row.nfe, row.energy_distance
        );
        rows.push(row);
    }
    if let Some(out) = &a.out {
        outs.write(out, &io::json_bytes(&rows)?)?;
    }
    outs.commit()?;
    Ok(())
}
