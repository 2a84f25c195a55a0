//! Drawing samples for the commands: the run's start points (noise or its source), integrated batch
//! by batch with a progress bar.

use anyhow::Result;
use candle_core::Device;
use flowmatching::nn::Model;
use flowmatching::path::SchedulerConfig;
use flowmatching::sample::{draw_batched, Batched, Conditioning};
use flowmatching::solver::{SolveOptions, SolverKind};
use flowmatching::train::RunConfig;

use crate::progress;
use crate::resolve::initial_points;

/// `n` samples from start points seeded by `seed`, in batches of `batch` rows on `device` (along the
/// paths of scheduler `on`, if given).
#[allow(clippy::too_many_arguments)]
pub fn draw(
    model: &Model,
    config: &RunConfig,
    n: usize,
    seed: u64,
    solver: SolverKind,
    opts: &SolveOptions,
    cond: Option<&Conditioning>,
    on: Option<&SchedulerConfig>,
    device: &Device,
    batch: usize,
) -> Result<Batched> {
    let x0 = initial_points(config, n, seed)?;
    let bar = progress::counter_bar(n as u64, "samples");
    let drawn = draw_batched(
        model,
        config,
        &x0,
        solver,
        opts,
        cond,
        on,
        device,
        batch,
        &mut |rows| bar.inc(rows as u64),
    )?;
    bar.finish_and_clear();
    Ok(drawn)
}
