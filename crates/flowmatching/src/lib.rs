//! # flowmatching
//!
//! Conditional flow matching (Lipman et al., "Flow Matching for Generative Modeling") on candle.
//!
//! **Time convention, everywhere in this crate: t = 0 is noise, t = 1 is data.** Samples are drawn by
//! integrating dx/dt = v(x, t) from x0 ~ N(0, I) at t = 0 to t = 1.
//!
//! The modules, from the bottom up (a module imports only modules above it in this list):
//! - [`error`], [`rng`], [`device`], [`tensor`]: the error type, the seeded generator, opening a CUDA
//!   device for single-stream use, small tensor helpers;
//! - [`field`]: the [`field::VelocityField`] trait, what solvers integrate and models implement;
//! - `cpu` (private): the CPU kernels behind the layers (matrix products, convolution, GroupNorm,
//!   upsampling);
//! - [`params`]: the parameter store and weight initialisation;
//! - [`optim`]: AdamW, clipping, learning-rate schedules and EMA;
//! - [`path`]: schedulers (CondOT with sigma_min, VP, cosine, polynomial) and the affine Gaussian path
//!   x_t = sigma_t x0 + alpha_t x1, its regression targets and the conversions between predictions;
//! - [`nn`]: the MLP, the U-Net, the sequence transformer, their layers and the fused CPU MLP engine;
//! - [`solver`]: ODE solvers, step-size control and solves that return their statistics and status;
//! - [`guidance`]: classifier-free guidance;
//! - [`infill`]: masked conditional flow matching for filling spans of sequences (Voicebox);
//! - [`empirical`]: the exact marginal field of a finite data set;
//! - [`objective`]: FM-OT, FM-diffusion, DDPM, score matching and ScoreFlow as data;
//! - [`coupling`]: independent, exact minibatch OT and Sinkhorn pairings of x0 with x1;
//! - [`data`]: built-in 2-D data sets and tensor data sets;
//! - [`likelihood`]: log-likelihoods by the instantaneous change of variables;
//! - [`train`]: the CFM training step and its configuration; [`checkpoint`]: atomic, checksummed
//!   checkpoints with exact resume;
//! - [`audio`]: the STFT, log-mel spectrograms, Griffin-Lim phase reconstruction and WAV files;
//! - [`speech`]: the speech corpus made on the machine (sentences, frame phones, corpus files);
//! - [`sample`]: drawing samples from a trained model (batched, guided, from noise or a source);
//! - [`reflow`]: one round of rectified flow (pairs from a trained model, the next run's config);
//! - [`eval`]: sample-quality metrics, the image classifier, the Frechet distance, straightness and the
//!   few-step summary of a flow;
//! - [`experiments`]: the objective ablation and the couplings study, as functions from a config to
//!   results.
//!
//! One training step of the MLP on the OT path:
//!
//! ```
//! # fn main() -> flowmatching::Result<()> {
//! use flowmatching::data::Toy2d;
//! use flowmatching::nn::{MlpConfig, ModelConfig};
//! use flowmatching::objective::Weighting;
//! use flowmatching::path::{Prediction, SchedulerConfig};
//! use flowmatching::train::{RunConfig, TrainConfig, Trainer, FORMAT_VERSION};
//!
//! let config = RunConfig {
//!     format_version: FORMAT_VERSION,
//!     model: ModelConfig::Mlp(MlpConfig::new(2)),
//!     path: SchedulerConfig::CondOt { sigma_min: 1e-5 },
//!     prediction: Prediction::Velocity,
//!     weighting: Weighting::Uniform,
//!     train: TrainConfig::default(),
//!     data: "moons".into(),
//!     source: None,
//! };
//! let mut trainer = Trainer::new(config, &candle_core::Device::Cpu)?;
//! let loss = trainer.step(&Toy2d::Moons)?;
//! assert!(loss.is_finite());
//! # Ok(())
//! # }
//! ```

pub mod device;
pub mod error;
pub mod precision;
pub mod rng;
pub mod tensor;

pub mod field;

mod cpu;

pub mod optim;
pub mod params;

pub mod path;
pub mod timesteps;

pub mod nn;

pub mod solver;

pub mod empirical;
pub mod guidance;
pub mod infill;
pub mod objective;

pub mod assignment;
pub mod coupling;
pub mod data;

pub mod likelihood;

pub mod checkpoint;
pub mod train;

pub mod audio;
pub mod speech;

pub mod reflow;
pub mod sample;

pub mod eval;

pub mod experiments;

pub use error::{Error, Result};

#[cfg(test)]
pub(crate) mod testing;
