//! `flowmatching eval`: straightness and few-step quality of a trained 2-D (or any point) model.

use anyhow::{bail, Result};
use candle_core::Device;
use flowmatching::checkpoint::Checkpoint;
use flowmatching::eval::summary::evaluate;
use flowmatching::rng::Rng;

use crate::cli::EvalArgs;
use crate::{io, plot};

/// `n` reference points from a data spec (fresh draws from a built-in set).
fn reference(spec: &str, n: usize, seed: u64) -> Result<Vec<f32>> {
    let data = io::open_data(spec)?;
    Ok(data.sample(&mut Rng::new(seed).fork(300), n))
}

pub fn run(a: &EvalArgs) -> Result<()> {
    if a.num_samples < 2 {
        bail!("--num-samples must be at least 2");
    }
    let ckpt = Checkpoint::load(&a.checkpoint, &Device::Cpu)?;
    let config = &ckpt.meta.config;
    let spec = a.data.clone().unwrap_or_else(|| config.data.clone());
    let refs = reference(&spec, a.num_samples, a.seed)?;
    let model = ckpt.model(&Device::Cpu, true)?;
    let source = config.source.as_deref().map(io::open_data).transpose()?;
    let (report, sets) = evaluate(
        &model,
        config,
        source.as_deref(),
        &refs,
        spec == "checkerboard",
        a.num_samples,
        a.seed,
    )?;
    if let Some(out) = &a.out {
        io::write_json(out, &report)?;
    }
    if let Some(p) = &a.plot {
        let mut all: Vec<&[f32]> = vec![&refs];
        all.extend(sets.iter().map(Vec::as_slice));
        plot::histograms(p, &all, config.model.dim(), plot::window(&refs), 80)?;
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
