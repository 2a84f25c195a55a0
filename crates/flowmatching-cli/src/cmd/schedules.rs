//! `flowmatching schedules`: time sampling in training, sampling grids and the guidance interval
//! compared (the experiment is [`flowmatching::experiments::schedules`]); shows progress, keeps each
//! finished variant (checkpoint and results) so that an interrupted run continues with `--resume`,
//! and writes report.md, results.json and PNGs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use flowmatching::experiments::ablation::{self, energy_distance_name, Evaluator};
use flowmatching::experiments::schedules::{
    self, GuidanceSetup, Observer, Results, Schedules, Sizes, Variant,
};
use flowmatching::train::Trainer;

use crate::ablation_out::claim_folder;
use crate::cli::SchedulesArgs;
use crate::report::ablation::picture;
use crate::report::schedules::{figures, write_report};
use crate::{io, memory, progress, studies};

/// Progress bars; per finished variant a checkpoint, `results/NAME.json` and a sample picture.
struct Reporter<'a> {
    out: &'a Path,
    image: Option<[usize; 3]>,
    window: (f32, f32),
    bars: progress::RunBars,
    /// Wall seconds earlier runs spent on the variants this one takes over.
    carried: f64,
}

impl Reporter<'_> {
    fn result_file(&self, name: &str) -> PathBuf {
        self.out.join("results").join(format!("{name}.json"))
    }
}

fn lib_error(e: anyhow::Error) -> flowmatching::Error {
    flowmatching::Error::Data(format!("{e:#}"))
}

impl Observer for Reporter<'_> {
    fn finished_before(&mut self, name: &str) -> flowmatching::Result<Option<Variant>> {
        let path = self.result_file(name);
        if !path.exists() {
            return Ok(None);
        }
        let v: Variant = io::read_json(&path).map_err(lib_error)?;
        eprintln!("schedules: {name} already measured ({})", path.display());
        self.carried += v.seconds;
        Ok(Some(v))
    }

    fn started(&mut self, name: &str, steps: u64) {
        eprintln!("schedules: training {name} ({steps} steps)");
        self.bars.start(0, steps);
    }

    fn step(&mut self, step: u64, loss: f64) {
        self.bars.step(step, loss);
    }

    fn measuring(&mut self, name: &str) {
        self.bars.finish();
        eprintln!("schedules: measuring {name}");
    }

    fn finished(
        &mut self,
        trainer: &Trainer,
        v: &Variant,
        sets: &[(String, Vec<f32>)],
    ) -> flowmatching::Result<()> {
        let row: Vec<Vec<f32>> = sets.iter().map(|(_, x)| x.clone()).collect();
        let png = self.out.join(format!("samples-{}.png", v.name));
        picture(&png, &row, self.image, self.window).map_err(lib_error)?;
        let dir = self.out.join("checkpoints").join(&v.name);
        flowmatching::checkpoint::save(trainer, &dir, Some(v.final_loss))?;
        let path = self.result_file(&v.name);
        io::ensure_dir(path.parent().expect("results/NAME.json has a parent"))
            .map_err(lib_error)?;
        io::write_json(&path, v).map_err(lib_error)?;
        eprintln!("schedules: {} done in {:.0} s", v.name, v.seconds);
        Ok(())
    }
}

/// What must be the same for `--resume` to continue a study: stored as run.json in --out.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct RunKey {
    data: String,
    seed: u64,
    sizes: Sizes,
    guidance: Option<GuidanceSetup>,
}

/// The sizes of the preset with the command line's overrides.
fn sizes(a: &SchedulesArgs, image: bool) -> Result<Sizes> {
    let mut s = Sizes::preset(a.quick, image);
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
        s.samples = n;
        s.eval_batch = s.eval_batch.min(n);
    }
    Ok(s)
}

/// The command that reproduces this run.
fn command(a: &SchedulesArgs) -> String {
    let mut c = format!(
        "flowmatching schedules --data {} --out {}",
        a.data,
        a.out.display()
    );
    if let Some(p) = &a.classifier {
        c += &format!(" --classifier {}", p.display());
    }
    let flags = [
        ("--quick", a.quick.then(String::new)),
        ("--steps", a.steps.map(|v| v.to_string())),
        ("--num-samples", a.num_samples.map(|v| v.to_string())),
        ("--no-guidance", a.no_guidance.then(String::new)),
        (
            "--guidance",
            (a.guidance != 3.0).then(|| a.guidance.to_string()),
        ),
        ("--seed", (a.seed != 0).then(|| a.seed.to_string())),
    ];
    for (flag, v) in flags {
        match v {
            Some(v) if v.is_empty() => c += &format!(" {flag}"),
            Some(v) => c += &format!(" {flag} {v}"),
            None => {}
        }
    }
    c
}

pub fn run(a: &SchedulesArgs) -> Result<()> {
    if a.report_only {
        let r: Results = io::read_json(&a.out.join("results.json")).map_err(|e| {
            anyhow::anyhow!("--report-only needs a schedules study's results.json in --out ({e:#})")
        })?;
        return write_report(&a.out, &r);
    }
    let data_opts = a.images.options();
    let (data, device) = studies::open("schedules", &a.data, &data_opts, &a.device)?;
    let image = data.image_shape();
    let s = sizes(a, image.is_some())?;
    let guidance =
        (image.is_some() && data.num_classes() > 0 && !a.no_guidance).then(|| GuidanceSetup {
            w: a.guidance,
            ..Default::default()
        });
    let model = ablation::network(s.hidden, image);
    model.validate()?;
    let probe = studies::probe(&model, s.batch, &a.data);
    let eval_batch = if s.eval_batch == 0 {
        s.samples
    } else {
        s.eval_batch
    };
    let cpu = device.is_cpu();
    let need = memory::training_bytes(&probe, cpu).saturating_add(memory::sampling_bytes(
        &model, s.samples, eval_batch, 7, 2, cpu,
    ));
    memory::check(need, "the schedules study", "lower --num-samples")?;
    let quality = studies::quality(
        &a.data,
        a.classifier.as_deref(),
        &data_opts,
        data.as_ref(),
        s.samples,
        a.seed,
        &device,
    )?;
    let window = studies::window(&quality);
    let study = Schedules {
        data: data.as_ref(),
        data_name: a.data.clone(),
        sizes: s,
        seed: a.seed,
        eval: Evaluator {
            device: device.clone(),
            max_steps: ablation::MAX_STEPS,
            batch: s.eval_batch,
            quality,
        },
        image,
        guidance,
    };
    study.validate()?;
    let (fd_floor, fd_gaussian) =
        studies::fd_bounds(&study.eval, data.as_ref(), s.samples, a.seed)?;
    let noise = schedules::distance_noise(
        |x| study.eval.distance(x),
        data.as_ref(),
        s.samples,
        a.seed,
        5,
    )?;
    let key = RunKey {
        data: a.data.clone(),
        seed: a.seed,
        sizes: s,
        guidance,
    };
    let describe = |k: &RunKey| {
        format!(
            "data {}, seed {}, {} steps at batch {}",
            k.data, k.seed, k.sizes.steps, k.sizes.batch
        )
    };
    claim_folder(&a.out, a.resume, &key, "a schedules study", describe)?;
    eprintln!(
        "schedules: saving each finished variant in {}; an interrupted run continues with --resume",
        a.out.display()
    );
    let started = Instant::now();
    let mut reporter = Reporter {
        out: &a.out,
        image,
        window,
        bars: Default::default(),
        carried: 0.0,
    };
    let variants = study.run(&mut reporter)?;
    let r = Results {
        command: command(a),
        data: a.data.clone(),
        metric: match image {
            None => energy_distance_name(),
            Some(_) => "FD".into(),
        },
        model: ablation::describe(&model),
        sizes: s,
        seed: a.seed,
        guidance,
        fd_floor,
        fd_gaussian,
        noise: Some(noise),
        variants,
        seconds: started.elapsed().as_secs_f64() + reporter.carried,
    };
    figures(&a.out, &r)?;
    io::write_json(&a.out.join("results.json"), &r)?;
    write_report(&a.out, &r)?;
    eprintln!("wrote {}/report.md ({:.0} s)", a.out.display(), r.seconds);
    Ok(())
}
