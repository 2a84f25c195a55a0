//! `flowmatching infill`: regenerate a span of a corpus utterance with a speech checkpoint, and write
//! what came out as WAV files, a spectrogram PNG (context, generated, original) and a JSON record.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use flowmatching::audio::{LogMel, MelSpectrogram};
use flowmatching::checkpoint::Checkpoint;
use flowmatching::infill::{InfillBatch, InfillField};
use flowmatching::nn::{Model, ModelConfig};
use flowmatching::rng::Rng;
use flowmatching::solver::{integrate, SolverKind};
use flowmatching::speech::Corpus;

use crate::cli::InfillArgs;
use crate::outputs::Outputs;
use crate::{plot, resolve};

/// The most solver steps accepted.
const MAX_STEPS: usize = 10_000;

/// `START-END` in frames (END excluded).
fn parse_span(s: &str, frames: usize) -> Result<(usize, usize)> {
    let bad = || anyhow::anyhow!("--span must be START-END in frames (END excluded), got \"{s}\"");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b): (usize, usize) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a >= b || b > frames {
        bail!("--span {a}-{b} is not inside the utterance's {frames} frames (need START < END <= {frames})");
    }
    Ok((a, b))
}

pub fn run(a: &InfillArgs) -> Result<()> {
    if a.steps == 0 || a.steps > MAX_STEPS {
        bail!("--steps must be in 1..={MAX_STEPS}, got {}", a.steps);
    }
    let solver = resolve::solver_kind(a.solver);
    if solver == SolverKind::Dopri5 {
        bail!("--solver dopri5 is adaptive; infill uses a fixed number of steps: pick euler, midpoint, heun or rk4");
    }
    let device = a.device.device()?;
    let ckpt = Checkpoint::load(&a.checkpoint, &device)?;
    let ModelConfig::Transformer(cfg) = ckpt.meta.config.model else {
        bail!(
            "{} holds a model trained on {}, not on speech: infill needs a checkpoint of `train --data speech:DIR`",
            a.checkpoint.display(),
            ckpt.meta.config.data
        );
    };
    let dir = match &a.corpus {
        Some(d) => d.clone(),
        None => PathBuf::from(
            ckpt.meta
                .config
                .data
                .strip_prefix("speech:")
                .context("the checkpoint does not name its corpus; pass --corpus")?,
        ),
    };
    let corpus = Corpus::load(&dir)?;
    let bands = corpus.meta.mel.n_mels;
    if bands != cfg.frame_dim || corpus.meta.phones.len() != cfg.num_phones {
        bail!(
            "the corpus in {} has {bands} mel bands and {} phones; the model takes {} and {}",
            dir.display(),
            corpus.meta.phones.len(),
            cfg.frame_dim,
            cfg.num_phones
        );
    }
    let n = corpus.utterances().len();
    let Some(u) = corpus.utterances().get(a.utterance) else {
        bail!(
            "utterance {} does not exist: the corpus has utterances 0..={}",
            a.utterance,
            n - 1
        );
    };
    let frames = u.info.frames;
    if frames > cfg.max_frames {
        bail!(
            "utterance {} has {frames} frames, more than the model's {}",
            a.utterance,
            cfg.max_frames
        );
    }
    let span = match &a.span {
        Some(s) => parse_span(s, frames)?,
        None => (frames * 3 / 10, (frames * 7 / 10).max(frames * 3 / 10 + 1)),
    };
    let mut outs = Outputs::new();
    outs.checkpoint(&a.checkpoint);
    outs.input_folder(&dir, "the corpus");
    let names = ["infilled.wav", "original.wav", "infill.png", "infill.json"];
    let paths: Vec<PathBuf> = names.iter().map(|f| a.out.join(f)).collect();
    for p in &paths {
        outs.declare(p, "--out")?;
    }
    if !a.guidance.is_finite() {
        bail!("--guidance must be finite, got {}", a.guidance);
    }
    let Model::Transformer(model) = ckpt.model(&device, true)? else {
        bail!("the checkpoint's weights are not a transformer's");
    };

    let truth = corpus.normalised(u);
    let mut mask = vec![0f32; frames];
    mask[span.0..span.1].fill(1.0);
    let batch = InfillBatch {
        x1: Tensor::from_vec(truth, (1, frames, bands), &device)?,
        mask: Tensor::from_vec(mask, (1, frames), &device)?,
        phones: Some(Tensor::from_vec(u.phones.clone(), (1, frames), &device)?),
        lengths: vec![frames],
        unconditional: vec![false],
    };
    let field = InfillField::new(&model, &batch, a.guidance)?;
    let x0 = Tensor::from_vec(
        Rng::new(a.seed).normal_vec(frames * bands),
        (1, frames, bands),
        &device,
    )?;
    let sol = integrate(
        &field,
        solver.solver().as_ref(),
        &field.initial(&x0, &batch)?,
        0.0,
        1.0,
        a.steps,
        false,
    )?;
    let generated = corpus.denormalise(&sol.x.flatten_all()?.to_vec1::<f32>()?);
    let l1 = (span.0 * bands..span.1 * bands)
        .map(|i| (generated[i] - u.log_mel[i]).abs() as f64)
        .sum::<f64>()
        / ((span.1 - span.0) * bands) as f64;

    let mel = MelSpectrogram::new(corpus.meta.mel.clone())?;
    let rate = corpus.meta.mel.sample_rate;
    let mut rng = Rng::new(a.seed).fork(1);
    for (p, values) in [(&paths[0], &generated), (&paths[1], &u.log_mel)] {
        let log_mel = LogMel {
            frames,
            n_mels: bands,
            values: values.clone(),
        };
        let wave = mel.waveform_of_log_mel(&log_mel, &mut rng)?;
        outs.write(p, &flowmatching::audio::wav_bytes(&wave, rate)?)?;
    }
    let floor = u.log_mel.iter().copied().fold(f32::INFINITY, f32::min);
    let mut context = u.log_mel.clone();
    context[span.0 * bands..span.1 * bands].fill(floor);
    outs.write(
        &paths[2],
        &plot::spectrograms(&[&context, &generated, &u.log_mel], bands, Some(span))?,
    )?;
    let record = serde_json::json!({
        "utterance": a.utterance,
        "text": u.info.text,
        "speaker": corpus.meta.speakers[u.info.speaker as usize],
        "split": u.info.split,
        "span": [span.0, span.1],
        "frames": frames,
        "solver": format!("{solver:?}").to_lowercase(),
        "steps": a.steps,
        "nfe": sol.stats.nfe,
        "guidance": a.guidance,
        "mel_l1": l1,
    });
    outs.write(&paths[3], serde_json::to_string_pretty(&record)?.as_bytes())?;
    outs.commit()?;
    println!(
        "utterance {} ({:?}, \"{}\"): frames {}-{} of {frames} regenerated with {} NFE, mel L1 {l1:.3} -> {}",
        a.utterance,
        u.info.split,
        u.info.text,
        span.0,
        span.1,
        record["nfe"],
        a.out.display()
    );
    Ok(())
}
