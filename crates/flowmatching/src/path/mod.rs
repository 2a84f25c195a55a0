//! Probability paths: the [`Scheduler`]s (alpha_t, sigma_t and their derivatives) and the one
//! [`AffinePath`] that turns any of them into samples x_t = sigma_t x0 + alpha_t x1, regression targets
//! and conversions between prediction types; [`ScheduleTransformed`] samples a field trained on one
//! scheduler as if it had been trained on another.

mod affine;
pub mod scheduler;
mod transform;

pub use affine::{AffinePath, AsVelocity, PathSample, Prediction};
pub use scheduler::{CondOT, Cosine, Polynomial, Scheduler, SchedulerConfig, SchedulerOutput, VP};
pub use transform::{ScheduleTransformed, TimeMap};
