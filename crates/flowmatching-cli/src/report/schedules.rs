//! The schedules study's report: report.md (every cell, and which option wins where, computed from
//! the numbers) and its PNG figures.

use std::path::Path;

use anyhow::Result;
use flowmatching::checkpoint::write_atomic;
use flowmatching::experiments::ablation::NFES;
use flowmatching::experiments::schedules::{
    best_grid, best_training, Results, Variant, Winner, GRIDS, GUIDED_NFES, SOLVERS,
};
use flowmatching::solver::SolverKind;

use crate::plot::{self, Series};

/// Writes report.md from `r`.
pub fn write_report(out: &Path, r: &Results) -> Result<()> {
    write_atomic(&out.join("report.md"), report(r).as_bytes())?;
    Ok(())
}

fn solver_name(kind: SolverKind) -> &'static str {
    match kind {
        SolverKind::Euler => "Euler",
        _ => "midpoint",
    }
}

fn unconditional(r: &Results) -> impl Iterator<Item = &Variant> {
    r.variants.iter().filter(|v| !v.conditional)
}

/// The header of a table with one column per solver x NFE.
fn cell_header(first: &str) -> String {
    let mut head = format!("| {first} |");
    let mut rule = "|---|".to_string();
    for kind in SOLVERS {
        for nfe in NFES {
            head += &format!(" {} {nfe} |", solver_name(kind));
            rule += "---|";
        }
    }
    format!("{head}\n{rule}\n")
}

fn cell_row(label: &str, v: &Variant, grid: &str) -> String {
    let mut row = format!("| {label} |");
    for kind in SOLVERS {
        for nfe in NFES {
            match v.distance(grid, kind, nfe) {
                Some(d) => row += &format!(" {} |", number(d)),
                None => row += " - |",
            }
        }
    }
    row + "\n"
}

/// Four significant digits.
fn number(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let digits = (3 - v.abs().log10().floor() as i32).max(0) as usize;
    format!("{v:.digits$}")
}

/// "**uniform** in 6 of 8 columns (midpoint 4, 8; Euler 4, ...)" for each option that wins a
/// column, then the columns whose runners-up lie within the noise margin.
fn wins(winners: &[Winner]) -> String {
    let mut names: Vec<&str> = winners.iter().map(|w| w.best.as_str()).collect();
    names.sort();
    names.dedup();
    let columns = |pick: &dyn Fn(&Winner) -> bool| -> String {
        SOLVERS
            .iter()
            .filter_map(|&kind| {
                let n: Vec<String> = winners
                    .iter()
                    .filter(|w| w.solver == kind && pick(w))
                    .map(|w| w.nfe.to_string())
                    .collect();
                (!n.is_empty()).then(|| format!("{} {}", solver_name(kind), n.join(", ")))
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let mut parts = vec![];
    for name in names {
        let count = winners.iter().filter(|w| w.best == name).count();
        parts.push(format!(
            "**{name}** in {count} of {} columns ({})",
            winners.len(),
            columns(&|w: &Winner| w.best == name)
        ));
    }
    let mut out = parts.join(", ");
    let unresolved: Vec<String> = winners
        .iter()
        .filter(|w| !w.within_margin.is_empty())
        .map(|w| {
            format!(
                "{} {} ({} within noise of {})",
                solver_name(w.solver),
                w.nfe,
                w.within_margin.join(", "),
                w.best
            )
        })
        .collect();
    match unresolved.len() {
        0 => out += "; every column is resolved beyond twice the noise",
        n => {
            out += &format!(
                "; {n} of these columns are not resolved beyond twice the noise: {}",
                unresolved.join("; ")
            )
        }
    }
    out
}

pub fn report(r: &Results) -> String {
    let metric = &r.metric;
    let s = &r.sizes;
    let mut md = format!(
        "# Schedules on `{}`: time sampling, sampling grids, guidance interval\n\n\
         Made by `{}` in {:.0} s (seed {}).\n\n\
         Every variant trains the same {} with FM on the OT path (sigma_min 0), AdamW (lr 1e-3, 100 \
         warm-up steps, cosine decay), clipping at 1, EMA 0.999, batch {}, {} steps and the same seed; \
         only the distribution of the training times t differs: uniform, logit-normal (m = 0, s = 1) \
         and mode sampling (s = 1.29), Stable Diffusion 3's choices written for t = 0 at noise. Each \
         model is sampled from the same {} noise draws with midpoint and Euler at NFE 4, 8, 16 and 32 \
         on three grids: uniform steps, the SD3 / Flux shift (s = 3: more steps near the noise) and \
         EDM's grid (rho = 7: small steps at both ends). Quality is the {metric} to {} (lower is \
         better).\n\n",
        r.data,
        r.command,
        r.seconds,
        r.seed,
        r.model,
        s.batch,
        s.steps,
        s.samples,
        match metric.as_str() {
            "FD" => "evaluation classifier's features of as many reference images",
            _ => "as many fresh data points",
        },
    );
    if let (Some(floor), Some(ceiling)) = (r.fd_floor, r.fd_gaussian) {
        md += &format!(
            "FD of real training images (the floor at this sample size): {}; of a Gaussian fitted to \
             their pixels: {}.\n\n",
            number(floor),
            number(ceiling)
        );
    }
    md += "## Training-time distribution (uniform grid)\n\n";
    md += &cell_header("training t ~");
    for v in unconditional(r) {
        md += &cell_row(&v.name, v, "uniform");
    }
    md += "\n| training t ~ | final loss | train s |\n|---|---|---|\n";
    for v in unconditional(r) {
        md += &format!(
            "| {} | {:.4} | {:.0} |\n",
            v.name, v.final_loss, v.train_seconds
        );
    }
    md += "\n## Sampling grid (every trained model)\n\n";
    md += &cell_header("training / grid");
    for v in unconditional(r) {
        for (grid, _) in GRIDS {
            md += &cell_row(&format!("{} / {grid}", v.name), v, grid);
        }
    }
    md += &guidance_section(r);
    md += "\n## Which option wins where\n\n";
    // Options closer than twice the distance's own spread are not told apart.
    let margin = r.noise.map_or(0.0, |n| 2.0 * n);
    if let Some(n) = r.noise {
        md += &format!(
            "The {metric} of real data varies by {} (standard deviation over independent draws of \
             {} points): differences below {} are within noise.\n\n",
            number(n),
            s.samples,
            number(margin)
        );
    }
    let trainings = best_training(&r.variants, margin);
    let grids = best_grid(&r.variants, margin);
    md += &format!(
        "- Training-time distribution (uniform grid), lowest {metric} per column: {}.\n",
        wins(&trainings)
    );
    md += &format!(
        "- Sampling grid for the uniformly trained model, lowest {metric} per column: {}.\n",
        wins(&grids)
    );
    md += &best_pairs(r);
    if r.metric != "FD" {
        md += "\nEnergy distances are U-statistics: values at or below 0 mean \"indistinguishable from \
               the data at this sample size\" (the plots draw them at 1e-5).\n";
    }
    md += &guidance_verdict(r, margin);
    md += &format!(
        "\nFigures: [training-time distributions](trainings.png), [grids](grids.png){}; samples \
         (midpoint NFE 8 on the uniform, shift and EDM grids; for the conditional model one image \
         per class, conditional, guided and interval rows): {}.\n",
        if r.guidance.is_some() {
            ", [guidance](guidance.png)"
        } else {
            ""
        },
        r.variants
            .iter()
            .map(|v| format!("[{}](samples-{}.png)", v.name, v.name))
            .collect::<Vec<_>>()
            .join(", ")
    );
    md
}

/// The best (training, grid) pair per column over every model and grid.
fn best_pairs(r: &Results) -> String {
    let mut parts = vec![];
    for kind in SOLVERS {
        for nfe in NFES {
            let best = unconditional(r)
                .flat_map(|v| {
                    GRIDS.iter().filter_map(move |(g, _)| {
                        v.distance(g, kind, nfe)
                            .map(|d| (format!("{} / {g}", v.name), d))
                    })
                })
                .filter(|(_, d)| d.is_finite())
                .min_by(|a, b| a.1.total_cmp(&b.1));
            if let Some((name, d)) = best {
                parts.push(format!(
                    "{} {nfe}: {name} ({})",
                    solver_name(kind),
                    number(d)
                ));
            }
        }
    }
    format!(
        "- Best training / grid pair per column: {}.\n",
        parts.join("; ")
    )
}

fn guidance_section(r: &Results) -> String {
    let (Some(g), Some(v)) = (r.guidance, r.variants.iter().find(|v| v.conditional)) else {
        return String::new();
    };
    let mut md = format!(
        "\n## Guidance interval (class-conditional model, label dropout {})\n\n\
         The same network made class-conditional and trained alike (uniform t). Samples in equal \
         blocks of the classes, midpoint on the uniform grid, from the same noise; at each NFE budget \
         every mode takes the most steps the budget allows: **conditional** (w = 1, 1 NFE per call), \
         **guided** (w = {} at every t, 2 NFE per call) and **interval** (w = {} for t in [{}, {}], \
         w = 1 elsewhere: Kynkaanniemi et al. 2024's noise levels sigma in (0.28, 5.42] as sigma = \
         (1 - t) / t). Accuracy: the share of samples the evaluation classifier assigns to the class \
         they were drawn for.\n\n\
         | mode | NFE budget | steps | NFE | FD | accuracy |\n|---|---|---|---|---|---|\n",
        g.label_dropout, g.w, g.w, g.interval.0, g.interval.1
    );
    for c in &v.guided {
        md += &format!(
            "| {} | {} | {} | {} | {} | {:.3} |\n",
            c.mode,
            c.budget,
            c.steps,
            c.nfe,
            number(c.fd),
            c.accuracy
        );
    }
    md
}

fn guidance_verdict(r: &Results, margin: f64) -> String {
    let Some(v) = r.variants.iter().find(|v| v.conditional) else {
        return String::new();
    };
    let mut md = String::new();
    for budget in GUIDED_NFES {
        let at = |mode: &str| {
            v.guided
                .iter()
                .find(|c| c.mode == mode && c.budget == budget)
        };
        let (Some(i), Some(g), Some(c)) = (at("interval"), at("guided"), at("conditional")) else {
            continue;
        };
        let cmp = |a: f64, b: f64, lower: &str, higher: &str| {
            if a < b {
                lower.to_string()
            } else {
                higher.to_string()
            }
        };
        let fd_verdict = if (i.fd - g.fd).abs() < margin {
            "within noise".to_string()
        } else {
            cmp(i.fd, g.fd, "interval better", "interval worse")
        };
        md += &format!(
            "- Guidance at NFE {budget}: the interval's FD {} vs guidance everywhere {} ({}), accuracy \
             {:.3} vs {:.3} ({}); plain conditional FD {} at accuracy {:.3}.\n",
            number(i.fd),
            number(g.fd),
            fd_verdict,
            i.accuracy,
            g.accuracy,
            cmp(i.accuracy, g.accuracy, "lower", "not lower"),
            number(c.fd),
            c.accuracy
        );
    }
    md
}

/// trainings.png (distance against NFE per training distribution, uniform grid), grids.png (per grid,
/// the uniformly trained model) and guidance.png (FD against NFE per guidance mode).
pub fn figures(out: &Path, r: &Results) -> Result<()> {
    let curve = |v: &Variant, grid: &str, kind: SolverKind| -> Vec<(f64, f64)> {
        NFES.iter()
            .filter_map(|&n| v.distance(grid, kind, n).map(|d| (n as f64, d.max(1e-5))))
            .collect()
    };
    let mut series = vec![];
    for kind in SOLVERS {
        for v in unconditional(r) {
            series.push(Series {
                label: format!("{} ({})", v.name, solver_name(kind)),
                points: curve(v, "uniform", kind),
            });
        }
    }
    let y = &r.metric;
    let title = format!("{y} against NFE by training-time distribution (uniform grid)");
    let png = plot::line_plot(&title, "NFE", y, &series, true, true)?;
    write_atomic(&out.join("trainings.png"), &png)?;
    let mut series = vec![];
    if let Some(v) = r.variants.iter().find(|v| v.name == "uniform") {
        for kind in SOLVERS {
            for (g, _) in GRIDS {
                series.push(Series {
                    label: format!("{g} ({})", solver_name(kind)),
                    points: curve(v, g, kind),
                });
            }
        }
    }
    let title = format!("{y} against NFE by sampling grid (uniform training)");
    let png = plot::line_plot(&title, "NFE", y, &series, true, true)?;
    write_atomic(&out.join("grids.png"), &png)?;
    if let Some(v) = r.variants.iter().find(|v| v.conditional) {
        let series: Vec<Series> = ["conditional", "guided", "interval"]
            .iter()
            .map(|m| Series {
                label: m.to_string(),
                points: v
                    .guided
                    .iter()
                    .filter(|c| c.mode == *m)
                    .map(|c| (c.nfe as f64, c.fd))
                    .collect(),
            })
            .collect();
        let png = plot::line_plot(
            "FD against NFE by guidance mode",
            "NFE",
            "FD",
            &series,
            true,
            true,
        )?;
        write_atomic(&out.join("guidance.png"), &png)?;
    }
    Ok(())
}
