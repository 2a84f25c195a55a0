//! `flowmatching likelihood`.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Tensor;
use flowmatching::checkpoint::Checkpoint;
use flowmatching::likelihood::{
    bits_per_dim, log_likelihood, mean_and_se, Divergence, LikelihoodOptions, Probe,
};
use flowmatching::sample::RunField;
use flowmatching::solver::{SolverKind, StepControl};
use serde::Serialize;

use crate::cli::LikelihoodArgs;
use crate::io::{dequantized_images, points};
use crate::outputs::Outputs;
use crate::resolve;
use crate::{io, memory};

#[derive(Serialize)]
struct Report {
    checkpoint: String,
    data: String,
    num_points: usize,
    divergence: String,
    rtol: f64,
    atol: f64,
    nll_nats: f64,
    nll_standard_error: f64,
    bits_per_dim: Option<f64>,
    /// Batched network calls per solve (one solve per batch of points), averaged over the solves.
    nfe_mean: f64,
    nfe_total: usize,
    seconds: f64,
}

pub fn run(a: &LikelihoodArgs) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let divergence = match a.hutchinson {
        Some(0) => bail!("--hutchinson needs at least one probe"),
        Some(k) => Divergence::Hutchinson {
            probes: k,
            probe: Probe::Rademacher,
        },
        None => Divergence::Exact,
    };
    if let Some(p) = &a.per_point {
        if p.extension().and_then(|e| e.to_str()) != Some("npy") {
            bail!("--per-point must name a .npy file, got {}", p.display());
        }
    }
    if let Some(s) = a.bits_scale {
        if !(s > 0.0 && s.is_finite()) {
            bail!("--bits-scale must be positive, got {s}");
        }
    }
    let mut outs = Outputs::new();
    outs.checkpoint(&a.checkpoint);
    outs.data(&a.data, "--data");
    outs.data_dir(a.images.data_dir.as_deref());
    if let Some(out) = &a.out {
        outs.declare(out, "--out")?;
    }
    if let Some(p) = &a.per_point {
        outs.declare(p, "--per-point")?;
    }
    let device = a.device.device()?;
    let ckpt = Checkpoint::load(&a.checkpoint, &device)?;
    let config = &ckpt.meta.config;
    let images = config.model.image_shape().is_some();
    if flowmatching::data::Toy2d::from_name(&a.data).is_some() {
        let n = a.num_samples.unwrap_or(10_000);
        let need = memory::sampling_bytes(&config.model, n, 1, 0, 0, device.is_cpu());
        memory::check(need, "the data points", "lower --num-samples")?;
    }
    let (rows, dim) = if images {
        dequantized_images(&a.data, &a.images.options(), a.num_samples, a.seed)?
    } else {
        points(&a.data, a.num_samples, a.seed)?
    };
    let bits_scale = a.bits_scale.or(images.then_some(2.0 / 256.0));
    if dim != config.model.dim() {
        bail!(
            "the model is {}-dimensional but {} has {dim} columns",
            config.model.dim(),
            a.data
        );
    }
    let model = ckpt.model(&device, !a.raw_weights)?;
    let field = RunField::new(&model, config)?;
    let opts = LikelihoodOptions {
        divergence,
        solver: SolverKind::Dopri5,
        control: StepControl::Adaptive(resolve::adaptive(&a.tol)?),
        seed: a.seed,
    };
    let n = rows.len() / dim;
    let batch = a.batch_size.min(n);
    let vectors = 8 + a.hutchinson.unwrap_or(1) as u128;
    let activations = if device.is_cpu() {
        config.model.activation_bytes_per_sample()
    } else {
        0
    };
    // Per point: the state and probe vectors, and what a backward pass through the network keeps.
    let per_point = (4 * dim as u128)
        .saturating_mul(vectors)
        .saturating_add(activations);
    let need = per_point.saturating_mul(batch as u128);
    memory::check(
        need,
        "one likelihood solve",
        "lower --batch-size or --hutchinson",
    )?;
    let bar = crate::progress::counter_bar(n as u64, "points");
    let start = Instant::now();
    let (mut log_p, mut nfe) = (Vec::with_capacity(n), vec![]);
    for chunk in rows.chunks(batch * dim) {
        let x = Tensor::from_vec(chunk.to_vec(), (chunk.len() / dim, dim), &device)?;
        let ll = log_likelihood(&field, &x, &opts)?;
        nfe.push(ll.stats.nfe);
        log_p.extend(ll.log_p);
        bar.inc((chunk.len() / dim) as u64);
    }
    bar.finish_and_clear();
    let (nll, se) = mean_and_se(log_p.iter().map(|l| -l));
    let report = Report {
        checkpoint: a.checkpoint.display().to_string(),
        data: a.data.clone(),
        num_points: n,
        divergence: match divergence {
            Divergence::Exact => "exact".into(),
            Divergence::Hutchinson { probes, .. } => {
                format!("hutchinson ({probes} Rademacher probes)")
            }
        },
        rtol: a.tol.rtol,
        atol: a.tol.atol,
        nll_nats: nll,
        nll_standard_error: se,
        bits_per_dim: bits_scale.map(|s| bits_per_dim(nll, dim, s)),
        nfe_mean: nfe.iter().sum::<usize>() as f64 / nfe.len() as f64,
        nfe_total: nfe.iter().sum(),
        seconds: start.elapsed().as_secs_f64(),
    };
    if let Some(out) = &a.out {
        outs.write(out, &io::json_bytes(&report)?)?;
    }
    if let Some(p) = &a.per_point {
        outs.write(p, &io::npy_bytes(&log_p, &[n])?)?;
    }
    outs.commit()?;
    print!("NLL = {nll:.4} +- {se:.4} nats over {n} points");
    if let Some(b) = report.bits_per_dim {
        print!(" ({b:.4} bits/dim)");
    }
    println!(
        ", NFE {:.0} per solve, {:.1} s",
        report.nfe_mean, report.seconds
    );
    Ok(())
}
