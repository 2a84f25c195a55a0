//! `flowmatching train`.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use flowmatching::checkpoint::{self, Checkpoint};
use flowmatching::data::DataSource;
use flowmatching::model::{Activation, MlpConfig, ModelConfig, TimeEmbedding, UNetConfig};
use flowmatching::objective::Weighting;
use flowmatching::optim::{AdamWConfig, LrDecay};
use flowmatching::path::Prediction;
use flowmatching::scheduler::SchedulerConfig;
use flowmatching::train::{RunConfig, TrainConfig, Trainer, FORMAT_VERSION};

use crate::cli::{ActivationArg, LrDecayArg, ModelArg, PathArg, TimeArg, TrainArgs, UNetPreset};
use crate::io;
use crate::progress;

/// How a training loop ended.
pub struct Outcome {
    pub last_loss: f64,
    pub seconds: f64,
    pub interrupted: bool,
}

/// Runs the trainer to its configured total, with a progress bar and periodic checkpoints in `out`.
/// On Ctrl-C it saves a checkpoint and returns with `interrupted` set.
pub fn run_loop(
    trainer: &mut Trainer,
    data: &dyn DataSource,
    source: Option<&dyn DataSource>,
    out: &Path,
    every: u64,
    max_minutes: Option<f64>,
) -> Result<Outcome> {
    let total = trainer.config().train.steps;
    let bar = progress::training_bar(total, trainer.step_count());
    let stop = progress::interrupt_flag();
    let start = Instant::now();
    let mut loss = f64::NAN;
    let mut smoothed = None::<f64>;
    while trainer.step_count() < total {
        loss = match trainer.step_from(data, source) {
            Ok(l) => l,
            Err(e) => {
                bar.abandon();
                bail!("{e}\nthe last good checkpoint is in {}", out.display());
            }
        };
        let s = smoothed.map_or(loss, |s| 0.98 * s + 0.02 * loss);
        smoothed = Some(s);
        let step = trainer.step_count();
        bar.set_position(step);
        if step.is_multiple_of(20) || step == total {
            bar.set_message(format!("{s:.4}"));
        }
        if every > 0 && step.is_multiple_of(every) && step < total {
            checkpoint::save(trainer, out, Some(loss))?;
        }
        let out_of_time = max_minutes.is_some_and(|m| start.elapsed().as_secs_f64() > 60.0 * m);
        if stop.load(Ordering::SeqCst) || out_of_time {
            bar.abandon();
            checkpoint::save(trainer, out, Some(loss))?;
            eprintln!(
                "{} at step {step}; checkpoint saved in {}. Resume with the same command plus --resume.",
                if out_of_time { "time limit reached" } else { "interrupted" },
                out.display()
            );
            return Ok(Outcome {
                last_loss: loss,
                seconds: start.elapsed().as_secs_f64(),
                interrupted: true,
            });
        }
    }
    bar.finish();
    let seconds = start.elapsed().as_secs_f64();
    checkpoint::save(trainer, out, Some(loss))?;
    Ok(Outcome {
        last_loss: loss,
        seconds,
        interrupted: false,
    })
}

/// The network the command line asks for, for data of this shape.
fn model_from_args(a: &TrainArgs, data: &dyn DataSource) -> Result<ModelConfig> {
    let dim = data.dim();
    let unet = match (a.model, data.image_shape()) {
        (ModelArg::Mlp, _) | (ModelArg::Auto, None) => false,
        (ModelArg::Unet, None) => bail!(
            "--model unet needs image data; {} holds {dim}-dimensional points",
            data.describe()
        ),
        (ModelArg::Unet, Some(_)) | (ModelArg::Auto, Some(_)) => true,
    };
    if !unet {
        let time_embedding = match a.time_embedding {
            TimeArg::Input => TimeEmbedding::Input,
            TimeArg::Sinusoidal => TimeEmbedding::Sinusoidal { dim: 32 },
        };
        let activation = match a.activation {
            ActivationArg::Silu => Activation::Silu,
            ActivationArg::Selu => Activation::Selu,
        };
        return Ok(ModelConfig::Mlp(MlpConfig {
            dim,
            hidden: a.hidden,
            depth: a.depth,
            time_embedding,
            activation,
        }));
    }
    let [c, h, w] = data.image_shape().expect("checked above");
    let classes = if a.unconditional {
        0
    } else {
        data.num_classes()
    };
    let mut cfg = match a.unet {
        UNetPreset::Tiny => UNetConfig::tiny(c, h, w, classes),
        UNetPreset::Small => UNetConfig::small(c, h, w, classes),
    };
    if let Some(b) = a.base_channels {
        cfg.base_channels = b;
    }
    cfg.validate()?;
    Ok(ModelConfig::UNet(cfg))
}

/// The run configuration described by the command line.
pub fn config_from_args(a: &TrainArgs, data: &dyn DataSource) -> Result<RunConfig> {
    let path = match a.path {
        PathArg::Ot => SchedulerConfig::CondOt {
            sigma_min: a.sigma_min,
        },
        PathArg::Vp => SchedulerConfig::Vp {
            beta_min: 0.1,
            beta_max: 20.0,
        },
        PathArg::Cosine => SchedulerConfig::Cosine,
        PathArg::Poly => SchedulerConfig::Polynomial { n: 2.0 },
    };
    if a.grad_clip < 0.0 || !a.grad_clip.is_finite() {
        bail!(
            "--grad-clip must be 0 (off) or positive, got {}",
            a.grad_clip
        );
    }
    Ok(RunConfig {
        format_version: FORMAT_VERSION,
        model: model_from_args(a, data)?,
        path,
        prediction: Prediction::Velocity,
        weighting: Weighting::Uniform,
        train: TrainConfig {
            steps: a.steps,
            batch_size: a.batch_size,
            optimizer: AdamWConfig {
                lr: a.lr,
                weight_decay: a.weight_decay,
                ..Default::default()
            },
            warmup_steps: a.warmup,
            lr_decay: match a.lr_decay {
                LrDecayArg::Constant => LrDecay::Constant,
                LrDecayArg::Cosine => LrDecay::Cosine,
            },
            grad_clip: (a.grad_clip > 0.0).then_some(a.grad_clip),
            ema_decay: a.ema_decay,
            seed: a.seed,
            label_dropout: a.label_dropout,
            coupling: a.coupling.coupling(a.sinkhorn_reg),
        },
        data: a.data.clone(),
        source: a.source.clone(),
    })
}

pub fn run(a: &TrainArgs) -> Result<()> {
    let data = io::open_data_with(&a.data, &a.images.options())?;
    let device = a.device.device()?;
    let mut trainer = if a.resume {
        let ckpt = Checkpoint::load(&a.out, &device)
            .with_context(|| format!("--resume: no usable checkpoint in {}", a.out.display()))?;
        let mut t = ckpt.into_trainer(&device)?;
        if a.steps <= t.step_count() {
            bail!(
                "--resume: the checkpoint is already at step {}; pass a larger --steps",
                t.step_count()
            );
        }
        t.set_total_steps(a.steps);
        eprintln!("resuming from step {} of {}", t.step_count(), a.steps);
        t
    } else {
        if a.out.join(checkpoint::META_FILE).exists() {
            bail!(
                "{} already holds a checkpoint; pass --resume to continue it or choose another --out",
                a.out.display()
            );
        }
        Trainer::new(config_from_args(a, data.as_ref())?, &device)?
    };
    let source = trainer
        .config()
        .source
        .as_deref()
        .map(io::open_data)
        .transpose()?;
    io::ensure_dir(&a.out)?;
    eprintln!("training on {} for {} steps", data.describe(), a.steps);
    let o = run_loop(
        &mut trainer,
        data.as_ref(),
        source.as_deref(),
        &a.out,
        a.checkpoint_every,
        a.max_minutes,
    )?;
    report_done(&trainer, &o, &a.out);
    Ok(())
}

/// The line that ends a finished training run (scripts parse its "done: N steps in S s").
pub fn report_done(trainer: &Trainer, o: &Outcome, out: &Path) {
    if !o.interrupted {
        eprintln!(
            "done: {} steps in {:.1} s, last loss {:.4}; checkpoint in {}",
            trainer.step_count(),
            o.seconds,
            o.last_loss,
            out.display()
        );
    }
}
