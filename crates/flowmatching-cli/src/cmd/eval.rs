//! `flowmatching eval`: straightness and few-step quality of a trained 2-D (or any point) model.

use anyhow::{bail, Result};
use candle_core::Device;
use flowmatching::checkpoint::Checkpoint;
use flowmatching::eval::summary::evaluate;
use flowmatching::rng::Rng;

use crate::cli::EvalArgs;
use crate::outputs::Outputs;
use crate::{io, memory, plot};

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
    let mut outs = Outputs::new();
    outs.checkpoint(&a.checkpoint);
    outs.data(&spec, "--data");
    if let Some(source) = &config.source {
        outs.data(source, "source");
    }
    if let Some(out) = &a.out {
        outs.declare(out, "--out")?;
    }
    if let Some(p) = &a.plot {
        outs.declare(p, "--plot")?;
    }
    // The reference, and the samples of each Euler budget and the adaptive solve.
    let sets = 2 + flowmatching::eval::summary::EULER_STEPS.len();
    let need = (sets as u128).saturating_mul(memory::sampling_bytes(
        &config.model,
        a.num_samples,
        a.num_samples,
        7,
        0,
        true,
    ));
    memory::check(need, "the evaluation", "lower --num-samples")?;
    let refs = reference(&spec, a.num_samples, a.seed)?;
    if refs.len() != a.num_samples * config.model.dim() {
        bail!(
            "the model is {}-dimensional but --data {spec} holds points of {} dimensions",
            config.model.dim(),
            refs.len() / a.num_samples.max(1)
        );
    }
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
        outs.write(out, &io::json_bytes(&report)?)?;
    }
    if let Some(p) = &a.plot {
        let mut all: Vec<&[f32]> = vec![&refs];
        all.extend(sets.iter().map(Vec::as_slice));
        let png = plot::histograms(&all, config.model.dim(), plot::window(&refs), 80)?;
        outs.write(p, &png)?;
    }
    outs.commit()?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
