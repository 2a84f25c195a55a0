//! `flowmatching ablate`: the flow-matching paper's five-way ablation as one command (the experiment is
//! [`flowmatching::experiments::ablation`]; this module opens the data, shows progress, keeps a
//! checkpoint per objective and writes the report).

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use flowmatching::experiments::ablation::{
    self, energy_distance_name, Ablation, Evaluator, Quality, Results, Sizes,
};
use flowmatching::objective::Objective;
use flowmatching::rng::Rng;

use crate::ablation_out::{claim_out, Reporter, RunKey};
use crate::cli::{AblateArgs, Preset};

use crate::report::ablation::{figures, file_name, paths, write_report};
use crate::{io, memory, studies};

/// The preset's sizes with the command line's overrides.
fn sizes(a: &AblateArgs, image: bool) -> Result<Sizes> {
    let preset = match a.preset {
        Preset::Quick => ablation::Preset::Quick,
        Preset::Default => ablation::Preset::Default,
        Preset::Cpu => ablation::Preset::Cpu,
    };
    let mut s = Sizes::preset(preset, image);
    if let Some(steps) = a.steps {
        if steps == 0 {
            bail!("--steps must be at least 1");
        }
        s.steps = steps;
    }
    if let Some(n) = a.num_samples {
        if n < 2 {
            bail!("--num-samples must be at least 2");
        }
        s.cap_samples(n);
    }
    if let Some(b) = a.base_channels {
        if !image {
            bail!(
                "--base-channels sets the U-Net of an image ablation; {} is 2-D data",
                a.data
            );
        }
        s.hidden = b;
    }
    if let Some(m) = a.max_adaptive_steps {
        if m == 0 {
            bail!("--max-adaptive-steps must be at least 1");
        }
        s.max_adaptive_steps = m;
    }
    Ok(s)
}

/// The command that reproduces this run.
fn command(a: &AblateArgs, cpu: bool) -> String {
    let preset = match a.preset {
        Preset::Quick => "quick",
        Preset::Default => "default",
        Preset::Cpu => "cpu",
    };
    let mut command = format!(
        "flowmatching ablate --data {} --out {} --preset {preset}",
        a.data,
        a.out.display(),
    );
    let flags = [
        ("--steps", a.steps.map(|v| v.to_string())),
        ("--num-samples", a.num_samples.map(|v| v.to_string())),
        ("--base-channels", a.base_channels.map(|v| v.to_string())),
        (
            "--max-adaptive-steps",
            a.max_adaptive_steps.map(|v| v.to_string()),
        ),
        ("--seed", (a.seed != 0).then(|| a.seed.to_string())),
        ("--device", (!cpu).then(|| "cuda".to_string())),
    ];
    for (flag, v) in flags {
        if let Some(v) = v {
            command += &format!(" {flag} {v}");
        }
    }
    command
}

/// `--report-only`: report.md again from the results.json in --out.
fn report_only(out: &Path) -> Result<()> {
    let path = out.join("results.json");
    let text = std::fs::read(&path)
        .map_err(|e| anyhow::anyhow!("--report-only: cannot read {} ({e})", path.display()))?;
    let r: Results = serde_json::from_slice(&text).map_err(|e| {
        anyhow::anyhow!(
            "--report-only: {} is not an ablation's results.json ({e})",
            path.display()
        )
    })?;
    write_report(out, &r)
}

pub fn run(a: &AblateArgs) -> Result<()> {
    if a.report_only {
        return report_only(&a.out);
    }
    let data_opts = a.images.options();
    let (data, device) = studies::open("ablate", &a.data, &data_opts, &a.device)?;
    let image = data.image_shape();
    let s = sizes(a, image.is_some())?;
    let model_config = ablation::network(s.hidden, image);
    model_config.validate()?;
    let probe = studies::probe(&model_config, s.batch, &a.data);
    let n = s
        .samples
        .max(s.nfe_samples)
        .max(s.nll_points)
        .max(s.error_points);
    let eval_batch = if s.eval_batch == 0 { n } else { s.eval_batch };
    let cpu = device.is_cpu();
    let need = memory::training_bytes(&probe, cpu).saturating_add(memory::sampling_bytes(
        &model_config,
        n,
        eval_batch,
        7,
        1,
        cpu,
    ));
    memory::check(
        need,
        "the ablation",
        "lower --num-samples or --base-channels, or choose a smaller --preset",
    )?;
    let quality = studies::quality(
        &a.data,
        a.classifier.as_deref(),
        &data_opts,
        data.as_ref(),
        s.samples,
        a.seed,
        &device,
    )?;
    // Held-out points for the likelihood: fresh 2-D draws, or dequantized reference images.
    let held_out = match image {
        None => data.sample(&mut Rng::new(a.seed).fork(301), s.nll_points),
        Some(_) => {
            let set = studies::reference_set(&a.data);
            io::dequantized_images(&set, &data_opts, Some(s.nll_points), a.seed)?.0
        }
    };
    let window = studies::window(&quality);
    let experiment = Ablation {
        data: data.as_ref(),
        data_name: a.data.clone(),
        sizes: s,
        seed: a.seed,
        eval: Evaluator {
            device: device.clone(),
            max_steps: s.max_adaptive_steps,
            batch: s.eval_batch,
            quality,
        },
        held_out,
        image,
    };
    let (fd_floor, fd_gaussian) =
        studies::fd_bounds(&experiment.eval, data.as_ref(), s.samples, a.seed)?;
    claim_out(
        &a.out,
        a.resume,
        &RunKey {
            data: a.data.clone(),
            seed: a.seed,
            sizes: s,
            model: model_config.clone(),
        },
    )?;
    eprintln!(
        "ablate: saving progress in {}; an interrupted run continues with --resume",
        a.out.display()
    );
    let started = Instant::now();
    let mut reporter = Reporter {
        out: &a.out,
        image,
        window,
        device: device.clone(),
        bars: Default::default(),
        carried: 0.0,
    };
    let results = experiment.run(&mut reporter)?;
    if let Quality::Energy { reference, .. } = &experiment.eval.quality {
        path_figures(&a.out, reference, a.seed)?;
    }
    figures(&a.out, &results)?;
    let r = Results {
        command: command(a, device.is_cpu()),
        data: a.data.clone(),
        metric: match image {
            None => energy_distance_name(),
            Some(_) => "FD".into(),
        },
        model: Some(ablation::describe(&model_config)),
        seed: a.seed,
        seconds: started.elapsed().as_secs_f64() + reporter.carried,
        sizes: s,
        fd_floor,
        fd_gaussian,
        results,
    };
    io::write_json(&a.out.join("results.json"), &r)?;
    write_report(&a.out, &r)?;
    eprintln!("wrote {}/report.md ({:.0} s)", a.out.display(), r.seconds);
    Ok(())
}

/// The 2-D path figures (Figures 2 and 3): conditional paths of 150 (noise, data) pairs on both paths,
/// and the marginal paths of the two FM models from their checkpoints.
fn path_figures(out: &Path, reference: &[f32], seed: u64) -> Result<()> {
    let n = 150;
    let times: Vec<f64> = (0..=50).map(|i| i as f64 / 50.0).collect();
    for (name, frames) in ablation::conditional_paths(&reference[..2 * n], seed, &times)? {
        paths(&out.join(format!("conditional-paths-{name}.png")), &frames)?;
    }
    for obj in [Objective::FmOt, Objective::FmDiffusion] {
        let dir = out.join("checkpoints").join(file_name(obj));
        let ck = flowmatching::checkpoint::Checkpoint::load(&dir, &candle_core::Device::Cpu)?;
        let model = ck.model(&candle_core::Device::Cpu, true)?;
        let frames = ablation::marginal_paths(&model, &ck.meta.config, n, seed + 3, &times)?;
        paths(
            &out.join(format!("marginal-paths-{}.png", file_name(obj))),
            &frames,
        )?;
    }
    Ok(())
}
