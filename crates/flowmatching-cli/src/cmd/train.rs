//! `flowmatching train`.

use anyhow::{bail, Context, Result};
use flowmatching::checkpoint::{self, Checkpoint};
use flowmatching::data::DataSource;
use flowmatching::nn::{Activation, MlpConfig, ModelConfig, TimeEmbedding, UNetConfig};
use flowmatching::objective::Weighting;
use flowmatching::path::Prediction;
use flowmatching::train::{RunConfig, Trainer, FORMAT_VERSION};

use crate::cli::{ActivationArg, ModelArg, TimeArg, TrainArgs, UNetPreset};
use crate::training::{continue_to, train_in_folder};
use crate::{io, memory};

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
        (ModelArg::Transformer, _) => bail!(
            "--model transformer trains on speech:DIR data; {} is not a speech corpus",
            data.describe()
        ),
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
    let path = a.path.scheduler(a.sigma_min);
    Ok(RunConfig {
        format_version: FORMAT_VERSION,
        model: model_from_args(a, data)?,
        path,
        prediction: Prediction::Velocity,
        weighting: Weighting::Uniform,
        train: crate::resolve::train_config(a)?,
        data: a.data.clone(),
        source: a.source.clone(),
    })
}

/// The parts of the run configuration each configuration flag of `train` sets (JSON pointers into
/// checkpoint.json's config). Flags not listed here may change on `--resume`: --steps (the new total),
/// --checkpoint-every, --max-minutes, --device, --tf32 and the data-loading options.
const CONFIG_FLAGS: [(&str, &[&str]); 24] = [
    ("time_sampling", &["/train/time_sampling"]),
    ("precision", &["/train/precision"]),
    ("source", &["/source"]),
    ("batch_size", &["/train/batch_size"]),
    ("lr", &["/train/optimizer/lr"]),
    ("weight_decay", &["/train/optimizer/weight_decay"]),
    ("warmup", &["/train/warmup_steps"]),
    ("lr_decay", &["/train/lr_decay"]),
    ("grad_clip", &["/train/grad_clip"]),
    ("ema_decay", &["/train/ema_decay"]),
    ("seed", &["/train/seed"]),
    ("label_dropout", &["/train/label_dropout"]),
    ("coupling", &["/train/coupling/kind"]),
    ("sinkhorn_reg", &["/train/coupling/reg"]),
    ("hidden", &["/model/hidden"]),
    ("depth", &["/model/depth"]),
    ("time_embedding", &["/model/time_embedding"]),
    ("activation", &["/model/activation"]),
    ("path", &["/path/kind"]),
    ("sigma_min", &["/path/sigma_min"]),
    ("model", &["/model/kind"]),
    (
        "unet",
        &[
            "/model/channel_mults",
            "/model/res_blocks",
            "/model/attention_resolutions",
            "/model/heads",
            "/model/groups",
        ],
    ),
    ("base_channels", &["/model/base_channels"]),
    ("unconditional", &["/model/num_classes"]),
];

/// Whether `--data` names the data the checkpoint was trained on: the same built-in set, or the same
/// file however it is spelt.
fn same_data(given: &str, saved: &str) -> bool {
    match (std::fs::canonicalize(given), std::fs::canonicalize(saved)) {
        (Ok(a), Ok(b)) => a == b,
        _ => given == saved,
    }
}

/// `--resume` with flags that contradict the checkpoint: refused, naming each (a resumed run keeps its
/// configuration, so a silently ignored flag would train something other than what was asked).
fn check_resume_flags(
    a: &TrainArgs,
    saved_config: &RunConfig,
    data: &dyn DataSource,
) -> Result<()> {
    let wanted = serde_json::to_value(config_from_args(a, data)?)?;
    let saved = serde_json::to_value(saved_config)?;
    let mut conflicts = vec![];
    if !same_data(&a.data, &saved_config.data) {
        conflicts.push(format!(
            "--data gives \"{}\" where the checkpoint has \"{}\"",
            a.data, saved_config.data
        ));
    }
    let (dim, shape) = (data.dim(), data.image_shape());
    if dim != saved_config.model.dim() || shape != saved_config.model.image_shape() {
        conflicts.push(format!(
            "the data are {} where the checkpoint's model takes {}",
            shape.map_or(format!("{dim}-dimensional points"), |s| format!(
                "{s:?} images"
            )),
            saved_config.model.image_shape().map_or(
                format!("{}-dimensional points", saved_config.model.dim()),
                |s| format!("{s:?} images")
            )
        ));
    }
    for (flag, pointers) in CONFIG_FLAGS {
        if !a.given.iter().any(|g| g == flag) {
            continue;
        }
        for p in pointers {
            let (w, s) = (wanted.pointer(p), saved.pointer(p));
            if w != s {
                let show =
                    |v: Option<&serde_json::Value>| v.map_or("none".into(), |v| v.to_string());
                conflicts.push(format!(
                    "--{} gives {} where the checkpoint has {}",
                    flag.replace('_', "-"),
                    show(w),
                    show(s)
                ));
                break;
            }
        }
    }
    if !conflicts.is_empty() {
        bail!(
            "--resume: {}. A resumed run keeps its configuration: drop these flags (or repeat the \
             checkpoint's values), or train into a new --out",
            conflicts.join("; ")
        );
    }
    Ok(())
}

pub fn run(a: &TrainArgs) -> Result<()> {
    let data = io::open_data_with(&a.data, &a.images.options())?;
    let device = a.device.device()?;
    let mut trainer = if a.resume {
        let ckpt = Checkpoint::load(&a.out, &device)
            .with_context(|| format!("--resume: no usable checkpoint in {}", a.out.display()))?;
        check_resume_flags(a, &ckpt.meta.config, data.as_ref())?;
        ckpt.check_architecture(&device)?;
        memory::check(
            memory::training_bytes(&ckpt.meta.config, device.is_cpu()),
            "resuming this checkpoint",
            "a resumed run keeps its batch size and model, so resume it on a machine \
             with more memory",
        )?;
        continue_to(ckpt.into_trainer(&device)?, a.steps)?
    } else {
        if a.out.join(checkpoint::META_FILE).exists() {
            bail!(
                "{} already holds a checkpoint; pass --resume to continue it or choose another --out",
                a.out.display()
            );
        }
        let config = config_from_args(a, data.as_ref())?;
        config.validate()?;
        memory::check(
            memory::training_bytes(&config, device.is_cpu()),
            "training (weights, optimizer state and one batch's activations)",
            "lower --batch-size, or the model's size (--hidden, --depth, --base-channels)",
        )?;
        Trainer::new(config, &device)?
    };
    crate::training::note_precision(trainer.config().train.precision, trainer.precision());
    let source = trainer
        .config()
        .source
        .as_deref()
        .map(io::open_data)
        .transpose()?;
    if let Some(src) = &source {
        if src.dim() != data.dim() {
            bail!(
                "--source {} holds {}-dimensional points but --data {} is {}-dimensional; x0 and x1 \
                 must have the same dimension",
                src.describe(),
                src.dim(),
                data.describe(),
                data.dim()
            );
        }
    }
    train_in_folder(
        &mut trainer,
        &mut |t| t.step_from(data.as_ref(), source.as_deref()),
        &a.out,
        &data.describe(),
        a.checkpoint_every,
        a.max_minutes,
    )
}
