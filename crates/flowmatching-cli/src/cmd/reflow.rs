//! `flowmatching reflow`: one round of rectified flow (Liu et al. 2022). Pairs (x0, x1 = ODE solution
//! of the trained model from x0) are generated once, then a fresh model of the same architecture is
//! trained on those fixed pairs with independent coupling. Run it on its own output for more rounds.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Device;
use flowmatching::checkpoint::{self, Checkpoint};
use flowmatching::reflow::{next_config, pairs};
use flowmatching::train::Trainer;

use crate::cli::ReflowArgs;
use crate::training::{lock_folder, report_done, run_loop};
use crate::{io, memory};

pub fn run(a: &ReflowArgs) -> Result<()> {
    if a.pairs == 0 || a.solver_steps == 0 {
        bail!("--pairs and --solver-steps must be at least 1");
    }
    if a.out.join(checkpoint::META_FILE).exists() {
        bail!(
            "{} already holds a checkpoint; choose another --out",
            a.out.display()
        );
    }
    let ckpt = Checkpoint::load(&a.checkpoint, &Device::Cpu)?;
    if ckpt.meta.config.model.num_classes() > 0 {
        bail!("reflow of class-conditional models is not supported yet");
    }
    let steps = a.steps.unwrap_or(ckpt.meta.config.train.steps);
    let described = format!("reflow pairs of {}", a.checkpoint.display());
    let config = next_config(&ckpt.meta.config, described, steps);
    config.validate()?;
    let need = memory::sampling_bytes(&config.model, a.pairs, a.pairs, 2, 1, true)
        .saturating_add(memory::training_bytes(&config, true));
    memory::check(need, "the reflow pairs and training", "lower --pairs")?;
    let start = Instant::now();
    let model = ckpt.model(&Device::Cpu, true)?;
    let source = ckpt
        .meta
        .config
        .source
        .as_deref()
        .map(io::open_data)
        .transpose()?;
    let data = pairs(
        &model,
        &ckpt.meta.config,
        source.as_deref(),
        a.pairs,
        a.solver_steps,
        a.seed,
    )?;
    eprintln!(
        "{} pairs from {} in {:.1} s; training a new model for {steps} steps",
        a.pairs,
        a.checkpoint.display(),
        start.elapsed().as_secs_f64()
    );
    io::ensure_dir(&a.out)?;
    let _lock = lock_folder(&a.out)?;
    let mut trainer = Trainer::new(config, &Device::Cpu)?;
    let o = run_loop(&mut trainer, &mut |t| t.step(&data), &a.out, 0, None)?;
    report_done(&trainer, &o, &a.out);
    Ok(())
}
