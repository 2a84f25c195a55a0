//! `flowmatching couplings`: independent vs minibatch OT vs Sinkhorn coupling vs one round of reflow
//! (the experiment is [`flowmatching::experiments::couplings`]); shows progress, keeps a checkpoint per
//! variant, and writes report.md, results.json and PNGs.

use std::path::Path;

use anyhow::Result;
use flowmatching::experiments::couplings::{self, CouplingsConfig, Observer, Results};
use flowmatching::rng::Rng;
use flowmatching::train::Trainer;

use crate::cli::CouplingsArgs;
use crate::report::couplings::{report, write_figures};
use crate::{io, memory, progress};

/// Progress bars, a checkpoint per variant, and the sample sets for the figures.
struct Reporter<'a> {
    checkpoints: &'a Path,
    bars: progress::RunBars,
    sets: Vec<(String, Vec<Vec<f32>>)>,
}

impl Observer for Reporter<'_> {
    fn started(&mut self, name: &str, steps: u64) {
        eprintln!("{name}: training {steps} steps");
        self.bars.start(0, steps);
    }

    fn step(&mut self, step: u64, loss: f64) {
        self.bars.step(step, loss);
    }

    fn finished(
        &mut self,
        name: &str,
        trainer: &Trainer,
        sets: &[Vec<f32>],
    ) -> Result<(), flowmatching::Error> {
        self.bars.finish();
        self.sets.push((name.to_string(), sets.to_vec()));
        let dir = self.checkpoints.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        flowmatching::checkpoint::save(trainer, &dir, None)
    }
}

fn write_report(out: &Path, results: &Results) -> Result<()> {
    let md = report(results, results.data == "checkerboard");
    flowmatching::checkpoint::write_atomic(&out.join("report.md"), md.as_bytes())?;
    println!("{md}");
    Ok(())
}

pub fn run(a: &CouplingsArgs) -> Result<()> {
    if a.report_only {
        let path = a.out.join("results.json");
        let bytes = std::fs::read(&path)
            .map_err(|e| anyhow::anyhow!("--report-only needs {} ({e})", path.display()))?;
        let results: Results = serde_json::from_slice(&bytes).map_err(|e| {
            anyhow::anyhow!("{}: not a couplings results file ({e})", path.display())
        })?;
        return write_report(&a.out, &results);
    }
    if a.steps == 0 || a.pairs == 0 {
        anyhow::bail!("--steps and --pairs must be at least 1");
    }
    let data = io::open_data(&a.data)?;
    let source = a.source.as_deref().map(io::open_data).transpose()?;
    // The largest minibatch's cost matrices (OT's, and Sinkhorn's cost, kernel and plan), and the
    // point sets kept for evaluation and reflow.
    let b = a.batch_size.max(4096) as u128;
    let points = (4 * 4 * data.dim() as u128)
        .saturating_mul((a.pairs as u128).saturating_add(8 * a.num_samples as u128));
    let need = (4 * 8 * b).saturating_mul(b).saturating_add(points);
    memory::check(
        need,
        "the couplings study",
        "lower --batch-size, --pairs or --num-samples",
    )?;
    let config = CouplingsConfig {
        data: a.data.clone(),
        source: a.source.clone(),
        steps: a.steps,
        batch_size: a.batch_size,
        hidden: a.hidden,
        seed: a.seed,
        pairs: a.pairs,
        num_samples: a.num_samples,
        checkerboard: a.data == "checkerboard",
        overhead_batches: vec![256, 1024, 4096],
    };
    let reference = data.sample(&mut Rng::new(a.seed).fork(300), a.num_samples);
    io::ensure_dir(&a.out)?;
    let mut reporter = Reporter {
        checkpoints: &a.out.join("checkpoints"),
        bars: Default::default(),
        sets: vec![],
    };
    let results = couplings::run(
        &config,
        data.as_ref(),
        source.as_deref(),
        &reference,
        &mut reporter,
    )?;
    for o in &results.coupling_overhead {
        eprintln!(
            "coupling cost at batch {}: OT {:.1} ms, Sinkhorn {:.1} ms",
            o.batch, o.ot_ms, o.sinkhorn_ms
        );
    }
    io::write_json(&a.out.join("results.json"), &results)?;
    write_figures(&a.out, &reference, &reporter.sets, &results)?;
    write_report(&a.out, &results)
}
