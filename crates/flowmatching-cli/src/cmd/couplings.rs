//! `flowmatching couplings`: independent vs minibatch OT vs Sinkhorn coupling vs one round of reflow,
//! trained alike on one data set (and source), compared on straightness, few-step quality, adaptive NFE
//! and training cost; writes report.md, results.json and PNGs.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Device;
use flowmatching::checkpoint::Checkpoint;
use flowmatching::coupling::Coupling;
use flowmatching::data::DataSource;
use flowmatching::model::{Activation, MlpConfig, ModelConfig, TimeEmbedding};
use flowmatching::objective::Weighting;
use flowmatching::optim::{AdamWConfig, LrDecay};
use flowmatching::path::Prediction;
use flowmatching::rng::Rng;
use flowmatching::scheduler::SchedulerConfig;
use flowmatching::train::{RunConfig, TrainConfig, Trainer, FORMAT_VERSION};
use serde::{Deserialize, Serialize};

use crate::cli::CouplingsArgs;
use crate::cmd::eval::{evaluate, reference, EvalReport, EULER_STEPS};
use crate::cmd::{reflow, train};
use crate::io;
use crate::plot::{self, Series};

#[derive(Debug, Serialize, Deserialize)]
struct Variant {
    name: String,
    train_seconds: f64,
    /// Reflow only: seconds to generate its pairs.
    pair_seconds: Option<f64>,
    eval: EvalReport,
}

#[derive(Debug, Serialize, Deserialize)]
struct Overhead {
    batch: usize,
    ot_ms: f64,
    sinkhorn_ms: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Results {
    data: String,
    source: Option<String>,
    steps: u64,
    batch_size: usize,
    hidden: usize,
    variants: Vec<Variant>,
    coupling_overhead: Vec<Overhead>,
    seconds: f64,
}

fn base_config(a: &CouplingsArgs, coupling: Coupling) -> RunConfig {
    RunConfig {
        format_version: FORMAT_VERSION,
        model: ModelConfig::Mlp(MlpConfig {
            dim: 2,
            hidden: a.hidden,
            depth: 4,
            time_embedding: TimeEmbedding::Input,
            activation: Activation::Silu,
        }),
        path: SchedulerConfig::CondOt { sigma_min: 0.0 },
        prediction: Prediction::Velocity,
        weighting: Weighting::Uniform,
        train: TrainConfig {
            steps: a.steps,
            batch_size: a.batch_size,
            optimizer: AdamWConfig {
                lr: 1e-3,
                ..Default::default()
            },
            warmup_steps: 200,
            lr_decay: LrDecay::Cosine,
            grad_clip: Some(1.0),
            ema_decay: 0.999,
            seed: a.seed,
            label_dropout: 0.0,
            coupling,
        },
        data: a.data.clone(),
        source: a.source.clone(),
    }
}

fn median_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut t = vec![];
    for _ in 0..reps {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

pub fn run(a: &CouplingsArgs) -> Result<()> {
    if a.report_only {
        let path = a.out.join("results.json");
        let bytes = std::fs::read(&path)
            .map_err(|e| anyhow::anyhow!("--report-only needs {} ({e})", path.display()))?;
        let results: Results = serde_json::from_slice(&bytes).map_err(|e| {
            anyhow::anyhow!("{}: not a couplings results file ({e})", path.display())
        })?;
        let md = report(&results, results.data == "checkerboard");
        flowmatching::checkpoint::write_atomic(&a.out.join("report.md"), md.as_bytes())?;
        println!("{md}");
        return Ok(());
    }
    if a.steps == 0 || a.pairs == 0 {
        bail!("--steps and --pairs must be at least 1");
    }
    let start = Instant::now();
    let data = io::open_data(&a.data)?;
    if data.dim() != 2 {
        bail!(
            "the couplings report is for 2-D data; {} is {}-dimensional",
            a.data,
            data.dim()
        );
    }
    let source = a.source.as_deref().map(io::open_data).transpose()?;
    io::ensure_dir(&a.out)?;
    let ck_root = a.out.join("checkpoints");
    let refs = reference(&a.data, a.num_samples, a.seed)?;
    let checker = a.data == "checkerboard";
    let mut variants = vec![];
    let mut sample_sets = vec![];
    // Trains `config` on `data` (from `source`) into checkpoints/<name>, then evaluates it.
    let mut run_variant = |name: &str,
                           config: RunConfig,
                           data: &dyn DataSource,
                           source: Option<&dyn DataSource>,
                           pair_seconds: Option<f64>|
     -> Result<()> {
        let dir = ck_root.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        let mut trainer = Trainer::new(config, &Device::Cpu)?;
        eprintln!("{name}: training {} steps", a.steps);
        let o = train::run_loop(&mut trainer, data, source, &dir, 0, None)?;
        if o.interrupted {
            bail!("interrupted");
        }
        let model = trainer.ema_model()?;
        let (eval, sets) = evaluate(
            &model,
            trainer.config(),
            &refs,
            checker,
            a.num_samples,
            a.seed,
        )?;
        variants.push(Variant {
            name: name.into(),
            train_seconds: o.seconds,
            pair_seconds,
            eval,
        });
        sample_sets.push((name.to_string(), sets));
        Ok(())
    };
    let couplings = [
        ("independent", Coupling::Independent),
        ("ot", Coupling::Ot),
        ("sinkhorn", Coupling::Sinkhorn { reg: 0.05 }),
    ];
    for (name, coupling) in couplings {
        run_variant(
            name,
            base_config(a, coupling),
            data.as_ref(),
            source.as_deref(),
            None,
        )?;
    }
    // One round of reflow from the independent model.
    let indep = Checkpoint::load(&ck_root.join("independent"), &Device::Cpu)?;
    let t = Instant::now();
    let pairs = reflow::pairs(&indep, a.pairs, 100, a.seed.wrapping_add(17))?;
    let pair_seconds = t.elapsed().as_secs_f64();
    let cfg = reflow::next_config(&indep.meta.config, &ck_root.join("independent"), a.steps);
    run_variant("reflow", cfg, &pairs, None, Some(pair_seconds))?;

    // The coupling's own cost per training step, at the batch sizes users train with.
    let mut coupling_overhead = vec![];
    for batch in [256, 1024, 4096] {
        let mut rng = Rng::new(5);
        let x1 = data.sample(&mut rng, batch);
        let x0 = match &source {
            Some(s) => s.sample(&mut rng, batch),
            None => rng.normal_vec(2 * batch),
        };
        // One repetition at 4096: the exact assignment takes a minute or more there.
        let reps = if batch >= 4096 { 1 } else { 3 };
        let ot_ms = median_ms(reps, || {
            Coupling::Ot.pair(x0.clone(), x1.clone(), 2, &mut rng)?;
            Ok(())
        })?;
        let sinkhorn_ms = median_ms(reps, || {
            Coupling::Sinkhorn { reg: 0.05 }.pair(x0.clone(), x1.clone(), 2, &mut rng)?;
            Ok(())
        })?;
        eprintln!("coupling cost at batch {batch}: OT {ot_ms:.1} ms, Sinkhorn {sinkhorn_ms:.1} ms");
        coupling_overhead.push(Overhead {
            batch,
            ot_ms,
            sinkhorn_ms,
        });
    }
    let results = Results {
        data: a.data.clone(),
        source: a.source.clone(),
        steps: a.steps,
        batch_size: a.batch_size,
        hidden: a.hidden,
        variants,
        coupling_overhead,
        seconds: start.elapsed().as_secs_f64(),
    };
    io::write_json(&a.out.join("results.json"), &results)?;
    write_figures(&a.out, &refs, &sample_sets, &results)?;
    let md = report(&results, checker);
    flowmatching::checkpoint::write_atomic(&a.out.join("report.md"), md.as_bytes())?;
    println!("{md}");
    Ok(())
}

fn write_figures(
    out: &Path,
    refs: &[f32],
    sets: &[(String, Vec<Vec<f32>>)],
    r: &Results,
) -> Result<()> {
    for (name, s) in sets {
        let mut all: Vec<&[f32]> = vec![refs];
        all.extend(s.iter().map(Vec::as_slice));
        plot::histograms(
            &out.join(format!("samples-{name}.png")),
            &all,
            2,
            plot::window(refs),
            80,
        )?;
    }
    let series: Vec<Series> = r
        .variants
        .iter()
        .map(|v| Series {
            label: v.name.clone(),
            points: v
                .eval
                .few_step
                .iter()
                .map(|f| (f.euler_steps as f64, f.energy_distance.max(1e-5)))
                .collect(),
        })
        .collect();
    plot::line_plot(
        &out.join("few-step.png"),
        "energy distance to the data after k Euler steps",
        "Euler steps (NFE)",
        "energy distance",
        &series,
        true,
        true,
    )
}

fn report(r: &Results, checker: bool) -> String {
    let src = r.source.as_deref().unwrap_or("N(0, I)");
    let mut s = format!(
        "# Couplings and reflow: {src} -> {}\n\n\
         Command: `flowmatching couplings --data {}{} --steps {} --batch-size {} --hidden {}`. \
         Every variant: MLP 3-{}x4-2 (SiLU), OT path (sigma_min 0), AdamW lr 1e-3, 200 warm-up steps, cosine \
         decay, EMA 0.999, the same seed. Reflow: one round from the independent model (pairs from a \
         100-step midpoint solve), a fresh model trained on the fixed pairs for as many steps. \
         Straightness: mean of ||(x1 - x0) - v(x_t, t)||^2 along the model's own trajectories (0 = straight); \
         curvature: trajectory length over chord length - 1. Energy distances against fresh data \
         (lower is better; {} samples).\n\n",
        r.data,
        r.data,
        r.source.as_ref().map_or(String::new(), |s| format!(" --source {s}")),
        r.steps,
        r.batch_size,
        r.hidden,
        r.hidden,
        r.variants.first().map_or(0, |v| v.eval.num_samples),
    );
    s += "| variant | straightness | curvature | ED 1 step | ED 2 | ED 4 | ED 8 | adaptive NFE | ED adaptive | train s |\n";
    s += "|---|---|---|---|---|---|---|---|---|---|\n";
    for v in &r.variants {
        let ed: Vec<String> = v
            .eval
            .few_step
            .iter()
            .map(|f| format!("{:.4}", f.energy_distance))
            .collect();
        let train = match v.pair_seconds {
            Some(p) => format!("{:.1} (+{p:.1} pairs)", v.train_seconds),
            None => format!("{:.1}", v.train_seconds),
        };
        s += &format!(
            "| {} | {:.4} | {:.4} | {} | {} | {:.4} | {train} |\n",
            v.name,
            v.eval.straightness.straightness,
            v.eval.straightness.curvature,
            ed.join(" | "),
            v.eval.adaptive_nfe,
            v.eval.adaptive_energy_distance,
        );
    }
    if checker {
        s += "\nFraction of samples inside the checkerboard's squares:\n\n| variant | 1 step | 2 | 4 | 8 |\n|---|---|---|---|---|\n";
        for v in &r.variants {
            let f: Vec<String> = v
                .eval
                .few_step
                .iter()
                .map(|f| format!("{:.3}", f.in_support.unwrap_or(f64::NAN)))
                .collect();
            s += &format!("| {} | {} |\n", v.name, f.join(" | "));
        }
    }
    s += "\nCost of the coupling alone per training step (median of 3; one run at 4096):\n\n| batch | exact OT (ms) | Sinkhorn (ms) |\n|---|---|---|\n";
    for o in &r.coupling_overhead {
        s += &format!("| {} | {:.1} | {:.1} |\n", o.batch, o.ot_ms, o.sinkhorn_ms);
    }
    s += "\n## What improved and what did not\n\n";
    let base = &r.variants[0].eval;
    for v in &r.variants[1..] {
        let e = &v.eval;
        let better = |a: f64, b: f64| if a < b { "lower" } else { "not lower" };
        s += &format!(
            "- **{}** vs independent: straightness {:.4} vs {:.4} ({}), 1-step ED {:.4} vs {:.4} ({}), \
             8-step ED {:.4} vs {:.4} ({}), adaptive NFE {} vs {}.\n",
            v.name,
            e.straightness.straightness,
            base.straightness.straightness,
            better(e.straightness.straightness, base.straightness.straightness),
            e.few_step[0].energy_distance,
            base.few_step[0].energy_distance,
            better(e.few_step[0].energy_distance, base.few_step[0].energy_distance),
            e.few_step[3].energy_distance,
            base.few_step[3].energy_distance,
            better(e.few_step[3].energy_distance, base.few_step[3].energy_distance),
            e.adaptive_nfe,
            base.adaptive_nfe,
        );
    }
    if checker {
        let sup = |v: &Variant, k: usize| v.eval.few_step[k].in_support.unwrap_or(f64::NAN);
        for v in &r.variants[1..] {
            s += &format!(
                "- **{}**, samples inside the squares: {:.3} vs {:.3} after 1 step ({}), {:.3} vs {:.3} after 8 \
                 steps ({}).\n",
                v.name,
                sup(v, 0),
                sup(&r.variants[0], 0),
                if sup(v, 0) > sup(&r.variants[0], 0) { "more" } else { "not more" },
                sup(v, 3),
                sup(&r.variants[0], 3),
                if sup(v, 3) > sup(&r.variants[0], 3) { "more" } else { "not more" },
            );
        }
    }
    s += "\nEnergy distances are U-statistics: values at or below 0 mean \"indistinguishable at this sample size\" \
          (the plot draws them at 1e-5).\n";
    s += &format!(
        "\nFigures: [few-step quality](few-step.png); samples (data, Euler {:?}, adaptive): {}.\n",
        EULER_STEPS,
        r.variants
            .iter()
            .map(|v| format!("[{}](samples-{}.png)", v.name, v.name))
            .collect::<Vec<_>>()
            .join(", ")
    );
    s
}
