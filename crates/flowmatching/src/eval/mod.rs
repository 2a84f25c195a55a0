//! Measuring models and samples: point-set metrics (energy distance, checkerboard support), the image
//! classifier and the Frechet distance of its features, and the straightness of a flow.

pub mod classifier;
pub mod frechet;
pub mod metrics;
pub mod straightness;
pub mod summary;
