//! `flowmatching train --data speech:DIR`: the sequence transformer trained by masked CFM on a corpus
//! from `speech-corpus` (Voicebox's training, see the library's `infill` module).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use flowmatching::checkpoint::{self, Checkpoint};
use flowmatching::nn::{ModelConfig, TransformerConfig};
use flowmatching::objective::Weighting;
use flowmatching::path::Prediction;
use flowmatching::speech::{Corpus, Split};
use flowmatching::train::{RunConfig, TrainConfig, Trainer, FORMAT_VERSION};

use crate::cli::{ModelArg, TrainArgs};
use crate::memory;
use crate::training::{continue_to, train_in_folder};

/// The corpus folder of a `speech:DIR` data name, if it is one.
pub fn corpus_dir(data: &str) -> Option<PathBuf> {
    data.strip_prefix("speech:").map(PathBuf::from)
}

/// Flags that only apply to points or images.
fn refuse_other_flags(a: &TrainArgs) -> Result<()> {
    let not_here = [
        "source",
        "coupling",
        "sinkhorn_reg",
        "unet",
        "base_channels",
        "unconditional",
        "label_dropout",
        "time_embedding",
        "activation",
    ];
    if let Some(f) = a.given.iter().find(|g| not_here.contains(&g.as_str())) {
        bail!(
            "--{} does not apply to speech data (masked CFM with the transformer)",
            f.replace('_', "-")
        );
    }
    if !matches!(a.model, ModelArg::Auto | ModelArg::Transformer) {
        bail!("speech data train the transformer: drop --model or pass --model transformer");
    }
    Ok(())
}

fn config(a: &TrainArgs, corpus: &Corpus) -> Result<RunConfig> {
    let bands = corpus.meta.mel.n_mels;
    let model = TransformerConfig {
        frame_dim: bands,
        context_dim: bands,
        ..TransformerConfig::speech(corpus.meta.phones.len(), a.hidden, a.depth, a.heads)
    };
    if a.max_frames == 0 || a.max_frames > model.max_frames {
        bail!(
            "--max-frames must be in 1..={}, got {}",
            model.max_frames,
            a.max_frames
        );
    }
    model.validate()?;
    Ok(RunConfig {
        format_version: FORMAT_VERSION,
        model: ModelConfig::Transformer(model),
        path: a.path.scheduler(a.sigma_min),
        prediction: Prediction::Velocity,
        weighting: Weighting::Uniform,
        train: TrainConfig {
            label_dropout: 0.0,
            crop_frames: Some(a.max_frames),
            ..crate::resolve::train_config(a)?
        },
        data: a.data.clone(),
        source: None,
    })
}

fn resume(a: &TrainArgs, device: &candle_core::Device) -> Result<Trainer> {
    let ckpt = Checkpoint::load(&a.out, device)
        .with_context(|| format!("--resume: no usable checkpoint in {}", a.out.display()))?;
    if ckpt.meta.config.data != a.data {
        bail!(
            "--resume: --data gives \"{}\" where the checkpoint has \"{}\"",
            a.data,
            ckpt.meta.config.data
        );
    }
    ckpt.check_architecture(device)?;
    continue_to(ckpt.into_trainer(device)?, a.steps)
}

pub fn run(a: &TrainArgs, dir: &Path) -> Result<()> {
    refuse_other_flags(a)?;
    let corpus = Corpus::load(dir)?;
    let data = corpus.dataset(Split::Train)?;
    let device = a.device.device()?;
    let mut trainer = if a.resume {
        resume(a, &device)?
    } else {
        if a.out.join(checkpoint::META_FILE).exists() {
            bail!(
                "{} already holds a checkpoint; pass --resume to continue it or choose another --out",
                a.out.display()
            );
        }
        let config = config(a, &corpus)?;
        config.validate()?;
        memory::check(
            memory::training_bytes(&config, device.is_cpu()),
            "training (weights, optimizer state and one batch's activations)",
            "lower --batch-size, --max-frames or the model's size (--hidden, --depth)",
        )?;
        Trainer::new(config, &device)?
    };
    train_in_folder(
        &mut trainer,
        &mut |t| t.step_sequences(&data),
        &a.out,
        &data.describe(),
        a.checkpoint_every,
        a.max_minutes,
    )
}
