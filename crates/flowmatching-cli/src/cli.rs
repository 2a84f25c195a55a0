//! Command-line arguments: every subcommand's options, in one place.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Train and sample flow-matching generative models.
///
/// Time convention: t = 0 is noise, t = 1 is data. Samples are drawn by integrating dx/dt = v(x, t)
/// from Gaussian noise at t = 0 to t = 1.
#[derive(Debug, Parser)]
#[command(name = "flowmatching", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train on checkerboard, sample 10,000 points and write pictures and metrics (no arguments needed).
    Demo(DemoArgs),
    /// Train a model on a built-in 2-D data set or your own .npy / .csv points.
    Train(TrainArgs),
    /// Draw samples from a trained model by integrating its ODE.
    Sample(SampleArgs),
    /// Log-likelihood (NLL in nats, bits/dim) of data under a trained model, by the change of variables.
    Likelihood(LikelihoodArgs),
    /// Sample quality against NFE for every solver: the table in the README.
    Solvers(SolversArgs),
    /// The flow-matching paper's ablation: DDPM, score matching, ScoreFlow, FM-diffusion and FM-OT trained
    /// alike, compared in a report with plots.
    Ablate(AblateArgs),
    /// The evaluation classifier for image data (class accuracy of samples, features for FD).
    Classifier(ClassifierArgs),
    /// Image-model evaluation: FD of samples against the test set (with the train/test floor and a
    /// Gaussian ceiling), class accuracy of guided samples, sample grids; writes a report.
    ImageEval(ImageEvalArgs),
    /// Straightness, few-step quality and adaptive NFE of a trained point model.
    Eval(EvalArgs),
    /// One round of rectified flow: pairs from a trained model, a new model trained on them.
    Reflow(ReflowArgs),
    /// Independent vs OT vs Sinkhorn coupling vs reflow on one data set: a report with plots.
    Couplings(CouplingsArgs),
    /// Time sampling in training, sampling grids and the guidance interval compared: a report.
    Schedules(SchedulesArgs),
    /// Synthesise a speech corpus with espeak-ng: log-mel frames, the phone of every frame, speakers,
    /// a train/test split by sentence, and a few WAV files to listen to.
    SpeechCorpus(SpeechCorpusArgs),
    /// Regenerate a span of a corpus utterance with a speech checkpoint: WAVs, a spectrogram PNG, JSON.
    Infill(InfillArgs),
}

#[derive(Debug, Args)]
pub struct InfillArgs {
    /// A checkpoint of `train --data speech:DIR`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The corpus (default: the one the checkpoint was trained on).
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// The utterance, by its index in the corpus (corpus.json's order).
    #[arg(long)]
    pub utterance: usize,
    /// Frames to regenerate, START-END (END excluded); default the middle 40%.
    #[arg(long)]
    pub span: Option<String>,
    /// Fixed-step solver and its number of steps (midpoint: 2 NFE a step, twice that when guided).
    #[arg(long, value_enum, default_value = "midpoint")]
    pub solver: SolverArg,
    #[arg(long, default_value_t = 16)]
    pub steps: usize,
    /// Guidance weight w (1: the conditional field; Voicebox's alpha = 0.7 is w = 1.7).
    #[arg(value_parser = finite, long, default_value_t = 1.7)]
    pub guidance: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output folder: infilled.wav, original.wav (both through Griffin-Lim), infill.png, infill.json.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Debug, Args)]
pub struct SpeechCorpusArgs {
    /// Output folder (corpus.json, corpus.safetensors, wav/).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of utterances (one sentence each, all different).
    #[arg(long, default_value_t = 2000)]
    pub utterances: usize,
    /// Number of voices (espeak-ng's English male and female variants), used in turn.
    #[arg(long, default_value_t = 12)]
    pub speakers: usize,
    /// Every N-th sentence goes to the test split.
    #[arg(long, default_value_t = 10)]
    pub test_every: usize,
    /// Also write the first N utterances as WAV files.
    #[arg(long, default_value_t = 8)]
    pub wavs: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Reference data (default: the data the model was trained on).
    #[arg(long)]
    pub data: Option<String>,
    #[arg(long, default_value_t = 5000)]
    pub num_samples: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the results as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write a PNG: data, then samples after 1, 2, 4, 8 Euler steps, then adaptive.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ReflowArgs {
    /// The trained model whose flow is straightened.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Number of (x0, x1) pairs to generate.
    #[arg(long, default_value_t = 20_000)]
    pub pairs: usize,
    /// Midpoint steps of the solve that makes the pairs.
    #[arg(long, default_value_t = 100)]
    pub solver_steps: usize,
    /// Training steps of the new model (default: as many as the original).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Output folder for the new model's checkpoint.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct CouplingsArgs {
    /// Target data (2-D).
    #[arg(long, default_value = "checkerboard")]
    pub data: String,
    /// Source data (default N(0, I)).
    #[arg(long)]
    pub source: Option<String>,
    #[arg(long, default_value = "docs/couplings/checkerboard")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 10_000)]
    pub steps: u64,
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 128)]
    pub hidden: usize,
    /// Reflow pairs.
    #[arg(long, default_value_t = 20_000)]
    pub pairs: usize,
    /// Samples per evaluation.
    #[arg(long, default_value_t = 4000)]
    pub num_samples: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Only re-render report.md from the folder's results.json.
    #[arg(long)]
    pub report_only: bool,
}

#[derive(Debug, Args)]
pub struct SchedulesArgs {
    /// A built-in 2-D set, a .npy / .csv of 2-D points, or images (fashion-mnist, an image folder, a
    /// .npy of images: then the network is the `tiny` U-Net, quality is FD and --classifier is needed).
    #[arg(long, default_value = "checkerboard")]
    pub data: String,
    /// Images: the evaluation classifier (from `flowmatching classifier train`) for FD and accuracy.
    #[arg(long)]
    pub classifier: Option<PathBuf>,
    /// Output folder: report.md, results.json, PNGs, and a checkpoint per variant.
    #[arg(long, default_value = "schedules")]
    pub out: PathBuf,
    /// A smoke run (small network, few steps and samples).
    #[arg(long)]
    pub quick: bool,
    /// Override the steps per variant.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Override the samples per cell.
    #[arg(long)]
    pub num_samples: Option<usize>,
    /// Skip the guidance comparison on labelled images.
    #[arg(long)]
    pub no_guidance: bool,
    /// Guidance weight of the guidance comparison.
    #[arg(long, default_value_t = 3.0)]
    pub guidance: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub images: ImageDataArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Continue the interrupted study in --out (same settings): finished variants are kept.
    #[arg(long)]
    pub resume: bool,
    /// Rewrite report.md from the results.json already in --out.
    #[arg(long)]
    pub report_only: bool,
}

#[derive(Debug, Args)]
pub struct ClassifierArgs {
    #[command(subcommand)]
    pub command: ClassifierCommand,
}

#[derive(Debug, Subcommand)]
pub enum ClassifierCommand {
    /// Train the classifier on labelled images and print its test accuracy.
    Train(ClassifierTrainArgs),
}

#[derive(Debug, Args)]
pub struct ClassifierTrainArgs {
    /// Labelled images: fashion-mnist, a folder with one sub-folder per class, ...
    #[arg(long, default_value = "fashion-mnist")]
    pub data: String,
    /// Held-out images for the printed accuracy (default for fashion-mnist: its test split).
    #[arg(long)]
    pub test_data: Option<String>,
    /// Output file (.safetensors).
    #[arg(long, default_value = "classifier.safetensors")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 6)]
    pub epochs: usize,
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    #[arg(value_parser = finite, long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub images: ImageDataArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Debug, Args)]
pub struct ImageEvalArgs {
    /// A checkpoint of an image model.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The classifier file from `flowmatching classifier train`.
    #[arg(long)]
    pub classifier: PathBuf,
    /// Output folder for report.md, results.json and grids.
    #[arg(long)]
    pub out: PathBuf,
    /// Training images (for the train/test floor and the Gaussian ceiling).
    #[arg(long, default_value = "fashion-mnist")]
    pub train_data: String,
    /// Test images (the FD reference).
    #[arg(long, default_value = "fashion-mnist:test")]
    pub test_data: String,
    /// Generated images per guidance weight (and real images per reference set).
    #[arg(long, default_value_t = 10_000)]
    pub num_samples: usize,
    /// Guidance weights to evaluate (comma separated; conditional models only).
    #[arg(value_parser = guidance_weight, long, value_delimiter = ',', default_value = "0,1,2,4")]
    pub guidance: Vec<f64>,
    #[arg(long, value_enum, default_value = "midpoint")]
    pub solver: SolverArg,
    /// Steps of the fixed-step solver.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[command(flatten)]
    pub tol: ToleranceArgs,
    /// Samples integrated together.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub images: ImageDataArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// A smoke run: small network, 3,000 steps per objective (a few minutes on 2 cores).
    Quick,
    /// The checked-in report: 20,000 steps per objective.
    Default,
    /// Images on a 2-core CPU (about two hours); on 2-D data the same as `default`.
    Cpu,
}

#[derive(Debug, Args)]
pub struct AblateArgs {
    /// A built-in 2-D set, a .npy / .csv file of 2-D points, or images (fashion-mnist, an image folder,
    /// a .npy of images: then the network is a U-Net and quality is FD, which needs --classifier).
    #[arg(long, default_value = "checkerboard")]
    pub data: String,
    /// Images: the evaluation classifier (from `flowmatching classifier train`) whose features FD uses.
    #[arg(long)]
    pub classifier: Option<PathBuf>,
    /// Images: the U-Net's base channels (default 32, the `tiny` preset).
    #[arg(long)]
    pub base_channels: Option<usize>,
    /// Cap on every sample count of the preset (samples, NFE probes, likelihood and error points).
    #[arg(long)]
    pub num_samples: Option<usize>,
    /// Cap on the steps of each adaptive solve (default 2000); a capped solve is reported as such.
    #[arg(long)]
    pub max_adaptive_steps: Option<usize>,
    #[command(flatten)]
    pub images: ImageDataArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Output folder: report.md, results.json, PNG figures and one checkpoint per objective.
    #[arg(long, default_value = "report")]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "default")]
    pub preset: Preset,
    /// Override the preset's steps per objective.
    #[arg(long)]
    pub steps: Option<u64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Rewrite report.md from the results.json already in --out (no training).
    #[arg(long)]
    pub report_only: bool,
    /// Continue the interrupted ablation in --out (same data, preset, sizes and seed): finished
    /// objectives are kept, the one in progress continues from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Output folder (samples.npy, samples.png, metrics.json and the checkpoint).
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    /// Training steps (the default trains in about two minutes on 2 cores).
    #[arg(long, default_value_t = 40_000)]
    pub steps: u64,
    /// Random seed for weights, data, noise and times.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Number of samples to draw.
    #[arg(long, default_value_t = 10_000)]
    pub num_samples: usize,
    /// Width of the MLP's hidden layers.
    #[arg(long, default_value_t = 128)]
    pub hidden: usize,
    #[arg(long, default_value_t = 1024)]
    pub batch_size: usize,
    /// Peak AdamW learning rate (cosine decay to 0 after 100 warm-up steps).
    #[arg(value_parser = finite, long, default_value_t = 3e-3)]
    pub lr: f64,
    /// Matrix products of training and sampling in f32, or bf16 with f32 accumulation.
    #[arg(long, default_value = "f32", value_parser = precision)]
    pub precision: flowmatching::precision::Precision,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathArg {
    /// Conditional optimal transport: x_t = (1 - (1 - sigma_min) t) x0 + t x1.
    Ot,
    /// Variance-preserving diffusion path (beta_min 0.1, beta_max 20).
    Vp,
    /// alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2).
    Cosine,
    /// alpha_t = t^2, sigma_t = 1 - t^2.
    Poly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TimeArg {
    /// t as one extra input feature.
    Input,
    /// A 32-dimensional sinusoidal embedding of t.
    Sinusoidal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ActivationArg {
    Silu,
    Selu,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Training data: a built-in set (checkerboard, 8gaussians, moons, circles, 2spirals, pinwheel,
    /// swissroll), a file: .npy (N x D, float32 or float64) or .csv (one point per line), images, or
    /// speech:DIR (a corpus from `speech-corpus`, trained by masked CFM with the transformer).
    #[arg(long)]
    pub data: String,
    /// Output folder for the checkpoint (checkpoint.json + weights-*.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Continue from the checkpoint in --out (same config; --steps is the new total).
    #[arg(long)]
    pub resume: bool,
    /// Total optimizer steps.
    #[arg(long, default_value_t = 10_000)]
    pub steps: u64,
    #[arg(long, default_value_t = 1024)]
    pub batch_size: usize,
    /// AdamW learning rate.
    #[arg(value_parser = finite, long, default_value_t = 1e-3)]
    pub lr: f64,
    /// AdamW decoupled weight decay.
    #[arg(value_parser = finite, long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Linear learning-rate warm-up steps.
    #[arg(long, default_value_t = 100)]
    pub warmup: u64,
    /// Learning-rate decay after warm-up.
    #[arg(long, value_enum, default_value = "cosine")]
    pub lr_decay: LrDecayArg,
    /// Clip the global gradient norm to this value (0 disables clipping).
    #[arg(value_parser = finite, long, default_value_t = 1.0)]
    pub grad_clip: f64,
    /// Decay of the exponential moving average of the weights used for sampling.
    #[arg(value_parser = finite, long, default_value_t = 0.999)]
    pub ema_decay: f64,
    /// Width of the MLP's hidden layers (the transformer's width).
    #[arg(long, default_value_t = 256)]
    pub hidden: usize,
    /// Number of hidden layers (the transformer's blocks).
    #[arg(long, default_value_t = 4)]
    pub depth: usize,
    /// The transformer's attention heads.
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// The transformer's longest training crop, in frames (longer utterances are cropped at random).
    #[arg(long, default_value_t = 256)]
    pub max_frames: usize,
    #[arg(long, value_enum, default_value = "input")]
    pub time_embedding: TimeArg,
    #[arg(long, value_enum, default_value = "silu")]
    pub activation: ActivationArg,
    /// Probability path.
    #[arg(long, value_enum, default_value = "ot")]
    pub path: PathArg,
    /// Width of the OT path's endpoint Gaussian around each data point, in [0, 1).
    #[arg(value_parser = finite, long, default_value_t = 1e-5)]
    pub sigma_min: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Save a checkpoint every this many steps (and always at the end).
    #[arg(long, default_value_t = 1000)]
    pub checkpoint_every: u64,
    /// The network: an MLP for points, a U-Net for images (auto picks by the data).
    #[arg(long, value_enum, default_value = "auto")]
    pub model: ModelArg,
    /// U-Net size: tiny (CPU, minutes) or small (GPU).
    #[arg(long, value_enum, default_value = "small")]
    pub unet: UNetPreset,
    /// Override the U-Net's base channel count.
    #[arg(long)]
    pub base_channels: Option<usize>,
    /// Train without the data's labels (no class conditioning, no guidance).
    #[arg(long)]
    pub unconditional: bool,
    /// Probability of replacing a label by the null class (enables classifier-free guidance).
    #[arg(value_parser = finite, long, default_value_t = 0.1)]
    pub label_dropout: f64,
    #[command(flatten)]
    pub images: ImageDataArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Stop (with a checkpoint) after this many minutes of training; resume later with --resume.
    #[arg(value_parser = finite, long)]
    pub max_minutes: Option<f64>,
    /// How x0 and x1 are paired in each minibatch: independent, exact OT, or Sinkhorn (entropic OT).
    #[arg(long, value_enum, default_value = "independent")]
    pub coupling: CouplingArg,
    /// Sinkhorn regularisation, relative to the largest squared distance in the minibatch.
    #[arg(value_parser = finite, long, default_value_t = 0.05)]
    pub sinkhorn_reg: f64,
    /// Draw x0 from this data set (built-in or file) instead of N(0, I); sampling then starts there too.
    #[arg(long)]
    pub source: Option<String>,
    /// Training times: uniform, logit-normal[:M,S] (t = sigmoid(M + S n); default 0,1 as SD3),
    /// mode:S (SD3's mode sampling), or cosmap. t = 0 is noise, t = 1 data.
    #[arg(long, default_value = "uniform", value_parser = time_sampling)]
    pub time_sampling: flowmatching::timesteps::TimeSampling,
    /// Matrix products in f32, or bf16 with f32 accumulation (MLP models on a CPU with AVX-512 BF16;
    /// weights, optimizer state and the loss stay f32).
    #[arg(long, default_value = "f32", value_parser = precision)]
    pub precision: flowmatching::precision::Precision,
    /// The options given on the command line (not defaulted), by id: filled in by `main`.
    #[arg(skip)]
    pub given: Vec<String>,
}

/// A finite number (no NaN, no infinity); ranges are checked where the value is used.
fn finite(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|e| format!("{e}"))?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err("must be a finite number".into())
    }
}

/// `NAME[:A[,B]]`: the name and its finite numbers.
fn named_numbers(s: &str) -> Result<(&str, Vec<f64>), String> {
    let (name, rest) = s.split_once(':').unwrap_or((s, ""));
    let numbers = if rest.is_empty() {
        vec![]
    } else {
        rest.split(',').map(finite).collect::<Result<_, _>>()?
    };
    Ok((name, numbers))
}

/// `LO,HI` with 0 <= LO <= HI <= 1.
fn interval(s: &str) -> Result<(f64, f64), String> {
    match s.split(',').map(finite).collect::<Result<Vec<_>, _>>()?[..] {
        [lo, hi] if 0.0 <= lo && lo <= hi && hi <= 1.0 => Ok((lo, hi)),
        _ => Err("expected LO,HI with 0 <= LO <= HI <= 1 (e.g. 0.2,0.8)".into()),
    }
}

/// `--precision`: f32 or bf16.
pub fn precision(s: &str) -> Result<flowmatching::precision::Precision, String> {
    flowmatching::precision::Precision::parse(s).map_err(|e| e.to_string())
}

/// `--time-sampling`: uniform, logit-normal[:M,S], mode:S, cosmap.
fn time_sampling(s: &str) -> Result<flowmatching::timesteps::TimeSampling, String> {
    use flowmatching::timesteps::TimeSampling;
    let t =
        match named_numbers(s)? {
            ("uniform", v) if v.is_empty() => TimeSampling::Uniform,
            ("cosmap", v) if v.is_empty() => TimeSampling::CosMap,
            ("logit-normal", v) if v.is_empty() => TimeSampling::LogitNormal { m: 0.0, s: 1.0 },
            ("logit-normal", v) if v.len() == 2 => TimeSampling::LogitNormal { m: v[0], s: v[1] },
            ("mode", v) if v.len() == 1 => TimeSampling::Mode { s: v[0] },
            _ => return Err(
                "expected uniform, logit-normal[:M,S], mode:S or cosmap (e.g. logit-normal:0,1)"
                    .into(),
            ),
        };
    t.validate().map_err(|e| e.to_string())?;
    Ok(t)
}

/// `--time-grid`: uniform, shift:S, edm[:RHO].
fn time_grid(s: &str) -> Result<flowmatching::timesteps::TimeGrid, String> {
    use flowmatching::timesteps::TimeGrid;
    let g = match named_numbers(s)? {
        ("uniform", v) if v.is_empty() => TimeGrid::Uniform,
        ("shift", v) if v.len() == 1 => TimeGrid::Shift { s: v[0] },
        ("edm", v) if v.is_empty() => TimeGrid::Edm { rho: 7.0 },
        ("edm", v) if v.len() == 1 => TimeGrid::Edm { rho: v[0] },
        _ => return Err("expected uniform, shift:S or edm[:RHO] (e.g. shift:3)".into()),
    };
    g.validate().map_err(|e| e.to_string())?;
    Ok(g)
}

/// The largest guidance weight accepted: beyond it the guided field v_uncond + w (v_cond - v_uncond)
/// is the difference of two estimates scaled past any use (the literature stays below 10).
pub const MAX_GUIDANCE: f64 = 100.0;

/// A guidance weight: finite, |w| <= MAX_GUIDANCE.
fn guidance_weight(s: &str) -> Result<f64, String> {
    let v = finite(s)?;
    if v.abs() <= MAX_GUIDANCE {
        Ok(v)
    } else {
        Err(format!(
            "must be between -{MAX_GUIDANCE} and {MAX_GUIDANCE}"
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CouplingArg {
    Independent,
    Ot,
    Sinkhorn,
}

impl PathArg {
    /// The scheduler, with `sigma_min` for the OT path.
    pub fn scheduler(self, sigma_min: f64) -> flowmatching::path::SchedulerConfig {
        use flowmatching::path::SchedulerConfig;
        match self {
            PathArg::Ot => SchedulerConfig::CondOt { sigma_min },
            PathArg::Vp => SchedulerConfig::default_vp(),
            PathArg::Cosine => SchedulerConfig::Cosine,
            PathArg::Poly => SchedulerConfig::Polynomial { n: 2.0 },
        }
    }
}

impl CouplingArg {
    pub fn coupling(self, reg: f64) -> flowmatching::coupling::Coupling {
        use flowmatching::coupling::Coupling;
        match self {
            CouplingArg::Independent => Coupling::Independent,
            CouplingArg::Ot => Coupling::Ot,
            CouplingArg::Sinkhorn => Coupling::Sinkhorn { reg },
        }
    }
}

/// Options for image data.
#[derive(Debug, Clone, Args)]
pub struct ImageDataArgs {
    /// Folder with Fashion-MNIST's IDX files (default: /usr/share/datasets/fashion-mnist).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Flip training images left-right at random.
    #[arg(long)]
    pub hflip: bool,
    /// Resize a folder of images to this square size.
    #[arg(long)]
    pub image_size: Option<usize>,
}

impl ImageDataArgs {
    pub fn options(&self) -> crate::io::DataOptions {
        crate::io::DataOptions {
            data_dir: self.data_dir.clone(),
            hflip: self.hflip,
            image_size: self.image_size,
        }
    }
}

/// Where tensors live.
#[derive(Debug, Clone, Args)]
pub struct DeviceArgs {
    /// cpu, or cuda (a build with `--features cuda`, see scripts/build-cuda.sh).
    #[arg(long = "device", value_enum, default_value = "cpu")]
    pub kind: DeviceArg,
    /// On CUDA, allow TF32 tensor-core matrix products (faster, ~1e-3 relative rounding).
    #[arg(long)]
    pub tf32: bool,
}

impl DeviceArgs {
    pub fn device(&self) -> anyhow::Result<candle_core::Device> {
        match self.kind {
            DeviceArg::Cpu => Ok(candle_core::Device::Cpu),
            DeviceArg::Cuda => {
                let d = flowmatching::device::cuda_with(0, crate::resolve::cuda_options())
                    .map_err(|e| anyhow::anyhow!("{e}; build with scripts/build-cuda.sh"))?;
                candle_core::cuda::set_gemm_reduced_precision_f32(self.tf32);
                Ok(d)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelArg {
    Auto,
    Mlp,
    Unet,
    /// The sequence transformer (speech data).
    Transformer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UNetPreset {
    Tiny,
    Small,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LrDecayArg {
    Constant,
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SolverArg {
    Euler,
    Midpoint,
    Heun,
    Rk4,
    /// Adaptive Dormand-Prince 5(4): steps chosen by --rtol/--atol.
    Dopri5,
}

#[derive(Debug, Args)]
pub struct SampleArgs {
    /// A checkpoint folder (or its checkpoint.json), e.g. the output of `train` or `demo`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Matrix products in f32, or bf16 with f32 accumulation (MLP models on a CPU with AVX-512 BF16).
    #[arg(long, default_value = "f32", value_parser = precision)]
    pub precision: flowmatching::precision::Precision,
    /// Where to write the samples (.npy, N x D); statistics go beside it as NAME.stats.json.
    #[arg(long, default_value = "samples.npy")]
    pub out: PathBuf,
    /// Also write a PNG histogram of the first two coordinates.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    #[arg(long, default_value_t = 10_000)]
    pub num_samples: usize,
    /// Point models: start from the rows of this .npy / .csv file (N x D) instead of fresh noise, e.g. to
    /// integrate the same x0 as another tool (flow_matching's `x_init`). Sets the number of samples.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["num_samples", "seed"])]
    pub x0: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "midpoint")]
    pub solver: SolverArg,
    /// Number of solver steps for fixed-step solvers (NFE = steps x evaluations per step).
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    #[command(flatten)]
    pub tol: ToleranceArgs,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Use the raw weights instead of their moving average.
    #[arg(long)]
    pub raw_weights: bool,
    /// Also save the paths (NAME.trajectory.npy, T x N x D at 101 times) and plot them
    /// (NAME.trajectory.png).
    #[arg(long)]
    pub trajectory: bool,
    /// Image models: write a PNG grid of the samples (one row per class for conditional models).
    #[arg(long)]
    pub grid: Option<PathBuf>,
    /// Conditional models: classifier-free guidance weight w; v = v_uncond + w (v_cond - v_uncond),
    /// so 0 is unconditional and 1 plain conditional (default 1).
    #[arg(value_parser = guidance_weight, long)]
    pub guidance: Option<f64>,
    /// Conditional models: apply guidance only for t in [LO, HI] (t = 0 noise), the plain conditional
    /// field elsewhere at 1 NFE per call (Kynkaanniemi et al. 2024).
    #[arg(long, value_name = "LO,HI", value_parser = interval)]
    pub guidance_interval: Option<(f64, f64)>,
    /// Conditional models: draw every sample from this class (default: equal blocks of every class).
    #[arg(long)]
    pub class: Option<u32>,
    /// Samples integrated together (image models).
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Integrate along the paths of another scheduler than the one the model was trained on (the
    /// same end distribution, other paths between): ot (sigma_min 0), vp, cosine or poly.
    #[arg(long, value_enum)]
    pub as_scheduler: Option<PathArg>,
    /// Point models: also each sample's log-density log p_1(x) in nats (NAME.logp.npy, float64), from
    /// the same solve (the divergence integrated alongside, exactly).
    #[arg(long)]
    pub log_prob: bool,
    /// Where fixed steps fall: uniform, shift:S (the SD3 / Flux shift; S > 1 more steps near the
    /// noise), or edm[:RHO] (EDM's rho spacing, default 7; more steps near the data).
    #[arg(long, default_value = "uniform", value_parser = time_grid)]
    pub time_grid: flowmatching::timesteps::TimeGrid,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl SampleArgs {
    pub fn per_sample_used(&self) -> bool {
        self.tol.per_sample
    }
}

#[derive(Debug, Args)]
pub struct ToleranceArgs {
    /// Relative tolerance of dopri5.
    #[arg(value_parser = finite, long, default_value_t = 1e-5)]
    pub rtol: f64,
    /// Absolute tolerance of dopri5.
    #[arg(value_parser = finite, long, default_value_t = 1e-5)]
    pub atol: f64,
    /// Control each sample's error separately (its own step sizes), instead of the RMS over the batch.
    #[arg(long)]
    pub per_sample: bool,
}

#[derive(Debug, Args)]
pub struct LikelihoodArgs {
    /// A checkpoint folder (or its checkpoint.json).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Data to evaluate: a .npy / .csv file, or a built-in set (fresh points are drawn).
    #[arg(long)]
    pub data: String,
    /// Number of points (all rows of a file by default; 10,000 for a built-in set).
    #[arg(long)]
    pub num_samples: Option<usize>,
    /// Exact divergence: the trace of the Jacobian, one derivative pass per dimension (the default).
    #[arg(long, conflicts_with = "hutchinson")]
    pub exact: bool,
    /// Hutchinson's divergence estimate with this many Rademacher probes.
    #[arg(long, value_name = "K")]
    pub hutchinson: Option<usize>,
    #[command(flatten)]
    pub tol: ToleranceArgs,
    /// Points per solve.
    #[arg(long, default_value_t = 2000)]
    pub batch_size: usize,
    /// Report bits/dim for 8-bit data mapped to model space by this factor per dimension
    /// (1/256 for [0, 1] images, 2/256 for [-1, 1]). Image data (fashion-mnist:test, a folder, ...) are
    /// dequantized with uniform noise and use 2/256 automatically.
    #[arg(value_parser = finite, long)]
    pub bits_scale: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the results as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write each point's log-likelihood log p(x) in nats, in input order (.npy, float64, N).
    #[arg(long, value_name = "FILE")]
    pub per_point: Option<PathBuf>,
    #[arg(long)]
    pub raw_weights: bool,
    #[command(flatten)]
    pub images: ImageDataArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Debug, Args)]
pub struct SolversArgs {
    /// A checkpoint folder (or its checkpoint.json).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Reference data for the energy distance: a built-in set or a .npy / .csv file.
    #[arg(long)]
    pub data: String,
    #[arg(long, default_value_t = 10_000)]
    pub num_samples: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the table as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}
