//! Probability paths: the [`Scheduler`]s (alpha_t, sigma_t and their derivatives) and the one
//! [`AffinePath`] that turns any of them into samples x_t = sigma_t x0 + alpha_t x1, regression targets
//! and conversions between prediction types.

mod affine;
pub mod scheduler;

pub use affine::{AffinePath, AsVelocity, PathSample, Prediction};
pub use scheduler::{CondOT, Cosine, Polynomial, Scheduler, SchedulerConfig, SchedulerOutput, VP};
