//! # flowmatching
//!
//! Conditional flow matching (Lipman et al., "Flow Matching for Generative Modeling") on candle.
//!
//! **Time convention, everywhere in this crate: t = 0 is noise, t = 1 is data.** Samples are drawn by
//! integrating dx/dt = v(x, t) from x0 ~ N(0, I) at t = 0 to t = 1.
//!
//! The pieces, one concept per module:
//! - [`scheduler`]: alpha_t, sigma_t and their derivatives (CondOT with sigma_min, VP diffusion, cosine,
//!   polynomial);
//! - [`path`]: the affine Gaussian path x_t = sigma_t x0 + alpha_t x1 over any scheduler, its regression
//!   targets and the conversions between velocity, x1, noise and score predictions;
//! - [`empirical`]: the exact marginal field of a finite data set (the optimum a model approximates);
//! - [`model`]: the [`model::VelocityField`] trait and the MLP; [`unet`]: the image U-Net;
//! - [`guidance`]: classifier-free guidance;
//! - [`objective`]: FM-OT, FM-diffusion, DDPM, score matching and ScoreFlow as data (path, prediction,
//!   weight);
//! - [`coupling`]: independent, exact minibatch OT and Sinkhorn pairings of x0 with x1;
//! - [`optim`] and [`train`]: AdamW, warm-up, clipping, EMA and the CFM training step;
//! - [`fastmlp`]: the fused CPU engine that trains and evaluates MLPs;
//! - [`checkpoint`]: atomic, checksummed checkpoints with exact resume;
//! - [`solver`]: ODE solvers with exact NFE statistics;
//! - [`data`] and [`metrics`]: built-in 2-D data sets and sample-quality measures;
//! - [`device`]: opening a CUDA device for single-stream use;
//! - [`classifier`] and [`frechet`]: the image classifier and the Frechet distance of its features.

pub mod checkpoint;
pub mod classifier;
pub mod coupling;
pub mod cpuconv;
pub mod cpunorm;
pub mod data;
pub mod device;
pub mod empirical;
pub mod error;
pub mod fastmlp;
pub mod frechet;
pub mod guidance;
pub mod layers;
pub mod likelihood;
mod linalg;
pub mod metrics;
pub mod model;
pub mod objective;
pub mod optim;
pub mod path;
pub mod rng;
pub mod scheduler;
pub mod solver;
pub mod straightness;
pub mod train;
pub mod unet;
pub mod upsample;

pub use error::{Error, Result};

#[cfg(test)]
pub(crate) mod testing;
