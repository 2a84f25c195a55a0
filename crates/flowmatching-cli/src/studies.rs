//! What the studies (`ablate`, `schedules`) share: how samples are judged (energy distance to fresh
//! 2-D points, or FD of the evaluation classifier's features against reference images) and FD's floor
//! and ceiling at the study's sample size.

use std::path::Path;

use anyhow::{bail, Result};
use flowmatching::data::DataSource;
use flowmatching::eval::frechet::GaussianStats;
use flowmatching::experiments::ablation::{Evaluator, Quality};
use flowmatching::nn::ModelConfig;
use flowmatching::rng::Rng;
use flowmatching::train::{RunConfig, TrainConfig};

use crate::io;

/// Opens a study's data and device: 2-D points (on the CPU, where the MLP engine runs) or images.
/// `command` names the study in the refusals.
pub fn open(
    command: &str,
    spec: &str,
    options: &io::DataOptions,
    device: &crate::cli::DeviceArgs,
) -> Result<(Box<dyn DataSource>, candle_core::Device)> {
    let data = io::open_data_with(spec, options)?;
    let image = data.image_shape();
    if image.is_none() && data.dim() != 2 {
        bail!(
            "{command} works on 2-D points or images; {spec} is {}-dimensional",
            data.dim()
        );
    }
    let device = device.device()?;
    if image.is_none() && !device.is_cpu() {
        bail!("{command} on 2-D data runs on the CPU (its MLP engine is CPU-only); drop --device");
    }
    Ok((data, device))
}

/// A run configuration of `model` at `batch` for the memory estimates.
pub fn probe(model: &ModelConfig, batch: usize, data: &str) -> RunConfig {
    let train = TrainConfig {
        batch_size: batch,
        ..Default::default()
    };
    RunConfig::new(model.clone(), Default::default(), train, data)
}

/// The plotting window of sample pictures: the 2-D reference's, or pixels in [-1, 1].
pub fn window(quality: &Quality) -> (f32, f32) {
    match quality {
        Quality::Energy { reference, .. } => crate::plot::window(reference),
        Quality::Fd { .. } => (-1.0, 1.0),
    }
}

/// The images FD and the likelihood are measured against: Fashion-MNIST's test half, else the data.
pub fn reference_set(data: &str) -> String {
    match data {
        "fashion-mnist" | "fashion-mnist:train" => "fashion-mnist:test".into(),
        other => other.into(),
    }
}

/// The quality measure: the energy distance to `samples` fresh points, or FD against as many
/// reference images through `classifier`.
pub fn quality(
    data_name: &str,
    classifier: Option<&Path>,
    options: &io::DataOptions,
    data: &dyn DataSource,
    samples: usize,
    seed: u64,
    device: &candle_core::Device,
) -> Result<Quality> {
    let Some(shape) = data.image_shape() else {
        return Ok(Quality::Energy {
            reference: data.sample(&mut Rng::new(seed).fork(300), samples),
            checkerboard: data_name == "checkerboard",
        });
    };
    let Some(path) = classifier else {
        bail!(
            "image studies measure FD with an evaluation classifier: pass --classifier \
             (made by `flowmatching classifier train`)"
        );
    };
    let classifier = crate::resolve::load_classifier(path, shape, device)?;
    let reference = io::open_image_set(&reference_set(data_name), options)?;
    let rows = &reference.rows()[..samples.min(reference.len()) * DataSource::dim(&reference)];
    let reference = classifier.feature_stats(rows, device)?;
    Ok(Quality::Fd {
        classifier: Box::new(classifier),
        reference,
        shape,
    })
}

/// FD's floor and ceiling at `samples` samples on images (None on 2-D data): real training images,
/// and a Gaussian with their pixels' mean and covariance.
pub fn fd_bounds(
    eval: &Evaluator,
    data: &dyn DataSource,
    samples: usize,
    seed: u64,
) -> Result<(Option<f64>, Option<f64>)> {
    let Some(shape) = data.image_shape() else {
        return Ok((None, None));
    };
    let mut rng = Rng::new(seed).fork(302);
    let real = data.sample(&mut rng, samples);
    let pixels = GaussianStats::of(&real, shape.iter().product())?;
    let gauss = pixels.sample(&mut rng, samples)?;
    Ok((Some(eval.distance(&real)?), Some(eval.distance(&gauss)?)))
}
