//! The ablation's report: report.md (the Table 1, Figure 4, 7 and 10 analogues and which of the
//! paper's orderings the run reproduces, computed from the numbers) and its PNG figures.

use std::path::Path;

use anyhow::Result;
use flowmatching::experiments::ablation::{ObjectiveResult, Results, Sizes, NFES};
use flowmatching::objective::Objective;
use flowmatching::solver::SolverKind;

use flowmatching::checkpoint::write_atomic;

use crate::images;
use crate::plot::{self, Series};

/// Writes report.md from `r`.
pub fn write_report(out: &Path, r: &Results) -> Result<()> {
    let md = report(r);
    write_atomic(&out.join("report.md"), md.as_bytes())?;
    Ok(())
}

/// The file-name form of an objective (`fm_ot`, ...).
pub fn file_name(obj: Objective) -> String {
    serde_json::to_value(obj)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

/// The Figure 4 row of one objective: 2-D histograms (columns), or one image row per budget (the first
/// 10 samples, from the same noise in every row).
pub fn picture(
    path: &Path,
    row: &[Vec<f32>],
    image: Option<[usize; 3]>,
    window: (f32, f32),
) -> Result<()> {
    match image {
        None => {
            let sets: Vec<&[f32]> = row.iter().map(Vec::as_slice).collect();
            Ok(write_atomic(
                path,
                &plot::histograms(&sets, 2, window, 60)?,
            )?)
        }
        Some(shape) => {
            let per: usize = shape.iter().product();
            let k = row.iter().map(|x| x.len() / per).min().unwrap_or(0).min(10);
            let grid: Vec<f32> = row
                .iter()
                .flat_map(|x| x[..k * per].iter().map(|v| v.clamp(-1.0, 1.0)))
                .collect();
            Ok(write_atomic(
                path,
                &images::grid_png(&grid, shape, k.max(1))?,
            )?)
        }
    }
}

/// The conditional (Figure 2) or marginal (Figure 3) paths as a trajectory plot.
pub fn paths(path: &Path, frames: &[Vec<f32>]) -> Result<()> {
    let n = frames.first().map_or(0, |f| f.len() / 2);
    Ok(write_atomic(path, &plot::trajectories(frames, 2, n)?)?)
}

/// The Figure 10, Figure 7 and loss-curve plots.
pub fn figures(out: &Path, results: &[ObjectiveResult]) -> Result<()> {
    let nfe: Vec<Series> = results
        .iter()
        .map(|r| Series {
            label: r.name.clone(),
            points: r
                .nfe_during_training
                .iter()
                .filter_map(|(s, n)| n.map(|n| (*s as f64, n as f64)))
                .collect(),
        })
        .collect();
    let png = plot::line_plot(
        "Adaptive NFE (dopri5, tol 1e-5) during training",
        "training step",
        "NFE",
        &nfe,
        false,
        true,
    )?;
    write_atomic(&out.join("nfe-during-training.png"), &png)?;
    let err: Vec<Series> = results
        .iter()
        .filter_map(|r| {
            r.numerical_error
                .iter()
                .find(|(k, _)| *k == SolverKind::Midpoint)
                .map(|(_, c)| Series {
                    label: r.name.clone(),
                    points: c.iter().map(|&(n, e)| (n as f64, e)).collect(),
                })
        })
        .collect();
    let png = plot::line_plot(
        "Midpoint: distance to a tight-tolerance solution",
        "NFE",
        "mean error",
        &err,
        true,
        true,
    )?;
    write_atomic(&out.join("error-vs-nfe.png"), &png)?;
    let loss: Vec<Series> = results
        .iter()
        .map(|r| Series {
            label: r.name.clone(),
            points: r.loss_curve.iter().map(|&(s, l)| (s as f64, l)).collect(),
        })
        .collect();
    let png = plot::line_plot(
        "Training loss (each objective's own scale)",
        "training step",
        "loss",
        &loss,
        false,
        true,
    )?;
    Ok(write_atomic(&out.join("loss.png"), &png)?)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "capped".into())
}

fn report(res: &Results) -> String {
    let (s, r): (&Sizes, &[ObjectiveResult]) = (&res.sizes, &res.results[..]);
    let checkerboard = res.data == "checkerboard";
    let mut md = String::new();
    md += &format!(
        "# Five objectives, one network: the flow-matching ablation on `{}`\n\n",
        res.data
    );
    md += &format!(
        "Made by `{}` in {:.0} s (seed {}).\n\n",
        res.command, res.seconds, res.seed
    );
    let images = res.metric == "FD";
    md += &format!(
        "Every objective trains the same {model} with AdamW (lr 1e-3, 100 warm-up steps, cosine \
         decay), gradient clipping at 1, EMA 0.999, batch {b}, {st} steps and the same seed; nothing is tuned per \
         objective. Each is sampled through the same probability-flow ODE (its prediction converted to a velocity \
         on its path). {quality}{sup}. The adaptive solver is Dopri5 at rtol = atol = 1e-5, capped at {cap} steps.\n\n",
        model = res
            .model
            .clone()
            .unwrap_or_else(|| format!("MLP (3-{}x4-2, SiLU)", s.hidden)),
        b = s.batch,
        st = s.steps,
        quality = if images {
            format!(
                "Quality is FD: the Frechet distance of the evaluation classifier's features of {} samples to \
                 those of as many reference images (lower is better); the likelihood is in bits/dim of {} \
                 dequantized reference images (Hutchinson, one probe)",
                s.samples, s.nll_points
            )
        } else {
            format!(
                "Quality is the energy distance to {} fresh data points (lower is better; two data sets of \
                 that size give about 0)",
                s.samples
            )
        },
        sup = if checkerboard { ", and the share of samples inside the checkerboard's squares" } else { "" },
        cap = s.max_adaptive_steps,
    );
    let m = if images { "FD" } else { "ED" };
    md += "## Table 1 analogue\n\n";
    md += &format!(
        "| objective | final loss | adaptive NFE | {} (adaptive) |",
        res.metric
    );
    md += if checkerboard {
        " in support (adaptive) |"
    } else {
        ""
    };
    md += if images {
        " bits/dim |"
    } else {
        " NLL (nats) |"
    };
    for n in NFES {
        md += &format!(" {m} @ {n} NFE (midpoint) |");
    }
    md += "\n|---|---|---|---|";
    md += if checkerboard { "---|" } else { "" };
    md += "---|";
    md += &"---|".repeat(NFES.len());
    md += "\n";
    for x in r {
        md += &format!(
            "| {} | {:.4} | {} | {} |",
            x.name,
            x.final_loss,
            x.adaptive_nfe
                .map(|n| n.to_string())
                .unwrap_or("capped".into()),
            opt(x.adaptive_distance, 4)
        );
        if checkerboard {
            md += &format!(" {} |", opt(x.adaptive_in_support_fraction, 3));
        }
        md += &format!(
            " {} |",
            match (x.nll_bits_per_dim, x.nll_nats, x.nll_standard_error) {
                (Some(b), _, _) => format!("{b:.3}"),
                (None, Some(n), Some(se)) => format!("{n:.3} +- {se:.3}"),
                _ => "capped".into(),
            }
        );
        for f in x.fixed.iter().filter(|f| f.solver == SolverKind::Midpoint) {
            md += &format!(" {:.4} |", f.distance);
        }
        md += "\n";
    }
    if let (Some(floor), Some(ceiling)) = (res.fd_floor, res.fd_gaussian) {
        md += &format!(
            "\nFor scale: {} real training images score FD {floor:.4} (the floor at this sample size), as many \
             draws from a Gaussian with the training images' mean and covariance {ceiling:.4}.\n",
            s.samples
        );
    }
    md += &format!(
        "\nEuler at the same budgets ({}):\n\n| objective |",
        res.metric
    );
    for n in NFES {
        md += &format!(" {n} NFE |");
    }
    md += &format!("\n|---|{}\n", "---|".repeat(NFES.len()));
    for x in r {
        md += &format!("| {} |", x.name);
        for f in x.fixed.iter().filter(|f| f.solver == SolverKind::Euler) {
            md += &format!(" {:.4} |", f.distance);
        }
        md += "\n";
    }
    md += "\n## Figure 4 analogue: samples at 4, 8, 16, 32 NFE (midpoint) and adaptive\n\n";
    md += if images {
        "Rows, top to bottom: 4, 8, 16, 32 NFE with the midpoint solver, then Dopri5 at 1e-5 (absent where \
         capped); each column starts from the same noise.\n\n"
    } else {
        "Columns, left to right: 4, 8, 16, 32 NFE with the midpoint solver, then Dopri5 at 1e-5 (absent where capped).\n\n"
    };
    for x in r {
        md += &format!(
            "**{}**

![{}](samples-{}.png)

",
            x.name,
            x.name,
            file_name(x.objective)
        );
    }
    md += "## Figure 10 analogue: adaptive NFE during training\n\n![adaptive NFE during training](nfe-during-training.png)\n\n";
    md += "| objective |";
    let steps: Vec<u64> = r
        .first()
        .map(|x| x.nfe_during_training.iter().map(|p| p.0).collect())
        .unwrap_or_default();
    for st in &steps {
        md += &format!(" {st} |");
    }
    md += &format!("\n|---|{}\n", "---|".repeat(steps.len()));
    for x in r {
        md += &format!("| {} |", x.name);
        for (_, n) in &x.nfe_during_training {
            md += &format!(" {} |", n.map(|n| n.to_string()).unwrap_or("capped".into()));
        }
        md += "\n";
    }
    md += "\n## Figure 7 analogue: numerical error against NFE\n\nMean distance between fixed-step midpoint \
           samples and a Dopri5 solution at 1e-7 from the same noise.\n\n![error against NFE](error-vs-nfe.png)\n\n";
    if !images {
        md += "## Figures 2 and 3 analogue: conditional and marginal paths\n\n\
               | | OT path | diffusion (VP) path |\n|---|---|---|\n\
               | conditional paths x_t = sigma_t x0 + alpha_t x1 | ![](conditional-paths-ot.png) | ![](conditional-paths-vp.png) |\n\
               | marginal paths of the trained FM model | ![](marginal-paths-fm-ot.png) | ![](marginal-paths-fm-diffusion.png) |\n\n\
               Colour runs from noise (dark) to data (yellow).\n\n";
    }
    md += "![training loss](loss.png)\n\n";
    md += "## Which of the paper's orderings this run reproduces\n\n";
    md += &orderings(r, &res.metric);
    md
}

/// The paper's orderings (best quality, fewest adaptive NFE, cleanest at 4 NFE, flat NFE over training,
/// the score objectives behind DDPM and FM-diffusion), checked against this run's numbers.
fn orderings(r: &[ObjectiveResult], metric: &str) -> String {
    let get = |o: Objective| r.iter().find(|x| x.objective == o);
    let mut out = String::new();
    let ot = get(Objective::FmOt);
    // 0. best quality: at the adaptive NFE where every objective has it, else at 32 NFE (midpoint).
    let (basis, quality) = quality_basis(r);
    let best = r
        .iter()
        .filter_map(|x| quality(x).map(|q| (q, x.name.as_str())))
        .min_by(|a, b| a.0.total_cmp(&b.0));
    out += &match (best, ot.and_then(&quality)) {
        (Some((_, "FM-OT")), Some(o)) => {
            format!("- **Reproduced**: FM-OT has the best {metric} ({o:.4}, {basis}).\n")
        }
        (Some((q, name)), Some(o)) => format!(
            "- **Not reproduced**: {name} has the best {metric} ({q:.4}, {basis}), FM-OT {o:.4}.\n"
        ),
        _ => String::new(),
    };
    // 1. lowest adaptive NFE
    let best_nfe = r
        .iter()
        .filter_map(|x| x.adaptive_nfe.map(|n| (n, x.name.as_str())))
        .min();
    let ot_nfe = ot.and_then(|x| x.adaptive_nfe);
    out += &match (best_nfe, ot_nfe) {
        (Some((n, _)), Some(o)) if o == n => {
            format!("- **Reproduced**: FM-OT needs the fewest adaptive evaluations ({o} NFE).\n")
        }
        (Some((n, name)), Some(o)) => {
            format!("- **Not reproduced**: FM-OT needs {o} adaptive NFE, {name} only {n}.\n")
        }
        _ => "- Not decided: some adaptive solves hit the step cap.\n".into(),
    };
    // 2. cleanest at NFE 4
    let at4 = |x: &ObjectiveResult| {
        x.fixed
            .iter()
            .find(|f| f.solver == SolverKind::Midpoint && f.nfe == 4)
            .map(|f| f.distance)
    };
    let best4 = r
        .iter()
        .filter_map(|x| at4(x).map(|e| (e, x.name.as_str())))
        .min_by(|a, b| a.0.total_cmp(&b.0));
    out += &match (best4, ot.and_then(at4)) {
        (Some((_, "FM-OT")), Some(o)) => {
            format!("- **Reproduced**: FM-OT's samples are the cleanest at 4 NFE (midpoint, {metric} {o:.4}).\n")
        }
        (Some((e, name)), Some(o)) => format!("- **Not reproduced**: at 4 NFE {name} is cleaner ({metric} {e:.4}) than FM-OT ({o:.4}).\n"),
        _ => String::new(),
    };
    // 3. NFE flat over training for FM, drifting for score matching: relative range (max - min) / max of
    //    the adaptive NFE over all measurements during training; reproduced only when every FM curve's range
    //    is under half of every score-matching curve's range (a capped measurement counts as drift).
    let range = |x: &ObjectiveResult| -> Option<f64> {
        let v: Vec<usize> = x
            .nfe_during_training
            .iter()
            .map(|p| p.1)
            .collect::<Option<Vec<_>>>()?;
        let (lo, hi) = (*v.iter().min()? as f64, *v.iter().max()? as f64);
        Some((hi - lo) / hi)
    };
    let describe = |o: Objective| -> (String, Option<f64>) {
        match get(o) {
            Some(x) => match range(x) {
                Some(v) => (format!("{} {:.0}%", x.name, 100.0 * v), Some(v)),
                None => (format!("{} hit the step cap", x.name), None),
            },
            None => (String::new(), None),
        }
    };
    let fm: Vec<_> = [Objective::FmOt, Objective::FmDiffusion]
        .into_iter()
        .map(describe)
        .collect();
    let sm: Vec<_> = [Objective::ScoreMatching, Objective::ScoreFlow]
        .into_iter()
        .map(describe)
        .collect();
    let fm_max = fm
        .iter()
        .map(|x| x.1.unwrap_or(f64::INFINITY))
        .fold(0.0, f64::max);
    let sm_min = sm
        .iter()
        .map(|x| x.1.unwrap_or(f64::INFINITY))
        .fold(f64::INFINITY, f64::min);
    let names =
        |v: &[(String, Option<f64>)]| v.iter().map(|x| x.0.clone()).collect::<Vec<_>>().join(", ");
    out += &format!(
        "- {} that flow matching's adaptive NFE stays flat over training while score matching's drifts: the \
         relative range (max - min) / max of the NFE measured during training is {} for flow matching and {} for \
         the score objectives (reproduced only if every FM range is under half of every score range).\n",
        if fm_max < 0.5 * sm_min { "**Reproduced**:" } else { "**Not reproduced**: the claim" },
        names(&fm),
        names(&sm)
    );
    // 4. DDPM and FM-diffusion good, the score objectives worse (the paper's 7.48 and 8.06 FID against
    //    19.94 and 20.78, a ratio of 0.4): reproduced when the worse of DDPM and FM-diffusion is under
    //    3/4 of the better score objective, so that an ordering within noise does not count.
    let of = |objs: [Objective; 2]| -> Option<Vec<(String, f64)>> {
        objs.iter()
            .map(|&o| get(o).and_then(|x| quality(x).map(|q| (x.name.clone(), q))))
            .collect()
    };
    if let (Some(stable), Some(score)) = (
        of([Objective::Ddpm, Objective::FmDiffusion]),
        of([Objective::ScoreMatching, Objective::ScoreFlow]),
    ) {
        let worst_stable = stable.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
        let best_score = score.iter().map(|x| x.1).fold(f64::INFINITY, f64::min);
        let list = |v: &[(String, f64)]| {
            v.iter()
                .map(|(n, q)| format!("{n} {q:.4}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out += &format!(
            "- {} that DDPM and FM on the diffusion path train well while the score objectives degrade: \
             {metric} ({basis}) {} against {} (reproduced only if the worse of the first two is under 3/4 \
             of the better of the last two).\n",
            if worst_stable < 0.75 * best_score { "**Reproduced**:" } else { "**Not reproduced**: the claim" },
            list(&stable),
            list(&score)
        );
    }
    out
}

/// The quality every objective is compared on: the adaptive solve's distance where no objective's
/// solve hit the cap, else the midpoint solver's at 32 NFE (with the basis in words).
fn quality_basis(
    r: &[ObjectiveResult],
) -> (&'static str, impl Fn(&ObjectiveResult) -> Option<f64>) {
    let adaptive = r.iter().all(|x| x.adaptive_distance.is_some());
    let basis = match adaptive {
        true => "at the adaptive NFE",
        false => "at 32 NFE with the midpoint solver, as some adaptive solves hit the step cap",
    };
    let quality = move |x: &ObjectiveResult| match adaptive {
        true => x.adaptive_distance,
        false => x
            .fixed
            .iter()
            .find(|f| f.solver == SolverKind::Midpoint && f.nfe == 32)
            .map(|f| f.distance),
    };
    (basis, quality)
}
